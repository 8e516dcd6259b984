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
    # [resolution, resolution] float32 in [0, 1], 1 = subject: from the photo's alpha channel or
    # masks/<name>, cropped with the photo. Weights the subject loss (train.masked_loss); None: no mask.
    mask: np.ndarray | None = None
    caption: str | None = None  # <stem>.txt beside the photo: its instance prompt template (kohya's convention)


MASKS = "masks"  # the folder beside the photos that holds their masks (same names; white = subject)


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


def _decode(data: bytes, name: str, resolution: int, warn: bool = True, mask: bytes | None = None,
            mask_name: str = "") -> tuple[Image.Image, tuple] | tuple[Image.Image, tuple, np.ndarray | None]:
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
    geometry = (full_h, full_w, top, left, nh, nw)
    if mask is None and not mask_name:
        return square(to_rgb(im), resolution), geometry
    return square(to_rgb(im), resolution), geometry, _mask(im, mask, mask_name, resolution)


def _mask(photo: Image.Image, data: bytes | None, name: str, resolution: int) -> np.ndarray | None:
    """The photo's subject mask, cropped as the photo is: a masks/ file (any image, white = subject),
    else the photo's own alpha channel when it has a non-trivial one, else None."""
    if data is not None:
        try:
            m = ImageOps.exif_transpose(Image.open(io.BytesIO(data)))
            m = m.convert("RGBA").getchannel("A") if m.mode in ("RGBA", "LA", "PA") and _alpha_only(m) else m.convert("L")
        except Exception as e:  # noqa: BLE001 -- Pillow raises many types for damaged files
            raise ImageError(f"{name}: {why_unreadable(data, e)}") from None
        (w, h), (pw, ph) = m.size, photo.size
        if abs(w / h - pw / ph) > 0.02 * pw / ph:  # a mask of another photo, or another crop of it
            raise ImageError(f"{name}: mask is {w}x{h}, its photo {pw}x{ph} (not the same shape)")
        if m.size != photo.size:
            m = m.resize(photo.size, Image.Resampling.BILINEAR)
    else:
        m = cutout_alpha(photo)
        if m is None:
            return None
        name = f"{name}: alpha channel"
    arr = np.asarray(square(m, resolution), dtype=np.float32) / 255.0
    if arr.max() == 0:
        raise ImageError(f"{name}: the mask has no subject (all black) in the photo's square crop")
    return arr


def cutout_alpha(photo: Image.Image) -> Image.Image | None:
    """A photo's alpha channel where it cuts the subject out; None where there is none, or it is opaque
    (a mask of ones: the same loss as no mask) or all transparent (no cut-out either). Training
    (`_mask`) and the run's identity (`side_files`) both ask this, so they agree on what is masked."""
    if not (photo.mode in ("RGBA", "LA", "PA") or (photo.mode == "P" and "transparency" in photo.info)):
        return None  # (an RGB/L PNG's colour-key transparency: to_rgb does not composite it either)
    a = photo.convert("RGBA").getchannel("A")
    lo, hi = a.getextrema()
    return None if lo == 255 or hi == 0 else a


