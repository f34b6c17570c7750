"""``seggpt-jax segment`` and ``seggpt-jax video``: files in, masks and overlays out, nothing lost.

Everything the user typed is checked before the model loads (prompts decoded, options validated,
output folder writable, output names checked). Each input then succeeds or fails alone: a bad image
is named in the summary, every good one is still written, and the exit status is 1 when anything
failed.

Output names come from the whole input name (``x.jpg`` -> ``x.jpg_mask.png``), so two inputs never
share one; inputs from different folders with the same name are refused before any work. A rerun into
the same folder resumes: inputs whose outputs an earlier run of the same job (model, prompts, options)
completed are skipped, half-written ones are completed, and the run exits 0 when everything is done.
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import itertools
import json
import os
import time
from collections.abc import Iterator, Sequence
from typing import Any

from ..version import __version__
from . import common
from .common import UserError, plural, status

MAX_LABELS = 255  # class ids are written as palette PNG indices


def add_commands(sub: argparse._SubParsersAction) -> None:
    segment = sub.add_parser(
        "segment", formatter_class=common.HelpFormatter,
        help="segment images or folders from one or more (image, mask) examples",
        description="Segment every input image the way the prompt masks segment the prompt images. Writes "
                    "NAME_mask.png (0/255 in binary mode; class ids as a palette PNG with --num-labels) and "
                    "NAME_overlay.png for each input NAME (its whole file name, e.g. x.jpg_mask.png) into "
                    "--out-dir. Binary prompt masks are fed with their own levels (anti-aliased edges included), as "
                    "the BAAI code does; a mask drawn only in its alpha channel is read from it; several prompts are "
                    "feature-ensembled. A rerun into the same --out-dir skips the inputs an earlier run of the same "
                    "job finished and completes the rest. Files this tool wrote are skipped as inputs and replaced "
                    "only with --overwrite; no other file is ever replaced.")
    segment.add_argument("inputs", nargs="*", metavar="INPUT", help="images, or folders of images")
    many = segment.add_argument_group("big jobs")
    many.add_argument("--inputs-from", metavar="LIST",
                      help="a text file with one image, folder or glob pattern per line (# comments), read as a "
                           "stream: for millions of files")
    many.add_argument("--shard", type=parse_shard, default=None, metavar="I/N",
                      help="segment only shard I of N (0-based; each input's shard is a hash of its file name), "
                           "for independent workers writing one --out-dir; default: from SLURM_ARRAY_TASK_ID/"
                           "SLURM_ARRAY_TASK_COUNT, SLURM_PROCID/SLURM_NTASKS, or a Kubernetes indexed job's "
                           "JOB_COMPLETION_INDEX with JOB_COMPLETIONS (or SEGGPT_JAX_SHARDS), else all inputs")
    common.add_prompt_options(segment)
    segment.add_argument("--out-dir", required=True, help="output folder (created if needed)")
    common.add_overwrite_option(segment)
    common.add_max_pixels_option(segment)
    common.add_mask_options(segment, max_labels=MAX_LABELS)
    mode = segment.add_argument_group("modes")
    mode.add_argument("--embedding-type", choices=["instance", "semantic"],
                      help="the model's task embedding (default: semantic with --num-labels, instance otherwise)")
    mode.add_argument("--ensemble-mode", choices=["transformers", "original"], default="transformers",
                      help="how several prompts are combined: transformers' or the BAAI code's feature ensemble")
    common.add_model_options(segment)
    common.add_distributed_options(segment)
    segment.set_defaults(run=run_segment)

    video = sub.add_parser(
        "video", formatter_class=common.HelpFormatter,
        help="segment a clip from a first-frame example (the SegGPT video procedure)",
        description="Segment every frame of CLIP (a folder of frames, an animated GIF/WebP/APNG, or a video file "
                    "with the video extra) from the prompt plus the last K predicted frames as extra prompts, as "
                    "the BAAI code does. Frames are read, segmented and written one at a time: memory does not grow "
                    "with the clip, and every frame runs one compiled program. A palette PNG as --prompt-mask (as "
                    "DAVIS annotations) holds objects: each is segmented as its own binary prompt and the objects are "
                    "merged per pixel by score. Writes frames/NAME_mask.png per frame (NAME: the frame's file name, or "
                    "its number in a video file; 0/255, or the objects' ids in the prompt mask's palette) and an "
                    "overlay animation. A rerun into the same --out-dir writes only what is missing.")
    video.add_argument("clip", metavar="CLIP", help="folder of frames, animated GIF/WebP/APNG, or video file")
    group = video.add_argument_group("prompt")
    group.add_argument("--prompt-mask", required=True, metavar="MASK", help="the mask of the prompt image")
    group.add_argument("--prompt-image", metavar="IMAGE",
                       help="the example image that --prompt-mask segments (default: the clip's first frame)")
    video.add_argument("--out-dir", required=True, help="output folder (created if needed)")
    common.add_overwrite_option(video)
    common.add_max_pixels_option(video)
    procedure = video.add_argument_group("procedure")
    procedure.add_argument("--context-frames", type=common.non_negative_int, default=0, metavar="K",
                           help="previous frames (with their predicted masks) that join the prompt; 0 segments "
                                "frames independently, in batches")
    procedure.add_argument("--ensemble-mode", choices=["transformers", "original"], default="original",
                           help="how the prompts are combined (the BAAI video code uses its own: original)")
    out = video.add_argument_group("overlay animation")
    out.add_argument("--overlay", choices=["mp4", "gif", "none"], default=None,
                     help="overlay.mp4 (streamed; needs the video extra) or overlay.gif (kept in memory until the "
                          "end); default: mp4 when PyAV is installed, else gif")
    out.add_argument("--fps", type=common.positive_float, default=None,
                     help="frames per second of the overlay (default: the clip's own rate, else 10)")
    common.add_model_options(video)
    video.set_defaults(run=run_video)


# ------------------------------------------------------------------------------------ prompts
def checked_prompts(args: argparse.Namespace, colour_map) -> tuple[Any, int | None]:
    """The prompts and the mode (``num_labels``: None for binary), every file decoded and every mask read
    by the mask rule now, before the model loads (warnings for masks that would be misread)."""
    from ..imaging.decode import open_image
    from ..imaging.masks import prompt_picture
    from ..inference.prompts import Prompt

    if len(args.prompt_image) != len(args.prompt_mask):
        raise UserError(f"got {len(args.prompt_image)} --prompt-image and {len(args.prompt_mask)} --prompt-mask; "
                        "give each prompt image with its mask")
    if getattr(args, "learned_prompt", None):
        if args.prompt_image:
            raise UserError("use either --learned-prompt or --prompt-image/--prompt-mask, not both")
        from ..train.prompt_tuning import LearnedPrompt

        prompt = LearnedPrompt.load(args.learned_prompt)
        num_labels = prompt.num_labels if args.num_labels is None else args.num_labels
        if colour_map is not None and num_labels is None:
            raise UserError("--colour-map maps colours to class ids: this learned prompt is binary")
        try:
            prompt.check_mode(num_labels)
        except ValueError as e:
            raise UserError(f"--learned-prompt {args.learned_prompt}: {e}") from None
        return prompt, num_labels
    if not args.prompt_image:
        raise UserError("give at least one --prompt-image with its --prompt-mask")
    prompts = []
    for image, mask in zip(args.prompt_image, args.prompt_mask):
        open_image(image)
        prompt_picture(mask, args.num_labels, colour_map=colour_map, what=f"prompt mask {mask}")
        prompts.append(Prompt(image, mask))
    return prompts, args.num_labels


def _check_labels(args: argparse.Namespace) -> None:
    if args.num_labels is not None and args.num_labels > MAX_LABELS:
        raise UserError(f"--num-labels {args.num_labels}: at most {MAX_LABELS} classes, because output masks are "
                        f"palette PNGs whose indices are the class ids")


def _digest(path: str) -> str:
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            sha.update(block)
    return sha.hexdigest()


def _model_identity(args: argparse.Namespace) -> dict:
    """What names the weights: the source as given, plus the size and time of local files."""
    source = os.path.expanduser(args.model)
    files = []
    if os.path.isdir(source):
        files = [os.path.join(source, n) for n in sorted(os.listdir(source)) if not n.startswith(".")]
    elif os.path.isfile(source):
        files = [source]
    stamps = [(os.path.basename(f), os.path.getsize(f), os.stat(f).st_mtime_ns) for f in files if os.path.isfile(f)]
    return {"model": args.model, "revision": args.revision, "layout": getattr(args, "checkpoint_layout", None),
            "config": _digest(args.config) if getattr(args, "config", None) else None, "files": stamps}


def job_key(args: argparse.Namespace, **settings: Any) -> str:
    """A fingerprint of what produces a command's outputs (model, prompt files, options): outputs of an
    earlier run with the same fingerprint are that run's answers to the same question."""
    data = {"version": __version__, "model": _model_identity(args), **settings}
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:20]


