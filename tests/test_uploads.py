"""core.inputs.uploads: real zips, clutter, hostile members and legacy name encodings."""

from __future__ import annotations

import io
import struct
import unicodedata
import zipfile
import zlib
from pathlib import Path

import pytest

from core.inputs import uploads
from core.inputs.uploads import UploadedFile, is_zip, unpack_zip

JPEG_ISH = b"\xff\xd8\xff\xe0" + bytes(range(256)) * 4  # content does not matter here


def _zip(path: Path, members: dict[str, bytes], **kwargs) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED, **kwargs) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return path


def _raw_zip(path: Path, entries: list[dict]) -> Path:
    """Write a zip byte by byte, for what zipfile refuses to produce (lying sizes, raw names...).

    Each entry: ``name`` (bytes), ``data``, and optionally ``flags``, ``method`` (0 stored,
    8 deflate), ``declared_size``, ``external_attr``, ``extra``.
    """
    body, central = bytearray(), bytearray()
    for e in entries:
        name, data, method = e["name"], e.get("data", b""), e.get("method", 0)
        if method == 8:
            packer = zlib.compressobj(9, zlib.DEFLATED, -15)
            payload = packer.compress(data) + packer.flush()
        else:
            payload = data
        flags, extra, size = e.get("flags", 0), e.get("extra", b""), e.get("declared_size", len(data))
        common = (flags, method, 0, 0x21, zlib.crc32(data), len(payload), size, len(name), len(extra))
        offset = len(body)
        body += struct.pack("<4s5H3I2H", b"PK\x03\x04", 20, *common) + name + extra + payload
        central += (
            struct.pack(
                "<4s6H3I5H2I", b"PK\x01\x02", (3 << 8) | 20, 20, *common, 0, 0, 0, e.get("external_attr", 0), offset
            )
            + name
            + extra
        )
    end = struct.pack("<4s4H2IH", b"PK\x05\x06", 0, 0, len(entries), len(entries), len(central), len(body), 0)
    path.write_bytes(bytes(body + central + end))
    return path


def _names(result) -> list[str]:
    return sorted(f.name for f in result.files)


def _kinds(result) -> list[str]:
    return sorted(p.kind for p in result.problems)


def test_nested_folders_are_kept_in_names_and_files_land_in_dest(tmp_path):
    members = {
        "photos/": b"",
        "photos/shoes/red/1.jpg": JPEG_ISH + b"red",
        "photos/shoes/blue/1.jpg": JPEG_ISH + b"blue",  # same basename, other folder
        "photos/bags/2.png": b"png",
        "labels.csv": b"file,label\n",
    }
    dest = tmp_path / "dest"
    result = unpack_zip(_zip(tmp_path / "a.zip", members), dest, archive_name="catalog.zip")
    assert result.problems == [] and result.junk_skipped == 0
    assert _names(result) == ["labels.csv", "photos/bags/2.png", "photos/shoes/blue/1.jpg", "photos/shoes/red/1.jpg"]
    for item in result.files:
        assert isinstance(item, UploadedFile)
        assert item.path.parent == dest and item.path.read_bytes() == members[item.name]
    assert len({f.path for f in result.files}) == 4


def test_os_clutter_is_skipped_silently(tmp_path):
    members = {
        "shoes/1.jpg": JPEG_ISH,
        "__MACOSX/shoes/._1.jpg": b"\x00\x05\x16\x07",
        "shoes/._1.jpg": b"\x00\x05\x16\x07",
        "shoes/.DS_Store": b"Bud1",
        ".DS_Store": b"Bud1",
        "shoes/Thumbs.db": b"x",
        "desktop.ini": b"x",
        ".git/config": b"x",
        "shoes/.hidden.jpg": JPEG_ISH,
    }
    result = unpack_zip(_zip(tmp_path / "a.zip", members), tmp_path / "d", archive_name="a.zip")
    assert _names(result) == ["shoes/1.jpg"]
    assert result.junk_skipped == 8 and result.problems == []


