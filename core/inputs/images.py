"""Opening product photos safely and quickly.

Every photo an analyst uploads passes through here: :func:`inspect_image` at intake (does
it really decode? how big is it?), :func:`load_for_model` in the feature-extraction
workers, :func:`make_thumbnail` for galleries and reports, and :func:`preview` for whatever a
page draws (a placeholder where a photo cannot be shown). Whatever arrives (a truncated export,
a PDF renamed ``.jpg``, a CMYK print file, a 16-bit scan, a 900-megapixel poster), the
result is either an 8-bit RGB image or an :class:`ImageError` whose text can be shown to
the analyst as it is.

Decoding is bounded: the pixel count is checked from the file header before any pixel is
decoded (:data:`MAX_PIXELS`), and JPEGs destined for a 224 px model are decoded at a
reduced scale by libjpeg itself (``draft``), which is about four times faster than a full
decode followed by a resize and gives nearly the same pixels.

Pillow's global settings are left alone: ``ImageFile.LOAD_TRUNCATED_IMAGES`` must stay
``False`` (it is what lets a half-downloaded JPEG be caught), and
``Image.MAX_IMAGE_PIXELS`` is not changed (see :data:`MAX_PIXELS`).
"""

from __future__ import annotations

import functools
import io
import logging
import os
import re
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import IO

import numpy as np
from PIL import ExifTags, Image, ImageCms, ImageDraw, ImageOps, UnidentifiedImageError, features
from PIL.JpegImagePlugin import JpegImageFile

from core.inputs.filekinds import binary_kind

log = logging.getLogger(__name__)

ImageSource = str | os.PathLike[str] | bytes | bytearray | memoryview
"""A path to an image file, or the file's bytes."""

MAX_PIXELS: int = 80_000_000
"""Largest image accepted, in pixels (width × height, 80 MP by default).

A 80 MP RGB image takes 240 MB once decoded; a hostile or mistaken upload (a poster
exported at 30000×30000) must be refused before its pixels are decoded. Override with the
environment variable ``CATALOG_LENS_MAX_PIXELS`` (read at every call). Pillow keeps its own,
separate hard stop at ``2 * PIL.Image.MAX_IMAGE_PIXELS`` (about 179 MP); this module never
changes that global, so raising the limit beyond it also needs
``PIL.Image.MAX_IMAGE_PIXELS`` raised by the application at start-up.
"""

_ENV_MAX_PIXELS = "CATALOG_LENS_MAX_PIXELS"

_HAS_AVIF = features.check("avif")
try:  # iPhone photos (HEIC): pillow-heif adds the "HEIF" format to Pillow, opened only through here
    import pillow_heif

    pillow_heif.register_heif_opener()
    _HAS_HEIF = True
except ImportError:  # pragma: no cover - a requirement; without it HEIC gets a plain refusal
    _HAS_HEIF = False

