"""refine=refiner_only: the refiner alone, img2img (or inpaint) on the user's own image."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from sdxl_cog.errors import InputError
from sdxl_cog.outputs.metadata import read_parameters
from tests.conftest import TEST_SIDE, count_unet_calls, half_mask, make_request, max_diff, pixels, run, source_image

SQUARE = (TEST_SIDE, TEST_SIDE)


@pytest.mark.parametrize("refine_steps,strength", [(2, 0.3), (3, 0.5), (5, 0.9)])
def test_only_the_refiner_runs_exactly_refine_steps(service, tmp_path, refine_steps, strength):
    source = source_image(tmp_path, SQUARE)
    with count_unet_calls(service) as calls:
        result = run(service, image=source, refine="refiner_only", refine_steps=refine_steps, refine_strength=strength)
    # One UNet call per step: the request's guidance runs both CFG halves in one batch.
    assert calls == {"base": 0, "refiner": refine_steps}
    assert result.metrics["refiner_steps"] == refine_steps
    assert "base_steps" not in result.metrics and "base_denoise_time" not in result.metrics
    assert result.images[0].size == SQUARE


def test_the_default_step_count_is_num_inference_steps_times_refine_strength(service, tmp_path):
    with count_unet_calls(service) as calls:
        run(service, image=source_image(tmp_path), refine="refiner_only", num_inference_steps=10, refine_strength=0.4)
    assert calls == {"base": 0, "refiner": 4}


def test_the_result_comes_from_the_given_image(service, tmp_path):
    red, blue = tmp_path / "red.png", tmp_path / "blue.png"
    Image.new("RGB", SQUARE, (220, 30, 30)).save(red)
    Image.new("RGB", SQUARE, (30, 30, 220)).save(blue)
    a = run(service, image=red, refine="refiner_only", refine_steps=2, seed=3).images[0]
    a_again = run(service, image=red, refine="refiner_only", refine_steps=2, seed=3).images[0]
    b = run(service, image=blue, refine="refiner_only", refine_steps=2, seed=3).images[0]
    assert max_diff(a, a_again) == 0
    # The tiny random VAE barely carries its input through, but the source still changes the pixels.
    assert max_diff(a, b) > 0


def test_prompt_strength_plays_no_part(service, tmp_path):
    source = source_image(tmp_path, SQUARE)
    # prompt_strength=0 would be refused for img2img; the refiner has its own strength.
    zero = run(service, image=source, refine="refiner_only", refine_steps=2, prompt_strength=0.0).images[0]
    high = run(service, image=source, refine="refiner_only", refine_steps=2, prompt_strength=0.9).images[0]
    assert max_diff(zero, high) == 0


def test_a_mask_keeps_the_black_region_exactly(service, tmp_path):
    source = source_image(tmp_path, SQUARE)
    mask = half_mask(tmp_path, SQUARE)
    with count_unet_calls(service) as calls:
        result = run(service, image=source, mask=mask, width=None, height=None, refine="refiner_only", refine_steps=3)
    assert calls == {"base": 0, "refiner": 3}
    out, original, half = pixels(result.images[0]), pixels(source), TEST_SIDE // 2
    assert np.array_equal(out[:, :half], original[:, :half])
    assert np.abs(out[:, half:] - original[:, half:]).mean() > 5


def test_embedded_parameters_name_the_refiner_steps_and_strength(service, tmp_path):
    result = run(service, image=source_image(tmp_path), refine="refiner_only", refine_steps=3, refine_strength=0.5)
    text = read_parameters(result.paths[0])
    for field in ("Steps: 3,", "Denoising strength: 0.5", "Refiner: refiner_only", "Refiner steps: 3"):
        assert field in text, field


def test_without_an_image_it_is_refused_naming_the_fix():
    with pytest.raises(InputError, match="refine=refiner_only refines an existing image, but no image was given"):
        make_request(refine="refiner_only")


def test_a_lora_is_refused_not_silently_ignored(service, tmp_path):
    with pytest.raises(InputError, match="refiner_only does not run"):
        run(service, image=source_image(tmp_path), refine="refiner_only", lora="some/lora.safetensors")
