"""LoRA weights per request: fetched safely from an https URL or an allowed local directory, cached on
disk with a size bound, loaded as a PEFT adapter on the shared base modules, and disabled again for
requests without LoRA (a disabled adapter leaves the layers computing exactly the base model), or with
SDXL_COMPILE unloaded (see LoraAdapters).

URLs are fetched with SSRF guards: http(s) only, every hop of a redirect chain must resolve to public
addresses (unless the operator allows private ones) and is fetched from the address that was checked (one
lookup per hop, so a rebinding name cannot pass the check with one answer and connect to another), bounded
size, time and redirects. The time bound
(SDXL_LORA_TIMEOUT_S) is a deadline for the whole download, redirects included: a server trickling
a byte at a time cannot hold a prediction. Only a complete download that opens as a safetensors file
enters the cache; anything else is discarded, so one bad answer never poisons a URL.
"""

from __future__ import annotations

import hashlib
import ipaddress
import os
import socket
import time
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urljoin, urlsplit

import requests
import urllib3
from safetensors import SafetensorError, safe_open

from sdxl_cog.checkpoints import pinned_http
from sdxl_cog.config import MAX_REDIRECTS, STALL_TIMEOUT_S, Settings
from sdxl_cog.device.health import cuda_error
from sdxl_cog.errors import InputError

if TYPE_CHECKING:
    from sdxl_cog.device.compilation import FusedAttention

DOWNLOAD_CHUNK_BYTES = 1024 * 1024
ALLOWED_SCHEMES = {"http", "https"}


def _checked_address(url: str, allow_private: bool) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """The address to connect to for `url`, from one lookup whose every answer passed the host policy;
    the download connects to it (pinned_http), so a name cannot answer the check and the connection
    differently (DNS rebinding)."""
    parts = urlsplit(url)
    if parts.scheme not in ALLOWED_SCHEMES or not parts.hostname:
        raise InputError(f"lora_weights URL {url!r} is not allowed: use an http(s) URL or a local .safetensors path.")
    try:
        found = pinned_http.addresses(parts.hostname, parts.port or pinned_http.DEFAULT_PORTS[parts.scheme])
    except socket.gaierror as e:
        raise InputError(f"lora_weights host {parts.hostname!r} could not be resolved ({e}).") from e
    for address in found:
        if not (allow_private or address.is_global):
            raise InputError(
                f"lora_weights host {parts.hostname!r} resolves to the non-public address {address}; "
                "private, loopback and link-local hosts are refused (operators: SDXL_LORA_ALLOW_PRIVATE_HOSTS=1)."
            )
    return found[0]


def _time_left(deadline: float, settings: Settings) -> float:
    """Seconds until `deadline`; InputError once it has passed."""
    left = deadline - time.monotonic()
    if left <= 0:
        raise InputError(
            f"lora_weights download took longer than the {settings.lora_timeout_s:g} s allowed "
            "(SDXL_LORA_TIMEOUT_S); nothing was cached."
        )
    return left


def _download(url: str, dest: Path, settings: Settings) -> None:
    """Stream `url` to `dest` within settings.lora_timeout_s in all, following at most MAX_REDIRECTS
    redirects, each re-checked."""
    deadline = time.monotonic() + settings.lora_timeout_s
    for _ in range(MAX_REDIRECTS + 1):
        address = _checked_address(url, settings.lora_allow_private_hosts)
        timeout = min(_time_left(deadline, settings), STALL_TIMEOUT_S)
        try:
            response = pinned_http.get(url, address, timeout)
        except requests.RequestException as e:
            raise InputError(f"lora_weights could not be downloaded from {url}: {e}") from e
        with response:
            if response.is_redirect:
                url = urljoin(url, response.headers["Location"])
                continue
            if response.status_code != 200:
                raise InputError(f"lora_weights download from {url} failed with HTTP {response.status_code}.")
            _write_checked(response, dest, settings, deadline)
            return
    raise InputError(f"lora_weights URL redirected more than {MAX_REDIRECTS} times.")


def _write_checked(response: requests.Response, dest: Path, settings: Settings, deadline: float) -> None:
    """Write the body next to `dest` and move it into place only once it is whole and a valid file."""
    max_bytes = settings.lora_max_bytes
    too_big = InputError(f"lora_weights is larger than the {max_bytes // 1024**2} MB allowed.")
    declared = int(response.headers.get("Content-Length") or -1)
    if declared > max_bytes:
        raise too_big
    partial, written = dest.with_suffix(".part"), 0
    try:
        with open(partial, "wb") as f:
            # read1 returns whatever has arrived, so the deadline is checked between reads however
            # slowly the bytes come (iter_content would wait for a whole chunk).
            while chunk := response.raw.read1(DOWNLOAD_CHUNK_BYTES, decode_content=True):
                written += len(chunk)
                if written > max_bytes:
                    raise too_big
                f.write(chunk)
                _time_left(deadline, settings)  # for its InputError once the deadline has passed
        if declared >= 0 and written != declared and not response.headers.get("Content-Encoding"):
            raise InputError(
                f"lora_weights download ended after {written} of its {declared} bytes; nothing was cached."
            )
        check_safetensors(partial)
        os.replace(partial, dest)
    except (requests.RequestException, OSError, urllib3.exceptions.HTTPError) as e:
        raise InputError(f"lora_weights download was interrupted: {e}; nothing was cached.") from e
    finally:
        partial.unlink(missing_ok=True)


