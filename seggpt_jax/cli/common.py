"""What every ``seggpt-jax`` command shares: option groups, validation, model loading, progress."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from collections.abc import Callable
from typing import Any

DEFAULT_MODEL = "BAAI/seggpt-vit-large"


class UserError(Exception):
    """A problem with what the user asked for; printed as one line, exit status 1."""


# ------------------------------------------------------------------------------------ argument types
def _int_at_least(minimum: int, description: str):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {description}, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be {description}, got {text}")
        return value

    return parse


positive_int = _int_at_least(1, "a positive integer")
non_negative_int = _int_at_least(0, "an integer >= 0")


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


class Parser(argparse.ArgumentParser):
    """Usage errors in one line (argparse prints the whole usage first), exit status 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows every option's default (when it has one; 0 is a default, None and off-switches are not)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        help_text = action.help or ""
        default = action.default
        unset = default is None or default is False or default is argparse.SUPPRESS or \
            (isinstance(default, list) and not default)
        if unset or "%(default)" in help_text or "default" in help_text:
            return help_text
        return help_text + " (default: %(default)s)"


# ------------------------------------------------------------------------------------ option groups
def add_hub_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("where the checkpoint comes from")
    group.add_argument("--revision", help="Hub revision (branch, tag or commit) when the model is a repo id")
    group.add_argument("--cache-dir", metavar="DIR", help="Hugging Face cache folder (default: huggingface_hub's own)")
    group.add_argument("--local-files-only", action="store_true",
                       help="never touch the network; use local files and the Hugging Face cache only")
    group.add_argument("--config", metavar="CONFIG_JSON",
                       help="config.json for a weight file that carries none (default for those: the ViT-L config)")
    group.add_argument("--checkpoint-layout", choices=["transformers", "original", "seggpt-jax"],
                       help="read the weights in this layout instead of detecting it from the key names")


def add_model_options(parser: argparse.ArgumentParser, *, inference: bool = True) -> None:
    parser.add_argument("--model", default=DEFAULT_MODEL,
                        help="Hub repo id, local folder or weight file (anything from_pretrained accepts)")
    add_hub_options(parser)
    group = parser.add_argument_group("how the model runs")
    if inference:
        group.add_argument("--batch-size", type=positive_int, default=None,
                           help="rows per forward (query x prompt pairs) on all devices together, rounded up to "
                                "whole queries on every device; default: the fastest per image for the device (1 "
                                "on CPU, 32 on accelerators) times the devices")
    add_devices_option(group)
    add_compilation_cache_option(group)


def add_devices_option(group) -> None:
    group.add_argument("--devices", type=positive_int, default=None, metavar="N",
                       help="run on the first N devices of this process (default: every device: data-parallel, "
                            "the batch split over them)")


def add_distributed_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("several hosts (jax.distributed)")
    group.add_argument("--distributed", action="store_true",
                       help="this process is one of a multi-host job (start the same command on every host): the "
                            "coordinator, process count and id come from the three options below, or are detected "
                            "on Cloud TPU pods, SLURM, Open MPI and Kubernetes JobSets")
    group.add_argument("--coordinator", metavar="HOST:PORT", help="address of process 0's coordination service")
    group.add_argument("--num-processes", type=positive_int, metavar="N", help="processes in the job")
    group.add_argument("--process-id", type=non_negative_int, metavar="I", help="this process's index, 0..N-1")


def start_distributed(args: argparse.Namespace) -> None:
    """``jax.distributed.initialize`` for ``--distributed`` (before anything touches a device)."""
    given = [name for name in ("coordinator", "num_processes", "process_id") if getattr(args, name, None) is not None]
    if not getattr(args, "distributed", False):
        if given:
            raise UserError(f"--{given[0].replace('_', '-')} belongs to a multi-host job: add --distributed")
        return
    if 0 < len(given) < 3 and "coordinator" in given:
        missing = [f"--{n.replace('_', '-')}" for n in ("num_processes", "process_id") if n not in given]
        raise UserError(f"--distributed --coordinator needs {' and '.join(missing)} too (or none of the three, "
                        f"to detect the cluster)")
    if args.num_processes is not None and args.process_id is not None and args.process_id >= args.num_processes:
        raise UserError(f"--process-id {args.process_id} is not below --num-processes {args.num_processes}")
    from .. import parallel

    status("joining the multi-host job" + (f" at {args.coordinator}" if args.coordinator else "") + " ...")
    try:
        parallel.initialize(args.coordinator, args.num_processes, args.process_id)
    except (RuntimeError, ValueError) as e:
        raise UserError(f"--distributed: cannot join the job: {' '.join(str(e).split())[:300]}") from None
    import jax

    status(f"process {jax.process_index()} of {jax.process_count()}: {jax.local_device_count()} local of "
           f"{jax.device_count()} devices")


