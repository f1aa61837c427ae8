"""Training and tagging from the command line, and sharing models between projects.

Real photos (scikit-image's samples, cropped, flipped and turned) in two classes; the
model is trained once per module through ``python -m core train`` and reused.
"""

from __future__ import annotations

import contextlib
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from core import cli
from core.base.problems import InputError
from core.learning import bundles, models, predictor, runs
from core.projects import workspace

PER_CLASS = 10


def _variants(array: np.ndarray, n: int, rng: np.random.Generator) -> list[Image.Image]:
    """Crops, mirror images and small turns of one photo, each about 256 pixels across."""
    base = Image.fromarray(array).convert("RGB")
    out = []
    for k in range(n):
        w, h = base.size
        scale = rng.uniform(0.65, 1.0)
        cw, ch = int(w * scale), int(h * scale)
        x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        img = base.crop((x, y, x + cw, y + ch))
        if k % 2:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        img = img.rotate(float(rng.uniform(-8, 8)), resample=Image.Resampling.BILINEAR, fillcolor=(255, 255, 255))
        img.thumbnail((256, 256))
        out.append(img)
    return out


def _make_photos(folder: Path) -> tuple[Path, Path]:
    """A folder of photos (some in a subfolder, plus a note that is not a photo) and its label sheet."""
    from skimage import data

    rng = np.random.default_rng(0)
    images = folder / "photos"
    (images / "batch2").mkdir(parents=True)
    rows = ["file,tag"]
    people = _variants(data.astronaut(), PER_CLASS, rng)
    things = [img for a in (data.coffee(), data.chelsea(), data.rocket()) for img in _variants(a, 4, rng)][:PER_CLASS]
    for label, stem, photos in (("person", "astro", people), ("no person", "thing", things)):
        for i, img in enumerate(photos):
            name = f"{stem}_{i:02d}.jpg"
            sub = images / "batch2" if i % 3 == 0 else images
            img.save(sub / name, quality=90)
            rows.append(f"{name},{label}")
    (images / "notes.txt").write_text("not a photo\n")
    sheet = folder / "labels.csv"
    sheet.write_text("\n".join(rows) + "\n")
    return images, sheet


