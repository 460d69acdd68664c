"""Where the weights live while a prediction runs.

With enough GPU memory every module moves to the GPU once at setup and stays (ResidentPlacement). With
less (low-VRAM mode, StagedPlacement) the weights wait in pinned CPU memory, and each stage of a
prediction brings onto the GPU only the modules it runs, after evicting the others: at most one UNet
and the VAE (5.3 GB in fp16) are on the GPU instead of all 12.1 GB.

Placement is per module, not per pipeline: the pipelines are rebuilt for every request around modules
that base and refiner share, so nothing about placement may live on a pipeline object. The pipelines
find their execution device from the modules (diffusers' DiffusionPipeline.device prefers a component
that is not on the CPU), so a pipeline whose text encoders wait on the CPU still computes on the GPU.
"""

from __future__ import annotations

from collections.abc import Iterator
from itertools import chain

import torch
from diffusers import ControlNetUnionModel
from torch.utils.weak import WeakIdKeyDictionary

from sdxl_cog.device.memory import GIB, needs_low_vram
from sdxl_cog.inputs.control import MAX_CONTROLS

# The slots of the control models (control/models.py): each ControlNet's own, which the base stage brings when a
# request uses it, and the two that run in stages of their own.
CONTROLNET_SLOT_PREFIX = "controlnet:"
IMAGE_ENCODER_SLOT = "image_encoder"
DEPTH_ESTIMATOR_SLOT = "depth_estimator"

# The modules each stage of generate() runs. The VAE joins both denoising stages because the img2img
# and inpaint pipelines encode their source image with it; at 0.17 GB it then simply stays.
STAGES: dict[str, tuple[str, ...]] = {
    # refiner_text_encoder_2: only while the active checkpoint's text_encoder_2 is not the refiner's (checkpoints/registry.py).
    "text_encoding": ("text_encoder", "text_encoder_2", "refiner_text_encoder_2"),
    "base": ("base_unet", "vae"),
    "refiner": ("refiner_unet", "vae"),
    "vae_decode": ("vae",),
    # Each image is checked as soon as it is decoded, so both stay for the whole decode loop (0.8 GB in fp16).
    "vae_decode_and_safety_check": ("vae", "safety_checker"),
    # Depth maps for depth controls, and the IP-Adapter's image embeddings, before the base stage.
    "control_preprocess": (DEPTH_ESTIMATOR_SLOT,),
    "image_prompt": (IMAGE_ENCODER_SLOT,),
}


def _tensors(module: torch.nn.Module) -> Iterator[torch.Tensor]:
    return chain(module.parameters(), module.buffers())


def module_bytes(module: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in _tensors(module))


def controlnet_peak_bytes(sizes: dict[str, int], union: str | None = None) -> int:
    """The most ControlNet bytes one request brings to the base stage: it runs at most MAX_CONTROLS controls, on
    single-type ControlNets or on the union (slot `union`), never both (control/models.py's ControlModels.serving)."""
    singles = sorted(
        (size for name, size in sizes.items() if name.startswith(CONTROLNET_SLOT_PREFIX) and name != union),
        reverse=True,
    )
    return max(sizes.get(union, 0), sum(singles[:MAX_CONTROLS]))


def stage_peak_bytes(sizes: dict[str, int], union: str | None = None) -> int:
    """The most weight bytes any one stage needs on the device, from each module's size; the base stage with the
    ControlNets one request can use at most."""
    return max(
        sum(sizes.get(name, 0) for name in names) + (controlnet_peak_bytes(sizes, union) if stage == "base" else 0)
        for stage, names in STAGES.items()
    )


class ResidentPlacement:
    """Every module on the device for good: nothing moves during a prediction."""

    # checkpoints/loading.py keeps a GPU cache of checkpoints only when modules stay resident.
    low_vram = False

    def __init__(self, device: str, modules: dict[str, torch.nn.Module]):
        self.modules = modules
        for module in modules.values():
            module.to(device)
        self.peak_bytes = sum(module_bytes(m) for m in modules.values())

    def use(self, stage: str, extra: tuple[str, ...] = ()) -> None:
        pass

    def swap(self, name: str, module: torch.nn.Module | None) -> None:
        """Run `module` (None: nothing) in slot `name` from now on; the checkpoint cache (checkpoints/cache.py) moves it."""
        if module is None:
            self.modules.pop(name, None)
        else:
            self.modules[name] = module


