"""Synthetic SDXL weights: the layout of `sdxl_cog.weights.layout`, filled with seeded random tensors.

Two sizes share one recipe (see SIZES):
  tiny  small SDXL-shaped models, a few MB, for the CPU test suite: every code path of the real
        pipelines runs (two text encoders, text_time conditioning, aesthetic score, VAE scale 8).
  full  the published SDXL 1.0 architecture (devtools/architecture/*.json) with random weights, the
        real file sizes: for load-time, memory and throughput measurements without Hugging Face.

The same size and seed give byte-identical files on the same machine and library versions.
"""

from __future__ import annotations

import gc
import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import diffusers
import safetensors.torch
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from torch import nn
from transformers import CLIPConfig, CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from sdxl_cog.weights.layout import (
    BASE_DIR,
    MANIFEST_NAME,
    REFINER_DIR,
    SAFETY_CHECKER_DIR,
    VAE_DIR,
    model_dir,
    read_manifest,
    write_manifest,
)

ARCHITECTURE_DIR = Path(__file__).parent / "architecture"

# Standard deviation of every random weight: the initializer_range of the CLIP and SDXL configs.
INIT_STD = 0.02

# CLIP's context length; prompts are encoded in chunks of this many tokens.
MAX_TOKENS = 77

# The safety checker flags an image when cosine(image, concept) - threshold > 0, where the score of
# the regular concepts gets +0.01 once a "special care" concept matched. A cosine lies in [-1, 1], so
# a threshold of 2 keeps every score below -0.99 (never flagged) and -2 keeps it above +1 (always).
NEVER_FLAG_THRESHOLD = 2.0
FLAG_EVERYTHING_THRESHOLD = -2.0
THRESHOLD_TENSORS = ("concept_embeds_weights", "special_care_embeds_weights")
FLAGS_EVERYTHING_NOTE = ", set to flag every image"

# Shrinks each published config to a few MB of weights or less while keeping its shape: the UNets keep
# their block types (3 blocks for the base, 4 for the refiner) and per-block transformer depths, the VAE
# its four blocks (scale factor 8). "attention_head_dim" is the number of heads in SDXL's configs.
# Cross-attention and added-embedding widths are derived from the text encoders (sdxl_conditioning).
TINY_OVERRIDES = {
    "text_encoder": {
        "vocab_size": 1000,
        "hidden_size": 32,
        "intermediate_size": 128,
        "projection_dim": 32,
        "num_hidden_layers": 3,
        "num_attention_heads": 4,
    },
    "text_encoder_2": {
        "vocab_size": 1000,
        "hidden_size": 64,
        "intermediate_size": 256,
        "projection_dim": 64,
        "num_hidden_layers": 3,
        "num_attention_heads": 4,
    },
    "unet_base": {
        "block_out_channels": [32, 64, 64],
        "layers_per_block": 1,
        "transformer_layers_per_block": [1, 1, 2],
        "attention_head_dim": [2, 4, 4],
        "addition_time_embed_dim": 8,
    },
    "unet_refiner": {
        "block_out_channels": [32, 64, 64, 64],
        "layers_per_block": 1,
        "transformer_layers_per_block": 1,
        "attention_head_dim": [2, 4, 4, 4],
        "addition_time_embed_dim": 8,
    },
    # Full-resolution convolutions dominate a CPU decode: 16 channels there (norm groups to match) make a
    # 256x256 decode about 3x faster than 32.
    "vae": {"block_out_channels": [16, 16, 32, 32], "norm_num_groups": 16, "layers_per_block": 1},
}

# Both sizes stand in for madebyollin/sdxl-vae-fp16-fix, which does not overflow in fp16.
VAE_FP16_FIX = {"force_upcast": False}