IMAGE_EXTENSIONS: frozenset[str] = frozenset(
    {".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".webp", ".gif", ".bmp", ".dib", ".tif", ".tiff"}
    | ({".avif"} if _HAS_AVIF else set())
    | ({".heic", ".heif"} if _HAS_HEIF else set())
)
"""File-name extensions (lower case, with the dot) of the photo formats we decode."""

PHOTO_NAME_EXTENSIONS: frozenset[str] = IMAGE_EXTENSIONS | {".heic", ".heif", ".avif"}
"""The extensions that make a name in a sheet a photo: the ones we decode, and the phone and web
formats whose decoder may be missing here, so that such a photo is named and refused plainly
instead of the cell not being taken for a photo at all."""

# Only these Pillow plugins are ever tried. Besides matching IMAGE_EXTENSIONS, this keeps
# exotic decoders (EPS runs Ghostscript, for one) away from untrusted uploads.
# (Multi-picture JPEGs from cameras, MPO, are opened by the JPEG plugin.)
_PIL_FORMATS: tuple[str, ...] = (
    ("JPEG", "PNG", "WEBP", "GIF", "BMP", "DIB", "TIFF") + (("AVIF",) if _HAS_AVIF else ()) + (("HEIF",) if _HAS_HEIF else ())
)

_SNIFF_BYTES = 512
_WHITE = (255, 255, 255)


class ImageError(ValueError):
    """A photo that cannot be used; ``str(err)`` is a plain reason for the analyst.

    The reason never names the file (the caller knows the name the analyst uses, which may
    be a path inside a zip). ``kind`` is a short code suitable for :class:`Problem.kind`:
    ``"empty_file"``, ``"truncated_image"``, ``"not_an_image"``, ``"image_too_large"``,
    ``"unsupported_image"``, ``"corrupt_image"`` or ``"unreadable_file"``.
    """

    def __init__(self, reason: str, *, kind: str = "corrupt_image") -> None:
        super().__init__(reason)
        self.kind = kind


@dataclass(frozen=True)
class ImageInfo:
    """What intake records about a photo; width and height are as displayed (EXIF-rotated)."""

    width: int
    height: int
    format: str
    mode: str


def looks_like_image_name(name: str) -> bool:
    """True when a file name has a photo extension we decode (and is not a macOS ``._`` stub)."""
    base = name.replace("\\", "/").rsplit("/", 1)[-1]
    if base.startswith("._"):
        return False
    return os.path.splitext(base)[1].lower() in IMAGE_EXTENSIONS


def inspect_image(source: ImageSource) -> ImageInfo:
    """Check that a photo really decodes, and return its size, format and colour mode.

    Run at intake for every uploaded file so that a damaged photo is reported once, by
    name, instead of failing later inside feature extraction. JPEGs are decoded at 1/8
    scale: every byte of the file is still read and decoded, so a cut-short file is
    caught, at a fraction of the cost of a full decode.
    """
    with _opened(source) as img:
        width, height = img.size
        fmt, mode = img.format or "unknown", img.mode
        if _orientation(img) in (5, 6, 7, 8):
            width, height = height, width
        if isinstance(img, JpegImageFile):
            img.draft("L", (1, 1))
        img.load()
    return ImageInfo(width=width, height=height, format=fmt, mode=mode)


def load_rgb(source: ImageSource, *, min_side: int | None = None) -> Image.Image:
    """Decode a photo into an upright 8-bit RGB image, whatever its format or colour mode.

    Transparency is flattened on white (the catalog background), CMYK print files and
    16-bit or floating-point greyscale are converted to what a person would see, and only
    the first frame of an animation is kept. With ``min_side``, a JPEG is decoded at the
    smallest libjpeg scale (1/2, 1/4 or 1/8) that keeps both sides at least
    ``2 * min_side`` (so the shorter side stays >= ``min_side``); nothing is ever scaled up,
    and no other resizing is done here (the model's own transform resizes).
    """
    if min_side is not None and min_side < 1:
        raise ValueError(f"min_side must be a positive number of pixels, got {min_side!r}")
    with _opened(source) as img:
        if min_side is not None and isinstance(img, JpegImageFile):
            img.draft("RGB", (2 * min_side, 2 * min_side))
        img.load()
        try:
            ImageOps.exif_transpose(img, in_place=True)
        except _PIL_FAILURES:
            # Unreadable EXIF only loses the orientation hint; the pixels are still good.
            log.debug("ignoring unreadable EXIF orientation", exc_info=True)
        return _to_rgb(img)


def load_for_model(source: ImageSource, *, size: int) -> Image.Image:
    """The fast path for feature extraction: :func:`load_rgb` with ``min_side=size``."""
    return load_rgb(source, min_side=size)


def make_thumbnail(source: ImageSource, *, size: int = 256, quality: int = 85) -> bytes:
    """A small JPEG of the photo (longest side <= ``size``) for galleries and reports."""
    if size < 1:
        raise ValueError(f"size must be a positive number of pixels, got {size!r}")
    if not 1 <= quality <= 95:
        raise ValueError(f"quality must be between 1 and 95, got {quality!r}")
    img = load_rgb(source, min_side=size)
    img.thumbnail((size, size), Image.Resampling.BICUBIC)
    out = io.BytesIO()
    img.save(out, format="JPEG", quality=quality)
    return out.getvalue()


def preview(source: ImageSource | None, *, size: int = 256) -> bytes:
    """What the app draws for a photo: :func:`make_thumbnail`, or :func:`placeholder` when the photo
    is missing (None) or cannot be decoded. Never raises for bad input, so one broken photo can
    never stop a page; every photo the UI shows goes through here."""
    if source is not None:
        try:
            return make_thumbnail(source, size=size)
        except ImageError as exc:
            log.debug("drawing a placeholder: %s", exc)
    return placeholder(size=size)


@functools.lru_cache(maxsize=8)
def placeholder(*, size: int = 256) -> bytes:
    """A light grey square with a crossed-out frame, drawn where a photo cannot be shown."""
    img = Image.new("RGB", (size, size), (236, 238, 241))
    draw, m = ImageDraw.Draw(img), size // 4
    draw.rectangle((m, m, size - m, size - m), outline=(160, 165, 172), width=max(1, size // 64))
    draw.line((m, m, size - m, size - m), fill=(160, 165, 172), width=max(1, size // 64))
    out = io.BytesIO()
    img.save(out, format="JPEG", quality=85)
    return out.getvalue()


# --------------------------------------------------------------------------- opening

# What Pillow raises for undecodable input. Plugins are not consistent, so the list is
# wide; MemoryError and the decompression-bomb checks are handled separately.
_PIL_FAILURES: tuple[type[BaseException], ...] = (
    OSError,
    SyntaxError,
    ValueError,
    EOFError,
    struct.error,
    IndexError,
    KeyError,
    TypeError,
    ZeroDivisionError,
    OverflowError,
)


def max_pixels() -> int:
    """The pixel limit in force now: ``CATALOG_LENS_MAX_PIXELS`` when set, else :data:`MAX_PIXELS`.

    Public so that other decoding paths (the GPU JPEG path) apply the same limit.
    """
    raw = os.environ.get(_ENV_MAX_PIXELS, "").strip()
    if raw:
        try:
            value = int(raw)
        except ValueError:
            value = 0
        if value > 0:
            return value
        log.warning("ignoring %s=%r: not a positive whole number", _ENV_MAX_PIXELS, raw)
    return MAX_PIXELS


@contextmanager
def _opened(source: ImageSource) -> Iterator[Image.Image]:
    """Open ``source`` lazily, refuse it if too large, and turn every failure into ImageError."""
    fp: IO[bytes]
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
        if not data:
            raise ImageError("the file is empty (0 bytes)", kind="empty_file")
        fp = io.BytesIO(data)
    else:
        fp = _open_file(source)
    with fp:
        head = fp.read(_SNIFF_BYTES)
        if not head:
            raise ImageError("the file is empty (0 bytes)", kind="empty_file")
        fp.seek(0)
        try:
            try:
                img = Image.open(fp, formats=_PIL_FORMATS)
            except UnidentifiedImageError as exc:
                raise _not_an_image(head) from exc
            with img:
                _check_pixels(img.size)
                yield img
        except ImageError:
            raise
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            # Pillow's own limit fired: its hard stop is above ~179 MP, its warning (above
            # ~89 MP) only arrives here when a warnings filter turns it into an error.
            pil_limit = Image.MAX_IMAGE_PIXELS or 0
            if isinstance(exc, Image.DecompressionBombError):
                pil_limit *= 2
            limit = min(max_pixels(), pil_limit) if pil_limit else max_pixels()
            raise _too_large(_size_from_header(fp), _pixels_from_message(exc), limit) from exc
        except MemoryError as exc:
            raise ImageError(
                "the image is too large to open on this computer; resize it", kind="image_too_large"
            ) from exc
        except _PIL_FAILURES as exc:
            raise _damaged(exc, head, fp.seek(0, io.SEEK_END)) from exc


def _open_file(path: str | os.PathLike[str]) -> IO[bytes]:
    try:
        return open(path, "rb")
    except FileNotFoundError as exc:
        raise ImageError("the file could not be found", kind="unreadable_file") from exc
    except IsADirectoryError as exc:
        raise ImageError("this is a folder, not a file", kind="unreadable_file") from exc
    except PermissionError as exc:
        raise ImageError("the file could not be read (permission denied)", kind="unreadable_file") from exc
    except OSError as exc:
        raise ImageError(f"the file could not be read ({exc.strerror or exc})", kind="unreadable_file") from exc


def _check_pixels(size: tuple[int, int]) -> None:
    limit = max_pixels()
    if size[0] * size[1] > limit:
        raise _too_large(size, size[0] * size[1], limit)


def _too_large(size: tuple[int, int] | None, pixels: int | None, limit: int) -> ImageError:
    if size:
        what = f"{size[0]}×{size[1]} pixels ({_megapixels(size[0] * size[1])} MP)"
    elif pixels:
        what = f"{_megapixels(pixels)} MP"
    else:
        what = "over the limit"
    return ImageError(
        f"the image is too large: {what}; the limit is {_megapixels(limit)} MP — resize it",
        kind="image_too_large",
    )


def _megapixels(pixels: int) -> str:
    mp = pixels / 1e6
    if mp >= 10:
        return f"{mp:.0f}"
    if mp >= 1:
        return f"{mp:.1f}".removesuffix(".0")
    return f"{mp:.2g}"


def _pixels_from_message(exc: BaseException) -> int | None:
    match = re.search(r"\((\d+) pixels\)", str(exc))
    return int(match.group(1)) if match else None


def _size_from_header(fp: IO[bytes]) -> tuple[int, int] | None:
    """Width and height from the header alone, bypassing Pillow's size check (error path only)."""
    try:
        fp.seek(0)
        prefix = fp.read(16)
        for fmt in _PIL_FORMATS:
            factory, accept = Image.OPEN[fmt]
            if accept is None or accept(prefix):
                fp.seek(0)
                return tuple(factory(fp, "").size)  # type: ignore[return-value]
    except Exception:  # noqa: BLE001 - best effort: the caller still reports the pixel count
        return None
    return None


def _damaged(exc: BaseException, head: bytes, length: int) -> ImageError:
    log.debug("undecodable image", exc_info=exc)
    text = str(exc).lower()
    # libwebp only says "could not create decoder object"; the RIFF header knows the length.
    riff_cut = head[:4] == b"RIFF" and len(head) >= 8 and struct.unpack("<I", head[4:8])[0] + 8 > length
    if isinstance(exc, EOFError) or "truncated" in text or "broken data stream" in text or riff_cut:
        return ImageError("the file is cut short (truncated); export it again", kind="truncated_image")
    return ImageError(
        "unsupported or damaged image data; open it in an image editor and export it again as JPEG or PNG",
        kind="corrupt_image",
    )


# ------------------------------------------------------------------ what is it then?

_EXPORT_HINT = "; export it as JPEG or PNG"


def _not_an_image(head: bytes) -> ImageError:
    """An analyst-readable reason for a file Pillow does not recognise, from its first bytes."""
    brand = head[8:12] if head[4:8] == b"ftyp" else b""
    if brand in (b"heic", b"heix", b"hevc", b"hevx", b"heim", b"heis", b"mif1", b"msf1"):
        if _HAS_HEIF:
            return ImageError("this HEIC photo is damaged or incomplete; export it again", kind="corrupt_image")
        return ImageError(
            "this HEIC photo (the iPhone format) cannot be read; export it as JPEG "
            "(on the iPhone: Settings › Camera › Formats › Most Compatible)",
            kind="unsupported_image",
        )
    if brand in (b"avif", b"avis"):
        return ImageError("this AVIF image cannot be read here" + _EXPORT_HINT, kind="unsupported_image")
    if head.startswith((b"\xff\xd8\xff", b"\x89PNG", b"GIF8", b"BM", b"II*\x00", b"MM\x00*")) or (
        head.startswith(b"RIFF") and head[8:12] == b"WEBP"
    ):
        return ImageError(
            "the image data is damaged (the start of the file is not readable); export it again",
            kind="corrupt_image",
        )
    what = _describe(head)
    if what is None:
        return ImageError(
            "this is not an image format we can read (we accept JPEG, PNG, WebP, GIF, BMP and TIFF)",
            kind="not_an_image",
        )
    hint = _EXPORT_HINT if what in _EXPORTABLE else ""
    return ImageError(f"this is not an image (it looks like {what}){hint}", kind="not_an_image")


_EXPORTABLE = {"a PDF document", "a Photoshop file (PSD)", "a PostScript/EPS file", "a vector drawing (SVG)"}


def _describe(head: bytes) -> str | None:
    """What a file that is not an image is, in words (:func:`core.inputs.filekinds.binary_kind`,
    else the kind of text), or None for binary data of no known kind."""
    what = binary_kind(head)
    if what is not None:
        return what
    text = _as_text(head)
    if text is None:
        return None
    lowered = text.lstrip().lower()
    if lowered.startswith(("<!doctype html", "<html", "<head", "<body")) or "<html" in lowered:
        return "a web page (HTML)"
    if "<svg" in lowered:
        return "a vector drawing (SVG)"
    if lowered.startswith("<?xml"):
        return "an XML file"
    return "a text file"


def _as_text(head: bytes) -> str | None:
    """The bytes as text when they look like text (UTF-8/Latin-1, no control bytes)."""
    head = head.removeprefix(b"\xef\xbb\xbf")
    if not head or b"\x00" in head:
        return None
    controls = sum(1 for b in head if b < 32 and b not in (9, 10, 12, 13))
    if controls > len(head) // 50:
        return None
    return head.decode("utf-8", errors="replace")


# ---------------------------------------------------------------- colour conversion


def _orientation(img: Image.Image) -> int:
    try:
        value = img.getexif().get(ExifTags.Base.Orientation, 1)
        return int(value) if isinstance(value, int) else 1
    except _PIL_FAILURES:
        return 1


def _to_rgb(img: Image.Image) -> Image.Image:
    """8-bit RGB as a person would see the photo; returns ``img`` itself when already RGB."""
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in ("RGBA", "RGBa", "LA", "La", "PA") or (
        mode == "P" and ("transparency" in img.info or (img.palette is not None and img.palette.mode == "RGBA"))
    ):
        return _on_white(img)
    if mode == "CMYK":
        return _cmyk_to_rgb(img)
    if mode.startswith("I") or mode == "F":
        return _wide_grey_to_rgb(img)
    try:
        return img.convert("RGB")
    except ValueError as exc:
        raise ImageError(
            f"the image uses a colour format we cannot read ({mode}); save it as an RGB JPEG or PNG",
            kind="unsupported_image",
        ) from exc


def _on_white(img: Image.Image) -> Image.Image:
    # Catalog photos sit on white; transparent areas shown black would look like content.
    rgba = img if img.mode == "RGBA" else img.convert("RGBA")
    alpha = rgba.getchannel("A")
    if alpha.getextrema() == (255, 255):
        return rgba.convert("RGB")
    out = Image.new("RGB", rgba.size, _WHITE)
    out.paste(rgba.convert("RGB"), (0, 0), alpha)
    return out


def _cmyk_to_rgb(img: Image.Image) -> Image.Image:
    # Pillow already undoes Adobe's inverted CMYK in JPEGs. With an embedded print profile
    # the colour-managed conversion is what Photoshop shows; the naive formula is a fallback.
    icc = img.info.get("icc_profile")
    if icc:
        try:
            converted = ImageCms.profileToProfile(
                img,
                ImageCms.ImageCmsProfile(io.BytesIO(icc)),
                ImageCms.createProfile("sRGB"),
                outputMode="RGB",
            )
            if converted is not None:
                return converted
        except (ImageCms.PyCMSError, *_PIL_FAILURES):
            log.debug("CMYK profile unusable; using the plain conversion", exc_info=True)
    return img.convert("RGB")


def _wide_grey_to_rgb(img: Image.Image) -> Image.Image:
    """16-bit, 32-bit integer and float greyscale scaled to 0-255 (Pillow would clip to white)."""
    arr = np.asarray(img)
    if img.mode.startswith("I;16"):
        grey = arr >> 8  # the high byte: within 1 of v / 257, without a 32-bit copy of the image
    else:
        values = np.nan_to_num(arr.astype(np.float32), nan=0.0, posinf=0.0, neginf=0.0)
        lo, hi = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
        if img.mode == "F" and lo >= 0 and hi <= 1:
            grey = values * 255
        elif lo >= 0 and hi <= 255:
            grey = values
        elif lo >= 0 and hi <= 65535:
            grey = values * (255 / 65535)
        else:
            grey = (values - lo) * (255 / (hi - lo)) if hi > lo else np.zeros_like(values)
        grey = np.rint(grey)
    return Image.fromarray(grey.astype(np.uint8)).convert("RGB")
