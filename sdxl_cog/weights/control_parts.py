"""The optional control models script/download-weights bakes by flag, each into its folder under control/ (layout.py):

    --controlnet union          xinsir/controlnet-union-sdxl-1.0, ProMax: every type (UNION_CONTROL_MODES)
    --controlnet canny|depth    diffusers/controlnet-{canny,depth}-sdxl-1.0
    --controlnet TYPE=SOURCE    any other single-type SDXL ControlNet: a diffusers repo id or folder
    --ip-adapter [vit-h|bigg]   h94/IP-Adapter's SDXL adapter and the image encoder it was trained with
    --depth-estimator           depth-anything/Depth-Anything-V2-Small-hf, the depth preprocessor

Each flag becomes a ControlPart: the layout part that fills its folder (parts.py) and its entry in the manifest's
`control` section, less what only the download learns: the resolved source and, for a ControlNet, the types its
config says it serves (controlnet_types, checked before its weights are fetched). Pure: no network, no disk.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from sdxl_cog.weights.catalog import SINGLE, UNION
from sdxl_cog.weights.control_types import CONTROL_TYPES, union_types
from sdxl_cog.weights.layout import (
    CONTROLNET_FILES,
    DEPTH_ESTIMATOR_DIR,
    DEPTH_ESTIMATOR_FILES,
    IMAGE_ENCODER_FILES,
    IP_ADAPTER_DIR,
    controlnet_dir,
    image_encoder_path,
)
from sdxl_cog.weights.parts import Part
from sdxl_cog.weights.sources import DownloadError

CONTROLNET_CONFIG = CONTROLNET_FILES[0]

# The ControlNets baked by name: name -> (kind, repo).
STOCK_CONTROLNETS = {
    "union": (UNION, "xinsir/controlnet-union-sdxl-1.0"),
    "canny": (SINGLE, "diffusers/controlnet-canny-sdxl-1.0"),
    "depth": (SINGLE, "diffusers/controlnet-depth-sdxl-1.0"),
}
# xinsir's repo holds the first release (config.json and diffusion_pytorch_model.safetensors: 6 control types) beside
# ProMax (8: tile and repaint added), both fp16. diffusers reads neither _promax name, so ProMax is stored under the
# names ControlNetUnionModel.from_pretrained(folder, variant="fp16") reads.
UNION_RENAMED = tuple(zip(CONTROLNET_FILES, ("config_promax.json", "diffusion_pytorch_model_promax.safetensors")))


@dataclass(frozen=True)
class IpAdapterVariant:
    weight_name: str  # in SUBFOLDER
    image_encoder_folder: str  # as load_ip_adapter takes it (layout.image_encoder_path)
    cast_encoder: bool  # the encoder is published in fp32: cast to fp16 once, here


IP_ADAPTER_REPO, IP_ADAPTER_SUBFOLDER = "h94/IP-Adapter", "sdxl_models"
IP_ADAPTERS = {
    # ViT-H/14 (632 M parameters, 1.26 GB as fp16) and the adapter trained on it: the lean choice, and what a bare
    # --ip-adapter bakes (script/download-weights).
    "vit-h": IpAdapterVariant("ip-adapter_sdxl_vit-h.safetensors", "models/image_encoder", cast_encoder=True),
    # OpenCLIP ViT-bigG/14 (3.69 GB, published in fp16) and the original SDXL adapter.
    "bigg": IpAdapterVariant("ip-adapter_sdxl.safetensors", "image_encoder", cast_encoder=False),
}
DEPTH_ESTIMATOR_REPO = "depth-anything/Depth-Anything-V2-Small-hf"


@dataclass(frozen=True)
class ControlPart:
    """One flag's folder: how it is filled, from where, and its manifest entry less `source` (and a ControlNet's
    `types`, which its config decides)."""

    part: Part
    section: str  # its key in the manifest's control section
    entry: dict

    @property
    def config_file(self) -> str:
        """A ControlNet's config as its repo names it."""
        return dict(self.part.renamed).get(CONTROLNET_CONFIG, CONTROLNET_CONFIG)


def plan_control(controlnets: list[str], ip_adapter: str | None, depth_estimator: bool) -> dict[str, ControlPart]:
    """The folders the flags ask for, by folder, in the order given. Raises DownloadError naming a bad flag value."""
    planned = [_controlnet(spec) for spec in controlnets]
    if ip_adapter is not None:
        planned.append(_ip_adapter(ip_adapter))
    if depth_estimator:
        planned.append(_depth_estimator())
    folders = {}
    for control in planned:
        if control.part.folder in folders:
            raise DownloadError(f"--controlnet {control.entry['name']} is given twice.")
        folders[control.part.folder] = control
    return folders


