"""`make try` (script/try) gives a newcomer the API and the playground in one command: tiny weights made on the
spot, a key printed, the real Cog server behind the real gateway; a keyed prediction succeeds."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time

import pytest
import requests

from devtools.cog_server import REPO_ROOT, free_port
from devtools.gateway import nginx_available, nobody_readable_dir

pytestmark = pytest.mark.skipif(not nginx_available(), reason="needs Debian's nginx with njs and envsubst")
READY_TIMEOUT_S = 180


def test_script_try_serves_the_playground_and_a_keyed_prediction(tmp_path):
    port, run_root = free_port(), nobody_readable_dir("sdxl-try-")
    env = {
        **os.environ,
        "PORT": str(port),
        "COGLET_PORT": str(free_port()),
        "SDXL_GATEWAY_EVENTS_LISTEN": f"127.0.0.1:{free_port()}",
        "SDXL_GATEWAY_RUN_DIR": str(run_root / "run"),
        "SDXL_TRY_DIR": str(tmp_path / "try"),
        "SDXL_OUTPUT_DIR": str(tmp_path / "outputs"),
        "SDXL_PREDICTION_MARKER": str(tmp_path / "marker"),
    }
    log = open(tmp_path / "try.log", "w")
    process = subprocess.Popen(
        [REPO_ROOT / "script" / "try"],
        cwd=REPO_ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline, status = time.monotonic() + READY_TIMEOUT_S, None
        while time.monotonic() < deadline and process.poll() is None and status != "READY":
            time.sleep(1)
            try:
                status = requests.get(f"{url}/health-check", timeout=5).json().get("status")
            except requests.RequestException:
                pass
        assert status == "READY", (tmp_path / "try.log").read_text()[-3000:]
        key = (tmp_path / "try" / "api-key").read_text().strip()
        assert f"API key:         {key}" in (tmp_path / "try.log").read_text()

        page = requests.get(f"{url}/", timeout=10)
        assert page.status_code == 200 and "<html" in page.text
        refused = requests.post(f"{url}/predictions", json={"input": {"prompt": "a fox"}}, timeout=10)
        assert refused.status_code == 401
        body = {"input": {"prompt": "a fox", "width": 128, "height": 128, "num_inference_steps": 2}}
        done = requests.post(f"{url}/predictions", json=body, headers={"Authorization": f"Bearer {key}"}, timeout=120)
        assert done.status_code == 200 and done.json()["status"] == "succeeded", done.text
        assert done.json()["output"][0].startswith("data:image/png;base64,")
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        log.close()
        shutil.rmtree(run_root, ignore_errors=True)
