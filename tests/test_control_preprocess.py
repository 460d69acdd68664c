"""Control maps (sdxl_cog/control/preprocess.py) against the libraries called directly: OpenCV's Canny, and
transformers' depth-estimation pipeline on the tiny Depth Anything weights (devtools/synthetic_control.py)."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoImageProcessor, AutoModelForDepthEstimation, pipeline

from devtools.synthetic_control import write_depth_estimator
from sdxl_cog.control.preprocess import CANNY_HIGH_THRESHOLD, CANNY_LOW_THRESHOLD, canny, depth

SIZE = (160, 96)  # (width, height): not square, not a multiple of the depth model's 14-pixel patch


def noise(seed: int = 0, size=SIZE) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def square_on_black(size=SIZE, box=(40, 20, 120, 70), colour=(200, 30, 90)) -> Image.Image:
    pixels = np.zeros((size[1], size[0], 3), dtype=np.uint8)
    left, top, right, bottom = box
    pixels[top:bottom, left:right] = colour
    return Image.fromarray(pixels)


def channels_equal(image: Image.Image) -> np.ndarray:
    """The one channel of a grey map stored as RGB (asserting the three are the same)."""
    pixels = np.asarray(image)
    assert image.mode == "RGB" and (pixels == pixels[..., :1]).all()
    return pixels[..., 0]


@pytest.mark.parametrize("thresholds", [(CANNY_LOW_THRESHOLD, CANNY_HIGH_THRESHOLD), (20, 60)])
def test_canny_is_opencv_canny_on_the_colour_image(thresholds):
    image = noise()
    edges = canny(image, *thresholds)
    assert edges.size == image.size
    assert np.array_equal(channels_equal(edges), cv2.Canny(np.asarray(image), *thresholds))


def test_canny_draws_the_outline_of_a_shape_and_nothing_else():
    left, top, right, bottom = 40, 20, 120, 70
    edges = channels_equal(canny(square_on_black(box=(left, top, right, bottom)).convert("RGBA")))
    ys, xs = np.nonzero(edges)
    assert set(np.unique(edges)) == {0, 255}
    # Every edge pixel is within a pixel of the square's border, and all four sides are drawn.
    on_border = (np.minimum.reduce([abs(xs - left), abs(xs - (right - 1)), abs(ys - top), abs(ys - (bottom - 1))])) <= 1
    assert on_border.all()
    assert {xs.min(), xs.max(), ys.min(), ys.max()} <= {
        left - 1,
        left,
        right - 1,
        right,
        top - 1,
        top,
        bottom - 1,
        bottom,
    }


@pytest.fixture(scope="module")
def depth_model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("depth-anything")
    write_depth_estimator(folder)
    return AutoModelForDepthEstimation.from_pretrained(folder), AutoImageProcessor.from_pretrained(folder), folder


def test_depth_is_the_transformers_depth_estimation_pipelines_map(depth_model):
    model, processor, _ = depth_model
    image = noise(1)
    ours = depth(model, processor, image)
    theirs = pipeline("depth-estimation", model=model, image_processor=processor, device="cpu")(image)["depth"]
    assert ours.size == image.size == theirs.size
    values = channels_equal(ours)
    assert np.array_equal(values, np.asarray(theirs))
    assert values.min() == 0 and values.max() == 255  # scaled to the full range
    assert not np.array_equal(channels_equal(depth(model, processor, square_on_black())), values)


def test_depth_of_a_flat_prediction_is_black(depth_model):
    _, processor, folder = depth_model
    model = AutoModelForDepthEstimation.from_pretrained(folder)
    with torch.no_grad():  # the head's last convolution made constant: the same depth everywhere
        model.head.conv3.weight.zero_()
        model.head.conv3.bias.fill_(0.5)
    # Resized back to the image, the constant differs by float32 rounding, which scaling would turn into a pattern.
    values = channels_equal(depth(model, processor, noise(2)))
    assert values.shape == (SIZE[1], SIZE[0]) and not values.any()
