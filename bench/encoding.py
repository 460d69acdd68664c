"""Output encoding: encoding a 1024x1024 image with its generation parameters, in every output format.

    python bench/encoding.py                  # a smooth synthetic image with sensor-like noise
    python bench/encoding.py --image some.png # or any image of your own (resized to --side)

For each format of sdxl_cog/outputs at the defaults a request gets (PNG with outputs.png.PngWriter, JPEG
and WebP at the default output_quality, WebP at 100 = lossless), through the same encoder functions
encode_all uses (metadata attached, file written): time (median of N), file size, and whether the pixels
survive (max abs difference and PSNR against the original). Pillow's PNG at its default zlib level 6 and at
its fastest lossless settings, and OpenCV's libpng at PngWriter's settings (the encoder before it), are the
references. Then encode_all on 4 images against 4 encodes one after
the other (the parallel speedup), the lossless PNG settings considered, and, for scale, the invisible
watermark every default request also pays.
"""

from __future__ import annotations

import argparse
import io
import math
import sys
import tempfile
import time
import zlib
from pathlib import Path

import cv2
import numpy as np
from PIL import Image
from PIL.PngImagePlugin import PngInfo

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import median, print_header, print_table, ratio, spread  # noqa: E402

from sdxl_cog.config import DEFAULT_OUTPUT_QUALITY, PNG_COMPRESS_LEVEL, WEBP_LOSSLESS_QUALITY  # noqa: E402
from sdxl_cog.finishing.watermark import apply_watermark  # noqa: E402
from sdxl_cog.outputs.encoder import encode_all  # noqa: E402
from sdxl_cog.outputs.formats import ENCODERS, OUTPUT_FORMATS  # noqa: E402
from sdxl_cog.outputs.metadata import parameters_text, png_text_chunk, read_parameters  # noqa: E402
from sdxl_cog.weights.profiles import SDXL_SIDE  # noqa: E402

# Pillow's own default zlib level for PNG: the reference for config.PNG_COMPRESS_LEVEL.
PILLOW_DEFAULT_PNG_LEVEL = 6
# Noise like a generated image's fine texture: a few grey levels, neither flat (compresses to nothing)
# nor pure noise (incompressible). Both extremes would flatter or punish one format.
NOISE_STD = 3.0
BATCH = 4
# A typical A1111 parameters string, as service.py embeds it.
TEXT = parameters_text(
    "An astronaut riding a rainbow unicorn, cinematic, dramatic lighting, highly detailed",
    "blurry, low quality",
    {"Steps": 30, "Sampler": "Euler", "CFG scale": 7.5, "Seed": 1234, "Size": "1024x1024", "Model": "sdxl"},
)


def synthetic_image(side: int, seed: int) -> Image.Image:
    """Smooth colour gradients and soft discs (large flat-ish areas, like a render) plus fine noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:side, 0:side] / side
    channels = []
    for _ in range(3):
        fx, fy, phase = rng.uniform(0.5, 3.0), rng.uniform(0.5, 3.0), rng.uniform(0, 2 * math.pi)
        channels.append(0.5 + 0.35 * np.sin(2 * math.pi * (fx * x + fy * y) + phase))
    image = np.stack(channels, axis=-1)
    for _ in range(12):
        cx, cy, r = rng.uniform(0, 1), rng.uniform(0, 1), rng.uniform(0.03, 0.2)
        disc = np.clip(1.0 - np.hypot(x - cx, y - cy) / r, 0.0, 1.0)[..., None] ** 0.5
        image = image * (1 - disc) + disc * rng.uniform(0, 1, size=3)
    pixels = image * 255.0 + rng.normal(0.0, NOISE_STD, size=image.shape)
    return Image.fromarray(np.clip(pixels + 0.5, 0, 255).astype(np.uint8))


def fidelity(a: Image.Image, b: Image.Image) -> tuple[int, str]:
    """Max abs pixel difference, and PSNR (or `lossless`)."""
    x = np.asarray(a.convert("RGB"), dtype=np.float64)
    y = np.asarray(b.convert("RGB"), dtype=np.float64)
    mse = float(np.mean((x - y) ** 2))
    return int(np.abs(x - y).max()), "lossless" if mse == 0 else f"{10 * math.log10(255.0**2 / mse):.1f} dB"


def _save_png_pillow_default(image: np.ndarray, path: Path, quality: int, text: str) -> None:
    info = PngInfo()
    info.add_text("parameters", text)
    Image.fromarray(image).save(path, format="PNG", pnginfo=info, compress_level=PILLOW_DEFAULT_PNG_LEVEL)


def _cv2_name(prefix: str, value: int) -> str:
    return next(n.removeprefix(prefix) for n in dir(cv2) if n.startswith(prefix) and getattr(cv2, n) == value)


# What outputs.png.PngWriter does, in OpenCV's terms: zlib level PNG_COMPRESS_LEVEL, run-length strategy, Up filter.
OPENCV_PNG_AS_OUR_WRITER = [
    cv2.IMWRITE_PNG_COMPRESSION,
    PNG_COMPRESS_LEVEL,
    cv2.IMWRITE_PNG_STRATEGY,
    cv2.IMWRITE_PNG_STRATEGY_RLE,
    cv2.IMWRITE_PNG_FILTER,
    cv2.IMWRITE_PNG_FILTER_UP,
]


def png_settings() -> str:
    """The encoder settings sdxl_cog/outputs/png.py writes PNG with, named from OpenCV's constants."""
    options = dict(zip(OPENCV_PNG_AS_OUR_WRITER[::2], OPENCV_PNG_AS_OUR_WRITER[1::2]))
    strategy = _cv2_name("IMWRITE_PNG_STRATEGY_", options[cv2.IMWRITE_PNG_STRATEGY])
    row_filter = _cv2_name("IMWRITE_PNG_FILTER_", options[cv2.IMWRITE_PNG_FILTER])
    return f"zlib level {options[cv2.IMWRITE_PNG_COMPRESSION]}, {strategy} strategy, {row_filter} filter"


