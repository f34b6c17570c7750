"""A dynamic batcher in plain asyncio: requests in, batches of one compile key out, one batch at a time
on one device thread. No HTTP, no model: a server (:mod:`seggpt_jax.serve.app`) or a Ray Serve
deployment wraps the same class.

It reads like the batchers users know:

* Ray Serve's ``@serve.batch(max_batch_size, batch_wait_timeout_s)``: a batch runs when it is full or
  when its oldest item has waited ``batch_wait_timeout_s``, whichever comes first;
* Triton's dynamic batcher: ``preferred_batch_size`` (here ``batch_sizes``: the compiled shapes, a
  batch is padded up to the nearest), ``max_queue_delay`` (``batch_wait_timeout_s``), and a queue
  policy that rejects when ``max_queue_size`` items wait (:class:`QueueFull`, with a retry estimate)
  and drops an item whose deadline has passed before it reaches the device.

Items carry a *compile key*: only items with equal keys share a batch, because a key is one compiled
program per batch size. Every (key, batch size) pair is run once by :meth:`Batcher.warm_up` before
the batcher is ready, so no request ever waits on a compilation. Among the batches that may run, the
one whose oldest item has waited longest runs first (first come, first served across keys).

Admission is two-step so that a service can refuse work before it decodes anything:
:meth:`Batcher.reserve` takes queue slots for a request's items (or raises at once), and
:meth:`Reservation.submit` queues each item when its inputs are ready. An item whose awaiting task is
cancelled (its client went away) or whose deadline passes while it waits is removed from the queue
and never reaches the device. All methods are called from the event loop's thread; only
``run_batch`` (and :meth:`Batcher.run_on_device`) run on the device thread.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import dataclasses
import math
import threading
import time
from collections.abc import Callable, Hashable, Iterable, Sequence
from typing import Any, Generic, TypeVar

from ..config import check_count

K = TypeVar("K", bound=Hashable)  # compile key
P = TypeVar("P")  # one item's inputs
R = TypeVar("R")  # one item's result


class BatcherError(Exception):
    """Why an item was not run (each maps to one HTTP status in the server)."""


class QueueFull(BatcherError):
    """The queue holds ``max_queue_size`` items; ``retry_after`` estimates when there is room (seconds)."""

    def __init__(self, message: str, retry_after: float):
        super().__init__(message)
        self.retry_after = retry_after


class Draining(BatcherError):
    """The batcher is finishing its queue and takes nothing new."""


class NotReady(BatcherError):
    """Warming up: not every batch size is compiled yet."""


class DeadlineExceeded(BatcherError):
    """The item's deadline passed before its result was ready."""


def bucket_sizes(max_size: int) -> tuple[int, ...]:
    """The batch sizes compiled for up to ``max_size`` items: powers of two below it, and itself
    (``10 -> (1, 2, 4, 8, 10)``); a batch is padded to the nearest one, so at most half of it is padding
    and there are ``log2(max_size) + 1`` programs."""
    check_count("max_size", max_size)
    sizes = {1 << i for i in range(max_size.bit_length()) if 1 << i < max_size}
    return tuple(sorted(sizes | {max_size}))


class BatchObserver:
    """Hooks for metrics; every method is called on the event loop's thread and does nothing here."""

    def batch_done(self, key: Any, size: int, bucket: int, queue_waits: Sequence[float],
                   device_seconds: float) -> None:
        """A batch of ``size`` items ran padded to ``bucket``; each item waited ``queue_waits`` seconds."""

    def queue_changed(self, depth: int) -> None:
        """Items waiting for the device (queued, not yet running)."""

    def dropped(self, reason: str) -> None:
        """An item left the queue without running: ``"cancelled"`` or ``"deadline"``."""

    def warm_up_progress(self, done: int, total: int) -> None:
        """``done`` of ``total`` (key, batch size) programs have run once."""


@dataclasses.dataclass(eq=False)
class _Item(Generic[K, P]):
    key: K
    payload: P
    future: asyncio.Future
    enqueued: float
    deadline: float | None
    state: str = "queued"  # queued -> running -> done, or queued -> dropped


