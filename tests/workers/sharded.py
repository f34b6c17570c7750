"""Run with XLA_FLAGS=--xla_force_host_platform_device_count=8: sharded results equal one device's."""

from __future__ import annotations

import json
import sys

import jax
import numpy as np

from common import build_model, global_inputs

from seggpt_jax import parallel


def main() -> None:
    assert jax.device_count() == 8, jax.devices()
    inputs = global_inputs(8)
    reference_model = build_model()
    cases = {
        "plain": dict(),
        "labels": dict(labels=inputs["labels"]),
        "ensemble per query": dict(feature_ensemble=True, prompts_per_query=2),
        "ensemble whole batch": dict(feature_ensemble=True, ensemble_mode="original"),
        "mixed types": dict(embedding_type=["semantic", "instance"] * 4),
    }
    base = {k: inputs[k] for k in ("pixel_values", "prompt_pixel_values", "prompt_masks")}
    results = {}
    for weights, model_axis, scan in (("replicated", 1, False), ("fsdp", 1, False), ("replicated", 2, False),
                                      ("fsdp", 1, True)):
        mesh = parallel.make_mesh(model=model_axis)
        model = build_model().with_runtime(scan_layers=True) if scan else build_model()
        model = parallel.shard_model(model, mesh, weights=weights)
        if scan:  # stacked [layers, in, out]: split along a weight axis, never the layer axis the scan steps over
            kernel = model.model.encoder.stacks["2"].mlp.lin1.kernel[...]
            assert kernel.shape[0] == 2 and kernel.sharding.spec[0] is None and any(kernel.sharding.spec[1:])
        else:
            kernel = model.model.encoder.layers[0].mlp.lin1.kernel[...]
        assert len(kernel.sharding.device_set) == 8
        for name, extra in cases.items():
            if scan and name not in ("plain", "labels"):
                continue
            reference = reference_model(**base, **extra)
            sharded_inputs = parallel.shard_batch(mesh, **base, labels=extra.get("labels"))
            rest = {k: v for k, v in extra.items() if k != "labels"}
            with jax.set_mesh(mesh):  # as the README says: the mesh in context while the call is traced
                out = model(**sharded_inputs, **rest)
            assert len(out.pred_masks.sharding.device_set) == 8
            error = float(np.abs(parallel.local_rows(out.pred_masks) - np.asarray(reference.pred_masks)).max())
            if reference.loss is not None:
                error = max(error, abs(float(out.loss) - float(reference.loss)))
            results[f"{weights}{' scanned' if scan else ''} data={mesh.shape['data']} model={model_axis}: {name}"] = error
    # rows that do not divide over the devices: the call still runs under the mesh (nothing is forced
    # to split by rows), with the one-device answer
    mesh = parallel.make_mesh()
    model = parallel.shard_model(build_model(), mesh, weights="fsdp")
    uneven = {k: v[:3] for k, v in base.items()}
    with jax.set_mesh(mesh):
        out = model(**uneven)
    results["fsdp data=8 model=1: 3 rows"] = float(np.abs(np.asarray(out.pred_masks)
                                                          - np.asarray(reference_model(**uneven).pred_masks)).max())
    json.dump(results, sys.stdout)


if __name__ == "__main__":
    main()
