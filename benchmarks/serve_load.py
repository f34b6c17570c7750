"""Load test of a running ``seggpt-jax serve`` on this machine: throughput, latency, batching, and every
answer checked against ``Segmenter``.

    seggpt-jax serve MODEL --port 8000 &                        # the server under test
    python -m benchmarks.serve_load --url http://127.0.0.1:8000 --model MODEL --clients 4 --requests 16

    python -m benchmarks.serve_load --make-checkpoint vit-large  # a random-weight ViT-L to serve, once

Loopback only, and bounded: ``--requests`` good requests (a mix of binary, semantic, two-prompt and
registered-prompt requests, one query each), sent first one at a time and then by ``--clients``
concurrent clients with a bad request (undecodable image, count mismatch, wrong media type, unknown
prompt id) after every ``--bad-every`` good ones; nothing runs past ``--max-seconds``. A 429 is
retried after its Retry-After (and counted).

``Segmenter`` (``--model``, the server's checkpoint) is loaded here too. In the one-at-a-time phase
each request is also answered directly, back to back with the service (so both see the same machine
load): ``service_overhead_ms`` is what the service adds to a direct call. Every answer of both phases
is compared with the direct one: ``wrong`` counts answers that differ, ``lost`` good requests that got
none. Also reported: throughput of both phases, p50/p95/p99 latency, the batch-size distribution and
rejections (from ``/metrics``), compiles after ready, and the server's RSS at the start and the end.
``--json FILE`` writes the report.
"""

from __future__ import annotations

import argparse
import base64
import concurrent.futures
import dataclasses
import datetime
import io
import ipaddress
import json
import os
import platform
import queue
import socket
import statistics
import sys
import tempfile
import threading
import time
import urllib.parse

import httpx
import numpy as np
from PIL import Image

GOOD_KINDS = ("binary", "semantic", "two-prompts", "registered")
BAD_KINDS = {"undecodable": 400, "count-mismatch": 422, "media-type": 415, "unknown-prompt": 404}


@dataclasses.dataclass
class Request:
    index: int
    kind: str
    query: str | None = None
    prompts: list = dataclasses.field(default_factory=list)
    num_labels: int | None = None
    prompt_id: str | None = None
    expect: int = 200


@dataclasses.dataclass
class Outcome:
    status: int | None
    seconds: float
    mask: np.ndarray | None = None
    retries: int = 0
    error: str | None = None


def check_loopback(url: str) -> None:
    host = urllib.parse.urlsplit(url).hostname or ""
    try:
        addresses = {info[4][0] for info in socket.getaddrinfo(host, None)}
    except socket.gaierror:
        raise SystemExit(f"serve_load: cannot resolve {host!r}") from None
    if not all(ipaddress.ip_address(a.split("%")[0]).is_loopback for a in addresses):
        raise SystemExit(f"serve_load: {url} is not a loopback address; this load test only targets this machine")


