"""Generation speed on a GPU: full-size SDXL, the service against a plain diffusers fp16 pipeline, same process.

    script/make-test-weights --size full /tmp/sdxl-full      # ~12.9 GB of random-weight SDXL, ~1 minute
    python bench/generation_gpu.py --weights /tmp/sdxl-full  # 1024x1024, 30 steps, batch 1 and 4

    # a smoke test of the script itself, on CPU with tiny weights (figures meaningless):
    script/make-test-weights /tmp/sdxl-tiny
    python bench/generation_gpu.py --weights /tmp/sdxl-tiny --device cpu --side 256 --steps 3 --repeat 1

For each batch size (num_outputs) and mode (base only; expert ensemble, the base handing over to the
refiner at high_noise_frac 0.8), after one warm-up run each:
  baseline   StableDiffusionXLPipeline + StableDiffusionXLImg2ImgPipeline from from_pretrained, fp16, the
             refiner sharing text_encoder_2 and the VAE as in diffusers' docs, no watermark, output_type="pil"
  service    SDXLService.predict() like for like (safety checker and watermark off), PNG files written
  defaults   SDXLService.predict() with a request's defaults (safety checker and watermark on)
Baseline and service are loaded one after the other (the first freed before the second loads), so each
peak VRAM figure is that implementation's own.

Reported: seconds per image (end to end / batch), sampler steps per second (denoising steps of the whole
batch / denoising time, text encoding included), peak VRAM (torch.cuda.max_memory_allocated), and the
fraction of the physical floor reached: the FLOPs of the run (bench/flops.py: every UNet step with
classifier-free guidance, every decode, counted on the loaded models' configs) divided by the GPU's dense fp16
tensor peak, over the measured time.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import io
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import GIB, median, print_header, print_table, ratio  # noqa: E402
from flops import peak_tflops as flops_peak_tflops  # noqa: E402
from flops import sdxl_flops  # noqa: E402

from devtools.local_request import local_request  # noqa: E402
from sdxl_cog.config import DEFAULT_HIGH_NOISE_FRAC, Settings  # noqa: E402
from sdxl_cog.service import OutputOptions, SDXLService  # noqa: E402
from sdxl_cog.weights import layout  # noqa: E402
from sdxl_cog.weights.profiles import SDXL_SIDE  # noqa: E402

PROMPT = "an astronaut riding a rainbow unicorn, cinematic"
SEED = 1234
GUIDANCE = 7.5  # > 1: classifier-free guidance, two UNet samples per image per step
MODES = {"base": "no_refiner", "ensemble": "expert_ensemble_refiner"}


@dataclasses.dataclass
class Run:
    seconds: float  # end to end
    denoise_seconds: float  # text encoding + every denoising step
    steps: int  # sampler steps (each step runs the whole batch)
    step_counts: dict[str, int]  # per UNet: "base", "refiner"
    peak_vram_gib: float
    image: Image.Image


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def reset_peak(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()


def peak_vram_gib(device: str) -> float:
    return torch.cuda.max_memory_allocated() / GIB if device.startswith("cuda") else float("nan")


def generators(batch: int) -> list[torch.Generator]:
    return [torch.Generator("cpu").manual_seed(SEED + i) for i in range(batch)]


# --- Baseline: plain diffusers -----------------------------------------------------------------------------------


def load_baseline(root: Path, device: str, dtype: torch.dtype):
    from diffusers import AutoencoderKL, StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.disable_progress_bar()

    fp16 = dict(dtype=dtype, variant="fp16", use_safetensors=True, add_watermarker=False)
    vae = AutoencoderKL.from_pretrained(root / layout.VAE_DIR, dtype=dtype, variant="fp16")
    base = StableDiffusionXLPipeline.from_pretrained(root / layout.BASE_DIR, vae=vae, **fp16).to(device)
    refiner = StableDiffusionXLImg2ImgPipeline.from_pretrained(
        root / layout.REFINER_DIR, text_encoder_2=base.text_encoder_2, tokenizer_2=base.tokenizer_2, vae=vae, **fp16
    ).to(device)
    for pipe in (base, refiner):
        pipe.set_progress_bar_config(disable=True)
    return base, refiner


class StageClock:
    """callback_on_step_end that counts steps and notes when the last one finished on the device."""

    def __init__(self, device: str):
        self.device, self.steps, self.finished = device, 0, 0.0

    def __call__(self, pipe, step, timestep, callback_kwargs):
        self.steps += 1
        if step + 1 == pipe.num_timesteps:
            synchronize(self.device)
            self.finished = time.perf_counter()
        return callback_kwargs


def run_baseline(pipes, mode: str, batch: int, args) -> Run:
    base, refiner = pipes
    common = dict(
        prompt=PROMPT,
        num_inference_steps=args.steps,
        guidance_scale=GUIDANCE,
        num_images_per_prompt=batch,
        generator=generators(batch),
    )
    clocks = {"base": StageClock(args.device), "refiner": StageClock(args.device)}
    reset_peak(args.device)
    synchronize(args.device)
    started = time.perf_counter()
    if mode == "base":
        images = base(**common, width=args.side, height=args.side, callback_on_step_end=clocks["base"]).images
        denoise = clocks["base"].finished - started
        del clocks["refiner"]
    else:
        latents = base(
            **common,
            width=args.side,
            height=args.side,
            denoising_end=DEFAULT_HIGH_NOISE_FRAC,
            output_type="latent",
            callback_on_step_end=clocks["base"],
        ).images
        refine_started = time.perf_counter()
        images = refiner(
            **common, image=latents, denoising_start=DEFAULT_HIGH_NOISE_FRAC, callback_on_step_end=clocks["refiner"]
        ).images
        denoise = (clocks["base"].finished - started) + (clocks["refiner"].finished - refine_started)
    synchronize(args.device)
    seconds = time.perf_counter() - started
    counts = {name: clock.steps for name, clock in clocks.items()}
    return Run(seconds, denoise, sum(counts.values()), counts, peak_vram_gib(args.device), images[0])


# --- The service ---------------------------------------------------------------------------------------------------


def run_service(service: SDXLService, options: OutputOptions, mode: str, batch: int, args) -> Run:
    request = local_request(
        prompt=PROMPT,
        width=args.side,
        height=args.side,
        num_outputs=batch,
        num_inference_steps=args.steps,
        guidance_scale=GUIDANCE,
        seed=SEED,
        refine=MODES[mode],
    )
    reset_peak(args.device)
    synchronize(args.device)
    started = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):  # one log line per step
        prediction = service.predict(request, options, None, 0.0)
    seconds = time.perf_counter() - started
    m = prediction.metrics
    counts = {stage: m[f"{stage}_steps"] for stage in ("base", "refiner") if f"{stage}_steps" in m}
    denoise = m["text_encoding_time"] + sum(m.get(f"{stage}_denoise_time", 0.0) for stage in counts)
    return Run(
        seconds, denoise, sum(counts.values()), counts, peak_vram_gib(args.device), Image.open(prediction.paths[0])
    )


# --- FLOPs and the physical floor -----------------------------------------------------------------------------------


def count_flops(base, refiner, side: int) -> dict[str, float]:
    """FLOPs of one UNet step per image (both guidance halves) and of one image's VAE decode (flops.py)."""
    return sdxl_flops(base.unet.config, refiner.unet.config, base.vae.config, side)


