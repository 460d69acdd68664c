"""Build the layout's safetensors weight files from weights a source ships in another form.

Two conversions: `convert_weights` merges full-precision, sharded or pickled (`.bin`) weight files into
the one safetensors file a component loads; `convert_single_file` splits a single-file SDXL checkpoint
into the base's components with diffusers' from_single_file.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from diffusers import StableDiffusionXLPipeline
from diffusers.loaders.single_file_utils import SingleFileComponentError
from safetensors import safe_open
from safetensors.torch import save_file

from sdxl_cog.weights.atomic import atomic_target
from sdxl_cog.weights.sources import DownloadError

logger = logging.getLogger(__name__)

# setup() expects one file per component, so nothing is sharded (the largest, the base UNet, is 5.1 GB).
NO_SHARDING = "100GB"
# The key prefix of each component converted from a single-file checkpoint (Stability's layout, which
# from_single_file reads). Named when a checkpoint lacks one, as diffusers' own error names the wrong part
# (without text_encoder_2 it reports text_encoder's weights missing) or none (without a UNet, a bare KeyError).
SINGLE_FILE_PREFIXES = {
    "unet": "model.diffusion_model.",
    "text_encoder": "conditioner.embedders.0.transformer.",
    "text_encoder_2": "conditioner.embedders.1.model.",
}


def _read_safetensors(path: Path):
    with safe_open(path, framework="pt") as f:
        for key in f.keys():
            yield key, f.get_tensor(key)


def _read_pickle(path: Path):
    # weights_only refuses anything but tensors and plain containers; mmap avoids a second copy in RAM.
    yield from torch.load(path, map_location="cpu", weights_only=True, mmap=True).items()


READERS = {".safetensors": _read_safetensors, ".bin": _read_pickle}


def convert_weights(sources: list[Path], target: Path, to_fp16: bool) -> None:
    """Merge `sources` (shards, or one file) into the single safetensors file `target`.

    Floating tensors become fp16 with `to_fp16` (an fp16 variant file, or one its loader reads by its plain
    name); otherwise they keep the source dtype. Tensors are read one at a time, so the peak is about the size
    of the output.
    """
    tensors = {}
    for source in sources:
        for key, tensor in READERS[source.suffix](source):
            dtype = torch.float16 if to_fp16 and tensor.is_floating_point() else tensor.dtype
            # A copy: it detaches from mmap'd or shared storage, which safetensors cannot save.
            tensors[key] = tensor.to(dtype=dtype, memory_format=torch.contiguous_format, copy=True)
    with atomic_target(target) as tmp:
        save_file(tensors, tmp, metadata={"format": "pt"})  # "pt": transformers refuses files without it


def convert_single_file(checkpoint: Path, folder: Path, components: list[str]) -> None:
    """Convert with the configs in `folder` (no VAE: the fp16-fix one replaces it); save fp16 variants."""
    logger.info("%s: converting %s", folder.name, checkpoint)
    try:
        pipe = StableDiffusionXLPipeline.from_single_file(
            str(checkpoint), config=str(folder), vae=None, torch_dtype=torch.float16, local_files_only=True
        )
    except (SingleFileComponentError, ValueError, KeyError) as e:
        missing = _missing_components(checkpoint)
        # Otherwise diffusers' first line: the rest is its advice to Python callers.
        reason = f"it has no weights for {', '.join(missing)}" if missing else str(e).splitlines()[0]
        raise DownloadError(f"{checkpoint} is not a full SDXL checkpoint that diffusers can convert: {reason}") from e
    for component in components:
        getattr(pipe, component).save_pretrained(folder / component, variant="fp16", max_shard_size=NO_SHARDING)


def _missing_components(checkpoint: Path) -> list[str]:
    with safe_open(checkpoint, framework="pt") as f:
        keys = list(f.keys())
    return [
        f"{component} (keys {prefix}*)"
        for component, prefix in SINGLE_FILE_PREFIXES.items()
        if not any(key.startswith(prefix) for key in keys)
    ]
