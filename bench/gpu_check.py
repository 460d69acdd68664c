"""`make gpu-check`: the server measured on a CUDA GPU with nothing but this repository and the wheels of
script/gpu-wheels: no network, no weights on disk.

    make gpu-check                                                    # the GPU machine (bench/README.md, section 9)
    python bench/gpu_check.py --device cpu --size tiny --side 128 --steps 2 --mode-steps 2 --repeat 1 \\
        --compile-sizes 128x128                                       # the smoke test (tests/test_gpu_check.py)

1. Random full-size SDXL built on the GPU (devtools/synthetic_pipelines.py): two checkpoints, the refiner, the VAE and
   the safety checker, in seconds instead of a 12.9 GB write. Each variant below gets a fresh set: the same values.
2. The baseline: plain diffusers, a stock StableDiffusionXLPipeline on the same modules (SDPA, no compile).
3. The service uncompiled, then with SDXL_COMPILE (its warm-up timed apart), every mode at --side: base (the
   headline: --steps, --repeat timed runs), expert ensemble, base_image_refiner, img2img, inpaint, refiner_only, a
   LoRA, 4 outputs, and a model switch through a GPU cache with room for one checkpoint.
4. Low-VRAM mode, compiled: base, expert ensemble, a model switch.

Checks (exit status 1 when one fails): no image is black (a NaN in the latents decodes to NaN, which becomes 0 in
uint8); every compiled row but the LoRA's ran compiled graphs (the serving stance is made "fail_on_recompile", so
a row that would have run uncompiled fails). Prints per row seconds per image, steps/s, peak GPU memory, the fraction
of the FLOP floor (bench/flops.py) and the speed-up (base against the baseline, compiled against uncompiled); the
compiled images' difference from the uncompiled ones; writes everything to --report as JSON.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import importlib.metadata
import io
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import GIB, median, print_header, print_table  # noqa: E402
from flops import peak_tflops, sdxl_flops  # noqa: E402
from generation_gpu import StageClock, reset_peak, synchronize  # noqa: E402

from devtools.local_request import local_request  # noqa: E402
from devtools.synthetic_pipelines import random_lora, synthetic_pipelines  # noqa: E402
from sdxl_cog.config import Settings, parse_compile_sizes  # noqa: E402
from sdxl_cog.device import compilation  # noqa: E402
from sdxl_cog.device.placement import module_bytes  # noqa: E402
from sdxl_cog.service import OutputOptions, SDXLService  # noqa: E402
from sdxl_cog.weights.profiles import Profile  # noqa: E402

PROMPT = "an astronaut riding a rainbow unicorn, cinematic"  # one 77-token chunk, even for the synthetic tokenizer
SEED = 1234
GUIDANCE = 7.5  # > 1: classifier-free guidance, two UNet samples per image per step
DEFAULT, SECOND = "sdxl", "second"
LIKE_FOR_LIKE = OutputOptions("png", 80, apply_watermark=False, safety_check=False)
BLACK_MAX = 8  # an image whose brightest value is below this is black
# The model switch's GPU cache: 1.5 times one checkpoint's own modules (text encoders and UNet, before SDXL_COMPILE
# adds its fused projections, +25% of the UNet) holds one checkpoint, fused or not, and never two, whose second UNet
# alone outweighs half of the first checkpoint (the UNet is the larger part, 2.6 of 3.4 G parameters).
ONE_CHECKPOINT_BUDGET = 1.5
# In this order, LoRA last: uncompiled, its adapter stays loaded (disabled) on the default UNet after its request
# (checkpoints/lora.py), and PEFT's wrapped layers would slow every mode measured after it.
MODES = {
    "base": {},
    "expert_ensemble": {"refine": "expert_ensemble_refiner"},
    "base_image_refiner": {"refine": "base_image_refiner"},
    "img2img": {"image": "image"},
    "inpaint": {"image": "image", "mask": "mask"},
    "refiner_only": {"image": "image", "refine": "refiner_only"},
    "four_outputs": {"num_outputs": 4},
    "model_switch": {"model": SECOND},
    "lora": {"lora": True},
}
LOW_VRAM_MODES = ("base", "expert_ensemble", "model_switch")


@dataclasses.dataclass
class Row:
    variant: str
    mode: str
    seconds: float = float("nan")  # end to end, the median of the timed runs
    images: int = 1
    steps: dict = dataclasses.field(default_factory=dict)  # denoising steps per UNet
    denoise_seconds: float = float("nan")  # text encoding and every denoising step
    peak_gib: float | None = None
    model_load_seconds: float | None = None
    graphs: str = "uncompiled"  # what the UNets' blocks and the decoder ran
    error: str | None = None
    image: np.ndarray | None = dataclasses.field(default=None, repr=False)

    def report(self) -> dict:
        return {k: v for k, v in dataclasses.asdict(self).items() if k != "image"}


def peak_gib(device: str) -> float | None:
    return torch.cuda.max_memory_allocated() / GIB if device.startswith("cuda") else None


def request(args, steps: int, sources: dict[str, Path], **overrides):
    fields = dict(
        prompt=PROMPT, width=args.side, height=args.side, num_inference_steps=steps, guidance_scale=GUIDANCE, seed=SEED
    )
    fields.update({k: sources[v] if k in ("image", "mask") else v for k, v in overrides.items() if k != "lora"})
    return local_request(**fields)


def predict(service: SDXLService, args, req, lora: str | None, variant: str, mode: str) -> Row:
    reset_peak(args.device)
    synchronize(args.device)
    started = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):  # one log line per step
        prediction = service.predict(req, LIKE_FOR_LIKE, lora, 0.6)
    synchronize(args.device)
    seconds, m = time.perf_counter() - started, prediction.metrics
    steps = {stage: m[f"{stage}_steps"] for stage in ("base", "refiner") if f"{stage}_steps" in m}
    denoise = m["text_encoding_time"] + sum(m.get(f"{stage}_denoise_time", 0.0) for stage in steps)
    image = np.asarray(Image.open(prediction.paths[0]).convert("RGB"))
    return Row(
        variant,
        mode,
        seconds,
        req.num_outputs,
        steps,
        denoise,
        peak_gib=peak_gib(args.device),
        model_load_seconds=m.get("model_load_time"),
        image=image,
    )


def graphs(spec: dict, args, warmed: tuple | None) -> str:
    """What a mode's request runs on a service compiled for `warmed` sizes (None: not compiled)."""
    if warmed is None:
        return "uncompiled"
    if spec.get("lora"):
        return "uncompiled (LoRA)"
    return "compiled" if (args.side, args.side, spec.get("num_outputs", 1)) in warmed else "uncompiled (not warmed)"


