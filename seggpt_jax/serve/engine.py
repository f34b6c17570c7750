"""The model side of the service, without HTTP: uploads -> model inputs -> batches -> mask PNGs.

:class:`Engine` owns a :class:`~seggpt_jax.Segmenter` and a :class:`~seggpt_jax.serve.batcher.Batcher`
and reaches the model only through the Segmenter's step methods: ``prepare_query`` and
``prepare_prompts`` (on the decode pool), ``paint_batch`` (on the one device thread, as the batcher's
``run_batch``), ``finish`` (on the decode pool again). So a server's answer is the Segmenter's answer
for the same inputs, by construction.

The compile key is the prompt count per query: it fixes the program (``prompts_per_query``, the
feature ensemble). Binary and semantic queries share a program (the embedding type is an input row
flag, and the palette is applied after the forward), so they share batches too.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import dataclasses
import hashlib
import io
import json
import logging
import os
import threading
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from PIL import Image, ImageOps

from ..config import check_count
from ..imaging.decode import InputError
from ..imaging.masks import ColourMap
from ..imaging.media import mask_image
from ..inference.prompts import PreparedPrompt, Prompt
from ..inference.segmenter import default_batch_size
from .batcher import Batcher, BatchObserver, bucket_sizes

logger = logging.getLogger(__name__)

#: Decoded images larger than this are refused (a small PNG can decode to gigabytes).
MAX_PIXELS = 40_000_000
#: The largest class count: masks are answered as palette PNGs whose indices are the class ids.
MAX_LABELS = 255
BACKEND_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"  # a program compiled or read from the cache


class RequestProblem(Exception):
    """Something wrong with what a client sent; ``kind`` says what (the server maps it to a status)."""

    kind = "invalid_field"

    def __init__(self, message: str):
        super().__init__(" ".join(message.split()))


class BadImage(RequestProblem):
    """An upload that is not a readable image."""

    kind = "bad_image"


class TooLarge(RequestProblem):
    """An upload or a prompt set too large for the server's limits."""

    kind = "too_large"


class UnknownPrompt(RequestProblem):
    """A ``prompt_id`` that is not (or no longer) registered."""

    kind = "unknown_prompt"


@dataclasses.dataclass(frozen=True)
class ServeSettings:
    """How the service runs; ``None`` picks the default for the platform (see :func:`platform_defaults`)."""

    model: str = "BAAI/seggpt-vit-large"
    max_batch: int | None = None  # rows per forward (query x prompt pairs)
    max_wait_ms: float | None = None
    max_queue: int = 64  # queries admitted and not yet on the device
    max_prompts: int = 4  # prompts per query; 1..max_prompts are compiled ahead
    max_body_mb: float = 32.0
    request_timeout_s: float = 60.0
    prompt_cache_mb: float = 256.0
    decode_threads: int = 2
    ensemble_mode: str = "transformers"

    def __post_init__(self):
        for name in ("max_queue", "max_prompts", "decode_threads"):
            check_count(name, getattr(self, name))
        if self.max_batch is not None and (isinstance(self.max_batch, bool) or not isinstance(self.max_batch, int)
                                           or self.max_batch < 1):
            raise ValueError(f"max_batch must be a positive integer, got {self.max_batch!r}")
        for name in ("max_body_mb", "request_timeout_s", "prompt_cache_mb"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)!r}")
        if self.max_wait_ms is not None and not self.max_wait_ms >= 0:
            raise ValueError(f"max_wait_ms must be >= 0, got {self.max_wait_ms!r}")


def platform_defaults(backend: str) -> tuple[int, float]:
    """``(max_batch rows, max_wait_ms)`` for a JAX backend.

    CPU: one query per forward and no waiting. Batch 1 is the fastest per image there
    (:data:`seggpt_jax.inference.segmenter.DEFAULT_BATCH_SIZE`), so batching would only add latency. Accelerators: the Segmenter's 32 rows and 5 ms, which are not
    measured here (no GPU or TPU was available): tune them with ``benchmarks/serve_load.py``.
    """
    return default_batch_size(backend), (0.0 if backend == "cpu" else 5.0)


