"""What every benchmark shares: the machine description printed above its figures, medians, peak memory,
dropping the page cache, running a variant in a fresh interpreter, and printing a result table.

Benchmarks are scripts, not tests: they measure and print, and never assert a timing.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
# Benchmarks import the project (and the development tools, devtools/) from the working tree, wherever they are run from.
for _path in (REPO_ROOT,):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

GIB = 1024**3
DROP_CACHES = Path("/proc/sys/vm/drop_caches")
# How often the memory sampler reads /proc/self/status: fine enough to catch a multi-GB peak that
# lasts a fraction of a second (a dtype cast), cheap enough not to show in the timings.
SAMPLE_INTERVAL_S = 0.02
# The line a child process prints its result on, so that library log lines cannot be mistaken for it.
RESULT_PREFIX = "BENCH_RESULT "


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def spread(values: Sequence[float]) -> str:
    """`median (min-max, n)`, the way every figure is printed."""
    return f"{median(values):.3f} s ({min(values):.3f}-{max(values):.3f}, n={len(values)})"


def ratio(value: float, baseline: float) -> str:
    return f"{value / baseline:.2f}x" if baseline > 0 else "n/a"


# --- Machine --------------------------------------------------------------------------------------------------


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def _cpu_flags() -> str:
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        return ""
    wanted = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "avx512fp16")
    return ",".join(f for f in wanted if f in flags.split())


def machine_info() -> dict[str, object]:
    """Machine, date and versions, printed above every benchmark's figures (RESULTS.md records them)."""
    import diffusers
    import PIL
    import torch

    info: dict[str, object] = {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": f"{_cpu_model()} ({os.cpu_count()} cores; {_cpu_flags()})",
        "ram_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GIB, 1),
        "load_average": " ".join(f"{x:.2f}" for x in os.getloadavg()),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "pillow": PIL.__version__,
    }
    if torch.cuda.is_available():
        info["gpu"] = f"{torch.cuda.get_device_name()} (CUDA {torch.version.cuda})"
    try:
        import cog

        info["cog"] = cog.__version__
    except ImportError:
        pass
    return info


def print_header(title: str, extra: dict[str, object] | None = None) -> None:
    print(f"## {title}")
    for key, value in {**machine_info(), **(extra or {})}.items():
        print(f"- {key}: {value}")
    print(flush=True)


def print_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    """A Markdown table, so that a run's output can be pasted into RESULTS.md as it is."""
    print("| " + " | ".join(headers) + " |")
    print("|" + "|".join("---" if i == 0 else "---:" for i in range(len(headers))) + "|")
    for row in rows:
        print("| " + " | ".join(str(cell) for cell in row) + " |")
    print(flush=True)


# --- Memory ---------------------------------------------------------------------------------------------------


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


class MemorySampler:
    """Peak resident memory of this process: total (VmHWM, which counts mapped file pages too) and
    anonymous (sampled: memory the process allocated, e.g. dtype casts or copies, rather than weights
    files the kernel maps from the page cache and can drop again)."""

    def __init__(self) -> None:
        self.peak_anon_kib = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> MemorySampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()

    def _sample(self) -> None:
        self.peak_anon_kib = max(self.peak_anon_kib, _status_kib("RssAnon"))

    def _run(self) -> None:
        while not self._stop.is_set():
            self._sample()
            self._stop.wait(SAMPLE_INTERVAL_S)

    def report(self) -> dict[str, float]:
        return {
            # VmHWM rather than getrusage's ru_maxrss, which a child inherits from the parent it was forked from.
            "peak_rss_gib": _status_kib("VmHWM") * 1024 / GIB,
            "peak_anon_gib": self.peak_anon_kib * 1024 / GIB,
            "end_file_rss_gib": _status_kib("RssFile") * 1024 / GIB,
        }


# --- Page cache and fresh processes ---------------------------------------------------------------------------


def drop_page_cache() -> bool:
    """Empty the kernel's page cache (root only), so the next read comes from the disk. False if not permitted."""
    try:
        os.sync()
        DROP_CACHES.write_text("3\n")
        return True
    except OSError:
        return False


def run_child(argv: Sequence[str], env: dict[str, str] | None = None) -> dict:
    """Run `python argv...` in a fresh interpreter; it prints one RESULT_PREFIX line of JSON.

    `wall_s` is added: from spawning the interpreter to its exit, i.e. what a restart of the server costs.
    """
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, *argv], env={**os.environ, **(env or {})}, capture_output=True, text=True, cwd=REPO_ROOT
    )
    wall = time.perf_counter() - started
    lines = [line for line in done.stdout.splitlines() if line.startswith(RESULT_PREFIX)]
    if done.returncode != 0 or not lines:
        raise RuntimeError(
            f"{' '.join(argv)} failed (exit {done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
        )
    return {**json.loads(lines[-1][len(RESULT_PREFIX) :]), "wall_s": wall}


def emit_result(result: dict) -> None:
    """The child's side of run_child."""
    print(RESULT_PREFIX + json.dumps(result), flush=True)


def timed(fn: Callable[[], object]) -> tuple[float, object]:
    started = time.perf_counter()
    value = fn()
    return time.perf_counter() - started, value
