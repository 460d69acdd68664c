"""What fills each folder of the layout (layout.py), and which files of a source repo make each of its files.

A part lists small files copied as they are (configs, tokenizers), weight files, which are built from another
form (full precision, shards, a pickle) when the repo lacks them as named, and, for releases that use other names
than their loaders read, files stored under another name or cast to fp16 under their own. Pure: no network, no disk.
"""

from __future__ import annotations

import fnmatch
import posixpath
import re
from dataclasses import dataclass

from sdxl_cog.weights.layout import BASE_DIR, REFINER_DIR, SAFETY_CHECKER_DIR, VAE_DIR
from sdxl_cog.weights.sources import DownloadError


@dataclass(frozen=True)
class Part:
    """One folder of the layout and what fills it: small files copied as they are, and weight files."""

    folder: str
    repo: str  # the default source
    files: tuple[str, ...]  # glob patterns, relative to the repo root and to the folder alike
    weights: tuple[str, ...]  # exact names; built from another form when the repo lacks them
    # (layout file, repo file): files a release publishes under names its loader does not read.
    renamed: tuple[tuple[str, str], ...] = ()
    # Weights (among `weights`) cast to fp16 under their own name, since their loader reads no variant.
    cast: tuple[str, ...] = ()

    def fp16(self, target: str) -> bool:
        """Whether the layout file `target` holds fp16 weights: an fp16 variant, or cast under its own name."""
        return ".fp16." in posixpath.basename(target) or target in self.cast


PARTS = {
    BASE_DIR: Part(
        BASE_DIR,
        "stabilityai/stable-diffusion-xl-base-1.0",
        # No vae/: the fp16-fix VAE replaces it. The tokenizer folders hold vocab, merges and the
        # tokenizer_config/special_tokens_map that set max length 77 and tokenizer_2's "!" padding.
        (
            "model_index.json",
            "scheduler/scheduler_config.json",
            "tokenizer/*",
            "tokenizer_2/*",
            "text_encoder/config.json",
            "text_encoder_2/config.json",
            "unet/config.json",
        ),
        (
            "text_encoder/model.fp16.safetensors",
            "text_encoder_2/model.fp16.safetensors",
            "unet/diffusion_pytorch_model.fp16.safetensors",
        ),
    ),
    # The refiner borrows the base's text_encoder_2, tokenizer_2 and the VAE, so only its UNet is fetched.
    REFINER_DIR: Part(
        REFINER_DIR,
        "stabilityai/stable-diffusion-xl-refiner-1.0",
        ("model_index.json", "scheduler/scheduler_config.json", "unet/config.json"),
        ("unet/diffusion_pytorch_model.fp16.safetensors",),
    ),
    # These two repos ship fp32 only; their weights are cast to the fp16 variant setup() loads. The safety
    # checker's main branch has only pytorch_model.bin, so that is what gets converted.
    VAE_DIR: Part(
        VAE_DIR, "madebyollin/sdxl-vae-fp16-fix", ("config.json",), ("diffusion_pytorch_model.fp16.safetensors",)
    ),
    SAFETY_CHECKER_DIR: Part(
        SAFETY_CHECKER_DIR,
        "CompVis/stable-diffusion-safety-checker",
        ("config.json", "preprocessor_config.json"),
        ("model.fp16.safetensors",),
    ),
}

# Repo files a weight file can be built from, best first, as regexes over names in its folder; {v} is
# ".fp16" for variant targets. Casting to fp16 happens only for variant targets and a part's `cast` ones.
SOURCE_NAMES = (
    r"{stem}{v}\.safetensors",  # the file itself
    r"{stem}{v}-\d+-of-\d+\.safetensors",  # the same, sharded
    r"{stem}\.safetensors",  # full precision
    r"{stem}-\d+-of-\d+\.safetensors",
    r"{pickle}\.bin",  # no safetensors at all: a pickle, read with weights_only=True (no code runs)
)
PICKLE_STEMS = {"model": "pytorch_model"}  # transformers' legacy name; diffusers kept its stem


# --- Which repo files make each layout file --------------------------------------------------------


def plan_files(part: Part, listing: frozenset[str], label: str) -> dict[str, tuple[str, ...]]:
    """Map each file the part needs (relative to its folder) to the repo files it is made from."""
    plan = {}
    for pattern in part.files:
        matches = fnmatch.filter(listing, pattern)
        if not matches:
            raise DownloadError(f"{label} has no {pattern}; is it an SDXL-architecture diffusers repo?")
        plan.update({name: (name,) for name in matches})
    for target, name in part.renamed:
        if name not in listing:
            raise DownloadError(f"{label} has no {name} (stored here as {target}).")
        plan[target] = (name,)
    return plan | {target: weight_sources(target, listing, label) for target in part.weights}


def made_as_is(part: Part, target: str, sources: tuple[str, ...]) -> bool:
    """Whether the repo file is the layout file, byte for byte: fetched straight into the folder."""
    return sources == (target,) and target not in part.cast


def weight_sources(target: str, listing: frozenset[str], label: str) -> tuple[str, ...]:
    folder, name = posixpath.split(target)
    stem, variant = name.split(".")[0], ".fp16" if ".fp16." in name else ""
    in_folder = {posixpath.basename(f): f for f in listing if posixpath.dirname(f) == folder}
    for pattern in SOURCE_NAMES:
        regex = re.compile(pattern.format(stem=stem, v=re.escape(variant), pickle=PICKLE_STEMS.get(stem, stem)))
        if found := sorted(path for base, path in in_folder.items() if regex.fullmatch(base)):
            return tuple(found)
    raise DownloadError(f"{label} has no weights for {target} (no safetensors or .bin in {folder or 'its root'}/).")
