"""Synthetic ControlNet, ControlNet-Union, IP-Adapter and depth-estimator weights, laid out as the real releases are,
so that the code that loads the real ones loads these unchanged: diffusers' ControlNetModel.from_pretrained,
ControlNetUnionModel.from_pretrained and pipeline.load_ip_adapter, transformers' AutoModelForDepthEstimation and
AutoImageProcessor, each from a local folder with no network.

    controlnet-canny/, controlnet-depth/
        diffusers/controlnet-{canny,depth}-sdxl-1.0: config.json, diffusion_pytorch_model.fp16.safetensors
    controlnet-union/
        xinsir/controlnet-union-sdxl-1.0's ProMax weights under diffusers' names, as the diffusers team
        republished them (OzzyGT/controlnet-union-promax-sdxl-1.0): config.json,
        diffusion_pytorch_model.fp16.safetensors
    ip-adapter/sdxl_models/
        h94/IP-Adapter's SDXL folder: ip-adapter_sdxl.safetensors (image_proj.*, ip_adapter.*) and image_encoder/
        (CLIPVisionModelWithProjection: config.json, model.safetensors)
    depth-anything/
        depth-anything/Depth-Anything-V2-Small-hf: config.json, model.safetensors, preprocessor_config.json

add_control bakes them all into a synthetic weights directory under control/, as script/download-weights lays them out,
with the manifest's control section (script/make-test-weights --control).

Every model is shaped after the SDXL base UNet of the same size (synthetic.sdxl_configs), so that it plugs into
the synthetic base weights of that size: the ControlNets are diffusers' from_unet of that UNet, and the IP-Adapter's
projections have its cross-attention widths. The weights are seeded random values (synthetic.random_model), so a
ControlNet's zero convolutions are not zero and a control visibly changes the image. The convolutions that read an
image (a ControlNet's control image, the depth model's DPT neck and head) are He-initialized (_he_initialize), so that
which image is given matters too. The same size and seed give byte-identical files on the same machine and library
versions.
"""

from __future__ import annotations

import gc
import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import safetensors.torch
import torch
from diffusers import ControlNetModel, ControlNetUnionModel, UNet2DConditionModel
from torch import nn
from transformers import (
    CLIPVisionConfig,
    CLIPVisionModelWithProjection,
    DepthAnythingConfig,
    DepthAnythingForDepthEstimation,
)

from sdxl_cog.weights import layout
from sdxl_cog.weights.catalog import SINGLE, UNION
from sdxl_cog.weights.control_parts import IP_ADAPTERS, control_section
from sdxl_cog.weights.control_types import union_types

from .synthetic import INIT_STD, make_readable, part_seed, random_model, sdxl_configs, write_json

CONTROLNET_CANNY_DIR = "controlnet-canny"
CONTROLNET_DEPTH_DIR = "controlnet-depth"
CONTROLNET_UNION_DIR = "controlnet-union"
IP_ADAPTER_DIR = "ip-adapter"
DEPTH_ESTIMATOR_DIR = "depth-anything"

# Where load_ip_adapter finds the SDXL adapter in h94/IP-Adapter: subfolder=, weight_name=, and the image encoder in
# the default image_encoder_folder="image_encoder", which diffusers reads as SUBFOLDER/image_encoder.
IP_ADAPTER_SUBFOLDER = "sdxl_models"
IP_ADAPTER_WEIGHT_NAME = "ip-adapter_sdxl.safetensors"
IMAGE_ENCODER_FOLDER = "image_encoder"

# The IP-Adapter (not Plus) turns the image embedding into this many extra cross-attention tokens; diffusers infers
# it from the file (an "image_proj.proj.weight" of 4 * cross_attention_dim rows).
IP_ADAPTER_TOKENS = 4

# The ProMax union model's control types (control_mode indices): xinsir's six (ControlNetPlus README) plus tile and
# repaint. config_promax.json says num_control_type 8; the first release has 6 (diffusers' default).
UNION_CONTROL_TYPES = 8

