"""Run with XLA_FLAGS=--xla_force_host_platform_device_count=8: the flash kernels under a device mesh.

Prints one JSON line:

* ``"operands"``: for each case, the leading ``[batch, heads]`` dims of every Triton kernel call's
  operands in the ViT-L bfloat16 program exported for ``cuda`` with the batch (8) sharded over the
  mesh's data axis (and the heads over its model axis where it has one);
* ``"errors"``: differences between sharded and unsharded results in interpret mode, for the
  attention op (forward loss and gradients, max abs relative to max |unsharded|) and for the tiny
  painter with ``attention="flash"`` (forward, loss, the gradient of its loss w.r.t. every parameter,
  and how many ``shard_map`` calls its traced forward holds).
"""

from __future__ import annotations

import json
import re
import sys

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from common import CONFIG, global_inputs

from seggpt_jax import RuntimeConfig, parallel
from seggpt_jax.nn.flash_attention import attention_flash

TRITON_CALL = "__gpu$xla.gpu.triton"
GRID, HEADS, DIM = (56, 28), 16, 64


def kernel_operand_dims(text: str) -> list[list[list[int]]]:
    """``[batch, heads]`` of each operand of each Triton call in a StableHLO module's text."""
    pattern = re.compile(rf"@{re.escape(TRITON_CALL)}\(.*?:\s*\(([^)]*)\)\s*->")
    return [[[int(d) for d in t.split("x")[:2]] for t in re.findall(r"tensor<([^>]*)>", m.group(1))]
            for m in pattern.finditer(text)]


def exported_operands(mesh, which: str, partitioning: bool = True) -> list:
    seq = GRID[0] * GRID[1]
    token = jax.ShapeDtypeStruct((8, seq, HEADS, DIM), jnp.bfloat16)
    tables = (jax.ShapeDtypeStruct((2 * GRID[0] - 1, DIM), jnp.bfloat16),
              jax.ShapeDtypeStruct((2 * GRID[1] - 1, DIM), jnp.bfloat16))
    extra = {} if partitioning else {"partitioning": None}

    def forward(q, k, v, rel_pos):
        return attention_flash(q, k, v, scale=DIM ** -0.5, grid=GRID, rel_pos=rel_pos, platform="gpu", **extra)

    def value_and_grad(q, k, v, rel_pos):
        return jax.value_and_grad(lambda *a: jnp.sum(forward(*a).astype(jnp.float32) ** 2), argnums=(0, 1, 2, 3))(
            q, k, v, rel_pos)

    fn = {"forward": forward, "value_and_grad": value_and_grad}[which]
    tokens = NamedSharding(mesh, P("data", None, "model" if "model" in mesh.shape else None))
    replicated = NamedSharding(mesh, P())
    with jax.set_mesh(mesh):
        exported = jax.export.export(
            jax.jit(fn, in_shardings=(tokens, tokens, tokens, (replicated, replicated))), platforms=["cuda"],
            disabled_checks=[jax.export.DisabledSafetyCheck.custom_call(TRITON_CALL)])(token, token, token, tables)
    return kernel_operand_dims(exported.mlir_module())


def op_errors(mesh) -> dict[str, float]:
    grid = (5, 3)
    keys = jax.random.split(jax.random.key(0), 6)
    q, k, v, cotangent = (jax.random.normal(keys[i], (8, 15, 4, 8)) for i in range(4))
    tables = (0.5 * jax.random.normal(keys[4], (9, 8)), 0.5 * jax.random.normal(keys[5], (5, 8)))

    def loss(q, k, v, tables):
        return jnp.sum(attention_flash(q, k, v, scale=0.3, grid=grid, rel_pos=tables, platform="cpu") * cotangent)

    run = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3)))
    reference = run(q, k, v, tables)
    tokens = NamedSharding(mesh, P("data", None, "model"))
    with jax.set_mesh(mesh):
        sharded = run(*(jax.device_put(x, tokens) for x in (q, k, v)), tables)
    return {name: float(np.abs(np.asarray(a) - np.asarray(b)).max() / np.abs(np.asarray(b)).max())
            for name, a, b in zip(("loss", "q", "k", "v", "rel_pos_h", "rel_pos_w"), jax.tree.leaves(sharded),
                                  jax.tree.leaves(reference), strict=True)}


def _count(value, primitive: str) -> int:
    """``primitive`` equations in a jaxpr, nested jaxprs included."""
    if isinstance(value, jax.extend.core.ClosedJaxpr):
        value = value.jaxpr
    if isinstance(value, jax.extend.core.Jaxpr):
        return sum(1 if eqn.primitive.name == primitive else sum(_count(p, primitive) for p in eqn.params.values())
                   for eqn in value.eqns)
    if isinstance(value, (tuple, list)):
        return sum(_count(item, primitive) for item in value)
    return 0


def model_errors(mesh) -> dict[str, float]:
    from flax import nnx

    from seggpt_jax import SegGptForImageSegmentation

    def build():
        return SegGptForImageSegmentation(CONFIG, runtime=RuntimeConfig(attention="flash"), rngs=nnx.Rngs(0))

    inputs = global_inputs(8)

    def loss(model, batch):
        return model(**batch).loss

    reference_model = build()
    reference = reference_model(**inputs)
    reference_grads = nnx.grad(loss)(reference_model, inputs)
    model = parallel.shard_model(build(), mesh)
    with jax.set_mesh(mesh):
        batch = parallel.shard_batch(mesh, **inputs)
        out = model(**batch)
        grads = nnx.grad(loss)(model, batch)
    assert len(out.pred_masks.sharding.device_set) == 8
    with jax.set_mesh(mesh):
        jaxpr = jax.make_jaxpr(lambda batch: model(**batch).pred_masks)(batch)
    grad_error = max(float(np.abs(np.asarray(a) - np.asarray(b)).max())
                     for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(reference_grads), strict=True))
    return {"pred_masks": float(np.abs(parallel.local_rows(out.pred_masks) - np.asarray(reference.pred_masks)).max()),
            "loss": abs(float(out.loss) - float(reference.loss)), "grad": grad_error,
            "shard_maps": _count(jaxpr.jaxpr, "shard_map"),
            "grad_scale": max(float(np.abs(np.asarray(g)).max()) for g in jax.tree.leaves(reference_grads))}


def main() -> None:
    assert jax.device_count() == 8, jax.devices()
    data, data_model = parallel.make_mesh(), parallel.make_mesh(model=2)
    operands = {
        "data=8 forward": exported_operands(data, "forward"),
        "data=8 value_and_grad": exported_operands(data, "value_and_grad"),
        "data=4 model=2 value_and_grad": exported_operands(data_model, "value_and_grad"),
        "data=8 forward, partitioning off": exported_operands(data, "forward", partitioning=False),
    }
    errors = {f"op {name}": {k: v for k, v in op_errors(mesh).items()} for name, mesh in
              (("data=8", data), ("data=4 model=2", data_model))}
    errors["painter data=4 model=2"] = model_errors(data_model)
    print(json.dumps({"operands": operands, "errors": errors}))


if __name__ == "__main__":
    sys.exit(main())
