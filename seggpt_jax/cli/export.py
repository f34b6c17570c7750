"""``seggpt-jax export``: a serialized ``jax.export`` program of the painter's forward, for serving."""

from __future__ import annotations

import argparse
import os

from ..runtime import ATTENTION_IMPLS, PLATFORMS
from . import common
from .common import UserError, status

DTYPES = ("float32", "bfloat16")  # of runtime.COMPUTE_DTYPES, the two a server runs


def add_commands(sub: argparse._SubParsersAction) -> None:
    export = sub.add_parser(
        "export", formatter_class=common.HelpFormatter,
        help="write the forward as a jax.export program for a server (any platform, from this machine)",
        description="Lower the painter's forward at a fixed batch size for --platform (this machine need not be "
                    "one: a TPU or GPU program is lowered here) and write it into --out-dir: forward.jaxexport "
                    "(the serialized program), model.safetensors + config.json (its weights, passed as "
                    "arguments), preprocessor_config.json, and export.json (input and output shapes and dtypes, "
                    "image size, mean/std, prompt count, platforms, versions). seggpt_jax.export.load(OUT) runs "
                    "it without the model code. Files other than the ones it writes are left alone.")
    common.add_positional_model(export, "MODEL", "Hub repo id, local folder, or weight file")
    export.add_argument("--out-dir", required=True, help="output folder (created if needed)")
    export.add_argument("--platform", action="append", choices=PLATFORMS, default=None,
                        help="platform to run on (repeat for several; they must share one attention kernel); "
                             "default: this machine's")
    export.add_argument("--batch-size", type=common.positive_int, default=1, help="queries per call")
    export.add_argument("--prompts", type=common.positive_int, default=1,
                        help="prompts per query (more than one: the feature ensemble over them)")
    export.add_argument("--ensemble-mode", choices=["transformers", "original"], default="transformers",
                        help="feature ensemble of several prompts: transformers' or the BAAI code's")
    export.add_argument("--dtype", choices=DTYPES, default="float32",
                        help="compute dtype (float32 runs every matmul at the highest precision)")
    export.add_argument("--weights-dtype", choices=DTYPES, default="float32", help="dtype of the stored weights")
    export.add_argument("--attention", default="auto",
                        choices=ATTENTION_IMPLS,
                        help="attention kernel (auto: chunked on CPU, the fused Pallas kernel on GPU and TPU)")
    common.add_overwrite_option(export)
    common.add_hub_options(export)
    export.set_defaults(run=run_export)


def run_export(args: argparse.Namespace) -> int:
    import jax.numpy as jnp

    from ..export import FILE_NAMES, attention_per_platform, export_model, export_platforms, require_serialization
    from ..files import OutputFolder
    from ..runtime import RuntimeConfig, exact_precision

    source = common.resolve_model_argument(args)
    common.check_output_folder(args.out_dir)
    try:
        require_serialization()
    except ImportError as e:
        raise UserError(str(e)) from None
    platforms = export_platforms(args.platform)
    dtype = jnp.dtype(args.dtype)
    attention_per_platform(args.attention, dtype, platforms)  # before the model loads
    folder = OutputFolder(args.out_dir, overwrite=args.overwrite)
    for name in FILE_NAMES:
        folder.check(name)  # before the model loads (OutputConflict: one line, exit status 1)
    model = common.load_model(args, source, dtype=dtype, precision=exact_precision(args.dtype),
                              runtime=RuntimeConfig(attention=args.attention))
    status(f"lowering the forward for {', '.join(platforms)} (batch {args.batch_size} x {args.prompts} "
           f"prompt{'s' if args.prompts > 1 else ''}, {args.dtype}) ...")
    exported = export_model(model, args.batch_size, platforms=platforms, prompts_per_query=args.prompts,
                            ensemble_mode=args.ensemble_mode, weights_dtype=jnp.dtype(args.weights_dtype))
    status(f"writing {args.out_dir} ...")
    paths = exported.save(args.out_dir, overwrite=args.overwrite)
    meta = exported.metadata
    sizes = ", ".join(f"{os.path.basename(p)} {_size(os.path.getsize(p))}" for p in paths)
    shapes = "; ".join(f"{i['name']} {i['dtype']}{i['shape']}" for i in meta["inputs"])
    print(f"wrote {args.out_dir} ({sizes})")
    print(f"platforms {', '.join(meta['platforms'])}; attention {meta['attention']}; compute {meta['compute_dtype']}; "
          f"inputs {shapes}; output pred_masks float32{meta['outputs'][0]['shape']}")
    return 0


def _size(count: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if count < 1000 or unit == "GB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1000
    return f"{count} B"
