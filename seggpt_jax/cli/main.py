"""The ``seggpt-jax`` command line: ``segment``, ``video``, ``convert`` and ``info``.

Every error a user can cause (missing files, unreadable or mismatched checkpoints, no network and no
cache) is printed as one line on stderr with a non-zero exit status, never as a traceback.
"""

from __future__ import annotations

import argparse
import os

import numpy as np
import shutil
import sys
import tempfile
import time

EXIT_USAGE = 2
EXIT_ERROR = 1


def _add_source_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--revision", help="Hub revision (branch, tag or commit) when SRC is a repo id")
    parser.add_argument("--cache-dir", help="Hugging Face cache folder (default: the hub's own)")
    parser.add_argument("--local-files-only", action="store_true", help="never touch the network; use the cache")
    parser.add_argument("--config", metavar="CONFIG_JSON",
                        help="config.json for a weight file that has none (default for those: ViT-L)")
    parser.add_argument("--layout", choices=["transformers", "original", "seggpt-jax"],
                        help="force the checkpoint layout instead of detecting it from the key names")


def _add_model_arguments(parser: argparse.ArgumentParser, inference_batch: bool = True) -> None:
    parser.add_argument("--model", default="BAAI/seggpt-vit-large",
                        help="Hub repo id, local folder or weight file (default: BAAI/seggpt-vit-large)")
    parser.add_argument("--revision", help="Hub revision when --model is a repo id")
    parser.add_argument("--cache-dir", help="Hugging Face cache folder (default: the hub's own)")
    parser.add_argument("--local-files-only", action="store_true", help="never touch the network; use the cache")
    if inference_batch:
        parser.add_argument("--batch-size", type=_positive_int, default=None,
                            help="rows per forward (query x prompt pairs); default 4 on CPU, 32 on accelerators")
    parser.add_argument("--compilation-cache", nargs="?", const=True, default=None, metavar="DIR",
                        help="keep compiled programs across runs (default folder ~/.cache/seggpt_jax/xla)")


def _add_prompt_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--prompt-image", action="append", default=[], metavar="IMAGE",
                        help="an example image; repeat with --prompt-mask for several prompts (ensembled)")
    parser.add_argument("--prompt-mask", action="append", default=[], metavar="MASK",
                        help="the mask of the preceding --prompt-image (same order)")