def _controlnet(spec: str) -> ControlPart:
    name, given, source = spec.partition("=")
    if not given and name in STOCK_CONTROLNETS:
        kind, source = STOCK_CONTROLNETS[name]
    elif given and name in CONTROL_TYPES and source:
        kind = SINGLE
    else:
        raise DownloadError(_controlnet_hint(spec))
    folder = controlnet_dir(name)
    if kind == UNION:
        part = Part(folder, source, (), (), renamed=UNION_RENAMED)
    else:
        part = Part(folder, source, (CONTROLNET_CONFIG,), CONTROLNET_FILES[1:])
    return ControlPart(part, "controlnets", {"name": name, "kind": kind, "dir": folder})


def _controlnet_hint(spec: str) -> str:
    name = spec.partition("=")[0]
    if name in CONTROL_TYPES:  # a type with no stock single-type model, or TYPE= without a source
        return (
            f"--controlnet {spec}: give a single-type {name} ControlNet as --controlnet {name}=SOURCE (a diffusers "
            f"repo id or folder), or bake --controlnet union, which serves {name}."
        )
    if name in STOCK_CONTROLNETS:  # union=SOURCE
        return (
            f"--controlnet {spec}: {name} is {STOCK_CONTROLNETS[name][1]}, baked as --controlnet {name}; "
            "TYPE=SOURCE takes single-type ControlNets."
        )
    return (
        f"--controlnet {spec}: unknown; use {', '.join(STOCK_CONTROLNETS)}, or TYPE=SOURCE with TYPE one of "
        f"{', '.join(CONTROL_TYPES)}."
    )


def _ip_adapter(variant: str) -> ControlPart:
    if variant not in IP_ADAPTERS:
        raise DownloadError(f"--ip-adapter {variant}: unknown; use one of {', '.join(IP_ADAPTERS)}.")
    chosen = IP_ADAPTERS[variant]
    encoder = image_encoder_path(IP_ADAPTER_SUBFOLDER, chosen.image_encoder_folder)
    encoder_weights = f"{encoder}/{IMAGE_ENCODER_FILES[1]}"
    part = Part(
        IP_ADAPTER_DIR,
        IP_ADAPTER_REPO,
        (f"{encoder}/{IMAGE_ENCODER_FILES[0]}",),
        (f"{IP_ADAPTER_SUBFOLDER}/{chosen.weight_name}", encoder_weights),
        cast=(encoder_weights,) if chosen.cast_encoder else (),
    )
    entry = {
        "dir": IP_ADAPTER_DIR,
        "subfolder": IP_ADAPTER_SUBFOLDER,
        "weight_name": chosen.weight_name,
        "image_encoder_folder": chosen.image_encoder_folder,
    }
    return ControlPart(part, "ip_adapter", entry)


def _depth_estimator() -> ControlPart:
    weights = DEPTH_ESTIMATOR_FILES[1]
    files = tuple(name for name in DEPTH_ESTIMATOR_FILES if name != weights)
    part = Part(DEPTH_ESTIMATOR_DIR, DEPTH_ESTIMATOR_REPO, files, (weights,))  # fp32 as published: 99 MB
    return ControlPart(part, "depth_estimator", {"dir": DEPTH_ESTIMATOR_DIR})


def controlnet_types(control: ControlPart, config: dict, label: str) -> list[str]:
    """The types a ControlNet's config says it serves, refusing a config that contradicts its flag.

    A union checkpoint must never pass as a single-type one: ControlNetModel.from_pretrained loads it with a mere
    warning, dropping the union's own weights. xinsir's config_promax.json names ControlNetModel as its class, so only
    num_control_type tells them apart.
    """
    name, count = control.entry["name"], config.get("num_control_type")
    where = f"{label}'s {control.config_file}"
    if config.get("addition_embed_type") != "text_time":
        raise DownloadError(
            f"--controlnet {name}: {label} is not an SDXL ControlNet ({where} has no text_time embedding)."
        )
    if control.entry["kind"] == UNION:
        if not isinstance(count, int) or not union_types(count):
            raise DownloadError(
                f"--controlnet {name}: {label} is not a ControlNet-Union ({where} has no num_control_type)."
            )
        return list(union_types(count))
    if count is not None:
        raise DownloadError(
            f"--controlnet {name}: {label} is a ControlNet-Union ({where} has num_control_type {count}), not a "
            f"single-type ControlNet; bake the union with --controlnet union."
        )
    if config.get("_class_name") != "ControlNetModel":
        raise DownloadError(
            f"--controlnet {name}: {label} is not a diffusers ControlNet ({where} names {config.get('_class_name')!r})."
        )
    return [name]


def control_section(entries: Iterable[tuple[str, dict]]) -> dict:
    """The manifest's control section from (key, entry) pairs: the ControlNets in a list, in order; the others alone."""
    section = {}
    for key, entry in entries:
        if key == "controlnets":
            section.setdefault(key, []).append(entry)
        else:
            section[key] = entry
    return section
