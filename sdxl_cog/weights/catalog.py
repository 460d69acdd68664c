"""The SDXL checkpoints a weights directory holds, as its manifest lists them (layout.py).

Pure functions over the manifest: which checkpoints there are, in which folder, from which source, with which
profile (profiles.py), and which of their components are byte-identical (so that they are loaded once)."""

from __future__ import annotations

from dataclasses import dataclass

from sdxl_cog.weights.control_types import CONTROL_TYPES
from sdxl_cog.weights.layout import BASE_DIR
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
CONTROLNET_KINDS = ("single", "union")


@dataclass(frozen=True)
class ControlNetEntry:
    name: str
    kind: str  # "single": one control type; "union": a ControlNet-Union serving several through control_mode
    folder: str
    source: str
    types: tuple[str, ...]  # the control types it serves (control_types.py)


@dataclass(frozen=True)
class IpAdapterEntry:
    folder: str
    source: str
    subfolder: str  # where the adapter file is, inside folder
    weight_name: str
    image_encoder_folder: str  # diffusers' rule: without a "/" inside subfolder, with one from folder itself

    @property
    def image_encoder_path(self) -> str:
        inner = self.image_encoder_folder
        return f"{self.folder}/{inner}" if "/" in inner else f"{self.folder}/{self.subfolder}/{inner}"


@dataclass(frozen=True)
class DepthEstimatorEntry:
    folder: str
    source: str


@dataclass(frozen=True)
class ControlEntries:
    controlnets: tuple[ControlNetEntry, ...] = ()
    ip_adapter: IpAdapterEntry | None = None
    depth_estimator: DepthEstimatorEntry | None = None


def control_entries(manifest: dict) -> ControlEntries:
    """The control models the manifest lists (none when it has no "control" key); ValueError on a kind or type
    this code does not know."""
    control = manifest.get("control") or {}
    controlnets = []
    for e in control.get("controlnets", []):
        if e["kind"] not in CONTROLNET_KINDS:
            raise ValueError(
                f"ControlNet {e['name']!r}: unknown kind {e['kind']!r}; known: {', '.join(CONTROLNET_KINDS)}."
            )
        if unknown := set(e["types"]) - set(CONTROL_TYPES):
            raise ValueError(f"ControlNet {e['name']!r}: unknown control types {sorted(unknown)}.")
        controlnets.append(ControlNetEntry(e["name"], e["kind"], e["dir"], e.get("source", ""), tuple(e["types"])))
    adapter = control.get("ip_adapter")
    depth = control.get("depth_estimator")
    return ControlEntries(
        controlnets=tuple(controlnets),
        ip_adapter=IpAdapterEntry(
            adapter["dir"],
            adapter.get("source", ""),
            adapter["subfolder"],
            adapter["weight_name"],
            adapter["image_encoder_folder"],
        )
        if adapter
        else None,
        depth_estimator=DepthEstimatorEntry(depth["dir"], depth.get("source", "")) if depth else None,
    )
