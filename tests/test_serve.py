"""``seggpt-jax serve`` as a real uvicorn process on 127.0.0.1: answers equal to ``Segmenter``'s under
concurrency, every client error with its one-line message, metrics, the OpenAPI schema, registered
prompts, the demo page in chromium, and the short load test. One server for the whole module."""

from __future__ import annotations

import base64
import concurrent.futures
import io
import os
import shutil

import httpx
import jax
import numpy as np
import pytest
from PIL import Image

from benchmarks.serve_load import scrape
from seggpt_jax import Segmenter
from seggpt_jax.imaging.masks import build_palette, voc_colours
from seggpt_jax_testing.serving import ServerProcess, session_cache, session_checkpoint

CHROMIUM = "/usr/bin/chromium"
MAX_PROMPTS = 3


# ------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return session_checkpoint(tmp_path_factory)


@pytest.fixture(scope="module")
def server(checkpoint, tmp_path_factory):
    log = tmp_path_factory.mktemp("serve-log") / "server.log"
    process = ServerProcess(checkpoint, str(log), "--max-batch", "4", "--max-wait-ms", "30", "--max-queue", "64",
                            "--max-prompts", str(MAX_PROMPTS), "--max-body-mb", "1", "--prompt-cache-mb", "0.1",
                            "--decode-threads", "2", "--compilation-cache", session_cache(tmp_path_factory),
                            "--log-level", "warning")
    process.start()
    yield process
    status = process.stop()
    assert status == 0, process.text()[-3000:]