class StagedPlacement:
    """Low-VRAM mode: only the current stage's modules on the device; the rest in pinned CPU memory.

    A module is moved by swapping each tensor's `.data` (as diffusers' group offloading does), never with
    `module.to()`: the Parameter objects stay the same ones that PEFT, the pipelines and the hooks hold,
    eviction is free (inference never writes the weights, so the GPU copy is dropped, not copied back),
    and the CPU copy stays pinned, so the next copy to the GPU runs at full PCIe speed without staging.
    """

    low_vram = True

    def __init__(self, device: str, modules: dict[str, torch.nn.Module]):
        self.device = torch.device(device)
        self.modules = modules
        # Page-locked memory needs a CUDA driver; on the CPU (tests) the moves are bookkeeping only.
        self.pin = self.device.type == "cuda"
        # Each tensor's CPU copy while its `.data` is on the device; weak, so a deleted LoRA leaves nothing.
        self._host: WeakIdKeyDictionary = WeakIdKeyDictionary()
        self.on_device: set[str] = set()
        for module in modules.values():
            self._evict(module)
        union = next((name for name, m in modules.items() if isinstance(m, ControlNetUnionModel)), None)
        self.peak_bytes = stage_peak_bytes({name: module_bytes(m) for name, m in modules.items()}, union)

    def use(self, stage: str, extra: tuple[str, ...] = ()) -> None:
        """Make the device hold exactly what `stage` runs, and the `extra` slots it runs for this request."""
        wanted = {name for name in (*STAGES[stage], *extra) if name in self.modules}
        # Evict first, so the memory they free is there for the modules that come in.
        for name in self.on_device - wanted:
            self._evict(self.modules[name])
            self.on_device.discard(name)
        for name in wanted - self.on_device:
            try:
                self._fetch(self.modules[name])
            except BaseException:
                # A copy cut short (out of memory, cancellation) must not leave half a module behind.
                self._evict(self.modules[name])
                raise
            self.on_device.add(name)

    def swap(self, name: str, module: torch.nn.Module | None) -> None:
        """Run `module` (None: nothing) in slot `name` from now on; the one it replaces leaves the device."""
        current = self.modules.get(name)
        if current is module:
            return
        if name in self.on_device:
            self._evict(current)
            self.on_device.discard(name)
        if module is None:
            self.modules.pop(name, None)
        else:
            self.modules[name] = module

    def _fetch(self, module: torch.nn.Module) -> None:
        for tensor in _tensors(module):
            # Tensors added since setup (a LoRA loaded between requests) are pinned on their first trip.
            host = tensor.data.pin_memory() if self.pin and not tensor.data.is_pinned() else tensor.data
            self._host[tensor] = host
            tensor.data = self._copy_to_device(host)

    def _copy_to_device(self, host: torch.Tensor) -> torch.Tensor:
        # Asynchronous from pinned memory; kernels queued after it on the stream wait for it.
        return host.to(self.device, non_blocking=True)

    def _evict(self, module: torch.nn.Module) -> None:
        for tensor in _tensors(module):
            host = self._host.pop(tensor, None)
            if host is None:  # not fetched by us: loaded weights at setup, or a tensor created on the device
                host = tensor.data.to("cpu")
                host = host.pin_memory() if self.pin else host
            tensor.data = host


Placement = ResidentPlacement | StagedPlacement


def make_placement(
    device: str, modules: dict[str, torch.nn.Module], low_vram: bool | None, capacity_bytes: int | None
) -> Placement:
    """Low-VRAM mode when the operator asks for it, or (low_vram None) when the GPU is too small to hold
    every module next to the reference request; see memory.needs_low_vram."""
    weights_bytes = sum(module_bytes(m) for m in modules.values())
    if low_vram is None:
        low_vram = needs_low_vram(capacity_bytes, weights_bytes)
    placement = (StagedPlacement if low_vram else ResidentPlacement)(device, modules)
    if capacity_bytes is not None:
        how = "low-VRAM mode, one stage's modules at a time" if low_vram else "all resident"
        print(f"GPU memory {capacity_bytes / GIB:.1f} GiB, weights {weights_bytes / GIB:.1f} GiB: {how}.", flush=True)
    return placement
