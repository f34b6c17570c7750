"""Fine-tuning and in-context (prompt) tuning: gradients against transformers, learning, exact resume."""

from __future__ import annotations

import numpy as np
import optax
import pytest
from conftest import TINY_CONFIGS, random_bool_masked_pos, random_inputs, to_torch
from flax import nnx
from PIL import Image

from seggpt_jax import SegGptConfig, SegGptForImageSegmentation, Segmenter, painter_loss
from seggpt_jax.weights import TRANSFORMERS, flat_parameters
from seggpt_jax.data import FolderDataset, FSS1000Dataset, sample_episodes
from seggpt_jax_testing.synthetic import write_synthetic_fss
from seggpt_jax.eval.protocols import evaluate_episodes
from seggpt_jax.train.prompt_tuning import (LearnedPrompt, PromptTuningConfig, initial_prompt, resume_prompt_tuning,
                                      tune_prompt)
from seggpt_jax.train.trainer import EpisodeBatches, Trainer, TrainConfig, batch_loss_terms

SMALL = SegGptConfig(image_size=(64, 32), patch_size=4, hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
                     merge_index=1, intermediate_hidden_state_indices=(1, 3), pretrain_image_size=32,
                     decoder_hidden_size=16, drop_path_rate=0.0)


def _params(model) -> dict[str, np.ndarray]:
    return {k: np.asarray(v[...]) for k, v in flat_parameters(model).items()}


# ------------------------------------------------------------------------------------ parity
@pytest.mark.parametrize("name", sorted(TINY_CONFIGS))
def test_loss_and_gradients_match_transformers_autograd(hf_tiny, name):
    hf, path = hf_tiny(name)
    model = SegGptForImageSegmentation.from_pretrained(path)
    inputs = random_inputs(model.config, batch=2, seed=81, labels=True)
    kwargs = dict(bool_masked_pos=random_bool_masked_pos(model.config.num_patches, batch=2, seed=82),
                  embedding_type="semantic")
    hf.zero_grad(set_to_none=True)
    reference = hf(**to_torch(inputs), **to_torch(kwargs))  # eval mode: drop-path off, as ours without a key
    reference.loss.backward()
    loss, grads = nnx.value_and_grad(lambda m: m(**inputs, **kwargs).loss)(model)
    assert abs(float(loss) - float(reference.loss.detach())) <= 1e-6
    ours = {".".join(str(p) for p in path): g[...] for path, g in nnx.to_flat_state(grads)}
    worst, checked = 0.0, 0
    for hf_name, param in hf.named_parameters():
        target, transform = TRANSFORMERS.match(hf_name)
        ours_grad = transform.invert(np.asarray(ours[target]))
        theirs = param.grad.numpy() if param.grad is not None else np.zeros(param.shape, np.float32)  # unused
        difference = float(np.max(np.abs(ours_grad - theirs)))
        assert difference <= 1e-5, f"{hf_name}: {difference}"
        worst, checked = max(worst, difference), checked + 1
    assert checked == len(ours) and worst > 0  # every parameter compared, and the gradients are not all zero
    hf.zero_grad(set_to_none=True)


def test_validity_mask_excludes_pixels():
    rng = np.random.default_rng(0)
    pred = rng.standard_normal((1, 3, 64, 32)).astype(np.float32)
    masks, labels = (rng.standard_normal((1, 3, 32, 32)).astype(np.float32) for _ in range(2))
    flags = np.ones((1, SMALL.num_patches), bool)
    valid = np.ones((1, 1, 32, 32), np.float32)
    valid[..., :16] = 0
    full = float(painter_loss(SMALL, pred, masks, labels, flags))
    partial = float(painter_loss(SMALL, pred, masks, labels, flags, valid=valid))
    target = np.concatenate([masks, labels], axis=2)
    diff = np.abs(pred - target)
    smooth = np.where(diff < 0.01, 0.5 * diff ** 2 / 0.01, diff - 0.005)
    keep = np.ones((1, 1, 64, 32), bool)
    keep[:, :, 32:, :16] = False
    assert full == pytest.approx(float(smooth.mean()), rel=1e-5)
    assert partial == pytest.approx(float(smooth[np.broadcast_to(keep, smooth.shape)].mean()), rel=1e-5)


