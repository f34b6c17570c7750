"""The three Pallas kernels of :mod:`seggpt_jax.nn.flash_attention` (forward, dq, dk/dv) and their launches.

Every operand has two leading dimensions ``[B, heads]`` that the grid walks (``grid = (B, heads, blocks)``),
so a caller can split them over devices with ``shard_map`` and each kernel call sees only its own share.
The maths, the layouts and the two relative-bias modes are described in
:mod:`seggpt_jax.nn.flash_attention`; this module holds what must agree with them tile by tile.

Habits taken from JAX's own Pallas kernels, for Mosaic (TPU) where it has rules:

* the running statistics and accumulators live in VMEM scratch refs on TPU (loop carries elsewhere:
  Triton has no scratch refs and keeps them in registers), through one helper, :func:`_loop`;
* per-query statistics are stored lane-broadcast on TPU (``[block, 128]``) and widened to a tile with
  :func:`_lanes` (a repeat, or a prefix slice of width >= the head dim), never sliced to one lane;
* no 2-D transposes: ``p^T dO`` and ``dS^T q`` are ``dot_general`` contracting the query dimension;
* the one-hot tile of the ``"onehot"`` bias mode is built in-kernel from an iota, not loaded.
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
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as pltriton

MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)  # finite: a fully-masked row never makes NaN
#: Padding keys of the ``"rows"`` mode carry half the mask in each relative term, so that a key in a
#: padded row *and* column still sums to a finite logit.
HALF_MASK = 0.5 * MASK_VALUE
TPU_LANES = 128  # minor-axis tile width (and MXU width) on TPU
TRITON_MIN_DOT = 16  # tl.dot needs every matmul side >= 16
#: GPU (Triton) defaults, chosen with ``python -m benchmarks.kernel_resources`` (benchmarks/RESULTS.md):
#: 64 x 64 forward tiles; backward 64 query rows (the M of dq's products: the least wgmma takes, one
#: warpgroup of 4 warps) by 32 keys (64 x 64 spills in float32: dq on sm_80, dk/dv on sm_90a).
GPU_FORWARD_BLOCK = 64
GPU_BACKWARD_BLOCK_Q = 64
GPU_BACKWARD_BLOCK_K = 32
GPU_NUM_WARPS = 4
GPU_NUM_STAGES = 2
CPU_BLOCK = 128  # interpret mode: fewer, larger steps
_TRANS_B = (((1,), (1,)), ((), ()))  # a @ b.T
_TRANS_A = (((0,), (0,)), ((), ()))  # a.T @ b, without materialising a transpose


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tile sizes. ``block_q`` / ``block_k``: query and key rows per tile in the forward kernel;
    ``block_q_bwd`` / ``block_k_bwd``: the same for both backward kernels (default: the forward ones).
    ``num_warps`` / ``num_stages`` are Triton's launch knobs (ignored elsewhere).
    Queries are padded to a multiple of both query blocks, keys to a multiple of both key blocks."""

    block_q: int
    block_k: int
    block_q_bwd: int | None = None
    block_k_bwd: int | None = None
    num_warps: int | None = None
    num_stages: int | None = None

    def __post_init__(self):
        for name in ("block_q", "block_k", "block_q_bwd", "block_k_bwd", "num_warps", "num_stages"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ValueError(f"{name} must be positive, got {value}")

    @property
    def backward(self) -> tuple[int, int]:
        """``(block_q, block_k)`` of the backward kernels."""
        return self.block_q_bwd or self.block_q, self.block_k_bwd or self.block_k

    @classmethod
    def default(cls, platform: str, seq: int, row_width: int = 1) -> BlockSizes:
        """Default tiles for ``platform`` (``"cpu"``, ``"gpu"``/``"cuda"``, ``"tpu"``) and ``seq`` tokens;
        key blocks are raised to ``row_width`` (the ``"rows"`` mode's padded grid row) where smaller.
        See :mod:`seggpt_jax.nn.flash_attention` for the reasons."""
        platform = "gpu" if platform in ("cuda", "rocm") else platform
        if platform == "tpu":
            return cls(TPU_LANES, max(TPU_LANES, row_width))
        fits = max(TRITON_MIN_DOT, 1 << max(seq - 1, 0).bit_length())  # tiny grids: no 128-row blocks
        if platform == "gpu":
            forward = min(GPU_FORWARD_BLOCK, fits)
            return cls(forward, max(forward, row_width), min(GPU_BACKWARD_BLOCK_Q, fits),
                       max(min(GPU_BACKWARD_BLOCK_K, fits), row_width), num_warps=GPU_NUM_WARPS,
                       num_stages=GPU_NUM_STAGES)
        block = min(CPU_BLOCK, fits)
        return cls(block, max(block, row_width))

    @property
    def alignment(self) -> int:
        """A multiple of every block size (the padding of a sequence tiled by all four)."""
        return math.lcm(self.query_alignment, self.key_alignment)

    @property
    def query_alignment(self) -> int:
        return math.lcm(self.block_q, self.backward[0])

    @property
    def key_alignment(self) -> int:
        return math.lcm(self.block_k, self.backward[1])


@dataclasses.dataclass(frozen=True)
class KernelSpec:
    """Static description of one attention call (hashable: a ``custom_vjp`` non-differentiable argument).

    ``bias``: ``"rows"``, ``"onehot"`` or ``None`` (no relative terms). Bias operands (``terms``):
    ``"onehot"``: ``rel [B, h, q_len, rel_width]``; ``"rows"``: ``rel_h [B, h, q_len, rel_width]`` (one
    column per key row) and ``rel_w [B, h, q_len, tile_width]`` (the width term tiled over the rows of
    a key block)."""

    seq: int  # real N
    grid: tuple[int, int]
    q_len: int  # padded query length
    k_len: int  # padded key length
    bias: str | None
    row_width: int  # "rows": padded grid-row width (a power of two dividing the key blocks)
    rel_width: int  # "onehot": padded H + W; "rows": padded key-row count
    tile_width: int  # "rows": width of rel_w's tile
    blocks: BlockSizes
    platform: str  # "cpu" | "gpu" | "tpu"
    interpret: bool
    precision: Any

    @property
    def n_terms(self) -> int:
        return {"rows": 2, "onehot": 1, None: 0}[self.bias]

    @property
    def stat_lanes(self) -> int:
        """Minor width of the per-query statistics (lse, delta): lane-broadcast on TPU (interpreted too,
        so that the tests run this layout), one column elsewhere."""
        return TPU_LANES if self.platform == "tpu" else 1

    @property
    def real_keys(self) -> int:
        """Key positions up to the last real one (``"rows"``: whole padded grid rows)."""
        return self.grid[0] * self.row_width if self.bias == "rows" else self.seq

    def key_blocks(self, block_k: int) -> int:
        """Key blocks holding at least one real key; the rest are padding only and never visited."""
        return pl.cdiv(self.real_keys, block_k)

    def masked(self, block_k: int) -> bool:
        """Whether the kernels must mask padded keys by position (``"rows"`` masks through its terms)."""
        return self.bias != "rows" and self.seq % block_k != 0

    def compiler_params(self):
        """Always explicit: Triton on GPU (see ``GPU_BACKENDS`` in :mod:`seggpt_jax.nn.flash_attention`)."""
        if self.interpret:
            return None
        if self.platform == "gpu":
            return pltriton.CompilerParams(num_warps=self.blocks.num_warps, num_stages=self.blocks.num_stages)
        if self.platform == "tpu":
            return pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "parallel"))
        return None


