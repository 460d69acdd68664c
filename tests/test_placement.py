"""Low-VRAM mode: which GPUs select it, how modules move between CPU and device, and that a prediction
runs every module only while its stage holds it on the device, with the same images as resident mode."""

from __future__ import annotations

import dataclasses
import inspect
import re
import shutil
from pathlib import Path

import pytest
import torch

from devtools.synthetic_control import add_control, tensor_bytes
from predict import Predictor
from sdxl_cog.config import Settings
from sdxl_cog.device import placement as placement_module
from sdxl_cog.device.memory import GIB, MemoryBudget, needs_low_vram
from sdxl_cog.device.placement import ResidentPlacement, StagedPlacement, make_placement, module_bytes, stage_peak_bytes
from sdxl_cog.inputs.control import MAX_CONTROLS, ControlInput
from sdxl_cog.service import SDXLService
from tests.conftest import (
    DEFAULT_OPTIONS,
    TEST_SIDE,
    FakeGpuPlacement,
    half_mask,
    make_request,
    max_diff,
    run,
    source_image,
)

# SDXL 1.0 in fp16, bytes per placed module.
SDXL_FP16 = {
    "base_unet": 5_140_000_000,
    "refiner_unet": 4_520_000_000,
    "text_encoder_2": 1_390_000_000,
    "text_encoder": 250_000_000,
    "vae": 170_000_000,
    "safety_checker": 610_000_000,
}
ALL_WEIGHTS = sum(SDXL_FP16.values())
REFERENCE = dict(width=1024, height=1024, num_outputs=4, refine="expert_ensemble_refiner")
# A request with the refiner and the safety checker, and no control: the stages it passes through, in order.
STAGES_WITH_SAFETY_CHECK = ["text_encoding", "base", "refiner", "vae_decode_and_safety_check"]


# --- The decision rule ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "gpu,capacity_gib,low_vram",
    [
        ("none (CPU)", None, False),
        ("H100 80 GB", 79.1, False),
        ("RTX 4090 / 3090, 24 GB", 23.6, False),
        ("A10G / L4, 24 GB", 22.0, False),
        ("20 GB", 19.5, True),
        ("T4 / V100, 16 GB", 14.6, True),
        ("RTX 3060, 12 GB", 11.7, True),
    ],
)
def test_gpus_smaller_than_24_gb_select_low_vram_mode(gpu, capacity_gib, low_vram):
    capacity = None if capacity_gib is None else int(capacity_gib * GIB)
    assert needs_low_vram(capacity, ALL_WEIGHTS) is low_vram, gpu


def test_the_reference_request_fits_24_gb_resident_and_16_gb_staged():
    assert stage_peak_bytes(SDXL_FP16) == SDXL_FP16["base_unet"] + SDXL_FP16["vae"]
    MemoryBudget(int(22.0 * GIB), ALL_WEIGHTS).check(make_request(**REFERENCE))
    MemoryBudget(int(14.6 * GIB), stage_peak_bytes(SDXL_FP16)).check(make_request(**REFERENCE))
    # A 12 GB card in low-VRAM mode still serves two 1024px images, not four.
    small = MemoryBudget(int(11.7 * GIB), stage_peak_bytes(SDXL_FP16))
    small.check(make_request(**{**REFERENCE, "num_outputs": 2}))
    with pytest.raises(Exception, match="need about"):
        small.check(make_request(**REFERENCE))


def _toy_modules() -> dict[str, torch.nn.Module]:
    torch.manual_seed(0)
    return {name: torch.nn.Linear(8, 8) for name in SDXL_FP16}


@pytest.mark.parametrize(
    "low_vram,capacity_gib,expected",
    [(None, None, ResidentPlacement), (None, 80, ResidentPlacement), (None, 4, StagedPlacement)]
    + [(True, None, StagedPlacement), (False, 4, ResidentPlacement)],
)
def test_setup_picks_the_placement_from_the_gpu_unless_the_operator_chose(low_vram, capacity_gib, expected):
    capacity = None if capacity_gib is None else capacity_gib * GIB
    assert type(make_placement("cpu", _toy_modules(), low_vram, capacity)) is expected


