"""Fill the weights directory (layout: sdxl_cog/weights/layout.py) with exactly what setup() loads.

Each part of the layout comes from one source (sdxl_cog/weights/sources.py): a Hugging Face Hub repo, a
local folder laid out like one (a mirror, for offline builds and tests), or, for the base only, a
single-file `.safetensors` checkpoint. Hub and mirror share every step but the transfer itself: choosing
files, converting weights the layout needs in another form (convert.py), skipping files intact
from the last run, pruning leftovers, and the manifest. Interrupted runs resume: huggingface_hub
continues its `.incomplete` files, URLs their `.part` file (sdxl_cog/weights/url_download.py).
"""

from __future__ import annotations

import collections
import dataclasses
import fnmatch
import hashlib
import json
import logging
import os
import posixpath
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from sdxl_cog.weights.catalog import legacy_name
from sdxl_cog.weights.convert import convert_single_file, convert_weights
from sdxl_cog.weights.layout import (
    BASE_DIR,
    MANIFEST_NAME,
    MODELS_DIR,
    REFINER_DIR,
    SAFETY_CHECKER_DIR,
    VAE_DIR,
    WeightsError,
    model_dir,
    read_manifest,
    sha256_of,
    verify,
    write_manifest,
)
from sdxl_cog.weights.profiles import PRESETS
from sdxl_cog.weights.sources import DownloadError, HubRepo, MirrorRepo, SingleFile, open_source
from sdxl_cog.weights.url_download import fetch_url, hf_auth_headers

logger = logging.getLogger(__name__)

# Converted inputs (full-precision weights, single-file checkpoints) wait here: on the weights disk, and
# under `.cache`, which the manifest skips. It is removed after a successful run, so images stay lean.
STAGING = Path(".cache") / "sdxl-cog"
PREVIOUS_MANIFEST = "previous-manifest.json"


# --- What fills each part of the layout -------------------------------------------------------------


@dataclass(frozen=True)
class Part:
    """One folder of the layout and what fills it: small files copied as they are, and weight files."""

    folder: str
    repo: str  # the default source
    files: tuple[str, ...]  # glob patterns, relative to the repo root and to the folder alike
    weights: tuple[str, ...]  # exact names; built from another form when the repo lacks them


PARTS = {
    BASE_DIR: Part(
        BASE_DIR,
        "stabilityai/stable-diffusion-xl-base-1.0",
        # No vae/: the fp16-fix VAE replaces it. The tokenizer folders hold vocab, merges and the
        # tokenizer_config/special_tokens_map that set max length 77 and tokenizer_2's "!" padding.
        (
            "model_index.json",
            "scheduler/scheduler_config.json",
            "tokenizer/*",
            "tokenizer_2/*",
            "text_encoder/config.json",
            "text_encoder_2/config.json",
            "unet/config.json",
        ),
        (
            "text_encoder/model.fp16.safetensors",
            "text_encoder_2/model.fp16.safetensors",
            "unet/diffusion_pytorch_model.fp16.safetensors",
        ),
    ),
    # The refiner borrows the base's text_encoder_2, tokenizer_2 and the VAE, so only its UNet is fetched.
    REFINER_DIR: Part(
        REFINER_DIR,
        "stabilityai/stable-diffusion-xl-refiner-1.0",
        ("model_index.json", "scheduler/scheduler_config.json", "unet/config.json"),
        ("unet/diffusion_pytorch_model.fp16.safetensors",),
    ),
    # These two repos ship fp32 only; their weights are cast to the fp16 variant setup() loads. The safety
    # checker's main branch has only pytorch_model.bin, so that is what gets converted.
    VAE_DIR: Part(
        VAE_DIR, "madebyollin/sdxl-vae-fp16-fix", ("config.json",), ("diffusion_pytorch_model.fp16.safetensors",)
    ),
    SAFETY_CHECKER_DIR: Part(
        SAFETY_CHECKER_DIR,
        "CompVis/stable-diffusion-safety-checker",
        ("config.json", "preprocessor_config.json"),
        ("model.fp16.safetensors",),
    ),
}

