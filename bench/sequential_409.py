"""How often a strictly sequential client gets 409 from the real Cog server, and what the retrying client pays.

    python bench/sequential_409.py                                  # 200 requests, dummy predictor and predict.py
    python bench/sequential_409.py --count 500 --predictors dummy

Each request is sent only after the previous answer arrived. coglet sends a sync response before it frees
its prediction slot, so the next request can land in that moment and get `409 At capacity`.

1. raw: plain `requests.post`, no retry; each 409 counts and the next request goes on.
2. client: test_request.py's `post_prediction` (retries a 409 with backoff); its failures and the
   retries and seconds they cost.

Predictors: `dummy` (tests/fixtures/dummy_predictor.py, a few ms per prediction) and `sdxl` (predict.py on
tiny synthetic weights, 128 px, 1 step).
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import requests

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO_ROOT, print_header, print_table  # noqa: E402

from devtools.cog_server import DUMMY_PREDICTOR_REF, CogServer  # noqa: E402

READY_TIMEOUT_S = 300
REQUEST_TIMEOUT_S = 120
PREDICTORS = {
    "dummy": (DUMMY_PREDICTOR_REF, {"width": 8, "apply_watermark": False}),
    "sdxl": ("predict.py:Predictor", {"prompt": "a fox", "width": 128, "height": 128, "num_inference_steps": 1}),
}


def load_client():
    spec = importlib.util.spec_from_file_location("test_request_client", REPO_ROOT / "test_request.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def raw_run(url: str, inputs: dict, count: int) -> dict:
    statuses: Counter[int] = Counter()
    started = time.monotonic()
    for _ in range(count):
        response = requests.post(f"{url}/predictions", json={"input": inputs}, timeout=REQUEST_TIMEOUT_S)
        statuses[response.status_code] += 1
    return {"statuses": statuses, "seconds": time.monotonic() - started}


def client_run(url: str, inputs: dict, count: int) -> dict:
    client = load_client()
    statuses: Counter[int] = Counter()
    retries, waited, retried_requests = 0, 0.0, 0
    started = time.monotonic()
    for _ in range(count):
        response, busy = client.post_prediction(url, {"input": inputs}, REQUEST_TIMEOUT_S, client.DEFAULT_BUSY_WAIT_S)
        statuses[response.status_code] += 1
        retries, waited, retried_requests = (
            retries + busy.retries,
            waited + busy.waited_s,
            retried_requests + (busy.retries > 0),
        )
    return {
        "statuses": statuses,
        "seconds": time.monotonic() - started,
        "retries": retries,
        "retried_requests": retried_requests,
        "waited_s": waited,
    }


def row(predictor: str, mode: str, count: int, result: dict) -> list[object]:
    statuses = result["statuses"]
    busy, failed = statuses[409], count - statuses[200]
    return [
        predictor,
        mode,
        count,
        f"{busy} ({100 * busy / count:.1f}%)",
        failed,
        result.get("retries", "-"),
        f"{result['waited_s']:.2f}" if "waited_s" in result else "-",
        f"{1000 * result['seconds'] / count:.0f}",
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=200, help="sequential requests per run (default %(default)s)")
    parser.add_argument("--predictors", default="dummy,sdxl", help="comma-separated: dummy, sdxl (default %(default)s)")
    args = parser.parse_args(argv)
    print_header("Sequential sync requests: raw 409s and the retrying client", {"requests per run": args.count})
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-409-") as scratch:
        for name in args.predictors.split(","):
            ref, inputs = PREDICTORS[name]
            env = {}
            if name == "sdxl":
                from devtools.synthetic import make_weights  # torch: only when predict.py is measured

                make_weights(Path(scratch) / "weights", size="tiny", seed=0)
                env = {"SDXL_WEIGHTS_DIR": str(Path(scratch) / "weights"), "SDXL_OUTPUT_DIR": f"{scratch}/outputs"}
            cwd = REPO_ROOT if name == "sdxl" else Path(scratch)
            with CogServer(ref, cwd=cwd, env=env, ready_timeout=READY_TIMEOUT_S) as server:
                requests.post(f"{server.url}/predictions", json={"input": inputs}, timeout=REQUEST_TIMEOUT_S)  # warm-up
                server.wait_for_status("READY", 10)
                rows.append(row(name, "raw requests", args.count, raw_run(server.url, inputs, args.count)))
                print(rows[-1], flush=True)
                server.wait_for_status("READY", 10)
                rows.append(row(name, "test_request.py client", args.count, client_run(server.url, inputs, args.count)))
                print(rows[-1], flush=True)
    print()
    headers = ["predictor", "client", "requests", "409s", "failed", "retries", "s waited", "ms per request"]
    print_table(headers, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
