"""Unpacking the zip archives analysts upload, without trusting anything inside them.

A zip from a colleague's Mac or a DAM export holds folders of photos, but also operating
system clutter (``__MACOSX/``, ``._`` files, ``.DS_Store``, ``Thumbs.db``), names in legacy
encodings and, in the worst case, hostile entries: paths that climb out of the target
folder (``../``), links, or "zip bombs" that inflate to terabytes. :func:`unpack_zip`
writes each usable member under a generated name inside ``dest``, keeps the member's
relative path only as a label, and reports everything it refused as a :class:`Problem`
the analyst can act on. One bad member never stops the rest of the archive.
"""

from __future__ import annotations

import logging
import os
import re
import stat
import struct
import tempfile
import unicodedata
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from core.base.problems import Problem, Severity

log = logging.getLogger(__name__)
_ZIP_MAGIC = (b"PK\x03\x04", b"PK\x05\x06", b"PK\x07\x08")
_JUNK_NAMES = frozenset({"thumbs.db", "ehthumbs.db", "desktop.ini", "icon\r"})
_CHUNK = 1 << 20
# Small members cannot hurt however well they compress (a 1 MB white BMP deflates 500:1),
# so the ratio rule only applies above this size.
_RATIO_FLOOR = 1 << 20
_READABLE_METHODS = {zipfile.ZIP_STORED: "stored", zipfile.ZIP_DEFLATED: "deflate"}
_METHOD_NAMES = {zipfile.ZIP_BZIP2: "BZIP2", zipfile.ZIP_LZMA: "LZMA", 9: "Deflate64", 98: "PPMd", 93: "Zstandard"}
_REZIP = "Make the ZIP again with your computer's built-in 'Compress' option and upload it again."


@dataclass(frozen=True)
class UploadedFile:
    """One file from an upload: ``name`` as the analyst knows it, ``path`` where its bytes are.

    ``name`` is the relative POSIX path inside the upload (``"shoes/red/1.jpg"``), in
    Unicode NFC so that the same name typed on a Mac and on Windows compares equal.
    """

    name: str
    path: Path


@dataclass
class UnpackResult:
    """What came out of one archive: usable files, refused members, and clutter skipped."""

    files: list[UploadedFile] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    junk_skipped: int = 0


def is_zip(path: str | os.PathLike[str]) -> bool:
    """True when the file starts like a zip archive, whatever its name says."""
    try:
        with open(path, "rb") as f:
            return f.read(4) in _ZIP_MAGIC
    except OSError:
        return False


def unpack_zip(
    zip_path: Path,
    dest: Path,
    *,
    archive_name: str,
    max_files: int = 200_000,
    max_total_bytes: int = 20 * 2**30,
    max_member_bytes: int = 2 * 2**30,
    max_ratio: float = 200.0,
) -> UnpackResult:
    """Extract the files of a zip into ``dest`` safely; never raises for a bad archive.

    ``archive_name`` is the archive's name as the analyst uploaded it; problems name files
    as ``"archive.zip: inner/path.jpg"``. Limits protect the server: more than
    ``max_files`` files or more than ``max_total_bytes`` in all refuses the whole archive;
    a member larger than ``max_member_bytes`` or compressed more than ``max_ratio`` : 1 is
    skipped. Sizes are checked as declared in the archive and again while writing, since
    a crafted archive can lie about them. ``dest`` is created if needed; members are written
    under generated names (``000001.jpg``...), never under a name taken from the archive.
    """
    result = UnpackResult()
    try:
        archive = zipfile.ZipFile(zip_path)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, ValueError, EOFError, NotImplementedError):
        result.problems.append(_bad_zip(archive_name))
        return result
    with archive:
        try:
            members = archive.infolist()
            _Unpacker(
                archive,
                dest,
                archive_name,
                result,
                max_files=max_files,
                max_total_bytes=max_total_bytes,
                max_member_bytes=max_member_bytes,
                max_ratio=max_ratio,
            ).run(members)
        except (zipfile.BadZipFile, EOFError):  # the archive itself broke mid-way
            log.info("zip %s broke while unpacking", archive_name, exc_info=True)
            result.problems.append(_bad_zip(archive_name))
    return result


def _bad_zip(archive_name: str) -> Problem:
    return Problem(
        "bad_zip",
        f"{archive_name} could not be opened as a ZIP archive: it is damaged, incomplete (the "
        f"upload may have been cut off) or not really a ZIP file. {_REZIP}",
        file=archive_name,
    )


