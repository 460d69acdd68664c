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
  plain        the request without control. On a server with the IP-Adapter baked, every request runs its attention
               processors, with zero image embeddings when there is no image prompt (control/plan.py)
  1 control    canny, its map made in the server (OpenCV)
  2 controls   + depth, its map made in the server (the depth estimator)
  3 controls   + pose, a ready map
  IP-Adapter   an image prompt at scale 0.6, no control
The union model serves every control, run once per control. Single-type ControlNets (diffusers' canny and depth)
have the same architecture less the union's one-layer condition transformer: the same cost per control, 2.5 GB of
weights each. Safety checker and watermark are off: they cost every variant the same.

On the CPU the weights load as float16, memory-mapped, and the modules the requests run are then cast to bfloat16:
this CPU's float16 kernels are emulated (a convolution ~500x slower than bfloat16, measured here), and loading in
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

from devtools.synthetic import make_weights  # noqa: E402
from devtools.synthetic_control import add_control  # noqa: E402
from sdxl_cog.config import Settings  # noqa: E402
from sdxl_cog.device.placement import module_bytes  # noqa: E402
from sdxl_cog.inputs.control import ControlInput  # noqa: E402
from sdxl_cog.inputs.request import build_request  # noqa: E402
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
    return build_request(
        prompt=PROMPT,
        negative_prompt="",
        image=None,
        mask=None,
        width=side,
        height=side,
        num_outputs=1,
        scheduler="K_EULER",
        num_inference_steps=steps,
        guidance_scale=GUIDANCE,
        prompt_strength=0.8,
        seed=SEED,
        refine="no_refiner",
        high_noise_frac=0.8,
        refine_steps=None,
        refine_strength=0.3,
        controls=slots,
        ip_adapter_image=images["photo"] if image_prompt else None,
        ip_adapter_scale=IP_ADAPTER_SCALE,
        files_from_client=False,
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


def predict(service: SDXLService, req) -> tuple[float, float, dict, int]:
    """Wall and CPU seconds, the metrics, and the control units the image records (proof of what ran)."""
    started, cpu_started = time.perf_counter(), time.process_time()
    # predict() logs a line per step, which a server would capture into the prediction's logs.
    with contextlib.redirect_stdout(io.StringIO()):
        prediction = service.predict(req, OPTIONS, None, 0.6)
    wall, cpu = time.perf_counter() - started, time.process_time() - cpu_started
    return wall, cpu, prediction.metrics, len(UNIT.findall(read_parameters(Path(prediction.paths[0]))))


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
        report(runs, args.steps)


def report(runs: dict[str, list], steps: int) -> None:
    wall = {name: [r[0] for r in rs] for name, rs in runs.items()}
    cpu = {name: [r[1] for r in rs] for name, rs in runs.items()}
    metric = {name: (lambda key, rs=rs: median([r[2].get(key, 0.0) for r in rs])) for name, rs in runs.items()}
    plain_wall, plain_cpu = median(wall["plain"]), median(cpu["plain"])
    plain_step = metric["plain"]("base_denoise_time") / steps
    rows = []
    for name, rs in runs.items():
        units = sorted({r[3] for r in rs})
        step = metric[name]("base_denoise_time") / steps
        rows.append(
            [
                name,
                spread(wall[name]),
                ratio(median(wall[name]), plain_wall),
                f"{median(cpu[name]):.2f} s",
                ratio(median(cpu[name]), plain_cpu),
                f"{step:.3f} s",
                ratio(step, plain_step),
                f"{metric[name]('control_preprocess_time'):.3f} s",
                f"{metric[name]('image_prompt_encoding_time'):.3f} s",
                f"{metric[name]('vae_decode_time'):.3f} s",
                ",".join(map(str, units)),
            ]
        )
    headers = ["variant", "request wall s, median (min-max)", "vs plain", "request CPU s", "vs plain"]
    headers += ["denoising s per step", "vs plain", "control maps", "image prompt encoding", "VAE decode", "units"]
    print_table(headers, rows)
    print(
        "- medians; `units`: the ControlNet units each image records (the controls and image prompt that ran). "
        "Denoising per step is the base_denoise_time metric over the steps: what a request of more steps multiplies."
    )


if __name__ == "__main__":
    main()