def write_inputs(folder: str, count: int, size: int, seed: int) -> dict[str, list[str]]:
    """Queries of mixed sizes around ``size``, prompt images, binary and class-id masks, a broken file."""
    rng = np.random.default_rng(seed)
    out = {"queries": [], "prompts": [], "binary": [], "classes": []}

    def save(kind, name, array, mode=None):
        path = os.path.join(folder, name)
        Image.fromarray(array, mode=mode).save(path)
        out[kind].append(path)

    for i in range(count):
        h, w = (int(size * s) for s in rng.uniform(0.6, 1.4, 2))
        save("queries", f"query{i}.png", rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
    for i in range(2):
        save("prompts", f"prompt{i}.png", rng.integers(0, 256, (size, size, 3), dtype=np.uint8))
        mask = np.zeros((size, size), np.uint8)
        mask[size // 5:size // 2 + 5 * i, size // 4:(3 * size) // 4] = 255
        save("binary", f"binary{i}.png", mask, "L")
        save("classes", f"classes{i}.png", rng.integers(0, 4, (size, size), dtype=np.uint8), "L")
    out["junk"] = [os.path.join(folder, "junk.png")]
    with open(out["junk"][0], "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n truncated")
    return out


def _file(path: str) -> tuple[str, bytes, str]:
    with open(path, "rb") as f:
        return os.path.basename(path), f.read(), "image/png"


def send(client: httpx.Client, url: str, request: Request, deadline: float) -> Outcome:
    """One request (retried after a 429's Retry-After while time is left)."""
    retries = 0
    while True:
        start = time.perf_counter()
        timeout = max(1.0, deadline - time.monotonic())
        try:
            if request.kind == "media-type":
                reply = client.post(f"{url}/v1/segment", json={"query": "street.jpg"}, timeout=timeout)
            else:
                form = [("query", _file(request.query))] if request.query else []
                for image, mask in request.prompts if request.prompt_id is None else ():  # (kept for the reference)
                    form.append(("prompt_image", _file(image)))
                    if mask is not None:
                        form.append(("prompt_mask", _file(mask)))
                data = {}
                if request.num_labels is not None:
                    data["num_labels"] = str(request.num_labels)
                if request.prompt_id is not None:
                    data["prompt_id"] = request.prompt_id
                reply = client.post(f"{url}/v1/segment", files=form, data=data, timeout=timeout,
                                     headers={"Accept": "application/json"})
        except httpx.HTTPError as e:
            return Outcome(None, time.perf_counter() - start, retries=retries, error=f"{type(e).__name__}: {e}")
        seconds = time.perf_counter() - start
        if reply.status_code == 429 and time.monotonic() < deadline:
            retries += 1
            time.sleep(min(float(reply.headers.get("retry-after", "1")), max(0.0, deadline - time.monotonic())))
            continue
        mask = None
        if reply.status_code == 200:
            entry = reply.json()["masks"][0]
            mask = np.asarray(Image.open(io.BytesIO(base64.b64decode(entry["png_base64"]))))
        return Outcome(reply.status_code, seconds, mask, retries,
                       None if reply.status_code == 200 else reply.text[:300])


def run_phase(url: str, requests: list[Request], clients: int, deadline: float) -> tuple[dict[int, Outcome], float]:
    """Send ``requests`` with ``clients`` concurrent clients (1: one at a time, in order)."""
    work: queue.Queue = queue.Queue()
    for request in requests:
        work.put(request)
    outcomes: dict[int, Outcome] = {}
    lock = threading.Lock()

    def client_loop() -> None:
        with httpx.Client() as client:
            while time.monotonic() < deadline:
                try:
                    request = work.get_nowait()
                except queue.Empty:
                    return
                outcome = send(client, url, request, deadline)
                with lock:
                    outcomes[request.index] = outcome

    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        for future in [pool.submit(client_loop) for _ in range(clients)]:
            future.result()
    return outcomes, time.perf_counter() - start


def scrape(url: str) -> dict[tuple[str, tuple], float]:
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"{url}/metrics", timeout=30).text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def batch_distribution(before: dict, after: dict) -> dict[str, int]:
    """Batches by size range, from the ``seggpt_batch_size`` histogram's cumulative buckets."""
    bounds = sorted(float(dict(labels)["le"]) for name, labels in after if name == "seggpt_batch_size_bucket")
    out, previous_bound, previous_count = {}, 0, 0.0
    for bound in bounds:
        key = ("seggpt_batch_size_bucket", (("le", "+Inf" if bound == float("inf") else str(bound)),))
        count = after.get(key, 0) - before.get(key, 0)
        if count - previous_count:
            low, high = int(previous_bound) + 1, bound
            label = str(low) if high == low else (f"{low}+" if high == float("inf") else f"{low}-{int(high)}")
            out[label] = int(count - previous_count)
        previous_bound, previous_count = bound, count
    return out


def latency_summary(outcomes: list[Outcome], seconds: float) -> dict:
    ok = [o.seconds for o in outcomes if o.status == 200]
    quantiles = statistics.quantiles(ok, n=100, method="inclusive") if len(ok) > 1 else ok * 99
    return {"ok": len(ok), "seconds": round(seconds, 3), "requests_per_s": round(len(ok) / seconds, 4) if seconds else 0,
            "p50_s": round(quantiles[49], 3) if ok else None, "p95_s": round(quantiles[94], 3) if ok else None,
            "p99_s": round(quantiles[98], 3) if ok else None}


def build_requests(url: str, inputs: dict, count: int, max_prompts: int, bad_every: int) -> tuple[list, list]:
    pair = [(inputs["prompts"][0], inputs["binary"][0])]
    two = [(inputs["prompts"][i], inputs["binary"][i]) for i in range(2)]
    reply = httpx.post(f"{url}/v1/prompts", files=[("prompt_image", _file(two[0][0])), ("prompt_mask", _file(two[0][1])),
                                                    ("prompt_image", _file(two[1][0])), ("prompt_mask", _file(two[1][1]))]
                       if max_prompts >= 2 else [("prompt_image", _file(pair[0][0])),
                                                 ("prompt_mask", _file(pair[0][1]))], timeout=120)
    reply.raise_for_status()
    prompt_id = reply.json()["prompt_id"]
    kinds = [k for k in GOOD_KINDS if max_prompts >= 2 or k != "two-prompts"]
    good = []
    for i in range(count):
        kind, query = kinds[i % len(kinds)], inputs["queries"][i % len(inputs["queries"])]
        if kind == "binary":
            good.append(Request(i, kind, query, pair))
        elif kind == "semantic":
            good.append(Request(i, kind, query, [(inputs["prompts"][1], inputs["classes"][1])], num_labels=3))
        elif kind == "two-prompts":
            good.append(Request(i, kind, query, two))
        else:
            good.append(Request(i, kind, query, two if max_prompts >= 2 else pair, prompt_id=prompt_id))
    bad = []
    for j in range(count // bad_every if bad_every else 0):
        kind = list(BAD_KINDS)[j % len(BAD_KINDS)]
        index = count + j
        if kind == "undecodable":
            bad.append(Request(index, kind, inputs["junk"][0], pair, expect=400))
        elif kind == "count-mismatch":
            bad.append(Request(index, kind, inputs["queries"][0], pair + [(inputs["prompts"][1], None)], expect=422))
        elif kind == "media-type":
            bad.append(Request(index, kind, expect=415))
        else:
            bad.append(Request(index, kind, inputs["queries"][0], prompt_id="0" * 32, expect=404))
    return good, bad


class Reference:
    """``Segmenter`` on the same checkpoint, in this process: the answer each good request must get, and
    the time of each direct call (one untimed call per prompt count first, which compiles)."""

    def __init__(self, model: str, good: list[Request]):
        from seggpt_jax import Segmenter

        self.segmenter = Segmenter.from_pretrained(model)
        for count in sorted({len(r.prompts) for r in good}):
            self.answer(next(r for r in good if len(r.prompts) == count))

    def answer(self, request: Request) -> np.ndarray:
        """The mask as the API encodes it: 0/255 in binary mode, class ids in semantic mode."""
        result = self.segmenter.segment(request.query, prompts=[tuple(p) for p in request.prompts],
                                        num_labels=request.num_labels)
        return result.mask.astype(np.uint8) * (255 if request.num_labels is None else 1)

    def timed(self, request: Request) -> tuple[np.ndarray, float]:
        start = time.perf_counter()
        mask = self.answer(request)
        return mask, time.perf_counter() - start


def sequential_phase(url: str, good: list[Request], reference: Reference, deadline: float):
    """Each good request once through the service and once directly, back to back (alternating which
    goes first), so that both see the same machine load: their difference is what the service adds."""
    outcomes, answers, direct = {}, {}, {}
    seconds = 0.0
    with httpx.Client() as client:
        for request in good:
            if time.monotonic() > deadline:
                break
            if request.index % 2:
                answers[request.index], direct[request.index] = reference.timed(request)
            outcomes[request.index] = send(client, url, request, deadline)
            seconds += outcomes[request.index].seconds
            if not request.index % 2:
                answers[request.index], direct[request.index] = reference.timed(request)
    return outcomes, seconds, answers, direct


def serving_checkpoint(kind: str) -> str:
    """A random-weight ViT-L written by transformers, with masks that are neither empty nor full
    (``seggpt_jax_testing.serving.write_serving_checkpoint``), created once in benchmarks/.cache."""
    from benchmarks.segment_cli import CACHE
    from seggpt_jax_testing.serving import HFConfig, write_serving_checkpoint

    if kind != "vit-large":
        raise SystemExit(f"serve_load: unknown checkpoint kind {kind!r}")
    folder = os.path.join(CACHE, "vit-large-serving")
    if not os.path.isfile(os.path.join(folder, "model.safetensors")):
        write_serving_checkpoint(folder, config=HFConfig(), samples=1)
    return folder


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="the server (loopback only)")
    parser.add_argument("--model", help="the server's checkpoint, for the Segmenter answers")
    parser.add_argument("--make-checkpoint", choices=["vit-large"],
                        help="only write (once) a random-weight ViT-L whose masks have content, print its folder")
    parser.add_argument("--clients", type=int, default=4, help="concurrent clients in the second phase")
    parser.add_argument("--requests", type=int, default=16, help="good requests per phase (one query each)")
    parser.add_argument("--bad-every", type=int, default=4, help="a bad request after every N good ones (0: none)")
    parser.add_argument("--max-seconds", type=float, default=900, help="nothing runs past this")
    parser.add_argument("--image-size", type=int, default=64, help="typical query side in pixels")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="write the report here")
    args = parser.parse_args(argv)
    if args.make_checkpoint:
        folder = serving_checkpoint(args.make_checkpoint)
        print(folder)
        return {"checkpoint": folder}
    if not args.model:
        parser.error("--model is required (the checkpoint the server runs)")
    url = args.url.rstrip("/")
    check_loopback(url)
    deadline = time.monotonic() + args.max_seconds
    while True:  # bounded wait for readiness
        try:
            if httpx.get(f"{url}/readyz", timeout=10).status_code == 200:
                break
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            raise SystemExit(f"serve_load: {url} was not ready within --max-seconds")
        time.sleep(0.5)
    info = httpx.get(f"{url}/v1/info", timeout=30).json()
    with tempfile.TemporaryDirectory() as folder:
        inputs = write_inputs(folder, min(args.requests, 24), args.image_size, args.seed)
        good, bad = build_requests(url, inputs, args.requests, info["max_prompts"], args.bad_every)
        reference = Reference(args.model, good)
        start_metrics = scrape(url)
        sequential, sequential_s, answers, direct = sequential_phase(url, good, reference, deadline)
        mixed = []
        for request in good:
            mixed.append(request)
            if args.bad_every and (request.index + 1) % args.bad_every == 0 and bad:
                mixed.append(bad[(request.index + 1) // args.bad_every - 1])
        before = scrape(url)
        concurrent_out, concurrent_s = run_phase(url, mixed, args.clients, deadline)
        after = scrape(url)
        for request in good:  # answers the time limit left out
            answers.setdefault(request.index, reference.answer(request))
    wrong = lost = 0
    for phase in (sequential, concurrent_out):
        for request in good:
            outcome = phase.get(request.index)
            if outcome is None or outcome.status != 200:
                lost += 1
            elif outcome.mask.shape != answers[request.index].shape or \
                    not np.array_equal(outcome.mask, answers[request.index]):
                wrong += 1
    bad_status = {}
    for request in bad:
        outcome = concurrent_out.get(request.index)
        bad_status[request.kind] = None if outcome is None else outcome.status
    seq = latency_summary([sequential[r.index] for r in good if r.index in sequential], sequential_s)
    conc = latency_summary([concurrent_out[r.index] for r in good if r.index in concurrent_out], concurrent_s)
    rejections = {dict(labels)["reason"]: int(after[(name, labels)] - before.get((name, labels), 0))
                  for name, labels in after if name == "seggpt_rejections_total"}
    report = {
        "date": datetime.date.today().isoformat(),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores" + (", AVX-512" if _avx512() else ""),
        "command": "python -m benchmarks.serve_load " + " ".join(argv if argv is not None else sys.argv[1:]),
        "server": {k: info.get(k) for k in ("model", "backend", "devices", "dtype", "max_batch_rows", "max_wait_ms",
                                            "max_queue", "max_prompts", "buckets")},
        "clients": args.clients,
        "good": {"sequential": seq, "concurrent": conc,
                 "speedup": round(conc["requests_per_s"] / seq["requests_per_s"], 3) if seq["requests_per_s"] else None,
                 "segmenter_direct_p50_s": round(statistics.median(direct.values()), 3) if direct else None,
                 "service_overhead_ms": _paired_overhead(sequential, direct),
                 "mask_foreground_mean": round(float(np.mean([(m > 0).mean() for m in answers.values()])), 3)},
        "bad": {"count": len(bad), "by_kind": bad_status,
                "unexpected": sum(1 for r in bad if bad_status[r.kind] != r.expect)},
        "retried_429": sum(o.retries for o in concurrent_out.values()),
        "batch_sizes": batch_distribution(before, after),
        "rejections": {k: v for k, v in rejections.items() if v},
        "compiles_after_ready": int(after.get(("seggpt_compiles_total", (("phase", "serving"),)), 0)),
        "rss_mb": {"start": round(start_metrics[("process_resident_memory_bytes", ())] / 2**20, 1),
                   "end": round(after[("process_resident_memory_bytes", ())] / 2**20, 1)},
        "wrong": wrong,
        "lost": lost,
        "errors": sorted({o.error for p in (sequential, concurrent_out) for i, o in p.items()
                          if o.error and i < args.requests})[:5],
    }
    print(json.dumps(report, indent=2))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=2)
    return report


def _paired_overhead(outcomes: dict[int, Outcome], direct: dict[int, float]) -> dict | None:
    """What one request through the service costs over the same direct ``Segmenter`` call (ms): median,
    min and max of the back-to-back differences."""
    pairs = sorted(1000 * (outcomes[i].seconds - direct[i]) for i in direct if i in outcomes and
                   outcomes[i].status == 200)
    if not pairs:
        return None
    return {"median": round(statistics.median(pairs), 1), "min": round(pairs[0], 1), "max": round(pairs[-1], 1)}


def _avx512() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            return "avx512f" in f.read()
    except OSError:
        return False


if __name__ == "__main__":
    report = main()
    sys.exit(1 if report.get("wrong") or report.get("lost") or report.get("bad", {}).get("unexpected") else 0)
