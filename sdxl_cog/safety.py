"""The Stable Diffusion safety checker. A flagged image is replaced by a black image of the same size,
never dropped, so a request always gets as many outputs as it asked for, and which ones were flagged
is reported per image."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
from PIL import Image
from transformers import CLIPImageProcessor


class SafetyChecker:
    def __init__(self, directory: Path, device: str, dtype: torch.dtype):
        self.model = (
            StableDiffusionSafetyChecker.from_pretrained(directory, dtype=dtype, variant="fp16").to(device).eval()
        )
        self.processor = CLIPImageProcessor.from_pretrained(directory)
        self.device, self.dtype = device, dtype

    @torch.inference_mode()
    def flags(self, images: list[Image.Image]) -> list[bool]:
        pixels = self.processor(images, return_tensors="pt").pixel_values.to(self.device, self.dtype)
        arrays = np.stack([np.asarray(img, dtype=np.float32) / 255.0 for img in images])
        _, has_nsfw = self.model(clip_input=pixels, images=arrays)
        return [bool(flag) for flag in has_nsfw]


def blacken_flagged(images: list[Image.Image], flags: list[bool]) -> list[Image.Image]:
    return [Image.new("RGB", img.size) if flagged else img for img, flagged in zip(images, flags)]
