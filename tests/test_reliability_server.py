"""Reliability through the real Cog server (coglet), with tiny synthetic weights: cancellation (explicit
and by client disconnect) within a denoising step and without leaking state, 409 while busy without
disturbing the running prediction, bad images refused cleanly, and short runs of script/soak and
script/fuzz against the same server.

Figures worth reporting (time from cancel to READY, steps after the cancel, soak memory, raw 409s) are
printed; see them with `pytest -s` or `-rP`. Requests go out as soon as the previous answer arrived, with no
wait for READY in between: coglet frees its slot just after a response, so some get a raw 409 (README,
"Known runtime behaviour"). Those are sent again, counted apart from failures and printed at the end.
"""

from __future__ import annotations

import json
import struct
import subprocess
import sys
import time
import zlib

import numpy as np
import psutil
import pytest
import requests
from safetensors.torch import save_file

from devtools.cog_server import CogServer
from devtools.synthetic import lora_state_dict
from tests.conftest import REPO_ROOT
from tests.helpers.server import (
    BUSY_WAIT_S,
    PREDICT_TIMEOUT_S,
    READY_TIMEOUT_S,
    Webhooks,
    data_uri,
    image_of,
    png_bytes,
    steps_logged,
)

# The image every leak check compares against: cheap, seeded, with the default sampler and watermark.
REFERENCE = {"prompt": "a red fox in the snow", "width": 256, "height": 256, "num_inference_steps": 3, "seed": 1234}
# Long enough (a few tenths of a second per step on 2 cores) to still be denoising when cancelled.
LONG = {"prompt": "a slow river", "width": 512, "height": 512, "num_inference_steps": 200, "seed": 7}
# What cancelled requests change that must not outlive them (`lora_weights` is added by the test);
# IN_THE_REFINER is cancelled while its refiner denoises.
EVERYTHING_DIFFERENT = {"scheduler": "KarrasDPM", "refine": "expert_ensemble_refiner", "apply_watermark": False}
IN_THE_REFINER = {"scheduler": "DDIM", "refine": "base_image_refiner", "num_inference_steps": 2, "refine_steps": 200}
# A cancel lands at the next Python bytecode, and each step ends in a Python callback: the step
# running when the cancel arrives may finish and log, one more at most if a log line was in flight.
MAX_STEPS_AFTER_CANCEL = 2
# The cancelled work must really stop: an idle worker burns nothing, a denoising one ~1 CPU-second a second.
IDLE_CPU_SECONDS = 0.3
MAX_SECONDS_TO_READY = 5


@pytest.fixture(scope="module")
def lora_path(tiny_weights, tmp_path_factory):
    directory = tmp_path_factory.mktemp("server-loras")
    path = directory / "peft.safetensors"
    save_file({f"unet.{k}": v for k, v in lora_state_dict(tiny_weights).items()}, path)
    return path


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    root = tmp_path_factory.mktemp("reliability")
    (root / "tmp").mkdir()
    return root


@pytest.fixture(scope="module")
def server(tiny_weights, lora_path, scratch):
    env = {
        "SDXL_WEIGHTS_DIR": str(tiny_weights),
        "SDXL_OUTPUT_DIR": str(scratch / "outputs"),
        "SDXL_LORA_LOCAL_DIRS": str(lora_path.parent),
        # Its own temp directory, so that the soak below measures this server's files alone.
        "TMPDIR": str(scratch / "tmp"),
    }
    with CogServer(cwd=REPO_ROOT, env=env, ready_timeout=READY_TIMEOUT_S, log_path=scratch / "server.log") as running:
        running.requests_sent, running.raw_409s = 0, 0
        yield running
        print(
            f"\nRaw 409s (coglet's slot released after the response; each sent again, not failures): "
            f"{running.raw_409s} of {running.requests_sent} requests"
        )


@pytest.fixture(scope="module")
def webhooks():
    receiver = Webhooks()
    yield receiver
    receiver.http.shutdown()


@pytest.fixture(scope="module")
def reference(server) -> np.ndarray:
    return image_of(predict(server, **REFERENCE))


def send(server, method: str, path: str, **kwargs) -> requests.Response:
    """A request sent at once, and again while coglet answers 409 (for up to BUSY_WAIT_S); each 409 counted."""
    deadline = time.monotonic() + BUSY_WAIT_S
    while True:
        server.requests_sent += 1
        response = requests.request(method, f"{server.url}{path}", **kwargs)
        if response.status_code != 409 or time.monotonic() > deadline:
            return response
        server.raw_409s += 1
        server.wait_for_status("READY", BUSY_WAIT_S)


