"""The diffusers pipeline a request runs for each stage: built fresh around the loaded modules with the request's
own scheduler, so that nothing a request chooses is left on a shared object."""

from __future__ import annotations

import inspect

from diffusers import (
    DiffusionPipeline,
    StableDiffusionXLImg2ImgPipeline,
    StableDiffusionXLInpaintPipeline,
    StableDiffusionXLPipeline,
)

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


def stage_pipeline(model: StageModel, mode: str, scheduler_name: str) -> DiffusionPipeline:
    cls = PIPELINE_CLASSES[(model.stage, mode)]
    accepted = inspect.signature(cls.__init__).parameters
    kwargs = {k: v for k, v in {**model.components, **model.options}.items() if k in accepted}
    # The watermark is applied to finished images by the predictor, per request.
    pipe = cls(**kwargs, scheduler=make_scheduler(scheduler_name, model.scheduler_config), add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe
