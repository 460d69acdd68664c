"""Encoding a prediction's images in worker threads while the next one decodes; a PNG even while its rows are
still being watermarked (rows.RowFeed)."""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

from sdxl_cog.outputs.directory import output_paths
from sdxl_cog.outputs.formats import ENCODERS, save_png
from sdxl_cog.outputs.png import PngWriter
from sdxl_cog.outputs.rows import RowFeed


class BackgroundEncoder:
    """Encodes each image in a worker thread as soon as it is handed over, so that image i is written while
    the caller decodes image i+1 (zlib and Pillow's encoders release the GIL). A PNG can also be
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
        if self.encoder is not save_png:
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
