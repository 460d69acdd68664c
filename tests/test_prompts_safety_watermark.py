"""Long prompts, the safety checker and the watermark, on tiny synthetic weights."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from PIL import Image

from devtools.synthetic import set_safety_checker_flags_everything
from sdxl_cog.config import WATERMARK_MIN_SIDE
from sdxl_cog.errors import InputError
from sdxl_cog.finishing.watermark import has_watermark
from sdxl_cog.generation.prompts import encode_prompts
from sdxl_cog.service import SDXLService
from tests.conftest import DEFAULT_OPTIONS, TEST_SIDE, make_request, max_diff

WORDS = "alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike".split()


def long_prompt(tail: str) -> str:
    # The synthetic tokenizer spells words out, so this is far past 77 tokens before the tail.
    return " ".join(WORDS * 3) + " " + tail


def predict_image(service, options=DEFAULT_OPTIONS, **overrides) -> Image.Image:
    prediction = service.predict(make_request(**overrides), options, None, 0.6)
    image = Image.open(prediction.paths[0])
    image.load()
    return image


def test_short_prompt_encodes_exactly_like_the_stock_pipeline(service):
    pipe = service.checkpoints.default.pipeline
    ours = encode_prompts(
        [pipe.tokenizer, pipe.tokenizer_2], [pipe.text_encoder, pipe.text_encoder_2], "a cat", "a dog", True
    )
    embeds, negative, pooled, negative_pooled = pipe.encode_prompt("a cat", device="cpu", negative_prompt="a dog")
    torch.testing.assert_close(ours.prompt_embeds, embeds)
    torch.testing.assert_close(ours.negative_prompt_embeds, negative)
    torch.testing.assert_close(ours.pooled_prompt_embeds, pooled)
    torch.testing.assert_close(ours.negative_pooled_prompt_embeds, negative_pooled)


def test_words_past_token_77_change_the_embeddings_and_the_image(service):
    tokenizer = service.checkpoints.default.pipeline.tokenizer
    assert len(tokenizer(long_prompt("zebra")).input_ids) > 2 * 77
    a = predict_image(service, prompt=long_prompt("zebra"), seed=3)
    b = predict_image(service, prompt=long_prompt("volcano"), seed=3)
    assert max_diff(a, b) > 0


def test_long_negative_prompt_pads_to_the_same_length(service):
    image = predict_image(
        service, prompt="short", negative_prompt=long_prompt("blurry"), refine="expert_ensemble_refiner"
    )
    assert image.size == (TEST_SIDE, TEST_SIDE)


def test_flagged_images_come_back_black_and_are_counted(weights_copy, settings, capsys):
    set_safety_checker_flags_everything(weights_copy)
    flagging = SDXLService(dataclasses.replace(settings, weights_dir=weights_copy))
    prediction = flagging.predict(make_request(num_outputs=2, seed=1), DEFAULT_OPTIONS, None, 0.6)
    assert len(prediction.paths) == 2
    assert prediction.metrics["nsfw_flagged"] == [True, True]
    assert all(Image.open(p).getextrema() == ((0, 0), (0, 0), (0, 0)) for p in prediction.paths)
    assert "Output 1 (seed 2) was flagged by the safety checker" in capsys.readouterr().out
    # Turning the checker off returns the real images.
    options = dataclasses.replace(DEFAULT_OPTIONS, safety_check=False)
    unchecked = flagging.predict(make_request(seed=1), options, None, 0.6)
    assert Image.open(unchecked.paths[0]).getextrema() != ((0, 0), (0, 0), (0, 0))
    assert unchecked.metrics["nsfw_flagged"] == [False]


def test_watermark_is_readable_and_switching_it_off_never_leaks(service, settings):
    marked = dataclasses.replace(DEFAULT_OPTIONS, apply_watermark=True)
    unmarked = dataclasses.replace(DEFAULT_OPTIONS, apply_watermark=False)
    size = {"width": WATERMARK_MIN_SIDE, "height": WATERMARK_MIN_SIDE, "seed": 21}
    assert has_watermark(predict_image(service, marked, **size))
    assert not has_watermark(predict_image(service, unmarked, **size))
    # A request that turns it off and then fails must not leave it off for the next one.
    outside = str(settings.lora_cache_dir.parent / "elsewhere.safetensors")
    with pytest.raises(InputError, match="outside the allowed directories"):
        service.predict(make_request(**size), unmarked, outside, 0.6)
    assert has_watermark(predict_image(service, marked, **size))
