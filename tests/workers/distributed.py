"""``python distributed.py PORT PROCESS_ID NUM_PROCESSES``: one process of a jax.distributed job on loopback.

Each process holds 2 CPU devices and 2 rows of a global batch; the job segments the whole batch (with
a feature ensemble that spans processes) and each process checks its rows against a one-device
computation of the global batch.
"""

from __future__ import annotations

import json
import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"

from seggpt_jax import parallel  # noqa: E402


def main() -> None:
    port, process_id, count = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    parallel.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=count, process_id=process_id)
    import jax
    import numpy as np

    from common import build_model, global_inputs

    assert jax.process_count() == count and jax.device_count() == 2 * count
    batch = 2 * count
    inputs = global_inputs(batch)
    base = {k: inputs[k] for k in ("pixel_values", "prompt_pixel_values", "prompt_masks")}
    mine = slice(2 * process_id, 2 * process_id + 2)
    reference_model = build_model()  # on this process's first device
    mesh = parallel.make_mesh()
    model = parallel.shard_model(build_model(), mesh)
    results = {}
    for name, extra in {"plain": {}, "ensemble across processes": dict(feature_ensemble=True)}.items():
        reference = np.asarray(reference_model(**base, **extra).pred_masks)[mine]
        local = {k: v[mine] for k, v in base.items()}
        out = model(**parallel.shard_batch(mesh, **local), **extra)
        assert out.pred_masks.shape[0] == batch
        results[name] = float(np.abs(parallel.local_rows(out.pred_masks) - reference).max())
    print("RESULT " + json.dumps({"process": process_id, "errors": results}), flush=True)
    jax.distributed.shutdown()


if __name__ == "__main__":
    main()