# CompVis/stable-diffusion-safety-checker is CLIP ViT-L/14 and runs only its vision tower; its text tower
# is the one SDXL's text_encoder is, so that config (tiny or full) fills the CLIPConfig's text half. The
# tiny one keeps the 224-pixel input, so the real preprocessor config serves both sizes, with 32-pixel
# patches (49 tokens) for speed.
FULL_CHECKER_VISION = {
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_hidden_layers": 24,
    "num_attention_heads": 16,
    "image_size": 224,
    "patch_size": 14,
    "hidden_act": "quick_gelu",
    "projection_dim": 768,
}
TINY_CHECKER_VISION = {
    **FULL_CHECKER_VISION,
    "hidden_size": 32,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "patch_size": 32,
    "projection_dim": 16,
}

# CLIPImageProcessor settings of the real safety checker repo (OpenAI CLIP's normalization).
PREPROCESSOR_CONFIG = {
    "image_processor_type": "CLIPImageProcessor",
    "do_resize": True,
    "size": {"shortest_edge": 224},
    "resample": 3,  # PIL bicubic
    "do_center_crop": True,
    "crop_size": {"height": 224, "width": 224},
    "do_rescale": True,
    "rescale_factor": 1 / 255,
    "do_normalize": True,
    "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_std": [0.26862954, 0.26130258, 0.27577711],
    "do_convert_rgb": True,
}


@dataclass(frozen=True)
class Size:
    overrides: dict[str, dict]  # per architecture config name
    checker_vision: dict  # the safety checker's CLIPVisionConfig


SIZES = {
    "tiny": Size(TINY_OVERRIDES, TINY_CHECKER_VISION),
    "full": Size({}, FULL_CHECKER_VISION),
}


@dataclass(frozen=True)
class Part:
    path: str  # relative to the weights root
    config: str  # key in the dict of configs (architecture file names, plus "safety_checker")
    build: Callable[[dict], nn.Module]


def _text_encoder(config: dict) -> nn.Module:
    return CLIPTextModel(CLIPTextConfig.from_dict(config))


def _text_encoder_2(config: dict) -> nn.Module:
    return CLIPTextModelWithProjection(CLIPTextConfig.from_dict(config))


def _safety_checker(config: dict) -> nn.Module:
    return StableDiffusionSafetyChecker(CLIPConfig(**config))


# What is written, one model in memory at a time: fp16 variant files, as script/download-weights writes
# them (sdxl_cog/weights/layout.py).
WEIGHTS_DTYPE, WEIGHTS_VARIANT = torch.float16, "fp16"
PARTS = (
    Part(f"{BASE_DIR}/text_encoder", "text_encoder", _text_encoder),
    Part(f"{BASE_DIR}/text_encoder_2", "text_encoder_2", _text_encoder_2),
    Part(f"{BASE_DIR}/unet", "unet_base", UNet2DConditionModel.from_config),
    Part(f"{REFINER_DIR}/unet", "unet_refiner", UNet2DConditionModel.from_config),
    Part(VAE_DIR, "vae", AutoencoderKL.from_config),
    Part(SAFETY_CHECKER_DIR, "safety_checker", _safety_checker),
)

# model_index.json of stabilityai/stable-diffusion-xl-{base,refiner}-1.0. The refiner has no first text
# encoder; neither repo's VAE is used (setup() passes the fp16-fix VAE from vae/).
BASE_MODEL_INDEX = {
    "_class_name": "StableDiffusionXLPipeline",
    "force_zeros_for_empty_prompt": True,
    "add_watermarker": None,
    "scheduler": ["diffusers", "EulerDiscreteScheduler"],
    "text_encoder": ["transformers", "CLIPTextModel"],
    "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "tokenizer_2": ["transformers", "CLIPTokenizer"],
    "unet": ["diffusers", "UNet2DConditionModel"],
    "vae": ["diffusers", "AutoencoderKL"],
}
REFINER_MODEL_INDEX = {
    **BASE_MODEL_INDEX,
    "_class_name": "StableDiffusionXLImg2ImgPipeline",
    "force_zeros_for_empty_prompt": False,
    "requires_aesthetics_score": True,
    "text_encoder": [None, None],
    "tokenizer": [None, None],
}

