"""Write files so that a reader finds the old file or the complete new one, never half of one."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_target(target: Path, suffix: str = ".tmp") -> Iterator[Path]:
    """Yield a sibling of `target` to write; it replaces `target` once the block ends without an error.

    After an error the sibling stays as it is: fetch_url resumes from its `.part`, other writers overwrite it.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(target.name + suffix)
    yield tmp
    os.replace(tmp, target)
