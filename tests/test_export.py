"""Serving artifacts (:mod:`seggpt_jax.export`): ViT-L lowered for GPU and TPU from this CPU machine with
the default runtime, and a CPU artifact that a fresh process runs without the model code."""

from __future__ import annotations

import functools
import json
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import random_inputs
from flax import nnx

from seggpt_jax import RuntimeConfig, SegGptConfig, SegGptForImageSegmentation, SegGptImageProcessor, SegGptModel
from seggpt_jax.cli.main import main as cli_main
from seggpt_jax.export import FILE_NAMES, METADATA_NAME, export_model, load
from seggpt_jax.files import OutputConflict
from seggpt_jax.nn.flash_attention import BlockSizes

EXPORT_MODULE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "seggpt_jax", "export.py")
KERNEL_CALLS = {"cuda": "__gpu$xla.gpu.triton", "tpu": "tpu_custom_call"}
TINY = SegGptConfig(image_size=(64, 32), patch_size=4, hidden_size=32, num_hidden_layers=6, num_attention_heads=4,
                    merge_index=2, intermediate_hidden_state_indices=(2, 4, 5), pretrain_image_size=24,
                    decoder_hidden_size=8)


def tensor_shapes(module_text: str) -> list[tuple[int, ...]]:
    """Static shapes of every ``tensor<AxBx...xT>`` type in an MLIR module's text."""
    return [tuple(int(d) for d in dims.split("x")[:-1]) for dims in re.findall(r"tensor<((?:\d+x)+)", module_text)]


def tiny_model(**kwargs) -> SegGptForImageSegmentation:
    model = SegGptForImageSegmentation(TINY, rngs=nnx.Rngs(0), **kwargs)
    state = nnx.state(model, nnx.Param)
    for i, (_, var) in enumerate(nnx.to_flat_state(state)):  # make every parameter matter
        var[...] = var[...] + 0.1 * jax.random.normal(jax.random.key(i), var[...].shape)
    nnx.update(model, state)
    return model


def tiny_processor() -> SegGptImageProcessor:
    return SegGptImageProcessor(size=TINY.query_size)


# ---------------------------------------------------------------------- ViT-L for GPU and TPU, from a CPU
@functools.lru_cache(maxsize=None)
def vit_large_export(platform: str, prompts: int):
    """The default runtime's bfloat16 ViT-L painter, built abstractly (no weights), 2 queries."""
    model = nnx.eval_shape(lambda: SegGptForImageSegmentation(SegGptConfig.vit_large(), rngs=nnx.Rngs(0)))
    assert model.settings.runtime == RuntimeConfig()
    return export_model(model, 2, platforms=platform, dtype=jnp.bfloat16, prompts_per_query=prompts)


