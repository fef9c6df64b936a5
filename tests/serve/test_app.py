"""The HTTP app through FastAPI's TestClient: the happy path and every refusal, with its status and message."""
import io
import json
import os
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from conftest import random_image
from fastapi.testclient import TestClient
from test_bundle import save_random_bundle

from effitune.bundle import update_meta
from effitune.predict import Predictor
from effitune.serve import create_app


def png(seed=0, size=(40, 32), fmt="PNG") -> bytes:
    buffer = io.BytesIO()
    random_image(seed, size).save(buffer, fmt)
    return buffer.getvalue()


class Spy:
    """Wraps a Predictor: records batch sizes, can hold a call until released, be slow or fail."""

    def __init__(self, inner, delay=0.0, error=None):
        self.inner, self.meta, self.delay, self.error = inner, inner.meta, delay, error
        self.calls, self.started, self.release = [], threading.Event(), threading.Event()
        self.release.set()

    def predict(self, sources, top_k=5):
        self.calls.append(len(sources))
        self.started.set()
        self.release.wait(10)
        time.sleep(self.delay)
        if self.error:
            raise self.error
        return self.inner.predict(sources, top_k=top_k)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    folder = tmp_path_factory.mktemp("serve") / "model"
    save_random_bundle(folder)
    update_meta(folder, metrics={"accuracy": 0.5, "plot": str(folder / "curves.png")},
                config={"data": {"root": "/srv/private/photos"}})
    return folder


@pytest.fixture(scope="module")
def predictor(bundle):
    return Predictor(bundle)


def client_for(target, **options) -> TestClient:
    return TestClient(create_app(target, **options), raise_server_exceptions=False)


def upload(*blobs, names=None):
    names = names or [f"image{i}.png" for i in range(len(blobs))]
    return [("files", (name, blob, "application/octet-stream")) for name, blob in zip(names, blobs)]


def test_predict_one_and_several(bundle, predictor):
    with client_for(bundle) as client:
        response = client.post("/predict?top_k=2", files=upload(png(1), png(2, fmt="JPEG"), names=["a.png", "b.bin"]))
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model"] == "tf_efficientnet_lite0" and body["latency_ms"] > 0
    assert [r["filename"] for r in body["results"]] == ["a.png", "b.bin"]  # content decides, not the name
    expected = predictor.predict([png(1), png(2, fmt="JPEG")], top_k=2)
    for result, direct in zip(body["results"], expected):
        assert result["label"] == direct["label"] and len(result["top_k"]) == 2
        assert result["probability"] == pytest.approx(direct["probability"], abs=1e-6)
        assert "path" not in result


def test_health_model_and_page(bundle):
    with client_for(bundle) as client:
        health = client.get("/health").json()
        model = client.get("/model")
        page = client.get("/")
    assert health["status"] == "ok" and health["classes"] == 3 and health["auth_required"] is False
    meta = model.json()
    assert meta["classes"] == ["a", "b", "c"] and meta["backbone"] == "tf_efficientnet_lite0"
    assert meta["preprocessing"]["size"] == 32 and meta["metrics"]["accuracy"] == 0.5
    assert str(bundle.parent) not in model.text and "/srv/private" not in model.text and "config" not in meta
    assert page.status_code == 200 and "<input" in page.text
    assert "http://" not in page.text and "https://" not in page.text  # the page fetches nothing external
    assert "default-src 'none'" in page.headers["content-security-policy"]


def test_declared_body_over_the_limit_is_413_before_reading(bundle):
    with client_for(bundle, max_upload_bytes=1000) as client:
        response = client.post("/predict", files=upload(png(1, size=(200, 200))))
    assert response.status_code == 413 and "over 1000 bytes" in response.json()["detail"]


def test_streamed_body_over_the_limit_is_413(bundle):
    blob = png(1, size=(200, 200))
    body = (b"--x\r\nContent-Disposition: form-data; name=\"files\"; filename=\"a.png\"\r\n"
            b"Content-Type: image/png\r\n\r\n" + blob + b"\r\n--x--\r\n")

    def chunks():  # no Content-Length: only counting the stream catches it
        for start in range(0, len(body), 512):
            yield body[start:start + 512]

    with client_for(bundle, max_upload_bytes=1000) as client:
        response = client.post("/predict", content=chunks(), headers={"content-type": "multipart/form-data; boundary=x"})
    assert response.status_code == 413 and "over 1000 bytes" in response.json()["detail"]


def test_too_many_images_is_413(bundle):
    with client_for(bundle, max_images=2) as client:
        response = client.post("/predict", files=upload(png(1), png(2), png(3)))
    assert response.status_code == 413 and "the limit is 2" in response.json()["detail"]


def test_too_many_pixels_is_413(bundle):
    with client_for(bundle, max_pixels=1000) as client:
        response = client.post("/predict", files=upload(png(1, size=(40, 32))))
    assert response.status_code == 413 and "more than 1000 pixels" in response.json()["detail"]


@pytest.mark.parametrize("blob, expected", [
    (b"%PDF-1.4 not an image at all", "is not an image effitune can read"),
    (b"", "is empty"),
    (png(1, size=(64, 64))[:120], "not a readable image"),  # the header passes, the pixels are cut off
])
def test_non_images_are_415_by_content(bundle, blob, expected):
    with client_for(bundle) as client:
        response = client.post("/predict", files=upload(png(1), blob, names=["fine.png", "photo.jpg"]))
    assert response.status_code == 415
    detail = response.json()["detail"]
    assert expected in detail and "'photo.jpg'" in detail and "content decides" in detail


