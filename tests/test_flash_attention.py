"""The Pallas flash-attention kernel with decomposed relative positions.

On CPU the kernels run in interpret mode and are compared with :func:`attention_plain` (forward and
``jax.grad``). The Triton and Mosaic lowerings are checked without a device through ``jax.export``.
"""

from __future__ import annotations

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import TINY_CONFIGS, max_abs, random_inputs, to_torch

from seggpt_jax import RuntimeConfig, SegGptForImageSegmentation
from seggpt_jax.nn.attention import attention_plain, resolve_impl
from seggpt_jax.nn.flash_attention import BlockSizes, attention_flash
from seggpt_jax_testing.flash_reference import attention_flash_reference

VIT_L_GRID = (56, 28)  # 1568 tokens
VIT_L_HEADS, VIT_L_DIM = 16, 64
F32_TOL = 1e-5  # max abs error relative to max |reference|
BF16_TOL = 1e-2  # measured 4-5e-3: about one bfloat16 rounding (2^-8) of the output


def make_inputs(batch: int, grid: tuple[int, int], heads: int, dim: int, *, rel: bool = True,
                dtype=jnp.float32, seed: int = 0):
    seq = grid[0] * grid[1]
    keys = jax.random.split(jax.random.key(seed), 6)
    q, k, v = (jax.random.normal(keys[i], (batch, seq, heads, dim), jnp.float32).astype(dtype) for i in range(3))
    rel_pos = None
    if rel:  # trained SegGPT tables are O(0.1-1): large enough that the relative terms shape the softmax
        rel_pos = (0.5 * jax.random.normal(keys[3], (2 * grid[0] - 1, dim), jnp.float32).astype(dtype),
                   0.5 * jax.random.normal(keys[4], (2 * grid[1] - 1, dim), jnp.float32).astype(dtype))
    cotangent = jax.random.normal(keys[5], (batch, seq, heads, dim), jnp.float32)
    return q, k, v, rel_pos, cotangent


def relative_error(ours, ref) -> float:
    ours, ref = np.asarray(ours, np.float32), np.asarray(ref, np.float32)
    assert ours.shape == ref.shape
    return float(np.abs(ours - ref).max() / np.abs(ref).max())


def forward_pair(q, k, v, rel_pos, grid, block_sizes=None):
    kwargs = dict(scale=q.shape[-1] ** -0.5, grid=grid)
    flash = jax.jit(lambda q, k, v, rp: attention_flash(q, k, v, rel_pos=rp, block_sizes=block_sizes, **kwargs))
    plain = jax.jit(lambda q, k, v, rp: attention_plain(q, k, v, rel_pos=rp, **kwargs))
    return flash(q, k, v, rel_pos), plain(q, k, v, rel_pos)


# ------------------------------------------------------------------------------- forward, interpret
@pytest.mark.parametrize("grid, batch, heads, dim, rel, blocks", [
    ((5, 3), 1, 1, 8, True, BlockSizes(8, 4)),  # several key blocks, last one partly padding
    ((8, 4), 3, 2, 16, True, None),
    ((15, 15), 2, 3, 32, True, BlockSizes(32, 16, 16, 32)),  # 225 -> 256, fully-padded key blocks skipped
    ((16, 8), 1, 4, 64, False, BlockSizes(16, 32)),
    ((5, 3), 2, 16, 8, False, None),
    ((16, 8), 2, 2, 16, True, BlockSizes(24, 40)),  # blocks that are not powers of two: 128 -> 240
])
def test_forward_matches_plain_on_small_grids(grid, batch, heads, dim, rel, blocks):
    q, k, v, rel_pos, _ = make_inputs(batch, grid, heads, dim, rel=rel)
    ours, ref = forward_pair(q, k, v, rel_pos, grid, blocks)
    assert ours.dtype == v.dtype
    assert relative_error(ours, ref) <= F32_TOL


