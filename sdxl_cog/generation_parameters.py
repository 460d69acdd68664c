"""The generation parameters embedded in each image, in AUTOMATIC1111's words (its "infotext"), so that A1111, Forge
and every tool that reads their PNG Info can show how an image was made and make it again.

ControlNet controls and the image prompt are written as A1111's ControlNet extension writes its units
(sd-webui-controlnet's infotext.py: `ControlNet N: "Module: ..., Model: ..., Weight: ..., ..."`, one unit per
control, the IP-Adapter being a unit too), which its paste handler parses back into the units' fields.
"""

from __future__ import annotations

from sdxl_cog.checkpoints.checkpoint import Checkpoint
from sdxl_cog.control.models import ControlModels
from sdxl_cog.generation.schedulers import SCHEDULERS
from sdxl_cog.inputs.control import Control
from sdxl_cog.inputs.request import GenerationRequest, Refine
from sdxl_cog.weights.control_parts import IP_ADAPTERS

# The extension's module (preprocessor) names for the maps this image makes; a ready map is "none".
PREPROCESSOR_MODULES = {"canny": "canny", "depth": "depth_anything_v2", "tile": "tile_resample"}
# Every control image is fitted to the output size by covering it and cropping the centre: the extension's
# "Crop and Resize". Its "Balanced" control mode is diffusers' ControlNet as it is (prompt and control weighed equally).
RESIZE_MODE = "Crop and Resize"
CONTROL_MODE = "Balanced"
# The extension's module for each adapter script/download-weights bakes, by its file: the CLIP encoder it was trained
# with, as the extension's own IP-Adapter presets pair them (ControlNetUnit.parse refuses a bare "ip-adapter"). An
# adapter baked some other way gets the extension's "ip-adapter-auto", which picks the encoder from the model's name.
IP_ADAPTER_MODULES = {
    IP_ADAPTERS["bigg"].weight_name: "ip-adapter_clip_g",
    IP_ADAPTERS["vit-h"].weight_name: "ip-adapter_clip_h",
}


def a1111_fields(
    req: GenerationRequest,
    seed: int,
    lora: str | None,
    lora_scale: float,
    checkpoint: Checkpoint,
    control: ControlModels | None = None,
) -> dict[str, object]:
    """The `Key: value` pairs after the prompts, in A1111's order."""
    fields: dict[str, object] = {
        "Steps": req.num_inference_steps,
        "Sampler": SCHEDULERS[req.scheduler].a1111_name,
        "Schedule": req.scheduler,
        "CFG scale": req.guidance_scale,
        "Seed": seed,
        "Size": f"{req.width}x{req.height}",
    }
    # A1111's order: the hash, then the name.
    if checkpoint.entry.short_hash:
        fields["Model hash"] = checkpoint.entry.short_hash
    fields["Model"] = checkpoint.name
    if not req.refine.runs_base:
        # Only the refiner ran: its steps and strength are the generation's.
        fields.update({"Steps": req.refine_steps, "Denoising strength": req.refine_strength})
    elif req.image is not None:
        fields["Denoising strength"] = req.prompt_strength
    if req.refine.runs_refiner:
        fields["Refiner"] = req.refine.value
    if req.refine is Refine.EXPERT_ENSEMBLE:
        fields["Refiner switch at"] = req.high_noise_frac
    elif req.refine.refines_an_image:
        fields.update({"Refiner steps": req.refine_steps, "Refiner strength": req.refine_strength})
    if lora:
        fields.update({"Lora": lora.rstrip("/").rsplit("/", 1)[-1], "Lora scale": lora_scale})
    if control is not None:
        fields.update(control_units(req, control))
    return fields


def control_units(req: GenerationRequest, control: ControlModels) -> dict[str, str]:
    """`ControlNet N` for each control that ran, then the image prompt's unit."""
    active = tuple(c for c in req.controls if c.active)
    units = [_control_unit(c, net) for c, net in zip(active, control.serving(active) if active else [])]
    prompt = req.image_prompt
    if prompt is not None and prompt.active and control.ip_adapter is not None:
        weight_name = control.ip_adapter.entry.weight_name
        module, model = IP_ADAPTER_MODULES.get(weight_name, "ip-adapter-auto"), weight_name.removesuffix(".safetensors")
        units.append(_unit(Module=module, Model=model, Weight=prompt.scale, **{"Resize Mode": RESIZE_MODE}))
    return {f"ControlNet {i}": unit for i, unit in enumerate(units)}


def _control_unit(control: Control, net) -> str:
    module = PREPROCESSOR_MODULES[control.type] if control.preprocess else "none"
    extra = {"Union Control Type": control.type} if net.union else {}
    return _unit(
        Module=module,
        Model=net.entry.name,
        Weight=control.conditioning_scale,
        **{"Resize Mode": RESIZE_MODE, "Guidance Start": control.start, "Guidance End": control.end},
        **extra,
        **{"Control Mode": CONTROL_MODE},
    )


def _unit(**values: object) -> str:
    """One unit as the extension serializes it: `Field: value` pairs joined by ", " (its values hold neither)."""
    return ", ".join(f"{field}: {value}" for field, value in values.items())