def _alpha_only(m: Image.Image) -> bool:
    """A cut-out saved as the mask (RGBA with transparency): its alpha is the mask, not its colours."""
    return m.convert("RGBA").getchannel("A").getextrema()[0] < 255


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
        stems = {_stem(p) for p in found if p.lower().endswith(IMAGE_EXTENSIONS)}
        for p in found:
            if not p.lower().endswith(IMAGE_EXTENSIONS) and not (p.lower().endswith(".txt") and _stem(p) in stems):
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
    masks = _by_stem(fs, f"{root}/{MASKS}")
    for path in list_images(url, s3, quiet):
        name = _rel(path, root)
        data = fs.cat_file(path)
        count_io(read=len(data))
        where = f"{url.rstrip('/')}/{name}"
        mask_path = masks.get(name) or masks.get(_stem(name))
        mask = fs.cat_file(mask_path) if mask_path else None
        mask_name = f"{url.rstrip('/')}/{_rel(mask_path, root)}" if mask_path else where
        try:
            im, geometry, m = _decode(data, where, resolution, not quiet, mask, mask_name)
        except ImageError as e:  # the mask: named in its message
            bad.append((name, str(e).split(": ", 1)[1] if str(e).startswith(where + ":") else str(e)))
            continue
        except Exception as e:  # noqa: BLE001 -- Pillow raises many types for damaged files
            bad.append((name, why_unreadable(data, e)))
            continue
        try:
            caption = read_caption(fs, path, where)
        except ImageError as e:
            bad.append((name, str(e)))
            continue
        out.append(SubjectImage(name, im, geometry, m, caption))
    return out, bad


CAPTION_FIELDS = {"identifier", "class_noun"}


def read_caption(fs, photo_path: str, where: str) -> str | None:
    """<stem>.txt beside a photo: its instance prompt template; an unknown placeholder is an error naming the file."""
    import string

    txt = photo_path.rsplit(".", 1)[0] + ".txt"
    if not fs.exists(txt):
        return None
    name = where.rsplit(".", 1)[0] + ".txt"
    try:
        text = fs.cat_file(txt).decode("utf-8").strip()
        fields = {f for _, f, _, _ in string.Formatter().parse(text) if f is not None}
    except (UnicodeDecodeError, ValueError) as e:
        raise ImageError(f"{name}: caption is not a prompt template ({e})") from None
    if fields - CAPTION_FIELDS or not text:
        raise ImageError(f"{name}: " + (f"unknown placeholder(s) {sorted(fields - CAPTION_FIELDS)} (use {{identifier}} "
                                        "and {class_noun})" if text else "empty caption"))
    return text


def _stem(name: str) -> str:
    return name.rsplit(".", 1)[0]


def _by_stem(fs, folder: str, found: list[str] | None = None) -> dict[str, str]:
    """{name and stem: path} of the images in a masks/ folder (a JPEG photo's mask is often a PNG);
    `found`: its files, already listed."""
    try:
        found = [p for p in (fs.find(folder) if found is None else found) if p.lower().endswith(IMAGE_EXTENSIONS)]
    except (FileNotFoundError, NotADirectoryError):
        return {}
    out = {}
    for p in sorted(found):
        rel = _rel(p, folder)
        out[rel] = p
        out.setdefault(_stem(rel), p)
    return out


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


def side_files(url: str, s3: S3Settings | None = None) -> dict:
    """What beside a subject's photos changes its training: {"masks": [n, hash], "captions": [n, hash]},
    n the photos with a mask (`SubjectImage.mask` not None: a masks/ file, else a cut-out alpha channel,
    not an opaque one) or with a <stem>.txt caption, hash over each photo's mask or caption bytes; each
    absent where there are none. For the run's identity (a changed mask or caption is a new run) and
    job.json. Asked several times per subject per job: memoised on the folder's listing (`_memoised`)."""
    return _memoised("side_files", url, s3, _side_files)


def _side_files(fs, root: str, found: list[str]) -> dict:
    import hashlib

    names = set(found)
    masks = _by_stem(fs, f"{root}/{MASKS}", [p for p in found if _rel(p, root).startswith(MASKS + "/")])
    out: dict = {}

    def add(kind: str, photo: str, data: bytes) -> None:
        count_io(read=len(data))
        n, h = out.setdefault(kind, [0, hashlib.sha256()])
        h.update(_rel(photo, root).encode() + b"\0" + hashlib.sha256(data).digest())
        out[kind][0] = n + 1

    for p in found:  # as read_images pairs each photo with its mask and caption
        if not p.lower().endswith(IMAGE_EXTENSIONS) or _hidden(p, root):
            continue
        name = _rel(p, root)
        mask = masks.get(name) or masks.get(_stem(name))
        if mask:
            add("masks", p, fs.cat_file(mask))
        elif _has_alpha(fs, p):  # the header says so: then the pixels decide (cutout_alpha)
            data = fs.cat_file(p)
            try:
                cut = cutout_alpha(Image.open(io.BytesIO(data))) is not None
            except Exception:  # noqa: BLE001 -- a bad photo: the preflight names it
                cut = False
            if cut:
                add("masks", p, data)
        if _stem(p) + ".txt" in names:
            add("captions", p, fs.cat_file(_stem(p) + ".txt"))
    return {k: [n, h.hexdigest()[:16]] for k, (n, h) in out.items()}


