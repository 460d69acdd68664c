"""Several checkpoints in one server: choosing per request, no state leaking between them, identical
components loaded once, and the GPU cache of checkpoints evicting the least recently used."""

from __future__ import annotations

import dataclasses
import shutil
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from devtools.synthetic import TURBO_PROFILE, add_model, lora_state_dict, merge_words
from sdxl_cog.checkpoints.cache import CheckpointCache
from sdxl_cog.config import WATERMARK_MIN_SIDE
from sdxl_cog.device import placement as placement_module
from sdxl_cog.device.placement import module_bytes
from sdxl_cog.errors import InputError
from sdxl_cog.outputs.metadata import read_parameters
from sdxl_cog.service import SDXLService
from sdxl_cog.weights.catalog import checkpoint_entries
from sdxl_cog.weights.layout import read_manifest, verify, write_manifest
from tests.conftest import DEFAULT_OPTIONS, TEST_SIDE, FakeGpuPlacement, max_diff, run

A, B, C, TURBO = "sdxl-base", "anime", "photo", "turbo"


@pytest.fixture(scope="module")
def multi_weights(tiny_weights, tmp_path_factory) -> Path:
    """The tiny weights plus B (its own UNet, base/'s text encoders) and C (its own UNet and text encoders)."""
    root = Path(shutil.copytree(tiny_weights, tmp_path_factory.mktemp("multi") / "weights"))
    add_model(root, B, seed=1)
    add_model(root, C, seed=2, own=("text_encoder", "text_encoder_2"))
    add_model(root, TURBO, seed=3, profile=TURBO_PROFILE)
    return root


def _service(settings, weights: Path, **overrides) -> SDXLService:
    return SDXLService(dataclasses.replace(settings, weights_dir=weights, **overrides))


@pytest.fixture(scope="module")
def multi(settings, multi_weights) -> SDXLService:
    return _service(settings, multi_weights)


def _image(service, model, **overrides):
    return run(service, model=model, num_inference_steps=2, seed=5, **overrides).images[0]


def test_the_manifest_lists_every_model_and_setup_checks_their_files(multi_weights):
    manifest = verify(multi_weights)
    assert [(c.name, c.folder) for c in checkpoint_entries(manifest)] == [
        (A, "base"),
        (B, "models/anime"),
        (C, "models/photo"),
        (TURBO, "models/turbo"),
    ]
    assert "models/photo/unet/diffusion_pytorch_model.fp16.safetensors" in manifest["files"]
    # Shared parts are one copy on disk: hard links to base/'s files.
    shared = multi_weights / "models/anime/text_encoder/model.fp16.safetensors"
    assert shared.stat().st_ino == (multi_weights / "base/text_encoder/model.fp16.safetensors").stat().st_ino
    (multi_weights / "models/photo/unet/diffusion_pytorch_model.fp16.safetensors").rename(multi_weights / "gone")
    try:
        with pytest.raises(Exception, match="models/photo/unet/diffusion_pytorch_model.fp16.safetensors"):
            verify(multi_weights)
    finally:
        (multi_weights / "gone").rename(multi_weights / "models/photo/unet/diffusion_pytorch_model.fp16.safetensors")


def test_a_weights_dir_of_one_model_loads_as_before(service, tiny_weights):
    assert "models" not in read_manifest(tiny_weights)
    result = run(service, num_inference_steps=1)
    assert result.metrics["model"] == service.checkpoints.default.name
    assert service.checkpoints.names == [service.checkpoints.default.name]


def test_identical_components_are_loaded_once(multi):
    parts = {name: multi.checkpoints.by_name[name].model.components for name in (A, B, C)}
    assert parts[B]["text_encoder"] is parts[A]["text_encoder"]
    assert (
        parts[B]["text_encoder_2"] is parts[A]["text_encoder_2"] is multi.weights.refiner.components["text_encoder_2"]
    )
    assert parts[B]["tokenizer"] is parts[A]["tokenizer"]
    assert parts[C]["text_encoder"] is not parts[A]["text_encoder"]
    assert len({id(p["unet"]) for p in parts.values()}) == 3
    assert parts[A]["vae"] is parts[B]["vae"] is parts[C]["vae"]


@pytest.fixture(scope="module")
def alone(settings, multi_weights) -> dict:
    """Each checkpoint's image from a fresh server that has run nothing else."""
    images = {}
    for name in (A, B, C):
        fresh = _service(settings, multi_weights)
        images[name] = _image(fresh, name)
        del fresh
    return images


