"""The ``seggpt-jax`` command line: one consistent surface over every command.

* Inputs are positional everywhere (images, CLIP, DATA, SRC, MODEL); ``--out-dir`` names every output
  folder and ``-o/--output`` every output file; ``--model`` and the Hub options are the same for all.
* Every error a user can cause (missing or unreadable files, bad options, unreadable checkpoints,
  no network and no cache, a full disk) is one line on stderr with exit status 1, never a traceback
  (``SEGGPT_JAX_DEBUG=1`` shows it). Options are checked before the model loads.
"""

from __future__ import annotations

import os
import sys

from . import common, convert, export, segment, serve, train
from .common import UserError

EXIT_ERROR = 1
EXIT_INTERRUPTED = 130


def build_parser() -> common.Parser:
    from .. import __version__

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


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from ..config import ConfigError
    from ..data import DataError
    from ..imaging.decode import InputError
    from ..weights import CheckpointError, ModelNotFoundError

    common.route_messages()
    try:
        return args.run(args)
    except ModelNotFoundError as e:
        option = "--model PATH" if hasattr(args, "model") and args.command != "info" else "a local path"
        print(f"seggpt-jax {args.command}: error: {e.reason}. Pass {option} to use weights you have (a folder with "
              f"config.json and model.safetensors, or the original seggpt_vit_large.pth); `hf download "
              f"BAAI/seggpt-vit-large --local-dir DIR` makes such a folder on a machine with network access.",
              file=sys.stderr)
        return EXIT_ERROR
    except (UserError, InputError, DataError, CheckpointError, ConfigError, ValueError, OSError) as e:
        if os.environ.get("SEGGPT_JAX_DEBUG"):
            raise
        print(f"seggpt-jax {args.command}: error: {_one_line(e)}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print(f"seggpt-jax {args.command}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
