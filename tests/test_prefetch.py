"""The weights prefetch: what it reads, in which order, and when setup() leaves it off."""

from __future__ import annotations

import dataclasses
import os
import threading
from pathlib import Path

import pytest
import safetensors.torch
import transformers.modeling_utils

from devtools.synthetic import add_model
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
# A second checkpoint with its own UNet: read_pipelines() loads it after the refiner, before the safety checker.
SECOND_UNET = "models/second/unet/diffusion_pytorch_model.fp16.safetensors"


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


def test_a_further_checkpoint_is_read_where_setup_loads_it(weights_copy, reads):
    add_model(weights_copy, "second", seed=1)
    prefetch.start(weights_copy).join(timeout=30)
    read = relative(reads, weights_copy)
    models = [name for name in read if name.startswith("models/")]
    assert SECOND_UNET in models
    refiner_at = read.index("refiner/unet/diffusion_pytorch_model.fp16.safetensors")
    assert read == LOAD_ORDER[: refiner_at + 1] + models + LOAD_ORDER[refiner_at + 1 :]


def test_its_order_is_the_order_setup_opens_the_files(settings, weights_copy, monkeypatch):
    """What load_weights() opens (diffusers through safetensors.torch.load_file, transformers through safe_open),
    with a second checkpoint: the prefetch reads the same files in the same order (and more: the second
    checkpoint's text encoders, which setup() takes from base/ in memory)."""
    add_model(weights_copy, "second", seed=1)
    opened: list[str] = []

    def recording(open_file):
        def wrapper(path, *args, **kwargs):
            opened.append(Path(path).resolve().relative_to(weights_copy.resolve()).as_posix())
            return open_file(path, *args, **kwargs)

        return wrapper

    monkeypatch.setattr(safetensors.torch, "load_file", recording(safetensors.torch.load_file))
    monkeypatch.setattr(transformers.modeling_utils, "safe_open", recording(transformers.modeling_utils.safe_open))
    load_weights(dataclasses.replace(settings, weights_dir=weights_copy, prefetch_weights=False))
    assert SECOND_UNET in opened and len(opened) == len(set(opened))
    prefetched = relative(prefetch.weight_files(weights_copy), weights_copy)
    # By folder: within one, diffusers' order is a set's (text_encoder_2 comes first in some processes).
    assert folders([name for name in prefetched if name in opened]) == folders(opened)


def folders(names: list[str]) -> list[str]:
    """The checkpoint or part folder of each file (base, models/second, ...), each once, in order of appearance."""
    parts = ["/".join(name.split("/")[: 2 if name.startswith("models/") else 1]) for name in names]
    return list(dict.fromkeys(parts))


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