def _add_data_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", required=True, help="dataset folder")
    parser.add_argument("--layout", dest="data_layout", choices=["folder", "fss1000"], default=None,
                        help="folder: ROOT/images + ROOT/masks (default); fss1000: one folder per class")
    parser.add_argument("--num-labels", type=_positive_int, default=None,
                        help="masks hold class ids 0..N (default: binary masks, non-zero = foreground)")
    parser.add_argument("--ignore-index", type=int, default=None, help="label the loss and metrics skip "
                                                                        "(default 255 with --num-labels)")


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="seggpt-jax", description="SegGPT in JAX: segment images and videos "
                                     "from examples, and convert checkpoints.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    segment = sub.add_parser(
        "segment", help="segment images or folders from one or more (image, mask) examples",
        description="Segment every input image the way the prompt masks segment the prompt images. Writes "
                    "NAME_mask.png (class ids as a palette PNG, or 0/255 for binary masks) and NAME_overlay.png "
                    "for each input. Masks are binary foregrounds unless --num-labels is given; several prompts are "
                    "feature-ensembled. A prompt mask whose size differs from its image is accepted with a warning "
                    "(both are resized to the model's input size independently).")
    segment.add_argument("inputs", nargs="+", metavar="IMAGES_OR_FOLDERS", help="images, or folders of images")
    _add_prompt_arguments(segment)
    segment.add_argument("--out-dir", required=True, help="output folder (created)")
    mode = segment.add_mutually_exclusive_group()
    mode.add_argument("--num-labels", type=_positive_int, help="semantic mode: masks hold class ids 0..N")
    mode.add_argument("--binary", action="store_true", help="binary mode (default): any non-zero mask pixel is "
                                                            "foreground")
    segment.add_argument("--embedding-type", choices=["instance", "semantic"],
                         help="default: semantic with --num-labels, instance otherwise")
    segment.add_argument("--ensemble-mode", choices=["transformers", "original"], default="transformers",
                         help="how several prompts are combined (default: transformers')")
    segment.add_argument("--learned-prompt", metavar="FILE",
                         help="a prompt learned with `seggpt-jax tune-prompt`, instead of --prompt-image/--prompt-mask")
    _add_model_arguments(segment)

    video = sub.add_parser(
        "video", help="segment a clip from a first-frame example (the SegGPT video procedure)",
        description="Segment every frame of FRAMES (a folder of frames, a GIF/WebP/APNG, or an mp4 with the video "
                    "extra) with the prompt plus the last K predicted frames as extra prompts (binarised, "
                    "feature-ensembled as the BAAI code does). Writes frames/NAME_mask.png per frame and "
                    "overlay.gif.")
    _add_prompt_arguments(video)
    video.add_argument("--frames", required=True, help="folder of frames, animated GIF/WebP/APNG, or video file")
    video.add_argument("--out-dir", required=True, help="output folder (created)")
    video.add_argument("--context-frames", type=int, default=0, metavar="K",
                       help="how many previous frames (with their predicted masks) join the prompt (default 0)")
    video.add_argument("--duration", type=int, default=100, help="overlay animation: milliseconds per frame")
    video.add_argument("--ensemble-mode", choices=["transformers", "original"], default="original")
    _add_model_arguments(video)

    finetune = sub.add_parser(
        "finetune", help="fine-tune the model on a folder dataset (in-context painting, AdamW)",
        description="Fine-tune on DATA (ROOT/images + ROOT/masks, or FSS-1000 class folders with --layout fss1000): "
                    "each step paints random (prompt, query) pairs of one group with randomly masked patches. "
                    "Checkpoints (model + optimizer state) go to OUT/step_N; --resume continues exactly. Writes "
                    "OUT/log.jsonl and OUT/report.json; the final model is OUT/final (load it with --model).")
    _add_data_arguments(finetune)
    finetune.add_argument("--out-dir", required=True, help="run folder: checkpoints, log, report, final model")
    finetune.add_argument("--steps", type=_positive_int, default=1000)
    finetune.add_argument("--batch-size", dest="train_batch_size", type=_positive_int, default=8)
    finetune.add_argument("--lr", type=float, default=1e-4)
    finetune.add_argument("--weight-decay", type=float, default=0.05)
    finetune.add_argument("--warmup-steps", type=int, default=100)
    finetune.add_argument("--layer-decay", type=float, default=None)
    finetune.add_argument("--trainable", default="all", help="'all', 'decoder', or a regex on parameter paths")
    finetune.add_argument("--mask-ratio", type=float, default=0.75)
    finetune.add_argument("--half-mask-prob", type=float, default=0.0,
                          help="share of rows whose query half is masked as at inference")
    finetune.add_argument("--grad-accum", type=_positive_int, default=1)
    finetune.add_argument("--remat", default=None, help="remat policy: full, dots, or a jax.checkpoint_policies name")
    finetune.add_argument("--bf16", action="store_true", help="bfloat16 compute, float32 parameters")
    finetune.add_argument("--no-drop-path", action="store_true")
    finetune.add_argument("--seed", type=int, default=0)
    finetune.add_argument("--checkpoint-every", type=_positive_int, default=100)
    finetune.add_argument("--log-every", type=_positive_int, default=10)
    finetune.add_argument("--resume", action="store_true", help="continue from OUT/latest")
    finetune.add_argument("--stop-after", type=_positive_int, default=None, metavar="N",
                          help="train at most N steps in this invocation (checkpointed; continue with --resume)")
    _add_model_arguments(finetune, inference_batch=False)

    tune = sub.add_parser(
        "tune-prompt", help="learn a prompt for a task with the model frozen (in-context tuning)",
        description="Optimise prompt canvases (initialised from the first examples of DATA, or noise) so that the "
                    "frozen model paints DATA's masks; saves them to OUT (safetensors) for `segment --learned-prompt`. "
                    "Checkpoints every --checkpoint-every steps; --resume continues exactly.")
    _add_data_arguments(tune)
    tune.add_argument("--out", required=True, help="learned prompt file (.safetensors)")
    tune.add_argument("--steps", type=_positive_int, default=500)
    tune.add_argument("--batch-size", dest="train_batch_size", type=_positive_int, default=4)
    tune.add_argument("--lr", type=float, default=0.05)
    tune.add_argument("--num-prompts", type=_positive_int, default=1)
    tune.add_argument("--init", choices=["examples", "noise"], default="examples")
    tune.add_argument("--tune", choices=["both", "image", "mask"], default="both")
    tune.add_argument("--seed", type=int, default=0)
    tune.add_argument("--checkpoint-every", type=_positive_int, default=100)
    tune.add_argument("--log-every", type=_positive_int, default=10)
    tune.add_argument("--resume", action="store_true")
    _add_model_arguments(tune, inference_batch=False)

    evaluate = sub.add_parser(
        "evaluate", help="IoU, mIoU and FB-IoU on a dataset (FSS-1000, COCO-20i/PASCAL-5i folds, or a folder)",
        description="Evaluate with a protocol: fss1000 (one-shot episodes in each class folder), coco20i / pascal5i "
                    "(episodes over the classes of --fold in a folder of class-id masks), or folder (every image with "
                    "the given prompts; confusion-matrix mIoU). Prints the metrics and writes a JSON report.")
    _add_data_arguments(evaluate)
    evaluate.add_argument("--protocol", choices=["fss1000", "coco20i", "pascal5i", "folder"], required=True)
    evaluate.add_argument("--fold", type=int, default=0)
    evaluate.add_argument("--shots", type=_positive_int, default=1)
    evaluate.add_argument("--episodes", type=_positive_int, default=None, help="at most this many episodes")
    evaluate.add_argument("--seed", type=int, default=0)
    evaluate.add_argument("--out", default=None, help="JSON report (default: printed only)")
    _add_prompt_arguments(evaluate)
    evaluate.add_argument("--learned-prompt", metavar="FILE", help="for --protocol folder")
    evaluate.add_argument("--ensemble-mode", choices=["transformers", "original"], default="transformers")
    _add_model_arguments(evaluate)

    convert = sub.add_parser(
        "convert", help="convert a checkpoint (Hub id, transformers folder, .bin, original .pth) to seggpt-jax format",
        description="Convert any checkpoint from_pretrained accepts into a seggpt-jax folder (config.json + "
                    "model.safetensors keyed by Flax parameter path), check that it reloads exactly, and, when "
                    "torch and transformers are installed, print a parity report against transformers.")
    convert.add_argument("src", metavar="SRC", help="Hub repo id, local folder, or weight file")
    convert.add_argument("out", metavar="OUT", help="output folder (created; must not hold another checkpoint "
                                                    "unless --overwrite)")
    _add_source_arguments(convert)
    convert.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                         help="parameter dtype to store (default float32)")
    convert.add_argument("--overwrite", action="store_true", help="replace an existing checkpoint in OUT")
    convert.add_argument("--no-parity", action="store_true", help="skip the transformers parity report")
    convert.add_argument("--tolerance", type=float, default=1e-4,
                         help="max abs error on pred_masks for the parity report to pass (default 1e-4)")

    info = sub.add_parser("info", help="show a checkpoint's config, parameter count, dtype and device",
                          description="Load a checkpoint and describe it.")
    info.add_argument("model", metavar="MODEL", help="Hub repo id, local folder, or weight file")
    _add_source_arguments(info)
    return parser


