"""Half precision on the CPU: how far bfloat16 and float16 images are from the float32 ones, per case, over many
seeds; what the half-precision test tier's PSNR bounds (tests/test_half_precision.py) rest on.

    python bench/half_precision.py                  # 8 seeds, every case of devtools/half_precision.py
    python bench/half_precision.py --seeds 3 --cases txt2img,lora

Every case runs through predict.py's Predictor set up once per SDXL_DTYPE on tiny synthetic weights, seeds
SEED, SEED + 1, ...; each half-precision image is compared with the float32 image of the same inputs and seed.
Printed: PSNR min/median/max per case and dtype; what bugs give on the same float32 images (a channel swap,
the denormalization skipped, an unrelated image: the next seed's, or the request's LoRA or model ignored);
and the CPU seconds a prediction takes in each dtype, then one prediction of --profile-case per dtype on one
thread under torch's profiler, with the operators that took most of it (float16 convolutions have no fast CPU
kernel without AVX512-FP16 or AMX-FP16: torch falls back to its reference implementation, _slow_conv2d_forward).
The fraction of pixels off by more than one grey level is given beside each PSNR.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import print_header, print_table  # noqa: E402

from devtools.half_precision import CASES, HALF_DTYPES, REFERENCE_DTYPE, SEED, Rig, psnr  # noqa: E402
from devtools.synthetic import make_weights  # noqa: E402

DTYPES = (REFERENCE_DTYPE, *HALF_DTYPES)


def _bugs(image: np.ndarray) -> dict[str, np.ndarray]:
    return {
        "red and blue swapped": image[..., ::-1],
        "denormalization skipped": np.clip(image.astype(np.int16) * 2 - 255, 0, 255).astype(np.uint8),
    }


def _figures(values: list[float]) -> str:
    return f"{min(values):.1f} / {np.median(values):.1f} / {max(values):.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=8)
    parser.add_argument("--cases", default=",".join(CASES), help="comma-separated names from CASES")
    parser.add_argument("--profile-case", default="txt2img", help="the case profiled on one thread per dtype")
    args = parser.parse_args()
    cases = args.cases.split(",")
    seeds = [SEED + i for i in range(args.seeds)]
    print_header("Half precision against float32 (PSNR, dB)", {"seeds": f"{seeds[0]}..{seeds[-1]}"})

    with tempfile.TemporaryDirectory(prefix="bench-half-") as scratch:
        tiny = Path(scratch) / "tiny"
        make_weights(tiny, size="tiny", seed=0)
        rig = Rig(tiny, Path(scratch) / "rig")
        cpu_seconds: dict[tuple[str, str], list[float]] = {}
        outcomes = {}
        for dtype in DTYPES:
            rig.predictor(dtype)  # set up outside the timings
            for case in cases:
                for seed in seeds:
                    started = time.process_time()
                    outcomes[(dtype, case, seed)] = rig.run(dtype, case, seed)
                    cpu_seconds.setdefault((dtype, case), []).append(time.process_time() - started)
        profiles = _profile(rig, args.profile_case)
        rig.close()

    def compare(dtype: str, case: str) -> tuple[list[float], list[float]]:
        ratios, off = [], []
        for seed in seeds:
            pairs = zip(outcomes[(dtype, case, seed)].images, outcomes[(REFERENCE_DTYPE, case, seed)].images)
            for image, reference in pairs:
                ratios.append(psnr(image, reference))
                off.append(float(np.mean(np.abs(image.astype(np.int16) - reference) > 1)))
        return ratios, off

    rows = []
    for case in cases:
        row = [case]
        for dtype in HALF_DTYPES:
            ratios, off = compare(dtype, case)
            row += [_figures(ratios), f"{max(off):.1%}"]
        rows.append(row)
    headers = ["case"] + [f"{d} {what}" for d in HALF_DTYPES for what in ("min / median / max", "pixels off > 1")]
    print_table(headers, rows)

    print("What bugs give on the float32 images (PSNR against the float32 image; min / median / max over seeds):\n")
    bug_rows = []
    for case in cases:
        references = [outcomes[(REFERENCE_DTYPE, case, seed)].images[0] for seed in seeds]
        row = [case]
        for bug in _bugs(references[0]):
            row.append(_figures([psnr(_bugs(image)[bug], image) for image in references]))
        unrelated = [psnr(a, b) for a, b in zip(references, references[1:])] or [float("nan")]
        row.append(_figures(unrelated))
        if "txt2img" in cases and case in ("lora", "model_own_unet", "model_own_text_encoders"):
            plain = [outcomes[(REFERENCE_DTYPE, "txt2img", seed)].images[0] for seed in seeds]
            row.append(_figures([psnr(a, b) for a, b in zip(references, plain)]))
        else:
            row.append("")
        bug_rows.append(row)
    print_table(["case", *_bugs(references[0]), "next seed's image", "as txt2img (input ignored)"], bug_rows)

    print("CPU seconds per prediction (median over seeds; setup excluded):\n")
    print_table(
        ["case", *DTYPES],
        [[case, *(f"{np.median(cpu_seconds[(d, case)]):.2f}" for d in DTYPES)] for case in cases],
    )

    print(f"{args.profile_case}, one torch thread, under torch's profiler (CPU seconds; operators by own time):\n")
    print_table(["dtype", "CPU seconds", "top operators"], profiles)


def _profile(rig: Rig, case: str) -> list[list[str]]:
    """One prediction of `case` per dtype on one thread (after one to warm up): CPU seconds and the top operators."""
    torch.set_num_threads(1)
    rows = []
    for dtype in DTYPES:
        rig.run(dtype, case)
        started = time.process_time()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
            rig.run(dtype, case)
        seconds = time.process_time() - started
        events = sorted(profile.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
        total = sum(e.self_cpu_time_total for e in events)
        top = ", ".join(f"{e.key} {e.self_cpu_time_total / total:.0%}" for e in events[:3])
        rows.append([dtype, f"{seconds:.2f}", top])
    return rows


if __name__ == "__main__":
    main()
