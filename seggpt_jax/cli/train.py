"""``seggpt-jax finetune``, ``tune-prompt`` and ``evaluate``: datasets in, models, prompts and reports out."""

from __future__ import annotations

import argparse
import json
import os
import time

from . import common
from .common import UserError, status


def add_commands(sub: argparse._SubParsersAction) -> None:
    finetune = sub.add_parser(
        "finetune", formatter_class=common.HelpFormatter,
        help="fine-tune the model on a dataset (in-context painting, AdamW)",
        description="Fine-tune on DATA (DATA/images + DATA/masks, or FSS-1000 class folders with --data-layout "
                    "fss1000): each step paints random (prompt, query) pairs of one group with randomly masked "
                    "patches. Checkpoints (model + optimizer state) go to OUT/step_N; --resume continues exactly. "
                    "Writes OUT/log.jsonl and OUT/report.json; the final model is OUT/final (use it with --model).")
    common.add_data_options(finetune)
    finetune.add_argument("--out-dir", required=True, help="run folder: checkpoints, log, report, final model")
    hyper = finetune.add_argument_group("training")
    hyper.add_argument("--steps", type=common.positive_int, default=1000, help="optimizer steps in all")
    hyper.add_argument("--batch-size", dest="train_batch_size", type=common.positive_int, default=8,
                       help="(prompt, query) pairs per step")
    hyper.add_argument("--lr", type=common.positive_float, default=1e-4, help="peak learning rate (AdamW)")
    hyper.add_argument("--weight-decay", type=float, default=0.05, help="AdamW weight decay (not on norms, biases, "
                                                                        "tokens and positions)")
    hyper.add_argument("--warmup-steps", type=common.non_negative_int, default=100,
                       help="linear warm-up steps before the cosine decay")
    hyper.add_argument("--layer-decay", type=float, default=None,
                       help="layer-wise learning-rate decay, e.g. 0.75 (default: none)")
    hyper.add_argument("--trainable", default="all",
                       help="what is trained: 'all', 'decoder', or a regex on parameter paths")
    hyper.add_argument("--mask-ratio", type=float, default=0.75, help="share of mask patches hidden per row")
    hyper.add_argument("--half-mask-prob", type=float, default=0.0,
                       help="share of rows whose query half is hidden exactly as at inference")
    hyper.add_argument("--grad-accum", type=common.positive_int, default=1,
                       help="split each batch into this many micro-batches (same result, less memory)")
    hyper.add_argument("--remat", default=None, help="remat policy: full, dots, or a jax.checkpoint_policies name "
                                                     "(less memory, more compute; default: none)")
    hyper.add_argument("--bf16", action="store_true", help="bfloat16 compute, float32 parameters")
    hyper.add_argument("--no-drop-path", action="store_true", help="switch stochastic depth off")
    hyper.add_argument("--seed", type=int, default=0, help="seed of the data order, masks and drop-path")
    run = finetune.add_argument_group("run")
    run.add_argument("--checkpoint-every", type=common.positive_int, default=100, help="steps between checkpoints")
    run.add_argument("--log-every", type=common.positive_int, default=10, help="steps between log lines")
    run.add_argument("--resume", action="store_true", help="continue the run in --out-dir from its latest checkpoint")
    run.add_argument("--stop-after", type=common.positive_int, default=None, metavar="N",
                     help="train at most N steps in this invocation (checkpointed; continue with --resume)")
    common.add_model_options(finetune, inference=False)
    finetune.set_defaults(run=run_finetune)

    tune = sub.add_parser(
        "tune-prompt", formatter_class=common.HelpFormatter,
        help="learn a prompt for a task with the model frozen (in-context tuning)",
        description="Optimise prompt canvases (initialised from the first examples of DATA, or noise) so that the "
                    "frozen model paints DATA's masks; saves them to --output (safetensors) for `segment "
                    "--learned-prompt`. Checkpoints every --checkpoint-every steps; --resume continues exactly.")
    common.add_data_options(tune)
    tune.add_argument("-o", "--output", required=True, metavar="FILE", help="the learned prompt file (.safetensors)")
    hyper = tune.add_argument_group("tuning")
    hyper.add_argument("--steps", type=common.positive_int, default=500, help="optimizer steps in all")
    hyper.add_argument("--batch-size", dest="train_batch_size", type=common.positive_int, default=4,
                       help="queries per step")
    hyper.add_argument("--lr", type=common.positive_float, default=0.05, help="Adam learning rate")
    hyper.add_argument("--num-prompts", type=common.positive_int, default=1, help="prompts learned (ensembled)")
    hyper.add_argument("--init", choices=["examples", "noise"], default="examples",
                       help="start from the first examples of DATA, or from noise")
    hyper.add_argument("--tune", choices=["both", "image", "mask"], default="both",
                       help="which half of the prompt is learned")
    hyper.add_argument("--seed", type=int, default=0, help="seed of the data order and augmentation")
    run = tune.add_argument_group("run")
    run.add_argument("--checkpoint-every", type=common.positive_int, default=100, help="steps between checkpoints")
    run.add_argument("--log-every", type=common.positive_int, default=10, help="steps between log lines")
    run.add_argument("--resume", action="store_true", help="continue from the state saved next to --output")
    common.add_model_options(tune, inference=False)
    tune.set_defaults(run=run_tune_prompt)

    evaluate = sub.add_parser(
        "evaluate", formatter_class=common.HelpFormatter,
        help="IoU, mIoU and FB-IoU on a dataset (FSS-1000, COCO-20i/PASCAL-5i folds, or a folder)",
        description="Evaluate with a protocol: fss1000 (one-shot episodes in each class folder), coco20i / pascal5i "
                    "(episodes over the classes of --fold in a folder of class-id masks), or folder (every image with "
                    "the given prompts; confusion-matrix mIoU). Prints the metrics; -o writes a JSON report.")
    common.add_data_options(evaluate)
    protocol = evaluate.add_argument_group("protocol")
    protocol.add_argument("--protocol", choices=["fss1000", "coco20i", "pascal5i", "folder"], required=True,
                          help="the evaluation protocol")
    protocol.add_argument("--fold", type=common.non_negative_int, default=0, help="coco20i/pascal5i fold (0..3)")
    protocol.add_argument("--shots", type=common.positive_int, default=1, help="prompts per episode")
    protocol.add_argument("--episodes", type=common.positive_int, default=None, help="at most this many episodes")
    protocol.add_argument("--seed", type=int, default=0, help="seed of the episode sampling")
    protocol.add_argument("--ensemble-mode", choices=["transformers", "original"], default="transformers",
                          help="how several prompts are combined")
    evaluate.add_argument("-o", "--output", default=None, metavar="FILE",
                          help="JSON report (default: the metrics are printed only)")
    common.add_prompt_options(evaluate)
    common.add_model_options(evaluate)
    evaluate.set_defaults(run=run_evaluate)


