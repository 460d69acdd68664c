"""SDXL_COMPILE, the compiled fast path: what prepare() changes on the loaded modules once at setup, and how a
request then runs on them. The warm-up that compiles the sizes to serve is generation/warmup.py.

prepare(), before the modules are placed (so the GPU budget counts what it adds, and placement moves it):
1. Attention. SDPA (torch's scaled_dot_product_attention) is diffusers' default processor under torch 2
   (AttnProcessor2_0); the fused one below is SDPA too. The UNets' projections are fused: query, key and value
   into one matmul in self-attention, key and value into one in cross-attention (diffusers' fuse_qkv_projections).
   diffusers keeps the separate projections beside the fused copies, and a LoRA needs them (PEFT adapts to_q,
   to_k and to_v): +1.21 GiB for the base UNet and +0.63 GiB for the refiner's in fp16. A UNet carrying an
   IP-Adapter keeps its own processors, unfused (FusedAttention).
2. channels_last for the UNets and the VAE: the NHWC layout the GPU's fastest convolutions and inductor's
   kernels use, set once rather than converted at every call.
3. Every parameter frozen (requires_grad off; nothing here trains). PEFT freezes the layers it adapts when a
   LoRA loads, and a compiled graph is only valid for the requires_grad it was traced with: freezing first
   keeps the graphs valid once a LoRA has come and gone.
4. torch.compile, regional: each UNet's repeated transformer blocks (diffusers' compile_repeated_blocks: one
   graph per block shape serves every block of that shape, in every checkpoint, so a cold start compiles five
   block graphs per size instead of two whole UNets) and the VAE decoder. Static shapes (dynamic=False): each
   size gets kernels specialised to it; fullgraph=True: a graph break is an error here, not a silent slowdown.
   No CUDA graphs ("reduce-overhead"): they would pin the weights' addresses, which low-VRAM mode and the
   checkpoint cache move.
5. The compile cache: inductor's FX-graph and AOTAutograd caches (on by default in torch) and Triton's
   kernels go to SDXL_COMPILE_CACHE_DIR (as TORCHINDUCTOR_CACHE_DIR), so a restart traces the blocks again but
   compiles no kernel. It holds code the server loads: only the server may write there.

While serving (serving()), no request ever compiles:
- a request of a warmed size runs the compiled graphs; any other shape (another size, more outputs, a prompt
  past 75 tokens) runs the same modules uncompiled (torch's "eager_on_recompile" stance), so a first compile of
  tens of seconds never lands on a user's request. An operator adds sizes served often to SDXL_COMPILE_SIZES.
- a LoRA request runs uncompiled with the projections split (to_q, to_k and to_v carry the adapter): PEFT's
  layers are not the modules the graphs were traced on, and a graph per adapter and scale would compile at
  request time. The adapter is unloaded afterwards (checkpoints/lora.py), giving the blocks their modules back.
"""

from __future__ import annotations

import os
import shutil
import sysconfig
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.models.attention_processor import AttnProcessor2_0, FusedAttnProcessor2_0

from sdxl_cog.config import WARMUP_RECOMPILE_LIMIT

COMPILE_OPTIONS = dict(fullgraph=True, dynamic=False)
# The compiler inductor needs per device type: Triton builds its CUDA launcher with a C compiler ($CC, else gcc
# or clang: triton/runtime/build.py), and inductor's CPU kernels are C++ ($CXX, else g++ or clang++).
TOOLCHAINS = {"cuda": ("CC", ("gcc", "clang")), "cpu": ("CXX", ("g++", "clang++"))}
# Both also compile against Python.h; a distribution's Python ships it apart (Debian and Ubuntu: python3-dev), so
# a CUDA base image with the system's python3 has the compiler and not the headers.
PYTHON_HEADERS_PACKAGE = "python3-dev"


class FusedAttention:
    """One UNet's attention processors: fused for the compiled path, as loaded (separate projections) while a
    LoRA is active. Switching back restores the very processor objects the graphs were traced with.

    A UNet with other processors than plain SDPA ones (an IP-Adapter's, which carry its image projections: diffusers'
    fused processor has no image path) stays unfused; its blocks are compiled all the same."""

    def __init__(self, unet: UNet2DConditionModel):
        kinds = {type(p) for p in unet.attn_processors.values()}
        if FusedAttnProcessor2_0 in kinds:
            # The processors as loaded would be lost: a LoRA would then run on fused projections and be ignored.
            raise RuntimeError("This UNet's projections are fused already: build the service from fresh modules.")
        self.unet = unet
        self.separate = unet.attn_processors
        self.fusable = kinds == {AttnProcessor2_0}
        if self.fusable:
            unet.fuse_qkv_projections()
        self.fused = unet.attn_processors
        self.is_fused = self.fusable

    # set_attn_processor empties the dict it is given (it pops each entry): it gets a copy.
    def split(self) -> None:
        if self.is_fused:
            self.unet.set_attn_processor(dict(self.separate))
            self.is_fused = False

    def fuse(self) -> None:
        if self.fusable and not self.is_fused:
            self.unet.set_attn_processor(dict(self.fused))
            self.is_fused = True


