"""The control models setup() loads, each once and shared by every checkpoint: the baked ControlNets (single-type
ones and the ControlNet-Union), the IP-Adapter (its image encoder here; its projections go into each checkpoint's
UNet) and the depth estimator that makes depth maps. And, for a request, which of them serve it: a model the request
needs and the image lacks is refused by name, with the flag that bakes it.

Which ControlNet serves a request's control types (docs/weights.md says the same):
1. if every type has a single-type ControlNet baked: those;
2. else a ControlNet-Union that serves every type, once per control (the same module, its control_mode per control);
3. else the request is refused naming the types no baked model serves.
A ControlNet for SDXL serves every SDXL-architecture checkpoint; the refiner takes none (its UNet differs).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import ControlNetModel, ControlNetUnionModel, DiffusionPipeline
from transformers import AutoImageProcessor, AutoModelForDepthEstimation, CLIPVisionModelWithProjection

from sdxl_cog.device.placement import CONTROLNET_SLOT_PREFIX, DEPTH_ESTIMATOR_SLOT, IMAGE_ENCODER_SLOT
from sdxl_cog.errors import InputError
from sdxl_cog.inputs.control import CheckedControl, Control
from sdxl_cog.weights.catalog import SINGLE, UNION, ControlEntries, ControlNetEntry, IpAdapterEntry
from sdxl_cog.weights.control_parts import STOCK_CONTROLNETS

# What bakes a model a request asks for, for the message that refuses it (script/download-weights' flags).
BAKES_DEPTH_ESTIMATOR = "--depth-estimator"
BAKES_IP_ADAPTER = "--ip-adapter"


@dataclass
class ControlNet:
    entry: ControlNetEntry
    module: ControlNetModel | ControlNetUnionModel

    @property
    def union(self) -> bool:
        return self.entry.kind == UNION

    @property
    def slot(self) -> str:
        return CONTROLNET_SLOT_PREFIX + self.entry.name


@dataclass
class IpAdapter:
    entry: IpAdapterEntry
    root: Path  # the weights root: load_ip_adapter reads the adapter file from entry.folder under it
    image_encoder: CLIPVisionModelWithProjection


@dataclass
class DepthEstimator:
    model: torch.nn.Module
    processor: object  # transformers' image processor for the model


@dataclass
class ControlModels:
    controlnets: tuple[ControlNet, ...] = ()
    ip_adapter: IpAdapter | None = None
    depth_estimator: DepthEstimator | None = None

    def placed_modules(self) -> dict[str, torch.nn.Module]:
        """Every module by its placement slot."""
        modules = {net.slot: net.module for net in self.controlnets}
        if self.ip_adapter is not None:
            modules[IMAGE_ENCODER_SLOT] = self.ip_adapter.image_encoder
        if self.depth_estimator is not None:
            modules[DEPTH_ESTIMATOR_SLOT] = self.depth_estimator.model
        return modules

    def serving(self, controls: Sequence[Control | CheckedControl]) -> list[ControlNet]:
        """The ControlNet that serves each control, by the rule above; InputError if none does."""
        types = [control.type for control in controls]
        single = {t: net for net in self.controlnets if not net.union for t in net.entry.types}
        if all(t in single for t in types):
            return [single[t] for t in types]
        union = next((net for net in self.controlnets if net.union and set(types) <= set(net.entry.types)), None)
        if union is not None:
            return [union] * len(types)
        served = set(single) | {t for net in self.controlnets if net.union for t in net.entry.types}
        missing = [c for c in controls if c.type not in served]
        if not missing:
            raise InputError(
                f"The controls {', '.join(types)} need a single-type ControlNet and the ControlNet-Union together, "
                "which one request cannot mix: ask for types one of them serves alone."
            )
        control = missing[0]
        raise InputError(
            f"controlnet_{control.slot}={control.type}: no ControlNet for {control.type} is baked into this image. "
            f"Bake one with script/download-weights {bakes_controlnet(control.type)}."
        )

    def check(self, controls: Sequence[Control | CheckedControl], image_prompt: bool) -> None:
        """Refuse, before any work, a request for a model the image lacks (`image_prompt`: it has one). Takes the
        controls before their images are read (build_request) as well as after (SDXLService.predict)."""
        if controls:
            self.serving(controls)
        for control in controls:
            if control.type == "depth" and control.preprocess and self.depth_estimator is None:
                raise InputError(
                    f"controlnet_{control.slot}_preprocess needs a depth estimator, and none is baked into this image: "
                    f"send a ready depth map with controlnet_{control.slot}_preprocess=false, or bake one with "
                    f"script/download-weights {BAKES_DEPTH_ESTIMATOR}."
                )
        if image_prompt and self.ip_adapter is None:
            raise InputError(
                "ip_adapter_image needs an IP-Adapter, and none is baked into this image: bake one with "
                f"script/download-weights {BAKES_IP_ADAPTER}."
            )


def bakes_controlnet(type_: str) -> str:
    """The flags that bake a ControlNet for `type_`: its stock single-type one if there is one, and the union (its
    ProMax release serves every type); else any single-type one named by its repository."""
    singles = [
        f"--controlnet {name}" for name, (kind, _) in STOCK_CONTROLNETS.items() if kind == SINGLE and name == type_
    ]
    union = [f"--controlnet {name}" for name, (kind, _) in STOCK_CONTROLNETS.items() if kind == UNION]
    if singles:
        return " or ".join(singles + union)
    return f"{' or '.join(union)}, or --controlnet {type_}=REPO for a single-type ControlNet"


def load_control_models(root: Path, entries: ControlEntries, dtype: torch.dtype) -> ControlModels:
    """Each control model the manifest lists, from its folder under `root`. A ControlNet's class comes from the
    manifest's kind, never from its config: ControlNetModel loads a union checkpoint with a mere warning."""
    controlnets = tuple(
        ControlNet(
            entry,
            (ControlNetUnionModel if entry.kind == "union" else ControlNetModel).from_pretrained(
                root / entry.folder, dtype=dtype, variant="fp16"
            ),
        )
        for entry in entries.controlnets
    )
    ip_adapter = None
    if entries.ip_adapter is not None:
        encoder = CLIPVisionModelWithProjection.from_pretrained(
            root / entries.ip_adapter.image_encoder_path, dtype=dtype
        )
        ip_adapter = IpAdapter(entries.ip_adapter, root, encoder)
    depth = None
    if entries.depth_estimator is not None:
        folder = root / entries.depth_estimator.folder
        # In the weights' dtype: the map is scaled to 0-255 and binned, so half precision changes nothing visible.
        model = AutoModelForDepthEstimation.from_pretrained(folder, dtype=dtype).eval()
        depth = DepthEstimator(model, AutoImageProcessor.from_pretrained(folder))
    return ControlModels(controlnets, ip_adapter, depth)


def attach_ip_adapter(pipe: DiffusionPipeline, adapter: IpAdapter) -> None:
    """Load the adapter's projections into `pipe`'s UNet, with the shared image encoder. From then on every call of a
    pipeline on that UNet passes image embeddings: zeros at scale 0 for a request without an image prompt, which gives
    the image of the same server without an image prompt exactly, and that of a server without the adapter within a
    level of rounding (diffusers' IP attention processors take another path to the same attention;
    tests/test_control.py)."""
    pipe.register_modules(image_encoder=adapter.image_encoder)
    pipe.load_ip_adapter(
        str(adapter.root / adapter.entry.folder),
        subfolder=adapter.entry.subfolder,
        weight_name=adapter.entry.weight_name,
        image_encoder_folder=None,  # the encoder is the shared one registered above
    )
    pipe.set_ip_adapter_scale(0.0)
