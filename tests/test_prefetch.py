"""The weights prefetch: what it reads, in which order, and when setup() leaves it off."""

from __future__ import annotations

import dataclasses
import os
import threading

import pytest

from sdxl_cog.checkpoints import prefetch
from sdxl_cog.checkpoints.loading import load_weights

LOAD_ORDER = [
    "vae/diffusion_pytorch_model.fp16.safetensors",
    "base/text_encoder/model.fp16.safetensors",
    "base/text_encoder_2/model.fp16.safetensors",
    "base/unet/diffusion_pytorch_model.fp16.safetensors",
    "refiner/unet/diffusion_pytorch_model.fp16.safetensors",
    "safety_checker/model.fp16.safetensors",
]


@pytest.fixture
def reads(monkeypatch) -> list:
    """The files prefetch threads read, in order."""
    read: list = []
    monkeypatch.setattr(prefetch, "read_into_page_cache", lambda path: read.append(path) or 0)
    return read


def relative(paths, root) -> list[str]:
    return [p.relative_to(root).as_posix() for p in paths]


def join_prefetch() -> None:
    for thread in threading.enumerate():
        if thread.name == "weights-prefetch":
            thread.join(timeout=30)


def test_reads_every_weight_file_once_in_load_order(tiny_weights, reads):
    thread = prefetch.start(tiny_weights)
    thread.join(timeout=30)
    assert relative(reads, tiny_weights) == LOAD_ORDER
    assert thread.daemon  # never holds up the worker's exit


def test_reads_with_sendfile_to_the_end(tmp_path):
    path = tmp_path / "w.safetensors"
    path.write_bytes(os.urandom(3 * 1024 * 1024 + 17))
    assert prefetch.read_into_page_cache(path) == path.stat().st_size


def test_nothing_to_read_without_weights(tmp_path, reads):
    assert prefetch.start(tmp_path / "missing") is None
    assert prefetch.start(tmp_path) is None


def test_skipped_when_the_page_cache_could_not_hold_the_weights(tiny_weights, reads, monkeypatch):
    total = sum(p.stat().st_size for p in prefetch.weight_files(tiny_weights))
    monkeypatch.setattr(prefetch, "cache_room_bytes", lambda: total)  # all of it, but no room to spare
    assert prefetch.start(tiny_weights) is None
    monkeypatch.setattr(prefetch, "cache_room_bytes", lambda: 2 * total)
    prefetch.start(tiny_weights).join(timeout=30)
    assert len(reads) == len(LOAD_ORDER)


def test_cache_room_is_read_from_this_machine():
    room = prefetch.cache_room_bytes()
    assert room is not None and room > 0


@pytest.mark.parametrize("enabled", [True, False])
def test_setup_starts_it_unless_switched_off(settings, reads, enabled):
    load_weights(dataclasses.replace(settings, prefetch_weights=enabled))
    join_prefetch()
    assert relative(reads, settings.weights_dir) == (LOAD_ORDER if enabled else [])
