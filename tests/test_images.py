"""core.inputs.images: every colour mode and failure an analyst's upload can bring, on real files."""

from __future__ import annotations

import io
import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

from core.inputs import images
from core.inputs.images import ImageError, ImageInfo, inspect_image, load_for_model, load_rgb, make_thumbnail

RED, BLUE, WHITE = (255, 0, 0), (0, 0, 255), (255, 255, 255)


def _save(img: Image.Image, path: Path, fmt: str | None = None, **params) -> Path:
    img.save(path, fmt, **params)
    return path


def _px(img: Image.Image, xy: tuple[int, int]) -> tuple[int, ...]:
    return tuple(int(v) for v in img.getpixel(xy))


def _close(a: tuple[int, ...], b: tuple[int, ...], tol: int = 12) -> bool:
    return all(abs(x - y) <= tol for x, y in zip(a, b, strict=True))


@pytest.fixture(scope="module")
def astronaut() -> Image.Image:
    skdata = pytest.importorskip("skimage.data")
    return Image.fromarray(skdata.astronaut())


@pytest.fixture(scope="module")
def big_jpeg(tmp_path_factory, astronaut) -> Path:
    """A 3000×2000 JPEG with real photo content (the astronaut, upscaled)."""
    path = tmp_path_factory.mktemp("big") / "big.jpg"
    return _save(astronaut.resize((3000, 2000), Image.Resampling.BICUBIC), path, quality=90)


# ------------------------------------------------------------------ orientation, modes


def test_exif_orientation_6_is_applied(tmp_path):
    stored = Image.new("RGB", (60, 40), BLUE)
    stored.paste(RED, (0, 0, 60, 20))  # top half red as stored
    exif = stored.getexif()
    exif[0x0112] = 6  # display = stored rotated 90° clockwise: the stored top becomes the right
    path = _save(stored, tmp_path / "rotated.jpg", exif=exif.tobytes(), quality=95)

    img = load_rgb(path)
    assert img.size == (40, 60)
    assert _close(_px(img, (35, 30)), RED)
    assert _close(_px(img, (4, 30)), BLUE)
    assert inspect_image(path) == ImageInfo(width=40, height=60, format="JPEG", mode="RGB")


def test_rgba_transparency_is_flattened_on_white(tmp_path):
    img = Image.new("RGBA", (20, 10), (0, 0, 255, 255))
    img.paste((255, 0, 0, 0), (0, 0, 10, 10))  # fully transparent red: must not show
    img.putpixel((15, 5), (0, 0, 0, 128))  # half-transparent black → mid grey
    out = load_rgb(_save(img, tmp_path / "a.png"))
    assert out.mode == "RGB"
    assert _px(out, (2, 2)) == WHITE
    assert _px(out, (18, 2)) == BLUE
    assert _close(_px(out, (15, 5)), (127, 127, 127), tol=2)


@pytest.mark.parametrize("fmt", ["PNG", "GIF"])
def test_palette_with_transparency_is_flattened_on_white(tmp_path, fmt):
    img = Image.new("P", (20, 10), 1)
    img.putpalette([0, 255, 0] + list(RED) + [0] * (254 * 3))
    img.paste(0, (0, 0, 10, 10))
    out = load_rgb(_save(img, tmp_path / f"p.{fmt.lower()}", fmt, transparency=0))
    assert _px(out, (2, 2)) == WHITE
    assert _px(out, (15, 5)) == RED


def test_la_is_flattened_on_white(tmp_path):
    img = Image.new("LA", (20, 10), (0, 255))
    img.paste((0, 0), (0, 0, 10, 10))
    out = load_rgb(_save(img, tmp_path / "la.png"))
    assert _px(out, (2, 2)) == WHITE
    assert _px(out, (15, 5)) == (0, 0, 0)


@pytest.mark.parametrize("fmt", ["JPEG", "TIFF"])
def test_cmyk_becomes_rgb(tmp_path, fmt):
    img = Image.new("CMYK", (20, 10), (0, 0, 0, 0))  # no ink = white paper
    img.paste((0, 255, 255, 0), (10, 0, 20, 10))  # magenta + yellow = red
    path = _save(img, tmp_path / f"c.{fmt.lower()}", fmt)
    if fmt == "JPEG":  # Pillow and libjpeg store CMYK JPEGs the Adobe (inverted) way
        with Image.open(path) as stored:
            assert "adobe" in stored.info
    assert inspect_image(path).mode == "CMYK"
    out = load_rgb(path)
    assert out.mode == "RGB"
    assert _close(_px(out, (2, 5)), WHITE)
    assert _close(_px(out, (17, 5)), RED)


