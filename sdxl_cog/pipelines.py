"""Loading SDXL base + refiner once, and building per-request pipeline views on the loaded modules.

Every module is loaded exactly once: txt2img, img2img and inpaint use the same base modules, and the
refiner reuses the base's text_encoder_2, tokenizer_2 and VAE (the fp16-fix VAE for both). A request
gets fresh pipeline objects around those modules with its own scheduler, so nothing a request
chooses is left on a shared object.
"""

from __future__ import annotations

import inspect
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from diffusers import (
    AutoencoderKL,
    DiffusionPipeline,
    StableDiffusionXLImg2ImgPipeline,
    StableDiffusionXLInpaintPipeline,
    StableDiffusionXLPipeline,
)
from diffusers.utils import logging as diffusers_logging
from transformers.utils import logging as transformers_logging

from . import prefetch
from .catalog import checkpoints
from .config import Settings
from .memory import gpu_capacity
from .models import CheckpointCache, ModelRegistry, checkpoint_budget, load_checkpoints, move_between
from .placement import Placement, make_placement, module_bytes
from .safety import SafetyChecker
from .schedulers import make_scheduler
from .weights import layout

# Which pipeline class runs each (stage, mode). The refiner never starts from noise, so its
# text-to-image runs are image-to-image on the base's latents.
PIPELINE_CLASSES: dict[tuple[str, str], type[DiffusionPipeline]] = {
    ("base", "txt2img"): StableDiffusionXLPipeline,
    ("base", "img2img"): StableDiffusionXLImg2ImgPipeline,
    ("base", "inpaint"): StableDiffusionXLInpaintPipeline,
    ("refiner", "txt2img"): StableDiffusionXLImg2ImgPipeline,
    ("refiner", "img2img"): StableDiffusionXLImg2ImgPipeline,
    ("refiner", "inpaint"): StableDiffusionXLInpaintPipeline,
}
# Pipeline init options read from each model's model_index.json (the base zeroes an empty negative
# prompt, the refiner conditions on an aesthetic score).
MODEL_OPTIONS = ("force_zeros_for_empty_prompt", "requires_aesthetics_score")


@dataclass
class Model:
    """One loaded model (base or refiner): its modules, its options and its pristine scheduler config."""

    name: str
    components: dict[str, Any]
    options: dict[str, Any]
    scheduler_config: dict[str, Any] = field(repr=False)

    def pipeline(self, mode: str, scheduler_name: str) -> DiffusionPipeline:
        cls = PIPELINE_CLASSES[(self.name, mode)]
        accepted = inspect.signature(cls.__init__).parameters
        kwargs = {k: v for k, v in {**self.components, **self.options}.items() if k in accepted}
        # The watermark is applied to finished images by the predictor, per request.
        pipe = cls(**kwargs, scheduler=make_scheduler(scheduler_name, self.scheduler_config), add_watermarker=False)
        pipe.set_progress_bar_config(disable=True)
        return pipe


@dataclass
class LoadedModels:
    base: Model
    refiner: Model
    base_pipeline: StableDiffusionXLPipeline  # owns LoRA adapters on the shared base modules
    safety_checker: SafetyChecker
    placement: Placement  # which modules are on the device at each stage
    manifest: dict
    load_seconds: dict[str, float]
    registry: ModelRegistry  # every checkpoint by name (models.py)
    checkpoint_pipelines: dict[str, StableDiffusionXLPipeline]


def _model(name: str, pipe: DiffusionPipeline) -> Model:
    components = {k: v for k, v in pipe.components.items() if k != "scheduler"}
    options = {k: pipe.config[k] for k in MODEL_OPTIONS if k in pipe.config}
    return Model(name, components, options, dict(pipe.scheduler.config))


def load_models(settings: Settings) -> LoadedModels:
    """Check the weights, load every module once, place them (placement.py), and return the shared models."""
    root, dtype, seconds = settings.weights_dir, settings.dtype, {}
    # Loading bars would arrive in the setup logs as carriage-return noise.
    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()
    started = time.perf_counter()

    # 1. Fail fast, naming the file, if the weights are incomplete or corrupt.
    manifest = layout.verify(root, full_hash=settings.verify_weights_hash)
    seconds["verify"] = time.perf_counter() - started
    if settings.prefetch_weights:
        prefetch.start(root)

    # 2. The fp16-fix VAE, shared by base and refiner.
    vae = AutoencoderKL.from_pretrained(root / layout.VAE_DIR, dtype=dtype, variant="fp16")

    # 3. Base, then the refiner borrowing the base's second text encoder, its tokenizer and the VAE.
    load = dict(dtype=dtype, variant="fp16", use_safetensors=True, add_watermarker=False)
    base = StableDiffusionXLPipeline.from_pretrained(root / layout.BASE_DIR, vae=vae, **load)
    refiner = StableDiffusionXLImg2ImgPipeline.from_pretrained(
        root / layout.REFINER_DIR,
        text_encoder_2=base.text_encoder_2,
        tokenizer_2=base.tokenizer_2,
        vae=vae,
        **load,
    )
    # Further checkpoints (models/NAME), each component that equals one already loaded shared, not reloaded.
    pipelines = load_checkpoints(root, manifest, base, vae=vae, **load)
    seconds["load"] = time.perf_counter() - started - seconds["verify"]

    # 4. Onto the device: every module once, or (low-VRAM mode) into pinned memory for stage by stage.
    # The safety checker arrives on the device; in low-VRAM mode it goes back at once (0.6 GB, setup only).
    safety_checker = SafetyChecker(root / layout.SAFETY_CHECKER_DIR, settings.device, dtype)
    modules = {
        "text_encoder": base.text_encoder,
        "text_encoder_2": base.text_encoder_2,  # also the refiner's
        "base_unet": base.unet,
        "refiner_unet": refiner.unet,
        "vae": vae,
        "safety_checker": safety_checker.model,
    }
    placement = make_placement(settings.device, modules, settings.low_vram, gpu_capacity(settings.device))
    registry = _registry(
        settings, manifest, pipelines, placement, [refiner.unet, base.text_encoder_2, vae, safety_checker.model]
    )
    seconds["to_device"] = time.perf_counter() - started - seconds["verify"] - seconds["load"]
    return LoadedModels(
        _model("base", base),
        _model("refiner", refiner),
        base,
        safety_checker,
        placement,
        manifest,
        seconds,
        registry,
        pipelines,
    )


def _registry(settings: Settings, manifest: dict, pipelines: dict, placement: Placement, shared: list) -> ModelRegistry:
    """The checkpoints by name; in resident mode, those that fit the GPU's budget on it, the others in host memory."""
    models = {name: _model("base", pipe) for name, pipe in pipelines.items()}
    cache = None
    if not placement.low_vram:
        fixed = sum(module_bytes(m) for m in shared)
        budget = settings.model_memory_bytes or checkpoint_budget(gpu_capacity(settings.device), fixed)
        own = {
            name: [m.components[c] for c in ("text_encoder", "text_encoder_2", "unet")] for name, m in models.items()
        }
        cache = CheckpointCache(own, shared, budget, move_between(settings.device))
    return ModelRegistry(checkpoints(manifest), models, placement, cache)


def synchronize(device: str) -> None:
    """Wait for the GPU work this thread queued, so that phase timings measure the phase and not the launch.

    The calling thread's stream only: the finishing workers' stream runs beside the decoder's, and neither
    waits for the other."""
    if device.startswith("cuda"):
        torch.cuda.current_stream().synchronize()
