"""The ``seggpt-jax`` command line: one consistent surface over every command.

* Inputs are positional everywhere (images, CLIP, DATA, SRC, MODEL); ``--out-dir`` names every output
  folder and ``-o/--output`` every output file; ``--model`` and the Hub options are the same for all.
* Every error a user can cause (missing or unreadable files, bad options, unreadable checkpoints,
  no network and no cache, a full disk) is one line on stderr with exit status 1, never a traceback
  (``SEGGPT_JAX_DEBUG=1`` shows it). Options and output locations are checked before the model loads.
* Nothing heavy is imported to parse the command line: ``--help`` and ``--version`` answer at once,
  and JAX starts only when a command needs it.
* Ctrl-C stops a command at once, whatever it is doing (exit status 130): a compilation running on a
  thread is abandoned, never left to crash the process on its way out (:func:`console_main`).
"""

from __future__ import annotations

import os
import sys
import threading
import time

from ..version import __version__
from . import common, convert, export, segment, serve, train
from .common import UserError

EXIT_ERROR = 1
EXIT_INTERRUPTED = 130


def build_parser() -> common.Parser:
    parser = common.Parser(
        prog="seggpt-jax", formatter_class=common.HelpFormatter,
        description="SegGPT in JAX: segment images and videos from examples, fine-tune, evaluate, and convert "
                    "checkpoints.")
    parser.add_argument("--version", action="version", version=f"seggpt-jax {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    segment.add_commands(sub)
    train.add_commands(sub)
    convert.add_commands(sub)
    export.add_commands(sub)
    serve.add_commands(sub)
    return parser


def _one_line(error: BaseException) -> str:
    if isinstance(error, OSError) and error.strerror and error.filename:
        return f"{error.filename}: {error.strerror}"
    return " ".join(str(error).split()) or type(error).__name__


def _is_interrupt(error: BaseException) -> bool:
    """Ctrl-C that JAX turned into another error: a KeyboardInterrupt raised while jit compared its static
    arguments comes back as a ``ValueError`` holding the interrupt's traceback as text."""
    return isinstance(error, ValueError) and str(error).startswith("static arguments should be comparable") \
        and "KeyboardInterrupt" in str(error)


def main(argv: list[str] | None = None) -> int:
    """Run one command; returns its exit status. Work left on threads (a compilation started ahead) is
    waited for before returning, so that the process can always exit cleanly."""
    try:
        return _run(argv)
    finally:
        common.join_background()


def _run(argv: list[str] | None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    command = args.command
    try:
        from ..config import ConfigError
        from ..data import DataError
        from ..imaging.decode import InputError
        from ..weights import CheckpointError, ModelNotFoundError

        common.route_messages()
        try:
            return args.run(args)
        except ModelNotFoundError as e:
            option = "--model PATH" if command != "info" else "a local path"
            print(f"seggpt-jax {command}: error: {e.reason}. Pass {option} to use weights you have (a folder with "
                  f"config.json and model.safetensors, or the original seggpt_vit_large.pth); `hf download "
                  f"BAAI/seggpt-vit-large --local-dir DIR` makes such a folder on a machine with network access.",
                  file=sys.stderr)
            return EXIT_ERROR
        except (UserError, InputError, DataError, CheckpointError, ConfigError, ValueError, OSError) as e:
            if _is_interrupt(e):
                raise KeyboardInterrupt from None
            if os.environ.get("SEGGPT_JAX_DEBUG"):
                raise
            print(f"seggpt-jax {command}: error: {_one_line(e)}", file=sys.stderr)
            return EXIT_ERROR
    except KeyboardInterrupt:
        print(f"seggpt-jax {command}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


class _InterruptWatch:
    """Makes Ctrl-C take effect within a second even while the main thread is inside a long native call
    (an XLA compilation, a weight read), where Python would only see it when the call returns.

    The C-level signal handler writes to a wake-up pipe at once; a watcher thread reads it and, if the
    process has not ended :data:`GRACE` seconds later, ends it with status 130. Everything the tool
    writes is atomic and recorded before it appears, so ending there loses nothing.
    """

    GRACE = 1.0

    def __init__(self):
        self._read, self._write = os.pipe()
        os.set_blocking(self._write, False)
        self._previous = None

    def __enter__(self) -> "_InterruptWatch":
        import signal

        self._previous = signal.set_wakeup_fd(self._write, warn_on_full_buffer=False)
        threading.Thread(target=self._watch, name="seggpt-jax-interrupt", daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        import signal

        signal.set_wakeup_fd(self._previous if self._previous is not None else -1)

    def _watch(self) -> None:
        import signal

        while True:
            try:
                data = os.read(self._read, 64)
            except OSError:
                return
            if not data:
                return
            if signal.SIGINT in data or signal.SIGTERM in data:
                time.sleep(self.GRACE)
                _hard_exit(EXIT_INTERRUPTED, "interrupted")


def _hard_exit(code: int, note: str | None = None) -> None:
    """End the process now, without running interpreter and C++ shutdown (where a compilation still
    running on a thread would abort the process with SIGABRT)."""
    if note:
        print(f"seggpt-jax: {note}", file=sys.stderr)
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)


def _quiet_interrupts(hook):
    """Ctrl-C that lands in a callback Python cannot raise from (a garbage-collection hook, say) ends the
    command like any other Ctrl-C: no "Exception ignored" traceback."""

    def unraisable(info) -> None:
        if isinstance(info.exc_value, KeyboardInterrupt):
            _hard_exit(EXIT_INTERRUPTED, "interrupted")
        hook(info)

    return unraisable


def console_main() -> None:
    """The ``seggpt-jax`` console script: :func:`main`, then exit. A compilation still running on a
    thread (after Ctrl-C, or an error while the weights loaded) is abandoned rather than waited for."""
    common.abandon_background_on_exit()
    sys.unraisablehook = _quiet_interrupts(sys.unraisablehook)
    with _InterruptWatch():
        code = main()
    if common.background_running():
        _hard_exit(code)
    sys.exit(code)


if __name__ == "__main__":
    console_main()
