"""SDXL's invisible watermark (the 48-bit DWT-DCT mark Stability AI's reference code embeds), applied
to finished images. It is a pure function of the request: nothing is switched on or off on a shared
pipeline, so a request that disables it cannot leave it disabled for the next one."""

from __future__ import annotations

import numpy as np
from diffusers.pipelines.stable_diffusion_xl.watermark import WATERMARK_BITS
from imwatermark import WatermarkDecoder, WatermarkEncoder
from PIL import Image

from .config import WATERMARK_MIN_SIDE

METHOD = "dwtDct"


def can_watermark(image: Image.Image) -> bool:
    return min(image.size) >= WATERMARK_MIN_SIDE


def apply_watermark(image: Image.Image) -> Image.Image:
    """The image with the SDXL watermark embedded; images too small to hold it are returned as they are."""
    if not can_watermark(image):
        return image
    encoder = WatermarkEncoder()
    encoder.set_watermark("bits", WATERMARK_BITS)
    bgr = np.ascontiguousarray(np.asarray(image.convert("RGB"))[:, :, ::-1])
    return Image.fromarray(np.ascontiguousarray(encoder.encode(bgr, METHOD)[:, :, ::-1]))


def read_watermark(image: Image.Image) -> list[int]:
    """The 48 bits found in the image (equal to WATERMARK_BITS when the watermark is present)."""
    decoder = WatermarkDecoder("bits", len(WATERMARK_BITS))
    bgr = np.ascontiguousarray(np.asarray(image.convert("RGB"))[:, :, ::-1])
    return [int(b) for b in decoder.decode(bgr, METHOD)]


def has_watermark(image: Image.Image, max_bit_errors: int = 4) -> bool:
    errors = sum(a != b for a, b in zip(read_watermark(image), WATERMARK_BITS))
    return errors <= max_bit_errors
