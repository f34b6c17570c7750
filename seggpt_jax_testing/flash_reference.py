"""A pure-JAX model of the flash kernel's algorithm (:mod:`seggpt_jax.nn.flash_attention`), for tests.

It follows the kernel step for step (online softmax over key blocks, the relative bias expanded per
block through the kernel's own one-hot matrix, padded keys masked with the kernel's mask value), so a
test can tell a wrong algorithm from a wrong Pallas lowering. It uses the kernel module's private
pieces on purpose: it must model exactly what the kernel does.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from seggpt_jax.nn.flash_attention import (_CPU_BLOCK, _MASK_VALUE, BlockSizes, _exact_precision, _Kernel,
                                           _relative_terms, _round_up)


def attention_flash_reference(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    scale: float,
    grid: tuple[int, int],
    rel_pos: tuple[jax.Array, jax.Array] | None,
    precision=None,
    block_k: int = _CPU_BLOCK,
) -> jax.Array:
    """Pure-JAX version of the kernel's algorithm: online softmax over key blocks (``lax.scan``) with the
    relative bias expanded per block through the one-hot matrix; all queries at once."""
    batch, seq, heads, dim = q.shape
    rows, cols = grid
    padded = _round_up(seq, block_k)
    spec = _Kernel(seq=seq, padded=padded, grid=(rows, cols), rel_width=0 if rel_pos is None else rows + cols,
                   blocks=BlockSizes(block_k, block_k), platform="cpu", interpret=True, precision=precision)
    bh = batch * heads
    per_head = lambda t: t.transpose(0, 2, 1, 3).reshape(bh, seq, dim)  # noqa: E731  [BH, N, hd]
    key_blocks = lambda t: jnp.pad(t, ((0, 0), (0, padded - seq), (0, 0))).reshape(  # noqa: E731
        t.shape[0], padded // block_k, block_k, t.shape[-1]).swapaxes(0, 1)  # [n_blocks, BH | 1, bk, C]
    q_heads = per_head(q)
    qs = q_heads * jnp.asarray(scale, q.dtype)  # [BH, N, hd]
    rel = None if rel_pos is None else _relative_terms(q_heads, grid, rel_pos, precision)  # [BH, N, H + W]
    xs = [key_blocks(per_head(k)), key_blocks(per_head(v)), jnp.arange(padded // block_k) * block_k]
    if rel is not None:
        xs.append(key_blocks(spec.key_onehot(rel.dtype)[None, :seq]))

    def step(carry, x):
        acc, m, l = carry  # [BH, N, hd], [BH, N, 1] x2
        k_blk, v_blk, start = x[0], x[1], x[2]
        s = jnp.einsum("bqd,bkd->bqk", qs, k_blk, precision=precision, preferred_element_type=jnp.float32)
        if rel is not None:
            s += jnp.einsum("bqr,kr->bqk", rel, x[3][0], precision=_exact_precision(rel.dtype),
                            preferred_element_type=jnp.float32)
        s = jnp.where(start + jnp.arange(block_k) < seq, s, _MASK_VALUE)  # [BH, N, bk]
        m_next = jnp.maximum(m, s.max(axis=-1, keepdims=True))
        p = jnp.exp(s - m_next)
        alpha = jnp.exp(m - m_next)
        pv = jnp.einsum("bqk,bkd->bqd", p.astype(v.dtype), v_blk, precision=precision,
                        preferred_element_type=jnp.float32)
        return (alpha * acc + pv, m_next, alpha * l + p.sum(axis=-1, keepdims=True)), None

    init = (jnp.zeros((bh, seq, dim), jnp.float32), jnp.full((bh, seq, 1), -jnp.inf, jnp.float32),
            jnp.zeros((bh, seq, 1), jnp.float32))
    (acc, _, l), _ = lax.scan(step, init, xs)
    out = (acc / l).astype(v.dtype)
    return out.reshape(batch, heads, seq, dim).transpose(0, 2, 1, 3)