def add_positional_model(parser: argparse.ArgumentParser, metavar: str, help_text: str) -> None:
    """The model as a positional argument, with ``--model`` accepted for it too (one of the two)."""
    parser.add_argument("model_arg", nargs="?", metavar=metavar, help=f"{help_text} (or --model)")
    parser.add_argument("--model", dest="model_option", default=None, help=f"the same as {metavar}")
    parser.set_defaults(positional_model=metavar)


def resolve_model_argument(args: argparse.Namespace) -> str:
    """The model of a command that takes it positionally or as ``--model`` (exactly one of them)."""
    given = [v for v in (getattr(args, "model_arg", None), getattr(args, "model_option", None)) if v is not None]
    if len(given) != 1:
        raise UserError(f"give the model as {args.positional_model} or --model, once"
                        if given else f"give the model: {args.positional_model} (or --model)")
    return given[0]


def add_compilation_cache_option(parser) -> None:
    parser.add_argument("--compilation-cache", nargs="?", const=True, default=None, metavar="DIR",
                        help="keep compiled programs across runs, in DIR (default folder with no DIR: "
                             "~/.cache/seggpt_jax/xla, or $SEGGPT_JAX_CACHE)")


def add_max_pixels_option(parser) -> None:
    from ..imaging.decode import DEFAULT_MAX_PIXELS

    parser.add_argument("--max-pixels", type=positive_int, default=DEFAULT_MAX_PIXELS, metavar="N",
                        help="refuse input images of more than N pixels (read from the file's header, before "
                             "decoding); a query of P pixels takes about 12 P bytes of memory beside the model")


def add_prompt_options(parser: argparse.ArgumentParser, *, learned: bool = True) -> None:
    group = parser.add_argument_group("prompts (in-context examples)")
    group.add_argument("--prompt-image", action="append", default=[], metavar="IMAGE",
                       help="an example image; repeat, each with its --prompt-mask, for several prompts (ensembled)")
    group.add_argument("--prompt-mask", action="append", default=[], metavar="MASK",
                       help="the mask of the --prompt-image at the same position")
    if learned:
        group.add_argument("--learned-prompt", metavar="FILE",
                           help="a prompt learned with `seggpt-jax tune-prompt`, instead of --prompt-image/--prompt-mask")


def add_mask_options(parser: argparse.ArgumentParser, *, max_labels: int | None = None) -> None:
    group = parser.add_argument_group("what the masks hold")
    limit = f" (at most {max_labels}: output masks are palette PNGs)" if max_labels else ""
    group.add_argument("--num-labels", type=positive_int, default=None, metavar="N",
                       help=f"semantic mode: masks hold class ids 0..N (0 = background) or palette colours{limit}; "
                            "default: binary masks")
    group.add_argument("--colour-map", metavar="SPEC",
                       help="semantic mode: which class each colour of an RGB mask is: 'voc' (PASCAL VOC colours) or "
                            "a JSON file {\"R,G,B\": class_id, ...}")


def add_data_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("data", metavar="DATA", help="dataset folder")
    group = parser.add_argument_group("dataset")
    group.add_argument("--data-layout", choices=["folder", "fss1000"], default=None,
                       help="folder: DATA/images/NAME.jpg + DATA/masks/NAME.png; fss1000: one folder per class "
                            "(default: fss1000 with --protocol fss1000, else folder)")
    add_mask_options(parser)
    group.add_argument("--ignore-index", type=int, default=None,
                       help="mask value the loss and metrics skip (default: 255 with --num-labels, none for binary)")


def add_overwrite_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--overwrite", action="store_true",
                        help="replace outputs an earlier seggpt-jax run wrote (files anyone else wrote, or changed "
                             "since, are never replaced)")


# ------------------------------------------------------------------------------------ validation
def check_output_folder(path: str, option: str = "--out-dir") -> str:
    """``path`` is, or can be made, a folder we can write in (probed now, before any work)."""
    from ..files import check_writable_folder

    return check_writable_folder(path, option)


