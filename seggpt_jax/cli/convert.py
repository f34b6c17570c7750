"""``seggpt-jax convert`` and ``seggpt-jax info``: checkpoints in any layout, out in ours or transformers'."""

from __future__ import annotations

import argparse
import json
import os
import time

from . import common
from .common import UserError, status

#: The parity report's three forwards of each model, measured for ViT-L on a 2-core CPU.
VIT_LARGE_PARITY_SECONDS = 210
LAYOUTS = ("seggpt-jax", "transformers", "original")


def add_commands(sub: argparse._SubParsersAction) -> None:
    convert = sub.add_parser(
        "convert", formatter_class=common.HelpFormatter,
        help="convert a checkpoint (Hub id, transformers folder, .bin, original .pth) to our or transformers' layout",
        description="Convert any checkpoint from_pretrained accepts into --out-dir: our layout (config.json + "
                    "model.safetensors keyed by Flax parameter path), transformers' (which "
                    "transformers.SegGptForImageSegmentation.from_pretrained loads), or the original BAAI names. "
                    "Checks that the result reloads bit-identically and, when torch and transformers are installed, "
                    "prints a parity report against transformers. Files other than the ones it writes are left alone.")
    common.add_positional_model(convert, "SRC", "Hub repo id, local folder, or weight file")
    convert.add_argument("--out-dir", required=True, help="output folder (created if needed)")
    convert.add_argument("--to", choices=LAYOUTS, default="seggpt-jax", help="the layout to write")
    common.add_overwrite_option(convert)
    common.add_hub_options(convert)
    convert.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                         help="parameter dtype to store")
    check = convert.add_argument_group("parity report")
    check.add_argument("--no-parity", action="store_true",
                       help=f"skip the report against transformers (about {VIT_LARGE_PARITY_SECONDS // 60} minutes "
                            f"for ViT-L on 2 CPU cores)")
    check.add_argument("--tolerance", type=common.positive_float, default=1e-4,
                       help="largest pred_masks max abs error for the report to pass")
    common.add_compilation_cache_option(check)
    convert.set_defaults(run=run_convert)

    info = sub.add_parser("info", formatter_class=common.HelpFormatter,
                          help="show a checkpoint's config, parameter count, dtype and device",
                          description="Load a checkpoint and describe it.")
    common.add_positional_model(info, "MODEL", "Hub repo id, local folder, or weight file")
    common.add_hub_options(info)
    info.set_defaults(run=run_info)


def describe(model) -> str:
    from ..weights import flat_parameters

    params = flat_parameters(model)
    count = sum(int(v[...].size) for v in params.values())
    first = next(iter(params.values()))[...]
    cfg = model.config
    return (f"{count / 1e6:.1f}M parameters, {first.dtype}, hidden {cfg.hidden_size} x {cfg.num_hidden_layers} layers, "
            f"canvas {cfg.image_size[0]}x{cfg.image_size[1]}, device {list(first.devices())[0]}")


def run_convert(args: argparse.Namespace) -> int:
    import jax.numpy as jnp
    import numpy as np

    from ..files import OutputFolder, staging_folder
    from ..models import SegGptForImageSegmentation
    from ..weights import flat_parameters

    source = common.resolve_model_argument(args)
    common.check_output_folder(args.out_dir)
    common.check_compilation_cache(args)
    folder = OutputFolder(args.out_dir, overwrite=args.overwrite)
    model = common.load_model(args, source, param_dtype=jnp.dtype(args.dtype))
    status(describe(model))
    with staging_folder(folder.create()) as staging:
        status(f"writing the {args.to} layout ...")
        model.save_pretrained(staging, layout=args.to)
        names = sorted(os.listdir(staging))
        for name in names:  # fail before moving anything in if any name is taken
            folder.check(name)
        status("checking that it reloads bit-identically ...")
        reloaded = SegGptForImageSegmentation.from_pretrained(staging, param_dtype=jnp.dtype(args.dtype))
        before, after = flat_parameters(model), flat_parameters(reloaded)
        differ = [k for k in before if not np.array_equal(np.asarray(before[k][...]), np.asarray(after[k][...]))]
        if differ:
            raise UserError(f"round trip changed {len(differ)} parameters, e.g. {differ[:3]}")
        for name in names:
            folder.adopt(name, os.path.join(staging, name))
    print(f"wrote {args.out_dir} ({', '.join(names)}; {args.to} layout); reload is bit-identical")
    if args.no_parity:
        return 0
    if args.compilation_cache:
        from ..runtime import enable_compilation_cache

        enable_compilation_cache(None if args.compilation_cache is True else args.compilation_cache)
    return _parity_report(args, source, reloaded)


def _parity_report(args: argparse.Namespace, source: str, model) -> int:
    import sys

    from . import parity
    from ..weights import TRANSFORMERS, detect_format, open_weights, resolve

    if not parity.available():
        print("parity report skipped: torch and transformers are not installed (pip install 'seggpt-jax[test]')")
        return 0
    if args.to == "transformers":
        source_dir, source = args.out_dir, "read by transformers from --out-dir"
    else:
        resolved = resolve(source, revision=args.revision, cache_dir=args.cache_dir,
                           local_files_only=args.local_files_only)
        weights_dir = os.path.dirname(resolved.weights)
        with open_weights(resolved.weights) as reader:
            is_transformers = detect_format(reader.keys(), reader.metadata) is TRANSFORMERS
        readable = (args.checkpoint_layout in (None, "transformers") and resolved.config_file is not None
                    and os.path.dirname(resolved.config_file) == weights_dir and is_transformers)
        source_dir = weights_dir if readable else None
        source = "read by transformers from SRC" if readable else "our weights exported to transformers"
    scale = model.config.num_hidden_layers * model.config.hidden_size ** 2 * model.config.num_patches
    estimate = VIT_LARGE_PARITY_SECONDS * scale / (24 * 1024 ** 2 * 1568)
    status(f"parity against transformers on random inputs: 3 cases, each model run 3 times "
           f"(about {max(estimate, 1):.0f}s here; --no-parity skips it) ...")
    start = time.perf_counter()
    hf = parity.transformers_model_from(model, source_dir)
    rows = parity.compare(model, hf)
    print(f"parity against transformers ({source}; float32, random inputs; took {time.perf_counter() - start:.0f}s):")
    print(parity.format_rows(rows))
    worst = max(r.max_abs_error for r in rows if r.stage == "pred_masks")
    if worst > args.tolerance:
        print(f"PARITY FAILED: pred_masks max abs error {worst:.3e} > {args.tolerance:g}", file=sys.stderr)
        return 1
    print(f"parity OK: pred_masks max abs error {worst:.3e} <= {args.tolerance:g}")
    return 0


def run_info(args: argparse.Namespace) -> int:
    model = common.load_model(args, common.resolve_model_argument(args))
    print(describe(model))
    print(json.dumps(model.config.to_dict(), indent=2, sort_keys=True))
    return 0