def test_sixteen_bit_greyscale_keeps_its_gradient(tmp_path):
    ramp = np.linspace(0, 65535, 256).round().astype(np.uint16)
    path = _save(Image.fromarray(np.tile(ramp, (8, 1))), tmp_path / "g16.png")
    assert inspect_image(path).mode == "I;16"
    out = np.asarray(load_rgb(path))
    assert out.dtype == np.uint8 and out.shape == (8, 256, 3)
    row = out[4, :, 0].astype(int)
    assert np.abs(row - ramp / 257).max() <= 1  # scaled, not clipped at 255
    assert row[0] == 0 and row[-1] == 255 and len(np.unique(row)) > 250
    assert (out[..., 0] == out[..., 2]).all()


@pytest.mark.parametrize(
    ("mode", "values", "expected"),
    [
        ("F", np.linspace(0.0, 1.0, 256), np.arange(256)),  # 0-1 floats
        ("I", np.linspace(0, 65535, 256), np.arange(256)),  # 16-bit range held in 32 bits
        ("F", np.linspace(-5.0, 5.0, 256), np.arange(256)),  # arbitrary range: stretched
    ],
)
def test_wide_greyscale_tiff_is_scaled(tmp_path, mode, values, expected):
    dtype = np.float32 if mode == "F" else np.int32
    img = Image.fromarray(np.tile(values.astype(dtype), (4, 1)))
    path = _save(img, tmp_path / "wide.tif")
    with Image.open(path) as stored:
        assert stored.mode == mode
    row = np.asarray(load_rgb(path))[1, :, 0].astype(int)
    assert np.abs(row - expected).max() <= 1


def test_big_endian_sixteen_bit_is_scaled(tmp_path):
    ramp = np.linspace(0, 65535, 64).round().astype(">u2")
    img = Image.frombytes("I;16B", (64, 1), ramp.tobytes())
    out = np.asarray(load_rgb(_save(img, tmp_path / "be.tif")))[0, :, 0].astype(int)
    assert np.abs(out - ramp / 257).max() <= 1


@pytest.mark.parametrize("mode", ["L", "1"])
def test_greyscale_becomes_rgb(tmp_path, mode):
    out = load_rgb(_save(Image.new(mode, (8, 8), 255), tmp_path / "g.png"))
    assert out.mode == "RGB" and _px(out, (3, 3)) == WHITE


@pytest.mark.parametrize("fmt", ["GIF", "WEBP"])
def test_animation_gives_its_first_frame(tmp_path, fmt):
    frames = [Image.new("RGB", (16, 12), RED), Image.new("RGB", (16, 12), BLUE)]
    path = tmp_path / f"anim.{fmt.lower()}"
    frames[0].save(path, fmt, save_all=True, append_images=frames[1:], duration=100, loop=0)
    with Image.open(path) as stored:
        assert stored.n_frames == 2
    out = load_rgb(path)
    assert out.size == (16, 12) and out.mode == "RGB"
    assert _close(_px(out, (8, 6)), RED, tol=20)


def test_webp(tmp_path, astronaut):
    path = _save(astronaut, tmp_path / "a.webp", lossless=True)
    assert inspect_image(path) == ImageInfo(512, 512, "WEBP", "RGB")
    assert np.array_equal(np.asarray(load_rgb(path)), np.asarray(astronaut))


def test_real_photo(tmp_path, astronaut):
    path = _save(astronaut, tmp_path / "astronaut.jpg", quality=90)
    assert inspect_image(path) == ImageInfo(512, 512, "JPEG", "RGB")
    for source in (path, str(path), path.read_bytes()):
        out = load_rgb(source)
        assert out.size == (512, 512) and out.mode == "RGB"
        diff = np.abs(np.asarray(out, dtype=float) - np.asarray(astronaut, dtype=float)).mean()
        assert diff < 4


# ------------------------------------------------------------------------- fast path


