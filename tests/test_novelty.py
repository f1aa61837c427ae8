"""Photos unlike the training photos are flagged for review ("none of these"), on real features.

Models learn three (or two) classes of scikit-image's sample photos with the offline
EfficientNet-Lite0; new photos of those classes, and photos of things the model never saw
(a rocket, a star field, a retina, a stained tissue slide, a printed page, coins), are then tagged.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from core import tagging
from core.learning import bundles, extraction, models, novelty, predictor, training
from core.vision.store import FeatureStore
from tests.conftest import photo_project, sample_photo_set


def _sources():
    from skimage import data

    return {"astronaut": [data.astronaut()], "coffee": [data.coffee()], "cat": [data.chelsea()]}


def _unseen(folder: Path) -> tuple[list[tuple[str, Path]], list[tuple[str, Path]]]:
    """New photos of the learned things (crops the training photos did not have), and photos
    of things never learned."""
    from skimage import data

    sample_photo_set(folder, _sources(), per_class=14)  # the training photos are numbers 0-9
    like = [(p.name, p) for p in sorted(folder.glob("*_1[0-3].jpg"))]
    unlike = []
    for name in ("rocket", "hubble_deep_field", "retina", "immunohistochemistry", "page", "coins"):
        Image.fromarray(getattr(data, name)()).convert("RGB").save(folder / f"{name}.jpg", quality=85)
        unlike.append((f"{name}.jpg", folder / f"{name}.jpg"))
    return like, unlike


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A three-class and a two-class project, each with its frozen model."""
    mp = pytest.MonkeyPatch()
    home = tmp_path_factory.mktemp("novelty-home")
    mp.setenv("CATALOG_LENS_HOME", str(home))
    sources = _sources()
    multi = photo_project("Three things", home / "multi", sample_photo_set(home / "multi", sources, per_class=10))
    two = {k: sources[k] for k in ("astronaut", "coffee")}
    binary = photo_project("Two things", home / "binary", sample_photo_set(home / "binary", two, per_class=10))
    out = {}
    for kind, project in (("multi", multi), ("binary", binary)):
        extraction.extract_project(project, "efficientnet_lite0")
        training.train_frozen(project)
        out[kind] = project
    out["photos"] = _unseen(home / "unseen")
    yield out
    mp.undo()


@pytest.fixture(autouse=True)
def workspace_home(trained, monkeypatch):  # keep the module's workspace for every test here
    monkeypatch.setenv("CATALOG_LENS_HOME", str(trained["multi"].root.parents[1]))


def _predict(project, items):
    model = models.tagging_model(project)
    store = FeatureStore(project.root / "try-features")
    with predictor.Predictor(model["path"], feature_store=store) as p:
        return p.predict(items)


@pytest.mark.parametrize("kind", ["multi", "binary"])
def test_photos_unlike_the_training_photos_are_flagged_and_like_ones_are_not(trained, kind):
    like, unlike = trained["photos"]
    if kind == "binary":  # this model never learned the cat: its photos are unlike too
        like, unlike = [x for x in like if "cat" not in x[0]], unlike + [x for x in like if "cat" in x[0]]
    table = _predict(trained[kind], like + unlike)
    flagged = dict(zip(table["image"], table["unlike_training"]))
    like_share = np.mean([flagged[n] for n, _ in like])
    unlike_share = np.mean([flagged[n] for n, _ in unlike])
    # Every never-learned photo still gets one of the classes, often with confidence...
    assert set(table["predicted_label"]) <= set(models.tagging_model(trained[kind])["classes"]) | {""}
    # ...but is flagged, while new photos of the learned things mostly are not.
    assert unlike_share >= 5 / 6, table[["image", "predicted_label", "confidence", "unlike_training"]]
    assert like_share <= 0.25 and unlike_share - like_share >= 0.6, (like_share, unlike_share)


