"""Per-model profiles: the presets, overrides from the manifest, and which inputs a request takes from them."""

from __future__ import annotations

import pytest
from PIL import Image

from sdxl_cog.weights.profiles import PRESETS, Profile, profile_from
from tests.conftest import make_request


def test_distilled_presets_run_without_guidance_on_trailing_timesteps():
    assert PRESETS["sdxl"] == Profile(50, 7.5, 1024, None)
    assert PRESETS["turbo"] == Profile(1, 0.0, 512, "trailing")
    assert PRESETS["lightning"] == Profile(4, 0.0, 1024, "trailing")


def test_a_manifest_entry_picks_a_preset_and_overrides_fields():
    assert profile_from({}) == PRESETS["sdxl"]
    assert profile_from({"preset": "lightning", "num_inference_steps": 8}).num_inference_steps == 8
    with pytest.raises(ValueError, match="Unknown profile preset 'fast'; use one of sdxl, turbo, lightning"):
        profile_from({"preset": "fast"})
    with pytest.raises(ValueError, match=r"Unknown profile settings \['cfg'\]"):
        profile_from({"cfg": 1})


def test_left_out_inputs_take_the_profile_and_given_ones_win():
    turbo = PRESETS["turbo"]
    left_out = make_request(num_inference_steps=None, guidance_scale=None, width=None, height=None, profile=turbo)
    assert (left_out.num_inference_steps, left_out.guidance_scale, left_out.width, left_out.height) == (
        1,
        0.0,
        512,
        512,
    )
    assert left_out.profile_defaults == {"num_inference_steps": 1, "guidance_scale": 0.0, "width": 512, "height": 512}
    given = make_request(num_inference_steps=3, guidance_scale=2.0, width=256, height=None, profile=turbo)
    assert (given.num_inference_steps, given.guidance_scale, given.width, given.height) == (3, 2.0, 256, 512)
    assert given.profile_defaults == {"height": 512}


def test_with_an_image_the_size_follows_the_image_not_the_profile(tmp_path):
    source = tmp_path / "source.png"
    Image.new("RGB", (320, 256)).save(source)
    turbo = PRESETS["turbo"]
    req = make_request(
        image=source, width=None, height=None, num_inference_steps=None, prompt_strength=1.0, profile=turbo
    )
    assert (req.width, req.height) == (320, 256)
    assert req.profile_defaults == {"num_inference_steps": 1}