@pytest.mark.parametrize(
    "evil",
    [b"../evil.jpg", b"/abs.jpg", b"..\\evil.jpg", b"C:\\evil.jpg", b"ok/../../evil.jpg", b"\\\\server\\evil.jpg"],
)
def test_unsafe_paths_are_refused_and_nothing_escapes(tmp_path, evil):
    dest = tmp_path / "a" / "b" / "dest"
    archive = _raw_zip(tmp_path / "evil.zip", [{"name": evil, "data": b"pwned"}, {"name": b"ok.jpg", "data": JPEG_ISH}])
    result = unpack_zip(archive, dest, archive_name="evil.zip")
    assert _names(result) == ["ok.jpg"]
    assert _kinds(result) == ["unsafe_path"]
    problem = result.problems[0]
    assert problem.file.startswith("evil.zip: ") and "was not unpacked" in problem.message
    written = [p for p in tmp_path.rglob("*") if p.is_file() and p.read_bytes() == b"pwned"]
    assert written == []


def test_unsafe_paths_written_by_zipfile_itself(tmp_path):
    archive = _zip(tmp_path / "z.zip", {"../evil.jpg": b"pwned", "/abs.jpg": b"pwned", "fine/x.jpg": b"ok"})
    result = unpack_zip(archive, tmp_path / "dest", archive_name="z.zip")
    assert _names(result) == ["fine/x.jpg"]
    assert _kinds(result) == ["unsafe_path", "unsafe_path"]
    assert not any(p.read_bytes() == b"pwned" for p in tmp_path.rglob("*") if p.is_file())


def test_nul_in_a_name_is_refused(tmp_path):
    archive = _raw_zip(tmp_path / "n.zip", [{"name": b"shoe.jpg\x00.txt", "data": b"x"}])
    result = unpack_zip(archive, tmp_path / "d", archive_name="n.zip")
    assert result.files == [] and _kinds(result) == ["unsafe_path"]
    assert "\x00" not in result.problems[0].message


def test_symlink_member_is_refused(tmp_path):
    info = zipfile.ZipInfo("photos/link.jpg")
    info.create_system = 3
    info.external_attr = 0o120777 << 16
    with zipfile.ZipFile(tmp_path / "l.zip", "w") as zf:
        zf.writestr(info, "/etc/passwd")
        zf.writestr("photos/real.jpg", JPEG_ISH)
    result = unpack_zip(tmp_path / "l.zip", tmp_path / "d", archive_name="l.zip")
    assert _names(result) == ["photos/real.jpg"]
    assert _kinds(result) == ["unsafe_path"] and "link" in result.problems[0].message
    assert not any(p.is_symlink() for p in (tmp_path / "d").iterdir())


