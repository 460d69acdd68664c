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
import hashlib
import json
import logging
import os
import posixpath
import re
import shutil
from pathlib import Path
from urllib.parse import urlparse

from sdxl_cog.weights.atomic import atomic_target
from sdxl_cog.weights.catalog import legacy_name
from sdxl_cog.weights.control_parts import ControlPart, control_section, controlnet_types, plan_control
from sdxl_cog.weights.convert import convert_single_file, convert_weights
from sdxl_cog.weights.layout import (
    BASE_DIR,
    CONTROL_DIR,
    MANIFEST_NAME,
    MODELS_DIR,
    REFINER_DIR,
    WeightsError,
    model_dir,
    read_manifest,
    sha256_of,
    verify,
    write_manifest,
)
from sdxl_cog.weights.parts import PARTS, Part, made_as_is, plan_files
from sdxl_cog.weights.profiles import PRESETS
from sdxl_cog.weights.sources import DownloadError, HubRepo, MirrorRepo, SingleFile, open_source
from sdxl_cog.weights.url_download import fetch_url, hf_auth_headers

logger = logging.getLogger(__name__)

# Converted inputs (full-precision weights, single-file checkpoints) wait here: on the weights disk, and
# under `.cache`, which the manifest skips. It is removed after a successful run, so images stay lean.
STAGING = Path(".cache") / "sdxl-cog"
PREVIOUS_MANIFEST = "previous-manifest.json"


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
    return _fill(root, part, repo, commit, listing, old)


def _fill(root: Path, part: Part, repo: HubRepo | MirrorRepo, commit: str, listing: frozenset[str], old: dict) -> str:
    source, plan, folder = f"{repo.label} -> {commit}", plan_files(part, listing, repo.label), root / part.folder
    todo = _todo(root, part, source, plan, old)
    logger.info("%s: %d of %d files to fetch from %s", part.folder, len(todo), len(plan), source)
    if direct := [target for target, sources in todo.items() if made_as_is(part, target, sources)]:
        _fetch(repo, commit, direct, folder)
    for target, sources in todo.items():
        if not made_as_is(part, target, sources):
            logger.info("%s: building %s from %s", part.folder, target, ", ".join(sources))
            _build(repo, commit, sources, root / STAGING / part.folder, folder / target, part.fp16(target))
    _prune(folder, set(plan))
    return source


def _build(
    repo: HubRepo | MirrorRepo, commit: str, sources: tuple[str, ...], staging: Path, target: Path, fp16: bool
) -> None:
    """Fetch the repo files `target` is made from into `staging`, make it from them, and drop them: weights are
    converted (casting to fp16 where `fp16`), another file is one stored under another name."""
    _fetch(repo, commit, list(sources), staging)
    if target.suffix == ".safetensors":
        convert_weights([staging / s for s in sources], target, to_fp16=fp16)
    else:
        with atomic_target(target) as tmp:
            shutil.copyfile(staging / sources[0], tmp)
    shutil.rmtree(staging)  # a full-precision source is twice the size of what it became


# --- Control models: ControlNets, the IP-Adapter, the depth estimator ------------------------------------


def fill_control(root: Path, control: ControlPart, repo: HubRepo | MirrorRepo, old: dict) -> dict:
    """Fill one control folder like any part and return its manifest entry. A ControlNet's config is read, and
    checked against its flag, before any of its weights are fetched."""
    commit, listing = repo.resolve()
    entry = dict(control.entry)
    if control.section == "controlnets":
        config = _read_json(repo, commit, listing, control.config_file, root / STAGING / control.part.folder)
        entry["types"] = controlnet_types(control, config, repo.label)
    entry["source"] = _fill(root, control.part, repo, commit, listing, old)
    return entry