def _evict(cache_dir: Path, keep: Path, budget: int) -> None:
    """Remove least recently used cached files until the cache fits its budget."""
    files = sorted((p for p in cache_dir.glob("*.safetensors") if p != keep), key=lambda p: p.stat().st_atime)
    total = sum(p.stat().st_size for p in files) + keep.stat().st_size
    while files and total > budget:
        oldest = files.pop(0)
        total -= oldest.stat().st_size
        oldest.unlink(missing_ok=True)


def _local_path(source: str, settings: Settings) -> Path:
    path = Path(source).resolve()
    if not any(path.is_relative_to(d.resolve()) for d in settings.lora_local_dirs):
        allowed = ", ".join(str(d) for d in settings.lora_local_dirs)
        raise InputError(f"lora_weights path {source!r} is outside the allowed directories ({allowed}).")
    if not path.is_file():
        raise InputError(f"lora_weights file {source!r} does not exist.")
    return path


def fetch(source: str, settings: Settings) -> Path:
    """A local .safetensors file for `source` (URL, cached by URL; or a path under an allowed directory)."""
    if "://" not in source:
        return _local_path(source, settings)
    settings.lora_cache_dir.mkdir(parents=True, exist_ok=True)
    cached = settings.lora_cache_dir / (hashlib.sha256(source.encode()).hexdigest() + ".safetensors")
    if cached.is_file():
        # Checked even when cached: the policy decides what may be used, not only what may be fetched.
        _checked_address(source, settings.lora_allow_private_hosts)
    else:
        _download(source, cached, settings)  # checks every hop itself
        _evict(settings.lora_cache_dir, cached, settings.lora_cache_bytes)
    os.utime(cached)  # mark as recently used
    return cached


def check_safetensors(path: Path) -> None:
    try:
        with safe_open(path, framework="pt") as f:
            if not list(f.keys()):
                raise InputError("lora_weights holds no tensors.")
    except (SafetensorError, OSError) as e:
        raise InputError(f"lora_weights is not a valid .safetensors file ({e}).") from e


class LoraAdapters:
    """The adapters loaded on the base pipeline: at most one is active, for one request.

    Uncompiled, an adapter stays loaded (disabled) after its request, so the next request for it starts at once.
    With SDXL_COMPILE (`attention` given: device/compilation.py) the request runs with the UNet's projections split,
    which carry the adapter, and the adapter is unloaded afterwards: PEFT's layers take the place of the modules
    the compiled blocks were traced on, and only with those back do the next requests run the compiled graphs."""

    def __init__(self, pipeline, settings: Settings, attention: FusedAttention | None = None):
        self.pipeline, self.settings, self.attention = pipeline, settings, attention
        self.loaded: str | None = None
        self.touched = False  # a load was tried since PEFT's layers were last removed (SDXL_COMPILE only)

    def activate(self, source: str | None, scale: float) -> None:
        """Make `source` the only active LoRA at `scale` (or none)."""
        if source is None:
            self.deactivate()
            return
        path = fetch(source, self.settings)
        name = (
            "lora_"
            + hashlib.sha256(f"{path}:{path.stat().st_size}:{path.stat().st_mtime_ns}".encode()).hexdigest()[:16]
        )
        if name != self.loaded:
            self._replace(path, name)
        if self.attention is not None:
            self.attention.split()
        self.pipeline.enable_lora()
        self.pipeline.set_adapters([name], adapter_weights=[scale])

    def deactivate(self) -> None:
        if self.attention is not None:
            self._unload()
        elif self.loaded is not None:
            self.pipeline.disable_lora()

    def _unload(self) -> None:
        """Remove PEFT's layers (diffusers puts the original modules back) and fuse the projections again."""
        if self.touched:
            self.pipeline.unload_lora_weights()
            self.loaded, self.touched = None, False
        self.attention.fuse()

    def _replace(self, path: Path, name: str) -> None:
        check_safetensors(path)
        if self.loaded is not None:
            self.pipeline.delete_adapters(self.loaded)
            self.loaded = None
        self.touched = True
        try:
            self.pipeline.load_lora_weights(str(path), adapter_name=name)
        except (ValueError, KeyError, RuntimeError) as e:
            if cuda_error(e):
                raise  # the GPU failed, not the file: the service reports it (health check, out of memory)
            self._discard(name)
            raise InputError(f"lora_weights could not be loaded as an SDXL LoRA: {e}") from e
        if not any(name in names for names in self.pipeline.get_list_adapters().values()):
            raise InputError("lora_weights has no weights for SDXL's UNet or text encoders (unknown key names).")
        self.loaded = name

    def _discard(self, name: str) -> None:
        """Remove a partly loaded adapter, so a bad file leaves the model as it was."""
        if any(name in names for names in self.pipeline.get_list_adapters().values()):
            self.pipeline.delete_adapters(name)
