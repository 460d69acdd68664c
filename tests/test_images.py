"""Untrusted image and mask files: each is decoded correctly or refused with a clear message."""

from __future__ import annotations

import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from sdxl_cog.errors import InputError
from sdxl_cog.inputs.images import load_image, load_mask
from tests.conftest import make_request


def save(tmp_path, image: Image.Image, name: str, **kwargs):
    path = tmp_path / name
    image.save(path, **kwargs)
    return path


def test_not_an_image(tmp_path):
    path = tmp_path / "notes.png"
    path.write_text("definitely not a picture")
    with pytest.raises(InputError, match="not an image file"):
        load_image(path)


def test_truncated_file(tmp_path):
    full = save(
        tmp_path, Image.fromarray(np.random.default_rng(0).integers(0, 255, (256, 256, 3), dtype=np.uint8)), "full.png"
    )
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(full.read_bytes()[:5000])
    with pytest.raises(InputError, match="truncated or corrupt"):
        load_image(truncated)


def _png_declaring(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims a huge size: a decompression bomb's calling card."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


@pytest.mark.parametrize("side", [10_000, 100_000])
def test_decompression_bomb_is_refused_before_decoding(tmp_path, side):
    path = tmp_path / "bomb.png"
    path.write_bytes(_png_declaring(side, side))
    with pytest.raises(InputError, match="megapixels"):
        load_image(path)


@pytest.mark.parametrize(
    "make",
    [
        lambda: Image.new("CMYK", (64, 48), (0, 255, 0, 0)),
        lambda: Image.new("P", (64, 48), 3),
        lambda: Image.new("RGBA", (64, 48), (255, 0, 0, 128)),
        lambda: Image.new("LA", (64, 48), (100, 0)),
        lambda: Image.new("L", (64, 48), 100),
        lambda: Image.new("1", (64, 48), 1),
    ],
)
def test_other_modes_become_rgb(tmp_path, make):
    image = make()
    path = save(tmp_path, image, "in.tiff" if image.mode == "CMYK" else "in.png")
    loaded = load_image(path)
    assert loaded.mode == "RGB" and loaded.size == (64, 48)


def test_16_bit_greyscale_keeps_its_range(tmp_path):
    ramp = (np.linspace(0, 65535, 64 * 48).reshape(48, 64)).astype(np.uint16)
    path = save(tmp_path, Image.fromarray(ramp), "deep.png")
    loaded = np.asarray(load_image(path))
    assert loaded.min() == 0 and loaded.max() == 255  # not clipped to white


def test_transparent_pixels_show_as_white(tmp_path):
    path = save(tmp_path, Image.new("RGBA", (8, 8), (0, 0, 0, 0)), "clear.png")
    assert np.asarray(load_image(path)).min() == 255


def test_mask_is_binarised_and_fitted_to_the_image(tmp_path):
    grey = np.tile(np.linspace(0, 255, 32, dtype=np.uint8), (32, 1))
    mask = load_mask(save(tmp_path, Image.fromarray(grey), "mask.png"), (64, 64))
    values = np.asarray(mask)
    assert mask.size == (64, 64) and set(np.unique(values)) == {0, 255}
    assert values[:, :16].max() == 0 and values[:, -16:].min() == 255


def test_all_black_mask_is_refused(tmp_path):
    source = save(tmp_path, Image.new("RGB", (256, 256), "grey"), "source.png")
    mask = save(tmp_path, Image.new("L", (256, 256), 0), "mask.png")
    with pytest.raises(InputError, match="mask is entirely black"):
        make_request(image=source, mask=mask)


def test_all_white_mask_repaints_everything(tmp_path):
    source = save(tmp_path, Image.new("RGB", (256, 256), "grey"), "source.png")
    mask = save(tmp_path, Image.new("L", (256, 256), 255), "mask.png")
    assert make_request(image=source, mask=mask).mode == "inpaint"


def test_bad_mask_file_is_named(tmp_path):
    source = save(tmp_path, Image.new("RGB", (256, 256), "grey"), "source.png")
    mask = tmp_path / "mask.png"
    mask.write_bytes(b"\x89PNG garbage")
    with pytest.raises(InputError, match="^mask "):
        make_request(image=source, mask=mask)