def exact_precision(dtype) -> Any:
    """Precision for the one-hot matmuls: they only select, so float32 must not round (Triton's
    default is TF32); a half-precision one-hot product is exact at default precision."""
    return lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else None


# ------------------------------------------------------------------------------------- tile helpers
def _lanes(stat: jax.Array, width: int) -> jax.Array:
    """A per-query statistic ``[bq, L]`` widened to be used against a ``[bq, width]`` tile."""
    lanes = stat.shape[-1]
    if lanes in (1, width):
        return stat
    if width % lanes == 0:
        return jnp.tile(stat, (1, width // lanes))
    return stat[:, :width]  # width < 128: a prefix slice, as JAX's TPU kernel does for the head dim


def _loop(count: int, step, init: tuple, scratch: tuple) -> tuple:
    """``lax.fori_loop`` over ``step(j, *state) -> state``; the state lives in ``scratch`` refs when
    given (TPU: VMEM), in loop carries otherwise."""
    if not scratch:
        return lax.fori_loop(0, count, lambda j, carry: step(j, *carry), init)
    for ref, value in zip(scratch, init, strict=True):
        ref[...] = value

    def body(j, carry):
        for ref, value in zip(scratch, step(j, *(ref[...] for ref in scratch)), strict=True):
            ref[...] = value
        return carry

    lax.fori_loop(0, count, body, 0)
    return tuple(ref[...] for ref in scratch)


def _key_onehot(spec: KernelSpec, k_start, block_k: int, dtype) -> jax.Array:
    """``[bk, R]``: key ``p`` has ones at column ``row(p)`` and ``H + col(p)``; padded keys are zero.
    Built from iotas (the row by a float reciprocal: exact below 2^20 keys, no integer division)."""
    rows, cols = spec.grid
    shape = (block_k, spec.rel_width)
    key = k_start + lax.broadcasted_iota(jnp.int32, shape, 0)
    column = lax.broadcasted_iota(jnp.int32, shape, 1)
    row = jnp.floor((key.astype(jnp.float32) + 0.5) * (1.0 / cols)).astype(jnp.int32)
    hit = (column == row) | (column == rows + key - row * cols)
    return (hit & (key < spec.seq)).astype(dtype)


def _bias(spec: KernelSpec, terms, queries, block: int, block_k: int, onehot=None):
    """``[bq, bk]`` float32 relative bias of the tile of key block ``block`` (or ``None``), from the bias
    refs read at query rows ``queries``. ``onehot``: the key block's one-hot tile, when already built."""
    if spec.bias == "onehot":
        rel = terms[0][queries, :]  # [bq, R]
        if onehot is None:
            onehot = _key_onehot(spec, block * block_k, block_k, rel.dtype)
        return lax.dot_general(rel, onehot, _TRANS_B, precision=exact_precision(rel.dtype),
                               preferred_element_type=jnp.float32)
    if spec.bias == "rows":
        rel_h, rel_w = terms
        per_block = block_k // spec.row_width  # whole grid rows in one key block
        first = block * per_block
        width = rel_w[queries, pl.ds(0, block_k)].astype(jnp.float32)  # [bq, bk]: the same for every block
        height = rel_h[queries, pl.ds(first, 1)]  # [bq, 1]: one value per key row, broadcast over its keys
        if per_block > 1:
            lane = lax.broadcasted_iota(jnp.int32, width.shape, 1)
            for t in range(1, per_block):
                height = jnp.where(lane >= t * spec.row_width, rel_h[queries, pl.ds(first + t, 1)], height)
        return width + height.astype(jnp.float32)
    return None


def _logits(q, k, bias, spec: KernelSpec, k_start, block_k: int) -> jax.Array:
    """``[bq, bk]`` float32 logits of one tile: ``q.k^T + bias``, padded keys masked."""
    s = lax.dot_general(q, k, _TRANS_B, precision=spec.precision, preferred_element_type=jnp.float32)
    if bias is not None:
        s += bias
    if spec.masked(block_k):
        key = k_start + lax.broadcasted_iota(jnp.int32, s.shape, 1)
        s = jnp.where(key < spec.seq, s, MASK_VALUE)
    return s


def _split(refs, spec: KernelSpec, n_in: int, n_out: int):
    """``(q, k, v), terms, other inputs, outputs, scratch``."""
    terms = refs[3:3 + spec.n_terms]
    rest = refs[3 + spec.n_terms:]
    return refs[:3], terms, rest[:n_in], rest[n_in:n_in + n_out], rest[n_in + n_out:]


# ------------------------------------------------------------------------------------------ kernels
def _forward_kernel(*refs, spec: KernelSpec):
    (q_ref, k_ref, v_ref), terms, _, (o_ref, lse_ref), scratch = _split(refs, spec, 0, 2)
    block_q, block_k = spec.blocks.block_q, spec.blocks.block_k
    q = q_ref[...]  # [bq, hd]
    dim = q.shape[-1]

    def step(j, acc, m, l):  # [bq, hd], [bq, L], [bq, L]
        start = pl.multiple_of(j * block_k, block_k)
        keys = pl.ds(start, block_k)
        s = _logits(q, k_ref[keys, :], _bias(spec, terms, slice(None), j, block_k), spec, start, block_k)
        m_next = jnp.maximum(m, jnp.max(s, axis=1, keepdims=True))
        p = jnp.exp(s - _lanes(m_next, block_k))  # [bq, bk]
        alpha = jnp.exp(m - m_next)
        l_next = alpha * l + jnp.sum(p, axis=1, keepdims=True)
        v = v_ref[keys, :]  # [bk, hd]
        pv = lax.dot(p.astype(v.dtype), v, precision=spec.precision, preferred_element_type=jnp.float32)
        return _lanes(alpha, dim) * acc + pv, m_next, l_next

    lanes = spec.stat_lanes
    init = (jnp.zeros((block_q, dim), jnp.float32), jnp.full((block_q, lanes), -jnp.inf, jnp.float32),
            jnp.zeros((block_q, lanes), jnp.float32))
    acc, m, l = _loop(spec.key_blocks(block_k), step, init, scratch)
    o_ref[...] = (acc / _lanes(l, dim)).astype(o_ref.dtype)
    lse_ref[...] = m + jnp.log(l)


def _dq_kernel(*refs, spec: KernelSpec):
    (q_ref, k_ref, v_ref), terms, (lse_ref, delta_ref, do_ref), (dq_ref, *dterm_refs), scratch = _split(
        refs, spec, 3, 1 + spec.n_terms)
    block_q, block_k = spec.blocks.backward
    q, do = q_ref[...], do_ref[...]  # [bq, hd]
    lse, delta = _lanes(lse_ref[...], block_k), _lanes(delta_ref[...], block_k)

    def step(j, dq, *dbias):
        start = pl.multiple_of(j * block_k, block_k)
        keys = pl.ds(start, block_k)
        k, v = k_ref[keys, :], v_ref[keys, :]  # [bk, hd]
        onehot = _key_onehot(spec, start, block_k, terms[0].dtype) if spec.bias == "onehot" else None
        p = jnp.exp(_logits(q, k, _bias(spec, terms, slice(None), j, block_k, onehot), spec, start, block_k) - lse)
        dp = lax.dot_general(do, v, _TRANS_B, precision=spec.precision, preferred_element_type=jnp.float32)
        ds = p * (dp - delta)  # [bq, bk]
        dq += lax.dot(ds.astype(k.dtype), k, precision=spec.precision, preferred_element_type=jnp.float32)
        if spec.bias == "onehot":  # d rel = dS . onehot: the sums of dS over each key row and column
            dbias = (dbias[0] + lax.dot(ds.astype(onehot.dtype), onehot, precision=exact_precision(onehot.dtype),
                                        preferred_element_type=jnp.float32),)
        elif spec.bias == "rows":
            # d rel_w: dS itself, summed over key blocks; d rel_h: each key row's sum of dS, complete
            # once its (only) key block is done, so it is stored straight away.
            per_block = block_k // spec.row_width
            lane = lax.broadcasted_iota(jnp.int32, ds.shape, 1)
            for t in range(per_block):
                segment = (lane >= t * spec.row_width) & (lane < (t + 1) * spec.row_width)
                row_sum = jnp.sum(jnp.where(segment, ds, 0.0), axis=1, keepdims=True)  # [bq, 1]
                dterm_refs[0][:, pl.ds(j * per_block + t, 1)] = row_sum.astype(dterm_refs[0].dtype)
            dbias = (dbias[0] + ds,)
        return (dq, *dbias)

    init = [jnp.zeros(q.shape, jnp.float32)]
    if spec.bias == "onehot":
        init.append(jnp.zeros((block_q, spec.rel_width), jnp.float32))
    elif spec.bias == "rows":
        init.append(jnp.zeros((block_q, block_k), jnp.float32))
    dq, *dbias = _loop(spec.key_blocks(block_k), step, tuple(init), scratch)
    dq_ref[...] = dq.astype(dq_ref.dtype)
    if spec.bias == "onehot":
        dterm_refs[0][...] = dbias[0].astype(dterm_refs[0].dtype)
    elif spec.bias == "rows":
        drel_w = dterm_refs[1]
        drel_w[:, pl.ds(0, block_k)] = dbias[0].astype(drel_w.dtype)
        if spec.tile_width > block_k:  # the tile's other periods carry no gradient of their own
            drel_w[:, pl.ds(block_k, spec.tile_width - block_k)] = jnp.zeros(
                (block_q, spec.tile_width - block_k), drel_w.dtype)


def _dkv_kernel(*refs, spec: KernelSpec):
    (q_ref, k_ref, v_ref), terms, (lse_ref, delta_ref, do_ref), (dk_ref, dv_ref), scratch = _split(refs, spec, 3, 2)
    block_q, block_k = spec.blocks.backward
    k, v = k_ref[...], v_ref[...]  # [bk, hd]
    block = pl.program_id(2)
    k_start = block * block_k
    onehot = _key_onehot(spec, k_start, block_k, terms[0].dtype) if spec.bias == "onehot" else None

    def step(i, dk, dv):  # [bk, hd] float32
        queries = pl.ds(pl.multiple_of(i * block_q, block_q), block_q)
        q, do = q_ref[queries, :], do_ref[queries, :]  # [bq, hd]
        s = _logits(q, k, _bias(spec, terms, queries, block, block_k, onehot), spec, k_start, block_k)
        p = jnp.exp(s - _lanes(lse_ref[queries, :], block_k))  # [bq, bk]
        dv += lax.dot_general(p.astype(do.dtype), do, _TRANS_A, precision=spec.precision,
                              preferred_element_type=jnp.float32)
        dp = lax.dot_general(do, v, _TRANS_B, precision=spec.precision, preferred_element_type=jnp.float32)
        ds = p * (dp - _lanes(delta_ref[queries, :], block_k))
        dk += lax.dot_general(ds.astype(q.dtype), q, _TRANS_A, precision=spec.precision,
                              preferred_element_type=jnp.float32)
        return dk, dv

    init = (jnp.zeros(k.shape, jnp.float32), jnp.zeros(v.shape, jnp.float32))
    dk, dv = _loop(pl.cdiv(spec.seq, block_q), step, init, scratch)
    dk_ref[...] = dk.astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


# ----------------------------------------------------------------------------------------- launches
def _rows(block: int, width: int) -> pl.BlockSpec:
    """``[block, width]`` rows at grid index ``i`` of batch ``b``, head ``h``."""
    return pl.BlockSpec((None, None, block, width), lambda b, h, i: (b, h, i, 0))


def _whole(length: int, width: int) -> pl.BlockSpec:
    """The whole ``[length, width]`` sequence of batch ``b``, head ``h``."""
    return pl.BlockSpec((None, None, length, width), lambda b, h, i: (b, h, 0, 0))


def _scratch(spec: KernelSpec, *shapes: tuple[int, int]) -> list:
    return [pltpu.VMEM(shape, jnp.float32) for shape in shapes] if spec.platform == "tpu" else []


def _nbytes(*arrays) -> int:
    return int(sum(math.prod(a.shape) * jnp.dtype(a.dtype).itemsize for a in arrays))


def _cost(spec: KernelSpec, q, outputs, inputs, block_k: int, matmuls: int) -> pl.CostEstimate:
    """``matmuls``: ``hd``-deep products per (query, key) pair (2 forward, 3 dq, 4 dk/dv), plus the
    one-hot products of the ``"onehot"`` mode; one exponential per pair."""
    batch, heads, q_len, dim = q.shape
    pairs = batch * heads * q_len * spec.key_blocks(block_k) * block_k
    flops = 2 * pairs * dim * matmuls
    if spec.bias == "onehot":
        flops += 2 * pairs * spec.rel_width * (2 if matmuls == 3 else 1)
    return pl.CostEstimate(flops=int(flops), transcendentals=int(pairs), bytes_accessed=_nbytes(*inputs, *outputs))


def _call(kernel, spec: KernelSpec, *, grid, in_specs, out_specs, out_shape, scratch, name, cost, args):
    return pl.pallas_call(
        functools.partial(kernel, spec=spec), grid=grid, in_specs=in_specs, out_specs=out_specs,
        out_shape=out_shape, scratch_shapes=scratch, compiler_params=spec.compiler_params(),
        interpret=spec.interpret, name=name, cost_estimate=cost,
    )(*args)


def forward(q, k, v, terms: tuple, spec: KernelSpec):
    """``q [B, h, q_len, hd]`` (already scaled), ``k, v [B, h, k_len, hd]``, ``terms`` (see
    :class:`KernelSpec`) -> ``(out [B, h, q_len, hd], lse [B, h, q_len, stat_lanes] float32)``."""
    batch, heads, q_len, dim = q.shape
    block_q, block_k = spec.blocks.block_q, spec.blocks.block_k
    lanes = spec.stat_lanes
    out_shape = [jax.ShapeDtypeStruct(q.shape, v.dtype), jax.ShapeDtypeStruct((batch, heads, q_len, lanes), jnp.float32)]
    return _call(
        _forward_kernel, spec, grid=(batch, heads, q_len // block_q),
        in_specs=[_rows(block_q, dim), _whole(spec.k_len, dim), _whole(spec.k_len, dim)]
        + [_rows(block_q, t.shape[-1]) for t in terms],
        out_specs=[_rows(block_q, dim), _rows(block_q, lanes)], out_shape=out_shape,
        scratch=_scratch(spec, (block_q, dim), (block_q, lanes), (block_q, lanes)), name="flash_relpos_fwd",
        cost=_cost(spec, q, out_shape, (q, k, v, *terms), block_k, 2), args=(q, k, v, *terms))


def backward(q, k, v, terms: tuple, lse, delta, d_out, spec: KernelSpec):
    """``(d q, d k, d v, d terms)`` from the dq and dk/dv kernels; shapes as in :func:`forward`,
    ``lse`` and ``delta`` ``[B, h, q_len, stat_lanes]`` float32."""
    batch, heads, q_len, dim = q.shape
    block_q, block_k = spec.blocks.backward
    lanes = spec.stat_lanes
    stats = (lse, delta, d_out)
    args = (q, k, v, *terms, *stats)

    dq_shape = [jax.ShapeDtypeStruct(q.shape, q.dtype)] + [jax.ShapeDtypeStruct(t.shape, t.dtype) for t in terms]
    dq_scratch = [(block_q, dim)] + ([(block_q, spec.rel_width)] if spec.bias == "onehot" else [])
    dq_and_dterms = _call(
        _dq_kernel, spec, grid=(batch, heads, q_len // block_q),
        in_specs=[_rows(block_q, dim), _whole(spec.k_len, dim), _whole(spec.k_len, dim)]
        + [_rows(block_q, t.shape[-1]) for t in terms] + [_rows(block_q, lanes)] * 2 + [_rows(block_q, dim)],
        out_specs=[_rows(block_q, s.shape[-1]) for s in dq_shape], out_shape=dq_shape,
        scratch=_scratch(spec, *dq_scratch), name="flash_relpos_dq",
        cost=_cost(spec, q, dq_shape, args, block_k, 3), args=args)

    dkv_shape = [jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)]
    dk, dv = _call(
        _dkv_kernel, spec, grid=(batch, heads, spec.k_len // block_k),
        in_specs=[_whole(q_len, dim), _rows(block_k, dim), _rows(block_k, dim)]
        + [_whole(q_len, t.shape[-1]) for t in terms] + [_whole(q_len, lanes)] * 2 + [_whole(q_len, dim)],
        out_specs=[_rows(block_k, dim)] * 2, out_shape=dkv_shape,
        scratch=_scratch(spec, (block_k, dim), (block_k, dim)), name="flash_relpos_dkv",
        cost=_cost(spec, q, dkv_shape, args, block_k, 4), args=args)
    return dq_and_dterms[0], dk, dv, tuple(dq_and_dterms[1:])
