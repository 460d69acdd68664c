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


def _guided_steps(start: float, end: float, n: int) -> list[int]:
    """The steps out of `n` that diffusers' ControlNet pipelines guide for a (start, end) window (their 7.1)."""
    return [i for i in range(n) if not (i / n < start or (i + 1) / n > end)]


def window_over_kept_steps(start: float, end: float, total: int, kept: int) -> tuple[float, float]:
    """The window that guides, out of the first `kept` of `total` steps, the steps (start, end) guides out of all
    `total`: txt2img's and inpainting's meaning, where diffusers builds the window before the denoising_end cut."""
    guided = [i for i in _guided_steps(start, end, total) if i < kept]
    if not guided:  # none of the kept steps: a window diffusers accepts (start < end) that selects none of them
        return (kept - 0.5) / kept, 1.0
    return guided[0] / kept, (guided[-1] + 1) / kept


class DenoisingEnd:
    """`denoising_end` for diffusers' ControlNet img2img pipelines, which (in 0.42) take none and swallow it: the
    expert ensemble's base stage stops at high_noise_frac, as the plain img2img pipeline's step 9.1 does: the
    timesteps at or past the cutoff are kept, the rest left to the refiner.

    These pipelines build the ControlNet window (control_guidance_start/end) over the timesteps get_timesteps
    returns, which here are the kept ones only, whereas the txt2img and inpaint ControlNet pipelines build it over
    every step after strength and cut afterwards. So with a cut the window is restated over the kept steps, so
    that start and end stay fractions of the whole schedule in every mode."""

    def __call__(self, *args, denoising_end: float | None = None, **kwargs):
        self._denoising_end_cut = denoising_end
        try:
            if denoising_end is not None:
                kwargs.update(self._window_over_kept_steps(**kwargs))
            return super().__call__(*args, **kwargs)
        finally:
            self._denoising_end_cut = None

    def get_timesteps(self, num_inference_steps, strength, device):
        timesteps, steps = super().get_timesteps(num_inference_steps, strength, device)
        cut = getattr(self, "_denoising_end_cut", None)
        if cut is None:
            return timesteps, steps
        kept = self._kept(timesteps, cut)
        return timesteps[:kept], kept

    def _kept(self, timesteps, cut: float) -> int:
        train_steps = self.scheduler.config.num_train_timesteps
        return int((timesteps >= int(round(train_steps - cut * train_steps))).sum())

    def _window_over_kept_steps(
        self, num_inference_steps, strength, control_guidance_start, control_guidance_end, **_
    ) -> dict:
        """The call's ControlNet windows restated over the steps the cut keeps (generate and the ControlPlan pass
        steps, strength and one window per control as lists, by name). The schedule is worked out as the pipeline's
        step 5 does; the pipeline sets it again itself."""
        self.scheduler.set_timesteps(num_inference_steps)
        timesteps, _ = super().get_timesteps(num_inference_steps, strength, None)
        total, kept = len(timesteps), self._kept(timesteps, self._denoising_end_cut)
        if kept == 0:  # the base runs no step: nothing to guide
            return {}
        windows = [
            window_over_kept_steps(s, e, total, kept) for s, e in zip(control_guidance_start, control_guidance_end)
        ]
        return {"control_guidance_start": [s for s, _ in windows], "control_guidance_end": [e for _, e in windows]}


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
