"""Cold start: predict.py's setup() on full-size weights against the disk-read floor and the common baseline.

    script/make-test-weights --size full /tmp/sdxl-full        # once, ~12.9 GB
    python bench/coldstart.py --weights /tmp/sdxl-full         # CPU (fp16), cold and warm page cache
    python bench/coldstart.py --weights /tmp/sdxl-full --device cuda

Variants, each run in a fresh interpreter (comparable imports and page cache), interleaved, median of N:
  floor      read every weights file setup() loads, once: sendfile() to /dev/null (what no loader can beat)
  imports    import predict.py and what it imports, nothing else (informational)
  setup      `Predictor().setup()` from predict.py, then first use
  setup_prefetch
             the same with SDXL_PREFETCH_WEIGHTS=1: what the opt-in weights prefetch is worth here
  baseline   the common recipe: base and refiner each loaded by its own `from_pretrained`, each with its own
             text_encoder_2 and VAE, moved to the device, then first use

"First use" matters: on CPU, fp16 safetensors are memory-mapped and nothing is read until a tensor is used,
so load time alone undercounts. Here first use reads one byte of every 4 KiB page of every parameter and
buffer still on the CPU (every page faulted in); on CUDA the copy to the device has already read them.
Cold runs drop the page cache before each child (root only; the host may still cache the disk).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from itertools import chain
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    GIB,
    MemorySampler,
    drop_page_cache,
    emit_result,
    median,
    print_header,
    print_table,
    ratio,
    run_child,
    spread,
)

PAGE_BYTES = 4096
# What each variant times (see the module docstring).
TIMED = {
    "floor": "sendfile() every weights file to /dev/null",
    "imports": "import predict",
    "setup": "setup() + first use",
    "setup_prefetch": "setup() + first use, SDXL_PREFETCH_WEIGHTS=1",
    "baseline": "2x from_pretrained + .to() + first use",
}
VARIANTS = tuple(TIMED)
DEFAULT_VARIANTS = VARIANTS

# The weights files setup() reads (everything but configs, tokenizers and the manifest).
WEIGHT_SUFFIXES = (".safetensors", ".bin")


def weight_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES))


# --- Children: one variant each, in a fresh interpreter ----------------------------------------------------------


def read_once(paths: list[Path]) -> int:
    """Bring files into the page cache the cheapest way: sendfile() to /dev/null reads every page from the
    disk without copying it to user space (a Python read() loop costs more CPU than the disk here)."""
    total = 0
    with open(os.devnull, "wb") as null:
        for path in paths:
            with open(path, "rb") as f:
                size, offset = os.fstat(f.fileno()).st_size, 0
                while offset < size and (n := os.sendfile(null.fileno(), f.fileno(), offset, size - offset)):
                    offset += n
                total += offset
    return total


def child_floor(root: Path, device: str) -> dict:
    started = time.perf_counter()
    total = read_once(weight_files(root))
    return {"seconds": time.perf_counter() - started, "bytes": total}


def touch(modules) -> None:
    """Fault in every page of every CPU tensor (shared tensors once): what the first request would pay."""
    import torch

    seen: set[int] = set()
    with torch.no_grad():
        for tensor in chain.from_iterable(chain(m.parameters(), m.buffers()) for m in modules):
            if tensor.device.type != "cpu" or tensor.numel() == 0 or tensor.data_ptr() in seen:
                continue
            seen.add(tensor.data_ptr())
            tensor.detach().reshape(-1).view(torch.uint8)[::PAGE_BYTES].sum()


def _synchronize(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def child_imports(root: Path, device: str) -> dict:
    started = time.perf_counter()
    import predict  # noqa: F401  (what the server imports before setup())

    return {"seconds": time.perf_counter() - started}


def _timings(started: float, imported: float, loaded: float, used: float) -> dict:
    """A loading variant's phases; `seconds` (what is compared) excludes the imports."""
    return {
        "imports": imported - started,
        "setup": loaded - imported,
        "first_use": used - loaded,
        "seconds": used - imported,
        "total": used - started,
    }


