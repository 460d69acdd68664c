"""Peak GPU memory of one prediction, reported in its metrics (as docker-diffusers-api's `$mem_usage`),
so that an operator sees how close each request came to the card's limit. Nothing is reported on CPU."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from .memory import gpu_capacity


@dataclass(frozen=True)
class PeakMemoryMeter:
    capacity_bytes: int | None  # None: no GPU, nothing to report
    reset_peak: Callable[[], None]
    read_peak: Callable[[], int]

    @classmethod
    def for_device(cls, device: str) -> PeakMemoryMeter:
        capacity = gpu_capacity(device)
        if capacity is None:
            return cls(None, lambda: None, lambda: 0)
        index = torch.device(device)
        # Allocated, not reserved: what the prediction's tensors and the weights really occupied, not
        # what the caching allocator kept from earlier requests.
        return cls(
            capacity,
            lambda: torch.cuda.reset_peak_memory_stats(index),
            lambda: torch.cuda.max_memory_allocated(index),
        )

    def start(self) -> None:
        """Forget the previous prediction's peak."""
        if self.capacity_bytes is not None:
            self.reset_peak()

    def metrics(self) -> dict[str, object]:
        if self.capacity_bytes is None:
            return {}
        peak = int(self.read_peak())
        return {"gpu_peak_memory_bytes": peak, "gpu_memory_fraction": round(peak / self.capacity_bytes, 4)}