def output_file(path: str, option: str, *, overwrite: bool, companions: tuple[str, ...] = (),
                resume: bool = False):
    """The :class:`~seggpt_jax.files.OutputFolder` that holds an output file ``path`` (and its
    ``companions``, suffixes of files written beside it), checked now: the folder can be written, and
    none of the files is someone else's. An earlier run's file is replaced only with ``overwrite``
    (or continued with ``resume``)."""
    from ..files import FOREIGN, OUTPUT_STATES_OURS, OutputFolder

    if not path or os.path.isdir(path) or path.endswith(os.sep):
        raise UserError(f"{option} {path!r} is a folder or empty; give a file name")
    parent = os.path.dirname(os.path.abspath(path))
    check_output_folder(parent, f"{option} {path}: its folder")
    folder = OutputFolder(parent, overwrite=overwrite)
    base = os.path.basename(path)
    for name in (base, *(base + suffix for suffix in companions)):
        state = folder.status(name)
        if state == FOREIGN:
            raise UserError(f"{os.path.join(parent, name)} exists and was not written by seggpt-jax (or was changed "
                            f"since); it is left alone: choose another {option}")
        if state in OUTPUT_STATES_OURS and not (overwrite or resume):
            raise UserError(f"{os.path.join(parent, name)} exists (written by an earlier run); pass --overwrite "
                            f"to replace it")
    return folder


def check_compilation_cache(args: argparse.Namespace) -> None:
    """A writable compilation-cache folder (``--compilation-cache``), checked before anything loads."""
    cache = getattr(args, "compilation_cache", None)
    if cache:
        from ..runtime import default_cache_dir

        folder = cache if isinstance(cache, str) else os.environ.get("SEGGPT_JAX_CACHE") or default_cache_dir()
        check_output_folder(folder, "--compilation-cache")


def colour_map(args: argparse.Namespace):
    """The parsed ``--colour-map`` (checked before anything loads), or None."""
    spec = getattr(args, "colour_map", None)
    if spec is None:
        return None
    if getattr(args, "num_labels", None) is None:
        raise UserError("--colour-map maps colours to class ids: it needs --num-labels")
    from ..imaging.masks import ColourMap

    try:
        return ColourMap.parse(spec)
    except ValueError as e:
        raise UserError(f"--colour-map: {e}") from None


# ------------------------------------------------------------------------------------ model loading
def load_model(args: argparse.Namespace, source: str | None = None, **kwargs: Any):
    """The painter from ``--model`` (or ``source``) with the shared Hub and layout options."""
    from ..config import SegGptConfig
    from ..models import SegGptForImageSegmentation

    name = source or args.model
    config = SegGptConfig.from_json_file(args.config) if getattr(args, "config", None) else None
    status(f"loading {name} ...")
    start = time.perf_counter()
    model = SegGptForImageSegmentation.from_pretrained(
        name, revision=args.revision, cache_dir=args.cache_dir, local_files_only=args.local_files_only,
        config=config, layout=getattr(args, "checkpoint_layout", None), **kwargs)
    status(f"loaded {name} in {time.perf_counter() - start:.1f}s")
    return model


# ------------------------------------------------------------------------------------ work on threads
class _Background:
    """Work on a daemon thread, with its own "finished" flag: ``Thread.is_alive`` cannot be trusted after
    a ``join`` interrupted by Ctrl-C (Python marks the thread stopped although it still runs)."""

    def __init__(self, target: Callable[[], None], name: str):
        import threading

        self.finished = threading.Event()

        def run() -> None:
            try:
                target()
            finally:
                self.finished.set()

        self.thread = threading.Thread(target=run, name=name, daemon=True)

    def running(self) -> bool:
        return not self.finished.is_set()

    def wait(self) -> None:
        while not self.finished.wait(0.1):  # interruptible, unlike a long Thread.join
            pass


_background: list[_Background] = []  # work started ahead (compilations); waited for when a command ends
_abandon_on_exit = False


def start_background(target: Callable[[], None], name: str) -> _Background:
    """Run ``target`` on a daemon thread that :func:`join_background` waits for when the command ends."""
    work = _Background(target, name)
    _background.append(work)
    work.thread.start()
    return work


def background_running() -> bool:
    return any(work.running() for work in _background)


def abandon_background_on_exit() -> None:
    """The console script ends the process itself (without interpreter shutdown) while work is left on
    threads: then a command's end need not wait for it."""
    global _abandon_on_exit
    _abandon_on_exit = True


def join_background() -> None:
    """Wait for the work a command started (unless the process is about to end without it)."""
    if not _abandon_on_exit:
        while _background:
            _background.pop().wait()


