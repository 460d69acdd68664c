"""Encoding generated images to files, with the generation parameters embedded the way AUTOMATIC1111
writes them (PNG `parameters` text chunk; EXIF UserComment for JPEG and WebP), so that any SD tool can
read back how an image was made.

The runtime never deletes output files: the server removes its own, and only its own, once they are
no longer the latest few (OutputDirectory).
"""

from __future__ import annotations

import collections
import os
import shutil
import stat
import struct
import time
import uuid
import zlib
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import cv2
import numpy as np
import piexif
import piexif.helper
from PIL import Image

from .config import PNG_COMPRESS_LEVEL, RUNTIME_LEFTOVER_AGE_S, WEBP_LOSSLESS_QUALITY

PNG_PARAMS = [
    cv2.IMWRITE_PNG_COMPRESSION,
    PNG_COMPRESS_LEVEL,
    cv2.IMWRITE_PNG_STRATEGY,
    cv2.IMWRITE_PNG_STRATEGY_RLE,
    cv2.IMWRITE_PNG_FILTER,
    cv2.IMWRITE_PNG_FILTER_UP,
]
# The IHDR chunk comes first in every PNG: 8-byte signature + 4 length + 4 type + 13 data + 4 CRC.
PNG_AFTER_IHDR = 8 + 4 + 4 + 13 + 4


def parameters_text(prompt: str, negative_prompt: str, fields: dict[str, object]) -> str:
    """The A1111 `parameters` string: prompt, negative prompt, then `Key: value` pairs on one line."""
    lines = [prompt]
    if negative_prompt:
        lines.append(f"Negative prompt: {negative_prompt}")
    lines.append(", ".join(f"{key}: {value}" for key, value in fields.items()))
    return "\n".join(lines)


def _exif_with_comment(text: str) -> bytes:
    """EXIF holding `text` as UserComment: type UNDEFINED with the UNICODE header (EXIF 2.3, 4.6.5), written by
    piexif, the library AUTOMATIC1111 and most SD tools read it back with."""
    comment = piexif.helper.UserComment.dump(text, encoding="unicode")
    return piexif.dump({"Exif": {piexif.ExifIFD.UserComment: comment}})


def png_text_chunk(keyword: str, text: str) -> bytes:
    """A PNG text chunk as Pillow writes one: tEXt when the text is Latin-1, else uncompressed UTF-8 iTXt."""
    try:
        kind, data = b"tEXt", keyword.encode("latin-1") + b"\0" + text.encode("latin-1")
    except UnicodeEncodeError:
        # keyword, compression flag and method (none), empty language tag and translated keyword, text
        kind, data = b"iTXt", keyword.encode("latin-1") + b"\0\0\0\0\0" + text.encode("utf-8")
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _save_png(image: np.ndarray, path: Path, quality: int, text: str) -> None:
    bgr = cv2.cvtColor(image, cv2.COLOR_RGB2BGR)
    ok, encoded = cv2.imencode(".png", bgr, PNG_PARAMS)
    if not ok:
        raise RuntimeError(f"OpenCV could not encode a {image.shape[1]}x{image.shape[0]} PNG")
    png = memoryview(encoded)
    with open(path, "wb") as f:
        f.write(png[:PNG_AFTER_IHDR])
        f.write(png_text_chunk("parameters", text))
        f.write(png[PNG_AFTER_IHDR:])


def _save_jpeg(image: np.ndarray, path: Path, quality: int, text: str) -> None:
    Image.fromarray(image).save(path, format="JPEG", quality=quality, exif=_exif_with_comment(text), optimize=False)


def _save_webp(image: np.ndarray, path: Path, quality: int, text: str) -> None:
    lossless = quality >= WEBP_LOSSLESS_QUALITY
    Image.fromarray(image).save(path, format="WEBP", quality=quality, lossless=lossless, exif=_exif_with_comment(text))


# Each takes an (H, W, 3) uint8 RGB array, the generator's output as it leaves the device.
ENCODERS: dict[str, Callable[[np.ndarray, Path, int, str], None]] = {
    "png": _save_png,
    "jpg": _save_jpeg,
    "webp": _save_webp,
}
OUTPUT_FORMATS = list(ENCODERS)


def read_parameters(path: Path) -> str:
    """The embedded parameters of a file written by `encode_all`, read back as AUTOMATIC1111's PNG Info does."""
    with Image.open(path) as img:
        if "parameters" in img.info:
            return img.info["parameters"]
        exif = img.info.get("exif", b"")
    return piexif.helper.UserComment.load(piexif.load(exif)["Exif"][piexif.ExifIFD.UserComment])


