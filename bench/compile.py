"""What SDXL_COMPILE costs and gives: the cold start (setup() with its warm-up) and the per-request time, compiled
against uncompiled, a first start against a second start on the same compile cache. Each start is a fresh
interpreter, as a restarted server is, all from one run of this script.

    python bench/compile.py                                  # tiny synthetic weights, 128 px, on this CPU
    python bench/compile.py --weights /tmp/sdxl-full --side 256 --dtype bfloat16   # full size (slow on a CPU)
    python bench/compile.py --device cuda --weights /tmp/sdxl-full --side 1024 --steps 30

Variants, one after the other, each in its own process (SDXL_* from the environment, as the server reads them):
  uncompiled     SDXL_COMPILE=0
  first start    SDXL_COMPILE=1 on an empty SDXL_COMPILE_CACHE_DIR: every graph compiled
  second start   SDXL_COMPILE=1 on the cache the first start filled: traced again, nothing compiled
Each reports setup() (the warm-up apart), then --requests text-to-image requests of the warmed size (base only,
--steps steps; the first one apart, the median of the others), and inductor's cache hits and misses.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import emit_result, median, print_header, print_table, ratio, run_child  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parent.parent
VARIANTS = {
    "uncompiled": {"SDXL_COMPILE": "0"},
    "first start": {"SDXL_COMPILE": "1"},
    "second start": {"SDXL_COMPILE": "1"},
}


def child(args) -> None:
    """One start: setup(), then the requests; prints its figures for the parent."""
    started = time.perf_counter()
    import torch

    from devtools.local_request import local_request
    from sdxl_cog.config import Settings
    from sdxl_cog.service import OutputOptions, SDXLService

    imported = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):
        service = SDXLService(Settings.from_env())
    setup = time.perf_counter() - imported
    options = OutputOptions("png", 80, apply_watermark=False, safety_check=False)
    seconds = []
    for seed in range(args.requests):
        req = local_request(
            prompt="a red fox in the snow",
            width=args.side,
            height=args.side,
            num_inference_steps=args.steps,
            guidance_scale=7.5,
            seed=seed,
        )
        begun = time.perf_counter()
        with contextlib.redirect_stdout(io.StringIO()):
            service.predict(req, options, None, 0.6)
        seconds.append(time.perf_counter() - begun)
    counters = torch._dynamo.utils.counters
    cache = {k: v for k, v in {**counters["inductor"], **counters["aot_autograd"]}.items() if "cache_" in k}
    emit_result(
        {
            "imports_s": imported - started,
            "setup_s": setup,
            "warmup_s": service.weights.load_seconds.get("warmup", 0.0),
            "first_request_s": seconds[0],
            "request_s": median(seconds[1:]),
            "cache": cache,
        }
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", type=Path, help="a weights directory (default: tiny synthetic ones, made here)")
    parser.add_argument("--device", default="cpu", help="default: %(default)s")
    parser.add_argument("--dtype", help="SDXL_DTYPE (default: the server's for the device)")
    parser.add_argument("--side", type=int, default=128, help="image side, the one size warmed (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=4, help="steps per request (default: %(default)s)")
    parser.add_argument("--requests", type=int, default=4, help="per start, the first one apart (default: %(default)s)")
    parser.add_argument("--threads", type=int, help="torch threads in each start (default: torch's own)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    print_header("SDXL_COMPILE: cold start and per request", {"device": args.device, "side": args.side})
    with tempfile.TemporaryDirectory(prefix="bench-compile-") as scratch:
        weights = args.weights or make_tiny(Path(scratch) / "weights")
        env = {
            "SDXL_WEIGHTS_DIR": str(weights),
            "SDXL_DEVICE": args.device,
            "SDXL_COMPILE_CACHE_DIR": str(Path(scratch) / "compile-cache"),
            "SDXL_COMPILE_SIZES": f"{args.side}x{args.side}",
            "SDXL_OUTPUT_DIR": str(Path(scratch) / "outputs"),
            "SDXL_PREDICTION_MARKER": str(Path(scratch) / "prediction-started"),
            **({"SDXL_DTYPE": args.dtype} if args.dtype else {}),
            **({"OMP_NUM_THREADS": str(args.threads)} if args.threads else {}),
        }
        child_argv = [
            __file__,
            "--child",
            f"--side={args.side}",
            f"--steps={args.steps}",
            f"--requests={args.requests}",
        ]
        results = {}
        for variant, variant_env in VARIANTS.items():
            print(f"{variant} ...", flush=True)
            results[variant] = run_child(child_argv, {**env, **variant_env})
    report(results)


def make_tiny(root: Path) -> Path:
    from devtools.synthetic import make_weights

    with contextlib.redirect_stderr(io.StringIO()):
        make_weights(root, size="tiny", seed=0)
    return root


def report(results: dict[str, dict]) -> None:
    plain, first = results["uncompiled"], results["first start"]
    rows = []
    for variant, r in results.items():
        rows.append(
            [
                variant,
                f"{r['wall_s']:.1f}",
                f"{r['setup_s']:.2f}",
                f"{r['warmup_s']:.2f}",
                f"{r['first_request_s']:.3f}",
                f"{r['request_s']:.3f}",
                ratio(r["setup_s"], plain["setup_s"]),
                ratio(r["setup_s"], first["setup_s"]),
                ratio(r["request_s"], plain["request_s"]),
                ", ".join(f"{k} {v}" for k, v in sorted(r["cache"].items())) or "-",
            ]
        )
    headers = ["start", "process s", "setup() s", "of which warm-up", "first request s", "request s (median)"]
    headers += ["setup vs uncompiled", "setup vs first start", "request vs uncompiled", "inductor caches"]
    print_table(headers, rows)


if __name__ == "__main__":
    main()