def run_flops(run: Run, flops: dict[str, float], batch: int) -> tuple[float, float]:
    """(FLOPs of the denoising, FLOPs of the whole run) for this run's step counts."""
    denoise = sum(flops[stage] * n * batch for stage, n in run.step_counts.items())
    return denoise, denoise + flops["decode"] * batch


def peak_tflops(args) -> float | None:
    if args.peak_tflops:
        return args.peak_tflops
    if not args.device.startswith("cuda"):
        return None
    return flops_peak_tflops(torch.cuda.get_device_name())


# --- Measuring and reporting ----------------------------------------------------------------------------------------


def measure(run, args) -> dict[tuple[str, int], list[Run]]:
    runs = {}
    for batch in args.batches:
        for mode in args.modes:
            run(mode, batch)  # warm-up: kernels chosen, allocator grown
            runs[(mode, batch)] = [run(mode, batch) for _ in range(args.repeat)]
    return runs


def row(label: str, mode: str, batch: int, runs: list[Run], baseline: list[Run] | None, flops, peak) -> list:
    seconds = median([r.seconds for r in runs])
    denoise = median([r.denoise_seconds for r in runs])
    denoise_flops, total_flops = run_flops(runs[0], flops, batch)
    floor = (lambda f, s: f"{f / (peak * 1e12) / s:.0%}") if peak else (lambda f, s: "n/a")
    return [
        mode,
        batch,
        label,
        f"{seconds / batch:.3f}",
        f"{runs[0].steps / denoise:.2f}",
        f"{seconds:.3f} ({min(r.seconds for r in runs):.3f}-{max(r.seconds for r in runs):.3f})",
        ratio(seconds, median([r.seconds for r in baseline])) if baseline else "",
        f"{max(r.peak_vram_gib for r in runs):.2f}" if args_cuda(runs) else "n/a",
        floor(total_flops, seconds),
        floor(denoise_flops, denoise),
    ]


