"""Talking to a real Cog server (coglet) from a test: predictions sent again while it answers 409, their
outputs decoded, image inputs as data URIs, and a webhook receiver that keeps every payload."""

from __future__ import annotations

import base64
import collections
import io
import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import requests
from PIL import Image

# setup() on tiny weights, and one prediction, with room to spare on a loaded 2-core machine.
READY_TIMEOUT_S = 300
PREDICT_TIMEOUT_S = 300
# How long a request refused with 409 is sent again: the slot comes back within milliseconds.
BUSY_WAIT_S = 10
STEP_LINE = re.compile(r"^(base|refiner): step ", re.MULTILINE)
TERMINAL = {"succeeded", "failed", "canceled"}


def _post_prediction(server, **inputs) -> requests.Response:
    return requests.post(f"{server.url}/predictions", json={"input": inputs}, timeout=PREDICT_TIMEOUT_S)


def predict_when_free(server, **inputs) -> requests.Response:
    """A prediction, sent again while coglet answers 409: it frees its slot just after the previous response
    (README, "a sequential client can get 409"), and these tests send their requests back to back."""
    deadline = time.monotonic() + BUSY_WAIT_S
    while (response := _post_prediction(server, **inputs)).status_code == 409 and time.monotonic() < deadline:
        time.sleep(0.05)
    return response


def decode_outputs(response: dict) -> list[Image.Image]:
    images = []
    for uri in response["output"]:
        header, payload = uri.split(",", 1)
        assert header.startswith("data:image/")
        images.append(Image.open(io.BytesIO(base64.b64decode(payload))))
    return images


def image_of(body: dict) -> np.ndarray:
    """The first output of a prediction that must have succeeded, as RGB pixels."""
    assert body["status"] == "succeeded", body.get("error")
    header, payload = body["output"][0].split(",", 1)
    assert header.startswith("data:image/png")
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(payload))).convert("RGB"))


def steps_logged(payload: dict) -> int:
    return len(STEP_LINE.findall(payload.get("logs") or ""))


def data_uri(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode()


def png_bytes(size: tuple[int, int], color) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="PNG")
    return buffer.getvalue()


class Webhooks:
    """A loopback webhook receiver that keeps every payload coglet sends, per prediction id."""

    def __init__(self):
        self.received: dict[str, list[dict]] = collections.defaultdict(list)
        self.changed = threading.Condition()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 (http.server's naming)
                payload = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with receiver.changed:
                    receiver.received[payload["id"]].append(payload)
                    receiver.changed.notify_all()
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.http = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.http.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.http.server_address[1]}/hook"

    def wait_for(self, prediction_id: str, condition, timeout: float = PREDICT_TIMEOUT_S) -> dict:
        """The first payload for `prediction_id` that satisfies `condition`."""

        def found():
            return next((p for p in self.received[prediction_id] if condition(p)), None)

        with self.changed:
            payload = self.changed.wait_for(found, timeout)
        assert payload is not None, f"no such webhook for {prediction_id} in {timeout}s: {self.received[prediction_id]}"
        return payload

    def first_step(self, prediction_id: str, stage: str = "base") -> dict:
        return self.wait_for(prediction_id, lambda p: f"{stage}: step" in (p.get("logs") or ""))

    def steps_so_far(self, prediction_id: str) -> int:
        with self.changed:
            return max(steps_logged(p) for p in self.received[prediction_id])

    def final(self, prediction_id: str) -> dict:
        return self.wait_for(prediction_id, lambda p: p.get("status") in TERMINAL)
