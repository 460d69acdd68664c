"""Baking the optional control models: script/download-weights' --controlnet, --ip-adapter and --depth-estimator
(offline: the Hub mirrored locally, or the real huggingface_hub calls against a loopback stand-in for the Hub API),
script/make-test-weights --control (devtools.synthetic_control.add_control), the manifest's control section as
sdxl_cog.weights.catalog reads it, and setup's checks of those files.

The control repos are stand-ins in the real releases' layouts: small files, except the weights the download converts
(xinsir's ProMax, stored under diffusers' names; h94's fp32 ViT-H encoder, cast to fp16), which are real safetensors.
One test bakes the tiny synthetic models from such a mirror and loads the result with diffusers' and transformers'
own loaders, as the catalog describes it.
"""

from __future__ import annotations

import dataclasses
import importlib.machinery
import importlib.util
import json
import re
import shutil
import sys
from pathlib import Path

import huggingface_hub.constants
import numpy as np
import pytest
import safetensors.torch
import torch
from diffusers import ControlNetUnionModel
from PIL import Image

from sdxl_cog.inputs.control import ControlInput
from sdxl_cog.service import OutputOptions, SDXLService
from sdxl_cog.weights import catalog, sources
from sdxl_cog.weights import download as dl
from sdxl_cog.weights.catalog import ControlEntries, control_entries
from sdxl_cog.weights.control_types import CONTROL_TYPES, UNION_CONTROL_MODES, union_types
from sdxl_cog.weights.layout import MANIFEST_NAME, WeightsError, read_manifest, sha256_of, verify
from tests.conftest import TEST_SIDE, make_request, pixels
from tests.helpers.hub import BASE, REFINER, SAFETY, VAE, FakeHub, commit_of, layout_files, make_mirror, mtimes

REPO_ROOT = Path(__file__).resolve().parent.parent
UNION, CANNY, DEPTH = (
    "xinsir/controlnet-union-sdxl-1.0",
    "diffusers/controlnet-canny-sdxl-1.0",
    "diffusers/controlnet-depth-sdxl-1.0",
)
IP_ADAPTER, DEPTH_ANYTHING = "h94/IP-Adapter", "depth-anything/Depth-Anything-V2-Small-hf"
RAW = OutputOptions(output_format="png", output_quality=80, apply_watermark=False, safety_check=False)

# SDXL ControlNet configs, cut to the keys the download reads. xinsir's config_promax.json names ControlNetModel as
# its class, as a third-party copy of it shows: only num_control_type marks it a union.
SINGLE_CONFIG = {"_class_name": "ControlNetModel", "addition_embed_type": "text_time", "cross_attention_dim": 2048}
PROMAX_CONFIG = SINGLE_CONFIG | {"num_control_type": 8}
FIRST_UNION_CONFIG = SINGLE_CONFIG | {"num_control_type": 6}
PROMAX_TENSORS = {"controlnet_mid_block.weight": torch.linspace(-1, 1, 6, dtype=torch.float16).reshape(2, 3)}
VIT_H_TENSORS = {"vision_model.embeddings.patch_embedding.weight": torch.linspace(-2, 2, 8, dtype=torch.float32)}

