"""One SDXL checkpoint as the server holds it, and the modules a denoising stage runs.

A Checkpoint is everything about one baked checkpoint in one record: its manifest entry (name, folder, source,
UNet hash, profile), its loaded pipeline (the modules; LoRA adapters are loaded on it), the base stage built on
those modules, and its LoRA state. Resolving a request's `model` returns one (registry.Checkpoints.resolve).

A StageModel is what one denoising stage runs: a checkpoint's base, or the refiner every checkpoint shares. A
request builds fresh pipeline objects around it (generation/pipelines.py), so nothing it chooses stays on a
shared object.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from diffusers import DiffusionPipeline, StableDiffusionXLPipeline

from sdxl_cog.checkpoints.lora import LoraAdapters
from sdxl_cog.weights.catalog import CheckpointEntry
from sdxl_cog.weights.profiles import Profile

# Pipeline init options read from each model's model_index.json (the base zeroes an empty negative prompt, the
# refiner conditions on an aesthetic score).
MODEL_OPTIONS = ("force_zeros_for_empty_prompt", "requires_aesthetics_score")
# The text encoders with the tokenizer each one reads.
TEXT_ENCODERS = (("tokenizer", "text_encoder"), ("tokenizer_2", "text_encoder_2"))
# A checkpoint's own modules; the VAE, the refiner and the safety checker are shared by every checkpoint.
OWN_MODULES = ("text_encoder", "text_encoder_2", "unet")


@dataclass
class StageModel:
    """One denoising stage's modules, its pipeline options and its pristine scheduler config."""

    stage: str  # "base" or "refiner": which pipeline classes, placement stage and step-log prefix it uses
    components: dict[str, Any]
    options: dict[str, Any]
    scheduler_config: dict[str, Any] = field(repr=False)

    @classmethod
    def of(cls, stage: str, pipe: DiffusionPipeline, timestep_spacing: str | None = None) -> StageModel:
        """The stage built on `pipe`'s modules. A profile's timestep spacing becomes part of the pristine
        scheduler config, so that every sampler a request picks inherits it."""
        scheduler_config = dict(pipe.scheduler.config)
        if timestep_spacing:
            scheduler_config["timestep_spacing"] = timestep_spacing
        components = {k: v for k, v in pipe.components.items() if k != "scheduler"}
        options = {k: pipe.config[k] for k in MODEL_OPTIONS if k in pipe.config}
        return cls(stage, components, options, scheduler_config)

    def text_encoders(self) -> list[tuple[Any, torch.nn.Module]]:
        """(tokenizer, text encoder) pairs, in the order SDXL concatenates their hidden states; the refiner has
        only the second."""
        pairs = [(self.components.get(t), self.components.get(e)) for t, e in TEXT_ENCODERS]
        return [(t, e) for t, e in pairs if e is not None]

    def tokenizers(self) -> list:
        return [tokenizer for tokenizer, _ in self.text_encoders()]


@dataclass
class Checkpoint:
    entry: CheckpointEntry
    pipeline: StableDiffusionXLPipeline  # its loaded modules; a request's LoRA is loaded on it
    model: StageModel  # the base stage on those modules, with the profile's timestep spacing
    loras: LoraAdapters  # at most one active, for one request

    @property
    def name(self) -> str:
        return self.entry.name

    @property
    def profile(self) -> Profile:
        return self.entry.profile

    def own_modules(self) -> list[torch.nn.Module]:
        return [self.model.components[name] for name in OWN_MODULES]