def measure_service(service: SDXLService, args, variant: str, modes, sources, lora: Path) -> list[Row]:
    """Each mode --warm-runs times untimed, then timed (the headline --repeat times). A model switch is timed from
    the default checkpoint, so that every timed run does switch. A compiled row expected to run compiled graphs
    fails rather than running uncompiled (the "fail_on_recompile" stance)."""
    rows, warmed = [], service.settings.compile_sizes if service.settings.compile else None
    for mode in modes:
        spec = MODES[mode]
        steps, repeat = (args.steps, args.repeat) if mode == "base" else (args.mode_steps, 1)
        req = request(args, steps, sources, **spec)
        lora_path = str(lora) if spec.get("lora") else None
        ran = graphs(spec, args, warmed)
        compilation.SERVING_STANCE = "fail_on_recompile" if ran == "compiled" else "eager_on_recompile"
        try:
            runs = []
            for i in range(args.warm_runs + repeat):
                if mode == "model_switch":
                    predict(service, args, request(args, 1, sources), None, variant, mode)
                row = predict(service, args, req, lora_path, variant, mode)
                runs += [row] if i >= args.warm_runs else []
            row.seconds = median([r.seconds for r in runs])
            row.denoise_seconds = median([r.denoise_seconds for r in runs])
            row.graphs = ran
        except Exception as error:  # one broken mode must not hide the others: reported, and the exit status is 1
            row = Row(variant, mode, graphs=ran, error=f"{type(error).__name__}: {error}")
        rows.append(row)
        print(f"  {variant} {mode} ({ran}): {row.error or f'{row.seconds:.3f}s'}", flush=True)
    return rows


