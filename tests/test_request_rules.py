"""The pure request rules: sizes, seeds, step arithmetic, modes. No model is loaded."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from sdxl_cog.errors import InputError
from sdxl_cog.inputs.request import base_image_refiner_schedule, check_side, default_refine_steps, resolve_seeds
from tests.conftest import make_request


def test_size_not_multiple_of_8_names_nearest_valid_values():
    with pytest.raises(InputError, match=r"width=1001 is not a multiple of 8; use 1000 or 1008"):
        check_side("width", 1001)
    with pytest.raises(InputError, match=r"height=2047 .* use 2040 or 2048"):
        make_request(height=2047)


def test_txt2img_defaults_to_1024_square():
    request = make_request(width=None, height=None)
    assert (request.width, request.height, request.mode) == (1024, 1024, "txt2img")


def test_seeds_are_consecutive_per_image():
    assert resolve_seeds(10, 4) == (10, 11, 12, 13)
    random = resolve_seeds(None, 2)
    assert random[1] == random[0] + 1 and 0 <= random[0] < 2**32


@pytest.mark.parametrize("steps", [1, 2, 3, 5, 7, 10, 25, 50])
@pytest.mark.parametrize("strength", [0.01, 0.1, 0.3, 0.33, 0.5, 0.7, 0.9, 1.0])
def test_base_image_refiner_schedule_runs_exactly_the_steps(steps, strength):
    total = base_image_refiner_schedule(steps, strength)
    assert min(int(total * strength), total) == steps


def test_default_refine_steps_is_what_cog_sdxl_ran():
    assert default_refine_steps(50, 0.3) == 15
    assert default_refine_steps(2, 0.3) == 1


def test_mask_without_image_is_refused(tmp_path):
    mask = tmp_path / "mask.png"
    Image.new("L", (64, 64), 255).save(mask)
    with pytest.raises(InputError, match="mask was given without image"):
        make_request(mask=mask)


def test_expert_ensemble_needs_a_fraction_strictly_inside_0_1():
    with pytest.raises(InputError, match="high_noise_frac=1.0"):
        make_request(refine="expert_ensemble_refiner", high_noise_frac=1.0)


def test_image_sets_the_mode_and_size(tmp_path):
    source = tmp_path / "source.png"
    Image.fromarray(np.zeros((1500, 3000, 3), dtype=np.uint8)).save(source)
    request = make_request(image=source, width=None, height=None)
    # Capped to 2048 on the long side, aspect ratio kept, rounded down to multiples of 8.
    assert (request.mode, request.width, request.height) == ("img2img", 2048, 1024)
    assert request.image.size == (2048, 1024)
    one_side = make_request(image=source, width=512, height=None)
    assert (one_side.width, one_side.height) == (512, 256)
