"""A request's control inputs, checked before any work: up to three ControlNet controls (predict.py's controlnet_N
inputs) and an image prompt for the IP-Adapter.

Whether the models they need are baked is checked by ControlModels.check (control/models.py), which knows what is
loaded: in build_request when predict.py hands it the server's, and again by the engine; here only what the inputs
say is checked, so every refusal names the input to change. A control or an image prompt
at scale 0 changes nothing, so after its input checks it is dropped: its image is never read, it sizes nothing and
needs no model. No image is decoded before every refusal that needs none (request.py): a control image may be 50 MP.

Sizes: every control image is fitted to the output size as `image` is (scaled to cover it, centre-cropped, no
stretching). Without `image`, when width and height are left out, the first control that runs sets the output size
as `image` would (its aspect ratio, at most 2048 a side): a control map is usually made from a picture of the
composition wanted.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from PIL import Image, ImageOps

from sdxl_cog.errors import InputError
from sdxl_cog.inputs import images, uploads
from sdxl_cog.weights.control_types import CONTROL_TYPES

NO_CONTROL = "none"
MAX_CONTROLS = 3  # predict.py's controlnet_1 to controlnet_3
# Types with a preprocessor in the container (control/preprocess.py); tile's map is the image itself.
PREPROCESSED_TYPES = ("canny", "depth", "tile")
# The image prompt is kept at most this big a side for the prediction: the image encoder's processor shrinks it to
# 224 px (CLIP's input) anyway, so a 50 MP upload would hold 150 MB for nothing; 1024 px (3 MB) stays well above
# what the processor keeps, so its own resize still starts from ample detail.
IMAGE_PROMPT_MAX_SIDE = 1024


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
class CheckedControl:
    """A control that runs (scale above 0) whose inputs passed every check that needs no image; its file is not read
    yet. Has what ControlModels.check asks of a control (slot, type, preprocess), so that a model the image lacks is
    refused before any image is decoded."""

    slot: int
    inputs: ControlInput
    file: Path

    @property
    def type(self) -> str:
        return self.inputs.type

    @property
    def preprocess(self) -> bool:
        return self.inputs.preprocess


class ServedControls(Protocol):
    """What the server serves (control/models.py's ControlModels), as build_request asks it: named by its one method
    here, since the models' module sits above the inputs and imports torch."""

    def check(self, controls: Sequence[CheckedControl], image_prompt: bool) -> None:
        """Raise InputError for a control or an image prompt whose model the server lacks."""


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
    image: Image.Image  # as sent, at most IMAGE_PROMPT_MAX_SIDE a side: the encoder's processor resizes and crops it
    scale: float

    @property
    def active(self) -> bool:
        return self.scale > 0


def check_controls(controls: Sequence[ControlInput], files_from_client: bool) -> list[CheckedControl]:
    """Each control that runs, after the checks that need no image; one at scale 0 is checked, then dropped."""
    checked = []
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
        if control.conditioning_scale > 0:
            checked.append(CheckedControl(slot, control, image))
    return checked


def load_controls(checked: list[CheckedControl]) -> list[tuple[CheckedControl, Image.Image]]:
    return [(c, images.load_image(c.file, f"controlnet_{c.slot}_image")) for c in checked]


def fit_controls(loaded: list[tuple[CheckedControl, Image.Image]], size: tuple[int, int]) -> tuple[Control, ...]:
    fitted = []
    for checked, image in loaded:
        c = checked.inputs
        fitted.append(
            Control(checked.slot, c.type, images.fit(image, size), c.preprocess, c.conditioning_scale, c.start, c.end)
        )
    return tuple(fitted)


def check_image_prompt(image: Path | None, scale: float, files_from_client: bool) -> Path | None:
    """The image prompt's file if it is used: None without one or at scale 0."""
    if files_from_client:
        image = uploads.client_file(image, "ip_adapter_image")
    return image if scale > 0 else None


def load_image_prompt(image: Path | None, scale: float) -> ImagePrompt | None:
    if image is None:
        return None
    loaded = images.load_image(image, "ip_adapter_image")
    if max(loaded.size) > IMAGE_PROMPT_MAX_SIDE:
        loaded = ImageOps.contain(loaded, (IMAGE_PROMPT_MAX_SIDE, IMAGE_PROMPT_MAX_SIDE), Image.LANCZOS)
    return ImagePrompt(loaded, scale)
