"""The cost per request of ControlNet controls and of an IP-Adapter image prompt, against the plain request, measured
in one process on one loaded service (SDXLService.predict, as a prediction runs it).

    python bench/control.py --size tiny                                            # a quick run on tiny weights
    python bench/control.py --size full --weights /tmp/sdxl-control --side 512 --steps 2    # CPU, full-size weights
    python bench/control.py --size full --weights DIR --device cuda --side 1024 --steps 30  # a GPU: the same code

Weights are synthetic (devtools/synthetic.py, devtools/synthetic_control.py: random values, the real architectures
and file layouts): the SDXL base and refiner, the ControlNet-Union (ProMax), the IP-Adapter with its ViT-bigG image
encoder, and Depth Anything V2 Small. --weights DIR is made when it holds no weights yet (full size: ~20 GB, a few
minutes) and kept for the next run: delete it afterwards. Without --weights, tiny weights are made in a temporary
directory.

Variants, run round-robin after a warm-up round at one step, so that a change in the machine's load falls on all alike:
  plain        the request without control, on the same service: its UNet has the IP-Adapter's attention
               processors, which skip the adapter's attention at scale 0 (no image prompt)
  1 control    canny, its map made in the server (OpenCV)
  2 controls   + depth, its map made in the server (the depth estimator)
  3 controls   + pose, a ready map
  IP-Adapter   an image prompt at scale 0.6, no control
The union model serves every control, run once per control. Single-type ControlNets (diffusers' canny and depth)
have the same architecture less the union's one-layer condition transformer: the same cost per control, 2.5 GB of
weights each. Safety checker and watermark are off: they cost every variant the same.

On the CPU the weights load as float16, memory-mapped, and the modules the requests run are then cast to bfloat16:
this CPU's float16 kernels are emulated (a convolution ~500x slower than in bfloat16, bench/README.md), and loading in
bfloat16 would convert the refiner and safety checker too, which no request here runs (full size: ~19 GB in all,
more than a 24 GB machine shared with others can spare). On CUDA the service loads as it does in production.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import re
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import GIB, MemorySampler, median, print_header, print_table, ratio, spread  # noqa: E402

from devtools.local_request import local_request  # noqa: E402
from devtools.synthetic import make_weights  # noqa: E402
from devtools.synthetic_control import add_control  # noqa: E402
from sdxl_cog.config import Settings  # noqa: E402
from sdxl_cog.device.placement import module_bytes  # noqa: E402
from sdxl_cog.device.timing import PhaseTimer  # noqa: E402
from sdxl_cog.inputs.control import ControlInput  # noqa: E402
from sdxl_cog.outputs.metadata import read_parameters  # noqa: E402
from sdxl_cog.service import OutputOptions, SDXLService  # noqa: E402
from sdxl_cog.weights.layout import MANIFEST_NAME  # noqa: E402

PROMPT = "a glass house in a forest at dusk, cinematic"
SEED = 1234
GUIDANCE = 7.5  # SDXL's: classifier-free guidance on, two UNet (and ControlNet) passes per step
CONDITIONING_SCALE = 0.75  # predict.py's default
IP_ADAPTER_SCALE = 0.6  # predict.py's default
OPTIONS = OutputOptions("png", 80, apply_watermark=False, safety_check=False)
# The controls of the 1-, 2- and 3-control variants, in slot order: (type, image, make the map in the server).
CONTROL_SLOTS = (("canny", "photo", True), ("depth", "photo", True), ("pose", "pose", False))
VARIANTS = {"plain": (0, False), "1 control": (1, False), "2 controls": (2, False), "3 controls": (3, False)}
VARIANTS["IP-Adapter"] = (0, True)
UNIT = re.compile(r"\bControlNet \d+: \"")
# Where the CPU computes (see the docstring): what the modules a request runs are cast to after setup.
CPU_COMPUTE_DTYPE = torch.bfloat16


def make_images(folder: Path, side: int) -> dict[str, Path]:
    """A photo-like scene (shapes on a gradient: edges for canny, regions for depth) and an OpenPose-style skeleton."""
    ramp = np.linspace(40, 200, side, dtype=np.float32)
    photo = Image.fromarray(
        np.stack(
            [np.add.outer(ramp, ramp) / 2, ramp[None].repeat(side, 0), ramp[::-1, None].repeat(side, 1)], -1
        ).astype(np.uint8)
    )
    draw = ImageDraw.Draw(photo)
    draw.rectangle((side // 5, side // 3, side * 3 // 5, side * 9 // 10), fill=(230, 220, 180), outline=(20, 20, 20))
    draw.ellipse((side // 2, side // 8, side * 7 // 8, side // 2), fill=(30, 90, 160))
    pose = Image.new("RGB", (side, side))
    skeleton = ImageDraw.Draw(pose)
    joints = [(0.5, 0.15), (0.5, 0.35), (0.3, 0.5), (0.7, 0.5), (0.5, 0.6), (0.35, 0.9), (0.65, 0.9)]
    points = [(x * side, y * side) for x, y in joints]
    for (a, b), colour in zip(
        [(0, 1), (1, 2), (1, 3), (1, 4), (4, 5), (4, 6)],
        [(255, 0, 0), (255, 170, 0), (170, 255, 0), (0, 255, 85), (0, 170, 255), (170, 0, 255)],
    ):
        skeleton.line([points[a], points[b]], fill=colour, width=max(2, side // 64))
    paths = {"photo": folder / "photo.png", "pose": folder / "pose.png"}
    photo.save(paths["photo"])
    pose.save(paths["pose"])
    return paths


def request(images: dict[str, Path], side: int, steps: int, controls: int, image_prompt: bool):
    slots = [
        ControlInput(kind, images[image], preprocess, CONDITIONING_SCALE, 0.0, 1.0)
        for kind, image, preprocess in CONTROL_SLOTS[:controls]
    ]
    return local_request(
        prompt=PROMPT,
        width=side,
        height=side,
        num_inference_steps=steps,
        guidance_scale=GUIDANCE,
        seed=SEED,
        controls=slots,
        ip_adapter_image=images["photo"] if image_prompt else None,
        ip_adapter_scale=IP_ADAPTER_SCALE,
    )


def ensure_weights(root: Path, size: str) -> float:
    """Make the weights under `root` unless they are there; the seconds it took (0 when they were)."""
    if (root / MANIFEST_NAME).exists():
        return 0.0
    started = time.perf_counter()
    make_weights(root, size=size, seed=0)
    add_control(root, controlnets=("union",), ip_adapter=True, depth_estimator=True, size=size)
    return time.perf_counter() - started


def run_modules(service: SDXLService) -> dict[str, torch.nn.Module]:
    """The modules a request here runs: the default checkpoint's and the control models (not the refiner's UNet, nor
    the safety checker)."""
    components = service.checkpoints.default.model.components
    modules = {name: m for name, m in components.items() if isinstance(m, torch.nn.Module)}
    return {**modules, **service.weights.control.placed_modules()}


def disk_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file() and not p.is_symlink())


@dataclasses.dataclass
class Measured:
    wall_s: float
    cpu_s: float
    phase_cpu_s: dict[str, float]  # the process's CPU seconds in each of the engine's timed phases
    phase_wall_s: dict[str, float]  # the engine's own timing of each phase (its *_time metrics; a GPU's synchronized)
    units: int  # the ControlNet units the image records: the controls and image prompt that ran
    gpu_peak_bytes: int | None  # the prediction's peak GPU memory (metrics, on a GPU only)


@contextlib.contextmanager
def phase_cpu_seconds(totals: dict[str, float]):
    """While active, the engine's PhaseTimer also adds the process's CPU seconds in each phase to `totals`. On a
    machine shared with other work this is the steady measure of the work a phase does, where its wall time also
    counts the waits for a core. With one image nothing else of the request runs beside the denoising."""
    timed_phase = PhaseTimer.phase

    @contextlib.contextmanager
    def phase(self, name: str):
        started = time.process_time()
        with timed_phase(self, name):
            yield
        totals[name] = totals.get(name, 0.0) + time.process_time() - started

    PhaseTimer.phase = phase
    try:
        yield
    finally:
        PhaseTimer.phase = timed_phase


def predict(service: SDXLService, req) -> Measured:
    phases: dict[str, float] = {}
    started, cpu_started = time.perf_counter(), time.process_time()
    # predict() logs a line per step, which a server would capture into the prediction's logs.
    with contextlib.redirect_stdout(io.StringIO()), phase_cpu_seconds(phases):
        prediction = service.predict(req, OPTIONS, None, 0.6)
    wall, cpu = time.perf_counter() - started, time.process_time() - cpu_started
    walls = {key.removesuffix("_time"): v for key, v in prediction.metrics.items() if key.endswith("_time")}
    units = len(UNIT.findall(read_parameters(Path(prediction.paths[0]))))
    return Measured(wall, cpu, phases, walls, units, prediction.metrics.get("gpu_peak_memory_bytes"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=("tiny", "full"), default="tiny", help="the weights (default: %(default)s)")
    parser.add_argument("--weights", type=Path, help="where the weights are, or are made (default: a temporary dir)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default: %(default)s)")
    parser.add_argument("--side", type=int, default=512, help="image side in pixels (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=4, help="denoising steps (default: %(default)s)")
    parser.add_argument("--repeat", type=int, default=3, help="timed rounds (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's own, 0)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory(prefix="bench-control-") as tmp:
        scratch = Path(tmp)
        root = args.weights or scratch / "weights"
        made_s = ensure_weights(root, args.size)
        on_cpu = args.device == "cpu"
        settings = dataclasses.replace(
            Settings.from_env(),
            weights_dir=root,
            device=args.device,
            dtype=torch.float16,
            output_dir=scratch / "outputs",
            input_dir=scratch / "inputs",
            prediction_marker=scratch / "prediction-started",
        )
        with MemorySampler() as memory:
            started = time.perf_counter()
            service = SDXLService(settings)
            modules = run_modules(service)
            if on_cpu:
                for module in modules.values():
                    module.to(CPU_COMPUTE_DTYPE)
            setup_s = time.perf_counter() - started
            images = make_images(scratch, args.side)
            requests = {name: request(images, args.side, args.steps, *v) for name, v in VARIANTS.items()}
            warmups = {name: request(images, args.side, 1, *v) for name, v in VARIANTS.items()}
            for req in warmups.values():
                predict(service, req)
            runs: dict[str, list] = {name: [] for name in VARIANTS}
            for _ in range(args.repeat):
                for name, req in requests.items():
                    runs[name].append(predict(service, req))

        weight_groups = {"base checkpoint": root / "base", "control models": root / "control"}
        print_header(
            "ControlNet and IP-Adapter: the cost per request",
            {
                "weights": f"{args.size} synthetic, {root}"
                + (f" (made in {made_s:.0f} s)" if made_s else "")
                + "; on disk: "
                + ", ".join(f"{name} {disk_bytes(path) / GIB:.2f} GiB" for name, path in weight_groups.items()),
                "device": args.device,
                "compute dtype": str(CPU_COMPUTE_DTYPE if on_cpu else settings.dtype),
                "torch threads": torch.get_num_threads(),
                "request": f"{args.side}x{args.side}, {args.steps} steps, K_EULER, guidance {GUIDANCE}, 1 image",
                "modules run (bytes in memory)": ", ".join(
                    f"{name} {module_bytes(m) / GIB:.2f} GiB" for name, m in modules.items()
                ),
                "setup": f"{setup_s:.1f} s",
                "peak memory": ", ".join(f"{k} {v:.2f}" for k, v in memory.report().items()),
                "repeat": f"{args.repeat} rounds after a 1-step warm-up round",
            },
        )
        # On the CPU the phases' CPU seconds are the steady measure; a GPU's work is in its own synchronized timings.
        report(runs, args.steps, "CPU" if on_cpu else "wall")


def report(runs: dict[str, list[Measured]], steps: int, phase_clock: str) -> None:
    def med(name: str, value) -> float:
        return median([value(run) for run in runs[name]])

    def phase(key: str):
        return lambda run: (run.phase_cpu_s if phase_clock == "CPU" else run.phase_wall_s).get(key, 0.0)

    plain_wall, plain_cpu = med("plain", lambda r: r.wall_s), med("plain", lambda r: r.cpu_s)
    plain_step = med("plain", phase("base_denoise")) / steps
    requests, phases = [], []
    for name, variant_runs in runs.items():
        wall, cpu, step = med(name, lambda r: r.wall_s), med(name, lambda r: r.cpu_s), med(name, phase("base_denoise"))
        units = ",".join(str(u) for u in sorted({run.units for run in variant_runs}))
        walls = [run.wall_s for run in variant_runs]
        peaks = [run.gpu_peak_bytes for run in variant_runs if run.gpu_peak_bytes is not None]
        gpu = f"{max(peaks) / GIB:.2f} GiB" if peaks else "n/a"
        requests.append(
            [name, spread(walls), ratio(wall, plain_wall), f"{cpu:.2f} s", ratio(cpu, plain_cpu), gpu, units]
        )
        step /= steps
        maps, encoding = med(name, phase("control_preprocess")), med(name, phase("image_prompt_encoding"))
        text, decode = med(name, phase("text_encoding")), med(name, phase("vae_decode"))
        phases.append(
            [name, f"{step:.3f} s", ratio(step, plain_step), f"{step - plain_step:+.3f} s"]
            + [f"{seconds:.3f} s" for seconds in (maps, encoding, text, decode)]
        )
    print("### The request")
    headers = ["variant", "wall s, median (min-max)", "vs plain", "CPU s, median", "vs plain", "peak GPU memory"]
    print_table([*headers, "units"], requests)
    print(f"### Its phases, {phase_clock} seconds (medians)")
    headers = ["variant", "denoising per step", "vs plain", "difference", "control maps", "image prompt encoding"]
    print_table([*headers, "text encoding", "VAE decode"], phases)
    print(
        "- `units`: the ControlNet units each image records (the controls and image prompt that ran). CPU seconds are "
        "the process's, over each of the engine's phases (with --threads 1, the work itself; with more, the threads' "
        "waits for each other too); wall seconds are the engine's own phase timings. Denoising per step is the base's "
        "denoising over the steps: what a request of more steps multiplies."
    )


if __name__ == "__main__":
    main()
