"""After the last denoising step: decode, uint8 conversion, safety check, watermark and encoding.

    python bench/postprocess.py                           # CPU, tiny VAE and safety checker (a minute)
    python bench/postprocess.py --size full               # the real VAE and CLIP ViT-L architectures (random weights)
    python bench/postprocess.py --device cuda --size full # the same on a GPU (fp16)

Three implementations, each per phase and end to end, for 1 and 4 images at 1024x1024 and 512x512:
- `new`: this code: sdxl_cog.generation.generate.finish_images (per image: decode and uint8 on the device, then in the
  finishing threads the safety check beside the watermark, on the device, one copy to the host) feeding
  outputs.BackgroundEncoder.
- `before`: the code at BEFORE_COMMIT, the commit before this change. Its sdxl_cog package is extracted
  from git history at run time (`git archive`) and imported as `sdxl_cog_before`, so the figures compare
  the two versions in one process, on the same models and inputs.
- `cog-sdxl`: what replicate/cog-sdxl does: diffusers' StableDiffusionXLWatermarker on the decoded tensor,
  VaeImageProcessor to PIL, CLIPImageProcessor plus the safety checker on PIL images
  (`run_safety_checker`), then `image.save(path)` one after another.

Phases (median of --repeat, each fed the previous phase's output; the input is a photograph bundled with
matplotlib, so that encoding times are realistic): `to_image` (decoded tensor to what the next phase takes),
`safety`, `watermark`, `encode` (files written); and `after_denoise`, the whole way from latents to paths.
The budget line compares, for the new code, after_denoise minus its own decode time (measured in the same
run, so it includes any slowdown the finishing threads cause) against one image's encode + 10 ms, that
image being the run's own last one, encoded again alone. The last table gives the largest pixel difference of each watermark against
invisible-watermark's encoder run on the same uint8 image (the reference).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import matplotlib.cbook
import numpy as np
import torch
from diffusers import AutoencoderKL
from diffusers.image_processor import VaeImageProcessor
from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
from diffusers.pipelines.stable_diffusion_xl.watermark import WATERMARK_BITS, StableDiffusionXLWatermarker
from imwatermark import WatermarkEncoder
from PIL import Image, ImageOps
from transformers import CLIPConfig

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO_ROOT, median, print_header, print_table, ratio  # noqa: E402

from devtools import synthetic  # noqa: E402
from sdxl_cog.finishing.safety import SafetyChecker, blacken_flagged  # noqa: E402
from sdxl_cog.finishing.watermark import watermark_images  # noqa: E402
from sdxl_cog.generation.generate import Run, finish_images, to_uint8  # noqa: E402
from sdxl_cog.outputs.encoder import BackgroundEncoder  # noqa: E402
from sdxl_cog.outputs.formats import ENCODERS

BEFORE_COMMIT = "1311882"
PHOTO = "grace_hopper.jpg"
SIDES = (1024, 512)
COUNTS = (1, 4)
BUDGET_SLACK_S = 0.010
TEXT = "An astronaut riding a rainbow unicorn\nSteps: 30, Sampler: Euler, CFG scale: 7.5, Seed: 1234"


def import_before(commit: str, scratch: Path):
    """The sdxl_cog package as it was at `commit`, importable as sdxl_cog_before."""
    archive = subprocess.run(["git", "archive", commit, "sdxl_cog"], cwd=REPO_ROOT, check=True, capture_output=True)
    subprocess.run(["tar", "-x", "-C", str(scratch)], input=archive.stdout, check=True)
    (scratch / "sdxl_cog").rename(scratch / "sdxl_cog_before")
    sys.path.insert(0, str(scratch))
    import sdxl_cog_before.generate
    import sdxl_cog_before.outputs
    import sdxl_cog_before.safety
    import sdxl_cog_before.watermark

    return sdxl_cog_before


def load_models(size: str, device: str, dtype: torch.dtype, scratch: Path, before):
    """The VAE and the safety checker (new and before wrappers around one model) of the chosen size."""
    weights = scratch / "weights"
    synthetic.make_weights(weights, size="tiny", seed=0)
    checker_dir = weights / synthetic.SAFETY_CHECKER_DIR
    new = SafetyChecker.from_directory(checker_dir, device, dtype)
    old = before.safety.SafetyChecker(checker_dir, device, dtype)
    if size == "tiny":
        vae = AutoencoderKL.from_pretrained(weights / synthetic.VAE_DIR, variant="fp16")
    else:
        configs = synthetic.sdxl_configs("full")
        vae = synthetic.random_model(lambda: AutoencoderKL(**configs["vae"]), dtype, 0)
        model = synthetic.random_model(
            lambda: StableDiffusionSafetyChecker(CLIPConfig(**configs["safety_checker"])), dtype, 1
        )
        for name in synthetic.THRESHOLD_TENSORS:  # never flag: every variant then does the same work
            getattr(model, name).data.fill_(synthetic.NEVER_FLAG_THRESHOLD)
        new.model = old.model = model.to(device).eval()
    return vae.to(device, dtype).eval(), new, old


def photo_samples(side: int, count: int, device: str, dtype: torch.dtype) -> torch.Tensor:
    """`count` decoded samples in [-1, 1] (the VAE's output range): the photo, slightly shifted per image."""
    path = matplotlib.cbook.get_sample_data(PHOTO, asfileobj=False)
    rgb = np.asarray(ImageOps.fit(Image.open(path).convert("RGB"), (side, side), Image.LANCZOS))
    batch = np.stack([np.roll(rgb, 7 * i, axis=1) for i in range(count)])
    return (torch.from_numpy(batch).permute(0, 3, 1, 2).float() / 127.5 - 1).to(device, dtype)


class Timing(float):
    """A median wall time in seconds that also carries the median CPU time of the whole process (all
    threads): on shared cores the wall time includes waiting for other processes, the CPU time does not."""

    cpu: float

    def __str__(self) -> str:
        return f"{self * 1000:.1f} ({self.cpu * 1000:.0f})"


def timed(fn, repeat: int, device: str) -> tuple[Timing, object]:
    walls, cpus, value = [], [], None
    for _ in range(repeat):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        started, cpu_started = time.perf_counter(), time.process_time()
        value = fn()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        walls.append(time.perf_counter() - started)
        cpus.append(time.process_time() - cpu_started)
    timing = Timing(median(walls))
    timing.cpu = median(cpus)
    return timing, value


def reference_watermark(rgb: np.ndarray) -> np.ndarray:
    encoder = WatermarkEncoder()
    encoder.set_watermark("bits", WATERMARK_BITS)
    return encoder.encode(np.ascontiguousarray(rgb[:, :, ::-1]), "dwtDct")[:, :, ::-1]


def max_difference(images: list[np.ndarray], unmarked: list[np.ndarray]) -> int:
    return max(int(np.abs(a.astype(int) - reference_watermark(b)).max()) for a, b in zip(images, unmarked))


# --- The three implementations, phase by phase -----------------------------------------------------------


def new_phases(samples, checker, out: Path, repeat: int, device: str) -> tuple[dict, list]:
    t = {}
    t["to_image"], pixels = timed(lambda: to_uint8(samples), repeat, device)
    t["safety"], flags = timed(lambda: checker.flags(pixels), repeat, device)
    pixels = blacken_flagged(pixels, flags)
    # Including the one copy to the host each image makes (free on the CPU).
    t["watermark"], marked = timed(lambda: watermark_images(pixels).cpu(), repeat, device)
    host = list(marked.numpy())

    def encode():
        with BackgroundEncoder([TEXT] * len(host), out, "new", "png", 80) as encoder:
            for i, image in enumerate(host):
                encoder.submit(i, image)
            return encoder.wait()

    t["encode"], _ = timed(encode, repeat, device)
    return t, host


def before_phases(samples, checker, before, out: Path, repeat: int, device: str) -> tuple[dict, list]:
    processor = VaeImageProcessor(vae_scale_factor=8)
    t = {}
    t["to_image"], images = timed(lambda: processor.postprocess(samples, output_type="pil"), repeat, device)
    t["safety"], flags = timed(lambda: checker.flags(images), repeat, device)
    images = before.safety.blacken_flagged(images, flags)
    t["watermark"], marked = timed(lambda: [before.watermark.apply_watermark(i) for i in images], repeat, device)
    t["encode"], _ = timed(
        lambda: before.outputs.encode_all(marked, [TEXT] * len(marked), out, "before", "png", 80), repeat, device
    )
    return t, [np.asarray(i) for i in marked]


def cog_sdxl_safety(checker: SafetyChecker, images: list[Image.Image]):
    """replicate/cog-sdxl's run_safety_checker."""
    feature_extractor = checker.processor
    safety_checker_input = feature_extractor(images, return_tensors="pt").to(checker.device)
    np_image = [np.array(val) for val in images]
    return checker.model(images=np_image, clip_input=safety_checker_input.pixel_values.to(checker.dtype))


def cog_sdxl_phases(samples, checker, out: Path, repeat: int, device: str) -> tuple[dict, list]:
    processor, watermarker = VaeImageProcessor(vae_scale_factor=8), StableDiffusionXLWatermarker()
    t = {}
    # The pipeline watermarks the decoded tensor, then converts it to PIL.
    t["watermark"], marked = timed(lambda: watermarker.apply_watermark(samples), repeat, device)
    t["to_image"], images = timed(lambda: processor.postprocess(marked, output_type="pil"), repeat, device)
    t["safety"], _ = timed(lambda: cog_sdxl_safety(checker, images), repeat, device)

    def encode():
        for i, image in enumerate(images):
            image.save(out / f"cog-{i}.png")

    t["encode"], _ = timed(encode, repeat, device)
    return t, [np.asarray(i) for i in images]


# --- End to end: latents to paths ---------------------------------------------------------------------------


def new_after_denoise(vae, latents, checker, out: Path, device: str) -> tuple[float, float, float, float]:
    """(total, decode time, tail, one encode): the tail runs from the end of the last decode to the paths;
    one encode is the last image's, written again alone afterwards (the budget's unit, on the same pixels)."""
    run, decode, decode_ends = Run(device), vae.decode, []

    def timed_decode(*args, **kwargs):
        decoded = decode(*args, **kwargs)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        decode_ends.append(time.perf_counter())
        return decoded

    vae.decode = timed_decode
    try:
        started = time.perf_counter()
        with BackgroundEncoder([TEXT] * len(latents), out, "e2e-new", "png", 80) as encoder:
            finished, _ = finish_images(run, vae, latents, None, checker, True, encoder.submit, encoder.stream)
            encoder.wait()
        ended = time.perf_counter()
    finally:
        del vae.decode
    encode_started = time.perf_counter()
    ENCODERS["png"](finished[-1], out / "e2e-new-alone.png", 80, TEXT)
    one_encode = time.perf_counter() - encode_started
    return ended - started, run.timings["vae_decode"], ended - decode_ends[-1], one_encode


def before_after_denoise(vae, latents, checker, before, out: Path) -> float:
    started = time.perf_counter()
    images = before.generate._decode(vae, latents)
    images = before.safety.blacken_flagged(images, checker.flags(images))
    images = [before.watermark.apply_watermark(i) for i in images]
    before.outputs.encode_all(images, [TEXT] * len(images), out, "e2e-before", "png", 80)
    return time.perf_counter() - started


def cog_sdxl_after_denoise(vae, latents, checker, out: Path, device: str) -> float:
    started = time.perf_counter()
    with torch.inference_mode():
        samples = torch.cat([vae.decode(latent[None] / vae.config.scaling_factor).sample for latent in latents])
    samples = StableDiffusionXLWatermarker().apply_watermark(samples)
    images = VaeImageProcessor(vae_scale_factor=8).postprocess(samples, output_type="pil")
    cog_sdxl_safety(checker, images)
    for i, image in enumerate(images):
        image.save(out / f"e2e-cog-{i}.png")
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--size", choices=("tiny", "full"), default="tiny", help="VAE and safety checker size")
    parser.add_argument("--repeat", type=int, default=5, help="runs per phase (median)")
    parser.add_argument("--e2e-repeat", type=int, default=3, help="runs of the end-to-end measurement (median)")
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's own choice)")
    parser.add_argument("--before", default=BEFORE_COMMIT, help="git commit of the code to compare against")
    args = parser.parse_args()
    dtype = torch.float16 if args.device.startswith("cuda") else torch.float32
    if args.threads:
        torch.set_num_threads(args.threads)
    print_header(
        "After the last denoising step (bench/postprocess.py)",
        {
            "device": args.device,
            "dtype": str(dtype),
            "models": args.size,
            "before": args.before,
            "torch_threads": torch.get_num_threads(),
        },
    )
    with tempfile.TemporaryDirectory() as tmp:
        scratch = Path(tmp)
        before = import_before(args.before, scratch)
        vae, checker, old_checker = load_models(args.size, args.device, dtype, scratch, before)
        out = scratch / "out"
        out.mkdir()
        phase_rows, e2e_rows, diff_rows = [], [], []
        for side in SIDES:
            for count in COUNTS:
                samples = photo_samples(side, count, args.device, dtype)
                unmarked = list(to_uint8(samples).cpu().numpy())
                print(f"... {count} x {side}px", file=sys.stderr, flush=True)
                new, new_images = new_phases(samples, checker, out, args.repeat, args.device)
                old, _ = before_phases(samples, old_checker, before, out, args.repeat, args.device)
                cog, cog_images = cog_sdxl_phases(samples, checker, out, args.repeat, args.device)
                label = f"{count} x {side}px"
                for phase in ("to_image", "safety", "watermark", "encode"):
                    phase_rows.append(
                        [label, phase, new[phase], old[phase], cog[phase], ratio(old[phase], new[phase]),
                         ratio(cog[phase], new[phase])]
                    )  # fmt: skip
                total = [sum(t.values()) for t in (new, old, cog)]
                phase_rows.append(
                    [label, "**sum**", *(f"{x * 1000:.1f}" for x in total), ratio(total[1], total[0]),
                     ratio(total[2], total[0])]
                )  # fmt: skip
                diff_rows.append([label, max_difference(new_images, unmarked), max_difference(cog_images, unmarked)])

                latents = torch.randn(count, 4, side // 8, side // 8, generator=torch.Generator().manual_seed(side))
                latents = latents.to(args.device, dtype)
                runs = [new_after_denoise(vae, latents, checker, out, args.device) for _ in range(args.e2e_repeat)]
                new_total, decode, tail, one_encode = (median([r[i] for r in runs]) for i in range(4))
                old_total = median(
                    [before_after_denoise(vae, latents, old_checker, before, out) for _ in range(args.e2e_repeat)]
                )
                cog_total = median(
                    [cog_sdxl_after_denoise(vae, latents, checker, out, args.device) for _ in range(args.e2e_repeat)]
                )
                e2e_rows.append(
                    [label, f"{decode * 1000:.0f}", f"{new_total * 1000:.0f}", f"{(new_total - decode) * 1000:.1f}",
                     f"{tail * 1000:.1f}",
                     f"{old_total * 1000:.0f}", f"{cog_total * 1000:.0f}", ratio(old_total, new_total),
                     ratio(cog_total, new_total),
                     f"{(one_encode + BUDGET_SLACK_S) * 1000:.1f}",
                     "yes" if new_total - decode <= one_encode + BUDGET_SLACK_S else "no"]
                )  # fmt: skip
    print("### Per phase: wall ms (process CPU ms), medians; ratios of wall times, the other code / new")
    print_table(["images", "phase", "new", "before", "cog-sdxl", "before/new", "cog-sdxl/new"], phase_rows)
    print("### Latents to paths (ms, median of --e2e-repeat)")
    print_table(
        ["images", "new: decode", "new: total", "new: total - decode", "new: last decode to paths", "before",
         "cog-sdxl", "before/new",
         "cog-sdxl/new", "budget: 1 encode + 10 ms", "met"],
        e2e_rows,
    )  # fmt: skip
    print("### Watermark: max |pixel - invisible-watermark's encoder on the same uint8 image|")
    print_table(["images", "new", "cog-sdxl (diffusers' StableDiffusionXLWatermarker)"], diff_rows)


if __name__ == "__main__":
    main()