def predict(server, **inputs) -> dict:
    response = send(server, "POST", "/predictions", json={"input": inputs}, timeout=PREDICT_TIMEOUT_S)
    assert response.status_code == 200, response.text
    return response.json()


def start_async(server, webhooks, prediction_id: str, **inputs) -> None:
    response = send(
        server,
        "PUT",
        f"/predictions/{prediction_id}",
        json={"input": inputs, "webhook": webhooks.url, "webhook_events_filter": ["start", "logs", "completed"]},
        headers={"Prefer": "respond-async"},
        timeout=30,
    )
    assert response.status_code == 202, response.text


def worker(server) -> psutil.Process:
    children = psutil.Process(server.process.pid).children(recursive=True)
    return next(p for p in children if "_run_worker" in " ".join(p.cmdline()))


def cpu_seconds_over(process: psutil.Process, seconds: float = 1.0) -> float:
    before = sum(process.cpu_times()[:2])
    time.sleep(seconds)
    return sum(process.cpu_times()[:2]) - before


def seconds_until_ready(server, since: float, timeout: float = 30) -> float:
    """Polled every 10 ms (CogServer.wait_for_status polls every 200 ms: too coarse to measure this)."""
    while server.health()["status"] != "READY":
        assert time.monotonic() - since < timeout, f"not READY {timeout}s after: {server.health()}"
        time.sleep(0.01)
    return time.monotonic() - since