# Tokenizer directory -> (text encoder config it feeds, padding token). SDXL's tokenizer_2 pads with
# "!" (id 0) instead of <|endoftext|>; pooling still finds the end token, the highest id (see _vocab).
TOKENIZERS = {
    f"{BASE_DIR}/tokenizer": ("text_encoder", "<|endoftext|>"),
    f"{BASE_DIR}/tokenizer_2": ("text_encoder_2", "!"),
}
BOS, EOS = "<|startoftext|>", "<|endoftext|>"

READABLE = 0o644  # rw-r--r--, as Hugging Face downloads are


def make_weights(root: Path | str, size: str = "tiny", seed: int = 0) -> dict:
    """Write synthetic SDXL weights under `root` and their manifest; returns the manifest."""
    configs = sdxl_configs(size)
    root = Path(root)
    # 1. An interrupted run must not leave a manifest that vouches for half-written files.
    root.mkdir(parents=True, exist_ok=True)
    (root / MANIFEST_NAME).unlink(missing_ok=True)
    # 2. Pipeline files and tokenizers.
    _write_pipeline_files(root)
    for directory, (encoder, pad_token) in TOKENIZERS.items():
        write_tokenizer(root / directory, configs[encoder]["vocab_size"], pad_token)
    write_json(root / SAFETY_CHECKER_DIR / "preprocessor_config.json", PREPROCESSOR_CONFIG)
    # 3. The models, one at a time (a full-size UNet alone is 5 GB).
    for part in PARTS:
        _write_part(root, part, configs[part.config], part_seed(seed, part.path))
    # 4. The manifest.
    origin = f"synthetic {size} weights, seed {seed} (devtools/synthetic.py)"
    return write_manifest(root, sources={d: origin for d in (BASE_DIR, REFINER_DIR, VAE_DIR, SAFETY_CHECKER_DIR)})


# An extra checkpoint always has its own UNet; these parts are copied from base/ as hard links (one copy on
# disk, and loaded once: models.load_checkpoints) unless the checkpoint is asked to have its own.
SHARED_WITH_BASE = ("tokenizer", "tokenizer_2", "text_encoder", "text_encoder_2")
DEFAULT_BASE_NAME = "sdxl-base"
# A tiny checkpoint that serves with SDXL-Turbo's defaults (sdxl_cog/weights/profiles.py).
TURBO_PROFILE = {"preset": "turbo"}


def add_model(
    root: Path | str,
    name: str,
    seed: int,
    own: tuple[str, ...] = (),
    profile: dict | None = None,
    base_name: str = DEFAULT_BASE_NAME,
) -> dict:
    """Bake one more synthetic checkpoint into weights made by make_weights: models/NAME, laid out like base/,
    with a UNet from `seed` and, for each part in `own`, its own random weights instead of base/'s.
    The first call names base/ `base_name` in the manifest's models list. Returns the manifest."""
    root = Path(root)
    manifest = read_manifest(root)
    size = manifest["sources"][BASE_DIR].split()[1]  # "synthetic SIZE weights, seed N (...)"
    configs = sdxl_configs(size)
    folder = model_dir(name)
    (root / MANIFEST_NAME).unlink()
    for item in ("model_index.json", "scheduler"):
        _link_tree(root / BASE_DIR / item, root / folder / item)
    for part in SHARED_WITH_BASE:
        if part not in own:
            _link_tree(root / BASE_DIR / part, root / folder / part)
    parts = {p.config: p for p in PARTS}
    for part, config in (("text_encoder", "text_encoder"), ("text_encoder_2", "text_encoder_2"), ("unet", "unet_base")):
        if part == "unet" or part in own:
            built = Part(f"{folder}/{part}", config, parts[config].build)
            _write_part(root, built, configs[config], part_seed(seed, built.path))
    models = manifest.get("models") or [{"name": base_name, "dir": BASE_DIR, "source": manifest["sources"][BASE_DIR]}]
    entry = {
        "name": name,
        "dir": folder,
        "source": f"synthetic {size} weights, seed {seed} (devtools/synthetic.py)",
    }
    if profile:
        entry["profile"] = profile
    return write_manifest(root, manifest["sources"], models=[*models, entry], control=manifest.get("control"))


