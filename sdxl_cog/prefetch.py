"""Reading the weights into the page cache while the interpreter is still importing torch and diffusers.

A cold start waits on two independent things: the imports (CPU: 5-7 s on 2 cores) and ~12 GB of weights
(disk). Left alone they add up, and loading is the slower reader: safetensors memory-maps the files, so
their bytes arrive through page faults in small scattered reads, only once the imports are done.
predict.py calls `start()` before its heavy imports: a thread streams every weight file once, in the
order setup() loads them, through sendfile() to /dev/null (kernel-side, no copy, the GIL released).
setup() then finds the bytes in the page cache. Measured in bench/RESULTS.md (cold start).

Standard library only, so that it can run before torch is imported.
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path

from . import weights

logger = logging.getLogger(__name__)

ENABLED_ENV = "SDXL_PREFETCH_WEIGHTS"
# The order load_models() (sdxl_cog/pipelines.py) reads the parts in; within a part, diffusers loads
# components alphabetically (text_encoder, text_encoder_2, unet), as the sorted paths are.
LOAD_ORDER = (weights.VAE_DIR, weights.BASE_DIR, weights.REFINER_DIR, weights.SAFETY_CHECKER_DIR)
# Prefetching more than the page cache can hold would evict the first files before setup() reads them,
# and read them twice; leave room for the process itself.
CACHE_FRACTION = 0.8


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


def start(root: Path | None = None) -> threading.Thread | None:
    """Start reading the weights under `root` (default: as setup() finds them) on a daemon thread.

    Returns None, reading nothing, when SDXL_PREFETCH_WEIGHTS=0, when there are no weights, or when they
    would not fit in the page cache.
    """
    if os.environ.get(ENABLED_ENV, "1").strip().lower() in {"0", "false", "no", "off"}:
        return None
    root = Path(root) if root is not None else weights.root_from_env()
    files = weight_files(root) if root.is_dir() else []
    total, room = sum(p.stat().st_size for p in files), cache_room_bytes()
    if not files or (room is not None and total > CACHE_FRACTION * room):
        return None
    thread = threading.Thread(target=_prefetch, args=(files,), name="weights-prefetch", daemon=True)
    thread.start()
    return thread
