"""Our txt2img equals diffusers' own StableDiffusionXLPipeline built from the same modules and called with the
same inputs: the engine adds chunked prompts, per-request schedulers and placement, and changes no pixel."""

from __future__ import annotations

import numpy as np
import torch
from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

from sdxl_cog.service import OutputOptions
from tests.conftest import TEST_SIDE, TEST_STEPS, make_request, pixels

# Identical arithmetic on the same device: the images are expected to match exactly, bar the uint8 rounding of
# two separate float-to-byte conversions (at most 1 level, observed 0).
TOLERANCE = 1
RAW = OutputOptions(output_format="png", output_quality=80, apply_watermark=False, safety_check=False)


def test_txt2img_matches_the_stock_diffusers_pipeline(service):
    guidance_scale, negative_prompt = 5.0, "blurry, dark"
    request = dict(prompt="a red fox in the snow", negative_prompt=negative_prompt, seed=42, num_outputs=2)
    ours = service.predict(make_request(**request, guidance_scale=guidance_scale), RAW, None, 0.6)

    base = service.checkpoints.default.model
    stock = StableDiffusionXLPipeline(
        **base.components,
        scheduler=EulerDiscreteScheduler.from_config(base.scheduler_config),  # K_EULER, the default sampler
        **base.options,
        add_watermarker=False,
    )
    stock.set_progress_bar_config(disable=True)
    images = stock(
        prompt=request["prompt"],
        negative_prompt=negative_prompt or None,
        width=TEST_SIDE,
        height=TEST_SIDE,
        num_inference_steps=TEST_STEPS,
        guidance_scale=guidance_scale,
        num_images_per_prompt=2,
        generator=[torch.Generator("cpu").manual_seed(seed) for seed in (42, 43)],
    ).images

    for path, image in zip(ours.paths, images):
        assert pixels(path).shape == pixels(image).shape
        assert int(np.abs(pixels(path) - pixels(image)).max()) <= TOLERANCE
