"""Serving artifacts: the painter's forward as a serialized ``jax.export`` program, with its weights beside it.

Write one with ``model.export(batch_size, platforms="tpu", dtype="bfloat16").save(folder)`` (or
``seggpt-jax export MODEL --out-dir OUT --platform tpu --batch-size 8 --dtype bfloat16``); run it
anywhere JAX runs on that platform with :func:`load`, which never builds the model::

    served = seggpt_jax.export.load("OUT")      # the program and its weights
    pred_masks = served(pixel_values, prompt_pixel_values, prompt_masks)   # [B, P, 3, H, W]

Importing ``seggpt_jax.export`` imports the package, and with it flax; this file on its own (loaded
by path, as ``tests/test_export.py`` does) imports only jax, numpy and safetensors for :func:`load`,
so a server can run an export without seggpt-jax installed.

The folder (every file written atomically; files the tool did not write are never replaced, see
:class:`seggpt_jax.files.OutputFolder`):

* ``forward.jaxexport``: ``jax.export.Exported.serialize()`` of ``forward(weights, pixel_values,
  prompt_pixel_values, prompt_masks, is_instance) -> pred_masks`` at fixed shapes;
* ``model.safetensors`` + ``config.json``: the weights keyed by parameter path (our own checkpoint
  layout, so ``SegGptForImageSegmentation.from_pretrained(OUT)`` reads the folder too);
* ``preprocessor_config.json``: the image processor's settings (transformers' keys);
* ``export.json``: what a server needs without opening the rest: every input and output with its
  shape, dtype and meaning, the prompt count, image size, mean and std, platforms, attention kernel,
  dtypes and versions (:data:`FORMAT_VERSION`).

The weights are *arguments* of the program, not constants folded into it: the program stays small
(kilobytes, whatever the model size), it never holds a second copy of 1.5 GB of ViT-L weights, a
server keeps one copy of the weights for several programs (batch sizes, prompt counts) exported from
one model, and the weights file is an ordinary checkpoint.

Inputs of the program: ``pixel_values: [B, 3, h, w]`` queries; ``prompt_pixel_values`` and
``prompt_masks: [B, P, 3, h, w]``, ``P`` prompts per query (``P > 1``: the feature ensemble over
them); ``is_instance: [B]`` bool (the instance or semantic type embedding); all images normalised by
the processor (``(x / 255 - mean) / std``), ``h x w`` = the processor's size (448 x 448 for ViT-L).
Output ``pred_masks: [B, P, 3, 2h, w]`` float32: for each prompt of each query the painted canvas,
prompt half on top, query half below, as the model's ``pred_masks``.

A program exported for ``cuda`` holds Triton kernels (the flash attention), a custom call without
JAX's compatibility guarantee: run it with the jaxlib version it was exported with (``export.json``).
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

FORMAT = "seggpt-jax-export"
FORMAT_VERSION = 1
PROGRAM_NAME = "forward.jaxexport"
WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
PROCESSOR_NAME = "preprocessor_config.json"
METADATA_NAME = "export.json"
FILE_NAMES = (PROGRAM_NAME, WEIGHTS_NAME, CONFIG_NAME, PROCESSOR_NAME, METADATA_NAME)
#: Custom calls a program may hold that ``jax.export`` refuses by default (no compatibility guarantee):
#: Pallas' Triton kernels, and cuDNN's fused attention (``attention="widened"`` on GPU).
UNGUARANTEED_CALLS = ("__gpu$xla.gpu.triton", "__cudnn$fmhaSoftmax", "__cudnn$fmhaSoftmaxBackward")
#: ``jax.export`` platform names, by the names :class:`~seggpt_jax.RuntimeConfig` accepts.
_INPUT_NAMES = ("pixel_values", "prompt_pixel_values", "prompt_masks", "is_instance")


def require_serialization() -> None:
    """``jax.export`` (de)serialises programs with flatbuffers, which jax does not install."""
    try:
        import flatbuffers  # noqa: F401
    except ImportError:
        raise ImportError("serialising jax.export programs needs flatbuffers: pip install 'seggpt-jax[export]' "
                          "(or pip install flatbuffers)") from None


# ------------------------------------------------------------------------------------------- writing
@dataclasses.dataclass(frozen=True)
class Export:
    """A lowered serving program and what :meth:`save` writes beside it. ``exported`` is the
    ``jax.export.Exported``; ``metadata`` is ``export.json``; ``model`` is the painter it came from."""

    exported: jax.export.Exported
    metadata: dict[str, Any]
    model: Any
    processor: Any
    weights_dtype: Any

    def save(self, out_dir: str | os.PathLike, *, overwrite: bool = False) -> list[str]:
        """Write the folder (module docstring); returns the paths written. Nothing is written if any
        target exists and is not ours to replace (``overwrite`` replaces files an earlier export wrote)."""
        from .files import OutputFolder, staging_folder

        if any(isinstance(leaf, jax.ShapeDtypeStruct) for leaf in jax.tree.leaves(_state(self.model))):
            raise ValueError("the model is abstract (built with nnx.eval_shape) and has no weights to save; "
                             "use .exported, or export a model with weights")
        require_serialization()
        folder = OutputFolder(out_dir, overwrite=overwrite)
        for name in FILE_NAMES:
            folder.check(name)  # refuse before writing anything
        program = self.exported.serialize()
        model = self.model if self.weights_dtype is None else self.model.astype(self.weights_dtype)
        with staging_folder(folder.create()) as staging:
            model.save_pretrained(staging)  # config.json + model.safetensors, keyed by parameter path
            texts = {PROCESSOR_NAME: _json(self.processor.to_dict()), METADATA_NAME: _json(self.metadata)}
            for name, data in ((PROGRAM_NAME, bytes(program)), *((n, t.encode()) for n, t in texts.items())):
                with open(os.path.join(staging, name), "wb") as f:
                    f.write(data)
            return [folder.adopt(name, os.path.join(staging, name)) for name in FILE_NAMES]


def _json(data: Any) -> str:
    return json.dumps(data, indent=2, sort_keys=True) + "\n"


def _state(model: Any) -> Any:
    from flax import nnx

    return nnx.split(model)[1]


def export_platforms(platforms: str | Sequence[str] | None) -> tuple[str, ...]:
    """``jax.export`` platform names (``"cpu"``, ``"cuda"``, ``"tpu"``); default: this machine's backend."""
    from .runtime import platform_name

    if platforms is None or isinstance(platforms, str):
        platforms = (platforms,)
    out = []
    for name in platforms:
        if platform_name(name) not in out:
            out.append(platform_name(name))
    if not out:
        raise ValueError("platforms is empty: name at least one of cpu, cuda, tpu")
    return tuple(out)