class _Progress:
    """A one-line progress bar on stderr."""

    def __init__(self, total: int | None, label: str, width: int = 30):
        self.total, self.label, self.width = total, label, width
        self.start = time.perf_counter()

    def __call__(self, done: int, total: int | None = None) -> None:
        total = total or self.total
        rate = done / max(time.perf_counter() - self.start, 1e-9)
        if total:
            filled = int(self.width * done / total)
            bar = "#" * filled + "." * (self.width - filled)
            text = f"\r{self.label} [{bar}] {done}/{total} ({rate:.2f}/s)"
        else:
            text = f"\r{self.label} {done} ({rate:.2f}/s)"
        print(text, end="" if done != total else "\n", file=sys.stderr, flush=True)


def _prompts_from_args(args) -> list:
    from ..imaging.media import InputError, check_readable

    if len(args.prompt_image) != len(args.prompt_mask):
        raise InputError(f"got {len(args.prompt_image)} --prompt-image and {len(args.prompt_mask)} --prompt-mask; "
                         "give each prompt image with its mask")
    if getattr(args, "learned_prompt", None):
        if args.prompt_image:
            raise InputError("use either --learned-prompt or --prompt-image/--prompt-mask, not both")
        from ..train.prompt_tuning import LearnedPrompt

        return LearnedPrompt.load(args.learned_prompt)  # all of its prompts, checked against the model
    if not args.prompt_image:
        raise InputError("give at least one --prompt-image with its --prompt-mask")
    prompts = []
    from ..inference.segmenter import Prompt

    for image, mask in zip(args.prompt_image, args.prompt_mask):
        image_size, mask_size = check_readable(image), check_readable(mask)
        if image_size != mask_size:
            print(f"seggpt-jax: warning: prompt mask {mask} is {mask_size[0]}x{mask_size[1]} but {image} is "
                  f"{image_size[0]}x{image_size[1]}; both are resized to the model's input size", file=sys.stderr)
        prompts.append(Prompt(image, mask))
    return prompts


