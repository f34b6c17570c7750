"""``python -m convert SRC OUT [options]`` or ``python convert SRC OUT``: see ``--help``."""

import os
import sys

if __package__ in (None, ""):  # run as `python convert ...` (a folder with __main__.py)
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from seggpt_jax.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["convert", *sys.argv[1:]]))