# Repo files a weight file can be built from, best first, as regexes over names in its folder; {v} is
# ".fp16" for variant targets. Casting to fp16 happens only for variant targets.
SOURCE_NAMES = (
    r"{stem}{v}\.safetensors",  # the file itself
    r"{stem}{v}-\d+-of-\d+\.safetensors",  # the same, sharded
    r"{stem}\.safetensors",  # full precision
    r"{stem}-\d+-of-\d+\.safetensors",
    r"{pickle}\.bin",  # no safetensors at all: a pickle, read with weights_only=True (no code runs)
)
PICKLE_STEMS = {"model": "pytorch_model"}  # transformers' legacy name; diffusers kept its stem


# --- Which repo files make each layout file --------------------------------------------------------


def _plan(part: Part, listing: frozenset[str], label: str) -> dict[str, tuple[str, ...]]:
    """Map each file the part needs (relative to its folder) to the repo files it is made from."""
    plan = {}
    for pattern in part.files:
        matches = fnmatch.filter(listing, pattern)
        if not matches:
            raise DownloadError(f"{label} has no {pattern}; is it an SDXL-architecture diffusers repo?")
        plan.update({name: (name,) for name in matches})
    return plan | {target: _weight_sources(target, listing, label) for target in part.weights}


def _weight_sources(target: str, listing: frozenset[str], label: str) -> tuple[str, ...]:
    folder, name = posixpath.split(target)
    stem, variant = name.split(".")[0], ".fp16" if ".fp16." in name else ""
    in_folder = {posixpath.basename(f): f for f in listing if posixpath.dirname(f) == folder}
    for pattern in SOURCE_NAMES:
        regex = re.compile(pattern.format(stem=stem, v=re.escape(variant), pickle=PICKLE_STEMS.get(stem, stem)))
        if found := sorted(path for base, path in in_folder.items() if regex.fullmatch(base)):
            return tuple(found)
    raise DownloadError(f"{label} has no weights for {target} (no safetensors or .bin in {folder or 'its root'}/).")


# --- Filling one part ------------------------------------------------------------------------------


def _todo(root: Path, part: Part, source: str, plan: dict, old: dict) -> dict[str, tuple[str, ...]]:
    """The planned files to (re)make: all of them after a source change, else those not intact.

    Intact means the sha256 recorded last time: a size match alone would keep a same-sized file that an
    interrupted run for another source (a different fine-tune) had already replaced.
    """
    if old.get("sources", {}).get(part.folder) != source:
        return plan
    files = old.get("files", {})

    def intact(target: str) -> bool:
        path, entry = root / part.folder / target, files.get(f"{part.folder}/{target}")
        return (
            entry is not None
            and path.is_file()
            and path.stat().st_size == entry["size"]
            and (sha256_of(path) == entry["sha256"])
        )

    return {target: sources for target, sources in plan.items() if not intact(target)}


def _fetch(repo: HubRepo | MirrorRepo, commit: str, files: list[str], dest: Path) -> None:
    repo.fetch(commit, files, dest)
    # huggingface_hub returns quietly with what a local_dir already holds when the Hub drops out mid-run.
    if missing := [name for name in files if not (dest / name).is_file()]:
        raise DownloadError(f"{repo.label} did not deliver {', '.join(missing)}. Run again to resume.")


def _prune(folder: Path, keep: set[str]) -> None:
    """Remove files the part no longer needs (from an earlier source), keeping downloader state."""
    for path in sorted(folder.rglob("*")):
        relative = path.relative_to(folder)
        if path.is_file() and ".cache" not in relative.parts and relative.as_posix() not in keep:
            path.unlink()


def fill_from_repo(root: Path, part: Part, repo: HubRepo | MirrorRepo, old: dict) -> str:
    """Fetch or build every file of `part` from `repo`, skipping files intact from the same commit."""
    commit, listing = repo.resolve()
    source, plan, folder = f"{repo.label} -> {commit}", _plan(part, listing, repo.label), root / part.folder
    todo = _todo(root, part, source, plan, old)
    logger.info("%s: %d of %d files to fetch from %s", part.folder, len(todo), len(plan), source)
    if direct := [target for target, sources in todo.items() if sources == (target,)]:
        _fetch(repo, commit, direct, folder)
    for target, sources in todo.items():
        if sources != (target,):
            logger.info("%s: building %s from %s", part.folder, target, ", ".join(sources))
            _build(repo, commit, sources, root / STAGING / part.folder, folder / target)
    _prune(folder, set(plan))
    return source


