"""Running one GenerationRequest: encode prompts, denoise with the base, optionally refine, then per image
decode, paste back, safety-check, watermark and hand over for encoding. Each phase is timed; each denoising
step logs one line.

After the last denoising step the images stay uint8 tensors on the generation device until each is handed
over (one device-to-host copy per image). Each image is finished (sdxl_cog/finishing/finisher.py) and encoded by the
caller's sink while the next one decodes."""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field

import numpy as np
import torch
from diffusers import AutoencoderKL, DiffusionPipeline
from diffusers.image_processor import VaeImageProcessor

from sdxl_cog.checkpoints.checkpoint import StageModel
from sdxl_cog.checkpoints.loading import LoadedWeights
from sdxl_cog.control.plan import image_prompt_embeds, make_maps, plan_controls
from sdxl_cog.device.placement import Placement
from sdxl_cog.device.timing import PhaseTimer
from sdxl_cog.finishing.finisher import Finisher, ImageSink, RowSink
from sdxl_cog.finishing.safety import SafetyChecker
from sdxl_cog.generation.pipelines import stage_pipeline
from sdxl_cog.generation.prompts import PromptEmbeddings, encode_prompts
from sdxl_cog.inputs import images
from sdxl_cog.inputs.request import GenerationRequest, Refine, base_image_refiner_schedule


@dataclass
class GenerationResult:
    images: list[np.ndarray]  # (H, W, 3) uint8 RGB, as handed to the sink
    nsfw_flags: list[bool]
    timings: dict[str, float] = field(default_factory=dict)
    steps: dict[str, int] = field(default_factory=dict)


class Run(PhaseTimer):
    """Book-keeping for one request: phase timings and the steps each stage really ran."""

    def __init__(self, device: str):
        super().__init__(device)
        self.steps: dict[str, int] = {}

    def step_logger(self, stage: str):
        """A callback_on_step_end that prints one clean line per step (no tqdm carriage returns)."""
        self.steps[stage] = 0

        def on_step_end(pipe, step, timestep, callback_kwargs):
            self.steps[stage] += 1
            print(f"{stage}: step {self.steps[stage]}/{pipe.num_timesteps} (t={int(timestep)})", flush=True)
            return callback_kwargs

        return on_step_end


def has_image_prompt_adapter(model: StageModel) -> bool:
    """Whether an IP-Adapter is loaded into the stage's UNet: then every call passes image embeddings."""
    return model.components.get("image_encoder") is not None


def _generators(seeds: tuple[int, ...]) -> list[torch.Generator]:
    # CPU generators: the same seed gives the same starting noise on any GPU model, or on none.
    return [torch.Generator("cpu").manual_seed(s) for s in seeds]


def _encode(model: StageModel, req: GenerationRequest) -> PromptEmbeddings:
    pairs = model.text_encoders()
    return encode_prompts(
        [t for t, _ in pairs],
        [e for _, e in pairs],
        req.prompt,
        req.negative_prompt,
        zero_empty_negative=model.options.get("force_zeros_for_empty_prompt", False),
    )


def _source_kwargs(req: GenerationRequest) -> dict:
    kwargs = {"image": req.image} if req.image is not None else {}
    if req.mask is not None:
        kwargs["mask_image"] = req.mask
    return kwargs


def _base_kwargs(req: GenerationRequest) -> dict:
    kwargs = {"num_inference_steps": req.num_inference_steps, "width": req.width, "height": req.height}
    if req.image is not None:
        kwargs.update(_source_kwargs(req), strength=req.prompt_strength)
    if req.refine is Refine.EXPERT_ENSEMBLE:
        kwargs["denoising_end"] = req.high_noise_frac
    return kwargs


def _refiner_kwargs(req: GenerationRequest, latents: torch.Tensor | None) -> dict:
    # The refiner's image input is the base's latents (diffusers detects 4-channel input as latents), or
    # with refiner_only the user's own image, which the pipeline encodes with the shared VAE.
    kwargs = {"image": req.image if latents is None else latents}
    if req.mask is not None:
        # The inpaint pipeline sizes its mask from width/height, not from the latents it is given.
        kwargs.update(mask_image=req.mask, width=req.width, height=req.height)
    if req.refine is Refine.EXPERT_ENSEMBLE:
        return {**kwargs, "num_inference_steps": req.num_inference_steps, "denoising_start": req.high_noise_frac}
    total = base_image_refiner_schedule(req.refine_steps, req.refine_strength)
    return {**kwargs, "num_inference_steps": total, "strength": req.refine_strength}


def _denoise(
    run: Run,
    placement: Placement,
    pipe: DiffusionPipeline,
    stage: str,
    req: GenerationRequest,
    generators,
    embeds,
    stage_kwargs,
    devices: tuple[str, ...] = (),
) -> torch.Tensor:
    """The stage's denoising, to latents; `devices`: the placement slots it needs beside its own (ControlNets)."""
    with run.phase(f"{stage}_denoise"):
        placement.use(stage, devices)
        return pipe(
            **embeds.as_pipeline_kwargs(),
            **stage_kwargs,
            guidance_scale=req.guidance_scale,
            generator=generators,
            num_images_per_prompt=req.num_outputs,
            output_type="latent",
            callback_on_step_end=run.step_logger(stage),
        ).images


@contextmanager
def image_prompt_scale(pipe: DiffusionPipeline, req: GenerationRequest):
    """The IP-Adapter's scale for this request, in the UNet's attention processors (shared by every request on that
    UNet), back to 0 afterwards whatever happens."""
    pipe.set_ip_adapter_scale(req.image_prompt.scale if req.image_prompt is not None else 0.0)
    try:
        yield
    finally:
        pipe.set_ip_adapter_scale(0.0)