@dataclasses.dataclass(frozen=True)
class CompileKey:
    """What fixes the compiled program of a batch (besides its size): prompts per query."""

    prompts_per_query: int


@dataclasses.dataclass(eq=False)
class QueryJob:
    """One query, ready for the device."""

    pixels: np.ndarray  # [3, h, w] float32
    size: tuple[int, int]  # original (H, W)
    name: str
    prompts: Sequence[PreparedPrompt]
    num_labels: int | None  # None: binary

    @property
    def key(self) -> CompileKey:
        return CompileKey(len(self.prompts))


@dataclasses.dataclass(eq=False)
class PromptSet:
    """A registered, preprocessed prompt set."""

    prompt_id: str
    prompts: list[PreparedPrompt]
    num_labels: int | None
    names: list[str]

    @property
    def nbytes(self) -> int:
        return sum(p.prompt_pixel_values.nbytes + p.prompt_masks.nbytes for p in self.prompts)


class PromptRegistry:
    """Registered prompt sets in a least-recently-used cache bounded in bytes."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self._sets: collections.OrderedDict[str, PromptSet] = collections.OrderedDict()
        self.evictions = 0
        self._lock = threading.Lock()

    @property
    def nbytes(self) -> int:
        return sum(s.nbytes for s in self._sets.values())

    def __len__(self) -> int:
        return len(self._sets)

    def put(self, prompt_set: PromptSet) -> None:
        if prompt_set.nbytes > self.max_bytes:
            raise TooLarge(f"the prompt set takes {prompt_set.nbytes / 2**20:.1f} MiB preprocessed, more than the "
                           f"server keeps for registered prompts ({self.max_bytes / 2**20:.0f} MiB, --prompt-cache-mb)")
        with self._lock:
            self._sets.pop(prompt_set.prompt_id, None)
            self._sets[prompt_set.prompt_id] = prompt_set
            while self.nbytes > self.max_bytes:
                self._sets.popitem(last=False)
                self.evictions += 1

    def get(self, prompt_id: str) -> PromptSet:
        with self._lock:
            found = self._sets.get(prompt_id)
            if found is None:
                raise UnknownPrompt(f"prompt_id {prompt_id!r} is not registered (registered prompt sets are kept in a "
                                    f"bounded cache, least recently used first out: register it again)")
            self._sets.move_to_end(prompt_id)
            return found


class CompileCounter:
    """Counts the programs XLA compiles (or reads from the persistent cache) in this process, by phase:
    ``warmup`` until the service is ready, ``serving`` after. ``serving`` stays 0 when every batch
    shape was compiled ahead."""

    def __init__(self, on_compile: Callable[[str], None] | None = None):
        self.counts: collections.Counter = collections.Counter()
        self.phase = "warmup"
        self.on_compile = on_compile
        self._installed = False

    def __call__(self, event: str, duration: float, **kwargs: Any) -> None:
        if event == BACKEND_COMPILE_EVENT:
            self.counts[self.phase] += 1
            if self.on_compile is not None:
                self.on_compile(self.phase)

    def install(self) -> None:
        import jax

        if not self._installed:
            jax.monitoring.register_event_duration_secs_listener(self)
            self._installed = True

    def uninstall(self) -> None:
        from jax._src import monitoring

        if self._installed:
            monitoring.unregister_event_duration_listener(self)
            self._installed = False


def decode_image(data: bytes, what: str) -> Image.Image:
    """An uploaded file -> a decoded PIL image, EXIF orientation applied (as files on the command line);
    errors name ``what`` (the field and the file name)."""
    if not data:
        raise BadImage(f"{what} is empty")
    try:
        image = Image.open(io.BytesIO(data))
        width, height = image.size
        if width * height > MAX_PIXELS:
            raise TooLarge(f"{what} is {width}x{height} pixels, over the server's limit of "
                           f"{MAX_PIXELS / 1e6:.0f} megapixels")
        image = ImageOps.exif_transpose(image)
        image.load()  # decodes everything: truncated files fail here
    except TooLarge:
        raise
    except Image.DecompressionBombError as e:
        raise TooLarge(f"{what}: {e}") from None
    except (OSError, ValueError, SyntaxError, EOFError) as e:
        reason = str(e) or type(e).__name__
        if "cannot identify image file" in reason:
            reason = "not an image file Pillow can read"
        elif "truncated" in reason.lower():
            reason = "the file is truncated"
        raise BadImage(f"cannot read {what}: {reason}") from None
    return image


def parse_colour_map(text: str | None) -> ColourMap | None:
    """The ``colour_map`` field: ``voc`` or a JSON object ``{"R,G,B": class_id, ...}`` (never a file name:
    a client does not choose files on the server)."""
    if text is None or not text.strip():
        return None
    if text.strip().lower() == "voc":
        return ColourMap.parse("voc")
    try:
        table = json.loads(text)
    except json.JSONDecodeError:
        table = None
    if not isinstance(table, dict):
        raise RequestProblem(f"colour_map must be 'voc' or a JSON object {{\"R,G,B\": class_id, ...}}, got "
                             f"{text[:60]!r}")
    try:
        return ColourMap(table, name="colour_map")
    except ValueError as e:
        raise RequestProblem(str(e)) from None


def prompt_set_id(num_labels: int | None, colour_map: str | None, files: Sequence[tuple[bytes, bytes]]) -> str:
    """A content hash: the same prompt files in the same mode register as the same id."""
    digest = hashlib.sha256(json.dumps([num_labels, (colour_map or "").strip()]).encode())
    for image, mask in files:
        digest.update(hashlib.sha256(image).digest())
        digest.update(hashlib.sha256(mask).digest())
    return digest.hexdigest()[:32]


class _Observers(BatchObserver):
    """Fans the batcher's events out to the engine's own progress and to the server's metrics."""

    def __init__(self, engine: "Engine"):
        self.engine = engine
        self.others: list[BatchObserver] = []

    def batch_done(self, *args: Any) -> None:
        for observer in self.others:
            observer.batch_done(*args)

    def queue_changed(self, depth: int) -> None:
        for observer in self.others:
            observer.queue_changed(depth)

    def dropped(self, reason: str) -> None:
        for observer in self.others:
            observer.dropped(reason)

    def warm_up_progress(self, done: int, total: int) -> None:
        self.engine.warm_up_done, self.engine.warm_up_total = done, total
        for observer in self.others:
            observer.warm_up_progress(done, total)