def _build(repo: HubRepo | MirrorRepo, commit: str, sources: tuple[str, ...], staging: Path, target: Path) -> None:
    """Fetch the repo files `target` is made from into `staging`, convert them, and drop them."""
    _fetch(repo, commit, list(sources), staging)
    convert_weights([staging / s for s in sources], target)
    shutil.rmtree(staging)  # a full-precision source is twice the size of what it became


# --- Single-file checkpoints -----------------------------------------------------------------------


def _local_checkpoint(root: Path, checkpoint: SingleFile) -> Path:
    if not checkpoint.is_url:
        return Path(checkpoint.location)
    # One folder per URL, so two URLs ending in the same file name never share a .part file.
    url_key = hashlib.sha256(checkpoint.location.encode()).hexdigest()[:12]
    staged = root / STAGING / url_key / Path(urlparse(checkpoint.location).path).name
    return fetch_url(checkpoint.location, staged, hf_auth_headers(checkpoint.location))


def fill_from_single_file(root: Path, part: Part, checkpoint: SingleFile, old: dict) -> str:
    """Convert a single-file SDXL checkpoint into `part`, with the stock base's configs and tokenizers."""
    path = _local_checkpoint(root, checkpoint)
    stock = open_source(part.repo)
    commit, listing = stock.resolve()
    source = f"{checkpoint.label} -> sha256:{sha256_of(path)} (configs {stock.label} -> {commit})"
    plan, folder = _plan(part, listing, stock.label), root / part.folder
    if not _todo(root, part, source, plan, old):
        return source
    _fetch(stock, commit, [target for target in plan if target not in part.weights], folder)
    convert_single_file(path, folder, sorted({posixpath.dirname(w) for w in part.weights}))
    _prune(folder, set(plan))
    return source


# --- The recipe -------------------------------------------------------------------------------------


def _sources(
    base: str | None, refiner: str | None, revision: str, models: dict[str, str] | None = None
) -> dict[str, HubRepo | MirrorRepo | SingleFile]:
    specs = {BASE_DIR: base, REFINER_DIR: refiner}
    sources = {
        folder: open_source(specs.get(folder) or part.repo, revision if folder == BASE_DIR else "main")
        for folder, part in PARTS.items()
    }
    if isinstance(sources[REFINER_DIR], SingleFile):
        raise DownloadError("Only --base and --model take a single-file checkpoint; --refiner needs a diffusers repo.")
    # Further checkpoints come like the base (a repo at main, or a single file), each into models/NAME.
    return sources | {model_dir(name): open_source(spec) for name, spec in (models or {}).items()}


# A checkpoint's name is a folder name and a request's `model` value: keep it plain.
MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def _check_model_names(base_name: str | None, models: dict[str, str]) -> None:
    for name in [base_name, *models] if base_name else models:
        if not MODEL_NAME.fullmatch(name):
            raise DownloadError(
                f"Model name {name!r} is not allowed: use letters, digits, '.', '_' and '-' (64 at most), "
                "starting with a letter or digit."
            )
    if base_name in models:
        raise DownloadError(f"Model name {base_name!r} is given to the base and to a --model.")


def _check_profiles(profiles: dict[str, str], names: list[str | None]) -> dict[str, dict]:
    for name, preset in profiles.items():
        if name not in names:
            raise DownloadError(f"--profile {name}={preset}: no model is named {name!r} (give --model or --base-name).")
        if preset not in PRESETS:
            raise DownloadError(f"--profile {name}={preset}: unknown preset; use one of {', '.join(PRESETS)}.")
    return {name: {"preset": preset} for name, preset in profiles.items()}


def _part(folder: str) -> Part:
    """The layout part that fills `folder`: a further checkpoint is filled exactly like base/."""
    return PARTS.get(folder) or dataclasses.replace(PARTS[BASE_DIR], folder=folder)


def _share_identical_files(root: Path, folders: list[str]) -> None:
    """Make each file of a further checkpoint that equals an earlier checkpoint's byte for byte a hard link to
    it: one copy on disk, and one component in memory (models.load_checkpoints sees equal sha256)."""
    files = [p for f in folders for p in sorted((root / f).rglob("*")) if p.is_file() and ".cache" not in p.parts]
    sizes = collections.Counter(p.stat().st_size for p in files)
    seen: dict[tuple[int, str], Path] = {}
    # Only files whose size another one shares can be equal: the rest are not hashed here.
    for path in (p for p in files if sizes[p.stat().st_size] > 1):
        first = seen.setdefault((path.stat().st_size, sha256_of(path)), path)
        if first != path and not path.samefile(first):
            tmp = path.with_name(path.name + ".link")
            os.link(first, tmp)
            os.replace(tmp, path)


