"""Numerical building blocks that must match PyTorch bit-for-bit or to float32 rounding.

* :func:`torch_bicubic_matrix` reproduces ``torch.nn.functional.interpolate(mode="bicubic",
  align_corners=False, antialias=False)`` (cubic convolution with ``A = -0.75``, border indices
  clamped) as a dense ``(out, in)`` weight matrix, so resizing is a differentiable pair of matmuls.
  ``jax.image.resize(method="cubic")`` uses ``A = -0.5`` and different edge handling, so it differs.
* :func:`layer_norm` keeps statistics in float32 and uses the two-pass variance like torch.
* :func:`activation` maps transformers' ``hidden_act`` names; ``"gelu"`` is the exact erf GELU.

:func:`layer_norm` carries its derivative (``jax.custom_jvp``, torch's formula): the backward pass keeps
the normalised input, where autodiff of the formula also keeps ``x - mean``. (The GELU is left to
autodiff: XLA fuses its derivative into the backward pass from the pre-activation, so a custom rule that
keeps ``gelu'(x)`` costs one more array per layer.) :func:`remat` is ``jax.checkpoint`` whose
recomputation cannot be moved into the forward pass (see there).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.custom_derivatives import SymbolicZero

from ..runtime import DATA_AXIS

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


def _layer_norm_parts(x: jax.Array, scale: jax.Array, bias: jax.Array,
                      eps: float) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``(out in x's dtype, y = (x - mean) / std, 1 / std)``, all statistics float32."""
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    centred = x32 - mean
    var = jnp.mean(centred * centred, axis=-1, keepdims=True)
    inv_std = jax.lax.rsqrt(var + jnp.float32(eps))  # [..., 1]
    y = centred * inv_std
    out = y * scale.astype(jnp.float32) + bias.astype(jnp.float32)
    return out.astype(x.dtype), y, inv_std


@functools.partial(jax.custom_jvp, nondiff_argnums=(3,))
def layer_norm(x: jax.Array, scale: jax.Array, bias: jax.Array, eps: float) -> jax.Array:
    """LayerNorm over the last axis with float32 statistics and the two-pass variance.

    Derivative (torch's): ``d out = scale * (dx - mean(dx) - y mean(dx y)) / std + dscale * y + dbias``;
    the backward pass keeps ``y`` (float32) and ``1 / std``."""
    return _layer_norm_parts(x, scale, bias, eps)[0]


@functools.partial(layer_norm.defjvp, symbolic_zeros=True)
def _layer_norm_jvp(eps: float, primals: tuple, tangents: tuple) -> tuple[jax.Array, jax.Array]:
    x, scale, bias = primals
    dx, dscale, dbias = tangents
    out, y, inv_std = _layer_norm_parts(x, scale, bias, eps)
    terms = []  # float32, [..., C] or [C]
    if not isinstance(dx, SymbolicZero):
        dx = dx.astype(jnp.float32)
        d_y = inv_std * (dx - jnp.mean(dx, axis=-1, keepdims=True) - y * jnp.mean(dx * y, axis=-1, keepdims=True))
        terms.append(d_y * scale.astype(jnp.float32))
    if not isinstance(dscale, SymbolicZero):
        terms.append(y * dscale.astype(jnp.float32))
    if not isinstance(dbias, SymbolicZero):
        terms.append(dbias.astype(jnp.float32))
    d_out = functools.reduce(jnp.add, terms) if terms else jnp.zeros(y.shape, jnp.float32)
    return out, jnp.broadcast_to(d_out, y.shape).astype(x.dtype)


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


# ------------------------------------------------------------------------------------ linear
@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def linear(x: jax.Array, kernel: jax.Array, precision: Any = None) -> jax.Array:
    """``x @ kernel`` over the last axis (``[..., in] x [in, out] -> [..., out]``, one ``dot_general``) whose
    kernel gradient is computed after its input gradient.

    The backward pass reads the kernel for ``dx = dy kernel^T``; a training step that donates the
    parameters writes the updated kernel over the old one. Unless the kernel's gradient (from which
    the update is computed) depends on ``dx``, XLA cannot prove that the update comes after that read
    and keeps a copy of every kernel for the whole step (ViT-L: 1.4 GB). Here the gradient is scaled by
    a 1 computed from ``dx`` (:func:`_one_after`); the numbers are those of autodiff."""
    return jax.lax.dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ())), precision=precision)


def _linear_fwd(x: jax.Array, kernel: jax.Array, precision: Any) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    return linear(x, kernel, precision), (x, kernel)


def _linear_bwd(precision: Any, saved: tuple[jax.Array, jax.Array], d_out: jax.Array) -> tuple[jax.Array, jax.Array]:
    x, kernel = saved  # [..., in], [in, out]
    d_x = jax.lax.dot_general(d_out, kernel, (((d_out.ndim - 1,), (1,)), ((), ())), precision=precision)  # [..., in]
    batch = tuple(range(x.ndim - 1))
    d_kernel = jax.lax.dot_general(x, d_out, ((batch, batch), ((), ())), precision=precision)  # [in, out]
    return d_x.astype(x.dtype), (d_kernel * _one_after(d_x).astype(d_kernel.dtype)).astype(kernel.dtype)


