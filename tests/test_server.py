"""`mezzotint serve`, native API: a real server on loopback with the tiny model, driven by httpx."""
import base64
import io
import json
import os
import subprocess
import sys
import threading
import time

import httpx
import numpy as np
import pytest
from PIL import Image
from serve_helpers import events, free_port, live_server, png_b64, tiny_models  # noqa: F401

SMALL = {"width": 32, "height": 32, "steps": 3}
LONG = {"width": 64, "height": 64, "steps": 1000}  # long enough to watch and cancel on any machine


@pytest.fixture(scope="module")
def server(tiny_models):  # noqa: F811
    limits = {"max_body_mb": 1, "max_batch": 4, "max_width": 256, "max_height": 256, "max_steps": 1000}
    with live_server(tiny_models, **limits) as url:
        yield url


@pytest.fixture
def client(server):
    with httpx.Client(base_url=server, timeout=60) as c:
        yield c


def submit(client, **body):
    r = client.post("/api/v1/jobs", json={"prompt": "a red circle", **SMALL, **body})
    assert r.status_code == 202, r.text
    return r.json()


def wait_running(client, job_id):
    deadline = time.time() + 60
    while client.get(f"/api/v1/jobs/{job_id}").json()["status"] == "queued":
        assert time.time() < deadline
        time.sleep(0.02)


def test_submit_events_and_results_with_cli_metadata(client, tiny_pipe, tmp_path):
    job = submit(client, seed=11, batch=2, sampler="euler")
    assert job["status"] in ("queued", "running") and job["count"] == 2
    evs = events(client, job["id"])
    kinds = [k for k, _ in evs]
    assert kinds[-1] == "done" and "progress" in kinds
    steps = [d["step"] for k, d in evs if k == "progress"]
    assert steps == sorted(steps) and max(steps) <= 3
    status = client.get(f"/api/v1/jobs/{job['id']}").json()
    assert status["status"] == "done" and status["step"] == status["steps"] == 3 and status["progress"] == 1
    assert status["seeds"] == [11, 12] and len(status["images"]) == 2
    # image 1 is byte for byte what `mezzotint generate` writes for the same request
    from mezzotint import Request
    from mezzotint.metadata import save_png
    req = Request("a red circle", seed=11, sampler="euler", steps=3, width=32, height=32,
                  cfg=tiny_pipe.config.defaults.cfg)
    results = tiny_pipe(req, ["a red circle"] * 2)
    cli_file = save_png(results[1].image, tmp_path / "0001.png", tiny_pipe.record(results[1].request))
    r = client.get(status["images"][1])
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    assert r.content == cli_file.read_bytes()
    im = Image.open(io.BytesIO(r.content))
    assert json.loads(im.text["mezzotint"])["request"]["seed"] == 12
    assert "Seed: 12" in im.text["parameters"] and status["parameters"][1] == im.text["parameters"]
    assert client.get(f"/api/v1/jobs/{job['id']}/images/2").status_code == 404
    assert client.get(f"/api/v1/jobs/{job['id']}/preview").content == client.get(status["images"][0]).content
    assert any(j["id"] == job["id"] for j in client.get("/api/v1/jobs").json())


def test_live_preview_then_cancel_and_the_worker_goes_on(client):
    job = submit(client, **LONG)
    evs = events(client, job["id"], preview=True, until=lambda k, d: "preview" in d)
    kind, data = evs[-1]
    assert kind == "progress" and data["step"] >= 1 and data["eta"] is not None
    assert Image.open(io.BytesIO(base64.b64decode(data["preview"]))).size == (64, 64)
    r = client.get(f"/api/v1/jobs/{job['id']}/preview")
    assert r.status_code == 200 and Image.open(io.BytesIO(r.content)).size == (64, 64)
    assert client.delete(f"/api/v1/jobs/{job['id']}").status_code == 200
    assert events(client, job["id"])[-1][0] == "cancelled"
    status = client.get(f"/api/v1/jobs/{job['id']}").json()
    assert status["status"] == "cancelled" and status["step"] < 1000 and status["images"] == []
    assert client.post(f"/api/v1/jobs/{job['id']}/cancel").status_code == 200  # already cancelled: fine
    after = submit(client)
    assert events(client, after["id"])[-1][0] == "done"
    assert client.delete(f"/api/v1/jobs/{after['id']}").status_code == 409  # finished: nothing to cancel


def test_img2img_and_inpaint(client):
    rng = np.random.default_rng(0)
    src = Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))
    job = submit(client, kind="img2img", image="data:image/png;base64," + png_b64(src), strength=0.5, steps=4)
    end = events(client, job["id"])[-1]
    assert end[0] == "done", end
    assert end[1]["steps"] == 2 and end[1]["edit"]["mode"] == "img2img"  # int(4 * 0.5) steps run
    assert "Denoising strength: 0.5" in end[1]["parameters"][0]
    mask = Image.new("L", (32, 32), 0)
    mask.paste(255, (0, 0, 16, 32))  # regenerate the left half
    job = submit(client, kind="inpaint", image=png_b64(src), mask=png_b64(mask), mask_blur=0, batch=2)
    end = events(client, job["id"])[-1]
    assert end[0] == "done", end
    for url in end[1]["images"]:
        out = np.asarray(Image.open(io.BytesIO(client.get(url).content)).convert("RGB"))
        assert (out[:, 16:] == np.asarray(src)[:, 16:]).all()  # outside the mask: the input's pixels
        assert (out[:, :16] != np.asarray(src)[:, :16]).any()
    assert json.loads(Image.open(io.BytesIO(client.get(end[1]["images"][0]).content)).text["mezzotint"])[
        "edit"]["mode"] == "inpaint"


