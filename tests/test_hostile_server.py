"""Hostile and faulty traffic through the real Cog server (coglet) on tiny weights, loopback only: file
inputs that are not downloads, failed and partial downloads, prompts over the budget, an operator's
files next to the outputs, and an upload to --upload-url that fails."""

from __future__ import annotations

import io
import os
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
import requests
from PIL import Image

from devtools.cog_server import CogServer, free_port
from sdxl_cog.config import MAX_PROMPT_TOKENS
from sdxl_cog.inputs.uploads import MATERIALISED_NAME, STALE_INPUT_AGE_S, refusal
from tests.conftest import REPO_ROOT
from tests.helpers.server import PREDICT_TIMEOUT_S, READY_TIMEOUT_S, data_uri, image_of, png_bytes

CHEAP = {"prompt": "x", "width": 256, "height": 256, "num_inference_steps": 2, "seed": 3, "apply_watermark": False}
SOURCE = png_bytes((256, 256), (200, 60, 30))
# Black except a white square: what an attacker pairs with a server path to read the file back.
MASK = np.zeros((256, 256), dtype=np.uint8)
MASK[100:120, 100:120] = 255


def mask_png() -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(MASK).save(buffer, format="PNG")
    return buffer.getvalue()


class Origin:
    """A loopback HTTP server for image inputs and --upload-url: well-behaved, failing or lying per path."""

    def __init__(self):
        self.puts: list[str] = []
        origin = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self):  # noqa: N802 (http.server's naming)
                if self.path.startswith("/missing/"):
                    self._reply(404, b"")
                elif self.path.startswith("/truncated/"):
                    # No Content-Length: the body simply ends early, and the client cannot tell.
                    self.send_response(200)
                    self.send_header("Connection", "close")
                    self.end_headers()
                    self.wfile.write(SOURCE[: len(SOURCE) // 2])
                    self.close_connection = True
                else:
                    self._reply(200, SOURCE)

            def do_PUT(self):  # noqa: N802
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                origin.puts.append(self.path)
                self._reply(500, b"")

            def _reply(self, status: int, body: bytes):
                self.send_response(status)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.http = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.http.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.http.server_address[1]}"


@pytest.fixture(scope="module")
def origin():
    server = Origin()
    yield server
    server.http.shutdown()


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    return tmp_path_factory.mktemp("hostile")


def server_env(tiny_weights, scratch) -> dict[str, str]:
    return {
        "SDXL_WEIGHTS_DIR": str(tiny_weights),
        "SDXL_OUTPUT_DIR": str(scratch / "outputs"),
        "SDXL_INPUT_DIR": str(scratch / "inputs"),
        "SDXL_OUTPUT_KEEP": "2",
    }


@pytest.fixture(scope="module")
def server(tiny_weights, scratch):
    env = server_env(tiny_weights, scratch)
    with CogServer(cwd=REPO_ROOT, env=env, ready_timeout=READY_TIMEOUT_S, log_path=scratch / "server.log") as running:
        yield running


def predict(server, **inputs) -> dict:
    server.wait_for_status("READY", 10)
    response = requests.post(f"{server.url}/predictions", json={"input": inputs}, timeout=PREDICT_TIMEOUT_S)
    assert response.status_code == 200, response.text
    return response.json()


# --- image / mask: downloads only, never a server path -----------------------------------------------


def test_data_uris_and_loopback_urls_still_work(server, origin):
    by_data = image_of(predict(server, **CHEAP, image=data_uri(SOURCE), mask=data_uri(mask_png())))
    by_url = image_of(predict(server, **CHEAP, image=f"{origin.url}/ok/source.png", mask=data_uri(mask_png())))
    assert np.array_equal(by_data, by_url)
    # Inpainting keeps the black part of the mask exactly: proof that the source really was read.
    assert np.array_equal(by_data[MASK == 0], np.asarray(Image.open(io.BytesIO(SOURCE)))[MASK == 0])


@pytest.fixture(scope="module")
def server_paths(server, scratch) -> dict[str, str]:
    """Paths to images the server can read, and ones that do not exist, in every form a client may try."""
    secret = scratch / "secret" / "operator.png"
    secret.parent.mkdir()
    secret.write_bytes(png_bytes((256, 256), (1, 2, 3)))
    inputs = scratch / "inputs"
    # Named and placed exactly like coglet's own downloads, but a link to the secret.
    (inputs / "tmpabcdefghfile.png").symlink_to(secret)
    (scratch / "link.png").symlink_to(secret)
    relative = os.path.relpath(secret, REPO_ROOT)
    return {
        "absolute": str(secret),
        "absolute, missing": str(secret.with_name("missing.png")),
        "relative": relative,
        "relative, missing": "missing.png",
        "dot-dot": str(inputs / ".." / "secret" / "operator.png"),
        "dot-dot relative": "../" * 8 + str(secret).lstrip("/"),
        "symlink named like a download": str(inputs / "tmpabcdefghfile.png"),
        "symlink": str(scratch / "link.png"),
    }


@pytest.mark.parametrize("field", ["image", "mask"])
def test_server_paths_are_refused_with_one_message_that_says_nothing_about_them(server, server_paths, field):
    errors = {}
    for name, path in server_paths.items():
        inputs = {"image": path} if field == "image" else {"image": data_uri(SOURCE), "mask": path}
        body = predict(server, **CHEAP, **inputs)
        assert body["status"] == "failed", (name, body.get("output"))
        errors[name] = body["error"]
    assert len(set(errors.values())) == 1, errors  # existing or not, file or link: the same words
    message = errors["absolute"]
    assert message.endswith(f"InputError: {refusal(field)}")
    assert str(refusal(field)) == (
        f"{field} must be sent as a data: URI or an http(s) URL (the server downloads it); "
        "paths of files on the server are not accepted."
    )
    assert server.wait_for_status("READY", 10)


# --- failed and partial downloads --------------------------------------------------------------------


def leftovers(scratch) -> set[str]:
    return {p.name for p in (scratch / "inputs").iterdir() if MATERIALISED_NAME.match(p.name) and not p.is_symlink()}


def test_failed_downloads_fail_clearly_and_their_leftovers_are_swept(server, origin, scratch):
    before = leftovers(scratch)
    refused = predict(server, **CHEAP, image=f"http://127.0.0.1:{free_port()}/gone.png")
    missing = predict(server, **CHEAP, image=f"{origin.url}/missing/x.png")
    assert refused["status"] == missing["status"] == "failed"
    assert "Connection refused" in refused["error"]  # coglet's own text: it fails before predict()
    assert "404" in missing["error"]
    # coglet leaves the temporary file of a failed download behind...
    left = leftovers(scratch) - before
    assert len(left) == 2, left
    # ...until no download can still be writing to it: then the next prediction removes it.
    operator_file = scratch / "inputs" / "notes.txt"
    operator_file.write_text("not coglet's")
    old = time.time() - STALE_INPUT_AGE_S - 60
    for name in left | {operator_file.name}:
        os.utime(scratch / "inputs" / name, (old, old))
    image_of(predict(server, **CHEAP))
    assert not leftovers(scratch) & left
    assert operator_file.read_text() == "not coglet's"


def test_a_partial_download_reaches_the_predictor_as_a_clear_error(server, origin):
    body = predict(server, **CHEAP, image=f"{origin.url}/truncated/x.png")
    assert body["status"] == "failed"
    assert "image could not be decoded: it is truncated or corrupt" in body["error"]


# --- prompt length -----------------------------------------------------------------------------------


@pytest.mark.parametrize("field", ["prompt", "negative_prompt"])
def test_prompts_over_the_token_budget_are_refused_naming_the_limit(server, field):
    # The test weights' tokenizer makes one token of every character (devtools/synthetic.py).
    body = predict(server, **{**CHEAP, field: "a" * (MAX_PROMPT_TOKENS + 1)})
    assert body["status"] == "failed"
    assert f"{field} is {MAX_PROMPT_TOKENS + 1} tokens long; at most {MAX_PROMPT_TOKENS} tokens" in body["error"]
    at_limit = predict(server, **{**CHEAP, field: "a" * MAX_PROMPT_TOKENS})
    assert at_limit["status"] == "succeeded", at_limit.get("error")


# --- nothing of the operator's deleted --------------------------------------------------------------


def test_predictions_remove_only_their_own_old_outputs(server, scratch):
    outputs = scratch / "outputs"
    outputs.mkdir(exist_ok=True)
    (outputs / "operator.txt").write_text("mine")
    (outputs / "operator-dir").mkdir(exist_ok=True)
    made = []
    for _ in range(4):
        body = predict(server, **CHEAP)
        (name,) = body["metrics"]["output_files"]
        made.append(outputs / name)
    # SDXL_OUTPUT_KEEP=2: the two latest predictions' files stay, older ones of this server go.
    assert [p.exists() for p in made] == [False, False, True, True]
    assert (outputs / "operator.txt").read_text() == "mine" and (outputs / "operator-dir").is_dir()


# --- a failed upload to --upload-url ------------------------------------------------------------------


def test_a_failed_upload_still_says_what_was_generated_and_the_file_is_kept(tiny_weights, tmp_path, origin):
    env = server_env(tiny_weights, tmp_path)
    args = ("--upload-url", f"{origin.url}/upload/")
    with CogServer(cwd=REPO_ROOT, env=env, ready_timeout=READY_TIMEOUT_S, args=args) as server:
        body = predict(server, **CHEAP)
    assert body["status"] == "failed"
    assert body["error"] == "Failed to upload output: upload returned status 500 Internal Server Error"
    (name,) = body["metrics"]["output_files"]
    assert origin.puts[-1] == "/upload/" + name.split("/")[-1]
    assert body["metrics"]["seeds"] == [CHEAP["seed"]]
    kept = tmp_path / "outputs" / name
    assert Image.open(kept).size == (256, 256)
