"""One request's control, as the base stage's pipeline takes it: the ControlNets that serve its controls, their maps
(preprocessed here where the request asks), scales and step windows; and its image prompt's embeddings.

A control at conditioning scale 0, or an image prompt at scale 0, is not run at all: it would add nothing (a ControlNet
at scale 0 still costs a full pass in diffusers). A request whose controls are all at 0 runs the plain pipelines.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers import DiffusionPipeline
from diffusers.models.controlnets import MultiControlNetModel, MultiControlNetUnionModel
from PIL import Image

from sdxl_cog.control import preprocess
from sdxl_cog.control.models import ControlModels, ControlNet
from sdxl_cog.inputs.control import Control, ImagePrompt
from sdxl_cog.weights.control_types import UNION_CONTROL_MODES


@dataclass
class ControlPlan:
    controls: tuple[Control, ...]  # the active ones, in slot order
    nets: list[ControlNet]  # the one serving each control
    maps: list[Image.Image]  # each control's map, fitted to the output size

    @property
    def union(self) -> bool:
        return self.nets[0].union

    @property
    def slots(self) -> tuple[str, ...]:
        """The placement slots of the distinct ControlNets: what the base stage brings onto the device."""
        return tuple(dict.fromkeys(net.slot for net in self.nets))

    def controlnet(self) -> MultiControlNetModel | MultiControlNetUnionModel:
        """One entry per control, so that each has its own scale and step window (a union model serving several
        controls appears once per control: the same module, no second copy)."""
        modules = [net.module for net in self.nets]
        return MultiControlNetUnionModel(modules) if self.union else MultiControlNetModel(modules)

    def pipeline_kwargs(self, mode: str) -> dict:
        """The ControlNet arguments of the base stage's pipeline for `mode`. The control maps go in `image` for the
        ControlNet text-to-image pipeline and in `control_image` for every other one (diffusers' own naming)."""
        kwargs = {
            "controlnet_conditioning_scale": [c.conditioning_scale for c in self.controls],
            "control_guidance_start": [c.start for c in self.controls],
            "control_guidance_end": [c.end for c in self.controls],
        }
        if self.union:
            kwargs["control_mode"] = [UNION_CONTROL_MODES[c.type] for c in self.controls]
        image_key = "image" if mode == "txt2img" and not self.union else "control_image"
        return {**kwargs, image_key: list(self.maps)}


def plan_controls(models: ControlModels, controls: tuple[Control, ...]) -> ControlPlan | None:
    """The plan for the active controls (None when there is none), their maps not made yet."""
    active = tuple(control for control in controls if control.active)
    if not active:
        return None
    return ControlPlan(active, models.serving(active), [])


def make_maps(plan: ControlPlan, models: ControlModels) -> None:
    """Each control's map: the image itself when it is a ready map (or a tile), else its preprocessor's output."""
    plan.maps = [control_map(control, models) for control in plan.controls]


def control_map(control: Control, models: ControlModels) -> Image.Image:
    if not control.preprocess or control.type == "tile":
        return control.image
    if control.type == "canny":
        return preprocess.canny(control.image)
    depth = models.depth_estimator
    return preprocess.depth(depth.model, depth.processor, control.image)


def image_prompt_embeds(
    pipe: DiffusionPipeline, image_prompt: ImagePrompt | None, guided: bool, device: torch.device
) -> list[torch.Tensor]:
    """The IP-Adapter's image embeddings for `pipe`'s call: the image prompt's (negative zeros first under guidance,
    as diffusers makes them), or zeros for none, which at scale 0 leave the UNet's output as without the adapter."""
    if image_prompt is not None:
        return pipe.prepare_ip_adapter_image_embeds(image_prompt.image, None, device, 1, guided)
    encoder = pipe.image_encoder
    halves = 2 if guided else 1
    return [torch.zeros(halves, 1, encoder.config.projection_dim, dtype=encoder.dtype, device=device)]