def _save_png_opencv(image: np.ndarray, path: Path, quality: int, text: str) -> None:
    """OpenCV's libpng at the same settings, with the same text chunk after IHDR (the encoder before PngWriter)."""
    ok, encoded = cv2.imencode(".png", cv2.cvtColor(image, cv2.COLOR_RGB2BGR), OPENCV_PNG_AS_OUR_WRITER)
    assert ok
    after_ihdr = 8 + 4 + 4 + 13 + 4  # signature, IHDR length, type, data and CRC
    path.write_bytes(
        encoded[:after_ihdr].tobytes() + png_text_chunk("parameters", text) + encoded[after_ihdr:].tobytes()
    )


def _save_png_pillow_fastest(image: np.ndarray, path: Path, quality: int, text: str) -> None:
    """The fastest lossless settings Pillow has (the default before OpenCV): level 1, zlib's RLE strategy."""
    info = PngInfo()
    info.add_text("parameters", text)
    Image.fromarray(image).save(path, format="PNG", pnginfo=info, compress_level=1, compress_type=zlib.Z_RLE)


def cases() -> list[tuple[str, str, object, int]]:
    """(label, file extension, encoder, quality): every output format at its defaults, plus the PNG reference."""
    rows = [
        (f"png ({png_settings()}, outputs.png.PngWriter)", "png", ENCODERS["png"], 0),
        (f"jpg (quality={DEFAULT_OUTPUT_QUALITY})", "jpg", ENCODERS["jpg"], DEFAULT_OUTPUT_QUALITY),
        (f"webp (quality={DEFAULT_OUTPUT_QUALITY})", "webp", ENCODERS["webp"], DEFAULT_OUTPUT_QUALITY),
        (
            f"webp (quality={WEBP_LOSSLESS_QUALITY}, lossless)",
            "webp",
            ENCODERS["webp"],
            WEBP_LOSSLESS_QUALITY,
        ),
        (f"png reference (Pillow default level {PILLOW_DEFAULT_PNG_LEVEL})", "png", _save_png_pillow_default, 0),
        ("png reference (Pillow level 1, Z_RLE: its fastest)", "png", _save_png_pillow_fastest, 0),
        (f"png reference (OpenCV libpng, {png_settings()})", "png", _save_png_opencv, 0),
    ]
    missing = set(OUTPUT_FORMATS) - {ext for _, ext, _, _ in rows}
    if missing:
        raise SystemExit(
            f"sdxl_cog/outputs/formats.py has formats this benchmark does not cover yet: {sorted(missing)}"
        )
    return rows


def time_encoder(encoder, image: np.ndarray, path: Path, quality: int, repeat: int) -> list[float]:
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        encoder(image, path, quality, TEXT)
        times.append(time.perf_counter() - started)
    return times


def bench_formats(image: Image.Image, scratch: Path, repeat: int) -> None:
    rows = []
    for label, ext, encoder, quality in cases():
        path = scratch / f"single.{ext}"
        # The encoders take what the generator hands over: an (H, W, 3) uint8 RGB array.
        times = time_encoder(encoder, np.asarray(image), path, quality, repeat)
        with Image.open(path) as decoded:
            max_diff, quality_text = fidelity(image, decoded)
        has_text = TEXT in read_parameters(path)
        rows.append([label, spread(times), f"{path.stat().st_size / 1e6:.2f}", quality_text, max_diff, has_text])
    print("### One 1024x1024 image, encode + metadata + write")
    print_table(["format", "seconds, median (min-max)", "MB", "quality", "max abs diff", "metadata read back"], rows)


