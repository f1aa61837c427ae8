"""ONNX export: the exported file, run by ONNX Runtime on real photos, gives the app's probabilities.

Real photos (scikit-image's samples, and the shared everyday photos where present), the real
offline EfficientNet-Lite0 and real models: a quick two-class model of a project (through the
Train page), a quick three-class model and a fine-tuned one (from the command line).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from core import cli
from core.inputs.images import load_for_model
from core.learning import bundles, extraction, models, training
from core.learning.predictor import Predictor
from core.vision import networks
from tests.conftest import REPO, SHARED_DATA, photo_project, sample_photo_set

TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    path = tmp_path_factory.mktemp("onnx-home")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CATALOG_LENS_HOME", str(path))
        yield path


@pytest.fixture(autouse=True)
def workspace_home(home, monkeypatch):  # the module's workspace for every test here
    monkeypatch.setenv("CATALOG_LENS_HOME", str(home))


@pytest.fixture(scope="module")
def photos(home) -> list[Path]:
    """Photos none of the models saw: other crops of the samples, and everyday photos if present."""
    from PIL import Image
    from skimage import data

    folder = home / "unseen"
    folder.mkdir()
    out = []
    for name in ("astronaut", "coffee", "chelsea", "rocket", "camera", "cat"):
        img = Image.fromarray(getattr(data, name)()).convert("RGB")
        w, h = img.size
        img.crop((w // 7, h // 9, w - w // 11, h)).save(folder / f"{name}.jpg", quality=85)
        out.append(folder / f"{name}.jpg")
    everyday = SHARED_DATA / "everyday-photos"
    out += sorted(p for p in everyday.glob("*") if p.suffix.lower() in (".jpg", ".jpeg"))[:10]
    return out


def _sheet(home: Path, name: str, sources: dict) -> tuple[Path, Path]:
    folder = home / name
    sheet = home / f"{name}.csv"
    sheet.write_text(sample_photo_set(folder, sources, per_class=8))
    return folder, sheet


def _train(folder: Path, sheet: Path, bundle: Path, *method: str) -> Path:
    args = ["train", "--images", str(folder), "--labels", str(sheet), *method, "--out", str(bundle), "--json"]
    assert cli.main(args) == 0
    return bundle


def _export(bundle: Path, out: Path) -> Path:
    assert cli.main(["export", "--model", str(bundle), "--format", "onnx", "--out", str(out), "--json"]) == 0
    return out


def _parity(bundle: Path, exported: Path, photos: list[Path], threshold: float | None = None) -> float:
    """Largest difference between the file's probabilities (ONNX Runtime) and the app's; checks
    the metadata and the class order on the way."""
    with Predictor(bundle, threshold=threshold) as predictor:
        app = predictor.predict([(p.name, p) for p in photos])
        meta_bundle = predictor.bundle
    proto = onnx.load(exported)
    meta = {e.key: e.value for e in proto.metadata_props}
    assert json.loads(meta["classes"]) == list(meta_bundle.classes)
    assert json.loads(meta["preprocessing"]) == meta_bundle.preprocessing
    assert set(json.loads(meta["preprocessing"])) >= {
        "resize_size",
        "crop_size",
        "mean",
        "std",
        "interpolation",
        "crop_mode",
    }
    prep = meta_bundle.preprocessing
    transform = networks.build_transform(meta_bundle.backbone_id)
    x = np.stack([transform(load_for_model(p, size=prep["resize_size"])).numpy() for p in photos]).astype(np.float32)
    assert x.shape[1:] == (3, prep["crop_size"], prep["crop_size"])
    session = ort.InferenceSession(str(exported), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    got = session.run(None, {name: x})[0]
    one = session.run(None, {name: x[:1]})[0]  # any batch size
    expected = app[[f"proba_{c}" for c in meta_bundle.classes]].to_numpy()
    assert got.shape == expected.shape and np.allclose(got.sum(axis=1), 1, atol=1e-5)
    np.testing.assert_allclose(one, got[:1], atol=TOLERANCE)
    diff = float(np.abs(got - expected).max())
    print(
        f"{meta_bundle.kind} {len(meta_bundle.classes)} classes: max |ONNX - app| = {diff:.2e} on {len(photos)} photos"
    )
    assert diff <= TOLERANCE
    labels = [meta_bundle.classes[j] for j in got.argmax(axis=1)]
    if len(meta_bundle.classes) > 2:
        assert labels == list(app["predicted_label"])
    return diff


def test_a_quick_model_with_three_classes_runs_outside_the_app(home, photos):
    from skimage import data

    folder, sheet = _sheet(
        home,
        "three",
        {
            "astronaut": [data.astronaut()],
            "cat": [data.chelsea(), data.cat()],
            "object": [data.coffee(), data.rocket()],
        },
    )
    bundle = _train(folder, sheet, home / "three.zip", "--method", "frozen")
    _parity(bundle, _export(bundle, home / "three.onnx"), photos)


def test_a_fine_tuned_model_runs_outside_the_app(home, photos):
    from skimage import data

    folder, sheet = _sheet(home, "tuned", {"person": [data.astronaut()], "no_person": [data.coffee(), data.chelsea()]})
    bundle = _train(folder, sheet, home / "tuned.zip", "--method", "finetune", "--epochs", "1")
    assert bundles.load_bundle(bundle)[0].kind == "finetuned"
    _parity(bundle, _export(bundle, home / "tuned.onnx"), photos)


def test_the_train_page_offers_the_onnx_file_with_the_setting_in_force(home, photos):
    from skimage import data
    from streamlit.testing.v1 import AppTest

    folder, sheet = _sheet(home, "page", {"person": [data.astronaut()], "no_person": [data.coffee(), data.rocket()]})
    project = photo_project("Onnx page", folder, sheet.read_text())
    extraction.extract_project(project, "efficientnet_lite0")
    run = training.train_frozen(project)
    models.set_threshold(project, run.id, 0.8)
    at = AppTest.from_file(str(REPO / "app.py"), default_timeout=300)
    at.query_params["project"] = project.slug
    at.run()
    at.switch_page("app_pages/steps/train.py").run()
    assert models.onnx_file(project, run.id) is None
    next(b for b in at.button if b.label == "Prepare a copy for other tools (ONNX)").click().run()
    assert not at.exception, at.exception
    made = models.onnx_file(project, run.id)
    assert made is not None
    meta = {e.key: e.value for e in onnx.load(made).metadata_props}
    assert json.loads(meta["threshold"]) == pytest.approx(0.8) and meta["positive"] == run.positive
    assert not any(b.label == "Prepare a copy for other tools (ONNX)" for b in at.button)  # the download instead
    _parity(Path(run.bundle_path), made, photos, threshold=0.8)


def test_export_refuses_a_file_that_is_not_a_model(tmp_path, capsys):
    junk = tmp_path / "notes.zip"
    junk.write_bytes(b"not a zip")
    assert cli.main(["export", "--model", str(junk), "--out", str(tmp_path / "m.onnx")]) == 2
    assert "error:" in capsys.readouterr().err and not (tmp_path / "m.onnx").exists()