@pytest.mark.parametrize("value,expected", [(None, None), ("auto", None), ("1", True), ("true", True), ("0", False)])
def test_sdxl_low_vram_environment(monkeypatch, value, expected):
    if value is None:
        monkeypatch.delenv("SDXL_LOW_VRAM", raising=False)
    else:
        monkeypatch.setenv("SDXL_LOW_VRAM", value)
    assert Settings.from_env().low_vram is expected


# --- Moving modules, on a fake GPU ----------------------------------------------------------------


def _placed(placement: FakeGpuPlacement, modules) -> set[str]:
    return {name for name, m in modules.items() if placement.holds(m)}


def test_a_stage_brings_its_modules_and_eviction_restores_the_very_same_cpu_tensors():
    modules = _toy_modules()
    originals = {name: m.weight.detach().clone() for name, m in modules.items()}
    parameters = {name: list(m.parameters()) for name, m in modules.items()}
    placement = FakeGpuPlacement("cpu", modules)
    host_pointers = {name: m.weight.data_ptr() for name, m in modules.items()}
    assert _placed(placement, modules) == set()

    placement.use("base")
    assert _placed(placement, modules) == {"base_unet", "vae"} == placement.on_device
    vae_copy = modules["vae"].weight.data_ptr()
    placement.use("refiner")
    assert _placed(placement, modules) == {"refiner_unet", "vae"}
    assert modules["vae"].weight.data_ptr() == vae_copy  # kept, not copied again
    # Evicted without a copy: the same CPU storage, the same values, the same Parameter objects.
    base = modules["base_unet"]
    assert base.weight.data_ptr() == host_pointers["base_unet"] and torch.equal(base.weight, originals["base_unet"])
    assert all(list(m.parameters()) == parameters[n] for n, m in modules.items())

    # A tensor added between requests (a LoRA) travels too, and comes back intact.
    base.lora = torch.nn.Linear(8, 2)
    lora = base.lora.weight.detach().clone()
    placement.use("base")
    assert placement.holds(base.lora)
    placement.use("vae_decode_and_safety_check")
    assert _placed(placement, modules) == {"vae", "safety_checker"}
    assert torch.equal(base.lora.weight, lora)
    assert all(torch.equal(modules[n].weight, originals[n]) for n in modules)


def test_a_copy_cut_short_by_out_of_memory_leaves_nothing_behind():
    modules = _toy_modules()
    placement = FakeGpuPlacement("cpu", modules)
    copy, calls = placement._copy_to_device, []

    def fails_on_the_second_tensor(host):
        calls.append(host)
        if len(calls) == 2:
            raise torch.OutOfMemoryError("CUDA out of memory")
        return copy(host)

    placement._copy_to_device = fails_on_the_second_tensor
    with pytest.raises(torch.OutOfMemoryError):
        placement.use("text_encoding")
    # Not even the tensor copied before the failure stays on the device.
    assert not any(t.data_ptr() in placement.device_storages for m in modules.values() for t in m.parameters())
    del placement._copy_to_device
    placement.use("text_encoding")
    assert _placed(placement, modules) == {"text_encoder", "text_encoder_2"} == placement.on_device


# --- A prediction in low-VRAM mode, on the tiny engine -------------------------------------------


@pytest.fixture(scope="module")
def staged_service(settings) -> SDXLService:
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(placement_module, "StagedPlacement", FakeGpuPlacement)
        return SDXLService(dataclasses.replace(settings, low_vram=True))


class DeviceTracker:
    """Records the stages of a prediction, and each layer that computed with weights off the fake GPU."""

    def __init__(self, placement: FakeGpuPlacement):
        self.placement, self.stages, self.misplaced, self.resident_bytes = placement, [], set(), []
        self.placed_by_stage: list[tuple[str, set[str]]] = []
        self.handles = [
            layer.register_forward_pre_hook(lambda layer, _, name=name: self._ran(name, layer))
            for name, module in placement.modules.items()
            for layer in module.modules()
        ]
        self._use = placement.use
        placement.use = self._record

    def _ran(self, name: str, layer: torch.nn.Module) -> None:
        if not self.placement.holds(layer, recurse=False):
            self.misplaced.add((name, self.stages[-1] if self.stages else None))

    def _record(self, stage: str, extra: tuple[str, ...] = ()) -> None:
        self._use(stage, extra)
        self.stages.append(stage)
        placed = _placed(self.placement, self.placement.modules)
        self.placed_by_stage.append((stage, placed))
        assert placed == self.placement.on_device and not {"base_unet", "refiner_unet"} <= placed
        self.resident_bytes.append(sum(module_bytes(self.placement.modules[n]) for n in placed))

    def close(self) -> None:
        del self.placement.use
        for handle in self.handles:
            handle.remove()


