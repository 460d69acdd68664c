"""Which checkpoints' own modules are on the GPU: as many as fit a memory budget, the least recently used out.

On a GPU with every module resident (device/placement.py's ResidentPlacement), checkpoints beyond the budget wait
in host memory and are copied in when a request needs them, evicting the least recently used. In low-VRAM mode
(StagedPlacement) nothing stays on the GPU between stages anyway, and there is no cache: a switch only points the
stages at the other checkpoint's modules (registry.py).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

import torch

from sdxl_cog.config import REFERENCE_REQUEST, RESERVE_BYTES
from sdxl_cog.device.memory import activation_bytes
from sdxl_cog.device.placement import module_bytes


def checkpoint_budget(capacity_bytes: int | None, fixed_bytes: int) -> int | None:
    """GPU bytes for checkpoints' own modules: what the card has less the shared modules, the reserve and the
    reference request's activations (memory.py), so that a full request still fits next to them."""
    if capacity_bytes is None:
        return None
    return capacity_bytes - fixed_bytes - RESERVE_BYTES - activation_bytes(**REFERENCE_REQUEST)


Mover = Callable[[torch.nn.Module, bool], None]  # (module, to_device)


class CheckpointCache:
    """Which checkpoints' modules are on the device, least recently used first, within `budget_bytes`."""

    def __init__(
        self,
        modules: dict[str, list[torch.nn.Module]],
        pinned: list[torch.nn.Module],
        budget_bytes: int | None,
        move: Mover,
    ):
        self.modules, self.budget_bytes, self.move = modules, budget_bytes, move
        self.pinned = {id(m) for m in pinned}  # shared with the refiner: on the device for good
        self.resident: OrderedDict[str, None] = OrderedDict()
        # At setup, as many checkpoints as fit, in the order they were baked.
        for name in modules:
            if self._fits(name):
                self._bring(name)

    def _own(self, names) -> dict[int, torch.nn.Module]:
        return {id(m): m for n in names for m in self.modules[n] if id(m) not in self.pinned}

    def used_bytes(self) -> int:
        return sum(module_bytes(m) for m in self._own(self.resident).values())

    def bytes_of(self, name: str) -> int:
        """The bytes of `name`'s own modules: what bringing it onto the device copies, at most."""
        return sum(module_bytes(m) for m in self._own([name]).values())

    def _fits(self, name: str) -> bool:
        if self.budget_bytes is None:
            return True
        return sum(module_bytes(m) for m in self._own([*self.resident, name]).values()) <= self.budget_bytes

    def _bring(self, name: str) -> None:
        on_device = self._own(self.resident)
        for key, module in self._own([name]).items():
            if key not in on_device:
                self.move(module, True)
        self.resident[name] = None

    def _evict(self, name: str) -> None:
        del self.resident[name]
        keep = self._own(self.resident)
        for key, module in self._own([name]).items():
            if key not in keep:
                self.move(module, False)

    def use(self, name: str) -> list[str] | None:
        """Make `name` resident; returns the checkpoints evicted for it, or None when it was already there."""
        if name in self.resident:
            self.resident.move_to_end(name)
            return None
        evicted = []
        while self.resident and not self._fits(name):
            oldest = next(iter(self.resident))
            self._evict(oldest)
            evicted.append(oldest)
        self._bring(name)
        return evicted


def move_between(device: str) -> Mover:
    def move(module: torch.nn.Module, to_device: bool) -> None:
        module.to(device if to_device else "cpu")

    return move
