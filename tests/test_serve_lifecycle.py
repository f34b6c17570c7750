"""The service under pressure, as a real process: a full queue (429), a deadline (504), a client that
goes away (dropped before the device), and SIGTERM during load (in-flight requests finish, new ones get
503, exit 0). The server waits 3 s for fuller batches and queues 2 queries, so these states last long
enough to be observed without racing."""

from __future__ import annotations

import concurrent.futures
import io
import socket
import time
import urllib.parse

import httpx
import numpy as np
import pytest
from PIL import Image

from benchmarks.serve_load import scrape
from seggpt_jax import Segmenter
from seggpt_jax_testing.serving import ServerProcess, session_cache, session_checkpoint

WAIT_S = 3.0  # --max-wait-ms: a query that is alone waits this long for company


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return session_checkpoint(tmp_path_factory)


@pytest.fixture(scope="module")
def server(checkpoint, tmp_path_factory):
    log = tmp_path_factory.mktemp("serve-lifecycle") / "server.log"
    process = ServerProcess(checkpoint, str(log), "--max-batch", "4", "--max-wait-ms", str(int(WAIT_S * 1000)),
                            "--max-queue", "2", "--max-prompts", "1", "--request-timeout-s", "30",
                            "--compilation-cache", session_cache(tmp_path_factory), "--log-level", "warning")
    process.start()
    yield process
    process.stop()  # the last test stops it already


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("serve-lifecycle-files")
    rng = np.random.default_rng(3)
    paths = {}
    for i in range(3):
        paths[f"query{i}"] = str(folder / f"query{i}.png")
        Image.fromarray(rng.integers(0, 256, (30 + 7 * i, 40, 3), dtype=np.uint8)).save(paths[f"query{i}"])
    paths["prompt"], paths["mask"] = str(folder / "prompt.png"), str(folder / "mask.png")
    Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(paths["prompt"])
    mask = np.zeros((32, 32), np.uint8)
    mask[8:24, 4:20] = 255
    Image.fromarray(mask).save(paths["mask"])
    return paths


def form(inputs, query: str) -> list:
    def upload(path):
        with open(path, "rb") as f:
            return path.rsplit("/", 1)[1], f.read(), "image/png"

    return [("query", upload(inputs[query])), ("prompt_image", upload(inputs["prompt"])),
            ("prompt_mask", upload(inputs["mask"]))]


def segment(url, inputs, query, **data) -> httpx.Response:
    return httpx.post(f"{url}/v1/segment", files=form(inputs, query), data=data, headers={"Accept": "image/png"},
                      timeout=60)


def pending(url) -> int:
    return httpx.get(f"{url}/v1/info", timeout=10).json()["queue"]["pending"]


def wait_until(condition, timeout=20.0, what="the condition"):
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def one_line(reply: httpx.Response, status: int, *words: str) -> None:
    assert reply.status_code == status, (reply.status_code, reply.text)
    detail = reply.json()["detail"]
    assert "\n" not in detail
    for word in words:
        assert word in detail, (word, detail)


def check_answer(reply: httpx.Response, segmenter: Segmenter, inputs, query: str) -> None:
    assert reply.status_code == 200, reply.text
    want = segmenter.segment(inputs[query], prompts=(inputs["prompt"], inputs["mask"])).mask
    got = np.asarray(Image.open(io.BytesIO(reply.content)))
    np.testing.assert_array_equal(got, want.astype(np.uint8) * 255)


@pytest.fixture(scope="module")
def segmenter(checkpoint):
    return Segmenter.from_pretrained(checkpoint)


def raw_request(url: str, inputs, query: str) -> tuple[socket.socket, bytes, bytes]:
    """A connected socket, and the head and body of a segment request (to send in parts, or to abandon)."""
    request = httpx.Request("POST", f"{url}/v1/segment", files=form(inputs, query))
    body = request.read()
    parts = urllib.parse.urlsplit(url)
    head = (f"POST /v1/segment HTTP/1.1\r\nHost: {parts.netloc}\r\nContent-Type: {request.headers['content-type']}\r\n"
            f"Content-Length: {len(body)}\r\nAccept: application/json\r\nConnection: close\r\n\r\n").encode()
    sock = socket.create_connection((parts.hostname, parts.port), timeout=30)
    return sock, head, body