# What each repo holds; JSON files get their content below, weights the tensors above, the rest stand-in bytes.
CONTROL_REPO_FILES = {
    UNION: [
        "README.md",
        "config.json",
        "diffusion_pytorch_model.safetensors",  # the first release: 6 types, no tile
        "config_promax.json",
        "diffusion_pytorch_model_promax.safetensors",
        "images/000000_canny_concat.webp",
    ],
    **{
        repo: [
            "README.md",
            "config.json",
            "diffusion_pytorch_model.fp16.safetensors",
            "diffusion_pytorch_model.safetensors",
            "out_hug_lab_7.png",
        ]
        for repo in (CANNY, DEPTH)
    },
    IP_ADAPTER: [
        "README.md",
        "models/ip-adapter_sd15.safetensors",
        "models/ip-adapter_sd15.bin",
        "models/image_encoder/config.json",
        "models/image_encoder/model.safetensors",  # ViT-H, fp32
        "models/image_encoder/pytorch_model.bin",
        "sdxl_models/ip-adapter_sdxl.safetensors",
        "sdxl_models/ip-adapter_sdxl.bin",
        "sdxl_models/ip-adapter_sdxl_vit-h.safetensors",
        "sdxl_models/ip-adapter_sdxl_vit-h.bin",
        "sdxl_models/ip-adapter-plus_sdxl_vit-h.safetensors",
        "sdxl_models/image_encoder/config.json",
        "sdxl_models/image_encoder/model.safetensors",  # ViT-bigG, fp16
        "sdxl_models/image_encoder/pytorch_model.bin",
    ],
    DEPTH_ANYTHING: ["README.md", "config.json", "model.safetensors", "preprocessor_config.json"],
}
JSON_FILES = {
    f"{UNION}/config.json": FIRST_UNION_CONFIG,
    f"{UNION}/config_promax.json": PROMAX_CONFIG,
    f"{CANNY}/config.json": SINGLE_CONFIG,
    f"{DEPTH}/config.json": SINGLE_CONFIG,
    f"{IP_ADAPTER}/models/image_encoder/config.json": {"model_type": "clip_vision_model", "hidden_size": 1280},
    f"{IP_ADAPTER}/sdxl_models/image_encoder/config.json": {"model_type": "clip_vision_model", "hidden_size": 1664},
    f"{DEPTH_ANYTHING}/config.json": {"model_type": "depth_anything"},
    f"{DEPTH_ANYTHING}/preprocessor_config.json": {"image_processor_type": "DPTImageProcessor"},
}
TENSOR_FILES = {
    f"{UNION}/diffusion_pytorch_model_promax.safetensors": PROMAX_TENSORS,
    f"{IP_ADAPTER}/models/image_encoder/model.safetensors": VIT_H_TENSORS,
}

# What each flag bakes: layout file -> the repo file it is (or is made from), and the manifest entry it adds.
UNION_DIR, CANNY_DIR, DEPTH_DIR = "control/controlnet-union", "control/controlnet-canny", "control/controlnet-depth"
ADAPTER_DIR, ESTIMATOR_DIR = "control/ip-adapter", "control/depth-anything"
FLAGS = {
    "union": (
        {"controlnets": ["union"]},
        {
            f"{UNION_DIR}/config.json": (UNION, "config_promax.json"),
            f"{UNION_DIR}/diffusion_pytorch_model.fp16.safetensors": (
                UNION,
                "diffusion_pytorch_model_promax.safetensors",
            ),
        },
        ("controlnets", {"name": "union", "kind": "union", "dir": UNION_DIR, "types": list(CONTROL_TYPES)}),
    ),
    "canny": (
        {"controlnets": ["canny"]},
        {f"{CANNY_DIR}/{name}": (CANNY, name) for name in ("config.json", "diffusion_pytorch_model.fp16.safetensors")},
        ("controlnets", {"name": "canny", "kind": "single", "dir": CANNY_DIR, "types": ["canny"]}),
    ),
    "depth": (
        {"controlnets": ["depth"]},
        {f"{DEPTH_DIR}/{name}": (DEPTH, name) for name in ("config.json", "diffusion_pytorch_model.fp16.safetensors")},
        ("controlnets", {"name": "depth", "kind": "single", "dir": DEPTH_DIR, "types": ["depth"]}),
    ),
    "ip-adapter vit-h": (
        {"ip_adapter": "vit-h"},
        {
            f"{ADAPTER_DIR}/{name}": (IP_ADAPTER, name)
            for name in (
                "sdxl_models/ip-adapter_sdxl_vit-h.safetensors",
                "models/image_encoder/config.json",
                "models/image_encoder/model.safetensors",  # cast to fp16, under the name transformers reads
            )
        },
        (
            "ip_adapter",
            {
                "dir": ADAPTER_DIR,
                "subfolder": "sdxl_models",
                "weight_name": "ip-adapter_sdxl_vit-h.safetensors",
                "image_encoder_folder": "models/image_encoder",
            },
        ),
    ),
    "ip-adapter bigg": (
        {"ip_adapter": "bigg"},
        {
            f"{ADAPTER_DIR}/sdxl_models/{name}": (IP_ADAPTER, f"sdxl_models/{name}")
            for name in ("ip-adapter_sdxl.safetensors", "image_encoder/config.json", "image_encoder/model.safetensors")
        },
        (
            "ip_adapter",
            {
                "dir": ADAPTER_DIR,
                "subfolder": "sdxl_models",
                "weight_name": "ip-adapter_sdxl.safetensors",
                "image_encoder_folder": "image_encoder",
            },
        ),
    ),
    "depth-estimator": (
        {"depth_estimator": True},
        {
            f"{ESTIMATOR_DIR}/{name}": (DEPTH_ANYTHING, name)
            for name in ("config.json", "model.safetensors", "preprocessor_config.json")
        },
        ("depth_estimator", {"dir": ESTIMATOR_DIR}),
    ),
}
CONVERTED = {  # layout file -> the tensors it must hold: the source's, in fp16
    f"{UNION_DIR}/diffusion_pytorch_model.fp16.safetensors": PROMAX_TENSORS,
    f"{ADAPTER_DIR}/models/image_encoder/model.safetensors": VIT_H_TENSORS,
}
EVERYTHING = {"controlnets": ["union", "canny", "depth"], "ip_adapter": "vit-h", "depth_estimator": True}