def test_the_limit_is_calibrated_on_held_out_photos_and_kept_in_the_model_file(trained, tmp_path):
    project = trained["multi"]
    model = models.tagging_model(project)
    bundle, arrays = bundles.load_bundle(model["path"])
    kept = novelty.Novelty.from_arrays(arrays)
    X, y, ids = extraction.load_training_features(project, "efficientnet_lite0")
    plan = json.loads(json.dumps(bundle.split))
    row = {sha: i for i, sha in enumerate(ids)}
    held_out = X[[row[i] for i in plan["test_ids"]]]
    refit = novelty.fit_novelty(X[[row[i] for i in plan["train_ids"] + plan["val_ids"]]], held_out)
    assert kept is not None and kept.threshold == pytest.approx(refit.threshold, rel=1e-3)
    # The 6 held-out photos are too few alone: the training photos' distances to each other join them.
    training = X[[row[i] for i in plan["train_ids"] + plan["val_ids"]]]
    calibration = np.concatenate([kept.distances(held_out), kept.distances(training, leave_out_self=True)])
    assert np.mean(calibration <= kept.threshold) >= 0.95
    assert np.mean(kept.distances(training) <= kept.threshold) >= 0.95  # the training photos themselves
    assert bundle.metrics["novelty"]["threshold"] == pytest.approx(kept.threshold, abs=1e-4)
    # A model shared as a file and imported elsewhere flags the same photos.
    shared = tmp_path / "shared.zip"
    shared.write_bytes(bundles.repack(model["path"], threshold=None))
    like, unlike = trained["photos"]
    with predictor.Predictor(shared) as p:
        again = p.predict(like + unlike)
    assert list(again["unlike_training"]) == list(_predict(project, like + unlike)["unlike_training"])


def test_a_tagging_run_sends_unlike_photos_to_review_with_the_reason(trained, tmp_path):
    project = trained["multi"]
    like, unlike = trained["photos"]
    catalog = tmp_path / "catalog.csv"
    catalog.write_text("sku,image\n" + "".join(f"S{i},{n}\n" for i, (n, _) in enumerate(like + unlike)))
    folder = tmp_path / "run"
    tagging.create_run(folder, catalog_path=catalog, bundle_path=Path(models.tagging_model(project)["path"]),
                       options=tagging.TagOptions(image_columns=["image"], review_below=0.01),
                       images_dir=like[0][1].parent)
    tagging.run_tagging(folder)
    results = tagging.results_frame(folder)
    rows = {n: i for i, (n, _) in enumerate(like + unlike)}
    for name, _ in unlike:
        r = results.loc[rows[name]]
        if r["tag_error"]:
            assert r["predicted_label"] and r["needs_review"] == 1 and novelty.REASON in r["tag_error"]
    assert sum(novelty.REASON in results.loc[rows[n], "tag_error"] for n, _ in unlike) >= 5
    assert sum(novelty.REASON in results.loc[rows[n], "tag_error"] for n, _ in like) <= 3
    review = list(tagging.iter_rows_needing_review(folder))
    assert {r["row"] for r in review} >= {rows[n] for n, _ in unlike if novelty.REASON in results.loc[rows[n], "tag_error"]}


def test_the_command_line_says_which_photos_to_check(trained, capsys):
    from core import cli

    like, unlike = trained["photos"]
    model = models.tagging_model(trained["multi"])["path"]
    assert cli.main(["predict", "--model", str(model), "--images", str(like[0][1].parent), "--json"]) == 0
    rows = {r["image"]: r for r in json.loads(capsys.readouterr().out)}
    assert sum(rows[n].get("needs_review") == novelty.REASON for n, _ in unlike) >= 5
    assert sum("needs_review" in rows[n] for n, _ in like) <= 3
    assert all(rows[n]["predicted_label"] for n, _ in unlike)  # still tagged: the flag says it is a guess


