"""The Pallas flash-attention kernels with decomposed relative positions.

Each kernel test picks where it runs explicitly (:data:`RUN`): on a CPU host the kernels run in the
Pallas interpreter with the CPU layout; on a GPU or TPU host they run on the device, compiled. Cases
marked ``interpret_only`` run another platform's layout, or tiles Triton/Mosaic cannot lower, through
the interpreter; they skip on a device, where the device cases cover the real lowering. The Triton and
Mosaic lowerings are also checked without a device through ``jax.export``.

Tolerances (max abs error relative to max |reference|, :func:`tolerance`), per dtype and platform,
against :func:`attention_plain` at the same precision (float32 tests use ``precision="highest"``, so
Triton runs IEEE float32 and the TPU full float32 contraction, as XLA does for the plain path):

* float32: 1e-5 on CPU and GPU (measured 1-9e-7 in the interpreter: summation order only), 5e-5 on
  TPU (its exp and reciprocal are not correctly rounded);
* bfloat16: 1e-2 everywhere (measured 4-5e-3: about one bfloat16 rounding, 2^-8, of the output).
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
from seggpt_jax.nn.flash_attention import BlockSizes, FlashOptions, Partitioning, attention_flash, default_bias
from seggpt_jax_testing.flash_reference import attention_flash_reference

VIT_L_GRID = (56, 28)  # 1568 tokens
VIT_L_HEADS, VIT_L_DIM = 16, 64
BACKEND = jax.default_backend()
ON_DEVICE = BACKEND in ("gpu", "tpu")
#: Where the kernel tests run: the device itself, or the interpreter on a CPU host.
RUN = dict(platform=BACKEND, interpret=not ON_DEVICE)
interpret_only = pytest.mark.skipif(ON_DEVICE, reason="another platform's layout, or tiles only the Pallas "
                                                      "interpreter takes; the device cases cover this device")
TOLERANCES = {"float32": {"cpu": 1e-5, "gpu": 1e-5, "tpu": 5e-5}, "bfloat16": {"cpu": 1e-2, "gpu": 1e-2, "tpu": 1e-2}}
BIASES = ["onehot"] if BACKEND == "tpu" else ["rows", "onehot"]  # "rows" is not a Mosaic layout


def tolerance(dtype) -> float:
    return TOLERANCES[jnp.dtype(dtype).name][BACKEND]


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


def forward_pair(q, k, v, rel_pos, grid, **flash):
    precision = "highest" if q.dtype == jnp.float32 else None
    kwargs = dict(scale=q.shape[-1] ** -0.5, grid=grid, precision=precision)
    flash = {**RUN, **flash}
    ours = jax.jit(lambda q, k, v, rp: attention_flash(q, k, v, rel_pos=rp, **flash, **kwargs))
    plain = jax.jit(lambda q, k, v, rp: attention_plain(q, k, v, rel_pos=rp, **kwargs))
    return ours(q, k, v, rel_pos), plain(q, k, v, rel_pos)


def gradient_pair(q, k, v, rel_pos, cotangent, grid, scale=0.25, **flash):
    """``jax.grad`` of ``sum(attention * cotangent)`` w.r.t. q, k, v (and both tables), flash vs plain."""
    def loss(fn, **extra):
        def f(q, k, v, rel_pos):
            return jnp.sum(fn(q, k, v, scale=scale, grid=grid, rel_pos=rel_pos, precision="highest", **extra)
                           * cotangent)
        return jax.jit(jax.grad(f, argnums=(0, 1, 2, 3) if rel_pos is not None else (0, 1, 2)))

    return loss(attention_flash, **{**RUN, **flash})(q, k, v, rel_pos), loss(attention_plain)(q, k, v, rel_pos)


# ------------------------------------------------------------------------------------ forward
@pytest.mark.parametrize("bias", BIASES)
@pytest.mark.parametrize("grid, batch, heads, dim, rel, blocks", [
    pytest.param((5, 3), 1, 1, 8, True, BlockSizes(8, 4), marks=interpret_only),  # tiles under Triton's 16
    ((8, 4), 3, 2, 16, True, None),
    ((15, 15), 2, 3, 32, True, None),  # 225 tokens: the last key block partly padding
    pytest.param((15, 15), 2, 3, 32, True, BlockSizes(32, 16, 16, 32), marks=interpret_only),
    ((16, 8), 1, 4, 64, False, BlockSizes(16, 32)),
    ((5, 3), 2, 16, 8, False, None),
    pytest.param((16, 8), 2, 2, 16, True, BlockSizes(24, 40), marks=interpret_only),  # not powers of two
])
def test_forward_matches_plain_on_small_grids(grid, batch, heads, dim, rel, blocks, bias):
    if bias == "rows" and blocks is not None and blocks.block_k % (1 << (grid[1] - 1).bit_length()):
        pytest.skip("key blocks smaller than a padded grid row")
    q, k, v, rel_pos, _ = make_inputs(batch, grid, heads, dim, rel=rel)
    ours, ref = forward_pair(q, k, v, rel_pos, grid, block_sizes=blocks, bias=bias)
    assert ours.dtype == v.dtype
    assert relative_error(ours, ref) <= tolerance(q.dtype)


@pytest.mark.parametrize("bias", BIASES)
def test_forward_matches_plain_on_vit_large_grid(bias):
    q, k, v, rel_pos, _ = make_inputs(1, VIT_L_GRID, 2, VIT_L_DIM)
    ours, ref = forward_pair(q, k, v, rel_pos, VIT_L_GRID, bias=bias)
    assert relative_error(ours, ref) <= tolerance(q.dtype)
    # the relative terms matter at this scale: dropping them is far outside the tolerance
    assert relative_error(ours, forward_pair(q, k, v, None, VIT_L_GRID)[1]) > 100 * tolerance(q.dtype)


@pytest.mark.parametrize("bias", BIASES)
@pytest.mark.parametrize("grid, heads", [((16, 8), 3), (VIT_L_GRID, 1)])
def test_forward_bfloat16(grid, heads, bias):
    q, k, v, rel_pos, _ = make_inputs(2, grid, heads, VIT_L_DIM, dtype=jnp.bfloat16)
    ours, ref = forward_pair(q, k, v, rel_pos, grid, bias=bias)
    assert ours.dtype == jnp.bfloat16
    assert relative_error(ours, ref) <= tolerance(q.dtype)


@pytest.mark.parametrize("bias, block_k", [("onehot", 32), ("rows", 32), ("rows", 16)])
def test_pure_jax_reference_matches_plain(bias, block_k):
    q, k, v, rel_pos, _ = make_inputs(2, (15, 15), 2, 16)
    kwargs = dict(scale=0.25, grid=(15, 15), rel_pos=rel_pos, precision="highest")
    ours = jax.jit(lambda q, k, v: attention_flash_reference(q, k, v, block_k=block_k, bias=bias, **kwargs))(q, k, v)
    assert relative_error(ours, jax.jit(lambda q, k, v: attention_plain(q, k, v, **kwargs))(q, k, v)) <= 1e-5


@interpret_only
@pytest.mark.parametrize("platform", ["gpu", "tpu"])
def test_device_layouts_in_interpret_mode(platform):
    """The GPU layout (row-aligned keys, head dim 8 -> 16, Triton's default blocks) and the TPU one
    (one-hot bias 8 -> 128 wide, blocks of 128, statistics lane-broadcast to 128 in VMEM scratch),
    run through the interpreter: forward and every gradient."""
    grid = (5, 3)
    q, k, v, rel_pos, cotangent = make_inputs(2, grid, 2, 8, seed=2)

    def loss(fn, **extra):
        return jax.jit(jax.value_and_grad(
            lambda q, k, v, rp: jnp.sum(fn(q, k, v, scale=0.3, grid=grid, rel_pos=rp, **extra) * cotangent),
            argnums=(0, 1, 2, 3)))

    ours = loss(attention_flash, platform=platform, interpret=True)
    ref = loss(attention_plain)(q, k, v, rel_pos)
    for g_ours, g_ref in zip(jax.tree.leaves(ours(q, k, v, rel_pos)), jax.tree.leaves(ref), strict=True):
        assert relative_error(g_ours, g_ref) <= 1e-5
    # the layout under test is the platform's: TPU statistics are [B, h, N_pad, 128] float32
    stats = {eqn.outvars[-1].aval.shape[-1] for eqn in _pallas_calls(ours, q, k, v, rel_pos)
             if eqn.params["name"] == "flash_relpos_fwd"}
    assert stats == {128 if platform == "tpu" else 1}


def test_tpu_statistics_layout_over_many_key_blocks_in_interpret_mode():
    """The TPU layout where it matters: several 128-key blocks (the running max and sum carried in VMEM
    scratch and lane-broadcast statistics), a partly padded last block, head dim 64 < 128 lanes."""
    if BACKEND == "gpu":
        pytest.skip("the TPU layout in the interpreter: runs on CPU and TPU hosts")
    grid = (20, 15)  # 300 tokens: 3 key blocks of 128
    q, k, v, rel_pos, cotangent = make_inputs(1, grid, 2, 64, seed=5)
    ours, ref = gradient_pair(q, k, v, rel_pos, cotangent, grid, platform="tpu", interpret=BACKEND == "cpu")
    for name, g_ours, g_ref in zip("q k v rel_pos_h rel_pos_w".split(), jax.tree.leaves(ours), jax.tree.leaves(ref)):
        assert relative_error(g_ours, g_ref) <= tolerance(jnp.float32), name


# ---------------------------------------------------------------------------------- gradients
@pytest.mark.parametrize("bias", BIASES)
@pytest.mark.parametrize("grid, rel, blocks", [
    pytest.param((5, 3), True, BlockSizes(8, 4), marks=interpret_only),
    ((8, 4), True, None),
    ((6, 10), True, BlockSizes(16, 16, 16, 32)),  # non-square, backward blocks differ from forward
    ((4, 40), True, None),  # a padded row (64 keys) wider than the default backward key block
    ((4, 6), False, BlockSizes(16, 16)),
])
def test_gradients_match_plain(grid, rel, blocks, bias):
    q, k, v, rel_pos, cotangent = make_inputs(2, grid, 2, 16, rel=rel, seed=1)
    ours, ref = gradient_pair(q, k, v, rel_pos, cotangent, grid, block_sizes=blocks, bias=bias)
    names = ("q", "k", "v", "rel_pos_h", "rel_pos_w")[: 5 if rel else 3]
    for name, g_ours, g_ref in zip(names, jax.tree.leaves(ours), jax.tree.leaves(ref), strict=True):
        assert relative_error(g_ours, g_ref) <= tolerance(jnp.float32), name


# ------------------------------------------------------------------- transformers at the ViT-L grid
@pytest.mark.parametrize("bias", BIASES)
def test_attention_op_matches_transformers_on_vit_large_grid(bias):
    """float32 at ``precision="highest"``: transformers' ``SegGptAttention`` (ViT-L grid, head dim 64,
    random relative tables) against the flash op on the same q, k, v, before the output projection."""
    from transformers import SegGptConfig as HFConfig
    from transformers.models.seggpt.modeling_seggpt import SegGptAttention

    torch.manual_seed(0)
    module = SegGptAttention(HFConfig(hidden_size=128, num_attention_heads=2, image_size=[896, 448], patch_size=16))
    with torch.no_grad():
        module.rel_pos_h.normal_(0.0, 0.5)
        module.rel_pos_w.normal_(0.0, 0.5)
    module.proj = torch.nn.Identity()
    hidden = torch.randn(1, *VIT_L_GRID, 128)
    with torch.no_grad():
        ref = module(hidden)[0].numpy()  # [1, 56, 28, 128]
        qkv = module.qkv(hidden).reshape(1, VIT_L_GRID[0] * VIT_L_GRID[1], 3, 2, VIT_L_DIM).numpy()
    tables = (jnp.asarray(module.rel_pos_h.detach().numpy()), jnp.asarray(module.rel_pos_w.detach().numpy()))
    out = jax.jit(lambda q, k, v: attention_flash(q, k, v, scale=VIT_L_DIM ** -0.5, grid=VIT_L_GRID, rel_pos=tables,
                                                  precision="highest", bias=bias, **RUN))(
        *(jnp.asarray(qkv[:, :, i]) for i in range(3)))
    assert max_abs(np.asarray(out).reshape(ref.shape), ref) <= 1e-4


# --------------------------------------------------------------------------- nothing N x N exists
def tensor_shapes(module_text: str) -> list[tuple[int, ...]]:
    """Static shapes of every ``tensor<AxBx...xT>`` type in an MLIR module's text."""
    return [tuple(int(d) for d in dims.split("x")[:-1]) for dims in re.findall(r"tensor<((?:\d+x)+)", module_text)]