@pytest.mark.parametrize("prompts", [1, 3], ids=["single-prompt", "3-prompt-ensemble"])
@pytest.mark.parametrize("platform", ["cuda", "tpu"])
def test_vit_large_exports_with_the_fused_kernel(platform, prompts):
    export = vit_large_export(platform, prompts)
    config = SegGptConfig.vit_large()
    assert export.exported.platforms == (platform,)
    assert export.metadata["attention"] == {platform: "flash"} and export.metadata["feature_ensemble"] == (prompts > 1)
    text = export.exported.mlir_module()
    # one kernel per layer (the first layers run both streams in one call)
    assert text.count(f"@{KERNEL_CALLS[platform]}(") == config.num_hidden_layers
    seq = config.num_patches
    blocks = BlockSizes.default("gpu" if platform == "cuda" else platform, seq)
    lengths = {seq, -(-seq // blocks.alignment) * blocks.alignment}  # 1568 and its padded length
    shapes = tensor_shapes(text)
    assert any(seq in s for s in shapes)  # the check looks at real token tensors
    offending = [s for s in shapes if sum(d in lengths for d in s) >= 2]
    assert not offending, f"tensors with two sequence dims: {offending[:5]}"
    ((weights, queries, prompt_images, prompt_masks, flags), _) = jax.tree.unflatten(
        export.exported.in_tree, export.exported.in_avals)
    assert queries.shape == (2, 3, 448, 448) and prompt_images.shape == prompt_masks.shape == (2, prompts, 3, 448, 448)
    assert flags.shape == (2,) and flags.dtype == jnp.bool_
    assert all(a.dtype == jnp.float32 for a in weights.values())  # parameters keep their dtype
    assert export.exported.out_avals[0].shape == (2, prompts, 3, 896, 448)
    restored = jax.export.deserialize(export.exported.serialize())
    assert restored.platforms == (platform,) and restored.in_tree == export.exported.in_tree
    if platform == "cuda":
        assert export.metadata["custom_calls_without_compatibility_guarantee"] == [KERNEL_CALLS["cuda"]]


def test_abstract_model_lowers_but_does_not_save(tmp_path):
    with pytest.raises(ValueError, match="abstract"):
        vit_large_export("tpu", 1).save(tmp_path / "out")
    assert not os.path.exists(tmp_path / "out")


# ---------------------------------------------------------------------- a CPU artifact in a fresh process
RUNNER = """
import importlib.util, json, sys
import numpy as np
spec = importlib.util.spec_from_file_location("seggpt_serving", sys.argv[1])
serving = importlib.util.module_from_spec(spec)
sys.modules["seggpt_serving"] = serving
spec.loader.exec_module(serving)
results = {}
for folder in sys.argv[2:]:
    model = serving.load(folder)
    data = np.load(folder + ".inputs.npz")
    out = model(data["pixel_values"], data["prompt_pixel_values"], data["prompt_masks"], data["is_instance"])
    np.save(folder + ".out.npy", np.asarray(out))
    results[folder] = list(out.shape)
loaded = sorted(m for m in ("flax", "seggpt_jax", "torch") if m in sys.modules)
print(json.dumps({"shapes": results, "modules": loaded}))
"""


def test_cpu_artifact_runs_in_a_fresh_process_without_the_model(tmp_path):
    model = tiny_model()
    scanned = model.with_runtime(scan_layers=True)  # its program takes the stacked parameters whole
    cases = {"single": (model, 1, ["instance", "semantic"]), "ensemble": (model, 3, ["semantic", "instance"]),
             "scanned": (scanned, 2, ["semantic", "instance"])}
    expected, folders = {}, []
    for name, (exporting, prompts, types) in cases.items():
        folder = str(tmp_path / name)
        written = exporting.export(2, platforms="cpu", prompts_per_query=prompts,
                                   processor=tiny_processor()).save(folder)
        assert sorted(os.path.basename(p) for p in written) == sorted(FILE_NAMES)
        rows = random_inputs(TINY, batch=2 * prompts, seed=prompts)
        queries = rows["pixel_values"][::prompts]  # [2, 3, h, w]
        flags = np.array([t == "instance" for t in types])
        reference = model(np.repeat(queries, prompts, axis=0), rows["prompt_pixel_values"], rows["prompt_masks"],
                          feature_ensemble=prompts > 1, embedding_type=list(np.repeat(types, prompts)),
                          prompts_per_query=prompts).pred_masks  # [2 * P, 3, H, W]
        expected[folder] = np.asarray(reference).reshape(2, prompts, *reference.shape[1:])
        np.savez(folder + ".inputs.npz", pixel_values=queries, is_instance=flags,
                 prompt_pixel_values=rows["prompt_pixel_values"].reshape(2, prompts, *queries.shape[1:]),
                 prompt_masks=rows["prompt_masks"].reshape(2, prompts, *queries.shape[1:]))
        folders.append(folder)
    result = subprocess.run([sys.executable, "-c", RUNNER, EXPORT_MODULE, *folders], capture_output=True, text=True,
                            timeout=300, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["modules"] == []  # neither flax nor the package: jax, numpy and safetensors only
    for folder in folders:
        ours = np.load(folder + ".out.npy")
        assert ours.shape == expected[folder].shape and float(np.abs(expected[folder]).max()) > 0.05
        assert float(np.abs(ours - expected[folder]).max()) <= 1e-6
    # the artifact's folder is also a checkpoint, and its metadata says what a server needs
    reloaded = SegGptForImageSegmentation.from_pretrained(folders[0])
    np.testing.assert_array_equal(np.asarray(reloaded.decoder.decoder_pred.head.kernel[...]),
                                  np.asarray(model.decoder.decoder_pred.head.kernel[...]))
    with open(os.path.join(folders[1], METADATA_NAME)) as f:
        meta = json.load(f)
    assert meta["prompts_per_query"] == 3 and meta["feature_ensemble"] and meta["batch_size"] == 2
    assert meta["image_size"] == [32, 32] and meta["processor"]["image_mean"] == [0.485, 0.456, 0.406]
    assert [i["name"] for i in meta["inputs"]] == ["pixel_values", "prompt_pixel_values", "prompt_masks",
                                                    "is_instance"]
    assert meta["inputs"][1]["shape"] == [2, 3, 3, 32, 32] and meta["outputs"][0]["shape"] == [2, 3, 3, 64, 32]
    assert meta["versions"]["jax"] == jax.__version__
    assert meta["format_version"] == 1 and meta["stacked_weights"] == {}
    with open(os.path.join(folders[2], METADATA_NAME)) as f:
        meta = json.load(f)
    stacks = {name for name in meta["stacked_weights"] if name.endswith("mlp.lin1.kernel")}
    assert meta["format_version"] == 2 and stacks == {f"model.encoder.stacks.{i}.mlp.lin1.kernel" for i in (0, 2, 3, 5)}


def test_bfloat16_weights_and_input_checks(tmp_path):
    model = tiny_model()
    folder = str(tmp_path / "bf16")
    model.export(1, platforms="cpu", dtype=jnp.bfloat16, weights_dtype=jnp.bfloat16,
                 processor=tiny_processor()).save(folder)
    served = load(folder)
    assert {a.dtype for a in served.weights.values()} == {jnp.dtype(jnp.bfloat16)}
    rows = random_inputs(TINY, batch=1, seed=9)
    out = served(rows["pixel_values"], rows["prompt_pixel_values"][:, None], rows["prompt_masks"][:, None])
    reference = model.astype(jnp.bfloat16).with_settings(dtype=jnp.bfloat16)(**rows).pred_masks
    np.testing.assert_allclose(np.asarray(out)[:, 0], np.asarray(reference), atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match=r"prompt_masks has shape \(1, 3, 32, 32\); this export takes"):
        served(rows["pixel_values"], rows["prompt_pixel_values"][:, None], rows["prompt_masks"])


def test_save_never_replaces_foreign_files(tmp_path):
    export = tiny_model().export(1, platforms="cpu", processor=tiny_processor())
    folder = tmp_path / "out"
    folder.mkdir()
    (folder / METADATA_NAME).write_text("mine")
    with pytest.raises(OutputConflict, match="not written by seggpt-jax"):
        export.save(folder)
    assert sorted(os.listdir(folder)) == [METADATA_NAME]  # nothing else was written
    (folder / METADATA_NAME).unlink()
    export.save(folder)
    with pytest.raises(OutputConflict, match="--overwrite"):
        export.save(folder)
    export.save(folder, overwrite=True)


def test_export_refuses_what_cannot_work(tmp_path):
    model = tiny_model()
    with pytest.raises(ValueError, match="several platforms needs one platform-independent attention"):
        model.export(1, platforms=["cpu", "tpu"], processor=tiny_processor())
    both = model.with_runtime(attention="chunked").export(1, platforms=["cpu", "tpu"], processor=tiny_processor())
    assert both.exported.platforms == ("cpu", "tpu")
    with pytest.raises(ValueError, match="processor resizes to 448x448 but the model takes 32x32"):
        model.export(1, platforms="cpu", processor=SegGptImageProcessor())
    assert model.export(1, platforms="cpu").metadata["processor"]["size"] == [32, 32]  # default: the model's size
    with pytest.raises(ValueError, match="platform must be one of"):
        model.export(1, platforms="metal", processor=tiny_processor())
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        model.export(0, platforms="cpu", processor=tiny_processor())
    with pytest.raises(TypeError, match="needs the painter"):
        from seggpt_jax.export import export_model as export_fn
        export_fn(SegGptModel(TINY, rngs=nnx.Rngs(0)), 1)
    folder = str(tmp_path / "tpu")
    model.export(1, platforms="tpu", processor=tiny_processor()).save(folder)
    with pytest.raises(ValueError, match=r"was exported for \['tpu'\]; this machine's JAX backend is cpu"):
        load(folder)
    with pytest.raises(FileNotFoundError, match="not a seggpt-jax export folder"):
        load(tmp_path)


def test_command_line_export(tmp_path, capsys):
    checkpoint, out = str(tmp_path / "model"), str(tmp_path / "out")
    tiny_model().save_pretrained(checkpoint)
    argv = ["export", checkpoint, "--out-dir", out, "--platform", "tpu", "--batch-size", "2", "--dtype", "bfloat16",
            "--prompts", "2"]
    assert cli_main(argv) == 0
    with open(os.path.join(out, METADATA_NAME)) as f:
        meta = json.load(f)
    assert meta["platforms"] == ["tpu"] and meta["compute_dtype"] == "bfloat16"
    assert meta["attention"] == {"tpu": "flash"}
    assert meta["inputs"][1]["shape"] == [2, 2, 3, 32, 32]
    assert cli_main(argv) == 1  # the files exist: --overwrite replaces them
    assert "pass --overwrite" in capsys.readouterr().err
    assert cli_main(argv + ["--overwrite", "--platform", "cpu"]) == 1
    assert "export one per platform" in capsys.readouterr().err