# The diffusers ControlNets and the union model are published as fp16; h94's adapter and image encoder are fp16 files
# without a variant suffix; Depth Anything V2 Small is fp32.
CONTROLNET_DTYPE, CONTROLNET_VARIANT = torch.float16, "fp16"
IP_ADAPTER_DTYPE = torch.float16
DEPTH_DTYPE = torch.float32


@dataclass(frozen=True)
class ControlSize:
    conditioning_channels: tuple[int, ...]  # a ControlNet's conditioning_embedding_out_channels (4: image/8)
    union_heads: int  # the union model's condition transformer (its width is the UNet's first block's)
    image_encoder: dict  # CLIPVisionConfig of the IP-Adapter's image encoder
    depth: dict  # DepthAnythingConfig
    # Collect garbage after each model so that a multi-GB one is freed before the next is built; for MB-sized ones a
    # collection (about 0.35 s in a test process full of imported modules) costs more than the memory is worth.
    collect_after_each: bool


# OpenCLIP ViT-bigG/14's vision tower, which h94's sdxl_models/image_encoder is.
FULL_IMAGE_ENCODER = {
    "hidden_size": 1664,
    "intermediate_size": 8192,
    "num_hidden_layers": 48,
    "num_attention_heads": 16,
    "image_size": 224,
    "patch_size": 14,
    "projection_dim": 1280,
    "hidden_act": "gelu",
}
# Depth-Anything-V2-Small-hf's config.json: DINOv2 ViT-S/14 and a DPT head.
FULL_DEPTH = {
    "backbone_config": {
        "model_type": "dinov2",
        "hidden_size": 384,
        "num_attention_heads": 6,
        "image_size": 518,
        "patch_size": 14,
        "out_indices": [3, 6, 9, 12],
        "reshape_hidden_states": False,
    },
    "reassemble_hidden_size": 384,
    "neck_hidden_sizes": [48, 96, 192, 384],
    "fusion_hidden_size": 64,
    "head_hidden_size": 32,
    "patch_size": 14,
    "depth_estimation_type": "relative",
}
# A few MB at most. The image encoder keeps CLIP's 224-pixel input (load_ip_adapter sizes its image processor from
# it) with 32-pixel patches; the depth model keeps the 14-pixel patches its real preprocessor sizes images for.
TINY_SIZE = ControlSize(
    conditioning_channels=(8, 16, 16, 32),
    union_heads=8,
    image_encoder={
        **FULL_IMAGE_ENCODER,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "patch_size": 32,
        "projection_dim": 32,
    },
    depth={
        **FULL_DEPTH,
        "backbone_config": {
            **FULL_DEPTH["backbone_config"],
            "hidden_size": 32,
            "num_attention_heads": 2,
            "num_hidden_layers": 4,
            "out_indices": [1, 2, 3, 4],
        },
        "reassemble_hidden_size": 32,
        "neck_hidden_sizes": [8, 16, 32, 32],
        "fusion_hidden_size": 16,
        "head_hidden_size": 8,
    },
    collect_after_each=False,
)
FULL_SIZE = ControlSize(
    conditioning_channels=(16, 32, 96, 256),  # every SDXL ControlNet's, diffusers' from_unet default
    union_heads=8,
    image_encoder=FULL_IMAGE_ENCODER,
    depth=FULL_DEPTH,
    collect_after_each=True,
)
SIZES = {"tiny": TINY_SIZE, "full": FULL_SIZE}

# Depth-Anything-V2-Small-hf's preprocessor_config.json, as published: both sizes read it (518-pixel inputs whose
# sides are multiples of the 14-pixel patch, ImageNet normalization).
DEPTH_PREPROCESSOR_CONFIG = {
    "_valid_processor_keys": [
        "images",
        "do_resize",
        "size",
        "keep_aspect_ratio",
        "ensure_multiple_of",
        "resample",
        "do_rescale",
        "rescale_factor",
        "do_normalize",
        "image_mean",
        "image_std",
        "do_pad",
        "size_divisor",
        "return_tensors",
        "data_format",
        "input_data_format",
    ],
    "do_normalize": True,
    "do_pad": False,
    "do_rescale": True,
    "do_resize": True,
    "ensure_multiple_of": 14,
    "image_mean": [0.485, 0.456, 0.406],
    "image_processor_type": "DPTImageProcessor",
    "image_std": [0.229, 0.224, 0.225],
    "keep_aspect_ratio": True,
    "resample": 3,  # PIL bicubic
    "rescale_factor": 1 / 255,
    "size": {"height": 518, "width": 518},
    "size_divisor": None,
}


