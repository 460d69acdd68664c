"""GPU memory: refusing requests that cannot fit before any work starts, recovering from an out-of-memory error
inside a prediction so that the worker lives on and the next request succeeds, and reporting each prediction's
peak in its metrics (as docker-diffusers-api's `$mem_usage`), so that an operator sees how close each request
came to the card's limit.

The activation figures are upper estimates for SDXL in fp16 with PyTorch's SDPA attention: UNet
activations grow with the batch (doubled by classifier-free guidance) and the latent area; the VAE
decoder's peak grows with one image's area (images are decoded one at a time). Estimates err on the
side of letting a request run: a miss is still caught as an out-of-memory error and reported.
"""

from __future__ import annotations

import gc
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from sdxl_cog.config import (
    CONTROLNET_ACTIVATION_BYTES_PER_MEGAPIXEL,
    CROSS_ATTENTION_BYTES_PER_CHUNK_PER_MEGAPIXEL,
    GIB,
    MEGAPIXEL,
    PROMPT_CHUNK_TOKENS,
    REFERENCE_REQUEST,
    RESERVE_BYTES,
    TEXT_ENCODER_BYTES_PER_CHUNK,
    UNET_ACTIVATION_BYTES_PER_MEGAPIXEL,
    VAE_DECODE_BYTES_PER_MEGAPIXEL,
)
from sdxl_cog.errors import InputError
from sdxl_cog.inputs.request import GenerationRequest, Refine


def activation_bytes(width: int, height: int, num_outputs: int) -> int:
    """UNet activations for the batch plus the peak of one VAE decode, over the weights."""
    megapixels = width * height / MEGAPIXEL
    return int(
        UNET_ACTIVATION_BYTES_PER_MEGAPIXEL * megapixels * num_outputs + VAE_DECODE_BYTES_PER_MEGAPIXEL * megapixels
    )


def prompt_chunks(prompt_tokens: int) -> int:
    return max(1, math.ceil(prompt_tokens / PROMPT_CHUNK_TOKENS))


def prompt_bytes(prompt_tokens: int, width: int, height: int, num_outputs: int) -> int:
    """What a prompt longer than one chunk adds (both prompts are padded to the longer one's chunks)."""
    extra = prompt_chunks(prompt_tokens) - 1
    per_chunk = 2 * TEXT_ENCODER_BYTES_PER_CHUNK + int(
        CROSS_ATTENTION_BYTES_PER_CHUNK_PER_MEGAPIXEL * width * height / MEGAPIXEL * num_outputs
    )
    return extra * per_chunk


def control_bytes(req: GenerationRequest) -> int:
    """What the ControlNets a request runs add: each one's activations for every image."""
    controls = sum(1 for control in req.controls if control.active)
    megapixels = req.width * req.height / MEGAPIXEL
    return int(CONTROLNET_ACTIVATION_BYTES_PER_MEGAPIXEL * megapixels * req.num_outputs * controls)


def needs_low_vram(capacity_bytes: int | None, weights_bytes: int) -> bool:
    """True when all the weights plus the reference request would not fit the GPU: below about 19.75 GiB for SDXL in
    fp16 (11.25 GiB of weights + 1.5 reserve + 7 of activations). Every baked control model counts: about 2.33 GiB
    per ControlNet, 1.83 for the IP-Adapter with ViT-H (4.09 with ViT-bigG), 0.05 for the depth estimator (fp16
    parameter counts of the published configs; estimates, no GPU measured). So a 24 GB card (about 22.5 GiB usable
    on an L4 or A10G, 23.6 on an RTX 4090) stays resident with no control model, one ControlNet (22.1) or the ViT-H
    IP-Adapter (21.6), and runs every request in low-VRAM mode with two ControlNets (24.4), a ControlNet and the
    IP-Adapter (23.9) or the ViT-bigG IP-Adapter (23.8); tests/test_placement.py checks these."""
    if capacity_bytes is None:
        return False
    return weights_bytes + RESERVE_BYTES + activation_bytes(**REFERENCE_REQUEST) > capacity_bytes