def measure_baseline(pipe, args) -> Row:
    """A stock StableDiffusionXLPipeline, timed like the headline row."""
    pipe.set_progress_bar_config(disable=True)
    runs = []
    for i in range(args.warm_runs + args.repeat):
        clock = StageClock(args.device)
        reset_peak(args.device)
        synchronize(args.device)
        started = time.perf_counter()
        generator = [torch.Generator("cpu").manual_seed(SEED)]
        out = pipe(
            prompt=PROMPT,
            width=args.side,
            height=args.side,
            num_inference_steps=args.steps,
            guidance_scale=GUIDANCE,
            generator=generator,
            callback_on_step_end=clock,
        )
        synchronize(args.device)
        seconds = time.perf_counter() - started
        image = np.asarray(out.images[0].convert("RGB"))
        row = Row("diffusers", "base", seconds, 1, {"base": clock.steps}, clock.finished - started)
        row.peak_gib, row.image = peak_gib(args.device), image
        runs += [row] if i >= args.warm_runs else []
    row.seconds = median([r.seconds for r in runs])
    row.denoise_seconds = median([r.denoise_seconds for r in runs])
    return row


def sources_at(side: int, directory: Path) -> dict[str, Path]:
    """A noise source image and a mask repainting its right half, at the measured size."""
    rng = np.random.default_rng(0)
    mask = np.zeros((side, side), np.uint8)
    mask[:, side // 2 :] = 255
    paths = {"image": directory / "source.png", "mask": directory / "mask.png"}
    Image.fromarray(rng.integers(0, 255, (side, side, 3), dtype=np.uint8)).save(paths["image"])
    Image.fromarray(mask).save(paths["mask"])
    return paths


def release(device: str) -> None:
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


def synthesize(args, dtype: torch.dtype):
    """A fresh set of the same weights: two checkpoints serving at --side, the refiner, the VAE, the checker."""
    return synthetic_pipelines(args.size, args.device, dtype, [DEFAULT, SECOND], Profile(side=args.side))


def one_checkpoint_budget(pipelines) -> int:
    first = pipelines.checkpoints[0]
    own = (first.text_encoder, first.text_encoder_2, first.unet)
    return int(ONE_CHECKPOINT_BUDGET * sum(module_bytes(m) for m in own))


def serve(args, variant: str, pipelines, scratch: Path, sources, lora: Path, modes, **overrides):
    """The service on `pipelines`, every mode measured; returns its rows and its setup's seconds by phase. `overrides`
    name compile and low_vram, whatever the environment says."""
    settings = dataclasses.replace(
        Settings.from_env(),
        device=args.device,
        dtype=pipelines.checkpoints[0].unet.dtype,
        output_dir=scratch / "outputs",
        input_dir=scratch / "inputs",
        prediction_marker=scratch / "prediction-started",
        lora_cache_dir=scratch / "lora-cache",
        lora_local_dirs=(lora.parent,),
        model_memory_bytes=one_checkpoint_budget(pipelines),
        compile_cache_dir=args.compile_cache or scratch / "compile-cache",
        compile_sizes=parse_compile_sizes(args.compile_sizes or f"{args.side}x{args.side},{args.side}x{args.side}x4"),
        **overrides,
    )
    print(f"{variant}: setup", flush=True)
    cache_before = cache_counters()
    started = time.perf_counter()
    service = SDXLService(settings, pipelines)
    setup = {"seconds": time.perf_counter() - started, **service.weights.load_seconds}
    setup["compile_cache"] = {k: v - cache_before.get(k, 0) for k, v in cache_counters().items()}
    return measure_service(service, args, variant, modes, sources, lora), setup


def cache_counters() -> dict[str, int]:
    """Inductor's FX-graph and AOTAutograd cache hits and misses so far in this process."""
    counters = torch._dynamo.utils.counters
    found = {**counters["inductor"], **counters["aot_autograd"]}
    return {k: v for k, v in found.items() if "cache_hit" in k or "cache_miss" in k}


def write_lora(unet, directory: Path, dtype: torch.dtype) -> Path:
    path = directory / "loras" / "random.safetensors"
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({f"unet.{k}": v.to(dtype).contiguous() for k, v in random_lora(unet).items()}, path)
    return path


# --- Reporting -----------------------------------------------------------------------------------------------------


def row_flops(row: Row, flops: dict[str, float]) -> tuple[float, float]:
    """(denoising, end to end) FLOPs of a row's run, from the steps each UNet really ran."""
    denoise = sum(flops[stage] * n for stage, n in row.steps.items()) * row.images
    return denoise, denoise + flops["decode"] * row.images


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(255**2 / mse)


def derived(row: Row, rows: list[Row], flops, peak: float | None) -> dict:
    """The figures of a row that compare it: with the FLOP floor, the baseline and the uncompiled service."""
    baseline = next(r for r in rows if r.variant == "diffusers")
    uncompiled = next((r for r in rows if r.variant == "uncompiled" and r.mode == row.mode and not r.error), None)
    denoise_flops, total_flops = row_flops(row, flops)
    figures = {
        "seconds_per_image": row.seconds / row.images,
        "steps_per_second": sum(row.steps.values()) / row.denoise_seconds,
        "floor_end_to_end": total_flops / (peak * 1e12) / row.seconds if peak else None,
        "floor_denoising": denoise_flops / (peak * 1e12) / row.denoise_seconds if peak else None,
        "vs_diffusers": baseline.seconds / row.seconds if row.mode == "base" else None,
    }
    if uncompiled is not None and row.variant != "uncompiled" and row.image is not None:
        figures["vs_uncompiled"] = uncompiled.seconds / row.seconds if row.variant != "diffusers" else None
        figures["max_pixel_diff_vs_uncompiled"] = int(np.abs(row.image.astype(int) - uncompiled.image).max())
        figures["psnr_vs_uncompiled_db"] = psnr(row.image, uncompiled.image)
    return figures


def cell(value, spec: str = ".3f", suffix: str = "") -> str:
    return "" if value is None else f"{value:{spec}}{suffix}"


def print_rows(rows: list[Row], flops, peak) -> None:
    table = []
    for row in rows:
        if row.error:
            table.append([row.variant, row.mode, row.graphs, f"FAILED: {row.error[:120]}"] + [""] * 8)
            continue
        f = derived(row, rows, flops, peak)
        table.append(
            [
                row.variant,
                row.mode,
                row.graphs,
                cell(f["seconds_per_image"]),
                cell(f["steps_per_second"], ".2f"),
                cell(row.peak_gib, ".2f"),
                cell(f["floor_end_to_end"], ".0%"),
                cell(f["floor_denoising"], ".0%"),
                cell(f["vs_diffusers"], ".2f", "x"),
                cell(f.get("vs_uncompiled"), ".2f", "x"),
                cell(f.get("psnr_vs_uncompiled_db"), ".1f", " dB")
                + (f" (max {f['max_pixel_diff_vs_uncompiled']})" if "max_pixel_diff_vs_uncompiled" in f else ""),
                cell(row.model_load_seconds),
            ]
        )
    headers = [
        "variant",
        "mode",
        "graphs",
        "s / image",
        "steps / s",
        "peak GPU GiB",
        "floor, end to end",
        "floor, denoising",
    ]
    headers += ["speed-up vs diffusers", "speed-up vs uncompiled", "image vs uncompiled", "model load s"]
    print_table(headers, table)


def failures(rows: list[Row]) -> list[str]:
    found = [f"{r.variant} {r.mode}: {r.error}" for r in rows if r.error]
    found += [f"{r.variant} {r.mode}: black image" for r in rows if r.image is not None and r.image.max() < BLACK_MAX]
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", help="default: %(default)s (cpu: the smoke test)")
    parser.add_argument("--size", choices=("full", "tiny"), default="full", help="the weights (default: %(default)s)")
    parser.add_argument("--side", type=int, default=1024, help="image side (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=30, help="the headline's steps, base only (default: %(default)s)")
    parser.add_argument("--mode-steps", type=int, default=10, help="every other mode's (default: %(default)s)")
    parser.add_argument("--repeat", type=int, default=3, help="timed runs of the headline (default: %(default)s)")
    parser.add_argument(
        "--warm-runs", type=int, default=1, help="untimed runs before each mode's (default: %(default)s)"
    )
    parser.add_argument("--compile-sizes", help="SDXL_COMPILE_SIZES (default: SIDExSIDE,SIDExSIDEx4)")
    parser.add_argument("--compile-cache", type=Path, help="SDXL_COMPILE_CACHE_DIR (default: a new one, a cold start)")
    parser.add_argument("--peak-tflops", type=float, help="the GPU's dense fp16 peak, if not in bench/flops.py")
    parser.add_argument("--report", type=Path, default=Path("build/gpu-check.json"), help="default: %(default)s")
    args = parser.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("No CUDA device: make gpu-check needs a GPU (--device cpu --size tiny smoke-tests it).")
    started = time.perf_counter()
    cuda = args.device.startswith("cuda")
    dtype = torch.float16 if cuda else torch.float32
    peak = args.peak_tflops or (peak_tflops(torch.cuda.get_device_name()) if cuda else None)
    shape = f"{args.side}x{args.side}, headline {args.steps} steps x{args.repeat}, other modes {args.mode_steps} steps"
    versions = {name: importlib.metadata.version(name) for name in ("transformers", "peft", "accelerate")}
    extra = {**versions, "size": args.size, "dtype": str(dtype), "shape": shape, "peak TFLOP/s": peak}
    print_header("make gpu-check", extra)

    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        scratch = Path(tmp)
        sources = sources_at(args.side, scratch)

        # 1. The first set of weights: the FLOPs per step, a LoRA of its shape, the baseline, the service uncompiled.
        pipelines = synthesize(args, dtype)
        first = pipelines.checkpoints[0]
        flops = sdxl_flops(first.unet.config, pipelines.refiner.unet.config, first.vae.config, args.side)
        print("FLOPs per image: " + ", ".join(f"{k} {v / 1e12:.4g} T" for k, v in flops.items()), flush=True)
        lora = write_lora(first.unet, scratch, dtype)
        rows = [measure_baseline(first, args)]
        setups = {}
        more, setups["uncompiled"] = serve(
            args, "uncompiled", pipelines, scratch, sources, lora, MODES, compile=False, low_vram=False
        )
        rows += more
        del pipelines, first
        release(args.device)

        # 2. SDXL_COMPILE on a fresh set (the same values).
        more, setups["compiled"] = serve(
            args, "compiled", synthesize(args, dtype), scratch, sources, lora, MODES, compile=True, low_vram=False
        )
        rows += more
        release(args.device)

        # 3. Low-VRAM mode, compiled: every stage brings its modules from pinned memory.
        more, setups["low-VRAM compiled"] = serve(
            args,
            "low-VRAM compiled",
            synthesize(args, dtype),
            scratch,
            sources,
            lora,
            LOW_VRAM_MODES,
            compile=True,
            low_vram=True,
        )
        rows += more
        release(args.device)

    print()
    print_rows(rows, flops, peak)
    for variant, setup in setups.items():
        print(
            f"- {variant} setup: "
            + ", ".join(f"{k} {v:.2f}s" if isinstance(v, float) else f"{k} {v}" for k, v in setup.items())
        )
    problems = failures(rows)
    elapsed = time.perf_counter() - started
    print(f"- checks: {'; '.join(problems) or 'no black image, every compiled row ran compiled graphs'}")
    print(f"- elapsed {elapsed:.0f}s")
    report = {
        "args": {k: str(v) for k, v in vars(args).items()},
        "flops_per_image": flops,
        "peak_tflops": peak,
        "setup": setups,
        "rows": [{**row.report(), **({} if row.error else derived(row, rows, flops, peak))} for row in rows],
        "failures": problems,
        "elapsed_s": elapsed,
    }
    args.report.parent.mkdir(parents=True, exist_ok=True)
    args.report.write_text(json.dumps(report, indent=2, default=str) + "\n")
    print(f"- report: {args.report}")
    sys.exit(1 if problems else 0)


if __name__ == "__main__":
    main()