def test_explain_job_serves_the_xray(client):
    job = submit(client, kind="explain", prompt="a red circle left of a blue square")
    end = events(client, job["id"])[-1]
    assert end[0] == "done" and end[1]["explain"]
    x = client.get(end[1]["explain"]).json()
    assert [w["word"] for w in x["words"]][:3] == ["a", "red", "circle"] and len(x["sigmas"]) == 3
    for url in [x["words"][1]["url"], x["files"]["trajectory.webp"], x["files"]["contact_sheet.png"]]:
        r = client.get(url)
        assert r.status_code == 200
        Image.open(io.BytesIO(r.content)).load()
    assert client.get(x["files"]["index.html"]).status_code == 200
    for bad in ("..%2Fexplain.json", "nothing.png", "%2Fetc%2Fpasswd"):
        assert client.get(f"/api/v1/jobs/{job['id']}/explain/{bad}").status_code == 404
    assert client.get(f"/api/v1/jobs/{job['id']}/images/0").headers["content-type"] == "image/png"
    assert client.get(f"/api/v1/jobs/{submit(client)['id']}/explain").status_code == 404


@pytest.mark.parametrize("body, status, words", [
    ({"steps": 3}, 422, "prompt: Field required"),
    ({"prompt": "x", "colour": "red"}, 422, "colour: Extra inputs are not permitted"),
    ({"prompt": "x", "steps": 0}, 422, "steps"),
    ({"prompt": "x", "guidance_rescale": 1.5}, 422, "guidance_rescale"),
    ({"prompt": "x", "layout_candidates": 0}, 422, "layout_candidates"),
    ({"prompt": "x", "layout_candidates": 2}, 400, "layout candidates need a model with a layout map"),
    ({"prompt": "x", "sampler": "k_lms"}, 400, "unknown sampler 'k_lms'; allowed: DDPM (ddpm)"),
    ({"prompt": "x", "width": 30}, 400, "width must be a positive multiple of 4"),
    ({"prompt": "x", "width": 512}, 400, "width 512 is over this server's limit of 256 (--max-width)"),
    ({"prompt": "x", "steps": 1001}, 400, "--max-steps"),
    ({"prompt": "x", "batch": 5}, 400, "at most 4 a job (--max-batch)"),
    ({"prompt": "x", "kind": "img2img"}, 400, "needs an image"),
    ({"prompt": "x", "kind": "img2img", "image": "###"}, 400, "image: not valid base64"),
    ({"prompt": "x", "kind": "img2img", "image": base64.b64encode(b"hello world").decode()}, 400,
     "image: not an image we can read"),
    ({"prompt": "x", "kind": "img2img", "image": "https://example.com/a.png"}, 400, "does not fetch URLs"),
    ({"prompt": "x", "kind": "inpaint", "image": png_b64(Image.new("RGB", (32, 32))),
      "mask": png_b64(Image.new("L", (32, 32)))}, 400, "mask is all black"),
    ({"prompt": "x", "kind": "explain", "batch": 2}, 400, "batch must be 1"),
    ({"prompt": "x", "kind": "paint"}, 422, "kind"),
])
def test_bad_input_gets_a_clear_4xx(client, body, status, words):
    r = client.post("/api/v1/jobs", json=body)
    assert r.status_code == status, r.text
    assert words in r.json()["detail"]