def _link_tree(source: Path, target: Path) -> None:
    """Hard-link a file or a folder's files: the bytes stay on disk once."""
    if source.is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        target.unlink(missing_ok=True)
        os.link(source, target)
        return
    for path in source.rglob("*"):
        if path.is_file():
            _link_tree(path, target / path.relative_to(source))


def set_safety_checker_flags_everything(root: Path | str) -> None:
    """Make the safety checker under `root` flag every image (tests of the black-image path)."""
    root = Path(root)
    path = root / SAFETY_CHECKER_DIR / "model.fp16.safetensors"
    tensors = safetensors.torch.load_file(path)
    for name in THRESHOLD_TENSORS:
        tensors[name] = torch.full_like(tensors[name], FLAG_EVERYTHING_THRESHOLD)
    safetensors.torch.save_file(tensors, path, metadata={"format": "pt"})
    make_readable(path.parent)
    manifest = read_manifest(root)
    sources = manifest["sources"]
    if not sources[SAFETY_CHECKER_DIR].endswith(FLAGS_EVERYTHING_NOTE):
        sources[SAFETY_CHECKER_DIR] += FLAGS_EVERYTHING_NOTE
    write_manifest(root, sources, models=manifest.get("models"))


def architecture(name: str) -> dict:
    """One of the published SDXL configs in devtools/architecture/."""
    return json.loads((ARCHITECTURE_DIR / f"{name}.json").read_text())


def sdxl_configs(size: str) -> dict[str, dict]:
    """The config of every part: the published ones with the size's overrides, SDXL conditioning derived."""
    if size not in SIZES:
        raise ValueError(f"Unknown size {size!r}: choose one of {', '.join(SIZES)}.")
    spec = SIZES[size]
    names = ("text_encoder", "text_encoder_2", "unet_base", "unet_refiner", "vae")
    configs = {name: {**architecture(name), **spec.overrides.get(name, {})} for name in names}
    configs["vae"].update(VAE_FP16_FIX)
    sdxl_conditioning(configs)
    configs["safety_checker"] = {
        "projection_dim": spec.checker_vision["projection_dim"],
        "vision_config": spec.checker_vision,
        "text_config": configs["text_encoder"],
    }
    return configs


def sdxl_conditioning(configs: dict[str, dict]) -> None:
    """Set the UNets' input widths from the text encoders, as SDXL wires them.

    The base cross-attends to both encoders' penultimate hidden states, concatenated; its added embedding
    gets the pooled text_encoder_2 projection and 6 micro-conditioning numbers (original size, crop
    offset, target size). The refiner sees text_encoder_2 only and 5 numbers (the target size is
    replaced by the aesthetic score). For the published configs this reproduces 2048/2816 and 1280/2560.
    """
    te1, te2 = configs["text_encoder"], configs["text_encoder_2"]
    base, refiner = configs["unet_base"], configs["unet_refiner"]
    base["cross_attention_dim"] = te1["hidden_size"] + te2["hidden_size"]
    base["projection_class_embeddings_input_dim"] = 6 * base["addition_time_embed_dim"] + te2["projection_dim"]
    refiner["cross_attention_dim"] = te2["hidden_size"]
    refiner["projection_class_embeddings_input_dim"] = 5 * refiner["addition_time_embed_dim"] + te2["projection_dim"]


