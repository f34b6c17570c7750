"""A prefetching loader: training batches built on threads ahead of the step that needs them."""

from __future__ import annotations

import concurrent.futures
from collections.abc import Callable, Iterator
from typing import Any


class Prefetcher:
    """``make(step)`` for ``step`` in ``range(start, stop)``, computed ``depth`` steps ahead on threads
    (Pillow decoding and resizing release the GIL), yielded in order."""

    def __init__(self, make: Callable[[int], Any], start: int, stop: int, depth: int = 2, workers: int = 2):
        self.make, self.start, self.stop, self.depth, self.workers = make, start, stop, depth, workers

    def __iter__(self) -> Iterator[Any]:
        with concurrent.futures.ThreadPoolExecutor(self.workers) as pool:
            pending = {}
            for step in range(self.start, min(self.stop, self.start + self.depth)):
                pending[step] = pool.submit(self.make, step)
            for step in range(self.start, self.stop):
                result = pending.pop(step).result()
                ahead = step + self.depth
                if ahead < self.stop:
                    pending[ahead] = pool.submit(self.make, ahead)
                yield result
