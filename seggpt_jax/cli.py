"""The ``seggpt-jax`` command line: ``convert`` and ``info``.

Every error a user can cause (missing files, unreadable or mismatched checkpoints, no network and no
cache) is printed as one line on stderr with a non-zero exit status, never as a traceback.
"""

from __future__ import annotations

import argparse
import os
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="seggpt-jax", description="SegGPT in JAX: checkpoint tools.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

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


def _load(args, dtype: str = "float32"):
    import jax.numpy as jnp

    from .config import SegGptConfig
    from .modeling import SegGptForImageSegmentation

    config = SegGptConfig.from_json_file(args.config) if args.config else None
    return SegGptForImageSegmentation.from_pretrained(
        getattr(args, "src", None) or args.model, revision=args.revision, cache_dir=args.cache_dir,
        local_files_only=args.local_files_only, config=config, layout=args.layout, param_dtype=jnp.dtype(dtype))


def _cmd_convert(args) -> int:
    import numpy as np

    from .checkpoint import flat_parameters, resolve
    from .checkpoint.sources import CONFIG_NAME
    from .modeling import SegGptForImageSegmentation

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
    from .checkpoint import TRANSFORMERS, detect_format, open_weights

    with open_weights(weights) as reader:
        return detect_format(reader.keys(), reader.metadata) is TRANSFORMERS


def _describe(model) -> str:
    from .checkpoint import flat_parameters

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
    from .checkpoint import CheckpointError
    from .config import ConfigError

    try:
        return {"convert": _cmd_convert, "info": _cmd_info}[args.command](args)
    except (_UserError, CheckpointError, ConfigError, FileNotFoundError, NotADirectoryError, PermissionError) as e:
        print(f"seggpt-jax {args.command}: error: {e}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print(f"seggpt-jax {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
