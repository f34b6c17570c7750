"""Attention in cache-sized tiles (the CPU/TPU path) with a FlashAttention-style backward pass.

Nothing ``N x N`` is materialised in either direction, and nothing ``N x N`` is saved for the backward.

The logit of a query at grid cell ``(qh, qw)`` against a key at ``(kh, kw)`` (``N = H * W`` tokens) is

    s[q, k] = scale * q.k + rel_h[q, kh] + rel_w[q, kw],
    rel_h[q, kh] = q . R_h[qh - kh + H - 1],   rel_w[q, kw] = q . R_w[qw - kw + W - 1]

with the *unscaled* query in the relative terms (transformers' ``add_decomposed_rel_pos``), and

    P = softmax(S) (float32),   O = P V,   lse[q] = log sum_k exp(s[q, k]).

Forward (:func:`chunked_attention_forward`): a loop over tiles of ``tile_rows * W`` queries of one
head (the execution plan's tile for the machine, :func:`seggpt_jax.runtime.cpu_tile_queries`: up to a
whole head, 1568 x 1568 logits for ViT-L's 56 x 28 grid), the logits in the order of operations of
``attention_plain`` (float32 rounding apart: each tile computes its own relative terms). The softmax is
normalised after the product with ``V``, as FlashAttention does: ``O = (exp(S - max) V) / sum exp(S - max)``,
one division per output element instead of one per logit (``jax.nn.softmax`` divides the weights
first; the two differ by float32 rounding). Each tile yields its rows of ``O`` and of ``lse``; its
logits and weights are dropped. The backward recomputes a tile's logits with the same code, bit for bit. With
half-precision inputs the products accumulate into float32 logits that are never rounded to the
input dtype (more accurate than ``attention_plain`` in bfloat16); the output is cast to v's dtype.

Backward (:func:`chunked_attention_backward`): FlashAttention-2 (Dao, 2023, arXiv:2307.08691,
Algorithm 2) with the query tile as the loop unit. With ``delta[q] = sum_d dO[q, d] O[q, d]``
(:func:`attention_delta`), per tile

    S recomputed from q, k and the tile's relative terms,   P = exp(S - lse)
    dV += P^T dO,          dP = dO V^T,           dS = P * (dP - delta)
    dQ  = scale * dS K,    dK += scale * dS^T Q
    d rel_h[q, kh] = sum_kw dS[q, (kh, kw)],      d rel_w[q, kw] = sum_kh dS[q, (kh, kw)]
    dQ += d rel_h . R_h[qh - kh + H - 1] + d rel_w . R_w[qw - kw + W - 1]
    dR_h[qh - kh + H - 1] += sum_{q in row qh} d rel_h[q, kh] q   (likewise dR_w)

A loop over heads, and within a head a ``lax.scan`` over its query tiles, carrying the head's ``dK, dV``
and the gathered-table gradients; all backward arithmetic is float32 whatever the input dtype. Everything
recomputed is recomputed inside the loop, one tile at a time (so XLA cannot merge it with the forward's
and keep it alive in between), and the only buffers of the backward besides the gradients themselves
are one tile's ``[tile_rows * W, N]`` float32 temporaries. The buffers the loops fill (the forward's
``O`` and ``lse``, the backward's ``dQ, dK, dV``) are computed from the loop's own inputs
(:func:`~seggpt_jax.nn.ops.zeros_after`), so that XLA allocates them when the loop runs, not at the
start of a training step.

Saved for the backward (:func:`attention_chunked` is a ``jax.custom_vjp``): the per-head ``q, k, v``
(``[B * heads, N, hd]``; transposed copies of the inputs, which the caller no longer needs), the two
relative-position tables, the output ``O`` (``[B, N, heads, hd]``, the primal output itself, named
:data:`OUT_NAME`) and ``lse`` (``[B * heads, N]`` float32, named :data:`LSE_NAME`): never a tile's
logits or weights. Per ViT-L layer (B = 1, 16 heads, N = 1568, hd = 64, float32) that is 4 x 6.4 MB
+ 0.1 MB, where autodiff of a plain ``lax.map`` over the tiles stores every tile's weights and more
(16 x 1568^2 x 4 B = 157 MB per array per layer).

Under ``jax.checkpoint`` the policy sees the tiled forward as one opaque call (see
:func:`_opaque_forward`): its outputs are saved when the policy saves :data:`OUT_NAME` and
:data:`LSE_NAME` (e.g. ``save_only_these_names(OUT_NAME, LSE_NAME)``, or ``everything_saveable``),
otherwise the whole tiled forward is rerun in the backward pass; its per-tile intermediates are never
saved, whatever the policy (a dots policy would otherwise keep every tile's logits).

The building blocks take per-head layouts (``[B * heads, N, hd]``, :func:`to_heads`) so that another
kernel can produce ``(out, lse)`` itself and reuse :func:`attention_delta` and
:func:`chunked_attention_backward`.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from ..runtime import CHUNKED_LSE_NAME, CHUNKED_OUT_NAME, CPU_TILE_QUERIES
from .ops import relative_tables, zeros_after

#: ``checkpoint_name`` of the attention output ``[B, N, heads, hd]`` saved for the backward pass, and of
#: the per-query log-sum-exp ``[B * heads, N]`` (float32) (:mod:`seggpt_jax.runtime` owns the names).
OUT_NAME, LSE_NAME = CHUNKED_OUT_NAME, CHUNKED_LSE_NAME
#: Default cap on queries per tile when no execution plan gives one (a model's plan gives
#: :func:`seggpt_jax.runtime.cpu_tile_queries`): the runtime's default, 512 x 1568 float32 logits (3.2 MB).
MAX_TILE_QUERIES = CPU_TILE_QUERIES["default"]

RelPos = tuple[jax.Array, jax.Array] | None


def default_tile_rows(rows: int, cols: int, max_queries: int = MAX_TILE_QUERIES) -> int:
    """Largest number of grid rows per tile that divides ``rows`` with at most ``max_queries`` queries."""
    best = 1
    for r in range(1, rows + 1):
        if rows % r == 0 and r * cols <= max_queries:
            best = r
    return best


def _checked_tile_rows(rows: int, cols: int, tile_rows: int | None) -> int:
    r = tile_rows or default_tile_rows(rows, cols)
    if r < 1 or rows % r:
        raise ValueError(f"tile_rows={r} must divide the {rows} grid rows")
    return r


def to_heads(t: jax.Array) -> jax.Array:
    """``[B, N, heads, hd] -> [B * heads, N, hd]``."""
    batch, seq, heads, dim = t.shape
    return t.transpose(0, 2, 1, 3).reshape(batch * heads, seq, dim)


def from_heads(t: jax.Array, batch: int) -> jax.Array:
    """``[B * heads, N, hd] -> [B, N, heads, hd]``."""
    bn, seq, dim = t.shape
    return t.reshape(batch, bn // batch, seq, dim).transpose(0, 2, 1, 3)


def _gathered_tables(rel_pos: tuple[jax.Array, jax.Array], grid: tuple[int, int], dtype) -> tuple[jax.Array, jax.Array]:
    table_h, table_w = relative_tables(*rel_pos, grid)  # [H(q), H(k), hd], [W(q), W(k), hd]
    return table_h.astype(dtype), table_w.astype(dtype)


def _tile_relative_terms(q_tile: jax.Array, tables: tuple[jax.Array, jax.Array], chunk: jax.Array, cols: int,
                         precision) -> tuple[jax.Array, jax.Array]:
    """Float32 ``rel_h [r, W, H]`` and ``rel_w [r, W, W]`` of the tile of grid rows ``chunk * r ...`` from its
    unscaled query ``[r*W, hd]`` and the gathered tables ``[H, H, hd]``, ``[W, W, hd]`` (in the query's dtype)."""
    dim = q_tile.shape[-1]
    r = q_tile.shape[0] // cols
    q_grid = q_tile.reshape(r, cols, dim)  # [r, W, hd]
    table_h = jax.lax.dynamic_slice_in_dim(tables[0], chunk * r, r)  # [r, H, hd]
    f32 = jnp.float32
    rel_h = jnp.einsum("rwc,rkc->rwk", q_grid, table_h, precision=precision, preferred_element_type=f32)  # [r, W, H]
    rel_w = jnp.einsum("rwc,wkc->rwk", q_grid, tables[1], precision=precision, preferred_element_type=f32)  # [r, W, W]
    return rel_h, rel_w


def _tile_logits(q_tile: jax.Array, k_head: jax.Array, rel_h_tile: jax.Array | None, rel_w_tile: jax.Array | None,
                 grid: tuple[int, int], precision) -> jax.Array:
    """Float32 logits ``[r*W, N]`` of one tile from the *scaled* query ``[r*W, hd]``, the head's keys
    ``[N, hd]``, ``rel_h_tile [r, W, H]`` and ``rel_w_tile [r, W, W]``; ``attention_plain``'s order.
    Products of half-precision inputs are accumulated and kept in float32 (no rounding of the logits)."""
    rows, cols = grid
    logits = jnp.einsum("qd,kd->qk", q_tile, k_head, precision=precision,
                        preferred_element_type=jnp.float32)  # [r*W, N]
    if rel_h_tile is not None:
        r = rel_h_tile.shape[0]
        logits = logits.reshape(r, cols, rows, cols) + rel_h_tile[..., :, None] + rel_w_tile[..., None, :]
        logits = logits.reshape(r * cols, rows * cols)
    return logits


def chunked_attention_forward(q_heads: jax.Array, k_heads: jax.Array, v_heads: jax.Array, rel_pos: RelPos, *,
                              scale: float, grid: tuple[int, int], precision=None,
                              tile_rows: int | None = None) -> tuple[jax.Array, jax.Array]:
    """Per-head forward: ``[B*n, N, hd]`` inputs -> ``(out [B*n, N, hd] in v's dtype, lse [B*n, N] float32)``.

    A loop over the ``B*n * H / tile_rows`` tiles of ``tile_rows * W`` queries; each tile computes its
    own relative terms (in q's dtype), exactly as the backward pass recomputes them, and writes its rows
    of ``out`` and ``lse`` into buffers that exist only once q does (:func:`~seggpt_jax.nn.ops.zeros_after`).
    """
    bn, seq, dim = q_heads.shape
    rows, cols = grid
    r = _checked_tile_rows(rows, cols, tile_rows)
    chunks = rows // r
    tables = _gathered_tables(rel_pos, grid, q_heads.dtype) if rel_pos is not None else None
    q_tiles = q_heads.reshape(bn * chunks, r * cols, dim)  # [tiles, r*W, hd]; tile i: head i // chunks

    def tile(q_tile: jax.Array, head: jax.Array, chunk: jax.Array) -> tuple[jax.Array, jax.Array]:
        rel_h = rel_w = None
        if tables is not None:
            rel_h, rel_w = _tile_relative_terms(q_tile, tables, chunk, cols, precision)  # [r, W, H], [r, W, W]
        q_scaled = q_tile * jnp.asarray(scale, q_tile.dtype)
        logits = _tile_logits(q_scaled, k_heads[head], rel_h, rel_w, grid, precision)  # [r*W, N]
        peak = jnp.max(logits, axis=-1, keepdims=True)  # [r*W, 1]
        unnormalized = jnp.exp(logits - peak)  # [r*W, N]
        total = jnp.sum(unnormalized, axis=-1, keepdims=True)  # [r*W, 1]
        out = jnp.einsum("qk,kd->qd", unnormalized.astype(v_heads.dtype), v_heads[head], precision=precision,
                         preferred_element_type=jnp.float32) / total  # [r*W, hd]: normalised after the product
        return out.astype(v_heads.dtype), (peak + jnp.log(total))[:, 0]

    def step(i: jax.Array, buffers: tuple[jax.Array, jax.Array]) -> tuple[jax.Array, jax.Array]:
        out, lse = tile(q_tiles[i], i // chunks, i % chunks)
        return buffers[0].at[i].set(out), buffers[1].at[i].set(lse)

    buffers = (zeros_after(q_tiles.shape, v_heads.dtype, q_heads),  # [tiles, r*W, hd]
               zeros_after(q_tiles.shape[:2], jnp.float32, q_heads))  # [tiles, r*W]
    out, lse = jax.lax.fori_loop(0, bn * chunks, step, buffers)
    return out.reshape(bn, seq, dim), lse.reshape(bn, seq)


def attention_delta(out: jax.Array, d_out: jax.Array, precision=None) -> jax.Array:
    """``delta[b*n, q] = sum_d dO[b, q, n, d] O[b, q, n, d]`` in float32 from ``[B, N, heads, hd]``
    arrays -> ``[B * heads, N]`` (computed in the caller's layout: no per-head copy of ``O``)."""
    batch, seq, heads, _ = out.shape
    f32 = jnp.float32
    delta = jnp.einsum("bqnd,bqnd->bnq", d_out.astype(f32), out.astype(f32), precision=precision)  # [B, n, N]
    return delta.reshape(batch * heads, seq)


def chunked_attention_backward(q_heads: jax.Array, k_heads: jax.Array, v_heads: jax.Array, rel_pos: RelPos,
                               lse: jax.Array, delta: jax.Array, d_out_heads: jax.Array, *, scale: float,
                               grid: tuple[int, int], precision=None, tile_rows: int | None = None,
                               ) -> tuple[jax.Array, jax.Array, jax.Array, RelPos]:
    """Per-head backward from the forward's ``lse [B*n, N]`` and :func:`attention_delta` ``[B*n, N]``.

    ``q_heads, k_heads, v_heads, d_out_heads: [B*n, N, hd]``. Returns ``(dq, dk, dv)`` (``[B*n, N, hd]``,
    in the dtypes of q, k, v) and the gradients of the two relative-position tables (``None`` without
    relative positions). Any tiling gives the same gradient; ``tile_rows`` only sets the working set.
    """
    bn, seq, dim = q_heads.shape
    rows, cols = grid
    r = _checked_tile_rows(rows, cols, tile_rows)
    chunks = rows // r
    f32 = jnp.float32
    relative = rel_pos is not None
    by_tile = lambda t: t.reshape(bn, chunks, r * cols, *t.shape[2:])  # noqa: E731  [B*n, chunks, r*W, ...]
    xs = (by_tile(q_heads), by_tile(d_out_heads), by_tile(lse), by_tile(delta), k_heads, v_heads)
    tables = _gathered_tables(rel_pos, grid, q_heads.dtype) if relative else None  # as the forward's logits
    tables32 = _gathered_tables(rel_pos, grid, f32) if relative else None  # for the gradient

    def head(d_tables: tuple[jax.Array, ...], args: tuple[jax.Array, ...]):
        q_tiles, d_out_tiles, lse_tiles, delta_tiles, k_head, v_head = args
        k32, v32 = k_head.astype(f32), v_head.astype(f32)  # [N, hd]

        def tile(carry: tuple[jax.Array, ...], t: tuple[jax.Array, ...]):
            d_k, d_v, *d_tab = carry  # [N, hd] x2 float32 (+ [H, H, hd], [W, W, hd])
            chunk, q_tile, d_o, lse_tile, delta_tile = t  # [], [r*W, hd] x2, [r*W] x2
            rel_h = rel_w = None
            if relative:  # the forward's own per-tile computation, so that the logits are bit-identical
                rel_h, rel_w = _tile_relative_terms(q_tile, tables, chunk, cols, precision)  # [r, W, H], [r, W, W]
            q_scaled = q_tile * jnp.asarray(scale, q_tile.dtype)
            p = jnp.exp(_tile_logits(q_scaled, k_head, rel_h, rel_w, grid, precision) - lse_tile[:, None])  # [r*W, N]
            d_o = d_o.astype(f32)
            d_v = d_v + jnp.einsum("qk,qd->kd", p, d_o, precision=precision)  # [N, hd]
            d_p = jnp.einsum("qd,kd->qk", d_o, v32, precision=precision)  # [r*W, N]
            d_s = p * (d_p - delta_tile[:, None])  # [r*W, N]
            q32 = q_tile.astype(f32)
            d_q = scale * jnp.einsum("qk,kd->qd", d_s, k32, precision=precision)  # [r*W, hd]
            d_k = d_k + scale * jnp.einsum("qk,qd->kd", d_s, q32, precision=precision)  # [N, hd]
            if not relative:
                return (d_k, d_v), d_q
            d_s = d_s.reshape(r, cols, rows, cols)  # [r, W(q), H(k), W(k)]
            d_rel_h, d_rel_w = d_s.sum(axis=3), d_s.sum(axis=2)  # [r, W, H], [r, W, W]
            q_grid32 = q32.reshape(r, cols, dim)  # [r, W, hd]
            table_h32 = jax.lax.dynamic_slice_in_dim(tables32[0], chunk * r, r)  # [r, H, hd]
            d_q_rel = (jnp.einsum("rwk,rkc->rwc", d_rel_h, table_h32, precision=precision)
                       + jnp.einsum("rwk,wkc->rwc", d_rel_w, tables32[1], precision=precision))  # [r, W, hd]
            d_table_h = jax.lax.dynamic_update_slice_in_dim(
                d_tab[0], jax.lax.dynamic_slice_in_dim(d_tab[0], chunk * r, r)
                + jnp.einsum("rwk,rwc->rkc", d_rel_h, q_grid32, precision=precision), chunk * r, axis=0)
            d_table_w = d_tab[1] + jnp.einsum("rwk,rwc->wkc", d_rel_w, q_grid32, precision=precision)
            return (d_k, d_v, d_table_h, d_table_w), d_q + d_q_rel.reshape(r * cols, dim)

        zeros = zeros_after((seq, dim), f32, d_out_tiles)
        (d_k, d_v, *d_tables), d_q = jax.lax.scan(
            tile, (zeros, zeros, *d_tables), (jnp.arange(chunks), q_tiles, d_out_tiles, lse_tiles, delta_tiles))
        grads = (d_q.reshape(seq, dim).astype(q_heads.dtype), d_k.astype(k_heads.dtype), d_v.astype(v_heads.dtype))
        return tuple(d_tables), grads

    def step(i: jax.Array, carry: tuple[jax.Array, ...]) -> tuple[jax.Array, ...]:
        d_q_all, d_k_all, d_v_all, *d_tables = carry  # [B*n, N, hd] x3, then the tables' gradients
        d_tables, grads = head(tuple(d_tables), tuple(t[i] for t in xs))
        return (d_q_all.at[i].set(grads[0]), d_k_all.at[i].set(grads[1]), d_v_all.at[i].set(grads[2]), *d_tables)

    # every buffer is computed from the cotangent: none can be allocated before the backward pass gets here
    carry = tuple(zeros_after(t.shape, t.dtype, d_out_heads) for t in (q_heads, k_heads, v_heads))
    carry += tuple(zeros_after(t.shape, f32, d_out_heads) for t in tables32) if relative else ()
    d_q, d_k, d_v, *d_tables = jax.lax.fori_loop(0, bn, step, carry)
    d_rel_pos = None
    if relative:
        # back through the gather of the tables: a scatter-add onto [2H-1, hd] and [2W-1, hd]
        rel32 = (rel_pos[0].astype(f32), rel_pos[1].astype(f32))
        _, gather_vjp = jax.vjp(lambda h, w: relative_tables(h, w, grid), *rel32)
        d_h, d_w = gather_vjp(tuple(d_tables))
        d_rel_pos = (d_h.astype(rel_pos[0].dtype), d_w.astype(rel_pos[1].dtype))
    return d_q, d_k, d_v, d_rel_pos


# ------------------------------------------------------------------------------------ custom_vjp
@functools.partial(jax.custom_jvp, nondiff_argnums=(4, 5, 6, 7))
def _opaque_forward(q_heads: jax.Array, k_heads: jax.Array, v_heads: jax.Array, rel_pos: RelPos, scale: float,
                    grid: tuple[int, int], precision: Any, tile_rows: int) -> tuple[jax.Array, jax.Array]:
    """:func:`chunked_attention_forward` as one equation for ``jax.checkpoint`` policies.

    Under ``jax.checkpoint`` the custom_vjp's forward rule is partially evaluated with the caller's
    policy, which would otherwise look inside the tile loop: a dots policy then saves every tile's
    logits (a matmul output), stacked over tiles, to recompute the log-sum-exp from. A ``custom_jvp``
    call is one opaque equation to the policy: its outputs are saved or it is rerun as a whole.
    """
    return chunked_attention_forward(q_heads, k_heads, v_heads, rel_pos, scale=scale, grid=grid,
                                     precision=precision, tile_rows=tile_rows)


@_opaque_forward.defjvp
def _opaque_forward_jvp(scale, grid, precision, tile_rows, primals, tangents):
    forward = functools.partial(chunked_attention_forward, scale=scale, grid=grid, precision=precision,
                                tile_rows=tile_rows)
    return jax.jvp(forward, primals, tangents)  # forward mode through the tiles (reverse mode never gets here)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7))
def _attention(q: jax.Array, k: jax.Array, v: jax.Array, rel_pos: RelPos, scale: float, grid: tuple[int, int],
               precision: Any, tile_rows: int) -> jax.Array:
    out, _ = chunked_attention_forward(to_heads(q), to_heads(k), to_heads(v), rel_pos, scale=scale, grid=grid,
                                       precision=precision, tile_rows=tile_rows)
    return from_heads(out, q.shape[0])


def _attention_fwd(q, k, v, rel_pos, scale, grid, precision, tile_rows):
    q_heads, k_heads, v_heads = to_heads(q), to_heads(k), to_heads(v)  # [B*n, N, hd]
    out, lse = _opaque_forward(q_heads, k_heads, v_heads, rel_pos, scale, grid, precision, tile_rows)
    out = checkpoint_name(from_heads(out, q.shape[0]), OUT_NAME)  # [B, N, n, hd]
    lse = checkpoint_name(lse, LSE_NAME)  # [B*n, N] float32
    return out, (q_heads, k_heads, v_heads, rel_pos, out, lse)


def _attention_bwd(scale, grid, precision, tile_rows, residuals, d_out):
    q_heads, k_heads, v_heads, rel_pos, out, lse = residuals
    d_q, d_k, d_v, d_rel_pos = chunked_attention_backward(
        q_heads, k_heads, v_heads, rel_pos, lse, attention_delta(out, d_out, precision), to_heads(d_out),
        scale=scale, grid=grid, precision=precision, tile_rows=tile_rows)
    batch = out.shape[0]
    return from_heads(d_q, batch), from_heads(d_k, batch), from_heads(d_v, batch), d_rel_pos


_attention.defvjp(_attention_fwd, _attention_bwd)


def attention_chunked(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    scale: float,
    grid: tuple[int, int],
    rel_pos: tuple[jax.Array, jax.Array] | None,
    precision=None,
    tile_rows: int | None = None,
) -> jax.Array:
    """Attention in ``[tile_rows * W, N]`` tiles, one head at a time, with the memory-light backward.

    ``q, k, v: [B, N, heads, hd]`` with ``N = H * W`` (``grid = (H, W)``); ``rel_pos = (rel_pos_h [2H-1, hd],
    rel_pos_w [2W-1, hd])`` or ``None``. Softmax in float32, output ``[B, N, heads, hd]`` in v's dtype.
    ``tile_rows`` must divide ``H`` (default: the most rows with at most :data:`MAX_TILE_QUERIES` queries).
    The forward is :func:`attention_plain`'s arithmetic; the gradient is the module docstring's.
    """
    rows, cols = grid
    if q.shape[1] != rows * cols:
        raise ValueError(f"{q.shape[1]} tokens do not form the {rows}x{cols} grid")
    r = _checked_tile_rows(rows, cols, tile_rows)
    rel = None if rel_pos is None else (rel_pos[0], rel_pos[1])
    return _attention(q, k, v, rel, float(scale), (int(rows), int(cols)), precision, r)
