"""The checkpoints by name: resolving a request's choice, and making it the one the stages run.

Every checkpoint shares the refiner, the fp16-fix VAE and the safety checker; its own parts are its text
encoders and UNet. Activating one brings its own modules onto the device (cache.py, when modules stay resident)
and points the placement's slots at them (device/placement.py), so that each stage runs that checkpoint.
"""

from __future__ import annotations

import time

from sdxl_cog.checkpoints.cache import CheckpointCache
from sdxl_cog.checkpoints.checkpoint import Checkpoint
from sdxl_cog.config import GIB
from sdxl_cog.device.placement import Placement
from sdxl_cog.errors import InputError

# A checkpoint's modules as the placement stages name them (placement.STAGES).
PLACED = {"text_encoder": "text_encoder", "text_encoder_2": "text_encoder_2", "unet": "base_unet"}
# The refiner's second text encoder gets its own stage slot when the active checkpoint's differs.
REFINER_TEXT_ENCODER_2 = "refiner_text_encoder_2"


class Checkpoints:
    def __init__(
        self, listed: list[Checkpoint], placement: Placement, cache: CheckpointCache | None, refiner_text_encoder_2
    ):
        self.by_name = {checkpoint.name: checkpoint for checkpoint in listed}
        self.default = listed[0]  # the first one baked: what a request without `model` gets
        self.placement, self.cache = placement, cache
        self.refiner_text_encoder_2 = refiner_text_encoder_2

    @property
    def names(self) -> list[str]:
        return list(self.by_name)

    def resolve(self, name: str | None) -> Checkpoint:
        """The checkpoint `name` names (None: the default); InputError listing the names if there is none."""
        if name is None:
            return self.default
        if name not in self.by_name:
            raise InputError(f"model={name!r} is not in this image; it has: {', '.join(self.names)}.")
        return self.by_name[name]

    def activate(self, checkpoint: Checkpoint) -> float | None:
        """Point the stages at `checkpoint`'s modules; returns the seconds a load took, None when nothing moved."""
        started = time.perf_counter()
        evicted = self.cache.use(checkpoint.name) if self.cache is not None else None
        self._point_stages_at(checkpoint)
        if evicted is None:
            return None
        seconds = time.perf_counter() - started
        gone = f", evicted {', '.join(evicted)} (least recently used)" if evicted else ""
        size = self.cache.bytes_of(checkpoint.name) / GIB
        print(
            f"Model switch: loaded {checkpoint.name} ({size:.2f} GiB) onto the device in {seconds:.3f}s{gone}.",
            flush=True,
        )
        return seconds

    def _point_stages_at(self, checkpoint: Checkpoint) -> None:
        components = checkpoint.model.components
        for component, slot in PLACED.items():
            self.placement.swap(slot, components[component])
        distinct = components["text_encoder_2"] is not self.refiner_text_encoder_2
        self.placement.swap(REFINER_TEXT_ENCODER_2, self.refiner_text_encoder_2 if distinct else None)
