"""SDXL's invisible watermark (the 48-bit mark Stability AI's reference code embeds with invisible-watermark's
"dwtDct" method), applied to finished images. It is a pure function of the request: nothing is switched on or
off on a shared pipeline, so a request that disables it cannot leave it disabled for the next one.

invisible-watermark's encoder (imwatermark/maxDct.py, EmbedMaxDct) walks the image in Python, one 4x4 block
at a time: ~200 ms for a 1024px image. This is the same arithmetic as whole-tensor operations, batched over
images and run on whichever device holds them:

1. BGR -> YUV with OpenCV's 8-bit fixed-point formula (only the U channel is marked; Y and V pass through).
2. One level of the Haar DWT of U (cropped to a multiple of 4), as pywt.dwt2 computes it: the rows, then the
   columns, each output the sum of two products with 1/sqrt(2), in float64.
3. In every 4x4 block of the approximation band, the coefficient of largest magnitude other than the first
   is quantized to (floor(|c| / 36) + 0.25 + 0.5 * bit) * 36, keeping its sign; block k carries bit k % 48.
4. The inverse DWT with the horizontal and vertical detail bands swapped (the reference passes them to
   pywt.idwt2 in that order), truncated to uint8 as numpy's assignment does.
5. YUV -> BGR with OpenCV's fixed-point formula.

Every step is done in the reference's own order and precision, so the pixels equal its output (the tests
compare them, and read the mark back with invisible-watermark's own decoder). Each 4x4 block of the band
comes from 8x8 pixels, so on the CPU the image is marked in bands of rows, which another thread may share.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable
from concurrent.futures import Executor

import cv2
import numpy as np
import torch
from diffusers.pipelines.stable_diffusion_xl.watermark import WATERMARK_BITS
from imwatermark import WatermarkDecoder
from PIL import Image

from sdxl_cog.config import WATERMARK_CPU_BAND_ROWS, WATERMARK_MIN_SIDE

METHOD = "dwtDct"

# pywt.Wavelet("haar"): every filter tap is +-0.7071067811865476, the double nearest 1/sqrt(2).
HAAR = 0.7071067811865476
# EmbedMaxDct's defaults: scales=[0, 36, 36] with a loop over channels 0 and 1 only, so U alone is marked,
# in 4x4 blocks of the DWT's approximation band; the DWT needs the image cropped to a multiple of 4.
SCALE = 36
BLOCK = 4
DWT_CROP = 4
# The four pixels of each 2x2 cell as (row, column) offsets: top left, top right, bottom left, bottom right.
QUADRANTS = ((0, 0), (0, 1), (1, 0), (1, 1))

# OpenCV's 8-bit YUV conversions (imgproc/src/color_yuv.simd.hpp): coefficients scaled by 2**14, rounded
# with CV_DESCALE(x, 14) = (x + 2**13) >> 14; chroma is offset by 128.
YUV_SHIFT = 14
R2Y, G2Y, B2Y = 4899, 9617, 1868
B2U, R2V = 8061, 14369
U2B, U2G, V2G, V2R = 33292, -6472, -9519, 18678
CHROMA_OFFSET = 128


def _descale(x: torch.Tensor) -> torch.Tensor:
    return (x + (1 << (YUV_SHIFT - 1))) >> YUV_SHIFT


def _yuv_from_formula(rgb: torch.Tensor) -> torch.Tensor:
    r, g, b = rgb.to(torch.int32).unbind(-1)
    y = _descale(r * R2Y + g * G2Y + b * B2Y)
    offset = CHROMA_OFFSET << YUV_SHIFT
    u = _descale((b - y) * B2U + offset)
    v = _descale((r - y) * R2V + offset)
    return torch.stack([y, u, v], -1).clamp_(0, 255).to(torch.uint8)


def _rgb_from_formula(yuv: torch.Tensor) -> torch.Tensor:
    y, u, v = yuv.to(torch.int32).unbind(-1)
    u, v = u - CHROMA_OFFSET, v - CHROMA_OFFSET
    r = y + _descale(v * V2R)
    g = y + _descale(u * U2G + v * V2G)
    b = y + _descale(u * U2B)
    return torch.stack([r, g, b], -1).clamp_(0, 255).to(torch.uint8)


def _convert(images: torch.Tensor, code: int, formula) -> torch.Tensor:
    """On the CPU, OpenCV's own SIMD conversion (5x faster than the formula in torch); elsewhere the formula,
    which gives the same bytes for every one of the 2**24 colours (tests/test_watermark.py)."""
    if images.device.type != "cpu":
        return formula(images)
    return torch.from_numpy(np.stack([cv2.cvtColor(img, code) for img in images.numpy()]))


def rgb_to_yuv(rgb: torch.Tensor) -> torch.Tensor:
    return _convert(rgb, cv2.COLOR_RGB2YUV, _yuv_from_formula)


def yuv_to_rgb(yuv: torch.Tensor) -> torch.Tensor:
    return _convert(yuv, cv2.COLOR_YUV2RGB, _rgb_from_formula)


def _haar_pair(first: torch.Tensor, second: torch.Tensor, spare: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """pywt's two-tap Haar step: (h*x0 + h*x1, h*x0 - h*x1), each product and sum rounded once, as in C.

    Returns (sum, difference, a free plane): the sum is written into `spare`, the difference over `first`, and
    `second` is free afterwards. Five planes carry the whole transform and nothing is allocated per step.
    """
    first.mul_(HAAR)
    second.mul_(HAAR)
    torch.add(first, second, out=spare)
    return spare, first.sub_(second), second


@functools.lru_cache(maxsize=32)
def _block_layout(
    rows: int, cols: int, first_block_row: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """For a (rows, cols) piece of the approximation band whose first row of blocks is the band's
    `first_block_row`: each whole 4x4 block's flat index of its top left corner, and the 0.25 + 0.5 * bit its
    quantization adds (block k of the whole band carries bit k % 48). Made once per size and piece."""
    row_blocks, col_blocks = rows // BLOCK, cols // BLOCK
    block_row = torch.arange(row_blocks, device=device).repeat_interleave(col_blocks)
    block_col = torch.arange(col_blocks, device=device).repeat(row_blocks)
    bits = torch.tensor(WATERMARK_BITS, dtype=torch.float64, device=device)
    first_block = first_block_row * col_blocks
    bit = bits[torch.arange(first_block, first_block + row_blocks * col_blocks, device=device) % len(bits)]
    return block_row * BLOCK * cols + block_col * BLOCK, 0.25 + 0.5 * bit


def _quantize_blocks(approx: torch.Tensor, first_block_row: int) -> None:
    """Step 3, in place, on the (N, rows, cols) approximation band, or on a piece of it starting at block row
    `first_block_row`; rows and columns past the last whole block stay as they are."""
    n, rows, cols = approx.shape
    row_blocks, col_blocks = rows // BLOCK, cols // BLOCK
    corner, offset = _block_layout(rows, cols, first_block_row, approx.device)
    inner = approx[:, : row_blocks * BLOCK, : col_blocks * BLOCK]
    blocks = inner.reshape(n, row_blocks, BLOCK, col_blocks, BLOCK).transpose(2, 3).reshape(n, -1, BLOCK * BLOCK)
    # argmax returns the first of equal maxima, as numpy's does; position 0 (the block's mean) is never chosen.
    position = blocks[..., 1:].abs().argmax(-1, keepdim=True) + 1
    value = blocks.gather(-1, position)
    magnitude = (torch.div(value.abs(), SCALE, rounding_mode="floor") + offset[:, None]) * SCALE
    # Written straight into the band: block (i, j), position p is row 4i + p // 4, column 4j + p % 4.
    index = corner[:, None] + (position // BLOCK) * cols + position % BLOCK
    approx.view(n, -1).scatter_(1, index.view(n, -1), torch.where(value >= 0, magnitude, -magnitude).view(n, -1))


def _mark_chroma(u: torch.Tensor, first_block_row: int) -> None:
    """Steps 2-4, in place, on the (N, H, W) uint8 U channel, H and W multiples of 4, or on a band of its
    rows starting at block row `first_block_row` (pixel row 8 * first_block_row)."""
    n, height, width = u.shape
    # The four pixels of every 2x2 cell, then the transform's bands, in five planes allocated at once.
    planes = torch.empty((5, n, height // 2, width // 2), dtype=torch.float64, device=u.device)
    top_left, top_right, bottom_left, bottom_right, spare = planes.unbind(0)
    for (row, col), plane in zip(QUADRANTS, (top_left, top_right, bottom_left, bottom_right)):
        plane.copy_(u[:, row::2, col::2])
    # Forward: along the rows (axis -2) first, then the columns.
    row_low_left, row_high_left, spare = _haar_pair(top_left, bottom_left, spare)
    row_low_right, row_high_right, spare = _haar_pair(top_right, bottom_right, spare)
    approx, detail_ad, spare = _haar_pair(row_low_left, row_low_right, spare)
    detail_da, detail_dd, spare = _haar_pair(row_high_left, row_high_right, spare)
    _quantize_blocks(approx, first_block_row)
    # Inverse: along the columns first; the reference hands pywt its 'da' band as 'ad' and vice versa.
    low_left, low_right, spare = _haar_pair(approx, detail_da, spare)
    high_left, high_right, spare = _haar_pair(detail_ad, detail_dd, spare)
    top_left, bottom_left, spare = _haar_pair(low_left, high_left, spare)
    top_right, bottom_right, _ = _haar_pair(low_right, high_right, spare)
    # Truncation toward zero, as numpy's float -> uint8 assignment; values stay within 3.5..252.5 (U spans
    # 17..239 and a quantization step moves a pixel by at most 13.5), so nothing wraps or clips.
    for (row, col), quadrant in zip(QUADRANTS, (top_left, top_right, bottom_left, bottom_right)):
        u[:, row::2, col::2] = quadrant


def _row_bands(rgb: torch.Tensor) -> list[tuple[int, int]]:
    """The (top, bottom) pixel rows marked one at a time: on the CPU, bands of WATERMARK_CPU_BAND_ROWS, a multiple of
    the 8 pixel rows a block covers, small enough that a band's planes stay in the core's cache and two
    threads can share an image; elsewhere the whole image, in as few kernels as there are steps."""
    height = rgb.shape[1]
    step = WATERMARK_CPU_BAND_ROWS if rgb.device.type == "cpu" else height
    return [(top, min(top + step, height)) for top in range(0, height, step)]


@torch.inference_mode()
def _mark_band(rgb: torch.Tensor, marked: torch.Tensor, top: int, bottom: int) -> None:
    """Rows top..bottom of `rgb` into the same rows of `marked`: steps 1-5 on those rows alone, which the
    transform keeps to themselves (top is a multiple of 8; rows past the DWT crop are only converted)."""
    yuv = rgb_to_yuv(rgb[:, top:bottom])
    cropped_bottom = rgb.shape[1] // DWT_CROP * DWT_CROP
    if cropped_bottom > top:
        width = rgb.shape[2] // DWT_CROP * DWT_CROP
        _mark_chroma(yuv[:, : min(bottom, cropped_bottom) - top, :width, 1], top // (2 * BLOCK))
    marked[:, top:bottom] = yuv_to_rgb(yuv)


@torch.inference_mode()
def watermark_images(
    rgb: torch.Tensor,
    helpers: Executor | None = None,
    out: torch.Tensor | None = None,
    on_band: Callable[[int, int], None] | None = None,
) -> torch.Tensor:
    """(N, H, W, 3) uint8 RGB images, on any device, with the SDXL watermark embedded, in `out` if given.

    Images whose shorter side is below WATERMARK_MIN_SIDE cannot hold the mark and come back unchanged. With
    `helpers`, a thread of that executor takes bands too as soon as it is free, so that a CPU core the caller
    does not use marks part of the image; the caller never waits for a helper that has not started (it
    takes the helper's bands itself), so a busy executor only costs the parallelism. `on_band(top, bottom)`
    is called, from the thread that marked them, once rows top..bottom of the result are final.
    """
    if min(rgb.shape[1:3]) < WATERMARK_MIN_SIDE:
        if out is None:
            return rgb
        out.copy_(rgb)
        if on_band is not None:
            on_band(0, rgb.shape[1])
        return out
    marked = torch.empty_like(rgb) if out is None else out
    bands = iter(_row_bands(rgb))
    taking = threading.Lock()

    def mark_bands() -> None:
        while True:
            with taking:
                band = next(bands, None)
            if band is None:
                return
            _mark_band(rgb, marked, *band)
            if on_band is not None:
                on_band(*band)

    helper = helpers.submit(mark_bands) if helpers is not None else None
    mark_bands()
    if helper is not None and not helper.cancel():
        helper.result()
    return marked


def apply_watermark(image: Image.Image) -> Image.Image:
    """The image with the SDXL watermark embedded; images too small to hold it are returned as they are."""
    rgb = torch.from_numpy(np.array(image.convert("RGB")))[None]
    return Image.fromarray(watermark_images(rgb)[0].numpy())


def read_watermark(image: Image.Image) -> list[int]:
    """The 48 bits invisible-watermark's own decoder finds (equal to WATERMARK_BITS when the mark is there)."""
    decoder = WatermarkDecoder("bits", len(WATERMARK_BITS))
    bgr = np.ascontiguousarray(np.asarray(image.convert("RGB"))[:, :, ::-1])
    return [int(b) for b in decoder.decode(bgr, METHOD)]


def has_watermark(image: Image.Image, max_bit_errors: int = 4) -> bool:
    errors = sum(a != b for a, b in zip(read_watermark(image), WATERMARK_BITS))
    return errors <= max_bit_errors
