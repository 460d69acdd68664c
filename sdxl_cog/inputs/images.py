"""Input images and masks: decoding untrusted files safely, fitting them to the output size, and pasting
the kept region back after inpainting.

Every refusal raises InputError with a message that says what was wrong and what is accepted.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from sdxl_cog.config import MASK_THRESHOLD, MAX_INPUT_PIXELS, MAX_SIDE, MIN_SIDE, SIDE_MULTIPLE
from sdxl_cog.errors import InputError

# Transparent areas of a source image are shown on white, as image editors display them.
TRANSPARENT_BACKGROUND = (255, 255, 255)

HIGH_DEPTH_MODES = {"I;16", "I;16B", "I;16L", "I;16N", "I", "F"}

# Pillow's own bomb guard raises DecompressionBombError past 2x this; ours is stricter and explicit.
Image.MAX_IMAGE_PIXELS = MAX_INPUT_PIXELS


def _open(path: Path, what: str) -> Image.Image:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(path)
        if img.width * img.height > MAX_INPUT_PIXELS:
            raise InputError(
                f"{what} is {img.width}x{img.height} pixels; at most {MAX_INPUT_PIXELS // 1_000_000} megapixels are accepted."
            )
        img.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise InputError(f"{what} declares a size above {MAX_INPUT_PIXELS // 1_000_000} megapixels ({e}).") from e
    except UnidentifiedImageError as e:
        raise InputError(f"{what} is not an image file Pillow can read (send PNG, JPEG or WebP).") from e
    except (OSError, SyntaxError, ValueError) as e:
        raise InputError(f"{what} could not be decoded: it is truncated or corrupt ({e}).") from e
    return ImageOps.exif_transpose(img)


def _to_8bit(img: Image.Image) -> Image.Image:
    """16-bit and float greyscale ('I;16', 'I', 'F') scaled to 8 bits; Pillow's convert would clip them."""
    if img.mode not in HIGH_DEPTH_MODES:
        return img
    values = np.asarray(img, dtype=np.float64)
    top = 65535.0 if img.mode.startswith("I;16") or values.max() > 255 else 255.0
    return Image.fromarray(np.clip(values / top * 255.0 + 0.5, 0, 255).astype(np.uint8))


def load_image(path: Path, what: str = "image") -> Image.Image:
    """An RGB image from any file Pillow reads: palette, alpha, CMYK and 16-bit images are converted."""
    img = _to_8bit(_open(path, what))
    if img.mode in {"RGBA", "LA", "PA", "RGBa", "La"} or (img.mode == "P" and "transparency" in img.info):
        img = img.convert("RGBA")
        background = Image.new("RGBA", img.size, TRANSPARENT_BACKGROUND + (255,))
        return Image.alpha_composite(background, img).convert("RGB")
    return img.convert("RGB")


def load_mask(path: Path, size: tuple[int, int]) -> Image.Image:
    """A binary mask ('L', 0 or 255) of `size`: white is repainted, black kept; transparent counts as black."""
    img = _to_8bit(_open(path, "mask"))
    if img.mode in {"RGBA", "LA", "PA"} or (img.mode == "P" and "transparency" in img.info):
        img = img.convert("RGBA")
        img = Image.alpha_composite(Image.new("RGBA", img.size, (0, 0, 0, 255)), img)
    mask = img.convert("L")
    if mask.size != size:
        # A mask drawn on a scaled copy of the image: stretch it onto the image.
        mask = mask.resize(size, Image.BILINEAR)
    return binarize(mask)


def binarize(mask: Image.Image) -> Image.Image:
    return mask.point(lambda v: 255 if v >= MASK_THRESHOLD else 0)


def check_mask_has_work(mask: Image.Image) -> None:
    low, high = mask.getextrema()
    if high == 0:
        raise InputError(
            "mask is entirely black, so nothing would be repainted: paint white where the image should change."
        )


def fit(img: Image.Image, size: tuple[int, int], resample: int = Image.LANCZOS) -> Image.Image:
    """Scale to cover `size` and centre-crop, keeping the aspect ratio (no stretching)."""
    return img if img.size == size else ImageOps.fit(img, size, method=resample)


def kept_region(source: Image.Image, mask: Image.Image, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The source as an (H, W, 3) uint8 tensor and where the (binarized) mask keeps it, (H, W, 1) bool."""
    pixels = torch.from_numpy(np.asarray(source.convert("RGB")).copy()).to(device)
    keep = torch.from_numpy(np.asarray(mask) < MASK_THRESHOLD)[..., None].to(device)
    return pixels, keep


def paste_back(generated: torch.Tensor, source: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Pixels under the black part of the mask come back exactly as they were in the source (the mask is
    binary, so this equals PIL's Image.composite(generated, source, mask))."""
    return torch.where(keep, source, generated)


def size_from_image(img_size: tuple[int, int], width: int | None, height: int | None) -> tuple[int, int]:
    """The output size for img2img/inpaint: the requested sides, the missing ones from the image's aspect ratio."""
    w, h = img_size
    if width is None and height is None:
        scale = min(1.0, MAX_SIDE / max(w, h))
        width, height = w * scale, h * scale
    elif width is None:
        width = height * w / h
    elif height is None:
        height = width * h / w
    return _round_side(width), _round_side(height)


def _round_side(value: float) -> int:
    side = int(value) // SIDE_MULTIPLE * SIDE_MULTIPLE
    return min(MAX_SIDE, max(MIN_SIDE, side))