@pytest.fixture
def tracker(staged_service):
    tracker = DeviceTracker(staged_service.weights.placement)
    yield tracker
    tracker.close()


def test_every_module_of_both_pipelines_is_placed(staged_service):
    placed = {id(m) for m in staged_service.weights.placement.modules.values()}
    for model in (staged_service.checkpoints.default.model, staged_service.weights.refiner):
        modules = [m for m in model.components.values() if isinstance(m, torch.nn.Module)]
        assert {id(m) for m in modules} <= placed, model.stage


def test_low_vram_mode_runs_each_module_only_in_its_stage_with_the_same_images(service, staged_service, tracker):
    placement = staged_service.weights.placement
    staged = run(staged_service, seed=21, num_outputs=2, refine="expert_ensemble_refiner")
    assert tracker.stages == STAGES_WITH_SAFETY_CHECK and not tracker.misplaced
    assert max(tracker.resident_bytes) == placement.peak_bytes < sum(map(module_bytes, placement.modules.values()))
    assert staged_service.budget.resident_bytes == placement.peak_bytes < service.budget.resident_bytes
    resident = run(service, seed=21, num_outputs=2, refine="expert_ensemble_refiner")
    assert all(max_diff(a, b) == 0 for a, b in zip(staged.images, resident.images))


def test_low_vram_inpainting_encodes_with_the_vae_in_the_denoising_stages(service, staged_service, tracker, tmp_path):
    square = (TEST_SIDE, TEST_SIDE)
    source, mask = source_image(tmp_path, square), half_mask(tmp_path, square)
    request = dict(image=source, mask=mask, width=None, height=None, refine="base_image_refiner", refine_steps=2)
    staged = run(staged_service, seed=4, **request).images[0]
    assert tracker.stages == STAGES_WITH_SAFETY_CHECK and not tracker.misplaced
    assert max_diff(staged, run(service, seed=4, **request).images[0]) == 0


def test_without_the_safety_checker_its_stage_is_skipped(staged_service, tracker):
    options = dataclasses.replace(DEFAULT_OPTIONS, safety_check=False)
    staged_service.predict(make_request(seed=3), options, None, 0.6)
    assert tracker.stages == ["text_encoding", "base", "vae_decode"] and not tracker.misplaced


@pytest.fixture(scope="module")
def staged_control(settings, tiny_weights, tmp_path_factory) -> tuple[SDXLService, SDXLService]:
    """The same weights with every control model baked, served resident and in low-VRAM mode."""
    root = Path(shutil.copytree(tiny_weights, tmp_path_factory.mktemp("control") / "weights"))
    add_control(root)
    resident = SDXLService(dataclasses.replace(settings, weights_dir=root))
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(placement_module, "StagedPlacement", FakeGpuPlacement)
        return resident, SDXLService(dataclasses.replace(settings, weights_dir=root, low_vram=True))


