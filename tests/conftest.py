"""Shared fixtures: every test gets its own empty workspace."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture(autouse=True)
def workspace_home(tmp_path, monkeypatch) -> Path:
    """Point CATALOG_LENS_HOME at a fresh folder so tests never touch real projects."""
    home = tmp_path / "home"
    monkeypatch.setenv("CATALOG_LENS_HOME", str(home))
    return home


@pytest.fixture
def product_photos() -> Path:
    """The shared real product photos; tests using them skip where the folder is absent."""
    folder = SHARED_DATA / "product-photos"
    if not (folder / "labels.csv").is_file():
        pytest.skip(f"shared photos not found at {folder} (a fresh clone has no ../shared)")
    return folder


def sample_photo_set(folder: Path, sources: dict[str, list], per_class: int = 12) -> str:
    """Varied crops of scikit-image's sample photos (real pixels), one class per list of
    arrays, saved as JPEGs in ``folder``; returns the matching ``file,label`` sheet."""
    from PIL import Image, ImageOps

    folder.mkdir(parents=True)
    rows = ["file,label"]
    for label, arrays in sources.items():
        for i in range(per_class):
            img = Image.fromarray(arrays[i % len(arrays)]).convert("RGB")
            w, h = img.size
            img = img.crop((i * 7 % 40, i * 5 % 30, w - (i * 3 % 35), h - (i * 11 % 25))).rotate((i % 5) - 2)
            if i % 2:
                img = ImageOps.mirror(img)
            img.save(folder / f"{label}_{i:02d}.jpg", quality=88)
            rows.append(f"{label}_{i:02d}.jpg,{label}")
    return "\n".join(rows) + "\n"


def photo_project(name: str, folder: Path, sheet: str | bytes):
    """A new project holding the photos of ``folder`` (read in place) labelled by ``sheet``
    (the text of a ``file,label`` sheet), as the Data step leaves it."""
    from core.projects import intake, workspace

    project = workspace.create_project(name)
    intake.stage_folder(project, folder)
    intake.process_staged(project)
    intake.apply_sheet(project, filename="labels.csv", data=sheet.encode() if isinstance(sheet, str) else sheet)
    return project


def shown(markdown: str) -> str:
    """The text a reader sees of page markdown that went through ``app_pages.ui.plain``:
    backslash escapes and invisible word joiners removed."""
    import re

    return re.sub(r"\\(.)", r"\1", markdown).replace("\u2060", "")