def _base_stage(
    run: Run, weights: LoadedWeights, base: StageModel, req: GenerationRequest, generators, embeds
) -> torch.Tensor:
    """The base's denoising, with the request's ControlNets and image prompt: control maps and image embeddings are
    made first, each in a phase of its own (low-VRAM mode brings their models for that phase alone)."""
    placement, control = weights.placement, weights.control
    plan = plan_controls(control, req.controls)
    if plan is not None:
        with run.phase("control_preprocess"):
            placement.use("control_preprocess")
            make_maps(plan, control)
    pipe = stage_pipeline(base, req.mode, req.scheduler, plan.controlnet() if plan is not None else None)
    kwargs = _base_kwargs(req) | (plan.pipeline_kwargs(req.mode) if plan is not None else {})
    adapter = has_image_prompt_adapter(base)
    if adapter:
        guided = req.guidance_scale > 1 and base.components["unet"].config.time_cond_proj_dim is None
        prompt = req.image_prompt if req.image_prompt is not None and req.image_prompt.active else None
        # Without an image prompt the embeddings are zeros: no phase, no image encoder on the device.
        with run.phase("image_prompt_encoding") if prompt is not None else nullcontext():
            if prompt is not None:
                placement.use("image_prompt")
            kwargs["ip_adapter_image_embeds"] = image_prompt_embeds(pipe, prompt, guided, pipe.device)
    with image_prompt_scale(pipe, req) if adapter else nullcontext():
        return _denoise(run, placement, pipe, "base", req, generators, embeds, kwargs, plan.slots if plan else ())


def to_uint8(sample: torch.Tensor) -> torch.Tensor:
    """A decoded (N, 3, H, W) sample in [-1, 1] as (N, H, W, 3) uint8, on its device.

    The exact arithmetic of diffusers' VaeImageProcessor.postprocess(output_type="pil"): denormalize in the
    sample's dtype, then float32 * 255 rounded half to even, so the bytes equal the PIL path's.
    """
    pixels = (VaeImageProcessor.denormalize(sample).float() * 255).round_().to(torch.uint8)
    return pixels.permute(0, 2, 3, 1).contiguous()


@torch.inference_mode()
def _decode(vae: AutoencoderKL, latent: torch.Tensor) -> torch.Tensor:
    """One latent to a (1, H, W, 3) uint8 image: a batch of four 1024px decodes would need several GB of
    activations at once.

    No fp32 upcast: the VAE is madebyollin's fp16-fix, which does not overflow in half precision.
    """
    return to_uint8(vae.decode(latent[None].to(vae.dtype) / vae.config.scaling_factor).sample)


def generate(
    weights: LoadedWeights,
    base: StageModel,
    req: GenerationRequest,
    device: str,
    safety_check: bool,
    watermark: bool,
    sink: ImageSink | None = None,
    rows: RowSink | None = None,
) -> GenerationResult:
    run = Run(device)
    generators = _generators(req.seeds)
    refining, running_base = req.refine.runs_refiner, req.refine.runs_base

    # Each phase first puts its modules on the device (a no-op unless in low-VRAM mode), so that its
    # time includes the copies it waited for.

    # 1. Encode prompts (the refiner sees only its own text encoder).
    placement, refiner = weights.placement, weights.refiner
    with run.phase("text_encoding"):
        placement.use("text_encoding")
        base_embeds = _encode(base, req) if running_base else None
        refiner_embeds = _encode(refiner, req) if refining else None

    # 2. Base denoising, with the request's controls, to latents; 3. refining them, without.
    latents = None
    if running_base:
        latents = _base_stage(run, weights, base, req, generators, base_embeds)
    if refining:
        pipe = stage_pipeline(refiner, req.mode, req.scheduler)
        latents = _denoise(
            run, placement, pipe, "refiner", req, generators, refiner_embeds, _refiner_kwargs(req, latents)
        )

    # 4. Per image: decode, paste back, safety check, watermark, hand over (see finish_images).
    with run.phase("vae_decode"):
        placement.use("vae_decode_and_safety_check" if safety_check else "vae_decode")
    kept = images.kept_region(req.image, req.mask, device) if req.mask is not None else None
    checker = weights.safety_checker if safety_check else None
    vae = base.components["vae"]
    finished, flags = finish_images(run, vae, latents, kept, checker, watermark, sink, rows)
    return GenerationResult(finished, flags, run.timings, run.steps)


def finish_images(
    run: Run,
    vae: AutoencoderKL,
    latents: torch.Tensor,
    kept: tuple[torch.Tensor, torch.Tensor] | None,
    checker: SafetyChecker | None,
    watermark: bool,
    sink: ImageSink | None,
    rows: RowSink | None = None,
) -> tuple[list[np.ndarray], list[bool]]:
    """From latents to host images, one image at a time: decode and restore the kept region of an inpainted
    image exactly here, then hand it to the Finisher (safety check, watermark, copy to the host, sink) and go
    on to the next decode. A flagged image becomes black, never disappears."""
    with Finisher(run, checker, watermark, sink, rows) as finisher:
        for index, latent in enumerate(latents):
            with run.phase("vae_decode"):
                pixels = _decode(vae, latent)
            if kept is not None:
                pixels = images.paste_back(pixels, *kept)
            finisher.submit(index, pixels)
        return finisher.results()
