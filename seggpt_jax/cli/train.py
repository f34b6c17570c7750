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
    hyper.add_argument("--weights", choices=["replicated", "fsdp"], default="replicated",
                       help="replicated: every device holds the parameters and optimizer state (fastest while they "
                            "fit); fsdp: each large tensor is split over the devices and gathered where it is used "
                            "(1/devices of the memory, an all-gather per layer): for state that does not fit beside "
                            "the activations")
    hyper.add_argument("--no-drop-path", action="store_true", help="switch stochastic depth off")
    hyper.add_argument("--seed", type=int, default=0, help="seed of the data order, masks and drop-path")
    run = finetune.add_argument_group("run")
    run.add_argument("--checkpoint-every", type=common.positive_int, default=100, help="steps between checkpoints")
    run.add_argument("--keep-checkpoints", type=common.positive_int, default=2, metavar="N",
                     help="keep only the newest N of this run's checkpoints (each is the model plus the optimizer "
                          "state: about 4.4 GB at ViT-L)")
    run.add_argument("--log-every", type=common.positive_int, default=10, help="steps between log lines")
    run.add_argument("--resume", action="store_true", help="continue the run in --out-dir from its latest checkpoint")
    run.add_argument("--stop-after", type=common.positive_int, default=None, metavar="N",
                     help="train at most N steps in this invocation (checkpointed; continue with --resume)")
    finetune.add_argument("--overwrite", action="store_true",
                          help="start over in an --out-dir that holds an earlier run: its checkpoints, log, report "
                               "and final model are removed (files anyone else put there are never touched)")
    common.add_model_options(finetune, inference=False)
    common.add_distributed_options(finetune)
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
    common.add_overwrite_option(tune)
    common.add_model_options(tune, inference=False)
    common.add_distributed_options(tune)
    tune.set_defaults(run=run_tune_prompt)

    evaluate = sub.add_parser(
        "evaluate", formatter_class=common.HelpFormatter,
        help="few-shot mIoU (FSS-1000, PASCAL-5i, COCO-20i), DAVIS-2017 J&F, or a folder's mIoU",
        description="Evaluate with a protocol. fss1000 / pascal5i / coco20i: HSNet's standard few-shot episodes "
                    "(--sampling hsnet, seed 0) in HSNet's layouts (DATA holds FSS-1000/<class>/<n>.jpg|png, "
                    "VOC2012/JPEGImages + VOC2012/SegmentationClassAug, or COCO2014/<split>/*.jpg + "
                    "COCO2014/annotations/<split>/*.png), with HSNet's split lists for PASCAL and COCO (--splits); "
                    "or every (image, class) pair (--sampling all-pairs; PASCAL/COCO then read DATA/images + "
                    "DATA/masks with --num-labels). davis: DAVIS-2017 semi-supervised J&F (DATA holds JPEGImages/480p, "
                    "Annotations/480p, ImageSets/2017/val.txt). folder: every image with the given prompts. Bad "
                    "samples never stop a run: each is named in the summary (exit status 1 if any episode had to be "
                    "left out). Prints the metrics; -o writes a JSON report with every setting.")
    common.add_data_options(evaluate)
    protocol = evaluate.add_argument_group("protocol")
    protocol.add_argument("--protocol", choices=["fss1000", "pascal5i", "coco20i", "davis", "folder"], required=True,
                          help="the evaluation protocol")
    protocol.add_argument("--sampling", choices=["hsnet", "all-pairs"], default="hsnet",
                          help="few-shot episodes: HSNet's (the standard protocol, comparable with papers) or every "
                               "(image, class) pair with random supports")
    protocol.add_argument("--fss-split", choices=["test", "val", "trn", "all"], default="test",
                          help="fss1000: the classes evaluated (test: the 240 official test classes; all: every "
                               "class folder in DATA)")
    protocol.add_argument("--splits", metavar="DIR",
                          help="pascal5i/coco20i with HSNet's sampling: a checkout of HSNet's data/splits folder "
                               "(github.com/juhongm999/hsnet; its files are checked by sha256)")
    protocol.add_argument("--fold", type=common.non_negative_int, default=0, help="pascal5i/coco20i fold (0..3)")
    protocol.add_argument("--shots", type=common.positive_int, default=1, help="prompts per episode")
    protocol.add_argument("--episodes", type=common.positive_int, default=None,
                          help="all-pairs sampling: a seeded random subset of this many episodes (HSNet's protocol "
                               "fixes its episodes)")
    protocol.add_argument("--seed", type=int, default=0, help="seed of the episode sampling")
    protocol.add_argument("--on-bad-sample", choices=["resize", "skip", "fail"], default="resize",
                          help="a mask of the wrong size or a defective mask: use it as HSNet does (resize the mask "
                               "to its image; threshold it at grey 128), skip its episodes, or stop before the run")
    protocol.add_argument("--list-episodes", action="store_true",
                          help="print the episodes (query, supports, class) as JSON lines and stop: no model is "
                               "loaded")
    how = evaluate.add_argument_group("prediction and scoring")
    how.add_argument("--ensemble-mode", choices=["original", "transformers", "spatial"], default=None,
                     help="several prompts: BAAI's feature ensemble (original, default), transformers', or the "
                          "spatial ensemble (the prompts tiled into one prompt, the paper's Table 4a)")
    how.add_argument("--embedding-type", choices=["instance", "semantic"], default="instance",
                     help="the model's task embedding")
    how.add_argument("--threshold", type=float, default=None, metavar="T",
                     help="foreground where the painted brightness (0..1) is above T (default: the nearest of "
                          "black and white, i.e. T = 0.5)")
    how.add_argument("--absent-classes", choices=["zero", "skip"], default=None,
                     help="a class of the fold no episode scored counts 0 in the mIoU (zero, HSNet's convention; "
                          "default with --sampling hsnet) or is left out (skip; default otherwise)")
    how.add_argument("--eval-size", type=common.positive_int, default=None, metavar="N",
                     help="score at NxN (prediction and mask resized, nearest), as HSNet does with 400 (default: "
                          "each query's own size)")
    how.add_argument("--context-frames", type=common.non_negative_int, default=8, metavar="K",
                     help="davis: previous frames (with their predicted masks) that join the first frame's prompt")
    evaluate.add_argument("-o", "--output", default=None, metavar="FILE",
                          help="JSON report (default: the metrics are printed only)")
    common.add_overwrite_option(evaluate)
    common.add_prompt_options(evaluate)
    common.add_model_options(evaluate)
    common.add_distributed_options(evaluate)
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
    """Print each record and keep the run's JSON-lines log: the whole log is rewritten atomically through
    the run's output folder after each record, so it is never half written and never a user's file."""

    def __init__(self, folder=None, name: str | None = None, *, resume: bool = False):
        self.folder, self.name, self.lines = folder, name, []
        if folder is not None and resume and folder.owns(name):
            with open(folder.target(name), encoding="utf-8") as f:
                self.lines = [line.rstrip("\n") for line in f if line.strip()]

    def __call__(self, record: dict) -> None:
        from ..files import text_writer

        if not common.is_main_process():
            return
        print("  ".join(f"{k} {v:.5g}" if isinstance(v, float) else f"{k} {v}" for k, v in record.items()
                        if not isinstance(v, dict)), flush=True)
        if self.folder is not None:
            step = record.get("step")
            if step is not None:  # a resumed run logs its steps again from its checkpoint on
                self.lines = [line for line in self.lines if json.loads(line).get("step", -1) < step]
            self.lines.append(json.dumps(record))
            self.folder.write(self.name, text_writer("\n".join(self.lines) + "\n"), replace=True)


