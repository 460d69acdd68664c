"""The generation parameters embedded in every output the way AUTOMATIC1111 writes them (PNG `parameters` text
chunk; EXIF UserComment for JPEG and WebP), so that any SD tool can read back how an image was made."""

from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path

import piexif
import piexif.helper
from PIL import Image


def parameters_text(prompt: str, negative_prompt: str, fields: dict[str, object]) -> str:
    """The A1111 `parameters` string: prompt, negative prompt, then `Key: value` pairs on one line."""
    lines = [prompt]
    if negative_prompt:
        lines.append(f"Negative prompt: {negative_prompt}")
    lines.append(", ".join(f"{key}: {quoted(value)}" for key, value in fields.items()))
    return "\n".join(lines)


def quoted(value: object) -> str:
    """A value as A1111 writes it among the pairs: in JSON quotes when it holds a comma, a colon or a line break (a
    ControlNet unit, a file name), which its parser (re_param_code) reads back whole and unquotes."""
    text = str(value)
    return json.dumps(text, ensure_ascii=False) if any(c in text for c in ",:\n") else text


def exif_with_comment(text: str) -> bytes:
    """EXIF holding `text` as UserComment: type UNDEFINED with the UNICODE header (EXIF 2.3, 4.6.5), written by
    piexif, the library AUTOMATIC1111 and most SD tools read it back with."""
    comment = piexif.helper.UserComment.dump(text, encoding="unicode")
    return piexif.dump({"Exif": {piexif.ExifIFD.UserComment: comment}})


def png_text_chunk(keyword: str, text: str) -> bytes:
    """A PNG text chunk as Pillow writes one: tEXt when the text is Latin-1, else uncompressed UTF-8 iTXt."""
    try:
        kind, data = b"tEXt", keyword.encode("latin-1") + b"\0" + text.encode("latin-1")
    except UnicodeEncodeError:
        # keyword, compression flag and method (none), empty language tag and translated keyword, text
        kind, data = b"iTXt", keyword.encode("latin-1") + b"\0\0\0\0\0" + text.encode("utf-8")
    return png_chunk(kind, data)


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(data, zlib.crc32(kind)))


def read_parameters(path: Path) -> str:
    """The embedded parameters of a file written by `encode_all`, read back as AUTOMATIC1111's PNG Info does."""
    with Image.open(path) as img:
        if "parameters" in img.info:
            return img.info["parameters"]
        exif = img.info.get("exif", b"")
    return piexif.helper.UserComment.load(piexif.load(exif)["Exif"][piexif.ExifIFD.UserComment])