def make_control_weights(root: Path | str, size: str = "tiny", seed: int = 0) -> dict[str, Path]:
    """Write every model above under `root`, shaped for the SDXL base of `size`; returns each one's folder."""
    root = Path(root)
    folders = {
        CONTROLNET_CANNY_DIR: write_controlnet,
        CONTROLNET_DEPTH_DIR: write_controlnet,
        CONTROLNET_UNION_DIR: write_controlnet_union,
        IP_ADAPTER_DIR: write_ip_adapter,
        DEPTH_ESTIMATOR_DIR: write_depth_estimator,
    }
    for name, write in folders.items():
        write(root / name, size, part_seed(seed, name))
    return {name: root / name for name in folders}


def write_controlnet(folder: Path, size: str = "tiny", seed: int = 0) -> None:
    """A single-type SDXL ControlNet (canny, depth, ...: one architecture) for the base UNet of `size`."""
    _save_diffusers(folder, _controlnet(size), size, seed)


def write_controlnet_union(folder: Path, size: str = "tiny", seed: int = 0) -> None:
    """A ControlNet-Union (ProMax: 8 control types) for the base UNet of `size`."""
    _save_diffusers(folder, _controlnet_union(size), size, seed)


def write_ip_adapter(folder: Path, size: str = "tiny", seed: int = 0) -> None:
    """h94/IP-Adapter's SDXL layout: the adapter file and its CLIP image encoder, for the base UNet of `size`."""
    models = folder / IP_ADAPTER_SUBFOLDER
    # 1. The image encoder, whose projected image embedding the adapter turns into extra tokens.
    encoder = random_model(_image_encoder(size), IP_ADAPTER_DTYPE, part_seed(seed, IMAGE_ENCODER_FOLDER))
    encoder.save_pretrained(models / IMAGE_ENCODER_FOLDER)
    make_readable(models / IMAGE_ENCODER_FOLDER)
    del encoder
    # 2. The adapter: the image projection, and a key/value projection of those tokens per cross-attention layer.
    generator = torch.Generator().manual_seed(seed)
    tensors = {
        name: torch.empty(shape).normal_(0.0, INIT_STD, generator=generator)
        for name, shape in _ip_adapter_shapes(size).items()
    }
    # A norm starts at unit scale and zero shift, as synthetic.random_model fills them.
    tensors["image_proj.norm.weight"].fill_(1.0)
    tensors["image_proj.norm.bias"].fill_(0.0)
    tensors = {name: t.to(IP_ADAPTER_DTYPE) for name, t in tensors.items()}
    safetensors.torch.save_file(tensors, models / IP_ADAPTER_WEIGHT_NAME, metadata={"format": "pt"})
    make_readable(models)
    _release(size)


def write_depth_estimator(folder: Path, size: str = "tiny", seed: int = 0) -> None:
    """Depth Anything V2 (Small, or a tiny model of its shape) with its published preprocessor config."""
    model = random_model(_depth_estimator(size), DEPTH_DTYPE, seed)
    for name in ("neck", "head"):
        _he_initialize(getattr(model, name), part_seed(seed, name))
    model.save_pretrained(folder)
    write_json(folder / "preprocessor_config.json", DEPTH_PREPROCESSOR_CONFIG)
    make_readable(folder)
    del model
    _release(size)