def compile_ahead(args: argparse.Namespace, *, queries: int, prompts: int) -> Callable[[], None]:
    """Start compiling the first batch's forward while the weights load (see
    :func:`seggpt_jax.inference.segmenter.compile_forward`); returns the function that waits for it,
    saying so when it has to wait. When the config cannot be read on its own (a weight file without
    config.json) nothing starts."""
    from ..config import ConfigError, SegGptConfig
    from ..inference.segmenter import compile_forward
    from ..weights import CheckpointError

    from ..imaging.processor import SegGptImageProcessor

    hub_options = dict(revision=args.revision, cache_dir=args.cache_dir, local_files_only=args.local_files_only)
    try:
        config = SegGptConfig.from_json_file(args.config) if getattr(args, "config", None) else \
            SegGptConfig.from_pretrained(args.model, **hub_options)
        processor = SegGptImageProcessor.from_pretrained(args.model, **hub_options)  # the model's: the same program
    except (ConfigError, CheckpointError, OSError, ValueError):
        return lambda: None
    batch = getattr(args, "batch_size", None)
    status(f"compiling the forward (first batch: {queries if batch is None else min(batch, queries)} "
           f"quer{'y' if queries == 1 else 'ies'} x {plural(prompts, 'prompt')}) while the weights load ...")
    started = time.perf_counter()

    finished: list[float] = []

    def run() -> None:
        try:
            if compile_forward(config, queries=queries, prompts=prompts, batch_size=batch,
                               ensemble_mode=getattr(args, "ensemble_mode", None) or "transformers",
                               processor=processor, devices=getattr(args, "devices", None)):
                finished.append(time.perf_counter())
        except Exception as e:  # noqa: BLE001 - only a head start: the first batch compiles and reports
            logging.getLogger(__name__).debug("compiling ahead failed: %s", e)

    work = start_background(run, "seggpt-jax-compile")

    def wait() -> None:
        if work.running():
            status(f"waiting for the compilation to finish (started {time.perf_counter() - started:.0f}s ago) ...")
        work.wait()
        if finished:
            status(f"compiled in {finished[0] - started:.1f}s")

    return wait


def make_segmenter(args: argparse.Namespace, model=None, *, ensemble_mode: str | None = None, local: bool = False):
    """The Segmenter of a command: ``--model`` loaded (or ``model``), with the command's batch size, cache,
    pixel limit, devices and ensemble mode (``ensemble_mode`` when the command decides it, else
    ``--ensemble-mode``). ``local``: this process's devices only, under ``jax.distributed`` too (each
    process then runs its own forwards)."""
    from ..inference.segmenter import Segmenter

    model = model if model is not None else load_model(args)
    extra = {"max_pixels": args.max_pixels} if hasattr(args, "max_pixels") else {}
    mode = ensemble_mode or getattr(args, "ensemble_mode", None) or "transformers"
    try:
        segmenter = Segmenter(model, batch_size=getattr(args, "batch_size", None),
                              compilation_cache=args.compilation_cache, ensemble_mode=mode,
                              devices=_devices(args, local), **extra)
    except ValueError as e:
        raise UserError(f"--devices: {e}" if "devices" in str(e) else str(e)) from None
    if segmenter.parallel.active:
        status(f"running on {segmenter.parallel.describe()}, {segmenter.batch_size} rows per forward")
    return segmenter


def _devices(args: argparse.Namespace, local: bool):
    count = getattr(args, "devices", None)
    if not local:
        return count
    import jax

    devices = jax.local_devices()
    if count is not None and count > len(devices):
        raise UserError(f"--devices {count}: this process has {len(devices)} devices")
    return devices[:count] if count else devices


def is_main_process() -> bool:
    """Process 0 of a ``--distributed`` job, or the only process: the one that prints reports and writes
    shared files."""
    import sys

    if "jax" not in sys.modules:
        return True
    import jax

    return jax.process_index() == 0


# ------------------------------------------------------------------------------------ output
def status(text: str) -> None:
    """One progress line on stderr (through tqdm, so that it does not break a progress bar)."""
    from tqdm import tqdm

    tqdm.write(f"seggpt-jax: {text}", file=sys.stderr)


class _TqdmHandler(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        status(record.getMessage())


def route_messages() -> None:
    """Library log messages (INFO: loading, compiling) and warnings as one line each on stderr."""
    import warnings

    logger = logging.getLogger("seggpt_jax")
    if not any(isinstance(h, _TqdmHandler) for h in logger.handlers):
        logger.addHandler(_TqdmHandler())
    logger.setLevel(logging.INFO)
    logger.propagate = False
    warnings.showwarning = lambda message, category, *rest, **kw: status(f"warning: {message}")


def progress_bar(total: int | None, unit: str, desc: str):
    from tqdm import tqdm

    return tqdm(total=total, unit=f" {unit}", desc=desc, file=sys.stderr, dynamic_ncols=True, smoothing=0.1,
                bar_format="{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}, {rate_fmt}]"
                if total else None)


def plural(count: int, word: str) -> str:
    return f"{count} {word}{'' if count == 1 else 's'}"
