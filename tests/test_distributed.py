"""Tagging on Ray Data: a real local Ray instance (2 CPUs) gives the single-machine output, cell for cell."""

from __future__ import annotations

import functools
import json
import os
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

import pandas as pd
import pytest
from PIL import Image, ImageOps

from core import cli, tagging
from core.tagging import distributed

# CI installs requirements-ray.txt: there a missing Ray is a failure, not a skip.
pytestmark = pytest.mark.skipif(
    not distributed.ray_available() and not os.environ.get("CI"),
    reason="Ray is not installed (pip install -r requirements-ray.txt -c constraints.txt); CI installs it",
)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A frozen model trained on scikit-image photos; a catalog naming them by file name and by link."""
    from skimage import data

    root = tmp_path_factory.mktemp("distributed")
    photos = root / "photos"
    photos.mkdir()
    rows = ["file,label"]
    for label, arrays in {"person": [data.astronaut()], "no_person": [data.coffee(), data.chelsea()]}.items():
        for i in range(8):
            img = Image.fromarray(arrays[i % len(arrays)]).convert("RGB").rotate(i - 4)
            (ImageOps.mirror(img) if i % 2 else img).save(photos / f"{label}_{i}.jpg", quality=88)
            rows.append(f"{label}_{i}.jpg,{label}")
    (photos / "broken.jpg").write_bytes(b"\xff\xd8\xff broken")
    (root / "labels.csv").write_text("\n".join(rows) + "\n")
    bundle = root / "model.zip"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CATALOG_LENS_HOME", str(root / "home"))
        assert (
            cli.main(
                [
                    "train",
                    "--images",
                    str(photos),
                    "--labels",
                    str(root / "labels.csv"),
                    "--method",
                    "frozen",
                    "--out",
                    str(bundle),
                    "--json",
                ]
            )
            == 0
        )
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(SimpleHTTPRequestHandler, directory=str(photos)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_port}"
    names = sorted(p.name for p in photos.glob("*_*.jpg"))
    lines = ["Référence;Désignation;Photo;Autre photo"]
    lines += [
        f"R{i:03d};Article n° {i};{names[i % len(names)]};{names[(i + 3) % len(names)] if i % 4 == 0 else ''}"
        for i in range(40)
    ]
    lines += [
        "R900;Sans photo;;",
        "R901;Photo absente;absente.jpg;",
        "R902;Photo cassée;broken.jpg;",
        f"R903;Lien;{base}/person_1.jpg;",
        f"R904;Lien mort;{base}/missing.jpg;",
        "R905;Adresse interne;http://169.254.169.254/latest/meta-data;",
        "",
        "R906;Après une ligne vide;person_2.jpg;",
    ]
    catalog = root / "catalogue.csv"
    catalog.write_bytes(("\r\n".join(lines) + "\r\n").encode("cp1252"))
    yield {"root": root, "photos": photos, "bundle": bundle, "catalog": catalog, "rows": len(lines) - 1}
    server.shutdown()


def _tag(setup, out, *extra):
    args = [
        "tag",
        "--model",
        str(setup["bundle"]),
        "--catalog",
        str(setup["catalog"]),
        "--images",
        str(setup["photos"]),
        "--image-column",
        "Photo",
        "--image-column",
        "Autre photo",
        "--chunk-rows",
        "8",
        "--out",
        str(out),
        "--json",
        *extra,
    ]
    assert cli.main(args) == 0


def test_ray_gives_the_single_machine_output_cell_for_cell(setup, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("CATALOG_LENS_ALLOWED_HOSTS", "127.0.0.1")  # the test server
    local, on_ray = tmp_path / "local.csv", tmp_path / "ray.csv"
    _tag(setup, local)
    capsys.readouterr()
    _tag(setup, on_ray, "--engine", "ray", "--cpus", "2")
    summary = json.loads(capsys.readouterr().out)
    assert (
        summary["done"] == summary["rows"] == setup["rows"] and summary["failed"] == 6
    )  # 5 bad rows and the blank one
    # Cell for cell: every original cell, tag, review flag and reason as written; the confidence
    # (4 decimals) may differ in its last digit, as a photo's network run in another process
    # (one thread, another batch) can round the other way. Usually the files are byte-identical.
    frame = pd.read_csv(on_ray, sep=";", encoding="cp1252", dtype=str, keep_default_na=False)
    same = pd.read_csv(local, sep=";", encoding="cp1252", dtype=str, keep_default_na=False)
    exact = [c for c in frame.columns if c != "confidence"]
    pd.testing.assert_frame_equal(frame[exact], same[exact])
    gap = (pd.to_numeric(frame["confidence"]) - pd.to_numeric(same["confidence"])).abs()
    assert (gap.fillna(0) <= 1.01e-4).all() and frame["confidence"].eq("").equals(same["confidence"].eq(""))
    assert on_ray.read_bytes().count(b"\r\n") == local.read_bytes().count(b"\r\n")  # same lines, same endings
    assert list(frame["Référence"]) == [
        line.split(";")[0] for line in setup["catalog"].read_text("cp1252").splitlines()[1:]
    ]
    by_ref = frame.set_index("Référence")
    assert by_ref.loc["R903", "predicted_label"] == "person"  # fetched inside a Ray worker
    assert "404" in by_ref.loc["R904", "tag_error"]
    assert "download failed" in by_ref.loc["R905", "tag_error"]  # the project's fetcher refuses it
    assert by_ref.loc["R901", "tag_error"] and by_ref.loc["R900", "tag_error"] == "the row has no photo"

    # Parquet: the same table, the confidence as a number.
    for name in ("local", "ray"):
        tagging.write_output(tmp_path / f"{name}.csv.run", tmp_path / f"{name}.parquet")
    pd.testing.assert_frame_equal(
        pd.read_parquet(tmp_path / "ray.parquet"), pd.read_parquet(tmp_path / "local.parquet"), atol=1.01e-4, rtol=0
    )
    parquet = pd.read_parquet(tmp_path / "ray.parquet")
    assert len(parquet) == setup["rows"] and parquet["confidence"].dtype.kind == "f"
    assert list(parquet.columns[:4]) == ["Référence", "Désignation", "Photo", "Autre photo"]


def test_engine_options_need_the_ray_engine(setup, tmp_path, capsys):
    out = tmp_path / "x.csv"
    assert (
        cli.main(
            [
                "tag",
                "--model",
                str(setup["bundle"]),
                "--catalog",
                str(setup["catalog"]),
                "--out",
                str(out),
                "--address",
                "ray://example:10001",
            ]
        )
        == 2
    )
    assert "--engine ray" in capsys.readouterr().err
