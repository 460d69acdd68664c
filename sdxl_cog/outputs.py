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
import threading
import time
import uuid
import zlib
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import piexif
import piexif.helper
from PIL import Image

from .config import PNG_COMPRESS_LEVEL, RUNTIME_LEFTOVER_AGE_S, WEBP_LOSSLESS_QUALITY

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# IHDR: 8-bit RGB (colour type 2), deflate, adaptive filtering (the only method), no interlace.
PNG_BIT_DEPTH, PNG_RGB = 8, 2
# Each row is prefixed with its filter type; Up (2) stores the difference from the row above.
PNG_FILTER_UP = 2


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
    return _png_chunk(kind, data)


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(data, zlib.crc32(kind)))


class PngWriter:
    """A PNG written as its rows arrive, top to bottom, so that the first rows are compressed while later
    ones are still being made (the watermark's bands, on the CPU). Neither Pillow's nor OpenCV's encoder
    takes rows a part at a time, and the format is small: the signature, IHDR, the `parameters` text chunk, the zlib stream of
    the Up-filtered rows in IDAT chunks, IEND. Up with zlib level PNG_COMPRESS_LEVEL and the run-length
    strategy are the settings that made libpng (through OpenCV) fastest at Pillow's file size; Python's
    zlib does the same in the same time (bench/encoding.py), and releases the GIL while it compresses.

    The file appears at `path` only when complete: it is written beside it and renamed by close(); on
    an error, or discard(), nothing is left."""

    def __init__(self, path: Path, width: int, height: int, text: str):
        self.path, self.partial = path, path.with_name(f".{path.name}.partial")
        self.height, self.rows_written = height, 0
        self.file = open(self.partial, "wb")
        header = struct.pack(">IIBBBBB", width, height, PNG_BIT_DEPTH, PNG_RGB, 0, 0, 0)
        self.file.write(PNG_SIGNATURE + _png_chunk(b"IHDR", header) + png_text_chunk("parameters", text))
        self.compressor = zlib.compressobj(PNG_COMPRESS_LEVEL, zlib.DEFLATED, zlib.MAX_WBITS, 8, zlib.Z_RLE)
        self.row_above = np.zeros(width * 3, np.uint8)  # the first row's Up filter subtracts zeros

    def write_rows(self, rows: np.ndarray) -> None:
        """The next (k, W, 3) uint8 RGB rows."""
        flat = rows.reshape(len(rows), -1)
        filtered = np.empty((len(rows), flat.shape[1] + 1), np.uint8)
        filtered[:, 0] = PNG_FILTER_UP
        np.subtract(flat[0], self.row_above, out=filtered[0, 1:])
        np.subtract(flat[1:], flat[:-1], out=filtered[1:, 1:])
        self.row_above = flat[-1].copy()
        self.rows_written += len(rows)
        self._write_idat(self.compressor.compress(filtered))

    def close(self) -> None:
        if self.rows_written != self.height:
            raise RuntimeError(f"PNG closed after {self.rows_written} of its {self.height} rows")
        self._write_idat(self.compressor.flush())
        self.file.write(_png_chunk(b"IEND", b""))
        self.file.close()
        os.replace(self.partial, self.path)

    def discard(self) -> None:
        self.file.close()
        self.partial.unlink(missing_ok=True)

    def _write_idat(self, data: bytes) -> None:
        if data:
            self.file.write(_png_chunk(b"IDAT", data))

    def __enter__(self) -> PngWriter:
        return self

    def __exit__(self, exc_type, *exc_info) -> None:
        if self.file.closed:  # closed or discarded already
            return
        if exc_type is not None:
            self.discard()
            return
        try:
            self.close()
        except BaseException:
            self.discard()
            raise


def _save_png(image: np.ndarray, path: Path, quality: int, text: str) -> None:
    with PngWriter(path, image.shape[1], image.shape[0], text) as png:
        png.write_rows(image)


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


class RowFeed:
    """One image handed to its encoder while its rows are still being made. The maker marks bands of rows
    final, in any order (rows_ready), then ends with finish(), or finish(replacement) to have another image
    written instead, or cancel(); the encoder takes the final rows in order as soon as there are any."""

    def __init__(self, image: np.ndarray):
        self.image = image  # (H, W, 3) uint8 RGB, filled in by the maker
        self._changed = threading.Condition()
        self._ready = 0  # rows 0.._ready are final
        self._waiting_bands: dict[int, int] = {}  # final bands below a gap: top -> bottom
        self._end: tuple[bool, np.ndarray | None] | None = None  # (cancelled, replacement) once ended

    def rows_ready(self, top: int, bottom: int) -> None:
        with self._changed:
            self._waiting_bands[top] = bottom
            while self._ready in self._waiting_bands:
                self._ready = self._waiting_bands.pop(self._ready)
            self._changed.notify_all()

    def finish(self, replacement: np.ndarray | None = None) -> None:
        self._end_with(False, replacement)

    def cancel(self) -> None:
        self._end_with(True, None)

    def final_rows(self, after: int) -> int:
        """Waits until more than `after` rows are final, or the maker has ended; the number final so far."""
        with self._changed:
            self._changed.wait_for(lambda: self._ready > after or self._end is not None)
            return self._ready

    def end(self) -> tuple[bool, np.ndarray | None]:
        """Waits for the maker's end: (cancelled, the replacement image or None)."""
        with self._changed:
            self._changed.wait_for(lambda: self._end is not None)
            return self._end

    def _end_with(self, cancelled: bool, replacement: np.ndarray | None) -> None:
        with self._changed:
            self._end = (cancelled, replacement)
            self._changed.notify_all()


class BackgroundEncoder:
    """Encodes each image in a worker thread as soon as it is handed over, so that image i is written while
    the caller decodes image i+1 (zlib's, OpenCV's and Pillow's encoders release the GIL). A PNG can also be
    handed over before its rows are all made (stream), and is then compressed as they come."""

    def __init__(self, texts: Sequence[str], directory: Path, tag: str, output_format: str, quality: int):
        self.texts, self.quality = texts, quality
        self.encoder = ENCODERS[output_format]
        self.paths = output_paths(directory, tag, len(texts), output_format)
        self.pool = ThreadPoolExecutor(max_workers=len(texts) or 1, thread_name_prefix="encode")
        self.pending: list[Future] = []

    def submit(self, index: int, image: np.ndarray) -> None:
        self.pending.append(self.pool.submit(self.encoder, image, self.paths[index], self.quality, self.texts[index]))

    def stream(self, index: int, image: np.ndarray) -> RowFeed | None:
        """A feed for `image`, which the caller is still filling in, or None where the format needs the
        whole image at once (JPEG, WebP): then submit() it when it is done."""
        if self.encoder is not _save_png:
            return None
        feed = RowFeed(image)
        self.pending.append(self.pool.submit(self._encode_rows, feed, index))
        return feed

    def _encode_rows(self, feed: RowFeed, index: int) -> None:
        image, path, text = feed.image, self.paths[index], self.texts[index]
        with PngWriter(path, image.shape[1], image.shape[0], text) as png:
            written = 0
            while written < len(image) and (ready := feed.final_rows(written)) > written:
                png.write_rows(image[written:ready])
                written = ready
            cancelled, replacement = feed.end()
            if cancelled or replacement is not None:
                png.discard()  # a flagged image's rows never reach a file
        if replacement is not None:
            self.encoder(replacement, path, self.quality, text)

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