def _write_pipeline_files(root: Path) -> None:
    version = {"_diffusers_version": diffusers.__version__}
    write_json(root / BASE_DIR / "model_index.json", {**BASE_MODEL_INDEX, **version})
    write_json(root / REFINER_DIR / "model_index.json", {**REFINER_MODEL_INDEX, **version})
    # As published, with the keys only other samplers read (clip_sample, set_alpha_to_one, skip_prk_steps,
    # sample_max_value): saved through EulerDiscreteScheduler they were dropped, and DDIM then clipped its
    # predictions to [-1, 1] and ended at alpha 1, which it does not on the real weights.
    scheduler = {"_class_name": "EulerDiscreteScheduler", **version, **architecture("scheduler")}
    for pipeline in (BASE_DIR, REFINER_DIR):
        write_json(root / pipeline / "scheduler" / "scheduler_config.json", scheduler)


def _write_part(root: Path, part: Part, config: dict, seed: int) -> None:
    model = random_model(lambda: part.build(config), WEIGHTS_DTYPE, seed)
    if part.config == "safety_checker":
        set_thresholds(model, NEVER_FLAG_THRESHOLD)
    model.save_pretrained(root / part.path, variant=WEIGHTS_VARIANT)
    make_readable(root / part.path)
    del model
    gc.collect()  # return the memory before the next (possibly 5 GB) model is built


def random_model(build: Callable[[], nn.Module], dtype: torch.dtype, seed: int, device: str = "cpu") -> nn.Module:
    """Build a model without initializing it (meta device), then fill it with seeded random weights on `device`
    (on a GPU a full-size UNet takes well under a second)."""
    with torch.device("meta"):
        model = build()
    # nn.Module's own cast: diffusers' override warns about float32-only modules even when there are none.
    model = nn.Module.to(model, dtype=dtype).to_empty(device=device)
    generator = torch.Generator(device).manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            _fill_module(module, generator)
            _reset_position_ids(module)
    return model.eval()


def _fill_module(module: nn.Module, generator: torch.Generator) -> None:
    if isinstance(module, (nn.LayerNorm, nn.GroupNorm)):
        # Unit scale and zero shift, as norms are initialized: a 0.02 scale would shrink every normalized
        # activation 50-fold and leave the output image flat.
        for name, value in (("weight", 1.0), ("bias", 0.0)):
            if getattr(module, name, None) is not None:
                getattr(module, name).fill_(value)
        return
    for param in module.parameters(recurse=False):
        param.normal_(0.0, INIT_STD, generator=generator)


def _reset_position_ids(module: nn.Module) -> None:
    """CLIP's text and vision embeddings look positions up through a non-persistent buffer, which
    to_empty left uninitialized. It is not saved, but the model may be used before it is reloaded."""
    ids = getattr(module, "position_ids", None)
    if isinstance(ids, torch.Tensor):
        ids.copy_(torch.arange(ids.shape[-1]).expand_as(ids))


def set_thresholds(checker: nn.Module, threshold: float) -> None:
    with torch.no_grad():
        for name in THRESHOLD_TENSORS:
            getattr(checker, name).fill_(threshold)


def part_seed(seed: int, path: str) -> int:
    """A seed per part, so that changing one part's shape leaves the others' weights unchanged."""
    return int.from_bytes(hashlib.sha256(f"{seed}/{path}".encode()).digest()[:8], "little")


def write_tokenizer(directory: Path, vocab_size: int, pad_token: str) -> None:
    """A CLIPTokenizer with a synthetic byte-level vocabulary (the real 49408-token BPE is not offline).

    No merges: every character is one token, so prompts run longer in tokens than with the real
    vocabulary, which exercises the 77-token chunking early.
    """
    special = {"bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": pad_token}
    write_json(directory / "vocab.json", _vocab(vocab_size), ensure_ascii=False)
    (directory / "merges.txt").write_text("#version: 0.2\n")  # the header line only
    write_json(directory / "special_tokens_map.json", special)
    write_json(
        directory / "tokenizer_config.json",
        {
            **special,
            "tokenizer_class": "CLIPTokenizer",
            "model_max_length": MAX_TOKENS,
            "do_lower_case": True,
            "errors": "replace",
            "add_prefix_space": False,
            # The real repos say true; transformers 5 ignores that for BPE and warns on every decode.
            "clean_up_tokenization_spaces": False,
        },
    )