def _make_segmenter(args):
    from ..nn.models import SegGptForImageSegmentation
    from ..inference.segmenter import Segmenter

    model = SegGptForImageSegmentation.from_pretrained(args.model, revision=args.revision, cache_dir=args.cache_dir,
                                                       local_files_only=args.local_files_only)
    return Segmenter(model, batch_size=getattr(args, "batch_size", None), compilation_cache=args.compilation_cache,
                     ensemble_mode=getattr(args, "ensemble_mode", "transformers"))


def _unique_names(paths: list[str]) -> list[str]:
    names, seen = [], {}
    for path in paths:
        stem = os.path.splitext(os.path.basename(path))[0]
        count = seen.get(stem, 0) + 1
        seen[stem] = count
        names.append(stem if count == 1 else f"{stem}-{count}")
    return names


def _cmd_segment(args) -> int:
    from PIL import Image

    from ..files import atomic_save
    from ..imaging.media import check_readable, collect_images, mask_image, overlay
    from ..imaging.processor import to_rgb_uint8

    import warnings

    inputs = collect_images(args.inputs)
    for path in inputs:
        check_readable(path)
    prompts = _prompts_from_args(args)  # warns, in one line, about masks of another size than their image
    if args.learned_prompt and args.num_labels is None and not args.binary:
        from ..train.prompt_tuning import LearnedPrompt

        args.num_labels = LearnedPrompt.load(args.learned_prompt).metadata.get("num_labels")
    warnings.filterwarnings("ignore", message="prompt mask .* but its image is", category=UserWarning)
    os.makedirs(args.out_dir, exist_ok=True)
    segmenter = _make_segmenter(args)
    start = time.perf_counter()
    names = _unique_names(inputs)
    results = segmenter.segment_iter(inputs, prompts, num_labels=args.num_labels, binary=args.binary or None,
                                     embedding_type=args.embedding_type, progress=_Progress(len(inputs), "segment"))
    written = 0
    for name, path, result in zip(names, inputs, results):
        mask_path = os.path.join(args.out_dir, f"{name}_mask.png")
        overlay_path = os.path.join(args.out_dir, f"{name}_overlay.png")
        atomic_save(mask_path, lambda tmp: mask_image(result.mask, args.num_labels).save(tmp, format="PNG"))
        picture = overlay(to_rgb_uint8(path), result.mask)
        atomic_save(overlay_path, lambda tmp: Image.fromarray(picture).save(tmp, format="PNG"))
        written += 2
    seconds = time.perf_counter() - start
    mode = f"{args.num_labels} classes" if args.num_labels else "binary"
    print(f"segmented {len(inputs)} images ({mode}, {len(prompts)} prompt{'s' if len(prompts) > 1 else ''}) in "
          f"{seconds:.1f}s ({seconds / len(inputs):.2f}s/image); wrote {written} files to {args.out_dir}")
    return 0