def assert_no_seq_by_seq(module_text: str, seq_lengths: set[int]):
    shapes = tensor_shapes(module_text)
    assert shapes, "no tensor types found"
    offending = [s for s in shapes if sum(d in seq_lengths for d in s) >= 2]
    assert not offending, f"tensors with two sequence dims: {offending[:5]}"


@interpret_only
@pytest.mark.parametrize("bias", ["rows", "onehot"])
def test_interpreted_forward_and_backward_stay_tiled(bias):
    """On CPU the kernels are lowered to plain HLO, so their insides show in the module text."""
    grid, blocks = (12, 10), BlockSizes(32, 32)  # 120 tokens, padded to 128 (rows: 12 x 16 = 192 keys)
    q, k, v, rel_pos, _ = make_inputs(1, grid, 2, 16)

    def f(q, k, v, rel_pos):
        return jnp.sum(attention_flash(q, k, v, scale=0.25, grid=grid, rel_pos=rel_pos, block_sizes=blocks,
                                       bias=bias, platform="cpu") ** 2)

    text = jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2, 3))).lower(q, k, v, rel_pos).as_text()
    assert_no_seq_by_seq(text, {120, 128, 192})
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


def vit_large_args(dtype=jnp.bfloat16, batch: int = 2):
    seq = VIT_L_GRID[0] * VIT_L_GRID[1]
    token = jax.ShapeDtypeStruct((batch, seq, VIT_L_HEADS, VIT_L_DIM), dtype)
    tables = (jax.ShapeDtypeStruct((2 * VIT_L_GRID[0] - 1, VIT_L_DIM), dtype),
              jax.ShapeDtypeStruct((2 * VIT_L_GRID[1] - 1, VIT_L_DIM), dtype))
    return token, token, token, tables


