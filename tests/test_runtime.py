"""Every execution switch computes the same thing as the plain, unrolled reference path; settings are
fixed when a model is built, held by the model alone, and changed only by building a new model."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import random_bool_masked_pos, random_inputs
from flax import nnx

from jax.ad_checkpoint import print_saved_residuals

from seggpt_jax import ModelSettings, RuntimeConfig, SegGptConfig, SegGptForImageSegmentation, SegGptModel
from seggpt_jax import runtime as seggpt_runtime
from seggpt_jax.nn.attention import (attention_chunked, attention_plain, attention_widened, resolve_impl, widen)
from seggpt_jax.nn.encoder import layer_segments
from seggpt_jax.nn.inputs import prepare
from seggpt_jax.train.trainer import Trainer, TrainConfig
from seggpt_jax.weights import layer_parameters

CONFIGS = {
    "nonsquare": SegGptConfig(image_size=(64, 32), patch_size=4, hidden_size=32, num_hidden_layers=6,
                              num_attention_heads=4, merge_index=2, intermediate_hidden_state_indices=(2, 4, 5),
                              pretrain_image_size=24, decoder_hidden_size=8),
    "odd_rows": SegGptConfig(image_size=30, patch_size=2, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                             merge_index=0, intermediate_hidden_state_indices=(1, 2), pretrain_image_size=10,
                             decoder_hidden_size=10),
    "no_rel_pos": SegGptConfig(image_size=(64, 32), patch_size=4, hidden_size=32, num_hidden_layers=4,
                               num_attention_heads=4, merge_index=1, intermediate_hidden_state_indices=(1, 3),
                               pretrain_image_size=24, decoder_hidden_size=8, use_relative_position_embeddings=False),
}


def _random_model(config, **kwargs):
    model = SegGptForImageSegmentation(config, rngs=nnx.Rngs(0), **kwargs)
    # make relative positions and LayerNorm affine terms matter
    state = nnx.state(model, nnx.Param)
    leaves = nnx.to_flat_state(state)
    key = jax.random.key(1)
    for i, (path, var) in enumerate(leaves):
        if path[-1] in ("rel_pos_h", "rel_pos_w", "scale", "bias"):
            var[...] = var[...] + 0.2 * jax.random.normal(jax.random.fold_in(key, i), var[...].shape)
    nnx.update(model, state)
    return model


def _outputs(model, inputs, **kwargs):
    out = model(**inputs, output_hidden_states=True, **kwargs)
    return [np.asarray(out.pred_masks)] + [np.asarray(h) for h in out.hidden_states] + \
        [np.asarray(t) for t in out.intermediate_hidden_states] + ([np.asarray(out.loss)] if out.loss is not None else [])


@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.parametrize("runtime", [
    RuntimeConfig(attention="chunked"),
    RuntimeConfig(attention="widened"),
    RuntimeConfig(attention="plain", scan_layers=True),
    RuntimeConfig(attention="chunked", scan_layers=True),
], ids=lambda r: f"{r.attention}{'-scan' if r.scan_layers else ''}")
def test_runtime_switches_match_the_plain_unrolled_path(name, runtime):
    config = CONFIGS[name]
    model = _random_model(config, runtime=RuntimeConfig(attention="plain"))
    ensemble = config.grid_size[0] % 2 == 0
    inputs = random_inputs(config, batch=3, seed=31, labels=True)
    kwargs = dict(feature_ensemble=ensemble,
                  bool_masked_pos=random_bool_masked_pos(config.num_patches, batch=3, seed=32))
    reference = _outputs(model, inputs, **kwargs)
    model = model.with_runtime(attention=runtime.attention, scan_layers=runtime.scan_layers)
    assert model.settings.runtime == runtime
    ours = _outputs(model, inputs, **kwargs)
    assert len(ours) == len(reference)
    for i, (a, b) in enumerate(zip(ours, reference)):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=0, err_msg=f"output {i}")


@pytest.mark.parametrize("grid, tile_rows", [((56, 28), None), ((56, 28), 8), ((15, 15), 5), ((7, 3), None)])
def test_attention_kernels_at_real_grid_sizes(grid, tile_rows):
    """The ViT-L grid (56 x 28: rel_pos_h has 111 rows, rel_pos_w 55) with a small head dim."""
    rows, cols = grid
    rng = np.random.default_rng(rows * cols)
    q, k, v = (jnp.asarray(rng.standard_normal((2, rows * cols, 3, 8), dtype=np.float32)) for _ in range(3))
    rel = (jnp.asarray(rng.standard_normal((2 * rows - 1, 8), dtype=np.float32)) * 0.5,
           jnp.asarray(rng.standard_normal((2 * cols - 1, 8), dtype=np.float32)) * 0.5)
    kwargs = dict(scale=8 ** -0.5, grid=grid, rel_pos=rel)
    reference = np.asarray(attention_plain(q, k, v, **kwargs))
    chunked = np.asarray(attention_chunked(q, k, v, tile_rows=tile_rows, **kwargs))
    widened = np.asarray(attention_widened(q, k, v, **kwargs))
    np.testing.assert_allclose(chunked, reference, atol=5e-6, rtol=0)
    np.testing.assert_allclose(widened, reference, atol=5e-6, rtol=0)
    # the widened dot product is the logits with the relative terms folded in, exactly
    q_wide, k_wide, v_wide = widen(q, k, v, **kwargs)
    assert q_wide.shape[-1] % 8 == 0 and q_wide.shape[-1] >= 8 + rows + cols and v_wide.shape == q_wide.shape
    with pytest.raises(ValueError, match="must divide"):
        attention_chunked(q, k, v, tile_rows=rows + 1, **kwargs)


def test_widened_attention_in_bfloat16_is_close():
    rng = np.random.default_rng(0)
    grid = (16, 8)
    q, k, v = (jnp.asarray(rng.standard_normal((1, 128, 2, 16), dtype=np.float32)) for _ in range(3))
    rel = (jnp.asarray(rng.standard_normal((31, 16), dtype=np.float32)) * 0.3,
           jnp.asarray(rng.standard_normal((15, 16), dtype=np.float32)) * 0.3)
    reference = np.asarray(attention_plain(q, k, v, scale=0.25, grid=grid, rel_pos=rel))
    half = np.asarray(attention_widened(q.astype(jnp.bfloat16), k.astype(jnp.bfloat16), v.astype(jnp.bfloat16),
                                        scale=0.25, grid=grid, rel_pos=rel), dtype=np.float32)
    assert np.abs(half - reference).mean() < 0.02


def _auto_for(backend: str) -> str:
    """What "auto" means on a backend (the module docstring of seggpt_jax.nn.attention)."""
    return "chunked" if backend == "cpu" else "flash"


def test_auto_picks_per_backend():
    assert resolve_impl("auto", jnp.float32) == _auto_for(jax.default_backend())
    assert resolve_impl("plain", jnp.bfloat16) == "plain"
    with pytest.raises(ValueError, match="attention implementation must be one of"):
        resolve_impl("splash", jnp.float32)


def test_layer_segments_respect_merge_and_taps():
    assert layer_segments(24, 2, {5, 11, 17, 23}) == [(0, 2), (2, 3), (3, 6), (6, 12), (12, 18), (18, 24)]
    assert layer_segments(2, 0, {1}) == [(0, 1), (1, 2)]
    assert layer_segments(6, 2, {2, 4, 5}) == [(0, 2), (2, 3), (3, 5), (5, 6)]


@pytest.fixture(scope="module")
def gradient_case():
    """A model, a training batch, and the reference gradients (plain attention, unrolled, no remat)."""
    config = CONFIGS["nonsquare"]
    model = _random_model(config, runtime=RuntimeConfig(attention="plain"))
    inputs = random_inputs(config, batch=2, seed=33, labels=True)
    inputs["bool_masked_pos"] = random_bool_masked_pos(config.num_patches, batch=2, seed=34)

    def grads(m):  # per layer, whether the model holds its layers stacked (scanned) or not
        return sorted(layer_parameters(nnx.grad(lambda mm: mm(**inputs, dropout_rng=jax.random.key(5)).loss)(m)).items())

    return model, grads, grads(model)


@pytest.mark.parametrize("policy", ["full", "dots", "everything_saveable"])
def test_remat_and_scan_give_the_same_gradients(gradient_case, policy):
    model, grads, reference = gradient_case
    ours = grads(model.with_runtime(attention="chunked", scan_layers=True, remat_policy=policy))
    assert [path for path, _ in ours] == [path for path, _ in reference]
    for (path, a), (_, b) in zip(ours, reference):
        np.testing.assert_allclose(np.asarray(a[...]), np.asarray(b[...]), atol=2e-5, rtol=1e-4, err_msg=str(path))


def test_runtime_config_validation():
    with pytest.raises(ValueError, match="attention must be one of"):
        RuntimeConfig(attention="splash")
    with pytest.raises(ValueError, match="unknown remat_policy 'sometimes'"):
        RuntimeConfig(remat_policy="sometimes")
    with pytest.raises(TypeError, match="runtime must be a seggpt_jax.RuntimeConfig"):
        SegGptForImageSegmentation(CONFIGS["nonsquare"], runtime={"attention": "plain"}, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="attention must be one of"):
        SegGptForImageSegmentation(CONFIGS["nonsquare"], rngs=nnx.Rngs(0)).with_runtime(attention="fast")


@pytest.mark.parametrize("policy, saved", [
    ("full", set()), ("dots", {"qkv", "attention", "attention_out", "mlp_hidden"}), (None, set())])
def test_remat_policies_save_what_they_say(capsys, policy, saved):
    """Inside a rematerialised layer "full" keeps nothing and "dots" keeps the named matmul outputs the
    backward pass needs (without remat nothing is saved under a name: every residual is kept as is)."""
    config = CONFIGS["nonsquare"]
    model = SegGptForImageSegmentation(config, runtime=RuntimeConfig(attention="plain", remat_policy=policy),
                                       rngs=nnx.Rngs(0))
    inputs, options = prepare(config, **random_inputs(config, batch=2, seed=36, labels=True))
    graphdef, state = nnx.split(model)
    print_saved_residuals(lambda s: nnx.merge(graphdef, s).forward_prepared(inputs, options).loss, state)
    report = capsys.readouterr().out
    assert set(re.findall(r"named '(\w+)'", report)) == saved, report


def _params(model) -> dict[tuple, jax.Array]:
    return {path: var.get_value() for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def _built_like(model, **settings):
    """A model constructed with ``settings``, holding ``model``'s parameter values (stacked by hand when
    ``settings`` scan the layers: ``encoder.stacks.{first}`` holds layers first, first + 1, ...)."""
    built = SegGptForImageSegmentation(model.config, rngs=nnx.Rngs(3), **settings)
    values, state = layer_parameters(model), nnx.state(built)
    for path, var in nnx.to_flat_state(state):
        name = ".".join(str(p) for p in path)
        if ".stacks." in name:
            first = int(path[3])
            rows = [name.replace(f".stacks.{first}.", f".layers.{first + r}.") for r in range(var.shape[0])]
            var[...] = jnp.stack([values[row] for row in rows])
        else:
            var[...] = values[name]
    nnx.update(built, state)
    return built


def test_new_settings_give_new_models_over_the_same_parameters():
    config = CONFIGS["nonsquare"]
    model = _random_model(config, runtime=RuntimeConfig(attention="plain"))
    inputs = random_inputs(config, batch=2, seed=35)
    before = np.asarray(model(**inputs).pred_masks)
    params = _params(model)
    variants = {
        "scan": (model.with_runtime(scan_layers=True),
                 dict(runtime=RuntimeConfig(attention="plain", scan_layers=True))),
        "chunked": (model.with_runtime(RuntimeConfig(attention="chunked")),
                    dict(runtime=RuntimeConfig(attention="chunked"))),
        "mixed": (model.with_settings(dtype=jnp.bfloat16, precision="highest"),
                  dict(dtype=jnp.bfloat16, precision="highest", runtime=RuntimeConfig(attention="plain"))),
    }
    for name, (other, settings) in variants.items():
        assert other is not model and other.settings == ModelSettings(**settings), name
        if name == "scan":  # restacked: the layers' values, in new arrays; the rest shared
            ours, theirs = layer_parameters(other), layer_parameters(model)
            assert ours.keys() == theirs.keys()
            assert all(np.array_equal(ours[key], theirs[key]) for key in ours)
            assert all(value is params[path] for path, value in _params(other).items() if "stacks" not in path)
        else:
            assert _params(other).keys() == params.keys()
            assert all(value is params[path] for path, value in _params(other).items()), name  # shared, not copied
        np.testing.assert_array_equal(np.asarray(other(**inputs).pred_masks),
                                      np.asarray(_built_like(model, **settings)(**inputs).pred_masks), err_msg=name)
    # the original keeps its settings and outputs, even when a new model's parameters are updated
    scanned = variants["scan"][0]
    scanned.decoder.decoder_pred.head.bias[...] = scanned.decoder.decoder_pred.head.bias[...] + 1.0
    assert model.settings == ModelSettings(runtime=RuntimeConfig(attention="plain"))
    np.testing.assert_array_equal(np.asarray(model(**inputs).pred_masks), before)
    with pytest.raises(TypeError):
        model.with_settings(param_dtype=jnp.bfloat16)  # a parameter dtype is not a setting: use astype


def test_astype_casts_the_parameters_of_a_new_model():
    config = CONFIGS["nonsquare"]
    model = _random_model(config, runtime=RuntimeConfig(attention="plain"))
    inputs = random_inputs(config, batch=2, seed=39)
    half = model.astype(jnp.bfloat16)
    assert half.settings == model.settings
    for path, value in _params(half).items():
        assert value.dtype == jnp.bfloat16 and _params(model)[path].dtype == jnp.float32
        np.testing.assert_array_equal(np.asarray(value), np.asarray(_params(model)[path].astype(jnp.bfloat16)))
    built = _built_like(half, param_dtype=jnp.bfloat16, runtime=RuntimeConfig(attention="plain"))
    out = np.asarray(half(**inputs).pred_masks)
    np.testing.assert_array_equal(out, np.asarray(built(**inputs).pred_masks))
    full = np.asarray(model(**inputs).pred_masks)
    assert np.all(np.isfinite(out)) and np.abs(out - full).mean() < 0.02 * np.abs(full).mean() + 1e-3


def test_a_model_built_for_bfloat16_compute_runs_scanned_with_remat():
    config = CONFIGS["nonsquare"]
    runtime = RuntimeConfig(attention="chunked", scan_layers=True, remat_policy="dots")
    model = SegGptForImageSegmentation(config, dtype=jnp.bfloat16, runtime=runtime, rngs=nnx.Rngs(0))
    inputs = random_inputs(config, batch=2, seed=40, labels=True)
    loss, grads = nnx.value_and_grad(lambda m: m(**inputs, output_hidden_states=True).loss)(model)
    out = model(**inputs, output_hidden_states=True)
    assert out.hidden_states[-1].dtype == jnp.bfloat16 and out.pred_masks.dtype == jnp.float32
    assert np.isfinite(float(loss))
    assert all(np.all(np.isfinite(np.asarray(g[...]))) for _, g in nnx.to_flat_state(grads))


@pytest.mark.parametrize("cls", [SegGptForImageSegmentation, SegGptModel])
def test_only_the_top_model_holds_settings(cls):
    model = cls(CONFIGS["nonsquare"], dtype=jnp.bfloat16, precision="highest", runtime=RuntimeConfig(scan_layers=True),
                rngs=nnx.Rngs(0))
    setting_types = (ModelSettings, RuntimeConfig, np.dtype, jax.lax.Precision)
    for path, node in nnx.iter_graph(model):
        if isinstance(node, nnx.Module):
            held = [name for name, value in vars(node).items()
                    if isinstance(value, setting_types) or (isinstance(value, type) and issubclass(value, np.generic))]
            assert held == (["settings"] if path == () else []), (path, held)


def test_trainer_trains_the_callers_parameters_and_leaves_its_settings_alone():
    config = CONFIGS["nonsquare"]
    model = SegGptForImageSegmentation(config, runtime=RuntimeConfig(attention="plain"), rngs=nnx.Rngs(0))
    params = {path: np.asarray(value) for path, value in _params(model).items()}
    trainer = Trainer(model, TrainConfig(steps=1, batch_size=2, warmup_steps=0, dtype="bfloat16", remat_policy="dots"))
    assert trainer.model.settings == ModelSettings(dtype=jnp.bfloat16,
                                                   runtime=RuntimeConfig(attention="plain", remat_policy="dots"))
    batch = random_inputs(config, batch=2, seed=37, labels=True)
    batch.update(bool_masked_pos=random_bool_masked_pos(config.num_patches, batch=2, seed=38),
                 is_instance=np.ones(2, bool))
    assert np.isfinite(float(trainer.train_step(batch)))
    assert model.settings == ModelSettings(runtime=RuntimeConfig(attention="plain"))  # settings: never patched
    trained = _params(trainer.model)
    assert any(not np.array_equal(np.asarray(trained[path]), value) for path, value in params.items())
    for path, value in _params(model).items():  # parameters: trained, as nnx.Optimizer(model, ...) trains them
        np.testing.assert_array_equal(np.asarray(value), np.asarray(trained[path]), err_msg=str(path))
    copy = model.with_settings(dtype=jnp.bfloat16)  # without shared=True, a model of its own
    copy.decoder.decoder_embed.bias[...] = copy.decoder.decoder_embed.bias[...] + 1
    assert not np.array_equal(np.asarray(copy.decoder.decoder_embed.bias[...]),
                              np.asarray(model.decoder.decoder_embed.bias[...]))


# ------------------------------------------------------------------------ target platforms and kernels
@pytest.mark.parametrize("platform, dtype, expected", [
    ("cpu", jnp.float32, "chunked"), ("cpu", jnp.bfloat16, "chunked"),
    ("cuda", jnp.bfloat16, "flash"), ("gpu", jnp.bfloat16, "flash"), ("tpu", jnp.bfloat16, "flash"),
    ("cuda", jnp.float32, "flash"), ("tpu", jnp.float32, "flash"),  # float32: the kernel at the model's precision
    (None, jnp.bfloat16, None),  # None: the default backend's choice
])
def test_auto_resolves_per_target_platform_and_dtype(platform, dtype, expected):
    expected = expected or _auto_for(jax.default_backend())
    assert resolve_impl("auto", dtype, platform) == expected
    for impl in ("plain", "chunked", "flash"):
        assert resolve_impl(impl, dtype, platform) == impl


def test_runtime_platform_is_validated_and_normalised():
    assert RuntimeConfig().platform is None
    assert RuntimeConfig(platform="GPU").platform == "cuda" and RuntimeConfig(platform="gpu") == RuntimeConfig(
        platform="cuda")
    assert RuntimeConfig(platform="tpu", attention="flash").platform == "tpu"
    with pytest.raises(ValueError, match=r"one of \('cpu', 'cuda', 'gpu', 'tpu'\) or None, got 'rocm'"):
        RuntimeConfig(platform="rocm")
    with pytest.raises(ValueError, match="platform must be one of"):
        RuntimeConfig(platform=3)
    with pytest.raises(ValueError, match="attention must be one of"):
        RuntimeConfig(attention="cudnn")
    # cuDNN takes half precision only: refused when the layer resolves it, naming the way out
    with pytest.raises(ValueError, match="takes bfloat16 or float16, not float32; use 'flash'"):
        resolve_impl("widened", jnp.float32, "cuda")
    assert resolve_impl("widened", jnp.bfloat16, "cuda") == resolve_impl("widened", jnp.float32, "tpu") == "widened"


def test_model_lowers_its_target_platforms_kernel():
    """The platform in the settings picks the kernel at trace time, on any host: a TPU model lowered on
    any machine holds the Mosaic kernel, a CPU one the chunked path (as a default one on a CPU host)."""
    config = CONFIGS["nonsquare"]
    model = nnx.eval_shape(lambda: SegGptForImageSegmentation(config, rngs=nnx.Rngs(0)))
    inputs, options = prepare(config, *(np.zeros((1, 3, *config.query_size), np.float32),) * 3)
    from seggpt_jax.nn.models import _forward_jit

    def module(m, platform):
        return jax.export.export(_forward_jit, platforms=[platform])(*nnx.split(m), inputs, options).mlir_module()

    tpu = module(model.with_runtime(platform="tpu"), "tpu")
    assert tpu.count("@tpu_custom_call(") == config.num_hidden_layers
    cpu = module(model.with_runtime(platform="cpu"), "cpu")
    assert "tpu_custom_call" not in cpu and "triton" not in cpu
    if jax.default_backend() == "cpu":  # a model without a platform: the default backend's (source locations aside)
        def code(text):
            return [line for line in text.splitlines() if not line.startswith("#loc")]

        assert code(module(model, "cpu")) == code(cpu)


def test_widened_lowers_to_cudnn_on_cuda(monkeypatch):
    """``"widened"`` on GPU is cuDNN's fused attention: with JAX's trace-time checks answered as a Hopper
    GPU with cuDNN 9 would answer them, the cuda program holds cuDNN's custom calls (forward and
    backward) and no [B, heads, N, N] tensor. Without a GPU the trace itself fails: it cannot be exported
    from this machine."""
    from jax._src.cudnn import fused_attention_stablehlo as cudnn

    from seggpt_jax.nn.attention import attention

    grid, seq = (56, 28), 56 * 28
    token = jax.ShapeDtypeStruct((1, seq, 16, 64), jnp.bfloat16)
    tables = (jax.ShapeDtypeStruct((111, 64), jnp.bfloat16), jax.ShapeDtypeStruct((55, 64), jnp.bfloat16))

    def loss(q, k, v, rel_pos):
        out = attention(q, k, v, impl="widened", scale=0.125, grid=grid, rel_pos=rel_pos, platform="cuda")
        return jnp.sum(out.astype(jnp.float32) ** 2)

    def lower():
        calls = ("__cudnn$fmhaSoftmax", "__cudnn$fmhaSoftmaxBackward")
        return jax.export.export(
            jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3))), platforms=["cuda"],
            disabled_checks=[jax.export.DisabledSafetyCheck.custom_call(c) for c in calls],
        )(token, token, token, tables).mlir_module()

    with pytest.raises(RuntimeError, match="cuDNN is not detected"):
        lower()
    monkeypatch.setattr(cudnn, "check_cudnn_version", lambda: 90800)
    monkeypatch.setattr(cudnn, "check_compute_capability", lambda capability: True)
    text = lower()
    assert text.count("@__cudnn$fmhaSoftmax(") == 1 and text.count("@__cudnn$fmhaSoftmaxBackward(") == 1
    shapes = [tuple(int(d) for d in dims.split("x")[:-1]) for dims in re.findall(r"tensor<((?:\d+x)+)", text)]
    assert (1, seq, 16, 152) in shapes  # the widened head: 64 + 56 + 28, padded to a multiple of 8
    assert not [s for s in shapes if s.count(seq) >= 2]


def test_flash_in_the_model_gives_the_plain_gradients(gradient_case):
    """The fused kernel's backward (interpret mode here) inside the painter, scanned and rematerialised."""
    model, grads, reference = gradient_case
    ours = grads(model.with_runtime(attention="flash", scan_layers=True, remat_policy="dots"))
    for (path, a), (_, b) in zip(ours, reference):
        np.testing.assert_allclose(np.asarray(a[...]), np.asarray(b[...]), atol=2e-5, rtol=1e-4, err_msg=str(path))


