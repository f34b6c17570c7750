"""In-context tuning (SegGPT paper, section 3.3): learn the prompt, keep the model frozen.

The prompt is one or more (image, mask) canvases in the model's normalised input space, initialised
from examples or from noise, and optimised with optax on (image, mask) pairs of a task with the same
painter loss (the query half masked, as at inference). The model's parameters are never touched.

    >>> import os, tempfile
    >>> from seggpt_jax import SegGptForImageSegmentation, Segmenter
    >>> from seggpt_jax.data import FolderDataset
    >>> from seggpt_jax.train import LearnedPrompt, PromptTuningConfig, tune_prompt
    >>> model = SegGptForImageSegmentation.from_pretrained("BAAI/seggpt-vit-large")
    >>> data = FolderDataset("examples", images="queries", masks="ground_truth")
    >>> config = PromptTuningConfig(steps=2, batch_size=2, num_prompts=2)  # ~500 steps for a real task
    >>> prompt = tune_prompt(model, data, config)
    >>> path = os.path.join(tempfile.mkdtemp(), "task.prompt.safetensors")
    >>> prompt.save(path)
    >>> Segmenter(model).segment("examples/queries/rocket.jpg", prompts=LearnedPrompt.load(path)).mask.shape
    (427, 640)

On the command line: ``seggpt-jax tune-prompt DATA -o task.prompt.safetensors``, then
``seggpt-jax segment PHOTOS --learned-prompt task.prompt.safetensors --out-dir out/``.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from .. import parallel as _parallel
from ..nn.inputs import default_embedding_type
from ..data import Augment, Dataset, Prefetcher, resize_valid
from ..weights.readers import CheckpointError, SafetensorsReader
from .state import LossLog, due, load_tree, save_tree
from ..imaging.processor import as_processor

FORMAT = "seggpt-jax-learned-prompt/1"


@dataclasses.dataclass(frozen=True)
class _PromptView:
    """One prompt of a :class:`LearnedPrompt`, as the Segmenter takes it."""

    prompt_pixel_values: np.ndarray
    prompt_masks: np.ndarray


@dataclasses.dataclass
class LearnedPrompt:
    """Learned prompt canvases: ``[P, 3, h, w]`` images and masks in the model's normalised space."""

    prompt_pixel_values: np.ndarray
    prompt_masks: np.ndarray
    metadata: dict[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        self.prompt_pixel_values = np.asarray(self.prompt_pixel_values, dtype=np.float32)
        self.prompt_masks = np.asarray(self.prompt_masks, dtype=np.float32)
        if self.prompt_pixel_values.ndim != 4 or self.prompt_pixel_values.shape != self.prompt_masks.shape \
                or self.prompt_pixel_values.shape[1] != 3:
            raise ValueError(f"a learned prompt holds [P, 3, h, w] images and masks; got {self.prompt_pixel_values.shape}"
                             f" and {self.prompt_masks.shape}")

    def __len__(self) -> int:
        return self.prompt_pixel_values.shape[0]

    def prompts(self) -> list[_PromptView]:
        """Each prompt separately (a list of them is what ``Segmenter.segment(prompts=...)`` takes)."""
        return [_PromptView(self.prompt_pixel_values[i], self.prompt_masks[i]) for i in range(len(self))]

    def check_model(self, config) -> None:
        size = tuple(self.prompt_pixel_values.shape[2:])
        if size != tuple(config.query_size):
            raise ValueError(f"this learned prompt is {size[0]}x{size[1]} but the model takes "
                             f"{config.query_size[0]}x{config.query_size[1]} images: it was tuned for another model")

    @property
    def num_labels(self) -> int | None:
        """The mode it was tuned in: ``None`` for binary masks, else the number of classes."""
        value = self.metadata.get("num_labels")
        return None if value is None else int(value)

    def check_mode(self, num_labels: int | None) -> None:
        """Raise unless this prompt was tuned for ``num_labels`` (``None``: binary masks): a prompt
        paints the masks of its own task, in its own colours."""
        if "num_labels" not in self.metadata:
            return  # made by hand (no tuning record): nothing to check against
        if num_labels != self.num_labels:
            def mode(n: int | None) -> str:
                return "binary masks" if n is None else f"{n} classes"

            hint = "drop --num-labels (num_labels)" if self.num_labels is None else \
                f"use --num-labels {self.num_labels} (num_labels={self.num_labels})"
            raise ValueError(f"this learned prompt was tuned for {mode(self.num_labels)}, not {mode(num_labels)}: "
                             f"it paints its own task's masks; {hint}")

    def save(self, path: str | os.PathLike, *, output=None) -> None:
        """safetensors with the canvases and the metadata (JSON) in its header; written atomically (through
        ``output``, an :class:`~seggpt_jax.files.OutputFolder`, when given)."""
        save_tree(os.fspath(path), {"prompt_pixel_values": self.prompt_pixel_values, "prompt_masks": self.prompt_masks},
                  {"format": FORMAT, "metadata": json.dumps(self.metadata, sort_keys=True)}, output=output)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "LearnedPrompt":
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no such learned prompt file: {path}")
        try:
            with SafetensorsReader(path) as reader:
                if reader.metadata.get("format") != FORMAT:
                    raise ValueError(f"{path} is not a learned prompt (format {reader.metadata.get('format')!r}); "
                                     "make one with `seggpt-jax tune-prompt`")
                missing = {"prompt_pixel_values", "prompt_masks"} - set(reader.keys())
                if missing:
                    raise ValueError(f"{path}: learned prompt lacks {sorted(missing)}")
                return cls(reader.get("prompt_pixel_values"), reader.get("prompt_masks"),
                           json.loads(reader.metadata.get("metadata", "{}")))
        except CheckpointError as e:
            raise ValueError(str(e)) from None


@dataclasses.dataclass(frozen=True)
class PromptTuningConfig:
    steps: int = 500
    batch_size: int = 4
    learning_rate: float = 0.05
    num_prompts: int = 1
    init: str = "examples"  # "examples" (the first dataset samples) or "noise"
    tune: str = "both"  # "both", "image" or "mask"
    augment: bool = True  # random crops/flips/colour jitter of the training queries
    embedding_type: str | None = None
    seed: int = 0
    log_every: int = 10
    checkpoint_every: int = 100

    def __post_init__(self):
        if self.init not in ("examples", "noise") or self.tune not in ("both", "image", "mask") \
                or self.steps < 1 or self.batch_size < 1 or self.num_prompts < 1 or self.learning_rate <= 0:
            raise ValueError(f"invalid prompt tuning settings: {self}")


class QueryBatches:
    """``batches(step)`` -> (query pixels, query masks painted, valid) for prompt tuning; seeded by step.
    ``batches(step, rows)``: only those rows (each row has its own generator, seeded by ``(seed, step,
    row)``, so a process of a multi-host job loads only its rows of the same batch)."""

    def __init__(self, dataset: Dataset, model: Any, *, batch_size: int, seed: int,
                 augment: Augment | None = Augment(scale=(0.6, 1.0), jitter=0.1)):
        """``model``: the frozen model (its processor), or a processor, config or ``(height, width)``
        (:func:`~seggpt_jax.imaging.processor.as_processor`)."""
        self.dataset, self.batch_size, self.seed, self.augment = dataset, batch_size, seed, augment
        self.processor = as_processor(model)

    def model_inputs(self, image: np.ndarray, labels: np.ndarray):
        """(query pixels, painted mask, valid ``[1, h, w]``) at the model's input size."""
        mask, valid = self.dataset.mask_picture(labels)
        out = self.processor(images=image, prompt_masks=mask, do_convert_rgb=False, return_tensors="np")
        valid = resize_valid(self.processor, [valid])[0].astype(np.float32)
        return out["pixel_values"][0], out["prompt_masks"][0], valid

    def __call__(self, step: int, rows: range | None = None) -> dict[str, np.ndarray]:
        out = []
        for row in range(self.batch_size) if rows is None else rows:
            rng = np.random.default_rng([self.seed, step, row])
            index = rng.integers(0, len(self.dataset))
            image, labels = self.dataset.load(self.dataset[int(index)])
            if self.augment is not None:
                image, labels = self.augment(image, labels, rng)
            out.append(self.model_inputs(image, labels))
        return {"pixel_values": np.stack([r[0] for r in out]), "labels": np.stack([r[1] for r in out]),
                "valid": np.stack([r[2] for r in out])}


def initial_prompt(dataset: Dataset, model: Any, config: PromptTuningConfig) -> LearnedPrompt:
    """The starting prompt: noise, or the first examples of ``dataset`` through ``model``'s processor
    (``model`` may also be a config: the default processing)."""
    size = (model.config if hasattr(model, "config") else model).query_size
    if config.init == "noise":
        rng = np.random.default_rng(config.seed)
        shape = (config.num_prompts, 3, *size)
        return LearnedPrompt(rng.standard_normal(shape, dtype=np.float32) * 0.5,
                             rng.standard_normal(shape, dtype=np.float32) * 0.5, {"init": "noise"})
    if len(dataset) < config.num_prompts:
        raise ValueError(f"init='examples' needs {config.num_prompts} samples; the dataset has {len(dataset)}")
    batches = QueryBatches(dataset, model, batch_size=1, seed=config.seed, augment=None)
    images, masks = [], []
    for index in range(config.num_prompts):
        image, labels = dataset.load(dataset[index])
        pixels, mask, _ = batches.model_inputs(image, labels)
        images.append(pixels)
        masks.append(mask)
    return LearnedPrompt(np.stack(images), np.stack(masks), {"init": "examples",
                                                            "examples": [dataset[i].name for i in
                                                                         range(config.num_prompts)]})


def prompt_loss(model, prompt: dict, batch: dict, *, instance: bool) -> jax.Array:
    """Painter loss of the frozen ``model`` painting each query's mask from the learned prompt(s)."""
    images, masks = prompt["image"], prompt["mask"]
    count, queries = images.shape[0], batch["pixel_values"].shape[0]
    repeat = lambda x: jnp.repeat(x, count, axis=0)  # noqa: E731  query q's rows are q*count .. q*count+count-1
    tile = lambda x: jnp.tile(x, (queries, 1, 1, 1))  # noqa: E731
    n = model.config.num_patches
    flags = jnp.zeros((queries * count, n), bool).at[:, n // 2:].set(True)
    out = model(repeat(batch["pixel_values"]), tile(images), tile(masks), bool_masked_pos=flags,
                labels=repeat(batch["labels"]), feature_ensemble=count > 1, prompts_per_query=count,
                embedding_type=jnp.full((queries * count,), instance), valid=repeat(batch["valid"]))
    return out.loss


def tune_prompt(model, dataset: Dataset, config: PromptTuningConfig = PromptTuningConfig(), *,
                start: LearnedPrompt | None = None, log: Callable[[dict], None] | None = None,
                checkpoint: str | None = None, start_step: int = 0,
                opt_state: Any = None, output=None, devices: Any = None) -> LearnedPrompt:
    """Optimise a prompt for ``dataset`` with ``model`` frozen; returns the learned prompt.

    With ``checkpoint`` the prompt (and Adam state) is saved every ``checkpoint_every`` steps to
    ``checkpoint`` (+ ``.state.safetensors``), and :func:`resume_prompt_tuning` continues from it;
    ``output`` (an :class:`~seggpt_jax.files.OutputFolder` holding them) records them as the tool's.

    Each step's queries are split over ``devices`` (:func:`seggpt_jax.parallel.select_devices`; default
    every device; ``batch_size`` must divide over them), the model's parameters replicated on them in
    place. Under ``jax.distributed`` each process loads its own rows of each batch, and process 0
    alone writes the checkpoints and calls ``log``.
    """
    data_parallel = _parallel.DataParallel(devices)
    if config.batch_size % data_parallel.size:
        raise ValueError(f"batch_size {config.batch_size} does not divide over {data_parallel.describe()}")
    data_parallel.place(model)
    main = jax.process_index() == 0
    instance = (config.embedding_type or default_embedding_type(dataset.num_labels)) == "instance"
    prompt = start or initial_prompt(dataset, model, config)
    prompt.check_model(model.config)
    params = {"image": jnp.asarray(prompt.prompt_pixel_values), "mask": jnp.asarray(prompt.prompt_masks)}
    tx = optax.adam(config.learning_rate)
    opt_state = opt_state if opt_state is not None else tx.init(params)
    params, opt_state = data_parallel.replicate(params), data_parallel.replicate(opt_state)
    graphdef, state = nnx.split(model)
    trainable = {"image": config.tune in ("both", "image"), "mask": config.tune in ("both", "mask")}

    @jax.jit
    def step(params, opt_state, state, batch):
        def loss_fn(p):
            return prompt_loss(nnx.merge(graphdef, state), p, batch, instance=instance)

        loss, grads = jax.value_and_grad(loss_fn)(params)
        grads = {k: g if trainable[k] else jnp.zeros_like(g) for k, g in grads.items()}
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    batches = QueryBatches(dataset, model, batch_size=config.batch_size, seed=config.seed,
                           **({} if config.augment else {"augment": None}))
    losses = LossLog(config.log_every, config.steps)
    meta = dict(prompt.metadata, num_labels=dataset.num_labels, embedding_type="instance" if instance else "semantic",
                tune=config.tune, learning_rate=config.learning_rate)
    rows = data_parallel.process_rows(config.batch_size)
    for index, batch in enumerate(Prefetcher(lambda s: batches(s, rows), start_step, config.steps)):
        with data_parallel.context():
            params, opt_state, loss = step(params, opt_state, state, data_parallel.shard(**batch))
        done = start_step + index + 1
        record = losses.add(done, loss)
        if log is not None and main and record is not None:
            log(record)
        if checkpoint and due(done, config.checkpoint_every, config.steps):
            host_params, host_state = _parallel.host_state(params), _parallel.host_state(opt_state)
            if main:
                _save_state(checkpoint, host_params, host_state, dict(meta, steps=done), config, output)
            _parallel.sync(f"prompt checkpoint {done}")
    params = _parallel.host_state(params)
    return LearnedPrompt(np.asarray(params["image"]), np.asarray(params["mask"]), dict(meta, steps=config.steps))


def _save_state(path: str, params, opt_state, meta: dict, config: PromptTuningConfig, output=None) -> None:
    LearnedPrompt(np.asarray(params["image"]), np.asarray(params["mask"]), meta).save(path, output=output)
    save_tree(path + ".state.safetensors", opt_state,
              {"step": str(meta["steps"]), "config": json.dumps(dataclasses.asdict(config))}, output=output)


def resume_prompt_tuning(model, dataset: Dataset, checkpoint: str, config: PromptTuningConfig | None = None,
                         **kwargs: Any) -> LearnedPrompt:
    """Continue :func:`tune_prompt` from its checkpoint file; ends where an uninterrupted run would."""
    state_path = checkpoint + ".state.safetensors"
    if not os.path.isfile(state_path):
        raise FileNotFoundError(f"no prompt-tuning state at {state_path}")
    with SafetensorsReader(state_path) as reader:  # the header only
        config = config or PromptTuningConfig(**json.loads(reader.metadata["config"]))
    prompt = LearnedPrompt.load(checkpoint)
    template = optax.adam(config.learning_rate).init({"image": jnp.asarray(prompt.prompt_pixel_values),
                                                      "mask": jnp.asarray(prompt.prompt_masks)})
    opt_state, header = load_tree(state_path, template)
    return tune_prompt(model, dataset, config, start=prompt, start_step=int(header["step"]), opt_state=opt_state,
                       checkpoint=checkpoint, **kwargs)
