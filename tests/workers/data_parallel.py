"""Run with XLA_FLAGS=--xla_force_host_platform_device_count=8: the product over 8 devices against 1.

Prints one JSON line ``{"checks": {...}}``: for each check, the largest difference found (0 when
equal) or a boolean, for the test to hold against the bounds it states:

* ``Segmenter.segment`` (8 devices) vs ``Segmenter(devices=1)``: mixed query sizes, one and three
  prompts per query, per-query prompt lists of different counts, binary and semantic;
* the server's engine and batcher over 8 devices vs the direct one-device answers;
* a ``Trainer`` step (replicated and fsdp) vs one device: loss, gradients, updated parameters;
* ``tune_prompt`` (2 steps) over 8 devices vs one.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import sys
import tempfile

import jax
import numpy as np
from flax import nnx
from PIL import Image

from common import CONFIG, build_model

from seggpt_jax import Segmenter


_COMPILES = [0]


def _count_compile(event: str, duration: float, **kwargs) -> None:
    if event == "/jax/core/compile/backend_compile_duration":
        _COMPILES[0] += 1


jax.monitoring.register_event_duration_secs_listener(_count_compile)


def _pictures(rng, count, size=(40, 50)):
    return [rng.integers(0, 256, (size[0] + 3 * i, size[1] + 2 * i, 3), dtype=np.uint8) for i in range(count)]


def segmenter_checks(checks: dict) -> None:
    rng = np.random.default_rng(0)
    queries = _pictures(rng, 11)
    prompt_images = _pictures(rng, 3)
    binary = [(rng.random((40, 50)) > 0.5).astype(np.uint8) * 255 for _ in range(3)]
    classes = [rng.integers(0, 3, (40, 50)).astype(np.uint8) for _ in range(3)]
    one = Segmenter(build_model(), devices=1)
    many = Segmenter(build_model())
    checks["devices"] = many.parallel.size
    checks["default batch size"] = many.batch_size
    cases = {
        "binary, one prompt": (list(zip(prompt_images[:1], binary[:1])), None),
        "binary, three prompts": (list(zip(prompt_images, binary)), None),
        "semantic, one prompt": (list(zip(prompt_images[:1], classes[:1])), 2),
        "semantic, three prompts": (list(zip(prompt_images, classes)), 2),
        "per-query prompts (1 to 3)": ([list(zip(prompt_images, binary))[:1 + i % 3] for i in range(len(queries))],
                                       None),
    }
    for name, (prompts, labels) in cases.items():
        a = one.segment(queries, prompts, num_labels=labels, return_scores=True)
        b = many.segment(queries, prompts, num_labels=labels, return_scores=True)
        checks[f"segment {name}: masks differ"] = int(sum(int((x.mask != y.mask).sum()) for x, y in zip(a, b)))
        checks[f"segment {name}: scores"] = max(float(np.abs(x.scores - y.scores).max()) for x, y in zip(a, b))
    checks["shapes run on 8 devices (rows, prompts)"] = sorted(many.shapes_run)


def engine_checks(checks: dict) -> None:
    from seggpt_jax.serve.engine import CompileKey, Engine, ServeSettings

    rng = np.random.default_rng(1)
    one = Segmenter(build_model(), devices=1)
    engine = Engine(ServeSettings(model="tiny", max_batch=12, max_wait_ms=50, max_prompts=2, decode_threads=2),
                    lambda: Segmenter(build_model()))
    pictures = _pictures(rng, 9)
    prompt_images = _pictures(rng, 2)
    masks = [(rng.random((40, 50)) > 0.5).astype(np.uint8) * 255 for _ in range(2)]

    def png(array) -> bytes:
        import io

        buffer = io.BytesIO()
        Image.fromarray(array).save(buffer, format="PNG")
        return buffer.getvalue()

    async def run() -> None:
        await engine.start()
        checks["engine buckets (queries) by prompt count"] = {str(k): v for k, v in engine.buckets().items()}
        worst = 0
        for count in (1, 2):
            prompts = engine.prepare_prompts([(png(i), "p.png", png(m), "m.png")
                                              for i, m in zip(prompt_images[:count], masks[:count])], None, None)
            jobs = [engine.prepare_query(png(p), f"q{i}.png", i, prompts, None) for i, p in enumerate(pictures)]
            painted = await asyncio.gather(*(engine.batcher.submit(job.key, job) for job in jobs))
            direct = one.segment(pictures, list(zip(prompt_images[:count], masks[:count])))
            for job, answer, reference in zip(jobs, painted, direct):
                _, mask = engine.finish(job, answer)
                worst = max(worst, int((mask != reference.mask).sum()))
        checks["engine over 8 devices: mask pixels that differ from Segmenter(devices=1)"] = worst
        checks["engine batches (prompts, size, bucket)"] = sorted(
            (key.prompts_per_query, size, bucket) for key, size, bucket in engine.batcher.stats.batches)
        await engine.close()

    asyncio.run(run())


def _dataset(root: str):
    from seggpt_jax.data import FolderDataset

    rng = np.random.default_rng(2)
    os.makedirs(os.path.join(root, "images"))
    os.makedirs(os.path.join(root, "masks"))
    for i in range(6):
        Image.fromarray(rng.integers(0, 256, (36, 30, 3), dtype=np.uint8)).save(os.path.join(root, "images", f"{i}.png"))
        Image.fromarray((rng.random((36, 30)) > 0.5).astype(np.uint8) * 255).save(
            os.path.join(root, "masks", f"{i}.png"))
    return FolderDataset(root).validate()


def trainer_checks(checks: dict, root: str) -> None:
    from seggpt_jax.train.trainer import EpisodeBatches, Trainer, TrainConfig, batch_loss_terms

    data = _dataset(os.path.join(root, "data"))
    config = TrainConfig(steps=2, batch_size=8, warmup_steps=0, learning_rate=1e-3, log_every=1, drop_path=True)
    batches = EpisodeBatches(data, CONFIG, batch_size=8, seed=3)
    batch = batches(0)
    checks["a batch's rows equal its rows loaded alone"] = all(
        np.array_equal(batches(0, range(3, 5))[k], v[3:5]) for k, v in batch.items())

    def grads_of(trainer):
        def loss(model):
            numerator, count = batch_loss_terms(model, shard)
            return numerator / count

        with trainer.parallel.context():
            value, grads = nnx.value_and_grad(loss)(trainer.model)
        return float(value), jax.tree.map(lambda g: np.asarray(jax.device_get(g)), nnx.state(grads, nnx.Param))

    reference = Trainer(build_model(), config, batches=batches, devices=1)
    shard = reference.parallel.shard(**batch)
    ref_loss, ref_grads = grads_of(reference)
    ref_step = float(reference.train_step(batch))
    reference.train_step(batches(1))
    ref_params = nnx.state(reference.model, nnx.Param)
    scale = max(float(np.abs(g).max()) for g in jax.tree.leaves(ref_grads))
    checks["gradient scale"] = scale
    for weights in ("replicated", "fsdp"):
        trainer = Trainer(build_model(), config, batches=batches, weights=weights)
        kernel = trainer.model.model.encoder.layers[0].mlp.lin1.kernel[...]
        checks[f"{weights}: parameter split over devices"] = not kernel.sharding.is_fully_replicated
        shard = trainer.parallel.shard(**batch)
        loss, grads = grads_of(trainer)
        checks[f"{weights}: loss"] = abs(loss - ref_loss) / abs(ref_loss)
        checks[f"{weights}: gradients (relative to their scale)"] = max(
            float(np.abs(a - b).max()) for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads))) / scale
        checks[f"{weights}: step loss"] = abs(float(trainer.train_step(batch)) - ref_step) / abs(ref_step)
        compiled = _COMPILES[0]
        trainer.train_step(batches(1))
        checks[f"{weights}: programs compiled by the second step"] = _COMPILES[0] - compiled
        with trainer.parallel.context():  # the step's program: what crosses between devices
            program = trainer._step_fn.lower(nnx.state((trainer.model, trainer.optimizer)), shard,
                                             jax.random.key(0)).compile().as_text()
        gathered = [tuple(int(d) for d in dims.split(",") if d)
                    for line in program.splitlines() if re.search(r" all-gather(-start)?\(", line)
                    for dims in re.findall(r"[a-z0-9]+\[([0-9,]*)\]", line.split(" all-gather")[0].split("=", 1)[-1])]
        parameters = {tuple(leaf.shape) for leaf in jax.tree.leaves(nnx.state(trainer.model, nnx.Param))}
        checks[f"{weights}: arrays gathered in the step"] = len(gathered)
        checks[f"{weights}: gathered arrays that are not parameters"] = sorted(set(gathered) - parameters)
        params = nnx.state(trainer.model, nnx.Param)
        checks[f"{weights}: parameters after 2 AdamW steps (lr 1e-3)"] = max(
            float(np.abs(np.asarray(jax.device_get(a)) - np.asarray(jax.device_get(b))).max())
            for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(ref_params)))
        if weights == "fsdp":
            run = os.path.join(root, "run")
            trainer.save(os.path.join(run, "step"))
            restored = Trainer.restore(os.path.join(run, "step"), devices=1)
            checks["fsdp checkpoint restores the parameters"] = max(
                float(np.abs(np.asarray(jax.device_get(a)) - np.asarray(jax.device_get(b))).max())
                for a, b in zip(jax.tree.leaves(nnx.state(restored.model, nnx.Param)), jax.tree.leaves(params)))


def prompt_checks(checks: dict, root: str) -> None:
    from seggpt_jax.train.prompt_tuning import PromptTuningConfig, tune_prompt

    data = _dataset(os.path.join(root, "prompt-data"))
    config = PromptTuningConfig(steps=2, batch_size=8, num_prompts=2, learning_rate=0.01)
    one = tune_prompt(build_model(), data, config, devices=1)
    many = tune_prompt(build_model(), data, config)
    checks["tune_prompt: learned prompt"] = max(
        float(np.abs(one.prompt_pixel_values - many.prompt_pixel_values).max()),
        float(np.abs(one.prompt_masks - many.prompt_masks).max()))


def main() -> None:
    assert jax.device_count() == 8, jax.devices()
    checks: dict = {}
    with tempfile.TemporaryDirectory() as root:
        segmenter_checks(checks)
        engine_checks(checks)
        trainer_checks(checks, root)
        prompt_checks(checks, root)
    print(json.dumps({"checks": checks}))


if __name__ == "__main__":
    sys.exit(main())
