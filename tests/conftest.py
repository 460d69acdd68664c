"""Shared fixtures: tiny synthetic SDXL weights made once per session, and one loaded engine on them; and
the helpers engine tests share (requests, predictions, source images and masks, a LoRA for the tiny UNet,
low-VRAM mode on the CPU). Test modules import these from here (`from tests.conftest import run`), never
from one another; helpers for the server and deploy tiers are in tests/helpers/."""

from __future__ import annotations

import dataclasses
import shutil
from contextlib import contextmanager
from itertools import chain
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from devtools.local_request import local_request
from devtools.synthetic import make_weights
from sdxl_cog.config import MIN_SIDE, Settings
from sdxl_cog.device.placement import StagedPlacement
from sdxl_cog.service import OutputOptions, SDXLService
from sdxl_cog.weights import sources

# The helpers' asserts report their operands, as a test module's do.
pytest.register_assert_rewrite("tests.helpers")

REPO_ROOT = Path(__file__).resolve().parent.parent

# The smallest size a request may ask for (16x16 latents): every feature but the watermark runs at it. Tests
# of the watermark ask for config.WATERMARK_MIN_SIDE (256) themselves: below it the watermark is skipped.
TEST_SIDE = MIN_SIDE
TEST_STEPS = 4

# What tests ask for beside predict.py's defaults (devtools/local_request.py).
REQUEST_DEFAULTS = dict(
    prompt="a red fox in the snow",
    width=TEST_SIDE,
    height=TEST_SIDE,
    num_inference_steps=TEST_STEPS,
    guidance_scale=7.5,
    seed=1234,
)
DEFAULT_OPTIONS = OutputOptions(output_format="png", output_quality=80, apply_watermark=False, safety_check=True)


def make_request(**overrides):
    """A request as the engine builds it; image and mask are the test's own local files."""
    return local_request(**{**REQUEST_DEFAULTS, **overrides})


def pixels(path_or_image) -> np.ndarray:
    image = path_or_image if isinstance(path_or_image, Image.Image) else Image.open(path_or_image)
    return np.asarray(image.convert("RGB"), dtype=np.int16)


def max_diff(a, b) -> int:
    return int(np.abs(pixels(a) - pixels(b)).max())


@dataclasses.dataclass
class Outcome:
    paths: list
    images: list  # loaded at once: the next prediction deletes these files
    metrics: dict


def run(service, options=DEFAULT_OPTIONS, lora=None, lora_scale=0.6, **overrides) -> Outcome:
    """One prediction of `service` on make_request(**overrides), its images loaded."""
    prediction = service.predict(make_request(**overrides), options, lora, lora_scale)
    loaded = [Image.open(p) for p in prediction.paths]
    for image in loaded:
        image.load()
    return Outcome(prediction.paths, loaded, prediction.metrics)


@contextmanager
def count_unet_calls(service):
    """The calls of the base's and the refiner's UNets while the block runs."""
    unets = {"base": service.checkpoints.default.model, "refiner": service.weights.refiner}
    counts = dict.fromkeys(unets, 0)
    hooks = []
    for name, model in unets.items():
        unet = model.components["unet"]

        def hook(module, args, output, name=name):
            counts[name] += 1

        hooks.append(unet.register_forward_hook(hook))
    try:
        yield counts
    finally:
        for h in hooks:
            h.remove()


def source_image(tmp_path, size=(300, 200)) -> Path:
    """A PNG of seeded noise, `size` = (width, height)."""
    rng = np.random.default_rng(0)
    path = tmp_path / "source.png"
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(path)
    return path


def half_mask(tmp_path, size, name="mask.png") -> Path:
    """A mask that keeps the left half (black) and repaints the right half (white)."""
    mask = np.zeros((size[1], size[0]), dtype=np.uint8)
    mask[:, size[0] // 2 :] = 255
    path = tmp_path / name
    Image.fromarray(mask).save(path)
    return path


class FakeGpuPlacement(StagedPlacement):
    """Low-VRAM mode on the CPU: a copy "to the device" is a clone whose storage is remembered, so that
    whether a tensor is on the fake device is seen from the tensor itself, not from the bookkeeping."""

    def __init__(self, device, modules):
        self.device_storages: set[int] = set()
        super().__init__(device, modules)

    def _copy_to_device(self, host):
        copy = host.clone()
        self.device_storages.add(copy.data_ptr())
        return copy

    def _evict(self, module):
        self.device_storages -= {t.data_ptr() for t in chain(module.parameters(), module.buffers())}
        super()._evict(module)

    def holds(self, module: torch.nn.Module, recurse: bool = True) -> bool:
        tensors = chain(module.parameters(recurse=recurse), module.buffers(recurse=recurse))
        return all(t.data_ptr() in self.device_storages for t in tensors)


@pytest.fixture(scope="session")
def tiny_weights(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("weights")
    make_weights(root, size="tiny", seed=0)
    return root


@pytest.fixture(scope="session")
def settings(tiny_weights, tmp_path_factory) -> Settings:
    base = Settings.from_env()
    scratch = tmp_path_factory.mktemp("scratch")
    return dataclasses.replace(
        base,
        weights_dir=tiny_weights,
        device="cpu",
        output_dir=scratch / "outputs",
        input_dir=scratch / "inputs",
        prediction_marker=scratch / "prediction-started",
        lora_cache_dir=scratch / "lora-cache",
        lora_local_dirs=(scratch / "loras",),
    )


@pytest.fixture(scope="session")
def service(settings) -> SDXLService:
    return SDXLService(settings)


@pytest.fixture(scope="session")
def compiled_service(settings, tmp_path_factory) -> SDXLService:
    """SDXL_COMPILE on the tiny weights, warmed up for TEST_SIDE with one output (the first build compiles, about a
    minute on 2 cores). Its cache (settings.compile_cache_dir) then holds every graph a request of that size runs,
    so another process with the same cache compiles nothing (tests/test_gpu_check.py)."""
    compiled = dataclasses.replace(
        settings,
        compile=True,
        compile_cache_dir=tmp_path_factory.mktemp("compile-cache"),
        compile_sizes=((TEST_SIDE, TEST_SIDE, 1),),
    )
    return SDXLService(compiled)


@pytest.fixture
def fetch_log(monkeypatch) -> list[str]:
    """Every file a mirror copies, in order."""
    copied, fetch = [], sources.MirrorRepo.fetch

    def logged(self, commit, files, dest):
        copied.extend(files)
        return fetch(self, commit, files, dest)

    monkeypatch.setattr(sources.MirrorRepo, "fetch", logged)
    return copied


@pytest.fixture
def weights_copy(tiny_weights, tmp_path) -> Path:
    """A private copy of the tiny weights that a test may alter."""
    return Path(shutil.copytree(tiny_weights, tmp_path / "weights"))


def pytest_collection_modifyitems(items):
    """Tiers a developer can choose (`make test-fast` runs the engine tier): a module that starts the real Cog
    server (it imports the CogServer harness) is in the server tier, every other one not marked container or
    compile or half (their own tiers: pytest -m compile, make test-half) is in the engine tier. Classifying by what the module does keeps a new test file from escaping its
    tier."""
    for item in items:
        if (
            item.get_closest_marker("container")
            or item.get_closest_marker("compile")
            or item.get_closest_marker("half")
        ):
            continue
        item.add_marker(pytest.mark.server if hasattr(item.module, "CogServer") else pytest.mark.engine)
