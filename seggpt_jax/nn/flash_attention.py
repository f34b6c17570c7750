"""Fused (flash) attention in Pallas with decomposed relative positions added inside each tile.

Maths (same as :func:`seggpt_jax.nn.attention.attention_plain`): ``q, k, v: [B, N, heads, hd]`` with
``N = H * W`` tokens on an ``H x W`` grid. For a query at ``(qh, qw)`` and a key at ``(kh, kw)``

    logit = scale * q.k + q.R_h[qh - kh + H - 1] + q.R_w[qw - kw + W - 1]

(the relative terms use the *unscaled* query, as SAM / ViTDet / transformers' SegGPT), softmax over
keys in float32, output in ``v``'s dtype.

Decomposition (the idea of segment-anything-fast's fused rel-pos flash kernel, SAM/ViTDet's
decomposed relative positions): the relative terms per query are small, ``rel_h = q . R_h`` gives one
value per key *row* and ``rel_w = q . R_w`` one per key *column*. They are computed outside the kernel
with two einsums and concatenated into ``rel: [B*heads, N, H + W]``. Inside the kernel, for a block of
keys, ``bias[q, key] = rel_h[q, row(key)] + rel_w[q, col(key)] = rel[q, :] . onehot[key, :]`` where
``onehot: [N, H + W]`` marks each key's row and column: one small matmul per tile. Nothing ``N x N``
exists in memory, forward or backward.

Kernel (FlashAttention-2 online softmax, Dao 2023): grid ``(B*heads, N / block_q)``; each program keeps
one query block and loops over key blocks with a running max ``m``, running sum ``l`` and a float32
accumulator; it writes the output and the per-query log-sum-exp ``lse = m + log l``. The backward
pass (``jax.custom_vjp``, residuals ``out`` and ``lse`` named ``flash_out`` / ``flash_lse``; logits are
never saved) is two more Pallas kernels that recompute each tile's logits from ``q, k, rel`` and
``lse``: a dq kernel (grid over query blocks, loop over keys; also produces ``d rel = dS . onehot``,
i.e. the sums of ``dS`` over each key row and column) and a dk/dv kernel (grid over key blocks, loop
over queries). The gradients of ``R_h``, ``R_w`` and the query's relative part flow back through the
einsums outside by ordinary autodiff.

Padding and masking: ``N`` is padded with zeros up to a multiple of every block size. Padded keys get
a logit of ``_MASK_VALUE`` (a large negative finite number, so no ``inf - inf``) before the max; key
blocks that hold only padding are never visited. Padded queries are computed and dropped (their output
cotangent is zero, so they add nothing to the gradients). Padded key rows of ``onehot`` are zero.
The per-query statistics (``lse`` and the backward's ``delta = rowsum(dO * O)``) are stored
``[B*heads, N_pad, 1]``, broadcast over the 128 lanes on TPU as JAX's own TPU kernels keep them.

Block sizes per platform (:meth:`BlockSizes.default`):

* ``"gpu"`` (Triton): every loaded tile must have power-of-two sides and ``tl.dot`` needs sides of at
  least 16, so the head dim and ``H + W`` are zero-padded to a power of two (>= 16; 84 -> 128 for
  ViT-L). Forward 64 x 64 (smaller than the usual 128-row query block because the ``[block_q, 128]``
  relative tile also sits in registers), backward 32 x 32 as JAX's own Triton kernel (the dk/dv kernel
  also keeps two float32 ``[block_k, hd]`` accumulators and the key block's one-hot rows live), 4 warps,
  2 pipeline stages. These are reasoned defaults, not tuned on hardware.
* ``"tpu"`` (Mosaic): blocks of 128 (the lane width: the key axis is the minor axis of every
  ``[block_q, block_k]`` tile, and 128 fills the MXU); ``H + W`` is padded to a multiple of 128 (minor
  axis of the relative tiles and contraction of the bias matmul); the head dim stays as it is (a block
  dim equal to the full array dim is allowed).
* ``"cpu"``: interpret mode (``pallas_call(interpret=True)``: the kernel runs as an XLA loop over the
  grid; slow, for tests only); blocks of 128 so fewer steps are interpreted; no padding of ``hd`` or
  ``H + W``.

Block sizes are clamped to the (power-of-two rounded) sequence length for tiny grids, except on TPU.

This module is longer than our ~450-line rule (about 475 lines, a third of them this docstring and the
kernels' comments): the forward kernel, the two backward kernels and their per-platform launch
settings share the padding, masking and block-size conventions above, and splitting them would put
the maths in one file and the code that must agree with it in another.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.ad_checkpoint import checkpoint_name
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as plgpu

from .ops import relative_tables

PLATFORMS = ("cpu", "gpu", "cuda", "rocm", "tpu")
_MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)  # finite: a fully-masked row never makes NaN
_TRANS_B = (((1,), (1,)), ((), ()))  # dot_general dims for a @ b.T
_TPU_LANES = 128  # minor-axis tile width (and MXU width) on TPU
_TRITON_MIN_DOT = 16  # tl.dot needs every matmul side >= 16
_GPU_FORWARD_BLOCK = 64
_GPU_BACKWARD_BLOCK = 32
_GPU_NUM_WARPS = 4
_GPU_NUM_STAGES = 2
_CPU_BLOCK = 128
#: ``checkpoint_name`` of the residuals the backward pass takes from the forward (a remat policy that
#: saves them spares the backward a rerun of the forward kernel): the output ``[B*heads, N_pad, hd]``
#: and the per-query log-sum-exp ``[B*heads, N_pad, 1]`` float32.
OUT_NAME = "flash_out"
LSE_NAME = "flash_lse"


def _canonical_platform(platform: str | None) -> str:
    platform = (platform or jax.default_backend()).lower()
    if platform not in PLATFORMS:
        raise ValueError(f"platform must be one of {PLATFORMS}, got {platform!r}")
    return "gpu" if platform in ("cuda", "rocm") else platform


def _round_up(x: int, multiple: int) -> int:
    return -(-x // multiple) * multiple


def _next_pow2(x: int) -> int:
    return 1 << max(x - 1, 0).bit_length()


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tile sizes. ``block_q`` / ``block_k``: query and key rows per tile in the forward kernel;
    ``block_q_bwd`` / ``block_k_bwd``: the same for both backward kernels (default: the forward ones).
    ``num_warps`` / ``num_stages`` are Triton's launch knobs (ignored elsewhere).
    The sequence is padded to a multiple of all four block sizes."""

    block_q: int
    block_k: int
    block_q_bwd: int | None = None
    block_k_bwd: int | None = None
    num_warps: int | None = None
    num_stages: int | None = None

    def __post_init__(self):
        for name in ("block_q", "block_k", "block_q_bwd", "block_k_bwd"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ValueError(f"{name} must be positive, got {value}")

    @property
    def backward(self) -> tuple[int, int]:
        """``(block_q, block_k)`` of the backward kernels."""
        return self.block_q_bwd or self.block_q, self.block_k_bwd or self.block_k

    @property
    def alignment(self) -> int:
        """The padded sequence length is a multiple of this."""
        return math.lcm(self.block_q, self.block_k, *self.backward)

    @classmethod
    def default(cls, platform: str | None, seq: int) -> BlockSizes:
        """Default tiles for ``platform`` and sequence length ``seq`` (see the module docstring)."""
        platform = _canonical_platform(platform)
        if platform == "tpu":
            return cls(_TPU_LANES, _TPU_LANES)
        fits = max(_TRITON_MIN_DOT, _next_pow2(seq))
        if platform == "gpu":
            forward, backward = min(_GPU_FORWARD_BLOCK, fits), min(_GPU_BACKWARD_BLOCK, fits)
            return cls(forward, forward, backward, backward, num_warps=_GPU_NUM_WARPS, num_stages=_GPU_NUM_STAGES)
        block = min(_CPU_BLOCK, fits)
        return cls(block, block)


@dataclasses.dataclass(frozen=True)
class _Kernel:
    """Static description of one call (hashable: a ``custom_vjp`` non-differentiable argument)."""

    seq: int  # real N
    padded: int  # N rounded up to blocks.alignment
    grid: tuple[int, int]
    rel_width: int  # padded H + W (0: no relative terms)
    blocks: BlockSizes
    platform: str
    interpret: bool
    precision: Any

    def key_blocks(self, block_k: int) -> int:
        """Key (or query) blocks holding at least one real token; the rest are padding only."""
        return pl.cdiv(self.seq, block_k)

    def masked(self, block_k: int) -> bool:
        return self.seq % block_k != 0

    @property
    def stat_lanes(self) -> int:
        """Minor width of the per-query statistics (lse, delta) in memory: lane-broadcast on TPU, as
        JAX's own TPU kernels keep them; one column elsewhere."""
        return _TPU_LANES if self.platform == "tpu" and not self.interpret else 1

    def compiler_params(self):
        if self.interpret:
            return None
        if self.platform == "gpu":
            return plgpu.CompilerParams(num_warps=self.blocks.num_warps, num_stages=self.blocks.num_stages)
        if self.platform == "tpu":
            return pltpu.CompilerParams(dimension_semantics=("parallel", "parallel"))
        return None

    def key_onehot(self, dtype) -> jax.Array:
        """``[N_pad, R]``: key ``p`` has ones at column ``row(p)`` and ``H + col(p)``; padding is zero."""
        rows, cols = self.grid
        position = jnp.arange(self.padded)[:, None]  # [N_pad, 1]
        column = jnp.arange(self.rel_width)[None, :]  # [1, R]
        hit = (column == position // cols) | (column == rows + position % cols)
        return (hit & (position < self.seq)).astype(dtype)


def _exact_precision(dtype) -> Any:
    """Precision for the one-hot matmuls: they only select, so float32 must not round (Triton's
    default is TF32); a half-precision one-hot product is exact at default precision."""
    return lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else None


def _tile_logits(q, k, rel, onehot, *, k_start, spec: _Kernel, block_k: int) -> jax.Array:
    """``[bq, bk]`` float32 logits of one tile: ``q.k^T + rel . onehot^T``, padded keys masked."""
    s = lax.dot_general(q, k, _TRANS_B, precision=spec.precision, preferred_element_type=jnp.float32)
    if rel is not None:
        s += lax.dot_general(rel, onehot, _TRANS_B, precision=_exact_precision(rel.dtype),
                             preferred_element_type=jnp.float32)
    if spec.masked(block_k):
        key = k_start + lax.broadcasted_iota(jnp.int32, s.shape, 1)
        s = jnp.where(key < spec.seq, s, _MASK_VALUE)
    return s


def _column(stat: jax.Array) -> jax.Array:
    """``[bq, 1]`` from a per-query statistic block stored ``[bq, stat_lanes]``."""
    return stat if stat.shape[-1] == 1 else stat[:, :1]


def _split_refs(refs, spec: _Kernel, n_before: int):
    """``(first n_before refs, rel_ref, onehot_ref, rest)``; the rel refs are ``None`` without rel_pos."""
    head, tail = list(refs[:n_before]), refs[n_before:]
    if spec.rel_width:
        return head, tail[0], tail[1], tail[2:]
    return head, None, None, tail


# ------------------------------------------------------------------------------------------ forward
def _forward_kernel(*refs, spec: _Kernel):
    (q_ref, k_ref, v_ref), rel_ref, onehot_ref, (o_ref, lse_ref) = _split_refs(refs, spec, 3)
    block_q, block_k = spec.blocks.block_q, spec.blocks.block_k
    q = q_ref[...]  # [bq, hd]
    rel = None if rel_ref is None else rel_ref[...]  # [bq, R]

    def body(j, carry):
        acc, m, l = carry  # [bq, hd], [bq, 1], [bq, 1]
        start = pl.multiple_of(j * block_k, block_k)
        keys = pl.ds(start, block_k)
        onehot = None if onehot_ref is None else onehot_ref[keys, :]  # [bk, R]
        s = _tile_logits(q, k_ref[keys, :], rel, onehot, k_start=start, spec=spec, block_k=block_k)
        m_next = jnp.maximum(m, jnp.max(s, axis=1, keepdims=True))
        p = jnp.exp(s - m_next)  # [bq, bk]
        alpha = jnp.exp(m - m_next)
        l_next = alpha * l + jnp.sum(p, axis=1, keepdims=True)
        v = v_ref[keys, :]  # [bk, hd]
        pv = lax.dot(p.astype(v.dtype), v, precision=spec.precision, preferred_element_type=jnp.float32)
        return alpha * acc + pv, m_next, l_next

    init = (jnp.zeros((block_q, q.shape[-1]), jnp.float32),
            jnp.full((block_q, 1), -jnp.inf, jnp.float32),
            jnp.zeros((block_q, 1), jnp.float32))
    acc, m, l = lax.fori_loop(0, spec.key_blocks(block_k), body, init)
    o_ref[...] = (acc / l).astype(o_ref.dtype)
    lse_ref[...] = jnp.broadcast_to(m + jnp.log(l), lse_ref.shape)


def _forward(qs, k, v, rel, spec: _Kernel):
    """``qs, k, v: [BH, N_pad, hd]`` (``qs`` already scaled), ``rel: [BH, N_pad, R] | None`` ->
    ``(out [BH, N_pad, hd], lse [BH, N_pad, stat_lanes])``."""
    bh, padded, dim = qs.shape
    block_q = spec.blocks.block_q
    q_block = pl.BlockSpec((None, block_q, dim), lambda b, i: (b, i, 0))
    whole_seq = pl.BlockSpec((None, padded, dim), lambda b, i: (b, 0, 0))
    in_specs, args = [q_block, whole_seq, whole_seq], [qs, k, v]
    if rel is not None:
        in_specs += [pl.BlockSpec((None, block_q, spec.rel_width), lambda b, i: (b, i, 0)),
                     pl.BlockSpec((padded, spec.rel_width), lambda b, i: (0, 0))]
        args += [rel, spec.key_onehot(rel.dtype)]
    return pl.pallas_call(
        functools.partial(_forward_kernel, spec=spec),
        grid=(bh, padded // block_q),
        in_specs=in_specs,
        out_specs=[q_block, pl.BlockSpec((None, block_q, spec.stat_lanes), lambda b, i: (b, i, 0))],
        out_shape=[jax.ShapeDtypeStruct(qs.shape, v.dtype),
                   jax.ShapeDtypeStruct((bh, padded, spec.stat_lanes), jnp.float32)],
        compiler_params=spec.compiler_params(),
        interpret=spec.interpret,
        name="flash_relpos_fwd",
    )(*args)


# ----------------------------------------------------------------------------------------- backward
def _dq_kernel(*refs, spec: _Kernel):
    (q_ref, k_ref, v_ref), rel_ref, onehot_ref, rest = _split_refs(refs, spec, 3)
    lse_ref, delta_ref, do_ref, dq_ref, *drel_ref = rest
    block_q, block_k = spec.blocks.backward
    q, do = q_ref[...], do_ref[...]  # [bq, hd]
    lse, delta = _column(lse_ref[...]), _column(delta_ref[...])  # [bq, 1]
    rel = None if rel_ref is None else rel_ref[...]  # [bq, R]

    def body(j, carry):
        dq, drel = carry
        start = pl.multiple_of(j * block_k, block_k)
        keys = pl.ds(start, block_k)
        k, v = k_ref[keys, :], v_ref[keys, :]  # [bk, hd]
        onehot = None if onehot_ref is None else onehot_ref[keys, :]  # [bk, R]
        p = jnp.exp(_tile_logits(q, k, rel, onehot, k_start=start, spec=spec, block_k=block_k) - lse)
        dp = lax.dot_general(do, v, _TRANS_B, precision=spec.precision, preferred_element_type=jnp.float32)
        ds = p * (dp - delta)  # [bq, bk]
        dq += lax.dot(ds.astype(k.dtype), k, precision=spec.precision, preferred_element_type=jnp.float32)
        if rel is not None:
            drel += lax.dot(ds.astype(onehot.dtype), onehot, precision=_exact_precision(onehot.dtype),
                            preferred_element_type=jnp.float32)
        return dq, drel

    init = (jnp.zeros(q.shape, jnp.float32), None if rel is None else jnp.zeros(rel.shape, jnp.float32))
    dq, drel = lax.fori_loop(0, spec.key_blocks(block_k), body, init)
    dq_ref[...] = dq.astype(dq_ref.dtype)
    if rel is not None:
        drel_ref[0][...] = drel.astype(drel_ref[0].dtype)


def _dkv_kernel(*refs, spec: _Kernel):
    (q_ref, k_ref, v_ref), rel_ref, onehot_ref, rest = _split_refs(refs, spec, 3)
    lse_ref, delta_ref, do_ref, dk_ref, dv_ref = rest
    block_q, block_k = spec.blocks.backward
    k, v = k_ref[...], v_ref[...]  # [bk, hd]
    onehot = None if onehot_ref is None else onehot_ref[...]  # [bk, R]
    k_start = pl.program_id(1) * block_k

    def body(i, carry):
        dk, dv = carry  # [bk, hd] float32
        queries = pl.ds(pl.multiple_of(i * block_q, block_q), block_q)
        q, do = q_ref[queries, :], do_ref[queries, :]  # [bq, hd]
        rel = None if rel_ref is None else rel_ref[queries, :]  # [bq, R]
        s = _tile_logits(q, k, rel, onehot, k_start=k_start, spec=spec, block_k=block_k)
        p = jnp.exp(s - _column(lse_ref[queries, :]))  # [bq, bk]
        dv += lax.dot(p.T.astype(do.dtype), do, precision=spec.precision, preferred_element_type=jnp.float32)
        dp = lax.dot_general(do, v, _TRANS_B, precision=spec.precision, preferred_element_type=jnp.float32)
        ds = p * (dp - _column(delta_ref[queries, :]))
        dk += lax.dot(ds.T.astype(q.dtype), q, precision=spec.precision, preferred_element_type=jnp.float32)
        return dk, dv

    init = (jnp.zeros(k.shape, jnp.float32), jnp.zeros(v.shape, jnp.float32))
    dk, dv = lax.fori_loop(0, spec.key_blocks(block_q), body, init)
    dk_ref[...] = dk.astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def _backward_calls(qs, k, v, rel, lse, delta, d_out, spec: _Kernel):
    """``(d qs, d k, d v, d rel)`` from two Pallas kernels; shapes as in :func:`_forward`."""
    bh, padded, dim = qs.shape
    block_q, block_k = spec.blocks.backward
    width = spec.rel_width
    onehot = None if rel is None else spec.key_onehot(rel.dtype)

    def seq_spec(block: int, size: int, tiled: bool) -> pl.BlockSpec:
        """``[block, size]`` rows at grid index ``i`` when ``tiled``, else the whole ``[N_pad, size]``."""
        if tiled:
            return pl.BlockSpec((None, block, size), lambda b, i: (b, i, 0))
        return pl.BlockSpec((None, padded, size), lambda b, i: (b, 0, 0))

    def call(kernel, queries_tiled: bool, out_shape, name):
        """Grid over query blocks (dq kernel, ``queries_tiled``) or over key blocks (dk/dv kernel)."""
        keys_tiled = not queries_tiled
        in_specs = [seq_spec(block_q, dim, queries_tiled), seq_spec(block_k, dim, keys_tiled),
                    seq_spec(block_k, dim, keys_tiled)]
        args = [qs, k, v]
        if rel is not None:
            onehot_spec = (pl.BlockSpec((block_k, width), lambda b, i: (i, 0)) if keys_tiled
                           else pl.BlockSpec((padded, width), lambda b, i: (0, 0)))
            in_specs += [seq_spec(block_q, width, queries_tiled), onehot_spec]
            args += [rel, onehot]
        stat = seq_spec(block_q, spec.stat_lanes, queries_tiled)
        in_specs += [stat, stat, seq_spec(block_q, dim, queries_tiled)]
        args += [lse, delta, d_out]
        out_block = block_q if queries_tiled else block_k
        return pl.pallas_call(
            functools.partial(kernel, spec=spec),
            grid=(bh, padded // out_block),
            in_specs=in_specs,
            out_specs=[seq_spec(out_block, o.shape[-1], True) for o in out_shape],
            out_shape=out_shape,
            compiler_params=spec.compiler_params(),
            interpret=spec.interpret,
            name=name,
        )(*args)

    dq_out = [jax.ShapeDtypeStruct(qs.shape, qs.dtype)]
    if rel is not None:
        dq_out.append(jax.ShapeDtypeStruct(rel.shape, rel.dtype))
    dq_and_drel = call(_dq_kernel, True, dq_out, "flash_relpos_dq")  # [BH, N_pad, hd], [BH, N_pad, R]
    dk, dv = call(_dkv_kernel, False, [jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
                  "flash_relpos_dkv")
    drel = dq_and_drel[1] if rel is not None else None
    return dq_and_drel[0], dk, dv, drel


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _flash(qs, k, v, rel, spec: _Kernel):
    return _forward(qs, k, v, rel, spec)[0]


def _flash_fwd(qs, k, v, rel, spec: _Kernel):
    out, lse = _forward(qs, k, v, rel, spec)
    out, lse = checkpoint_name(out, OUT_NAME), checkpoint_name(lse[..., :1], LSE_NAME)  # lse: [BH, N_pad, 1]
    return out, (qs, k, v, rel, out, lse)


def _flash_bwd(spec: _Kernel, residuals, d_out):
    qs, k, v, rel, out, lse = residuals
    delta = jnp.sum(out.astype(jnp.float32) * d_out.astype(jnp.float32), axis=-1, keepdims=True)  # [BH, N_pad, 1]
    lanes = lambda stat: jnp.broadcast_to(stat, (*stat.shape[:-1], spec.stat_lanes))  # noqa: E731
    return _backward_calls(qs, k, v, rel, lanes(lse), lanes(delta), d_out.astype(out.dtype), spec)


_flash.defvjp(_flash_fwd, _flash_bwd)


# ------------------------------------------------------------------------------------- public API
def _relative_terms(q_heads, grid, rel_pos, precision) -> jax.Array:
    """``[BH, N, H + W]``: ``q . R_h`` per key row, then ``q . R_w`` per key column (unscaled ``q``)."""
    bh, seq, dim = q_heads.shape
    rows, cols = grid
    table_h, table_w = relative_tables(*rel_pos, grid)  # [H, H, hd], [W, W, hd]
    q_grid = q_heads.reshape(bh, rows, cols, dim)
    rel_h = jnp.einsum("bhwc,hkc->bhwk", q_grid, table_h.astype(q_heads.dtype), precision=precision)  # [BH, H, W, H]
    rel_w = jnp.einsum("bhwc,wkc->bhwk", q_grid, table_w.astype(q_heads.dtype), precision=precision)  # [BH, H, W, W]
    return jnp.concatenate([rel_h.reshape(bh, seq, rows), rel_w.reshape(bh, seq, cols)], axis=-1)


def _padded_widths(platform: str, dim: int, rel_width: int) -> tuple[int, int]:
    """``(head dim, H + W)`` after the platform's padding (module docstring)."""
    if platform == "gpu":
        return max(_TRITON_MIN_DOT, _next_pow2(dim)), rel_width and max(_TRITON_MIN_DOT, _next_pow2(rel_width))
    if platform == "tpu":
        return dim, rel_width and _round_up(rel_width, _TPU_LANES)
    return dim, rel_width


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
) -> jax.Array:
    """Fused attention. ``q, k, v: [B, N, heads, hd]``, ``N = H * W``; returns ``[B, N, heads, hd]``.

    ``platform``: ``"gpu"``/``"cuda"`` (Triton), ``"tpu"`` (Mosaic) or ``"cpu"``; default
    ``jax.default_backend()``. It is static: a Pallas call cannot sit in ``lax.platform_dependent``.
    ``interpret=None`` interprets exactly when the platform is CPU. ``block_sizes`` default:
    :meth:`BlockSizes.default`. Differentiable w.r.t. ``q, k, v`` and both relative tables.
    """
    batch, seq, heads, dim = q.shape
    rows, cols = grid
    if rows * cols != seq:
        raise ValueError(f"grid {grid} has {rows * cols} cells but q has {seq} tokens")
    if k.shape != q.shape or v.shape != q.shape:
        raise ValueError(f"q, k, v must share one shape, got {q.shape}, {k.shape}, {v.shape}")
    platform = _canonical_platform(platform)
    interpret = platform == "cpu" if interpret is None else interpret
    blocks = block_sizes or BlockSizes.default(platform, seq)
    padded_dim, rel_width = _padded_widths(platform, dim, 0 if rel_pos is None else rows + cols)
    padded = _round_up(seq, blocks.alignment)
    spec = _Kernel(seq=seq, padded=padded, grid=(rows, cols), rel_width=rel_width, blocks=blocks,
                   platform=platform, interpret=interpret, precision=precision)

    bh = batch * heads
    per_head = lambda t: t.transpose(0, 2, 1, 3).reshape(bh, seq, dim)  # noqa: E731  [BH, N, hd]
    pad = lambda t, width: jnp.pad(t, ((0, 0), (0, padded - seq), (0, width - t.shape[-1])))  # noqa: E731
    q_heads = per_head(q)
    rel = None
    if rel_pos is not None:
        rel = pad(_relative_terms(q_heads, grid, rel_pos, precision), rel_width)  # [BH, N_pad, R]
    qs = pad(q_heads * jnp.asarray(scale, q.dtype), padded_dim)  # [BH, N_pad, hd_pad]
    out = _flash(qs, pad(per_head(k), padded_dim), pad(per_head(v), padded_dim), rel, spec)
    return out[:, :seq, :dim].reshape(batch, heads, seq, dim).transpose(0, 2, 1, 3)
