"""The dynamic batcher on its own (plain asyncio, a recording fake for the device), and the service's
warming-up state in process (a model load that waits for the test)."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from seggpt_jax.serve.batcher import (Batcher, DeadlineExceeded, Draining, NotReady, QueueFull, bucket_sizes)


class Device:
    """A fake device: records every batch (key, payloads, bucket, thread) and answers ``(key, payload)``;
    ``hold()`` makes it wait until ``release()``."""

    def __init__(self):
        self.calls: list[tuple] = []
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()

    def hold(self) -> None:
        self.gate.clear()
        self.entered.clear()

    def release(self) -> None:
        self.gate.set()

    def __call__(self, key, payloads, bucket):
        self.entered.set()
        self.gate.wait(30)
        self.calls.append((key, list(payloads), bucket, threading.get_ident(), time.monotonic()))
        if any(p == "boom" for p in payloads):
            raise RuntimeError("device failure")
        return [(key, p) for p in payloads]


def make(device: Device, *, max_batch=4, wait=0.0, queue=64, sizes=None) -> Batcher:
    return Batcher(device, max_batch_size=max_batch, batch_wait_timeout_s=wait, max_queue_size=queue,
                   batch_sizes=sizes)


async def started(batcher: Batcher, device: Device, keys=("a",)) -> Batcher:
    await batcher.warm_up(keys, lambda key: "warm-up")
    device.calls.clear()
    return batcher


async def wait_entered(device: Device) -> None:
    while not device.entered.is_set():
        await asyncio.sleep(0.005)


def test_bucket_sizes():
    assert bucket_sizes(1) == (1,)
    assert bucket_sizes(4) == (1, 2, 4)
    assert bucket_sizes(10) == (1, 2, 4, 8, 10)
    assert bucket_sizes(32) == (1, 2, 4, 8, 16, 32)
    with pytest.raises(ValueError):
        bucket_sizes(0)


def test_batches_one_key_each_padded_to_the_nearest_bucket():
    device = Device()

    async def main():
        batcher = await started(make(device, max_batch=4, wait=0.3), device, keys=("a", "b"))
        device.hold()  # the first batch waits on the device while the rest queue up
        first = asyncio.ensure_future(batcher.submit("a", 0))
        await wait_entered(device)
        tasks = [asyncio.ensure_future(batcher.submit("a", i)) for i in range(1, 7)]
        tasks += [asyncio.ensure_future(batcher.submit("b", i)) for i in range(3)]
        await asyncio.sleep(0)
        device.release()
        results = await asyncio.gather(first, *tasks)
        return batcher, results

    batcher, results = asyncio.run(main())
    assert results == [("a", 0)] + [("a", i) for i in range(1, 7)] + [("b", i) for i in range(3)]
    batches = [(key, payloads, bucket) for key, payloads, bucket, _, _ in device.calls]
    assert batches[0] == ("a", [0], 1)
    assert batches[1] == ("a", [1, 2, 3, 4], 4)  # full: runs without waiting
    assert sorted(batches[2:]) == [("a", [5, 6], 2), ("b", [0, 1, 2], 4)]  # 3 items padded to 4
    for key, payloads, bucket, _, _ in device.calls:
        assert len(payloads) <= bucket and bucket in bucket_sizes(4)
    assert batcher.stats.items_run == 10


def test_warm_up_runs_every_bucket_of_every_key_before_ready():
    device = Device()

    async def main():
        batcher = make(device, max_batch=lambda key: 8 // key, queue=8)
        with pytest.raises(NotReady):
            batcher.reserve(1)
        assert not batcher.ready
        await batcher.warm_up([1, 2, 4], lambda key: f"zeros-{key}")
        assert batcher.ready
        return batcher

    batcher = asyncio.run(main())
    warmed = {(key, bucket) for key, _, bucket, _, _ in device.calls}
    assert warmed == {(1, 1), (1, 2), (1, 4), (1, 8), (2, 1), (2, 2), (2, 4), (4, 1), (4, 2)}
    assert all(len(payloads) == 1 for _, payloads, _, _, _ in device.calls)


def test_waits_for_a_fuller_batch_at_most_max_wait():
    device = Device()

    async def main():
        batcher = await started(make(device, max_batch=4, wait=1.0), device)
        start = time.monotonic()
        one = asyncio.ensure_future(batcher.submit("a", 1))
        await asyncio.sleep(0.05)
        two = asyncio.ensure_future(batcher.submit("a", 2))
        await asyncio.gather(one, two)
        return start

    start = asyncio.run(main())
    ((_, payloads, bucket, _, ran),) = device.calls
    assert payloads == [1, 2] and bucket == 2  # the second joined the first's batch
    assert ran - start >= 1.0  # not full: it waited the whole max_wait for more


def test_no_wait_runs_at_once_alone():
    device = Device()

    async def main():
        batcher = await started(make(device, max_batch=4, wait=0.0), device)
        return await batcher.submit("a", 1)

    assert asyncio.run(main()) == ("a", 1)
    assert [(p, b) for _, p, b, _, _ in device.calls] == [([1], 1)]


def test_queue_full_raises_with_retry_after_and_frees_on_release():
    device = Device()

    async def main():
        batcher = await started(make(device, max_batch=1, queue=3), device)
        device.hold()
        running = asyncio.ensure_future(batcher.submit("a", 0))
        await wait_entered(device)  # on the device: no longer in the queue
        reservation = batcher.reserve(2)
        queued = asyncio.ensure_future(batcher.submit("a", 1))
        await asyncio.sleep(0)
        assert batcher.pending == 3
        with pytest.raises(QueueFull) as full:
            batcher.reserve(1)
        assert full.value.retry_after >= 1
        reservation.release()  # the request failed before it used its slots
        assert batcher.pending == 1
        batcher.reserve(2).release()
        with pytest.raises(ValueError, match="never fit"):
            batcher.reserve(4)
        device.release()
        return await asyncio.gather(running, queued)

    assert asyncio.run(main()) == [("a", 0), ("a", 1)]


def test_cancelled_and_expired_items_never_reach_the_device():
    device = Device()

    async def main():
        batcher = await started(make(device, max_batch=1), device)
        device.hold()
        running = asyncio.ensure_future(batcher.submit("a", "first"))
        await wait_entered(device)
        gone = asyncio.ensure_future(batcher.submit("a", "client-gone"))
        late = asyncio.ensure_future(batcher.submit("a", "late", deadline=time.monotonic() + 0.05))
        kept = asyncio.ensure_future(batcher.submit("a", "kept"))
        await asyncio.sleep(0.01)
        gone.cancel()
        with pytest.raises(DeadlineExceeded):
            await late
        assert batcher.queue_depth == 1
        device.release()
        with pytest.raises(asyncio.CancelledError):
            await gone
        return batcher, await asyncio.gather(running, kept)

    batcher, results = asyncio.run(main())
    assert results == [("a", "first"), ("a", "kept")]
    assert [p for _, p, _, _, _ in device.calls] == [["first"], ["kept"]]
    assert batcher.stats.dropped == {"cancelled": 1, "deadline": 1}


def test_a_failing_batch_fails_its_items_only():
    device = Device()

    async def main():
        batcher = await started(make(device, max_batch=2, wait=0.2), device)
        bad = [asyncio.ensure_future(batcher.submit("a", p)) for p in ("boom", "neighbour")]
        results = await asyncio.gather(*bad, return_exceptions=True)
        return results, await batcher.submit("a", "after")

    results, after = asyncio.run(main())
    assert all(isinstance(r, RuntimeError) for r in results)
    assert after == ("a", "after")


def test_drain_refuses_new_items_and_flushes_the_queue_at_once():
    device = Device()

    async def main():
        batcher = await started(make(device, max_batch=8, wait=60.0), device)
        waiting = [asyncio.ensure_future(batcher.submit("a", i)) for i in range(3)]
        await asyncio.sleep(0.01)
        assert batcher.queue_depth == 3  # waiting for a fuller batch (up to 60 s)
        batcher.begin_drain()
        with pytest.raises(Draining):
            batcher.reserve(1)
        results = await asyncio.wait_for(asyncio.gather(*waiting), 10)
        await batcher.wait_idle()
        await batcher.close()
        return results

    assert asyncio.run(main()) == [("a", 0), ("a", 1), ("a", 2)]
    assert [(p, b) for _, p, b, _, _ in device.calls] == [([0, 1, 2], 4)]


def test_every_batch_runs_on_one_thread_that_is_not_the_event_loop():
    device = Device()

    async def main():
        batcher = await started(make(device, max_batch=2, wait=0.01), device, keys=("a", "b"))
        await asyncio.gather(*(batcher.submit("ab"[i % 2], i) for i in range(12)))
        return batcher

    batcher = asyncio.run(main())
    threads = {thread for _, _, _, thread, _ in device.calls}
    assert len(threads) == 1 and threading.get_ident() not in threads
    assert batcher.stats.device_threads == threads


# ------------------------------------------------------------------------------------ the service, warming up
def test_service_answers_probes_while_warming_up_and_refuses_work_with_503():
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from seggpt_jax.serve.app import create_app
    from seggpt_jax.serve.engine import Engine, ServeSettings

    loading = threading.Event()
    go_on = threading.Event()

    def load():
        loading.set()
        go_on.wait(30)
        raise OSError("no such checkpoint: /nowhere")

    failures = []
    engine = Engine(ServeSettings(model="/nowhere"), load)
    app = create_app(engine, on_failure=failures.append)
    files = {"query": ("q.png", b"\x89PNG", "image/png")}
    with TestClient(app) as client:
        assert loading.wait(30)
        assert client.get("/healthz").json() == {"status": "alive"}
        ready = client.get("/readyz")
        assert ready.status_code == 503 and ready.json()["detail"] == "warming up: loading the model"
        work = client.post("/v1/segment", files=files)
        assert work.status_code == 503 and work.headers["retry-after"] == "5"
        assert work.json() == {"detail": "warming up: loading the model"}
        go_on.set()
        for _ in range(300):
            if failures:
                break
            time.sleep(0.05)
        assert failures == ["no such checkpoint: /nowhere"]
        failed = client.post("/v1/segment", files=files)
        assert failed.status_code == 503
        assert failed.json()["detail"] == "the model failed to load: no such checkpoint: /nowhere"
        metrics = client.get("/metrics").text
    assert 'seggpt_rejections_total{reason="warming_up"} 2.0' in metrics