def test_a_photo_called_a_class_it_is_unlike_is_flagged_though_it_is_like_the_training_photos():
    """Geometry of the class-conditional check: two classes of training photos; a photo in the
    middle of class 0's photos is like the training photos, yet called class 1 it sits far
    from every photo that taught class 1 (a shirt on a hanger called "person")."""
    rng = np.random.default_rng(0)
    a, b = np.eye(16)[0], np.eye(16)[1]

    def cloud(centre, n):
        return centre + 0.15 * rng.normal(size=(n, 16))

    X, held_out = np.vstack([cloud(a, 40), cloud(b, 40)]), np.vstack([cloud(a, 25), cloud(b, 25)])
    y, y_held_out = ["shirt"] * 40 + ["person"] * 40, ["shirt"] * 25 + ["person"] * 25
    classes = ["person", "shirt"]
    fitted = novelty.fit_novelty(X, held_out, y_train=y, y_held_out=y_held_out, classes=classes)
    new = cloud(a, 20)  # new photos like the "shirt" training photos
    as_shirt, as_person = np.full(20, 1), np.full(20, 0)
    assert fitted.unlike(new).mean() <= 0.2  # like the training photos...
    assert fitted.unlike(new, as_shirt).mean() <= 0.2  # ...and like the class they are called
    assert fitted.unlike(new, as_person).all()  # called "person", each is unlike every "person" photo
    assert not fitted.unlike(new, np.full(20, -1)).mean() > 0.2  # not called anything: the first check only
    # The limits are calibrated per class on that class's held-out photos, and travel in the model file.
    for c, name in enumerate(classes):
        mine = held_out[[v == name for v in y_held_out]]
        assert np.mean(fitted.distances(mine, within=c) <= fitted.class_thresholds[c]) >= 0.95
    back = novelty.Novelty.from_arrays(fitted.to_arrays())
    assert np.array_equal(back.unlike(new, as_person), fitted.unlike(new, as_person))
    # Held-out photos without their labels calibrate the first limit only; each class's comes from
    # its training photos' distances to each other.
    unlabelled = novelty.fit_novelty(X, held_out, y_train=y, classes=classes)
    assert unlabelled.threshold == fitted.threshold and np.isfinite(unlabelled.class_thresholds).all()
    # A model file from before the class-conditional part still loads, with the first check only.
    old = {k: v for k, v in fitted.to_arrays().items() if k not in novelty.CLASS_KEYS}
    assert novelty.Novelty.from_arrays(old).class_thresholds is None
    assert not novelty.Novelty.from_arrays(old).unlike(new, as_person).mean() > 0.2


def test_photos_called_the_other_class_on_real_pixels_are_flagged(trained):
    """The two-class model's bundle carries one limit per class; with a threshold so low that
    every photo is called the model's positive class, the new photos of the other class, like
    the training photos as they are, are flagged (before: none of them was)."""
    project = trained["binary"]
    model = models.tagging_model(project)
    bundle, arrays = bundles.load_bundle(model["path"])
    kept = novelty.Novelty.from_arrays(arrays)
    assert kept.class_thresholds is not None and np.isfinite(kept.class_thresholds).all()
    like, _ = trained["photos"]
    like = [x for x in like if "cat" not in x[0]]
    other = [x for x in like if bundle.positive not in x[0]]
    store = FeatureStore(project.root / "try-features")
    with predictor.Predictor(model["path"], feature_store=store) as p:
        own = p.predict(like)
    with predictor.Predictor(model["path"], feature_store=store, threshold=1e-300) as p:
        forced = p.predict(like)
    assert not own["unlike_training"].any()  # called what they are: like the training photos
    assert (forced["predicted_label"] == bundle.positive).all()
    flagged = dict(zip(forced["image"], forced["unlike_training"]))
    assert other and all(flagged[name] for name, _ in other)


def test_the_photo_that_sets_a_limit_is_within_it_whatever_the_rounding():
    """A limit is the distance one calibration photo had. That photo, its features computed
    again elsewhere (a Ray worker, other threads, another batch: the 7th digit moves), is not
    flagged by chance; a photo clearly past the limit still is."""
    rng = np.random.default_rng(1)
    X, held_out = rng.normal(size=(60, 32)), rng.normal(size=(50, 32))  # 25 a class: limits from these alone
    y, y_held_out = ["a", "b"] * 30, ["a", "b"] * 25
    fitted = novelty.fit_novelty(X, held_out, y_train=y, y_held_out=y_held_out, classes=["a", "b"])
    # the held-out photo whose distance is the first limit, and those that set the class limits
    first = held_out[[int(np.argmin(np.abs(fitted.distances(held_out) - fitted.threshold)))]]
    assert fitted.distances(first)[0] == pytest.approx(fitted.threshold, abs=1e-6)
    for copy in (first, first * (1 + 1e-7), first + 1e-7 * rng.normal(size=first.shape)):
        assert not fitted.unlike(copy).any()
    by_class = dataclasses.replace(fitted, threshold=np.inf)  # the class-conditional check alone
    for c in (0, 1):
        mine = held_out[c::2]
        edge = mine[[int(np.argmin(np.abs(fitted.distances(mine, within=c) - fitted.class_thresholds[c])))]]
        for copy in (edge, edge * (1 + 1e-7), edge + 1e-7 * rng.normal(size=edge.shape)):
            assert not by_class.unlike(copy, np.array([c])).any()
        worst = mine[[int(np.argmax(fitted.distances(mine, within=c)))]]  # past the 95th percentile
        assert by_class.unlike(worst, np.array([c])).all()
    assert fitted.unlike(held_out[[int(np.argmax(fitted.distances(held_out)))]]).all()
