"""Request overhead on CPU with tiny weights: what the service adds around the diffusion work.

    python bench/overhead.py                       # makes tiny synthetic weights in a temporary directory
    python bench/overhead.py --weights DIR --side 1024 --steps 4

1. In process: SDXLService.predict() against a bare diffusers StableDiffusionXLPipeline, loaded on its own by
   from_pretrained from the same files, called with the same arguments (prompt, size, steps, guidance,
   seed), with one torch thread by default (see --threads). predict() runs like for like (safety checker
   and watermark off: the bare call does neither) and with a request's defaults (both on). Runs are
   interleaved after a warm-up; the like-for-like image must equal the bare pipeline's, pixel for pixel,
   or the comparison is not of the same work. Wall time and process CPU time are both reported: on a
   machine shared with other work, CPU time is the steadier measure of the work done.
2. Over HTTP: POST /predictions to the real Cog server (coglet, via devtools/cog_server.py) on a loopback
   port, against the in-process predict() of step 1 with the same inputs, and against the server's own
   `total_time` metric for the same request. The base64 of the output, which the response has to carry,
   is timed on its own.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import dataclasses
import io
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO_ROOT, median, print_header, print_table, ratio, spread  # noqa: E402

from devtools.local_request import local_request  # noqa: E402
from devtools.synthetic import make_weights  # noqa: E402
from sdxl_cog.config import Settings  # noqa: E402
from sdxl_cog.service import OutputOptions, SDXLService  # noqa: E402
from sdxl_cog.weights import layout  # noqa: E402

PROMPT = "an astronaut riding a rainbow unicorn, cinematic"
SEED = 1234
GUIDANCE = 7.5
SCHEDULER = "K_EULER"  # the default sampler; the bare pipeline gets the same EulerDiscreteScheduler config
READY_TIMEOUT_S = 300
REQUEST_TIMEOUT_S = 600


def request_inputs(side: int, steps: int) -> dict:
    """predict.py's inputs, shared by the in-process and HTTP requests."""
    return dict(
        prompt=PROMPT,
        negative_prompt="",
        width=side,
        height=side,
        num_outputs=1,
        scheduler=SCHEDULER,
        num_inference_steps=steps,
        guidance_scale=GUIDANCE,
        seed=SEED,
        refine="no_refiner",
        output_format="png",
    )


def build(inputs: dict):
    return local_request(**{k: v for k, v in inputs.items() if k != "output_format"})