def measure_baseline(args, dtype: torch.dtype) -> tuple[dict[tuple[str, int], list[Run]], dict[str, float]]:
    pipes = load_baseline(args.weights, args.device, dtype)
    flops = count_flops(*pipes, args.side)
    print(
        "- FLOPs per image (one UNet step with both guidance halves; one decode): "
        + ", ".join(f"{k} {v / 1e12:.3g} T" for k, v in flops.items())
        + "\n",
        flush=True,
    )
    return measure(lambda mode, batch: run_baseline(pipes, mode, batch, args), args), flops


def args_cuda(runs: list[Run]) -> bool:
    return not np.isnan(runs[0].peak_vram_gib)


def max_diff(a: Image.Image, b: Image.Image) -> int:
    return int(np.abs(np.asarray(a.convert("RGB"), np.int16) - np.asarray(b.convert("RGB"), np.int16)).max())


def release(device: str) -> None:
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", type=Path, required=True, help="full-size weights (script/make-test-weights)")
    parser.add_argument("--device", default="cuda", help="default: %(default)s (cpu only to smoke-test the script)")
    parser.add_argument("--side", type=int, default=SDXL_SIDE, help="image side (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=30, help="num_inference_steps (default: %(default)s)")
    parser.add_argument("--batches", type=lambda s: [int(b) for b in s.split(",")], default=[1, 4], help="default: 1,4")
    parser.add_argument("--modes", type=lambda s: s.split(","), default=list(MODES), help="default: base,ensemble")
    parser.add_argument("--repeat", type=int, default=3, help="timed runs per case (default: %(default)s)")
    parser.add_argument("--peak-tflops", type=float, help="the GPU's dense fp16 peak, if not in the built-in table")
    args = parser.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("No CUDA device: this benchmark needs a GPU (--device cpu only smoke-tests the script).")
    unknown = set(args.modes) - set(MODES)
    if unknown:
        parser.error(f"unknown modes {sorted(unknown)}; choose from {', '.join(MODES)}")

    dtype = torch.float16 if args.device.startswith("cuda") else torch.float32
    peak = peak_tflops(args)
    print_header(
        "Generation",
        {
            "weights": args.weights,
            "device": args.device,
            "dtype": str(dtype),
            "shape": f"{args.side}x{args.side}, {args.steps} steps, guidance {GUIDANCE}",
            "peak TFLOP/s used for the floor": peak or "unknown (pass --peak-tflops)",
        },
    )

    # 1. The plain diffusers baseline, freed before the service loads.
    baseline, flops = measure_baseline(args, dtype)
    release(args.device)

    # 2. The service, like for like and with a request's defaults.
    with tempfile.TemporaryDirectory(prefix="bench-generation-") as scratch:
        settings = dataclasses.replace(
            Settings.from_env(),
            weights_dir=args.weights,
            device=args.device,
            dtype=dtype,
            output_dir=Path(scratch) / "outputs",
        )
        service = SDXLService(settings)
        like = OutputOptions("png", 80, apply_watermark=False, safety_check=False)
        defaults = OutputOptions("png", 80, apply_watermark=True, safety_check=True)
        ours = measure(lambda mode, batch: run_service(service, like, mode, batch, args), args)
        ours_defaults = measure(lambda mode, batch: run_service(service, defaults, mode, batch, args), args)

    rows = []
    for key, base_runs in baseline.items():
        mode, batch = key
        rows.append(row("baseline (diffusers)", mode, batch, base_runs, None, flops, peak))
        rows.append(row("service, like for like", mode, batch, ours[key], base_runs, flops, peak))
        rows.append(row("service, defaults", mode, batch, ours_defaults[key], base_runs, flops, peak))
    print_table(
        [
            "mode",
            "batch",
            "implementation",
            "s / image",
            "steps / s",
            "end to end s, median (min-max)",
            "vs baseline",
            "peak VRAM GiB",
            "floor reached, end to end",
            "floor reached, denoising",
        ],
        rows,
    )
    for key, base_runs in baseline.items():
        print(
            f"- {key[0]}, batch {key[1]}: service vs baseline first image, max abs pixel difference "
            f"{max_diff(ours[key][0].image, base_runs[0].image)}; steps per UNet {base_runs[0].step_counts}"
        )


if __name__ == "__main__":
    main()