def _cmd_video(args) -> int:
    from ..files import atomic_save
    from ..imaging.media import iter_frames, mask_image, overlay, save_animation

    if args.context_frames < 0:
        raise _UserError(f"--context-frames must be >= 0, got {args.context_frames}")
    prompts = _prompts_from_args(args)
    if len(prompts) != 1:
        raise _UserError("the video procedure takes exactly one --prompt-image/--prompt-mask pair (the first frame's)")
    frames = list(iter_frames(args.frames))
    if not frames:
        raise _UserError(f"{args.frames} holds no frames")
    frames_dir = os.path.join(args.out_dir, "frames")
    os.makedirs(frames_dir, exist_ok=True)
    segmenter = _make_segmenter(args)
    start = time.perf_counter()
    overlays = []
    results = segmenter.segment_video((frame for _, frame in frames), prompts[0], context_frames=args.context_frames,
                                      ensemble_mode=args.ensemble_mode, progress=_Progress(len(frames), "video"))
    for (name, frame), result in zip(frames, results):
        path = os.path.join(frames_dir, f"{name}_mask.png")
        atomic_save(path, lambda tmp: mask_image(result.mask, None).save(tmp, format="PNG"))
        overlays.append(overlay(np.asarray(frame), result.mask))
    save_animation(os.path.join(args.out_dir, "overlay.gif"), overlays, args.duration)
    seconds = time.perf_counter() - start
    print(f"segmented {len(frames)} frames (context {args.context_frames}) in {seconds:.1f}s; wrote "
          f"{len(frames)} masks to {frames_dir} and {os.path.join(args.out_dir, 'overlay.gif')}")
    return 0


def _dataset(args):
    from ..data import FolderDataset, FSS1000Dataset

    layout = args.data_layout or ("fss1000" if getattr(args, "protocol", None) == "fss1000" else "folder")
    if layout == "fss1000":
        if args.num_labels is not None:
            raise _UserError("FSS-1000 masks are binary; drop --num-labels")
        return FSS1000Dataset(args.data).validate()
    ignore = args.ignore_index if args.ignore_index is not None else "auto"
    return FolderDataset(args.data, num_labels=args.num_labels, ignore_index=ignore).validate()


class _JsonLog:
    """Print each record and append it to a JSON-lines file."""

    def __init__(self, path: str | None):
        self.path = path

    def __call__(self, record: dict) -> None:
        import json

        print("  ".join(f"{k} {v:.5g}" if isinstance(v, float) else f"{k} {v}" for k, v in record.items()
                        if not isinstance(v, dict)), flush=True)
        if self.path:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")


def _write_json(path: str, data: dict) -> None:
    import json

    from ..files import atomic_save

    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(data, f, indent=2, sort_keys=True)
            f.write("\n")

    atomic_save(path, write)


def _cmd_finetune(args) -> int:
    from ..nn.models import SegGptForImageSegmentation
    from ..train.trainer import EpisodeBatches, Trainer, TrainConfig

    dataset = _dataset(args)  # every data problem is reported before any training starts
    config = TrainConfig(
        steps=args.steps, batch_size=args.train_batch_size, learning_rate=args.lr, weight_decay=args.weight_decay,
        warmup_steps=args.warmup_steps, layer_decay=args.layer_decay, trainable=args.trainable,
        mask_ratio=args.mask_ratio, half_mask_prob=args.half_mask_prob, drop_path=not args.no_drop_path,
        grad_accum=args.grad_accum, remat_policy=args.remat, dtype="bfloat16" if args.bf16 else "float32",
        seed=args.seed, log_every=args.log_every, checkpoint_every=args.checkpoint_every)
    os.makedirs(args.out_dir, exist_ok=True)
    latest = os.path.join(args.out_dir, "latest")
    if args.resume:
        if not os.path.isfile(latest):
            raise _UserError(f"--resume: no checkpoint in {args.out_dir} (expected {latest})")
        trainer = Trainer.restore(args.out_dir, config=config)
        print(f"resumed {args.out_dir} at step {trainer.step_count}")
    else:
        if os.path.isfile(latest):
            raise _UserError(f"{args.out_dir} already holds a run; pass --resume to continue it or choose another "
                             "--out-dir")
        model = SegGptForImageSegmentation.from_pretrained(args.model, revision=args.revision, cache_dir=args.cache_dir,
                                                           local_files_only=args.local_files_only)
        trainer = Trainer(model, config)
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
    _write_json(os.path.join(args.out_dir, "report.json"), report)
    print(f"fine-tuned {trainer.step_count} steps; final model in {final} (use --model {final})")
    return 0