@functools.lru_cache(maxsize=None)
def export_vit_large(platform: str, which: str) -> jax.export.Exported:
    return jax.export.export(
        jax.jit(vit_large_functions(platform)[which]), platforms=[platform],
        disabled_checks=[jax.export.DisabledSafetyCheck.custom_call(TRITON_CALL)],
    )(*vit_large_args())


def kernel_operands(text: str, call: str) -> list[list[tuple[int, ...]]]:
    """The operand shapes of every ``call`` custom call in a StableHLO module's text."""
    pattern = re.compile(rf"@{re.escape(call)}\(.*?:\s*\(([^)]*)\)\s*->")
    return [[tuple(int(d) for d in t.split("x")[:-1]) for t in re.findall(r"tensor<([^>]*)>", m.group(1))]
            for m in pattern.finditer(text)]


@pytest.mark.parametrize("which, kernels", [("forward", 1), ("value_and_grad", 3)])  # backward: dq and dk/dv
@pytest.mark.parametrize("platform", ["cuda", "tpu"])
def test_exports_for_platform_without_device(platform, which, kernels):
    exported = export_vit_large(platform, which)
    text = exported.mlir_module()
    assert text.count(f"@{KERNEL_CALLS[platform]}(") == kernels
    seq = VIT_L_GRID[0] * VIT_L_GRID[1]
    lengths = {shape[2] for call in kernel_operands(text, KERNEL_CALLS[platform]) for shape in call if len(shape) == 4}
    assert lengths and all(n > seq for n in lengths)  # padded query and key lengths
    assert_no_seq_by_seq(text, {seq, *lengths})
    # the bias operand is the query-side terms only: no [N, H + W] one-hot operand (built in-kernel)
    for call in kernel_operands(text, KERNEL_CALLS[platform]):
        assert all(len(shape) == 4 and shape[:2] == (2, VIT_L_HEADS) for shape in call)


