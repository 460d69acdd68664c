"""The diffusers pipeline a request runs for each stage: built fresh around the loaded modules with the request's
own scheduler (and its ControlNets), so that nothing a request chooses is left on a shared object."""

from __future__ import annotations

import inspect

from diffusers import (
    DiffusionPipeline,
    StableDiffusionXLControlNetImg2ImgPipeline,
    StableDiffusionXLControlNetInpaintPipeline,
    StableDiffusionXLControlNetPipeline,
    StableDiffusionXLControlNetUnionImg2ImgPipeline,
    StableDiffusionXLControlNetUnionInpaintPipeline,
    StableDiffusionXLControlNetUnionPipeline,
    StableDiffusionXLImg2ImgPipeline,
    StableDiffusionXLInpaintPipeline,
    StableDiffusionXLPipeline,
)
from diffusers.models.controlnets import MultiControlNetModel, MultiControlNetUnionModel

from sdxl_cog.checkpoints.checkpoint import StageModel
from sdxl_cog.generation.schedulers import make_scheduler

# Which pipeline class runs each (stage, mode). The refiner never starts from noise, so its text-to-image runs
# are image-to-image on the base's latents.
PIPELINE_CLASSES: dict[tuple[str, str], type[DiffusionPipeline]] = {
    ("base", "txt2img"): StableDiffusionXLPipeline,
    ("base", "img2img"): StableDiffusionXLImg2ImgPipeline,
    ("base", "inpaint"): StableDiffusionXLInpaintPipeline,
    ("refiner", "txt2img"): StableDiffusionXLImg2ImgPipeline,
    ("refiner", "img2img"): StableDiffusionXLImg2ImgPipeline,
    ("refiner", "inpaint"): StableDiffusionXLInpaintPipeline,
}


class DenoisingEnd:
    """`denoising_end` for diffusers' ControlNet img2img pipelines, which (in 0.42) take none and swallow it: the
    expert ensemble's base stage stops at high_noise_frac, as the plain img2img pipeline's step 9.1 does: the
    timesteps at or past the cutoff are kept, the rest left to the refiner."""

    def __call__(self, *args, denoising_end: float | None = None, **kwargs):
        self._denoising_end_cut = denoising_end
        try:
            return super().__call__(*args, **kwargs)
        finally:
            self._denoising_end_cut = None

    def get_timesteps(self, num_inference_steps, strength, device):
        timesteps, steps = super().get_timesteps(num_inference_steps, strength, device)
        cut = getattr(self, "_denoising_end_cut", None)
        if cut is None:
            return timesteps, steps
        train_steps = self.scheduler.config.num_train_timesteps
        kept = int((timesteps >= int(round(train_steps - cut * train_steps))).sum())
        return timesteps[:kept], kept


class ControlNetImg2ImgPipeline(DenoisingEnd, StableDiffusionXLControlNetImg2ImgPipeline):
    pass


class ControlNetUnionImg2ImgPipeline(DenoisingEnd, StableDiffusionXLControlNetUnionImg2ImgPipeline):
    pass


# The base stage's pipeline per mode when ControlNets guide it, and when they are ControlNet-Union entries. The
# refiner takes no ControlNet (its UNet's conditioning differs from the base's).
CONTROL_PIPELINE_CLASSES: dict[tuple[bool, str], type[DiffusionPipeline]] = {
    (False, "txt2img"): StableDiffusionXLControlNetPipeline,
    (False, "img2img"): ControlNetImg2ImgPipeline,
    (False, "inpaint"): StableDiffusionXLControlNetInpaintPipeline,
    (True, "txt2img"): StableDiffusionXLControlNetUnionPipeline,
    (True, "img2img"): ControlNetUnionImg2ImgPipeline,
    (True, "inpaint"): StableDiffusionXLControlNetUnionInpaintPipeline,
}


def stage_pipeline(
    model: StageModel,
    mode: str,
    scheduler_name: str,
    controlnet: MultiControlNetModel | MultiControlNetUnionModel | None = None,
) -> DiffusionPipeline:
    """`model`'s pipeline for `mode`; with `controlnet`, the base stage's ControlNet pipeline around it."""
    if controlnet is None:
        cls = PIPELINE_CLASSES[(model.stage, mode)]
    else:
        cls = CONTROL_PIPELINE_CLASSES[(isinstance(controlnet, MultiControlNetUnionModel), mode)]
    accepted = inspect.signature(cls.__init__).parameters
    kwargs = {k: v for k, v in {**model.components, **model.options}.items() if k in accepted}
    if controlnet is not None:
        kwargs["controlnet"] = controlnet
    # The watermark is applied to finished images by the predictor, per request.
    pipe = cls(**kwargs, scheduler=make_scheduler(scheduler_name, model.scheduler_config), add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe
