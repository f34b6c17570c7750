"""Ray, on one local Ray instance for the module (``ray.init(num_cpus=2)``, loopback only): a Ray Serve
deployment of the service answers HTTP requests as ``Segmenter`` does and maps back-pressure to 429,
and a Ray Data pipeline over a folder writes the masks the command line writes."""

from __future__ import annotations

import concurrent.futures
import io
import os
import time

import numpy as np
import pytest
from conftest import free_port, save_image
from PIL import Image

ray = pytest.importorskip("ray", reason="the ray extra (ray[serve,data]) is not installed")



@pytest.fixture(scope="module")
def local_ray(tmp_path_factory):
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1", object_store_memory=200 * 2**20,
             log_to_driver=False, _temp_dir=str(tmp_path_factory.mktemp("ray")))
    try:
        yield
    finally:
        ray.shutdown()


@pytest.fixture(scope="module")
def files(hf_tiny, tmp_path_factory):
    _, model = hf_tiny("nonsquare")
    root = tmp_path_factory.mktemp("ray-files")
    rng = np.random.default_rng(11)
    photos = root / "photos"
    photos.mkdir()
    for i in range(5):
        save_image(photos / f"q{i}.png", rng.integers(0, 256, (30 + 5 * i, 40, 3), dtype=np.uint8))
    prompts = []
    for i in range(2):
        mask = np.zeros((50, 50), np.uint8)
        mask[5 + 10 * i:30, 10:40 - 5 * i] = 255
        prompts.append((save_image(root / f"prompt{i}.png", rng.integers(0, 256, (50, 50, 3), dtype=np.uint8)),
                        save_image(root / f"prompt{i}_mask.png", mask, "L")))
    labels = rng.integers(0, 3, (50, 50)).astype(np.uint8)
    return dict(model=model, photos=photos, prompts=prompts, labels=save_image(root / "labels.png", labels, "L"),
                root=root)


def test_ray_data_pipeline_writes_the_masks_of_the_command_line(local_ray, files, tmp_path):
    from seggpt_jax.cli import main
    from seggpt_jax.serve.ray import Predictor

    image, mask = files["prompts"][0]
    cli_out = tmp_path / "cli"
    assert main(["segment", str(files["photos"]), "--prompt-image", image, "--prompt-mask", mask, "--out-dir",
                 str(cli_out), "--model", files["model"]]) == 0
    dataset = ray.data.read_binary_files(str(files["photos"]), include_paths=True)
    masks = dataset.map_batches(Predictor, fn_constructor_kwargs={"model": files["model"], "prompts": [(image, mask)]},
                                concurrency=1, batch_size=2, num_cpus=0.5)
    ray_out = tmp_path / "ray"
    ray_out.mkdir()
    rows = 0
    for row in masks.iter_rows():
        assert row["error"] == ""
        name = os.path.basename(row["path"])
        (ray_out / f"{name}_mask.png").write_bytes(row["mask_png"])
        assert np.array_equal(np.asarray(row["mask"]) * np.uint8(255),
                              np.asarray(Image.open(cli_out / f"{name}_mask.png")))
        rows += 1
    assert rows == 5
    for name in os.listdir(ray_out):
        assert (ray_out / name).read_bytes() == (cli_out / name).read_bytes()


def _post(url: str, queries: list[str], prompts: list[tuple[str, str]], **fields):
    import httpx

    upload = [("query", (os.path.basename(q), open(q, "rb").read(), "image/png")) for q in queries]
    for image, mask in prompts:
        upload += [("prompt_image", ("p.png", open(image, "rb").read(), "image/png")),
                   ("prompt_mask", ("m.png", open(mask, "rb").read(), "image/png"))]
    return httpx.post(f"{url}/v1/segment", files=upload, data={k: str(v) for k, v in fields.items()}, timeout=120)


def test_ray_serve_answers_as_the_segmenter_and_maps_backpressure_to_429(local_ray, files):
    import base64

    import httpx
    from ray import serve

    from seggpt_jax import Segmenter
    from seggpt_jax.serve.engine import ServeSettings
    from seggpt_jax.serve.ray import deployment

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    url = f"http://127.0.0.1:{port}"
    settings = ServeSettings(model=files["model"], max_batch=1, max_wait_ms=0, max_queue=4, max_prompts=2,
                             decode_threads=1, request_timeout_s=60)
    try:
        serve.run(deployment(settings, ray_actor_options={"num_cpus": 0.5}, max_ongoing_requests=2,
                             max_queued_requests=1, compilation_cache=False), name="seggpt-jax", route_prefix="/")
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{url}/readyz", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        else:
            pytest.fail("the Ray Serve deployment never became ready")
        segmenter = Segmenter.from_pretrained(files["model"])
        queries = sorted(str(p) for p in files["photos"].iterdir())
        for prompts, labels in ((files["prompts"][:1], None), (files["prompts"], None),
                                ([(files["prompts"][0][0], files["labels"])], 2)):
            fields = {} if labels is None else {"num_labels": labels}
            reply = _post(url, queries[:3], prompts, **fields)
            assert reply.status_code == 200, reply.text
            expected = segmenter.segment(queries[:3], prompts, num_labels=labels)
            for answer, result in zip(reply.json()["masks"], expected):
                got = np.asarray(Image.open(io.BytesIO(base64.b64decode(answer["png_base64"]))))
                want = result.mask.astype(np.uint8) * 255 if labels is None else result.mask
                assert np.array_equal(got, want)
        info = httpx.get(f"{url}/v1/info", timeout=10).json()
        assert info["ready"] and info["buckets"] == {"1": [1], "2": [1]}

        # over capacity: Ray's own queue (2 ongoing + 1 queued) and the replica's (4 queries) answer 429
        # with Retry-After; every 200 is still the Segmenter's answer (bounded: 12 requests, one burst)
        def burst(_):
            return _post(url, queries[:4], files["prompts"][:1])

        with concurrent.futures.ThreadPoolExecutor(12) as pool:
            replies = list(pool.map(burst, range(12)))
        statuses = [r.status_code for r in replies]
        assert set(statuses) <= {200, 429} and 429 in statuses and 200 in statuses, statuses
        assert all(r.headers.get("retry-after") for r in replies if r.status_code == 429)
        expected = segmenter.segment(queries[:4], files["prompts"][:1])
        for reply in replies:
            if reply.status_code == 200:
                for answer, result in zip(reply.json()["masks"], expected):
                    got = np.asarray(Image.open(io.BytesIO(base64.b64decode(answer["png_base64"]))))
                    assert np.array_equal(got, result.mask.astype(np.uint8) * 255)
    finally:
        serve.shutdown()