def test_each_request_gets_its_models_image_as_if_run_alone(multi, alone):
    assert max_diff(alone[A], alone[B]) > 0 and max_diff(alone[A], alone[C]) > 0 and max_diff(alone[B], alone[C]) > 0
    for name in (A, B, A, C, A):
        assert max_diff(_image(multi, name), alone[name]) == 0, name


def test_no_state_leaks_between_models(multi, multi_weights, tmp_path):
    # Large enough for the watermark, which smaller images never get: a watermark left on would show.
    size = dict(width=WATERMARK_MIN_SIDE, height=WATERMARK_MIN_SIDE)
    a = _image(multi, A, **size)
    lora = multi.settings.lora_local_dirs[0] / "models-test.safetensors"
    lora.parent.mkdir(parents=True, exist_ok=True)
    save_file({f"unet.{k}": v for k, v in lora_state_dict(multi_weights).items()}, lora)
    watermarked = dataclasses.replace(DEFAULT_OPTIONS, apply_watermark=True)
    b_plain = _image(multi, B, **size)
    b_changed = run(
        multi,
        watermarked,
        lora=str(lora),
        lora_scale=1.0,
        model=B,
        num_inference_steps=2,
        seed=5,
        scheduler="DDIM",
        **size,
    ).images[0]
    assert max_diff(b_plain, b_changed) > 0
    assert max_diff(_image(multi, A, **size), a) == 0
    assert max_diff(_image(multi, B, **size), b_plain) == 0


def test_metrics_and_embedded_parameters_name_the_model(multi):
    result = run(multi, model=C, num_inference_steps=1)
    assert result.metrics["model"] == C
    text = read_parameters(result.paths[0])
    unet_hash = read_manifest(multi.settings.weights_dir)["files"][
        "models/photo/unet/diffusion_pytorch_model.fp16.safetensors"
    ]["sha256"]
    assert f"Model: {C}" in text and f"Model hash: {unet_hash[:10]}" in text


def test_an_unknown_model_is_refused_listing_the_models_there_are(multi):
    with pytest.raises(InputError, match=f"model='nope' is not in this image; it has: {A}, {B}, {C}, {TURBO}."):
        run(multi, model="nope")


def test_a_small_budget_evicts_the_least_recently_used_and_reloads_identically(settings, multi_weights, multi, alone):
    models = multi.checkpoints.by_name
    # Room for one checkpoint's own modules at a time (C's are the largest: UNet and both text encoders).
    one = sum(module_bytes(m) for m in models[C].own_modules())
    small = _service(settings, multi_weights, model_memory_bytes=one)
    cache = small.checkpoints.cache
    assert list(cache.resident) == [A]
    for name, loads in ((A, False), (B, True), (B, False), (A, True), (C, True), (A, True)):
        result = run(small, model=name, num_inference_steps=2, seed=5)
        assert ("model_load_time" in result.metrics) is loads, name
        assert list(cache.resident) == [name]
        assert max_diff(result.images[0], alone[name]) == 0, name


def test_low_vram_mode_runs_every_models_modules_only_on_the_device(settings, multi_weights, multi):
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(placement_module, "StagedPlacement", FakeGpuPlacement)
        staged = _service(settings, multi_weights, low_vram=True)
    placement, misplaced = staged.weights.placement, []

    def check(layer, _):
        if not placement.holds(layer, recurse=False):
            misplaced.append(layer)

    # C has its own text_encoder_2, so the refiner's must come on the device in its own slot.
    modules = {id(m): m for n in (A, C) for m in staged.checkpoints.by_name[n].model.components.values()}
    layers = [layer for m in modules.values() if isinstance(m, torch.nn.Module) for layer in m.modules()]
    hooks = [layer.register_forward_pre_hook(check) for layer in layers]
    request = dict(num_inference_steps=2, seed=5, refine="expert_ensemble_refiner")
    try:
        for name in (A, C, A):
            result = run(staged, model=name, **request)
            assert "model_load_time" not in result.metrics  # every stage copies its modules anyway
            assert max_diff(result.images[0], run(multi, model=name, **request).images[0]) == 0, name
    finally:
        for hook in hooks:
            hook.remove()
    assert not misplaced


# --- Profiles ---------------------------------------------------------------------------------------------


@contextmanager
def unet_batches(service, model):
    """The batch size of every call of `model`'s UNet: twice the images when classifier-free guidance runs."""
    batches = []
    unet = service.checkpoints.by_name[model].model.components["unet"]
    hook = unet.register_forward_hook(lambda module, args, output: batches.append(args[0].shape[0]))
    try:
        yield batches
    finally:
        hook.remove()