def make_control_mirror(root: Path) -> Path:
    for repo, files in CONTROL_REPO_FILES.items():
        for name in files:
            path = root / repo / name
            path.parent.mkdir(parents=True, exist_ok=True)
            if f"{repo}/{name}" in JSON_FILES:
                path.write_text(json.dumps(JSON_FILES[f"{repo}/{name}"]))
            elif f"{repo}/{name}" in TENSOR_FILES:
                safetensors.torch.save_file(TENSOR_FILES[f"{repo}/{name}"], path)  # no metadata, as xinsir's
            else:
                path.write_bytes(f"{repo}/{name}\n".encode() * 3)
    return root


@pytest.fixture
def mirror(tmp_path, monkeypatch) -> Path:
    root = make_control_mirror(make_mirror(tmp_path / "hub"))
    monkeypatch.setenv(sources.MIRROR_ENV, str(root))
    return root


def control_files(root: Path) -> set[str]:
    return {name for name in layout_files(root) if name.startswith("control/")}


def without_sources(section: dict) -> dict:
    def strip(entry: dict) -> dict:
        return {key: value for key, value in entry.items() if key != "source"}

    return {
        key: [strip(e) for e in value] if isinstance(value, list) else strip(value) for key, value in section.items()
    }


# --- Each flag ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("flag", FLAGS)
def test_each_flag_bakes_its_files_and_its_manifest_entry(mirror, tmp_path, flag):
    options, files, (key, entry) = FLAGS[flag]
    dest = tmp_path / "weights"

    manifest = dl.download(dest, **options)

    assert control_files(dest) == set(files)
    for name, (repo, source) in files.items():
        if name not in CONVERTED:
            assert (dest / name).read_bytes() == (mirror / repo / source).read_bytes(), name
    recorded = manifest["control"][key]
    recorded = recorded[0] if key == "controlnets" else recorded
    assert {k: v for k, v in recorded.items() if k != "source"} == entry
    assert recorded["source"].startswith(f"{mirror / files[next(iter(files))][0]} -> local-")
    assert manifest["sources"][entry["dir"]] == recorded["source"]
    for name in files:
        assert manifest["files"][name] == {"size": (dest / name).stat().st_size, "sha256": sha256_of(dest / name)}
    verify(dest, full_hash=True)
    assert not (dest / dl.STAGING).exists()
    assert control_entries(manifest) != ControlEntries()


@pytest.mark.parametrize("layout_file", CONVERTED)
def test_renamed_and_fp32_weights_are_stored_as_fp16_with_the_same_values(mirror, tmp_path, layout_file):
    dl.download(tmp_path / "weights", **EVERYTHING)
    stored, original = safetensors.torch.load_file(tmp_path / "weights" / layout_file), CONVERTED[layout_file]
    assert stored.keys() == original.keys()
    for name, tensor in original.items():
        assert stored[name].dtype == torch.float16 and torch.equal(stored[name], tensor.half()), name