def _prune_models(root: Path, wanted: set[str]) -> None:
    """Checkpoints baked by an earlier run but not asked for now leave the image."""
    models = root / MODELS_DIR
    if models.is_dir():
        for folder in sorted(models.iterdir()):
            if f"{MODELS_DIR}/{folder.name}" not in wanted:
                logger.info("%s: no longer asked for; removing it.", folder)
                shutil.rmtree(folder)


def _up_to_date(root: Path, requests_by_part: dict[str, str], names: list[str]) -> bool:
    """The manifest records the same requests and names and every file is present at its recorded size."""
    try:
        manifest = verify(root)
    except WeightsError:
        return False
    recorded = manifest.get("sources", {})
    if [m["name"] for m in manifest.get("models", [])] != names or set(recorded) != set(requests_by_part):
        return False
    return all(recorded.get(folder, "").split(" -> ")[0] == label for folder, label in requests_by_part.items())


def _set_aside_manifest(root: Path) -> dict:
    """Move the manifest out of the way, so no half-updated directory passes verify(); return it.

    It is kept in staging for the files it can still vouch for; an interrupted run leaves it there.
    """
    previous = root / STAGING / PREVIOUS_MANIFEST
    previous.parent.mkdir(parents=True, exist_ok=True)
    if (root / MANIFEST_NAME).is_file():
        os.replace(root / MANIFEST_NAME, previous)
    try:
        return json.loads(previous.read_text()) if previous.is_file() else {}
    except json.JSONDecodeError:
        return {}


def download(
    root: Path,
    base: str | None = None,
    refiner: str | None = None,
    revision: str = "main",
    models: dict[str, str] | None = None,
    base_name: str | None = None,
    profiles: dict[str, str] | None = None,
) -> dict:
    """Fill `root`; `base` may be a repo id, a mirror folder or a single `.safetensors` file or URL.

    `revision` (a branch, tag or commit) applies to the base repo, stock or not; the other parts use main.
    `models` maps further checkpoints' names to sources taken like `base`; with them, the manifest lists every
    checkpoint, base/ first under `base_name` (default: the last part of its source). `profiles` maps a model's
    name to its profile preset (profiles.py), recorded in the manifest.
    Returns the manifest. Raises DownloadError (a source) or WeightsError (the result).
    """
    root = Path(root).resolve()
    models = dict(models or {})
    _check_model_names(base_name, models)
    profiles = _check_profiles(profiles or {}, [base_name, *models])
    # 1. What was asked for, part by part (no network yet).
    sources = _sources(base, refiner, revision, models)
    labels = {folder: source.label for folder, source in sources.items()}
    folders = [BASE_DIR, *(model_dir(name) for name in models)]
    names = [base_name or legacy_name({"sources": {BASE_DIR: labels[BASE_DIR]}}), *models] if models else []
    # 2. Nothing to do when the manifest records the same sources and every file is intact.
    if _up_to_date(root, labels, names):
        logger.info("%s is up to date (%s); nothing to download.", root, ", ".join(labels.values()))
        return read_manifest(root)
    # 3. Fill each part, keeping files intact from the last run of the same commit.
    old = _set_aside_manifest(root)
    resolved = {}
    for folder, source in sources.items():
        fill = fill_from_single_file if isinstance(source, SingleFile) else fill_from_repo
        resolved[folder] = fill(root, _part(folder), source, old)
    _prune_models(root, set(sources))
    if models:
        _share_identical_files(root, folders)
    # 4. Record where each part came from, with every file's size and sha256, and check the result.
    shutil.rmtree(root / STAGING, ignore_errors=True)
    listed = [
        {"name": n, "dir": f, "source": resolved[f], **({"profile": profiles[n]} if n in profiles else {})}
        for n, f in zip(names, folders, strict=False)
    ]
    write_manifest(root, sources=resolved, models=listed or None)
    manifest = verify(root)
    logger.info("%s: %d files verified.", root, len(manifest["files"]))
    return manifest
