"""Attention in cache-sized tiles (the CPU/TPU path): nothing ``N x N`` is materialised.

Same maths and order of operations as :func:`seggpt_jax.nn.attention.attention_plain`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from .ops import relative_tables


def _tile_rows(rows: int, cols: int, max_queries: int = 512) -> int:
    """Largest number of grid rows per tile that divides ``rows`` with at most ``max_queries`` queries."""
    best = 1
    for r in range(1, rows + 1):
        if rows % r == 0 and r * cols <= max_queries:
            best = r
    return best


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
    """Attention in ``[tile_rows * W, N]`` tiles, one head at a time (``lax.map``).

    Only one tile of logits exists at a time (392 x 1568 for ViT-L: 2.5 MB), so on CPU the softmax
    and the relative-position adds stay in cache. Same operation order as :func:`attention_plain`.
    """
    batch, seq, heads, dim = q.shape
    rows, cols = grid
    r = tile_rows or _tile_rows(rows, cols)
    if rows % r:
        raise ValueError(f"tile_rows={r} must divide the {rows} grid rows")
    chunks, bn = rows // r, batch * heads
    per_head = lambda t: t.transpose(0, 2, 1, 3).reshape(bn, seq, dim)  # noqa: E731  [B*n, N, hd]
    q_heads, k_heads, v_heads = per_head(q), per_head(k), per_head(v)
    scaled = (q_heads * jnp.asarray(scale, q.dtype)).reshape(bn * chunks, r * cols, dim)
    head_of_tile = jnp.repeat(jnp.arange(bn), chunks)
    xs = (scaled, head_of_tile)
    if rel_pos is not None:
        table_h, table_w = relative_tables(*rel_pos, grid)
        q_grid = q_heads.reshape(bn, rows, cols, dim)  # the unscaled query, as transformers
        rel_h = jnp.einsum("bhwc,hkc->bhwk", q_grid, table_h.astype(q.dtype), precision=precision)  # [Bn, H, W, H]
        rel_w = jnp.einsum("bhwc,wkc->bhwk", q_grid, table_w.astype(q.dtype), precision=precision)  # [Bn, H, W, W]
        xs += (rel_h.reshape(bn * chunks, r, cols, rows), rel_w.reshape(bn * chunks, r, cols, cols))

    def tile(args):
        q_tile, head = args[0], args[1]
        logits = jnp.einsum("qd,kd->qk", q_tile, k_heads[head], precision=precision)  # [r*W, N]
        if rel_pos is not None:
            logits = logits.reshape(r, cols, rows, cols) + args[2][..., :, None] + args[3][..., None, :]
            logits = logits.reshape(r * cols, seq)
        weights = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(v.dtype)
        return jnp.einsum("qk,kd->qd", weights, v_heads[head], precision=precision)

    out = jax.lax.map(tile, xs)  # [Bn * chunks, r * W, hd]
    return out.reshape(batch, heads, seq, dim).transpose(0, 2, 1, 3)