def test_draft_decoding_of_a_large_jpeg(big_jpeg):
    fast = load_for_model(big_jpeg, size=224)
    assert fast.mode == "RGB"
    assert 224 <= min(fast.size) < 2000  # decoded at reduced scale, still large enough
    assert fast.size == (750, 500)  # 1/4 scale: both sides stay >= 2 * 224

    def shorter_side_to_224(img: Image.Image) -> np.ndarray:
        w, h = img.size
        size = (round(w * 224 / h), 224)
        return np.asarray(img.resize(size, Image.Resampling.BICUBIC), dtype=float)

    with Image.open(big_jpeg) as stored:
        full = stored.convert("RGB")
    assert full.size == (3000, 2000)
    assert np.abs(shorter_side_to_224(fast) - shorter_side_to_224(full)).mean() < 1.5


def test_min_side_never_upscales_and_keeps_the_shorter_side(tmp_path, astronaut):
    small = _save(astronaut.resize((100, 80)), tmp_path / "small.jpg")
    assert load_rgb(small, min_side=224).size == (100, 80)
    tall = _save(astronaut.resize((300, 2400)), tmp_path / "tall.jpg")
    assert min(load_rgb(tall, min_side=100).size) >= 100


def test_thumbnail_is_a_small_jpeg(big_jpeg, tmp_path):
    thumb = Image.open(io.BytesIO(make_thumbnail(big_jpeg, size=256)))
    assert thumb.format == "JPEG" and thumb.size == (256, 171)
    tiny = _save(Image.new("RGBA", (40, 20), (0, 0, 0, 0)), tmp_path / "tiny.png")
    small = Image.open(io.BytesIO(make_thumbnail(tiny, size=256)))
    assert small.size == (40, 20) and _close(_px(small, (5, 5)), WHITE, tol=3)


# --------------------------------------------------------------------------- failures


def _expect_error(source, kind: str, *words: str) -> str:
    with pytest.raises(ImageError) as info:
        inspect_image(source)
    message = str(info.value)
    assert info.value.kind == kind, message
    for word in words:
        assert word in message
    assert "Traceback" not in message and "\n" not in message
    return message