def png_declaring(width: int, height: int) -> bytes:
    """A valid PNG header declaring width x height over a few bytes of pixel data: a decompression bomb."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")
    )


# --- Cancellation -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "cancelled, stage",
    [
        pytest.param({}, "base", id="plain"),
        pytest.param(EVERYTHING_DIFFERENT, "base", id="lora-karras-ensemble-no-watermark"),
        pytest.param(IN_THE_REFINER, "refiner", id="lora-ddim-in-the-refiner"),
    ],
)
def test_cancel_stops_within_a_step_and_the_next_request_is_unaffected(
    server, webhooks, reference, lora_path, cancelled, stage
):
    prediction_id = f"cancel-{time.monotonic_ns()}"
    inputs = {**LONG, **cancelled}
    if cancelled:
        inputs["lora_weights"] = str(lora_path)
        # The LoRA really changes images, so an exact match afterwards proves it was switched off.
        assert not np.array_equal(image_of(predict(server, **REFERENCE, lora_weights=str(lora_path))), reference)
    start_async(server, webhooks, prediction_id, **inputs)
    webhooks.first_step(prediction_id, stage)

    steps_before, cancelled_at = webhooks.steps_so_far(prediction_id), time.monotonic()
    assert requests.post(f"{server.url}/predictions/{prediction_id}/cancel", timeout=10).status_code == 200
    to_ready = seconds_until_ready(server, cancelled_at)
    final = webhooks.final(prediction_id)
    steps_after = steps_logged(final) - steps_before
    idle_cpu = cpu_seconds_over(worker(server))
    print(
        f"\n[{prediction_id}] cancel -> READY {to_ready * 1000:.0f} ms, steps after cancel {steps_after}, "
        f"worker CPU in the next second {idle_cpu:.2f} s"
    )

    assert final["status"] == "canceled"
    assert to_ready < MAX_SECONDS_TO_READY
    assert steps_after <= MAX_STEPS_AFTER_CANCEL
    assert idle_cpu < IDLE_CPU_SECONDS, "the worker is still computing after the cancel"
    after = predict(server, **REFERENCE)
    assert steps_logged(after) == REFERENCE["num_inference_steps"], "the cancelled run's steps leaked in"
    assert np.array_equal(image_of(after), reference)


def test_client_disconnect_cancels_and_the_server_is_ready_at_once(server, reference):
    server.wait_for_status("READY", 10)
    with pytest.raises(requests.ReadTimeout):
        requests.post(f"{server.url}/predictions", json={"input": LONG}, timeout=(5, 2))
    disconnected_at = time.monotonic()
    to_ready = seconds_until_ready(server, disconnected_at)
    idle_cpu = cpu_seconds_over(worker(server))
    print(f"\n[disconnect] -> READY {to_ready * 1000:.0f} ms, worker CPU in the next second {idle_cpu:.2f} s")
    assert to_ready < MAX_SECONDS_TO_READY
    assert idle_cpu < IDLE_CPU_SECONDS
    assert np.array_equal(image_of(predict(server, **REFERENCE)), reference)


# --- Concurrency ------------------------------------------------------------------------------------


def test_requests_beyond_the_slot_get_409_and_the_running_prediction_completes_unchanged(server, webhooks):
    running = {**REFERENCE, "num_inference_steps": 40, "seed": 99}
    start_async(server, webhooks, "busy-1", **running)
    webhooks.first_step("busy-1")

    assert server.health()["status"] == "BUSY"
    second = requests.post(f"{server.url}/predictions", json={"input": REFERENCE}, timeout=30)
    assert second.status_code == 409, second.text
    assert "busy" in second.json()["error"]
    third = requests.put(f"{server.url}/predictions/busy-2", json={"input": REFERENCE}, timeout=30)
    assert third.status_code == 409, third.text

    final = webhooks.final("busy-1")
    assert final["status"] == "succeeded", final.get("error")
    assert final["metrics"]["base_steps"] == 40
    assert np.array_equal(image_of(final), image_of(predict(server, **running)))


# --- Bad images -------------------------------------------------------------------------------------

SOURCE = png_bytes((256, 256), (200, 60, 30))


@pytest.mark.parametrize(
    "inputs, message",
    [
        pytest.param({"image": data_uri(b"hello, not an image", "text/plain")}, "not an image file", id="not-an-image"),
        pytest.param({"image": data_uri(png_declaring(100_000, 100_000))}, "megapixels", id="decompression-bomb"),
        pytest.param({"image": data_uri(SOURCE[: len(SOURCE) // 2])}, "truncated or corrupt", id="truncated-png"),
        pytest.param(
            {"image": data_uri(SOURCE), "mask": data_uri(png_bytes((256, 256), "black"))},
            "entirely black",
            id="all-black-mask",
        ),
    ],
)
def test_bad_image_fails_with_a_clear_message_and_the_server_stays_ready(server, inputs, message):
    body = predict(server, prompt="x", num_inference_steps=2, **inputs)
    assert body["status"] == "failed"
    assert message in body["error"]
    assert "Traceback" not in body["error"] and 'File "' not in body["error"]
    assert server.wait_for_status("READY", 10)


def test_mask_of_another_size_is_fitted_to_the_image(server):
    inputs = {"image": data_uri(SOURCE), "mask": data_uri(png_bytes((64, 32), "white")), "num_inference_steps": 3}
    assert image_of(predict(server, prompt="x", **inputs)).shape == (256, 256, 3)


def test_img2img_with_no_step_left_after_strength_fails_with_a_clear_message(server):
    body = predict(server, prompt="x", image=data_uri(SOURCE), num_inference_steps=1, prompt_strength=0.8)
    assert body["status"] == "failed"
    assert "leaves no denoising step" in body["error"] and "num_inference_steps >= 2" in body["error"]


# --- Load: short runs of script/soak and script/fuzz (the long ones are `make soak` / `make fuzz`) -----


def run_script(name: str, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    command = [sys.executable, str(REPO_ROOT / "script" / name), *args]
    done = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout)
    print(done.stdout[-3000:])
    return done


def test_short_soak_has_no_failure_and_bounded_growth(server, scratch, tmp_path):
    report_path = tmp_path / "soak.json"
    server.wait_for_status("READY", 10)
    done = run_script(
        "soak",
        *("--count", "20", "--url", server.url, "--server-pid", str(server.process.pid)),
        *("--output-dir", str(scratch / "outputs"), "--tmp-dir", str(scratch / "tmp"), "--json", str(report_path)),
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads(report_path.read_text())
    assert report["failures"] == 0 and report["final_health"] == "READY"
    assert report["worker_rss_growth_mb"] is not None
    # Raw 409s are reported apart from failures, in the summary and the JSON report.
    assert report["posts"] == 20 + report["raw_409s"]
    assert "Raw 409s (not failures" in done.stdout and f"{report['raw_409s']} of {report['posts']} POSTs" in done.stdout


def test_short_fuzz_run_finds_no_server_error_and_leaves_the_worker_alive(server, tmp_path):
    report_path = tmp_path / "fuzz.json"
    server.wait_for_status("READY", 10)
    done = run_script(
        "fuzz",
        *("--url", server.url, "--server-pid", str(server.process.pid), "--phases", "fuzzing"),
        # The schema has Cog's four operations (as `cog build` writes it): 12 examples each give 20 or more.
        *("--max-examples", "12", "--json", str(report_path)),
    )
    assert done.returncode == 0, done.stdout[-5000:] + done.stderr[-3000:]
    report = json.loads(report_path.read_text())
    assert report["cases"] >= 20 and report["final_health"] == "READY"
    assert report["worker_pid"][0] == report["worker_pid"][1]
