"""A real mezzotint server on 127.0.0.1 in a uvicorn thread, for the server tests."""
import base64
import contextlib
import io
import json
import socket
import threading
import time

import httpx
import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def tiny_models(tiny_model, tiny_pipe):
    from mezzotint.server.models import Models
    return Models(tiny_model, device="cpu", pipe=tiny_pipe)


@contextlib.contextmanager
def live_server(models, token=None, workdir=None, **limits):
    import uvicorn

    from mezzotint.server import Limits, create_app
    app = create_app(models, Limits(**limits), token, workdir)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=free_port(), log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started:
        assert thread.is_alive() and time.time() < deadline, "server did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{server.config.port}"
    finally:
        server.should_exit = True
        thread.join(30)


def events(client: httpx.Client, job_id: str, preview: bool = False, until=None):
    """Read a job's Server-Sent Events up to its last one (or until `until(event, data)` is true)."""
    out = []
    with client.stream("GET", f"/api/v1/jobs/{job_id}/events", params={"preview": preview}, timeout=120) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        kind = None
        for line in r.iter_lines():
            if line.startswith("event:"):
                kind = line[6:].strip()
            elif line.startswith("data:"):
                data = json.loads(line[5:])
                out.append((kind, data))
                if kind in ("done", "failed", "cancelled"):
                    assert data["status"] == kind, (kind, data["status"])  # the last event is a true snapshot
                    return out
                if until and until(kind, data):
                    return out
    return out


def png_b64(image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()