@pytest.mark.parametrize("request_options, expected", [
    ({}, "no images"),
    ({"data": {"other": "x"}}, "no images"),
    ({"json": {"files": ["a"]}}, "no images"),
    ({"params": {"top_k": 0}, "files": upload(png(1))}, "top_k"),
])
def test_malformed_requests_are_422_with_a_message(bundle, request_options, expected):
    with client_for(bundle) as client:
        response = client.post("/predict", **request_options)
    assert response.status_code == 422 and expected in response.json()["detail"]


def test_api_key(bundle):
    with client_for(bundle, api_key="s3cret") as client:
        assert client.get("/health").json()["auth_required"] is True
        missing = client.post("/predict", files=upload(png(1)))
        wrong = client.post("/predict", files=upload(png(1)), headers={"X-API-Key": "s3cre"})
        unicode = client.post("/predict", files=upload(png(1)), headers={"X-API-Key": "sécret".encode()})
        model = client.get("/model")
        right = client.post("/predict", files=upload(png(1)), headers={"X-API-Key": "s3cret"})
        model_ok = client.get("/model", headers={"X-API-Key": "s3cret"})
    assert [r.status_code for r in (missing, wrong, unicode, model)] == [401] * 4
    assert "X-API-Key" in missing.json()["detail"]
    assert right.status_code == 200 and model_ok.status_code == 200


def test_timeout_is_504(predictor):
    with client_for(Spy(predictor, delay=1.0), timeout_s=0.2) as client:
        response = client.post("/predict", files=upload(png(1)))
    assert response.status_code == 504 and "longer than 0.2 s" in response.json()["detail"]


def test_full_queue_is_503_with_retry_after(predictor):
    spy = Spy(predictor)
    spy.release.clear()
    with client_for(spy, workers=1, queue_size=0) as client, ThreadPoolExecutor(1) as background:
        first = background.submit(client.post, "/predict", files=upload(png(1)))
        assert spy.started.wait(10)
        refused = client.post("/predict", files=upload(png(2)))
        assert client.get("/health").json()["in_flight"] == 1
        spy.release.set()
        assert first.result(10).status_code == 200
        after = client.post("/predict", files=upload(png(3)))
    assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
    assert "busy" in refused.json()["detail"] and after.status_code == 200


def test_internal_errors_are_500_without_details(predictor):
    with client_for(Spy(predictor, error=RuntimeError("boom in /srv/secret/file.py"))) as client:
        response = client.post("/predict", files=upload(png(1)))
    assert response.status_code == 500
    assert response.json() == {"detail": "internal server error; the server log has the details"}
    assert "secret" not in response.text and "Traceback" not in response.text


def wait_until(condition, seconds: float = 30) -> None:
    """Wait for `condition` (another thread's progress); the bound is a failure, never the pass criterion."""
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.005)


def test_concurrent_requests_share_a_batch(predictor):
    spy = Spy(predictor)
    spy.release.clear()
    blobs = [png(seed) for seed in range(6)]
    with client_for(spy, workers=1, batch_window_ms=20) as client, ThreadPoolExecutor(6) as background:
        holder = background.submit(client.post, "/predict", files=upload(png(99)))
        assert spy.started.wait(10)  # the only worker is busy: the next five requests queue up together
        queued = [background.submit(client.post, f"/predict?top_k={1 + i % 3}", files=upload(blob))
                  for i, blob in enumerate(blobs[:5])]
        wait_until(lambda: client.app.state.pool.queued == 5)  # all five arrived: none left to a timer
        spy.release.set()
        responses = [future.result(10) for future in [holder, *queued]]
    assert all(r.status_code == 200 for r in responses)
    assert spy.calls == [1, 5]
    expected = predictor.predict(blobs[:5], top_k=3)
    for i, (response, direct) in enumerate(zip(responses[1:], expected)):
        result = response.json()["results"][0]
        assert len(result["top_k"]) == 1 + i % 3  # each request keeps its own top_k
        assert result["probability"] == pytest.approx(direct["probability"], abs=1e-5)


def test_openapi_documents_predict(bundle):
    with client_for(bundle) as client:
        schema = client.get("/openapi.json").json()
    assert {"413", "415", "503", "504"} <= set(schema["paths"]["/predict"]["post"]["responses"])
    assert json.dumps(schema).count("X-API-Key") >= 1


def test_cli_serves_on_localhost_with_the_key_from_the_environment(bundle):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "effitune.cli", "serve", str(bundle), "--port", str(port),
                               "--workers", "1"], env={**os.environ, "EFFITUNE_API_KEY": "from-env"},
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(300):
            assert server.poll() is None, server.stderr.read()
            try:
                health = httpx.get(f"{base}/health", timeout=1)
                break
            except httpx.TransportError:
                time.sleep(0.1)
        else:
            pytest.fail("effitune serve did not answer /health within 30 s")
        assert health.json()["auth_required"] is True
        refused = httpx.post(f"{base}/predict", files=upload(png(1)))
        served = httpx.post(f"{base}/predict", files=upload(png(1)), headers={"X-API-Key": "from-env"})
    finally:
        server.terminate()
        server.wait(30)
    assert refused.status_code == 401 and served.status_code == 200
    assert served.json()["results"][0]["label"] in ("a", "b", "c")


def test_cli_says_when_it_cannot_listen(bundle):
    from typer.testing import CliRunner

    from effitune.cli import app

    runner = CliRunner()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        busy = runner.invoke(app, ["serve", str(bundle), "--port", str(port)])
    assert busy.exit_code == 2 and f"cannot listen on 127.0.0.1:{port}" in busy.output and "--port N" in busy.output
    out_of_range = runner.invoke(app, ["serve", str(bundle), "--port", "99999"])
    assert out_of_range.exit_code == 2 and "Traceback" not in out_of_range.output