def test_the_union_serves_what_its_config_says(mirror, tmp_path):
    promax = dl.download(tmp_path / "weights", controlnets=["union"])
    assert promax["control"]["controlnets"][0]["types"] == list(CONTROL_TYPES)
    # The first release (6 modes) has no tile: a union whose config says so serves the rest.
    (mirror / UNION / "config_promax.json").write_text(json.dumps(FIRST_UNION_CONFIG))
    first = dl.download(tmp_path / "other-weights", controlnets=["union"])
    assert first["control"]["controlnets"][0]["types"] == [t for t in CONTROL_TYPES if t != "tile"]


def test_control_types_table():
    assert CONTROL_TYPES == ("canny", "depth", "pose", "lineart", "soft_edge", "normal", "segmentation", "tile")
    assert UNION_CONTROL_MODES["canny"] == UNION_CONTROL_MODES["lineart"] == 3 and UNION_CONTROL_MODES["pose"] == 0
    assert union_types(8) == CONTROL_TYPES and "tile" not in union_types(6) and len(union_types(6)) == 7


# --- Without the flags, re-runs, resuming -------------------------------------------------------------------------


def test_without_the_flags_the_weights_and_manifest_are_as_before(mirror, tmp_path):
    """No control/ and no control section; and dropping the flags after a bake gives the same bytes back."""
    plain = tmp_path / "plain"
    manifest = dl.download(plain)
    assert set(manifest) == {"format", "sources", "files"} and not (plain / "control").exists()

    baked = tmp_path / "baked"
    dl.download(baked, **EVERYTHING)
    again = dl.download(baked)

    assert not (baked / "control").exists() and "control" not in again
    assert (baked / MANIFEST_NAME).read_bytes() == (plain / MANIFEST_NAME).read_bytes()
    assert layout_files(baked) == layout_files(plain)


def test_second_run_copies_nothing(mirror, tmp_path, fetch_log, caplog):
    dest = tmp_path / "weights"
    dl.download(dest, **EVERYTHING)
    before, fetch_log[:] = mtimes(dest), []
    caplog.set_level("INFO")

    assert dl.download(dest, **EVERYTHING) == read_manifest(dest)

    assert fetch_log == [] and mtimes(dest) == before
    assert "up to date" in caplog.text


def test_changed_flags_rebake_only_what_changed(mirror, tmp_path, fetch_log):
    dest = tmp_path / "weights"
    dl.download(dest, **EVERYTHING)
    fetch_log[:] = []

    manifest = dl.download(dest, controlnets=["union", "depth"], ip_adapter="bigg", depth_estimator=True)

    # canny is gone; the vit-h files are replaced by bigG's; nothing else is fetched again.
    assert sorted(fetch_log) == sorted(
        ["sdxl_models/ip-adapter_sdxl.safetensors", "sdxl_models/image_encoder/config.json"]
        + ["sdxl_models/image_encoder/model.safetensors"]
        + ["config_promax.json", "config.json"]  # each ControlNet's config is read before its weights
    )
    assert control_files(dest) == {
        *FLAGS["union"][1],
        *FLAGS["depth"][1],
        *FLAGS["ip-adapter bigg"][1],
        *FLAGS["depth-estimator"][1],
    }
    assert [c["name"] for c in manifest["control"]["controlnets"]] == ["union", "depth"]
    verify(dest, full_hash=True)


def test_deleted_or_truncated_control_files_are_fetched_again(mirror, tmp_path, fetch_log):
    dest = tmp_path / "weights"
    dl.download(dest, **EVERYTHING)
    (dest / UNION_DIR / "diffusion_pytorch_model.fp16.safetensors").unlink()
    with open(dest / ADAPTER_DIR / "models/image_encoder/model.safetensors", "r+b") as f:
        f.truncate(10)
    before, fetch_log[:] = mtimes(dest), []

    dl.download(dest, **EVERYTHING)

    # The two configs are read again to check them; only the two broken files are made again.
    assert sorted(fetch_log) == sorted(
        ["config_promax.json", "config.json", "config.json"]
        + ["diffusion_pytorch_model_promax.safetensors", "models/image_encoder/model.safetensors"]
    )
    changed = {name for name, t in mtimes(dest).items() if before.get(name) != t}
    assert changed == {
        f"{UNION_DIR}/diffusion_pytorch_model.fp16.safetensors",
        f"{ADAPTER_DIR}/models/image_encoder/model.safetensors",
    }
    verify(dest, full_hash=True)


