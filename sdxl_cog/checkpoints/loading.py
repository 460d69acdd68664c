"""What setup() loads: every checkpoint, the refiner, the fp16-fix VAE and the safety checker, each module once,
compiled when SDXL_COMPILE asks for it (device/compilation.py) and placed on the device (device/placement.py).

Two halves: read_pipelines() reads the modules from a weights directory, assemble() compiles, places and indexes
modules already in memory, wherever they came from (bench/gpu_check.py synthesizes them on the GPU).

Every module is loaded exactly once: txt2img, img2img and inpaint use the same base modules, and the refiner
reuses the default checkpoint's text_encoder_2, tokenizer_2 and the VAE (the fp16-fix VAE for all). Components
that are byte-identical across checkpoints (equal sha256 in the manifest) are loaded once and passed to the next
checkpoint's from_pretrained, as the refiner borrows the base's text_encoder_2.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from diffusers import AutoencoderKL, StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline
from diffusers.utils import logging as diffusers_logging
from transformers.utils import logging as transformers_logging

from sdxl_cog.checkpoints import prefetch
from sdxl_cog.checkpoints.cache import CheckpointCache, checkpoint_budget, move_between
from sdxl_cog.checkpoints.checkpoint import Checkpoint, StageModel
from sdxl_cog.checkpoints.lora import LoraAdapters
from sdxl_cog.checkpoints.registry import Checkpoints
from sdxl_cog.config import Settings
from sdxl_cog.control.models import ControlModels, attach_ip_adapter, load_control_models
from sdxl_cog.device import compilation
from sdxl_cog.device.compilation import Compiled
from sdxl_cog.device.memory import gpu_capacity
from sdxl_cog.device.placement import Placement, make_placement, module_bytes
from sdxl_cog.finishing.safety import SafetyChecker
from sdxl_cog.weights import layout
from sdxl_cog.weights.catalog import (
    SHAREABLE,
    CheckpointEntry,
    ControlEntries,
    checkpoint_entries,
    component_key,
    control_entries,
)


@dataclass
class Pipelines:
    """Every module setup() serves, in memory but not yet compiled or placed: each checkpoint's pipeline (the default
    first, all on the shared VAE), the refiner (on the default's text_encoder_2, tokenizer_2 and the VAE), the
    safety checker and the control models. read_pipelines() makes them from a weights directory; bench/gpu_check.py
    synthesizes them."""

    entries: list[CheckpointEntry]
    checkpoints: list[StableDiffusionXLPipeline]
    refiner: StableDiffusionXLImg2ImgPipeline
    safety_checker: SafetyChecker
    control: ControlModels = field(default_factory=ControlModels)  # none unless baked
    seconds: dict[str, float] = field(default_factory=dict)  # what reading them took, by phase


@dataclass
class LoadedWeights:
    checkpoints: Checkpoints  # every checkpoint by name, the default first
    refiner: StageModel  # shared by every checkpoint
    control: ControlModels  # ControlNets, IP-Adapter and depth estimator, when baked; shared too
    safety_checker: SafetyChecker
    placement: Placement  # which modules are on the device at each stage
    load_seconds: dict[str, float]
    compiled: Compiled | None = None  # SDXL_COMPILE's fused and compiled UNets (device/compilation.py); None: off


def load_weights(settings: Settings, pipelines: Pipelines | None = None) -> LoadedWeights:
    """Check the weights, load every module once, place them (placement.py), and return them. `pipelines`:
    modules already in memory (bench/gpu_check.py synthesizes them), to compile and place instead."""
    return assemble(settings, pipelines or read_pipelines(settings))


def read_pipelines(settings: Settings) -> Pipelines:
    """Steps 1-3: the weights directory checked against its manifest, then every module read from it once."""
    root, dtype, seconds = settings.weights_dir, settings.dtype, {}
    # Loading bars would arrive in the setup logs as carriage-return noise.
    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()
    started = time.perf_counter()

    # 1. Fail fast, naming the file, if the weights are incomplete or corrupt, or the manifest says what we cannot serve.
    manifest = layout.verify(root, full_hash=settings.verify_weights_hash)
    entries, controls = read_entries(root, manifest)
    seconds["verify"] = time.perf_counter() - started
    if settings.prefetch_weights:
        prefetch.start(root)

    # 2. The fp16-fix VAE, shared by every checkpoint and the refiner.
    vae = AutoencoderKL.from_pretrained(root / layout.VAE_DIR, dtype=dtype, variant="fp16")

    # 3. The default checkpoint (base/), the refiner borrowing its second text encoder, its tokenizer and the VAE,
    # then the further checkpoints (models/NAME), each component that equals one already loaded shared; and the
    # safety checker, which arrives on the device (in low-VRAM mode placement sends it back at once: 0.6 GB).
    load = dict(dtype=dtype, variant="fp16", use_safetensors=True, add_watermarker=False)
    base = StableDiffusionXLPipeline.from_pretrained(root / layout.BASE_DIR, vae=vae, **load)
    refiner = StableDiffusionXLImg2ImgPipeline.from_pretrained(
        root / layout.REFINER_DIR,
        text_encoder_2=base.text_encoder_2,
        tokenizer_2=base.tokenizer_2,
        vae=vae,
        **load,
    )
    pipelines = load_checkpoints(root, manifest, entries, base, vae=vae, **load)
    safety_checker = SafetyChecker.from_directory(root / layout.SAFETY_CHECKER_DIR, settings.device, dtype)
    # The control models, when baked: the IP-Adapter's projections go into each checkpoint's UNet (once per UNet).
    control = load_control_models(root, controls, dtype)
    if control.ip_adapter is not None:
        for pipe in {id(p.unet): p for p in pipelines}.values():
            attach_ip_adapter(pipe, control.ip_adapter)
    seconds["load"] = time.perf_counter() - started - seconds["verify"]
    return Pipelines(entries, pipelines, refiner, safety_checker, control, seconds)


def assemble(settings: Settings, pipelines: Pipelines) -> LoadedWeights:
    """Steps 4-5 on modules already in memory: compiled (SDXL_COMPILE), then placed on the device and indexed by
    checkpoint."""
    started, seconds = time.perf_counter(), dict(pipelines.seconds)
    base, refiner, control = pipelines.checkpoints[0], pipelines.refiner, pipelines.control
    vae, safety_checker = base.vae, pipelines.safety_checker

    # 4. SDXL_COMPILE: fused projections, channels_last and the blocks marked for compilation (device/compilation.py),
    # before placement so that the fused copies are counted and moved with the rest; the service warms them up.
    compiled = None
    if settings.compile:
        unets = [pipe.unet for pipe in pipelines.checkpoints] + [refiner.unet]
        compiled, summary = compilation.prepare(unets, vae, settings.device, settings.compile_cache_dir)
        print(summary, flush=True)
        seconds["compile"] = time.perf_counter() - started

    # 5. Onto the device: every module once, or (low-VRAM mode) into pinned memory for stage by stage.
    modules = {
        "text_encoder": base.text_encoder,
        "text_encoder_2": base.text_encoder_2,  # also the refiner's
        "base_unet": base.unet,
        "refiner_unet": refiner.unet,
        "vae": vae,
        "safety_checker": safety_checker.model,
        **control.placed_modules(),
    }
    placement = make_placement(settings.device, modules, settings.low_vram, gpu_capacity(settings.device))
    listed = [
        Checkpoint(
            entry,
            pipe,
            StageModel.of("base", pipe, entry.profile.timestep_spacing),
            LoraAdapters(pipe, settings, compiled.of(pipe.unet) if compiled else None),
        )
        for entry, pipe in zip(pipelines.entries, pipelines.checkpoints)
    ]
    shared = [refiner.unet, base.text_encoder_2, vae, safety_checker.model, *control.placed_modules().values()]
    cache = None if placement.low_vram else _cache(settings, listed, shared)
    checkpoints = Checkpoints(listed, placement, cache, refiner_text_encoder_2=base.text_encoder_2)
    seconds["to_device"] = time.perf_counter() - started - seconds.get("compile", 0.0)
    refiner_model = StageModel.of("refiner", refiner)
    return LoadedWeights(checkpoints, refiner_model, control, safety_checker, placement, seconds, compiled)


def read_entries(root: Path, manifest: dict) -> tuple[list[CheckpointEntry], ControlEntries]:
    """The checkpoints and control models the manifest lists; a WeightsError naming the manifest if it lists what
    this code cannot serve (an unknown profile preset, control type or kind: a hand-edited or newer manifest)."""
    try:
        return checkpoint_entries(manifest), control_entries(manifest)
    except (ValueError, KeyError) as e:
        raise layout.WeightsError(
            f"{root / layout.MANIFEST_NAME} lists what this server cannot serve: {e}. Re-bake the weights with this "
            "version's script/download-weights."
        ) from e


def load_checkpoints(
    root: Path, manifest: dict, entries: list[CheckpointEntry], first: StableDiffusionXLPipeline, **load
) -> list[StableDiffusionXLPipeline]:
    """Every checkpoint's pipeline, `first` being the first entry's: each later one reuses any component
    byte-identical to one already loaded."""
    loaded = {component_key(manifest, entries[0].folder, c): getattr(first, c) for c in SHAREABLE}
    pipelines = [first]
    for entry in entries[1:]:
        keys = {c: component_key(manifest, entry.folder, c) for c in SHAREABLE}
        shared = {c: loaded[k] for c, k in keys.items() if k in loaded}
        pipe = StableDiffusionXLPipeline.from_pretrained(root / entry.folder, **shared, **load)
        loaded.update({k: getattr(pipe, c) for c, k in keys.items()})
        pipelines.append(pipe)
    return pipelines


def _cache(settings: Settings, listed: list[Checkpoint], shared: list) -> CheckpointCache:
    """With every module resident: the checkpoints that fit the GPU's budget on it, the others in host memory."""
    fixed = sum(module_bytes(m) for m in shared)
    budget = settings.model_memory_bytes or checkpoint_budget(gpu_capacity(settings.device), fixed)
    own = {checkpoint.name: checkpoint.own_modules() for checkpoint in listed}
    return CheckpointCache(own, shared, budget, move_between(settings.device))