def test_accelerator_benchmark_dry_run(tmp_path):
    """benchmarks/accelerator.py (for GPU/TPU machines) runs end to end on the tiny config here: workers,
    transformers rows, agreement, and the dated result files."""
    import json
    import os
    import subprocess
    import sys

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    result = subprocess.run([sys.executable, "-m", "benchmarks.accelerator", "--dry-run", "--attention", "flash",
                             "--out", str(tmp_path / "out"), "--workdir", str(tmp_path / "work")],
                            capture_output=True, text=True, timeout=600, cwd=repo)
    assert result.returncode == 0, result.stderr[-3000:]
    (json_name,) = [n for n in os.listdir(tmp_path / "out") if n.endswith(".json")]
    assert json_name.startswith("accelerator-dryrun-cpu-")
    assert os.path.isfile(tmp_path / "out" / (json_name[:-4] + "md"))
    report = json.loads((tmp_path / "out" / json_name).read_text())
    assert sorted(report["ours"]) == ["flash bfloat16", "flash float32"]
    for side in (report["ours"], report["transformers"]):
        for row in side.values():
            assert all(row[f"batch{b}"]["images_per_s"] > 0 and row[f"batch{b}"]["peak_bytes"] > 0 for b in (1, 2))
    assert sorted(report["transformers"]) == ["eager bfloat16", "eager float32"]
    assert report["agreement"]["flash"]["f32_max_abs_vs_transformers"] < 1e-4
    assert report["agreement"]["flash"]["bf16_class_map_agreement"] > 0.9


