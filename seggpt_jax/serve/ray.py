"""seggpt-jax on Ray (the ``ray`` extra): a Ray Serve deployment of the HTTP service, and a Ray Data
predictor for offline jobs.

**Ray Serve.** :func:`deployment` wraps the very service ``seggpt-jax serve`` runs: each replica builds
an :class:`~seggpt_jax.serve.engine.Engine` (the same :class:`~seggpt_jax.serve.batcher.Batcher`, the
same FastAPI app and HTTP API: ``/v1/segment``, ``/v1/prompts``, ``/readyz``, ``/metrics``, the demo),
one replica per accelerator (``ray_actor_options={"num_gpus": 1}``, or ``{"resources": {"TPU": 4}}``
for a TPU host). Back-pressure reads as ours: a replica's own queue answers 429 with ``Retry-After``
when it is full (``max_queue``), and Ray's per-caller queue in front of the replicas
(``max_queued_requests``) rejects with 429 and ``Retry-After`` too instead of Ray's default 503;
``max_ongoing_requests`` (requests handed to one replica at once) defaults to the replica's queue plus
one batch, so that Ray hands the replica what its batcher can hold and queues the rest itself.

    seggpt-jax serve MODEL --ray [--ray-replicas 2 --ray-gpus-per-replica 1]
    serve run seggpt_jax.serve.ray:app model=BAAI/seggpt-vit-large max_batch=32

**Ray Data.** :class:`Predictor` is a callable class for ``Dataset.map_batches``: rows of image bytes
(``read_binary_files``: column ``bytes``) or paths (column ``path``) in, masks out, with the prompts
given once when the predictor is built; its answers are :class:`~seggpt_jax.Segmenter`'s.

    ds = ray.data.read_binary_files("photos/", include_paths=True)
    masks = ds.map_batches(Predictor, fn_constructor_kwargs={"model": "BAAI/seggpt-vit-large",
                           "prompts": [("prompt.jpg", "prompt_mask.png")]}, concurrency=4, batch_size=32,
                           num_gpus=1)
"""

from __future__ import annotations

import dataclasses
import io
import os
from collections.abc import Mapping, Sequence
from typing import Any

import jax.numpy as jnp
import numpy as np

from ..imaging.media import mask_image
from ..inference.segmenter import Segmenter
from ..train.prompt_tuning import LearnedPrompt
from .app import create_app
from .engine import Engine, RequestProblem, ServeSettings, decode_image

#: Seconds a client rejected by Ray's queue is told to wait (``Retry-After``).
RETRY_AFTER_S = 1.0


def _load_segmenter(settings: ServeSettings, *, dtype: str = "float32", devices: Any = None,
                    compilation_cache: Any = True):
    """The replica's Segmenter (on the device thread): the library's defaults in float32, so answers
    equal ``Segmenter.from_pretrained(model)``'s."""
    options = {}
    if dtype != "float32":
        options["dtype"] = jnp.dtype(dtype)
    return Segmenter.from_pretrained(settings.model, ensemble_mode=settings.ensemble_mode, devices=devices,
                                     compilation_cache=compilation_cache, **options)


class SegGptServer:
    """The body of a Ray Serve replica: one :class:`~seggpt_jax.serve.engine.Engine` and its FastAPI app
    (built by Ray after the constructor, through ``__serve_build_asgi_app__``). The app's lifespan loads
    the model and compiles every batch size; until then ``/readyz`` answers 503, as ``seggpt-jax serve``
    does."""

    def __init__(self, settings: dict, dtype: str = "float32", devices: Any = None,
                 compilation_cache: Any = True):
        self.settings = ServeSettings(**settings)
        self.engine = Engine(self.settings, lambda: _load_segmenter(
            self.settings, dtype=dtype, devices=devices, compilation_cache=compilation_cache))

    def __serve_build_asgi_app__(self):
        return create_app(self.engine)

    def check_health(self) -> None:
        """Ray restarts a replica whose model failed to load."""
        if self.engine.status == "failed":
            raise RuntimeError(f"the model failed to load: {self.engine.error}")