def test_interrupted_run_leaves_no_manifest_and_the_next_run_completes(mirror, tmp_path, monkeypatch, fetch_log):
    dest = tmp_path / "weights"
    dl.download(dest)
    fill = dl.fill_control

    def fail_at_the_depth_estimator(root, control, repo, old):
        if control.part.folder == ESTIMATOR_DIR:
            raise dl.DownloadError("the network dropped")
        return fill(root, control, repo, old)

    monkeypatch.setattr(dl, "fill_control", fail_at_the_depth_estimator)
    with pytest.raises(dl.DownloadError):
        dl.download(dest, **EVERYTHING)
    with pytest.raises(WeightsError, match="No weights manifest"):
        verify(dest)  # setup() refuses the half-baked directory

    monkeypatch.setattr(dl, "fill_control", fill)
    fetch_log[:] = []
    manifest = dl.download(dest, **EVERYTHING)
    assert control_entries(verify(dest, full_hash=True)).depth_estimator is not None
    assert "model.safetensors" in fetch_log and "unet/diffusion_pytorch_model.fp16.safetensors" not in fetch_log
    assert len(manifest["control"]["controlnets"]) == 3


# --- Refusals -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "options, message",
    [
        ({"controlnets": ["scribble"]}, "--controlnet scribble: unknown; use union, canny, depth, or TYPE=SOURCE"),
        (
            {"controlnets": ["pose"]},
            "--controlnet pose: give a single-type pose ControlNet as --controlnet pose=SOURCE",
        ),
        ({"controlnets": ["canny="]}, "--controlnet canny=: give a single-type canny ControlNet as"),
        (
            {"controlnets": ["union=other/repo"]},
            "--controlnet union=other/repo: union is xinsir/controlnet-union-sdxl-1.0, baked as --controlnet union",
        ),
        ({"controlnets": ["canny", f"canny={CANNY}"]}, "--controlnet canny is given twice"),
        ({"ip_adapter": "vit-l"}, "--ip-adapter vit-l: unknown; use one of vit-h, bigg"),
        ({"controlnets": [f"pose={UNION}/nowhere"]}, f"{UNION}/nowhere is not in the mirror"),
    ],
)
def test_bad_flag_values_are_refused_before_any_download(mirror, tmp_path, fetch_log, options, message):
    with pytest.raises(dl.DownloadError, match=re.escape(message)):
        dl.download(tmp_path / "weights", **options)
    assert fetch_log == []


def test_a_single_file_is_not_a_control_model(mirror, tmp_path):
    single = tmp_path / "canny.safetensors"
    safetensors.torch.save_file(PROMAX_TENSORS, single)
    with pytest.raises(dl.DownloadError, match="must be a diffusers repo or folder, not one file"):
        dl.download(tmp_path / "weights", controlnets=[f"canny={single}"])


@pytest.mark.parametrize("spec", ["canny", "pose=UNION_FOLDER"])
def test_a_union_checkpoint_given_as_a_single_type_controlnet_is_refused(mirror, tmp_path, fetch_log, spec):
    """ControlNetModel would load it with a mere warning and serve a broken model; its weights are not fetched."""
    union_folder = Path(shutil.copytree(mirror / UNION, tmp_path / "union-copy"))
    (union_folder / "config.json").write_text(json.dumps(PROMAX_CONFIG))
    (mirror / CANNY / "config.json").write_text(json.dumps(PROMAX_CONFIG))  # a canny repo that is a union
    spec = spec.replace("UNION_FOLDER", str(union_folder))
    dl.download(tmp_path / "weights")  # the base first: what follows fetches only for the ControlNet
    fetch_log[:] = []

    with pytest.raises(dl.DownloadError) as error:
        dl.download(tmp_path / "weights", controlnets=[spec])

    name = spec.split("=")[0]
    assert f"--controlnet {name}: " in str(error.value)
    assert "is a ControlNet-Union (" in str(error.value) and "config.json has num_control_type 8" in str(error.value)
    assert "bake the union with --controlnet union" in str(error.value)
    assert fetch_log == ["config.json"]


