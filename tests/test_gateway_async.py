"""The largest answers through the gateway (issue 20, point 4): real nginx (njs) in front of a real coglet
running tests/fixtures/large_output_predictor.py, whose outputs are 2048x2048 PNGs of random pixels
(12.6 MB each, larger than any real image of that size; predict.py on tiny weights would take minutes on a
CPU to decode 2048x2048). Async results are kept as files, within SDXL_GATEWAY_STORE_MAX, oldest out first."""

import io
import time

import pytest
import requests
from PIL import Image

from devtools.cog_server import REPO_ROOT, CogServer
from devtools.gateway import Gateway, nginx_available

pytestmark = [
    pytest.mark.gateway,
    pytest.mark.skipif(not nginx_available(), reason="nginx (with libnginx-mod-http-js) and envsubst not installed"),
]

KEY_A, KEY_B = "large-a-0123456789", "large-b-9876543210"
A, B = {"Authorization": f"Bearer {KEY_A}"}, {"Authorization": f"Bearer {KEY_B}"}
LARGE_PREDICTOR_REF = f"{REPO_ROOT / 'tests/fixtures/large_output_predictor.py'}:Predictor"
LARGEST = {"input": {"size": 2048, "count": 4}}
# The smallest store gateway/render accepts: one largest prediction's outputs (4 x 12.6 MB) fit, two do not.
SMALL_STORE = "96m"
FINISH_TIMEOUT_S = 60
# Within the default rate (2 a second), as a client should poll.
POLL_S = 0.6


@pytest.fixture(scope="module")
def cog(tmp_path_factory):
    with CogServer(LARGE_PREDICTOR_REF, cwd=tmp_path_factory.mktemp("cog")) as server:
        yield server


@pytest.fixture(scope="module")
def gateway(cog):
    with Gateway(cog.port, env={"SDXL_API_KEYS": f"{KEY_A},{KEY_B}", "SDXL_GATEWAY_STORE_MAX": SMALL_STORE}) as running:
        yield running


def run_async(gateway, body=LARGEST) -> dict:
    started = requests.post(
        f"{gateway.url}/predictions", json=body, headers={**A, "Prefer": "respond-async"}, timeout=30
    )
    assert started.status_code == 202, started.text
    deadline = time.monotonic() + FINISH_TIMEOUT_S
    while time.monotonic() < deadline:
        state = requests.get(f"{gateway.url}/predictions/{started.json()['id']}", headers=A, timeout=10)
        assert state.status_code == 200, state.text
        if state.json()["status"] in ("succeeded", "failed", "canceled"):
            return state.json()
        time.sleep(POLL_S)
    raise AssertionError(f"not finished after {FINISH_TIMEOUT_S} s: {state.text[:300]}")


def stored_bytes(gateway) -> int:
    return sum(path.stat().st_size for path in (gateway.run_dir / "predictions/files").iterdir())


def test_four_2048_outputs_complete_async_and_are_served_as_files_to_their_key_only(gateway):
    started = time.monotonic()
    state = run_async(gateway)
    took = time.monotonic() - started
    assert state["status"] == "succeeded", state
    state_file = gateway.run_dir / "predictions/states" / f"{state['id']}.json"
    print(
        f"\nasync 4 x 2048x2048 done in {took:.1f} s; state {state_file.stat().st_size} bytes; outputs {state['output']}"
    )
    assert state_file.stat().st_size < 16 * 1024, "outputs are files, not base64 in the state"
    assert len(state["output"]) == 4
    for url in state["output"]:
        response = requests.get(f"{gateway.url}{url}", headers=A, timeout=30)
        assert response.status_code == 200 and response.headers["Content-Type"] == "image/png"
        assert Image.open(io.BytesIO(response.content)).size == (2048, 2048)
        assert requests.get(f"{gateway.url}{url}", headers=B, timeout=10).status_code == 404
        assert requests.get(f"{gateway.url}{url}", timeout=10).status_code == 401


def test_the_largest_sync_answer_passes_through_unchanged(gateway):
    response = requests.post(f"{gateway.url}/predictions", json=LARGEST, headers=A, timeout=120)
    assert response.status_code == 200 and response.json()["status"] == "succeeded"
    outputs = response.json()["output"]
    assert len(outputs) == 4 and all(uri.startswith("data:image/png;base64,") for uri in outputs)


def test_the_store_keeps_its_bound_and_lets_the_oldest_outputs_go_first(gateway):
    first = run_async(gateway)
    second = run_async(gateway)
    assert first["status"] == second["status"] == "succeeded"
    limit = 96 * 2**20
    print(
        f"\nstore after two 4 x 2048x2048 predictions: {stored_bytes(gateway) / 2**20:.1f} MiB (bound {limit / 2**20:.0f})"
    )
    assert stored_bytes(gateway) <= limit
    assert all(requests.get(f"{gateway.url}{url}", headers=A, timeout=30).ok for url in second["output"])
    gone = requests.get(f"{gateway.url}{first['output'][0]}", headers=A, timeout=10)
    assert gone.status_code == 404 and "removes the oldest first" in gone.json()["error"]
    # Its state is still there to say what it was.
    assert requests.get(f"{gateway.url}/predictions/{first['id']}", headers=A, timeout=10).json() == first
