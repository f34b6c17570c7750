"""``seggpt-jax segment`` and ``seggpt-jax video``: files in, masks and overlays out, nothing lost.

Everything the user typed is checked before the model loads (prompts decoded, options validated,
output names checked). Each input then succeeds or fails alone: a bad image is named in the summary,
every good one is still written, and the exit status is 1 when anything failed.
"""

from __future__ import annotations

import argparse
import collections
import errno
import os
import time
from collections.abc import Iterator
from typing import Any

from PIL import Image

from . import common
from .common import UserError, plural, status

MAX_LABELS = 255  # class ids are written as palette PNG indices


def add_commands(sub: argparse._SubParsersAction) -> None:
    segment = sub.add_parser(
        "segment", formatter_class=common.HelpFormatter,
        help="segment images or folders from one or more (image, mask) examples",
        description="Segment every input image the way the prompt masks segment the prompt images. Writes "
                    "NAME_mask.png (0/255 in binary mode; class ids as a palette PNG with --num-labels) and "
                    "NAME_overlay.png for each input into --out-dir. Binary prompt masks are fed with their own "
                    "levels (anti-aliased edges included), as the BAAI code does; several prompts are "
                    "feature-ensembled. Files this tool wrote are skipped as inputs and replaced only with "
                    "--overwrite; no other file is ever replaced.")
    segment.add_argument("inputs", nargs="+", metavar="INPUT", help="images, or folders of images")
    common.add_prompt_options(segment)
    segment.add_argument("--out-dir", required=True, help="output folder (created if needed)")
    common.add_overwrite_option(segment)
    common.add_mask_options(segment, max_labels=MAX_LABELS)
    mode = segment.add_argument_group("modes")
    mode.add_argument("--embedding-type", choices=["instance", "semantic"],
                      help="the model's task embedding (default: semantic with --num-labels, instance otherwise)")
    mode.add_argument("--ensemble-mode", choices=["transformers", "original"], default="transformers",
                      help="how several prompts are combined: transformers' or the BAAI code's feature ensemble")
    common.add_model_options(segment)
    segment.set_defaults(run=run_segment)

    video = sub.add_parser(
        "video", formatter_class=common.HelpFormatter,
        help="segment a clip from a first-frame example (the SegGPT video procedure)",
        description="Segment every frame of CLIP (a folder of frames, an animated GIF/WebP/APNG, or a video file "
                    "with the video extra) from the prompt plus the last K predicted frames as extra prompts, as "
                    "the BAAI code does. Frames are read, segmented and written one at a time: memory does not grow "
                    "with the clip. A palette PNG as --prompt-mask (as DAVIS annotations) holds objects: each is "
                    "segmented as its own binary prompt and the objects are merged per pixel by score. Writes "
                    "frames/NAME_mask.png per frame (0/255, or the objects' ids in the prompt mask's palette) and an "
                    "overlay animation.")
    video.add_argument("clip", metavar="CLIP", help="folder of frames, animated GIF/WebP/APNG, or video file")
    group = video.add_argument_group("prompt")
    group.add_argument("--prompt-mask", required=True, metavar="MASK", help="the mask of the prompt image")
    group.add_argument("--prompt-image", metavar="IMAGE",
                       help="the example image that --prompt-mask segments (default: the clip's first frame)")
    video.add_argument("--out-dir", required=True, help="output folder (created if needed)")
    common.add_overwrite_option(video)
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
def _checked_prompts(args: argparse.Namespace, colour_map) -> Any:
    """The prompts, every file decoded and every mask read by the mask rule now, before the model loads."""
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

        return LearnedPrompt.load(args.learned_prompt)
    if not args.prompt_image:
        raise UserError("give at least one --prompt-image with its --prompt-mask")
    prompts = []
    for image, mask in zip(args.prompt_image, args.prompt_mask):
        open_image(image)
        prompt_picture(mask, args.num_labels, colour_map=colour_map, what="prompt mask")
        prompts.append(Prompt(image, mask))
    return prompts