class Compiled:
    """The UNets prepare() fused and compiled, by identity (checkpoints may share a UNet)."""

    def __init__(self, unets: list[UNet2DConditionModel]):
        self.attention = {id(unet): FusedAttention(unet) for unet in unets}

    def of(self, unet: UNet2DConditionModel) -> FusedAttention:
        return self.attention[id(unet)]


def prepare(
    unets: list[UNet2DConditionModel], vae: AutoencoderKL, device: str, cache_dir: Path
) -> tuple[Compiled, str]:
    """Steps 1-5 above on every UNet (each checkpoint's and the refiner's) and the shared VAE. Nothing compiles
    yet: torch.compile traces at the first call, which the warm-up makes. Returns the handle and a summary line."""
    check_toolchain(device)
    use_cache_dir(cache_dir)
    distinct = list({id(unet): unet for unet in unets}.values())
    compiled = Compiled(distinct)
    for module in [*distinct, vae]:
        module.requires_grad_(False)
        module.to(memory_format=torch.channels_last)
    for unet in distinct:
        unet.compile_repeated_blocks(**COMPILE_OPTIONS)
    vae.decoder.compile(**COMPILE_OPTIONS)
    fused = sum(attention.fusable for attention in compiled.attention.values())
    summary = (
        f"SDXL_COMPILE: attention projections fused in {fused} of {len(distinct)} UNets, channels_last, their "
        f"transformer blocks and the VAE decoder compiled at the warm-up (cache {cache_dir})."
    )
    return compiled, summary


def check_toolchain(device: str) -> None:
    """Fail at setup, saying what to install, rather than at the first compile deep inside inductor."""
    kind = torch.device(device).type
    if kind not in TOOLCHAINS:
        raise RuntimeError(f"SDXL_COMPILE=1 supports cuda and cpu devices, not {device!r}: unset SDXL_COMPILE.")
    variable, names = TOOLCHAINS[kind]
    if not (os.environ.get(variable) or any(shutil.which(name) for name in names)):
        raise RuntimeError(
            f"SDXL_COMPILE=1 on {kind} needs a compiler: none of {', '.join(names)} is on PATH and {variable} is "
            f"unset. Install {names[0]} in the image (docs/compile.md) or unset SDXL_COMPILE."
        )
    if not (headers := python_headers()).is_file():
        raise RuntimeError(
            f"SDXL_COMPILE=1 needs Python's C headers, and {headers} is missing. Install {PYTHON_HEADERS_PACKAGE} "
            "(or the dev package of the Python that runs this) in the image (docs/compile.md) or unset SDXL_COMPILE."
        )


def python_headers() -> Path:
    """The Python.h the compilers include: Triton's choice (triton/runtime/build.py), the default sysconfig scheme
    with Debian's posix_local read as posix_prefix; inductor's CPU build reads the same directory elsewhere."""
    scheme = sysconfig.get_default_scheme()
    if scheme == "posix_local":
        scheme = "posix_prefix"
    return Path(sysconfig.get_paths(scheme=scheme)["include"]) / "Python.h"


def use_cache_dir(directory: Path) -> None:
    """The one place this process's compile cache is chosen. Inductor reads TORCHINDUCTOR_CACHE_DIR at every
    compile (torch/_inductor/runtime/cache_dir_utils.py) and keeps Triton's kernels under it unless
    TRITON_CACHE_DIR says otherwise, so setting it before the warm-up is enough."""
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(directory)


@contextmanager
def warming_up() -> Iterator[None]:
    """Compiling allowed, with room for every warm-up size's graphs (config.WARMUP_RECOMPILE_LIMIT)."""
    with torch.compiler.set_stance("default"), torch._dynamo.config.patch(recompile_limit=WARMUP_RECOMPILE_LIMIT):
        yield


# How requests run after the warm-up (see the module's docstring); tests make it "fail_on_recompile" to prove
# that a warmed size really runs compiled graphs.
SERVING_STANCE = "eager_on_recompile"


def serving(lora: bool) -> AbstractContextManager:
    return torch.compiler.set_stance("force_eager" if lora else SERVING_STANCE)
