"""test_request.py, run as users run it, against the real Cog server with the dummy predictor, predict.py
on tiny weights, and a predictor that holds the slot (busy server)."""

import concurrent.futures
import contextlib
import importlib.util
import json
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import requests
from PIL import Image

from devtools.cog_server import DUMMY_PREDICTOR_REF, REPO_ROOT, CogServer, free_port
from devtools.gateway import Gateway, nginx_available
from sdxl_cog.schema.openapi import build_schema

CLIENT = REPO_ROOT / "test_request.py"
GATED_REF = f"{REPO_ROOT / 'tests/fixtures/probe_predictors.py'}:Gated"
SERVER_START_S = 60
# Strictly sequential requests: each is sent when the previous answer has arrived. coglet frees its slot
# a moment after a sync response, so without retries a few percent of these get 409 (bench/sequential_409.py).
SEQUENTIAL_REQUESTS = 200
SEQUENTIAL_SDXL_REQUESTS = 100
BUSY_WAIT_S = 2
RETRIED = re.compile(r"sent again (\d+) time\(s\), waited ([\d.]+) s")
GAVE_UP = re.compile(r"server still busy \(HTTP 409\) after (\d+) retries over ([\d.]+) s")


def load_client():
    spec = importlib.util.spec_from_file_location("test_request_client", CLIENT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


client = load_client()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    cwd = tmp_path_factory.mktemp("client-server")
    with CogServer(DUMMY_PREDICTOR_REF, cwd=cwd, log_path=cwd / "server.log") as server:
        yield server


def run_client(*args: str, url: str) -> subprocess.CompletedProcess:
    return subprocess.run(client_command(*args, url=url), capture_output=True, text=True, timeout=60)


def client_command(*args: str, url: str) -> list[str]:
    return [sys.executable, str(CLIENT), "--url", url, *args]


def test_saves_outputs_and_prints_metrics(server, tmp_path):
    inputs = ["-i", "width=16", "-i", "seed=7", "-i", "num_outputs=2", "-i", "apply_watermark=false"]
    done = run_client(*inputs, "--output-dir", str(tmp_path), "--logs", url=server.url)
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["output-0.png", "output-1.png"]
    assert Image.open(tmp_path / "output-1.png").size == (16, 16)
    assert f"saved {tmp_path / 'output-0.png'}" in done.stdout
    assert '"seeds": [\n    7,\n    8\n  ]' in done.stdout
    assert "painted 2 image(s) with K_EULER, watermark=False" in done.stdout


def test_file_inputs_arrive(server, tmp_path):
    photo = tmp_path / "photo.png"
    Image.new("RGB", (8, 8), (1, 2, 3)).save(photo)
    done = run_client("-i", "width=8", "-i", f"image=@{photo}", "--output-dir", str(tmp_path / "out"), url=server.url)
    assert done.returncode == 0, done.stderr
    assert f'"image_bytes": {photo.stat().st_size}' in done.stdout


def test_failed_prediction_exits_with_the_error(server, tmp_path):
    done = run_client("-i", "width=8", "-i", "prompt=fail", "--output-dir", str(tmp_path), url=server.url)
    assert done.returncode == 1
    assert "prediction failed" in done.stderr and "dummy predictor failure" in done.stderr
    assert not list(tmp_path.iterdir())


def test_invalid_input_exits_with_the_detail(server, tmp_path):
    done = run_client("-i", "width=4", "-i", "scheduler=PNDM", "--output-dir", str(tmp_path), url=server.url)
    assert done.returncode == 1
    assert "HTTP 422" in done.stderr
    assert "width: 4 is less than the minimum of 8" in done.stderr
    assert 'scheduler: "PNDM" is not one of' in done.stderr


def test_health(server):
    done = run_client("--health", url=server.url)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["status"] == "READY"


def test_unreachable_server_is_a_clear_error():
    done = run_client("-i", "width=8", url=f"http://127.0.0.1:{free_port()}")
    assert done.returncode == 1
    assert "cannot connect to a Cog server" in done.stderr


def test_values_follow_the_schema_types():
    types = {
        "steps": {"type": "integer"},
        "scale": {"type": "number"},
        "refine": {"type": "boolean"},
        "prompt": {"type": "string"},
        "tags": {"type": "array", "items": {"type": "string"}},
    }
    pairs = ["steps=30", "scale=7", "refine=False", "prompt=42", "tags=a", "tags=b", "extra=[1, 2]", "word=hi"]
    assert client.build_input(pairs, types) == {
        "steps": 30,
        "scale": 7.0,
        "refine": False,
        "prompt": "42",
        "tags": ["a", "b"],
        "extra": [1, 2],
        "word": "hi",
    }
    with pytest.raises(client.RequestError, match="steps='many' is not a valid integer"):
        client.build_input(["steps=many"], types)


def test_file_values_become_data_uris(tmp_path):
    photo = tmp_path / "photo.jpg"
    photo.write_bytes(b"\xff\xd8jpeg")
    assert client.coerce("image", f"@{photo}", {"type": "string"}) == "data:image/jpeg;base64,/9hqcGVn"
    with pytest.raises(client.RequestError, match="input file not found"):
        client.coerce("image", "@missing.png", None)


def test_the_control_inputs_of_predict_py_are_sent_as_their_json_types(tmp_path):
    photo = tmp_path / "edges.png"
    Image.new("RGB", (8, 8), (1, 2, 3)).save(photo)
    types = client.schema_input_types(build_schema())
    pairs = [
        "controlnet_1=canny",
        f"controlnet_1_image=@{photo}",
        "controlnet_1_preprocess=false",
        "controlnet_1_conditioning_scale=1",
        "controlnet_3_end=0.5",
        f"ip_adapter_image=@{photo}",
        "ip_adapter_scale=0",
    ]
    assert client.build_input(pairs, types) == {
        "controlnet_1": "canny",
        "controlnet_1_image": client.data_uri(photo),
        "controlnet_1_preprocess": False,
        "controlnet_1_conditioning_scale": 1.0,
        "controlnet_3_end": 0.5,
        "ip_adapter_image": client.data_uri(photo),
        "ip_adapter_scale": 0.0,
    }
    assert client.data_uri(photo).startswith("data:image/png;base64,")
    with pytest.raises(client.RequestError, match="controlnet_2_preprocess='maybe' is not a valid boolean"):
        client.build_input(["controlnet_2_preprocess=maybe"], types)


def test_busy_server_is_an_error():
    response = requests.Response()
    response.status_code = 409
    response._content = b"At capacity - all prediction slots busy"
    with pytest.raises(client.RequestError, match="server busy \\(HTTP 409\\): At capacity"):
        client.check_response(response)


# --- 409: busy, try again ---------------------------------------------------------------------------------


def sequential_predictions(url: str, inputs: dict, count: int) -> tuple[list[str], int]:
    """`count` predictions, each sent after the previous answer, through the client's retrying POST."""
    failures, retries = [], 0
    for index in range(count):
        response, busy = client.post_prediction(url, {"input": inputs}, 120, client.DEFAULT_BUSY_WAIT_S)
        retries += busy.retries
        try:
            prediction = client.check_response(response)
        except client.RequestError as error:
            failures.append(f"#{index}: {error}")
            continue
        if prediction["status"] != "succeeded":
            failures.append(f"#{index}: {prediction['status']}: {prediction.get('error')}")
    return failures, retries


def test_sequential_requests_never_fail_on_the_slot_release(server):
    failures, retries = sequential_predictions(server.url, {"width": 8}, SEQUENTIAL_REQUESTS)
    print(
        f"\n{SEQUENTIAL_REQUESTS} sequential requests (dummy predictor): {retries} retries of a 409, failures: {failures}"
    )
    assert failures == []


def test_sequential_requests_to_predict_py_never_fail_on_the_slot_release(tiny_weights, tmp_path):
    env = {"SDXL_WEIGHTS_DIR": str(tiny_weights), "SDXL_OUTPUT_DIR": str(tmp_path / "outputs")}
    inputs = {"prompt": "a fox", "width": 128, "height": 128, "num_inference_steps": 1}
    with CogServer(cwd=REPO_ROOT, env=env, ready_timeout=300, log_path=tmp_path / "server.log") as sdxl:
        failures, retries = sequential_predictions(sdxl.url, inputs, SEQUENTIAL_SDXL_REQUESTS)
    print(
        f"\n{SEQUENTIAL_SDXL_REQUESTS} sequential requests (predict.py): {retries} retries of a 409, failures: {failures}"
    )
    assert failures == []


@pytest.fixture(scope="module")
def gated(tmp_path_factory):
    """A server whose predictions wait for `gated.gate` to exist: a held prediction keeps it busy."""
    root = tmp_path_factory.mktemp("gated")
    (root / "setup-gate").touch()
    env = {"PROBE_SETUP_GATE": str(root / "setup-gate"), "PROBE_PREDICT_GATE": str(root / "predict-gate")}
    with CogServer(GATED_REF, cwd=root, env=env, generate_schema=False, log_path=root / "server.log") as server:
        server.gate = Path(env["PROBE_PREDICT_GATE"])
        yield server


def hold_slot(server) -> None:
    """Start a prediction that runs until the gate opens (async, so this returns at once)."""
    server.gate.unlink(missing_ok=True)
    held = requests.post(f"{server.url}/predictions", json={"input": {}}, headers={"Prefer": "respond-async"})
    assert held.status_code == 202, held.text
    server.wait_for_status("BUSY", SERVER_START_S)


@contextlib.contextmanager
def busy(server):
    hold_slot(server)
    try:
        yield
    finally:
        server.gate.touch()
        server.wait_for_status("READY", SERVER_START_S)


def test_a_server_that_stays_busy_makes_the_client_give_up_after_the_bound(gated, tmp_path):
    with busy(gated):
        started = time.monotonic()
        done = run_client("--busy-wait", str(BUSY_WAIT_S), "--output-dir", str(tmp_path), url=gated.url)
        elapsed = time.monotonic() - started
    assert done.returncode == 1
    gave_up = GAVE_UP.search(done.stderr)
    assert gave_up, done.stderr
    retries, waited = int(gave_up[1]), float(gave_up[2])
    print(f"\ngave up after {retries} retries over {waited} s (bound {BUSY_WAIT_S} s), {elapsed:.1f} s in all")
    assert retries >= 3  # 25-50, 50-100, 100-200 ms ... backoff: several tries fit in 2 s
    assert BUSY_WAIT_S <= waited < BUSY_WAIT_S + 1  # the bound, plus the last 409's round trip
    assert "At capacity - all prediction slots busy" in done.stderr
    assert "--busy-wait SECONDS" in done.stderr
    assert not list(tmp_path.iterdir())


def test_no_retry_reports_the_409_at_once(gated, tmp_path):
    with busy(gated):
        done = run_client("--no-retry", "--output-dir", str(tmp_path), url=gated.url)
    assert done.returncode == 1
    assert "server busy (HTTP 409): " in done.stderr and "At capacity" in done.stderr
    assert "not retried: --no-retry" in done.stderr
    assert "sent again" not in done.stderr and "still busy" not in done.stderr


def test_the_client_gets_through_once_the_running_prediction_ends(gated, tmp_path, monkeypatch, capsys):
    backing_off = threading.Event()
    backoff_s = client.backoff_s

    def observed_backoff_s(retry: int) -> float:
        backing_off.set()  # the client has been refused with 409 and is about to wait
        return backoff_s(retry)

    monkeypatch.setattr(client, "backoff_s", observed_backoff_s)
    hold_slot(gated)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        try:
            exit_code = pool.submit(client.main, ["--url", gated.url, "--output-dir", str(tmp_path)])
            assert backing_off.wait(SERVER_START_S), "the client never met the busy slot"
            time.sleep(0.5)  # a few more 409s while the prediction runs on
            assert not exit_code.done()
        finally:
            gated.gate.touch()
        assert exit_code.result(timeout=60) == 0
    out, err = capsys.readouterr()
    assert '"done"' in out
    retried = RETRIED.search(err)
    assert retried and int(retried[1]) >= 2, err
    print(f"\ngot through after {retried[0]}")
    gated.wait_for_status("READY", SERVER_START_S)


def test_a_dead_worker_is_reported_at_once_not_retried(tmp_path):
    env = {"PROBE_SETUP_GATE": str(tmp_path / "setup-gate"), "PROBE_PREDICT_GATE": str(tmp_path / "predict-gate")}
    Path(env["PROBE_SETUP_GATE"]).touch()
    with CogServer(GATED_REF, cwd=tmp_path, env=env, generate_schema=False) as server:
        requests.post(f"{server.url}/predictions", json={"input": {"crash": True}}, timeout=30)
        server.wait_for_status("UNHEALTHY", SERVER_START_S)
        done = run_client("--output-dir", str(tmp_path / "out"), url=server.url)
    assert done.returncode == 1
    assert "HTTP 409" in done.stderr
    assert "its health is UNHEALTHY, which Cog never leaves: restart it" in done.stderr
    assert "sent again" not in done.stderr and "still busy" not in done.stderr


@pytest.mark.parametrize("value", ["-1", "nan", "soon"])
def test_busy_wait_must_be_seconds(value, capsys):
    with pytest.raises(SystemExit):
        client.parse_args(["--busy-wait", value])
    assert "--busy-wait" in capsys.readouterr().err


@pytest.mark.skipif(not nginx_available(), reason="needs Debian's nginx with its njs module (.ci/run installs them)")
def test_api_key_through_the_gateway(server, tmp_path):
    with Gateway(server.port, env={"SDXL_API_KEYS": "client-key"}) as gateway:
        refused = run_client("-i", "width=16", "--output-dir", str(tmp_path), url=gateway.url)
        assert refused.returncode == 1
        assert "wants an API key (HTTP 401)" in refused.stderr and "--api-key" in refused.stderr
        done = run_client("-i", "width=16", "--api-key", "client-key", "--output-dir", str(tmp_path), url=gateway.url)
        assert done.returncode == 0, done.stderr
        assert Image.open(tmp_path / "output-0.png").size == (16, 16)