def child_setup(root: Path, device: str) -> dict:
    """Import predict.py, run setup(), then first use."""
    started = time.perf_counter()
    import predict

    imported = time.perf_counter()
    predictor = predict.Predictor()
    predictor.setup()
    _synchronize(device)
    loaded = time.perf_counter()
    weights = predictor.service.weights
    components = chain(weights.checkpoints.default.model.components.values(), weights.refiner.components.values())
    touch([*(m for m in components if hasattr(m, "parameters")), weights.safety_checker.model])
    return _timings(started, imported, loaded, time.perf_counter()) | {"phases": weights.load_seconds}


def child_baseline(root: Path, device: str) -> dict:
    started = time.perf_counter()
    import torch
    from diffusers import AutoencoderKL, StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline
    from transformers import CLIPTextModelWithProjection, CLIPTokenizer

    imported = time.perf_counter()
    dtype = torch.float16
    fp16 = dict(dtype=dtype, variant="fp16", use_safetensors=True)
    # Hugging Face's base and refiner repos each ship their own VAE and text_encoder_2; in the weights/
    # layout those live once, so each pipeline loads its own copy from there, as two repos would.
    base = StableDiffusionXLPipeline.from_pretrained(
        root / "base", vae=AutoencoderKL.from_pretrained(root / "vae", dtype=dtype, variant="fp16"), **fp16
    ).to(device)
    refiner = StableDiffusionXLImg2ImgPipeline.from_pretrained(
        root / "refiner",
        text_encoder_2=CLIPTextModelWithProjection.from_pretrained(root / "base/text_encoder_2", **fp16),
        tokenizer_2=CLIPTokenizer.from_pretrained(root / "base/tokenizer_2"),
        vae=AutoencoderKL.from_pretrained(root / "vae", dtype=dtype, variant="fp16"),
        **fp16,
    ).to(device)
    _synchronize(device)
    loaded = time.perf_counter()
    touch([m for pipe in (base, refiner) for m in pipe.components.values() if hasattr(m, "parameters")])
    return _timings(started, imported, loaded, time.perf_counter())


CHILDREN = {
    "floor": child_floor,
    "imports": child_imports,
    "setup": child_setup,
    "setup_prefetch": child_setup,
    "baseline": child_baseline,
}


def run_as_child(child, root: Path, device: str) -> None:
    with MemorySampler() as memory:
        result = child(root, device)
    result.update(memory.report())
    if device.startswith("cuda"):
        import torch

        result["peak_vram_gib"] = torch.cuda.max_memory_allocated() / GIB
    emit_result(result)


# --- Parent: fresh children, interleaved, cold then warm ---------------------------------------------------------


def run_variant(variant: str, args) -> dict:
    """One fresh child."""
    env = {"SDXL_WEIGHTS_DIR": str(args.weights), "SDXL_DEVICE": args.device, "SDXL_DTYPE": "float16"}
    env["SDXL_PREFETCH_WEIGHTS"] = "1" if variant == "setup_prefetch" else "0"
    return run_child([__file__, "--child", variant, "--weights", str(args.weights), "--device", args.device], env)


def measure(variants: list[str], args, cold: bool) -> dict[str, list[dict]]:
    results: dict[str, list[dict]] = {v: [] for v in variants}
    if not cold:  # one untimed round fills the page cache and the interpreter's own caches
        for variant in variants:
            run_variant(variant, args)
    for i in range(args.repeat):
        for variant in variants:
            if cold:
                drop_page_cache()
            result = run_variant(variant, args)
            results[variant].append(result)
            state = "cold" if cold else "warm"
            print(f"  {state} run {i + 1}/{args.repeat} {variant}: {result['seconds']:.3f} s", flush=True)
    return results


