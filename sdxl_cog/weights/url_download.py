"""Download one file over HTTP(S), resuming an interrupted transfer with a Range request.

Single-file checkpoints given as URLs come this way; Hub repos go through huggingface_hub instead.
"""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import urlparse

import requests

from sdxl_cog.weights.atomic import atomic_target
from sdxl_cog.weights.sources import DownloadError

HTTP_TIMEOUT_S = (10, 60)  # (connect, between bytes): a stalled CDN fails instead of hanging the build
HTTP_CHUNK_BYTES = 8 * 1024 * 1024
HF_HOSTS = ("huggingface.co", "hf.co")  # only these get HF_TOKEN when the base is a URL


def fetch_url(url: str, dest: Path, headers: dict[str, str] | None = None) -> Path:
    """Stream `url` to `dest` through `dest.part`; a `.part` left by an earlier run resumes (HTTP Range)."""
    if dest.is_file():
        return dest
    with atomic_target(dest, ".part") as part:
        _resume(url, part, headers or {})
    return dest


def _resume(url: str, part: Path, headers: dict[str, str]) -> None:
    """Ask for the bytes `part` lacks and write them; a failed request leaves `part` for the next run."""
    have = part.stat().st_size if part.is_file() else 0
    # identity: a transparently decompressed body would not line up with byte ranges.
    request_headers = {**headers, "Accept-Encoding": "identity"} | ({"Range": f"bytes={have}-"} if have else {})
    try:
        with requests.get(url, headers=request_headers, stream=True, timeout=HTTP_TIMEOUT_S) as response:
            _write_body(response, part, have)
    except requests.RequestException as e:
        raise DownloadError(f"Download of {url} failed ({e}). Run again to resume from {part}.") from e


def _write_body(response: requests.Response, part: Path, have: int) -> None:
    expected = _expected_size(response)
    if response.status_code == 416 and expected == have:
        return  # the .part was complete when the earlier run stopped
    if response.status_code == 416:
        part.unlink()  # longer than the file, or the file changed: start over next time
        raise DownloadError(f"{response.url} cannot resume {part} at byte {have}; it was deleted. Run again.")
    response.raise_for_status()
    # 206: the server honoured the Range, append; 200: it ignored it (or nothing to resume), start over.
    with open(part, "ab" if response.status_code == 206 else "wb") as f:
        for chunk in response.iter_content(HTTP_CHUNK_BYTES):
            f.write(chunk)
    if expected is not None and part.stat().st_size != expected:
        raise DownloadError(
            f"{response.url} ended after {part.stat().st_size} of {expected} bytes. Run again to resume."
        )


def _expected_size(response: requests.Response) -> int | None:
    """The full file size: `Content-Range: bytes a-b/TOTAL` on 206 and 416, `Content-Length` on 200."""
    content_range = response.headers.get("Content-Range", "")
    if "/" in content_range and not content_range.endswith("/*"):
        return int(content_range.rsplit("/", 1)[1])
    length = response.headers.get("Content-Length")
    return int(length) if response.status_code == 200 and length is not None else None


def hf_auth_headers(url: str) -> dict[str, str]:
    """The Authorization header for HF_TOKEN when `url` is on the Hub; none for any other host."""
    host, token = urlparse(url).hostname or "", os.environ.get("HF_TOKEN")
    on_hub = any(host == h or host.endswith("." + h) for h in HF_HOSTS)
    return {"Authorization": f"Bearer {token}"} if token and on_hub else {}
