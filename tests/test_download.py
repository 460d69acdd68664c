"""script/download-weights and sdxl_cog.weights.download, offline: a fake Hub mirror stands in for the four repos
(tests/helpers/hub.py: the real repos' layouts with small stand-in files). The Hub path runs the real
huggingface_hub calls against a local stand-in for the Hub API (HF_ENDPOINT). Single-file checkpoints are written in Stability's original
layout from the tiny synthetic model (devtools/single_file.py) and converted by diffusers' real
from_single_file, against a mirror that holds that tiny model.
"""

from __future__ import annotations

import dataclasses
import hashlib
import http.server
import importlib.machinery
import importlib.util
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
from pathlib import Path

import huggingface_hub.constants
import numpy as np
import pytest
import safetensors.torch
import torch
from diffusers import AutoencoderKL, StableDiffusionXLPipeline

from devtools.single_file import write_single_file
from sdxl_cog.service import SDXLService
from sdxl_cog.weights import download as dl
from sdxl_cog.weights import parts, sources, url_download
from sdxl_cog.weights.layout import REQUIRED_FILES, WeightsError, read_manifest, sha256_of, verify
from tests.conftest import pixels, run
from tests.helpers.hub import (
    BASE,
    REFINER,
    SAFETY,
    SAFETY_TENSORS,
    TOKENIZER_FILES,
    VAE,
    VAE_TENSORS,
    FakeHub,
    commit_of,
    layout_files,
    make_mirror,
    mtimes,
)

REPO_ROOT = Path(__file__).resolve().parent.parent
SCRIPT = REPO_ROOT / "script" / "download-weights"

# The fp32-only repos' weights, cast into the layout's fp16 variant files.
CAST_FILES = {
    "vae/diffusion_pytorch_model.fp16.safetensors": VAE_TENSORS,
    "safety_checker/model.fp16.safetensors": SAFETY_TENSORS,
}

# The layout, written out: the tokenizers in full, each component's config and fp16 weights, nothing else.
EXPECTED_FILES = {
    "base/model_index.json",
    "base/scheduler/scheduler_config.json",
    *[f"base/{d}/{f}" for d in ("tokenizer", "tokenizer_2") for f in TOKENIZER_FILES],
    "base/text_encoder/config.json",
    "base/text_encoder/model.fp16.safetensors",
    "base/text_encoder_2/config.json",
    "base/text_encoder_2/model.fp16.safetensors",
    "base/unet/config.json",
    "base/unet/diffusion_pytorch_model.fp16.safetensors",
    "refiner/model_index.json",
    "refiner/scheduler/scheduler_config.json",
    "refiner/unet/config.json",
    "refiner/unet/diffusion_pytorch_model.fp16.safetensors",
    "vae/config.json",
    "vae/diffusion_pytorch_model.fp16.safetensors",  # cast from the fp32 file
    "safety_checker/config.json",
    "safety_checker/preprocessor_config.json",
    "safety_checker/model.fp16.safetensors",  # converted from pytorch_model.bin; every other file is a copy
}
PART_REPOS = {"base": BASE, "refiner": REFINER, "vae": VAE, "safety_checker": SAFETY}


def source_of(layout_file: str) -> tuple[str, str]:
    part, name = layout_file.split("/", 1)
    return PART_REPOS[part], name


@pytest.fixture
def mirror(tmp_path, monkeypatch) -> Path:
    root = make_mirror(tmp_path / "hub")
    monkeypatch.setenv(sources.MIRROR_ENV, str(root))
    return root


def test_download_takes_exactly_the_layout_files(mirror, tmp_path):
    dest = tmp_path / "weights"
    manifest = dl.download(dest)

    assert layout_files(dest) == EXPECTED_FILES
    assert set(REQUIRED_FILES) <= EXPECTED_FILES
    for name in EXPECTED_FILES - set(CAST_FILES):
        repo, source = source_of(name)
        assert (dest / name).read_bytes() == (mirror / repo / source).read_bytes(), name
    assert set(manifest["files"]) == EXPECTED_FILES
    for name, entry in manifest["files"].items():
        assert entry == {"size": (dest / name).stat().st_size, "sha256": sha256_of(dest / name)}
    assert manifest["sources"]["base"].startswith(f"{mirror / BASE} -> local-")
    verify(dest, full_hash=True)
    assert not (dest / dl.STAGING).exists()


