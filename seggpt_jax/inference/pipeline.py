"""Decode, forward, encode: a stream of queries through a :class:`~seggpt_jax.Segmenter` with the host
work overlapped with the device's.

Three stages run at once: a pool of threads reads and preprocesses the next queries, the calling
thread runs one forward at a time on the devices, and the same pool turns each painted answer into
its outputs (``write``). Pillow, numpy and XLA release the GIL for their long calls, so while the
device computes one batch the host decodes the next and writes the previous one. Every stage is
bounded (at most about two batches decoded ahead, two batches being written), so memory does not grow
with the stream, and an input's failure (unreadable, unwritable) is its own: the others go on.

    for item, outcome in run_pipeline(segmenter, paths, prompts, write=save):
        ...  # in input order; outcome is what save returned, or an InputFailure

Under ``jax.distributed`` (``lockstep=True``) every process runs the same number of forwards of the
same shape: a process whose own stream has ended runs padding batches until every process is done.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import os
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np

from .. import parallel
from ..files import stops_every_write
from ..imaging.decode import InputError, to_rgb_uint8
from ..nn.inputs import default_embedding_type
from .results import InputFailure, SegmentationResult

#: Decoded pictures up to this many pixels are kept for ``write`` (an overlay needs them); larger ones
#: are read again there, so that the queries decoded ahead never hold more than a few hundred MB.
KEEP_PICTURE_PIXELS = 16_000_000


@dataclasses.dataclass
class _Decoded:
    item: Any
    pixels: np.ndarray | None = None  # [3, h, w] model input
    size: tuple[int, int] | None = None
    picture: np.ndarray | None = None  # [H, W, 3] uint8, when kept
    error: str | None = None


def default_workers() -> int:
    """Host threads for decoding and writing: the CPU count, at least 2, at most 8."""
    return max(2, min(8, os.cpu_count() or 2))


def run_pipeline(segmenter, items: Iterable[Any], prompts: Any, *,
                 write: Callable[[Any, SegmentationResult, np.ndarray | None], Any],
                 path: Callable[[Any], str] = os.fspath, num_labels: int | None = None, colour_map: Any = None,
                 embedding_type: str | None = None, keep_picture: bool = True, workers: int | None = None,
                 lockstep: bool = False) -> Iterator[tuple[Any, Any]]:
    """Segment each item's image and hand the result to ``write``; yields ``(item, outcome)`` in order.

    Args:
        segmenter: the :class:`~seggpt_jax.Segmenter` (its batch size and devices).
        items: anything; ``path(item)`` is its image file.
        prompts: shared by every query (the forms :meth:`Segmenter.segment` accepts); prepared once.
        write: ``write(item, result, picture)`` on a pool thread: the query's
            :class:`~seggpt_jax.SegmentationResult` and its decoded ``[H, W, 3]`` picture (``None`` when it
            was not kept); its return value is the outcome. An ``InputError`` or ``OSError`` it raises
            becomes the item's :class:`~seggpt_jax.InputFailure`, unless it would hit every later write too
            (:func:`~seggpt_jax.files.stops_every_write`: disk full, read-only, no permission); that, and
            anything else, stops the run.
        keep_picture: keep the decoded picture for ``write`` (up to :data:`KEEP_PICTURE_PIXELS`).
        lockstep: every process of a ``jax.distributed`` job calls this with its own items; the forwards
            run together, padded to full batches.
    """
    instance = (embedding_type or default_embedding_type(num_labels)) == "instance"
    prepared = segmenter.prepare_prompts(prompts, num_labels=num_labels, colour_map=colour_map)
    count = len(prepared)
    per_batch = segmenter.queries_per_batch(count)
    pad_to = per_batch if (lockstep or segmenter.pad_batches) else None
    workers = workers or default_workers()
    limit = segmenter.max_pixels

    def decode(item: Any) -> _Decoded:
        try:
            picture = to_rgb_uint8(path(item), what=f"query {path(item)}", max_pixels=limit)
            pixels, size, _ = segmenter.prepare_query(picture)
        except (InputError, OSError) as e:
            return _Decoded(item, error=str(e))
        kept = picture if keep_picture and picture.shape[0] * picture.shape[1] <= KEEP_PICTURE_PIXELS else None
        return _Decoded(item, pixels, tuple(size), kept)

    def finish(decoded: _Decoded, painted: np.ndarray) -> Any:
        result = segmenter.finish(painted, decoded.size, num_labels=num_labels, source=path(decoded.item))
        try:
            return write(decoded.item, result, decoded.picture)
        except (InputError, OSError) as e:
            if stops_every_write(e):
                raise
            return InputFailure(-1, path(decoded.item), str(e))

    def forward(queries: list[_Decoded]) -> list[np.ndarray]:
        rows = max(len(queries), 1)
        if queries:
            pixels = np.stack([q.pixels for q in queries for _ in range(count)])
        else:  # lockstep padding: this process has nothing left, the others still run
            shape = (count, segmenter.model.config.num_channels, *segmenter.model.config.query_size)
            pixels = np.zeros(shape, np.float32)
        painted = segmenter.paint_batch(
            pixels, np.stack([p.prompt_pixel_values for _ in range(rows) for p in prepared]),
            np.stack([p.prompt_masks for _ in range(rows) for p in prepared]), np.full(rows * count, instance),
            prompts_per_query=count, rows=None if pad_to is None else pad_to * count)
        return list(painted[:len(queries)])

    pool = concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="seggpt-host")
    decoding: collections.deque[concurrent.futures.Future] = collections.deque()
    writing: collections.deque[tuple[Any, concurrent.futures.Future | Any]] = collections.deque()
    source = iter(items)
    ahead = 2 * per_batch + workers

    def fill() -> bool:
        """Keep ``ahead`` queries decoding; False once the stream has ended."""
        while len(decoding) < ahead:
            item = next(source, _END)
            if item is _END:
                return False
            decoding.append(pool.submit(decode, item))
        return True

    def drain_written(keep: int) -> Iterator[tuple[Any, Any]]:
        while len(writing) > keep:
            item, outcome = writing.popleft()
            yield item, outcome.result() if isinstance(outcome, concurrent.futures.Future) else outcome

    try:
        more = fill()
        while True:
            batch: list[_Decoded] = []
            while len(batch) < per_batch and (decoding or more):
                if not decoding:
                    more = fill()
                    continue
                decoded = decoding.popleft().result()
                more = fill() if more else False
                if decoded.error is not None:
                    writing.append((decoded.item, InputFailure(-1, path(decoded.item), decoded.error)))
                else:
                    batch.append(decoded)
            if lockstep and not parallel.any_process(bool(batch)):
                break
            if not batch and not lockstep:
                break
            painted = forward(batch)
            for decoded, answer in zip(batch, painted):
                writing.append((decoded.item, pool.submit(finish, decoded, answer)))
            yield from drain_written(2 * per_batch)
        yield from drain_written(0)
    finally:
        for future in decoding:
            future.cancel()
        for _, outcome in writing:
            if isinstance(outcome, concurrent.futures.Future):
                outcome.cancel()
        pool.shutdown(wait=True, cancel_futures=True)


_END = object()

