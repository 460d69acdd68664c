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
"""

import json
import os
import sys
import time
import urllib.request

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
    # setup, a dead worker: Cog does not respawn it). STARTING passes: loading weights takes minutes.
    "live": {"STARTING", "READY", "BUSY"},
}

DEFAULT_PORT = 5000
# Below the probes' timeoutSeconds (5) in deploy/*.yaml and the Dockerfile's HEALTHCHECK, so a hung
# server fails the probe with a message instead of being killed by the kubelet's timeout.
REQUEST_TIMEOUT_S = 4
SETUP_LOG_CHARS = 500
# drain: how long endpoint removal takes to reach the Service's proxies, during which a last request
# may still arrive; then how often to look, and the most to wait (terminationGracePeriodSeconds
# bounds it anyway).
DRAIN_SETTLE_S = 3
DRAIN_POLL_S = 1
DRAIN_MAX_S = 300


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


def drain(port: int) -> int:
    """Return once no prediction runs. On SIGTERM coglet stops at once and drops a running
    prediction, so Kubernetes' preStop hook runs this first (the pod has left the endpoints by then)."""
    time.sleep(DRAIN_SETTLE_S)
    deadline = time.monotonic() + DRAIN_MAX_S
    while time.monotonic() < deadline:
        try:
            if health(port).get("status") != "BUSY":
                return 0
        except (OSError, ValueError):
            return 0  # nothing left to drain
        time.sleep(DRAIN_POLL_S)
    print(f"drain: still BUSY after {DRAIN_MAX_S} s")
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
    print(reason)
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
