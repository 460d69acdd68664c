"""What script/soak and script/fuzz share: a Cog server of this project on tiny synthetic weights, or a running
one found by its URL, and the processes behind it."""

from __future__ import annotations

import tempfile
import time
from contextlib import ExitStack
from pathlib import Path
from urllib.parse import urlsplit

import psutil
import requests

from .cog_server import REPO_ROOT, CogServer

READY_TIMEOUT_S = 600


def start_tiny_server(stack: ExitStack, weights: Path | None, prefix: str, **env: str) -> tuple[CogServer, Path]:
    """predict.py behind the real Cog server, on `weights` or fresh tiny synthetic ones; returns it and a scratch
    directory (its outputs go to scratch/outputs). Everything is undone when `stack` closes."""
    scratch = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix=prefix)))
    if weights is None:
        from .synthetic import make_weights  # torch and diffusers: only when weights are made

        weights = scratch / "weights"
        make_weights(weights, size="tiny", seed=0)
    env = {"SDXL_WEIGHTS_DIR": str(weights), "SDXL_OUTPUT_DIR": str(scratch / "outputs"), **env}
    server = CogServer(cwd=REPO_ROOT, env=env, ready_timeout=READY_TIMEOUT_S, log_path=scratch / "server.log")
    return stack.enter_context(server), scratch


def find_server_pid(url: str) -> int | None:
    """The process listening on a local URL's port (None for a remote server)."""
    port = urlsplit(url).port
    for conn in psutil.net_connections(kind="tcp"):
        if conn.status == psutil.CONN_LISTEN and conn.laddr.port == port and conn.pid:
            return conn.pid
    return None


def coglet_worker(server: psutil.Process | None) -> psutil.Process | None:
    """The coglet worker running predict(): the server's Python child."""
    try:
        children = server.children(recursive=True) if server else []
        workers = [p for p in children if "_run_worker" in " ".join(p.cmdline())] or children
    except psutil.NoSuchProcess:
        return None
    return workers[0] if workers else None


def health_status(url: str) -> str:
    try:
        return requests.get(f"{url}/health-check", timeout=10).json()["status"]
    except requests.RequestException as error:
        return f"unreachable ({error})"


def wait_until_ready(url: str, timeout: float) -> str:
    """Poll until READY or `timeout`; returns the last status seen."""
    deadline, status = time.monotonic() + timeout, "unknown"
    while time.monotonic() < deadline:
        status = health_status(url)
        if status == "READY":
            break
        time.sleep(0.05)
    return status
