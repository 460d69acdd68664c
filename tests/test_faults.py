"""Faults inside the process: out-of-memory during a prediction, requests too big for the GPU, and
missing, truncated or tampered weights at setup."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from PIL import Image

from devtools.cog_server import CogServer
from devtools.synthetic import make_weights
from sdxl_cog.device.memory import GIB, MemoryBudget
from sdxl_cog.errors import InputError
from sdxl_cog.service import SDXLService
from sdxl_cog.weights.layout import WeightsError, read_manifest
from tests.conftest import DEFAULT_OPTIONS, REPO_ROOT, TEST_SIDE, make_request, pixels

UNET_FILE = "base/unet/diffusion_pytorch_model.fp16.safetensors"


def generate(service, **overrides) -> np.ndarray:
    prediction = service.predict(make_request(seed=55, **overrides), DEFAULT_OPTIONS, None, 0.6)
    return pixels(Image.open(prediction.paths[0]))


def test_out_of_memory_fails_the_request_clearly_and_the_next_one_succeeds(service, monkeypatch):
    reference = generate(service)
    unet = service.checkpoints.default.model.components["unet"]

    def exhausted(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(unet, "forward", exhausted)
    with pytest.raises(
        InputError, match=rf"Out of GPU memory generating 2 image\(s\) at {TEST_SIDE}x{TEST_SIDE}: lower num_outputs"
    ):
        generate(service, num_outputs=2)
    monkeypatch.undo()
    assert np.array_equal(generate(service), reference)


def test_requests_too_big_for_the_gpu_are_refused_before_any_work(service, monkeypatch):
    monkeypatch.setattr(service, "budget", MemoryBudget(capacity_bytes=24 * GIB, resident_bytes=11 * GIB))
    with pytest.raises(InputError, match=r"4 image\(s\) at 2048x2048 need about .* GiB .* the GPU has 24.0 GiB"):
        service.predict(make_request(width=2048, height=2048, num_outputs=4), DEFAULT_OPTIONS, None, 0.6)
    # SDXL's own size with the refiner and four outputs fits a 24 GB card.
    MemoryBudget(capacity_bytes=24 * GIB, resident_bytes=11 * GIB).check(
        make_request(width=1024, height=1024, num_outputs=4, refine="expert_ensemble_refiner")
    )


def test_missing_weights_name_the_file_and_the_fix(settings, weights_copy):
    (weights_copy / UNET_FILE).unlink()
    with pytest.raises(WeightsError, match=rf"Missing weights file .*{UNET_FILE}.*script/download-weights"):
        SDXLService(dataclasses.replace(settings, weights_dir=weights_copy))


def test_a_manifest_listing_what_this_server_cannot_serve_fails_setup_naming_it(settings, weights_copy):
    manifest = read_manifest(weights_copy)
    manifest["models"] = [{"name": "x", "dir": "base", "source": "s", "profile": {"preset": "fast"}}]
    (weights_copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(
        WeightsError, match=r"manifest.json lists what this server cannot serve: Unknown profile preset"
    ):
        SDXLService(dataclasses.replace(settings, weights_dir=weights_copy))


def test_truncated_weights_fail_setup_naming_the_file(settings, weights_copy):
    path = weights_copy / UNET_FILE
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(WeightsError, match=rf"{UNET_FILE} has \d+ bytes, the manifest says \d+"):
        SDXLService(dataclasses.replace(settings, weights_dir=weights_copy))


def test_files_beside_the_weights_never_break_setup(settings, tmp_path):
    """weights/ holds a committed README and may hold an operator's loras/: the manifest covers neither."""
    root = tmp_path / "weights"
    root.mkdir()
    (root / "README.md").write_text("what this folder is\n")
    make_weights(root)
    assert not [name for name in read_manifest(root)["files"] if name.startswith(("README", "loras"))]
    (root / "README.md").write_text("edited after the download, and much longer than before\n" * 20)
    (root / "loras").mkdir()
    (root / "loras" / "style.safetensors").write_bytes(b"an operator's LoRA")
    (root / "NOTES.txt").write_text("added later")
    service = SDXLService(dataclasses.replace(settings, weights_dir=root, verify_weights_hash=True))
    assert service.weights is not None
    path = root / UNET_FILE
    path.write_bytes(path.read_bytes()[:-100])  # a changed weight still fails
    with pytest.raises(WeightsError, match=rf"{UNET_FILE} has \d+ bytes, the manifest says \d+"):
        SDXLService(dataclasses.replace(settings, weights_dir=root))


def test_tampered_weights_are_caught_by_the_full_hash_check(settings, weights_copy):
    path = weights_copy / UNET_FILE
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF  # same size, different bytes: only the hash can tell
    path.write_bytes(bytes(data))
    with pytest.raises(WeightsError, match=rf"{UNET_FILE} does not match its sha256"):
        SDXLService(dataclasses.replace(settings, weights_dir=weights_copy, verify_weights_hash=True))


def test_setup_failure_reaches_the_server_health_check(weights_copy, tmp_path):
    (weights_copy / UNET_FILE).unlink()
    env = {"SDXL_WEIGHTS_DIR": str(weights_copy), "SDXL_OUTPUT_DIR": str(tmp_path / "out")}
    with CogServer(cwd=REPO_ROOT, env=env, ready_timeout=None, log_path=tmp_path / "server.log") as server:
        health = server.wait_for_status("SETUP_FAILED", 300)
        assert "Missing weights file" in str(health) and "script/download-weights" in str(health)