def test_forward_matches_plain_on_vit_large_grid():
    q, k, v, rel_pos, _ = make_inputs(1, VIT_L_GRID, 2, VIT_L_DIM)
    ours, ref = forward_pair(q, k, v, rel_pos, VIT_L_GRID)
    assert relative_error(ours, ref) <= F32_TOL
    # the relative terms matter at this scale: dropping them is far outside the tolerance
    assert relative_error(ours, forward_pair(q, k, v, None, VIT_L_GRID)[1]) > 100 * F32_TOL


@pytest.mark.parametrize("grid, heads", [((16, 8), 3), (VIT_L_GRID, 1)])
def test_forward_bfloat16(grid, heads):
    q, k, v, rel_pos, _ = make_inputs(2, grid, heads, VIT_L_DIM, dtype=jnp.bfloat16)
    ours, ref = forward_pair(q, k, v, rel_pos, grid)
    assert ours.dtype == jnp.bfloat16
    assert relative_error(ours, ref) <= BF16_TOL


def test_pure_jax_reference_matches_plain():
    q, k, v, rel_pos, _ = make_inputs(2, (15, 15), 2, 16)
    kwargs = dict(scale=0.25, grid=(15, 15), rel_pos=rel_pos)
    ours = jax.jit(lambda q, k, v: attention_flash_reference(q, k, v, block_k=32, **kwargs))(q, k, v)
    assert relative_error(ours, jax.jit(lambda q, k, v: attention_plain(q, k, v, **kwargs))(q, k, v)) <= F32_TOL


@pytest.mark.parametrize("platform", ["gpu", "tpu"])
def test_device_layouts_in_interpret_mode(platform):
    """The GPU layout (head dim 8 -> 16, H + W = 8 -> 16, Triton's default blocks) and the TPU one
    (H + W -> 128, blocks of 128), run through the interpreter: forward and gradients."""
    grid = (5, 3)
    q, k, v, rel_pos, cotangent = make_inputs(2, grid, 2, 8, seed=2)

    def loss(fn, **extra):
        return jax.jit(jax.value_and_grad(
            lambda q, k, v, rp: jnp.sum(fn(q, k, v, scale=0.3, grid=grid, rel_pos=rp, **extra) * cotangent),
            argnums=(0, 1, 2, 3)))

    ours = loss(attention_flash, platform=platform, interpret=True)(q, k, v, rel_pos)
    ref = loss(attention_plain)(q, k, v, rel_pos)
    for g_ours, g_ref in zip(jax.tree.leaves(ours), jax.tree.leaves(ref), strict=True):
        assert relative_error(g_ours, g_ref) <= F32_TOL


# ---------------------------------------------------------------------------------- gradients
@pytest.mark.parametrize("grid, rel, blocks", [
    ((5, 3), True, BlockSizes(8, 4)),
    ((8, 4), True, None),
    ((6, 10), True, BlockSizes(16, 8, 8, 16)),  # non-square, backward blocks differ from forward
    ((4, 6), False, BlockSizes(8, 16)),
])
def test_gradients_match_plain(grid, rel, blocks):
    q, k, v, rel_pos, cotangent = make_inputs(2, grid, 2, 16, rel=rel, seed=1)

    def loss(fn, **extra):
        def f(q, k, v, rel_pos):
            out = fn(q, k, v, scale=0.25, grid=grid, rel_pos=rel_pos, **extra)
            return jnp.sum(out * cotangent)
        return jax.jit(jax.grad(f, argnums=(0, 1, 2, 3) if rel else (0, 1, 2)))

    ours = loss(attention_flash, block_sizes=blocks)(q, k, v, rel_pos)
    ref = loss(attention_plain)(q, k, v, rel_pos)
    names = ("q", "k", "v", "rel_pos_h", "rel_pos_w")[: 5 if rel else 3]
    for name, g_ours, g_ref in zip(names, jax.tree.leaves(ours), jax.tree.leaves(ref), strict=True):
        assert relative_error(g_ours, g_ref) <= F32_TOL, name


