"""Fine-tuning SegGPT with optax and a Flax NNX optimizer (in-context painting, as SegGPT is trained).

Each training row is a prompt pair and a query pair from the same group (task or class); both halves
of the mask canvas are randomly masked (``mask_ratio``, or, with ``half_mask_prob``, just the query
half as at inference) and the smooth-L1 painter loss is taken over the masked, valid pixels.

    >>> import tempfile
    >>> from seggpt_jax import SegGptForImageSegmentation
    >>> from seggpt_jax.data import FolderDataset
    >>> from seggpt_jax.train import EpisodeBatches, Trainer, TrainConfig
    >>> model = SegGptForImageSegmentation.from_pretrained("BAAI/seggpt-vit-large")
    >>> data = FolderDataset("examples", images="queries", masks="ground_truth").validate()
    >>> config = TrainConfig(steps=2, batch_size=2, warmup_steps=1)  # ~2000 steps for a real task
    >>> trainer = Trainer(model, config, batches=EpisodeBatches(data, model, batch_size=2))
    >>> run = tempfile.mkdtemp()
    >>> history = trainer.fit(checkpoint_dir=run)   # checkpoints in run/step_N, run/latest names the last
    >>> Trainer.restore(run).step_count             # resumes exactly where it stopped
    2

Everything random derives from ``TrainConfig.seed`` and the step number (data, masks, drop-path), so a
run resumed from a checkpoint ends with exactly the parameters of an uninterrupted run.

A Trainer runs data-parallel over every device by default (``devices=`` limits it): each step's batch
is split over the devices and the gradients are summed across them, so a step equals one device's up
to the order of that sum (see :mod:`seggpt_jax.parallel`). ``weights="fsdp"`` also splits the
parameters and the optimizer state over the devices; under ``jax.distributed`` each process loads only
its own rows of each batch, and checkpoints are gathered and written once, by process 0.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import re
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from ..config import SegGptConfig
from ..runtime import COMPUTE_DTYPES, RuntimeConfig
from ..data import Augment, Dataset, Prefetcher, resize_valid
from ..models import SegGptForImageSegmentation
from ..nn.inputs import default_embedding_type
from ..nn.models import painter_loss_terms
from ..nn.paths import layer_paths, stack_start
from ..weights import path_key
from ..imaging.processor import as_processor
from ..files import OutputFolder, replace_folder, write_json
from .. import parallel as _parallel
from ..parallel import DataParallel
from .state import LossLog, due, load_tree, point_latest, prune_checkpoints, resolve_checkpoint, save_tree

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Fine-tuning hyper-parameters (the paper's recipe: AdamW, lr 1e-4, weight decay 0.05)."""

    steps: int = 1000
    batch_size: int = 8
    learning_rate: float = 1e-4
    weight_decay: float = 0.05
    warmup_steps: int = 100
    min_learning_rate: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: float | None = None
    layer_decay: float | None = None  # e.g. 0.75: layer i of L gets lr * decay ** (L + 1 - (i + 1))
    trainable: str = "all"  # "all", "decoder", or a regex on parameter paths ("model.encoder.layers.2[0-3]")
    mask_ratio: float = 0.75
    half_mask_prob: float = 0.0
    drop_path: bool = True
    grad_accum: int = 1
    remat_policy: str | None = None
    dtype: str = "float32"
    seed: int = 0
    log_every: int = 10
    checkpoint_every: int = 100

    def __post_init__(self):
        checks = [
            (self.steps >= 1, "steps must be >= 1"), (self.batch_size >= 1, "batch_size must be >= 1"),
            (self.learning_rate > 0, "learning_rate must be > 0"), (self.weight_decay >= 0, "weight_decay must be >= 0"),
            (0 <= self.warmup_steps, "warmup_steps must be >= 0"),
            (0 < self.mask_ratio <= 1, "mask_ratio must be in (0, 1]"), (0 <= self.half_mask_prob <= 1,
                                                                         "half_mask_prob must be in [0, 1]"),
            (self.grad_accum >= 1 and self.batch_size % self.grad_accum == 0,
             "grad_accum must divide batch_size"),
            (self.dtype in COMPUTE_DTYPES, f"dtype must be one of {COMPUTE_DTYPES}"),
            (self.layer_decay is None or 0 < self.layer_decay <= 1, "layer_decay must be in (0, 1]"),
        ]
        bad = [message for ok, message in checks if not ok]
        if bad:
            raise ValueError("; ".join(bad))
        trainable_filter(self.trainable)  # validates the regex

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> "TrainConfig":
        data = dict(data)
        data["betas"] = tuple(data["betas"])
        return cls(**data)


