"""Synthetic SDXL weights: complete, deterministic, and loadable by the real diffusers pipelines."""

import json
import shutil
import stat

import numpy as np
import pytest
import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    PNDMScheduler,
    StableDiffusionXLImg2ImgPipeline,
    StableDiffusionXLPipeline,
)
from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
from PIL import Image
from transformers import CLIPImageProcessor, CLIPTokenizer

from devtools import synthetic
from sdxl_cog.config import MIN_SIDE
from sdxl_cog.weights.layout import REQUIRED_FILES, SAFETY_CHECKER_DIR, verify

# A ~200-character prompt: more than one 77-token chunk with any CLIP vocabulary.
LONG_PROMPT = (
    "a photograph of an astronaut riding a horse on the moon, highly detailed, dramatic lighting, "
    "cinematic composition, golden hour, by a famous photographer, sharp focus, volumetric fog, 8k"
)
SIZE = MIN_SIDE  # pixels, the smallest a request may ask for: 16x16 latents keep a two-step run quick
# The pipelines load in fp32 on CPU. The dtype must be explicit: with none, diffusers upcasts the fp16
# UNet to fp32 while transformers 5 keeps the text encoders in their fp16 file dtype, and they clash.
DTYPE = torch.float32


@pytest.fixture(scope="module")
def weights(tiny_weights):
    """The session's tiny weights (conftest: synthetic.make_weights(size="tiny", seed=0)), which no test alters;
    the checks below would see it if one did."""
    return tiny_weights


@pytest.fixture(scope="module")
def base(weights):
    vae = AutoencoderKL.from_pretrained(weights / "vae", dtype=DTYPE, variant="fp16")
    pipe = StableDiffusionXLPipeline.from_pretrained(
        weights / "base", vae=vae, variant="fp16", add_watermarker=False, dtype=DTYPE
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generate(pipe, seed):
    generator = torch.Generator().manual_seed(seed)
    return pipe("a fox", num_inference_steps=2, width=SIZE, height=SIZE, generator=generator).images[0]


def test_tiny_weights_are_complete_and_match_their_manifest(weights):
    manifest = verify(weights, full_hash=True)
    assert set(REQUIRED_FILES) <= set(manifest["files"])
    assert all("synthetic tiny weights, seed 0" in source for source in manifest["sources"].values())
    for name in manifest["files"]:
        assert (weights / name).stat().st_mode & stat.S_IROTH, f"{name} is not world-readable"


def test_same_seed_same_bytes_other_seed_other_weights(weights, tmp_path):
    files = json.loads((weights / "manifest.json").read_text())["files"]
    assert synthetic.make_weights(tmp_path / "again", seed=0)["files"] == files
    other = synthetic.make_weights(tmp_path / "other", seed=1)["files"]
    changed = {name for name in files if other[name] != files[name]}
    assert changed == {name for name in files if name.endswith(".safetensors")}


def test_full_configs_are_the_published_architecture():
    configs = synthetic.sdxl_configs("full")
    for name in ("text_encoder", "text_encoder_2", "unet_base", "unet_refiner"):
        assert configs[name] == synthetic.architecture(name), name
    assert configs["vae"] == {**synthetic.architecture("vae"), "force_upcast": False}


def test_every_sampler_reads_the_scheduler_config_as_on_the_real_weights(weights):
    """SDXL's scheduler_config.json names Euler but also carries what other samplers read: DDIM neither clips its
    predictions nor ends at alpha 1 there, and PLMS skips its Runge-Kutta warm-up."""
    for pipeline in ("base", "refiner"):
        config = json.loads((weights / pipeline / "scheduler" / "scheduler_config.json").read_text())
        ddim = DDIMScheduler.from_config(config).config
        assert (ddim.clip_sample, ddim.set_alpha_to_one, ddim.sample_max_value) == (False, False, 1.0), pipeline
        assert PNDMScheduler.from_config(config).config.skip_prk_steps, pipeline


def test_unknown_size_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="tiny, full"):
        synthetic.make_weights(tmp_path, size="huge")
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize(("directory", "pad_token"), [("tokenizer", "<|endoftext|>"), ("tokenizer_2", "!")])
def test_tokenizers_are_clip_shaped(weights, directory, pad_token):
    tokenizer = CLIPTokenizer.from_pretrained(weights / "base" / directory)
    vocab_size = json.loads((weights / "base/text_encoder/config.json").read_text())["vocab_size"]
    assert len(tokenizer) == vocab_size
    # EOS must be the highest id: SDXL's text encoders pool at argmax(input_ids).
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id) == (vocab_size - 2, vocab_size - 1)
    assert tokenizer.pad_token == pad_token and tokenizer.model_max_length == synthetic.MAX_TOKENS
    ids = tokenizer(LONG_PROMPT).input_ids
    assert len(ids) > synthetic.MAX_TOKENS
    assert ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id


def test_base_pipeline_generates_and_the_seed_matters(base):
    assert base.vae_scale_factor == 8
    first, second = generate(base, seed=1), generate(base, seed=2)
    assert first.size == second.size == (SIZE, SIZE)
    assert np.asarray(first).std() > 5, "a flat image: the random weights lost the signal"
    assert not np.array_equal(np.asarray(first), np.asarray(second))


def test_refiner_refines_the_base_image(weights, base):
    refiner = StableDiffusionXLImg2ImgPipeline.from_pretrained(
        weights / "refiner",
        text_encoder_2=base.text_encoder_2,
        tokenizer_2=base.tokenizer_2,
        vae=base.vae,
        variant="fp16",
        add_watermarker=False,
        dtype=DTYPE,
    )
    refiner.set_progress_bar_config(disable=True)
    image = generate(base, seed=1)
    refined = refiner("a fox", image=image, num_inference_steps=2, strength=0.5).images[0]
    assert refined.size == (SIZE, SIZE)
    assert not np.array_equal(np.asarray(refined), np.asarray(image))


def check_images(root, images):
    """Run the safety checker under `root` as the pipelines do; returns its flags."""
    processor = CLIPImageProcessor.from_pretrained(root / SAFETY_CHECKER_DIR)
    checker = StableDiffusionSafetyChecker.from_pretrained(root / SAFETY_CHECKER_DIR, variant="fp16")
    clip_input = processor(images=images, return_tensors="pt").pixel_values
    arrays = np.stack([np.asarray(image, dtype=np.float32) / 255 for image in images])
    _, flags = checker(clip_input=clip_input, images=arrays)
    return flags


def test_safety_checker_flags_nothing_by_default_and_everything_when_told(weights, tmp_path):
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)) for _ in range(3)]
    images += [Image.new("RGB", (SIZE, SIZE), color) for color in ("black", "white")]
    assert check_images(weights, images) == [False] * len(images)

    flagged = tmp_path / "flagged"
    shutil.copytree(weights, flagged)
    synthetic.set_safety_checker_flags_everything(flagged)
    verify(flagged, full_hash=True)
    assert check_images(flagged, images) == [True] * len(images)