LEFT_OUT = dict(num_inference_steps=None, guidance_scale=None, width=None, height=None)


def test_the_turbo_profile_fills_what_the_request_leaves_out(multi, capsys):
    with unet_batches(multi, TURBO) as batches:
        result = run(multi, model=TURBO, profile=multi.profile(TURBO), **LEFT_OUT)
    assert batches == [1]  # one step, one image, no unconditional half: guidance is off
    assert result.images[0].size == (512, 512)
    assert {k: v for k, v in result.metrics.items() if k.startswith("model_defaults.")} == {
        "model_defaults.num_inference_steps": 1,
        "model_defaults.guidance_scale": 0.0,
        "model_defaults.width": 512,
        "model_defaults.height": 512,
    }
    # Trailing spacing: the single step starts from the last timestep (leading spacing would start at t=1,
    # leaving the noise untouched).
    assert "base: step 1/1 (t=999)" in capsys.readouterr().out
    text = read_parameters(result.paths[0])
    assert "Steps: 1," in text and "CFG scale: 0.0" in text and f"Model: {TURBO}" in text


def test_given_inputs_override_the_profile_and_other_models_keep_their_own(multi, capsys):
    with unet_batches(multi, TURBO) as batches:
        result = run(
            multi,
            model=TURBO,
            profile=multi.profile(TURBO),
            num_inference_steps=3,
            guidance_scale=2.0,
            width=TEST_SIDE,
            height=TEST_SIDE,
        )
    assert batches == [2, 2, 2] and not [k for k in result.metrics if k.startswith("model_defaults.")]
    capsys.readouterr()
    with unet_batches(multi, A) as batches:
        result = run(multi, model=A, profile=multi.profile(A), num_inference_steps=2, guidance_scale=None)
    assert batches == [2, 2] and result.metrics["model_defaults.guidance_scale"] == 7.5
    # The base's own (leading) spacing: nothing of the turbo's scheduler config leaked.
    assert "base: step 1/2 (t=501)" in capsys.readouterr().out


# --- The cache alone, on toy modules whose moves are recorded --------------------------------------------


def _toy(n: int) -> torch.nn.Module:
    return torch.nn.Linear(n, 1, bias=False)  # n float32 weights: 4n bytes


def test_lru_order_shared_modules_and_pinned_ones():
    shared, pinned = _toy(10), _toy(10)
    modules = {"a": [_toy(10), shared, pinned], "b": [_toy(10), shared], "c": [_toy(20)], "d": [_toy(10)]}
    moves = []
    cache = CheckpointCache(modules, [pinned], 4 * 30, lambda m, to: moves.append((m, to)))
    # a (own 10 + shared 10) and b (own 10, shares "shared") fit in 30; c does not fit next to them.
    assert list(cache.resident) == ["a", "b"] and not any(m is pinned for m, _ in moves)
    assert sum(m is shared for m, _ in moves) == 1  # brought once for both
    moves.clear()
    assert cache.use("a") is None and list(cache.resident) == ["b", "a"]  # already there: nothing moves
    assert moves == []
    assert cache.use("d") == ["b"]  # b is least recently used; "shared" stays for a
    assert list(cache.resident) == ["a", "d"]
    assert [(m is modules["b"][0], to) for m, to in moves] == [(True, False), (False, True)]
    # c (20) needs a's 20 bytes (its own and "shared", which no resident checkpoint holds any more).
    assert cache.use("c") == ["a"] and list(cache.resident) == ["d", "c"]
    assert cache.used_bytes() == 4 * 30


def test_the_prompt_length_is_checked_with_the_tokenizers_of_the_chosen_model(settings, weights_copy):
    """A checkpoint whose tokenizers read "aa" as one token takes a prompt that the default's (one token a
    character) finds too long: the limit is the chosen model's, not the default's."""
    add_model(weights_copy, "words", seed=4, own=("text_encoder", "text_encoder_2"))
    for tokenizer in ("tokenizer", "tokenizer_2"):
        merge_words(weights_copy / "models" / "words" / tokenizer, ["aa"])
    manifest = read_manifest(weights_copy)
    write_manifest(weights_copy, manifest["sources"], models=manifest["models"])
    service = _service(settings, weights_copy)
    prompt = " ".join(["aa"] * 400)  # 800 tokens a character at a time, 400 as words
    with pytest.raises(InputError, match="prompt is 800 tokens long"):
        run(service, prompt=prompt, num_inference_steps=1)
    result = run(service, model="words", prompt=prompt, num_inference_steps=1)
    assert result.metrics["model"] == "words"
