"""Timing the phases of a request's device work: a GPU runs what a thread queued later, so a phase's time is
measured up to the moment its work is done, not queued."""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager

import torch


def synchronize(device: str) -> None:
    """Wait for the GPU work this thread queued, so that phase timings measure the phase and not the launch.

    The calling thread's stream only: the finishing workers' stream runs beside the decoder's, and neither
    waits for the other."""
    if device.startswith("cuda"):
        torch.cuda.current_stream().synchronize()


class PhaseTimer:
    """Seconds per named phase of one request, summed over every time the phase ran, from any thread."""

    def __init__(self, device: str):
        self.device = device
        self.timings: dict[str, float] = {}
        self._timings_lock = threading.Lock()  # the finishing phases are timed in worker threads

    @contextmanager
    def phase(self, name: str):
        started = time.perf_counter()
        yield
        synchronize(self.device)
        with self._timings_lock:
            self.timings[name] = self.timings.get(name, 0.0) + time.perf_counter() - started
