"""core.base.files: the one atomic-write helper every stored file goes through."""

from __future__ import annotations

import os

import numpy as np
import pytest

from core.base import files


def test_atomic_write_leaves_old_content_on_failure(tmp_path, monkeypatch):
    target = tmp_path / "f.json"
    files.atomic_write_text(target, "old")

    def boom(*args):
        raise OSError("disk full")

    monkeypatch.setattr(files.os, "replace", boom)
    with pytest.raises(OSError):
        files.atomic_write_text(target, "new")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["f.json"]  # no temp file left behind


def test_a_writer_that_fails_half_way_leaves_nothing(tmp_path):
    target = tmp_path / "sub" / "arrays.npz"
    with pytest.raises(RuntimeError), files.atomic_file(target) as fh:
        fh.write(b"PK half a zip")
        raise RuntimeError("killed")
    assert not target.exists()
    assert list((tmp_path / "sub").iterdir()) == []


def test_atomic_path_serves_writers_that_want_a_file_name(tmp_path):
    target = tmp_path / "a.npy"
    with files.atomic_path(target) as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".a.npy.")
        with open(tmp, "wb") as fh:
            np.save(fh, np.arange(3))
    np.testing.assert_array_equal(np.load(target), np.arange(3))
    assert sorted(os.listdir(tmp_path)) == ["a.npy"]


def test_copy_and_hash(tmp_path):
    src = tmp_path / "src.bin"
    src.write_bytes(b"x" * (3 << 20))
    files.atomic_copy(src, tmp_path / "deep" / "dest.bin")
    assert files.sha256_file(tmp_path / "deep" / "dest.bin") == files.sha256_file(src)
