"""In-context segmentation in three lines: :class:`Segmenter` owns the model, its processor and its
compiled programs.

    from seggpt_jax import Segmenter
    segmenter = Segmenter.from_pretrained("BAAI/seggpt-vit-large")
    result = segmenter.segment("street.jpg", prompts=("street_1.jpg", "street_1_cars.png"))

``result.mask`` is the query's mask at its original size: a boolean foreground (binary mode, the
default) or class ids ``0..num_labels`` (``num_labels=N``, semantic mode). Prompt masks are read by
the one mask rule of :mod:`seggpt_jax.imaging.masks`. Several prompts for one query are
feature-ensembled; a list of queries may share prompts or bring their own; queries may also come as
a stream (any iterable), read and segmented batch by batch.

A Segmenter runs data-parallel over every local device by default (``devices=`` limits it): each
forward's queries are split over the devices, whole queries per device, and the answers equal one
device's (see :mod:`seggpt_jax.parallel` for the float bound).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx

from ..config import check_count
from ..imaging.decode import DEFAULT_MAX_PIXELS, InputError, to_rgb_uint8
from ..imaging.masks import ColourMap
from ..imaging.processor import painted_query, processor_for
from ..models import SegGptForImageSegmentation
from ..nn.inputs import EMBEDDING_TYPES, ENSEMBLE_MODES, default_embedding_type, prepare
from ..nn.models import _forward_jit
from ..parallel import DataParallel, pad_groups
from ..runtime import enable_compilation_cache
from .prompts import PreparedPrompt, PromptPreparer, is_per_query, normalise_prompts
from .results import InputFailure, SegmentationResult, result_from_painted
from .video import segment_video

logger = logging.getLogger(__name__)

#: Rows per forward and per device when none is given. On CPU one query per forward is the fastest per
#: image (measured by ``python -m benchmarks.benchmark``, ``benchmarks/RESULTS.md``): the forward is
#: compute-bound and a larger batch only adds cache pressure. Accelerators need large batches to fill
#: their matrix units.
DEFAULT_BATCH_SIZE = {"cpu": 1}
ACCELERATOR_BATCH_SIZE = 32


def default_batch_size(backend: str | None = None) -> int:
    return DEFAULT_BATCH_SIZE.get(backend or jax.default_backend(), ACCELERATOR_BATCH_SIZE)


@dataclasses.dataclass
class _Query:
    index: int
    pixels: np.ndarray  # [3, h, w] model input
    size: tuple[int, int]  # original (H, W)
    source: str | None
    prompts: list[Any]
    instance: bool


class Segmenter:
    """A SegGPT model with its processor and compiled forward, ready for images, folders and videos.

    Args:
        model: a :class:`~seggpt_jax.SegGptForImageSegmentation`.
        batch_size: rows per forward (query x prompt pairs); default :func:`default_batch_size` (1 on
            CPU, 32 on accelerators).
        ensemble_mode: how several prompts are combined (see the model's ``ensemble_mode``).
        compilation_cache: ``True`` or a folder: keep compiled programs across processes.
        max_pixels: query files of more pixels are refused before decoding (``None``: no limit). A query
            of ``P`` pixels takes about ``12 P`` bytes beside the model while it is read and answered.
        devices: the devices the forward runs on, data-parallel (:func:`seggpt_jax.parallel.select_devices`):
            ``None`` (default) every device, an int ``N`` the first ``N`` of this process, or a list. The
            model's parameters are placed on them (replicated), in place. Each forward's queries are
            rounded up to a multiple of the devices (whole queries per device, so a query's feature
            ensemble never spans two); the default batch size is the per-device default times the
            devices. Under ``jax.distributed`` every process must run the same sequence of batches
            (each its own queries of one global batch): ``seggpt-jax segment --distributed`` does.

    A last, partial batch runs at its own size on CPU (a compile costs less than padded rows there)
    and is padded to the full batch on accelerators (a padded row costs less than a compile).
    """

    def __init__(self, model, *, batch_size: int | None = None, ensemble_mode: str = "transformers",
                 compilation_cache: bool | str | os.PathLike | None = None,
                 max_pixels: int | None = DEFAULT_MAX_PIXELS, devices: Any = None):
        _check_choice("ensemble_mode", ensemble_mode, ENSEMBLE_MODES)
        if batch_size is not None:
            check_count("batch_size", batch_size)
        if compilation_cache:
            enable_compilation_cache(None if compilation_cache is True else compilation_cache)
        self.parallel = DataParallel(devices)
        self.model = self.parallel.place(model)
        self.processor = processor_for(model)
        self.batch_size = batch_size or default_batch_size() * self.parallel.local_size
        self.pad_batches = jax.default_backend() != "cpu"
        self.ensemble_mode = ensemble_mode
        self.max_pixels = max_pixels
        self._shapes: set[tuple[int, int, bool]] = set()  # every forward's (rows, prompts per query, masked)

    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike = "BAAI/seggpt-vit-large", *,
                        batch_size: int | None = None, ensemble_mode: str = "transformers",
                        compilation_cache: bool | str | None = None, devices: Any = None,
                        **load_kwargs: Any) -> "Segmenter":
        """Load the model (any source :meth:`SegGptForImageSegmentation.from_pretrained` accepts)."""
        model = SegGptForImageSegmentation.from_pretrained(name_or_path, **load_kwargs)
        return cls(model, batch_size=batch_size, ensemble_mode=ensemble_mode, compilation_cache=compilation_cache,
                   devices=devices)

    def queries_per_batch(self, prompts: int) -> int:
        """Queries per forward with ``prompts`` prompts each: ``batch_size // prompts`` (at least one),
        rounded up to a multiple of this process's devices."""
        return self.parallel.round_up(max(1, self.batch_size // prompts))

    def prepare_query(self, image: Any) -> tuple[np.ndarray, tuple[int, int], str | None]:
        """``([3, h, w] float32, original (H, W), path or None)``."""
        source = os.fspath(image) if isinstance(image, (str, os.PathLike)) else None
        rgb = to_rgb_uint8(image, what=f"query {source or ''}".strip(), max_pixels=self.max_pixels)
        pixels = self.processor(images=rgb, return_tensors="np")["pixel_values"][0]
        return pixels, rgb.shape[:2], source

    # ------------------------------------------------------------------------------ segmentation
    def segment(self, images: Any, prompts: Any, *, num_labels: int | None = None, binary: bool | None = None,
                colour_map: ColourMap | Mapping | str | None = None, embedding_type: str | Sequence[str] | None = None,
                return_scores: bool = False,
                progress: Callable[[int, int | None], None] | None = None) -> SegmentationResult | list[SegmentationResult]:
        """Segment one query (returns one result) or a list of queries (returns a list).

        Args:
            images: a path, PIL image or array, or a list of them.
            prompts: an ``(image, mask)`` pair or :class:`Prompt`; a list of them (each query gets all,
                feature-ensembled); or one list per query.
            num_labels: semantic mode: masks hold class ids ``0..num_labels`` (or palette colours) and
                the result holds class ids. Without it (or with ``binary=True``) masks are fed with
                their own levels and the result is a boolean foreground.
            colour_map: semantic mode: colour -> class id for RGB masks in another palette
                (``"voc"``, a JSON file, or a mapping; see :class:`~seggpt_jax.imaging.masks.ColourMap`).
            embedding_type: ``"semantic"``/``"instance"`` or one per query; default semantic with
                ``num_labels``, instance in binary mode.
            return_scores: also return per-class scores (``-squared colour distance``).
            progress: called as ``progress(done, total)`` after each batch.
        """
        single = not isinstance(images, (list, tuple))
        results = list(self.segment_iter([images] if single else list(images), prompts, num_labels=num_labels,
                                         binary=binary, colour_map=colour_map, embedding_type=embedding_type,
                                         return_scores=return_scores, progress=progress))
        return results[0] if single else results

    def segment_iter(self, images: Iterable[Any], prompts: Any, *, num_labels: int | None = None,
                     binary: bool | None = None, colour_map: ColourMap | Mapping | str | None = None,
                     embedding_type: Any = None, return_scores: bool = False, ensemble_mode: str | None = None,
                     progress: Callable[[int, int | None], None] | None = None,
                     errors: str = "raise") -> Iterator[SegmentationResult | InputFailure]:
        """Like :meth:`segment` for many queries, yielding results in order as batches finish.

        ``images`` may be any iterable (a generator of video frames, say): queries are read one batch
        at a time. With ``errors="return"`` a query that cannot be read yields an :class:`InputFailure`
        in its place and the others go on; with ``"raise"`` (default) its error propagates.
        """
        _check_choice("errors", errors, ("raise", "return"))
        ensemble_mode = self.ensemble_mode if ensemble_mode is None else ensemble_mode
        _check_choice("ensemble_mode", ensemble_mode, ENSEMBLE_MODES)
        binary = num_labels is None if binary is None else bool(binary)
        if not binary and (num_labels is None or isinstance(num_labels, bool) or not isinstance(num_labels, int)
                           or num_labels < 1):
            raise ValueError(f"semantic mode needs num_labels >= 1, got {num_labels!r}")
        if callable(getattr(prompts, "check_model", None)):  # a LearnedPrompt must fit this model and mode
            prompts.check_model(self.model.config)
            prompts.check_mode(None if binary else num_labels)
        total = len(images) if isinstance(images, Sequence) else None
        per_query = normalise_prompts(prompts, total) if is_per_query(prompts) else None
        shared = normalise_prompts(prompts, None) if per_query is None else None
        types = _embedding_types(embedding_type, total, default_embedding_type(None if binary else num_labels))
        prepare_prompt = PromptPreparer(self.processor, None if binary else num_labels,
                                        None if binary else colour_map)

        pending: list[_Query | InputFailure] = []
        seen = done = 0

        def run() -> Iterator[SegmentationResult | InputFailure]:
            """Segment the queued queries in one forward; yield them and the failures among them in order."""
            nonlocal done
            queries = [item for item in pending if isinstance(item, _Query)]
            painted = iter(self._paint(queries, prepare_prompt, ensemble_mode, pad=seen > len(queries))
                           if queries else ())
            for item in pending:
                if isinstance(item, InputFailure):
                    yield item
                    continue
                yield self.finish(next(painted), item.size, num_labels=None if binary else num_labels,
                                  return_scores=return_scores, source=item.source)
            done += len(pending)
            pending.clear()
            if progress is not None:
                progress(done, total)

        for index, image in enumerate(images):
            query_prompts = shared if per_query is None else per_query[index]
            try:
                pixels, size, source = self.prepare_query(image)
            except (InputError, OSError) as e:
                if errors == "raise":
                    raise
                source = os.fspath(image) if isinstance(image, (str, os.PathLike)) else None
                pending.append(InputFailure(index, source, str(e)))
                continue
            query = _Query(index, pixels, size, source, query_prompts, types(index) == "instance")
            queued = [item for item in pending if isinstance(item, _Query)]
            per_batch = self.queries_per_batch(len(query_prompts))
            if queued and (len(queued[0].prompts) != len(query_prompts) or len(queued) >= per_batch):
                yield from run()
            pending.append(query)
            seen += 1
        if pending:
            yield from run()

    def _paint(self, queries: list[_Query], prepare_prompt: PromptPreparer, ensemble_mode: str,
               pad: bool) -> list[np.ndarray]:
        """One forward for queries sharing a prompt count -> each query's painted ``[3, h, w]`` in ``[0, 255]``."""
        count = len(queries[0].prompts)
        rows_q, rows_pi, rows_pm, rows_type = [], [], [], []
        for query in queries:
            for prompt in query.prompts:
                image, mask = prepare_prompt(prompt)
                rows_q.append(query.pixels)
                rows_pi.append(image)
                rows_pm.append(mask)
                rows_type.append(query.instance)
        rows = self.queries_per_batch(count) * count if pad and self.pad_batches else None
        return list(self.paint_batch(np.stack(rows_q), np.stack(rows_pi), np.stack(rows_pm), np.asarray(rows_type),
                                     prompts_per_query=count, ensemble_mode=ensemble_mode, rows=rows))

    # ------------------------------------------------------------------------------ the steps, one by one
    # What a server (seggpt_jax.serve) calls: prepare_query and prepare_prompts on worker threads,
    # paint_batch on the one device thread, finish on the workers again.
    def prepare_prompts(self, prompts: Any, *, num_labels: int | None = None,
                        colour_map: ColourMap | Mapping | str | None = None) -> list[PreparedPrompt]:
        """The prompts (the forms :meth:`segment` accepts, shared by all queries) preprocessed once: model
        inputs for binary mode, or for semantic mode with ``num_labels``. :meth:`segment` takes the list
        back as its ``prompts`` (with the same ``num_labels``). Only the prompt's preprocessing is kept:
        prompt and query share one canvas, so the model itself runs again for every query."""
        prepare = PromptPreparer(self.processor, num_labels, colour_map)
        return [PreparedPrompt(*prepare(prompt), num_labels=num_labels)
                for prompt in normalise_prompts(prompts, None)]

    def paint_batch(self, pixel_values: np.ndarray, prompt_pixel_values: np.ndarray, prompt_masks: np.ndarray,
                    is_instance: np.ndarray, *, prompts_per_query: int = 1, ensemble_mode: str | None = None,
                    rows: int | None = None) -> np.ndarray:
        """One forward over prepared rows -> each query's painted ``[queries, 3, h, w]`` in ``[0, 255]``.

        Args:
            pixel_values, prompt_pixel_values, prompt_masks: ``[R, 3, h, w]`` float32 rows, query by query:
                each query repeated once per prompt, ``prompts_per_query`` consecutive rows per query.
            is_instance: ``[R]`` bool, the embedding type of each row (True: instance).
            rows: pad to this many rows (a multiple of ``prompts_per_query``) by repeating the last
                query, so that batches of any size run one compiled shape.
        """
        count, real = prompts_per_query, len(pixel_values)
        target = real if rows is None else rows
        if real == 0 or real % count or target < real or target % count:
            raise ValueError(f"paint_batch: {real} rows padded to {target} do not make whole queries of "
                             f"{count} prompt{'s' if count > 1 else ''}")
        arrays = [pixel_values, prompt_pixel_values, prompt_masks, np.asarray(is_instance)]
        if target > real:
            arrays = [np.concatenate([a, np.concatenate([a[real - count:real]] * ((target - real) // count))])
                      for a in arrays]
        painted = self.paint_rows(*arrays, prompts_per_query=count,
                                  ensemble_mode=self.ensemble_mode if ensemble_mode is None else ensemble_mode)
        return painted[:real:count]

    def finish(self, painted: np.ndarray, size: tuple[int, int], *, num_labels: int | None = None,
               return_scores: bool = False, source: str | None = None) -> SegmentationResult:
        """A query's painted ``[3, h, w]`` (from :meth:`paint_batch`) -> its result at the original ``size``:
        a boolean foreground without ``num_labels``, class ids ``0..num_labels`` with it
        (:func:`result_from_painted`)."""
        return result_from_painted(painted, size, num_labels=num_labels, return_scores=return_scores, source=source)

    @property
    def shapes_run(self) -> frozenset[tuple[int, int]]:
        """``(rows, prompts per query)`` of every forward run so far (each one compiled program)."""
        return frozenset((rows, count) for rows, count, _ in self._shapes)

    def paint_rows(self, pixels: np.ndarray, prompt_images: np.ndarray, prompt_masks: np.ndarray,
                   is_instance: np.ndarray | str, *, prompts_per_query: int, ensemble_mode: str,
                   prompt_valid: np.ndarray | None = None) -> np.ndarray:
        """One forward over model-input rows (``[rows, 3, h, w]`` each; groups of ``prompts_per_query``
        consecutive rows are one query, feature-ensembled) -> the painted query halves, ``[rows, 3, h, w]``
        in ``[0, 255]``. The first forward of each shape says that it compiles, and how long it took.

        Over several devices the queries are padded (repeating the last query) to a multiple of this
        process's devices and split over them, whole queries per device; the padding is cut off."""
        count = prompts_per_query
        real = len(pixels)
        if isinstance(is_instance, str):
            is_instance = np.full((real,), is_instance == "instance")
        if self.parallel.active:
            if real % count:
                raise ValueError(f"paint_rows: {real} rows are not whole queries of {count} prompts")
            queries = self.parallel.round_up(real // count)
            pixels, prompt_images, prompt_masks, is_instance, prompt_valid = pad_groups(
                [np.asarray(pixels), np.asarray(prompt_images), np.asarray(prompt_masks), np.asarray(is_instance),
                 None if prompt_valid is None else np.asarray(prompt_valid)], count, queries)
        key = (len(pixels), count, prompt_valid is not None)
        first = key not in self._shapes
        if first:
            logger.info("first batch of %d row%s (%d prompt%s per query%s): it compiles unless compiled before ...",
                        len(pixels), "s" if len(pixels) > 1 else "", count, "s" if count > 1 else "",
                        ", unused ones masked" if prompt_valid is not None else "")
        start = time.perf_counter()
        rows = self.parallel.shard(pixel_values=pixels, prompt_pixel_values=prompt_images, prompt_masks=prompt_masks,
                                   is_instance=np.asarray(is_instance))
        if prompt_valid is not None and self.parallel.processes > 1:
            raise NotImplementedError("prompt_valid (the video procedure's padded context) runs in one process")
        rows["prompt_valid"] = prompt_valid  # [rows] flags, the same padding; XLA places them
        with self.parallel.context():
            out = self.model(rows["pixel_values"], rows["prompt_pixel_values"], rows["prompt_masks"],
                             feature_ensemble=count > 1, embedding_type=rows["is_instance"],
                             ensemble_mode=ensemble_mode, prompts_per_query=count, prompt_valid=rows["prompt_valid"])
        pred = self.parallel.gather(out.pred_masks)[:real]
        painted = painted_query(pred, self.processor.image_mean, self.processor.image_std)  # [rows, 3, h, w]
        if first:
            self._shapes.add(key)
            logger.info("ran it in %.1fs; later batches of this shape reuse its program", time.perf_counter() - start)
        return painted

    # ------------------------------------------------------------------------------ video
    def segment_video(self, frames: Iterable[Any], prompt: Any, *, context_frames: int = 0,
                      ensemble_mode: str = "original", embedding_type: str = "instance",
                      progress: Callable[[int, int | None], None] | None = None,
                      errors: str = "raise", objects: Sequence[int] | bool | None = None
                      ) -> Iterator[SegmentationResult | InputFailure]:
        """The SegGPT video procedure (``seggpt_engine.inference_video``), one result per frame: binary,
        or object ids for a palette first-frame mask with several objects (or ``objects=[ids]``).

        See :func:`seggpt_jax.inference.video.segment_video`; frames are read and yielded one at a
        time, so memory does not grow with the clip.
        """
        return segment_video(self, frames, prompt, context_frames=context_frames, ensemble_mode=ensemble_mode,
                             embedding_type=embedding_type, progress=progress, errors=errors, objects=objects)


def compile_forward(config, *, queries: int, prompts: int = 1, batch_size: int | None = None,
                    ensemble_mode: str = "transformers", devices: Any = None, **model_kwargs: Any) -> bool:
    """Compile the forward a :class:`Segmenter` will run first, from the config alone.

    No weights are needed (the model is built abstractly), so this can run while the weights load
    (:func:`compile_ahead`); XLA keeps the executable and the Segmenter's first batch does not compile
    again. ``model_kwargs`` are the model's construction settings (``dtype``, ``param_dtype``,
    ``precision``, ``runtime``, and the ``processor`` of the checkpoint: part of the model, so of the program).
    Over several ``devices`` nothing is compiled ahead (the sharded program compiles with the first
    batch). Returns whether it compiled.
    """
    if DataParallel(devices).active:
        logger.debug("not compiling ahead: the forward over several devices compiles with its first batch")
        return False
    per_batch = max(1, (batch_size or default_batch_size()) // prompts)
    rows = min(per_batch, max(queries, 1)) * prompts
    zeros = np.zeros((rows, config.num_channels, *config.query_size), np.float32)
    abstract = nnx.eval_shape(lambda: SegGptForImageSegmentation(config, rngs=nnx.Rngs(0), **model_kwargs))
    graphdef, state = nnx.split(abstract)
    inputs, options = prepare(config, zeros, zeros, zeros, feature_ensemble=prompts > 1,
                              embedding_type=np.ones(rows, bool), ensemble_mode=ensemble_mode,
                              prompts_per_query=prompts)
    _forward_jit.lower(graphdef, state, inputs, options).compile()
    return True


def compile_ahead(config, **kwargs: Any) -> Callable[[], None]:
    """:func:`compile_forward` on a thread; returns the function that waits for it (its errors are not
    raised: it is only a head start, the first real call compiles and reports)."""

    def run() -> None:
        try:
            compile_forward(config, **kwargs)
        except Exception as e:  # noqa: BLE001 - only a head start: the real call compiles and reports
            logger.debug("compiling ahead failed: %s", e)

    thread = threading.Thread(target=run, name="seggpt-jax-compile", daemon=True)
    thread.start()
    return thread.join


def _check_choice(name: str, value: Any, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")


def _embedding_types(embedding_type: Any, count: int | None, default: str) -> Callable[[int], str]:
    """Per-query embedding type lookup from one name or one name per query."""
    if embedding_type is None:
        embedding_type = default
    if isinstance(embedding_type, str):
        _check_choice("embedding_type", embedding_type, EMBEDDING_TYPES)
        return lambda index: embedding_type
    types = list(embedding_type)
    if (count is not None and len(types) != count) or any(t not in EMBEDDING_TYPES for t in types):
        raise ValueError(f"embedding_type must be 'instance', 'semantic', or one of them per query ({count}); "
                         f"got {embedding_type!r}")
    return types.__getitem__