def tensor_bytes(size: str) -> dict[str, int]:
    """The bytes of each model's tensors at `size`, built on the meta device (nothing allocated): the files written,
    less their headers. For "full", what baking the real models adds to the image."""
    models = {
        "controlnet": (_controlnet(size), CONTROLNET_DTYPE),
        "controlnet_union": (_controlnet_union(size), CONTROLNET_DTYPE),
        "image_encoder": (_image_encoder(size), IP_ADAPTER_DTYPE),
        "depth": (_depth_estimator(size), DEPTH_DTYPE),
    }
    sizes = {}
    for name, (build, dtype) in models.items():
        with torch.device("meta"):
            tensors = build().state_dict().values()
        sizes[name] = sum(t.numel() for t in tensors) * dtype.itemsize
    shapes = _ip_adapter_shapes(size).values()
    sizes["ip_adapter"] = sum(math.prod(shape) for shape in shapes) * IP_ADAPTER_DTYPE.itemsize
    return sizes


def ip_adapter_cross_attention_layers(unet_config: dict) -> dict[int, tuple[int, int]]:
    """The IP-Adapter key of each cross-attention layer of a UNet, and its (hidden size, cross-attention width).

    IP-Adapter numbers layers by their position among all of the UNet's attention processors (self- and
    cross-attention alternate in SDXL, so the keys are 1, 3, 5, ...); diffusers' loader counts the same way.
    """
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(unet_config)
    layers = {}
    for index, name in enumerate(unet.attn_processors):
        if name.endswith("attn2.processor"):
            attention = unet.get_submodule(name.removesuffix(".processor"))
            layers[index] = (attention.to_k.out_features, attention.to_k.in_features)
    return layers


def _ip_adapter_shapes(size: str) -> dict[str, tuple[int, ...]]:
    """Every tensor of ip-adapter_sdxl.safetensors: the image projection (to IP_ADAPTER_TOKENS tokens of the UNet's
    cross-attention width, layer-normed) and a key and a value projection of those tokens per cross-attention layer."""
    unet_config = sdxl_configs(size)["unet_base"]
    width, image_embed_dim = unet_config["cross_attention_dim"], _size(size).image_encoder["projection_dim"]
    shapes = {
        "image_proj.proj.weight": (IP_ADAPTER_TOKENS * width, image_embed_dim),
        "image_proj.proj.bias": (IP_ADAPTER_TOKENS * width,),
        "image_proj.norm.weight": (width,),
        "image_proj.norm.bias": (width,),
    }
    for key, (hidden, cross_width) in ip_adapter_cross_attention_layers(unet_config).items():
        shapes[f"ip_adapter.{key}.to_k_ip.weight"] = (hidden, cross_width)
        shapes[f"ip_adapter.{key}.to_v_ip.weight"] = (hidden, cross_width)
    return shapes


def _controlnet(size: str) -> Callable[[], nn.Module]:
    config = _from_unet_config(ControlNetModel, size)
    return lambda: ControlNetModel.from_config(config)


def _controlnet_union(size: str) -> Callable[[], nn.Module]:
    config = _from_unet_config(ControlNetUnionModel, size)
    width = config["block_out_channels"][0]  # the condition transformer mixes features of the first block's width
    config.update(
        num_control_type=UNION_CONTROL_TYPES,
        num_trans_channel=width,
        num_trans_head=_size(size).union_heads,
        num_trans_layer=1,
        num_proj_channel=width,
    )
    return lambda: ControlNetUnionModel.from_config(config)


def _image_encoder(size: str) -> Callable[[], nn.Module]:
    config = CLIPVisionConfig(**_size(size).image_encoder)
    return lambda: CLIPVisionModelWithProjection(config)


def _depth_estimator(size: str) -> Callable[[], nn.Module]:
    config = DepthAnythingConfig(**_size(size).depth)
    return lambda: DepthAnythingForDepthEstimation(config)


def _from_unet_config(cls: type[ControlNetModel] | type[ControlNetUnionModel], size: str) -> dict:
    """The config diffusers' from_unet derives from the synthetic base UNet of `size` (built on the meta device)."""
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(sdxl_configs(size)["unet_base"])
        model = cls.from_unet(
            unet,
            conditioning_embedding_out_channels=_size(size).conditioning_channels,
            load_weights_from_unet=False,
        )
    return {k: v for k, v in model.config.items() if not k.startswith("_")}


def _save_diffusers(folder: Path, build: Callable[[], nn.Module], size: str, seed: int) -> None:
    model = random_model(build, CONTROLNET_DTYPE, seed)
    _he_initialize(model.controlnet_cond_embedding, part_seed(seed, "controlnet_cond_embedding"))
    model.save_pretrained(folder, variant=CONTROLNET_VARIANT)
    make_readable(folder)
    del model
    _release(size)


