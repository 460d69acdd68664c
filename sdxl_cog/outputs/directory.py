"""Where a prediction's files are written: one directory per prediction, made by this server; only the server's
own, and only once they are no longer the latest few, are ever removed."""

from __future__ import annotations

import collections
import os
import shutil
import stat
import uuid
from pathlib import Path

from sdxl_cog.outputs.coglet_leftovers import sweep_empty_runtime_dirs


class OutputDirectory:
    """One directory per prediction under `root`, made by this server; the oldest of them is removed
    once more than `keep` exist. Nothing else under `root` is ever touched, whoever put it there.

    Keeping the latest few lets an operator recover images whose upload failed: coglet uploads them to
    --upload-url after predict() returns, once, and fails the prediction if that PUT fails."""

    def __init__(self, root: Path, keep: int = 1):
        self.root = root
        self.keep = max(1, keep)
        self.made: collections.deque[Path] = collections.deque()  # oldest first

    def start_prediction(self) -> tuple[Path, str]:
        while len(self.made) >= self.keep:
            _remove_own(self.made.popleft())
        sweep_empty_runtime_dirs()
        tag = uuid.uuid4().hex[:12]
        directory = self.root / tag
        self.root.mkdir(parents=True, exist_ok=True)
        directory.mkdir()  # a fresh name: fails rather than adopt a directory someone else made
        self.made.append(directory)
        return directory, tag


def _remove_own(directory: Path) -> None:
    """Remove a directory this server made, unless something replaced it with a link."""
    try:
        if stat.S_ISDIR(os.lstat(directory).st_mode):
            shutil.rmtree(directory)
    except OSError:
        pass  # already gone


def output_paths(directory: Path, tag: str, count: int, output_format: str) -> list[Path]:
    """Names unique per prediction and index (an upload URL receives them in completion order)."""
    return [directory / f"{tag}-{i}.{output_format}" for i in range(count)]
