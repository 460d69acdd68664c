"""The output formats: each encodes an (H, W, 3) uint8 RGB array, the generator's output as it leaves the
device, to a file with the generation parameters embedded (metadata.py)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

from sdxl_cog.config import WEBP_LOSSLESS_QUALITY
from sdxl_cog.outputs.metadata import exif_with_comment
from sdxl_cog.outputs.png import PngWriter


def save_png(image: np.ndarray, path: Path, quality: int, text: str) -> None:
    with PngWriter(path, image.shape[1], image.shape[0], text) as png:
        png.write_rows(image)


def _save_jpeg(image: np.ndarray, path: Path, quality: int, text: str) -> None:
    Image.fromarray(image).save(path, format="JPEG", quality=quality, exif=exif_with_comment(text), optimize=False)


def _save_webp(image: np.ndarray, path: Path, quality: int, text: str) -> None:
    lossless = quality >= WEBP_LOSSLESS_QUALITY
    Image.fromarray(image).save(path, format="WEBP", quality=quality, lossless=lossless, exif=exif_with_comment(text))


# Each takes an (H, W, 3) uint8 RGB array, the generator's output as it leaves the device.
ENCODERS: dict[str, Callable[[np.ndarray, Path, int, str], None]] = {
    "png": save_png,
    "jpg": _save_jpeg,
    "webp": _save_webp,
}
OUTPUT_FORMATS = list(ENCODERS)