def test_low_vram_mode_brings_each_control_model_for_its_stage_alone(staged_control, tmp_path):
    resident, staged = staged_control
    photo = source_image(tmp_path, (TEST_SIDE, TEST_SIDE))
    controls = [ControlInput("canny", photo, True, 1.0, 0.0, 1.0), ControlInput("depth", photo, True, 0.5, 0.0, 1.0)]
    request = dict(seed=9, controls=controls, ip_adapter_image=photo, ip_adapter_scale=0.5)
    tracker = DeviceTracker(staged.weights.placement)
    try:
        staged_image = run(staged, **request).images[0]
    finally:
        tracker.close()
    assert tracker.stages == [
        "text_encoding",
        "control_preprocess",
        "image_prompt",
        "base",
        "vae_decode_and_safety_check",
    ]
    assert not tracker.misplaced
    placed = dict(tracker.placed_by_stage)
    assert placed["control_preprocess"] == {"depth_estimator"}
    assert placed["image_prompt"] == {"image_encoder"}
    # Canny and depth have single-type ControlNets: the union stays in host memory.
    assert placed["base"] == {"base_unet", "vae", "controlnet:canny", "controlnet:depth"}
    # The base stage's peak counts the ControlNets one request can bring: the single-type ones or the union, never both.
    size = {name: module_bytes(module) for name, module in staged.weights.placement.modules.items()}
    controlnets = max(size["controlnet:canny"] + size["controlnet:depth"], size["controlnet:union"])
    assert staged.weights.placement.peak_bytes == size["base_unet"] + size["vae"] + controlnets
    assert max_diff(staged_image, run(resident, **request).images[0]) == 0


def test_the_base_stage_counts_the_controlnets_one_request_can_use_not_every_baked_one():
    """A request runs at most MAX_CONTROLS controls, on single-type ControlNets or on the union, never both."""
    base = SDXL_FP16["base_unet"] + SDXL_FP16["vae"]
    singles = {
        f"controlnet:{t}": 2_500_000_000 - i * 100_000_000 for i, t in enumerate(("canny", "depth", "pose", "lineart"))
    }
    union = {"controlnet:union": 2_600_000_000}
    # Four single-type nets and the union baked: the three largest single-type ones.
    assert stage_peak_bytes({**SDXL_FP16, **singles, **union}, "controlnet:union") == base + 7_200_000_000
    # The union alone, or beside one smaller single-type net: the union.
    assert stage_peak_bytes({**SDXL_FP16, **union}, "controlnet:union") == base + 2_600_000_000
    one = {"controlnet:canny": singles["controlnet:canny"]}
    assert stage_peak_bytes({**SDXL_FP16, **one, **union}, "controlnet:union") == base + 2_600_000_000
    assert stage_peak_bytes({**SDXL_FP16, **singles}) == base + 7_200_000_000


def test_max_controls_is_the_number_of_controlnet_inputs():
    parameters = inspect.signature(Predictor.predict).parameters
    assert MAX_CONTROLS == sum(1 for name in parameters if re.fullmatch(r"controlnet_\d", name))


# The control models' weights in fp16, from the published configs' parameter counts (devtools/synthetic_control builds
# them on the meta device); the ViT-H image encoder's 632 M parameters from weights/control_parts.py.
VIT_H_ENCODER_BYTES = 632_000_000 * 2
# What torch reports as total memory: an L4 or A10G (23,034 MiB), an RTX 3090 or 4090.
L4_GIB, RTX_4090_GIB = 22.49, 23.6


@pytest.fixture(scope="module")
def control_bytes() -> dict[str, int]:
    full = tensor_bytes("full")
    return {
        "controlnet": full["controlnet"],
        "ip_adapter_vit_h": VIT_H_ENCODER_BYTES + full["ip_adapter"],
        "ip_adapter_bigg": full["image_encoder"] + full["ip_adapter"],
        "depth_estimator": full["depth"] // 2,  # loaded in the weights' dtype, fp16
    }


@pytest.mark.parametrize(
    "baked, low_vram_on_24_gb",
    [
        ((), False),
        (("controlnet", "depth_estimator"), False),
        (("ip_adapter_vit_h",), False),
        (("ip_adapter_bigg",), True),
        (("controlnet", "ip_adapter_vit_h"), True),
        (("controlnet", "controlnet"), True),
    ],
)
def test_what_docs_say_of_24_gb_cards_with_control_models_baked(control_bytes, baked, low_vram_on_24_gb):
    """README's Figures, docs/control.md's Memory and memory.needs_low_vram's docstring say these outcomes."""
    weights = ALL_WEIGHTS + sum(control_bytes[name] for name in baked)
    for capacity_gib in (L4_GIB, RTX_4090_GIB):
        assert needs_low_vram(int(capacity_gib * GIB), weights) is low_vram_on_24_gb, (baked, capacity_gib)
