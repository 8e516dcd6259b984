"""Subject photos: found in a folder or any fsspec URL, decoded, oriented, made RGB, cropped square."""

from __future__ import annotations

import io
import logging
import re
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps

from .errors import UserError
from .settings import S3Settings
from .storage import count_io, filesystem

log = logging.getLogger("dreambooth_ray")

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp")
MIN_IMAGES, MAX_IMAGES = 3, 50


class ImageError(UserError, ValueError):
    """A subject image (or image set) that cannot be used; the message names the file."""


@dataclass(frozen=True)
class SubjectImage:
    name: str  # path relative to the subject folder
    image: Image.Image  # RGB, resolution x resolution
    # (original h, original w, crop top, crop left, resized h, resized w): the oriented photo's full
    # size, where the square crop sits in the photo resized to `resolution` on its short side, and
    # that resized size. What SDXL conditions on (its time ids).
    geometry: tuple[int, int, int, int, int, int] | None = None


def to_rgb(im: Image.Image) -> Image.Image:
    """Any mode to 8-bit RGB; transparency is flattened onto white, 16-bit is scaled, not clipped."""
    if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        arr = np.asarray(im, dtype=np.float64)
        peak = 65535.0 if im.mode.startswith("I;16") or arr.max() > 255 else 255.0
        im = Image.fromarray(np.clip(arr / peak * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    if im.mode == "P":
        im = im.convert("RGBA")
    if im.mode in ("RGBA", "LA", "PA"):
        im = im.convert("RGBA")
        bg = Image.new("RGBA", im.size, (255, 255, 255, 255))
        im = Image.alpha_composite(bg, im)
    return im.convert("RGB")


def square_box(w: int, h: int, resolution: int) -> tuple[int, int, int, int]:
    """(resized w, resized h, crop left, crop top) of `square` for a w x h image."""
    scale = resolution / min(w, h)
    nw, nh = max(resolution, round(w * scale)), max(resolution, round(h * scale))
    return nw, nh, (nw - resolution) // 2, (nh - resolution) // 2


def square(im: Image.Image, resolution: int) -> Image.Image:
    """Resize the shorter side to `resolution` and center-crop: the subject is usually centered."""
    w, h = im.size
    nw, nh, left, top = square_box(w, h, resolution)
    im = im.resize((nw, nh), Image.Resampling.LANCZOS if resolution < min(w, h) else Image.Resampling.BICUBIC)
    return im.crop((left, top, left + resolution, top + resolution))


_TRANSPOSED = (5, 6, 7, 8)  # EXIF orientations that swap width and height


def decode(data: bytes, name: str, resolution: int) -> Image.Image:
    return decode_with_geometry(data, name, resolution)[0]


def decode_with_geometry(data: bytes, name: str, resolution: int) -> tuple[Image.Image, tuple]:
    """The square training image and its geometry (see SubjectImage.geometry)."""
    try:
        return _decode(data, name, resolution)
    except Exception as e:  # Pillow raises many types for damaged files
        raise ImageError(f"{name}: {why_unreadable(data, e)}") from None


def _decode(data: bytes, name: str, resolution: int, warn: bool = True) -> tuple[Image.Image, tuple]:
    if not data:
        raise EOFError
    im = Image.open(io.BytesIO(data))
    full_w, full_h = im.size  # before draft(): the real photo's size
    if im.getexif().get(0x0112) in _TRANSPOSED:
        full_w, full_h = full_h, full_w
    # JPEG decodes at a reduced scale when the target is much smaller: a 12000px photo stays cheap.
    im.draft("RGB", (resolution, resolution))
    n_frames = getattr(im, "n_frames", 1)
    if n_frames > 1 and warn:
        log.warning("%s: animated image with %d frames; using the first", name, n_frames)
    im.load()
    im = ImageOps.exif_transpose(im)
    nw, nh, left, top = square_box(*im.size, resolution)
    return square(to_rgb(im), resolution), (full_h, full_w, top, left, nh, nw)


# What a file that Pillow cannot open begins with, when it is something else a user may have picked up.
_NOT_IMAGES = ((b"%PDF", "a PDF document"), (b"PK\x03\x04", "a zip archive"), (b"\x1f\x8b", "a gzip archive"),
               (b"II*\x00", "a TIFF image"), (b"MM\x00*", "a TIFF image"))
_IMAGE_STARTS = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"RIFF")  # JPEG, PNG, WebP (RIFF....WEBP)


def why_unreadable(data: bytes, e: BaseException) -> str:
    """What is wrong with an image file, in words (Pillow's messages carry object reprs and codec jargon)."""
    if not data:
        return "empty file (0 bytes)"
    if isinstance(e, Image.DecompressionBombError):
        return f"too large to decode safely ({re.sub(r', could be.*', '', str(e))})"
    if isinstance(e, Image.UnidentifiedImageError):
        head = data[:48]
        for magic, what in _NOT_IMAGES:
            if head.startswith(magic):
                return f"not a JPEG, PNG or WebP image: it is {what}"
        if head[4:12] in (b"ftypheic", b"ftypheix", b"ftypmif1", b"ftypavif", b"ftyphevc"):
            return "a HEIC/AVIF photo, which this reader cannot decode (convert it to JPEG or PNG)"
        if head.startswith(_IMAGE_STARTS):
            return "truncated: the file ends before the image data does"
        text = head.decode("utf-8", "replace").rstrip("\ufffd")  # (a character cut at byte 48)
        if text and "\ufffd" not in text and all(c.isprintable() or c in "\r\n\t" for c in text):
            return f"not an image (it begins with text: {text[:24].strip()!r})"
        return f"not an image (it begins with bytes {head[:8].hex(' ')})"
    msg = str(e)
    if "truncated" in msg.lower() or isinstance(e, EOFError) or (
            data.startswith(b"RIFF") and int.from_bytes(data[4:8], "little") + 8 > len(data)):
        return "truncated: the file ends before the image data does"
    msg = re.sub(r"<[^<>]* at 0x[0-9a-fA-F]+>", "the file", msg)  # no object reprs in a user's error
    return f"damaged image data ({type(e).__name__}: {msg})" if msg else f"damaged image data ({type(e).__name__})"


def list_images(url: str, s3: S3Settings | None = None, quiet: bool = False) -> list[str]:
    """The image files under `url`, sorted; a file with another extension is ignored (with a warning
    unless `quiet`: the preflight said it once)."""
    fs, root = filesystem(url, s3)
    if not fs.exists(root):
        raise ImageError(f"{url}: image location does not exist")
    if not fs.isdir(root):
        raise ImageError(f"{url}: images must be a folder (or prefix), not a file")
    found = [p for p in fs.find(root) if not _hidden(p, root)]
    if not quiet:
        for p in found:
            if not p.lower().endswith(IMAGE_EXTENSIONS):
                log.warning("%s: not an image extension (%s); ignored", _rel(p, root), ", ".join(IMAGE_EXTENSIONS))
    return sorted(p for p in found if p.lower().endswith(IMAGE_EXTENSIONS))


def listing(url: str, s3: S3Settings | None = None) -> list[tuple[str, int]]:
    """(name, size) of each image under `url`; empty where there is none (the preflight says why)."""
    fs, root = filesystem(url, s3)
    try:
        found = fs.find(root, detail=True)
    except (FileNotFoundError, NotADirectoryError):
        return []
    return sorted((_rel(p, root), int(info.get("size") or 0)) for p, info in found.items()
                  if p.lower().endswith(IMAGE_EXTENSIONS) and not _hidden(p, root))


def read_images(url: str, resolution: int, s3: S3Settings | None = None,
                quiet: bool = False) -> tuple[list[SubjectImage], list[tuple[str, str]]]:
    """Every image under `url` decoded, and (name, reason in words) for each file that is not."""
    fs, root = filesystem(url, s3)
    out, bad = [], []
    for path in list_images(url, s3, quiet):
        name = _rel(path, root)
        data = fs.cat_file(path)
        count_io(read=len(data))
        try:
            out.append(SubjectImage(name, *_decode(data, f"{url.rstrip('/')}/{name}", resolution, not quiet)))
        except Exception as e:  # noqa: BLE001 -- Pillow raises many types for damaged files
            bad.append((name, why_unreadable(data, e)))
    return out, bad


def load_subject_images(
    url: str, resolution: int, s3: S3Settings | None = None, skip_bad: bool = False, quiet: bool = False
) -> list[SubjectImage]:
    """A subject's usable photos. `quiet`: no warning per skipped file (the preflight gave it: one
    message per bad file, not one per stage that reads the photos)."""
    out, bad = read_images(url, resolution, s3, quiet)
    named = [f"{url.rstrip('/')}/{name}: {why}" for name, why in bad]
    if bad and not skip_bad:  # every bad file at once: one fix-and-retry, not one per file
        # One line: the results table shows a failed subject's first line.
        raise ImageError(f"{len(bad)} bad image(s) (fix or remove them, or set skip_bad_images: true): "
                         + "; ".join(named))
    if not quiet:
        for line in named:
            log.warning("skipping bad image: %s", line)
    if len(out) < MIN_IMAGES:
        raise ImageError(f"{url}: {len(out)} usable image(s); DreamBooth needs at least {MIN_IMAGES}")
    if len(out) > MAX_IMAGES and not quiet:
        log.warning("%s: %d images; DreamBooth works best with 3-%d", url, len(out), MAX_IMAGES)
    return out


def _rel(path: str, root: str) -> str:
    return path[len(root):].lstrip("/")


def _hidden(path: str, root: str) -> bool:
    return any(seg.startswith(".") for seg in _rel(path, root).split("/"))