def _prompt_files(args: argparse.Namespace) -> list:
    if getattr(args, "learned_prompt", None):
        return [("learned", _digest(args.learned_prompt))]
    return [(_digest(i), _digest(m)) for i, m in zip(args.prompt_image, args.prompt_mask)]


def _colour_map_identity(args: argparse.Namespace) -> Any:
    spec = getattr(args, "colour_map", None)
    return _digest(spec) if spec and os.path.isfile(spec) else spec


# ------------------------------------------------------------------------------------ segment
def output_names(inputs: Sequence[str], suffixes: Sequence[str] = ("_mask.png", "_overlay.png")) -> list[str]:
    """Each input's output name stem: its whole file name (``x.jpg``), so that no two inputs of one
    folder share outputs. Inputs of the same name from different folders are refused, naming them."""
    owners: dict[str, str] = {}
    clashes = []
    for path in inputs:
        name = os.path.basename(path)
        if name in owners:
            clashes.append(f"{owners[name]} and {path}")
        else:
            owners[name] = path
    if clashes:
        more = f" (and {len(clashes) - 3} more)" if len(clashes) > 3 else ""
        raise UserError(f"inputs of the same name would write the same outputs ({suffixes[0]}): "
                        f"{'; '.join(clashes[:3])}{more}; segment them into different --out-dir folders")
    return [os.path.basename(path) for path in inputs]