class _TooBig(Exception):
    """Raised while streaming a member that turns out larger than allowed."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class _Unpacker:
    def __init__(
        self,
        archive: zipfile.ZipFile,
        dest: Path,
        archive_name: str,
        result: UnpackResult,
        *,
        max_files: int,
        max_total_bytes: int,
        max_member_bytes: int,
        max_ratio: float,
    ) -> None:
        self.archive = archive
        self.dest = Path(dest)
        self.archive_name = archive_name
        self.result = result
        self.max_files = max_files
        self.max_total_bytes = max_total_bytes
        self.max_member_bytes = max_member_bytes
        self.max_ratio = max_ratio
        self.written = 0

    def problem(self, kind: str, inner: str | None, message: str, severity: Severity = "error") -> None:
        where = f"{self.archive_name}: {inner}" if inner else self.archive_name
        self.result.problems.append(Problem(kind, message, file=where, severity=severity))

    def run(self, members: list[zipfile.ZipInfo]) -> None:
        todo: list[tuple[zipfile.ZipInfo, str]] = []
        seen: set[str] = set()
        for info in members:
            entry = self.screen(info)
            if entry is None:
                continue
            if entry in seen:
                self.problem(
                    "duplicate_in_zip",
                    entry,
                    f"{entry} appears more than once in {self.archive_name}; only the first copy is used.",
                    severity="warning",
                )
                continue
            seen.add(entry)
            todo.append((info, entry))

        declared = sum(info.file_size for info, _ in todo)
        if len(todo) > self.max_files:
            self.problem(
                "zip_too_large",
                None,
                f"{self.archive_name} holds {len(todo):,} files; the limit is {self.max_files:,} per archive. "
                "Split the photos into several smaller ZIP files and upload those.",
            )
            return
        if declared > self.max_total_bytes:
            self.problem(
                "zip_too_large",
                None,
                f"{self.archive_name} would unpack to {_size(declared)}; the limit is "
                f"{_size(self.max_total_bytes)} per archive. Split it into several smaller ZIP files.",
            )
            return

        self.dest.mkdir(parents=True, exist_ok=True)
        for index, (info, entry) in enumerate(todo, start=1):
            if self.written >= self.max_total_bytes:
                self.problem(
                    "zip_bomb",
                    None,
                    f"{self.archive_name} unpacks to more data than it declares; unpacking stopped at "
                    f"{_size(self.max_total_bytes)}. {_REZIP}",
                )
                return
            if self.size_ok(info, entry) and not self.extract(index, info, entry):
                return

    def screen(self, info: zipfile.ZipInfo) -> str | None:
        """The member's clean relative name, or None (after recording why) when it is not kept."""
        raw = info.orig_filename
        if raw.endswith(("/", "\\")) or info.is_dir() or stat.S_ISDIR(info.external_attr >> 16):
            return None
        decoded = _decode_name(info)
        parts = _safe_parts(decoded)
        if parts is None:
            shown = _clean_display(decoded)
            self.problem(
                "unsafe_path",
                shown,
                f"{shown} was not unpacked: its path points outside the archive's own folders, which "
                "ZIP files made by normal tools never do. Make the ZIP again from the photo folder.",
            )
            return None
        name = "/".join(parts)
        if _is_junk(parts):
            self.result.junk_skipped += 1
            return None
        if stat.S_ISLNK(info.external_attr >> 16):
            self.problem(
                "unsafe_path",
                name,
                f"{name} is a shortcut (symbolic link), not a file, so it was not unpacked. "
                "Put the photo itself in the ZIP.",
            )
            return None
        if info.flag_bits & 0x1:
            self.problem(
                "encrypted_in_zip",
                name,
                f"{name} is password-protected, so it cannot be read. Make the ZIP again without a password.",
            )
            return None
        if name.lower().endswith(".zip"):
            self.problem(
                "zip_in_zip",
                name,
                f"{name} is a ZIP inside the ZIP; it was not opened. Upload it separately, or unzip it "
                "into a folder before making the outer ZIP.",
                severity="warning",
            )
            return None
        if info.compress_type not in _READABLE_METHODS:
            method = _METHOD_NAMES.get(info.compress_type, f"method {info.compress_type}")
            self.problem(
                "unsupported_zip",
                name,
                f"{name} is compressed with a method we do not read ({method}). {_REZIP}",
            )
            return None
        return name

    def size_ok(self, info: zipfile.ZipInfo, name: str) -> bool:
        if info.file_size > self.max_member_bytes:
            self.problem(
                "zip_too_large",
                name,
                f"{name} is {_size(info.file_size)}; the limit is {_size(self.max_member_bytes)} per file. "
                "Resize or export it smaller, then upload it again.",
            )
            return False
        ratio = info.file_size / max(info.compress_size, 1)
        if info.file_size > _RATIO_FLOOR and ratio > self.max_ratio:
            self.problem(
                "zip_bomb",
                name,
                f"{name} was not unpacked: it would expand {ratio:,.0f} times (from "
                f"{_size(info.compress_size)} to {_size(info.file_size)}), which real photos never do "
                "and is how 'zip bombs' fill up servers. Check where this ZIP came from.",
            )
            return False
        return True

    def extract(self, index: int, info: zipfile.ZipInfo, name: str) -> bool:
        """Write one member; False when unpacking must stop (the server could not write)."""
        limit = min(info.file_size, self.max_member_bytes, self.max_total_bytes - self.written)
        target: Path | None = None
        try:
            target, out = _create(self.dest, index, name)
            with out, self.archive.open(info) as src:
                written = _copy_limited(src, out, limit=limit)
        except _TooBig as exc:
            _remove(target)
            self.problem(
                "zip_bomb",
                name,
                f"{name} was not unpacked: {exc.reason}. The ZIP file is damaged or was built to "
                "overload servers; make it again from the photo folder.",
            )
            return True
        except (zipfile.BadZipFile, EOFError, zlib.error, ValueError):
            # Includes a checksum mismatch: zipfile never yields more than the declared size,
            # so a member that lies about its size ends up here.
            _remove(target)
            self.problem("bad_zip_member", name, f"{name} could not be unpacked: its data is damaged. {_REZIP}")
            return True
        except (NotImplementedError, RuntimeError):
            _remove(target)
            self.problem("unsupported_zip", name, f"{name} is stored in a way we cannot read. {_REZIP}")
            return True
        except OSError as exc:
            _remove(target)
            log.warning("could not write %s from %s", name, self.archive_name, exc_info=True)
            self.problem(
                "write_failed",
                name,
                f"{name} and the files after it in {self.archive_name} could not be saved on the server "
                f"({exc.strerror or exc}). The disk may be full: tell whoever runs Catalog Lens.",
            )
            return False
        self.written += written
        self.result.files.append(UploadedFile(name=name, path=target))
        return True


