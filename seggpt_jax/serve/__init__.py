"""Serving: ``seggpt-jax serve``, an HTTP service with dynamic batching (the ``serve`` extra).

* :mod:`seggpt_jax.serve.batcher`: the dynamic batcher, plain asyncio, no HTTP and no model (a Ray
  Serve deployment can wrap it);
* :mod:`seggpt_jax.serve.engine`: uploads -> model inputs -> batches -> mask PNGs, through the
  :class:`~seggpt_jax.Segmenter`'s step methods;
* :mod:`seggpt_jax.serve.app`: the FastAPI app (routes, errors, metrics, the demo page);
* :mod:`seggpt_jax.serve.server`: uvicorn, the socket, and the drain on SIGTERM.

Importing this package loads none of fastapi, uvicorn or prometheus_client; only ``app``, ``metrics``
and ``server`` do.
"""

from .batcher import Batcher, BatchObserver, DeadlineExceeded, Draining, NotReady, QueueFull, bucket_sizes

__all__ = ["BatchObserver", "Batcher", "DeadlineExceeded", "Draining", "NotReady", "QueueFull", "bucket_sizes"]