def report(results: dict[str, list[dict]], label: str) -> None:
    def med(variant: str, key: str) -> float:
        runs = results.get(variant, [])
        return median([r[key] for r in runs]) if runs and key in runs[0] else float("nan")

    floor, baseline, baseline_total = med("floor", "seconds"), med("baseline", "seconds"), med("baseline", "total")
    # Whole-process floor: imports and disk one after the other (what overlapping them is measured against).
    imports_then_floor = med("imports", "seconds") + floor
    vram = "peak_vram_gib" in next(iter(results.values()))[0]
    rows = []
    for variant, runs in results.items():
        seconds, loads = med(variant, "seconds"), variant not in ("floor", "imports")
        row = [
            variant,
            TIMED[variant],
            spread([r["seconds"] for r in runs]),
            ratio(seconds, floor) if variant != "imports" else "",
            ratio(seconds, baseline) if loads else "",
            f"{med(variant, 'total'):.2f} s" if loads else "",
            ratio(med(variant, "total"), baseline_total) if loads else "",
            ratio(med(variant, "total"), imports_then_floor) if loads else "",
            f"{med(variant, 'wall_s'):.2f} s",
            f"{med(variant, 'peak_rss_gib'):.2f}",
            f"{med(variant, 'peak_anon_gib'):.2f}",
        ]
        rows.append(row + ([f"{med(variant, 'peak_vram_gib'):.2f}"] if vram else []))
    headers = ["variant", "timed", "seconds, median (min-max)", "vs floor", "vs baseline"]
    headers += ["incl. imports", "incl. imports vs baseline", "incl. imports vs imports + floor"]
    headers += ["process wall", "peak RSS GiB", "peak anon GiB"]
    print(f"### {label}")
    print_table(headers + (["peak VRAM GiB"] if vram else []), rows)
    for variant, runs in results.items():
        if "first_use" in runs[0]:
            parts = ", ".join(f"{k} {med(variant, k):.3f} s" for k in ("imports", "setup", "first_use"))
            phases = runs[0].get("phases", {})
            inner = ", ".join(f"{p} {median([r['phases'][p] for r in runs]):.3f} s" for p in phases)
            print(f"- {variant}: {parts}" + (f" (setup() phases: {inner})" if inner else ""))
    print(flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--weights", type=Path, required=True, help="full-size weights (script/make-test-weights --size full DIR)"
    )
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default: %(default)s)")
    parser.add_argument(
        "--repeat", type=int, default=3, help="runs per variant, median reported (default: %(default)s)"
    )
    parser.add_argument(
        "--variants",
        default=",".join(DEFAULT_VARIANTS),
        help=f"comma-separated, from {', '.join(VARIANTS)} (default: %(default)s)",
    )
    parser.add_argument("--no-cold", action="store_true", help="skip the cold-cache runs")
    parser.add_argument("--no-warm", action="store_true", help="skip the warm-cache runs")
    parser.add_argument("--child", choices=list(CHILDREN), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return run_as_child(CHILDREN[args.child], args.weights, args.device)

    variants = [v for v in args.variants.split(",") if v]
    unknown = set(variants) - set(VARIANTS)
    if unknown:
        parser.error(f"unknown variants {sorted(unknown)}; choose from {', '.join(VARIANTS)}")
    total = sum(p.stat().st_size for p in weight_files(args.weights))
    can_drop = drop_page_cache()
    print_header(
        "Cold start",
        {
            "weights": f"{args.weights} ({total / 1e9:.2f} GB of weights files)",
            "device": args.device,
            "dtype": "float16",
            "page cache drop": "yes" if can_drop else "not permitted (cold runs skipped)",
        },
    )
    if can_drop and not args.no_cold:
        report(measure(variants, args, cold=True), "Cold page cache (dropped before each run)")
    if not args.no_warm:
        report(measure(variants, args, cold=False), "Warm page cache")


if __name__ == "__main__":
    main()
