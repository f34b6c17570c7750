"""A pure-JAX model of the flash kernels' algorithm (:mod:`seggpt_jax.nn.flash_attention`), for tests.

It follows the kernels block for block: keys in the bias mode's layout (``"rows"``: each grid row
padded to a power of two, key blocks of whole rows; ``"onehot"``: the plain token order), an online
softmax over key blocks (``lax.scan``) with the relative bias of each block gathered from ``rel_h`` and
``rel_w`` by each key's row and column, padded keys masked with the kernel's mask value. A test can
then tell a wrong algorithm or layout from a wrong Pallas lowering. It uses the kernel module's
private pieces on purpose: it must model exactly what the kernels do.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from seggpt_jax.nn.flash_attention import _next_pow2, _relative_terms, _round_up
from seggpt_jax.nn.flash_kernels import CPU_BLOCK, MASK_VALUE


def attention_flash_reference(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    scale: float,
    grid: tuple[int, int],
    rel_pos: tuple[jax.Array, jax.Array] | None,
    precision=None,
    block_k: int = CPU_BLOCK,
    bias: str = "onehot",
) -> jax.Array:
    """Pure-JAX version of the kernels' forward: online softmax over key blocks of ``block_k`` keys in
    ``bias``'s key layout; all queries at once. ``q, k, v: [B, N, heads, hd]``."""
    batch, seq, heads, dim = q.shape
    rows, cols = grid
    row_width = _next_pow2(cols) if bias == "rows" else cols  # keys per (padded) grid row
    if block_k % row_width and bias == "rows":
        raise ValueError("key blocks must hold whole rows")
    k_len = _round_up(rows * row_width, block_k)
    position = jnp.arange(k_len)
    key_row, key_col = position // row_width, position % row_width
    real = (key_row < rows) & (key_col < cols)  # [k_len]
    token = jnp.where(real, key_row * cols + key_col, 0)  # the key's index in the token order

    per_head = lambda t: t.transpose(0, 2, 1, 3)  # noqa: E731  [B, h, N, hd]
    blocks = lambda t: jnp.moveaxis(t.reshape(*t.shape[:-2], k_len // block_k, block_k, t.shape[-1]), -3, 0)  # noqa: E731
    q_heads = per_head(q)
    qs = q_heads * jnp.asarray(scale, q.dtype)
    xs = {"k": blocks(per_head(k)[:, :, token]), "v": blocks(per_head(v)[:, :, token]),
          "real": real.reshape(-1, block_k), "row": jnp.minimum(key_row, rows - 1).reshape(-1, block_k),
          "col": jnp.minimum(key_col, cols - 1).reshape(-1, block_k)}
    rel = None if rel_pos is None else _relative_terms(q_heads, grid, rel_pos, precision)  # [B, h, N, H], [.., W]

    def step(carry, x):
        acc, m, l = carry  # [B, h, N, hd], [B, h, N, 1] x2
        s = jnp.einsum("bnqd,bnkd->bnqk", qs, x["k"], precision=precision, preferred_element_type=jnp.float32)
        if rel is not None:
            s += jnp.take(rel[0], x["row"], axis=-1).astype(jnp.float32)
            s += jnp.take(rel[1], x["col"], axis=-1).astype(jnp.float32)
        s = jnp.where(x["real"], s, MASK_VALUE)  # [B, h, N, bk]
        m_next = jnp.maximum(m, s.max(axis=-1, keepdims=True))
        p = jnp.exp(s - m_next)
        alpha = jnp.exp(m - m_next)
        pv = jnp.einsum("bnqk,bnkd->bnqd", p.astype(v.dtype), x["v"], precision=precision,
                        preferred_element_type=jnp.float32)
        return (alpha * acc + pv, m_next, alpha * l + p.sum(axis=-1, keepdims=True)), None

    init = (jnp.zeros((batch, heads, seq, dim), jnp.float32), jnp.full((batch, heads, seq, 1), -jnp.inf, jnp.float32),
            jnp.zeros((batch, heads, seq, 1), jnp.float32))
    (acc, _, l), _ = lax.scan(step, init, xs)
    return per_head((acc / l).astype(v.dtype))