class _Inputs:
    """The inputs of a ``segment`` run, streamed: the INPUT arguments (files, folders) and the lines of
    ``--inputs-from`` (a file, a folder or a glob per line), in order, keeping only this worker's shard.

    Nothing is held per input beyond its name (the collision check): a list of millions of files is
    read line by line, once to check and count, once to work. A line that names nothing is a failed
    input of its own (the others go on).
    """

    def __init__(self, args: argparse.Namespace, shard: tuple[int, int] | None):
        from ..imaging.media import collect_images

        self.arguments = collect_images(args.inputs) if args.inputs else []
        self.list_file = args.inputs_from
        self.shard = shard
        self.duplicates = 0

    def _lines(self) -> Iterator[tuple[str, str | None]]:
        """``(path, None)`` per input of the list, or ``(line, message)`` for a line that names no image."""
        import glob

        from ..imaging.decode import IMAGE_EXTENSIONS
        from ..imaging.media import folder_images

        with open(self.list_file, encoding="utf-8", errors="surrogateescape") as lines:
            for number, line in enumerate(lines, 1):
                entry = line.strip()
                if not entry or entry.startswith("#"):
                    continue
                entry = os.path.expanduser(entry)
                if glob.has_magic(entry):
                    matches = [m for m in sorted(glob.iglob(entry, recursive=True))
                               if m.lower().endswith(IMAGE_EXTENSIONS) and os.path.isfile(m)]
                    if not matches:
                        yield entry, f"{self.list_file} line {number}: {entry} matches no image"
                    yield from ((m, None) for m in matches if not _ours(m))
                elif os.path.isdir(entry):
                    yield from ((m, None) for m in folder_images(entry)[0])
                elif os.path.isfile(entry):
                    yield entry, None
                else:
                    yield entry, f"{self.list_file} line {number}: no such file or folder: {entry}"

    def __iter__(self) -> Iterator[tuple[str, str | None]]:
        from ..parallel import shard_of

        stream = ((path, None) for path in self.arguments)
        if self.list_file:
            stream = itertools.chain(stream, self._lines())
        for path, problem in stream:
            if self.shard is None or shard_of(os.path.basename(path), self.shard[1]) == self.shard[0]:
                yield path, problem

    def check(self) -> int:
        """Read every input of the shard once before any work: two inputs of one name (that would write the
        same outputs) are refused, naming them; a file given twice is segmented once. Returns the count."""
        owners: dict[str, int] = {}
        clashes: list[str] = []
        count = 0
        for path, problem in self:
            count += 1
            if problem is not None:
                continue
            name, real = os.path.basename(path), hash(os.path.realpath(path))
            if name not in owners:
                owners[name] = real
            elif owners[name] == real:
                self.duplicates += 1
            else:
                clashes.append(name)
        if clashes:
            paths = collections.defaultdict(list)
            for path, problem in self:
                if problem is None and os.path.basename(path) in clashes[:3]:
                    paths[os.path.basename(path)].append(path)
            shown = "; ".join(" and ".join(sorted(set(p))[:2]) for p in paths.values())
            more = f" (and {len(clashes) - 3} more)" if len(clashes) > 3 else ""
            raise UserError(f"inputs of the same name would write the same outputs (_mask.png): {shown}{more}; "
                            f"segment them into different --out-dir folders")
        if self.duplicates:
            status(f"{plural(self.duplicates, 'input')} given more than once: each is segmented once")
        return count - self.duplicates