# coglet 0.23 leaves empty inputs/ and outputs/ directories per prediction under this fixed path
# (ignoring TMPDIR): 3 directories a prediction, forever. Empty ones older than this are swept.
COGLET_PREDICTIONS_DIR = Path("/tmp/coglet/predictions")


def _real_directory(entry: os.DirEntry) -> bool:
    return entry.is_dir(follow_symlinks=False)


def sweep_empty_runtime_dirs(root: Path = COGLET_PREDICTIONS_DIR, min_age_s: float = RUNTIME_LEFTOVER_AGE_S) -> None:
    """Remove the runtime's old, empty per-prediction directories; rmdir never removes anything holding data.

    Links are never followed (a link in the tree, or the tree itself being one, is left alone) and
    nothing outside `root` is touched: a client-chosen prediction id can make coglet create odd names."""
    if root.is_symlink() or not root.is_dir():
        return
    cutoff = time.time() - min_age_s
    with os.scandir(root) as predictions:
        for prediction in predictions:
            try:
                if not _real_directory(prediction) or prediction.stat(follow_symlinks=False).st_mtime >= cutoff:
                    continue  # not coglet's, or possibly a prediction in flight
                with os.scandir(prediction.path) as parts:
                    for part in parts:
                        if _real_directory(part):
                            os.rmdir(part.path)
                os.rmdir(prediction.path)
            except OSError:
                pass  # not empty, or already gone


class OutputDirectory:
    """One directory per prediction under `root`, made by this server; the oldest of them is removed
    once more than `keep` exist. Nothing else under `root` is ever touched, whoever put it there.

    Keeping the latest few lets an operator recover images whose upload failed: coglet uploads them to
    --upload-url after predict() returns, once, and fails the prediction if that PUT fails."""

    def __init__(self, root: Path, keep: int = 1):
        self.root = root
        self.keep = max(1, keep)
        self.made: collections.deque[Path] = collections.deque()  # oldest first

    def start_prediction(self) -> tuple[Path, str]:
        while len(self.made) >= self.keep:
            _remove_own(self.made.popleft())
        sweep_empty_runtime_dirs()
        tag = uuid.uuid4().hex[:12]
        directory = self.root / tag
        self.root.mkdir(parents=True, exist_ok=True)
        directory.mkdir()  # a fresh name: fails rather than adopt a directory someone else made
        self.made.append(directory)
        return directory, tag


def _remove_own(directory: Path) -> None:
    """Remove a directory this server made, unless something replaced it with a link."""
    try:
        if stat.S_ISDIR(os.lstat(directory).st_mode):
            shutil.rmtree(directory)
    except OSError:
        pass  # already gone


def output_paths(directory: Path, tag: str, count: int, output_format: str) -> list[Path]:
    """Names unique per prediction and index (an upload URL receives them in completion order)."""
    return [directory / f"{tag}-{i}.{output_format}" for i in range(count)]


class BackgroundEncoder:
    """Encodes each image in a worker thread as soon as it is handed over, so that image i is written while
    the caller decodes image i+1 (OpenCV's and Pillow's encoders release the GIL)."""

    def __init__(self, texts: Sequence[str], directory: Path, tag: str, output_format: str, quality: int):
        self.texts, self.quality = texts, quality
        self.encoder = ENCODERS[output_format]
        self.paths = output_paths(directory, tag, len(texts), output_format)
        self.pool = ThreadPoolExecutor(max_workers=len(texts) or 1, thread_name_prefix="encode")
        self.pending: list[Future] = []

    def submit(self, index: int, image: np.ndarray) -> None:
        self.pending.append(self.pool.submit(self.encoder, image, self.paths[index], self.quality, self.texts[index]))

    def wait(self) -> list[Path]:
        """The paths, once every image handed over is written; an encoder's error is raised here."""
        for future in self.pending:
            future.result()
        return self.paths

    def __enter__(self) -> BackgroundEncoder:
        return self

    def __exit__(self, *exc_info) -> None:
        # On an error or a cancel, images not yet started are dropped; none is left half-encoded.
        self.pool.shutdown(wait=True, cancel_futures=True)


def encode_all(
    images: Sequence[np.ndarray | Image.Image],
    texts: Sequence[str],
    directory: Path,
    tag: str,
    output_format: str,
    quality: int,
) -> list[Path]:
    """Encode images in parallel; each is an (H, W, 3) uint8 RGB array or a PIL image."""
    with BackgroundEncoder(texts, directory, tag, output_format, quality) as encoder:
        for i, image in enumerate(images):
            encoder.submit(i, image if isinstance(image, np.ndarray) else np.asarray(image.convert("RGB")))
        return encoder.wait()