@pytest.mark.parametrize(
    "repo, config, message",
    [
        (UNION, SINGLE_CONFIG, "--controlnet union: .* is not a ControlNet-Union \\(.*config_promax.json has no"),
        (CANNY, {"_class_name": "ControlNetModel", "cross_attention_dim": 768}, "is not an SDXL ControlNet"),
        (CANNY, SINGLE_CONFIG | {"_class_name": "ControlNetXSAdapter"}, "names 'ControlNetXSAdapter'"),
    ],
    ids=["union-without-modes", "sd15", "other-class"],
)
def test_a_config_that_contradicts_its_flag_is_refused(mirror, tmp_path, repo, config, message):
    name = "config_promax.json" if repo == UNION else "config.json"
    (mirror / repo / name).write_text(json.dumps(config))
    with pytest.raises(dl.DownloadError, match=message):
        dl.download(tmp_path / "weights", controlnets=["union" if repo == UNION else "canny"])


# --- The script, against a loopback Hub ---------------------------------------------------------------------------


def load_script(name: str):
    path = REPO_ROOT / "script" / name
    loader = importlib.machinery.SourceFileLoader(name.replace("-", "_"), str(path))
    module = importlib.util.module_from_spec(importlib.util.spec_from_loader(loader.name, loader))
    loader.exec_module(module)
    return module


def test_script_bakes_control_from_the_hub_api(tmp_path, monkeypatch):
    """The real huggingface_hub calls against a stand-in for huggingface.co, in this process: only the files the
    layout needs are fetched (not xinsir's first release, not the pickles, not the SD 1.5 adapters)."""
    hub = FakeHub(make_control_mirror(make_mirror(tmp_path / "hub")))
    monkeypatch.delenv(sources.MIRROR_ENV, raising=False)
    monkeypatch.setenv("HF_TOKEN", "hf_test")
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", hub.endpoint)
    template = f"{hub.endpoint}/{{repo_id}}/resolve/{{revision}}/{{filename}}"  # made from HF_ENDPOINT at import
    monkeypatch.setattr(huggingface_hub.constants, "HUGGINGFACE_CO_URL_TEMPLATE", template)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_DISABLE_XET", True)
    dest = tmp_path / "weights"
    flags = ["--controlnet", "union", "--controlnet", "depth", "--ip-adapter", "--depth-estimator"]
    try:
        assert load_script("download-weights").main(["--dest", str(dest), *flags]) == 0
    finally:
        hub.shutdown()
        hub.server_close()

    manifest = read_manifest(dest)
    assert manifest["control"]["controlnets"][0]["source"] == f"{UNION}@main -> {commit_of(UNION)}"
    assert manifest["control"]["ip_adapter"]["weight_name"] == "ip-adapter_sdxl_vit-h.safetensors"
    assert control_files(dest) == {
        *FLAGS["union"][1],
        *FLAGS["depth"][1],
        *FLAGS["ip-adapter vit-h"][1],
        *FLAGS["depth-estimator"][1],
    }
    fetched = {
        path.split("/resolve/")[0].removeprefix("/") + "/" + path.split("/resolve/")[1].split("/", 1)[1]
        for method, path, _ in hub.requests
        if method == "GET" and "/resolve/" in path
    }
    control_fetched = {f for f in fetched if f.split("/")[0] in {r.split("/")[0] for r in CONTROL_REPO_FILES}}
    assert control_fetched == {f"{repo}/{name}" for repo, name in [*FLAGS["union"][1].values()]} | {
        f"{repo}/{name}"
        for flag in ("depth", "ip-adapter vit-h", "depth-estimator")
        for repo, name in FLAGS[flag][1].values()
    }
    for name, tensors in CONVERTED.items():
        stored = safetensors.torch.load_file(dest / name)
        assert all(torch.equal(stored[k], t.half()) for k, t in tensors.items())
    verify(dest, full_hash=True)