def _release(size: str) -> None:
    if _size(size).collect_after_each:
        gc.collect()


def _he_initialize(module: nn.Module, seed: int) -> None:
    """He-initialize every convolution in `module` (standard deviation sqrt(2 / fan_in)), biases zero.

    At random_model's 0.02 standard deviation each small convolution shrinks a signal about tenfold, so an input read
    through a stack of them (a ControlNet's control image, a depth model's DPT neck and head) would not reach the
    output, and every input would give the same result. He initialization keeps the signal's scale through each
    convolution and its activation, so the input matters as it does with trained weights.
    """
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for conv in module.modules():
            if isinstance(conv, (nn.Conv2d, nn.ConvTranspose2d)):
                nn.init.kaiming_normal_(conv.weight, nonlinearity="relu", generator=generator)
                if conv.bias is not None:
                    conv.bias.zero_()


def _size(size: str) -> ControlSize:
    if size not in SIZES:
        raise ValueError(f"Unknown size {size!r}: choose one of {', '.join(SIZES)}.")
    return SIZES[size]


# The ControlNets add_control bakes by default: every kind, so that both halves of the serving rule are exercised.
ALL_CONTROLNETS = ("union", "canny", "depth")


def add_control(
    root: Path | str,
    controlnets: tuple[str, ...] = ALL_CONTROLNETS,
    ip_adapter: bool = True,
    depth_estimator: bool = True,
    size: str = "tiny",
    seed: int = 0,
) -> dict:
    """Bake control models of `size` (the base's) into weights made by synthetic.make_weights, under control/ as
    script/download-weights lays them out (layout.py), and rewrite the manifest with every file, their sources and
    its `control` section; returns the manifest. The IP-Adapter is h94's bigG layout (sdxl_models/image_encoder),
    recorded as download-weights --ip-adapter bigg records it. Each model's bytes are make_control_weights'."""
    root = Path(root)
    manifest = layout.read_manifest(root)
    (root / layout.MANIFEST_NAME).unlink()  # no manifest vouches for half-written files
    entries = [("controlnets", _add_controlnet(root, name, size, seed)) for name in controlnets]
    if ip_adapter:
        write_ip_adapter(root / layout.IP_ADAPTER_DIR, size, part_seed(seed, IP_ADAPTER_DIR))
        bigg = IP_ADAPTERS["bigg"]
        adapter = {"subfolder": IP_ADAPTER_SUBFOLDER, "weight_name": bigg.weight_name}
        entries.append(
            ("ip_adapter", adapter | {"dir": layout.IP_ADAPTER_DIR, "image_encoder_folder": bigg.image_encoder_folder})
        )
    if depth_estimator:
        write_depth_estimator(root / layout.DEPTH_ESTIMATOR_DIR, size, part_seed(seed, DEPTH_ESTIMATOR_DIR))
        entries.append(("depth_estimator", {"dir": layout.DEPTH_ESTIMATOR_DIR}))
    origin = f"synthetic {size} control weights, seed {seed} (devtools/synthetic_control.py)"
    entries = [(key, entry | {"source": origin}) for key, entry in entries]
    sources = manifest["sources"] | {entry["dir"]: origin for _, entry in entries}
    return layout.write_manifest(root, sources, models=manifest.get("models"), control=control_section(entries))


def _add_controlnet(root: Path, name: str, size: str, seed: int) -> dict:
    """Write the union or a single-type ControlNet `name`; its manifest entry, less its source."""
    folder = layout.controlnet_dir(name)
    kind = UNION if name == "union" else SINGLE
    write = write_controlnet_union if kind == UNION else write_controlnet
    write(root / folder, size, part_seed(seed, folder.rsplit("/", 1)[1]))
    config = json.loads((root / folder / "config.json").read_text())
    types = union_types(config["num_control_type"]) if kind == UNION else (name,)
    return {"name": name, "kind": kind, "dir": folder, "types": list(types)}
