"""Container health probe: reads Cog's /health-check body and exits 0 (pass) or 1 (fail).

    python /src/deploy/probe.py {ready|serving|started|live}
    python /src/deploy/probe.py drain       # a preStop hook: wait for the running prediction

Cog answers GET /health-check with HTTP 200 in every state; only the JSON body's `status` tells
STARTING from READY, BUSY or SETUP_FAILED. Kubernetes httpGet probes and most load balancers look
at the status code alone, so the probes run this script inside the container instead (an exec
probe): no sidecar to deploy, and it needs nothing but the image's own python (standard library
only, so it works in images built by `cog build` as well as from the Dockerfile).

The server is the one in the same container: 127.0.0.1 on $PORT (Cog's default 5000).
When a probe fails it prints why; Kubernetes shows that line in `kubectl describe pod`.

A wedged slot: coglet 0.23 can lose its only slot for good while reporting BUSY (a client-chosen
prediction id it cannot make a directory of: 256 characters, a NUL, a path through a file). Every
request then gets 409 and nothing ever finishes. So `live` also fails once BUSY has lasted longer
than the longest allowed prediction ($SDXL_MAX_PREDICTION_S) with no prediction started meanwhile.
Exec probes are separate processes: when BUSY was first seen is kept in $SDXL_PROBE_STATE, and the
predictor touches $SDXL_PREDICTION_MARKER as each prediction starts (sdxl_cog/service.py), so back to
back predictions under load never look like one endless BUSY.
"""

import json
import os
import sys
import time
import urllib.request
from pathlib import Path

# The /health-check statuses each probe passes on. Anything else fails, as does no answer at all.
PASSING_STATUSES = {
    # readinessProbe: send a request here only if it can start now. Cog runs one prediction at a
    # time per replica and answers 409 while BUSY, so a busy pod leaves the Service's endpoints.
    "ready": {"READY"},
    # Docker HEALTHCHECK, and readiness behind a queue that admits one request at a time itself
    # (KServe's containerConcurrency: 1): up and serving, idle or busy.
    "serving": {"READY", "BUSY"},
    # startupProbe: setup() has finished, either way; from then on the liveness probe decides.
    "started": {"READY", "BUSY", "SETUP_FAILED", "DEFUNCT", "UNHEALTHY"},
    # livenessProbe: restart the container in the states Cog never leaves by itself (a failed
    # setup, a dead worker: Cog does not respawn it), and on a broken GPU (UNHEALTHY from the predictor's
    # healthcheck(), sdxl_cog/device/health.py). STARTING passes: loading weights takes minutes.
    "live": {"STARTING", "READY", "BUSY"},
}

DEFAULT_PORT = 5000
# Below the probes' timeoutSeconds (5) in deploy/*.yaml and the Dockerfile's HEALTHCHECK, so a hung
# server fails the probe with a message instead of being killed by the kubelet's timeout.
REQUEST_TIMEOUT_S = 4
SETUP_LOG_CHARS = 500
# drain: how long endpoint removal takes to reach the Service's proxies, during which a last request
# may still arrive; then how often to look. It waits at most the longest allowed prediction (below);
# the pod's termination grace period bounds it anyway.
DRAIN_SETTLE_S = 3
DRAIN_POLL_S = 1
# The longest prediction the inputs allow: 4 images at 2048x2048, 500 base + 500 refiner steps and
# 750-token prompts, ~125 PFLOP (~31 TFLOP per image-step at 2048px with guidance). That is ~7 min on
# an H100 at 300 TFLOP/s sustained, 40-60 min on 24 GB cards (L4, A10G: 35-50 TFLOP/s sustained). One
# hour by default; behind a request timeout (KServe's 600 s) nothing useful runs longer than that.
MAX_PREDICTION_ENV = "SDXL_MAX_PREDICTION_S"
DEFAULT_MAX_PREDICTION_S = 3600
BUSY_STATE_ENV = "SDXL_PROBE_STATE"
DEFAULT_BUSY_STATE = "/tmp/sdxl-probe-busy-since"
# Touched by the predictor as each prediction starts; the same default as sdxl_cog/config.py.
PREDICTION_MARKER_ENV = "SDXL_PREDICTION_MARKER"
DEFAULT_PREDICTION_MARKER = "/tmp/sdxl-prediction-started"