def _read_json(repo: HubRepo | MirrorRepo, commit: str, listing: frozenset[str], name: str, staging: Path) -> dict:
    if name not in listing:
        raise DownloadError(f"{repo.label} has no {name}; is it a diffusers ControlNet repo?")
    _fetch(repo, commit, [name], staging)
    try:
        return json.loads((staging / name).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DownloadError(f"{repo.label}'s {name} is not valid JSON ({e}).") from e


def _control_sources(control: dict[str, ControlPart]) -> dict[str, HubRepo | MirrorRepo]:
    sources = {folder: open_source(c.part.repo) for folder, c in control.items()}
    if files := [source.label for source in sources.values() if isinstance(source, SingleFile)]:
        raise DownloadError(f"{', '.join(files)}: a control model must be a diffusers repo or folder, not one file.")
    return sources


def _same_control(recorded: dict, control: dict[str, ControlPart]) -> bool:
    """The manifest's control section holds what the flags ask for (what only a download learns aside)."""

    def asked(entry: dict) -> dict:
        return {key: value for key, value in entry.items() if key not in ("source", "types")}

    recorded = {k: [asked(e) for e in v] if isinstance(v, list) else asked(v) for k, v in recorded.items()}
    return recorded == control_section((c.section, c.entry) for c in control.values())


def _prune_control(root: Path, wanted: set[str]) -> None:
    """Control models baked by an earlier run but not asked for now leave the image; so does control/ once empty."""
    control = root / CONTROL_DIR
    if not control.is_dir():
        return
    for folder in sorted(control.iterdir()):
        if folder.is_dir() and f"{CONTROL_DIR}/{folder.name}" not in wanted:
            logger.info("%s: no longer asked for; removing it.", folder)
            shutil.rmtree(folder)
    if not any(control.iterdir()):
        control.rmdir()


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
    plan, folder = plan_files(part, listing, stock.label), root / part.folder
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


def _up_to_date(
    root: Path, requests_by_part: dict[str, str], names: list[str], control: dict[str, ControlPart]
) -> bool:
    """The manifest records the same requests, names and control models, and every file is present at its
    recorded size."""
    try:
        manifest = verify(root)
    except WeightsError:
        return False
    recorded = manifest.get("sources", {})
    if [m["name"] for m in manifest.get("models", [])] != names or set(recorded) != set(requests_by_part):
        return False
    if not _same_control(manifest.get("control", {}), control):
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
    controlnets: list[str] | None = None,
    ip_adapter: str | None = None,
    depth_estimator: bool = False,
) -> dict:
    """Fill `root`; `base` may be a repo id, a mirror folder or a single `.safetensors` file or URL.

    `revision` (a branch, tag or commit) applies to the base repo, stock or not; the other parts use main.
    `models` maps further checkpoints' names to sources taken like `base`; with them, the manifest lists every
    checkpoint, base/ first under `base_name` (default: the last part of its source). `profiles` maps a model's
    name to its profile preset (profiles.py), recorded in the manifest. `controlnets` (each `union`, `canny`,
    `depth` or `TYPE=SOURCE`), `ip_adapter` (`vit-h` or `bigg`) and `depth_estimator` bake the optional control
    models (control_parts.py), listed in the manifest's `control` section; without them the manifest has none.
    Returns the manifest. Raises DownloadError (a source) or WeightsError (the result).
    """
    root = Path(root).resolve()
    models = dict(models or {})
    _check_model_names(base_name, models)
    profiles = _check_profiles(profiles or {}, [base_name, *models])
    control = plan_control(list(controlnets or []), ip_adapter, depth_estimator)
    # 1. What was asked for, part by part (no network yet).
    sources = _sources(base, refiner, revision, models) | _control_sources(control)
    labels = {folder: source.label for folder, source in sources.items()}
    folders = [BASE_DIR, *(model_dir(name) for name in models)]
    names = [base_name or legacy_name({"sources": {BASE_DIR: labels[BASE_DIR]}}), *models] if models else []
    # 2. Nothing to do when the manifest records the same sources and every file is intact.
    if _up_to_date(root, labels, names, control):
        logger.info("%s is up to date (%s); nothing to download.", root, ", ".join(labels.values()))
        return read_manifest(root)
    # 3. Fill each part, keeping files intact from the last run of the same commit.
    old = _set_aside_manifest(root)
    resolved, control_entries = {}, []
    for folder, source in sources.items():
        if folder in control:
            entry = fill_control(root, control[folder], source, old)
            control_entries.append((control[folder].section, entry))
            resolved[folder] = entry["source"]
        else:
            fill = fill_from_single_file if isinstance(source, SingleFile) else fill_from_repo
            resolved[folder] = fill(root, _part(folder), source, old)
    _prune_models(root, set(sources))
    _prune_control(root, set(sources))
    if models:
        _share_identical_files(root, folders)
    # 4. Record where each part came from, with every file's size and sha256, and check the result.
    shutil.rmtree(root / STAGING, ignore_errors=True)
    listed = [
        {"name": n, "dir": f, "source": resolved[f], **({"profile": profiles[n]} if n in profiles else {})}
        for n, f in zip(names, folders, strict=False)
    ]
    write_manifest(root, sources=resolved, models=listed or None, control=control_section(control_entries) or None)
    manifest = verify(root)
    logger.info("%s: %d files verified.", root, len(manifest["files"]))
    return manifest