def test_script_refuses_bad_values_with_one_line(tmp_path, capsys):
    assert load_script("download-weights").main(["--dest", str(tmp_path), "--controlnet", "scribble"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("download-weights: --controlnet scribble: unknown") and "Traceback" not in err


# --- Tiny control models: baked from a mirror of their releases, loaded by the real loaders ----------------------


@pytest.fixture(scope="module")
def tiny_control(tmp_path_factory) -> Path:
    """script/make-test-weights --control DIR: the tiny base with every tiny control model."""
    root = tmp_path_factory.mktemp("weights")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sys, "argv", ["make-test-weights", "--control", str(root)])
        load_script("make-test-weights").main()
    return root


def test_make_test_weights_control_bakes_every_model_with_its_manifest_entry(tiny_control):
    entries = control_entries(verify(tiny_control, full_hash=True))
    assert [(c.name, c.kind, c.types) for c in entries.controlnets] == [
        ("union", "union", CONTROL_TYPES),
        ("canny", "single", ("canny",)),
        ("depth", "single", ("depth",)),
    ]
    # h94's bigG layout, recorded as download-weights --ip-adapter bigg records it.
    assert without_sources(read_manifest(tiny_control)["control"])["ip_adapter"] == FLAGS["ip-adapter bigg"][2][1]
    assert entries.ip_adapter.image_encoder_path == "control/ip-adapter/sdxl_models/image_encoder"
    assert entries.depth_estimator.folder == ESTIMATOR_DIR
    assert {name for name in layout_files(tiny_control) if name.startswith("control/")} == {
        name for name in read_manifest(tiny_control)["files"] if name.startswith("control/")
    }


def release_mirror(tiny_control: Path, root: Path) -> Path:
    """The tiny control models laid out as their releases are on the Hub, for download-weights to bake; the tiny
    SDXL parts as the stock repos, so that the result is one setup() loads."""
    for folder, repo in {"base": BASE, "refiner": REFINER, "vae": VAE, "safety_checker": SAFETY}.items():
        shutil.copytree(tiny_control / folder, root / repo)
    control = tiny_control / "control"
    shutil.copytree(control / "controlnet-canny", root / CANNY)
    union = Path(shutil.copytree(control / "controlnet-union", root / UNION))
    (union / "config.json").rename(union / "config_promax.json")
    (union / "diffusion_pytorch_model.fp16.safetensors").rename(union / "diffusion_pytorch_model_promax.safetensors")
    shutil.copytree(control / "depth-anything", root / DEPTH_ANYTHING)
    # The ViT-H variant's names, with the tiny adapter and its encoder stored in fp32, as h94 stores ViT-H.
    adapter = control / "ip-adapter" / "sdxl_models"
    (root / IP_ADAPTER / "sdxl_models").mkdir(parents=True)
    shutil.copy(
        adapter / "ip-adapter_sdxl.safetensors", root / IP_ADAPTER / "sdxl_models/ip-adapter_sdxl_vit-h.safetensors"
    )
    encoder = root / IP_ADAPTER / "models/image_encoder"
    encoder.mkdir(parents=True)
    shutil.copy(adapter / "image_encoder/config.json", encoder / "config.json")
    fp16 = safetensors.torch.load_file(adapter / "image_encoder/model.safetensors")
    safetensors.torch.save_file(
        {k: t.float() for k, t in fp16.items()}, encoder / "model.safetensors", {"format": "pt"}
    )
    return root


@pytest.fixture
def one_thread():
    """Two generations on tiny models: on a shared 2-core machine a second OpenMP thread spins more than it works."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_baked_control_models_load_and_serve_as_the_catalog_says(
    tiny_control, tmp_path, monkeypatch, settings, one_thread
):
    """download-weights bakes the tiny models from their releases' layouts (the union renamed, the ViT-H encoder cast
    from fp32); diffusers loads the union as the catalog's kind says, and the engine serves a union control, a depth
    map from the baked estimator and an image prompt from them exactly as from make-test-weights' own copies."""
    monkeypatch.setenv(sources.MIRROR_ENV, str(release_mirror(tiny_control, tmp_path / "hub")))
    dest = tmp_path / "weights"
    flags = {"controlnets": ["union", "canny"], "ip_adapter": "vit-h", "depth_estimator": True}
    entries = control_entries(dl.download(dest, **flags))

    union = entries.controlnets[0]
    assert union.types == CONTROL_TYPES
    loaded = ControlNetUnionModel.from_pretrained(dest / union.folder, variant="fp16")
    original = safetensors.torch.load_file(tiny_control / UNION_DIR / "diffusion_pytorch_model.fp16.safetensors")
    assert all(torch.equal(loaded.state_dict()[k].half(), t) for k, t in original.items())
    encoder = safetensors.torch.load_file(dest / entries.ip_adapter.image_encoder_path / "model.safetensors")
    assert {t.dtype for t in encoder.values()} == {torch.float16}  # cast, under the name from_pretrained reads
    # pose has no single-type ControlNet in either: the union serves both controls.
    photo = tmp_path / "photo.png"
    Image.fromarray(np.random.default_rng(3).integers(0, 255, (TEST_SIDE, TEST_SIDE, 3), dtype=np.uint8)).save(photo)
    request = make_request(
        controls=[ControlInput("pose", photo, False, 0.8, 0.0, 1.0), ControlInput("depth", photo, True, 0.8, 0.0, 1.0)],
        ip_adapter_image=photo,
        ip_adapter_scale=0.6,
        num_inference_steps=2,
        seed=7,
    )
    images = [
        pixels(SDXLService(dataclasses.replace(settings, weights_dir=root)).predict(request, RAW, None, 0.6).paths[0])
        for root in (dest, tiny_control)
    ]
    assert np.array_equal(*images)


