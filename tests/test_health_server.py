"""A GPU that breaks, through the real Cog server (coglet): predict.py's healthcheck() turns /health-check
UNHEALTHY after a sticky CUDA error in a prediction or a failed or hung device check, but not after running
out of memory, and the deployments' probes act on it. The GPU is a fake (tests/fixtures/faulty_gpu_predictor.py):
its faults are raised from inside the generation, and its device check is told how to fail."""

from __future__ import annotations

import pytest
import requests

from devtools.cog_server import SCHEMA_PATH, CogServer
from sdxl_cog.config import MIN_SIDE
from sdxl_cog.schema.openapi import write_schema
from tests.conftest import REPO_ROOT
from tests.helpers.deploy import model_container, pod_specs, run_probe
from tests.helpers.server import READY_TIMEOUT_S, Webhooks, predict_when_free

FIXTURE = REPO_ROOT / "tests" / "fixtures" / "faulty_gpu_predictor.py"
SMALL = {"width": MIN_SIDE, "height": MIN_SIDE, "num_inference_steps": 1, "seed": 1}
# Still denoising for many seconds after its first step (a few tenths of a second per step on 2 cores).
LONG = {"prompt": "a slow river", "width": 512, "height": 512, "num_inference_steps": 200, "seed": 7}
# coglet frees the slot just after a response (BUSY until then), and a released hung device check returns
# within its poll: both take milliseconds.
SETTLE_S = 10


def probe(kind: str, port: int) -> tuple[int, str]:
    """Run the Kubernetes Deployment's probe of this kind (livenessProbe, readinessProbe) against `port`."""
    container = model_container(pod_specs()["kubernetes"])
    return run_probe(container[kind]["exec"]["command"], port)


@pytest.fixture
def faulty(tiny_weights, tmp_path):
    """The fake-GPU predictor served by coglet, and the file that tells its device check how to fail."""
    write_schema(f"{REPO_ROOT / 'predict.py'}:Predictor", tmp_path / SCHEMA_PATH)  # predict.py's inputs
    state = tmp_path / "device-state"
    env = {
        "SDXL_WEIGHTS_DIR": str(tiny_weights),
        "SDXL_OUTPUT_DIR": str(tmp_path / "outputs"),
        "FAKE_DEVICE_STATE": str(state),
        "PYTHONPATH": str(REPO_ROOT),
    }
    predictor = f"{FIXTURE}:Predictor"
    log = tmp_path / "server.log"
    with CogServer(
        predictor, tmp_path, env, generate_schema=False, ready_timeout=READY_TIMEOUT_S, log_path=log
    ) as server:
        yield server, state


def test_out_of_memory_leaves_it_ready_and_a_sticky_cuda_error_makes_it_unhealthy_for_good(faulty):
    server, _ = faulty
    out_of_memory = predict_when_free(server, prompt="fault:out-of-memory", **SMALL).json()
    assert out_of_memory["status"] == "failed" and "Out of GPU memory" in out_of_memory["error"]
    server.wait_for_status("READY", SETTLE_S)  # fails at once on UNHEALTHY
    assert probe("livenessProbe", server.port)[0] == 0 and probe("readinessProbe", server.port)[0] == 0

    sticky = predict_when_free(server, prompt="fault:illegal-address", **SMALL).json()
    assert sticky["status"] == "failed" and "an illegal memory access was encountered" in sticky["error"]
    health = server.health()
    assert health["status"] == "UNHEALTHY"
    assert 'a prediction failed with "CUDA error: an illegal memory access' in health["user_healthcheck_error"]
    code, output = probe("livenessProbe", server.port)
    assert code == 1 and "live probe failed: Cog health status is UNHEALTHY" in output
    assert probe("readinessProbe", server.port)[0] == 1

    # coglet still runs predictions while UNHEALTHY: taking the replica out is the probes' job. This fake GPU
    # recovered (a real one fails every later request); the verdict stands, as the lost context would.
    after = predict_when_free(server, prompt="a fox", **SMALL).json()
    assert after["status"] == "succeeded", after.get("error")
    assert server.health()["status"] == "UNHEALTHY"  # UNHEALTHY outranks BUSY: no wait for the slot needed


@pytest.fixture
def webhooks():
    receiver = Webhooks()
    yield receiver
    receiver.http.shutdown()


def test_the_device_check_passes_beside_a_prediction_and_fails_while_the_gpu_is_poisoned_or_hung(faulty, webhooks):
    server, state = faulty
    # coglet runs healthcheck() while a prediction holds the slot: it must answer in time, and pass.
    body = {"input": LONG, "webhook": webhooks.url, "webhook_events_filter": ["start", "logs", "completed"]}
    started = requests.put(f"{server.url}/predictions/long", json=body, headers={"Prefer": "respond-async"}, timeout=30)
    assert started.status_code == 202, started.text
    webhooks.first_step("long")
    assert server.health()["status"] == "BUSY"
    requests.post(f"{server.url}/predictions/long/cancel", timeout=30).raise_for_status()
    assert webhooks.final("long")["status"] == "canceled"
    server.wait_for_status("READY", SETTLE_S)

    state.write_text("fault")
    health = server.health()
    assert health["status"] == "UNHEALTHY"
    assert "the device check failed: CUDA error: an illegal memory access" in health["user_healthcheck_error"]
    assert probe("livenessProbe", server.port)[0] == 1

    state.write_text("ok")
    assert server.health()["status"] == "READY"  # nothing is remembered of a device check

    state.write_text("hang")
    health = server.health()
    # Our bound answered, not coglet's 5 s timeout ("user-defined healthcheck timed out").
    assert health["status"] == "UNHEALTHY"
    assert "the device check has not finished after" in health["user_healthcheck_error"]
    code, output = probe("livenessProbe", server.port)  # the probe waits 4 s for an answer: it gets this one
    assert code == 1 and "Cog health status is UNHEALTHY" in output

    state.write_text("ok")
    server.wait_for_status("READY", SETTLE_S)
