"""What the gateway's nginx worker holds in memory for the largest requests and answers, to size the sidecar.

    python bench/gateway_memory.py

Real nginx (njs) in front of a real coglet running tests/fixtures/large_output_predictor.py (outputs of
random pixels: 12.6 MB per 2048x2048 PNG, larger than any real image). Each scenario runs on a fresh
gateway and prints the worker's peak resident memory (VmHWM) above its idle size:

1. keyless: five 40 MB bodies to POST /predictions and five to an unknown path, without a key;
2. sync, 46 MB body: one prediction whose input carries a 46 MB data: URI (the largest body allowed);
3. async, 46 MB body: the same with Prefer: respond-async (the gateway adds its webhook to the body);
4. final webhook: an async 4 x 2048x2048 prediction, whose last event (67 MB) the gateway stores;
5. sync answer: a sync 4 x 2048x2048 prediction, whose answer (64 MB of data: URIs) passes through;
6. full queue: all of it at once, as the default limits allow: an async 4 x 2048x2048 prediction runs
   while three 4 x 2048x2048 predictions with 46 MB bodies (two keys, two per key) wait for the slot.
"""

from __future__ import annotations

import base64
import os
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path

import requests

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO_ROOT, print_header, print_table  # noqa: E402

from devtools.cog_server import CogServer  # noqa: E402
from devtools.gateway import Gateway  # noqa: E402

LARGE_PREDICTOR_REF = f"{REPO_ROOT / 'tests/fixtures/large_output_predictor.py'}:Predictor"
KEYS = ("bench-key-a", "bench-key-b")
LARGEST = {"size": 2048, "count": 4}
# The largest body the gateway takes is 48 MiB; this data: URI makes one just under it.
BIG_IMAGE = "data:image/png;base64," + base64.b64encode(os.urandom(33 * 2**20)).decode()
MIB = 2**20


def headers(key: str, asynchronous: bool = False) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}", **({"Prefer": "respond-async"} if asynchronous else {})}


def finish(gateway: Gateway, key: str, prediction_id: str, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        state = requests.get(f"{gateway.url}/predictions/{prediction_id}", headers=headers(key), timeout=30).json()
        if state["status"] in ("succeeded", "failed", "canceled"):
            return
        time.sleep(0.6)
    raise RuntimeError(f"{prediction_id} did not finish in {timeout_s} s")


def keyless(gateway: Gateway) -> str:
    for path in ("/predictions", "/no-such-path"):
        socks = []
        for _ in range(5):
            sock = socket.create_connection(("127.0.0.1", gateway.port), timeout=10)
            sock.sendall(f"POST {path} HTTP/1.1\r\nHost: b\r\nContent-Length: {40 * MIB}\r\n\r\n".encode())
            try:
                sock.sendall(b"x" * 40 * MIB)
            except OSError:
                pass
            socks.append(sock)
        for sock in socks:
            sock.close()
    return "10 x 40 MB sent"


def predict(gateway: Gateway, key: str, body: dict, asynchronous: bool) -> requests.Response:
    response = requests.post(f"{gateway.url}/predictions", json=body, headers=headers(key, asynchronous), timeout=300)
    if asynchronous and response.status_code == 202:
        finish(gateway, key, response.json()["id"])
    return response


def big_body(asynchronous: bool):
    def run(gateway: Gateway) -> str:
        body = {"input": {"size": 8, "count": 1, "image": BIG_IMAGE}}
        response = predict(gateway, KEYS[0], body, asynchronous)
        return f"HTTP {response.status_code}, body {len(BIG_IMAGE) / MIB:.0f} MiB"

    return run


def final_webhook(gateway: Gateway) -> str:
    return f"HTTP {predict(gateway, KEYS[0], {'input': LARGEST}, True).status_code}"


def sync_answer(gateway: Gateway) -> str:
    response = predict(gateway, KEYS[0], {"input": LARGEST}, False)
    return f"HTTP {response.status_code}, answer {len(response.content) / MIB:.0f} MiB"


def full_queue(gateway: Gateway) -> str:
    results: list[int] = []
    running = requests.post(
        f"{gateway.url}/predictions", json={"input": LARGEST}, headers=headers(KEYS[0], True), timeout=30
    )
    waiting = [(KEYS[0], False), (KEYS[1], False), (KEYS[1], True)]
    body = {"input": {**LARGEST, "image": BIG_IMAGE}}
    threads = [
        threading.Thread(target=lambda k=k, a=a: results.append(predict(gateway, k, body, a).status_code))
        for k, a in waiting
    ]
    for thread in threads:
        thread.start()
    finish(gateway, KEYS[0], running.json()["id"])
    for thread in threads:
        thread.join()
    return f"HTTP {running.status_code} then {sorted(results)}"


SCENARIOS = [
    ("1. keyless bodies", keyless),
    ("2. sync, 46 MB body", big_body(False)),
    ("3. async, 46 MB body", big_body(True)),
    ("4. final webhook of 4 x 2048x2048", final_webhook),
    ("5. sync answer of 4 x 2048x2048", sync_answer),
    ("6. full queue (all of the above)", full_queue),
]


def main() -> None:
    print_header("Gateway worker memory (bench/gateway_memory.py)")
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        with CogServer(LARGE_PREDICTOR_REF, cwd=Path(scratch)) as cog:
            for name, scenario in SCENARIOS:
                with Gateway(cog.port, env={"SDXL_API_KEYS": ",".join(KEYS), "SDXL_GATEWAY_QUEUE_WAIT_S": "120"}) as gw:
                    idle = gw.worker_memory_kb()["VmHWM"]
                    outcome = scenario(gw)
                    peak = gw.worker_memory_kb()["VmHWM"]
                rows.append([name, outcome, f"{idle / 1024:.0f}", f"{(peak - idle) / 1024:.0f}"])
    print_table(["scenario", "outcome", "idle worker (MiB)", "peak above idle (MiB)"], rows)


if __name__ == "__main__":
    main()
