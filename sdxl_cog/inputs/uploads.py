"""Image and mask inputs: only files Cog itself wrote for this request are read.

How coglet hands a `Path` input to predict() (coglet 0.23: crates/coglet-python/src/input.rs, and
cog/types.py's URLPath.convert): a data: URI or an http(s) URL is written by the worker to
`tempfile.NamedTemporaryFile(suffix=<name>, delete=False)`, a `tmp` + 8 random characters file of
mode 0600 directly in the worker's temporary directory, and arrives as a cog Path; coglet deletes it
after predict(). Any other string arrives unchanged, as a plain `str`, and would be opened as a path
on the server: any file the server can read could be returned in the output image.

So the service gives coglet's downloads a directory of their own (claim_input_dir) and a file input
is accepted only if it is a regular file, not a link, created by this process with mode 0600 directly
in that directory. Every refusal has the same text, whether or not the path exists, so the answer
tells nothing about the server's file system.

coglet does not clean up after a failed download: the partly written temporary file stays. Such
leftovers are swept (sweep_stale_inputs) once no download can still be writing to them.
"""

from __future__ import annotations

import os
import re
import stat
import tempfile
import time
from pathlib import Path, PurePath

from sdxl_cog.config import STALE_INPUT_AGE_S
from sdxl_cog.errors import InputError

# tempfile's names: its prefix "tmp" and 8 characters of its alphabet (tempfile._RandomNameSequence).
MATERIALISED_NAME = re.compile(r"tmp[a-z0-9_]{8}")


def refusal(what: str) -> InputError:
    return InputError(
        f"{what} must be sent as a data: URI or an http(s) URL (the server downloads it); "
        "paths of files on the server are not accepted."
    )


def claim_input_dir(directory: Path) -> None:
    """Make `directory` this process's temporary directory, where coglet writes downloaded inputs.

    tempfile.tempdir is process-wide: every temporary file of the worker lands there, which is what
    makes the check and the sweep below exact (nothing else writes there) rather than guesses in a
    shared /tmp."""
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    tempfile.tempdir = str(directory)


def _input_dir() -> Path:
    return Path(os.path.abspath(tempfile.gettempdir()))


def _is_materialised(path: Path) -> bool:
    # abspath normalises ".." without following links: a link is judged by lstat, never followed.
    path = Path(os.path.abspath(path))
    if path.parent != _input_dir() or not MATERIALISED_NAME.match(path.name):
        return False
    try:
        info = os.lstat(path)
    except OSError:
        return False
    return (
        stat.S_ISREG(info.st_mode)
        and info.st_uid == os.geteuid()
        and info.st_nlink == 1  # not a hard link to a file that lives elsewhere
        and not info.st_mode & 0o077  # NamedTemporaryFile's 0600
    )


def client_file(value: object, what: str) -> Path | None:
    """`value` as a Path if Cog materialised it for this request; else the one refusal message."""
    if value is None:
        return None
    # A plain string is what coglet passes through untouched: a path the client typed, never a download.
    if isinstance(value, str) or not isinstance(value, PurePath) or not _is_materialised(Path(value)):
        raise refusal(what)
    return Path(value)


def sweep_stale_inputs(keep: tuple[Path | None, ...] = (), min_age_s: float = STALE_INPUT_AGE_S) -> list[Path]:
    """Remove what failed downloads left in the input directory: coglet's temporary files (by name,
    regular, ours) not written for `min_age_s`. Returns what was removed."""
    cutoff = time.time() - min_age_s
    kept = {os.path.abspath(p) for p in keep if p is not None}
    removed = []
    with os.scandir(_input_dir()) as entries:
        for entry in entries:
            if not MATERIALISED_NAME.match(entry.name) or entry.path in kept:
                continue
            try:
                info = entry.stat(follow_symlinks=False)
                if stat.S_ISREG(info.st_mode) and info.st_uid == os.geteuid() and info.st_mtime < cutoff:
                    os.unlink(entry.path)
                    removed.append(Path(entry.path))
            except OSError:
                pass  # already gone
    return removed
