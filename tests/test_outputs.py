"""Image encoding: PNG is lossless, every format carries the parameters, names are unique per index."""

from __future__ import annotations

import cv2
import numpy as np
import piexif
import piexif.helper
import pytest
from PIL import Image

from sdxl_cog.outputs.coglet_leftovers import sweep_empty_runtime_dirs
from sdxl_cog.outputs.encoder import BackgroundEncoder, encode_all
from sdxl_cog.outputs.formats import OUTPUT_FORMATS
from sdxl_cog.outputs.metadata import parameters_text, read_parameters


@pytest.fixture
def images():
    rng = np.random.default_rng(1)
    return [Image.fromarray(rng.integers(0, 256, (64, 96, 3), dtype=np.uint8)) for _ in range(3)]


def test_png_round_trips_exactly(images, tmp_path):
    paths = encode_all(images, ["p"] * 3, tmp_path, "tag", "png", 80)
    for image, path in zip(images, paths):
        assert np.array_equal(np.asarray(Image.open(path)), np.asarray(image))


def test_opencv_decodes_our_png_to_the_same_pixels(images, tmp_path):
    """A second, independent reader (OpenCV's libpng) besides Pillow."""
    paths = encode_all(images, ["p"] * 3, tmp_path, "tag", "png", 80)
    for image, path in zip(images, paths):
        bgr = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
        assert np.array_equal(bgr[:, :, ::-1], np.asarray(image))


def gradient_photo(height: int, width: int) -> np.ndarray:
    """Smooth with some noise, so that the compressor finds runs and matches across the bands."""
    rows, cols = np.mgrid[0:height, 0:width]
    noise = np.random.default_rng(3).integers(0, 6, (height, width, 3))
    return (np.stack([rows % 256, cols % 256, (rows + cols) % 256], -1) + noise).clip(0, 255).astype(np.uint8)


def stream(encoder: BackgroundEncoder, image: np.ndarray, bands, replacement=None):
    filled = np.zeros_like(image)
    feed = encoder.stream(0, filled)
    for top, bottom in bands:
        filled[top:bottom] = image[top:bottom]
        feed.rows_ready(top, bottom)
    feed.finish(replacement)
    return encoder.wait()[0]


def test_a_png_streamed_in_bands_out_of_order_is_the_file_written_whole(tmp_path):
    image = gradient_photo(300, 200)
    (whole,) = encode_all([image], ["p"], tmp_path, "whole", "png", 80)
    with BackgroundEncoder(["p"], tmp_path, "streamed", "png", 80) as encoder:
        streamed = stream(encoder, image, [(100, 256), (0, 100), (256, 300)])
    assert streamed.read_bytes() == whole.read_bytes()
    assert np.array_equal(np.asarray(Image.open(streamed)), image)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([whole.name, streamed.name])


def test_a_streamed_png_replaced_at_its_end_holds_only_the_replacement(tmp_path):
    """What the safety checker does to a flagged image: its rows were streamed, the file is the black one."""
    image, black = gradient_photo(64, 96), np.zeros((64, 96, 3), np.uint8)
    with BackgroundEncoder(["p"], tmp_path, "flagged", "png", 80) as encoder:
        path = stream(encoder, image, [(0, 64)], replacement=black)
    assert np.array_equal(np.asarray(Image.open(path)), black)
    assert [p.name for p in tmp_path.iterdir()] == [path.name]


def test_a_cancelled_stream_leaves_no_file(tmp_path):
    image = gradient_photo(64, 96)
    with BackgroundEncoder(["p"], tmp_path, "cancelled", "png", 80) as encoder:
        feed = encoder.stream(0, image)
        feed.rows_ready(0, 32)
        feed.cancel()
        encoder.wait()
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("fmt", ["jpg", "webp"])
def test_lossy_formats_are_not_streamed(tmp_path, fmt):
    with BackgroundEncoder(["p"], tmp_path, "t", fmt, 80) as encoder:
        assert encoder.stream(0, gradient_photo(8, 8)) is None