def read_status(sock: socket.socket) -> tuple[int, bytes]:
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return int(data.split(b" ", 2)[1]), data


def test_queue_full_gets_429_with_retry_after_while_queued_requests_succeed(server, inputs, segmenter):
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        queued = [pool.submit(segment, server.url, inputs, f"query{i}") for i in range(2)]
        wait_until(lambda: pending(server.url) == 2, what="two queued queries")
        refused = segment(server.url, inputs, "query2")
        one_line(refused, 429, "queue is full", "2 of 2")
        assert int(refused.headers["retry-after"]) >= 1
        assert httpx.get(f"{server.url}/healthz").status_code == 200  # other clients are served meanwhile
        for i, future in enumerate(queued):
            check_answer(future.result(), segmenter, inputs, f"query{i}")
    assert scrape(server.url)[("seggpt_rejections_total", (("reason", "queue_full"),))] == 1


def test_deadline_gets_504_and_the_query_never_runs(server, inputs):
    before = scrape(server.url)
    late = segment(server.url, inputs, "query0", timeout_s="0.3")  # it would wait WAIT_S for a fuller batch
    one_line(late, 504, "deadline")
    wait_until(lambda: pending(server.url) == 0, what="an empty queue")
    time.sleep(WAIT_S + 0.5)  # when it would have run, had it not been dropped
    after = scrape(server.url)
    assert after[("seggpt_batch_size_count", ())] == before[("seggpt_batch_size_count", ())]
    assert after[("seggpt_rejections_total", (("reason", "deadline"),))] == 1


def test_a_client_that_goes_away_is_dropped_before_the_device(server, inputs, segmenter):
    before = scrape(server.url)
    sock, head, body = raw_request(server.url, inputs, "query1")
    sock.sendall(head + body)
    wait_until(lambda: httpx.get(f"{server.url}/v1/info").json()["queue"]["depth"] == 1, what="the query queued")
    sock.close()  # the client goes away while its query waits for a batch
    wait_until(lambda: scrape(server.url)[("seggpt_rejections_total", (("reason", "client_gone"),))] == 1,
               what="the server noticing the disconnect")
    assert pending(server.url) == 0
    time.sleep(WAIT_S + 0.5)
    after = scrape(server.url)
    assert after[("seggpt_batch_size_count", ())] == before[("seggpt_batch_size_count", ())]  # never ran
    check_answer(segment(server.url, inputs, "query1"), segmenter, inputs, "query1")  # the next client is served


def test_sigterm_finishes_in_flight_refuses_new_and_exits_0(server, inputs, segmenter):
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        in_flight = [pool.submit(segment, server.url, inputs, f"query{i}") for i in range(2)]
        wait_until(lambda: pending(server.url) == 2, what="two queued queries")
        slow, head, body = raw_request(server.url, inputs, "query2")  # a request whose body is still arriving
        slow.sendall(head + body[:100])
        time.sleep(0.2)
        server.terminate()
        wait_until(lambda: httpx.get(f"{server.url}/readyz").status_code == 503, what="the drain")
        one_line(httpx.get(f"{server.url}/readyz"), 503, "shutting down")
        one_line(segment(server.url, inputs, "query0"), 503, "shutting down")
        for i, future in enumerate(in_flight):
            check_answer(future.result(), segmenter, inputs, f"query{i}")
        slow.sendall(body[100:])  # admitted after the drain began: refused too
        status, reply = read_status(slow)
        slow.close()
        assert status == 503 and b"shutting down" in reply
    assert server.wait(60) == 0, server.text()[-3000:]
    assert "drained" in server.text()