linear.defvjp(_linear_fwd, _linear_bwd)


# ------------------------------------------------------------------------------------ remat
@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class _Residuals:
    """What :func:`remat`'s forward keeps: the pullback's arrays, and which of them wait for the cotangent."""

    leaves: list[jax.Array]
    treedef: Any = dataclasses.field(metadata=dict(static=True))
    wait: tuple[bool, ...] = dataclasses.field(metadata=dict(static=True))


def _one_after(cotangent: Any) -> jax.Array | None:
    """A float32 scalar 1 that XLA cannot compute before ``cotangent`` exists (``None``: no float leaf).

    ``0 * c`` is 0 or NaN (``c`` infinite or NaN), and the ``where`` makes it 0: ``x * one == x`` for every
    ``x``, bit for bit. XLA folds neither step, as it cannot know ``c``."""
    leaves = [leaf for leaf in jax.tree.leaves(cotangent) if jnp.issubdtype(leaf.dtype, jnp.floating)]
    if not leaves:
        return None
    zero = leaves[0].reshape(-1)[0].astype(jnp.float32) * 0
    return 1 + jnp.where(jnp.isnan(zero), jnp.float32(0), zero)


def rows_mesh(rows: int):
    """The mesh in context (``jax.set_mesh``, at trace time) when ``rows`` batch rows split over its data
    axis; ``None`` with no mesh, no data axis, inside the caller's own ``shard_map`` over it, or rows
    that do not divide over it."""
    mesh = jax.sharding.get_abstract_mesh()
    if (mesh.empty or DATA_AXIS not in mesh.axis_names or DATA_AXIS in set(getattr(mesh, "manual_axes", ()))
            or rows % mesh.shape[DATA_AXIS]):
        return None
    return mesh


def batch_sharded(x: jax.Array) -> jax.Array:
    """``x`` split over the mesh's data axis along its first (batch) axis, when :func:`rows_mesh` gives a
    mesh for its rows, else unchanged. For activations that follow a matmul with split (``"fsdp"``)
    weights: XLA may otherwise lay the product out as the weight is split, and an axis permutation of
    it then needs the whole array on every device."""
    if x.ndim == 0 or rows_mesh(x.shape[0]) is None:
        return x
    return jax.lax.with_sharding_constraint(x, jax.sharding.PartitionSpec(DATA_AXIS))


def zeros_after(shape: tuple[int, ...], dtype: Any, dependency: Any) -> jax.Array:
    """Zeros that XLA cannot allocate before ``dependency`` (an array or pytree with a float leaf) exists.

    For the buffers a loop writes its results into: a plain ``jnp.zeros`` (or the output buffer of a
    ``lax.scan``) depends on nothing, and XLA:CPU's scheduler may materialise it at the very start of
    the program, where every such buffer of every layer then lives through the whole step."""
    return jnp.broadcast_to((_one_after(dependency) - 1).astype(dtype), shape)


def remat(fn: Callable[..., Any], policy: Callable[..., bool]) -> Callable[..., Any]:
    """``jax.checkpoint(fn, policy=policy)`` whose recomputation runs in the backward pass, on every backend.

    ``fn(params, *args)``; the leaves of ``params`` (the weights, live anyway) are kept as they are.

    ``jax.checkpoint`` guards its recomputation with optimization barriers, which XLA:CPU removes
    (``OptimizationBarrierExpander``) before it schedules: the recomputation depends on forward values
    only, so the scheduler runs it early and its activations live as long as without remat (the figures
    are in ``benchmarks/RESULTS.md``, training memory). Here the
    checkpointed function's pullback is this function's backward rule (a ``jax.custom_vjp``), and every
    float residual it recomputes from, except the weights, is multiplied by a 1 computed from the
    cotangent (:func:`_one_after`): an exact copy that exists only once the backward pass gets here.
    """
    checkpointed = jax.checkpoint(fn, policy=policy)

    @jax.custom_vjp
    def call(*args: Any) -> Any:
        return fn(*args)

    def forward(*args: Any) -> tuple[Any, _Residuals]:
        out, pullback = jax.vjp(checkpointed, *args)
        weights = {id(leaf) for leaf in jax.tree.leaves(args[0])}
        leaves, treedef = jax.tree.flatten(pullback)
        wait = tuple(id(leaf) not in weights and jnp.issubdtype(leaf.dtype, jnp.floating) for leaf in leaves)
        return out, _Residuals(leaves, treedef, wait)

    def backward(saved: _Residuals, cotangent: Any) -> tuple:
        one = _one_after(cotangent)
        leaves = [leaf * one.astype(leaf.dtype) if wait and one is not None else leaf
                  for leaf, wait in zip(saved.leaves, saved.wait)]
        return jax.tree.unflatten(saved.treedef, leaves)(cotangent)

    call.defvjp(forward, backward)
    return call