@pytest.mark.parametrize("layout_file", CAST_FILES)
def test_fp32_only_weights_become_fp16_variants_with_the_same_values(mirror, tmp_path, layout_file):
    dl.download(tmp_path / "weights")
    tensors, originals = safetensors.torch.load_file(tmp_path / "weights" / layout_file), CAST_FILES[layout_file]
    assert tensors.keys() == originals.keys()
    for name, original in originals.items():
        expected = original.half() if original.is_floating_point() else original  # integers keep their dtype
        assert tensors[name].dtype == expected.dtype and torch.equal(tensors[name], expected)


def test_second_run_copies_nothing(mirror, tmp_path, fetch_log, caplog):
    dest = tmp_path / "weights"
    dl.download(dest)
    before, fetch_log[:] = mtimes(dest), []
    caplog.set_level("INFO")
    dl.download(dest)
    assert fetch_log == []
    assert mtimes(dest) == before
    assert "up to date" in caplog.text


def test_deleted_or_truncated_files_are_fetched_again(mirror, tmp_path, fetch_log):
    dest = tmp_path / "weights"
    dl.download(dest)
    (dest / "base/unet/diffusion_pytorch_model.fp16.safetensors").unlink()
    with open(dest / "refiner/unet/config.json", "r+b") as f:
        f.truncate(5)
    (dest / "safety_checker/model.fp16.safetensors").unlink()
    before, fetch_log[:] = mtimes(dest), []

    dl.download(dest)

    assert sorted(fetch_log) == [
        "pytorch_model.bin",
        "unet/config.json",
        "unet/diffusion_pytorch_model.fp16.safetensors",
    ]
    changed = {name for name, t in mtimes(dest).items() if before.get(name) != t}
    assert changed == {
        "base/unet/diffusion_pytorch_model.fp16.safetensors",
        "refiner/unet/config.json",
        "safety_checker/model.fp16.safetensors",
    }
    assert (dest / "refiner/unet/config.json").read_bytes() == (mirror / REFINER / "unet/config.json").read_bytes()
    verify(dest, full_hash=True)


def test_changed_base_replaces_the_base_and_prunes_what_it_lacks(mirror, tmp_path):
    dest = tmp_path / "weights"
    dl.download(dest)
    other = Path(shutil.copytree(mirror / BASE, tmp_path / "other-base"))
    (other / "tokenizer" / "special_tokens_map.json").unlink()
    (other / "unet" / "config.json").write_text('{"other": true}')

    manifest = dl.download(dest, base=str(other))

    assert manifest["sources"]["base"].startswith(f"{other} -> local-")
    assert not (dest / "base/tokenizer/special_tokens_map.json").exists()
    assert (dest / "base/unet/config.json").read_text() == '{"other": true}'


def test_interrupted_switch_leaves_no_manifest_and_the_next_run_repairs(mirror, tmp_path, monkeypatch):
    dest = tmp_path / "weights"
    dl.download(dest)
    other = Path(shutil.copytree(mirror / BASE, tmp_path / "other-base"))
    stock_unet = (mirror / BASE / "unet/config.json").read_bytes()
    (other / "unet/config.json").write_bytes(b"x" * len(stock_unet))  # same size, other content
    fill_from_repo = dl.fill_from_repo

    def fail_at_refiner(root, part, repo, old):
        if part.folder == "refiner":
            raise dl.DownloadError("the network dropped")
        return fill_from_repo(root, part, repo, old)

    monkeypatch.setattr(dl, "fill_from_repo", fail_at_refiner)
    with pytest.raises(dl.DownloadError):
        dl.download(dest, base=str(other))
    with pytest.raises(WeightsError, match="No weights manifest"):
        verify(dest)  # setup() refuses the half-switched directory

    monkeypatch.setattr(dl, "fill_from_repo", fill_from_repo)
    dl.download(dest)  # back to the stock base: the other base's same-sized file must not pass as intact
    assert (dest / "base/unet/config.json").read_bytes() == stock_unet
    verify(dest, full_hash=True)


