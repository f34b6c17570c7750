"""Numerical building blocks that must match PyTorch bit-for-bit or to float32 rounding.

* :func:`torch_bicubic_matrix` reproduces ``torch.nn.functional.interpolate(mode="bicubic",
  align_corners=False, antialias=False)`` (cubic convolution with ``A = -0.75``, border indices
  clamped) as a dense ``(out, in)`` weight matrix, so resizing is a differentiable pair of matmuls.
  ``jax.image.resize(method="cubic")`` uses ``A = -0.5`` and different edge handling, so it differs.
* :func:`layer_norm` keeps statistics in float32 and uses the two-pass variance like torch.
* :func:`activation` maps transformers' ``hidden_act`` names; ``"gelu"`` is the exact erf GELU.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

_CUBIC_A = np.float32(-0.75)


def _cubic_conv1(x: np.float32) -> np.float32:  # |x| <= 1
    a = _CUBIC_A
    return ((a + np.float32(2)) * x - (a + np.float32(3))) * x * x + np.float32(1)


def _cubic_conv2(x: np.float32) -> np.float32:  # 1 < |x| < 2
    a = _CUBIC_A
    return ((a * x - np.float32(5) * a) * x + np.float32(8) * a) * x - np.float32(4) * a


@functools.lru_cache(maxsize=64)
def torch_bicubic_matrix(in_size: int, out_size: int) -> np.ndarray:
    """``(out_size, in_size)`` float32 matrix ``W`` with ``W @ x == interpolate(x, bicubic)`` along one axis.

    Follows ATen's CPU kernel: source index ``scale * (i + 0.5) - 0.5`` in float32 with
    ``scale = in / out``, ``floor`` and a clamped fraction, four taps with clamped indices.
    """
    if in_size <= 0 or out_size <= 0:
        raise ValueError(f"bicubic resize needs positive sizes, got {in_size} -> {out_size}")
    weights = np.zeros((out_size, in_size), dtype=np.float32)
    scale = np.float32(in_size) / np.float32(out_size)
    for i in range(out_size):
        real = scale * (np.float32(i) + np.float32(0.5)) - np.float32(0.5)
        index = min(int(np.floor(real)), in_size - 1)
        t = np.float32(min(max(real - np.float32(index), np.float32(0)), np.float32(1)))
        coeffs = (
            _cubic_conv2(t + np.float32(1)),
            _cubic_conv1(t),
            _cubic_conv1(np.float32(1) - t),
            _cubic_conv2(np.float32(2) - t),
        )
        for j, c in enumerate(coeffs):
            weights[i, min(max(index - 1 + j, 0), in_size - 1)] += c
    weights.setflags(write=False)
    return weights


def resize_position_embeddings(pos: jax.Array, grid: int, out_hw: tuple[int, int]) -> jax.Array:
    """Resize ``[grid*grid, C]`` absolute position embeddings to ``[H, W, C]`` like torch's bicubic.

    Returns the embeddings unchanged (reshaped) when the grid already matches, as transformers does.
    """
    height, width = out_hw
    table = pos.reshape(grid, grid, pos.shape[-1])  # [gh, gw, C]
    if (grid, grid) == (height, width):
        return table
    w_h = jnp.asarray(torch_bicubic_matrix(grid, height))  # [H, gh]
    w_w = jnp.asarray(torch_bicubic_matrix(grid, width))  # [W, gw]
    hp = jax.lax.Precision.HIGHEST
    table = table.astype(jnp.float32)
    rows = jnp.einsum("Hi,ijc->Hjc", w_h, table, precision=hp)  # [H, gw, C]
    return jnp.einsum("Wj,Hjc->HWc", w_w, rows, precision=hp).astype(pos.dtype)  # [H, W, C]


@functools.lru_cache(maxsize=64)
def relative_position_index(size: int) -> np.ndarray:
    """``[size, size]`` indices into a ``(2*size - 1)``-row table: ``q - k + size - 1``.

    This is transformers' ``get_rel_pos`` for equal query and key sizes, where its linear
    re-interpolation is the identity.
    """
    coords = np.arange(size)
    index = coords[:, None] - coords[None, :] + (size - 1)
    index.setflags(write=False)
    return index


def relative_tables(rel_pos_h: jax.Array, rel_pos_w: jax.Array, grid: tuple[int, int]) -> tuple[jax.Array, jax.Array]:
    """Gather ``[H, H, hd]`` and ``[W, W, hd]`` tables indexed by ``(query, key)`` coordinates."""
    rows, cols = grid
    return rel_pos_h[relative_position_index(rows)], rel_pos_w[relative_position_index(cols)]


def layer_norm(x: jax.Array, scale: jax.Array, bias: jax.Array, eps: float) -> jax.Array:
    """LayerNorm over the last axis with float32 statistics and the two-pass variance."""
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    centred = x32 - mean
    var = jnp.mean(centred * centred, axis=-1, keepdims=True)
    y = centred * jax.lax.rsqrt(var + jnp.float32(eps))
    y = y * scale.astype(jnp.float32) + bias.astype(jnp.float32)
    return y.astype(x.dtype)


def activation(name: str):
    """The elementwise activation for a transformers ``hidden_act`` name."""
    if name == "gelu":
        return functools.partial(jax.nn.gelu, approximate=False)
    if name in ("gelu_new", "gelu_pytorch_tanh"):
        return functools.partial(jax.nn.gelu, approximate=True)
    if name == "relu":
        return jax.nn.relu
    if name in ("silu", "swish"):
        return jax.nn.silu
    if name == "quick_gelu":
        return lambda x: x * jax.nn.sigmoid(1.702 * x)
    raise ValueError(f"unsupported activation {name!r}")


def smooth_l1(pred: jax.Array, target: jax.Array, beta: float) -> jax.Array:
    """Elementwise ``torch.nn.functional.smooth_l1_loss(reduction="none", beta=beta)``."""
    diff = jnp.abs(pred - target)
    if beta == 0:
        return diff
    return jnp.where(diff < beta, 0.5 * diff * diff / beta, diff - 0.5 * beta)


def patch_mask_to_pixels(bool_masked_pos: jax.Array, grid: tuple[int, int], patch: int) -> jax.Array:
    """``[b, rows*cols]`` patch flags -> ``[b, rows*patch, cols*patch]`` pixel flags (float32)."""
    rows, cols = grid
    flags = bool_masked_pos.astype(jnp.float32).reshape(-1, rows, 1, cols, 1)
    flags = jnp.broadcast_to(flags, (flags.shape[0], rows, patch, cols, patch))
    return flags.reshape(-1, rows * patch, cols * patch)