# ------------------------------------------------------------------------------------ the CPU tile
INTEL_AVX512 = "processor\t: 0\nvendor_id\t: GenuineIntel\nflags\t\t: fpu sse2 avx avx2 fma avx512f avx512bw\n" * 2
AMD_AVX2 = "processor\t: 0\nvendor_id\t: AuthenticAMD\nflags\t\t: fpu sse2 avx avx2 fma\n"


def test_cpu_kind_reads_the_vendor_and_the_widest_vector_set():
    assert seggpt_runtime.cpu_kind(INTEL_AVX512) == "intel-avx512"
    assert seggpt_runtime.cpu_kind(AMD_AVX2) == "amd-avx2"
    assert seggpt_runtime.cpu_kind(AMD_AVX2.replace("avx2 fma", "avx2 fma avx512f")) == "amd-avx512"
    assert seggpt_runtime.cpu_kind(AMD_AVX2.replace(" avx2", "")) == "other"  # AVX only
    assert seggpt_runtime.cpu_kind("processor\t: 0\nCPU implementer\t: 0x41\nFeatures\t: fp asimd\n") == "other"  # arm64
    assert seggpt_runtime.cpu_kind("") == "other"


def test_the_plan_takes_the_machines_tile_unless_the_runtime_sets_one(monkeypatch):
    for cpuinfo, expected in ((INTEL_AVX512, seggpt_runtime.CPU_TILE_QUERIES["intel-avx512"]),
                              (AMD_AVX2, seggpt_runtime.CPU_TILE_QUERIES["default"])):
        monkeypatch.setattr(seggpt_runtime, "_cpuinfo", lambda text=cpuinfo: text)
        assert ModelSettings(runtime=RuntimeConfig(platform="cpu")).plan.tile_queries == expected
        assert ModelSettings(runtime=RuntimeConfig(platform="cpu", cpu_tile_queries=56)).plan.tile_queries == 56
    for bad in (0, -28, True, 1.5, "512"):
        with pytest.raises(ValueError, match=r"cpu_tile_queries must be a positive int or None, got"):
            RuntimeConfig(cpu_tile_queries=bad)