@dataclass(frozen=True)
class MemoryBudget:
    capacity_bytes: int | None  # None: no known limit (CPU), nothing is refused up front
    resident_bytes: int  # the most weights on the device at once (all of them, or one stage's in low-VRAM mode)

    def estimate(self, req: GenerationRequest, prompt_tokens: int = 0) -> int:
        return (
            self.resident_bytes
            + RESERVE_BYTES
            + activation_bytes(req.width, req.height, req.num_outputs)
            + prompt_bytes(prompt_tokens, req.width, req.height, req.num_outputs)
            + control_bytes(req)
        )

    def check(self, req: GenerationRequest, prompt_tokens: int = 0) -> None:
        if self.capacity_bytes is None:
            return
        needed = self.estimate(req, prompt_tokens)
        if needed > self.capacity_bytes:
            raise InputError(
                f"{_what(req, prompt_tokens)} need about {needed / GIB:.1f} GiB of GPU memory, "
                f"but the GPU has {self.capacity_bytes / GIB:.1f} GiB: {_advice(req, prompt_tokens)}."
            )


def gpu_capacity(device: str) -> int | None:
    """The GPU's total memory; None on CPU, where nothing is refused up front."""
    if not device.startswith("cuda"):
        return None
    return torch.cuda.get_device_properties(device).total_memory


def release_memory(device: str) -> None:
    """Free what a failed request left allocated (its tensors are garbage once the exception is handled)."""
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


def _what(req: GenerationRequest, prompt_tokens: int) -> str:
    what = f"{req.num_outputs} image(s) at {req.width}x{req.height}"
    if req.refine.runs_refiner:
        what += " with the refiner"
    if prompt_chunks(prompt_tokens) > 1:
        what += f" from a {prompt_tokens}-token prompt ({prompt_chunks(prompt_tokens)} chunks of {PROMPT_CHUNK_TOKENS})"
    if controls := sum(1 for control in req.controls if control.active):
        what += f" with {controls} ControlNet control(s)"
    return what


def _advice(req: GenerationRequest, prompt_tokens: int) -> str:
    levers = ["lower num_outputs or width/height"]
    if req.refine.runs_refiner:
        levers.append(f"use refine={Refine.NONE}")
    if any(control.active for control in req.controls):
        levers.append("use fewer ControlNet controls")
    if prompt_chunks(prompt_tokens) > 1:
        levers.append(
            f"shorten the prompt (every {PROMPT_CHUNK_TOKENS} tokens past the first {PROMPT_CHUNK_TOKENS} cost memory)"
        )
    return ", or ".join(levers)


def out_of_memory_error(req: GenerationRequest, prompt_tokens: int = 0) -> InputError:
    return InputError(
        f"Out of GPU memory generating {_what(req, prompt_tokens)}: {_advice(req, prompt_tokens)}. "
        "The server is ready for the next request."
    )


@dataclass(frozen=True)
class PeakMemoryMeter:
    capacity_bytes: int | None  # None: no GPU, nothing to report
    reset_peak: Callable[[], None]
    read_peak: Callable[[], int]

    @classmethod
    def for_device(cls, device: str) -> PeakMemoryMeter:
        capacity = gpu_capacity(device)
        if capacity is None:
            return cls(None, lambda: None, lambda: 0)
        index = torch.device(device)
        # Allocated, not reserved: what the prediction's tensors and the weights really occupied, not
        # what the caching allocator kept from earlier requests.
        return cls(
            capacity,
            lambda: torch.cuda.reset_peak_memory_stats(index),
            lambda: torch.cuda.max_memory_allocated(index),
        )

    def start(self) -> None:
        """Forget the previous prediction's peak."""
        if self.capacity_bytes is not None:
            self.reset_peak()

    def metrics(self) -> dict[str, object]:
        if self.capacity_bytes is None:
            return {}
        peak = int(self.read_peak())
        return {"gpu_peak_memory_bytes": peak, "gpu_memory_fraction": round(peak / self.capacity_bytes, 4)}