@pytest.mark.parametrize("platform", ["cuda", "tpu"])
def test_exported_gradient_serializes(platform):
    pytest.importorskip("flatbuffers")  # jax.export's serialisation dependency (optional)
    exported = export_vit_large(platform, "value_and_grad")
    restored = jax.export.deserialize(exported.serialize())
    assert restored.platforms == (platform,)
    assert restored.mlir_module().count(f"@{KERNEL_CALLS[platform]}(") == 3


def test_gpu_backend_is_triton_even_where_mosaic_gpu_is_the_default():
    """Pallas picks Mosaic GPU for a ``pallas_call`` without compiler params when
    ``jax_pallas_use_mosaic_gpu`` is on; ours always passes Triton's, so the program holds Triton calls."""
    previous = jax.config.jax_pallas_use_mosaic_gpu
    jax.config.update("jax_pallas_use_mosaic_gpu", True)
    try:
        text = export_vit_large.__wrapped__("cuda", "value_and_grad").mlir_module()
    finally:
        jax.config.update("jax_pallas_use_mosaic_gpu", previous)
    assert text.count(f"@{TRITON_CALL}(") == 3
    assert not re.search(r"custom_call @mosaic_gpu", text)
    with pytest.raises(ValueError, match="gpu_backend"):
        attention_flash(*make_inputs(1, (5, 3), 1, 8)[:3], scale=1.0, grid=(5, 3), rel_pos=None, gpu_backend="mosaic")