def bench_parallel(images: list[Image.Image], scratch: Path, repeat: int) -> None:
    rows = []
    texts = [TEXT] * len(images)
    for fmt in OUTPUT_FORMATS:
        encoder, quality = ENCODERS[fmt], DEFAULT_OUTPUT_QUALITY
        sequential, parallel = [], []
        for i in range(repeat):
            started = time.perf_counter()
            for j, image in enumerate(images):
                encoder(np.asarray(image), scratch / f"seq-{j}.{fmt}", quality, TEXT)
            sequential.append(time.perf_counter() - started)
            started = time.perf_counter()
            encode_all(images, texts, scratch, f"par{i}", fmt, quality)
            parallel.append(time.perf_counter() - started)
        rows.append([fmt, spread(sequential), spread(parallel), ratio(median(sequential), median(parallel))])
    print(f"### {len(images)} images: {len(images)} sequential encodes vs encode_all (thread pool)")
    print_table(["format", "sequential", "encode_all", "speedup"], rows)


def png_options(image: Image.Image, repeat: int) -> None:
    """Lossless PNG settings the encoder could use instead (in memory, CPU time, so the load of other
    processes on the machine counts less), including OpenCV's libpng, which invisible-watermark installs."""
    rows = []
    for level, strategy in ((0, None), (1, None), (1, zlib.Z_RLE), (PILLOW_DEFAULT_PNG_LEVEL, None)):
        kwargs = {"compress_level": level} | ({"compress_type": strategy} if strategy is not None else {})
        times, size = cpu_times(lambda kw=kwargs: _png_bytes(image, kw), repeat)
        rows.append([f"Pillow {kwargs}", f"{median(times) * 1000:.0f}", f"{size / 1e6:.2f}"])
    bgr = np.ascontiguousarray(np.asarray(image)[:, :, ::-1])
    level_1 = [cv2.IMWRITE_PNG_COMPRESSION, 1]
    rle = [cv2.IMWRITE_PNG_STRATEGY, cv2.IMWRITE_PNG_STRATEGY_RLE]
    for label, params in (
        ("OpenCV level 1 (adaptive filters)", level_1),
        ("OpenCV level 1, RLE (adaptive filters)", level_1 + rle),
        ("OpenCV level 1, RLE, no filter", level_1 + rle + [cv2.IMWRITE_PNG_FILTER, cv2.IMWRITE_PNG_FILTER_NONE]),
        ("OpenCV level 1, RLE, Sub filter", level_1 + rle + [cv2.IMWRITE_PNG_FILTER, cv2.IMWRITE_PNG_FILTER_SUB]),
        ("OpenCV level 1, RLE, Up filter", level_1 + rle + [cv2.IMWRITE_PNG_FILTER, cv2.IMWRITE_PNG_FILTER_UP]),
        ("OpenCV level 1, RLE, Paeth filter", level_1 + rle + [cv2.IMWRITE_PNG_FILTER, cv2.IMWRITE_PNG_FILTER_PAETH]),
    ):
        times, size = cpu_times(lambda p=params: len(cv2.imencode(".png", bgr, p)[1]), repeat)
        rows.append([label, f"{median(times) * 1000:.0f}", f"{size / 1e6:.2f}"])
    print("### Lossless PNG settings, one image, encode to memory (no metadata, no file)")
    print_table(["encoder", "CPU ms, median", "MB"], rows)


def _png_bytes(image: Image.Image, kwargs: dict) -> int:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", **kwargs)
    return buffer.tell()


def cpu_times(fn, repeat: int) -> tuple[list[float], int]:
    times, size = [], 0
    for _ in range(repeat):
        started = time.process_time()
        size = fn()
        times.append(time.process_time() - started)
    return times, size


def bench_watermark(image: Image.Image, repeat: int) -> None:
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        apply_watermark(image)
        times.append(time.perf_counter() - started)
    print(f"- For scale: the invisible watermark (on by default) on the same image: {spread(times)}\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--image", type=Path, help="encode this image (resized to --side) instead of a synthetic one")
    parser.add_argument("--side", type=int, default=SDXL_SIDE, help="image side in pixels (default: %(default)s)")
    parser.add_argument("--repeat", type=int, default=7, help="timed encodes per case (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    if args.image:
        image = Image.open(args.image).convert("RGB").resize((args.side, args.side), Image.LANCZOS)
        images = [image] * BATCH
    else:
        image = synthetic_image(args.side, args.seed)
        images = [synthetic_image(args.side, args.seed + i) for i in range(BATCH)]
    print_header("Output encoding", {"image": str(args.image or f"synthetic, seed {args.seed}"), "size": image.size})
    with tempfile.TemporaryDirectory(prefix="bench-encoding-") as scratch:
        bench_formats(image, Path(scratch), args.repeat)
        bench_parallel(images, Path(scratch), max(1, args.repeat // 2))
    png_options(image, args.repeat)
    bench_watermark(image, max(1, args.repeat // 2))


if __name__ == "__main__":
    main()
