"""Single-file SDXL checkpoints in the original Stability layout, written from diffusers-format weights.

Most SDXL fine-tunes ship as one `.safetensors` file with the key names of Stability's own code
(generative-models, "sgm"), which diffusers' from_single_file converts back. This writes such a file from
weights in the layout (synthetic ones, see synthetic.py), so that tests can run that real conversion and
compare what comes back with what went in:

    model.diffusion_model.*                           the UNet (sgm's openaimodel.UNetModel)
    conditioner.embedders.0.transformer.text_model.*  text_encoder, a Hugging Face CLIPTextModel
    conditioner.embedders.1.model.*                   text_encoder_2, an OpenCLIP text tower
    first_stage_model.*                               the VAE (sgm's AutoencoderKL)

The renames are written from those models' own module names (the reverse of what diffusers'
loaders/single_file_utils.py reads), not taken from diffusers, so that a conversion mistake on either
side shows up as a difference.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path

import safetensors.torch
import torch

from sdxl_cog.weights.layout import BASE_DIR, VAE_DIR

# ResNet blocks. sgm's ResBlock runs in_layers = [GroupNorm, SiLU, conv], emb_layers = [SiLU, Linear] and
# out_layers = [GroupNorm, SiLU, Dropout, conv]: the numbers are positions in those sequences.
UNET_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
# Modules outside the blocks. time_embed and label_emb (the added text_time embedding) are
# [Linear, SiLU, Linear] sequences; `out` is [GroupNorm, SiLU, conv]; input_blocks.0 is conv_in.
UNET_OUTER = {
    "conv_in": "input_blocks.0.0",
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}
# OpenCLIP's text transformer (text_encoder_2): its layers are `resblocks`, and its attention is PyTorch's
# nn.MultiheadAttention, which keeps q, k and v in one packed in_proj matrix.
OPEN_CLIP_OUTER = {
    "text_model.embeddings.token_embedding.weight": "token_embedding.weight",
    "text_model.embeddings.position_embedding.weight": "positional_embedding",
    "text_model.final_layer_norm.weight": "ln_final.weight",
    "text_model.final_layer_norm.bias": "ln_final.bias",
}
OPEN_CLIP_LAYER = {
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
    "self_attn.out_proj": "attn.out_proj",
}
PACKED_QKV = ("q_proj", "k_proj", "v_proj")  # in_proj's row order
# OpenCLIP's learned temperature for image-text similarity: the SDXL checkpoints carry it, nothing uses it.
OPEN_CLIP_LOGIT_SCALE = 4.6052  # ln(100), CLIP's trained value
# The VAE (sgm's Encoder/Decoder): ResNet blocks are `block`, the mid-block's are block_1 and block_2 around
# attn_1, whose q/k/v/proj_out are 1x1 convolutions.
VAE_RESNET = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2", "conv_shortcut": "nin_shortcut"}
VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
VAE_OUTER = {"encoder.conv_norm_out": "encoder.norm_out", "decoder.conv_norm_out": "decoder.norm_out"}

UNET_PREFIX = "model.diffusion_model."
CLIP_PREFIX = "conditioner.embedders.0.transformer.text_model."
OPEN_CLIP_PREFIX = "conditioner.embedders.1.model."
VAE_PREFIX = "first_stage_model."

Tensors = dict[str, torch.Tensor]


def unet_to_original(tensors: Tensors, config: dict) -> Tensors:
    """The UNet's keys as sgm names them. Each down level is `layers_per_block` input blocks of
    [resnet, attention] plus one holding the downsampler (`op`); each up level has one block more, the last
    also holding the upsampler after its attention (if any); the mid-block is [resnet, attention, resnet]."""
    per_level = config["layers_per_block"] + 1
    last = per_level - 1
    has_attention = ["CrossAttn" in kind for kind in config["up_block_types"]]

    def down(level: str, layer: str | int) -> str:
        return f"input_blocks.{1 + int(level) * per_level + int(layer)}"  # input_blocks.0 is conv_in

    def up(level: str, layer: str | int) -> str:
        return f"output_blocks.{int(level) * per_level + int(layer)}"

    rules: list[tuple[str, Callable[..., str]]] = [
        (r"down_blocks\.(\d+)\.resnets\.(\d+)\.(\w+)\.(.+)", lambda b, j, m, p: f"{down(b, j)}.0.{UNET_RESNET[m]}.{p}"),
        (r"down_blocks\.(\d+)\.attentions\.(\d+)\.(.+)", lambda b, j, rest: f"{down(b, j)}.1.{rest}"),
        (r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", lambda b, p: f"{down(b, last)}.0.op.{p}"),
        (r"mid_block\.resnets\.(\d+)\.(\w+)\.(.+)", lambda j, m, p: f"middle_block.{2 * int(j)}.{UNET_RESNET[m]}.{p}"),
        (r"mid_block\.attentions\.0\.(.+)", lambda rest: f"middle_block.1.{rest}"),
        (r"up_blocks\.(\d+)\.resnets\.(\d+)\.(\w+)\.(.+)", lambda b, j, m, p: f"{up(b, j)}.0.{UNET_RESNET[m]}.{p}"),
        (r"up_blocks\.(\d+)\.attentions\.(\d+)\.(.+)", lambda b, j, rest: f"{up(b, j)}.1.{rest}"),
        (
            r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)",
            lambda b, p: f"{up(b, last)}.{1 + has_attention[int(b)]}.conv.{p}",
        ),
        (r"(\w+(?:\.linear_\d)?)\.(weight|bias)", lambda m, p: f"{UNET_OUTER[m]}.{p}"),
    ]
    return {UNET_PREFIX + _rename(key, rules): value for key, value in tensors.items()}


def clip_to_original(tensors: Tensors) -> Tensors:
    """text_encoder: sgm wraps the Hugging Face model itself, so only the prefix changes (transformers 5
    saves CLIPTextModel without its `text_model.` level, older versions with it). The checkpoints also hold
    the position ids, a buffer that the transformers of their day saved and today's no longer has."""
    original = {key.removeprefix("text_model."): value for key, value in tensors.items()}
    positions = original["embeddings.position_embedding.weight"].shape[0]
    original["embeddings.position_ids"] = torch.arange(positions).unsqueeze(0)
    return {CLIP_PREFIX + key: value for key, value in original.items()}