def _has_alpha(fs, path: str) -> bool:
    """Whether an image's header gives it an alpha channel (read by content, as training decodes it:
    not by its extension); only the header is read."""
    try:
        with fs.open(path, "rb", block_size=1 << 16) as f:
            im = Image.open(f)
            return im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info)
    except Exception:  # noqa: BLE001 -- a bad photo: the preflight names it
        return False


def content_digest(url: str, s3: S3Settings | None = None) -> list:
    """[[name, size, sha256 of its bytes]] of the images under `url` (as `listing` lists them): what a set of
    images is, an edit in place at the same size included. Memoised on the folder's listing."""
    return _memoised("content_digest", url, s3, _content_digest)


def _content_digest(fs, root: str, found: list[str]) -> list:
    import hashlib

    out = []
    for p in found:
        if p.lower().endswith(IMAGE_EXTENSIONS) and not _hidden(p, root):
            data = fs.cat_file(p)
            count_io(read=len(data))
            out.append([_rel(p, root), len(data), hashlib.sha256(data).hexdigest()[:16]])
    return out


# (what, url, S3 endpoint) -> (the folder's listing signature, the answer). A local file's mtime ticks
# coarsely (a jiffy; seconds on some filesystems), so an answer over a file changed within RACY_S of the
# listing is not kept: a second same-size edit in that tick would keep its mtime (git's "racily clean").
_MEMO: dict = {}
RACY_S = 2.0


def _memoised(what: str, url: str, s3: S3Settings | None, compute):
    """compute(fs, root, sorted paths) for the folder at `url`, recomputed only when its listing (names,
    sizes, and S3 ETags, which change with the bytes, or local mtimes) differs from the last answer's:
    one listing per call, the files read once per change. {} / [] where the folder does not exist."""
    import copy
    import time

    fs, root = filesystem(url, s3)
    listed_at = time.time()
    try:
        found = {p: info for p, info in fs.find(root, detail=True).items()
                 if not any(seg.startswith(".") for seg in _rel(p, root).split("/"))}
    except (FileNotFoundError, NotADirectoryError):
        found = {}
    if not found:
        return compute(fs, root, [])
    sig = sorted((_rel(p, root), info.get("size"), info.get("ETag") or info.get("etag") or info.get("mtime"))
                 for p, info in found.items())
    key = (what, url, s3 and s3.endpoint_url)
    hit = _MEMO.get(key)
    if hit is not None and hit[0] == sig:
        return copy.deepcopy(hit[1])
    answer = compute(fs, root, sorted(found))
    racy = any(not (info.get("ETag") or info.get("etag")) and float(info.get("mtime") or listed_at) > listed_at - RACY_S
               for info in found.values())
    if racy:
        _MEMO.pop(key, None)
    else:
        _MEMO[key] = (sig, copy.deepcopy(answer))
    return answer


def _rel(path: str, root: str) -> str:
    return path[len(root):].lstrip("/")


def _hidden(path: str, root: str) -> bool:
    """Hidden files, and the masks/ folder beside the photos (masks, not photos)."""
    segs = _rel(path, root).split("/")
    return any(seg.startswith(".") for seg in segs) or (len(segs) > 1 and segs[0] == MASKS)
