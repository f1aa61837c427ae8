"""The feature cache of one project: vectors per photo and per network, as atomic chunks.

Features are stored under a cache key that names the network, the hash of its weights and
its preprocessing (:func:`core.vision.features.feature_key`), so a photo is never computed
twice for the same network and never reused for another. A chunk appears on disk complete
or not at all, so a cancel or a crash keeps every finished chunk.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import threading
import time
import uuid
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from core.base.files import TMP_SUFFIX, atomic_file, atomic_write_text

__all__ = ["FeatureStore"]

_KEY_RE = re.compile(r"^[A-Za-z0-9_.\-]+$")
_CHUNK_GLOB = "chunk-*.npz"


class FeatureStore:
    """Feature vectors of one project, per cache key, as atomic ``.npz`` chunks.

    Each chunk holds ``shas`` (the caller's image ids) and ``features`` (float32 rows); it
    appears on disk complete or not at all (temporary file, fsync, rename). Chunks never
    change once written, so their ids are read once per store object.
    """

    def __init__(self, root: Path):
        self.root = Path(root)
        self._sha_index: dict[Path, list[str]] = {}
        self._lock = threading.Lock()

    def _dir(self, key: str) -> Path:
        if not _KEY_RE.match(key) or key in {".", ".."}:
            raise ValueError(f"Not a feature cache key: {key!r}.")
        return self.root / key

    def _chunks(self, key: str) -> list[Path]:
        folder = self._dir(key)
        return sorted(folder.glob(_CHUNK_GLOB)) if folder.is_dir() else []

    def _chunk_shas(self, chunk: Path) -> list[str]:
        with self._lock:
            if chunk in self._sha_index:
                return self._sha_index[chunk]
        with np.load(chunk, allow_pickle=False) as z:
            shas = [str(s) for s in z["shas"]]
        with self._lock:
            self._sha_index[chunk] = shas
        return shas

    def keys(self) -> list[str]:
        """Cache keys that hold at least one chunk."""
        if not self.root.is_dir():
            return []
        return sorted(
            p.name for p in self.root.iterdir()
            if p.is_dir() and _KEY_RE.match(p.name) and any(p.glob(_CHUNK_GLOB))
        )

    def has(self, key: str) -> set[str]:
        """Image ids that have features under ``key``."""
        found: set[str] = set()
        for chunk in self._chunks(key):
            found.update(self._chunk_shas(chunk))
        return found

    def add(self, key: str, shas: Sequence[str], features: np.ndarray) -> Path:
        """Write one chunk atomically and return its path."""
        features = np.asarray(features, dtype=np.float32)
        if features.ndim != 2 or features.shape[0] != len(shas):
            raise ValueError(
                f"Expected one feature row per id: {len(shas)} ids, array {features.shape}."
            )
        folder = self._dir(key)
        folder.mkdir(parents=True, exist_ok=True)
        name = f"chunk-{time.time_ns():020d}-{uuid.uuid4().hex[:8]}.npz"
        target = folder / name
        with atomic_file(target) as fh:
            np.savez(fh, shas=np.asarray(list(shas), dtype=str), features=features)
        return target

    def load(self, key: str, shas: Sequence[str]) -> np.ndarray:
        """Feature rows for ``shas``, in that order (float32, shape (len(shas), dim)).
        ``KeyError`` saying how many are missing when some have no features yet."""
        wanted: dict[str, list[int]] = {}
        for row, sha in enumerate(shas):
            wanted.setdefault(sha, []).append(row)
        out: np.ndarray | None = None
        for chunk in self._chunks(key):
            chunk_shas = self._chunk_shas(chunk)
            take = [(i, s) for i, s in enumerate(chunk_shas) if s in wanted]
            if not take:
                continue
            with np.load(chunk, allow_pickle=False) as z:
                feats = z["features"]
            if out is None:
                out = np.empty((len(shas), feats.shape[1]), dtype=np.float32)
            for i, s in take:
                rows = wanted.pop(s, None)
                if rows is not None:  # first chunk wins if a photo was stored twice
                    out[rows] = feats[i]
            if not wanted:
                break
        if wanted:
            missing = list(wanted)
            raise KeyError(
                f"{len(missing)} of {len(shas)} photos have no features under {key} yet "
                f"(first: {missing[0]}). Run the feature extraction first."
            )
        if out is None:  # nothing asked for
            chunks = self._chunks(key)
            dim = 0
            if chunks:
                with np.load(chunks[0], allow_pickle=False) as z:
                    dim = z["features"].shape[1]
            out = np.empty((0, dim), dtype=np.float32)
        return out

    def failures(self, key: str) -> dict[str, str]:
        """Image ids whose photo could not be decoded under ``key``, with the reason. Ids
        are content hashes, so the same bytes would fail again: they are not retried."""
        folder = self._dir(key)
        found: dict[str, str] = {}
        for path in sorted(folder.glob("failures-*.json")) if folder.is_dir() else []:
            with contextlib.suppress(OSError, ValueError):
                found.update(json.loads(path.read_text()))
        return found

    def add_failures(self, key: str, failures: dict[str, str]) -> None:
        """Remember photos that could not be decoded (one atomic file per call)."""
        if not failures:
            return
        folder = self._dir(key)
        folder.mkdir(parents=True, exist_ok=True)
        target = folder / f"failures-{time.time_ns():020d}-{uuid.uuid4().hex[:8]}.json"
        atomic_write_text(target, json.dumps(failures))

    def compact(self, key: str) -> None:
        """Merge the chunks of ``key`` into one (duplicates dropped). Safe to interrupt:
        the merged chunk is written before the old ones are removed."""
        chunks = self._chunks(key)
        if len(chunks) < 2:
            return
        shas: list[str] = []
        parts: list[np.ndarray] = []
        seen: set[str] = set()
        for chunk in chunks:
            with np.load(chunk, allow_pickle=False) as z:
                chunk_shas, feats = [str(s) for s in z["shas"]], z["features"]
            keep = [i for i, s in enumerate(chunk_shas) if not (s in seen or seen.add(s))]
            shas.extend(chunk_shas[i] for i in keep)
            parts.append(feats[keep])
        self.add(key, shas, np.concatenate(parts))
        for chunk in chunks:
            chunk.unlink(missing_ok=True)
            with self._lock:
                self._sha_index.pop(chunk, None)
        for stale in self._dir(key).glob(f".*{TMP_SUFFIX}"):
            if time.time() - stale.stat().st_mtime > 3600:  # left by a crash long ago
                stale.unlink(missing_ok=True)

    def delete(self, key: str) -> None:
        """Remove every feature stored under ``key`` (it vanishes at once, then is freed)."""
        folder = self._dir(key)
        if not folder.exists():
            return
        trash = self.root / f".deleting-{key}-{uuid.uuid4().hex[:8]}"
        os.replace(folder, trash)
        with self._lock:
            self._sha_index = {p: s for p, s in self._sha_index.items() if p.parent != folder}
        shutil.rmtree(trash, ignore_errors=True)
