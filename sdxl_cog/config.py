"""Every tunable of the server in one place: input bounds shared by predict.py and the engine, and the
environment variables an operator sets. Each constant says where its number comes from."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent

# --- Input bounds the engine relies on ------------------------------------------------------------------
# predict.py declares the API (Cog reads it statically, so there they are literals); tests/test_schema.py
# fails if these copies differ from it.
# SDXL was trained at about one megapixel; 2048 is the largest side that still fits a 24 GB GPU at
# batch 1 with the refiner. 128 is the smallest size the UNet's three resolution levels handle.
MIN_SIDE = 128
MAX_SIDE = 2048
DEFAULT_SIDE = 1024
# The VAE downsamples by 8, so pixel sizes must be multiples of 8.
SIDE_MULTIPLE = 8
MAX_SEED = 2**32 - 1
# predict.py's defaults that the benchmarks reuse.
DEFAULT_HIGH_NOISE_FRAC = 0.8
DEFAULT_OUTPUT_QUALITY = 80

# Below this side the invisible watermark (DWT-DCT) cannot hold its 48 bits; diffusers skips it too.
WATERMARK_MIN_SIDE = 256


def _env_path(name: str, default: Path) -> Path:
    return Path(os.environ.get(name) or default)


def _env_bool(name: str, default: bool) -> bool:
    value = os.environ.get(name)
    return default if value is None else value.strip().lower() in {"1", "true", "yes", "on"}


def _env_auto_bool(name: str) -> bool | None:
    value = (os.environ.get(name) or "auto").strip().lower()
    return None if value == "auto" else _env_bool(name, False)


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    return default if not value else int(value)


DTYPES = {
    "float16": torch.float16,
    "fp16": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float32": torch.float32,
    "fp32": torch.float32,
}


@dataclass(frozen=True)
class Settings:
    """Operator settings, read from the environment once in setup()."""

    weights_dir: Path
    device: str
    dtype: torch.dtype
    verify_weights_hash: bool
    prefetch_weights: bool
    output_dir: Path
    lora_cache_dir: Path
    lora_cache_bytes: int
    lora_max_bytes: int
    lora_timeout_s: float
    lora_allow_private_hosts: bool
    lora_local_dirs: tuple[Path, ...]
    low_vram: bool | None  # None: decided at setup from the GPU's memory (memory.needs_low_vram)
    # GPU bytes for the checkpoints' own modules (models.py); None: what the card leaves (models.checkpoint_budget).
    model_memory_bytes: int | None = None

    @classmethod
    def from_env(cls) -> Settings:
        device = os.environ.get("SDXL_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")
        # fp16 on CUDA (the fp16-fix VAE makes it safe); fp32 on CPU, where fp16 matmuls are emulated.
        default_dtype = "float16" if device.startswith("cuda") else "float32"
        dtype_name = os.environ.get("SDXL_DTYPE", default_dtype).lower()
        if dtype_name not in DTYPES:
            raise ValueError(f"SDXL_DTYPE={dtype_name!r} is not supported; use one of {sorted(DTYPES)}.")
        weights_dir = _env_path("SDXL_WEIGHTS_DIR", REPO_ROOT / "weights")
        return cls(
            weights_dir=weights_dir,
            device=device,
            dtype=DTYPES[dtype_name],
            verify_weights_hash=_env_bool("SDXL_VERIFY_WEIGHTS_HASH", False),
            # Off by default: it pays only where the disk is much faster than the loader (sdxl_cog/prefetch.py).
            prefetch_weights=_env_bool("SDXL_PREFETCH_WEIGHTS", False),
            output_dir=_env_path("SDXL_OUTPUT_DIR", Path("/tmp/sdxl-outputs")),
            lora_cache_dir=_env_path("SDXL_LORA_CACHE_DIR", Path("/tmp/sdxl-lora-cache")),
            # A typical SDXL LoRA is 20-400 MB; keep a handful on disk.
            lora_cache_bytes=_env_int("SDXL_LORA_CACHE_BYTES", 4 * 1024**3),
            lora_max_bytes=_env_int("SDXL_LORA_MAX_BYTES", 1024**3),
            lora_timeout_s=float(os.environ.get("SDXL_LORA_TIMEOUT_S", "60")),
            lora_allow_private_hosts=_env_bool("SDXL_LORA_ALLOW_PRIVATE_HOSTS", False),
            lora_local_dirs=tuple(
                Path(p)
                for p in os.environ.get("SDXL_LORA_LOCAL_DIRS", str(weights_dir / "loras")).split(os.pathsep)
                if p
            ),
            low_vram=_env_auto_bool("SDXL_LOW_VRAM"),
            model_memory_bytes=_env_int("SDXL_MODEL_MEMORY_BYTES", 0) or None,
        )
