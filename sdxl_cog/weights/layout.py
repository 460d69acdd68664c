"""The on-disk layout of `weights/` and its manifest.

One layout serves three writers and one reader: `script/download-weights` (real weights from Hugging
Face), `script/make-test-weights` (synthetic weights) and the Docker build write it; `setup()` reads it.

    weights/
      manifest.json      every file below with its size and sha256, and where it came from
      base/              SDXL base in diffusers layout (fp16 variant files), without its own VAE
      refiner/           the refiner's own parts: model_index.json, scheduler/, unet/
      vae/               madebyollin/sdxl-vae-fp16-fix, shared by base and refiner
      safety_checker/    CompVis/stable-diffusion-safety-checker and its image processor config
      models/NAME/       each further SDXL checkpoint, laid out like base/ (a request picks one by name)
      control/           optional, baked by download-weights' flags (docs/weights.md):
        controlnet-NAME/   a ControlNet or ControlNet-Union: config.json, diffusion_pytorch_model.fp16.safetensors
        ip-adapter/        h94/IP-Adapter's SDXL adapter and its CLIP image encoder, in that repo's folders
        depth-anything/    Depth Anything V2 Small, the depth preprocessor

The manifest's `models` list names every checkpoint in order, the first being base/ (the default), with
its folder and source. A manifest without that list (written before several models could be baked)
describes base/ alone, named after its source, so such a weights directory loads as it always did.
Its `control` section, present only when something under control/ is baked, lists those models
(sdxl_cog/weights/catalog.py reads it).
Files that two checkpoints share byte for byte (same sha256) are hard links to one copy.

Every weight file is an fp16 variant, the dtype setup() runs in on a GPU, even where the source repo
ships only fp32 (the VAE and the safety checker): casting at download time instead of in every setup()
saves 0.78 GB of reads and 0.7 GiB of host memory per cold start (bench/RESULTS.md). Under control/ the
weights are fp16 too (the ViT-H image encoder is cast at download), but keep the names their loaders read
(load_ip_adapter takes no variant); the depth estimator stays fp32, as published (99 MB).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from sdxl_cog.weights.atomic import atomic_target

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = 1
FIX_COMMAND = "script/download-weights (or script/make-test-weights DIR for synthetic test weights)"

BASE_DIR = "base"
REFINER_DIR = "refiner"
VAE_DIR = "vae"
SAFETY_CHECKER_DIR = "safety_checker"
MODELS_DIR = "models"
# The optional ControlNet, IP-Adapter and depth models (script/download-weights --controlnet, --ip-adapter, ...).
CONTROL_DIR = "control"
CONTROLNET_PREFIX = "controlnet-"
IP_ADAPTER_DIR = f"{CONTROL_DIR}/ip-adapter"
DEPTH_ESTIMATOR_DIR = f"{CONTROL_DIR}/depth-anything"

# What each control model's loader reads, relative to its folder (an IP-Adapter's encoder: to the encoder's folder).
# Every ControlNet is stored under diffusers' fp16 variant names, whatever its release calls the files.
CONTROLNET_FILES = ("config.json", "diffusion_pytorch_model.fp16.safetensors")
# load_ip_adapter reads the encoder without a variant, so it keeps the plain name even where it was cast to fp16.
IMAGE_ENCODER_FILES = ("config.json", "model.safetensors")
DEPTH_ESTIMATOR_FILES = ("config.json", "model.safetensors", "preprocessor_config.json")
# The script/download-weights flag that bakes each folder under control/, for the message that says how to fix one.
CONTROL_FLAGS = {"ip-adapter": "--ip-adapter", "depth-anything": "--depth-estimator"}
CONTROL_FIX_COMMAND = (
    "script/download-weights with the flags it was baked with, {flag} among them "
    "(or script/make-test-weights --control DIR for synthetic test weights)"
)

# The files setup() cannot start without, relative to the weights root, with diffusers' "fp16" variant names.
REQUIRED_FILES = (
    "base/model_index.json",
    "base/scheduler/scheduler_config.json",
    "base/text_encoder/config.json",
    "base/text_encoder/model.fp16.safetensors",
    "base/text_encoder_2/config.json",
    "base/text_encoder_2/model.fp16.safetensors",
    "base/tokenizer/vocab.json",
    "base/tokenizer/merges.txt",
    "base/tokenizer_2/vocab.json",
    "base/tokenizer_2/merges.txt",
    "base/unet/config.json",
    "base/unet/diffusion_pytorch_model.fp16.safetensors",
    "refiner/model_index.json",
    "refiner/scheduler/scheduler_config.json",
    "refiner/unet/config.json",
    "refiner/unet/diffusion_pytorch_model.fp16.safetensors",
    "vae/config.json",
    "vae/diffusion_pytorch_model.fp16.safetensors",
    "safety_checker/config.json",
    "safety_checker/model.fp16.safetensors",
    "safety_checker/preprocessor_config.json",
)

HASH_CHUNK_BYTES = 16 * 1024 * 1024
# The manifest covers these folders only: whatever else sits in weights/ (its README, an operator's
# loras/ or notes) is not a weight, and editing it must never fail setup.
PART_DIRS = (BASE_DIR, REFINER_DIR, VAE_DIR, SAFETY_CHECKER_DIR, MODELS_DIR, CONTROL_DIR)


class WeightsError(RuntimeError):
    """The weights directory is missing, incomplete or corrupt. The message says how to fix it."""


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(HASH_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def _weight_files(root: Path) -> list[Path]:
    """The weights and their configs: every file of the model parts, less download staging (.cache)."""
    files = (p for part in PART_DIRS for p in (root / part).rglob("*"))
    return sorted(p for p in files if p.is_file() and ".cache" not in p.relative_to(root).parts)


def write_manifest(
    root: Path, sources: dict[str, str], models: list[dict] | None = None, control: dict | None = None
) -> dict:
    """Hash every weight file under `root` and write manifest.json; `sources` records where each part came from,
    `models` (see the module docstring) the checkpoints beyond a single base/, `control` the optional ControlNet,
    IP-Adapter and depth models under control/ (catalog.control_entries reads it)."""
    files = {
        p.relative_to(root).as_posix(): {"size": p.stat().st_size, "sha256": sha256_of(p)} for p in _weight_files(root)
    }
    manifest = {"format": MANIFEST_FORMAT, "sources": sources, "files": files}
    if models:
        manifest["models"] = models
    if control:
        manifest["control"] = control
    with atomic_target(root / MANIFEST_NAME) as tmp:
        tmp.write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    return manifest


def read_manifest(root: Path) -> dict:
    path = root / MANIFEST_NAME
    if not path.is_file():
        raise WeightsError(f"No weights manifest at {path}. Fill {root} with {FIX_COMMAND}.")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise WeightsError(f"Weights manifest {path} is not valid JSON ({e}). Re-run {FIX_COMMAND}.") from e
    if manifest.get("format") != MANIFEST_FORMAT:
        raise WeightsError(
            f"Weights manifest {path} has format {manifest.get('format')!r}, expected {MANIFEST_FORMAT}."
        )
    return manifest


def verify(root: Path, full_hash: bool = False) -> dict:
    """Check that the weights under `root` are complete and match their manifest.

    Sizes are always compared (cheap: one stat per file); sha256 only when `full_hash` is set, since
    hashing 11 GB takes longer than loading it. Raises WeightsError naming the first bad file.
    """
    root = Path(root)
    if not root.is_dir():
        raise WeightsError(f"Weights directory {root} does not exist. Fill it with {FIX_COMMAND}.")
    manifest = read_manifest(root)
    files = manifest["files"]
    for required in REQUIRED_FILES + _model_files(manifest):
        if required not in files or not (root / required).is_file():
            raise WeightsError(f"Missing weights file {root / required}. Fill {root} with {FIX_COMMAND}.")
    for name, entry in files.items():
        path, fix = root / name, _fix_command(name)
        if not path.is_file():
            raise WeightsError(f"Missing weights file {path}. Re-run {fix}.")
        size = path.stat().st_size
        if size != entry["size"]:
            raise WeightsError(
                f"Weights file {path} has {size} bytes, the manifest says {entry['size']} "
                f"(truncated or replaced). Re-run {fix}."
            )
        if full_hash and sha256_of(path) != entry["sha256"]:
            raise WeightsError(f"Weights file {path} does not match its sha256 in the manifest. Re-run {fix}.")
    return manifest


def _model_files(manifest: dict) -> tuple[str, ...]:
    """The files each further checkpoint cannot load without: those of base/, under its own folder."""
    folders = [m["dir"] for m in manifest.get("models", []) if m["dir"] != BASE_DIR]
    base_files = [f.removeprefix(BASE_DIR + "/") for f in REQUIRED_FILES if f.startswith(BASE_DIR + "/")]
    return tuple(f"{folder}/{name}" for folder in folders for name in base_files)


def _fix_command(name: str) -> str:
    """How to remake the weights file `name`: for one under control/, with the flag that bakes its folder."""
    top, _, rest = name.partition("/")
    folder = rest.split("/")[0]
    if top != CONTROL_DIR:
        return FIX_COMMAND
    if folder.startswith(CONTROLNET_PREFIX):
        return CONTROL_FIX_COMMAND.format(flag=f"--controlnet {folder.removeprefix(CONTROLNET_PREFIX)}")
    return CONTROL_FIX_COMMAND.format(flag=CONTROL_FLAGS[folder]) if folder in CONTROL_FLAGS else FIX_COMMAND


def model_dir(name: str) -> str:
    return f"{MODELS_DIR}/{name}"


def controlnet_dir(name: str) -> str:
    return f"{CONTROL_DIR}/{CONTROLNET_PREFIX}{name}"


def image_encoder_path(subfolder: str, image_encoder_folder: str) -> str:
    """Where diffusers' load_ip_adapter(folder, subfolder=, image_encoder_folder=) reads the image encoder, relative to
    the folder: a bare name lies in `subfolder`, a path (with a "/") starts at the folder itself."""
    return image_encoder_folder if "/" in image_encoder_folder else f"{subfolder}/{image_encoder_folder}"