#: What a fine-tuning run writes into its --out-dir besides its step_N checkpoint folders.
RUN_FILES = ("latest", "log.jsonl", "report.json", "final")


def _check_trainable(args: argparse.Namespace, config) -> None:
    """--trainable must select some parameter (checked on the model's structure, before anything loads)."""
    from ..config import ConfigError, SegGptConfig
    from ..train.trainer import check_trainable
    from ..weights import CheckpointError

    try:
        model_config = SegGptConfig.from_json_file(args.config) if getattr(args, "config", None) else \
            SegGptConfig.from_pretrained(args.model, revision=args.revision, cache_dir=args.cache_dir,
                                         local_files_only=args.local_files_only)
    except (ConfigError, CheckpointError, OSError):
        return  # checked by the Trainer once the model is loaded
    try:
        check_trainable(model_config, config.trainable)
    except ValueError as e:
        raise UserError(f"--trainable: {e}") from None


def _finetune_folder(args: argparse.Namespace, config):
    """The run's output folder, checked before any work: no file of the run's names that is someone
    else's; an earlier run's only with --resume (continued) or --overwrite (removed)."""
    from ..files import FOREIGN, OutputFolder
    from ..train.state import CHECKPOINT_NAME

    folder = OutputFolder(args.out_dir)
    ours = [name for name in (*RUN_FILES, *folder.names("folder")) if folder.owns(name)
            and (name in RUN_FILES or CHECKPOINT_NAME.match(name))]
    steps = sorted({*range(config.checkpoint_every, config.steps + 1, config.checkpoint_every), config.steps})
    names = (*RUN_FILES, *(f"step_{step:07d}" for step in steps))
    foreign = [n for n in names if folder.status(n) == FOREIGN]
    if foreign:
        raise UserError(f"{os.path.join(args.out_dir, foreign[0])} exists and was not written by seggpt-jax; a run "
                        f"writes {', '.join(RUN_FILES)} and step_N folders: choose another --out-dir")
    if args.resume:
        if not folder.owns("latest"):
            raise UserError(f"--resume: no checkpoint of seggpt-jax in {args.out_dir} (expected its file latest)")
    elif ours and not args.overwrite:
        raise UserError(f"{args.out_dir} already holds a run; pass --resume to continue it, --overwrite to start over, "
                        f"or choose another --out-dir")
    elif ours:
        from .. import parallel

        if common.is_main_process():
            status(f"--overwrite: removing the earlier run in {args.out_dir} ({', '.join(ours)})")
            for name in ours:
                folder.remove(name)
        parallel.sync("the earlier run removed")
    return folder