def test_missing_component_names_the_repo_and_the_file(mirror, tmp_path):
    (mirror / BASE / "tokenizer_2" / "vocab.json").unlink()
    shutil.rmtree(mirror / BASE / "text_encoder_2")
    with pytest.raises(dl.DownloadError, match=r"stable-diffusion-xl-base-1.0 has no text_encoder_2/config.json"):
        dl.download(tmp_path / "weights")


# --- --base: another SDXL diffusers repo without fp16 variant files -------------------------------------


def full_precision_repo(tiny_weights: Path, repo: Path) -> Path:
    """The tiny base as a repo like animagine-xl-4.0: fp32 weights without variants, one encoder sharded."""
    shutil.copytree(tiny_weights / "base", repo)
    for variant_file in sorted(repo.rglob("*.fp16.safetensors")):
        tensors = {k: v.float() for k, v in safetensors.torch.load_file(variant_file).items()}
        variant_file.unlink()
        plain = variant_file.with_name(variant_file.name.replace(".fp16", ""))
        if plain.parent.name == "text_encoder_2":  # sharded, as large fine-tunes are
            keys = sorted(tensors)
            for i, part in enumerate((keys[: len(keys) // 2], keys[len(keys) // 2 :]), start=1):
                shard = plain.with_name(f"model-0000{i}-of-00002.safetensors")
                safetensors.torch.save_file({k: tensors[k] for k in part}, shard, metadata={"format": "pt"})
        else:
            safetensors.torch.save_file(tensors, plain, metadata={"format": "pt"})
    shutil.copytree(tiny_weights / "vae", repo / "vae")  # a VAE of its own, which the layout must skip
    (repo / "animagine-xl-4.0.safetensors").write_bytes(b"single-file copy, not needed")
    # A scheduler config of its own (sdxl-turbo's trailing spacing): it must arrive unchanged.
    config = json.loads((repo / "scheduler/scheduler_config.json").read_text()) | {"timestep_spacing": "trailing"}
    (repo / "scheduler/scheduler_config.json").write_text(json.dumps(config))
    return repo


def test_base_repo_without_fp16_variants_is_converted(mirror, tmp_path, tiny_weights):
    repo = full_precision_repo(tiny_weights, tmp_path / "animagine")
    dest = tmp_path / "weights"
    manifest = dl.download(dest, base=str(repo))

    assert layout_files(dest) == EXPECTED_FILES
    assert (dest / "base/scheduler/scheduler_config.json").read_bytes() == (
        repo / "scheduler/scheduler_config.json"
    ).read_bytes()
    assert manifest["sources"]["base"].startswith(f"{repo} -> local-")
    # The real loaders read the converted files as the fp16 variant, with the original values.
    vae = AutoencoderKL.from_pretrained(tiny_weights / "vae", variant="fp16")
    pipe = StableDiffusionXLPipeline.from_pretrained(dest / "base", vae=vae, variant="fp16", use_safetensors=True)
    for component in ("unet", "text_encoder", "text_encoder_2"):
        weights_file = next((tiny_weights / "base" / component).glob("*.fp16.safetensors"))
        original = safetensors.torch.load_file(weights_file)
        converted = safetensors.torch.load_file(next((dest / "base" / component).glob("*.fp16.safetensors")))
        assert converted.keys() == original.keys()
        assert all(converted[k].dtype == torch.float16 and torch.equal(converted[k], original[k]) for k in original)
        assert getattr(pipe, component) is not None


def test_weight_sources_prefer_the_cheapest_form():
    listing = frozenset(
        {
            "unet/diffusion_pytorch_model.safetensors",
            "unet/diffusion_pytorch_model.bin",
            "unet/diffusion_pytorch_model.fp16-00001-of-00002.safetensors",
            "unet/diffusion_pytorch_model.fp16-00002-of-00002.safetensors",
            "text_encoder/pytorch_model.bin",
            "text_encoder/model.onnx",
        }
    )
    fp16_shards = (
        "unet/diffusion_pytorch_model.fp16-00001-of-00002.safetensors",
        "unet/diffusion_pytorch_model.fp16-00002-of-00002.safetensors",
    )
    assert parts.weight_sources("unet/diffusion_pytorch_model.fp16.safetensors", listing, "r") == fp16_shards
    assert parts.weight_sources("text_encoder/model.fp16.safetensors", listing, "r") == (
        "text_encoder/pytorch_model.bin",
    )
    with pytest.raises(dl.DownloadError, match="r has no weights for vae/diffusion_pytorch_model.safetensors"):
        parts.weight_sources("vae/diffusion_pytorch_model.safetensors", listing, "r")


# --- --base: a single-file checkpoint, over HTTP with Range resume ---------------------------------------


class BlobServer(http.server.ThreadingHTTPServer):
    """Serves one blob at any path on 127.0.0.1, honouring `Range: bytes=N-` unless told not to."""

    def __init__(self, blob: bytes, honour_range: bool = True):
        self.blob, self.honour_range, self.ranges = blob, honour_range, []
        super().__init__(("127.0.0.1", 0), BlobHandler)
        threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def url(self, name: str = "model.safetensors") -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/files/{name}"


class BlobHandler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        blob, requested = self.server.blob, self.headers.get("Range")
        self.server.ranges.append(requested)
        start = int(requested.removeprefix("bytes=").rstrip("-")) if requested and self.server.honour_range else 0
        if start >= len(blob) and requested and self.server.honour_range:
            self.send_response(416)
            self.send_header("Content-Range", f"bytes */{len(blob)}")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        self.send_response(206 if start else 200)
        if start:
            self.send_header("Content-Range", f"bytes {start}-{len(blob) - 1}/{len(blob)}")
        self.send_header("Content-Length", str(len(blob) - start))
        self.end_headers()
        self.wfile.write(blob[start:])

    def log_message(self, *args):
        pass


BLOB = bytes(range(256)) * 4099  # ~1 MB, not a multiple of the chunk size


@pytest.fixture
def server():
    servers = []

    def start(blob: bytes = BLOB, honour_range: bool = True) -> BlobServer:
        servers.append(BlobServer(blob, honour_range))
        return servers[-1]

    yield start
    for s in servers:
        s.shutdown()
        s.server_close()


@pytest.mark.parametrize(
    "partial, honour_range, expected_range",
    [
        (b"", True, None),  # fresh download
        (BLOB[:300_001], True, "bytes=300001-"),  # resume an interrupted one
        (BLOB, True, f"bytes={len(BLOB)}-"),  # the .part was complete: 416, kept as it is
        (b"stale bytes", False, "bytes=11-"),  # the server ignores Range: start over
    ],
    ids=["fresh", "resume", "complete-part", "no-range-support"],
)
def test_fetch_url_resumes_a_partial_file(server, tmp_path, partial, honour_range, expected_range):
    blob_server = server(honour_range=honour_range)
    dest = tmp_path / "model.safetensors"
    if partial:
        dest.with_name("model.safetensors.part").write_bytes(partial)

    assert url_download.fetch_url(blob_server.url(), dest) == dest

    assert blob_server.ranges == [expected_range]
    assert dest.read_bytes() == BLOB
    assert sha256_of(dest) == hashlib.sha256(BLOB).hexdigest()
    assert not dest.with_name("model.safetensors.part").exists()


def test_fetch_url_failure_says_how_to_resume(tmp_path):
    with pytest.raises(dl.DownloadError, match="Run again to resume"):
        url_download.fetch_url(f"http://127.0.0.1:{closed_port()}/x.safetensors", tmp_path / "x.safetensors")


def test_hf_token_goes_only_to_the_hub(monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_secret")
    assert url_download.hf_auth_headers("https://huggingface.co/a/b/resolve/main/x.safetensors") == {
        "Authorization": "Bearer hf_secret"
    }
    assert url_download.hf_auth_headers("https://civitai.com/api/download/models/1") == {}
    assert url_download.hf_auth_headers("https://huggingface.co.evil.example/x.safetensors") == {}


# --- --base: a single-file checkpoint, converted by diffusers for real -----------------------------------

# What a single-file checkpoint gives the layout: the base's models. Its VAE, if baked in, is left out.
CONVERTED = ("unet", "text_encoder", "text_encoder_2")


@pytest.fixture
def tiny_hub(tiny_weights, tmp_path, monkeypatch) -> Path:
    """A mirror whose four repos hold the tiny synthetic model, so that the layout it fills is one setup()
    loads. The stock base's configs and tokenizers are what a single-file checkpoint is converted with; the
    Hub itself is a closed port, so a conversion that reached for it would fail at once."""
    root = tmp_path / "tiny-hub"
    for folder, repo in PART_REPOS.items():
        shutil.copytree(tiny_weights / folder, root / repo)
    monkeypatch.setenv(sources.MIRROR_ENV, str(root))
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", f"http://127.0.0.1:{closed_port()}")
    return root


def assert_same_weights(converted_base: Path, original_base: Path) -> None:
    """Every tensor of each converted model equals the original's: same names, fp16, same values."""
    for component in CONVERTED:
        (original_file,) = (original_base / component).glob("*.fp16.safetensors")
        (converted_file,) = (converted_base / component).glob("*.fp16.safetensors")
        original, converted = safetensors.torch.load_file(original_file), safetensors.torch.load_file(converted_file)
        assert converted.keys() == original.keys(), component
        for name, tensor in original.items():
            assert converted[name].dtype == torch.float16 and torch.equal(converted[name], tensor), (component, name)


def test_single_file_url_converts_back_to_the_model_it_was_written_from_and_serves(
    tiny_hub, tiny_weights, tmp_path, server, settings, service
):
    """A fine-tune's file (UNet, both text encoders, a VAE baked in) fetched over HTTP and converted by diffusers
    with the stock base's configs: the layout gets the tiny model back, tensor for tensor, and setup() serves
    it, drawing what the original draws."""
    blob = write_single_file(tiny_weights, tmp_path / "fine-tune.safetensors").read_bytes()
    url = server(blob).url("fine-tune.safetensors")
    dest = tmp_path / "weights"

    manifest = dl.download(dest, base=url)

    assert layout_files(dest) == EXPECTED_FILES  # no base/vae: the fp16-fix VAE is used, not the baked one
    assert manifest["sources"]["base"].startswith(f"{url} -> sha256:{hashlib.sha256(blob).hexdigest()} (configs ")
    assert not (dest / dl.STAGING).exists()  # the 7 GB checkpoint is not left in the image
    assert_same_weights(dest / "base", tiny_weights / "base")
    converted = SDXLService(dataclasses.replace(settings, weights_dir=dest))
    assert np.array_equal(pixels(run(converted, seed=7).images[0]), pixels(run(service, seed=7).images[0]))


def test_single_file_without_a_baked_vae_converts_the_same(tiny_hub, tiny_weights, tmp_path):
    checkpoint = write_single_file(tiny_weights, tmp_path / "no-vae.safetensors", parts=CONVERTED)
    dl.download(tmp_path / "weights", base=str(checkpoint))
    assert_same_weights(tmp_path / "weights" / "base", tiny_weights / "base")


def test_the_baked_vae_is_one_diffusers_converts(tiny_weights, tmp_path):
    """The checkpoint's VAE, which the download leaves out, is a faithful one: diffusers reads it back."""
    checkpoint = write_single_file(tiny_weights, tmp_path / "vae-only.safetensors", parts=("vae",))
    vae = AutoencoderKL.from_single_file(
        str(checkpoint), config=str(tiny_weights / "vae"), torch_dtype=torch.float16, local_files_only=True
    )
    original = safetensors.torch.load_file(tiny_weights / "vae" / "diffusion_pytorch_model.fp16.safetensors")
    converted = vae.state_dict()
    assert converted.keys() == original.keys()
    assert all(torch.equal(converted[name], tensor) for name, tensor in original.items())


@pytest.mark.parametrize(
    "parts, missing",
    [
        (("unet", "vae"), "text_encoder (keys conditioner.embedders.0.transformer.*), text_encoder_2 ("),
        (("unet", "text_encoder", "vae"), "text_encoder_2 (keys conditioner.embedders.1.model.*)"),
        (("text_encoder", "text_encoder_2", "vae"), "unet (keys model.diffusion_model.*)"),
    ],
    ids=["no-text-encoders", "no-text-encoder-2", "no-unet"],
)
def test_single_file_lacking_a_model_is_refused_naming_it(tiny_hub, tiny_weights, tmp_path, parts, missing):
    """diffusers refuses these itself, naming the wrong part or none (a bare KeyError without the UNet)."""
    checkpoint = write_single_file(tiny_weights, tmp_path / "partial.safetensors", parts=parts)
    with pytest.raises(dl.DownloadError, match="partial.safetensors is not a full SDXL checkpoint") as error:
        dl.download(tmp_path / "weights", base=str(checkpoint))
    assert f"it has no weights for {missing}" in str(error.value)


def test_single_file_that_is_not_sdxl_fails_with_a_clear_message(tiny_hub, tmp_path):
    checkpoint = tmp_path / "not-sdxl.safetensors"
    safetensors.torch.save_file({"w": torch.zeros(2)}, checkpoint)
    with pytest.raises(dl.DownloadError, match="not-sdxl.safetensors is not a full SDXL checkpoint") as error:
        dl.download(tmp_path / "weights", base=str(checkpoint))
    assert "it has no weights for unet (keys model.diffusion_model.*), text_encoder" in str(error.value)
    assert "\n" not in str(error.value)


# --- Choosing sources, and the CLI ----------------------------------------------------------------------


def test_sources_revision_applies_to_the_base_only(monkeypatch):
    monkeypatch.delenv(sources.MIRROR_ENV, raising=False)
    planned = dl._sources(None, None, "abc123")
    assert planned["base"] == sources.HubRepo(BASE, "abc123", os.environ.get("HF_TOKEN") or None)
    assert {s.revision for name, s in planned.items() if name != "base"} == {"main"}


@pytest.mark.parametrize(
    "spec, message",
    [
        ("model.ckpt", "pickle checkpoint"),
        ("/nonexistent/model.safetensors", "No such checkpoint file"),
    ],
)
def test_open_source_rejects(spec, message):
    with pytest.raises(dl.DownloadError, match=message):
        sources.open_source(spec)


def test_refiner_must_be_a_repo(mirror):
    with pytest.raises(dl.DownloadError, match="Only --base and --model take a single-file checkpoint"):
        dl._sources(None, "https://example.com/refiner.safetensors", "main")


def run_script(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **(env or {})},
    )


def test_help_lists_the_options():
    result = run_script("--help")
    assert result.returncode == 0
    for option in (
        "--dest",
        "--base",
        "--refiner",
        "--revision",
        "--model",
        "--base-name",
        "--profile",
        "--controlnet",
        "--ip-adapter",
        "--depth-estimator",
        "SDXL_HUB_MIRROR",
    ):
        assert option in result.stdout


def load_script():
    loader = importlib.machinery.SourceFileLoader("download_weights", str(SCRIPT))
    module = importlib.util.module_from_spec(importlib.util.spec_from_loader(loader.name, loader))
    loader.exec_module(module)
    return module


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again on return: connections are refused


def test_unreachable_hub_fails_with_a_message_naming_the_repo(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv(sources.MIRROR_ENV, raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", f"http://127.0.0.1:{closed_port()}")

    assert load_script().main(["--dest", str(tmp_path / "weights")]) == 1

    err = capsys.readouterr().err
    assert "Cannot download stabilityai/stable-diffusion-xl-base-1.0@main from the Hugging Face Hub" in err
    assert "Traceback" not in err


def test_script_downloads_from_the_hub_api_then_reports_up_to_date(tmp_path, monkeypatch, caplog):
    """The real huggingface_hub calls, against a local stand-in for huggingface.co (HF_ENDPOINT)."""
    hub = FakeHub(make_mirror(tmp_path / "hub"))
    dest = tmp_path / "weights"
    env = {
        "HF_ENDPOINT": hub.endpoint,
        "HF_TOKEN": "hf_test",
        "HF_HOME": str(tmp_path / "hf-home"),
        "SDXL_HUB_MIRROR": "",
        "SDXL_WEIGHTS_DIR": str(dest),
        "HF_HUB_DISABLE_XET": "1",
    }
    try:
        result = run_script(env=env)
    finally:
        hub.shutdown()
        hub.server_close()

    assert result.returncode == 0, result.stderr
    manifest = read_manifest(dest)
    assert set(manifest["files"]) == EXPECTED_FILES
    assert manifest["sources"]["base"] == f"{BASE}@main -> {commit_of(BASE)}"
    assert all(auth == "Bearer hf_test" for _, _, auth in hub.requests)
    fetched = {
        path.split("/resolve/")[1].split("/", 1)[1]
        for method, path, _ in hub.requests
        if method == "GET" and "/resolve/" in path
    }
    assert "vae/config.json" not in fetched and "unet/diffusion_pytorch_model.safetensors" not in fetched
    # A second run finds the manifest complete and touches no network at all.
    monkeypatch.delenv(sources.MIRROR_ENV, raising=False)
    monkeypatch.setattr(sources.HubRepo, "resolve", lambda self: pytest.fail(f"network use for {self.label}"))
    caplog.set_level("INFO")
    dl.download(dest)
    assert "up to date" in caplog.text


def test_several_models_are_baked_under_their_names_sharing_identical_files(mirror, tmp_path):
    dest = tmp_path / "weights"
    anime = Path(shutil.copytree(mirror / BASE, tmp_path / "anime"))
    (anime / "unet" / "diffusion_pytorch_model.fp16.safetensors").write_bytes(b"anime unet\n" * 3)

    manifest = dl.download(dest, models={"anime": str(anime)}, base_name="sdxl", profiles={"anime": "turbo"})

    assert [(m["name"], m["dir"]) for m in manifest["models"]] == [("sdxl", "base"), ("anime", "models/anime")]
    assert manifest["models"][1]["profile"] == {"preset": "turbo"} and "profile" not in manifest["models"][0]
    assert manifest["models"][1]["source"].startswith(f"{anime} -> local-")
    assert {f.removeprefix("models/anime/") for f in manifest["files"] if f.startswith("models/anime/")} == {
        f.removeprefix("base/") for f in EXPECTED_FILES if f.startswith("base/")
    }
    unet = "unet/diffusion_pytorch_model.fp16.safetensors"
    assert (dest / "models/anime" / unet).read_bytes() == b"anime unet\n" * 3
    # Identical files are one copy on disk; the differing UNet is its own.
    text_encoder = "text_encoder/model.fp16.safetensors"
    assert (dest / "models/anime" / text_encoder).samefile(dest / "base" / text_encoder)
    assert not (dest / "models/anime" / unet).samefile(dest / "base" / unet)
    verify(dest, full_hash=True)
    up_to_date = dl.download(dest, models={"anime": str(anime)}, base_name="sdxl", profiles={"anime": "turbo"})
    assert up_to_date == manifest

    # Dropping the model from the request removes it; the manifest is today's single-model one again.
    manifest = dl.download(dest)
    assert "models" not in manifest and not (dest / "models/anime").exists()


@pytest.mark.parametrize(
    "models,base_name,profiles,message",
    [
        ({"../x": "a/b"}, None, {}, "Model name '../x' is not allowed"),
        ({"x": "a/b"}, "x", {}, "given to the base and to a --model"),
        ({"x": "a/b"}, None, {"y": "turbo"}, "--profile y=turbo: no model is named 'y'"),
        ({"y": "a/b"}, None, {"y": "fast"}, "--profile y=fast: unknown preset; use one of sdxl, turbo, lightning"),
    ],
)
def test_bad_model_names_and_profiles_are_refused(mirror, tmp_path, models, base_name, profiles, message):
    with pytest.raises(dl.DownloadError, match=re.escape(message)):
        dl.download(tmp_path / "weights", models=models, base_name=base_name, profiles=profiles)