def attention_per_platform(attention: str, dtype: Any, platforms: Sequence[str]) -> dict[str, str]:
    """The attention implementation ``attention`` resolves to on each platform; raises ``ValueError`` when
    one program cannot hold them (several platforms need one platform-independent implementation)."""
    from .runtime import resolve_attention as resolve_impl

    impls = {p: resolve_impl(attention, dtype, p) for p in platforms}
    if len(impls) > 1 and (len(set(impls.values())) > 1 or set(impls.values()) - {"plain", "chunked"}):
        raise ValueError(f"attention resolves to {impls}: a program for several platforms needs one "
                         f"platform-independent attention ('plain' or 'chunked'); export one per platform")
    return impls


def export_model(model: Any, batch_size: int, *, platforms: str | Sequence[str] | None = None, dtype: Any = None,
                 prompts_per_query: int = 1, feature_ensemble: bool | None = None,
                 ensemble_mode: str = "transformers", precision: Any = "model", weights_dtype: Any = None,
                 processor: Any = None) -> Export:
    """Lower ``model``'s forward for serving at fixed shapes; :meth:`Export.save` writes it.

    Args:
        model: a :class:`~seggpt_jax.SegGptForImageSegmentation` (one built with ``nnx.eval_shape``
            lowers too, but has nothing to save).
        batch_size: queries per call, ``B``.
        platforms: ``"cpu"``, ``"cuda"`` (or ``"gpu"``), ``"tpu"``, or several; default this machine's.
            The attention kernel is chosen per platform (``RuntimeConfig.platform``), so several
            platforms need one platform-independent attention for all (``"plain"`` or ``"chunked"``).
        dtype: compute dtype (default: the model's); the parameters keep their dtype.
        prompts_per_query: ``P``, prompts per query.
        feature_ensemble: average the query features over the ``P`` prompts (default: ``P > 1``).
        ensemble_mode: ``"transformers"`` or ``"original"`` (see the model's ``__call__``).
        precision: matmul precision (default ``"model"``: the model's).
        weights_dtype: dtype of the saved weights (default: the model's parameter dtype).
        processor: the :class:`~seggpt_jax.SegGptImageProcessor` whose settings go into the folder
            (default: the model's own, :func:`~seggpt_jax.imaging.processor.processor_for`); its size must be
            the query size.
    """
    from flax import nnx

    from .version import __version__
    from .imaging.processor import processor_for
    from .config import check_count
    from .nn.inputs import prepare
    from .weights import path_key

    if not hasattr(model, "decoder") or not hasattr(model, "forward_prepared"):
        raise TypeError(f"export needs the painter (SegGptForImageSegmentation), got {type(model).__name__}")
    for name, value in (("batch_size", batch_size), ("prompts_per_query", prompts_per_query)):
        check_count(name, value)
    batch, prompts = int(batch_size), int(prompts_per_query)
    ensemble = prompts > 1 if feature_ensemble is None else bool(feature_ensemble)
    config, settings = model.config, model.settings
    dtype = jnp.dtype(settings.dtype if dtype is None else dtype)
    precision = settings.precision if isinstance(precision, str) and precision == "model" else precision
    targets = export_platforms(platforms)
    impls = attention_per_platform(settings.runtime.attention, dtype, targets)
    runtime = dataclasses.replace(settings.runtime, platform=targets[0])
    target = model.with_settings(shared=True, dtype=dtype, precision=precision, runtime=runtime)
    processor = processor if processor is not None else processor_for(model)
    size = (processor.size["height"], processor.size["width"])
    if size != tuple(config.query_size):
        raise ValueError(f"the processor resizes to {size[0]}x{size[1]} but the model takes "
                         f"{config.query_size[0]}x{config.query_size[1]} images")

    graphdef, state = nnx.split(target)
    flat = list(nnx.to_flat_state(state))
    names = [path_key(path) for path, _ in flat]
    stored = None if weights_dtype is None else jnp.dtype(weights_dtype)
    if all(var.get_value().dtype == stored for _, var in flat):
        stored = None  # already so: no cast, no copy
    weight_specs = {name: jax.ShapeDtypeStruct(var.get_value().shape, stored or var.get_value().dtype)
                    for name, (_, var) in zip(names, flat)}

    def forward(weights, pixel_values, prompt_pixel_values, prompt_masks, is_instance):
        """``[B, 3, h, w]``, ``[B, P, 3, h, w]`` x 2, ``[B]`` -> ``pred_masks [B, P, 3, 2h, w]``."""
        leaves = [(path, var.replace(weights[name])) for name, (path, var) in zip(names, flat)]
        painter = nnx.merge(graphdef, nnx.from_flat_state(leaves))
        rows = (batch * prompts, *prompt_pixel_values.shape[2:])
        inputs, options = prepare(
            config, jnp.repeat(pixel_values, prompts, axis=0), prompt_pixel_values.reshape(rows),
            prompt_masks.reshape(rows), feature_ensemble=ensemble, embedding_type=jnp.repeat(is_instance, prompts),
            ensemble_mode=ensemble_mode, prompts_per_query=prompts if ensemble else None)
        pred = painter.forward_prepared(inputs, options).pred_masks  # [B * P, 3, 2h, w]
        return pred.reshape(batch, prompts, *pred.shape[1:])

    h, w = config.query_size
    specs = {"pixel_values": jax.ShapeDtypeStruct((batch, config.num_channels, h, w), jnp.float32),
             "prompt_pixel_values": jax.ShapeDtypeStruct((batch, prompts, config.num_channels, h, w), jnp.float32),
             "prompt_masks": jax.ShapeDtypeStruct((batch, prompts, config.num_channels, h, w), jnp.float32),
             "is_instance": jax.ShapeDtypeStruct((batch,), jnp.bool_)}
    exported = jax.export.export(
        jax.jit(forward), platforms=targets,
        disabled_checks=[jax.export.DisabledSafetyCheck.custom_call(name) for name in UNGUARANTEED_CALLS],
    )(weight_specs, *(specs[name] for name in _INPUT_NAMES))
    module = exported.mlir_module()
    out_shape = [list(a.shape) for a in exported.out_avals]
    described = {
        "pixel_values": f"queries, normalised by the processor; NCHW, {h}x{w}",
        "prompt_pixel_values": "prompt images, prompts_per_query per query, normalised as the queries",
        "prompt_masks": "prompt masks as RGB pictures, normalised as the images (the processor's prompt_masks)",
        "is_instance": "per query: True for the instance type embedding, False for semantic",
    }
    metadata = {
        "format": FORMAT, "format_version": FORMAT_VERSION,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "files": {"program": PROGRAM_NAME, "weights": WEIGHTS_NAME, "config": CONFIG_NAME,
                  "processor": PROCESSOR_NAME},
        "call": "forward(weights, pixel_values, prompt_pixel_values, prompt_masks, is_instance) -> pred_masks; "
                "weights: {parameter path: array} as in model.safetensors",
        "platforms": list(targets), "attention": impls, "compute_dtype": dtype.name,
        "precision": None if precision is None else str(precision),
        "weights_dtype": sorted({jnp.dtype(s.dtype).name for s in weight_specs.values()}),
        "batch_size": batch, "prompts_per_query": prompts, "feature_ensemble": ensemble,
        "ensemble_mode": ensemble_mode,
        "inputs": [{"name": name, "shape": list(specs[name].shape), "dtype": jnp.dtype(specs[name].dtype).name,
                    "description": described[name]} for name in _INPUT_NAMES],
        "outputs": [{"name": "pred_masks", "shape": out_shape[0], "dtype": "float32",
                     "description": "per query and prompt, the painted canvas (prompt half on top, query half "
                                    "below) in normalised units: pixel = 255 * (value * std + mean)"}],
        "image_size": [h, w], "canvas_size": list(config.image_size),
        "processor": {"size": [h, w], "image_mean": list(processor.image_mean), "image_std": list(processor.image_std),
                      "rescale_factor": processor.rescale_factor, "resample": int(processor.resample)},
        "custom_calls_without_compatibility_guarantee": [c for c in UNGUARANTEED_CALLS if f"@{c}(" in module],
        "versions": {"seggpt_jax": __version__, "jax": jax.__version__, "jaxlib": jax.lib.__version__,
                     "calling_convention": exported.calling_convention_version},
    }
    return Export(exported=exported, metadata=metadata, model=model, processor=processor,
                  weights_dtype=stored)