@dataclasses.dataclass
class BatcherStats:
    """What has happened so far (for tests and ``/v1/info``)."""

    batches: collections.Counter = dataclasses.field(default_factory=collections.Counter)  # (key, size, bucket)
    dropped: collections.Counter = dataclasses.field(default_factory=collections.Counter)  # reason -> items
    device_threads: set = dataclasses.field(default_factory=set)  # ids of the threads run_batch ran on
    items_run: int = 0


class Batcher(Generic[K, P, R]):
    """Group items by compile key into batches and run them one at a time on one thread.

    Args:
        run_batch: ``run_batch(key, payloads, bucket) -> results``, one result per payload, in order;
            called on the device thread with ``len(payloads) <= bucket``: pad up to ``bucket``.
        max_batch_size: items per batch, one number or a function of the key.
        batch_wait_timeout_s: how long the oldest item of a batch that is not full waits for more
            (0: run whatever is queued as soon as the device is free).
        max_queue_size: items that may wait (reserved or queued); more raise :class:`QueueFull`.
        batch_sizes: the compiled batch sizes of a key (default :func:`bucket_sizes` of its max).
        observer: metrics hooks (:class:`BatchObserver`).
        device: the single-thread executor batches run on (default: a new one); pass the one that loaded
            the model to keep all device work on one thread.
    """

    def __init__(self, run_batch: Callable[[K, Sequence[P], int], Sequence[R]], *,
                 max_batch_size: int | Callable[[K], int], batch_wait_timeout_s: float, max_queue_size: int,
                 batch_sizes: Callable[[K], Sequence[int]] | None = None, observer: BatchObserver | None = None,
                 device: concurrent.futures.Executor | None = None):
        if not batch_wait_timeout_s >= 0:
            raise ValueError(f"batch_wait_timeout_s must be >= 0, got {batch_wait_timeout_s!r}")
        check_count("max_queue_size", max_queue_size)
        self._run_batch = run_batch
        self._max = max_batch_size if callable(max_batch_size) else (lambda key: max_batch_size)
        self._sizes = batch_sizes or (lambda key: bucket_sizes(self._max(key)))
        self.batch_wait_timeout_s = float(batch_wait_timeout_s)
        self.max_queue_size = max_queue_size
        self.observer = observer or BatchObserver()
        self.stats = BatcherStats()
        self._queues: dict[K, collections.deque[_Item]] = {}
        self._queued = 0  # items in self._queues
        self._reserved = 0  # slots taken by reservations, not yet submitted
        self._running = 0  # items in the batch on the device
        self._ready = False
        self._draining = False
        self._closed = False
        self._wakeup: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._device = device or concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="seggpt-device")
        self._batch_seconds: float | None = None  # moving average of one batch's device time
        self._batch_items: float = 1.0  # moving average of items per batch

    # ------------------------------------------------------------------------------ state
    @property
    def ready(self) -> bool:
        return self._ready and not self._draining

    @property
    def draining(self) -> bool:
        return self._draining

    @property
    def queue_depth(self) -> int:
        """Items waiting for the device (queued, not yet running)."""
        return self._queued

    @property
    def pending(self) -> int:
        """Items admitted and not yet on the device (reserved or queued): what ``max_queue_size`` bounds."""
        return self._queued + self._reserved

    @property
    def busy(self) -> bool:
        return bool(self._queued or self._reserved or self._running)

    def batch_sizes(self, key: K) -> tuple[int, ...]:
        sizes = tuple(sorted(set(self._sizes(key))))
        if not sizes or sizes[0] < 1 or sizes[-1] != self._max(key):
            raise ValueError(f"batch sizes {sizes} of key {key!r} must be positive and end at its max batch size "
                             f"{self._max(key)}")
        return sizes

    def max_batch_size(self, key: K) -> int:
        return self._max(key)

    # ------------------------------------------------------------------------------ lifecycle
    async def run_on_device(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run ``fn(*args)`` on the device thread (loading a model, say) and wait for it."""
        return await asyncio.get_running_loop().run_in_executor(self._device, fn, *args)

    async def warm_up(self, keys: Iterable[K], example: Callable[[K], P]) -> None:
        """Run every batch size of every key once (one ``example(key)`` padded to the size), on the device
        thread, then start taking items. Compilation happens here, never in a request's batch."""
        plan = [(key, size) for key in keys for size in self.batch_sizes(key)]
        self.observer.warm_up_progress(0, len(plan))
        for done, (key, size) in enumerate(plan, 1):
            payload = example(key)
            await self.run_on_device(self._run_checked, key, [payload], size)
            self.observer.warm_up_progress(done, len(plan))
        self._start()
        self._ready = True

    def _start(self) -> None:
        if self._task is None:
            self._wakeup = asyncio.Event()
            self._task = asyncio.get_running_loop().create_task(self._dispatch(), name="seggpt-batcher")

    def begin_drain(self) -> None:
        """Take nothing new; queued items run at once (no more waiting for fuller batches)."""
        self._draining = True
        if self._wakeup is not None:
            self._wakeup.set()

    async def wait_idle(self, poll_s: float = 0.02) -> None:
        """Until nothing is reserved, queued or running."""
        while self.busy:
            await asyncio.sleep(poll_s)

    async def close(self) -> None:
        """Stop the dispatcher (queued items fail with :class:`Draining`) and the device thread."""
        self._draining = self._closed = True
        if self._task is not None:
            self._wakeup.set()
            await self._task
        for queue in self._queues.values():
            for item in queue:
                self._resolve(item, error=Draining("the server stopped before this request ran"))
        self._queues.clear()
        self._queued = 0
        await asyncio.get_running_loop().run_in_executor(None, self._device.shutdown)

    # ------------------------------------------------------------------------------ admission
    def retry_after(self) -> float:
        """Seconds until about one batch's worth of the queue has run (at least 1)."""
        if self._batch_seconds is None:
            return 1.0
        return max(1.0, math.ceil(self.pending / max(self._batch_items, 1.0)) * self._batch_seconds)

    def _admit(self, count: int) -> None:
        if self._draining:
            raise Draining("the server is shutting down and takes no new requests")
        if not self._ready:
            raise NotReady("warming up: compiling the model's batch sizes")
        if count > self.max_queue_size:
            raise ValueError(f"{count} items can never fit a queue of {self.max_queue_size}")
        if self.pending + count > self.max_queue_size:
            raise QueueFull(f"the queue is full ({self.pending} of {self.max_queue_size} waiting)", self.retry_after())

    def reserve(self, count: int) -> "Reservation[K, P, R]":
        """Take ``count`` queue slots now, or raise :class:`QueueFull` / :class:`Draining` /
        :class:`NotReady` (and ``ValueError`` when ``count`` exceeds the queue itself)."""
        self._admit(count)
        self._reserved += count
        return Reservation(self, count)

    async def submit(self, key: K, payload: P, *, deadline: float | None = None) -> R:
        """Queue one item (admitted on the spot) and wait for its result. ``deadline`` is on
        ``time.monotonic()``'s clock; past it the item raises :class:`DeadlineExceeded`."""
        self._admit(1)
        return await self._wait(self._enqueue(key, payload, deadline))

    def _enqueue(self, key: K, payload: P, deadline: float | None) -> _Item:
        if self._closed:
            raise Draining("the server has stopped")
        item = _Item(key, payload, asyncio.get_running_loop().create_future(), time.monotonic(), deadline)
        self._queues.setdefault(key, collections.deque()).append(item)
        self._queued += 1
        self.observer.queue_changed(self._queued)
        self._wakeup.set()
        return item

    async def _wait(self, item: _Item) -> R:
        try:
            if item.deadline is None:
                return await item.future
            return await asyncio.wait_for(item.future, max(0.0, item.deadline - time.monotonic()))
        except asyncio.TimeoutError:
            self._drop(item, "deadline")
            raise DeadlineExceeded("the deadline passed before the result was ready") from None
        except asyncio.CancelledError:
            self._drop(item, "cancelled")  # the caller went away: never run it
            raise

    def _drop(self, item: _Item, reason: str) -> None:
        if item.state != "queued":
            return  # already running or done: its result is simply not used
        item.state = "dropped"
        self._queues[item.key].remove(item)
        self._queued -= 1
        self.stats.dropped[reason] += 1
        self.observer.dropped(reason)
        self.observer.queue_changed(self._queued)
        if not item.future.done():
            item.future.set_exception(DeadlineExceeded("the deadline passed before the item ran"))
            item.future.exception()  # retrieved: nobody else awaits it

    # ------------------------------------------------------------------------------ dispatch
    def _next_batch(self, now: float) -> tuple[K, list[_Item]] | float | None:
        """The batch to run now, or the seconds until one may be due (``None``: nothing queued)."""
        for queue in self._queues.values():  # deadlines that passed while waiting
            for item in [i for i in queue if i.deadline is not None and i.deadline <= now]:
                self._drop(item, "deadline")
        best, wake = None, None
        for key, queue in self._queues.items():
            if not queue:
                continue
            head = queue[0].enqueued
            due = head + self.batch_wait_timeout_s
            if len(queue) >= self._max(key) or due <= now or self._draining:
                if best is None or head < self._queues[best][0].enqueued:
                    best = key
            else:
                wake = due - now if wake is None else min(wake, due - now)
        if best is None:
            return wake
        queue = self._queues[best]
        items = [queue.popleft() for _ in range(min(len(queue), self._max(best)))]
        self._queued -= len(items)
        self.observer.queue_changed(self._queued)
        return best, items

    async def _dispatch(self) -> None:
        while True:
            if self._closed:
                return
            now = time.monotonic()
            batch = self._next_batch(now)
            if not isinstance(batch, tuple):
                self._wakeup.clear()
                try:
                    await asyncio.wait_for(self._wakeup.wait(), batch)
                except asyncio.TimeoutError:
                    pass
                continue
            key, items = batch
            for item in items:
                item.state = "running"
            self._running = len(items)
            waits = [now - item.enqueued for item in items]
            bucket = next(size for size in self.batch_sizes(key) if size >= len(items))
            start = time.monotonic()
            try:
                results = await self.run_on_device(self._run_checked, key, [i.payload for i in items], bucket)
            except Exception as error:  # noqa: BLE001 - the batch's items fail; the batcher goes on
                for item in items:
                    self._resolve(item, error=error)
            else:
                for item, result in zip(items, results):
                    self._resolve(item, result=result)
            finally:
                self._running = 0
            seconds = time.monotonic() - start
            self._batch_seconds = seconds if self._batch_seconds is None else 0.8 * self._batch_seconds + 0.2 * seconds
            self._batch_items = 0.8 * self._batch_items + 0.2 * len(items)
            self.stats.batches[(key, len(items), bucket)] += 1
            self.stats.items_run += len(items)
            self.observer.batch_done(key, len(items), bucket, waits, seconds)

    def _run_checked(self, key: K, payloads: list[P], bucket: int) -> Sequence[R]:
        self.stats.device_threads.add(threading.get_ident())
        results = self._run_batch(key, payloads, bucket)
        if len(results) != len(payloads):
            raise RuntimeError(f"run_batch returned {len(results)} results for {len(payloads)} items")
        return results

    @staticmethod
    def _resolve(item: _Item, *, result: Any = None, error: BaseException | None = None) -> None:
        item.state = "done"
        if item.future.done():  # cancelled by its caller meanwhile
            return
        if error is not None:
            item.future.set_exception(error)
        else:
            item.future.set_result(result)


class Reservation(Generic[K, P, R]):
    """Queue slots taken by :meth:`Batcher.reserve`; each :meth:`submit` uses one. Use it as a context
    manager (or call :meth:`release`) so that slots a failed request never used are given back."""

    def __init__(self, batcher: Batcher[K, P, R], count: int):
        self._batcher, self.remaining = batcher, count

    async def submit(self, key: K, payload: P, *, deadline: float | None = None) -> R:
        """Queue one item on a reserved slot and wait for its result (see :meth:`Batcher.submit`)."""
        if self.remaining < 1:
            raise RuntimeError("this reservation has no slot left")
        self.remaining -= 1
        self._batcher._reserved -= 1
        return await self._batcher._wait(self._batcher._enqueue(key, payload, deadline))

    def release(self) -> None:
        self._batcher._reserved -= self.remaining
        self.remaining = 0

    def __enter__(self) -> "Reservation[K, P, R]":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()