# ------------------------------------------------------------------------------------ the trainer
def _tensor_batches(seed: int = 0, rows: int = 4):
    """Synthetic tensors: the query's mask is the prompt's mask (a copy task), any image."""

    def make(step: int) -> dict:
        rng = np.random.default_rng([seed, step])
        masks = np.full((rows, 3, 32, 32), -2.0, np.float32)
        for m in masks:
            for _ in range(2):
                h, w = rng.integers(8, 20, 2)
                top, left = rng.integers(0, 32 - h), rng.integers(0, 32 - w)
                m[:, top:top + h, left:left + w] = 2.2
        flags = np.zeros((rows, SMALL.num_patches), bool)
        flags[:, SMALL.num_patches // 2:] = True
        return dict(pixel_values=rng.standard_normal((rows, 3, 32, 32), dtype=np.float32),
                    prompt_pixel_values=rng.standard_normal((rows, 3, 32, 32), dtype=np.float32),
                    prompt_masks=masks, labels=masks.copy(), bool_masked_pos=flags, is_instance=np.ones(rows, bool))

    return make


def test_gradient_accumulation_equals_one_big_batch():
    batch = _tensor_batches(rows=4)(0)
    batch["bool_masked_pos"] = random_bool_masked_pos(SMALL.num_patches, 4, seed=3)  # unequal counts per row
    results, initial = [], _params(SegGptForImageSegmentation(SMALL, rngs=nnx.Rngs(0)))
    for accum in (1, 2, 4):
        model = SegGptForImageSegmentation(SMALL, rngs=nnx.Rngs(0))
        sgd = nnx.Optimizer(model, optax.sgd(1.0), wrt=nnx.Param)  # the update is the gradient itself
        trainer = Trainer(model, TrainConfig(steps=1, batch_size=4, grad_accum=accum), optimizer=sgd)
        loss = trainer.train_step(batch)
        results.append((float(loss), _params(model)))
    assert any(not np.array_equal(initial[k], results[0][1][k]) for k in initial)  # the step did update
    for loss, params in results[1:]:
        assert loss == pytest.approx(results[0][0], rel=1e-5)
        for key, value in params.items():
            np.testing.assert_allclose(value, results[0][1][key], atol=1e-6, err_msg=key)


def test_trainable_subsets_and_layer_decay():
    model = SegGptForImageSegmentation(SMALL, rngs=nnx.Rngs(0))
    before = _params(model)
    trainer = Trainer(model, TrainConfig(steps=2, batch_size=4, trainable="decoder", layer_decay=0.8,
                                         warmup_steps=0, learning_rate=1e-3), batches=_tensor_batches())
    trainer.fit()
    after = _params(model)
    changed = {k for k in before if not np.array_equal(before[k], after[k])}
    assert changed and all(k.startswith("decoder.") for k in changed)
    assert any(k.startswith("decoder.") for k in changed)
    with pytest.raises(ValueError, match="grad_accum must divide batch_size"):
        TrainConfig(batch_size=6, grad_accum=4)


def test_bfloat16_remat_training_step_runs():
    model = SegGptForImageSegmentation(SMALL, rngs=nnx.Rngs(0))
    trainer = Trainer(model, TrainConfig(steps=2, batch_size=4, dtype="bfloat16", remat_policy="full",
                                         warmup_steps=0), batches=_tensor_batches())
    history = trainer.fit(log=None)
    assert np.isfinite(history[-1]["loss"])
    assert all(v[...].dtype == np.float32 for v in flat_parameters(model).values())


def test_resumed_run_ends_with_the_same_parameters(tmp_path):
    config = TrainConfig(steps=12, batch_size=4, checkpoint_every=4, log_every=4, warmup_steps=2,
                         learning_rate=1e-3, seed=7)
    drop = SMALL.replace(drop_path_rate=0.2)  # randomness in the step, too
    straight = Trainer(SegGptForImageSegmentation(drop, rngs=nnx.Rngs(0)), config, batches=_tensor_batches())
    straight.fit(checkpoint_dir=str(tmp_path / "straight"))

    first = Trainer(SegGptForImageSegmentation(drop, rngs=nnx.Rngs(0)), config, batches=_tensor_batches())
    first.fit(checkpoint_dir=str(tmp_path / "run"), stop_after=6)  # "interrupted" after step 6
    assert (tmp_path / "run" / "latest").read_text().strip() == "step_0000006"
    resumed = Trainer.restore(str(tmp_path / "run"), batches=_tensor_batches())
    assert resumed.step_count == 6
    resumed.fit(checkpoint_dir=str(tmp_path / "run"))
    a, b = _params(straight.model), _params(resumed.model)
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    assert straight.history[-1]["step"] == resumed.history[-1]["step"] == 12
    assert straight.history[-1]["loss"] == resumed.history[-1]["loss"]  # the same steps 9..12 in both


# ------------------------------------------------------------------------------------ learning
@pytest.fixture(scope="module")
def red_shapes(tmp_path_factory):
    """The synthetic task of the issue: coloured shapes on textured backgrounds, segment the red ones."""
    root = tmp_path_factory.mktemp("shapes")
    train = FSS1000Dataset(write_synthetic_fss(root / "train", 24, colours=("red",), seed=0)).validate()
    held = FSS1000Dataset(write_synthetic_fss(root / "held", 8, colours=("red",), seed=1)).validate()
    return train, held


def _held_out(model, held) -> tuple[float, float]:
    """(painter loss with the query half masked, IoU of one-shot episodes) on the held-out set."""
    batches = EpisodeBatches(held, model.config, batch_size=8, seed=99, augment=None, half_mask_prob=1.0)
    losses = []
    for step in range(3):
        total, count = batch_loss_terms(model, batches(step))
        losses.append(float(total / count))
    report = evaluate_episodes(Segmenter(model, batch_size=8), held, sample_episodes(held, seed=0))
    return float(np.mean(losses)), report["mIoU"]


def test_finetuning_learns_the_synthetic_task(red_shapes):
    train, held = red_shapes
    model = SegGptForImageSegmentation(SMALL, rngs=nnx.Rngs(0))
    loss_before, iou_before = _held_out(model, held)
    config = TrainConfig(steps=400, batch_size=8, learning_rate=2e-3, warmup_steps=20, half_mask_prob=1.0,
                         log_every=100)
    Trainer(model, config, batches=EpisodeBatches(train, SMALL, batch_size=8, half_mask_prob=1.0)).fit()
    loss_after, iou_after = _held_out(model, held)
    print(f"held-out loss {loss_before:.3f} -> {loss_after:.3f}, IoU {iou_before:.3f} -> {iou_after:.3f}")
    assert loss_after < 0.5 * loss_before
    assert iou_after >= iou_before + 0.5  # the stated margin: +0.5 IoU (measured: 0.00 -> 0.87)


def _route_to_the_prompt(model, gain: float = 4.0):
    """Fix layer 0's attention to look, from every query-half patch, at the prompt-half patch at the same
    place (and nowhere else): q is one constant direction, k is zero, and the relative tables reward
    only the row offset of half the grid and the column offset 0. The logit of that patch is then
    ``2 gain^2`` above the rest of its row and column, ``2 gain^2`` above everything else: the
    softmax puts ``1 - 3e-6`` of the weight on it."""
    config = model.config
    rows, cols = config.grid_size
    width, heads = config.hidden_size, config.num_attention_heads
    attention = model.model.encoder.layers[0].attention
    kernel, bias = np.array(attention.qkv.kernel[...]), np.array(attention.qkv.bias[...])
    kernel[:, :2 * width], bias[:2 * width] = 0, 0  # q and k: no content
    bias[np.arange(heads) * config.head_dim] = gain  # q = gain * e0 in every head
    table_h, table_w = np.zeros(attention.rel_pos_h[...].shape, np.float32), np.zeros(attention.rel_pos_w[...].shape,
                                                                                      np.float32)
    table_h[rows // 2 + rows - 1, 0] = gain  # index q_row - k_row + rows - 1: the patch half a grid above
    table_w[cols - 1, 0] = gain  # the same column
    attention.qkv.kernel[...], attention.qkv.bias[...] = kernel, bias
    attention.rel_pos_h[...], attention.rel_pos_w[...] = table_h, table_w
    return model


@pytest.fixture(scope="module")
def copying_model():
    """A model that paints the query's mask where the prompt's mask is (it reads its prompt).

    Learning to look at the prompt from scratch sits on a plateau (the loss stays at ~1.27, the average
    mask) for a number of steps that depends on float rounding, so it differs between CPU generations.
    Here the routing is fixed by hand (:func:`_route_to_the_prompt`, kept out of training) and the rest
    learns to carry the prompt's mask to the decoder: a regression without a plateau. Measured on the
    AVX-512 machine, also with XLA limited to AVX2 (``XLA_FLAGS=--xla_cpu_max_isa=AVX2``), the same
    losses: 0.51 at step 100, 0.03 at 150, <= 0.02 after 200. The bar below is 0.3 after 300 steps.
    """
    model = _route_to_the_prompt(SegGptForImageSegmentation(SMALL, rngs=nnx.Rngs(0)))
    config = TrainConfig(steps=300, batch_size=8, learning_rate=2e-3, min_learning_rate=2e-3, warmup_steps=20,
                         log_every=100, trainable=r"^(?!model\.encoder\.layers\.0\.attention\.(qkv|rel_pos))")
    history = Trainer(model, config, batches=_tensor_batches(rows=8)).fit()
    assert history[-1]["loss"] < 0.3, history
    return model


@pytest.fixture(scope="module")
def layout_task(tmp_path_factory):
    """Every image (random texture) has the same mask layout: the task a learned prompt must encode."""
    root = tmp_path_factory.mktemp("layout")
    (root / "images").mkdir()
    (root / "masks").mkdir()
    mask = np.zeros((64, 64), np.uint8)
    mask[8:40, 12:36] = 255
    mask[44:60, 40:60] = 255
    rng = np.random.default_rng(5)
    for i in range(16):
        texture = rng.integers(0, 256, (16, 16, 3)).astype(np.uint8)
        Image.fromarray(texture).resize((64, 64), Image.BILINEAR).save(root / "images" / f"{i:02d}.png")
        Image.fromarray(mask, mode="L").save(root / "masks" / f"{i:02d}.png")
    return FolderDataset(root).validate()


def _iou_with(model, dataset, prompt) -> float:
    segmenter, scores = Segmenter(model), []
    for i in range(len(dataset)):
        image, labels = dataset.load(dataset[i])
        mask = segmenter.segment(image, prompts=prompt).mask
        scores.append(np.sum(mask & (labels == 1)) / max(np.sum(mask | (labels == 1)), 1))
    return float(np.mean(scores))


def test_in_context_tuning_raises_iou_and_leaves_the_model_alone(copying_model, layout_task, tmp_path):
    model = copying_model
    before = _params(model)
    config = PromptTuningConfig(steps=150, batch_size=4, learning_rate=0.05, init="noise", augment=False, seed=3,
                                checkpoint_every=50)
    untuned = initial_prompt(layout_task, model.config, config)
    iou_untuned = _iou_with(model, layout_task, untuned)
    learned = tune_prompt(model, layout_task, config, checkpoint=str(tmp_path / "p.safetensors"))
    iou_tuned = _iou_with(model, layout_task, learned)
    print(f"in-context tuning: IoU {iou_untuned:.3f} (noise prompt) -> {iou_tuned:.3f}")
    assert iou_tuned >= iou_untuned + 0.3
    after = _params(model)
    for key in before:
        np.testing.assert_array_equal(before[key], after[key], err_msg=key)

    learned.save(tmp_path / "learned.safetensors")
    again = LearnedPrompt.load(tmp_path / "learned.safetensors")
    np.testing.assert_array_equal(again.prompt_masks, learned.prompt_masks)
    assert again.metadata["init"] == "noise" and again.metadata["steps"] == 150
    assert _iou_with(model, layout_task, again) == pytest.approx(iou_tuned)


def test_prompt_tuning_resumes_exactly(copying_model, layout_task, tmp_path):
    config = PromptTuningConfig(steps=20, batch_size=2, learning_rate=0.05, init="noise", checkpoint_every=10,
                                num_prompts=2)
    straight = tune_prompt(copying_model, layout_task, config)
    path = str(tmp_path / "cut.safetensors")
    tune_prompt(copying_model, layout_task, PromptTuningConfig(**{**config.__dict__, "steps": 10}), checkpoint=path)
    resumed = resume_prompt_tuning(copying_model, layout_task, path, config)
    np.testing.assert_array_equal(straight.prompt_pixel_values, resumed.prompt_pixel_values)
    np.testing.assert_array_equal(straight.prompt_masks, resumed.prompt_masks)
    assert len(resumed) == 2


def test_learned_prompt_errors(tmp_path, copying_model):
    with pytest.raises(FileNotFoundError, match="no such learned prompt file"):
        LearnedPrompt.load(tmp_path / "missing.safetensors")
    copying_model.save_pretrained(tmp_path / "model")
    with pytest.raises(ValueError, match="is not a learned prompt"):
        LearnedPrompt.load(tmp_path / "model" / "model.safetensors")
    wrong = LearnedPrompt(np.zeros((1, 3, 8, 8)), np.zeros((1, 3, 8, 8)))
    with pytest.raises(ValueError, match="this learned prompt is 8x8 but the model takes 32x32"):
        Segmenter(copying_model).segment(np.zeros((10, 10, 3), np.uint8), prompts=wrong)
    with pytest.raises(ValueError, match=r"a learned prompt holds \[P, 3, h, w\]"):
        LearnedPrompt(np.zeros((3, 8, 8)), np.zeros((3, 8, 8)))


def test_rgb_mask_datasets_feed_both_trainers(tmp_path):
    """Colour masks are used as painted (no palette), by fine-tuning and prompt-tuning batches alike."""
    from seggpt_jax.train.prompt_tuning import QueryBatches

    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(tmp_path / "images" / f"{i}.png")
        Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(tmp_path / "masks" / f"{i}.png")
    data = FolderDataset(tmp_path, rgb_masks=True).validate()
    queries = QueryBatches(data, SMALL.query_size, batch_size=2, seed=0, augment=None)(0)
    assert queries["labels"].shape == (2, 3, 32, 32) and queries["valid"].shape == (2, 1, 32, 32)
    assert np.all(queries["valid"] == 1)
    episodes = EpisodeBatches(data, SMALL, batch_size=2, augment=None)(0)
    assert episodes["labels"].shape == (2, 3, 32, 32) and episodes["valid"].shape == (2, 1, 64, 32)
