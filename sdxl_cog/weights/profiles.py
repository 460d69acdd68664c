"""Per-checkpoint defaults: the steps, guidance, size and timestep spacing a checkpoint was made for.

A checkpoint's profile comes from its manifest entry (`profile`: a preset name plus any overrides, set at
download time), so a distilled model produces correct images with the inputs a user leaves out. The
timestep spacing is part of the checkpoint's pristine scheduler config, whichever sampler a request picks.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

# SDXL was trained at about one megapixel: 1024x1024 is its native text-to-image size.
SDXL_SIDE = 1024


@dataclass(frozen=True)
class Profile:
    num_inference_steps: int = 50  # predict.py's historical default (stability-ai/sdxl)
    guidance_scale: float = 7.5
    side: int = SDXL_SIDE  # width and height of a text-to-image request
    timestep_spacing: str | None = None  # None: the checkpoint's own scheduler config decides

    def defaults(self) -> dict[str, object]:
        """The inputs this profile supplies when a request leaves them out."""
        return {
            "num_inference_steps": self.num_inference_steps,
            "guidance_scale": self.guidance_scale,
            "width": self.side,
            "height": self.side,
        }


PRESETS: dict[str, Profile] = {
    "sdxl": Profile(),
    # stabilityai/sdxl-turbo's model card: 1-4 steps, guidance_scale=0.0 (it was distilled without
    # classifier-free guidance), 512x512, and timesteps from the trailing end of the schedule.
    "turbo": Profile(num_inference_steps=1, guidance_scale=0.0, side=512, timestep_spacing="trailing"),
    # ByteDance/SDXL-Lightning: Euler with trailing spacing, no guidance; the 4-step checkpoint (2 and 8
    # exist: override num_inference_steps).
    "lightning": Profile(num_inference_steps=4, guidance_scale=0.0, side=1024, timestep_spacing="trailing"),
}
DEFAULT_PROFILE = PRESETS["sdxl"]
FIELDS = {f.name for f in dataclasses.fields(Profile)}


def profile_from(entry: dict) -> Profile:
    """A manifest entry's profile: `{"preset": "turbo", "num_inference_steps": 2}`, all keys optional."""
    overrides = dict(entry)
    preset = overrides.pop("preset", "sdxl")
    if preset not in PRESETS:
        raise ValueError(f"Unknown profile preset {preset!r}; use one of {', '.join(PRESETS)}.")
    if unknown := set(overrides) - FIELDS:
        raise ValueError(f"Unknown profile settings {sorted(unknown)}; allowed: {sorted(FIELDS)}.")
    return dataclasses.replace(PRESETS[preset], **overrides)