def deployment(settings: ServeSettings, *, dtype: str = "float32", devices: Any = None, num_replicas: int = 1,
               ray_actor_options: Mapping[str, Any] | None = None, max_ongoing_requests: int | None = None,
               max_queued_requests: int | None = None, compilation_cache: Any = True):
    """The Ray Serve application (``serve.run(deployment(settings))``): ``num_replicas`` replicas of the
    service, each with ``ray_actor_options`` (e.g. ``{"num_gpus": 1}``: one accelerator each).

    ``max_ongoing_requests``: requests handed to one replica at once (default: its queue plus one batch
    of queries, so that the replica's batcher sees enough to batch and answers 429 itself when full).
    ``max_queued_requests``: requests Ray queues in front of the replicas (default: as many as one
    replica's queue); beyond it Ray answers 429 with ``Retry-After``, as a replica does."""
    from ray import serve
    from ray.serve.config import BackpressureConfig

    ongoing = max_ongoing_requests or settings.max_queue + max(1, settings.max_batch or 1)
    queued = settings.max_queue if max_queued_requests is None else max_queued_requests
    options = dict(ray_actor_options or {})
    options.setdefault("num_cpus", 1)
    cls = serve.deployment(
        name="seggpt-jax", num_replicas=num_replicas, ray_actor_options=options, max_ongoing_requests=ongoing,
        max_queued_requests=queued, backpressure_config=BackpressureConfig(status_code=429, retry_after_s=RETRY_AFTER_S),
        health_check_period_s=10, graceful_shutdown_timeout_s=settings.request_timeout_s + 5,
    )(serve.ingress()(SegGptServer))
    return cls.bind(dataclasses.asdict(settings), dtype, devices, compilation_cache)


_SETTINGS_TYPES = {f.name: f.type for f in dataclasses.fields(ServeSettings)}


def app(args: Mapping[str, str]):
    """The application builder for ``serve run seggpt_jax.serve.ray:app key=value ...``: the keys of
    :class:`~seggpt_jax.serve.engine.ServeSettings` (``model=``, ``max_batch=``, ``max_queue=``, ...),
    and ``dtype=``, ``replicas=``, ``num_gpus=``, ``num_cpus=``, ``devices=``, ``max_ongoing_requests=``,
    ``max_queued_requests=``."""
    args = dict(args)
    extra = {name: args.pop(name) for name in ("dtype", "replicas", "num_gpus", "num_cpus", "devices",
                                               "max_ongoing_requests", "max_queued_requests") if name in args}
    unknown = sorted(set(args) - set(_SETTINGS_TYPES))
    if unknown:
        raise ValueError(f"unknown option(s) {unknown}; known: {sorted(_SETTINGS_TYPES)} and {sorted(extra)}")
    settings = ServeSettings(**{k: _parse(k, v) for k, v in args.items()})
    actor = {key: float(extra[key]) for key in ("num_gpus", "num_cpus") if key in extra}
    return deployment(settings, dtype=extra.get("dtype", "float32"),
                      devices=int(extra["devices"]) if "devices" in extra else None,
                      num_replicas=int(extra.get("replicas", 1)), ray_actor_options=actor,
                      max_ongoing_requests=int(extra["max_ongoing_requests"]) if "max_ongoing_requests" in extra
                      else None,
                      max_queued_requests=int(extra["max_queued_requests"]) if "max_queued_requests" in extra
                      else None)


def _parse(name: str, text: str) -> Any:
    kind = str(_SETTINGS_TYPES[name])
    if not isinstance(text, str):
        return text
    if "int" in kind:
        return int(text)
    if "float" in kind:
        return float(text)
    return text