def test_zip_bomb_by_ratio_is_stopped_and_the_rest_unpacked(tmp_path):
    with zipfile.ZipFile(tmp_path / "bomb.zip", "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("zeros.bmp", bytes(50 * 2**20))
        zf.writestr("real.jpg", JPEG_ISH)
    assert (tmp_path / "bomb.zip").stat().st_size < 200_000
    result = unpack_zip(tmp_path / "bomb.zip", tmp_path / "d", archive_name="bomb.zip")
    assert _names(result) == ["real.jpg"]
    assert _kinds(result) == ["zip_bomb"]
    assert result.problems[0].file == "bomb.zip: zeros.bmp"
    assert sum(p.stat().st_size for p in (tmp_path / "d").iterdir()) == len(JPEG_ISH)


def test_lying_declared_size_is_caught_while_streaming(tmp_path):
    # The headers claim 1000 bytes; the data inflates to 5 MB. Only what was declared is
    # ever produced, and the checksum then exposes the lie: nothing of it is kept.
    entries = [
        {"name": b"liar.jpg", "data": bytes(5 * 2**20), "method": 8, "declared_size": 1000},
        {"name": b"real.jpg", "data": JPEG_ISH, "method": 8},
    ]
    result = unpack_zip(_raw_zip(tmp_path / "liar.zip", entries), tmp_path / "d", archive_name="liar.zip")
    assert _names(result) == ["real.jpg"]
    assert _kinds(result) == ["bad_zip_member"]
    assert sorted(p.stat().st_size for p in (tmp_path / "d").iterdir()) == [len(JPEG_ISH)]


def test_streamed_counter_stops_a_member_larger_than_declared(tmp_path, monkeypatch):
    archive = _zip(tmp_path / "s.zip", {"small.jpg": b"x" * 100, "next.jpg": JPEG_ISH})
    real_open = zipfile.ZipFile.open

    def lying_open(self, info, *args, **kwargs):  # a member whose stream outgrows its header
        if getattr(info, "filename", info) == "small.jpg":
            return io.BytesIO(bytes(3 * 2**20))
        return real_open(self, info, *args, **kwargs)

    monkeypatch.setattr(zipfile.ZipFile, "open", lying_open)
    result = unpack_zip(archive, tmp_path / "d", archive_name="s.zip")
    assert _names(result) == ["next.jpg"]
    assert _kinds(result) == ["zip_bomb"] and "more data than" in result.problems[0].message
    assert [p.stat().st_size for p in (tmp_path / "d").iterdir()] == [len(JPEG_ISH)]


def test_copy_limited_stops_at_the_limit():
    out = io.BytesIO()
    with pytest.raises(uploads._TooBig):
        uploads._copy_limited(io.BytesIO(bytes(3 * 2**20 + 5)), out, limit=2 * 2**20)
    assert out.tell() <= 2 * 2**20
    assert uploads._copy_limited(io.BytesIO(b"abc"), io.BytesIO(), limit=3) == 3


def test_member_and_archive_limits(tmp_path):
    archive = _zip(tmp_path / "m.zip", {"big.tif": b"\x01" * 5000, "small.jpg": b"\x02" * 100})
    result = unpack_zip(archive, tmp_path / "d1", archive_name="m.zip", max_member_bytes=1000)
    assert _names(result) == ["small.jpg"] and _kinds(result) == ["zip_too_large"]
    assert "per file" in result.problems[0].message

    whole = unpack_zip(archive, tmp_path / "d2", archive_name="m.zip", max_total_bytes=2000)
    assert whole.files == [] and _kinds(whole) == ["zip_too_large"]
    assert whole.problems[0].file == "m.zip" and "Split it" in whole.problems[0].message

    many = unpack_zip(archive, tmp_path / "d3", archive_name="m.zip", max_files=1)
    assert many.files == [] and "holds 2 files" in many.problems[0].message


@pytest.mark.parametrize("how", ["utf8_flag", "utf8_no_flag", "cp437", "nfd", "unicode_extra"])
def test_non_ascii_names(tmp_path, how):
    wanted = "Ümlaut/café.jpg"
    if how == "utf8_flag":
        archive = _zip(tmp_path / "u.zip", {wanted: JPEG_ISH})  # zipfile sets the flag itself
        with zipfile.ZipFile(archive) as zf:
            assert zf.infolist()[0].flag_bits & 0x800
    elif how == "utf8_no_flag":  # what macOS Finder writes
        archive = _raw_zip(tmp_path / "u.zip", [{"name": wanted.encode(), "data": JPEG_ISH}])
    elif how == "cp437":  # old Windows tools
        archive = _raw_zip(tmp_path / "u.zip", [{"name": wanted.encode("cp437"), "data": JPEG_ISH}])
    elif how == "nfd":  # decomposed accents, as macOS file systems store them
        name = unicodedata.normalize("NFD", wanted).encode()
        archive = _raw_zip(tmp_path / "u.zip", [{"name": name, "data": JPEG_ISH, "flags": 0x800}])
    else:  # Info-ZIP / 7-Zip: legacy bytes plus the UTF-8 name in extra field 0x7075
        raw = wanted.encode("cp1252")
        body = b"\x01" + struct.pack("<I", zlib.crc32(raw)) + wanted.encode()
        extra = struct.pack("<HH", 0x7075, len(body)) + body
        archive = _raw_zip(tmp_path / "u.zip", [{"name": raw, "data": JPEG_ISH, "extra": extra}])
    result = unpack_zip(archive, tmp_path / "d", archive_name="u.zip")
    assert result.problems == []
    assert [f.name for f in result.files] == [wanted]
    assert result.files[0].path.read_bytes() == JPEG_ISH


def test_corrupt_archives_give_one_problem(tmp_path):
    good = _zip(tmp_path / "g.zip", {f"p{i}.jpg": JPEG_ISH for i in range(5)}).read_bytes()
    cases = {
        "cut.zip": good[: len(good) // 2],
        "noise.zip": b"PK\x03\x04" + bytes(range(256)) * 8,
        "empty.zip": b"",
        "photo.zip": JPEG_ISH,
    }
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
        result = unpack_zip(tmp_path / name, tmp_path / "d", archive_name=name)
        assert result.files == []
        assert [(p.kind, p.file) for p in result.problems] == [("bad_zip", name)]
        assert "damaged" in result.problems[0].message


def test_damaged_member_data(tmp_path):
    entries = [{"name": b"a.jpg", "data": JPEG_ISH * 4, "method": 8}, {"name": b"b.jpg", "data": JPEG_ISH}]
    archive = _raw_zip(tmp_path / "x.zip", entries)
    data = bytearray(archive.read_bytes())
    data[40:60] = bytes(20)  # inside a.jpg's compressed stream
    archive.write_bytes(bytes(data))
    result = unpack_zip(archive, tmp_path / "d", archive_name="x.zip")
    assert _names(result) == ["b.jpg"] and _kinds(result) == ["bad_zip_member"]
    assert len(list((tmp_path / "d").iterdir())) == 1


def test_encrypted_nested_unsupported_and_duplicate_members(tmp_path):
    entries = [
        {"name": b"secret.jpg", "data": JPEG_ISH, "flags": 0x1},
        {"name": b"more/inner.zip", "data": b"PK\x05\x06" + bytes(18)},
        {"name": b"bz.jpg", "data": JPEG_ISH, "method": 12},
        {"name": b"twice.jpg", "data": b"first"},
        {"name": b"twice.jpg", "data": b"second"},
    ]
    result = unpack_zip(_raw_zip(tmp_path / "e.zip", entries), tmp_path / "d", archive_name="e.zip")
    assert _names(result) == ["twice.jpg"] and result.files[0].path.read_bytes() == b"first"
    by_kind = {p.kind: p for p in result.problems}
    assert set(by_kind) == {"encrypted_in_zip", "zip_in_zip", "unsupported_zip", "duplicate_in_zip"}
    assert by_kind["zip_in_zip"].severity == "warning" and by_kind["zip_in_zip"].file == "e.zip: more/inner.zip"
    assert "password" in by_kind["encrypted_in_zip"].message
    assert "BZIP2" in by_kind["unsupported_zip"].message


def test_dest_shared_by_two_archives(tmp_path):
    dest = tmp_path / "d"
    first = unpack_zip(_zip(tmp_path / "1.zip", {"a.jpg": b"one"}), dest, archive_name="1.zip")
    second = unpack_zip(_zip(tmp_path / "2.zip", {"a.jpg": b"two"}), dest, archive_name="2.zip")
    assert first.files[0].path != second.files[0].path
    assert first.files[0].path.read_bytes() == b"one" and second.files[0].path.read_bytes() == b"two"


def test_is_zip_reads_the_bytes_not_the_name(tmp_path):
    disguised = _zip(tmp_path / "photos.jpg", {"a.jpg": b"x"})
    assert is_zip(disguised)
    not_zip = tmp_path / "photos.zip"
    not_zip.write_bytes(JPEG_ISH)
    assert not is_zip(not_zip)
    assert not is_zip(tmp_path / "missing.zip")
    assert not is_zip(tmp_path)