def _remove(path: Path | None) -> None:
    if path is not None:
        path.unlink(missing_ok=True)


def _copy_limited(src: IO[bytes], dst: IO[bytes], *, limit: int) -> int:
    """Copy at most ``limit`` bytes; raise _TooBig as soon as the source yields more."""
    total = 0
    while True:
        chunk = src.read(_CHUNK)
        if not chunk:
            return total
        total += len(chunk)
        if total > limit:
            raise _TooBig(f"it holds more data than the archive declares or allows (over {_size(limit)})")
        dst.write(chunk)


def _create(dest: Path, index: int, name: str) -> tuple[Path, IO[bytes]]:
    """A new file under ``dest`` named from the member's index; never follows or overwrites."""
    suffix = Path(name).suffix.lower()
    if not re.fullmatch(r"\.[a-z0-9]{1,10}", suffix):
        suffix = ""
    target = dest / f"{index:06d}{suffix}"
    try:
        return target, open(target, "xb")
    except FileExistsError:  # dest reused for another archive: pick a fresh name instead
        fd, tmp = tempfile.mkstemp(dir=dest, prefix=f"{index:06d}-", suffix=suffix)
        return Path(tmp), os.fdopen(fd, "wb")


# ---------------------------------------------------------------------------- names


def _decode_name(info: zipfile.ZipInfo) -> str:
    """The member name as its author typed it, NFC-normalised.

    Without the UTF-8 flag the ZIP standard says cp437, but macOS Finder and many Linux
    tools write UTF-8 without setting the flag; Info-ZIP and 7-Zip may add the UTF-8 name
    in an extra field. Valid UTF-8 with non-ASCII bytes is almost never intended cp437.
    """
    name = info.orig_filename
    if not info.flag_bits & 0x800:
        raw = name.encode("cp437")
        unicode_extra = _unicode_path_extra(info.extra, raw)
        if unicode_extra is not None:
            name = unicode_extra
        elif not raw.isascii():
            try:
                name = raw.decode("utf-8")
            except UnicodeDecodeError:
                pass
    return unicodedata.normalize("NFC", name)


def _unicode_path_extra(extra: bytes, raw_name: bytes) -> str | None:
    """The UTF-8 name from an Info-ZIP Unicode Path extra field (0x7075), if valid for this name."""
    pos = 0
    while pos + 4 <= len(extra):
        tag, size = struct.unpack_from("<HH", extra, pos)
        body = extra[pos + 4 : pos + 4 + size]
        if tag == 0x7075 and len(body) >= 5 and body[0] == 1:
            if struct.unpack_from("<I", body, 1)[0] == zlib.crc32(raw_name):
                try:
                    return body[5:].decode("utf-8")
                except UnicodeDecodeError:
                    return None
        pos += 4 + size
    return None


_DRIVE = re.compile(r"^[A-Za-z]:")


def _safe_parts(name: str) -> list[str] | None:
    """The path's components with ``/`` or ``\\`` as separators, or None if it could escape."""
    if "\x00" in name or name.startswith(("/", "\\")) or _DRIVE.match(name):
        return None
    parts = [p for p in re.split(r"[/\\]", name) if p not in ("", ".")]
    if not parts or any(p == ".." for p in parts):
        return None
    return parts


def _clean_display(name: str) -> str:
    """The raw name made printable, for messages about refused members."""
    return re.sub(r"[\x00-\x1f]", "?", name.replace("\\", "/"))[:200]


def _is_junk(parts: list[str]) -> bool:
    if parts[0] == "__MACOSX":
        return True
    return any(p.startswith(".") for p in parts) or parts[-1].lower() in _JUNK_NAMES


def _size(n: float) -> str:
    """A byte count as people read it: 950 bytes, 12 KB, 1.5 GB."""
    if n < 1024:
        return f"{n:,.0f} bytes"
    for unit in ("KB", "MB", "GB", "TB"):
        n /= 1024
        if n < 1024 or unit == "TB":
            break
    return f"{n:,.0f} {unit}" if n >= 10 else f"{n:.1f} {unit}".replace(".0 ", " ")
