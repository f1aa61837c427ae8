"""Writing files so that a crash never leaves half of one: the one atomic-write helper.

Every file the app keeps (photos, sheets, features, models, checkpoints, settings) is
written to a temporary file in the same folder, flushed to disk, then renamed over the
target. Readers see the old content or the new, never a mix, and ``kill -9`` in the
middle leaves at most a hidden ``.tmp`` file behind.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO

__all__ = ["atomic_copy", "atomic_file", "atomic_path", "atomic_write_bytes", "atomic_write_text", "sha256_file"]

TMP_SUFFIX = ".tmp"


def _sync_folder(folder: Path) -> None:
    """Make a rename in ``folder`` itself durable (where the OS allows opening folders)."""
    with contextlib.suppress(OSError, AttributeError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str], *, name_after: Callable[[Path], Path] | None = None) -> Iterator[Path]:
    """A temporary path beside ``path`` for a writer that wants a file name (safetensors,
    zip, a download): once the block ends without error the file is synced and renamed to
    ``path``, or to ``name_after(temporary path)`` when the name depends on what was written
    (a download's format; an error raised there discards the file). On any error the
    temporary file is removed and nothing else is touched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TMP_SUFFIX)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        if name_after is not None:
            path = name_after(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    _sync_folder(path.parent)


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike[str], mode: str = "wb") -> Iterator[IO]:
    """An open temporary file that becomes ``path`` when the block ends without error."""
    if mode not in ("wb", "w"):
        raise ValueError(f"atomic_file writes whole files: mode 'wb' or 'w', not {mode!r}.")
    with atomic_path(path) as tmp, open(tmp, mode, **({"encoding": "utf-8"} if mode == "w" else {})) as fh:
        yield fh


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``path``: readers see the old or the new content, never a mix."""
    with atomic_file(path) as fh:
        fh.write(data)


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_copy(src: str | os.PathLike[str], dest: str | os.PathLike[str]) -> None:
    """Copy ``src`` to ``dest`` atomically."""
    with atomic_file(dest) as out, open(src, "rb") as inp:
        shutil.copyfileobj(inp, out, length=1 << 20)


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Hex SHA-256 of a file's bytes, read in blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
