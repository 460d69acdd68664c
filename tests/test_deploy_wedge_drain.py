"""deploy/: liveness against a really wedged coglet slot, and draining an async prediction before the
server stops (the preStop hook of kubernetes.yaml; deploy/graceful.py where, as in KServe's Knative
mode, no hook is allowed). Figures (wedge to probe failure) are printed: `pytest -s`."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import requests

from devtools.cog_server import CogServer, free_port
from sdxl_cog.config import Settings
from tests.conftest import DEFAULT_OPTIONS, REPO_ROOT, make_request
from tests.helpers.deploy import FIXTURES, by_kind, documents, drain_command, model_container, probe, run_probe
from tests.helpers.server import Webhooks

SERVER_START_S = 60
# Short enough for a test; deploy/probe.py's default is an hour (see its derivation there).
TEST_MAX_PREDICTION_S = 5
# The kubelet runs the liveness probe every periodSeconds; here faster, for a tighter measurement.
PROBE_PERIOD_S = 1
WEDGE_TIMEOUT_S = 60


@pytest.fixture
def probe_env(tmp_path, monkeypatch):
    """The probe's state in this test's own files (run_probe passes os.environ on)."""
    env = {
        probe.MAX_PREDICTION_ENV: str(TEST_MAX_PREDICTION_S),
        probe.BUSY_STATE_ENV: str(tmp_path / "busy-since"),
        probe.PREDICTION_MARKER_ENV: str(tmp_path / "prediction-started"),
    }
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return env


@pytest.fixture
def gated(tmp_path):
    gates = {"PROBE_SETUP_GATE": str(tmp_path / "setup-done"), "PROBE_PREDICT_GATE": str(tmp_path / "predict-done")}
    (tmp_path / "setup-done").touch()
    return gates


def live_command() -> list[str]:
    container = model_container(by_kind("kubernetes.yaml")["Deployment"]["spec"]["template"]["spec"])
    return container["livenessProbe"]["exec"]["command"]


def test_liveness_fails_on_a_really_wedged_slot(tmp_path, gated, probe_env):
    with CogServer(f"{FIXTURES}:Gated", cwd=tmp_path, env=gated, generate_schema=False) as server:
        assert run_probe(live_command(), server.port)[0] == 0
        # An id coglet cannot make a directory of: the prediction fails and the slot is never freed.
        wedged_at = time.monotonic()
        requests.put(f"{server.url}/predictions/{'w' * 256}", json={"input": {}}, timeout=30)
        server.wait_for_status("BUSY", 10)
        assert requests.post(f"{server.url}/predictions", json={"input": {}}, timeout=30).status_code == 409
        outputs = []
        while time.monotonic() - wedged_at < WEDGE_TIMEOUT_S:
            code, output = run_probe(live_command(), server.port)
            outputs.append((round(time.monotonic() - wedged_at, 1), code))
            if code:
                break
            time.sleep(PROBE_PERIOD_S)
        failed_after = time.monotonic() - wedged_at
        assert server.health()["status"] == "BUSY"  # still wedged: only a restart helps
    print(f"\n[wedge] live probe failed {failed_after:.1f} s after the wedge (bound {TEST_MAX_PREDICTION_S} s)")
    assert code == 1, outputs
    assert "BUSY for" in output and "wedged" in output and probe.MAX_PREDICTION_ENV in output
    assert outputs[0][1] == 0, "the probe must allow a prediction its full time first"
    assert failed_after > TEST_MAX_PREDICTION_S


def test_back_to_back_predictions_are_not_taken_for_a_wedge(probe_env):
    busy, now = {"status": "BUSY"}, time.time()
    assert probe.wedged(busy, now) is None  # first seen BUSY now
    later = now + TEST_MAX_PREDICTION_S + 1
    marker = probe_env[probe.PREDICTION_MARKER_ENV]
    open(marker, "w").close()
    os.utime(marker, (later - 1, later - 1))
    # Still BUSY past the bound, but a prediction started a second ago: load, not a wedge.
    assert probe.wedged(busy, later) is None
    # No prediction started for longer than the bound: a wedge.
    assert "wedged" in probe.wedged(busy, later + TEST_MAX_PREDICTION_S + 1)
    # Any other status ends the stretch.
    assert probe.wedged({"status": "READY"}, later) is None
    assert not os.path.exists(probe_env[probe.BUSY_STATE_ENV])


def test_the_predictor_marks_each_prediction_start_where_the_probe_looks(service, monkeypatch):
    monkeypatch.delenv(probe.PREDICTION_MARKER_ENV, raising=False)
    assert str(Settings.from_env().prediction_marker) == probe.DEFAULT_PREDICTION_MARKER
    marker = service.settings.prediction_marker
    marker.unlink(missing_ok=True)
    service.predict(make_request(num_inference_steps=1), DEFAULT_OPTIONS, None, 0.6)
    assert time.time() - marker.stat().st_mtime < 60


# --- draining async predictions ------------------------------------------------------------------------


def start_async(server_url: str, webhooks: Webhooks, prediction_id: str) -> None:
    response = requests.put(
        f"{server_url}/predictions/{prediction_id}",
        json={"input": {}, "webhook": webhooks.url, "webhook_events_filter": ["completed"]},
        headers={"Prefer": "respond-async"},
        timeout=30,
    )
    assert response.status_code == 202, response.text


@pytest.fixture
def webhooks():
    receiver = Webhooks()
    yield receiver
    receiver.http.shutdown()


def test_without_a_drain_sigterm_drops_an_async_prediction(tmp_path, gated, webhooks):
    """Why the drains exist (coglet 0.23). Should this start failing, coglet finishes async predictions
    on SIGTERM by itself and the drains can go."""
    with CogServer(f"{FIXTURES}:Gated", cwd=tmp_path, env=gated, generate_schema=False) as server:
        start_async(server.url, webhooks, "async-dropped")
        server.wait_for_status("BUSY", 10)
        server.process.send_signal(signal.SIGTERM)
        # The prediction could finish now, had coglet waited for it as it does for a sync one.
        time.sleep(0.5)
        open(gated["PROBE_PREDICT_GATE"], "w").close()
        server.process.wait(30)
    # Nothing at all, or `failed` ("Worker crashed"), depending on timing; never the result.
    assert not [p for p in webhooks.received["async-dropped"] if p.get("status") == "succeeded"]


def test_prestop_drain_lets_an_async_prediction_deliver_its_final_webhook(tmp_path, gated, webhooks):
    with CogServer(f"{FIXTURES}:Gated", cwd=tmp_path, env=gated, generate_schema=False) as server:
        start_async(server.url, webhooks, "async-prestop")
        server.wait_for_status("BUSY", 10)
        drain = subprocess.Popen(
            [sys.executable, str(REPO_ROOT / drain_command()[1].removeprefix("/src/")), "drain"],
            env={**os.environ, "PORT": str(server.port)},
        )
        time.sleep(probe.DRAIN_SETTLE_S + 2)
        assert drain.poll() is None, "drain returned while an async prediction was running"
        open(gated["PROBE_PREDICT_GATE"], "w").close()
        assert drain.wait(30) == 0
        # What the kubelet does once preStop returns.
        server.stop()
    final = webhooks.final("async-prestop")
    assert final["status"] == "succeeded" and final["output"] == "done"


def test_graceful_wrapper_holds_sigterm_until_an_async_prediction_is_delivered(tmp_path, gated, webhooks):
    container = model_container(documents("kserve.yaml")[0]["spec"]["predictor"])
    command = container["args"]
    # graceful.py runs the image's own command (and whatever flags the manifest adds, e.g. --host).
    assert command[:2] == ["python", "/src/deploy/graceful.py"] and command[2:5] == ["python", "-m", "cog.server.http"]
    port = free_port()
    env = {
        **os.environ,
        **gated,
        "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"],
        "COG_PREDICT_TYPE_STUB": f"{FIXTURES}:Gated",
        "PORT": str(port),
    }
    local = [sys.executable, str(REPO_ROOT / "deploy/graceful.py"), sys.executable, "-m", "cog.server.http"]
    wrapper = subprocess.Popen([*local, "--host", "127.0.0.1"], cwd=tmp_path, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(url, "READY")
        start_async(url, webhooks, "async-sigterm")
        wait_for(url, "BUSY")
        wrapper.send_signal(signal.SIGTERM)  # what the kubelet sends when Knative scales the pod away
        time.sleep(probe.DRAIN_SETTLE_S + 2)
        assert wrapper.poll() is None and requests.get(f"{url}/health-check", timeout=5).json()["status"] == "BUSY"
        open(gated["PROBE_PREDICT_GATE"], "w").close()
        assert wrapper.wait(60) == 0
    finally:
        if wrapper.poll() is None:
            os.killpg(wrapper.pid, signal.SIGKILL)
    final = webhooks.final("async-sigterm")
    assert final["status"] == "succeeded" and final["output"] == "done"


def wait_for(url: str, status: str) -> None:
    deadline = time.monotonic() + SERVER_START_S
    while time.monotonic() < deadline:
        try:
            if requests.get(f"{url}/health-check", timeout=5).json()["status"] == status:
                return
        except requests.RequestException:
            pass
        time.sleep(0.2)
    raise AssertionError(f"server not {status} within {SERVER_START_S} s")
