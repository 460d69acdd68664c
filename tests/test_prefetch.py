"""The weights prefetch: what it reads, in which order, when it stays off, and that predict.py starts it
before torch is imported (the point of it)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from sdxl_cog import openapi, prefetch
from tests.conftest import REPO_ROOT


@pytest.fixture
def reads(monkeypatch) -> list[str]:
    """The files prefetch threads read, as paths relative to the weights root, in order."""
    read: list[str] = []
    monkeypatch.setattr(prefetch, "read_into_page_cache", lambda path: read.append(path) or 0)
    monkeypatch.delenv(prefetch.ENABLED_ENV, raising=False)
    return read


def relative(paths, root) -> list[str]:
    return [p.relative_to(root).as_posix() for p in paths]


def test_reads_every_weight_file_once_in_load_order(tiny_weights, reads):
    thread = prefetch.start(tiny_weights)
    thread.join(timeout=30)
    assert relative(reads, tiny_weights) == [
        "vae/diffusion_pytorch_model.fp16.safetensors",
        "base/text_encoder/model.fp16.safetensors",
        "base/text_encoder_2/model.fp16.safetensors",
        "base/unet/diffusion_pytorch_model.fp16.safetensors",
        "refiner/unet/diffusion_pytorch_model.fp16.safetensors",
        "safety_checker/model.fp16.safetensors",
    ]
    assert thread.daemon  # never holds up the worker's exit


def test_reads_with_sendfile_to_the_end(tmp_path):
    path = tmp_path / "w.safetensors"
    path.write_bytes(os.urandom(3 * 1024 * 1024 + 17))
    assert prefetch.read_into_page_cache(path) == path.stat().st_size


@pytest.mark.parametrize("value", ["0", "false", "off"])
def test_switched_off_by_the_environment(tiny_weights, reads, monkeypatch, value):
    monkeypatch.setenv(prefetch.ENABLED_ENV, value)
    assert prefetch.start(tiny_weights) is None


def test_nothing_to_read_without_weights(tmp_path, reads):
    assert prefetch.start(tmp_path / "missing") is None
    assert prefetch.start(tmp_path) is None


def test_skipped_when_the_page_cache_could_not_hold_the_weights(tiny_weights, reads, monkeypatch):
    total = sum(p.stat().st_size for p in prefetch.weight_files(tiny_weights))
    monkeypatch.setattr(prefetch, "cache_room_bytes", lambda: total)  # all of it, but no room to spare
    assert prefetch.start(tiny_weights) is None
    monkeypatch.setattr(prefetch, "cache_room_bytes", lambda: 2 * total)
    prefetch.start(tiny_weights).join(timeout=30)
    assert len(reads) == 6


def test_cache_room_is_read_from_this_machine():
    room = prefetch.cache_room_bytes()
    assert room is not None and room > 0


def test_predict_starts_it_before_importing_torch(tiny_weights):
    probe = (
        "import sys\n"
        "from sdxl_cog import prefetch\n"
        "start = prefetch.start\n"
        "def spy():\n"
        "    print('torch imported at start:', 'torch' in sys.modules)\n"
        "    print('prefetching:', start() is not None)\n"
        "prefetch.start = spy\n"
        "import predict\n"
    )
    env = {**os.environ, "SDXL_WEIGHTS_DIR": str(tiny_weights)}
    env.pop(prefetch.ENABLED_ENV, None)
    result = subprocess.run(
        [sys.executable, "-c", probe], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert "torch imported at start: False\nprefetching: True\n" in result.stdout


def test_schema_generation_reads_no_weights(tiny_weights, reads, monkeypatch):
    monkeypatch.setenv("SDXL_WEIGHTS_DIR", str(tiny_weights))
    started, start = [], prefetch.start
    monkeypatch.setattr(prefetch, "start", lambda: started.append(start()))
    openapi.load_predictor(f"{REPO_ROOT / 'predict.py'}:Predictor")
    assert started == [None]  # predict.py asked, and the prefetch declined
    assert prefetch.ENABLED_ENV not in os.environ  # the switch is restored