def bare_pipeline(root: Path, dtype: torch.dtype):
    """The plain diffusers recipe, loaded independently of sdxl_cog from the same files."""
    from diffusers import AutoencoderKL, StableDiffusionXLPipeline

    vae = AutoencoderKL.from_pretrained(root / layout.VAE_DIR, dtype=dtype, variant="fp16")
    pipe = StableDiffusionXLPipeline.from_pretrained(
        root / layout.BASE_DIR, vae=vae, dtype=dtype, variant="fp16", use_safetensors=True, add_watermarker=False
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def bare_call(pipe, side: int, steps: int) -> Image.Image:
    return pipe(
        prompt=PROMPT,
        negative_prompt=None,  # an empty negative prompt: the base zeroes it (force_zeros_for_empty_prompt)
        width=side,
        height=side,
        num_inference_steps=steps,
        guidance_scale=GUIDANCE,
        generator=[torch.Generator("cpu").manual_seed(SEED)],
        output_type="pil",
    ).images[0]


def load(path: Path) -> Image.Image:
    with Image.open(path) as image:
        return image.convert("RGB")


def quiet(fn, *args):
    with contextlib.redirect_stdout(io.StringIO()):
        return fn(*args)


def bench_in_process(service: SDXLService, pipe, args) -> None:
    request = build(request_inputs(args.side, args.steps))
    options = {
        "predict(), like for like": OutputOptions("png", 80, apply_watermark=False, safety_check=False),
        "predict(), request defaults": OutputOptions("png", 80, apply_watermark=True, safety_check=True),
    }
    runners = {"bare pipeline": lambda: bare_call(pipe, args.side, args.steps)}
    # predict() logs a line per step; captured here, as the server captures it into the prediction's logs.
    runners.update({label: (lambda o=o: quiet(service.predict, request, o, None, 0.6)) for label, o in options.items()})
    times: dict[str, list[float]] = {label: [] for label in runners}
    cpu: dict[str, list[float]] = {label: [] for label in runners}
    results: dict[str, list] = {label: [] for label in runners}
    for round_ in range(args.repeat + 1):  # round 0 is the warm-up
        for label, run in runners.items():
            started, cpu_started = time.perf_counter(), time.process_time()
            value = run()
            elapsed, cpu_elapsed = time.perf_counter() - started, time.process_time() - cpu_started
            if round_:
                times[label].append(elapsed)
                cpu[label].append(cpu_elapsed)
                # The next prediction clears this one's output directory: read the image back now.
                results[label].append(
                    value if isinstance(value, Image.Image) else (value.metrics, load(value.paths[0]))
                )

    bare, bare_min, bare_cpu = (f(t["bare pipeline"]) for f, t in ((median, times), (min, times), (median, cpu)))
    rows = [
        [
            label,
            spread(t),
            ratio(median(t), bare),
            ratio(min(t), bare_min),
            f"{median(cpu[label]):.3f} s",
            ratio(median(cpu[label]), bare_cpu),
            f"{(median(cpu[label]) - bare_cpu) * 1000:+.1f} ms",
        ]
        for label, t in times.items()
    ]
    print(f"### predict() vs a bare diffusers pipeline, {args.side}x{args.side}, {args.steps} steps, in process")
    headers = ["variant", "wall s, median (min-max)", "vs bare (medians)", "vs bare (minima)", "CPU s, median"]
    print_table([*headers, "CPU vs bare", "CPU difference"], rows)
    same = results["predict(), like for like"][-1][1]
    diff = int(np.abs(np.asarray(same, np.int16) - np.asarray(results["bare pipeline"][-1], np.int16)).max())
    print(f"- like-for-like output vs bare pipeline output: max abs pixel difference {diff}")
    for label in options:
        metrics = [m for m, _ in results[label]]
        phases = [k for k in metrics[0] if k.endswith("_time")]
        print(f"- {label} phases: " + ", ".join(f"{k[:-5]} {median([m[k] for m in metrics]):.3f} s" for k in phases))
    print(flush=True)


def bench_http(service: SDXLService, root: Path, scratch: Path, args) -> None:
    from devtools.cog_server import CogServer

    inputs = request_inputs(args.side, args.steps)
    request, options = build(inputs), OutputOptions("png", 80, apply_watermark=True, safety_check=True)
    env = {"SDXL_WEIGHTS_DIR": str(root), "SDXL_DEVICE": "cpu", "SDXL_OUTPUT_DIR": str(scratch / "server-outputs")}
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)  # torch's default thread count in the worker
    round_trips, totals, overheads, in_process, payloads = [], [], [], [], []
    with CogServer(cwd=REPO_ROOT, env=env, ready_timeout=READY_TIMEOUT_S, log_path=scratch / "server.log") as server:
        for round_ in range(args.repeat + 1):  # round 0 is the warm-up
            # 1. Over HTTP; the server's own timing of SDXLService.predict comes back in the metrics.
            started = time.perf_counter()
            response = server.post_prediction(inputs, timeout=REQUEST_TIMEOUT_S)
            elapsed = time.perf_counter() - started
            body = response.json()
            if body.get("status") != "succeeded":
                raise SystemExit(f"prediction failed: {body.get('error')}\n{server.log_tail()}")
            # 2. The same request in this process, right after, under the same load of the machine.
            started = time.perf_counter()
            quiet(service.predict, request, options, None, 0.6)
            local = time.perf_counter() - started
            if round_:
                round_trips.append(elapsed)
                totals.append(body["metrics"]["total_time"])
                overheads.append(elapsed - body["metrics"]["total_time"])
                in_process.append(local)
                payloads.append(base64.b64decode(body["output"][0].split(",", 1)[1]))

    png = payloads[-1]
    b64_times = []
    for _ in range(args.repeat):
        started = time.perf_counter()
        base64.b64encode(png)
        b64_times.append(time.perf_counter() - started)
    rt = median(round_trips)
    rows = [
        ["POST /predictions round trip", spread(round_trips), ""],
        ["predict() in this process, interleaved", spread(in_process), f"{(rt - median(in_process)) * 1000:+.1f} ms"],
        ["the server's predict() (its total_time)", spread(totals), f"{(rt - median(totals)) * 1000:+.1f} ms"],
        ["round trip - total_time, per request", spread(overheads), ""],
        [f"base64 of the {len(png) / 1e6:.2f} MB PNG", spread(b64_times), ""],
    ]
    print(f"### POST /predictions through coglet vs predict() in process, {args.side}x{args.side}, {args.steps} steps")
    print_table(["what", "seconds, median (min-max)", "round trip minus this"], rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", type=Path, help="tiny weights (default: made in a temporary directory)")
    parser.add_argument("--side", type=int, default=512, help="image side (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=20, help="denoising steps (default: %(default)s)")
    parser.add_argument("--repeat", type=int, default=5, help="timed runs per variant (default: %(default)s)")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads, here and in the server (default: %(default)s; 0 = torch's default). On a shared "
        "machine, threads that wait for each other at every parallel region turn others' load into noise.",
    )
    parser.add_argument("--skip-http", action="store_true", help="only the in-process comparison")
    args = parser.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="bench-overhead-") as tmp:
        scratch = Path(tmp)
        root = args.weights or scratch / "weights"
        if args.weights is None:
            make_weights(root, size="tiny", seed=0)
        settings = dataclasses.replace(
            Settings.from_env(), weights_dir=root, device="cpu", output_dir=scratch / "outputs"
        )
        print_header(
            "Request overhead",
            {"weights": root, "dtype": str(settings.dtype), "torch threads": torch.get_num_threads()},
        )
        service = SDXLService(settings)
        pipe = bare_pipeline(root, settings.dtype)
        bench_in_process(service, pipe, args)
        del pipe
        if not args.skip_http:
            bench_http(service, root, scratch, args)


if __name__ == "__main__":
    main()