def _check_labels(args: argparse.Namespace) -> None:
    if args.num_labels is not None and args.num_labels > MAX_LABELS:
        raise UserError(f"--num-labels {args.num_labels}: at most {MAX_LABELS} classes, because output masks are "
                        f"palette PNGs whose indices are the class ids")


# ------------------------------------------------------------------------------------ segment
def _output_names(inputs: list[str]) -> list[str]:
    names, seen = [], {}
    for path in inputs:
        stem = os.path.splitext(os.path.basename(path))[0]
        count = seen.get(stem, 0) + 1
        seen[stem] = count
        names.append(stem if count == 1 else f"{stem}-{count}")
    return names


def _fatal(error: OSError) -> bool:
    """File-system errors that will hit every later output too: stop instead of failing each one."""
    return error.errno in (errno.ENOSPC, errno.EROFS, errno.EDQUOT, errno.EACCES, errno.EPERM)


def run_segment(args: argparse.Namespace) -> int:
    from ..files import OutputConflict, OutputFolder
    from ..imaging.decode import to_rgb_uint8
    from ..imaging.media import collect_images, mask_image, overlay
    from ..inference.segmenter import InputFailure

    _check_labels(args)
    common.check_output_folder(args.out_dir)
    common.check_compilation_cache(args)
    colour_map = common.colour_map(args)
    inputs = collect_images(args.inputs)
    prompts = _checked_prompts(args, colour_map)
    if args.learned_prompt and args.num_labels is None:
        args.num_labels = prompts.metadata.get("num_labels")
    folder = OutputFolder(args.out_dir, overwrite=args.overwrite)
    names = _output_names(inputs)
    failures: dict[int, str] = {}
    earlier = 0  # inputs whose outputs an earlier run wrote
    for index, name in enumerate(names):
        try:
            folder.check(f"{name}_mask.png")
            folder.check(f"{name}_overlay.png")
        except OutputConflict as e:
            failures[index] = str(e)
            earlier += e.ours
    todo = [i for i in range(len(inputs)) if i not in failures]
    if not todo:
        others = len(failures) - earlier
        raise UserError(f"nothing to do: the outputs of all {plural(len(inputs), 'input')} exist in {args.out_dir}"
                        + (f"; {earlier} from an earlier run (pass --overwrite to replace them)" if earlier else "")
                        + (f"; {others} written by someone else (left alone)" if others else ""))
    compiled = common.compile_ahead(args, queries=len(todo), prompts=len(prompts))  # while the weights load
    segmenter = common.make_segmenter(args)
    compiled()
    start, written = time.perf_counter(), 0
    bar = common.progress_bar(len(todo), "image", "segment")
    results = segmenter.segment_iter([inputs[i] for i in todo], prompts, num_labels=args.num_labels,
                                     colour_map=colour_map, embedding_type=args.embedding_type, errors="return")
    done = 0
    try:
        for index, result in zip(todo, results):
            bar.update(1)
            if isinstance(result, InputFailure):
                failures[index] = result.message
                continue
            try:
                picture = overlay(to_rgb_uint8(inputs[index]), result.mask)
                folder.write(f"{names[index]}_mask.png",
                             lambda tmp: mask_image(result.mask, args.num_labels).save(tmp, format="PNG"))
                folder.write(f"{names[index]}_overlay.png", lambda tmp: Image.fromarray(picture).save(tmp, format="PNG"))
                written += 2
                done += 1
            except OutputConflict as e:
                failures[index] = str(e)
            except OSError as e:
                if _fatal(e):  # every later write would fail too: stop, say what was done, then the error
                    bar.close()
                    print(f"stopped after {done} of {plural(len(inputs), 'image')}; wrote {plural(written, 'file')} "
                          f"to {args.out_dir}")
                    raise
                failures[index] = f"cannot write the outputs of {inputs[index]}: {e.strerror or e}"
    finally:
        bar.close()
    seconds = time.perf_counter() - start
    mode = f"{args.num_labels} classes" if args.num_labels else "binary"
    print(f"segmented {done} of {plural(len(inputs), 'image')} ({mode}, {plural(len(prompts), 'prompt')}) in "
          f"{seconds:.1f}s ({seconds / max(done, 1):.2f}s/image); wrote {plural(written, 'file')} to {args.out_dir}")
    return report_failures({inputs[i]: failures[i] for i in sorted(failures)}, "input")


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
    from ..files import OutputConflict, OutputFolder
    from ..imaging.decode import open_image, to_rgb_uint8
    from ..imaging.masks import prompt_picture
    from ..imaging.media import GifWriter, Mp4Writer, frame_rate, iter_frames, mask_image, overlay
    from ..inference.prompts import Prompt
    from ..inference.segmenter import InputFailure
    from ..inference.video import object_ids

    common.check_output_folder(args.out_dir)
    common.check_compilation_cache(args)
    overlay_kind = args.overlay or ("mp4" if _has_av() else "gif")
    if overlay_kind == "mp4" and not _has_av():
        raise UserError("--overlay mp4 needs the optional video extra: pip install 'seggpt-jax[video]' (or use "
                        "--overlay gif)")
    prompt_picture(args.prompt_mask, None, what="prompt mask")  # readable, before anything loads
    objects = object_ids(args.prompt_mask)  # a palette mask: its objects, each segmented and merged by score
    write_mask = _object_mask_writer(args.prompt_mask) if objects else \
        (lambda mask: mask_image(mask, None))
    frames = iter_frames(args.clip)
    first_name, first_frame = next(frames, (None, None))
    if first_name is None:
        raise UserError(f"{args.clip} holds no frames")
    prompt_image = args.prompt_image or to_rgb_uint8(first_frame, what=f"first frame of {args.clip}")
    if args.prompt_image:
        open_image(args.prompt_image)
    fps = args.fps or frame_rate(args.clip) or 10.0
    folder = OutputFolder(args.out_dir, overwrite=args.overwrite)
    masks_folder = OutputFolder(os.path.join(args.out_dir, "frames"), overwrite=args.overwrite)
    animation = None if overlay_kind == "none" else f"overlay.{overlay_kind}"
    if animation:
        folder.check(animation)
    segmenter = common.make_segmenter(args)
    stream = _Frames(_chain((first_name, first_frame), frames))
    results = segmenter.segment_video(iter(stream), Prompt(prompt_image, args.prompt_mask),
                                      context_frames=args.context_frames, ensemble_mode=args.ensemble_mode,
                                      errors="return")
    failures: dict[str, str] = {}
    start, count = time.perf_counter(), 0
    bar = common.progress_bar(None, "frame", "video")
    with _AnimationFile(folder, animation, overlay_kind, fps, GifWriter, Mp4Writer) as writer:
        try:
            for result in results:
                name, frame = stream.waiting.popleft()
                bar.update(1)
                if isinstance(result, InputFailure):
                    failures[name] = result.message
                    continue
                try:
                    masks_folder.write(f"{name}_mask.png", lambda tmp: write_mask(result.mask).save(tmp, format="PNG"))
                except OutputConflict as e:
                    failures[name] = str(e)
                    continue
                if writer is not None:
                    writer.add(overlay(to_rgb_uint8(frame), result.mask))
                count += 1
        finally:
            bar.close()
    seconds = time.perf_counter() - start
    what = f", {plural(len(objects), 'object')}" if objects else ""
    print(f"segmented {count} frames (context {args.context_frames}{what}) in {seconds:.1f}s; wrote "
          f"{plural(count, 'mask')} to {masks_folder.path}" + (f" and {os.path.join(args.out_dir, animation)}"
                                                               if animation and count else ""))
    return report_failures(failures, "frame")


def _object_mask_writer(prompt_mask: str):
    """Object-id masks as palette PNGs with the prompt mask's own palette (DAVIS results read as its
    annotations do)."""
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
    (removed if the run fails)."""

    def __init__(self, folder, name: str | None, kind: str, fps: float, gif_writer, mp4_writer):
        self.folder, self.name, self.kind, self.fps = folder, name, kind, fps
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
                self.folder.adopt(self.name, self._tmp)
        finally:
            self._staging.__exit__(None, None, None)