# ------------------------------------------------------------------------------------ parameters
def trainable_rows(spec: str, name: str, shape: tuple[int, ...]) -> list[bool]:
    r"""Which layers of the parameter at dotted path ``name`` ``spec`` selects: one flag, or, for a stacked
    parameter of a scanned model (:mod:`seggpt_jax.nn.paths`), one per row.

    ``spec`` is ``"all"``, ``"decoder"``, or a regex searched in each *layer path*
    (``model.encoder.layers.21.mlp.lin1.kernel``), whatever the model's layout: ``r"encoder\.layers\.2[0-3]\."``
    means layers 20 to 23 in a scanned model too."""
    names = layer_paths(name, shape[0] if stack_start(name) is not None else 1)
    if spec == "all":
        return [True] * len(names)
    pattern = re.compile(r"^decoder\." if spec == "decoder" else spec)
    return [bool(pattern.search(n)) for n in names]


def trainable_filter(spec: str):
    """An NNX filter over parameters: ``"all"``, ``"decoder"``, or a regex searched in the dotted layer path
    (:func:`trainable_rows`). A stacked parameter passes when the regex selects any of its layers;
    :func:`make_optimizer` then updates only the rows of the selected layers."""
    if spec == "all":
        return nnx.Param
    re.compile(spec)  # validates
    return nnx.All(nnx.Param, lambda path, value: any(trainable_rows(spec, path_key(path), tuple(value.shape))))


def check_trainable(config: SegGptConfig, spec: str) -> int:
    """The number of parameter arrays ``spec`` selects in a model of ``config``; a ``ValueError`` that
    shows the parameter paths it could have matched when it selects none."""
    abstract = nnx.eval_shape(lambda: _build(config))
    paths = [path_key(path) for path, _ in nnx.to_flat_state(nnx.state(abstract, nnx.Param))]
    selected = [p for p, _ in nnx.to_flat_state(nnx.state(abstract, trainable_filter(spec)))]
    if not selected:
        layer = re.compile(r"\.layers\.(\d+)\.")
        shown = [p for p in paths if not layer.search(p) or ".layers.0." in p]
        raise ValueError(f"{spec!r} selects no parameter, so nothing would be trained; it is a regex searched in "
                         f"the per-layer parameter paths, which are: {', '.join(shown)} (and the same for every layer "
                         f"0..{config.num_hidden_layers - 1}); or 'all', or 'decoder'")
    return len(selected)


def _build(config: SegGptConfig):
    return SegGptForImageSegmentation(config, rngs=nnx.Rngs(0))


def _no_decay(name: str) -> bool:
    return ("position_embeddings" in name or "_token" in name or "rel_pos" in name or name.endswith(".bias")
            or name.endswith(".scale"))


def _per_row(name: str, shape: tuple[int, ...], values: list) -> Any:
    """One value per layer of a parameter as a multiplier of its updates: the value itself for one
    layer, a ``[rows, 1, ...]`` float32 array for a stacked parameter."""
    if stack_start(name) is None:
        return values[0]
    return np.asarray(values, np.float32).reshape((len(values),) + (1,) * (len(shape) - 1))


def _scale_updates(factors) -> optax.GradientTransformation:
    """Multiply each update by its factor (a float or an array that broadcasts); ``None``: leave it."""
    def update(updates, state, params=None):
        return jax.tree.map(lambda u, f: u if f is None else u * f, updates, factors), state

    return optax.GradientTransformation(lambda _: optax.EmptyState(), update)


def _named_shapes(leaves) -> list[tuple[str, tuple[int, ...]]]:
    return [(path_key(path), tuple(value.shape)) for path, value in leaves]


def frozen_layers(model: nnx.Module, spec: str) -> set[str]:
    """The per-layer paths of the rows that a scanned model holds in a trained stacked parameter but that
    ``spec`` does not select (:func:`trainable_rows`): their gradients, moments and updates are zeros."""
    leaves = nnx.to_flat_state(nnx.state(model, trainable_filter(spec)))
    frozen = set()
    for name, shape in _named_shapes(leaves):
        names = layer_paths(name, shape[0]) if stack_start(name) is not None else [name]
        frozen.update(n for n, selected in zip(names, trainable_rows(spec, name, shape)) if not selected)
    return frozen


