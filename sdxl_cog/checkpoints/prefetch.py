"""Streaming the weights into the page cache while setup() builds the models.

setup() loads memory-mapped safetensors, so their bytes arrive through page faults, in whatever order
and size the loader touches them, interleaved with CPU work (building modules, moving them to the GPU).
A thread that reads every file once, in the order setup() loads them, keeps the disk busy at full
sequential speed meanwhile (sendfile() to /dev/null: the kernel fills the page cache without copying to
user space, and the GIL is released).

Opt-in (SDXL_PREFETCH_WEIGHTS=1), because it pays only where the disk is much faster than the loader's
page faults. On this project's CPU machines (bench/RESULTS.md, cold start) a prototype of it cut setup()
by 27% on a day the disk read 3.4 GB/s, and this module cost 20% on a day it read 1.35 GB/s, when the
loader alone already kept the disk busy and a second reader only competed with it. Started before the
imports instead, it starved their own small reads and the whole cold start got slower. Measure on the
target machine with `bench/coldstart.py --variants floor,setup,setup_prefetch`.
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path

from sdxl_cog.config import PREFETCH_CACHE_FRACTION
from sdxl_cog.weights import layout

logger = logging.getLogger(__name__)

# The order read_pipelines() (loading.py) reads the parts in: the further checkpoints (models/NAME) right after
# the refiner and before the safety checker, the control models last. Within a part the paths are sorted
# (diffusers' own order there comes from a set and may differ); models/ comes in name order.
LOAD_ORDER = (
    layout.VAE_DIR,
    layout.BASE_DIR,
    layout.REFINER_DIR,
    layout.MODELS_DIR,
    layout.SAFETY_CHECKER_DIR,
    layout.CONTROL_DIR,
)


def weight_files(root: Path) -> list[Path]:
    """The safetensors files under `root`, in the order setup() loads them."""
    files = sorted(root.glob("*/**/*.safetensors"))
    rank = {part: i for i, part in enumerate(LOAD_ORDER)}
    return sorted(files, key=lambda p: rank.get(p.relative_to(root).parts[0], len(rank)))


def read_into_page_cache(path: Path) -> int:
    """Read every page of `path` once, without copying it to user space; returns the bytes read."""
    with open(path, "rb") as source, open(os.devnull, "wb") as null:
        size, offset = os.fstat(source.fileno()).st_size, 0
        while offset < size and (sent := os.sendfile(null.fileno(), source.fileno(), offset, size - offset)):
            offset += sent
    return offset


def _read_int(path: str) -> int | None:
    try:
        text = Path(path).read_text().split()[0]
    except (OSError, IndexError):
        return None
    return int(text) if text.isdigit() else None  # cgroup v2 writes "max" for no limit


def cache_room_bytes() -> int | None:
    """Memory the page cache may grow into: what the kernel calls available, capped by the container's
    cgroup limit (page cache is charged to it); None where neither can be read."""
    available = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                available = int(line.split()[1]) * 1024
    except OSError:
        pass
    limit, used = _read_int("/sys/fs/cgroup/memory.max"), _read_int("/sys/fs/cgroup/memory.current")
    if limit is not None and used is not None:
        available = min(available if available is not None else limit, limit - used)
    return available


def _prefetch(files: list[Path]) -> None:
    for path in files:
        try:
            read_into_page_cache(path)
        except OSError as e:  # setup() will report a missing or unreadable file with the fix
            logger.debug("weights prefetch stopped at %s: %s", path, e)
            return


def start(root: Path) -> threading.Thread | None:
    """Start reading the weights under `root` on a daemon thread; None, reading nothing, when there are no
    weights or they would not fit in the page cache."""
    files = weight_files(root) if root.is_dir() else []
    total, room = sum(p.stat().st_size for p in files), cache_room_bytes()
    if not files or (room is not None and total > PREFETCH_CACHE_FRACTION * room):
        return None
    thread = threading.Thread(target=_prefetch, args=(files,), name="weights-prefetch", daemon=True)
    thread.start()
    return thread
