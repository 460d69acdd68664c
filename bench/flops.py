"""The FLOPs of SDXL's networks and the GPU peaks a run is measured against (the physical floor: FLOPs / peak).

Counted by torch.utils.flop_counter on the real configs with meta tensors: shapes only, so a full-size count takes
seconds on any CPU and no memory. At 1024x1024 (128x128 latents, 77 tokens) one denoising step with
classifier-free guidance (the UNet on a batch of 2 per image) is 13.52 TFLOP for the base and 14.57 for the
refiner, and one VAE decode 10.47 TFLOP: 30 base steps and a decode are 416 TFLOP, 0.42 s at an H100's dense fp16
peak. (The usual "about 12 TFLOP per step" leaves out the attention's own matmuls, which FlopCounterMode counts.)
"""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from torch.utils.flop_counter import FlopCounterMode

# Dense (no sparsity) fp16/bf16 tensor-core peaks from the vendors' datasheets, TFLOP/s; the first name found in
# torch.cuda.get_device_name() wins.
PEAK_TFLOPS = {
    "H200": 989.4,
    "H100 PCIe": 756.0,
    "H100": 989.4,
    "A100": 312.0,
    "L40S": 362.1,
    "L4": 121.0,
    "A10G": 125.0,
    "A10": 125.0,
    "RTX 4090": 165.2,
}
VAE_FACTOR = 8  # pixels per latent, each way
PROMPT_TOKENS = 77  # one chunk
# The UNets' micro-conditioning numbers: original size, crop offset and target size (base); the refiner swaps the
# target size for an aesthetic score.
TIME_IDS = {"base": 6, "refiner": 5}


def unet_inputs(config, batch: int, latent_side: int, time_ids: int) -> dict:
    """Meta inputs of the shapes the SDXL pipelines feed a UNet with this config."""
    pooled = config["projection_class_embeddings_input_dim"] - time_ids * config["addition_time_embed_dim"]
    return dict(
        sample=torch.empty(batch, config["in_channels"], latent_side, latent_side),
        timestep=torch.tensor(500.0),
        encoder_hidden_states=torch.empty(batch, PROMPT_TOKENS, config["cross_attention_dim"]),
        added_cond_kwargs={"text_embeds": torch.empty(batch, pooled), "time_ids": torch.empty(batch, time_ids)},
    )


def step_flops(config, stage: str, side: int, guided: bool = True) -> float:
    """One denoising step of one image at side x side (both halves of the batch with guidance)."""
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(config)
        inputs = unet_inputs(config, 2 if guided else 1, side // VAE_FACTOR, TIME_IDS[stage])
        with FlopCounterMode(display=False) as counter:
            unet(**inputs)
    return counter.get_total_flops()


def decode_flops(config, side: int) -> float:
    """One image's VAE decode at side x side."""
    with torch.device("meta"):
        vae = AutoencoderKL.from_config(config)
        with FlopCounterMode(display=False) as counter:
            vae.decode(torch.empty(1, config["latent_channels"], side // VAE_FACTOR, side // VAE_FACTOR))
    return counter.get_total_flops()


def sdxl_flops(base_unet_config, refiner_unet_config, vae_config, side: int) -> dict[str, float]:
    """FLOPs per image: one guided step of each UNet ("base", "refiner") and one decode ("decode")."""
    return {
        "base": step_flops(base_unet_config, "base", side),
        "refiner": step_flops(refiner_unet_config, "refiner", side),
        "decode": decode_flops(vae_config, side),
    }


def peak_tflops(device_name: str) -> float | None:
    return next((tflops for key, tflops in PEAK_TFLOPS.items() if key in device_name), None)