def _cmd_tune_prompt(args) -> int:
    from ..nn.models import SegGptForImageSegmentation
    from ..train.prompt_tuning import PromptTuningConfig, resume_prompt_tuning, tune_prompt

    dataset = _dataset(args)
    config = PromptTuningConfig(steps=args.steps, batch_size=args.train_batch_size, learning_rate=args.lr,
                                num_prompts=args.num_prompts, init=args.init, tune=args.tune, seed=args.seed,
                                log_every=args.log_every, checkpoint_every=args.checkpoint_every)
    model = SegGptForImageSegmentation.from_pretrained(args.model, revision=args.revision, cache_dir=args.cache_dir,
                                                       local_files_only=args.local_files_only)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    log = _JsonLog(args.out + ".log.jsonl")
    if args.resume:
        if not os.path.isfile(args.out + ".state.safetensors"):
            raise _UserError(f"--resume: no prompt-tuning state next to {args.out}")
        prompt = resume_prompt_tuning(model, dataset, args.out, config, log=log)
    else:
        prompt = tune_prompt(model, dataset, config, log=log, checkpoint=args.out)
    prompt.metadata["model"] = args.model
    prompt.save(args.out)
    print(f"learned {len(prompt)} prompt{'s' if len(prompt) > 1 else ''} in {config.steps} steps; saved {args.out} "
          f"(use: seggpt-jax segment ... --learned-prompt {args.out})")
    return 0


def _cmd_evaluate(args) -> int:
    from ..data import class_episodes, fold_classes, sample_episodes
    from ..eval.metrics import evaluate_episodes, evaluate_folder

    dataset = _dataset(args)
    segmenter = _make_segmenter(args)
    progress = _Progress(None, "evaluate")
    if args.protocol == "fss1000":
        episodes = sample_episodes(dataset, shots=args.shots, seed=args.seed)[: args.episodes]
        report = evaluate_episodes(segmenter, dataset, episodes, progress=progress)
    elif args.protocol in ("coco20i", "pascal5i"):
        if args.num_labels is None:
            raise _UserError(f"--protocol {args.protocol} needs class-id masks: pass --num-labels")
        episodes = class_episodes(dataset, fold_classes(args.protocol, args.fold), shots=args.shots, seed=args.seed,
                                  max_episodes=args.episodes)
        if not episodes:
            raise _UserError(f"no episodes: no image of {args.data} holds a class of fold {args.fold} together with "
                             f"{args.shots} other images of it")
        report = evaluate_episodes(segmenter, dataset, episodes, progress=progress)
    else:
        prompts = _prompts_from_args(args)
        report = evaluate_folder(segmenter, dataset, prompts, num_labels=args.num_labels, progress=progress)
    report.update(protocol=args.protocol, data=args.data, model=args.model, shots=args.shots, fold=args.fold)
    print(f"{args.protocol}: mIoU {report['mIoU']:.4f}  FB-IoU {report['FB-IoU']:.4f}  "
          f"({report.get('episodes', report.get('images'))} {'episodes' if 'episodes' in report else 'images'}, "
          f"{report['seconds']}s)")
    if args.out:
        _write_json(args.out, report)
    return 0


def _load(args, dtype: str = "float32"):
    import jax.numpy as jnp

    from ..config import SegGptConfig
    from ..nn.models import SegGptForImageSegmentation

    config = SegGptConfig.from_json_file(args.config) if args.config else None
    return SegGptForImageSegmentation.from_pretrained(
        getattr(args, "src", None) or args.model, revision=args.revision, cache_dir=args.cache_dir,
        local_files_only=args.local_files_only, config=config, layout=args.layout, param_dtype=jnp.dtype(dtype))


