"""Fused (flash) attention in Pallas with decomposed relative positions added inside each tile.

Maths (same as :func:`seggpt_jax.nn.attention.attention_plain`): ``q, k, v: [B, N, heads, hd]`` with
``N = H * W`` tokens on an ``H x W`` grid. For a query at ``(qh, qw)`` and a key at ``(kh, kw)``

    logit = scale * q.k + q.R_h[qh - kh + H - 1] + q.R_w[qw - kw + W - 1]

(the relative terms use the *unscaled* query, as SAM / ViTDet / transformers' SegGPT), softmax over
keys in float32, output in ``v``'s dtype.

Decomposition (SAM/ViTDet's decomposed relative positions; the fused form is segment-anything-fast's
idea for SAM): ``rel_h = q . R_h`` gives one value per query and key *row*, ``rel_w = q . R_w`` one per
query and key *column*. Both are computed outside the kernels with two einsums; inside, each tile adds
``rel_h[q, row(key)] + rel_w[q, col(key)]``. Nothing ``N x N`` exists in memory, forward or backward.
How a tile gets its bias is the ``bias`` mode:

* ``"rows"`` (GPU default): keys are laid out by grid row, each row padded to a power of two ``W_p``
  (28 -> 32 for ViT-L), and key blocks hold whole rows. The width term of every key block is then the
  same ``[block_q, block_k]`` tile (``rel_w`` padded and tiled ``block_k / W_p`` times, loaded once per
  query block) and the height term is one ``[block_q, 1]`` column of ``rel_h`` per row, broadcast over
  the row's keys. No matmul, exact in every dtype. Padded keys carry ``-0.35 * f32max`` in each term,
  which masks them. The backward gets ``d rel_w`` as ``dS`` summed over key blocks and ``d rel_h`` as
  the row sums of ``dS``.
* ``"onehot"`` (TPU and CPU default): ``bias = rel . onehot^T`` with ``rel = [rel_h, rel_w]``
  (``[N, H + W]``) and ``onehot [block_k, H + W]`` marking each key's row and column, built in-kernel
  from an iota; one small matmul per tile, at ``HIGHEST`` precision in float32 (it must not round).

**float32 on GPU** takes ``"rows"``: the one-hot product at ``HIGHEST`` precision is an IEEE float32
dot, which Triton runs on FMA units, not tensor cores (255 registers and spills on sm_90a); TF32 would
round the relative terms (10-bit mantissa: ~1e-3 error in the logits, over the 1e-4 parity bound) and
TF32x3 needs more shared memory than an H100 has. ``"rows"`` has no bias matmul at all, so the kernels
keep only ``q.k`` and ``p.v``, which follow the model's ``precision`` as XLA's own dots do (``None``:
TF32 on tensor cores; ``"highest"``: IEEE float32, for parity runs). It costs 14% more key positions
(1792 instead of 1600 for ViT-L) and saves the one-hot product, twice the work of ``q.k`` (128-wide
instead of 64), in bfloat16 too. TPU keeps ``"onehot"``: a dynamic one-column load per key row is not a
Mosaic layout, and the MXU product of a 128-wide one-hot is cheap there.

Kernel (FlashAttention-2 online softmax, Dao 2023; :mod:`seggpt_jax.nn.flash_kernels`): grid
``(B, heads, N / block_q)``; each program keeps one query block and loops over key blocks with a
running max, running sum and a float32 accumulator; it writes the output and the per-query
log-sum-exp. The backward pass (``jax.custom_vjp``, residuals named ``flash_out`` / ``flash_lse``) is a
dq kernel (grid over query blocks; also the relative terms' gradients) and a dk/dv kernel (grid over
key blocks). Padded queries are computed and dropped; padded keys are masked before the max.

**Partitioning.** XLA does not partition a ``pallas_call``: with a sharded batch it would all-gather the
operands and run every kernel on the global batch on each device. Every operand has leading
``[B, heads]`` dimensions, so each kernel call is wrapped in ``shard_map`` over the mesh in context
(``jax.sharding.get_abstract_mesh()``, e.g. under ``jax.set_mesh(mesh)``, or the ``mesh`` argument):
batch over :attr:`Partitioning.batch` axes, heads over :attr:`Partitioning.heads` axes, each axis used
only when it divides the dimension. Every (batch, head) is independent, so this is exact.

**Pallas GPU backend: Triton, explicitly** (``GPU_BACKENDS``; every GPU call passes Triton's
``CompilerParams``, so ``jax_pallas_use_mosaic_gpu`` cannot switch it). Mosaic GPU runs on sm_90+
only (no A100), JAX deprecates ``pallas_call`` for it in favour of ``plgpu.kernel`` with explicit
warpgroup/TMA programming, and this kernel's generic tile code is what Triton compiles for sm_80 and
sm_90a (wgmma there), measured by ``python -m benchmarks.kernel_resources``.

Block sizes (:meth:`BlockSizes.default`): GPU 64 x 64 tiles forward and backward (64 rows: the least
wgmma takes on sm_90a), 4 warps, 2 stages; ``hd`` and the bias widths zero-padded to powers of two
(Triton tiles). TPU blocks of 128 (lanes), the bias width padded to a multiple of 128, the per-query
statistics stored lane-broadcast ``[block, 128]`` and the accumulators in VMEM scratch. CPU
(interpret mode, tests only): blocks of 128, no padding of widths. Tiny grids clamp the blocks.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name
from jax.sharding import PartitionSpec as P

from ..runtime import DATA_AXIS, FLASH_LSE_NAME, FLASH_OUT_NAME, MODEL_AXIS, backend_of
from . import flash_kernels as kernels
from .flash_kernels import HALF_MASK, TPU_LANES, TRITON_MIN_DOT, BlockSizes, KernelSpec
from .ops import relative_tables

__all__ = ["BIAS_MODES", "GPU_BACKENDS", "BlockSizes", "FlashOptions", "Partitioning", "attention_flash", "default_bias"]

BIAS_MODES = ("rows", "onehot")
#: Pallas GPU backends this kernel is written for (module docstring: why not Mosaic GPU).
GPU_BACKENDS = ("triton",)
_MAX_ROW_WIDTH = 128  # "rows" is the GPU default while a padded grid row fits one 128-key block
#: ``checkpoint_name`` of the residuals the backward pass takes from the forward: the output
#: ``[B, heads, N_pad, hd]`` and the per-query log-sum-exp ``[B, heads, N_pad, 1]`` float32.
OUT_NAME, LSE_NAME = FLASH_OUT_NAME, FLASH_LSE_NAME  # runtime owns the names


@dataclasses.dataclass(frozen=True)
class Partitioning:
    """Mesh axes to split the kernels over: ``batch`` axes split the batch, ``heads`` axes the heads
    (the product's meshes: ``("data", "model")``). Axes missing from the mesh, of size 1, already
    manual (inside the caller's own ``shard_map``) or not dividing the dimension are left out."""

    batch: tuple[str, ...] = (DATA_AXIS,)
    heads: tuple[str, ...] = (MODEL_AXIS,)


@dataclasses.dataclass(frozen=True)
class FlashOptions:
    """The kernel's execution choices, for an execution plan to hold as static data: each field is the
    :func:`attention_flash` argument of the same name, with the same default."""

    block_sizes: BlockSizes | None = None
    bias: str | None = None
    interpret: bool | None = None
    gpu_backend: str = "triton"
    mesh: Any = None
    partitioning: Partitioning | None = Partitioning()

    def kwargs(self) -> dict[str, Any]:
        return {field.name: getattr(self, field.name) for field in dataclasses.fields(self)}


def _round_up(x: int, multiple: int) -> int:
    return -(-x // multiple) * multiple


def _next_pow2(x: int) -> int:
    return 1 << max(x - 1, 0).bit_length()


def default_bias(platform: str | None, grid: tuple[int, int]) -> str:
    """The ``bias`` mode ``None`` means: ``"rows"`` on GPU while a grid row padded to a power of two
    fits one 128-key block, ``"onehot"`` otherwise and on TPU and CPU (module docstring)."""
    return "rows" if backend_of(platform) == "gpu" and _next_pow2(grid[1]) <= _MAX_ROW_WIDTH else "onehot"


# ------------------------------------------------------------------------------------ partitioning
@dataclasses.dataclass(frozen=True)
class _Split:
    mesh: object  # Mesh | AbstractMesh (hashable)
    batch: tuple[str, ...]
    heads: tuple[str, ...]

    def wrap(self, fn):
        spec = P(self.batch or None, self.heads or None)
        return jax.shard_map(fn, mesh=self.mesh, in_specs=spec, out_specs=spec, check_vma=False)


def _axes(mesh, names: tuple[str, ...], size: int) -> tuple[str, ...]:
    """The usable axes among ``names`` whose sizes multiply to a divisor of ``size``."""
    manual = set(getattr(mesh, "manual_axes", ()))
    chosen, product = [], 1
    for name in names:
        if name in mesh.shape and name not in manual and mesh.shape[name] > 1 and size % (product * mesh.shape[name]) == 0:
            chosen.append(name)
            product *= mesh.shape[name]
    return tuple(chosen)


def _split(mesh, partitioning: Partitioning | None, batch: int, heads: int) -> _Split | None:
    if partitioning is None:
        return None
    mesh = jax.sharding.get_abstract_mesh() if mesh is None else mesh
    if mesh is None or mesh.empty:
        return None
    split = _Split(mesh, _axes(mesh, partitioning.batch, batch), _axes(mesh, partitioning.heads, heads))
    return split if split.batch or split.heads else None


def _partitioned(fn, split: _Split | None):
    return fn if split is None else split.wrap(fn)


# ---------------------------------------------------------------------------------- custom_vjp
@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _flash(qs, k, v, terms, spec: KernelSpec, split: _Split | None):
    return _partitioned(functools.partial(kernels.forward, spec=spec), split)(qs, k, v, terms)[0]


def _flash_fwd(qs, k, v, terms, spec: KernelSpec, split: _Split | None):
    out, lse = _partitioned(functools.partial(kernels.forward, spec=spec), split)(qs, k, v, terms)
    out, lse = checkpoint_name(out, OUT_NAME), checkpoint_name(lse[..., :1], LSE_NAME)  # lse: [B, h, N_pad, 1]
    return out, (qs, k, v, terms, out, lse)


def _flash_bwd(spec: KernelSpec, split: _Split | None, residuals, d_out):
    qs, k, v, terms, out, lse = residuals
    delta = jnp.sum(out.astype(jnp.float32) * d_out.astype(jnp.float32), axis=-1, keepdims=True)  # [B, h, N_pad, 1]
    lanes = lambda stat: jnp.broadcast_to(stat, (*stat.shape[:-1], spec.stat_lanes))  # noqa: E731
    backward = _partitioned(lambda *a: kernels.backward(*a, spec=spec), split)
    return backward(qs, k, v, terms, lanes(lse), lanes(delta), d_out.astype(out.dtype))


_flash.defvjp(_flash_fwd, _flash_bwd)


# ------------------------------------------------------------------------------------- layouts
def _relative_terms(q_heads, grid, rel_pos, precision) -> tuple[jax.Array, jax.Array]:
    """``rel_h [B, h, N, H]`` (``q . R_h`` per key row) and ``rel_w [B, h, N, W]`` (per key column),
    from the unscaled ``q_heads [B, h, N, hd]``."""
    batch, heads, seq, dim = q_heads.shape
    rows, cols = grid
    table_h, table_w = relative_tables(*rel_pos, grid)  # [H, H, hd], [W, W, hd]
    q_grid = q_heads.reshape(batch, heads, rows, cols, dim)
    rel_h = jnp.einsum("bnhwc,hkc->bnhwk", q_grid, table_h.astype(q_heads.dtype), precision=precision)
    rel_w = jnp.einsum("bnhwc,wkc->bnhwk", q_grid, table_w.astype(q_heads.dtype), precision=precision)
    return rel_h.reshape(batch, heads, seq, rows), rel_w.reshape(batch, heads, seq, cols)


def _pad(x: jax.Array, length: int | None = None, width: int | None = None, value=0.0) -> jax.Array:
    """Pad ``[B, h, n, c]`` to ``[B, h, length, width]`` at the end."""
    n, c = x.shape[-2:]
    return jnp.pad(x, ((0, 0), (0, 0), (0, (length or n) - n), (0, (width or c) - c)), constant_values=value)


def _widths(platform: str, dim: int, bias: str | None, grid, blocks: BlockSizes, k_len: int, row_width: int):
    """``(padded hd, rel_width, tile_width)`` for the platform's tiles (module docstring)."""
    rows, cols = grid
    gpu = platform == "gpu"
    fit = (lambda n: max(TRITON_MIN_DOT, _next_pow2(n))) if gpu else (lambda n: n)  # noqa: E731
    if bias == "rows":
        return fit(dim), (_next_pow2 if gpu else int)(k_len // row_width), max(blocks.block_k, blocks.backward[1])
    if bias == "onehot":
        width = _round_up(rows + cols, TPU_LANES) if platform == "tpu" else fit(rows + cols)
        return fit(dim), width, 0
    return fit(dim), 0, 0


def attention_flash(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    scale: float,
    grid: tuple[int, int],
    rel_pos: tuple[jax.Array, jax.Array] | None,
    precision=None,
    platform: str | None = None,
    block_sizes: BlockSizes | None = None,
    interpret: bool | None = None,
    bias: str | None = None,
    gpu_backend: str = "triton",
    mesh=None,
    partitioning: Partitioning | None = Partitioning(),
) -> jax.Array:
    """Fused attention. ``q, k, v: [B, N, heads, hd]``, ``N = H * W``; returns ``[B, N, heads, hd]``.
    Differentiable w.r.t. ``q, k, v`` and both relative tables. Every choice below is static.

    * ``platform``: ``"gpu"``/``"cuda"`` (Triton), ``"tpu"`` (Mosaic) or ``"cpu"``; default
      ``jax.default_backend()`` (a Pallas call cannot sit in ``lax.platform_dependent``).
    * ``interpret``: ``None`` interprets exactly when the platform is CPU; ``True`` runs the chosen
      platform's layout through the Pallas interpreter (tests).
    * ``block_sizes``: default :meth:`BlockSizes.default`.
    * ``bias``: ``"rows"`` or ``"onehot"``; ``None``: :func:`default_bias` (``"rows"`` on GPU, which is
      also the float32 strategy there; module docstring).
    * ``gpu_backend``: the Pallas GPU backend, one of ``GPU_BACKENDS`` (``"triton"``).
    * ``mesh`` / ``partitioning``: each kernel call runs under ``shard_map`` over ``mesh`` (default: the
      abstract mesh in context, if any), batch and heads split as ``partitioning`` says; ``None``
      turns partitioning off (every device then runs the kernels on the whole batch).
    """
    batch, seq, heads, dim = q.shape
    rows, cols = grid
    if rows * cols != seq:
        raise ValueError(f"grid {grid} has {rows * cols} cells but q has {seq} tokens")
    if k.shape != q.shape or v.shape != q.shape:
        raise ValueError(f"q, k, v must share one shape, got {q.shape}, {k.shape}, {v.shape}")
    if gpu_backend not in GPU_BACKENDS:
        raise ValueError(f"gpu_backend must be one of {GPU_BACKENDS}, got {gpu_backend!r}")
    platform = backend_of(platform)
    interpret = platform == "cpu" if interpret is None else interpret
    bias = default_bias(platform, grid) if bias is None else bias
    if bias not in BIAS_MODES:
        raise ValueError(f"bias must be one of {BIAS_MODES} or None, got {bias!r}")
    if bias == "rows" and platform == "tpu":
        raise ValueError("bias='rows' loads one column per key row, which Mosaic (TPU) cannot lay out; use 'onehot'")
    mode = None if rel_pos is None else bias
    row_width = _next_pow2(cols) if mode == "rows" else 1
    blocks = block_sizes or BlockSizes.default(platform, seq, row_width)
    if mode == "rows" and (blocks.block_k % row_width or blocks.backward[1] % row_width):
        raise ValueError(f"bias='rows' needs key blocks that hold whole grid rows of {row_width} keys "
                         f"(the width {cols} padded to a power of two), got {blocks}")
    key_extent = rows * row_width if mode == "rows" else seq
    q_len, k_len = _round_up(seq, blocks.query_alignment), _round_up(key_extent, blocks.key_alignment)
    padded_dim, rel_width, tile_width = _widths(platform, dim, mode, grid, blocks, k_len, row_width)
    spec = KernelSpec(seq=seq, grid=(rows, cols), q_len=q_len, k_len=k_len, bias=mode, row_width=row_width,
                      rel_width=rel_width, tile_width=tile_width, blocks=blocks, platform=platform,
                      interpret=interpret, precision=precision)

    per_head = lambda t: t.transpose(0, 2, 1, 3)  # noqa: E731  [B, h, N, hd]
    q_heads = per_head(q)
    terms: tuple = ()
    if mode is not None:
        rel_h, rel_w = _relative_terms(q_heads, grid, rel_pos, precision)
        if mode == "onehot":
            terms = (_pad(jnp.concatenate([rel_h, rel_w], axis=-1), q_len, rel_width),)
        else:  # padded rows and columns carry half the mask each
            rel_w = _pad(rel_w, width=row_width, value=HALF_MASK)
            rel_w = jnp.tile(rel_w, (1, 1, 1, tile_width // row_width))  # [B, h, N, tile_width]
            terms = (_pad(_pad(rel_h, width=rel_width, value=HALF_MASK), q_len), _pad(rel_w, q_len))

    def keys_layout(t: jax.Array) -> jax.Array:  # [B, h, k_len, hd_pad]
        if mode == "rows":
            t = t.reshape(batch, heads, rows, cols, dim)
            t = jnp.pad(t, ((0, 0), (0, 0), (0, 0), (0, row_width - cols), (0, 0)))
            t = t.reshape(batch, heads, rows * row_width, dim)
        return _pad(t, k_len, padded_dim)

    qs = _pad(q_heads * jnp.asarray(scale, q.dtype), q_len, padded_dim)
    split = _split(mesh, partitioning, batch, heads)
    out = _flash(qs, keys_layout(per_head(k)), keys_layout(per_head(v)), terms, spec, split)
    return per_head(out[:, :, :seq, :dim])