def _dataset(args: argparse.Namespace):
    from ..data import FolderDataset, FSS1000Dataset

    layout = args.data_layout or ("fss1000" if getattr(args, "protocol", None) == "fss1000" else "folder")
    colour_map = common.colour_map(args)
    status(f"checking every file of {args.data} ...")
    if layout == "fss1000":
        if args.num_labels is not None:
            raise UserError("FSS-1000 masks are binary; drop --num-labels")
        return FSS1000Dataset(args.data).validate()
    ignore = args.ignore_index if args.ignore_index is not None else "auto"
    return FolderDataset(args.data, num_labels=args.num_labels, ignore_index=ignore, colour_map=colour_map).validate()


class _JsonLog:
    """Print each record and append it to a JSON-lines file."""

    def __init__(self, path: str | None):
        self.path = path

    def __call__(self, record: dict) -> None:
        print("  ".join(f"{k} {v:.5g}" if isinstance(v, float) else f"{k} {v}" for k, v in record.items()
                        if not isinstance(v, dict)), flush=True)
        if self.path:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")


def run_finetune(args: argparse.Namespace) -> int:
    from ..train.state import write_json
    from ..train.trainer import EpisodeBatches, Trainer, TrainConfig

    common.check_output_folder(args.out_dir)
    try:
        config = TrainConfig(
            steps=args.steps, batch_size=args.train_batch_size, learning_rate=args.lr, weight_decay=args.weight_decay,
            warmup_steps=args.warmup_steps, layer_decay=args.layer_decay, trainable=args.trainable,
            mask_ratio=args.mask_ratio, half_mask_prob=args.half_mask_prob, drop_path=not args.no_drop_path,
            grad_accum=args.grad_accum, remat_policy=args.remat, dtype="bfloat16" if args.bf16 else "float32",
            seed=args.seed, log_every=args.log_every, checkpoint_every=args.checkpoint_every)
    except ValueError as e:
        raise UserError(str(e)) from None
    latest = os.path.join(args.out_dir, "latest")
    if args.resume and not os.path.isfile(latest):
        raise UserError(f"--resume: no checkpoint in {args.out_dir} (expected {latest})")
    if not args.resume and os.path.isfile(latest):
        raise UserError(f"{args.out_dir} already holds a run; pass --resume to continue it or choose another --out-dir")
    dataset = _dataset(args)  # every data problem is reported before any training starts
    os.makedirs(args.out_dir, exist_ok=True)
    if args.resume:
        trainer = Trainer.restore(args.out_dir, config=config)
        status(f"resumed {args.out_dir} at step {trainer.step_count}")
    else:
        trainer = Trainer(common.load_model(args), config)
    trainer.batches = EpisodeBatches(dataset, trainer.model.config, batch_size=config.batch_size, seed=config.seed,
                                     mask_ratio=config.mask_ratio, half_mask_prob=config.half_mask_prob)
    start = time.perf_counter()
    history = trainer.fit(checkpoint_dir=args.out_dir, log=_JsonLog(os.path.join(args.out_dir, "log.jsonl")),
                          stop_after=args.stop_after)
    if trainer.step_count < config.steps:
        print(f"stopped at step {trainer.step_count} of {config.steps}; continue with --resume")
        return 0
    final = os.path.join(args.out_dir, "final")
    trainer.model.save_pretrained(final)
    report = {"steps": trainer.step_count, "final_loss": history[-1]["loss"] if history else None,
              "first_loss": history[0]["loss"] if history else None, "seconds": round(time.perf_counter() - start, 1),
              "samples": len(dataset), "config": config.to_json(), "model": args.model, "final_model": final}
    write_json(os.path.join(args.out_dir, "report.json"), report)
    print(f"fine-tuned {trainer.step_count} steps; final model in {final} (use --model {final})")
    return 0