# ------------------------------------------------------------------------------------------- loading
class ServingModel:
    """An exported forward and its weights, ready to run (:func:`load`). Call it with the inputs that
    ``export.json`` lists; returns ``pred_masks`` as a jax array."""

    def __init__(self, folder: str, metadata: dict[str, Any], exported: jax.export.Exported,
                 weights: dict[str, jax.Array]):
        self.folder, self.metadata, self.exported, self.weights = folder, metadata, exported, weights
        self._call = jax.jit(exported.call)

    @property
    def batch_size(self) -> int:
        return int(self.metadata["batch_size"])

    @property
    def prompts_per_query(self) -> int:
        return int(self.metadata["prompts_per_query"])

    def __call__(self, pixel_values: Any, prompt_pixel_values: Any, prompt_masks: Any,
                 is_instance: Any = None) -> jax.Array:
        """``pixel_values: [B, 3, h, w]``, ``prompt_*: [B, P, 3, h, w]`` float, ``is_instance: [B]`` bool
        (default: all True, transformers' default ``embedding_type="instance"``)."""
        if is_instance is None:
            is_instance = np.ones((self.batch_size,), bool)
        given = dict(zip(_INPUT_NAMES, (pixel_values, prompt_pixel_values, prompt_masks, is_instance)))
        args = []
        for spec in self.metadata["inputs"]:
            value = given[spec["name"]]
            if tuple(np.shape(value)) != tuple(spec["shape"]):
                raise ValueError(f"{spec['name']} has shape {tuple(np.shape(value))}; this export takes "
                                 f"{tuple(spec['shape'])} ({spec['description']})")
            args.append(jnp.asarray(value, spec["dtype"]))
        return self._call(self.weights, *args)