def open_clip_to_original(tensors: Tensors) -> Tensors:
    """text_encoder_2 in OpenCLIP's names: q/k/v packed, the projection a matrix applied as x @ P (a
    Linear's weight transposed), and OpenCLIP's logit scale, which the checkpoints carry."""
    projection = tensors["text_projection.weight"]
    original = {"logit_scale": torch.tensor(OPEN_CLIP_LOGIT_SCALE, dtype=projection.dtype)}
    original["text_projection"] = projection.T.contiguous()
    original |= {name: tensors[key] for key, name in OPEN_CLIP_OUTER.items()}
    layer = re.compile(r"text_model\.encoder\.layers\.(\d+)\.(self_attn\.[qkv]_proj|.+)\.(weight|bias)")
    for key in tensors.keys() - OPEN_CLIP_OUTER.keys() - {"text_projection.weight"}:
        if not (match := layer.fullmatch(key)):
            raise ValueError(f"No OpenCLIP name for {key}")
        index, module, param = match.groups()
        if module.removeprefix("self_attn.") in PACKED_QKV:
            packed = [tensors[f"text_model.encoder.layers.{index}.self_attn.{name}.{param}"] for name in PACKED_QKV]
            original[f"transformer.resblocks.{index}.attn.in_proj_{param}"] = torch.cat(packed)
        else:
            original[f"transformer.resblocks.{index}.{OPEN_CLIP_LAYER[module]}.{param}"] = tensors[key]
    return {OPEN_CLIP_PREFIX + key: value for key, value in original.items()}


def vae_to_original(tensors: Tensors, config: dict) -> Tensors:
    """The VAE in sgm's names; its attention's linear layers become the 1x1 convolutions they were."""
    top = len(config["up_block_types"]) - 1  # the decoder numbers its up levels from the bottom
    rules: list[tuple[str, Callable[..., str]]] = [
        (
            r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(\w+)\.(.+)",
            lambda i, j, m, p: f"encoder.down.{i}.block.{j}.{VAE_RESNET[m]}.{p}",
        ),
        (
            r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)",
            lambda i, p: f"encoder.down.{i}.downsample.conv.{p}",
        ),
        (
            r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(\w+)\.(.+)",
            lambda i, j, m, p: f"decoder.up.{top - int(i)}.block.{j}.{VAE_RESNET[m]}.{p}",
        ),
        (
            r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)",
            lambda i, p: f"decoder.up.{top - int(i)}.upsample.conv.{p}",
        ),
        (
            r"(\w+)\.mid_block\.resnets\.(\d+)\.(\w+)\.(.+)",
            lambda c, j, m, p: f"{c}.mid.block_{int(j) + 1}.{VAE_RESNET[m]}.{p}",
        ),
        (
            r"(\w+)\.mid_block\.attentions\.0\.(.+)\.(weight|bias)",
            lambda c, m, p: f"{c}.mid.attn_1.{VAE_ATTENTION[m]}.{p}",
        ),
        (r"(\w+\.conv_norm_out)\.(.+)", lambda m, p: f"{VAE_OUTER[m]}.{p}"),
        (r"(.+)", lambda key: key),  # conv_in, conv_out, quant_conv and post_quant_conv keep their names
    ]
    original = {}
    for key, value in tensors.items():
        name = _rename(key, rules)
        is_attention_linear = ".mid.attn_1." in name and value.ndim == 2
        original[VAE_PREFIX + name] = value[:, :, None, None] if is_attention_linear else value
    return original


def _rename(key: str, rules: list[tuple[str, Callable[..., str]]]) -> str:
    for pattern, build in rules:
        if match := re.fullmatch(pattern, key):
            return build(*match.groups())
    raise ValueError(f"No original-layout name for {key}")


# Each part of a single-file checkpoint: its folder in the layout, and how its keys become the original ones.
PARTS: dict[str, tuple[str, Callable[[Tensors, dict], Tensors]]] = {
    "unet": (f"{BASE_DIR}/unet", unet_to_original),
    "text_encoder": (f"{BASE_DIR}/text_encoder", lambda tensors, config: clip_to_original(tensors)),
    "text_encoder_2": (f"{BASE_DIR}/text_encoder_2", lambda tensors, config: open_clip_to_original(tensors)),
    "vae": (VAE_DIR, vae_to_original),
}


def write_single_file(weights_root: Path | str, target: Path | str, parts: tuple[str, ...] = tuple(PARTS)) -> Path:
    """Write `parts` of the SDXL weights under `weights_root` (the layout, fp16 variant files) into one
    original-layout checkpoint at `target`; returns `target`."""
    weights_root, target = Path(weights_root), Path(target)
    checkpoint: Tensors = {}
    for part in parts:
        folder, to_original = PARTS[part]
        (weights_file,) = (weights_root / folder).glob("*.fp16.safetensors")
        config = json.loads((weights_root / folder / "config.json").read_text())
        checkpoint |= to_original(safetensors.torch.load_file(weights_file), config)
    target.parent.mkdir(parents=True, exist_ok=True)
    safetensors.torch.save_file({k: v.contiguous() for k, v in checkpoint.items()}, target)
    return target
