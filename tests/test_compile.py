"""SDXL_COMPILE on the CPU (inductor, with gcc): every mode gives the uncompiled image within a tolerance, the warmed
size really runs compiled graphs, nothing compiles during a request, and LoRA, low-VRAM mode and a model switch keep
working.

Tolerance: at most 2 levels of 255 on any pixel, 0.05 on average. Compiled kernels sum in another order than
PyTorch's (fused projections, channels_last convolutions, inductor's reductions), which moves float32 results by
~1e-6 relative; through a few denoising steps and the decode that shows as a pixel off by 1 here and there (observed:
at most 1, mean under 0.001). A wrong graph (a LoRA ignored, a stale weight, a missing block) moves pixels by tens.

The compile tier's cost: the session's compiled service compiles six graphs at its first build (about a minute on
the 2-core CPU machine, cold cache); every other compiled service here reuses them (seconds).
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import UNet2DConditionModel
from diffusers.models.attention_processor import AttnProcessor2_0, FusedAttnProcessor2_0
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors.torch import save_file

from devtools.synthetic import add_model, lora_state_dict
from devtools.synthetic_control import add_control
from sdxl_cog.config import Settings, parse_compile_sizes
from sdxl_cog.device import compilation
from sdxl_cog.device import placement as placement_module
from sdxl_cog.device.placement import module_bytes
from sdxl_cog.errors import InputError
from sdxl_cog.inputs.control import ControlInput
from sdxl_cog.service import SDXLService
from sdxl_cog.weights.layout import BASE_DIR
from tests.conftest import TEST_SIDE, FakeGpuPlacement, half_mask, pixels, run, source_image

# Minutes of compiling on 2 cores: in make test, not make test-fast (pytest.ini).
pytestmark = pytest.mark.compile

MAX_PIXEL_DIFF = 2
MAX_MEAN_DIFF = 0.05
SECOND = "second"


@pytest.fixture
def strict(monkeypatch):
    """Requests fail instead of running uncompiled when no compiled graph fits: proof that they ran compiled."""
    monkeypatch.setattr(compilation, "SERVING_STANCE", "fail_on_recompile")


def assert_close(compiled, plain) -> None:
    diff = np.abs(pixels(compiled) - pixels(plain))
    print(f"max {diff.max()}, mean {diff.mean():.5f}")
    assert diff.max() <= MAX_PIXEL_DIFF and diff.mean() <= MAX_MEAN_DIFF, (diff.max(), diff.mean())


def unique_graphs() -> int:
    return torch._dynamo.utils.counters["stats"]["unique_graphs"]


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict[str, Path]:
    """A source image and a mask at the warmed size (img2img and inpaint keep the image's size)."""
    directory = tmp_path_factory.mktemp("sources")
    size = (TEST_SIDE, TEST_SIDE)
    return {"image": source_image(directory, size), "mask": half_mask(directory, size)}


MODES = {
    "txt2img": {},
    "expert_ensemble": {"refine": "expert_ensemble_refiner"},
    "base_image_refiner": {"refine": "base_image_refiner"},
    "img2img": {"image": "image"},
    "inpaint": {"image": "image", "mask": "mask"},
    "refiner_only": {"image": "image", "refine": "refiner_only"},
    "refiner_only_masked": {"image": "image", "mask": "mask", "refine": "refiner_only"},
    "another_sampler_and_a_negative_prompt": {"scheduler": "DPMSolverMultistep", "negative_prompt": "blurry"},
}


@pytest.mark.parametrize("mode", MODES)
def test_every_mode_runs_compiled_and_matches_the_uncompiled_image(mode, service, compiled_service, sources, strict):
    request = {k: sources[v] if k in ("image", "mask") else v for k, v in MODES[mode].items()}
    graphs = unique_graphs()
    compiled = run(compiled_service, seed=7, **request)
    assert unique_graphs() == graphs  # warmed at setup: nothing compiled now
    assert_close(compiled.images[0], run(service, seed=7, **request).images[0])


def test_a_size_that_was_not_warmed_runs_uncompiled_and_compiles_nothing(service, compiled_service, monkeypatch):
    other = dict(width=TEST_SIDE + 8, height=TEST_SIDE, seed=3)
    graphs = unique_graphs()
    assert_close(run(compiled_service, **other).images[0], run(service, **other).images[0])
    assert unique_graphs() == graphs
    # The same request where a recompile is an error: it would have needed one, so it did run uncompiled.
    monkeypatch.setattr(compilation, "SERVING_STANCE", "fail_on_recompile")
    with pytest.raises(RuntimeError, match="Detected recompile"):
        run(compiled_service, **other)


def test_setup_fused_the_projections_kept_sdpa_and_froze_the_weights(service, compiled_service):
    plain_unet = service.checkpoints.default.model.components["unet"]
    unet = compiled_service.checkpoints.default.model.components["unet"]
    # SDPA is diffusers' default processor (torch 2); the fused one is SDPA too.
    assert {type(p) for p in plain_unet.attn_processors.values()} == {AttnProcessor2_0}
    assert {type(p) for p in unet.attn_processors.values()} == {FusedAttnProcessor2_0}
    assert not any(p.requires_grad for p in unet.parameters())
    conv = compiled_service.weights.refiner.components["vae"].decoder.conv_in.weight
    assert conv.is_contiguous(memory_format=torch.channels_last)
    assert compiled_service.weights.load_seconds["warmup"] > 0


def test_a_unet_is_fused_once(tiny_weights):
    """Fusing twice would take the fused processors for the ones as loaded, and a LoRA would then be ignored."""
    unet = UNet2DConditionModel.from_pretrained(tiny_weights / BASE_DIR / "unet", variant="fp16")
    compilation.FusedAttention(unet)
    with pytest.raises(RuntimeError, match="fused already"):
        compilation.FusedAttention(unet)


@pytest.fixture(scope="module")
def lora_file(tiny_weights, settings) -> Path:
    path = settings.lora_local_dirs[0] / "compile-test.safetensors"
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({f"unet.{k}": v for k, v in lora_state_dict(tiny_weights).items()}, path)
    return path


def peft_layers(service) -> int:
    unet = service.checkpoints.default.model.components["unet"]
    return sum(isinstance(m, BaseTunerLayer) for m in unet.modules())


# The synthetic LoRA is scaled up to show (devtools/synthetic.py): at lora_scale 1 its queries and keys are ~40 times
# the base's, the softmax saturates, and the 1e-6 that channels_last moves a GroupNorm by grows into tens of levels
# (a chaotic result, not a wrong one). At 0.2 it still moves the image by up to ~90 levels, in a well-conditioned way.
LORA_SCALE = 0.2


def test_a_lora_runs_uncompiled_on_the_split_projections_then_the_compiled_graphs_return(
    service, compiled_service, lora_file, monkeypatch
):
    before = run(compiled_service, seed=11)
    # The LoRA adapts to_q, to_k and to_v: the fused projections would silently drop it.
    with_lora = run(compiled_service, lora=str(lora_file), lora_scale=LORA_SCALE, seed=11)
    assert_close(with_lora.images[0], run(service, lora=str(lora_file), lora_scale=LORA_SCALE, seed=11).images[0])
    assert np.abs(pixels(with_lora.images[0]) - pixels(before.images[0])).max() > 20  # the LoRA did change it
    assert peft_layers(compiled_service) == 0  # unloaded: the blocks have their own modules back
    monkeypatch.setattr(compilation, "SERVING_STANCE", "fail_on_recompile")
    assert np.array_equal(pixels(run(compiled_service, seed=11).images[0]), pixels(before.images[0]))
    # And again: the projections split and fuse as often as LoRA requests come and go.
    again = run(compiled_service, lora=str(lora_file), lora_scale=LORA_SCALE, seed=11)
    assert np.array_equal(pixels(again.images[0]), pixels(with_lora.images[0]))


def test_a_lora_that_fails_to_load_leaves_the_compiled_path_as_it_was(compiled_service, settings, strict):
    before = run(compiled_service, seed=12)
    bad = settings.lora_local_dirs[0] / "compile-wrong-keys.safetensors"
    save_file({"some.unrelated.weight": torch.ones(3, 3)}, bad)
    with pytest.raises(InputError):
        run(compiled_service, lora=str(bad), seed=12)
    assert peft_layers(compiled_service) == 0
    assert np.array_equal(pixels(run(compiled_service, seed=12).images[0]), pixels(before.images[0]))


@pytest.fixture(scope="module")
def pair_weights(tiny_weights, tmp_path_factory) -> Path:
    """The tiny weights plus a second checkpoint with its own UNet."""
    root = Path(shutil.copytree(tiny_weights, tmp_path_factory.mktemp("pair") / "weights"))
    add_model(root, SECOND, seed=1)
    return root


def compiled_settings(compiled_service, weights: Path, **overrides) -> Settings:
    return dataclasses.replace(compiled_service.settings, weights_dir=weights, **overrides)


@pytest.fixture(scope="module")
def compiled_pair(compiled_service, pair_weights) -> SDXLService:
    return SDXLService(compiled_settings(compiled_service, pair_weights))


def test_a_model_switch_through_a_one_checkpoint_cache_stays_compiled(
    compiled_service, compiled_pair, settings, pair_weights, monkeypatch
):
    plain = SDXLService(dataclasses.replace(settings, weights_dir=pair_weights))
    # Room for one checkpoint's own modules (the fused projections included): every switch evicts one and brings
    # the other in (module.to()).
    one = sum(module_bytes(m) for m in compiled_pair.checkpoints.by_name[SECOND].own_modules())
    graphs = unique_graphs()
    switching = SDXLService(compiled_settings(compiled_service, pair_weights, model_memory_bytes=one))
    assert unique_graphs() == graphs  # the second checkpoint's blocks reuse the warmed graphs
    monkeypatch.setattr(compilation, "SERVING_STANCE", "fail_on_recompile")
    for name in (SECOND, None, SECOND):
        result = run(switching, model=name, seed=5, refine="expert_ensemble_refiner")
        assert "model_load_time" in result.metrics
        assert_close(result.images[0], run(plain, model=name, seed=5, refine="expert_ensemble_refiner").images[0])


def test_low_vram_mode_stays_compiled_while_the_weights_move(service, compiled_service, tiny_weights, monkeypatch):
    with monkeypatch.context() as patch:
        patch.setattr(placement_module, "StagedPlacement", FakeGpuPlacement)
        staged = SDXLService(compiled_settings(compiled_service, tiny_weights, low_vram=True))
    assert staged.weights.placement.low_vram
    monkeypatch.setattr(compilation, "SERVING_STANCE", "fail_on_recompile")
    for request in (dict(seed=9, refine="expert_ensemble_refiner"), dict(seed=9)):
        assert_close(run(staged, **request).images[0], run(service, **request).images[0])


@pytest.fixture(scope="module")
def control_weights(tiny_weights, tmp_path_factory) -> Path:
    """The tiny weights with every control model baked: canny, depth and union ControlNets, an IP-Adapter."""
    root = Path(shutil.copytree(tiny_weights, tmp_path_factory.mktemp("control") / "weights"))
    add_control(root)
    return root


def test_controlnets_run_compiled_and_an_image_prompt_uncompiled_on_an_unfused_unet(
    compiled_service, settings, control_weights, sources, monkeypatch
):
    plain = SDXLService(dataclasses.replace(settings, weights_dir=control_weights))
    compiled = SDXLService(compiled_settings(compiled_service, control_weights))
    # The IP-Adapter's processors carry its image projections: that UNet keeps them, unfused.
    unet = compiled.checkpoints.default.model.components["unet"]
    assert not compiled.weights.compiled.of(unet).fusable
    assert not any(isinstance(p, FusedAttnProcessor2_0) for p in unet.attn_processors.values())
    canny = [ControlInput("canny", sources["image"], False, 1.0, 0.0, 1.0)]
    union = [ControlInput("depth", sources["image"], False, 1.0, 0.0, 1.0)]
    monkeypatch.setattr(compilation, "SERVING_STANCE", "fail_on_recompile")
    for request in ({}, {"controls": canny}, {"controls": union}):
        assert_close(run(compiled, seed=4, **request).images[0], run(plain, seed=4, **request).images[0])
    # An image prompt changes the IP-Adapter's scale the graphs were traced with: it runs uncompiled.
    monkeypatch.setattr(compilation, "SERVING_STANCE", "eager_on_recompile")
    prompt = {"ip_adapter_image": sources["image"], "ip_adapter_scale": 0.6}
    assert_close(run(compiled, seed=4, **prompt).images[0], run(plain, seed=4, **prompt).images[0])


def test_setup_refuses_compilation_without_a_compiler_naming_it(compiled_service, tiny_weights, monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")
    monkeypatch.delenv("CXX", raising=False)
    with pytest.raises(RuntimeError, match="needs a compiler: none of g\\+\\+, clang\\+\\+ is on PATH"):
        SDXLService(compiled_settings(compiled_service, tiny_weights))


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_compilation_is_refused_without_python_s_headers_naming_the_package(device, tmp_path, monkeypatch):
    """A compiler alone is not enough: Triton's launcher and inductor's CPU kernels include Python.h."""
    monkeypatch.setattr(compilation.sysconfig, "get_paths", lambda scheme=None: {"include": str(tmp_path)})
    monkeypatch.setenv("CC", "gcc")
    monkeypatch.setenv("CXX", "g++")
    with pytest.raises(RuntimeError, match=f"{tmp_path / 'Python.h'} is missing. Install python3-dev"):
        compilation.check_toolchain(device)
    (tmp_path / "Python.h").write_text("")
    compilation.check_toolchain(device)


# --- Settings ------------------------------------------------------------------------------------------------------


def test_compilation_is_off_by_default_and_its_settings_come_from_the_environment(monkeypatch):
    for name in ("SDXL_COMPILE", "SDXL_COMPILE_CACHE_DIR", "SDXL_COMPILE_SIZES"):
        monkeypatch.delenv(name, raising=False)
    default = Settings.from_env()
    assert (default.compile, default.compile_sizes) == (False, ())
    monkeypatch.setenv("SDXL_COMPILE", "1")
    monkeypatch.setenv("SDXL_COMPILE_CACHE_DIR", "/var/cache/sdxl")
    monkeypatch.setenv("SDXL_COMPILE_SIZES", "1024x1024, 1152x896x4,1024x1024")
    chosen = Settings.from_env()
    assert chosen.compile and chosen.compile_cache_dir == Path("/var/cache/sdxl")
    assert chosen.compile_sizes == ((1024, 1024, 1), (1152, 896, 4))


@pytest.mark.parametrize(
    "text",
    [
        "1024",
        "1024x1020",
        "64x64",
        "1024x1024x5",
        "axb",
        "1024x1024x1x1",
        ",".join(["512x512"] * 2 + [f"{128 + 8 * i}x128" for i in range(8)]),
    ],
)
def test_bad_compile_sizes_are_refused_naming_the_variable(text):
    with pytest.raises(ValueError, match="SDXL_COMPILE_SIZES"):
        parse_compile_sizes(text)