def _frozen_rows(tx: optax.GradientTransformation, masks) -> optax.GradientTransformation:
    """``tx`` with the gradients and the updates multiplied by ``masks`` (0/1 per row; ``None``: all
    rows train). Its state is ``tx``'s own."""
    scale = _scale_updates(masks)

    def update(updates, state, params=None):
        updates, state = tx.update(scale.update(updates, None)[0], state, params)
        return scale.update(updates, None)[0], state

    return optax.GradientTransformation(tx.init, update)


def _layer_scale(name: str, layers: int, decay: float) -> float:
    match = re.search(r"encoder\.layers\.(\d+)\.", name)
    if match:
        depth = int(match.group(1)) + 1
    elif name.startswith(("model.embeddings", "embeddings")):
        depth = 0
    else:
        depth = layers + 1
    return decay ** (layers + 1 - depth)


def make_optimizer(model: nnx.Module, config: TrainConfig) -> nnx.Optimizer:
    """AdamW with linear warm-up and cosine decay; no decay on norms, biases, tokens and positions."""
    if config.warmup_steps > 0:
        schedule = optax.warmup_cosine_decay_schedule(
            0.0, config.learning_rate, warmup_steps=config.warmup_steps,
            decay_steps=max(config.steps, config.warmup_steps + 1), end_value=config.min_learning_rate)
    else:
        schedule = optax.cosine_decay_schedule(config.learning_rate, max(config.steps, 1),
                                               alpha=config.min_learning_rate / config.learning_rate)
    wrt = trainable_filter(config.trainable)
    leaves, treedef = jax.tree_util.tree_flatten_with_path(nnx.as_pure(nnx.state(model, wrt)))
    params = _named_shapes(leaves)

    def tree(fn) -> Any:
        return jax.tree_util.tree_unflatten(treedef, [fn(name, shape) for name, shape in params])

    decay_mask = tree(lambda name, _: not _no_decay(name))  # the same for every layer of a stack
    # A scanned model's stacked parameter of which the regex selects only some layers: the other rows'
    # gradients are zeroed before clipping and Adam (so their moments stay 0), and their updates after
    # weight decay, so those layers stay exactly as they are, as they would unscanned.
    # The optimizer state is the same either way, so training state moves between layouts.
    flags = {name: trainable_rows(config.trainable, name, shape) for name, shape in params}
    masks = tree(lambda name, shape: None if all(flags[name]) else _per_row(name, shape, flags[name]))
    chain = []
    if config.grad_clip:
        chain.append(optax.clip_by_global_norm(config.grad_clip))
    chain.append(optax.adamw(schedule, b1=config.betas[0], b2=config.betas[1], weight_decay=config.weight_decay,
                             mask=decay_mask))
    if config.layer_decay is not None:
        layers, decay = model.config.num_hidden_layers, config.layer_decay
        chain.append(_scale_updates(tree(lambda name, shape: _per_row(
            name, shape, [_layer_scale(n, layers, decay) for n in layer_paths(name, shape[0] if shape else 1)]))))
    tx = optax.chain(*chain)
    if not all(all(f) for f in flags.values()):
        tx = _frozen_rows(tx, masks)
    return nnx.Optimizer(model, tx, wrt=wrt)


