"""Global multi-head attention with decomposed relative positions (MViTv2 / ViTDet / SAM / SegGPT).

For a query at grid cell ``(qh, qw)`` and a key at ``(kh, kw)`` the logit is

    scale * q.k + q.R_h[qh - kh] + q.R_w[qw - kw]

where ``R_h`` has ``2*H - 1`` rows and ``R_w`` has ``2*W - 1`` rows (111 and 55 for the 56x28 grid of
ViT-L; the grid is not square). Note the relative terms use the *unscaled* query, as in
transformers' ``SegGptAttention.add_decomposed_rel_pos``.

:func:`attention_plain` is the reference: it materialises the full ``[B, heads, N, N]`` logits and
adds the two relative terms by broadcasting, in the same order of operations as transformers.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from .ops import relative_position_index


def relative_tables(rel_pos_h: jax.Array, rel_pos_w: jax.Array, grid: tuple[int, int]) -> tuple[jax.Array, jax.Array]:
    """Gather ``[H, H, hd]`` and ``[W, W, hd]`` tables indexed by ``(query, key)`` coordinates."""
    rows, cols = grid
    return rel_pos_h[relative_position_index(rows)], rel_pos_w[relative_position_index(cols)]


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