def run_tune_prompt(args: argparse.Namespace) -> int:
    from ..train.prompt_tuning import PromptTuningConfig, resume_prompt_tuning, tune_prompt

    common.check_output_file(args.output)
    try:
        config = PromptTuningConfig(steps=args.steps, batch_size=args.train_batch_size, learning_rate=args.lr,
                                    num_prompts=args.num_prompts, init=args.init, tune=args.tune, seed=args.seed,
                                    log_every=args.log_every, checkpoint_every=args.checkpoint_every)
    except ValueError as e:
        raise UserError(str(e)) from None
    if args.resume and not os.path.isfile(args.output + ".state.safetensors"):
        raise UserError(f"--resume: no prompt-tuning state next to {args.output}")
    dataset = _dataset(args)
    model = common.load_model(args)
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    log = _JsonLog(args.output + ".log.jsonl")
    if args.resume:
        prompt = resume_prompt_tuning(model, dataset, args.output, config, log=log)
    else:
        prompt = tune_prompt(model, dataset, config, log=log, checkpoint=args.output)
    prompt.metadata["model"] = args.model
    prompt.save(args.output)
    print(f"learned {common.plural(len(prompt), 'prompt')} in {config.steps} steps; saved {args.output} "
          f"(use: seggpt-jax segment ... --learned-prompt {args.output})")
    return 0


def run_evaluate(args: argparse.Namespace) -> int:
    from ..data import class_episodes, fold_classes, sample_episodes
    from ..eval.protocols import evaluate_episodes, evaluate_folder
    from ..train.state import write_json
    from .segment import _checked_prompts

    if args.output:
        common.check_output_file(args.output)
    common.check_compilation_cache(args)
    if args.protocol in ("coco20i", "pascal5i"):
        if args.num_labels is None:
            raise UserError(f"--protocol {args.protocol} needs class-id masks: pass --num-labels")
        try:
            classes = fold_classes(args.protocol, args.fold)
        except ValueError as e:
            raise UserError(str(e)) from None
    prompts = _checked_prompts(args, common.colour_map(args)) if args.protocol == "folder" else None
    dataset = _dataset(args)
    segmenter = common.make_segmenter(args)
    bar = common.progress_bar(None, "episode", "evaluate")

    def progress(done: int, total: int | None) -> None:
        bar.total = total
        bar.update(done - bar.n)

    try:
        if args.protocol == "fss1000":
            episodes = sample_episodes(dataset, shots=args.shots, seed=args.seed)[: args.episodes]
            report = evaluate_episodes(segmenter, dataset, episodes, progress=progress)
        elif args.protocol in ("coco20i", "pascal5i"):
            episodes = class_episodes(dataset, classes, shots=args.shots, seed=args.seed, max_episodes=args.episodes)
            if not episodes:
                raise UserError(f"no episodes: no image of {args.data} holds a class of fold {args.fold} together "
                                f"with {args.shots} other images of it")
            report = evaluate_episodes(segmenter, dataset, episodes, progress=progress)
        else:
            report = evaluate_folder(segmenter, dataset, prompts, num_labels=args.num_labels, progress=progress)
    finally:
        bar.close()
    report.update(protocol=args.protocol, data=args.data, model=args.model, shots=args.shots, fold=args.fold)
    print(f"{args.protocol}: mIoU {report['mIoU']:.4f}  FB-IoU {report['FB-IoU']:.4f}  "
          f"({report.get('episodes', report.get('images'))} {'episodes' if 'episodes' in report else 'images'}, "
          f"{report['seconds']}s)")
    if args.output:
        write_json(args.output, report)
    return 0