def test_malformed_json_unknown_job_and_too_large_bodies(client):
    r = client.post("/api/v1/jobs", content=b'{"prompt": "x",', headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["detail"].startswith("malformed JSON")
    r = client.get("/api/v1/jobs/nope")
    assert r.status_code == 404 and "no job 'nope'" in r.json()["detail"]
    big = json.dumps({"prompt": "x" * (2 * 2**20)}).encode()
    r = client.post("/api/v1/jobs", content=big, headers={"content-type": "application/json"})
    assert r.status_code == 413 and "--max-body-mb" in r.json()["detail"]

    def chunks():  # no Content-Length: counted as it streams in
        for _ in range(40):
            yield b" " * 65536
    r = client.post("/api/v1/jobs", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413
    assert client.post("/api/v1/jobs", json={"prompt": "still fine", **SMALL}).status_code == 202


def test_full_queue_answers_503_with_retry_after(tiny_models):  # noqa: F811
    with live_server(tiny_models, max_queue=2, max_steps=1000) as url, httpx.Client(base_url=url) as c:
        first = submit(c, **LONG)
        wait_running(c, first["id"])
        queued = [submit(c, **LONG) for _ in range(2)]
        r = c.post("/api/v1/jobs", json={"prompt": "one too many", **SMALL})
        assert r.status_code == 503 and int(r.headers["Retry-After"]) >= 1
        assert "queue is full" in r.json()["detail"]
        assert c.delete(f"/api/v1/jobs/{queued[0]['id']}").json()["status"] == "cancelled"
        last = submit(c)  # a place freed
        assert c.get(f"/api/v1/jobs/{queued[1]['id']}").json()["position"] == 0
        for j in (first, queued[1]):
            c.delete(f"/api/v1/jobs/{j['id']}")
        assert events(c, last["id"])[-1][0] == "done"


def test_a_failing_job_is_marked_failed_and_the_worker_goes_on(tiny_models, tmp_path):  # noqa: F811
    work = tmp_path / "work"
    with live_server(tiny_models, workdir=work) as url, httpx.Client(base_url=url, timeout=60) as c:
        work.rmdir()
        work.write_text("not a folder")  # the X-ray cannot be written: a failure inside the worker
        job = submit(c, kind="explain")
        kind, data = events(c, job["id"])[-1]
        assert kind == "failed" and data["error"] and "Error" in data["error"]
        assert events(c, submit(c)["id"])[-1][0] == "done"


def test_openapi_describes_the_requests(client):
    doc = client.get("/openapi.json").json()
    assert {"/api/v1/jobs", "/api/v1/jobs/{job_id}/events", "/sdapi/v1/txt2img", "/sdapi/v1/img2img"} <= set(
        doc["paths"])
    fields = doc["components"]["schemas"]["JobRequest"]["properties"]
    assert fields["prompt"]["description"] == "what to draw" and "explain" in fields["kind"]["enum"]


def test_host_warning():
    from mezzotint.server import host_warning
    assert "without --token" in host_warning("0.0.0.0", None)
    assert host_warning("0.0.0.0", "secret") is None and host_warning("127.0.0.1", None) is None


def test_serve_command_with_token(tiny_model):
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "mezzotint", "serve", "--model", str(tiny_model), "--port",
                             str(port), "--token", "s3cret", "--max-queue", "4"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.time() + 90
        while True:
            assert proc.poll() is None, proc.stdout.read()
            assert time.time() < deadline, "server did not come up"
            try:
                if httpx.get(url + "/openapi.json").status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        assert httpx.get(url + "/api/v1/info").status_code == 401
        assert httpx.get(url + "/sdapi/v1/samplers", headers={"Authorization": "Bearer wrong"}).status_code == 401
        info = httpx.get(url + "/api/v1/info", headers={"Authorization": "Bearer s3cret"})
        assert info.status_code == 200 and info.json()["limits"]["max_queue"] == 4
        assert httpx.get(url + "/sdapi/v1/samplers", auth=("anyone", "s3cret")).status_code == 200
        assert httpx.get(url + "/").status_code == 200  # the page itself is public; its API calls are not
    finally:
        proc.terminate()
        out = proc.communicate(timeout=30)[0]
    assert "without --token" not in out and "serving" in out


def test_load_every_accepted_job_finishes(tiny_models):  # noqa: F811
    """8 clients x 3 jobs against a queue of 6: 503s are retried, no job is lost."""
    clients, per_client = 8, 3
    latencies, done, rejected, errors = [], [], [0], []
    lock = threading.Lock()

    def client_run(url, n):
        with httpx.Client(base_url=url, timeout=120) as c:
            for k in range(per_client):
                t0 = time.perf_counter()
                while True:
                    r = c.post("/api/v1/jobs", json={"prompt": f"client {n} job {k}", "seed": 100 * n + k,
                                                    "width": 32, "height": 32, "steps": 2})
                    if r.status_code != 503:
                        break
                    with lock:
                        rejected[0] += 1
                    time.sleep(min(float(r.headers["Retry-After"]), 0.2))
                if r.status_code != 202:
                    errors.append(r.text)
                    continue
                kind, data = events(c, r.json()["id"])[-1]
                with lock:
                    latencies.append(time.perf_counter() - t0)
                    done.append((kind, data["id"], data["seeds"]))

    with live_server(tiny_models, max_queue=6) as url:
        threads = [threading.Thread(target=client_run, args=(url, n)) for n in range(clients)]
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join(300)
        wall = time.perf_counter() - t0
    assert not errors
    assert len(done) == clients * per_client and all(k == "done" for k, _, _ in done)
    assert len({i for _, i, _ in done}) == clients * per_client
    assert sorted(s[0] for _, _, s in done) == sorted(100 * n + k for n in range(clients) for k in range(per_client))
    p = np.percentile(latencies, [50, 90, 99])
    print(f"\nload: {len(done)} jobs from {clients} clients in {wall:.2f} s ({len(done) / wall:.1f} jobs/s), "
          f"{rejected[0]} 503s retried; latency p50 {p[0]:.3f} s, p90 {p[1]:.3f} s, p99 {p[2]:.3f} s, "
          f"max {max(latencies):.3f} s")