@pytest.fixture(scope="module")
def segmenter(checkpoint):
    return Segmenter.from_pretrained(checkpoint)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Queries of several sizes, prompt images, binary (0/255, anti-aliased), class-id, palette-colour and
    VOC-colour masks, and a file that is not an image."""
    folder = tmp_path_factory.mktemp("serve-files")
    rng = np.random.default_rng(7)
    paths = {}

    def save(name, array, mode=None):
        path = folder / name
        Image.fromarray(array, mode=mode).save(path)
        paths[name] = str(path)

    for i, (h, w) in enumerate([(40, 50), (33, 33), (64, 30), (20, 70), (48, 48), (36, 44)]):
        save(f"query{i}.png", rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
    for i, (h, w) in enumerate([(30, 30), (40, 36), (28, 50)]):
        save(f"prompt{i}.png", rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        binary = np.zeros((h, w), np.uint8)
        binary[h // 5:h // 2 + 3 * i, w // 6:w // 2 + 2 * i] = 255
        binary[h // 5 - 1, w // 6:w // 2] = 128  # an anti-aliased edge, fed as it is
        save(f"binary{i}.png", binary, "L")
        save(f"classes{i}.png", rng.integers(0, 4, (h, w), dtype=np.uint8), "L")
    palette = np.asarray(build_palette(3), np.uint8)
    save("palette0.png", palette[rng.integers(0, 4, (30, 30))])
    voc = np.asarray(voc_colours(21), np.uint8)
    save("voc0.png", voc[rng.integers(0, 21, (30, 30))])
    paths["junk.png"] = str(folder / "junk.png")
    with open(paths["junk.png"], "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n this is not the rest of a PNG")
    paths["big.bin"] = str(folder / "big.bin")
    with open(paths["big.bin"], "wb") as f:
        f.write(rng.integers(0, 256, 3 * 2**20 // 2, dtype=np.uint8).tobytes())  # 1.5 MiB > --max-body-mb 1
    return paths


# ------------------------------------------------------------------------------------ requests
def _upload(path: str) -> tuple[str, bytes, str]:
    with open(path, "rb") as f:
        return os.path.basename(path), f.read(), "image/png"


def post_segment(url: str, queries, prompts=(), *, data=None, accept="application/json", timeout=120):
    form = [("query", _upload(q)) for q in queries]
    for image, mask in prompts:
        form += [("prompt_image", _upload(image)), ("prompt_mask", _upload(mask))]
    return httpx.post(f"{url}/v1/segment", files=form, data=data or {}, headers={"Accept": accept}, timeout=timeout)


def register(url: str, prompts, data=None) -> httpx.Response:
    form = []
    for image, mask in prompts:
        form += [("prompt_image", _upload(image)), ("prompt_mask", _upload(mask))]
    return httpx.post(f"{url}/v1/prompts", files=form, data=data or {}, timeout=120)


def masks_of(reply: httpx.Response) -> list[np.ndarray]:
    assert reply.status_code == 200, reply.text
    if reply.headers["content-type"] == "image/png":
        return [np.asarray(Image.open(io.BytesIO(reply.content)))]
    out = []
    for entry in reply.json()["masks"]:
        mask = np.asarray(Image.open(io.BytesIO(base64.b64decode(entry["png_base64"]))))
        assert mask.shape == (entry["height"], entry["width"])
        out.append(mask)
    return out


def expected(segmenter: Segmenter, queries, prompts, num_labels=None, colour_map=None) -> list[np.ndarray]:
    """The direct Segmenter answer, as the API encodes it (0/255 binary, class ids semantic)."""
    results = segmenter.segment(list(queries), prompts=[tuple(p) for p in prompts], num_labels=num_labels,
                                colour_map=colour_map)
    return [r.mask.astype(np.uint8) * 255 if num_labels is None else r.mask.astype(np.uint8) for r in results]


def check_error(reply: httpx.Response, status: int, *words: str) -> None:
    assert reply.status_code == status, (reply.status_code, reply.text)
    detail = reply.json()["detail"]
    assert isinstance(detail, str) and "\n" not in detail and detail.strip() == detail, detail
    for word in words:
        assert word in detail, (word, detail)


# ------------------------------------------------------------------------------------ tests
def test_answers_equal_segmenter_under_concurrency_beside_every_client_error(server, segmenter, files):
    url, f = server.url, files
    registered = register(url, [(f["prompt0.png"], f["binary0.png"]), (f["prompt1.png"], f["binary1.png"])])
    assert registered.status_code == 200, registered.text
    prompt_id = registered.json()["prompt_id"]
    two = [(f["prompt0.png"], f["binary0.png"]), (f["prompt1.png"], f["binary1.png"])]
    semantic3 = [(f[f"prompt{i}.png"], f[f"classes{i}.png"]) for i in range(3)]
    good = {  # name -> (request, the Segmenter's answer)
        "binary": (lambda q: post_segment(url, [q], [(f["prompt0.png"], f["binary0.png"])]),
                   lambda q: expected(segmenter, [q], [(f["prompt0.png"], f["binary0.png"])])),
        "binary-png": (lambda q: post_segment(url, [q], [(f["prompt2.png"], f["binary2.png"])], accept="image/png"),
                       lambda q: expected(segmenter, [q], [(f["prompt2.png"], f["binary2.png"])])),
        "semantic": (lambda q: post_segment(url, [q], [(f["prompt1.png"], f["classes1.png"])], data={"num_labels": 3}),
                     lambda q: expected(segmenter, [q], [(f["prompt1.png"], f["classes1.png"])], 3)),
        "semantic-palette": (lambda q: post_segment(url, [q], [(f["prompt0.png"], f["palette0.png"])],
                                                    data={"num_labels": 3}),
                             lambda q: expected(segmenter, [q], [(f["prompt0.png"], f["palette0.png"])], 3)),
        "semantic-voc": (lambda q: post_segment(url, [q], [(f["prompt0.png"], f["voc0.png"])],
                                                data={"num_labels": 20, "colour_map": "voc"}),
                         lambda q: expected(segmenter, [q], [(f["prompt0.png"], f["voc0.png"])], 20, "voc")),
        "two-prompts": (lambda q: post_segment(url, [q], two), lambda q: expected(segmenter, [q], two)),
        "three-prompts-semantic": (lambda q: post_segment(url, [q], semantic3, data={"num_labels": 3}),
                                   lambda q: expected(segmenter, [q], semantic3, 3)),
        "registered": (lambda q: post_segment(url, [q], data={"prompt_id": prompt_id}),
                       lambda q: expected(segmenter, [q], two)),
    }
    bad = {  # name -> (request, status, words its message must hold)
        "undecodable": (lambda: post_segment(url, [f["query0.png"], f["junk.png"]],
                                             [(f["prompt0.png"], f["binary0.png"])]), 400, ["query[1]", "junk.png"]),
        "count-mismatch": (lambda: httpx.post(f"{url}/v1/segment", files=[
            ("query", _upload(f["query0.png"])), ("prompt_image", _upload(f["prompt0.png"])),
            ("prompt_image", _upload(f["prompt1.png"])), ("prompt_mask", _upload(f["binary0.png"]))], timeout=60),
            422, ["2 prompt_image", "1 prompt_mask"]),
        "no-query": (lambda: post_segment(url, [], [(f["prompt0.png"], f["binary0.png"])]), 422, ["query"]),
        "bad-num-labels": (lambda: post_segment(url, [f["query0.png"]], [(f["prompt0.png"], f["binary0.png"])],
                                                data={"num_labels": "many"}), 422, ["num_labels"]),
        "unknown-colour": (lambda: post_segment(url, [f["query0.png"]], [(f["prompt0.png"], f["voc0.png"])],
                                                data={"num_labels": 3}), 422, ["prompt_mask[0]", "voc0.png", "colours"]),
        "too-many-prompts": (lambda: post_segment(url, [f["query0.png"]], semantic3 + semantic3[:1]), 422,
                             ["4 prompts", f"at most {MAX_PROMPTS}"]),
        "unknown-prompt-id": (lambda: post_segment(url, [f["query0.png"]], data={"prompt_id": "0" * 32}), 404,
                              ["prompt_id", "not registered"]),
        "media-type": (lambda: httpx.post(f"{url}/v1/segment", json={"query": "street.jpg"}, timeout=60), 415,
                       ["multipart/form-data", "application/json"]),
        "body-too-large": (lambda: httpx.post(f"{url}/v1/segment", files=[("query", ("big.png", open(
            f["big.bin"], "rb").read(), "image/png"))], timeout=60), 413, ["1 MB", "--max-body-mb"]),
        "streamed-too-large": (lambda: httpx.post(
            f"{url}/v1/segment", content=iter([b'--x\r\nContent-Disposition: form-data; name="query"; filename="a.png"'
                                               b"\r\nContent-Type: image/png\r\n\r\n"] + [b"a" * 2**19] * 3),
            headers={"Content-Type": "multipart/form-data; boundary=x"}, timeout=60), 413, ["--max-body-mb"]),
        "png-for-two": (lambda: post_segment(url, [f["query0.png"], f["query1.png"]],
                                             [(f["prompt0.png"], f["binary0.png"])], accept="image/png"), 406,
                        ["2 queries"]),
    }
    jobs = []
    for round_ in range(2):
        for i, name in enumerate(good):
            jobs.append(("good", name, f["query%d.png" % ((i + round_) % 6)]))
        jobs += [("bad", name, None) for name in bad]
    jobs.append(("multi", "binary", None))  # one request, three queries

    def run(job):
        kind, name, query = job
        if kind == "good":
            return good[name][0](query)
        if kind == "multi":
            return post_segment(url, [f["query3.png"], f["query4.png"], f["query5.png"]],
                                [(f["prompt0.png"], f["binary0.png"])])
        return bad[name][0]()

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        replies = list(pool.map(run, jobs))
    answers = set()
    for (kind, name, query), reply in zip(jobs, replies):
        if kind == "bad":
            check_error(reply, bad[name][1], *bad[name][2])
            continue
        if kind == "multi":
            want = expected(segmenter, [f["query3.png"], f["query4.png"], f["query5.png"]],
                            [(f["prompt0.png"], f["binary0.png"])])
            assert [m.tobytes() for m in masks_of(reply)] == [m.tobytes() for m in want]
            assert [m["name"] for m in reply.json()["masks"]] == ["query3.png", "query4.png", "query5.png"]
            continue
        got, want = masks_of(reply), good[name][1](query)
        assert len(got) == 1 and got[0].shape == want[0].shape, name
        np.testing.assert_array_equal(got[0], want[0], err_msg=f"{name} {query}")
        answers.add(want[0].tobytes())
        if name == "binary-png":
            assert reply.headers["content-type"] == "image/png"
    assert len(answers) > 8  # the answers differ from one another: a mix-up could not pass
    assert scrape(url)[("seggpt_compiles_total", (("phase", "serving"),))] == 0


def test_metrics_parse_and_the_batch_histogram_moves(server, files):
    f = files
    before = scrape(server.url)
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        replies = list(pool.map(lambda i: post_segment(server.url, [f["query%d.png" % (i % 6)]],
                                                       [(f["prompt0.png"], f["binary0.png"])]), range(12)))
    assert [r.status_code for r in replies] == [200] * 12
    bad = post_segment(server.url, [f["junk.png"]], [(f["prompt0.png"], f["binary0.png"])])
    assert bad.status_code == 400
    after = scrape(server.url)

    def delta(name, **labels):
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0) - before.get(key, 0)

    assert delta("seggpt_batch_size_sum") == 12  # every query ran, in batches
    batches = delta("seggpt_batch_size_count")
    assert 1 <= batches <= 12
    assert delta("seggpt_batch_size_bucket", le="+Inf") == batches
    assert delta("seggpt_queue_wait_seconds_count") == 12
    assert delta("seggpt_device_seconds_count") == batches
    assert delta("seggpt_http_request_duration_seconds_count", route="/v1/segment", method="POST", status="200") == 12
    assert delta("seggpt_http_request_duration_seconds_count", route="/v1/segment", method="POST", status="400") == 1
    assert delta("seggpt_rejections_total", reason="bad_image") == 1
    assert after[("seggpt_queue_depth", ())] == 0
    assert after[("seggpt_ready", ())] == 1
    assert after[("seggpt_compiles_total", (("phase", "warmup"),))] >= 6  # 1 prompt: 1, 2, 4; 2: 1, 2; 3: 1
    assert after[("seggpt_compiles_total", (("phase", "serving"),))] == 0
    assert after[("process_resident_memory_bytes", ())] > 0


def test_info_healthz_and_palette(server):
    info = httpx.get(f"{server.url}/v1/info").json()
    assert info["ready"] and info["backend"] == jax.default_backend() and info["dtype"] == "float32"
    assert info["buckets"] == {"1": [1, 2, 4], "2": [1, 2], "3": [1]}
    assert info["max_batch_rows"] == 4 and info["max_wait_ms"] == 30 and info["max_prompts"] == MAX_PROMPTS
    assert info["devices"] and info["query_size"] == [32, 32]
    assert httpx.get(f"{server.url}/healthz").json() == {"status": "alive"}
    assert httpx.get(f"{server.url}/readyz").json() == {"ready": True}
    palette = httpx.get(f"{server.url}/v1/palette/3").json()
    assert palette["colours"] == [list(c) for c in build_palette(3)]
    check_error(httpx.get(f"{server.url}/v1/palette/0"), 422, "num_labels")
    check_error(httpx.get(f"{server.url}/nowhere"), 404)


def test_openapi_schema_describes_the_api(server):
    schema = httpx.get(f"{server.url}/openapi.json").json()
    assert schema["openapi"].startswith("3.")
    segment = schema["paths"]["/v1/segment"]["post"]
    body = segment["requestBody"]
    assert body["required"] is True
    (media,) = body["content"]
    assert media == "multipart/form-data"
    form = _resolve(schema, body["content"][media]["schema"])
    assert set(form["properties"]) == {"query", "prompt_image", "prompt_mask", "prompt_id", "num_labels",
                                       "colour_map", "timeout_s"}
    assert form["required"] == ["query"]
    query = form["properties"]["query"]
    assert query["type"] == "array" and _is_file(query["items"])
    num_labels = next(s for s in form["properties"]["num_labels"]["anyOf"] if s.get("type") == "integer")
    assert num_labels["minimum"] == 1 and num_labels["maximum"] == 255
    responses = segment["responses"]
    assert set(responses) >= {"200", "400", "404", "406", "413", "415", "422", "429", "503", "504"}
    assert set(responses["200"]["content"]) == {"application/json", "image/png"}
    masks = _resolve(schema, responses["200"]["content"]["application/json"]["schema"])
    assert set(_resolve(schema, masks["properties"]["masks"]["items"])["properties"]) == {
        "name", "width", "height", "png_base64"}
    for status in ("400", "413", "415", "422", "429", "503", "504"):
        problem = _resolve(schema, responses[status]["content"]["application/json"]["schema"])
        assert problem["properties"] == {"detail": problem["properties"]["detail"]}
    prompts = schema["paths"]["/v1/prompts"]["post"]
    form = _resolve(schema, prompts["requestBody"]["content"]["multipart/form-data"]["schema"])
    assert set(form["required"]) == {"prompt_image", "prompt_mask"}
    for path in ("/healthz", "/readyz", "/metrics", "/v1/info"):
        assert "get" in schema["paths"][path]
    assert "/" not in schema["paths"]  # the demo page is not part of the API


def _resolve(schema, node):
    while "$ref" in node:
        node = schema["components"]["schemas"][node["$ref"].rsplit("/", 1)[1]]
    return node


def _is_file(node) -> bool:
    return node.get("format") == "binary" or node.get("contentMediaType") == "application/octet-stream"


def test_registered_prompts_are_content_addressed_bounded_and_mode_checked(server, segmenter, files):
    f, url = files, server.url
    first = register(url, [(f["prompt1.png"], f["classes1.png"])], data={"num_labels": 3})
    assert first.status_code == 200, first.text
    body = first.json()
    assert body["prompts"] == 1 and body["num_labels"] == 3 and body["names"] == ["prompt1.png"]
    again = register(url, [(f["prompt1.png"], f["classes1.png"])], data={"num_labels": 3}).json()
    assert again["prompt_id"] == body["prompt_id"]
    binary = register(url, [(f["prompt1.png"], f["classes1.png"])]).json()  # the same files in binary mode
    assert binary["prompt_id"] != body["prompt_id"]
    reply = post_segment(url, [f["query2.png"]], data={"prompt_id": body["prompt_id"]})
    assert masks_of(reply)[0].tobytes() == expected(segmenter, [f["query2.png"]],
                                                    [(f["prompt1.png"], f["classes1.png"])], 3)[0].tobytes()
    check_error(post_segment(url, [f["query2.png"]], data={"prompt_id": body["prompt_id"], "num_labels": 5}), 422,
                "num_labels=3", "num_labels=5")
    check_error(post_segment(url, [f["query2.png"]], [(f["prompt0.png"], f["binary0.png"])],
                             data={"prompt_id": body["prompt_id"]}), 422, "either prompt_id")
    check_error(register(url, [(f["prompt0.png"], f["junk.png"])]), 400, "prompt_mask[0]", "junk.png")
    # --prompt-cache-mb 0.1 holds four one-prompt sets of this model: four more evict the least recent
    for image, mask in [("prompt0", "binary0"), ("prompt1", "binary1"), ("prompt2", "binary2"), ("prompt0", "classes0")]:
        assert register(url, [(f[image + ".png"], f[mask + ".png"])]).status_code == 200
    check_error(post_segment(url, [f["query2.png"]], data={"prompt_id": body["prompt_id"]}), 404, "register it again")


def test_prepared_prompts_equal_the_prompts_and_keep_their_mode(segmenter, files):
    """Segmenter.prepare_prompts (what /v1/prompts keeps) gives the same answers as the prompt files."""
    f = files
    prompts = [(f["prompt0.png"], f["classes0.png"]), (f["prompt2.png"], f["classes2.png"])]
    prepared = segmenter.prepare_prompts(prompts, num_labels=3)
    assert [p.num_labels for p in prepared] == [3, 3] and prepared[0].prompt_masks.shape == (3, 32, 32)
    direct = segmenter.segment([f["query1.png"], f["query2.png"]], prompts=prompts, num_labels=3)
    again = segmenter.segment([f["query1.png"], f["query2.png"]], prompts=prepared, num_labels=3)
    for a, b in zip(direct, again):
        np.testing.assert_array_equal(a.mask, b.mask)
        np.testing.assert_array_equal(a.painted, b.painted)
    with pytest.raises(ValueError, match="prepared for semantic mode with 3 labels cannot be used in binary mode"):
        segmenter.segment(f["query1.png"], prompts=prepared)


def test_demo_page_in_chromium_shows_the_api_mask(server, files, tmp_path):
    if not os.path.exists(CHROMIUM) or shutil.which("chromium") is None:
        pytest.skip(f"Debian's chromium is not installed ({CHROMIUM}); .ci/run installs it with apt-get")
    from playwright.sync_api import sync_playwright

    f = files
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch_persistent_context(  # a fresh profile: --user-data-dir
            str(tmp_path / "chromium-profile"), executable_path=CHROMIUM, headless=True,
            viewport={"width": 1200, "height": 900},
            args=["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--force-color-profile=srgb"])
        try:
            page = browser.new_page()
            errors = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(f"{server.url}/", timeout=30_000)
            page.wait_for_selector("#status.ready", timeout=30_000)
            page.set_input_files("[data-testid=prompt-image-0]", f["prompt1.png"])
            canvas = page.locator("[data-testid=prompt-canvas-0]")
            canvas.wait_for(timeout=10_000)
            page.wait_for_function("document.querySelector('[data-testid=prompt-canvas-0]').width > 1")
            box = canvas.bounding_box()
            page.mouse.move(box["x"] + box["width"] * 0.2, box["y"] + box["height"] * 0.3)
            page.mouse.down()
            for step in range(1, 11):  # a diagonal stroke
                page.mouse.move(box["x"] + box["width"] * (0.2 + 0.05 * step), box["y"] + box["height"] * (0.3 + 0.04 * step))
            page.mouse.up()
            page.set_input_files("[data-testid=query-input]", f["query0.png"])
            page.wait_for_function("document.querySelector('#result-0 canvas.base').width > 1")
            page.click("[data-testid=segment]")
            page.wait_for_function("document.body.dataset.segmented === '1'", timeout=60_000)
            assert not errors, errors
            # The mask the page sent (what was painted), the picture shown, and the query as the page decoded it
            painted = page.evaluate("""async () => {
                const blob = await promptMaskBlob(state.prompts[0]);
                return Array.from(new Uint8Array(await blob.arrayBuffer())); }""")
            shown, base = (np.asarray(page.evaluate(f"""() => {{
                const c = document.querySelector('#result-0 canvas.{name}');
                return Array.from(c.getContext('2d').getImageData(0, 0, c.width, c.height).data); }}"""),
                np.uint8).reshape(40, 50, 4) for name in ("overlay", "base"))
            opacity = page.locator("[data-testid=opacity]").input_value()
            download = page.locator("#result-0 a.download").get_attribute("href")
            screenshot = tmp_path / "serve-demo.png"
            page.screenshot(path=str(screenshot), full_page=True)
            print(f"demo screenshot: {screenshot}")
        finally:
            browser.close()
    painted_mask = np.asarray(Image.open(io.BytesIO(bytes(painted))).convert("L"))
    assert painted_mask.shape == (40, 36) and set(np.unique(painted_mask)) == {0, 255}  # hard-edged: 0/255 only
    assert 0.02 < (painted_mask > 0).mean() < 0.6  # the stroke, not nothing and not everything
    mask_path = tmp_path / "painted.png"
    Image.fromarray(painted_mask).save(mask_path)
    api = masks_of(post_segment(server.url, [f["query0.png"]], [(f["prompt1.png"], str(mask_path))]))[0]
    assert 0 < (api > 0).mean() < 1
    np.testing.assert_array_equal(base[..., :3], np.asarray(Image.open(f["query0.png"])))
    changed = np.any(shown[..., :3] != base[..., :3], axis=-1)
    np.testing.assert_array_equal(changed, api > 0)  # the overlay shows exactly the API's mask
    alpha = int(opacity) / 100
    blend = np.round((1 - alpha) * base[..., :3] + alpha * np.array([255, 48, 48]))
    np.testing.assert_allclose(shown[..., :3][api > 0], blend[api > 0], atol=1)
    assert download.startswith("data:image/png;base64,")
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(base64.b64decode(download.split(",", 1)[1])))), api)


def test_short_load_benchmark(server, checkpoint, tmp_path):
    """benchmarks/serve_load.py, short: concurrent clients with good and bad requests, every answer checked."""
    from benchmarks import serve_load

    report = serve_load.main(["--url", server.url, "--model", checkpoint, "--clients", "6", "--requests", "12",
                              "--bad-every", "3", "--max-seconds", "120", "--image-size", "48",
                              "--json", str(tmp_path / "load.json")])
    assert report["wrong"] == 0 and report["lost"] == 0, report
    assert report["good"]["concurrent"]["ok"] == 12 and report["good"]["sequential"]["ok"] == 12
    assert report["bad"]["unexpected"] == 0 and report["bad"]["count"] >= 4
    assert sum(report["batch_sizes"].values()) >= 1
    assert report["compiles_after_ready"] == 0
