"""Shared fixtures: tiny synthetic SDXL weights made once per session, and one loaded engine on them."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sdxl_cog.config import Settings
from sdxl_cog.request import build_request
from sdxl_cog.service import OutputOptions, SDXLService
from sdxl_cog.testing.synthetic import make_weights

REPO_ROOT = Path(__file__).resolve().parent.parent

# Small enough for a 2-core CI machine, large enough for the watermark (256 px minimum).
TEST_SIDE = 256
TEST_STEPS = 4

REQUEST_DEFAULTS = dict(
    prompt="a red fox in the snow",
    negative_prompt="",
    image=None,
    mask=None,
    width=TEST_SIDE,
    height=TEST_SIDE,
    num_outputs=1,
    scheduler="K_EULER",
    num_inference_steps=TEST_STEPS,
    guidance_scale=7.5,
    prompt_strength=0.8,
    seed=1234,
    refine="no_refiner",
    high_noise_frac=0.8,
    refine_steps=None,
    refine_strength=0.3,
)
DEFAULT_OPTIONS = OutputOptions(output_format="png", output_quality=80, apply_watermark=False, safety_check=True)


def make_request(**overrides):
    """A request as the engine builds it; image and mask are the test's own local files."""
    return build_request(**{**REQUEST_DEFAULTS, **overrides}, files_from_client=False)


def pixels(path_or_image) -> np.ndarray:
    image = path_or_image if isinstance(path_or_image, Image.Image) else Image.open(path_or_image)
    return np.asarray(image.convert("RGB"), dtype=np.int16)


def max_diff(a, b) -> int:
    return int(np.abs(pixels(a) - pixels(b)).max())


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


@pytest.fixture
def weights_copy(tiny_weights, tmp_path) -> Path:
    """A private copy of the tiny weights that a test may alter."""
    return Path(shutil.copytree(tiny_weights, tmp_path / "weights"))


def pytest_collection_modifyitems(items):
    """Tiers a developer can choose (`make test-fast` runs the engine tier): a module that starts the real Cog
    server (it imports the CogServer harness) is in the server tier, every other one not marked container is
    in the engine tier. Classifying by what the module does keeps a new test file from escaping its tier."""
    for item in items:
        if item.get_closest_marker("container"):
            continue
        item.add_marker(pytest.mark.server if hasattr(item.module, "CogServer") else pytest.mark.engine)
