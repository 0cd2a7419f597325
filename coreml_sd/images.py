"""Saving generated images with their generation parameters embedded, AUTOMATIC1111-style.

The parameters go where AUTOMATIC1111 and the tools that read its files look for them: a PNG
`parameters` text chunk; an EXIF UserComment ("UNICODE" prefix + UTF-16BE, as piexif writes it)
in JPEG and WebP. Files are written under a temporary name and renamed when complete, and a name
that exists already is never overwritten.
"""

from __future__ import annotations

import errno
import io
import json
import os
import re
import unicodedata
from dataclasses import dataclass, field, fields
from pathlib import Path

FORMATS = {"jpeg": ".jpg", "png": ".png", "webp": ".webp"}
_EXIF_IFD = 0x8769
_USER_COMMENT = 0x9286
_UNICODE_PREFIX = b"UNICODE\x00"
# A JPEG APP1 segment holds at most 64 KiB; leave room for the EXIF structure around the comment.
_MAX_COMMENT_BYTES = 60_000


@dataclass(frozen=True)
class GenerationParams:
    """Everything needed to reproduce one image, and its AUTOMATIC1111 text form."""

    prompt: str
    negative_prompt: str = ""
    steps: int = 25
    sampler: str = "Euler a"  # the display name users know (AUTOMATIC1111's)
    schedule: str = "default"
    guidance_scale: float = 7.5
    seed: int = 0
    width: int = 512
    height: int = 512
    model: str = ""
    model_hash: str | None = None
    extras: dict[str, str] = field(default_factory=dict)  # e.g. {"Lora hashes": ..., "Backend": ...}

    def to_a1111(self) -> str:
        lines = [self.prompt]
        if self.negative_prompt:
            lines.append(f"Negative prompt: {self.negative_prompt}")
        items = [("Steps", self.steps), ("Sampler", self.sampler)]
        if self.schedule != "default":
            items.append(("Schedule type", self.schedule.capitalize()))
        items += [("CFG scale", _number(self.guidance_scale)), ("Seed", self.seed),
                  ("Size", f"{self.width}x{self.height}")]
        if self.model_hash:
            items.append(("Model hash", self.model_hash))
        if self.model:
            items.append(("Model", self.model))
        items += list(self.extras.items())
        lines.append(", ".join(f"{k}: {_quote(str(v))}" for k, v in items))
        return "\n".join(lines)

    @classmethod
    def from_a1111(cls, text: str) -> "GenerationParams":
        """Parse AUTOMATIC1111's `parameters` text (the inverse of `to_a1111`)."""
        *head, last = text.split("\n")
        if not _PARAM_RE.search(last):
            head, last = head + [last], ""
        prompt_lines, negative = [], []
        for line in head:
            if line.startswith("Negative prompt:") or negative:
                negative.append(line[len("Negative prompt:"):].strip() if not negative else line)
            else:
                prompt_lines.append(line)
        kv = {m.group(1): _unquote(m.group(2)) for m in _PARAM_RE.finditer(last)}
        known = {"Steps", "Sampler", "Schedule type", "CFG scale", "Seed", "Size", "Model hash", "Model"}
        width, height = (kv.get("Size", "512x512").split("x") + ["512"])[:2]
        return cls(
            prompt="\n".join(prompt_lines),
            negative_prompt="\n".join(negative),
            steps=int(kv.get("Steps", 25)),
            sampler=kv.get("Sampler", "Euler a"),
            schedule=kv.get("Schedule type", "default").lower(),
            guidance_scale=float(kv.get("CFG scale", 7.5)),
            seed=int(kv.get("Seed", 0)),
            width=int(width),
            height=int(height),
            model=kv.get("Model", ""),
            model_hash=kv.get("Model hash"),
            extras={k: v for k, v in kv.items() if k not in known},
        )

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}


_PARAM_RE = re.compile(r'\s*(\w[\w \-/+]*):\s*("(?:\\.|[^\\"])*"|[^,]*)(?:,|$)')


def _number(x: float) -> str:
    return f"{x:g}"


def _quote(value: str) -> str:
    # AUTOMATIC1111 JSON-quotes values that would break its "key: value, ..." line.
    return json.dumps(value, ensure_ascii=False) if any(c in value for c in ',\n:"') else value


def _unquote(value: str) -> str:
    value = value.strip()
    if len(value) >= 2 and value[0] == value[-1] == '"':
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            return value
    return value