def run_finetune(args: argparse.Namespace) -> int:
    from ..train.trainer import EpisodeBatches, Trainer, TrainConfig

    common.check_output_folder(args.out_dir)
    common.check_compilation_cache(args)
    try:
        config = TrainConfig(
            steps=args.steps, batch_size=args.train_batch_size, learning_rate=args.lr, weight_decay=args.weight_decay,
            warmup_steps=args.warmup_steps, layer_decay=args.layer_decay, trainable=args.trainable,
            mask_ratio=args.mask_ratio, half_mask_prob=args.half_mask_prob, drop_path=not args.no_drop_path,
            grad_accum=args.grad_accum, remat_policy=args.remat, dtype="bfloat16" if args.bf16 else "float32",
            seed=args.seed, log_every=args.log_every, checkpoint_every=args.checkpoint_every)
    except ValueError as e:
        raise UserError(str(e)) from None
    common.start_distributed(args)  # before anything touches JAX
    if not args.resume:
        _check_trainable(args, config)
    folder = _finetune_folder(args, config)
    dataset = _dataset(args)  # every data problem is reported before any training starts
    if args.compilation_cache:
        _enable_cache(args)
    if args.resume:
        model_config = Trainer.checkpoint_config(args.out_dir)
        batches = EpisodeBatches(dataset, model_config, batch_size=config.batch_size, seed=config.seed,
                                 mask_ratio=config.mask_ratio, half_mask_prob=config.half_mask_prob)
        trainer = Trainer.restore(args.out_dir, config=config, batches=batches, devices=args.devices,
                                  weights=args.weights)
        status(f"resumed {args.out_dir} at step {trainer.step_count}")
    else:
        model = common.load_model(args)
        batches = EpisodeBatches(dataset, model.config, batch_size=config.batch_size, seed=config.seed,
                                 mask_ratio=config.mask_ratio, half_mask_prob=config.half_mask_prob)
        try:
            trainer = Trainer(model, config, batches=batches, devices=args.devices, weights=args.weights)
        except ValueError as e:
            raise UserError(str(e)) from None
    if trainer.parallel.active:
        status(f"training on {trainer.parallel.describe()} ({args.weights} weights), "
               f"{config.batch_size // trainer.parallel.size} rows per device")
    start = time.perf_counter()
    history = trainer.fit(checkpoint_dir=args.out_dir, log=_JsonLog(folder, "log.jsonl", resume=args.resume),
                          stop_after=args.stop_after, keep_checkpoints=args.keep_checkpoints)
    if trainer.step_count < config.steps:
        print(f"stopped at step {trainer.step_count} of {config.steps}; continue with --resume")
        return 0
    final_model = trainer.host_model()  # gathered from every process
    if not common.is_main_process():
        from .. import parallel

        parallel.sync("final model written")
        return 0
    final = folder.write_folder("final", final_model.save_pretrained, replace=True)
    report = {"steps": trainer.step_count, "final_loss": history[-1]["loss"] if history else None,
              "first_loss": history[0]["loss"] if history else None, "seconds": round(time.perf_counter() - start, 1),
              "samples": len(dataset), "config": config.to_json(), "model": args.model, "final_model": final}
    folder.write_json("report.json", report, replace=True)
    print(f"fine-tuned {trainer.step_count} steps; final model in {final} (use --model {final})")
    if trainer.parallel.processes > 1:
        from .. import parallel

        parallel.sync("final model written")
    return 0