# --- Setup's checks and the catalog -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "broken, flag",
    [
        (f"{UNION_DIR}/diffusion_pytorch_model.fp16.safetensors", "--controlnet union"),
        (f"{ADAPTER_DIR}/sdxl_models/image_encoder/model.safetensors", "--ip-adapter"),
        (f"{ESTIMATOR_DIR}/preprocessor_config.json", "--depth-estimator"),
    ],
)
def test_a_missing_control_file_fails_setup_naming_it_and_the_flag(tiny_control, tmp_path, settings, broken, flag):
    weights = Path(shutil.copytree(tiny_control, tmp_path / "weights"))
    (weights / broken).unlink()
    with pytest.raises(WeightsError) as error:
        SDXLService(dataclasses.replace(settings, weights_dir=weights))
    assert f"Missing weights file {weights / broken}. Re-run script/download-weights" in str(error.value)
    assert f"{flag} among them" in str(error.value) and "make-test-weights --control" in str(error.value)


def test_a_manifest_without_control_has_no_control_entries(tiny_weights):
    assert control_entries(read_manifest(tiny_weights)) == ControlEntries()


def edited(manifest: dict, **control) -> dict:
    return manifest | {"control": manifest["control"] | control}


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda c: [c[0] | {"kind": "multi"}], "ControlNet 'union' in the weights manifest: unknown kind 'multi'"),
        (lambda c: [c[0] | {"types": ["canny", "scribble"]}], "unknown type 'scribble'"),
        (lambda c: [c[1] | {"types": ["canny", "depth"]}], "a single-type ControlNet serves one type, not"),
        (lambda c: [c[1], c[1] | {"name": "canny2"}], "two ControlNets single-type for 'canny'"),
        (lambda c: [c[0], c[0] | {"name": "union2"}], "two ControlNets of kind 'union'"),
        (lambda c: [c[1], c[1] | {"types": ["depth"]}], "two ControlNets named 'canny'"),
        (lambda c: [c[1] | {"dir": "control/elsewhere"}], "lists no control/elsewhere/config.json"),
        (lambda c: [{k: v for k, v in c[0].items() if k != "kind"}], "control section lacks the field 'kind'"),
    ],
)
def test_the_catalog_refuses_a_control_section_it_cannot_serve_from(tiny_control, change, message):
    manifest = read_manifest(tiny_control)
    with pytest.raises(ValueError, match=re.escape(message)):
        control_entries(edited(manifest, controlnets=change(manifest["control"]["controlnets"])))


def test_the_catalog_checks_the_adapter_files_where_diffusers_reads_them(tiny_control):
    manifest = read_manifest(tiny_control)
    adapter = manifest["control"]["ip_adapter"]
    as_path = edited(manifest, ip_adapter=adapter | {"image_encoder_folder": "sdxl_models/image_encoder"})
    assert control_entries(as_path).ip_adapter.image_encoder_path == "control/ip-adapter/sdxl_models/image_encoder"
    elsewhere = edited(manifest, ip_adapter=adapter | {"image_encoder_folder": "models/image_encoder"})
    with pytest.raises(ValueError, match="lists no control/ip-adapter/models/image_encoder/config.json"):
        control_entries(elsewhere)
    assert catalog.IpAdapterEntry("f", "", "sdxl_models", "w", "image_encoder").image_encoder_path == (
        "f/sdxl_models/image_encoder"
    )