# ------------------------------------------------------------------------------------ batches
def random_patch_masks(rng: np.random.Generator, rows: int, config: SegGptConfig, ratio: float,
                       half_prob: float = 0.0) -> np.ndarray:
    """``[rows, N]`` patch flags: ``int(ratio * N)`` random patches per row, or (with probability
    ``half_prob``) exactly the query half, as at inference."""
    n = config.num_patches
    flags = np.zeros((rows, n), dtype=bool)
    for row in flags:
        if rng.random() < half_prob:
            row[n // 2:] = True
        else:
            row[rng.permutation(n)[: int(n * ratio)]] = True
    return flags


class EpisodeBatches:
    """``batches(step)`` -> one training batch, a pure function of ``(seed, step)``; ``batches(step, rows)``
    -> only those rows of it (each row draws from its own generator, seeded by ``(seed, step, row)``, so
    that a process of a multi-host job loads only its own rows and the batch is the same for any
    number of processes).

    Each row takes two different samples of one group (prompt and query), augments each, paints their
    masks (binary: white foreground; class ids: the SegGPT palette) and draws the patch mask.

    ``model`` is the model to train (its config and its processor, :func:`~seggpt_jax.imaging.processor.processor_for`),
    or a :class:`SegGptConfig` (the default processing at its size).
    """

    def __init__(self, dataset: Dataset, model: Any, *, batch_size: int = 8, seed: int = 0,
                 augment: Augment | None = Augment(), mask_ratio: float = 0.75, half_mask_prob: float = 0.0,
                 embedding_type: str | None = None):
        model_config = model.config if hasattr(model, "config") else model
        self.dataset, self.config = dataset, model_config
        self.batch_size, self.seed, self.augment = batch_size, seed, augment
        self.mask_ratio, self.half_mask_prob = mask_ratio, half_mask_prob
        self.instance = (embedding_type or default_embedding_type(dataset.num_labels)) == "instance"
        self.processor = as_processor(model)
        self._groups = [members for _, members in sorted(dataset.groups().items())]

    def __call__(self, step: int, rows: range | None = None) -> dict[str, np.ndarray]:
        weights = np.array([len(g) for g in self._groups], dtype=np.float64)
        chosen = range(self.batch_size) if rows is None else rows
        out: dict[str, list] = {k: [] for k in ("pixel_values", "prompt_pixel_values", "prompt_masks", "labels",
                                                "valid", "bool_masked_pos")}
        for row in chosen:
            rng = np.random.default_rng([self.seed, step, row])
            group = self._groups[rng.choice(len(self._groups), p=weights / weights.sum())]
            pick = rng.choice(group, size=2, replace=len(group) < 2)
            pair = []
            for index in pick:
                image, labels = self.dataset.load(self.dataset[int(index)])
                if self.augment is not None:
                    image, labels = self.augment(image, labels, rng)
                mask_rgb, valid = self.dataset.mask_picture(labels)
                pair.append((image, mask_rgb, valid))
            (p_image, p_mask, p_valid), (q_image, q_mask, q_valid) = pair
            processed = self.processor(images=q_image, prompt_images=p_image, prompt_masks=[p_mask, q_mask],
                                       do_convert_rgb=False, return_tensors="np")
            valid = resize_valid(self.processor, (p_valid, q_valid))
            out["pixel_values"].append(processed["pixel_values"][0])
            out["prompt_pixel_values"].append(processed["prompt_pixel_values"][0])
            out["prompt_masks"].append(processed["prompt_masks"][0])
            out["labels"].append(processed["prompt_masks"][1])
            out["valid"].append(np.concatenate([valid[0], valid[1]], axis=1))  # [1, 2h, w]
            out["bool_masked_pos"].append(random_patch_masks(rng, 1, self.config, self.mask_ratio,
                                                             self.half_mask_prob)[0])
        batch = {k: np.stack(v) for k, v in out.items()}
        batch["valid"] = batch["valid"].astype(np.float32)
        batch["is_instance"] = np.full((len(chosen),), self.instance)
        return batch


# ------------------------------------------------------------------------------------ the step
def training_view(model: nnx.Module, config: TrainConfig) -> nnx.Module:
    """The model with ``config``'s training settings (compute dtype, remat policy), over the caller's
    parameter Variables: training it updates the caller's parameters (as ``nnx.Optimizer`` does);
    the caller's settings never change."""
    settings = {"dtype": config.dtype}
    if config.remat_policy is not None:
        settings["runtime"] = dataclasses.replace(model.settings.runtime, remat_policy=config.remat_policy)
    return model.with_settings(shared=True, **settings)


def batch_loss_terms(model, batch: dict, dropout_rng=None) -> tuple[jax.Array, jax.Array]:
    """(numerator, count) of the painter loss of ``model`` on one batch."""
    out = model(batch["pixel_values"], batch["prompt_pixel_values"], batch["prompt_masks"],
                bool_masked_pos=batch["bool_masked_pos"], labels=batch["labels"], embedding_type=batch["is_instance"],
                dropout_rng=dropout_rng, valid=batch.get("valid"))
    return out.loss_terms


def _make_step(graphdef, wrt, accum: int, drop_path: bool, shardings=None):
    """A jitted step over the (model, optimizer) state, which it donates: the optimizer writes the new
    parameters and moments over the old ones (XLA aliases every state buffer with its update), and
    each parameter's update runs as soon as its gradient is complete, so the gradients of the whole
    model never coexist with the backward pass's activations.

    ``shardings``: the state's shardings (a tree like the state), which the new state keeps. Left to
    itself XLA may lay an update out otherwise (it does for ``"fsdp"`` weights): the next step would
    then be compiled again for the new layout, and no state buffer could be donated to its update."""

    @functools.partial(jax.jit, donate_argnums=(0,))
    def step(state, batch, key):
        model, optimizer = nnx.merge(graphdef, state)
        parts = [jax.tree.map(lambda x: x[i::accum], batch) for i in range(accum)]
        total_count = sum(painter_count(model.config, part) for part in parts)  # data only: no gradient

        def micro_loss(model, part, micro_key):
            numerator, _ = batch_loss_terms(model, part, micro_key if drop_path else None)
            return numerator / total_count

        grad_fn = nnx.value_and_grad(micro_loss, argnums=nnx.DiffState(0, wrt))
        loss, grads = 0.0, None
        for i, part in enumerate(parts):
            micro, g = grad_fn(model, part, jax.random.fold_in(key, i))
            loss = loss + micro
            grads = g if grads is None else jax.tree.map(jnp.add, grads, g)
        optimizer.update(model, grads)
        new_state = nnx.state((model, optimizer))
        if shardings is not None:
            new_state = jax.lax.with_sharding_constraint(new_state, shardings)
        return new_state, loss

    return step


def _process_index() -> int:
    return jax.process_index()


def painter_count(config: SegGptConfig, batch: dict) -> jax.Array:
    """The loss denominator of a batch (counted pixels), computed from the batch alone."""
    zeros = jnp.zeros(batch["prompt_masks"].shape[:2] + (batch["prompt_masks"].shape[2] * 2,)
                      + batch["prompt_masks"].shape[3:], jnp.float32)
    _, count = painter_loss_terms(config, zeros, batch["prompt_masks"], batch["labels"], batch["bool_masked_pos"],
                                  batch.get("valid"))
    return count


# ------------------------------------------------------------------------------------ the trainer
class Trainer:
    """Owns a model, its optimizer and the jitted step; checkpoints and resumes exactly.

    Args:
        model: the painter; its parameters are trained (and placed on the devices) in place.
        config: :class:`TrainConfig`.
        batches: ``batches(step) -> batch`` (e.g. :class:`EpisodeBatches`); under ``jax.distributed``
            ``batches(step, rows)`` is called for this process's rows when it takes them.
        devices: the devices, data-parallel (:func:`seggpt_jax.parallel.select_devices`; default every
            device). ``config.batch_size`` must divide evenly over them.
        weights: ``"replicated"`` (default): every device holds the parameters and the optimizer state;
            the fastest while they fit (ViT-L in float32 with AdamW: 1.2 GB of parameters + 2.4 GB of
            moments + 1.2 GB of gradients per device). ``"fsdp"``: each large tensor of both is split
            over the devices and gathered where a layer uses it: about ``1/devices`` of that memory per
            device for an all-gather of each layer's weights per step; use it when the replicated
            state does not fit beside the activations (small accelerators, large batches, full
            fine-tuning of ViT-L on 16 GB devices), or to free memory for a larger batch.
    """

    def __init__(self, model: nnx.Module, config: TrainConfig, *, batches: Callable[[int], dict] | None = None,
                 optimizer: nnx.Optimizer | None = None, step: int = 0, devices=None, weights: str = "replicated"):
        check_trainable(model.config, config.trainable)
        self.parallel = DataParallel(devices)
        if config.batch_size % self.parallel.size:
            raise ValueError(f"batch_size {config.batch_size} does not divide over {self.parallel.describe()}: "
                             f"choose a multiple of {self.parallel.size} (or fewer devices)")
        if config.grad_accum > 1 and (config.batch_size // config.grad_accum) % self.parallel.size:
            raise ValueError(f"micro-batches of {config.batch_size // config.grad_accum} rows (batch_size / "
                             f"grad_accum) do not divide over {self.parallel.describe()}")
        self.weights = weights
        model = training_view(model, config)
        self.parallel.place(model, weights=weights)
        self.model, self.config, self.batches = model, config, batches
        self.optimizer = optimizer if optimizer is not None else make_optimizer(model, config)
        self.parallel.place(self.optimizer, weights=weights)
        self.step_count = step
        self._wrt = trainable_filter(config.trainable)
        self._key = jax.random.key(config.seed)
        self._step_fn = None
        self._frozen: set[str] | None = None
        self.history: list[dict] = []

    def _untrained_state(self, key: str) -> bool:
        """Whether an optimizer-state key (per layer) belongs to a frozen row of a stacked parameter
        (:func:`frozen_layers`): always zero, and left out of the file, which is then the same as an
        unscanned model's."""
        if self._frozen is None:
            self._frozen = frozen_layers(self.model, self.config.trainable)
        key = key.removesuffix(".value")
        return any(key == name or key.endswith("." + name) for name in self._frozen)

    def train_step(self, batch: dict) -> float:
        """One optimizer step on a batch (this process's rows of it, under ``jax.distributed``)."""
        state = nnx.state((self.model, self.optimizer))
        if self._step_fn is None:
            graphdef, _ = nnx.split((self.model, self.optimizer))
            shardings = jax.tree.map(lambda leaf: leaf.sharding, state) if self.parallel.active else None
            self._step_fn = _make_step(graphdef, self._wrt, self.config.grad_accum, self.config.drop_path,
                                       shardings)
        with self.parallel.context():
            batch = self.parallel.shard(**batch)
            new_state, loss = self._step_fn(state, batch, jax.random.fold_in(self._key, self.step_count))
        nnx.update((self.model, self.optimizer), new_state)
        self.step_count += 1
        return loss

    def local_batch(self, step: int) -> dict:
        """This process's rows of the step's batch (all of it in a single process)."""
        rows = self.parallel.process_rows(self.config.batch_size)
        if rows is None:
            return self.batches(step)
        try:
            return self.batches(step, rows)
        except TypeError:  # a batches function of one argument: take our rows of the whole batch
            return {k: v[rows.start:rows.stop] for k, v in self.batches(step).items()}

    def fit(self, *, checkpoint_dir: str | None = None, log: Callable[[dict], None] | None = None,
            evaluate: Callable[[], dict] | None = None, eval_every: int | None = None,
            stop_after: int | None = None, keep_checkpoints: int | None = 2) -> list[dict]:
        """Train up to ``config.steps`` (or ``stop_after`` more steps), checkpointing every
        ``checkpoint_every`` steps and at the end; returns the logged records.

        Checkpoints go to ``checkpoint_dir/step_N`` (``checkpoint_dir/latest`` names the newest, written
        once it is complete); only the newest ``keep_checkpoints`` of the trainer's own checkpoints are
        kept (``None``: all). The run folder is an :class:`~seggpt_jax.files.OutputFolder`: nothing in it
        that the tool did not write is ever replaced or deleted.
        """
        if self.batches is None:
            raise ValueError("Trainer needs batches=... (e.g. EpisodeBatches) to fit")
        if keep_checkpoints is not None and (isinstance(keep_checkpoints, bool) or keep_checkpoints < 1):
            raise ValueError(f"keep_checkpoints must be a positive integer or None, got {keep_checkpoints!r}")
        run = OutputFolder(checkpoint_dir) if checkpoint_dir else None
        end = self.config.steps if stop_after is None else min(self.config.steps, self.step_count + stop_after)
        losses = LossLog(self.config.log_every, end)
        main = _process_index() == 0  # under jax.distributed only process 0 logs and writes
        for batch in Prefetcher(self.local_batch, self.step_count, end):
            loss = self.train_step(batch)
            step = self.step_count
            record = losses.add(step, loss)
            if record is not None:
                if evaluate is not None and eval_every and due(step, eval_every, end):
                    record.update(evaluate())
                self.history.append(record)
                if log is not None and main:
                    log(record)
            if run is not None and due(step, self.config.checkpoint_every, end):
                name = f"step_{step:07d}"
                self.save(os.path.join(checkpoint_dir, name), output=run)
                if main:
                    point_latest(checkpoint_dir, name, output=run)  # only once the checkpoint is complete
                    if keep_checkpoints is not None:
                        prune_checkpoints(run, keep_checkpoints)
                _parallel.sync(f"checkpoint {name} in place")
        return self.history

    # -------------------------------------------------------------------------- checkpoints
    def save(self, directory: str, *, output: OutputFolder | None = None) -> None:
        """A checkpoint folder: ``model/`` (save_pretrained), ``optimizer.safetensors`` (the optimizer's
        state keyed by path) and ``trainer.json``, staged, flushed to disk and swapped in whole
        (through ``output``, the run's :class:`~seggpt_jax.files.OutputFolder`, when given).

        Under ``jax.distributed`` every process must call it (the state is gathered from all of them);
        process 0 alone writes, once, and the others wait until the checkpoint is in place."""
        model, optimizer_state = self.model, nnx.state(self.optimizer)
        if self.parallel.processes > 1:
            graphdef, state = nnx.split(self.model)
            model = nnx.merge(graphdef, _parallel.host_state(state))
            optimizer_state = _parallel.host_state(optimizer_state)
            if _process_index() != 0:
                _parallel.sync(f"checkpoint {directory} written")
                return

        def fill(staging: str) -> None:
            model.save_pretrained(os.path.join(staging, "model"))
            save_tree(os.path.join(staging, "optimizer.safetensors"), optimizer_state,
                      omit=self._untrained_state)
            write_json(os.path.join(staging, "trainer.json"),
                       {"step": self.step_count, "config": self.config.to_json(), "history": self.history})

        try:
            self._write_checkpoint(directory, fill, output)
        finally:
            if self.parallel.processes > 1:
                _parallel.sync(f"checkpoint {directory} written")

    def host_model(self) -> nnx.Module:
        """The trained model with its parameters as host arrays (gathered from every process under
        ``jax.distributed``: a collective), ready for ``save_pretrained``."""
        if self.parallel.processes == 1:
            return self.model
        graphdef, state = nnx.split(self.model)
        return nnx.merge(graphdef, _parallel.host_state(state))

    @staticmethod
    def _write_checkpoint(directory: str, fill, output) -> None:
        if output is None:
            replace_folder(directory, fill)
        else:
            output.write_folder(os.path.basename(os.path.normpath(directory)), fill, replace=True)

    @staticmethod
    def checkpoint_config(path: str) -> SegGptConfig:
        """The model config of a :meth:`save` folder or run folder (without loading its weights)."""
        return SegGptConfig.from_json_file(os.path.join(resolve_checkpoint(path), "model", "config.json"))

    @classmethod
    def restore(cls, path: str, *, batches: Callable[[int], dict] | None = None,
                config: TrainConfig | None = None, runtime: RuntimeConfig | None = None, devices=None,
                weights: str = "replicated") -> "Trainer":
        """Resume from a :meth:`save` folder, a run folder (its ``latest`` checkpoint) or its ``latest`` file.

        ``runtime``: the model's :class:`RuntimeConfig` (e.g. ``scan_layers=True``); a checkpoint holds
        no layout of its own, so a run saved scanned resumes unscanned or scanned alike. ``devices`` and
        ``weights``: as for the constructor."""
        directory = resolve_checkpoint(path)
        meta_path = os.path.join(directory, "trainer.json")
        if not os.path.isfile(meta_path):
            raise FileNotFoundError(f"no training checkpoint in {directory} (expected trainer.json)")
        with open(meta_path, encoding="utf-8") as f:
            meta = json.load(f)
        config = config or TrainConfig.from_json(meta["config"])
        model = SegGptForImageSegmentation.from_pretrained(os.path.join(directory, "model"), runtime=runtime)
        trainer = cls(model, config, batches=batches, step=int(meta["step"]), devices=devices, weights=weights)
        state, _ = load_tree(os.path.join(directory, "optimizer.safetensors"), nnx.state(trainer.optimizer),
                             omit=trainer._untrained_state)
        nnx.update(trainer.optimizer, state)
        trainer.parallel.place(trainer.optimizer, weights=weights)
        trainer.history = meta.get("history", [])
        return trainer


# ------------------------------------------------------------------------------------ memory
#: What a training process holds besides XLA's buffers: Python, jaxlib, the compiled step, allocator
#: slack. Measured on CPU as peak RSS minus the step's buffers (``benchmarks/train_memory.py``).
PROCESS_OVERHEAD_BYTES = 1 << 30


@dataclasses.dataclass(frozen=True)
class MemoryEstimate:
    """The memory of one training step, from XLA's analysis of the compiled step (nothing is run).

    Attributes:
        state_bytes: parameters and optimizer state (AdamW: two moments); the step updates them in place.
        temp_bytes: XLA's temporaries: activations kept for the backward pass, gradients, the backward
            pass's working buffers.
        batch_bytes: the step's input arrays.
        overhead_bytes: :data:`PROCESS_OVERHEAD_BYTES`.
    """

    state_bytes: int
    temp_bytes: int
    batch_bytes: int
    overhead_bytes: int = PROCESS_OVERHEAD_BYTES

    @property
    def total_bytes(self) -> int:
        """The expected peak resident memory of a training process."""
        return self.state_bytes + self.temp_bytes + self.batch_bytes + self.overhead_bytes

    def fits(self, gigabytes: float) -> bool:
        """Whether the step fits in ``gigabytes`` (10**9 bytes) of memory."""
        return self.total_bytes <= gigabytes * 1e9


def abstract_batch(config: SegGptConfig, batch_size: int) -> dict[str, jax.ShapeDtypeStruct]:
    """The shapes and dtypes of an :class:`EpisodeBatches` batch."""
    height, width = config.query_size
    image = jax.ShapeDtypeStruct((batch_size, config.num_channels, height, width), jnp.float32)
    return dict(pixel_values=image, prompt_pixel_values=image, prompt_masks=image, labels=image,
                valid=jax.ShapeDtypeStruct((batch_size, 1, 2 * height, width), jnp.float32),
                bool_masked_pos=jax.ShapeDtypeStruct((batch_size, config.num_patches), jnp.bool_),
                is_instance=jax.ShapeDtypeStruct((batch_size,), jnp.bool_))


def compile_step(config: SegGptConfig, train: TrainConfig, runtime: RuntimeConfig | None = None):
    """The :class:`Trainer`'s step for ``config`` and ``train``, compiled for abstract parameters and an
    abstract batch of ``train.batch_size``: ``jax.stages.Compiled`` (``.memory_analysis()``, ``.cost_analysis()``)."""
    def build() -> tuple[nnx.Module, nnx.Optimizer]:
        model = training_view(SegGptForImageSegmentation(config, runtime=runtime, rngs=nnx.Rngs(0)), train)
        return model, make_optimizer(model, train)

    graphdef, state = nnx.split(nnx.eval_shape(build))
    step = _make_step(graphdef, trainable_filter(train.trainable), train.grad_accum, train.drop_path)
    return step.lower(state, abstract_batch(config, train.batch_size), jax.random.key(0)).compile()


def estimate_memory(config: SegGptConfig, batch_size: int, *, remat_policy: str | None = None,
                    train: TrainConfig | None = None, runtime: RuntimeConfig | None = None) -> MemoryEstimate:
    """The memory a :class:`Trainer` step needs, from the compiled step alone (nothing is allocated or run).

    ``train`` gives the rest of the training setup (dtype, trainable parameters, grad accumulation,
    its remat policy); ``batch_size``, and ``remat_policy`` when given, override its own. Compiling a
    ViT-L step takes tens of seconds on a CPU.

        >>> from seggpt_jax import SegGptConfig
        >>> from seggpt_jax.train import estimate_memory
        >>> estimate = estimate_memory(SegGptConfig.vit_large(), 4, remat_policy="full")  # doctest: +SKIP
        >>> estimate.fits(24), round(estimate.total_bytes / 1e9, 1)  # doctest: +SKIP
    """
    train = dataclasses.replace(train or TrainConfig(), batch_size=batch_size)
    if remat_policy is not None:
        train = dataclasses.replace(train, remat_policy=remat_policy)
    analysis = compile_step(config, train, runtime).memory_analysis()
    batch_bytes = sum(int(np.prod(a.shape)) * a.dtype.itemsize for a in abstract_batch(config, batch_size).values())
    state_bytes = analysis.argument_size_in_bytes - batch_bytes  # the key is a few bytes
    return MemoryEstimate(state_bytes=int(state_bytes), temp_bytes=int(analysis.temp_size_in_bytes),
                          batch_bytes=int(batch_bytes))