def test_truncated_jpeg(tmp_path, astronaut):
    data = _save(astronaut, tmp_path / "full.jpg").read_bytes()
    cut = tmp_path / "cut.jpg"
    cut.write_bytes(data[: len(data) // 2])
    message = _expect_error(cut, "truncated_image", "cut short")
    assert "cut.jpg" not in message  # the caller adds the name
    with pytest.raises(ImageError, match="cut short"):
        load_for_model(cut, size=224)  # the draft path must catch it too
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


@pytest.mark.parametrize("fmt", ["PNG", "WEBP", "GIF"])
def test_truncated_other_formats(astronaut, fmt):
    buf = io.BytesIO()
    astronaut.save(buf, fmt)
    _expect_error(buf.getvalue()[: buf.tell() // 2], "truncated_image", "cut short")


def test_empty_file(tmp_path):
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    assert _expect_error(empty, "empty_file") == "the file is empty (0 bytes)"
    _expect_error(b"", "empty_file")


@pytest.mark.parametrize(
    ("data", "kind", "words"),
    [
        (np.random.default_rng(0).bytes(4096), "not_an_image", ("not an image format",)),
        (b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n1 0 obj\n", "not_an_image", ("PDF document",)),
        (b"<!DOCTYPE html>\n<html><head><title>IMG_01.jpg</title>", "not_an_image", ("web page",)),
        (b"sku,label\n1001,person\n1002,no_person\n", "not_an_image", ("text file",)),
        (b"PK\x03\x04" + bytes(60), "not_an_image", ("ZIP",)),
        (b"8BPS\x00\x01" + bytes(60), "not_an_image", ("Photoshop", "export it as JPEG")),
        (b"MZ code,label\nA1,person\n", "not_an_image", ("text file",)),  # text, not a program
        (b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic", "corrupt_image", ("HEIC", "damaged")),
        (b"\x89PNG\r\n\x1a\n" + bytes(40), "corrupt_image", ("damaged",)),
    ],
)
def test_not_an_image(tmp_path, data, kind, words):
    path = tmp_path / "photo.jpg"  # the extension lies, as it does in real uploads
    path.write_bytes(data)
    _expect_error(path, kind, *words)


def _png_header(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims ``width`` × ``height`` (its pixel data is one row)."""

    def chunk(tag: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + tag + body + struct.pack(">I", zlib.crc32(tag + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(bytes(1 + 3 * width))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def test_huge_declared_size_is_refused_before_decoding():
    pillow_limit = Image.MAX_IMAGE_PIXELS
    # 1.6 gigapixels: beyond Pillow's own hard stop too; reported with its dimensions.
    message = _expect_error(_png_header(40000, 40000), "image_too_large", "40000×40000", "1600 MP", "80 MP")
    assert message.endswith("resize it")
    # 81 MP: over our limit, under Pillow's; no decoding happens (the file has no pixels).
    _expect_error(_png_header(9000, 9000), "image_too_large", "9000×9000 pixels (81 MP)")
    assert Image.MAX_IMAGE_PIXELS == pillow_limit  # Pillow's global is never touched


def test_pixel_limit_from_the_environment(monkeypatch, tmp_path, astronaut):
    path = _save(astronaut, tmp_path / "a.png")
    monkeypatch.setenv("CATALOG_LENS_MAX_PIXELS", "100000")
    _expect_error(path, "image_too_large", "512×512 pixels (0.26 MP)", "limit is 0.1 MP")
    with pytest.raises(ImageError, match="too large"):
        load_rgb(path)
    monkeypatch.setenv("CATALOG_LENS_MAX_PIXELS", "not a number")  # ignored, default used
    assert inspect_image(path).width == 512


def test_pillow_bomb_warning_turned_error_is_reported(monkeypatch):
    monkeypatch.setenv("CATALOG_LENS_MAX_PIXELS", str(500_000_000))
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        _expect_error(_png_header(10000, 10000), "image_too_large", "10000×10000")


def test_missing_file(tmp_path):
    _expect_error(tmp_path / "nope.jpg", "unreadable_file", "could not be found")
    _expect_error(tmp_path, "unreadable_file", "folder")


def test_looks_like_image_name():
    assert images.looks_like_image_name("Shoes/Red/IMG_1.JPG")
    assert images.looks_like_image_name("café.jpeg") and images.looks_like_image_name("x.webp")
    assert not images.looks_like_image_name("labels.csv")
    assert not images.looks_like_image_name("__MACOSX/shoes/._IMG_1.jpg")
    assert ".tiff" in images.IMAGE_EXTENSIONS and ".jfif" in images.IMAGE_EXTENSIONS


# ----------------------------------------------------------------------- iPhone photos


@pytest.fixture(scope="module")
def heic(astronaut) -> bytes:
    """A real HEIC (HEVC in HEIF, the iPhone's format) of the astronaut, made by pillow-heif's encoder."""
    buf = io.BytesIO()
    astronaut.save(buf, format="HEIF", quality=90)
    assert buf.getvalue()[4:12] == b"ftypheic"
    return buf.getvalue()


def test_heic_photos_open_like_any_other(tmp_path, heic, astronaut):
    path = tmp_path / "IMG_0042.HEIC"
    path.write_bytes(heic)
    assert images.looks_like_image_name(path.name) and ".heif" in images.IMAGE_EXTENSIONS
    assert inspect_image(path) == ImageInfo(width=512, height=512, format="HEIF", mode="RGB")
    img = load_for_model(path, size=224)
    assert img.size == (512, 512) and img.mode == "RGB"
    assert np.abs(np.asarray(img, dtype=float) - np.asarray(astronaut, dtype=float)).mean() < 4  # the same picture
    assert make_thumbnail(heic, size=64)[:3] == b"\xff\xd8\xff"


def test_a_cut_short_heic_is_reported_as_damaged(heic):
    _expect_error(heic[: len(heic) // 2], "corrupt_image", "damaged")


def test_a_heic_photo_joins_a_project(tmp_path, heic):
    from core.projects import intake, workspace

    project = workspace.create_project("iPhone photos")
    intake.stage_upload(project, filename="IMG_0042.heic", data=heic)
    intake.process_staged(project)
    assert list(project.names()["name"]) == ["IMG_0042.heic"] and project.problems().empty


def test_preview_draws_a_placeholder_for_what_cannot_be_shown(tmp_path, astronaut):
    placeholder = images.placeholder(size=96)
    assert Image.open(io.BytesIO(placeholder)).size == (96, 96)
    for bad in (b"", b"\xff\xd8\xff\xe0" + bytes(300), tmp_path / "gone.jpg", _png_header(40000, 40000), None):
        assert images.preview(bad, size=96) == placeholder
    good = _save(astronaut, tmp_path / "a.jpg")
    assert images.preview(good, size=96) == make_thumbnail(good, size=96) != placeholder
