"""End-to-end behaviour of the engine on tiny synthetic weights: seeds, sizes, modes, refiner step
counts, schedulers without leaks, outputs and their metadata."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
    PNDMScheduler,
    UniPCMultistepScheduler,
)
from PIL import Image

from sdxl_cog.generation import generate as generate_module
from sdxl_cog.generation.schedulers import SCHEDULERS
from sdxl_cog.outputs.directory import OutputDirectory
from sdxl_cog.outputs.metadata import read_parameters
from tests.conftest import DEFAULT_OPTIONS, TEST_SIDE, count_unet_calls, half_mask, max_diff, pixels, run, source_image


def test_outputs_have_requested_size_and_count(service):
    # Not square: a swapped or ignored side shows.
    result = run(service, width=192, height=128, num_outputs=3, num_inference_steps=1)
    assert len(result.paths) == 3
    assert all(image.size == (192, 128) for image in result.images)
    assert len({p.name for p in result.paths}) == 3


def test_same_seed_same_image_different_seed_different_image(service):
    a = run(service, seed=7).images[0]
    a_again = run(service, seed=7).images[0]
    b = run(service, seed=8).images[0]
    assert max_diff(a, a_again) == 0
    assert max_diff(a, b) > 10


def test_any_image_of_a_batch_regenerates_alone(service):
    batch = run(service, seed=100, num_outputs=3)
    assert batch.metrics["seeds"] == [100, 101, 102]
    alone = run(service, seed=102, num_outputs=1)
    assert max_diff(batch.images[2], alone.images[0]) <= 2


def test_no_seed_means_random_32_bit_seeds(service):
    seeds = {run(service, seed=None, num_inference_steps=1).metrics["seeds"][0] for _ in range(3)}
    assert len(seeds) == 3
    assert all(0 <= s < 2**32 for s in seeds)


def test_seeds_are_logged_and_embedded(service, capsys):
    result = run(service, seed=42, num_outputs=2, num_inference_steps=1)
    assert "Seeds: [42, 43]" in capsys.readouterr().out
    assert "Seed: 43," in result.images[1].info["parameters"]


def test_every_input_changes_the_image(service):
    reference = run(service, seed=5).images[0]
    for change in (
        {"prompt": "a blue whale"},
        {"negative_prompt": "blurry"},
        {"guidance_scale": 2.0},
        {"num_inference_steps": 6},
        {"scheduler": "DDIM"},
    ):
        assert max_diff(reference, run(service, seed=5, **change).images[0]) > 0, change


_KARRAS_2M = {"use_karras_sigmas": True, "algorithm_type": "dpmsolver++", "solver_order": 2}
# Each choice, the diffusers class it must build and the options it must set (written out here, not read
# from sdxl_cog.generation.schedulers, so a wrong entry there fails).
EXPECTED_SCHEDULERS = {
    "DDIM": (DDIMScheduler, {}),
    "DPMSolverMultistep": (DPMSolverMultistepScheduler, {"use_karras_sigmas": False}),
    "HeunDiscrete": (HeunDiscreteScheduler, {}),
    "KarrasDPM": (DPMSolverMultistepScheduler, _KARRAS_2M),
    "K_EULER_ANCESTRAL": (EulerAncestralDiscreteScheduler, {}),
    "K_EULER": (EulerDiscreteScheduler, {}),
    "PNDM": (PNDMScheduler, {"skip_prk_steps": True}),
    "DPM++ 2M Karras": (DPMSolverMultistepScheduler, _KARRAS_2M),
    "UniPC": (UniPCMultistepScheduler, {}),
}


def test_the_table_covers_every_choice():
    assert set(EXPECTED_SCHEDULERS) == set(SCHEDULERS)


@pytest.mark.parametrize("name", list(EXPECTED_SCHEDULERS))
def test_each_scheduler_builds_the_class_and_options_it_names(service, monkeypatch, name):
    built, stage_pipeline = [], generate_module.stage_pipeline

    def spy(model, mode, scheduler_name, controlnet=None):
        pipe = stage_pipeline(model, mode, scheduler_name, controlnet)
        built.append(pipe.scheduler)
        return pipe

    monkeypatch.setattr(generate_module, "stage_pipeline", spy)
    result = run(service, scheduler=name, num_inference_steps=3)
    cls, options = EXPECTED_SCHEDULERS[name]
    [scheduler] = built
    assert type(scheduler) is cls
    assert {key: scheduler.config[key] for key in options} == options
    assert result.images[0].size == (TEST_SIDE, TEST_SIDE)
    assert f"Schedule: {name}," in read_parameters(result.paths[0])


def test_scheduler_choice_does_not_leak_into_later_requests(service):
    first = run(service, seed=3, scheduler="K_EULER").images[0]
    run(service, seed=3, scheduler="KarrasDPM")
    again = run(service, seed=3, scheduler="K_EULER").images[0]
    assert max_diff(first, again) == 0


def test_expert_ensemble_splits_steps_at_high_noise_frac(service):
    with count_unet_calls(service) as calls:
        result = run(service, refine="expert_ensemble_refiner", num_inference_steps=10, high_noise_frac=0.7)
    assert calls == {"base": 7, "refiner": 3}
    assert result.metrics["base_steps"] == 7 and result.metrics["refiner_steps"] == 3


@pytest.mark.parametrize("refine_steps,strength", [(5, 0.3), (3, 0.5), (7, 0.9)])
def test_base_image_refiner_runs_exactly_refine_steps(service, refine_steps, strength):
    with count_unet_calls(service) as calls:
        run(service, refine="base_image_refiner", refine_steps=refine_steps, refine_strength=strength)
    assert calls == {"base": 4, "refiner": refine_steps}


def test_refiner_uses_the_chosen_scheduler(service):
    euler = run(service, seed=9, refine="base_image_refiner", refine_steps=2, scheduler="K_EULER").images[0]
    ddim = run(service, seed=9, refine="base_image_refiner", refine_steps=2, scheduler="DDIM").images[0]
    assert max_diff(euler, ddim) > 0


def test_refining_changes_the_image(service):
    plain = run(service, seed=11).images[0]
    refined = run(service, seed=11, refine="base_image_refiner", refine_steps=2).images[0]
    assert max_diff(plain, refined) > 0


def test_one_clean_log_line_per_step_per_stage(service, capsys):
    run(service, refine="expert_ensemble_refiner", num_inference_steps=5, high_noise_frac=0.6)
    out = capsys.readouterr().out
    assert "\r" not in out
    assert [line.split(" (")[0] for line in out.splitlines() if ": step " in line] == [
        "base: step 1/3",
        "base: step 2/3",
        "base: step 3/3",
        "refiner: step 1/2",
        "refiner: step 2/2",
    ]


def test_metrics_time_every_phase(service):
    metrics = run(service, refine="expert_ensemble_refiner").metrics
    for phase in ("text_encoding", "base_denoise", "refiner_denoise", "vae_decode", "safety_check", "image_encoding"):
        assert 0 < metrics[f"{phase}_time"] < metrics["total_time"], phase
    assert metrics["nsfw_flagged"] == [False]


def test_img2img_follows_the_image_size_when_unset(service, tmp_path):
    # A width that is no multiple of 8 is rounded down to one.
    result = run(service, image=source_image(tmp_path, (196, 128)), width=None, height=None)
    assert result.images[0].size == (192, 128)


def test_img2img_honours_width_and_height(service, tmp_path):
    # A portrait size from a landscape image (300x200).
    result = run(service, image=source_image(tmp_path), width=128, height=192)
    assert result.images[0].size == (128, 192)


def test_prompt_strength_changes_img2img(service, tmp_path):
    source = source_image(tmp_path)
    weak = run(service, image=source, prompt_strength=0.3).images[0]
    strong = run(service, image=source, prompt_strength=0.9).images[0]
    assert max_diff(weak, strong) > 0


@pytest.mark.parametrize("refine", ["no_refiner", "expert_ensemble_refiner", "base_image_refiner"])
def test_inpaint_keeps_black_region_exactly_and_repaints_white(service, tmp_path, refine):
    size, half = (TEST_SIDE, TEST_SIDE), TEST_SIDE // 2
    source = source_image(tmp_path, size)
    result = run(service, image=source, mask=half_mask(tmp_path, size), width=None, height=None, refine=refine)
    out, original = pixels(result.images[0]), pixels(source)
    assert np.array_equal(out[:, :half], original[:, :half])
    assert np.abs(out[:, half:] - original[:, half:]).mean() > 5


def test_inpaint_mask_of_another_size_is_fitted_to_the_image(service, tmp_path):
    source = source_image(tmp_path, (TEST_SIDE, TEST_SIDE))
    mask = half_mask(tmp_path, (TEST_SIDE // 4, TEST_SIDE // 4), "small-mask.png")
    out = pixels(run(service, image=source, mask=mask, width=None, height=None).images[0])
    half = TEST_SIDE // 2
    assert np.array_equal(out[:, :half], pixels(source)[:, :half])


def test_outputs_older_than_the_kept_predictions_are_removed(service, monkeypatch):
    monkeypatch.setattr(service, "outputs", OutputDirectory(service.settings.output_dir, keep=2))
    paths = [run(service, num_inference_steps=1).paths[0] for _ in range(3)]
    assert [p.exists() for p in paths] == [False, True, True]


def test_output_formats_and_embedded_parameters(service):
    for fmt, mime in (("png", "PNG"), ("jpg", "JPEG"), ("webp", "WEBP")):
        options = dataclasses.replace(DEFAULT_OPTIONS, output_format=fmt)
        path = run(service, options, prompt="a lighthouse", negative_prompt="fog", seed=77).paths[0]
        assert path.suffix == f".{fmt}" and Image.open(path).format == mime
        text = read_parameters(path)
        assert text.startswith("a lighthouse\nNegative prompt: fog\n")
        size = f"Size: {TEST_SIDE}x{TEST_SIDE}"
        for field in ("Steps: 4", "Sampler: Euler", "CFG scale: 7.5", "Seed: 77", size, "Model: "):
            assert field in text, (fmt, field)


def test_output_quality_changes_jpg(service):
    options = dataclasses.replace(DEFAULT_OPTIONS, output_format="jpg", output_quality=10)
    low = run(service, options, seed=4).paths[0].stat().st_size
    high = run(service, dataclasses.replace(options, output_quality=95), seed=4).paths[0].stat().st_size
    assert high > low
