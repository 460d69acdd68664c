"""The SDXL checkpoints and control models a weights directory holds, as its manifest lists them (layout.py).

Pure functions over the manifest: which checkpoints there are, in which folder, from which source, with which
profile (profiles.py), and which of their components are byte-identical (so that they are loaded once); which
ControlNets, IP-Adapter and depth estimator are baked (control_entries)."""

from __future__ import annotations

from dataclasses import dataclass

from sdxl_cog.weights.control_types import CONTROL_TYPES
from sdxl_cog.weights.layout import (
    BASE_DIR,
    CONTROLNET_FILES,
    DEPTH_ESTIMATOR_FILES,
    IMAGE_ENCODER_FILES,
    image_encoder_path,
)
from sdxl_cog.weights.profiles import Profile, profile_from

# The parts of a checkpoint folder that can be shared with another checkpoint when identical.
SHAREABLE = ("text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "unet")
UNET_WEIGHTS = "unet/diffusion_pytorch_model.fp16.safetensors"
# A1111 writes the first 10 hex digits of the checkpoint's sha256 as "Model hash".
SHORT_HASH_CHARS = 10


@dataclass(frozen=True)
class CheckpointEntry:
    """One checkpoint as the manifest lists it."""

    name: str
    folder: str  # relative to the weights root
    source: str
    unet_sha256: str
    profile: Profile

    @property
    def short_hash(self) -> str:
        return self.unet_sha256[:SHORT_HASH_CHARS]


def legacy_name(manifest: dict) -> str:
    """The single base's name in a manifest without a `models` list, e.g. `stable-diffusion-xl-base-1.0`."""
    source = str(manifest.get("sources", {}).get("base", "stable-diffusion-xl-base-1.0")).split(" -> ")[0]
    return source.split("@")[0].rstrip("/").split("/")[-1] or source


def checkpoint_entries(manifest: dict) -> list[CheckpointEntry]:
    """Every checkpoint, the default first. A manifest without `models` describes base/ alone."""
    entries = manifest.get("models") or [
        {"name": legacy_name(manifest), "dir": BASE_DIR, "source": manifest.get("sources", {}).get("base", "")}
    ]
    files = manifest["files"]
    return [
        CheckpointEntry(
            name=e["name"],
            folder=e["dir"],
            source=e.get("source", ""),
            unet_sha256=files.get(f"{e['dir']}/{UNET_WEIGHTS}", {}).get("sha256", ""),
            profile=profile_from(e.get("profile") or {}),
        )
        for e in entries
    ]


def component_key(manifest: dict, folder: str, component: str) -> tuple:
    """What a component is made of: each file's name and sha256. Equal keys mean byte-identical components."""
    prefix = f"{folder}/{component}/"
    return tuple(
        sorted(
            (name.removeprefix(prefix), entry["sha256"])
            for name, entry in manifest["files"].items()
            if name.startswith(prefix)
        )
    )


# --- ControlNet, IP-Adapter and depth models (the manifest's optional "control" key) -----------------------------

# A ControlNet's kind: a single-type one serves one type; a union (ControlNetUnionModel) each of its `types`.
SINGLE, UNION = "single", "union"
CONTROLNET_KINDS = (SINGLE, UNION)


@dataclass(frozen=True)
class ControlNetEntry:
    """A ControlNet: `single` serves its one type; `union` (ControlNetUnionModel) every type in `types`, each with its
    control_mode (control_types.UNION_CONTROL_MODES). Load it as its kind says, never as its config's class says."""

    name: str
    kind: str
    folder: str
    source: str
    types: tuple[str, ...]


@dataclass(frozen=True)
class IpAdapterEntry:
    """The IP-Adapter: what diffusers' load_ip_adapter(folder, subfolder=, weight_name=, image_encoder_folder=)
    takes, as the release lays it out."""

    folder: str
    source: str
    subfolder: str
    weight_name: str
    image_encoder_folder: str  # load_ip_adapter's argument: a bare name lies in subfolder, a path starts at folder

    @property
    def image_encoder_path(self) -> str:
        """The image encoder's folder, relative to the weights root."""
        return f"{self.folder}/{image_encoder_path(self.subfolder, self.image_encoder_folder)}"


@dataclass(frozen=True)
class DepthEstimatorEntry:
    """The depth preprocessor (transformers' AutoModelForDepthEstimation and AutoImageProcessor read the folder)."""

    folder: str
    source: str


@dataclass(frozen=True)
class ControlEntries:
    controlnets: tuple[ControlNetEntry, ...] = ()
    ip_adapter: IpAdapterEntry | None = None
    depth_estimator: DepthEstimatorEntry | None = None


def control_entries(manifest: dict) -> ControlEntries:
    """The control models the manifest lists (none without a `control` section).

    Raises ValueError naming what is wrong: an unknown kind or type, a single-type ControlNet with other than one
    type, two ControlNets of one name, two single-type ones for one type, two unions, a file the model needs that
    the manifest does not list.
    """
    section = manifest.get("control") or {}
    adapter, depth = section.get("ip_adapter"), section.get("depth_estimator")
    try:
        entries = ControlEntries(
            controlnets=tuple(_controlnet_entry(e) for e in section.get("controlnets", [])),
            ip_adapter=_ip_adapter_entry(adapter) if adapter is not None else None,
            depth_estimator=_depth_estimator_entry(depth) if depth is not None else None,
        )
    except KeyError as e:
        raise ValueError(f"The weights manifest's control section lacks the field {e}.") from None
    _check_controlnets(entries.controlnets)
    _check_listed(manifest["files"], _needed_files(entries))
    return entries


def _controlnet_entry(entry: dict) -> ControlNetEntry:
    controlnet = ControlNetEntry(
        name=entry["name"],
        kind=entry["kind"],
        folder=entry["dir"],
        source=entry.get("source", ""),
        types=tuple(entry["types"]),
    )
    where = f"ControlNet {controlnet.name!r} in the weights manifest"
    if controlnet.kind not in CONTROLNET_KINDS:
        raise ValueError(f"{where}: unknown kind {controlnet.kind!r} (expected one of {', '.join(CONTROLNET_KINDS)}).")
    if unknown := [t for t in controlnet.types if t not in CONTROL_TYPES]:
        raise ValueError(f"{where}: unknown type {unknown[0]!r} (expected one of {', '.join(CONTROL_TYPES)}).")
    if controlnet.kind == SINGLE and len(controlnet.types) != 1:
        raise ValueError(f"{where}: a single-type ControlNet serves one type, not {list(controlnet.types)}.")
    return controlnet


def _ip_adapter_entry(entry: dict) -> IpAdapterEntry:
    return IpAdapterEntry(
        folder=entry["dir"],
        source=entry.get("source", ""),
        subfolder=entry["subfolder"],
        weight_name=entry["weight_name"],
        image_encoder_folder=entry["image_encoder_folder"],
    )


def _depth_estimator_entry(entry: dict) -> DepthEstimatorEntry:
    return DepthEstimatorEntry(folder=entry["dir"], source=entry.get("source", ""))


def _check_controlnets(controlnets: tuple[ControlNetEntry, ...]) -> None:
    """Which model serves a type must be unambiguous: one name each, one single-type model per type, one union."""
    for what, keys in (
        ("named", [c.name for c in controlnets]),
        ("single-type for", [c.types[0] for c in controlnets if c.kind == SINGLE]),
        ("of kind", [c.kind for c in controlnets if c.kind == UNION]),
    ):
        if repeated := sorted({key for key in keys if keys.count(key) > 1}):
            raise ValueError(f"The weights manifest lists two ControlNets {what} {repeated[0]!r}.")


def _needed_files(entries: ControlEntries) -> list[str]:
    """Every file the control models' loaders read, relative to the weights root."""
    needed = [f"{c.folder}/{name}" for c in entries.controlnets for name in CONTROLNET_FILES]
    if adapter := entries.ip_adapter:
        needed.append(f"{adapter.folder}/{adapter.subfolder}/{adapter.weight_name}")
        needed += [f"{adapter.image_encoder_path}/{name}" for name in IMAGE_ENCODER_FILES]
    if depth := entries.depth_estimator:
        needed += [f"{depth.folder}/{name}" for name in DEPTH_ESTIMATOR_FILES]
    return needed


def _check_listed(files: dict, needed: list[str]) -> None:
    if unlisted := [name for name in needed if name not in files]:
        raise ValueError(f"The weights manifest lists no {unlisted[0]}, which a control model it lists needs.")