def health(port: int) -> dict:
    url = f"http://127.0.0.1:{port}/health-check"
    with urllib.request.urlopen(url, timeout=REQUEST_TIMEOUT_S) as response:
        return json.load(response)


def verdict(mode: str, body: dict) -> tuple[bool, str]:
    """Whether `body` passes probe `mode`, and a one-line reason."""
    status = body.get("status", "<none>")
    if status in PASSING_STATUSES[mode]:
        return True, f"{mode}: {status}"
    reason = f"{mode} probe failed: Cog health status is {status}"
    setup_logs = ((body.get("setup") or {}).get("logs") or "").strip()
    if status == "SETUP_FAILED" and setup_logs:
        reason += f"; setup: {setup_logs[-SETUP_LOG_CHARS:]}"
    return False, reason


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0


def busy_since(status: str, now: float) -> float | None:
    """When the current stretch of BUSY began, as far as the probes saw it; None when not BUSY.

    The stretch restarts with each prediction the predictor starts, so only a slot that runs nothing
    (or one prediction that runs too long) ages."""
    state = Path(os.environ.get(BUSY_STATE_ENV) or DEFAULT_BUSY_STATE)
    if status != "BUSY":
        state.unlink(missing_ok=True)
        return None
    try:
        first_seen = float(state.read_text())
    except (OSError, ValueError):
        first_seen = now
        partial = state.with_name(state.name + f".{os.getpid()}")
        partial.write_text(repr(now))
        os.replace(partial, state)
    marker = Path(os.environ.get(PREDICTION_MARKER_ENV) or DEFAULT_PREDICTION_MARKER)
    return max(first_seen, _mtime(marker))


def wedged(body: dict, now: float) -> str | None:
    """Why a BUSY server is to be restarted, or None."""
    since = busy_since(body.get("status", "<none>"), now)
    limit = max_prediction_s()
    if since is None or now - since <= limit:
        return None
    return (
        f"live probe failed: BUSY for {now - since:.0f} s with no prediction starting, longer than the longest "
        f"allowed prediction ({limit:g} s, {MAX_PREDICTION_ENV}): the slot is wedged and Cog never frees it"
    )


def max_prediction_s() -> float:
    return float(os.environ.get(MAX_PREDICTION_ENV) or DEFAULT_MAX_PREDICTION_S)


def drain(port: int) -> int:
    """Return once no prediction runs, sync or async. On SIGTERM coglet finishes a sync prediction but
    drops an async one, so Kubernetes' preStop hook runs this first (the pod has left the endpoints by
    then); where no hook is allowed (Knative), deploy/graceful.py runs it before passing SIGTERM on."""
    time.sleep(DRAIN_SETTLE_S)
    limit = max_prediction_s()
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        try:
            if health(port).get("status") != "BUSY":
                return 0
        except (OSError, ValueError):
            return 0  # nothing left to drain
        time.sleep(DRAIN_POLL_S)
    print(f"drain: still BUSY after {limit:g} s ({MAX_PREDICTION_ENV})")
    return 1


def main(argv: list[str]) -> int:
    port = int(os.environ.get("PORT", DEFAULT_PORT))
    if argv == ["drain"]:
        return drain(port)
    if len(argv) != 1 or argv[0] not in PASSING_STATUSES:
        print(f"usage: probe.py {{{'|'.join(PASSING_STATUSES)}|drain}}", file=sys.stderr)
        return 2
    mode = argv[0]
    try:
        body = health(port)
    except (OSError, ValueError) as error:  # refused, timed out, or not JSON
        print(f"{mode} probe failed: no health answer on port {port} ({error})")
        return 1
    passed, reason = verdict(mode, body)
    stuck = wedged(body, time.time()) if mode == "live" and passed else None
    if stuck:
        passed, reason = False, stuck
    print(reason)
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