def _enable_cache(args: argparse.Namespace) -> None:
    from ..runtime import enable_compilation_cache

    enable_compilation_cache(None if args.compilation_cache is True else args.compilation_cache)


def run_tune_prompt(args: argparse.Namespace) -> int:
    from ..train.prompt_tuning import PromptTuningConfig, resume_prompt_tuning, tune_prompt

    folder = common.output_file(args.output, "--output", overwrite=args.overwrite, resume=args.resume,
                                companions=(".log.jsonl", ".state.safetensors"))
    common.check_compilation_cache(args)
    try:
        config = PromptTuningConfig(steps=args.steps, batch_size=args.train_batch_size, learning_rate=args.lr,
                                    num_prompts=args.num_prompts, init=args.init, tune=args.tune, seed=args.seed,
                                    log_every=args.log_every, checkpoint_every=args.checkpoint_every)
    except ValueError as e:
        raise UserError(str(e)) from None
    common.start_distributed(args)
    state = os.path.basename(args.output) + ".state.safetensors"
    if args.resume and not folder.owns(state):
        raise UserError(f"--resume: no prompt-tuning state of seggpt-jax next to {args.output} (expected {state})")
    dataset = _dataset(args)
    if args.compilation_cache:
        _enable_cache(args)
    model = common.load_model(args)
    log = _JsonLog(folder, os.path.basename(args.output) + ".log.jsonl", resume=args.resume)
    try:
        if args.resume:
            prompt = resume_prompt_tuning(model, dataset, args.output, config, log=log, output=folder,
                                          devices=args.devices)
        else:
            prompt = tune_prompt(model, dataset, config, log=log, checkpoint=args.output, output=folder,
                                 devices=args.devices)
    except ValueError as e:
        if "divide" not in str(e):
            raise
        raise UserError(f"--batch-size: {e}") from None
    if not common.is_main_process():
        return 0
    prompt.metadata["model"] = args.model
    prompt.save(args.output, output=folder)
    print(f"learned {common.plural(len(prompt), 'prompt')} in {config.steps} steps; saved {args.output} "
          f"(use: seggpt-jax segment ... --learned-prompt {args.output})")
    return 0