def _run_cli(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main(argv)
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    """One workspace for the module (the per-test one is set after module fixtures run)."""
    path = tmp_path_factory.mktemp("predict-home")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(workspace.HOME_ENV, str(path))
        yield path


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> dict:
    images, sheet = _make_photos(tmp_path_factory.mktemp("shop"))
    return {"images": images, "sheet": sheet}


@pytest.fixture(scope="module")
def trained(home, photos, tmp_path_factory) -> dict:
    """A frozen model trained from the command line into the kept project "Shop A"."""
    out = tmp_path_factory.mktemp("out") / "shop-a.zip"
    code, stdout, stderr = _run_cli([
        "train", "--images", str(photos["images"]), "--labels", str(photos["sheet"]),
        "--method", "frozen", "--out", str(out), "--project", "Shop A", "--json",
    ])
    assert code == 0, stderr
    return {"result": json.loads(stdout), "bundle": out, "home": home}


@pytest.fixture
def in_home(trained, monkeypatch):
    """Run a test inside the module's workspace, where project "Shop A" lives."""
    monkeypatch.setenv(workspace.HOME_ENV, str(trained["home"]))
    return workspace.open_project("shop-a")


def _photo_items(folder: Path) -> list[tuple[str, Path]]:
    return sorted((p.relative_to(folder).as_posix(), p) for p in folder.rglob("*.jpg"))


# --------------------------------------------------------------------------- train


def test_train_prints_the_score_and_writes_a_bundle(trained):
    result = trained["result"]
    assert {"method", "backbone", "metrics", "bundle", "n_photos", "seconds"} <= set(result)
    assert result["method"] == "frozen" and result["backbone"] == "efficientnet_lite0"
    assert result["n_photos"] == 2 * PER_CLASS
    m = result["metrics"]
    assert isinstance(m["balanced_accuracy"], float) and 0.0 <= m["balanced_accuracy"] <= 1.0
    assert 0.0 <= m["low"] <= m["balanced_accuracy"] <= m["high"] <= 1.0
    assert 0.0 <= m["accuracy"] <= 1.0
    assert Path(result["bundle"]) == trained["bundle"].resolve()
    bundle, _ = bundles.load_bundle(result["bundle"])
    assert bundle.kind == "frozen" and bundle.classes == ["no person", "person"] and bundle.positive == "person"


def test_train_without_project_leaves_the_workspace_empty(photos, tmp_path, capsys):
    out = tmp_path / "model.zip"
    argv = ["train", "--images", str(photos["images"]), "--labels", str(photos["sheet"]),
            "--file-column", "file", "--label-column", "tag", "--method", "frozen", "--out", str(out), "--json"]
    assert cli.main(argv) == 0
    result = json.loads(capsys.readouterr().out)
    assert Path(result["bundle"]) == out.resolve() and out.is_file()
    assert "project" not in result and workspace.list_projects() == []


@pytest.mark.parametrize("change, message", [
    ({"--images": "missing-folder"}, "is not a folder"),
    ({"--backbone": "no-such-net"}, "Unknown backbone"),
    ({"--epochs": "3"}, "--epochs needs --method finetune"),
    ({"--label-column": "colour"}, "no column 'colour'"),
])
def test_train_refuses_bad_input_with_a_plain_message(photos, tmp_path, capsys, change, message):
    args = {"--images": str(photos["images"]), "--labels": str(photos["sheet"]),
            "--method": "frozen", "--out": str(tmp_path / "m.zip")} | change
    argv = ["train", *[x for kv in args.items() for x in kv]]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.splitlines()[-1].startswith("error: ") and message in err and "Traceback" not in err
    assert not (tmp_path / "m.zip").exists() and workspace.list_projects() == []


def test_train_refuses_a_sheet_with_one_label(photos, tmp_path, capsys):
    sheet = tmp_path / "one.csv"
    sheet.write_text("\n".join(line.replace("no person", "person") for line in photos["sheet"].read_text().splitlines()))
    argv = ["train", "--images", str(photos["images"]), "--labels", str(sheet), "--method", "frozen",
            "--out", str(tmp_path / "m.zip")]
    assert cli.main(argv) == 2
    assert "at least two kinds of photo" in capsys.readouterr().err


# --------------------------------------------------------------------------- predict


def test_predict_gives_one_answer_per_photo_in_name_order(trained, photos, capsys):
    assert cli.main(["predict", "--model", str(trained["bundle"]), "--images", str(photos["images"]), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    names = [name for name, _ in _photo_items(photos["images"])]
    assert [r["image"] for r in rows] == names  # nested folder included, notes.txt skipped
    assert "batch2/astro_00.jpg" in names and len(rows) == 2 * PER_CLASS
    for r in rows:
        assert set(r) == {"image", "predicted_label", "confidence"}
        assert r["predicted_label"] in ("person", "no person") and 0.0 <= r["confidence"] <= 1.0
    table = predictor.predict_images(trained["bundle"], _photo_items(photos["images"]))
    assert [r["predicted_label"] for r in rows] == table["predicted_label"].tolist()
    assert [r["confidence"] for r in rows] == table["confidence"].tolist()
    # Photos it trained on: the two kinds must come out right.
    truth = ["person" if Path(n).name.startswith("astro") else "no person" for n in names]
    assert np.mean(table["predicted_label"].to_numpy() == np.asarray(truth)) >= 0.9


def test_predict_reports_an_unreadable_photo_and_tags_the_others(trained, photos, tmp_path, capsys):
    folder = tmp_path / "catalog"
    folder.mkdir()
    for name in ("astro_01.jpg", "thing_01.jpg", "thing_02.jpg"):
        shutil.copy(photos["images"] / name, folder / name)
    good = (folder / "astro_01.jpg").read_bytes()
    (folder / "broken.jpg").write_bytes(good[: len(good) // 3])
    (folder / "empty.jpg").write_bytes(b"")
    assert cli.main(["predict", "--model", str(trained["bundle"]), "--images", str(folder), "--json"]) == 0
    rows = {r["image"]: r for r in json.loads(capsys.readouterr().out)}
    assert sorted(rows) == ["astro_01.jpg", "broken.jpg", "empty.jpg", "thing_01.jpg", "thing_02.jpg"]
    for bad in ("broken.jpg", "empty.jpg"):
        assert rows[bad]["error"] and rows[bad]["predicted_label"] is None and rows[bad]["confidence"] is None
    for ok in ("astro_01.jpg", "thing_01.jpg", "thing_02.jpg"):
        assert "error" not in rows[ok] and rows[ok]["predicted_label"] in ("person", "no person")

    assert cli.main(["predict", "--model", str(trained["bundle"]), "--images", str(folder)]) == 0
    text = capsys.readouterr().out.splitlines()
    assert len(text) == 1 + len(rows) and "could not be read" in next(t for t in text if t.startswith("broken.jpg"))


def test_predict_images_keeps_every_row_in_order(trained, photos):
    items = _photo_items(photos["images"])[:3]
    items = [items[2], ("missing.jpg", photos["images"] / "missing.jpg"), items[0], items[2]]
    table = predictor.predict_images(trained["bundle"], items)
    assert table["image"].tolist() == [name for name, _ in items]
    assert list(table.columns) == ["image", "predicted_label", "confidence", "proba_no person", "proba_person", "error",
                                   "unlike_training"]
    assert not table["unlike_training"].any()  # photos like the training ones (the missing one has no answer)
    assert table["error"][1] and table["predicted_label"][1] == "" and np.isnan(table["confidence"][1])
    assert (table["error"].drop(1) == "").all()
    pd.testing.assert_series_equal(table.iloc[0, 1:], table.iloc[3, 1:], check_names=False)
    proba = table[["proba_no person", "proba_person"]].to_numpy()[[0, 2, 3]]
    np.testing.assert_allclose(proba.sum(axis=1), 1.0)
    assert predictor.predict_images(trained["bundle"], []).empty


# --------------------------------------------------------------------------- sharing models


def test_an_imported_model_predicts_exactly_like_the_original(in_home, trained, photos):
    shop_a = in_home
    run = runs.latest_runs(shop_a)["frozen"]
    shop_b = workspace.create_project("Shop B")
    model_id = models.import_bundle(shop_b, trained["bundle"])
    assert model_id == run.id
    assert models.import_bundle(shop_b, trained["bundle"]) == model_id  # again: nothing new
    listed = models.list_models(shop_b)
    assert [(m["id"], m["source"], m["kind"]) for m in listed] == [(model_id, "imported", "frozen")]
    assert Path(listed[0]["path"]).parent == shop_b.root / "models"
    assert listed[0]["classes"] == run.classes and listed[0]["backbone"] == run.backbone_id
    assert {m["source"] for m in models.list_models(shop_a)} == {"trained"}

    items = _photo_items(photos["images"])
    in_b = predictor.predict_images(listed[0]["path"], items)
    in_a = predictor.predict_images(run.bundle_path, items)
    pd.testing.assert_frame_equal(in_b, in_a, check_exact=True)

    # ... and equal to what project A reports for its held-out photos.
    reported = runs.test_predictions(shop_a, run)
    by_sha = dict(zip(shop_a.dataset()["sha"], shop_a.dataset()["name"]))
    held_out = predictor.predict_images(
        listed[0]["path"], [(by_sha[sha], shop_a.image_path(sha)) for sha in reported["sha"]]
    )
    assert held_out["predicted_label"].tolist() == reported["predicted"].tolist()
    _, arrays = runs.load_run(shop_a, run.id)
    np.testing.assert_allclose(held_out[[f"proba_{c}" for c in run.classes]].to_numpy(), arrays["test_proba"],
                               rtol=0, atol=1e-5)


def test_a_model_trained_with_other_weights_is_refused(trained, photos, tmp_path, capsys):
    bundle, arrays = bundles.load_bundle(trained["bundle"])
    bundle.weights_hash = "0" * 64
    other = bundles.save_bundle(bundle, arrays, tmp_path / "other-weights.zip")
    with pytest.raises(ValueError, match="trained with other weights"):
        predictor.predict_images(other, _photo_items(photos["images"])[:2])
    project = workspace.create_project("Shop E")
    with pytest.raises(InputError, match="trained with other weights"):
        models.import_bundle(project, other)
    assert models.list_models(project) == [] and not any(project.path("models").iterdir())
    assert cli.main(["predict", "--model", str(other), "--images", str(photos["images"]), "--json"]) == 2
    err = capsys.readouterr().err
    assert "trained with other weights" in err and "Traceback" not in err


def test_a_frozen_head_narrower_than_its_network_is_refused_at_import(trained, tmp_path, capsys):
    """A head for 16 features claiming efficientnet_lite0 (1280): refused when imported, not mid-catalog."""
    bundle, arrays = bundles.load_bundle(trained["bundle"])
    narrow = {k: (v[..., :16] if k.startswith(("scaler.m", "scaler.s", "scaler.v", "logreg.coef")) else v)
              for k, v in arrays.items()}
    path = bundles.save_bundle(bundle, narrow, tmp_path / "narrow.zip")
    project = workspace.create_project("Shop N")
    with pytest.raises(bundles.BundleError, match="gives 1280 features per photo, the model expects 16"):
        models.import_bundle(project, path)
    assert models.list_models(project) == []


def test_a_file_that_is_not_a_model_is_refused(photos, tmp_path, capsys):
    project = workspace.create_project("Shop C")
    fake = tmp_path / "model.zip"
    fake.write_text("these are my notes, not a model\n")
    with pytest.raises(bundles.BundleError, match="not a Catalog Lens model"):
        models.import_bundle(project, fake)
    assert isinstance(bundles.BundleError("x"), InputError)
    assert models.list_models(project) == [] and not any(project.path("models").iterdir())
    photo = photos["images"] / "astro_01.jpg"
    assert cli.main(["predict", "--model", str(photo), "--images", str(photos["images"])]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "not a Catalog Lens model" in err and "Traceback" not in err


def test_a_finetuned_model_round_trips(in_home, trained, photos, tmp_path):
    out = tmp_path / "finetuned.zip"
    code, stdout, stderr = _run_cli([
        "train", "--images", str(photos["images"]), "--labels", str(photos["sheet"]), "--method", "finetune",
        "--epochs", "1", "--out", str(out), "--project", "shop-a", "--json",
    ])
    assert code == 0, stderr
    result = json.loads(stdout)
    assert result["method"] == "finetune" and 0.0 <= result["metrics"]["balanced_accuracy"] <= 1.0
    assert bundles.load_bundle(out)[0].kind == "finetuned"
    assert {m["kind"] for m in models.list_models(in_home)} == {"frozen", "finetuned"}

    # The held-out photos get the probabilities project A recorded for them.
    run = runs.latest_runs(in_home)["finetuned"]
    _, arrays = runs.load_run(in_home, run.id)
    test_ids = [str(i) for i in arrays["test_ids"]]
    held_out = predictor.predict_images(out, [(sha, in_home.image_path(sha)) for sha in test_ids])
    np.testing.assert_allclose(held_out[[f"proba_{c}" for c in run.classes]].to_numpy(), arrays["test_proba"],
                               rtol=0, atol=1e-5)

    shop_d = workspace.create_project("Shop D")
    model_id = models.import_bundle(shop_d, out)
    items = _photo_items(photos["images"])[:6] + [("broken.jpg", tmp_path / "nothing-here.jpg")]
    in_d = predictor.predict_images(shop_d.path("models", f"{model_id}.zip"), items)
    pd.testing.assert_frame_equal(in_d, predictor.predict_images(out, items), check_exact=True)
    assert in_d["error"].tolist()[:6] == [""] * 6 and in_d["error"].iloc[6]
    assert set(in_d["predicted_label"][:6]) <= {"person", "no person"}


def test_a_calibrated_model_states_its_calibrated_confidence_here_and_after_export(in_home, trained, photos, tmp_path):
    """The calibration travels inside the model file: the Predictor applies it, and a copy
    exported from one project and imported into another states the same confidence."""
    import zipfile

    from core.learning.calibration import Calibration

    with zipfile.ZipFile(trained["bundle"]) as zf:
        members = {n: zf.read(n) for n in zf.namelist()}
    d = json.loads(members[bundles.BUNDLE_JSON])
    cal = Calibration(temperature=2.5, bias=-0.7, positive=d["classes"].index(d["positive"]),
                      fitted_on="cross-validation", n=40)
    d.update(id="calibrated01", calibration=cal.to_dict())
    members[bundles.BUNDLE_JSON] = json.dumps(d).encode()
    calibrated = tmp_path / "calibrated.zip"
    with zipfile.ZipFile(calibrated, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)

    items = _photo_items(photos["images"])
    raw = predictor.predict_images(trained["bundle"], items)
    said = predictor.predict_images(calibrated, items)
    classes = bundles.load_bundle(calibrated)[0].classes
    cols = [f"proba_{c}" for c in classes]
    expected = cal.apply(raw[cols].to_numpy())
    np.testing.assert_allclose(said[cols].to_numpy(), expected, rtol=0, atol=1e-9)
    assert not np.allclose(said[cols].to_numpy(), raw[cols].to_numpy(), atol=1e-3)
    given = said["predicted_label"].map({c: j for j, c in enumerate(classes)}).to_numpy()
    np.testing.assert_allclose(said["confidence"], expected[np.arange(len(items)), given], atol=1e-9)

    shop_c = workspace.create_project("Shop C")
    model_id = models.import_bundle(shop_c, calibrated)
    exported = tmp_path / "exported.zip"
    exported.write_bytes(models.export_bundle(shop_c, model_id))
    elsewhere = predictor.predict_images(exported, items)
    pd.testing.assert_frame_equal(elsewhere, said, check_exact=True)
