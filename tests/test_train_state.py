"""Training state on disk: one format keyed by pytree path, and checkpoints that survive interruption."""

from __future__ import annotations

import os

import numpy as np
import optax
import pytest
from flax import nnx

from seggpt_jax import SegGptConfig, SegGptForImageSegmentation
from seggpt_jax.train import Trainer, TrainConfig
from seggpt_jax.train.state import load_tree, save_tree
from seggpt_jax.weights import flat_parameters

SMALL = SegGptConfig(image_size=(32, 16), patch_size=4, hidden_size=16, num_hidden_layers=3, num_attention_heads=2,
                     merge_index=1, intermediate_hidden_state_indices=(1, 2), pretrain_image_size=12,
                     decoder_hidden_size=4)


def _batches(step: int) -> dict:
    rng = np.random.default_rng(step)
    shape = (2, 3, *SMALL.query_size)
    batch = {k: rng.standard_normal(shape, dtype=np.float32)
             for k in ("pixel_values", "prompt_pixel_values", "prompt_masks", "labels")}
    flags = np.zeros((2, SMALL.num_patches), bool)
    flags[:, SMALL.num_patches // 2:] = True
    batch.update(bool_masked_pos=flags, is_instance=np.ones(2, bool), valid=np.ones((2, 1, *SMALL.query_size),
                                                                                      np.float32))
    return batch


def _params(model) -> dict[str, np.ndarray]:
    return {k: np.asarray(v[...]) for k, v in flat_parameters(model).items()}


def test_state_files_are_keyed_by_path_and_refuse_another_structure(tmp_path):
    params = {"image": np.arange(6, dtype=np.float32).reshape(2, 3), "mask": np.ones(3, np.float32)}
    state = optax.adam(0.1).init(params)
    path = str(tmp_path / "state.safetensors")
    save_tree(path, state, {"step": "7"})
    loaded, metadata = load_tree(path, state)
    assert metadata["step"] == "7"
    from safetensors import safe_open

    with safe_open(path, "numpy") as f:
        assert sorted(f.keys()) == ["0.count", "0.mu.image", "0.mu.mask", "0.nu.image", "0.nu.mask"]
    with pytest.raises(ValueError, match=r"does not match this state .*missing \['0.mu.extra'"):
        load_tree(path, optax.adam(0.1).init(dict(params, extra=np.zeros(2, np.float32))))


def test_an_interrupted_save_never_costs_the_previous_checkpoint(tmp_path, monkeypatch):
    run = str(tmp_path / "run")
    config = TrainConfig(steps=2, batch_size=2, warmup_steps=1, checkpoint_every=1, drop_path=False)
    trainer = Trainer(SegGptForImageSegmentation(SMALL, rngs=nnx.Rngs(0)), config, batches=_batches)
    trainer.fit(checkpoint_dir=run)
    previous = _params(trainer.model)
    trainer.config = TrainConfig(steps=3, batch_size=2, warmup_steps=1, checkpoint_every=1, drop_path=False)
    trainer.train_step(_batches(2))
    after = _params(trainer.model)

    real_replace = os.replace

    def restored() -> dict[str, np.ndarray]:
        return _params(Trainer.restore(run).model)  # through run/latest -> step_0000002

    def same(a: dict, b: dict) -> bool:
        return all(np.array_equal(a[k], b[k]) for k in a)

    for target in ("step_0000003", "step_0000002"):  # a new checkpoint, and one saved over the latest
        interrupt_at = 0
        while True:
            interrupt_at += 1
            calls = []

            def replace(src, dst, calls=calls, at=interrupt_at):
                calls.append(dst)
                if len(calls) == at:
                    raise KeyboardInterrupt
                return real_replace(src, dst)

            monkeypatch.setattr(os, "replace", replace)
            try:
                trainer.save(os.path.join(run, target))
                finished = True
            except KeyboardInterrupt:
                finished = False
            finally:
                monkeypatch.setattr(os, "replace", real_replace)
            state = restored()
            if target == "step_0000003":
                assert same(state, previous), (target, interrupt_at)
            else:
                assert same(state, previous) or same(state, after), (target, interrupt_at)
            if finished:
                break
        assert interrupt_at > 3, target  # the save has several write points, each interrupted once
    assert same(restored(), after)
    assert same(_params(Trainer.restore(os.path.join(run, "step_0000003")).model), after)