def slugify(text: str, max_length: int = 60) -> str:
    """A file-name-safe slug: ASCII letters/digits joined by '-', never empty, never a path."""
    ascii_text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode("ascii")
    slug = "-".join(re.findall(r"[a-z0-9]+", ascii_text.lower()))
    slug = slug[:max_length].rstrip("-")
    return slug or "image"


def user_comment(text: str) -> bytes:
    data = text.encode("utf-16-be")
    if len(data) > _MAX_COMMENT_BYTES:  # keep whole UTF-16 code units
        data = data[: _MAX_COMMENT_BYTES - _MAX_COMMENT_BYTES % 2]
    return _UNICODE_PREFIX + data


def exif_with_user_comment(comment: bytes) -> bytes:
    """A minimal EXIF block: IFD0 -> Exif IFD -> UserComment, typed UNDEFINED as the standard says.

    Pillow would type the tag BYTE, which piexif (and so AUTOMATIC1111) then fails to decode.
    """
    import struct

    exif_ifd_at = 8 + 2 + 12 + 4  # header, IFD0 with one entry and its next-IFD link
    data_at = exif_ifd_at + 2 + 12 + 4
    tiff = b"MM\x00\x2a" + struct.pack(">I", 8)
    tiff += struct.pack(">H", 1) + struct.pack(">HHII", _EXIF_IFD, 4, 1, exif_ifd_at) + struct.pack(">I", 0)
    tiff += struct.pack(">H", 1) + struct.pack(">HHII", _USER_COMMENT, 7, len(comment), data_at)
    tiff += struct.pack(">I", 0) + comment
    return b"Exif\x00\x00" + tiff


def encode_image(image, fmt: str, params: GenerationParams, quality: int = 95) -> bytes:
    """The image file's bytes in `fmt` with `params` embedded."""
    from PIL import PngImagePlugin

    if fmt not in FORMATS:
        raise ValueError(f"unknown image format {fmt!r}; valid formats: {', '.join(FORMATS)}")
    buf = io.BytesIO()
    text = params.to_a1111()
    if fmt == "png":
        info = PngImagePlugin.PngInfo()
        info.add_itxt("parameters", text) if not text.isascii() else info.add_text("parameters", text)
        image.save(buf, format="PNG", pnginfo=info)
    else:
        exif = exif_with_user_comment(user_comment(text))
        image.save(buf, format="JPEG" if fmt == "jpeg" else "WEBP", quality=quality, exif=exif)
    return buf.getvalue()


def read_parameters(path: str | Path) -> str | None:
    """The embedded `parameters` text of an image file written by us or by AUTOMATIC1111."""
    from PIL import Image

    with Image.open(path) as im:
        if "parameters" in im.info:
            return im.info["parameters"]
        raw = im.getexif().get_ifd(_EXIF_IFD).get(_USER_COMMENT)
    if not raw:
        return None
    if raw.startswith(_UNICODE_PREFIX):
        return raw[len(_UNICODE_PREFIX):].decode("utf-16-be", errors="replace")
    return raw[8:].decode("ascii", errors="replace").rstrip("\x00")


def save_image(image, directory: str | Path, stem: str, fmt: str, params: GenerationParams,
               quality: int = 95) -> Path:
    """Write atomically to `directory/stem.ext` (or `stem-2.ext`, ... if taken); return the path.

    The file gets the umask's mode like any new file; an OS error (disk full, a size limit, no
    permission) is an OutputError naming the path and the cause, and leaves no temporary behind.
    """
    from coreml_sd.outputs import create_temporary, output_errors, publish

    directory = Path(directory)
    data = encode_image(image, fmt, params, quality)
    with output_errors("the image", directory / f"{stem}{FORMATS[fmt]}"):
        directory.mkdir(parents=True, exist_ok=True)
        fd, tmp = create_temporary(directory / f"{stem}{FORMATS[fmt]}")
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
            return _publish_free_name(tmp, directory, stem, FORMATS[fmt], publish)
        finally:
            tmp.unlink(missing_ok=True)


def _publish_free_name(tmp: Path, directory: Path, stem: str, ext: str, publish) -> Path:
    for n in range(1, 10_000):
        path = directory / f"{stem}{'' if n == 1 else f'-{n}'}{ext}"
        try:
            publish(tmp, path)  # fails if the name exists: never overwrite an earlier image
            return path
        except FileExistsError:
            continue
    raise FileExistsError(errno.EEXIST, f"no free file name for {stem} in {directory}", str(directory))
