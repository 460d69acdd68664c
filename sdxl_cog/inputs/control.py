"""A request's control inputs, checked before any work: up to three ControlNet controls (predict.py's controlnet_N
inputs) and an image prompt for the IP-Adapter.

Whether the models they need are baked is checked by the engine (control/models.py), which knows what is loaded;
here only what the inputs say is checked, so every refusal names the input to change.

Sizes: every control image is fitted to the output size as `image` is (scaled to cover it, centre-cropped, no
stretching). Without `image`, when width and height are left out, the first control image sets the output size
as `image` would (its aspect ratio, at most 2048 a side): a control map is usually made from a picture of the
composition wanted.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from sdxl_cog.errors import InputError
from sdxl_cog.inputs import images, uploads
from sdxl_cog.weights.control_types import CONTROL_TYPES

NO_CONTROL = "none"
# Types with a preprocessor in the container (control/preprocess.py); tile's map is the image itself.
PREPROCESSED_TYPES = ("canny", "depth", "tile")


@dataclass(frozen=True)
class ControlInput:
    """One controlnet_N group of inputs as the client sent them."""

    type: str
    image: Path | None
    preprocess: bool
    conditioning_scale: float
    start: float
    end: float


@dataclass(frozen=True)
class Control:
    slot: int  # N of the controlnet_N inputs it came from: errors and metadata name it
    type: str
    image: Image.Image  # fitted to the output size: a photo to preprocess, or a ready map
    preprocess: bool
    conditioning_scale: float
    start: float  # the fraction of the steps where the control starts, and where it ends
    end: float

    @property
    def active(self) -> bool:
        """A control at scale 0 changes nothing: it is not run at all."""
        return self.conditioning_scale > 0


@dataclass(frozen=True)
class ImagePrompt:
    image: Image.Image  # as sent: the image encoder's processor resizes and crops it
    scale: float

    @property
    def active(self) -> bool:
        return self.scale > 0


def load_controls(
    controls: Sequence[ControlInput], files_from_client: bool
) -> list[tuple[int, ControlInput, Image.Image]]:
    """Each control in use with its image loaded, after the checks that need no size: (slot, inputs, image)."""
    loaded = []
    for slot, control in enumerate(controls, start=1):
        name = f"controlnet_{slot}"
        image = uploads.client_file(control.image, f"{name}_image") if files_from_client else control.image
        if control.type == NO_CONTROL:
            if image is not None:
                raise InputError(f"{name}_image was given but {name} is none: choose the control's type.")
            continue
        if control.type not in CONTROL_TYPES:
            raise InputError(f"{name}={control.type!r} is not a control type; use one of {', '.join(CONTROL_TYPES)}.")
        if image is None:
            raise InputError(f"{name}={control.type} needs {name}_image: the image to take the {control.type} from.")
        if not control.start < control.end:
            raise InputError(
                f"{name}_start={control.start} must be below {name}_end={control.end}: they bound the fraction of "
                "the steps the control guides."
            )
        if control.preprocess and control.type not in PREPROCESSED_TYPES:
            raise InputError(
                f"{name}={control.type} has no preprocessor in this image (there is one for "
                f"{', '.join(PREPROCESSED_TYPES)}): send a ready {control.type} map as {name}_image and set "
                f"{name}_preprocess=false."
            )
        loaded.append((slot, control, images.load_image(image, f"{name}_image")))
    return loaded


def fit_controls(loaded: list[tuple[int, ControlInput, Image.Image]], size: tuple[int, int]) -> tuple[Control, ...]:
    return tuple(
        Control(slot, c.type, images.fit(image, size), c.preprocess, c.conditioning_scale, c.start, c.end)
        for slot, c, image in loaded
    )


def load_image_prompt(image: Path | None, scale: float, files_from_client: bool) -> ImagePrompt | None:
    if files_from_client:
        image = uploads.client_file(image, "ip_adapter_image")
    if image is None:
        return None
    return ImagePrompt(images.load_image(image, "ip_adapter_image"), scale)