def load(path: str | os.PathLike) -> ServingModel:
    """Read an export folder (or its ``export.json``) and put its weights on the default device.
    Imports only jax, numpy and safetensors. Errors name the file and the problem."""
    from safetensors import safe_open

    folder = os.fspath(path)
    if os.path.basename(folder) == METADATA_NAME:
        folder = os.path.dirname(folder) or "."
    meta_path = os.path.join(folder, METADATA_NAME)
    try:
        with open(meta_path, encoding="utf-8") as f:
            metadata = json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"{folder} holds no {METADATA_NAME}: not a seggpt-jax export folder") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{meta_path} is not valid JSON: {e}") from None
    if not isinstance(metadata, dict) or metadata.get("format") != FORMAT:
        raise ValueError(f"{meta_path} does not describe a {FORMAT} artifact")
    if not isinstance(metadata.get("format_version"), int) or metadata["format_version"] > FORMAT_VERSION:
        raise ValueError(f"{meta_path} has format version {metadata.get('format_version')!r}; this loader reads "
                         f"versions up to {FORMAT_VERSION}")
    backend = jax.default_backend()
    backend = "cuda" if backend == "gpu" else backend
    if backend not in metadata["platforms"]:
        raise ValueError(f"{folder} was exported for {metadata['platforms']}; this machine's JAX backend is {backend}")
    files = metadata["files"]
    require_serialization()
    with open(os.path.join(folder, files["program"]), "rb") as f:
        exported = jax.export.deserialize(bytearray(f.read()))
    (expected, *_), _ = jax.tree.unflatten(exported.in_tree, exported.in_avals)  # the weights' avals
    weights_path = os.path.join(folder, files["weights"])
    weights = {}
    # pread, as seggpt_jax.weights.readers.SafetensorsReader (which this file cannot import: see the
    # module docstring): each tensor read into its own array, not the whole file memory-mapped
    with safe_open(weights_path, "numpy", backend="pread") as reader:
        missing = sorted(set(expected) - set(reader.keys()))
        if missing:
            raise ValueError(f"{weights_path} lacks {len(missing)} weights the program takes, e.g. {missing[:3]}")
        for name, aval in expected.items():
            array = reader.get_tensor(name)
            if array.shape != aval.shape or array.dtype != aval.dtype:
                raise ValueError(f"{weights_path}: {name} is {array.dtype}{list(array.shape)}, the program takes "
                                 f"{aval.dtype}{list(aval.shape)}")
            weights[name] = jax.device_put(array)
    return ServingModel(folder, metadata, exported, weights)


__all__ = ["Export", "ServingModel", "attention_per_platform", "export_model", "export_platforms", "load",
           "require_serialization"]
