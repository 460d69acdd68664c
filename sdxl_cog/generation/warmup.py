"""SDXL_COMPILE's warm-up, at setup: one small request per size to serve, through the real generation path, so
that torch.compile traces and compiles every graph a request of that size runs (both UNets' transformer blocks,
the VAE decoder) before the first user's request, with exactly the inputs requests give them.

The sizes are SDXL_COMPILE_SIZES, or each checkpoint's own text-to-image size (its profile's) with one output.
Each is run once per guidance setting the checkpoints use: classifier-free guidance doubles the UNets' batch, so a
size with it and without it are different graphs. Every checkpoint has the same blocks, so one checkpoint's
warm-up compiles the graphs for all of them. What was not warmed runs uncompiled (device/compilation.py).
"""

from __future__ import annotations

import time

from sdxl_cog.checkpoints.checkpoint import Checkpoint
from sdxl_cog.checkpoints.loading import LoadedWeights
from sdxl_cog.config import WARMUP_HIGH_NOISE_FRAC, WARMUP_STEPS, CompileSize
from sdxl_cog.device import compilation
from sdxl_cog.generation.generate import generate
from sdxl_cog.inputs.request import GenerationRequest, Refine, build_request

# The sampler plays no part in the graphs (the blocks never see the timestep); the prompt fits one 77-token chunk.
WARMUP_SCHEDULER = "K_EULER"
WARMUP_PROMPT = "warm-up"


def warm_up(weights: LoadedWeights, sizes: tuple[CompileSize, ...], device: str) -> float:
    """Compile every warm-up request's graphs; returns the seconds it took (mostly compilation: the steps are few)."""
    started = time.perf_counter()
    plan = warmup_requests(list(weights.checkpoints.by_name.values()), sizes)
    with compilation.warming_up():
        for checkpoint, request in plan:
            weights.checkpoints.activate(checkpoint)
            generate(weights, checkpoint.model, request, device, safety_check=False, watermark=False)
    seconds = time.perf_counter() - started
    shapes = ", ".join(
        f"{r.width}x{r.height}x{r.num_outputs}{' guided' if r.guidance_scale > 1 else ''}" for _, r in plan
    )
    print(f"SDXL_COMPILE: warmed up {shapes} in {seconds:.1f}s.", flush=True)
    return seconds


def warmup_requests(
    checkpoints: list[Checkpoint], sizes: tuple[CompileSize, ...]
) -> list[tuple[Checkpoint, GenerationRequest]]:
    """One request per (size, guidance on or off), each on the first checkpoint that serves that combination."""
    plan: dict[tuple[int, int, int, bool], Checkpoint] = {}
    for checkpoint in checkpoints:
        profile = checkpoint.profile
        for width, height, outputs in sizes or ((profile.side, profile.side, 1),):
            plan.setdefault((width, height, outputs, profile.guidance_scale > 1), checkpoint)
    return [(checkpoint, _request(checkpoint, w, h, n)) for (w, h, n, _), checkpoint in plan.items()]


def _request(checkpoint: Checkpoint, width: int, height: int, outputs: int) -> GenerationRequest:
    """Both UNets and the decoder at this size, one step each: the expert ensemble split in the middle."""
    return build_request(
        prompt=WARMUP_PROMPT,
        negative_prompt="",
        image=None,
        mask=None,
        width=width,
        height=height,
        num_outputs=outputs,
        scheduler=WARMUP_SCHEDULER,
        num_inference_steps=WARMUP_STEPS,
        guidance_scale=checkpoint.profile.guidance_scale,
        prompt_strength=1.0,
        seed=0,
        refine=Refine.EXPERT_ENSEMBLE.value,
        high_noise_frac=WARMUP_HIGH_NOISE_FRAC,
        refine_steps=None,
        refine_strength=1.0,
        model=checkpoint.name,
        profile=checkpoint.profile,
        files_from_client=False,
    )