class Engine:
    """Loads the model, compiles every batch shape, and turns uploads into mask PNGs through the batcher.

    Args:
        settings: :class:`ServeSettings`.
        load: builds the :class:`~seggpt_jax.Segmenter` (called once, on the device thread).
    """

    def __init__(self, settings: ServeSettings, load: Callable[[], Any]):
        self.settings = settings
        self._load = load
        self.segmenter = None
        self.status = "starting"
        self.error: str | None = None
        self.warm_up_done = self.warm_up_total = 0
        self.observers = _Observers(self)
        self.compiles = CompileCounter()
        self.prompts = PromptRegistry(int(settings.prompt_cache_mb * 2**20))
        self.pool = concurrent.futures.ThreadPoolExecutor(settings.decode_threads, thread_name_prefix="seggpt-decode")
        self.max_batch, self.max_wait_ms = settings.max_batch, settings.max_wait_ms
        self.batcher: Batcher | None = None
        self.backend: str | None = None
        self.dtypes: dict[str, Any] = {}
        #: The one thread that loads the model and runs every batch.
        self.device = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="seggpt-device")

    # ------------------------------------------------------------------------------ start
    async def start(self) -> None:
        """Load the model (device thread), then run every (prompt count, batch size) once. Failures are
        kept in :attr:`error` (and re-raised)."""
        try:
            self.status = "loading the model"
            self.compiles.install()
            self.segmenter = await asyncio.get_running_loop().run_in_executor(self.device, self._load)
            import jax

            self.backend = jax.default_backend()
            self.dtypes = {"dtype": str(np.dtype(self.segmenter.model.settings.dtype)),
                           "param_dtype": sorted({str(x.dtype) for x in jax.tree.leaves(
                               _parameters(self.segmenter.model))})}
            rows, wait = platform_defaults(self.backend)
            self.max_batch = self.settings.max_batch or rows * self.segmenter.parallel.local_size
            self.max_wait_ms = wait if self.settings.max_wait_ms is None else self.settings.max_wait_ms
            self.batcher = Batcher(self.run_batch, max_batch_size=self.queries_per_batch,
                                   batch_wait_timeout_s=self.max_wait_ms / 1000, max_queue_size=self.settings.max_queue,
                                   batch_sizes=self.batch_sizes, observer=self.observers, device=self.device)
            self.status = "compiling"
            await self.batcher.warm_up(self.keys(), self.example)
            self.compiles.phase = "serving"
            self.status = "ready"
        except BaseException as e:
            self.status, self.error = "failed", " ".join(str(e).split()) or type(e).__name__
            raise

    def keys(self) -> list[CompileKey]:
        return [CompileKey(k) for k in range(1, self.settings.max_prompts + 1)]

    def queries_per_batch(self, key: CompileKey) -> int:
        """``max_batch // prompts`` queries, rounded up to a multiple of the devices (whole queries on each)."""
        return self.segmenter.parallel.round_up(max(1, self.max_batch // key.prompts_per_query))

    def batch_sizes(self, key: CompileKey) -> tuple[int, ...]:
        """The compiled batch sizes (queries): :func:`bucket_sizes` of the largest, each rounded up to a
        multiple of the devices (8 devices, 32 queries: 8, 16, 32)."""
        parallel = self.segmenter.parallel
        return tuple(sorted({parallel.round_up(size) for size in bucket_sizes(self.queries_per_batch(key))}))

    def example(self, key: CompileKey) -> QueryJob:
        """A query of zeros with ``key``'s prompt count: what the warm-up runs (values do not matter)."""
        config = self.segmenter.model.config
        zeros = np.zeros((config.num_channels, *config.query_size), np.float32)
        prompt = PreparedPrompt(zeros, zeros, None)
        return QueryJob(zeros, tuple(config.query_size), "warm-up", [prompt] * key.prompts_per_query, None)

    @property
    def ready(self) -> bool:
        return self.status == "ready" and self.batcher is not None and self.batcher.ready

    def buckets(self) -> dict[int, list[int]]:
        """Compiled batch sizes (queries per batch) by prompt count."""
        if self.batcher is None:
            return {}
        return {key.prompts_per_query: list(self.batcher.batch_sizes(key)) for key in self.keys()}

    # ------------------------------------------------------------------------------ host side (decode pool)
    def prepare_prompts(self, files: Sequence[tuple[bytes, str, bytes, str]], num_labels: int | None,
                        colour_map: str | None) -> list[PreparedPrompt]:
        """``(image bytes, image name, mask bytes, mask name)`` per prompt -> preprocessed prompts."""
        parsed_map = parse_colour_map(colour_map)
        if parsed_map is not None and num_labels is None:
            raise RequestProblem("colour_map maps colours to class ids: it needs num_labels")
        prepared = []
        for index, (image_data, image_name, mask_data, mask_name) in enumerate(files):
            image = decode_image(image_data, f"prompt_image[{index}] {image_name!r}")
            mask = decode_image(mask_data, f"prompt_mask[{index}] {mask_name!r}")
            try:
                prepared += self.segmenter.prepare_prompts(Prompt(image, mask), num_labels=num_labels,
                                                           colour_map=parsed_map)
            except (InputError, ValueError) as e:
                raise RequestProblem(f"prompt_mask[{index}] {mask_name!r}: {e}") from None
        return prepared

    def prepare_query(self, data: bytes, name: str, index: int, prompts: Sequence[PreparedPrompt],
                      num_labels: int | None) -> QueryJob:
        what = f"query[{index}] {name!r}"
        image = decode_image(data, what)
        try:
            pixels, size, _ = self.segmenter.prepare_query(image)
        except InputError as e:
            raise BadImage(f"{what}: {e}") from None
        return QueryJob(pixels, tuple(size), name, list(prompts), num_labels)

    def finish(self, job: QueryJob, painted: np.ndarray) -> tuple[bytes, np.ndarray]:
        """The query's mask PNG (0/255 in binary mode, class ids as palette indices in semantic mode) and the
        mask itself."""
        result = self.segmenter.finish(painted, job.size, num_labels=job.num_labels)
        buffer = io.BytesIO()
        mask_image(result.mask, job.num_labels).save(buffer, format="PNG")
        return buffer.getvalue(), result.mask

    # ------------------------------------------------------------------------------ device side
    def run_batch(self, key: CompileKey, jobs: Sequence[QueryJob], bucket: int) -> list[np.ndarray]:
        """One forward for the jobs (one compile key), padded to ``bucket`` queries -> painted ``[3, h, w]``."""
        count = key.prompts_per_query
        painted = self.segmenter.paint_batch(
            np.stack([job.pixels for job in jobs for _ in range(count)]),
            np.stack([p.prompt_pixel_values for job in jobs for p in job.prompts]),
            np.stack([p.prompt_masks for job in jobs for p in job.prompts]),
            np.asarray([job.num_labels is None for job in jobs for _ in range(count)]),
            prompts_per_query=count, ensemble_mode=self.settings.ensemble_mode, rows=bucket * count)
        return list(painted)

    # ------------------------------------------------------------------------------ description
    def info(self) -> dict[str, Any]:
        """Model, dtype, devices, compiled batch sizes, limits and state (``GET /v1/info``)."""
        out: dict[str, Any] = {"model": self.settings.model, "status": self.status, "ready": self.ready}
        if self.segmenter is not None:
            import jax

            model = self.segmenter.model
            config = model.config
            out.update({
                "backend": self.backend,
                "devices": [str(d) for d in self.segmenter.parallel.devices],
                **self.dtypes,
                "query_size": list(config.query_size),
                "hidden_size": config.hidden_size,
                "num_hidden_layers": config.num_hidden_layers,
                "ensemble_mode": self.settings.ensemble_mode,
            })
        out.update({
            "max_batch_rows": self.max_batch,
            "max_wait_ms": self.max_wait_ms,
            "max_queue": self.settings.max_queue,
            "max_prompts": self.settings.max_prompts,
            "max_labels": MAX_LABELS,
            "max_body_mb": self.settings.max_body_mb,
            "request_timeout_s": self.settings.request_timeout_s,
            "buckets": {str(k): v for k, v in self.buckets().items()},
            "warm_up": {"done": self.warm_up_done, "total": self.warm_up_total},
            "compiles": dict(self.compiles.counts),
            "queue": {"depth": self.batcher.queue_depth if self.batcher else 0,
                      "pending": self.batcher.pending if self.batcher else 0},
            "registered_prompt_sets": len(self.prompts),
            "pid": os.getpid(),
        })
        return out

    async def close(self) -> None:
        if self.batcher is not None:
            await self.batcher.close()
        else:
            self.device.shutdown(wait=False, cancel_futures=True)
        self.pool.shutdown(wait=False, cancel_futures=True)


def _parameters(model: Any) -> Any:
    from flax import nnx

    return nnx.state(model, nnx.Param)