# --------------------------------------------------------------------------- nothing N x N exists
def tensor_shapes(module_text: str) -> list[tuple[int, ...]]:
    """Static shapes of every ``tensor<AxBx...xT>`` type in an MLIR module's text."""
    return [tuple(int(d) for d in dims.split("x")[:-1]) for dims in re.findall(r"tensor<((?:\d+x)+)", module_text)]


def assert_no_seq_by_seq(module_text: str, seq_lengths: set[int]):
    shapes = tensor_shapes(module_text)
    assert shapes, "no tensor types found"
    offending = [s for s in shapes if sum(d in seq_lengths for d in s) >= 2]
    assert not offending, f"tensors with two sequence dims: {offending[:5]}"


def test_interpreted_forward_and_backward_stay_tiled():
    """On CPU the kernels are lowered to plain HLO, so their insides show in the module text."""
    grid, blocks = (12, 10), BlockSizes(32, 32)  # 120 tokens, padded to 128
    q, k, v, rel_pos, _ = make_inputs(1, grid, 2, 16)

    def f(q, k, v, rel_pos):
        return jnp.sum(attention_flash(q, k, v, scale=0.25, grid=grid, rel_pos=rel_pos, block_sizes=blocks) ** 2)

    text = jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2, 3))).lower(q, k, v, rel_pos).as_text()
    assert_no_seq_by_seq(text, {120, 128})
    plain_text = jax.jit(lambda q, k, v: attention_plain(q, k, v, scale=0.25, grid=grid, rel_pos=rel_pos)).lower(
        q, k, v).as_text()
    with pytest.raises(AssertionError):  # the check does catch the plain path's [B, n, N, N] logits
        assert_no_seq_by_seq(plain_text, {120, 128})


# ------------------------------------------------------------------------- lowering without a device
TRITON_CALL = "__gpu$xla.gpu.triton"
KERNEL_CALLS = {"cuda": TRITON_CALL, "tpu": "tpu_custom_call"}
PALLAS_PLATFORM = {"cuda": "gpu", "tpu": "tpu"}


def vit_large_functions(platform: str):
    def forward(q, k, v, rel_pos):
        return attention_flash(q, k, v, scale=VIT_L_DIM ** -0.5, grid=VIT_L_GRID, rel_pos=rel_pos,
                               platform=PALLAS_PLATFORM[platform])

    def loss(q, k, v, rel_pos):
        return jnp.sum(forward(q, k, v, rel_pos).astype(jnp.float32) ** 2)

    return {"forward": forward, "value_and_grad": jax.value_and_grad(loss, argnums=(0, 1, 2, 3))}


@functools.lru_cache(maxsize=None)
def export_vit_large(platform: str, which: str) -> jax.export.Exported:
    seq = VIT_L_GRID[0] * VIT_L_GRID[1]
    token = jax.ShapeDtypeStruct((2, seq, VIT_L_HEADS, VIT_L_DIM), jnp.bfloat16)
    tables = (jax.ShapeDtypeStruct((2 * VIT_L_GRID[0] - 1, VIT_L_DIM), jnp.bfloat16),
              jax.ShapeDtypeStruct((2 * VIT_L_GRID[1] - 1, VIT_L_DIM), jnp.bfloat16))
    return jax.export.export(
        jax.jit(vit_large_functions(platform)[which]), platforms=[platform],
        disabled_checks=[jax.export.DisabledSafetyCheck.custom_call(TRITON_CALL)],
    )(token, token, token, tables)


