"""Prototype of a proposed weights-layout change, for bench/coldstart.py --alt-weights: a copy of a weights
directory whose VAE and safety checker are stored in float16, the dtype setup() loads them in on a GPU.

    python bench/cast_free_weights.py /tmp/sdxl-full /tmp/sdxl-full-fp16aux
    python bench/coldstart.py --weights /tmp/sdxl-full --alt-weights /tmp/sdxl-full-fp16aux

Both ship as float32 files (madebyollin/sdxl-vae-fp16-fix, CompVis/stable-diffusion-safety-checker), so every
setup() in float16 casts them: it reads and converts 1.55 GB and keeps the results in anonymous memory,
where float16 files would be memory-mapped like the UNets. Every other file is hard-linked, not copied
(same bytes, same page cache); the manifest is updated for the two rewritten files only.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import safetensors.torch
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from sdxl_cog import weights  # noqa: E402

CAST_FILES = (
    f"{weights.VAE_DIR}/diffusion_pytorch_model.safetensors",
    f"{weights.SAFETY_CHECKER_DIR}/model.safetensors",
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("src", type=Path, help="weights directory (e.g. script/make-test-weights --size full)")
    parser.add_argument("dst", type=Path, help="where to write the copy (same filesystem as src)")
    args = parser.parse_args()

    manifest = weights.read_manifest(args.src)
    for name in manifest["files"]:
        target = args.dst / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.unlink(missing_ok=True)
        if name not in CAST_FILES:
            os.link(args.src / name, target)
            continue
        tensors = safetensors.torch.load_file(args.src / name)
        half = {k: v.half() if v.is_floating_point() else v for k, v in tensors.items()}
        safetensors.torch.save_file(half, target, metadata={"format": "pt"})
        target.chmod(0o644)
        manifest["files"][name] = {"size": target.stat().st_size, "sha256": weights.sha256_of(target)}
        print(
            f"{name}: {(args.src / name).stat().st_size / 1e6:.0f} MB float32 -> {target.stat().st_size / 1e6:.0f} MB"
        )
    manifest["sources"] = {k: v + ", VAE and safety checker cast to float16" for k, v in manifest["sources"].items()}
    (args.dst / weights.MANIFEST_NAME).write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    weights.verify(args.dst)
    print(f"Wrote {args.dst}")


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
