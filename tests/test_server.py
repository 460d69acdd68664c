"""predict.py through the real Cog server (coglet) on a loopback port, with tiny synthetic weights."""

from __future__ import annotations

import base64
import io
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import requests
from PIL import Image

from devtools.cog_server import CogServer
from tests.conftest import REPO_ROOT
from tests.helpers.server import PREDICT_TIMEOUT_S, READY_TIMEOUT_S, decode_outputs, predict_when_free


@pytest.fixture(scope="module")
def server(tiny_weights, tmp_path_factory):
    scratch = tmp_path_factory.mktemp("server")
    env = {"SDXL_WEIGHTS_DIR": str(tiny_weights), "SDXL_OUTPUT_DIR": str(scratch / "outputs")}
    with CogServer(cwd=REPO_ROOT, env=env, ready_timeout=READY_TIMEOUT_S, log_path=scratch / "server.log") as running:
        yield running


def test_health_is_ready(server):
    assert server.health()["status"] == "READY"


def test_prediction_returns_images_of_the_requested_size_and_count(server):
    response = predict_when_free(
        server, prompt="a castle", width=256, height=192, num_outputs=2, num_inference_steps=2, seed=5
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["status"] == "succeeded", body.get("error")
    images = decode_outputs(body)
    assert [img.size for img in images] == [(256, 192), (256, 192)]
    assert body["metrics"]["seeds"] == [5, 6]
    assert body["metrics"]["base_steps"] == 2
    assert "base: step 2/2" in body["logs"]
    # Peak GPU memory is reported only where there is a GPU.
    assert not {"gpu_peak_memory_bytes", "gpu_memory_fraction"} & set(body["metrics"])


def test_out_of_range_input_is_a_422_naming_the_field(server):
    response = predict_when_free(server, prompt="x", num_outputs=9)
    assert response.status_code == 422
    assert any(err["loc"][-1] == "num_outputs" for err in response.json()["detail"])


def test_unknown_scheduler_is_a_422(server):
    response = predict_when_free(server, prompt="x", scheduler="NotASampler")
    assert response.status_code == 422
    assert "scheduler" in response.text


def test_invalid_size_fails_with_a_clear_message_and_the_server_keeps_serving(server):
    response = predict_when_free(server, prompt="x", width=300, height=256, num_inference_steps=1)
    body = response.json()
    assert body["status"] == "failed"
    assert "width=300 is not a multiple of 8; use 296 or 304" in body["error"]
    after = predict_when_free(server, prompt="x", width=256, height=256, num_inference_steps=1)
    assert after.json()["status"] == "succeeded"


class _WebhookReceiver(BaseHTTPRequestHandler):
    received: list[dict] = []
    done = threading.Event()

    def do_POST(self):  # noqa: N802 (http.server's naming)
        payload = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).received.append(payload)
        if payload.get("status") in {"succeeded", "failed", "canceled"}:
            type(self).done.set()
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args):
        pass


def test_async_prediction_delivers_completed_webhook(server):
    receiver = ThreadingHTTPServer(("127.0.0.1", 0), _WebhookReceiver)
    threading.Thread(target=receiver.serve_forever, daemon=True).start()
    try:
        response = requests.post(
            f"{server.url}/predictions",
            json={
                "input": {"prompt": "a boat", "width": 256, "height": 256, "num_inference_steps": 2},
                "webhook": f"http://127.0.0.1:{receiver.server_address[1]}/hook",
                "webhook_events_filter": ["completed"],
            },
            headers={"Prefer": "respond-async"},
            timeout=30,
        )
        assert response.status_code == 202, response.text
        assert _WebhookReceiver.done.wait(PREDICT_TIMEOUT_S)
        final = _WebhookReceiver.received[-1]
        assert final["status"] == "succeeded"
        assert decode_outputs(final)[0].size == (256, 256)
    finally:
        receiver.shutdown()


def test_refiner_only_without_an_image_fails_naming_the_fix_and_with_one_refines_it(server, tmp_path):
    body = predict_when_free(server, prompt="x", refine="refiner_only").json()
    assert body["status"] == "failed"
    assert "refine=refiner_only refines an existing image, but no image was given: pass image" in body["error"]

    source = io.BytesIO()
    Image.new("RGB", (256, 192), (200, 40, 40)).save(source, format="PNG")
    uri = "data:image/png;base64," + base64.b64encode(source.getvalue()).decode()
    body = predict_when_free(server, prompt="x", image=uri, refine="refiner_only", refine_steps=2, seed=1).json()
    assert body["status"] == "succeeded", body.get("error")
    assert [img.size for img in decode_outputs(body)] == [(256, 192)]
    assert body["metrics"]["refiner_steps"] == 2 and "base_steps" not in body["metrics"]
