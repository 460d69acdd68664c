"""The Stable Diffusion safety checker. A flagged image is replaced by a black image of the same size,
never dropped, so a request always gets as many outputs as it asked for, and which ones were flagged
is reported per image.

The checker reads the decoded images where they are (uint8 tensors on the generation device): resize,
crop and normalization are done there, batched, the way the checkpoint's CLIPImageProcessor does them on
PIL images, instead of a round trip through PIL on the host.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker, cosine_distance
from transformers import CLIPImageProcessor


class SafetyChecker:
    def __init__(
        self, model: StableDiffusionSafetyChecker, processor: CLIPImageProcessor, device: str, dtype: torch.dtype
    ):
        self.model = model.to(device).eval()
        # Only its settings are used on the serving path (sizes, mean and std of the checkpoint).
        self.processor = processor
        self.device, self.dtype = device, dtype

    @classmethod
    def from_directory(cls, directory: Path, device: str, dtype: torch.dtype) -> SafetyChecker:
        model = StableDiffusionSafetyChecker.from_pretrained(directory, dtype=dtype, variant="fp16")
        return cls(model, CLIPImageProcessor.from_pretrained(directory), device, dtype)

    @torch.inference_mode()
    def clip_input(self, images: torch.Tensor) -> torch.Tensor:
        """(N, H, W, 3) uint8 RGB -> the model's (N, 3, 224, 224) input, as CLIPImageProcessor makes it."""
        p = self.processor
        height, width = images.shape[1:3]
        short = p.size["shortest_edge"]
        # transformers' get_resize_output_image_size: the short side to `short`, the long one truncated.
        scale = max(height, width) / min(height, width)
        size = (short, int(short * scale)) if height <= width else (int(short * scale), short)
        x = resize_like_pil(images.permute(0, 3, 1, 2), size)
        crop_h, crop_w = p.crop_size["height"], p.crop_size["width"]
        top, left = (size[0] - crop_h) // 2, (size[1] - crop_w) // 2
        x = x[:, :, top : top + crop_h, left : left + crop_w] * p.rescale_factor
        mean = torch.tensor(p.image_mean, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(p.image_std, device=x.device).view(1, 3, 1, 1)
        return ((x - mean) / std).to(self.device, self.dtype)

    @torch.inference_mode()
    def flags(self, images: torch.Tensor) -> list[bool]:
        """Per image, whether the checker flags it; `images` is (N, H, W, 3) uint8 RGB on any device."""
        # The model also blackens flagged entries of its `images` argument; we do our own, so it gets a
        # placeholder instead of copies of the pictures.
        _, has_nsfw = self.model(clip_input=self.clip_input(images), images=torch.zeros(len(images), 1))
        return [bool(flag) for flag in has_nsfw]

    @torch.inference_mode()
    def concept_scores(self, clip_input: torch.Tensor) -> torch.Tensor:
        """(N, 3 + 17) scores, special-care concepts first: cosine to the concept minus its threshold, before
        the model's +0.01 adjustment and rounding. An image is flagged when a (rounded) score exceeds 0."""
        model = self.model
        embeds = model.visual_projection(model.vision_model(clip_input)[1])
        special = cosine_distance(embeds, model.special_care_embeds) - model.special_care_embeds_weights
        concepts = cosine_distance(embeds, model.concept_embeds) - model.concept_embeds_weights
        return torch.cat([special, concepts], dim=1).float()


def resize_like_pil(images: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(N, 3, H, W) uint8 images resized to `size` with PIL's bicubic filter, as float32 in 0..255.

    On the CPU, torch's 8-bit antialiased kernel, a port of PIL's resampler (10x faster than the float
    passes below); elsewhere, where that kernel does not exist, the float version of the same passes."""
    if images.device.type == "cpu":
        return F.interpolate(images, size=size, mode="bicubic", antialias=True).float()
    return _resize_like_pil_in_float(images.float(), size)


def _resize_like_pil_in_float(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    # torch's antialiased bicubic is PIL's filter (a = -0.5, support widened when shrinking). PIL resizes
    # an 8-bit image in two 8-bit passes, horizontal then vertical, rounding and clipping after each.
    for pass_size in ((x.shape[-2], size[1]), size):
        x = F.interpolate(x, size=pass_size, mode="bicubic", antialias=True, align_corners=False)
        x = x.round_().clamp_(0, 255)
    return x


def blacken_flagged(images: torch.Tensor, flags: list[bool]) -> torch.Tensor:
    """(N, H, W, 3) images with the flagged ones replaced by black."""
    keep = torch.tensor([not f for f in flags], device=images.device).view(-1, 1, 1, 1)
    return images * keep