def _ours(path: str) -> bool:
    from ..files import written_by_us

    return written_by_us(path)



def _plan(folder, name: str, source: tuple, suffixes: Sequence[str]) -> tuple[str, Any]:
    """What a run does with one input: ``("skip", None)`` (done earlier), ``("fail", message)`` (an output
    in the way), or ``("todo", [the outputs it lacks])``."""
    from ..files import ABSENT, FOREIGN, OURS, STALE

    outputs = [name + suffix for suffix in suffixes]
    states = [folder.status(o, source) for o in outputs]
    if FOREIGN in states:
        return "fail", str(_conflict(folder, outputs[states.index(FOREIGN)], FOREIGN))
    if folder.overwrite:
        return "todo", outputs
    if STALE in states:
        return "fail", str(_conflict(folder, outputs[states.index(STALE)], STALE))
    if all(state == OURS for state in states):
        return "skip", None
    return "todo", [o for o, state in zip(outputs, states) if state == ABSENT]


def _conflict(folder, name: str, state: str):
    from ..files import OutputConflict

    try:
        folder.check(name)
    except OutputConflict as e:
        return e
    raise AssertionError(f"{name} is {state} but may be written")  # pragma: no cover


def parse_shard(text: str) -> tuple[int, int]:
    """``I/N`` (0-based shard ``I`` of ``N``)."""
    try:
        index, count = (int(part) for part in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected I/N (shard I of N, counting from 0), got {text!r}") from None
    if count < 1 or not 0 <= index < count:
        raise argparse.ArgumentTypeError(f"shard I/N needs 0 <= I < N, got {text!r}")
    return index, count


def _worker_shard(args: argparse.Namespace) -> tuple[tuple[int, int] | None, bool]:
    """This worker's ``(index, count)`` among all the workers of the job (``--shard``, the environment of a
    SLURM or Kubernetes array job, and the processes of a ``--distributed`` job), and whether the
    processes run in lockstep (``--distributed``)."""
    from .. import parallel

    shard = args.shard
    if args.distributed:
        import jax

        processes, process = jax.process_count(), jax.process_index()
        if processes > 1:
            index, count = shard or (0, 1)
            return (index * processes + process, count * processes), True
        return shard, False
    if shard is None:
        shard = parallel.shard_from_environment()
        if shard is not None and shard[1] > 1:
            status(f"shard {shard[0]}/{shard[1]} of the inputs, from the array job's environment (SLURM or "
                   f"Kubernetes; --shard 0/1 for all of them)")
    return (shard if shard is None or shard[1] > 1 else None), False


def run_segment(args: argparse.Namespace) -> int:
    from ..files import OutputFolder, file_stamp, stops_every_write

    if not args.inputs and not args.inputs_from:
        raise UserError("give the input images (INPUT arguments, or --inputs-from LIST)")
    if args.inputs_from and not os.path.isfile(args.inputs_from):
        raise UserError(f"--inputs-from {args.inputs_from}: no such file")
    _check_labels(args)
    common.check_output_folder(args.out_dir)
    common.check_compilation_cache(args)
    colour_map = common.colour_map(args)
    prompts, num_labels = checked_prompts(args, colour_map)
    common.start_distributed(args)
    shard, lockstep = _worker_shard(args)
    inputs = _Inputs(args, shard)
    status("reading the inputs ..." if args.inputs_from else "checking the inputs ...")
    total = inputs.check()
    job = job_key(args, command="segment", prompts=_prompt_files(args), num_labels=num_labels,
                  colour_map=_colour_map_identity(args), embedding_type=args.embedding_type,
                  ensemble_mode=args.ensemble_mode)
    writer = f"shard-{shard[0]}-of-{shard[1]}" if shard is not None else None
    folder = OutputFolder(args.out_dir, overwrite=args.overwrite, job=job, writer=writer)
    suffixes = ("_mask.png", "_overlay.png")
    failures: dict[str, str] = {}
    skipped = todo = 0
    seen: set[str] = set()

    def work() -> Iterator[tuple[str, str, list[str], tuple]]:
        """The inputs to segment, with what they lack; failures and skips are counted on the way."""
        nonlocal skipped, todo
        seen.clear()
        for path, problem in inputs:
            if problem is not None:
                failures[path] = problem
                continue
            name = os.path.basename(path)
            if name in seen:
                continue  # the same file given twice
            seen.add(name)
            source = file_stamp(path)
            action, detail = _plan(folder, name, source, suffixes)
            if action == "fail":
                failures[path] = detail
            elif action == "skip":
                skipped += 1
            else:
                todo += 1
                yield path, name, detail, source

    pending = sum(1 for _ in work())  # counts only: nothing is kept
    planned_skips = skipped
    if total == 0 and not lockstep:
        raise UserError("no input images given" if not shard else
                        f"shard {shard[0]}/{shard[1]} holds none of the inputs")
    mode = f"{num_labels} classes" if num_labels else "binary"
    count = len(prompts)
    written = segmented = 0
    seconds = 0.0
    if pending or lockstep:
        if planned_skips:
            status(f"{plural(planned_skips, 'input')} already done by an earlier run (skipped); {pending} to segment")
        status("starting JAX ...")
        compiled = common.compile_ahead(args, queries=pending, prompts=count)  # while the weights load
        segmenter = common.make_segmenter(args)
        compiled()
        failures.clear()
        skipped = 0
        start = time.perf_counter()
        bar = common.progress_bar(pending, "image", "segment")

        files, completed = _Counter(), _Counter()  # counted as they appear (writes run on several threads)

        def write(item, result, picture) -> int:
            path, name, outputs, source = item
            count = _write_outputs(folder, args, path, name, outputs, source, result, picture, num_labels, files.add)
            completed.add()
            return count

        from ..inference.pipeline import run_pipeline

        results = run_pipeline(segmenter, work(), prompts, write=write, path=lambda item: item[0],
                               num_labels=num_labels, colour_map=colour_map, embedding_type=args.embedding_type,
                               keep_picture=True, lockstep=lockstep)
        try:
            for (path, *_), outcome in results:
                bar.update(1)
                if isinstance(outcome, int):
                    segmented += 1
                else:
                    failures[path] = outcome.message
        except OSError as e:
            if not stops_every_write(e):
                raise
            bar.close()  # (every write had ended when the pipeline stopped)
            print(f"stopped after {completed.count} of {plural(pending, 'image')}; wrote "
                  f"{plural(files.count, 'file')} to {args.out_dir}")
            raise
        finally:
            bar.close()
            written = files.count
        seconds = time.perf_counter() - start
    else:
        skipped = planned_skips
    done = segmented + skipped
    note = f"; {skipped} already done (skipped)" if skipped else ""
    rate = f" ({seconds / segmented:.2f}s/image)" if segmented else ""
    where = f" (shard {shard[0]}/{shard[1]})" if shard else ""
    print(f"segmented {segmented} of {plural(total, 'image')}{where} ({mode}, {plural(count, 'prompt')}) in "
          f"{seconds:.1f}s{rate}{note}; wrote {plural(written, 'file')} to {args.out_dir}")
    speed = f"{segmented / seconds:.2f} images/s" if seconds > 0 and segmented else "no image segmented"
    print(f"summary: {done} done ({segmented} segmented, {skipped} skipped), {len(failures)} failed; {speed}")
    return report_failures(failures, "input")


class _Counter:
    def __init__(self):
        import threading

        self.count, self._lock = 0, threading.Lock()

    def add(self) -> None:
        with self._lock:
            self.count += 1


def _write_outputs(folder, args, path: str, name: str, outputs: list[str], source: tuple, result, picture,
                   num_labels: int | None, wrote=lambda: None) -> int:
    """Write the outputs an input lacks (the overlay over ``picture``, or the file read again), calling
    ``wrote()`` after each file; returns how many files were written."""
    from ..imaging.decode import to_rgb_uint8
    from ..imaging.media import mask_image, overlay

    count = 0
    if name + "_mask.png" in outputs:
        image = mask_image(result.mask, num_labels)
        folder.write(name + "_mask.png", lambda tmp: image.save(tmp, format="PNG"), source=source)
        wrote()
        count += 1
    if name + "_overlay.png" in outputs:
        base = picture if picture is not None else to_rgb_uint8(path, max_pixels=args.max_pixels)
        blended = overlay(base, result.mask)
        folder.write(name + "_overlay.png", lambda tmp: _save_rgb(blended, tmp), source=source)
        wrote()
        count += 1
    return count


def _save_rgb(array, path: str) -> None:
    from PIL import Image

    Image.fromarray(array).save(path, format="PNG")


def report_failures(failures: dict[str, str], what: str) -> int:
    """The failed inputs, one line each (their message names them); exit status 1 if any."""
    if not failures:
        return 0
    print(f"{plural(len(failures), what)} failed:")
    for name, message in failures.items():
        print(f"  {message}" if name in message else f"  {name}: {message}")
    return 1


# ------------------------------------------------------------------------------------ video
class _Frames:
    """The clip's frames, handed to the segmenter one at a time; remembers the ones it has handed over
    and not yet got back, so each result meets its frame's name and picture."""

    def __init__(self, frames: Iterator[tuple[str, Any]]):
        self._frames = frames
        self.waiting: collections.deque = collections.deque()

    def __iter__(self) -> Iterator[Any]:
        for name, frame in self._frames:
            self.waiting.append((name, frame))
            yield frame


def run_video(args: argparse.Namespace) -> int:
    from ..files import ABSENT, OURS, OutputConflict, OutputFolder, file_stamp
    from ..imaging.decode import open_image, to_rgb_uint8
    from ..imaging.masks import prompt_picture
    from ..imaging.media import GifWriter, Mp4Writer, frame_names, frame_rate, iter_frames, mask_image, overlay
    from ..inference.prompts import Prompt
    from ..inference.segmenter import InputFailure
    from ..inference.video import object_ids

    common.check_output_folder(args.out_dir)
    common.check_compilation_cache(args)
    overlay_kind = args.overlay or ("mp4" if _has_av() else "gif")
    if overlay_kind == "mp4" and not _has_av():
        raise UserError("--overlay mp4 needs the optional video extra: pip install 'seggpt-jax[video]' (or use "
                        "--overlay gif)")
    objects = object_ids(args.prompt_mask)  # a palette mask: its objects, each segmented and merged by score
    # readable (and, for a binary mask, sensible) before anything loads
    prompt_picture(args.prompt_mask, None, what=f"prompt mask {args.prompt_mask}", warn=not objects)
    write_mask = _object_mask_writer(args.prompt_mask) if objects else (lambda mask: mask_image(mask, None))
    names = frame_names(args.clip)  # a folder's frames: their file names, checked for clashes now
    if names is not None:
        output_names(names, ("_mask.png",))
    frames = iter_frames(args.clip, max_pixels=args.max_pixels)
    first_name, first_frame = next(frames, (None, None))
    if first_name is None:
        raise UserError(f"{args.clip} holds no frames")
    prompt_image = args.prompt_image or to_rgb_uint8(first_frame, what=f"first frame of {args.clip}",
                                                     max_pixels=args.max_pixels)
    if args.prompt_image:
        open_image(args.prompt_image)
    fps = args.fps or frame_rate(args.clip) or 10.0
    job = job_key(args, command="video", prompt=_digest(args.prompt_mask), objects=objects,
                  prompt_image=_digest(args.prompt_image) if args.prompt_image else "first frame",
                  context=args.context_frames, ensemble_mode=args.ensemble_mode)
    folder = OutputFolder(args.out_dir, overwrite=args.overwrite, job=job)
    masks_folder = OutputFolder(os.path.join(args.out_dir, "frames"), overwrite=args.overwrite, job=job)
    animation = None if overlay_kind == "none" else f"overlay.{overlay_kind}"
    clip_stamp = file_stamp(args.clip) if os.path.isfile(args.clip) else None
    # someone else's files, or an earlier job's without --overwrite: refused before any work
    if animation and folder.status(animation, clip_stamp) not in (OURS, ABSENT):
        folder.check(animation, clip_stamp)
    for name in names or ():
        output, source = f"{name}_mask.png", file_stamp(os.path.join(args.clip, name))
        if masks_folder.status(output, source) not in (OURS, ABSENT):
            masks_folder.check(output, source)
    status("starting JAX ...")
    segmenter = common.make_segmenter(args)
    stream = _Frames(_chain((first_name, first_frame), frames))
    results = segmenter.segment_video(iter(stream), Prompt(prompt_image, args.prompt_mask),
                                      context_frames=args.context_frames, ensemble_mode=args.ensemble_mode,
                                      errors="return")
    failures: dict[str, str] = {}
    start, count, written = time.perf_counter(), 0, 0
    bar = common.progress_bar(None, "frame", "video")
    with _AnimationFile(folder, animation, overlay_kind, fps, GifWriter, Mp4Writer, clip_stamp) as writer:
        try:
            for result in results:
                name, frame = stream.waiting.popleft()
                bar.update(1)
                if isinstance(result, InputFailure):
                    failures[name] = result.message
                    continue
                output = f"{name}_mask.png"
                source = clip_stamp or file_stamp(os.path.join(args.clip, name))
                try:
                    if masks_folder.status(output, source) != OURS or args.overwrite:
                        picture = write_mask(result.mask)
                        masks_folder.write(output, lambda tmp: picture.save(tmp, format="PNG"), source=source)
                        written += 1
                except OutputConflict as e:
                    failures[name] = str(e)
                    continue
                if writer is not None:
                    writer.add(overlay(to_rgb_uint8(frame, max_pixels=args.max_pixels), result.mask))
                count += 1
        finally:
            bar.close()
    seconds = time.perf_counter() - start
    kept = count - written
    what = f", {plural(len(objects), 'object')}" if objects else ""
    print(f"segmented {count} frames (context {args.context_frames}{what}) in {seconds:.1f}s; wrote "
          f"{plural(written, 'mask')} to {masks_folder.path}" + (f" ({kept} already there from an earlier run)"
                                                                 if kept else "")
          + (f" and {os.path.join(args.out_dir, animation)}" if animation and count else ""))
    return report_failures(failures, "frame")


def _object_mask_writer(prompt_mask: str):
    """Object-id masks as palette PNGs with the prompt mask's own palette (DAVIS results read as its
    annotations do)."""
    from PIL import Image

    with Image.open(prompt_mask) as image:
        palette = image.getpalette() or []

    def picture(mask) -> Image.Image:
        out = Image.fromarray(mask.astype("uint8"), mode="P")
        out.putpalette(palette + [0] * (768 - len(palette)))
        return out

    return picture


def _chain(first: tuple[str, Any], rest: Iterator[tuple[str, Any]]) -> Iterator[tuple[str, Any]]:
    yield first
    yield from rest


def _has_av() -> bool:
    try:
        import av  # noqa: F401
    except ImportError:
        return False
    return True


class _AnimationFile:
    """The overlay animation, written to a temporary file and moved into the output folder when complete
    (removed if the run fails). It replaces an animation of the same job (a resumed run's is complete)."""

    def __init__(self, folder, name: str | None, kind: str, fps: float, gif_writer, mp4_writer, source):
        self.folder, self.name, self.kind, self.fps, self.source = folder, name, kind, fps, source
        self._classes = {"gif": gif_writer, "mp4": mp4_writer}
        self._tmp = None
        self.writer = None

    def __enter__(self):
        if self.name is None:
            return None
        from ..files import staging_folder

        self._staging = staging_folder(self.folder.create())
        directory = self._staging.__enter__()
        self._tmp = os.path.join(directory, self.name)
        self.writer = self._classes[self.kind](self._tmp, self.fps)
        return self.writer

    def __exit__(self, kind, error, trace) -> None:
        if self.writer is None:
            return
        try:
            self.writer.close()
            if error is None and self.writer.size is not None:
                self.folder.adopt(self.name, self._tmp, source=self.source, replace=True)
        finally:
            self._staging.__exit__(None, None, None)