def _few_shot_settings(args: argparse.Namespace):
    """The run's settings from the options, every combination checked before anything is read."""
    from ..eval.protocols import FewShotSettings

    if args.threshold is not None and not 0 <= args.threshold <= 1:
        raise UserError(f"--threshold {args.threshold}: must be in [0, 1] (painted brightness)")
    if args.sampling == "hsnet" and args.episodes is not None:
        raise UserError("--episodes takes a random subset of all-pairs episodes; HSNet's protocol fixes its episodes "
                        "(FSS-1000: every image of the split; PASCAL-5i/COCO-20i: 1000 per fold). Use --sampling "
                        "all-pairs for a subset")
    if args.protocol == "fss1000" and args.num_labels is not None:
        raise UserError("FSS-1000 masks are binary; drop --num-labels")
    folder = None
    if args.protocol in ("pascal5i", "coco20i"):
        if args.fold > 3:
            raise UserError(f"--fold {args.fold}: {args.protocol} has folds 0..3")
        if args.sampling == "hsnet" and args.splits is None:
            raise UserError(f"--protocol {args.protocol} with HSNet's episodes needs --splits DIR, a checkout of "
                            "HSNet's data/splits folder (github.com/juhongm999/hsnet); or use --sampling all-pairs")
        if args.sampling == "all-pairs":
            from ..data import FolderDataset

            if args.num_labels is None:
                raise UserError(f"--protocol {args.protocol} --sampling all-pairs needs class-id masks: pass "
                                "--num-labels")
            ignore = args.ignore_index if args.ignore_index is not None else "auto"
            folder = FolderDataset(args.data, num_labels=args.num_labels, ignore_index=ignore,
                                   colour_map=common.colour_map(args))
    try:
        return FewShotSettings(args.protocol, args.data, shots=args.shots, fold=args.fold, sampling=args.sampling,
                               fss_split=args.fss_split, splits=args.splits, episodes=args.episodes, seed=args.seed,
                               on_bad_sample=args.on_bad_sample, ensemble=args.ensemble_mode,
                               embedding_type=args.embedding_type, threshold=args.threshold,
                               absent_classes=args.absent_classes, eval_size=args.eval_size, folder_dataset=folder)
    except ValueError as e:
        raise UserError(str(e)) from None


def _progress(desc: str, unit: str):
    bar = common.progress_bar(None, unit, desc)

    def progress(done: int, total: int | None) -> None:
        bar.total = total
        bar.update(done - bar.n)

    return bar, progress


def run_evaluate(args: argparse.Namespace) -> int:
    folder = common.output_file(args.output, "--output", overwrite=args.overwrite) if args.output else None
    common.start_distributed(args)

    def write_json(report: dict) -> None:
        if folder is not None and common.is_main_process():
            folder.write_json(os.path.basename(args.output), report, replace=True)

    common.check_compilation_cache(args)
    if _process()[1] > 1 and args.protocol in ("davis", "folder"):
        raise UserError(f"--distributed splits few-shot episodes over the processes; --protocol {args.protocol} runs "
                        f"in one process (drop --distributed)")
    if args.list_episodes and args.protocol in ("davis", "folder"):
        raise UserError(f"--list-episodes lists few-shot episodes; --protocol {args.protocol} has none")
    if args.protocol == "davis":
        return _run_davis(args, write_json)
    if args.protocol == "folder":
        return _run_folder(args, write_json)
    from ..data import describe_episode
    from ..eval.protocols import prepare_few_shot, run_few_shot

    settings = _few_shot_settings(args)
    status(f"drawing the episodes and checking their files in {args.data} ...")
    prepared = prepare_few_shot(settings)
    lines = prepared.screened.summary()
    if args.list_episodes:
        for episode in prepared.episodes:
            print(json.dumps(describe_episode(prepared.dataset, episode)))
        for line in lines:
            status(f"bad sample: {line}")
        return 0
    ensemble = settings.ensemble or "original"
    process = _process()
    # spatial: one (tiled) prompt per query, so the feature ensemble never runs; under --distributed each
    # process scores its own episodes on its own devices
    segmenter = common.make_segmenter(args, ensemble_mode="original" if ensemble == "spatial" else ensemble,
                                      local=process[1] > 1)
    bar, progress = _progress("evaluate", "episode")
    try:
        report = run_few_shot(segmenter, prepared, progress=progress, process=process)
    finally:
        bar.close()
    if not common.is_main_process():
        return _report_bad_samples(report)
    report.update(data=args.data, model=args.model)
    combined = f", {ensemble} ensemble" if args.shots > 1 else ""
    print(f"{args.protocol}: mIoU {report['mIoU']:.4f}  FB-IoU {report['FB-IoU']:.4f}  ({report['episodes']} episodes, "
          f"{report['classes']} classes, {args.shots}-shot{combined}, {report['seconds']}s)")
    write_json(report)
    return _report_bad_samples(report)


