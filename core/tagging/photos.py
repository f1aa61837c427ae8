"""Finding a catalog's photos: a file name, relative path or link becomes a file on this computer.

Names are looked up in the photos uploaded with the catalog (a zip, unpacked once into the
run folder), a folder given on the command line, and the project's own photos; paths may
point into the server folders named in ``CATALOG_LENS_IMAGE_ROOTS`` (configuration, never
user input) and are checked by :func:`core.inputs.catalog.resolve_local`; links are
downloaded by :class:`core.inputs.fetch.Fetcher` into the run folder, once.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path

from core.base.files import atomic_write_text
from core.inputs.catalog import ImageRef, ref_kind, resolve_local
from core.inputs.fetch import Fetcher
from core.inputs.labels import normalise_name
from core.inputs.uploads import unpack_zip

__all__ = ["IMAGE_ROOTS_ENV", "PhotoFinder", "project_photo_files"]

IMAGE_ROOTS_ENV = "CATALOG_LENS_IMAGE_ROOTS"


def _is_link(ref: str) -> bool:
    return ref.lower().startswith(("http://", "https://"))


class PhotoFinder:
    """The photos of one tagging run (``run`` is its run.json, ``folder`` its folder)."""

    def __init__(self, run: dict, folder: Path, project_files: dict[str, Path] | None = None):
        self.files: dict[str, Path] = {}
        if run.get("images_zip"):
            unpacked = folder / "photos-unpacked"
            if not (unpacked / ".done").exists():
                result = unpack_zip(Path(run["images_zip"]), unpacked, archive_name=Path(run["images_zip"]).name)
                atomic_write_text(unpacked / "index.json", json.dumps({f.name: str(f.path) for f in result.files}))
                (unpacked / ".done").touch()
            for name, path in json.loads((unpacked / "index.json").read_text()).items():
                self._add(name, Path(path))
        if run.get("images_dir"):
            root = Path(run["images_dir"])
            for path in root.rglob("*"):
                if path.is_file():
                    self._add(path.relative_to(root).as_posix(), path)
        for name, path in (project_files or {}).items():
            self._add(name, path)
        self.roots = [Path(p) for p in os.environ.get(IMAGE_ROOTS_ENV, "").split(os.pathsep) if p]
        self.downloads = Fetcher(folder / "photos")  # links are fetched into the run folder, once

    def _add(self, name: str, path: Path) -> None:
        self.files.setdefault(normalise_name(name), path)
        self.files.setdefault(normalise_name(Path(name).name), path)

    def _local(self, ref: str) -> Path | None:
        path = self.files.get(normalise_name(ref))
        if path is None and self.roots:
            path = resolve_local(ImageRef(0, 0, "", 0, ref, ref_kind(ref)), allowed_roots=self.roots)
        return path

    def resolve(
        self, refs: Sequence[str], should_cancel: Callable[[], bool] | None = None
    ) -> dict[str, tuple[Path | None, str]]:
        """Each reference's file, or None and the reason in words; links are downloaded here.
        Once ``should_cancel()`` is true no more links are fetched (the answer is then partial)."""
        out: dict[str, tuple[Path | None, str]] = {}
        urls = [r for r in refs if _is_link(r)]
        for ref in refs:
            if not _is_link(ref):
                path = self._local(ref)
                out[ref] = (path, "" if path else f"no photo named {ref!r} was uploaded with the catalog")
        if urls:
            for result in self.downloads.fetch_many(urls, should_cancel=should_cancel):
                out[result.url] = (result.path, "" if result.path else f"download failed: {result.error}")
        return out

    def on_disk(self, ref: str) -> Path | None:
        """The reference's file if it is already on this computer (a link only as downloaded by
        the run: nothing is fetched here), else None."""
        return self.downloads.cached(ref) if _is_link(ref) else self.files.get(normalise_name(ref))


def project_photo_files(project) -> dict[str, Path]:
    """Photos already in the project, by every name they were uploaded under."""
    files = project.names().merge(project.images()[["sha", "ext"]], on="sha")
    return {name: project.image_path(sha, ext) for name, sha, ext in zip(files["name"], files["sha"], files["ext"])}
