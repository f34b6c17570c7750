#!/usr/bin/env python
"""Convert a SegGPT checkpoint to seggpt-jax's layout (or transformers', or the original BAAI names),
as transformers' ``convert_*.py`` scripts do for their models.

    python convert/convert_seggpt_checkpoint.py BAAI/seggpt-vit-large --out-dir seggpt-jax-vit-large
    python convert/convert_seggpt_checkpoint.py seggpt_vit_large.pth --out-dir for-pytorch --to transformers

The source is anything ``SegGptForImageSegmentation.from_pretrained`` reads (a Hub repo id, a folder in
transformers' or our layout, the original ``seggpt_vit_large.pth``). The result is checked to reload
bit-identically and, when torch and transformers are installed, a parity report against transformers is
printed. It is the same command as ``seggpt-jax convert`` (``--help`` lists every option); this file is a
script to run, not a module to import.
"""

import sys

from seggpt_jax.cli import main

if __name__ == "__main__":
    sys.exit(main(["convert", *sys.argv[1:]]))