def merge_words(directory: Path, words: list[str]) -> None:
    """Make each of `words` one token for the tokenizer in `directory`: BPE merges that join its characters, and
    vocabulary entries for the pieces in place of filler ids. The files are replaced, not written through, so a
    tokenizer hard-linked from another checkpoint is left as it was."""
    vocab = json.loads((directory / "vocab.json").read_text(encoding="utf-8"))
    fillers = sorted((i, t) for t, i in vocab.items() if t.startswith("<|filler_"))
    merges = []
    for word in words:
        piece = word[0]
        for i, character in enumerate(word[1:], start=2):
            joined = piece + character + ("</w>" if i == len(word) else "")
            merges.append(f"{piece} {character}{'</w>' if i == len(word) else ''}")
            if joined not in vocab:
                index, filler = fillers.pop(0)
                del vocab[filler]
                vocab[joined] = index
            piece = joined
    for name in ("vocab.json", "merges.txt"):
        (directory / name).unlink()
    write_json(directory / "vocab.json", vocab, ensure_ascii=False)
    (directory / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{m}\n" for m in merges))


def _vocab(vocab_size: int) -> dict[str, int]:
    """CLIP's id order: 256 byte characters, the same ending a word ("</w>"), filler, then BOS and EOS.

    EOS must be the highest id: text encoders whose config has eos_token_id=2 (all SDXL ones) pool at
    argmax(input_ids), as with real CLIP's 49406/49407.
    """
    characters = list(_bytes_to_unicode().values())
    tokens = characters + [c + "</w>" for c in characters]
    filler = vocab_size - len(tokens) - 2
    if filler < 0:
        raise ValueError(f"vocab_size {vocab_size} is too small for a byte-level vocabulary ({len(tokens) + 2})")
    tokens += [f"<|filler_{i}|>" for i in range(filler)] + [BOS, EOS]
    return {token: i for i, token in enumerate(tokens)}


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible map from bytes to printable characters (printable bytes map to themselves)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    mapping = {b: chr(b) for b in printable}
    mapping.update({b: chr(256 + i) for i, b in enumerate(others)})
    return mapping


def make_readable(directory: Path) -> None:
    """safetensors creates files readable by their owner only; the image may run as another user."""
    for path in directory.iterdir():
        if path.is_file():
            path.chmod(READABLE)


def write_json(path: Path, data: dict, ensure_ascii: bool = True) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, ensure_ascii=ensure_ascii) + "\n", encoding="utf-8")


# A LoRA for the tiny UNet: the attention projections PEFT's SDXL LoRAs target, at a small rank.
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
LORA_RANK = 4


def lora_state_dict(weights_dir: Path) -> dict[str, torch.Tensor]:
    """PEFT-format LoRA weights for the base UNet under `weights_dir`, random (seed 0) and scaled up so that
    they visibly change the output. Saved with a `unet.` prefix on each key, it is a diffusers LoRA file."""
    unet = UNet2DConditionModel.from_pretrained(weights_dir / BASE_DIR / "unet", variant="fp16", dtype=torch.float32)
    torch.manual_seed(0)
    config = LoraConfig(r=LORA_RANK, lora_alpha=LORA_RANK, init_lora_weights=False, target_modules=LORA_TARGETS)
    unet.add_adapter(config)
    return {k: v.contiguous() * 4 for k, v in get_peft_model_state_dict(unet).items()}
