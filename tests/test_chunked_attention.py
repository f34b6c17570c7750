"""Tiled attention with the FlashAttention-style backward (``seggpt_jax.nn.chunked_attention``).

References: ``attention_plain`` (full ``N x N`` logits) and ``jax.grad`` of it; a float64 NumPy
evaluation of the logit formula for the log-sum-exp; and, for memory, JAX's own autodiff of a plain
``lax.map`` over the same tiles (the previous design), written out in this file.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from seggpt_jax.nn.attention import attention_plain
from seggpt_jax.nn.chunked_attention import (LSE_NAME, OUT_NAME, attention_chunked, attention_delta,
                                             chunked_attention_backward, chunked_attention_forward, to_heads)

F32_TOL = 1e-5  # relative to the largest reference value
# bfloat16 keeps 8 significant bits (relative spacing 2**-8): against the float32 reference the bfloat16
# output may be off by four of its ulps at the output's scale, the gradients (bfloat16 residuals and
# outputs, float32 arithmetic) by a few per cent.
BF16_OUT_TOL = 2.0 ** -6
BF16_GRAD_TOL = 3e-2

POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "all_dots": jax.checkpoint_policies.dots_saveable,
    "names": jax.checkpoint_policies.save_only_these_names(OUT_NAME, LSE_NAME),
}


def _inputs(grid: tuple[int, int], heads: int, dim: int, batch: int = 2, seed: int = 0):
    """``q, k, v [B, N, heads, hd]``, ``(rel_pos_h [2H-1, hd], rel_pos_w [2W-1, hd])`` and an output cotangent."""
    rows, cols = grid
    rng = np.random.default_rng(seed)
    q, k, v, cotangent = (jnp.asarray(rng.standard_normal((batch, rows * cols, heads, dim), dtype=np.float32))
                          for _ in range(4))
    rel = (jnp.asarray(0.5 * rng.standard_normal((2 * rows - 1, dim), dtype=np.float32)),
           jnp.asarray(0.5 * rng.standard_normal((2 * cols - 1, dim), dtype=np.float32)))
    return q, k, v, rel, cotangent


def _relative_error(actual, expected) -> float:
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    return float(np.max(np.abs(actual - expected)) / np.max(np.abs(expected)))


def _grads(attend, q, k, v, rel, cotangent, relative: bool):
    """Gradients of ``sum(attention * cotangent)`` w.r.t. q, k, v (and both tables when ``relative``)."""
    def loss(q, k, v, rel_h, rel_w):
        out = attend(q, k, v, rel_pos=(rel_h, rel_w) if relative else None)
        return jnp.sum(out.astype(jnp.float32) * cotangent)
    grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3, 4)))(q, k, v, *rel)
    return grads if relative else grads[:3]


FORWARD_CASES = [((5, 3), 2, 8, 1, True), ((5, 3), 2, 8, 5, False), ((8, 4), 3, 16, 2, True),
                 ((15, 15), 2, 8, 3, True), ((15, 15), 2, 8, None, False), ((56, 28), 2, 64, None, True),
                 ((56, 28), 2, 64, 4, True), ((56, 28), 2, 64, None, False)]


@pytest.mark.parametrize("grid, heads, dim, tile_rows, relative", FORWARD_CASES)
def test_forward_matches_plain(grid, heads, dim, tile_rows, relative):
    q, k, v, rel, _ = _inputs(grid, heads, dim, batch=1 if grid == (56, 28) else 2)
    kwargs = dict(scale=dim ** -0.5, grid=grid)
    chunked = jax.jit(functools.partial(attention_chunked, tile_rows=tile_rows, **kwargs))
    plain = jax.jit(functools.partial(attention_plain, **kwargs))
    rel_pos = rel if relative else None
    out = chunked(q, k, v, rel_pos=rel_pos)
    assert out.shape == q.shape and out.dtype == jnp.float32
    assert _relative_error(out, plain(q, k, v, rel_pos=rel_pos)) <= F32_TOL


def test_forward_blocks_give_the_log_partition_function():
    """``(out, lse)`` against float64 NumPy from the formula
    ``s = scale q.k + q.R_h[qh - kh + H - 1] + q.R_w[qw - kw + W - 1]`` (the unscaled query in the relative terms)."""
    grid, heads, dim = (5, 3), 2, 8
    rows, cols = grid
    q, k, v, (rel_h, rel_w), _ = _inputs(grid, heads, dim)
    scale = dim ** -0.5
    q64, k64, v64 = (np.asarray(t, np.float64) for t in (q, k, v))
    row, col = np.divmod(np.arange(rows * cols), cols)  # grid coordinates of each token
    table_h = np.asarray(rel_h, np.float64)[row[:, None] - row[None, :] + rows - 1]  # [N(q), N(k), hd]
    table_w = np.asarray(rel_w, np.float64)[col[:, None] - col[None, :] + cols - 1]  # [N(q), N(k), hd]
    logits = (scale * np.einsum("bqnd,bknd->bnqk", q64, k64) + np.einsum("bqnd,qkd->bnqk", q64, table_h)
              + np.einsum("bqnd,qkd->bnqk", q64, table_w))  # [B, n, N, N]
    peak = logits.max(-1, keepdims=True)
    expected_lse = (peak + np.log(np.exp(logits - peak).sum(-1, keepdims=True)))[..., 0]  # [B, n, N]
    expected_out = np.einsum("bnqk,bknd->bqnd", np.exp(logits - expected_lse[..., None]), v64)

    out, lse = chunked_attention_forward(to_heads(q), to_heads(k), to_heads(v), (rel_h, rel_w), scale=scale,
                                         grid=grid, tile_rows=1)
    assert lse.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(lse).reshape(expected_lse.shape), expected_lse, rtol=F32_TOL, atol=F32_TOL)
    out = np.asarray(out).reshape(2, heads, rows * cols, dim).transpose(0, 2, 1, 3)
    assert _relative_error(out, expected_out) <= F32_TOL


def test_forward_in_bfloat16():
    grid, heads, dim = (8, 4), 3, 16
    q, k, v, rel, _ = _inputs(grid, heads, dim)
    kwargs = dict(scale=dim ** -0.5, grid=grid)
    bf16 = lambda tree: jax.tree.map(lambda t: t.astype(jnp.bfloat16), tree)  # noqa: E731
    chunked = jax.jit(functools.partial(attention_chunked, tile_rows=2, **kwargs))
    plain = jax.jit(functools.partial(attention_plain, **kwargs))
    out = chunked(*bf16((q, k, v)), rel_pos=bf16(rel))
    assert out.dtype == jnp.bfloat16
    reference = plain(q, k, v, rel_pos=rel)
    error = _relative_error(out, reference)
    assert error <= BF16_OUT_TOL
    # the logits stay in float32: no less accurate than the plain path in bfloat16 (up to one ulp)
    assert error <= _relative_error(plain(*bf16((q, k, v)), rel_pos=bf16(rel)), reference) + 2.0 ** -8


GRADIENT_CASES = [((5, 3), 2, 8, 1, True), ((8, 4), 3, 16, 2, True), ((6, 10), 2, 8, 3, True),
                  ((15, 15), 2, 8, 5, False), ((56, 28), 1, 64, None, True)]


@pytest.mark.parametrize("grid, heads, dim, tile_rows, relative", GRADIENT_CASES)
def test_gradients_match_autodiff_of_plain(grid, heads, dim, tile_rows, relative):
    q, k, v, rel, cotangent = _inputs(grid, heads, dim, batch=1 if grid == (56, 28) else 2, seed=1)
    kwargs = dict(scale=dim ** -0.5, grid=grid)
    actual = _grads(functools.partial(attention_chunked, tile_rows=tile_rows, **kwargs), q, k, v, rel, cotangent,
                    relative)
    expected = _grads(functools.partial(attention_plain, **kwargs), q, k, v, rel, cotangent, relative)
    for name, a, e in zip(("q", "k", "v", "rel_pos_h", "rel_pos_w"), actual, expected):
        assert a.shape == e.shape and a.dtype == jnp.float32
        assert _relative_error(a, e) <= F32_TOL, name


def _stacked_layers(attend, policy, grid: tuple[int, int], heads: int, dim: int):
    """A loss over two attention layers under ``lax.scan``, each a ``jax.checkpoint`` with ``policy``:
    ``x -> x + attention(tanh(x), sin(x), cos(x))`` with per-layer tables."""
    rows, cols = grid
    seq = rows * cols

    def layer(x, tables):
        split = lambda t: t.reshape(x.shape[0], seq, heads, dim)  # noqa: E731
        out = attend(split(jnp.tanh(x)), split(jnp.sin(x)), split(jnp.cos(x)), scale=dim ** -0.5, grid=grid,
                     rel_pos=tables)
        return x + out.reshape(x.shape), None

    step = layer if policy is None else jax.checkpoint(layer, policy=policy)

    def loss(x, tables_h, tables_w):
        y, _ = jax.lax.scan(step, x, (tables_h, tables_w))
        return jnp.sum(y ** 2)
    return loss


STACK_GRID, STACK_HEADS, STACK_DIM, STACK_LAYERS = (6, 4), 2, 8, 2


@functools.cache
def _stack_inputs():
    rows, cols = STACK_GRID
    rng = np.random.default_rng(2)
    x = jnp.asarray(0.5 * rng.standard_normal((2, rows * cols, STACK_HEADS * STACK_DIM), dtype=np.float32))
    tables_h = jnp.asarray(0.5 * rng.standard_normal((STACK_LAYERS, 2 * rows - 1, STACK_DIM), dtype=np.float32))
    tables_w = jnp.asarray(0.5 * rng.standard_normal((STACK_LAYERS, 2 * cols - 1, STACK_DIM), dtype=np.float32))
    return x, tables_h, tables_w


def _stack_grads(attend, policy):
    loss = _stacked_layers(attend, policy, STACK_GRID, STACK_HEADS, STACK_DIM)
    return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(*_stack_inputs())


@functools.cache
def _stack_reference_grads():
    """Autodiff of the plain attention, no remat (remat does not change the values)."""
    return _stack_grads(attention_plain, None)


@pytest.mark.parametrize("policy", ["none", "dots", "names"])
def test_gradients_under_checkpoint_and_layer_scan(policy):
    actual = _stack_grads(functools.partial(attention_chunked, tile_rows=2), POLICIES[policy])
    for name, a, e in zip(("x", "rel_pos_h", "rel_pos_w"), actual, _stack_reference_grads()):
        assert _relative_error(a, e) <= F32_TOL, name


def test_named_residuals_spare_the_forward_rerun():
    """Under ``jax.checkpoint`` the tiled forward is one call: saving the named output and log-sum-exp
    keeps it out of the backward pass; a policy that saves neither reruns it there, once."""
    grid = (6, 4)
    q, k, v, rel, _ = _inputs(grid, 2, 8)

    def forward_calls(policy) -> int:
        def loss(q, k, v, rel):
            return jnp.sum(attention_chunked(q, k, v, scale=0.25, grid=grid, rel_pos=rel, tile_rows=2) ** 2)
        loss = loss if policy is None else jax.checkpoint(loss, policy=policy)
        return str(jax.make_jaxpr(jax.grad(loss, argnums=(0, 1, 2, 3)))(q, k, v, rel)).count("custom_jvp_call")

    assert forward_calls(None) == 1
    assert forward_calls(POLICIES["names"]) == forward_calls(jax.checkpoint_policies.everything_saveable) == 1
    assert forward_calls(POLICIES["full"]) == forward_calls(POLICIES["dots"]) == 2


def test_gradients_in_bfloat16():
    grid, heads, dim = (8, 4), 3, 16
    q, k, v, rel, cotangent = _inputs(grid, heads, dim, seed=3)
    kwargs = dict(scale=dim ** -0.5, grid=grid)
    bf16 = lambda tree: jax.tree.map(lambda t: t.astype(jnp.bfloat16), tree)  # noqa: E731
    actual = _grads(functools.partial(attention_chunked, tile_rows=2, **kwargs), *bf16((q, k, v, rel)), cotangent, True)
    expected = _grads(functools.partial(attention_plain, **kwargs), q, k, v, rel, cotangent, True)
    for name, a, e in zip(("q", "k", "v", "rel_pos_h", "rel_pos_w"), actual, expected):
        assert a.dtype == jnp.bfloat16
        assert _relative_error(a, e) <= BF16_GRAD_TOL, name


def test_backward_block_takes_any_forward_tiling():
    """The backward from ``(lse, delta)`` alone, as another forward kernel would call it: the forward and
    the backward tiled differently, against ``jax.vjp`` of the plain attention."""
    grid, heads, dim = (8, 6), 2, 8
    q, k, v, rel, cotangent = _inputs(grid, heads, dim, seed=4)
    scale = dim ** -0.5

    @jax.jit
    def forward_then_backward(q, k, v, rel, cotangent):
        out, lse = chunked_attention_forward(to_heads(q), to_heads(k), to_heads(v), rel, scale=scale, grid=grid,
                                             tile_rows=8)
        out = out.reshape(2, heads, -1, dim).transpose(0, 2, 1, 3)  # [B, N, n, hd]
        return chunked_attention_backward(to_heads(q), to_heads(k), to_heads(v), rel, lse,
                                          attention_delta(out, cotangent), to_heads(cotangent), scale=scale,
                                          grid=grid, tile_rows=2)

    @jax.jit
    def plain_vjp(q, k, v, rel, cotangent):
        plain = lambda q, k, v, rel: attention_plain(q, k, v, scale=scale, grid=grid, rel_pos=rel)  # noqa: E731
        return jax.vjp(plain, q, k, v, rel)[1](cotangent)

    d_q, d_k, d_v, (d_rel_h, d_rel_w) = forward_then_backward(q, k, v, rel, cotangent)
    expected = plain_vjp(q, k, v, rel, cotangent)
    for name, a, e in zip(("q", "k", "v"), (d_q, d_k, d_v), expected[:3]):
        assert _relative_error(np.asarray(a).reshape(2, heads, -1, dim).transpose(0, 2, 1, 3), e) <= F32_TOL, name
    assert _relative_error(d_rel_h, expected[3][0]) <= F32_TOL and _relative_error(d_rel_w, expected[3][1]) <= F32_TOL


# ------------------------------------------------------------------------------------ memory
def _lax_map_attention(q, k, v, *, scale, grid, rel_pos, tile_rows):
    """The previous design, for comparison: ``lax.map`` over per-head query tiles, left to JAX's autodiff
    (which stores every tile's softmax for the backward)."""
    batch, seq, heads, dim = q.shape
    rows, cols = grid
    chunks, bn = rows // tile_rows, batch * heads
    q_heads, k_heads, v_heads = to_heads(q), to_heads(k), to_heads(v)  # [B*n, N, hd]
    table_h = rel_pos[0][np.arange(rows)[:, None] - np.arange(rows)[None, :] + rows - 1]  # [H, H, hd]
    table_w = rel_pos[1][np.arange(cols)[:, None] - np.arange(cols)[None, :] + cols - 1]  # [W, W, hd]
    q_grid = q_heads.reshape(bn, rows, cols, dim)
    rel_h = jnp.einsum("bhwc,hkc->bhwk", q_grid, table_h).reshape(bn * chunks, tile_rows, cols, rows)
    rel_w = jnp.einsum("bhwc,wkc->bhwk", q_grid, table_w).reshape(bn * chunks, tile_rows, cols, cols)

    def tile(args):
        q_tile, head, tile_rel_h, tile_rel_w = args
        logits = jnp.einsum("qd,kd->qk", q_tile * scale, k_heads[head]).reshape(tile_rows, cols, rows, cols)
        logits = (logits + tile_rel_h[..., :, None] + tile_rel_w[..., None, :]).reshape(tile_rows * cols, seq)
        return jax.nn.softmax(logits, axis=-1) @ v_heads[head]  # [r*W, hd]

    out = jax.lax.map(tile, (q_heads.reshape(bn * chunks, tile_rows * cols, dim),
                             jnp.repeat(jnp.arange(bn), chunks), rel_h, rel_w))
    return out.reshape(batch, heads, seq, dim).transpose(0, 2, 1, 3)


MEMORY_GRID, MEMORY_HEADS, MEMORY_DIM, MEMORY_TILE_ROWS = (32, 32), 2, 16, 2


def _abstract_layer_inputs(layers: int):
    rows, cols = MEMORY_GRID
    return (jax.ShapeDtypeStruct((1, rows * cols, MEMORY_HEADS * MEMORY_DIM), jnp.float32),
            jax.ShapeDtypeStruct((layers, 2 * rows - 1, MEMORY_DIM), jnp.float32),
            jax.ShapeDtypeStruct((layers, 2 * cols - 1, MEMORY_DIM), jnp.float32))


def _memory_attend(impl):
    return lambda *a, **kw: impl(*a, tile_rows=MEMORY_TILE_ROWS, **kw)


@pytest.mark.parametrize("policy", list(POLICIES))
def test_residuals_hold_nothing_quadratic(policy):
    """No residual of the vjp (under any remat policy) is ``N x N`` or tile-stacked ``[tiles, r*W, N]``:
    each is at most one layer activation ``[B, N, heads * hd]``. The old design's residuals are not."""
    rows, cols = MEMORY_GRID
    seq, layers = rows * cols, 2
    activation = seq * MEMORY_HEADS * MEMORY_DIM

    def residual_sizes(impl) -> list[int]:
        loss = _stacked_layers(_memory_attend(impl), POLICIES[policy], MEMORY_GRID, MEMORY_HEADS, MEMORY_DIM)
        pullback = jax.eval_shape(lambda *a: jax.vjp(loss, *a)[1], *_abstract_layer_inputs(layers))
        return [int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(pullback)]

    assert max(residual_sizes(attention_chunked)) <= layers * activation  # stacked over the scanned layers
    if policy in ("none", "dots", "all_dots"):  # the old design keeps every tile's softmax (or logits)
        assert max(residual_sizes(_lax_map_attention)) >= layers * MEMORY_HEADS * seq * seq


def test_training_temp_memory_does_not_scale_with_heads_n_squared():
    """Compile (not run) value_and_grad of 1 and 3 attention layers: the new temp memory grows by a few
    activations per layer (not by ``heads * N^2``), stays within a few tiles plus activations, and is a
    small fraction of autodiff of a plain ``lax.map`` over the same tiles."""
    rows, cols = MEMORY_GRID
    seq = rows * cols
    activation_bytes = seq * MEMORY_HEADS * MEMORY_DIM * 4
    weights_bytes = MEMORY_HEADS * seq * seq * 4  # one layer's softmax, all heads
    tile_bytes = MEMORY_TILE_ROWS * cols * seq * 4

    def temp_bytes(impl, layers: int) -> int:
        loss = _stacked_layers(_memory_attend(impl), None, MEMORY_GRID, MEMORY_HEADS, MEMORY_DIM)
        compiled = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2))).lower(*_abstract_layer_inputs(layers)).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    new = {layers: temp_bytes(attention_chunked, layers) for layers in (1, 3)}
    old = temp_bytes(_lax_map_attention, 3)
    assert old >= 3 * weights_bytes  # the comparison does keep each layer's softmax
    new_per_layer = (new[3] - new[1]) / 2
    assert new_per_layer <= weights_bytes / 4
    assert new_per_layer <= 16 * activation_bytes
    assert new[1] <= 8 * tile_bytes + 16 * activation_bytes
    assert new[3] <= old / 4
