"""Every tunable of the server in one place: input bounds shared by predict.py and the engine, the numbers the
engine chose (sizes, limits, thresholds), and the environment variables an operator sets. Each constant says where
its number comes from. Importing it needs no torch (scripts and tools read it); Settings.from_env, run in setup(),
resolves the device and dtype.

What stays beside its code is not a choice but a fact of a format or an algorithm we must match: the watermark's
reference parameters (finishing/watermark.py: invisible-watermark's scale, block and OpenCV's YUV coefficients),
PNG's byte layout (outputs/png.py), the two finishing jobs per image (finishing/finisher.py: one worker each), the
order diffusers loads files in (checkpoints/prefetch.py)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

REPO_ROOT = Path(__file__).resolve().parent.parent

# --- Input bounds the engine relies on ---------------------------------------------------------------------------
# predict.py declares the API (Cog reads it statically, so there they are literals); tests/test_schema.py
# fails if these copies differ from it.
# SDXL was trained at about one megapixel; 2048 is the largest side that still fits a 24 GB GPU at
# batch 1 with the refiner. 128 is the smallest size the UNet's three resolution levels handle.
MIN_SIDE = 128
MAX_SIDE = 2048
# The VAE downsamples by 8, so pixel sizes must be multiples of 8.
SIDE_MULTIPLE = 8
MAX_SEED = 2**32 - 1
# predict.py's defaults that the benchmarks reuse.
DEFAULT_HIGH_NOISE_FRAC = 0.8
DEFAULT_OUTPUT_QUALITY = 80

# Prompts are encoded in chunks of 75 tokens (CLIP's 77 less BOS and EOS; generation/prompts.py). Ten
# chunks, 750 tokens, is two to three times the longest prompts AUTOMATIC1111 users write (a few
# hundred tokens), while bounding what one request costs: each token adds ~2.2 GFLOP per UNet step at
# 1024x1024 (750 tokens: +1.6 TFLOP on ~6 per step, < +30%) and ~6.5 MB per chunk to the text
# encoders. Applies to prompt and negative_prompt each.
PROMPT_CHUNK_TOKENS = 75
MAX_PROMPT_CHUNKS = 10
MAX_PROMPT_TOKENS = PROMPT_CHUNK_TOKENS * MAX_PROMPT_CHUNKS
# The schema's max_length (predict.py), checked before any tokenizing: a coarse bound that never
# refuses a prompt within the token budget written in words. CLIP's BPE gives 2.5-4.5 characters per
# token in real prompts (punctuation and weights like "(masterpiece:1.2)" are tokens of their own);
# a whole word of up to ~9 letters plus its space is one token, so 10 characters per token is above
# any prompt of ordinary words. Tokenizing 7500 characters takes about a millisecond.
CHARS_PER_TOKEN_CEILING = 10
MAX_PROMPT_CHARS = MAX_PROMPT_TOKENS * CHARS_PER_TOKEN_CEILING

# Below this side the invisible watermark (DWT-DCT) cannot hold its 48 bits; diffusers skips it too.
WATERMARK_MIN_SIDE = 256
# Pixel rows watermarked at a time on the CPU (finishing/watermark.py): 16 rows of 4x4 blocks, a multiple of the
# DWT's 8-pixel cells; five float64 planes of 256 KB at 1024px wide stay in cache, and the PNG encoder, which takes
# each band as it is marked, gets its first rows after about 2 ms (1024px).
WATERMARK_CPU_BAND_ROWS = 128


# --- Units -------------------------------------------------------------------------------------------------------
MEGAPIXEL = 1024 * 1024
GIB = 1024**3

# --- Input images (inputs/images.py, inputs/uploads.py) ----------------------------------------------------------
# Far above any useful SDXL input (SDXL works at ~1 MP), far below what a decompression bomb declares.
MAX_INPUT_PIXELS = 50_000_000
# Masks are binarised at half intensity: white (>= 128) is repainted, black is kept.
MASK_THRESHOLD = 128
# coglet's downloads give up after 10 s without a byte (requests' read timeout in cog/types.py), and a
# file is written to on every chunk: a file untouched for an hour belongs to no download in flight.
STALE_INPUT_AGE_S = 3600

# --- The GPU memory budget (device/memory.py): estimates, to calibrate on a GPU with bench/generation_gpu.py -----
# Per image and megapixel, both CFG halves included (fp16, SDPA).
UNET_ACTIVATION_BYTES_PER_MEGAPIXEL = int(1.0 * GIB)
# Peak of one VAE decode per megapixel (fp16); the mid-block attention dominates.
VAE_DECODE_BYTES_PER_MEGAPIXEL = int(3.0 * GIB)
# Each 75-token prompt chunk past the first (which the figures above include), for prompt and negative
# prompt: the text encoders' activations (~6.5 MB per chunk at full size), and per image and megapixel
# one cross-attention's scores at the 64x64 latent level should SDPA fall back to its math kernel
# (2 CFG halves x 10 heads x 4096 queries x 77 keys x 2 bytes = 12.6 MB, rounded up).
TEXT_ENCODER_BYTES_PER_CHUNK = int(6.5 * 1024**2)
CROSS_ATTENTION_BYTES_PER_CHUNK_PER_MEGAPIXEL = 16 * 1024**2
# Per image, megapixel and ControlNet a request runs: a ControlNet is a copy of the UNet's down and middle blocks,
# about half of its activations (estimate, as above).
CONTROLNET_ACTIVATION_BYTES_PER_MEGAPIXEL = int(0.5 * GIB)
# The CUDA context, allocator fragmentation and cuDNN workspaces.
RESERVE_BYTES = int(1.5 * GIB)
# What a GPU must serve with every module resident for low-VRAM mode to stay off: four 1024px images
# (the "base + refiner fit a 24 GB GPU at 1024x1024 with num_outputs 4").
REFERENCE_REQUEST = dict(width=1024, height=1024, num_outputs=4)

# --- Loading (checkpoints/prefetch.py) ---------------------------------------------------------------------------
# Prefetching more than the page cache can hold would evict the first files before setup() reads them, and read
# them twice; leave room for the process itself.
PREFETCH_CACHE_FRACTION = 0.8

# --- The compiled fast path, SDXL_COMPILE (device/compilation.py, generation/warmup.py) -------------------------
# predict.py's num_outputs bound: a size to compile (SDXL_COMPILE_SIZES) may name up to this many outputs.
MAX_OUTPUTS = 4
# Each size in SDXL_COMPILE_SIZES costs compilation at the first start (a graph per distinct transformer-block shape
# of each UNet and one VAE decoder); eight sizes already cover SDXL's usual aspect-ratio buckets at one megapixel.
MAX_COMPILE_SIZES = 8
# A warm-up request runs one base step and one refiner step (expert ensemble, split in the middle): enough to compile
# every graph a request of its size runs, since the graphs do not depend on the step.
WARMUP_STEPS = 2
WARMUP_HIGH_NOISE_FRAC = 0.5
# torch.compile's recompile limit counts the graphs of one function and, past it, runs it uncompiled (torch's default:
# 8). Every transformer block of both UNets shares one forward: five graphs per size and guidance setting (a graph
# per block shape: the base's two attention levels, the refiner's two and its deeper mid block). The warm-up must hold
# them all: MAX_COMPILE_SIZES sizes, with and without guidance.
WARMUP_RECOMPILE_LIMIT = 5 * MAX_COMPILE_SIZES * 2

# --- LoRA downloads (checkpoints/lora.py) ------------------------------------------------------------------------
# Hub and CDN links redirect once or twice (a Hugging Face resolve URL to its CDN): more is a loop.
MAX_REDIRECTS = 5
# The socket waits at most this long for the next bytes, so the deadline is checked at least this
# often and overshot by at most this much (a healthy server never pauses 10 s mid-file).
STALL_TIMEOUT_S = 10.0

# --- Outputs (outputs/) ------------------------------------------------------------------------------------------
# PNG stays lossless, and its encode sits on every request's critical path. Pillow's encoder tries four
# filters on every row and keeps the best, which alone costs ~60 ms for a 1024px image and cannot be
# turned off. A fixed filter does not: the Up filter with zlib level 1 and the run-length strategy gives the
# same file size in 36 ms of CPU instead of 99 ms (bench/encoding.py; measured with OpenCV's libpng, which
# outputs.PngWriter now matches in time and size while taking the rows as they are watermarked).
PNG_COMPRESS_LEVEL = 1
# WebP at quality 100 is written lossless: asking for the top quality should not still lose detail.
WEBP_LOSSLESS_QUALITY = 100
# coglet's empty per-prediction directories (outputs.sweep_empty_runtime_dirs) are swept once this old: a
# prediction in flight is younger.
RUNTIME_LEFTOVER_AGE_S = 60


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


CompileSize = tuple[int, int, int]  # width, height, num_outputs


def parse_compile_sizes(text: str) -> tuple[CompileSize, ...]:
    """SDXL_COMPILE_SIZES: `WxH` or `WxHxN` (N outputs, default 1), comma-separated; ValueError naming the bad one."""
    sizes = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        fields = item.lower().split("x")
        valid = len(fields) in (2, 3) and all(f.isdigit() for f in fields)
        width, height, outputs = ([int(f) for f in fields] + [1])[:3] if valid else (0, 0, 0)
        sides_ok = all(MIN_SIDE <= side <= MAX_SIDE and side % SIDE_MULTIPLE == 0 for side in (width, height))
        if not (valid and sides_ok and 1 <= outputs <= MAX_OUTPUTS):
            raise ValueError(
                f"SDXL_COMPILE_SIZES: {item!r} is not WIDTHxHEIGHT[xOUTPUTS] with sides {MIN_SIDE}..{MAX_SIDE} in "
                f"multiples of {SIDE_MULTIPLE} and 1..{MAX_OUTPUTS} outputs (e.g. 1024x1024,1152x896,1024x1024x4)."
            )
        sizes.append((width, height, outputs))
    if len(sizes) > MAX_COMPILE_SIZES:
        raise ValueError(f"SDXL_COMPILE_SIZES lists {len(sizes)} sizes; at most {MAX_COMPILE_SIZES} are compiled.")
    return tuple(dict.fromkeys(sizes))


# SDXL_DTYPE's accepted names, to the torch dtype's name (resolved in Settings.from_env, where torch is loaded).
DTYPES = {
    "float16": "float16",
    "fp16": "float16",
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
    "float32": "float32",
    "fp32": "float32",
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
    output_keep: int  # the latest predictions whose files are kept (a failed upload can be recovered)
    input_dir: Path
    prediction_marker: Path  # touched as each prediction starts; deploy/probe.py reads it
    lora_cache_dir: Path
    lora_cache_bytes: int
    lora_max_bytes: int
    lora_timeout_s: float
    lora_allow_private_hosts: bool
    lora_local_dirs: tuple[Path, ...]
    low_vram: bool | None  # None: decided at setup from the GPU's memory (memory.needs_low_vram)
    # GPU bytes for the checkpoints' own modules (models.py); None: what the card leaves (models.checkpoint_budget).
    model_memory_bytes: int | None = None
    compile: bool = False  # SDXL_COMPILE: the compiled fast path (device/compilation.py)
    compile_cache_dir: Path = Path("/tmp/sdxl-compile-cache")
    # The sizes setup() compiles (width, height, outputs); empty: each checkpoint's profile size, one output.
    compile_sizes: tuple[CompileSize, ...] = ()

    @classmethod
    def from_env(cls) -> Settings:
        # torch only here, in setup(), where the engine has loaded it anyway: scripts import this module without it.
        import torch

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
            dtype=getattr(torch, DTYPES[dtype_name]),
            verify_weights_hash=_env_bool("SDXL_VERIFY_WEIGHTS_HASH", False),
            # Off by default: it pays only where the disk is much faster than the loader (checkpoints/prefetch.py).
            prefetch_weights=_env_bool("SDXL_PREFETCH_WEIGHTS", False),
            output_dir=_env_path("SDXL_OUTPUT_DIR", Path("/tmp/sdxl-outputs")),
            # 16 predictions: at most 64 images (~100 MB of 1024px PNGs) kept for the operator to
            # recover one whose upload to --upload-url failed (outputs/directory.py).
            output_keep=_env_int("SDXL_OUTPUT_KEEP", 16),
            # Where coglet writes downloaded image/mask inputs: made the worker's tempfile directory
            # (inputs/uploads.py). Under TMPDIR, so whatever watches TMPDIR still sees it.
            input_dir=_env_path("SDXL_INPUT_DIR", Path(os.environ.get("TMPDIR") or "/tmp") / "sdxl-inputs"),
            # The liveness probe tells a long stretch of back-to-back predictions from a wedged slot
            # by it; the same default as deploy/probe.py's.
            prediction_marker=_env_path("SDXL_PREDICTION_MARKER", Path("/tmp/sdxl-prediction-started")),
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
            # Off until measured on the target GPU with `make gpu-check` (docs/compile.md).
            compile=_env_bool("SDXL_COMPILE", False),
            # Compiled kernels for the next start; a volume in deploy/ keeps them across container restarts.
            compile_cache_dir=_env_path("SDXL_COMPILE_CACHE_DIR", Path("/tmp/sdxl-compile-cache")),
            compile_sizes=parse_compile_sizes(os.environ.get("SDXL_COMPILE_SIZES", "")),
        )