def _pallas_calls(fn, *args) -> list:
    """Every ``pallas_call`` equation in ``fn``'s jaxpr, nested jaxprs included."""
    found = []

    def walk(value):
        if isinstance(value, jax.extend.core.ClosedJaxpr):
            value = value.jaxpr
        if isinstance(value, jax.extend.core.Jaxpr):
            for eqn in value.eqns:
                if eqn.primitive.name == "pallas_call":
                    found.append(eqn)
                else:
                    for param in eqn.params.values():
                        walk(param)
        elif isinstance(value, (tuple, list)):
            for item in value:
                walk(item)

    walk(jax.make_jaxpr(fn)(*args).jaxpr)
    return found


@pytest.mark.parametrize("platform", ["gpu", "tpu"])
def test_every_kernel_has_a_cost_estimate(platform):
    calls = _pallas_calls(vit_large_functions("cuda" if platform == "gpu" else "tpu")["value_and_grad"],
                          *vit_large_args())
    assert sorted(eqn.params["name"] for eqn in calls) == ["flash_relpos_dkv", "flash_relpos_dq", "flash_relpos_fwd"]
    for eqn in calls:
        cost = eqn.params["cost_estimate"]
        assert cost is not None and cost.flops > 0 and cost.transcendentals > 0 and cost.bytes_accessed > 0


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
    blocks = BlockSizes.default("gpu", seq, 32)
    tile = max(blocks.block_q, blocks.block_k, *blocks.backward, 64)  # 64: the key rows' column count (56 -> 64)
    for module in modules:
        assert module.verify()
        shapes = tensor_shapes(module.get_asm())
        assert shapes and max(max(s) for s in shapes if s) <= tile


