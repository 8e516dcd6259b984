"""Subject photos: found in a folder or any fsspec URL, decoded, oriented, made RGB, cropped square."""

from __future__ import annotations

import io
import logging
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
    if not data:
        raise ImageError(f"{name}: empty file")
    try:
        im = Image.open(io.BytesIO(data))
        full_w, full_h = im.size  # before draft(): the real photo's size
        if im.getexif().get(0x0112) in _TRANSPOSED:
            full_w, full_h = full_h, full_w
        # JPEG decodes at a reduced scale when the target is much smaller: a 12000px photo stays cheap.
        im.draft("RGB", (resolution, resolution))
        n_frames = getattr(im, "n_frames", 1)
        if n_frames > 1:
            log.warning("%s: animated image with %d frames; using the first", name, n_frames)
        im.load()
        im = ImageOps.exif_transpose(im)
        nw, nh, left, top = square_box(*im.size, resolution)
        return square(to_rgb(im), resolution), (full_h, full_w, top, left, nh, nw)
    except ImageError:
        raise
    except Image.DecompressionBombError as e:
        raise ImageError(f"{name}: image too large to decode safely ({e})") from None
    except Exception as e:  # Pillow raises many types for damaged files
        raise ImageError(f"{name}: not a readable image ({type(e).__name__}: {e})") from None


def list_images(url: str, s3: S3Settings | None = None) -> list[str]:
    fs, root = filesystem(url, s3)
    if not fs.exists(root):
        raise ImageError(f"{url}: subject image location does not exist")
    if not fs.isdir(root):
        raise ImageError(f"{url}: subject images must be a folder (or prefix), not a file")
    files = [p for p in fs.find(root) if p.lower().endswith(IMAGE_EXTENSIONS)]
    skipped = [p for p in fs.find(root) if not p.lower().endswith(IMAGE_EXTENSIONS) and not _hidden(p, root)]
    for p in skipped:
        log.warning("%s: not an image extension (%s); ignored", _rel(p, root), ", ".join(IMAGE_EXTENSIONS))
    return sorted(p for p in files if not _hidden(p, root))


def load_subject_images(
    url: str, resolution: int, s3: S3Settings | None = None, skip_bad: bool = False
) -> list[SubjectImage]:
    fs, root = filesystem(url, s3)
    out: list[SubjectImage] = []
    bad: list[str] = []
    for path in list_images(url, s3):
        name = _rel(path, root)
        try:
            data = fs.cat_file(path)
            count_io(read=len(data))
            out.append(SubjectImage(name, *decode_with_geometry(data, f"{url.rstrip('/')}/{name}",
                                                                 resolution)))
        except ImageError as e:
            bad.append(str(e))
            if skip_bad:
                log.warning("skipping bad image: %s", e)
    if bad and not skip_bad:  # every bad file at once: one fix-and-retry, not one per file
        # One line: the results table shows a failed subject's first line.
        raise ImageError(f"{len(bad)} bad image(s) (fix or remove them, or set skip_bad_images: true): "
                         + "; ".join(bad))
    if len(out) < MIN_IMAGES:
        raise ImageError(f"{url}: {len(out)} usable image(s); DreamBooth needs at least {MIN_IMAGES}")
    if len(out) > MAX_IMAGES:
        log.warning("%s: %d images; DreamBooth works best with 3-%d", url, len(out), MAX_IMAGES)
    return out


def _rel(path: str, root: str) -> str:
    return path[len(root):].lstrip("/")


def _hidden(path: str, root: str) -> bool:
    return any(seg.startswith(".") for seg in _rel(path, root).split("/"))