def _cmd_convert(args) -> int:
    import numpy as np

    from ..weights import flat_parameters, resolve
    from ..weights.hub import CONFIG_NAME
    from ..nn.models import SegGptForImageSegmentation

    out = os.path.abspath(args.out)
    if os.path.exists(out) and not os.path.isdir(out):
        raise _UserError(f"OUT {args.out} exists and is not a folder")
    if os.path.isdir(out) and os.listdir(out) and not args.overwrite:
        raise _UserError(f"OUT {args.out} is not empty; pass --overwrite to replace it")
    start = time.perf_counter()
    model = _load(args, args.dtype)
    print(f"loaded {args.src} in {time.perf_counter() - start:.1f}s: {_describe(model)}")

    parent = os.path.dirname(out)
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=".convert-", dir=parent)  # the result appears complete or not at all
    try:
        model.save_pretrained(staging)
        reloaded = SegGptForImageSegmentation.from_pretrained(staging)
        before, after = flat_parameters(model), flat_parameters(reloaded)
        differ = [k for k in before if not np.array_equal(np.asarray(before[k][...]), np.asarray(after[k][...]))]
        if differ:
            raise _UserError(f"round trip changed {len(differ)} parameters, e.g. {differ[:3]}")
        if os.path.isdir(out):
            shutil.rmtree(out)
        os.replace(staging, out)
    finally:
        if os.path.isdir(staging):
            shutil.rmtree(staging)
    print(f"wrote {out} ({CONFIG_NAME}, model.safetensors); reload is bit-identical")

    if args.no_parity:
        return 0
    from . import parity

    if not parity.available():
        print("parity report skipped: torch and transformers are not installed (pip install 'seggpt-jax[test]')")
        return 0
    resolved = resolve(args.src, revision=args.revision, cache_dir=args.cache_dir,
                       local_files_only=args.local_files_only)
    weights_dir = os.path.dirname(resolved.weights)
    transformers_layout = (args.layout in (None, "transformers") and resolved.config_file is not None
                           and os.path.dirname(resolved.config_file) == weights_dir
                           and _is_transformers_layout(resolved.weights))
    hf = parity.transformers_model_from(reloaded, weights_dir if transformers_layout else None)
    source = "read by transformers from SRC" if transformers_layout else "our weights exported to transformers"
    rows = parity.compare(reloaded, hf)
    print(f"parity against transformers ({source}; float32, random inputs):")
    print(parity.format_rows(rows))
    worst = max(r.max_abs_error for r in rows if r.stage == "pred_masks")
    if worst > args.tolerance:
        print(f"PARITY FAILED: pred_masks max abs error {worst:.3e} > {args.tolerance:g}", file=sys.stderr)
        return EXIT_ERROR
    print(f"parity OK: pred_masks max abs error {worst:.3e} <= {args.tolerance:g}")
    return 0


def _is_transformers_layout(weights: str) -> bool:
    from ..weights import TRANSFORMERS, detect_format, open_weights

    with open_weights(weights) as reader:
        return detect_format(reader.keys(), reader.metadata) is TRANSFORMERS


def _describe(model) -> str:
    from ..weights import flat_parameters

    params = flat_parameters(model)
    count = sum(int(v[...].size) for v in params.values())
    first = next(iter(params.values()))[...]
    cfg = model.config
    return (f"{count / 1e6:.1f}M parameters, {first.dtype}, hidden {cfg.hidden_size} x {cfg.num_hidden_layers} layers, "
            f"canvas {cfg.image_size[0]}x{cfg.image_size[1]}, device {list(first.devices())[0]}")


def _cmd_info(args) -> int:
    import json

    model = _load(args)
    print(_describe(model))
    print(json.dumps(model.config.to_dict(), indent=2, sort_keys=True))
    return 0


class _UserError(Exception):
    pass


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from ..weights import CheckpointError
    from ..config import ConfigError

    from ..weights import ModelNotFoundError
    from ..data import DataError
    from ..imaging.media import InputError

    commands = {"convert": _cmd_convert, "info": _cmd_info, "segment": _cmd_segment, "video": _cmd_video,
                "finetune": _cmd_finetune, "tune-prompt": _cmd_tune_prompt, "evaluate": _cmd_evaluate}
    try:
        return commands[args.command](args)
    except ModelNotFoundError as e:
        option = "--model PATH" if args.command in ("segment", "video") else "a local path"
        print(f"seggpt-jax {args.command}: error: {e.reason}. Pass {option} to use weights you have (a folder with "
              f"config.json and model.safetensors, or the original seggpt_vit_large.pth); `hf download "
              f"BAAI/seggpt-vit-large --local-dir DIR` makes such a folder on a machine with network access.",
              file=sys.stderr)
        return EXIT_ERROR
    except (_UserError, InputError, DataError, CheckpointError, ConfigError, FileNotFoundError, NotADirectoryError,
            PermissionError, ValueError) as e:
        if os.environ.get("SEGGPT_JAX_DEBUG"):
            raise
        print(f"seggpt-jax {args.command}: error: {e}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print(f"seggpt-jax {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
