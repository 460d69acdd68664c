"""Run the nginx gateway (gateway/start) in front of a running Cog server, for tests and scripts.

    with CogServer(DUMMY_PREDICTOR_REF, cwd=tmp) as cog, Gateway(cog.port, env={"SDXL_API_KEYS": "k"}) as gateway:
        requests.post(f"{gateway.url}/predictions", json=..., headers={"Authorization": "Bearer k"})

nginx runs from a private directory (config, pid, temp files) with its access and error logs in
`log_path`; on exit it is stopped with SIGQUIT (graceful), then killed if it lingers.
"""

import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import requests

from devtools.cog_server import REPO_ROOT, free_port

GATEWAY_DIR = REPO_ROOT / "gateway"
START_TIMEOUT_S = 15
STOP_GRACE_S = 10
# A reload starts new workers at once; this is ample for them to take over on loopback.
RELOAD_SETTLE_S = 0.5


class GatewayError(RuntimeError):
    """nginx did not start; the message carries its log."""


def nginx_available() -> bool:
    return shutil.which("nginx") is not None and shutil.which("envsubst") is not None


def nobody_readable_dir(prefix: str) -> Path:
    """A fresh directory that nginx's workers can enter: a root master runs them as `nobody`. It is made under
    the system's temporary root, not tempfile's current directory, which an in-process SDXLService has made
    its private (0700) input directory (sdxl_cog/inputs/uploads.py)."""
    path = Path(tempfile.mkdtemp(prefix=prefix, dir=os.environ.get("TMPDIR") or "/tmp"))
    path.chmod(0o755)
    return path


class Gateway:
    def __init__(self, upstream_port: int, env: dict[str, str] | None = None, gateway_dir: Path = GATEWAY_DIR):
        """`gateway_dir` holds start, render, the configuration and the pages (a copy, to run it from elsewhere)."""
        self.upstream_port = upstream_port
        self.env = env or {}
        self.gateway_dir = gateway_dir
        self.port = free_port()
        self._tmp: Path | None = nobody_readable_dir("sdxl-gateway-")
        self.events_port = free_port()
        self.run_dir = self._tmp / "run"
        self.log_path = self._tmp / "nginx.log"
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> "Gateway":
        self.start()
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.stop()

    def start(self) -> None:
        env = {
            **os.environ,
            "PORT": str(self.port),
            "SDXL_GATEWAY_UPSTREAM": f"127.0.0.1:{self.upstream_port}",
            "SDXL_GATEWAY_RUN_DIR": str(self.run_dir),
            "SDXL_GATEWAY_EVENTS_LISTEN": f"127.0.0.1:{self.events_port}",
            **self.env,
        }
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                [str(self.gateway_dir / "start")], env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise GatewayError(f"gateway exited with code {self.process.returncode}:\n{self.log()}")
            try:
                requests.get(f"{self.url}/health-check", timeout=2)
                return
            except requests.ConnectionError:
                time.sleep(0.1)
        self.stop()
        raise GatewayError(f"gateway not answering after {START_TIMEOUT_S}s:\n{self.log()}")

    def master_pid(self) -> int:
        return int((self.run_dir / "nginx.pid").read_text())

    def worker_pids(self) -> list[int]:
        """nginx's worker processes: the master's children, from /proc."""
        children = Path(f"/proc/{self.master_pid()}/task/{self.master_pid()}/children").read_text().split()
        return [int(pid) for pid in children]

    def worker_memory_kb(self) -> dict[str, int]:
        """The worker's resident memory now (VmRSS) and at its peak so far (VmHWM), in kB."""
        (worker,) = self.worker_pids()
        status = Path(f"/proc/{worker}/status").read_text().splitlines()
        return {line.split(":")[0]: int(line.split()[1]) for line in status if line.startswith(("VmRSS", "VmHWM"))}

    def reload(self) -> None:
        """Make nginx re-read its configuration: new workers (njs starts afresh), the old ones finish."""
        os.kill(self.master_pid(), signal.SIGHUP)
        time.sleep(RELOAD_SETTLE_S)

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def stop(self) -> None:
        process, self.process = self.process, None
        if process is not None and process.poll() is None:
            os.killpg(process.pid, signal.SIGQUIT)
            try:
                process.wait(STOP_GRACE_S)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None
