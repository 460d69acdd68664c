"""From a prediction's raw inputs to a checked, fully resolved GenerationRequest.

No model is touched here, so every rule (sizes, seeds, step counts, modes) is tested in milliseconds and every
refusal happens before any GPU work. Not pure all the same: build_request reads the image and mask files and
draws a random seed when none is given; the rules it applies (check_side, resolve_seeds' arithmetic,
base_image_refiner_schedule, ...) are plain functions of their arguments.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path

from PIL import Image

from sdxl_cog.config import MAX_SEED, MAX_SIDE, MIN_SIDE, SIDE_MULTIPLE
from sdxl_cog.errors import InputError
from sdxl_cog.inputs import images, uploads
from sdxl_cog.inputs.control import (
    Control,
    ControlInput,
    ImagePrompt,
    ServedControls,
    check_controls,
    check_image_prompt,
    fit_controls,
    load_controls,
    load_image_prompt,
)
from sdxl_cog.weights.profiles import DEFAULT_PROFILE, Profile


class Refine(StrEnum):
    """The refine modes (predict.py's `refine` choices), and what each one runs."""

    NONE = "no_refiner"
    # The base denoises the first high_noise_frac of the steps, the refiner the rest (SDXL's "ensemble of
    # expert denoisers").
    EXPERT_ENSEMBLE = "expert_ensemble_refiner"
    # The base makes an image, then the refiner runs img2img on it: refine_steps at refine_strength.
    BASE_IMAGE = "base_image_refiner"
    # The refiner alone, img2img on the user's own image: no base, no prompt_strength.
    REFINER_ONLY = "refiner_only"

    @property
    def runs_base(self) -> bool:
        return self is not Refine.REFINER_ONLY

    @property
    def runs_refiner(self) -> bool:
        return self is not Refine.NONE

    @property
    def refines_an_image(self) -> bool:
        """The refiner runs img2img on a finished image, with refine_steps and refine_strength."""
        return self in (Refine.BASE_IMAGE, Refine.REFINER_ONLY)


REFINE_MODES = [mode.value for mode in Refine]


@dataclass(frozen=True)
class GenerationRequest:
    prompt: str
    negative_prompt: str
    mode: str  # txt2img, img2img or inpaint
    width: int
    height: int
    seeds: tuple[int, ...]  # one per output: image i is generated from seeds[i] alone
    scheduler: str
    num_inference_steps: int
    guidance_scale: float
    prompt_strength: float
    refine: Refine
    high_noise_frac: float
    refine_steps: int
    refine_strength: float
    image: Image.Image | None = None  # the source, already fitted to width x height
    mask: Image.Image | None = None  # binary, fitted like the image; white is repainted
    model: str | None = None  # the checkpoint's name (checkpoints.registry.Checkpoints.resolve); None: the default
    controls: tuple[Control, ...] = ()  # ControlNet controls, in the order of their controlnet_N inputs
    image_prompt: ImagePrompt | None = None  # the IP-Adapter's image prompt
    # The inputs the request left out and the checkpoint's profile supplied, with their values.
    profile_defaults: dict = field(default_factory=dict)

    @property
    def num_outputs(self) -> int:
        return len(self.seeds)


def check_side(name: str, value: int) -> None:
    """Sides must be multiples of 8 (the VAE's factor); the message names the nearest valid values."""
    if value % SIDE_MULTIPLE:
        below = max(MIN_SIDE, value - value % SIDE_MULTIPLE)
        above = min(MAX_SIDE, below + SIDE_MULTIPLE)
        raise InputError(f"{name}={value} is not a multiple of {SIDE_MULTIPLE}; use {below} or {above}.")


def resolve_seeds(seed: int | None, num_outputs: int) -> tuple[int, ...]:
    """No seed means a random 32-bit one. Image i uses seed + i, so any image can be regenerated alone."""
    if seed is None:
        seed = secrets.randbelow(MAX_SEED + 1)
    return tuple(seed + i for i in range(num_outputs))


def base_image_refiner_schedule(refine_steps: int, strength: float) -> int:
    """The num_inference_steps that makes an img2img run of `strength` take exactly `refine_steps` steps.

    diffusers runs int(num_inference_steps * strength) of them; the smallest total that yields
    refine_steps is ceil(refine_steps / strength), nudged past floating-point rounding.
    """
    total = math.ceil(refine_steps / strength - 1e-9)
    while int(total * strength) < refine_steps:
        total += 1
    return total


def default_refine_steps(num_inference_steps: int, refine_strength: float) -> int:
    # The work cog-sdxl's base_image_refiner really did by default (its hidden strength times steps).
    return max(1, int(num_inference_steps * refine_strength))


def _source_images(
    image: Path | None,
    mask: Path | None,
    width: int | None,
    height: int | None,
    side: int = DEFAULT_PROFILE.side,
    sizing: Image.Image | None = None,
) -> tuple[str, Image.Image | None, Image.Image | None, int, int]:
    """The mode, the fitted source and mask, and the output size. Without a source, `sizing` (the first control
    image) sets the sides left out as a source would, or the profile's side does."""
    if image is None:
        if mask is not None:
            raise InputError("mask was given without image: inpainting needs the image to paint into.")
        if sizing is not None and (width is None or height is None):
            return "txt2img", None, None, *images.size_from_image(sizing.size, width, height)
        return "txt2img", None, None, width or side, height or side
    source = images.load_image(image, "image")
    out_w, out_h = images.size_from_image(source.size, width, height)
    if mask is None:
        return "img2img", images.fit(source, (out_w, out_h)), None, out_w, out_h
    binary = images.load_mask(mask, source.size)
    fitted_mask = images.binarize(images.fit(binary, (out_w, out_h), Image.NEAREST))
    images.check_mask_has_work(fitted_mask)
    return "inpaint", images.fit(source, (out_w, out_h)), fitted_mask, out_w, out_h


def _check_prompt_strength(num_inference_steps: int, prompt_strength: float) -> None:
    if prompt_strength <= 0.0:
        raise InputError("prompt_strength must be above 0 with an input image (0 would return the image unchanged).")
    if int(num_inference_steps * prompt_strength) < 1:
        minimum = base_image_refiner_schedule(1, prompt_strength)
        raise InputError(
            f"num_inference_steps={num_inference_steps} at prompt_strength={prompt_strength} leaves no denoising step "
            f"(img2img runs int(steps x strength)); use num_inference_steps >= {minimum} or a higher prompt_strength."
        )


def build_request(
    *,
    prompt: str,
    negative_prompt: str,
    image: Path | None,
    mask: Path | None,
    width: int | None,
    height: int | None,
    num_outputs: int,
    scheduler: str,
    num_inference_steps: int | None,
    guidance_scale: float | None,
    prompt_strength: float,
    seed: int | None,
    refine: str,
    high_noise_frac: float,
    refine_steps: int | None,
    refine_strength: float,
    model: str | None = None,
    controls: Sequence[ControlInput] = (),
    ip_adapter_image: Path | None = None,
    ip_adapter_scale: float = 0.0,
    profile: Profile = DEFAULT_PROFILE,
    control_models: ServedControls | None = None,
    files_from_client: bool = True,
) -> GenerationRequest:
    """`profile`: the chosen checkpoint's defaults (profiles.py), for the inputs left out (None).
    `control_models`: what the server serves, so that a control or image prompt it lacks is refused before any image
    is read; None leaves that to the engine (SDXLService.predict checks again).
    `files_from_client`: the files came over HTTP, so only files Cog downloaded for this request are read
    (uploads.py); False for callers that pass their own local files (tests, benchmarks).

    Every refusal that reads no image comes first: a control image or image prompt may be 50 MP to decode."""
    # 1. The checks that read no image.
    if files_from_client:
        image, mask = uploads.client_file(image, "image"), uploads.client_file(mask, "mask")
    checked_controls = check_controls(controls, files_from_client)
    image_prompt_file = check_image_prompt(ip_adapter_image, ip_adapter_scale, files_from_client)
    if control_models is not None:
        control_models.check(checked_controls, image_prompt_file is not None)
    given = {"num_inference_steps": num_inference_steps, "guidance_scale": guidance_scale}
    if image is None and not checked_controls:
        given.update(width=width, height=height)  # with an image, the size follows the image instead
    profile_defaults = {k: v for k, v in profile.defaults().items() if k in given and given[k] is None}
    num_inference_steps = profile_defaults.get("num_inference_steps", num_inference_steps)
    guidance_scale = profile_defaults.get("guidance_scale", guidance_scale)
    for name, side in (("width", width), ("height", height)):
        if side is not None:
            check_side(name, side)
    refine = Refine(refine)
    if refine is Refine.EXPERT_ENSEMBLE and not 0.0 < high_noise_frac < 1.0:
        raise InputError(
            f"high_noise_frac={high_noise_frac} must be strictly between 0 and 1 for expert_ensemble_refiner."
        )
    if not refine.runs_base and (checked_controls or image_prompt_file is not None):
        raise InputError(
            "refine=refiner_only runs the refiner alone, which takes no ControlNet control or image prompt (they "
            "guide the base model): drop them, or choose another refine mode."
        )
    if not refine.runs_base and image is None:
        raise InputError(
            "refine=refiner_only refines an existing image, but no image was given: pass image (and optionally "
            "mask to refine only its white areas), or choose another refine mode to generate one."
        )
    # refiner_only never runs the base, so prompt_strength (the base's img2img strength) plays no part.
    if image is not None and refine.runs_base:
        _check_prompt_strength(num_inference_steps, prompt_strength)
    # 2. The images.
    loaded_controls = load_controls(checked_controls)
    sizing = loaded_controls[0][1] if loaded_controls else None  # the first control image sizes a txt2img request
    mode, source, fitted_mask, out_w, out_h = _source_images(image, mask, width, height, profile.side, sizing)
    return GenerationRequest(
        prompt=prompt,
        negative_prompt=negative_prompt,
        mode=mode,
        width=out_w,
        height=out_h,
        seeds=resolve_seeds(seed, num_outputs),
        scheduler=scheduler,
        num_inference_steps=num_inference_steps,
        guidance_scale=guidance_scale,
        prompt_strength=prompt_strength,
        refine=refine,
        high_noise_frac=high_noise_frac,
        refine_steps=refine_steps or default_refine_steps(num_inference_steps, refine_strength),
        refine_strength=refine_strength,
        image=source,
        mask=fitted_mask,
        model=model,
        controls=fit_controls(loaded_controls, (out_w, out_h)),
        image_prompt=load_image_prompt(image_prompt_file, ip_adapter_scale),
        profile_defaults=profile_defaults,
    )