# --------------------------------------------------------------------------------- block sizes
def test_default_block_sizes_fit_platform_rules():
    seq = VIT_L_GRID[0] * VIT_L_GRID[1]
    gpu = BlockSizes.default("cuda", seq, 32)
    for size in (gpu.block_q, gpu.block_k, *gpu.backward):
        assert size >= 16 and size & (size - 1) == 0  # Triton: power-of-two tiles, tl.dot sides >= 16
        assert size % 32 == 0  # "rows": whole padded grid rows (28 -> 32) per key block
    assert gpu.block_q >= 64 and gpu.backward[0] >= 64  # wgmma's M (one warpgroup) in the forward and dq
    tpu = BlockSizes.default("tpu", seq)
    assert all(size % 128 == 0 for size in (tpu.block_q, tpu.block_k, *tpu.backward))  # full lanes
    assert BlockSizes.default("cpu", 15).block_q == 16  # tiny grids are not padded to 128
    assert default_bias("cuda", VIT_L_GRID) == "rows" and default_bias("tpu", VIT_L_GRID) == "onehot"
    assert default_bias("gpu", (4, 200)) == "onehot"  # a padded row of 256 keys: one-hot instead


def test_rejects_bad_arguments():
    q, k, v, rel_pos, _ = make_inputs(1, (5, 3), 1, 8)
    with pytest.raises(ValueError, match="grid"):
        attention_flash(q, k, v, scale=1.0, grid=(4, 4), rel_pos=None)
    with pytest.raises(ValueError, match="platform"):
        attention_flash(q, k, v, scale=1.0, grid=(5, 3), rel_pos=None, platform="metal")
    with pytest.raises(ValueError, match="positive"):
        BlockSizes(0, 8)
    with pytest.raises(ValueError, match="bias"):
        attention_flash(q, k, v, scale=1.0, grid=(5, 3), rel_pos=rel_pos, bias="dense")
    with pytest.raises(ValueError, match="Mosaic"):
        attention_flash(q, k, v, scale=1.0, grid=(5, 3), rel_pos=rel_pos, bias="rows", platform="tpu")
    with pytest.raises(ValueError, match="whole grid rows"):
        attention_flash(q, k, v, scale=1.0, grid=(5, 3), rel_pos=rel_pos, bias="rows", block_sizes=BlockSizes(16, 2))


def test_options_reach_the_kernel_through_the_dispatch():
    """``FlashOptions`` (what an execution plan holds) is passed whole by ``attention(impl="flash")``."""
    from seggpt_jax.nn.attention import attention

    q, k, v, rel_pos, _ = make_inputs(2, (5, 3), 2, 8)
    options = FlashOptions(block_sizes=BlockSizes(16, 16), bias="onehot", interpret=True, partitioning=None)
    assert set(options.kwargs()) <= set(attention_flash.__kwdefaults__)
    ours = attention(q, k, v, impl="flash", scale=0.3, grid=(5, 3), rel_pos=rel_pos, platform="cpu", flash=options)
    ref = attention_plain(q, k, v, scale=0.3, grid=(5, 3), rel_pos=rel_pos)
    assert relative_error(ours, ref) <= 1e-5
    assert Partitioning() == Partitioning(batch=("data",), heads=("model",))


# ------------------------------------------------------------------------------------ the whole model
@pytest.mark.parametrize("name", sorted(TINY_CONFIGS))
def test_model_with_flash_attention_matches_transformers(hf_tiny, name):
    """The painter with ``attention="flash"`` (interpret mode on CPU) at ``precision="highest"`` against
    transformers' own ``pred_masks``: one prompt per query, and the feature ensemble over the batch
    where the grid allows."""
    hf, path = hf_tiny(name)
    model = SegGptForImageSegmentation.from_pretrained(path, precision="highest",
                                                       runtime=RuntimeConfig(attention="flash"))
    assert resolve_impl(model.settings.runtime.attention, model.settings.dtype) == "flash"
    inputs = random_inputs(model.config, batch=2, seed=4)
    cases = [{}] + ([{"feature_ensemble": True}] if model.config.grid_size[0] % 2 == 0 else [])
    for kwargs in cases:
        ours = model(**inputs, **kwargs).pred_masks
        with torch.no_grad():
            ref = hf(**to_torch(inputs), **kwargs).pred_masks
        assert float(np.abs(np.asarray(ours)).max()) > 0.05
        assert max_abs(ours, ref) <= (1e-5 if BACKEND == "cpu" else 1e-4), kwargs
