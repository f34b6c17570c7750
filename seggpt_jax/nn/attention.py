"""Global multi-head attention with decomposed relative positions (MViTv2 / ViTDet / SAM / SegGPT).

For a query at grid cell ``(qh, qw)`` and a key at ``(kh, kw)`` the logit is

    scale * q.k + q.R_h[qh - kh] + q.R_w[qw - kw]

where ``R_h`` has ``2*H - 1`` rows and ``R_w`` has ``2*W - 1`` rows (111 and 55 for the 56x28 grid of
ViT-L; the grid is not square). Note the relative terms use the *unscaled* query, as in
transformers' ``SegGptAttention.add_decomposed_rel_pos``.

:func:`attention_plain` is the reference: it materialises the full ``[B, heads, N, N]`` logits and
adds the two relative terms by broadcasting, in the same order of operations as transformers.

The implementations (``RuntimeConfig(attention=...)``, dispatched by :func:`attention`):

* ``"plain"``: the reference above (XLA, ``[B, heads, N, N]`` logits).
* ``"chunked"``: :mod:`seggpt_jax.nn.chunked_attention`, per-head query tiles in ``lax.map``; nothing
  ``N x N``. The CPU default.
* ``"flash"``: :mod:`seggpt_jax.nn.flash_attention`, the fused Pallas kernel: Triton on GPU, Mosaic on
  TPU, the Pallas interpreter on CPU (slow: for tests only). The GPU and TPU default.
* ``"widened"``: the relative terms folded into q and k (:func:`widen`, head dim 64 -> 152 for ViT-L)
  for ``jax.nn.dot_product_attention``: ``implementation="cudnn"`` on GPU (cuDNN's fused flash
  attention: bfloat16/float16 only; JAX accepts a head dim of 152 only on Hopper or newer, <= 128
  before, and checks the cuDNN version and the GPU at trace time, so it cannot be lowered or exported
  on a machine without one), ``implementation="xla"`` elsewhere (``[B, heads, N, N]`` logits).

``"auto"`` resolves per target platform and dtype (:func:`resolve_impl`): ``"chunked"`` on CPU,
``"flash"`` on GPU and TPU in every dtype. Float32 on GPU/TPU takes the fused kernel too, not the
plain path: the kernel follows the model's ``precision`` in its own matmuls as XLA does in the
others (``None``: TF32 in Triton, one bfloat16 pass on the TPU MXU; ``"highest"``: IEEE float32 in
Triton, full float32 contraction in Mosaic), so float32 keeps its meaning, while the plain path would
hold ``[B, 16, 1568, 1568]`` float32 logits (157 MB per image and layer) and the chunked one
serialises ``lax.map`` steps that a GPU runs one small kernel at a time. cuDNN (``"widened"``) refuses
float32 altogether. On GPU the kernel adds the relative terms with row-aligned key blocks
(``bias="rows"``: a slice and a broadcast, no matmul), so float32 runs only ``q.k`` and ``p.v`` on
tensor cores (TF32) at the default precision, with no spills on sm_80 or sm_90a
(``python -m benchmarks.kernel_resources``); the reasons are in :mod:`seggpt_jax.nn.flash_attention`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from .chunked_attention import attention_chunked, default_tile_rows
from ..runtime import ATTENTION_IMPLS, PLATFORMS, ExecutionPlan, backend_of, platform_name  # noqa: F401
from ..runtime import DATA_AXIS
from ..runtime import resolve_attention as resolve_impl  # noqa: F401 (the rule lives in runtime)
from .flash_attention import FlashOptions, attention_flash
from .ops import relative_tables, rows_mesh


def attention_plain(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    scale: float,
    grid: tuple[int, int],
    rel_pos: tuple[jax.Array, jax.Array] | None,
    precision=None,
) -> jax.Array:
    """Reference attention. ``q, k, v: [B, N, heads, hd]`` with ``N = H * W``; returns ``[B, N, heads, hd]``."""
    batch, seq, heads, _ = q.shape
    rows, cols = grid
    logits = jnp.einsum("bqnd,bknd->bnqk", q * jnp.asarray(scale, q.dtype), k, precision=precision)  # [B, n, N, N]
    if rel_pos is not None:
        table_h, table_w = relative_tables(*rel_pos, grid)
        table_h, table_w = table_h.astype(q.dtype), table_w.astype(q.dtype)
        q_grid = q.reshape(batch, rows, cols, heads, -1)  # [B, H, W, n, hd]
        rel_h = jnp.einsum("bhwnc,hkc->bnhwk", q_grid, table_h, precision=precision)  # [B, n, H, W, H]
        rel_w = jnp.einsum("bhwnc,wkc->bnhwk", q_grid, table_w, precision=precision)  # [B, n, H, W, W]
        logits = logits.reshape(batch, heads, rows, cols, rows, cols)
        logits = logits + rel_h[..., :, None] + rel_w[..., None, :]
        logits = logits.reshape(batch, heads, seq, seq)
    weights = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(v.dtype)
    return jnp.einsum("bnqk,bknd->bqnd", weights, v, precision=precision)


# ------------------------------------------------------------------------------------ fast paths
_HALF = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


def widen(q: jax.Array, k: jax.Array, v: jax.Array, *, scale: float, grid: tuple[int, int],
          rel_pos: tuple[jax.Array, jax.Array], precision=None, multiple: int = 8):
    """Fold the relative terms into the dot product: ``q' . k' = scale q.k + rel_h + rel_w`` exactly.

    ``q' = [scale q, q.R_h[row(q), :], q.R_w[col(q), :]]`` and ``k' = [k, onehot(row(k)), onehot(col(k))]``;
    the head dim grows from ``hd`` to ``hd + H + W`` (148 for ViT-L), padded with zeros to a multiple
    of ``multiple``; ``v`` is zero-padded to the same width. Returns ``(q', k', v')``.
    """
    batch, seq, heads, dim = q.shape
    rows, cols = grid
    table_h, table_w = relative_tables(*rel_pos, grid)
    q_grid = q.reshape(batch, rows, cols, heads, dim)
    rel_h = jnp.einsum("bhwnc,hkc->bhwnk", q_grid, table_h.astype(q.dtype), precision=precision)
    rel_w = jnp.einsum("bhwnc,wkc->bhwnk", q_grid, table_w.astype(q.dtype), precision=precision)
    width = dim + rows + cols
    pad = -width % multiple
    position = jnp.arange(seq)
    one_hot = jnp.concatenate([jax.nn.one_hot(position // cols, rows, dtype=k.dtype),
                               jax.nn.one_hot(position % cols, cols, dtype=k.dtype)], axis=-1)  # [N, H + W]
    q_wide = jnp.concatenate([q * jnp.asarray(scale, q.dtype), rel_h.reshape(batch, seq, heads, rows),
                              rel_w.reshape(batch, seq, heads, cols), jnp.zeros((batch, seq, heads, pad), q.dtype)], -1)
    k_wide = jnp.concatenate([k, jnp.broadcast_to(one_hot[None, :, None, :], (batch, seq, heads, rows + cols)),
                              jnp.zeros((batch, seq, heads, pad), k.dtype)], -1)
    v_wide = jnp.pad(v, ((0, 0), (0, 0), (0, 0), (0, width + pad - dim)))
    return q_wide, k_wide, v_wide


def attention_widened(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    scale: float,
    grid: tuple[int, int],
    rel_pos: tuple[jax.Array, jax.Array] | None,
    precision=None,
    implementation: str = "xla",
) -> jax.Array:
    """Widened q/k (:func:`widen`) through ``jax.nn.dot_product_attention`` with ``implementation``:
    ``"xla"`` (``[B, heads, N, N]`` logits) or ``"cudnn"`` (cuDNN flash attention; needs a CUDA GPU with
    cuDNN at trace time, bfloat16/float16, and a widened head dim JAX accepts there)."""
    dim = q.shape[-1]
    if rel_pos is None:
        return jax.nn.dot_product_attention(q, k, v, scale=scale, implementation=implementation)
    q_wide, k_wide, v_wide = widen(q, k, v, scale=scale, grid=grid, rel_pos=rel_pos, precision=precision)
    out = jax.nn.dot_product_attention(q_wide, k_wide, v_wide, scale=1.0, implementation=implementation)
    return out[..., :dim]


def chunked_over_mesh(q, k, v, *, rel_pos, **kwargs) -> jax.Array:
    """:func:`~seggpt_jax.nn.chunked_attention.attention_chunked`, each device on its own rows of the batch
    under a mesh in context whose data axis divides it (:func:`~seggpt_jax.nn.ops.rows_mesh`); as it is
    otherwise.

    XLA cannot split the tile loop over a sharded batch: left to itself it gathers every row's q, k
    and v on every device and runs the whole batch's attention on each. Rows are independent, so the
    split is exact. The relative-position tables go in as one copy per row (a broadcast), so that each
    device's gradient of them is a sum over its rows and the broadcast's transpose adds the devices'."""
    mesh = rows_mesh(q.shape[0])
    if mesh is None or mesh.shape[DATA_AXIS] == 1:  # nothing to split
        return attention_chunked(q, k, v, rel_pos=rel_pos, **kwargs)
    rows = jax.sharding.PartitionSpec(DATA_AXIS)
    if rel_pos is None:
        def per_device(q, k, v):
            return attention_chunked(q, k, v, rel_pos=None, **kwargs)

        tables = ()
    else:
        def per_device(q, k, v, table_h, table_w):  # [B/d, 2H-1, hd], [B/d, 2W-1, hd]: the same table in each row
            return attention_chunked(q, k, v, rel_pos=(table_h[0], table_w[0]), **kwargs)

        tables = tuple(jnp.broadcast_to(t, (q.shape[0], *t.shape)) for t in rel_pos)
    return jax.shard_map(per_device, mesh=mesh, in_specs=rows, out_specs=rows, check_vma=False)(q, k, v, *tables)


def attention(q, k, v, *, plan: ExecutionPlan | None = None, impl: str | None = None, scale: float,
              grid: tuple[int, int], rel_pos, precision=None, platform: str | None = None,
              flash: FlashOptions | None = None) -> jax.Array:
    """Dispatch to the implementation of an :class:`~seggpt_jax.runtime.ExecutionPlan` (the model's), or
    to ``impl`` on ``platform`` (already resolved; tests and benchmarks call one directly). ``q, k, v:
    [B, N, heads, hd]``; returns ``[B, N, heads, hd]``. ``flash`` overrides the kernel options the plan
    gives (blocks, bias mode, interpret mode, GPU backend, partitioning over the mesh in context)."""
    if plan is not None:
        impl, platform = plan.attention, plan.platform
        flash = flash or FlashOptions(interpret=plan.interpret or None, gpu_backend=plan.gpu_backend)
    kwargs = dict(scale=scale, grid=grid, rel_pos=rel_pos, precision=precision)
    if impl == "plain":
        return attention_plain(q, k, v, **kwargs)
    if impl == "chunked":
        tile_rows = None if plan is None else default_tile_rows(*grid, max_queries=plan.tile_queries)
        return chunked_over_mesh(q, k, v, tile_rows=tile_rows, **kwargs)
    if impl == "flash":
        return attention_flash(q, k, v, platform=backend_of(platform), **(flash or FlashOptions()).kwargs(), **kwargs)
    if impl == "widened":
        return attention_widened(q, k, v, implementation="cudnn" if backend_of(platform) == "gpu" else "xla",
                                 **kwargs)
    raise ValueError(f"unknown attention implementation {impl!r}")
