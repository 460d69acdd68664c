"""Several SDXL checkpoints in one server: loading each component once, and keeping the checkpoints that
requests use on the GPU, least recently used out, within a memory budget.

Every checkpoint shares the refiner, the fp16-fix VAE and the safety checker; its own parts are its text
encoders and UNet (with tokenizers). Components that are byte-identical across checkpoints (equal sha256 in
the manifest) are loaded once and passed to the next checkpoint's from_pretrained, as the refiner borrows
the base's text_encoder_2.

On a GPU with every module resident (placement.ResidentPlacement), checkpoints beyond the budget wait in host
memory and are copied in when a request needs them, evicting the least recently used. In low-VRAM mode
(StagedPlacement) nothing stays on the GPU between stages anyway: a switch only points the stages at the
other checkpoint's modules.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

import torch
from diffusers import StableDiffusionXLPipeline

from .catalog import SHAREABLE, Checkpoint, checkpoints, component_key
from .errors import InputError
from .memory import GIB, REFERENCE_REQUEST, RESERVE_BYTES, activation_bytes
from .placement import module_bytes
from .profiles import profile_from

# A checkpoint's modules as the placement stages name them (placement.STAGES).
PLACED = {"text_encoder": "text_encoder", "text_encoder_2": "text_encoder_2", "unet": "base_unet"}
# The refiner's second text encoder gets its own stage slot when the active checkpoint's differs.
REFINER_TEXT_ENCODER_2 = "refiner_text_encoder_2"


def load_checkpoints(root: Path, manifest: dict, first: StableDiffusionXLPipeline, **load) -> dict[str, object]:
    """Load every checkpoint after the first, reusing any component byte-identical to one already loaded."""
    listed = checkpoints(manifest)
    loaded = {component_key(manifest, listed[0].folder, c): getattr(first, c) for c in SHAREABLE}
    pipelines = {listed[0].name: first}
    for checkpoint in listed[1:]:
        keys = {c: component_key(manifest, checkpoint.folder, c) for c in SHAREABLE}
        shared = {c: loaded[k] for c, k in keys.items() if k in loaded}
        pipe = StableDiffusionXLPipeline.from_pretrained(root / checkpoint.folder, **shared, **load)
        loaded.update({k: getattr(pipe, c) for c, k in keys.items()})
        pipelines[checkpoint.name] = pipe
    return pipelines


def checkpoint_budget(capacity_bytes: int | None, fixed_bytes: int) -> int | None:
    """GPU bytes for checkpoints' own modules: what the card has less the shared modules, the reserve and the
    reference request's activations (memory.py), so that a full request still fits next to them."""
    if capacity_bytes is None:
        return None
    return capacity_bytes - fixed_bytes - RESERVE_BYTES - activation_bytes(**REFERENCE_REQUEST)


Mover = Callable[[torch.nn.Module, bool], None]  # (module, to_device)


class CheckpointCache:
    """Which checkpoints' modules are on the device, least recently used first, within `budget_bytes`."""

    def __init__(
        self,
        modules: dict[str, list[torch.nn.Module]],
        pinned: list[torch.nn.Module],
        budget_bytes: int | None,
        move: Mover,
    ):
        self.modules, self.budget_bytes, self.move = modules, budget_bytes, move
        self.pinned = {id(m) for m in pinned}  # shared with the refiner: on the device for good
        self.resident: OrderedDict[str, None] = OrderedDict()
        # At setup, as many checkpoints as fit, in the order they were baked.
        for name in modules:
            if self._fits(name):
                self._bring(name)

    def _own(self, names) -> dict[int, torch.nn.Module]:
        return {id(m): m for n in names for m in self.modules[n] if id(m) not in self.pinned}

    def used_bytes(self) -> int:
        return sum(module_bytes(m) for m in self._own(self.resident).values())

    def _fits(self, name: str) -> bool:
        if self.budget_bytes is None:
            return True
        return sum(module_bytes(m) for m in self._own([*self.resident, name]).values()) <= self.budget_bytes

    def _bring(self, name: str) -> None:
        on_device = self._own(self.resident)
        for key, module in self._own([name]).items():
            if key not in on_device:
                self.move(module, True)
        self.resident[name] = None

    def _evict(self, name: str) -> None:
        del self.resident[name]
        keep = self._own(self.resident)
        for key, module in self._own([name]).items():
            if key not in keep:
                self.move(module, False)

    def use(self, name: str) -> list[str] | None:
        """Make `name` resident; returns the checkpoints evicted for it, or None when it was already there."""
        if name in self.resident:
            self.resident.move_to_end(name)
            return None
        evicted = []
        while self.resident and not self._fits(name):
            oldest = next(iter(self.resident))
            self._evict(oldest)
            evicted.append(oldest)
        self._bring(name)
        return evicted


def move_between(device: str) -> Mover:
    def move(module: torch.nn.Module, to_device: bool) -> None:
        module.to(device if to_device else "cpu")

    return move


class ModelRegistry:
    """The checkpoints by name: validating a request's choice and making it the one the stages run."""

    def __init__(self, listed: list[Checkpoint], models: dict, placement, cache: CheckpointCache | None):
        self.checkpoints = {c.name: c for c in listed}
        self.models, self.placement, self.cache = models, placement, cache
        self.default = listed[0].name
        self.profiles = {c.name: profile_from(c.profile) for c in listed}
        for name, profile in self.profiles.items():
            # Part of the checkpoint's pristine scheduler config: every sampler a request picks inherits it.
            if profile.timestep_spacing:
                models[name].scheduler_config["timestep_spacing"] = profile.timestep_spacing
        self.refiner_text_encoder_2 = placement.modules.get("text_encoder_2")
        self.active = self.default

    @property
    def names(self) -> list[str]:
        return list(self.checkpoints)

    def resolve(self, name: str | None) -> Checkpoint:
        if name is None:
            return self.checkpoints[self.default]
        if name not in self.checkpoints:
            raise InputError(f"model={name!r} is not in this image; it has: {', '.join(self.names)}.")
        return self.checkpoints[name]

    def activate(self, name: str) -> float | None:
        """Point the stages at `name`'s modules; returns the seconds a load took, None when nothing moved."""
        started = time.perf_counter()
        evicted = self.cache.use(name) if self.cache is not None else None
        self._point_stages_at(name)
        self.active = name
        if evicted is None:
            return None
        seconds = time.perf_counter() - started
        gone = f", evicted {', '.join(evicted)} (least recently used)" if evicted else ""
        size = sum(module_bytes(m) for m in self.cache._own([name]).values()) / GIB
        print(f"Model switch: loaded {name} ({size:.2f} GiB) onto the device in {seconds:.3f}s{gone}.", flush=True)
        return seconds

    def _point_stages_at(self, name: str) -> None:
        components = self.models[name].components
        for component, slot in PLACED.items():
            self.placement.swap(slot, components[component])
        distinct = components["text_encoder_2"] is not self.refiner_text_encoder_2
        self.placement.swap(REFINER_TEXT_ENCODER_2, self.refiner_text_encoder_2 if distinct else None)