@pytest.mark.parametrize("which, kernels", [("forward", 1), ("value_and_grad", 3)])  # backward: dq and dk/dv
@pytest.mark.parametrize("platform", ["cuda", "tpu"])
def test_exports_for_platform_without_device(platform, which, kernels):
    exported = export_vit_large(platform, which)
    text = exported.mlir_module()
    assert text.count(f"@{KERNEL_CALLS[platform]}(") == kernels
    seq = VIT_L_GRID[0] * VIT_L_GRID[1]
    padded = {p: -(-seq // BlockSizes.default(p, seq).alignment) * BlockSizes.default(p, seq).alignment
              for p in ("gpu", "tpu")}[PALLAS_PLATFORM[platform]]
    assert padded > seq
    assert_no_seq_by_seq(text, {seq, padded})


@pytest.mark.parametrize("platform", ["cuda", "tpu"])
def test_exported_gradient_serializes(platform):
    pytest.importorskip("flatbuffers")  # jax.export's serialisation dependency (optional)
    exported = export_vit_large(platform, "value_and_grad")
    restored = jax.export.deserialize(exported.serialize())
    assert restored.platforms == (platform,)
    assert restored.mlir_module().count(f"@{KERNEL_CALLS[platform]}(") == 3


def test_triton_kernels_verify_and_hold_only_tiles(monkeypatch):
    """The Triton IR itself (serialised inside the custom call): it verifies, and its largest tensor
    is one tile."""
    from jax._src.pallas.triton import lowering as triton_lowering

    modules = []
    lower = triton_lowering.lower_jaxpr_to_triton_module

    def recording(*args, **kwargs):
        result = lower(*args, **kwargs)
        modules.append(result.module.operation)
        return result

    monkeypatch.setattr(triton_lowering, "lower_jaxpr_to_triton_module", recording)
    export_vit_large.__wrapped__("cuda", "value_and_grad")  # not the cached export: lower again
    assert len(modules) == 3
    seq = VIT_L_GRID[0] * VIT_L_GRID[1]
    blocks = BlockSizes.default("gpu", seq)
    tile = max(blocks.block_q, blocks.block_k, *blocks.backward, 128)  # 128: H + W = 84 padded to a power of 2
    for module in modules:
        assert module.verify()
        shapes = tensor_shapes(module.get_asm())
        assert shapes and max(max(s) for s in shapes if s) <= tile


# --------------------------------------------------------------------------------- block sizes
def test_default_block_sizes_fit_platform_rules():
    seq = VIT_L_GRID[0] * VIT_L_GRID[1]
    gpu = BlockSizes.default("cuda", seq)
    for size in (gpu.block_q, gpu.block_k, *gpu.backward):
        assert size >= 16 and size & (size - 1) == 0  # Triton: power-of-two tiles, tl.dot sides >= 16
    tpu = BlockSizes.default("tpu", seq)
    assert all(size % 128 == 0 for size in (tpu.block_q, tpu.block_k, *tpu.backward))  # full lanes
    assert BlockSizes.default("cpu", 15).block_q == 16  # tiny grids are not padded to 128


def test_rejects_bad_arguments():
    q, k, v, rel_pos, _ = make_inputs(1, (5, 3), 1, 8)
    with pytest.raises(ValueError, match="grid"):
        attention_flash(q, k, v, scale=1.0, grid=(4, 4), rel_pos=None)
    with pytest.raises(ValueError, match="platform"):
        attention_flash(q, k, v, scale=1.0, grid=(5, 3), rel_pos=None, platform="metal")
    with pytest.raises(ValueError, match="positive"):
        BlockSizes(0, 8)


# ------------------------------------------------------------------------------------ the whole model
@pytest.mark.parametrize("name", sorted(TINY_CONFIGS))
def test_model_with_flash_attention_matches_transformers(hf_tiny, name):
    """The painter with ``attention="flash"`` (interpret mode on CPU) against transformers' own
    ``pred_masks``: one prompt per query, and the feature ensemble over the batch where the grid allows."""
    hf, path = hf_tiny(name)
    model = SegGptForImageSegmentation.from_pretrained(path, runtime=RuntimeConfig(attention="flash"))
    assert resolve_impl(model.settings.runtime.attention, model.settings.dtype) == "flash"
    inputs = random_inputs(model.config, batch=2, seed=4)
    cases = [{}] + ([{"feature_ensemble": True}] if model.config.grid_size[0] % 2 == 0 else [])
    for kwargs in cases:
        ours = model(**inputs, **kwargs).pred_masks
        with torch.no_grad():
            ref = hf(**to_torch(inputs), **kwargs).pred_masks
        assert float(np.abs(np.asarray(ours)).max()) > 0.05
        assert max_abs(ours, ref) <= 1e-5, kwargs