def _process() -> tuple[int, int]:
    """``(index, count)`` of this process in a ``--distributed`` job (``(0, 1)`` otherwise)."""
    import sys

    if "jax" not in sys.modules:
        return 0, 1
    import jax

    return jax.process_index(), jax.process_count()


def _report_bad_samples(report: dict) -> int:
    """The bad samples, each once by name, and what was done; exit status 1 if episodes were left out."""
    bad = report.get("bad_samples", [])
    if bad:
        print(f"{common.plural(len(bad), 'bad sample')} ({report['skipped_episodes']} episodes left out):")
        for entry in bad:
            problem = entry["problem"] if entry["file"] in entry["problem"] else f"{entry['file']}: {entry['problem']}"
            print(f"  {problem} ({entry['action']})")
    return 1 if report.get("skipped_episodes") else 0


def _run_davis(args: argparse.Namespace, write_json) -> int:
    from ..eval.davis import DavisDataset, evaluate_davis

    dataset = DavisDataset(args.data)
    ensemble = args.ensemble_mode or "original"
    if ensemble == "spatial":
        raise UserError("--protocol davis combines the first frame and its context frames with a feature ensemble: "
                        "use --ensemble-mode original or transformers")
    segmenter = common.make_segmenter(args, ensemble_mode=ensemble)
    bar, progress = _progress("davis", "sequence")
    try:
        report = evaluate_davis(segmenter, dataset, context_frames=args.context_frames,
                                ensemble_mode=ensemble, embedding_type=args.embedding_type,
                                progress=progress)
    finally:
        bar.close()
    report.update(data=args.data, model=args.model)
    print(f"davis: J&F {report['J&F-Mean']:.4f}  J {report['J-Mean']:.4f}  F {report['F-Mean']:.4f}  "
          f"({report['sequences']} sequences, {report['objects']} objects, context {args.context_frames}, "
          f"{report['seconds']}s)")
    write_json(report)
    failed = report["failed_sequences"]
    if failed:
        print(f"{common.plural(len(failed), 'sequence')} failed:")
        for message in failed.values():
            print(f"  {message}")
    return 1 if failed else 0


def _run_folder(args: argparse.Namespace, write_json) -> int:
    from ..eval.protocols import evaluate_folder
    from .segment import checked_prompts

    prompts, num_labels = checked_prompts(args, common.colour_map(args))
    dataset = _dataset(args)
    if args.ensemble_mode == "spatial":
        raise UserError("--ensemble-mode spatial is for few-shot episodes; --protocol folder uses a feature ensemble "
                        "(original or transformers)")
    segmenter = common.make_segmenter(args, ensemble_mode=args.ensemble_mode or "original")
    bar, progress = _progress("evaluate", "image")
    try:
        report = evaluate_folder(segmenter, dataset, prompts, num_labels=num_labels, progress=progress)
    finally:
        bar.close()
    report.update(protocol="folder", data=args.data, model=args.model)
    print(f"folder: mIoU {report['mIoU']:.4f}  FB-IoU {report['FB-IoU']:.4f}  ({report['images']} images, "
          f"{report['seconds']}s)")
    write_json(report)
    return 0
