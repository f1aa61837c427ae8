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
