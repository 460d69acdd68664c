"""A PNG written as its rows arrive (the watermark's bands, on the CPU), with the parameters text chunk."""

from __future__ import annotations

import os
import struct
import zlib
from pathlib import Path

import numpy as np

from sdxl_cog.config import PNG_COMPRESS_LEVEL
from sdxl_cog.outputs.metadata import png_chunk, png_text_chunk

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# IHDR: 8-bit RGB (colour type 2), deflate, adaptive filtering (the only method), no interlace.
PNG_BIT_DEPTH, PNG_RGB = 8, 2
# Each row is prefixed with its filter type; Up (2) stores the difference from the row above.
PNG_FILTER_UP = 2


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
        self.file.write(PNG_SIGNATURE + png_chunk(b"IHDR", header) + png_text_chunk("parameters", text))
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
        self.file.write(png_chunk(b"IEND", b""))
        self.file.close()
        os.replace(self.partial, self.path)

    def discard(self) -> None:
        self.file.close()
        self.partial.unlink(missing_ok=True)

    def _write_idat(self, data: bytes) -> None:
        if data:
            self.file.write(png_chunk(b"IDAT", data))

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
