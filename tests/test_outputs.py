"""Image encoding: PNG is lossless, every format carries the parameters, names are unique per index."""

from __future__ import annotations

import numpy as np
import piexif
import piexif.helper
import pytest
from PIL import Image

from sdxl_cog.outputs import OUTPUT_FORMATS, encode_all, parameters_text, read_parameters, sweep_empty_runtime_dirs


@pytest.fixture
def images():
    rng = np.random.default_rng(1)
    return [Image.fromarray(rng.integers(0, 256, (64, 96, 3), dtype=np.uint8)) for _ in range(3)]


def test_png_round_trips_exactly(images, tmp_path):
    paths = encode_all(images, ["p"] * 3, tmp_path, "tag", "png", 80)
    for image, path in zip(images, paths):
        assert np.array_equal(np.asarray(Image.open(path)), np.asarray(image))


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
