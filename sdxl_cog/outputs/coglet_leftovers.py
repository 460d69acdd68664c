"""Sweeping what Cog's runtime leaves behind: empty per-prediction directories that coglet never removes."""

from __future__ import annotations

import os
import time
from pathlib import Path

from sdxl_cog.config import RUNTIME_LEFTOVER_AGE_S

# coglet 0.23 leaves empty inputs/ and outputs/ directories per prediction under this fixed path
# (ignoring TMPDIR): 3 directories a prediction, forever. Empty ones older than this are swept.
COGLET_PREDICTIONS_DIR = Path("/tmp/coglet/predictions")


def _real_directory(entry: os.DirEntry) -> bool:
    return entry.is_dir(follow_symlinks=False)


def sweep_empty_runtime_dirs(root: Path = COGLET_PREDICTIONS_DIR, min_age_s: float = RUNTIME_LEFTOVER_AGE_S) -> None:
    """Remove the runtime's old, empty per-prediction directories; rmdir never removes anything holding data.

    Links are never followed (a link in the tree, or the tree itself being one, is left alone) and
    nothing outside `root` is touched: a client-chosen prediction id can make coglet create odd names."""
    if root.is_symlink() or not root.is_dir():
        return
    cutoff = time.time() - min_age_s
    with os.scandir(root) as predictions:
        for prediction in predictions:
            try:
                if not _real_directory(prediction) or prediction.stat(follow_symlinks=False).st_mtime >= cutoff:
                    continue  # not coglet's, or possibly a prediction in flight
                with os.scandir(prediction.path) as parts:
                    for part in parts:
                        if _real_directory(part):
                            os.rmdir(part.path)
                os.rmdir(prediction.path)
            except OSError:
                pass  # not empty, or already gone