def test_the_plans_tile_reaches_every_layer_and_changes_no_number(monkeypatch, hf_tiny):
    """Tiles of 1 grid row (8 queries) and of the whole grid (128) on the same weights: the chunked
    attention of every layer is called with the plan's tile, and the answers agree to float32 rounding."""
    from seggpt_jax.nn import attention as attention_module

    seen = []
    real = attention_module.attention_chunked

    def spy(*args, tile_rows=None, **kwargs):
        seen.append(tile_rows)
        return real(*args, tile_rows=tile_rows, **kwargs)

    monkeypatch.setattr(attention_module, "attention_chunked", spy)
    _, path = hf_tiny("nonsquare")
    model = SegGptForImageSegmentation.from_pretrained(path, runtime=RuntimeConfig(attention="chunked"))
    rows, cols = model.config.grid_size
    inputs = random_inputs(model.config, batch=1, seed=3)
    outputs = {}
    for queries, tile_rows in ((cols, 1), (rows * cols, rows)):
        seen.clear()
        outputs[queries] = np.asarray(model.with_runtime(cpu_tile_queries=queries)(**inputs).pred_masks)
        assert seen == [tile_rows] * model.config.num_hidden_layers, (queries, seen)  # the streams share a call
    np.testing.assert_allclose(outputs[cols], outputs[rows * cols], atol=2e-5)
