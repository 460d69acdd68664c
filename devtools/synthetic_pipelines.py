"""Synthetic SDXL built in memory, directly on a device: the configs and random fill of synthetic.py without the
disk. A full-size set (two checkpoints, the refiner, the VAE, the safety checker: ~9.6 G parameters) fills on a GPU
in seconds instead of a 12.9 GB write and read. The service takes it as its Pipelines (checkpoints/loading.py).

The same size, seed and device give the same values, so two sets made one after the other are the same weights.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from diffusers import (
    EulerDiscreteScheduler,
    StableDiffusionXLImg2ImgPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from torch import nn
from transformers import CLIPImageProcessor, CLIPTokenizer

from devtools.synthetic import (
    LORA_RANK,
    LORA_TARGETS,
    NEVER_FLAG_THRESHOLD,
    PARTS,
    PREPROCESSOR_CONFIG,
    TOKENIZERS,
    architecture,
    part_seed,
    random_model,
    sdxl_configs,
    set_thresholds,
    write_tokenizer,
)
from sdxl_cog.checkpoints.loading import Pipelines
from sdxl_cog.finishing.safety import SafetyChecker
from sdxl_cog.weights.catalog import CheckpointEntry
from sdxl_cog.weights.layout import BASE_DIR, model_dir
from sdxl_cog.weights.profiles import Profile

BUILDERS = {part.config: part.build for part in PARTS}


def synthetic_pipelines(
    size: str, device: str, dtype: torch.dtype, names: list[str], profile: Profile, seed: int = 0
) -> Pipelines:
    """Checkpoints `names` (the first is the default; each has its own UNet and shares the first one's text
    encoders), the refiner, the VAE and a safety checker that never flags, all on `device`; every checkpoint
    serves with `profile`."""
    configs = sdxl_configs(size)

    def build(config: str, path: str) -> nn.Module:
        return random_model(lambda: BUILDERS[config](configs[config]), dtype, part_seed(seed, path), device)

    shared = dict(
        vae=build("vae", "vae"),
        text_encoder=build("text_encoder", f"{BASE_DIR}/text_encoder"),
        text_encoder_2=build("text_encoder_2", f"{BASE_DIR}/text_encoder_2"),
        **tokenizers(configs),
    )
    checkpoints = [
        StableDiffusionXLPipeline(
            **shared,
            unet=build("unet_base", f"{model_dir(name) if i else BASE_DIR}/unet"),
            scheduler=scheduler(),
            force_zeros_for_empty_prompt=True,
            add_watermarker=False,
        )
        for i, name in enumerate(names)
    ]
    refiner = StableDiffusionXLImg2ImgPipeline(
        vae=shared["vae"],
        text_encoder=None,
        text_encoder_2=shared["text_encoder_2"],
        tokenizer=None,
        tokenizer_2=shared["tokenizer_2"],
        unet=build("unet_refiner", "refiner/unet"),
        scheduler=scheduler(),
        requires_aesthetics_score=True,
        force_zeros_for_empty_prompt=False,
        add_watermarker=False,
    )
    checker_model = build("safety_checker", "safety_checker")
    set_thresholds(checker_model, NEVER_FLAG_THRESHOLD)
    processor = CLIPImageProcessor(**{k: v for k, v in PREPROCESSOR_CONFIG.items() if k != "image_processor_type"})
    entries = [
        CheckpointEntry(name, "", f"synthetic {size} weights in memory, seed {seed}", "", profile) for name in names
    ]
    return Pipelines(entries, checkpoints, refiner, SafetyChecker(checker_model, processor, device, dtype))


def scheduler() -> EulerDiscreteScheduler:
    return EulerDiscreteScheduler.from_config(architecture("scheduler"))


def tokenizers(configs: dict[str, dict]) -> dict[str, CLIPTokenizer]:
    """SDXL's two tokenizers (synthetic.write_tokenizer's files, read back: a tokenizer is made from files)."""
    with tempfile.TemporaryDirectory(prefix="sdxl-tokenizers-") as scratch:
        loaded = {}
        for directory, (encoder, pad_token) in TOKENIZERS.items():
            path = Path(scratch) / directory
            write_tokenizer(path, configs[encoder]["vocab_size"], pad_token)
            loaded[path.name] = CLIPTokenizer.from_pretrained(path)
        return loaded


def random_lora(unet: UNet2DConditionModel, seed: int = 0) -> dict[str, torch.Tensor]:
    """A PEFT-format LoRA (diffusers' file layout once each key gets a `unet.` prefix) of rank LORA_RANK on the
    attention projections SDXL LoRAs adapt, for any UNet: its size is a real LoRA's, its effect a mild one
    (both factors at the initializer's 0.02)."""
    generator = torch.Generator().manual_seed(seed)
    weights = {}
    for name, module in unet.named_modules():
        if isinstance(module, nn.Linear) and any(name.endswith(f".{target}") for target in LORA_TARGETS):
            weights[f"{name}.lora_A.weight"] = torch.randn(LORA_RANK, module.in_features, generator=generator) * 0.02
            weights[f"{name}.lora_B.weight"] = torch.randn(module.out_features, LORA_RANK, generator=generator) * 0.02
    return weights
