"""Where a part of the weights comes from: a Hub repo, a local mirror of one, or a single-file checkpoint.

A Hub repo and a mirror answer the same two calls, so the download flow treats them alike: `resolve()`
(the commit and every file there) and `fetch()` (copy some of those files into a folder). A single file
is only located here; the download flow fetches and converts it.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from huggingface_hub import HfApi, snapshot_download
from huggingface_hub.errors import (
    GatedRepoError,
    HFValidationError,
    HTTPError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

from sdxl_cog.weights.atomic import atomic_target

# A folder whose subfolders are owner/name copies of Hub repos; when set, repo ids are read from it.
MIRROR_ENV = "SDXL_HUB_MIRROR"


class DownloadError(RuntimeError):
    """A source could not be read or lacks a file; the message names it and says what to do."""


@dataclass(frozen=True)
class HubRepo:
    repo_id: str
    revision: str
    token: str | None

    @property
    def label(self) -> str:
        return f"{self.repo_id}@{self.revision}"

    def resolve(self) -> tuple[str, frozenset[str]]:
        """The commit the revision points at, and every file in the repo there."""
        with _hub_errors(self.label):
            info = HfApi(token=self.token).model_info(self.repo_id, revision=self.revision)
        return info.sha, frozenset(s.rfilename for s in info.siblings)

    def fetch(self, commit: str, files: list[str], dest: Path) -> None:
        with _hub_errors(self.label):
            snapshot_download(self.repo_id, revision=commit, local_dir=dest, allow_patterns=files, token=self.token)


@dataclass(frozen=True)
class MirrorRepo:
    directory: Path

    @property
    def label(self) -> str:
        return str(self.directory)

    def resolve(self) -> tuple[str, frozenset[str]]:
        """A fingerprint of the names, sizes and mtimes (a mirror has no commits), and the file list."""
        names = sorted(
            p.relative_to(self.directory).as_posix()
            for p in self.directory.rglob("*")
            if p.is_file() and not {".cache", ".git"} & set(p.relative_to(self.directory).parts)
        )
        stats = [f"{n} {(self.directory / n).stat().st_size} {(self.directory / n).stat().st_mtime_ns}" for n in names]
        commit = "local-" + hashlib.sha256("\n".join(stats).encode()).hexdigest()[:12]
        return commit, frozenset(names)

    def fetch(self, commit: str, files: list[str], dest: Path) -> None:
        for name in files:
            with atomic_target(dest / name) as tmp:
                shutil.copyfile(self.directory / name, tmp)


@dataclass(frozen=True)
class SingleFile:
    location: str  # an http(s) URL or an absolute path

    @property
    def label(self) -> str:
        return self.location

    @property
    def is_url(self) -> bool:
        return urlparse(self.location).scheme in ("http", "https")


@contextmanager
def _hub_errors(label: str):
    """Turn huggingface_hub's exceptions into one line naming the repo and the likely fix."""
    hints = {
        GatedRepoError: "it is gated: accept its licence on huggingface.co and set HF_TOKEN",
        RepositoryNotFoundError: "it does not exist, or is private and HF_TOKEN lacks access",
        RevisionNotFoundError: "it has no such revision",
    }
    try:
        yield
    except (HTTPError, OSError, HFValidationError) as e:
        hint = next((hints[c] for c in type(e).__mro__ if c in hints), f"{type(e).__name__}: {e}")
        raise DownloadError(
            f"Cannot download {label} from the Hugging Face Hub ({hint}). Check the network and HF_TOKEN, "
            f"or set {MIRROR_ENV} to a local mirror; a later run resumes."
        ) from e


def open_source(spec: str, revision: str = "main") -> HubRepo | MirrorRepo | SingleFile:
    """A `.safetensors` path or URL, an existing folder, a repo in $SDXL_HUB_MIRROR, or a Hub repo id."""
    if spec.lower().endswith((".ckpt", ".pt", ".pth", ".bin")):
        raise DownloadError(f"{spec} is a pickle checkpoint; only .safetensors single files are accepted.")
    if spec.lower().endswith(".safetensors"):
        if SingleFile(spec).is_url:
            return SingleFile(spec)
        if not Path(spec).is_file():
            raise DownloadError(f"No such checkpoint file: {spec}")
        return SingleFile(str(Path(spec).resolve()))
    if Path(spec).is_dir():
        return MirrorRepo(Path(spec).resolve())
    if mirror := os.environ.get(MIRROR_ENV):
        if not (Path(mirror) / spec).is_dir():
            raise DownloadError(f"{spec} is not in the mirror {MIRROR_ENV}={mirror} (no folder {Path(mirror) / spec}).")
        return MirrorRepo((Path(mirror) / spec).resolve())
    return HubRepo(spec, revision, os.environ.get("HF_TOKEN") or None)
