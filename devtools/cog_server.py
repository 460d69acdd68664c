"""Run the real Cog HTTP server (coglet) in a subprocess for tests.

    with CogServer("predict.py:Predictor", env={"SDXL_WEIGHTS_DIR": ...}) as server:
        response = server.post_prediction({"prompt": "an astronaut"})

On entry it writes `.cog/openapi_schema.json` in `cwd` (coglet validates inputs only when that
file exists), starts `python -m cog.server.http` on a free loopback port with this interpreter's
bin/ first on PATH (coglet spawns its worker as the `python` it finds there), and waits for READY.
On exit, even after a failed test, it sends SIGTERM and kills whatever is left.
"""

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, NoReturn

import requests

REPO_ROOT = Path(__file__).resolve().parents[1]
# A CPU-only predictor with the same kinds of inputs as predict.py (see the file's docstring).
DUMMY_PREDICTOR_REF = f"{REPO_ROOT / 'tests/fixtures/dummy_predictor.py'}:Predictor"
SCHEMA_PATH = Path(".cog/openapi_schema.json")
POLL_INTERVAL_S = 0.2
STOP_GRACE_S = 10
LOG_TAIL_CHARS = 4000
# Health states after which waiting for another one is pointless.
TERMINAL_STATES = {"SETUP_FAILED", "DEFUNCT", "UNHEALTHY"}


class CogServerError(RuntimeError):
    """The server did not reach the expected state; the message carries its log tail."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class CogServer:
    def __init__(
        self,
        predictor_ref: str = "predict.py:Predictor",
        cwd: Path | str = REPO_ROOT,
        env: dict[str, str] | None = None,
        *,
        generate_schema: bool = True,
        ready_timeout: float | None = 60,
        log_path: Path | str | None = None,
        args: tuple[str, ...] = (),
    ):
        """`predictor_ref` is relative to `cwd` or absolute; `ready_timeout=None` skips the wait."""
        self.predictor_ref = predictor_ref
        self.cwd = Path(cwd)
        self.env = env or {}
        self.generate_schema = generate_schema
        self.ready_timeout = ready_timeout
        self.args = args
        self._tmp = None if log_path else tempfile.TemporaryDirectory(prefix="cog-server-")
        self.log_path = Path(log_path or Path(self._tmp.name) / "server.log")
        self.port = free_port()
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> "CogServer":
        self.start()
        try:
            if self.ready_timeout is not None:
                self.wait_for_status("READY", self.ready_timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.stop()

    def _env(self) -> dict[str, str]:
        bin_dir = os.path.dirname(sys.executable)
        env = {**os.environ, "PATH": bin_dir + os.pathsep + os.environ.get("PATH", "")}
        env.update(self.env)
        return env

    def write_schema(self) -> None:
        """Run the generator as `script/serve` does, in `cwd`, so the predictor imports as it will there."""
        env = self._env()
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
        command = [sys.executable, "-m", "sdxl_cog.schema", "--predictor", self.predictor_ref]
        done = subprocess.run(
            [*command, "--out", str(SCHEMA_PATH)], cwd=self.cwd, env=env, capture_output=True, text=True
        )
        if done.returncode != 0:
            raise CogServerError(f"schema generation failed for {self.predictor_ref}:\n{done.stderr}")

    def start(self) -> None:
        if self.generate_schema:
            self.write_schema()
        env = {**self._env(), "COG_PREDICT_TYPE_STUB": self.predictor_ref, "PORT": str(self.port)}
        command = [sys.executable, "-m", "cog.server.http", "--host", "127.0.0.1", *self.args]
        with open(self.log_path, "wb") as log:
            # Its own session, so stop() can reach the worker coglet spawned as well.
            self.process = subprocess.Popen(
                command,
                cwd=self.cwd,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def log_tail(self, chars: int = LOG_TAIL_CHARS) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except FileNotFoundError:
            return ""

    def health(self) -> dict:
        return requests.get(f"{self.url}/health-check", timeout=5).json()

    def wait_for_status(self, status: str = "READY", timeout: float = 60) -> dict:
        """Poll /health-check until it reports `status`; raise with the log tail otherwise."""
        deadline = time.monotonic() + timeout
        last: dict | str = "no answer yet"
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                self._fail(f"exited with code {self.process.returncode} before {status}")
            try:
                last = self.health()
            except requests.RequestException as error:
                last = repr(error)
            else:
                if last.get("status") == status:
                    return last
                if last.get("status") in TERMINAL_STATES:
                    self._fail(f"reached {last['status']} while waiting for {status}")
            time.sleep(POLL_INTERVAL_S)
        self._fail(f"not {status} after {timeout:.0f}s (last health: {last})")

    def _fail(self, what: str) -> NoReturn:
        raise CogServerError(f"Cog server for {self.predictor_ref} {what}\n--- server log tail ---\n{self.log_tail()}")

    def post_prediction(self, input: dict, *, timeout: float = 120, **body: Any) -> requests.Response:
        """POST /predictions with `{"input": input, **body}` (e.g. id=..., webhook=...)."""
        return requests.post(f"{self.url}/predictions", json={"input": input, **body}, timeout=timeout)

    def stop(self) -> None:
        process, self.process = self.process, None
        if process is not None and process.poll() is None:
            _signal_group(process, signal.SIGTERM)
            try:
                process.wait(STOP_GRACE_S)
            except subprocess.TimeoutExpired:
                _signal_group(process, signal.SIGKILL)
                process.wait()
        if process is not None:
            _signal_group(process, signal.SIGKILL)  # a worker left behind by a crashed parent
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None


def _signal_group(process: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(process.pid, sig)
    except ProcessLookupError:
        pass
