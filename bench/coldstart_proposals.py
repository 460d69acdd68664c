"""Prototypes of proposed changes to setup(), run by bench/coldstart.py as extra variants (same harness:
fresh interpreter, load + first use, cold and warm page cache). Each one wraps today's setup() instead of
editing sdxl_cog, so it can be measured before anyone changes the project.

  prefetch         setup() starts a thread that reads every weights file into the page cache (sendfile to
                   /dev/null: no copy, the GIL released) in load order, and loads as it does today.
  read_then_load   setup() first reads every weights file at full disk speed, then loads (from a warm cache).
  pipelined        the prefetch thread of `prefetch`, but each from_pretrained of load_models waits until the
                   thread has read that model's files, so loading never faults in pages from the disk
                   itself; loading model N overlaps reading model N+1.
  prefetch_import  the prefetch thread started before `import predict` (a statement at the top of predict.py).

    python bench/coldstart.py --weights /tmp/sdxl-full --variants floor,setup,prefetch,read_then_load,pipelined
"""

from __future__ import annotations

import argparse
import threading
import time
from pathlib import Path

from coldstart import read_once, run_as_child, setup_and_use, weight_files


def load_order(root: Path) -> list[Path]:
    """The weights files in the order load_models reads them: VAE, base, refiner, safety checker."""
    from sdxl_cog import weights

    first = [weights.VAE_DIR, weights.BASE_DIR, weights.REFINER_DIR, weights.SAFETY_CHECKER_DIR]
    return sorted(weight_files(root), key=lambda p: first.index(p.relative_to(root).parts[0]))


class Prefetcher:
    """Reads the weights files into the page cache on a daemon thread; `wait(directory)` blocks until every
    file under `directory` has been read."""

    def __init__(self, root: Path):
        self.files = load_order(root)
        self.done = {path: threading.Event() for path in self.files}
        threading.Thread(target=self._run, name="weights-prefetch", daemon=True).start()

    def _run(self) -> None:
        for path in self.files:
            read_once([path])
            self.done[path].set()

    def wait(self, directory: Path) -> None:
        directory = Path(directory).resolve()
        for path in self.files:
            if path.resolve().is_relative_to(directory):
                self.done[path].wait()


class _WaitingLoader:
    """Stands in for a model class in sdxl_cog's modules: from_pretrained(path) waits for path's files first."""

    def __init__(self, cls, prefetcher: Prefetcher):
        self.cls, self.prefetcher = cls, prefetcher

    def from_pretrained(self, path, *args, **kwargs):
        self.prefetcher.wait(path)
        return self.cls.from_pretrained(path, *args, **kwargs)


def _pipelined(root: Path) -> None:
    from sdxl_cog import pipelines, safety

    prefetcher = Prefetcher(root)
    for module, name in (
        (pipelines, "AutoencoderKL"),
        (pipelines, "StableDiffusionXLPipeline"),
        (pipelines, "StableDiffusionXLImg2ImgPipeline"),
        (safety, "StableDiffusionSafetyChecker"),
    ):
        setattr(module, name, _WaitingLoader(getattr(module, name), prefetcher))


def child_prefetch(root: Path, device: str) -> dict:
    return setup_and_use(time.perf_counter(), device, before_setup=lambda: Prefetcher(root))


def child_read_then_load(root: Path, device: str) -> dict:
    return setup_and_use(time.perf_counter(), device, before_setup=lambda: read_once(load_order(root)))


def child_pipelined(root: Path, device: str) -> dict:
    return setup_and_use(time.perf_counter(), device, before_setup=lambda: _pipelined(root))


def child_prefetch_import(root: Path, device: str) -> dict:
    started = time.perf_counter()
    Prefetcher(root)
    return setup_and_use(started, device)


CHILDREN = {
    "prefetch": child_prefetch,
    "read_then_load": child_read_then_load,
    "pipelined": child_pipelined,
    "prefetch_import": child_prefetch_import,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--child", choices=list(CHILDREN), required=True)
    parser.add_argument("--weights", type=Path, required=True)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    run_as_child(CHILDREN[args.child], args.weights, args.device)


if __name__ == "__main__":
    main()