# ------------------------------------------------------------------------------------ Ray Data
class Predictor:
    """A callable class for ``Dataset.map_batches``: each row's image (column ``bytes``, as
    ``ray.data.read_binary_files`` gives it, or ``path``) is segmented with the prompts given here.

    Args:
        model: anything :meth:`Segmenter.from_pretrained` accepts, or a built ``Segmenter``.
        prompts: an ``(image, mask)`` pair, a list of them (feature-ensembled), or a learned-prompt
            file (``.safetensors`` from ``seggpt-jax tune-prompt``); files are read by the predictor,
            so they must be readable where the workers run.
        num_labels: semantic mode (class ids ``0..num_labels``); default binary.
        batch_size, devices, ensemble_mode, dtype: as for :class:`~seggpt_jax.Segmenter`.

    Output columns: ``path`` (when the input has it), ``mask`` (``[H, W]``: bool, or class ids),
    ``mask_png`` (the mask as the command line writes it: 0/255, or a palette PNG of class ids),
    ``error`` (empty, or why the row's image could not be read: the other rows go on).
    """

    def __init__(self, model: Any, prompts: Any, *, num_labels: int | None = None, colour_map: Any = None,
                 batch_size: int | None = None, devices: Any = None, ensemble_mode: str = "transformers",
                 embedding_type: str | None = None, dtype: str = "float32"):
        if isinstance(model, Segmenter):
            self.segmenter = model
        else:
            options = {"dtype": jnp.dtype(dtype)} if dtype != "float32" else {}
            self.segmenter = Segmenter.from_pretrained(model, batch_size=batch_size, ensemble_mode=ensemble_mode,
                                                       devices=devices, **options)
        if isinstance(prompts, (str, os.PathLike)) and os.fspath(prompts).endswith(".safetensors"):
            learned = LearnedPrompt.load(prompts)
            learned.check_model(self.segmenter.model.config)
            learned.check_mode(num_labels)
            prompts = learned
        self.num_labels, self.embedding_type = num_labels, embedding_type
        self.prompts = self.segmenter.prepare_prompts(prompts, num_labels=num_labels, colour_map=colour_map)

    def __call__(self, batch: Mapping[str, Sequence[Any]]) -> dict[str, np.ndarray]:
        if "bytes" not in batch and "path" not in batch:
            raise ValueError(f"Predictor needs a 'bytes' or 'path' column, got {sorted(batch)}")
        sources = [str(p) for p in batch["path"]] if "path" in batch else [None] * len(batch["bytes"])
        errors = [""] * len(sources)
        images: list[Any] = list(sources)
        if "bytes" in batch:
            for i, data in enumerate(batch["bytes"]):
                try:  # decoded as the server decodes uploads (EXIF orientation applied, pixel limit)
                    images[i] = decode_image(bytes(data), f"row {sources[i] or i}")
                except RequestProblem as e:
                    errors[i] = str(e)
        good = [i for i, error in enumerate(errors) if not error]
        results = dict(zip(good, self.segmenter.segment_iter([images[i] for i in good], self.prompts,
                                                             num_labels=self.num_labels,
                                                             embedding_type=self.embedding_type, errors="return")))
        empty = np.zeros((0, 0), bool if self.num_labels is None else np.uint8)
        masks, pngs = [], []
        for i in range(len(sources)):
            result = results.get(i)
            if result is not None and hasattr(result, "mask"):
                buffer = io.BytesIO()
                mask_image(result.mask, self.num_labels).save(buffer, format="PNG")
                masks.append(result.mask)
                pngs.append(buffer.getvalue())
            else:
                if result is not None:
                    errors[i] = result.message
                masks.append(empty)
                pngs.append(b"")
        out = {"mask": _object_array(masks), "mask_png": _object_array(pngs), "error": np.asarray(errors)}
        if "path" in batch:
            out["path"] = np.asarray(sources)
        return out


def _object_array(values: list) -> np.ndarray:
    out = np.empty(len(values), dtype=object)
    out[:] = values
    return out