@pytest.mark.parametrize(
    ("prompt", "chunk"), [("a prompt ü, 50% lighter", b"tEXt"), ("宇宙飛行士 🦄 on a unicorn", b"iTXt")]
)
def test_png_parameters_chunk_is_valid_and_unicode_safe(images, tmp_path, prompt, chunk):
    text = parameters_text(prompt, "blurry", {"Seed": 7})
    (path,) = encode_all(images[:1], [text], tmp_path, "tag", "png", 80)
    with Image.open(path) as img:
        img.verify()  # every chunk's CRC
    with Image.open(path) as img:
        assert img.info["parameters"] == text  # how A1111 and other SD tools read it
    data = path.read_bytes()
    assert data.index(chunk + b"parameters\0") < data.index(b"IDAT")  # before the pixels, as Pillow writes it


def test_webp_at_quality_100_is_lossless(images, tmp_path):
    (path,) = encode_all(images[:1], ["p"], tmp_path, "tag", "webp", 100)
    assert np.array_equal(np.asarray(Image.open(path).convert("RGB")), np.asarray(images[0]))


@pytest.mark.parametrize("fmt", OUTPUT_FORMATS)
def test_each_image_carries_its_own_parameters(images, tmp_path, fmt):
    texts = [parameters_text("a prompt ü", "", {"Seed": i, "Steps": 30}) for i in range(3)]
    paths = encode_all(images, texts, tmp_path, "tag", fmt, 80)
    assert [p.name for p in paths] == [f"tag-{i}.{fmt}" for i in range(3)]
    assert [read_parameters(p) for p in paths] == texts
    assert texts[2] == "a prompt ü\nSeed: 2, Steps: 30"


def a1111_png_info(path) -> str:
    """AUTOMATIC1111's reading of a file's parameters (modules/images.py, read_info_from_image), step by step."""
    with Image.open(path) as image:
        items = dict(image.info)
    if "parameters" in items:
        return items["parameters"]
    exif = piexif.load(items["exif"])
    comment = exif.get("Exif", {}).get(piexif.ExifIFD.UserComment, b"")
    try:
        return piexif.helper.UserComment.load(comment)
    except ValueError:
        return comment.decode("utf8", errors="ignore")  # A1111's fallback: mangled text, not the parameters


@pytest.mark.parametrize("fmt", OUTPUT_FORMATS)
@pytest.mark.parametrize("prompt", ["an astronaut, 50% lighter", "宇宙飛行士 🦄 on a unicorn"])
def test_a1111_reads_the_parameters_of_every_format(images, tmp_path, fmt, prompt):
    text = parameters_text(prompt, "blurry", {"Steps": 30, "Seed": 7, "Size": "96x64"})
    (path,) = encode_all(images[:1], [text], tmp_path, "tag", fmt, 80)
    assert a1111_png_info(path) == text
    if fmt != "png":
        comment = piexif.load(Image.open(path).info["exif"])["Exif"][piexif.ExifIFD.UserComment]
        assert isinstance(comment, bytes) and comment.startswith(b"UNICODE\0")  # type UNDEFINED, as EXIF 2.3 says


def test_only_old_empty_runtime_directories_are_swept(tmp_path):
    import os

    old_empty = tmp_path / "p1" / "inputs"
    old_full = tmp_path / "p2" / "outputs"
    new_empty = tmp_path / "p3" / "inputs"
    for d in (old_empty, old_full, new_empty):
        d.mkdir(parents=True)
    (old_full / "keep.png").write_bytes(b"data")
    for d in (old_empty, old_full, old_empty.parent, old_full.parent):
        os.utime(d, (0, 0))
    sweep_empty_runtime_dirs(tmp_path, min_age_s=60)
    assert not old_empty.parent.exists()
    assert (old_full / "keep.png").exists() and new_empty.exists()
