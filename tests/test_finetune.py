"""Fine-tuning on real photos with the real offline EfficientNet-Lite0: it starts at the
frozen head, trains, keeps the best epoch, cancels cleanly, repeats itself with the same
seed, resumes after a cancel or a kill -9 exactly where it stopped, survives bad files and
round-trips through safetensors. Tiny counts: this is a CPU."""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.numpy import save_file as save_numpy
from safetensors.torch import load_file, save_file

from core.learning import finetune as ft
from core.learning import finetune_checkpoint as ckpt
from core.learning import finetune_config as fc
from core.learning import finetune_loop as fl
from core.learning.heads import head_to_arrays, make_frozen_head
from core.vision import backbones as bb
from core.vision import networks as nw
from tests.conftest import REPO

LITE0 = "efficientnet_lite0"
CLASSES = ["no_person", "person"]
HISTORY_KEYS = {"epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr", "seconds", "phase", "photos_per_s"}


def _variants(array: np.ndarray) -> list[np.ndarray]:
    """The photo, mirrored, and two off-centre crops: different pixels, same content."""
    h, w = array.shape[:2]
    return [
        array,
        array[:, ::-1],
        array[h // 10 :, w // 12 :],
        array[: h - h // 8, : w - w // 10][:, ::-1],
    ]


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> dict:
    """A tiny two-class set of real photos (astronaut = person; coffee, chelsea, rocket =
    no person), saved as JPEGs at catalog-thumbnail size, plus two unreadable files."""
    from skimage import data

    folder = tmp_path_factory.mktemp("finetune-photos")
    sources = {"astronaut": data.astronaut(), "coffee": data.coffee(), "chelsea": data.chelsea(), "rocket": data.rocket()}
    by_name = {}
    for name, array in sources.items():
        for i, variant in enumerate(_variants(array)):
            img = Image.fromarray(np.ascontiguousarray(variant))
            img.thumbnail((320, 320))
            path = folder / f"{name}-{i}.jpg"
            img.save(path, quality=90)
            by_name[f"{name}-{i}"] = path
    good = (folder / "coffee-0.jpg").read_bytes()
    (folder / "cut-short.jpg").write_bytes(good[: len(good) // 3])
    (folder / "notes.jpg").write_text("not a photo")

    def item(name: str) -> tuple[str, object, str]:
        return name, by_name[name], "person" if name.startswith("astronaut") else "no_person"

    return {
        "folder": folder,
        "paths": by_name,
        "train": [item(n) for n in ("astronaut-0", "astronaut-1", "astronaut-2", "coffee-0", "chelsea-0", "rocket-0")],
        "val": [item(n) for n in ("astronaut-3", "coffee-1", "chelsea-1", "rocket-1")],
        "more": [item(n) for n in ("coffee-2", "chelsea-2", "rocket-2", "coffee-3", "chelsea-3", "rocket-3")],
        "broken": [("cut-short", folder / "cut-short.jpg", "no_person"), ("notes", folder / "notes.jpg", "person")],
    }


def _features(model, paths) -> np.ndarray:
    """Frozen features exactly as the app computes them: the model's own extractor on the
    evaluation transform."""
    from core.inputs.images import load_for_model

    backbone = bb.get_backbone(LITE0)
    tf = nw.build_transform(backbone)
    x = torch.stack([tf(load_for_model(p, size=backbone.preprocessing.resize_size)) for p in paths])
    model.eval()
    with torch.inference_mode():
        return model.features(x.to(memory_format=torch.channels_last)).numpy().astype(np.float64)


@pytest.fixture(scope="module")
def frozen(photos) -> dict:
    """A frozen head fitted on real Lite0 features of the training part."""
    model = nw.build_classifier_model(LITE0, 2)
    model = model.to(memory_format=torch.channels_last)
    items = photos["train"] + photos["val"] + photos["more"]
    X = _features(model, [p for _, p, _ in items])
    y = np.array([label for _, _, label in items])
    head = make_frozen_head(C=0.1).fit(X[:6], y[:6])
    return {"model": model, "items": items, "X": X, "y": y, "head": head, "arrays": head_to_arrays(head)}


SMALL = fc.FinetuneConfig(epochs=2, batch_size=3, head_only_epochs=1, partial_epochs=1, warmup_epochs=0.5)


def _run(photos, frozen, tmp_path=None, **kwargs):
    return ft.finetune(
        photos["train"] + photos["broken"], photos["val"], backbone_id=LITE0, classes=CLASSES,
        config=kwargs.pop("config", SMALL), head_arrays=frozen["arrays"], head_classes=list(frozen["head"].classes_),
        checkpoint_dir=tmp_path, **kwargs,
    )


@pytest.fixture(scope="module")
def run(photos, frozen, tmp_path_factory) -> dict:
    epochs, progress = [], []
    folder = tmp_path_factory.mktemp("checkpoints")
    result = _run(photos, frozen, folder, on_epoch=epochs.append, on_progress=lambda d, t: progress.append((d, t)))
    return {"result": result, "epochs": epochs, "progress": progress, "folder": folder}


# --------------------------------------------------------------------------- head initialisation


@pytest.mark.parametrize("n_classes", [2, 3])
def test_head_from_frozen_reproduces_its_probabilities(photos, frozen, n_classes):
    X, y, items = frozen["X"], frozen["y"], frozen["items"]
    if n_classes == 3:  # astronaut / cat / other objects
        y = np.array([n.split("-")[0] if n.split("-")[0] in ("astronaut", "chelsea") else "object" for n, _, _ in items])
    head = make_frozen_head(C=0.1).fit(X, y)
    model = nw.build_classifier_model(LITE0, n_classes)
    model.features.load_state_dict(frozen["model"].features.state_dict())
    fc.init_head_from_frozen(model, head_to_arrays(head), head.classes_)
    got = fl.predict_proba(model, [(n, p) for n, p, _ in items], backbone_id=LITE0)
    want = head.predict_proba(X)
    assert got.shape == want.shape == (len(items), n_classes)
    np.testing.assert_allclose(got, want, atol=1e-4)


def test_head_from_frozen_refuses_a_head_of_another_backbone(frozen):
    model = nw.build_classifier_model(LITE0, 2, pretrained=False)
    arrays = dict(frozen["arrays"], **{"scaler.mean": np.zeros(512), "scaler.scale": np.ones(512)})
    with pytest.raises(ValueError, match="another backbone"):
        fc.init_head_from_frozen(model, arrays, CLASSES)


# --------------------------------------------------------------------------- a whole run


def test_run_end_to_end(run):
    result, epochs = run["result"], run["epochs"]
    assert not result.cancelled and result.stop_reason == "completed" and result.device == "cpu"
    assert len(result.history) == 2 and epochs == result.history
    assert all(set(h) == HISTORY_KEYS for h in result.history)
    assert [h["phase"] for h in result.history] == ["head", "top"]
    assert all(math.isfinite(h[k]) for h in result.history for k in ("train_loss", "val_loss", "train_acc", "val_acc"))
    assert result.start_val is not None and math.isfinite(result.start_val["val_loss"])
    progress = run["progress"]
    assert progress[-1] == (2 * 2, 2 * 2) and [d for d, _ in progress] == sorted(d for d, _ in progress)
    assert result.val_proba.shape == (4, 2) and result.val_ids == ["astronaut-3", "coffee-1", "chelsea-1", "rocket-1"]
    np.testing.assert_allclose(result.val_proba.sum(1), 1.0, atol=1e-6)
    assert result.positive == "person" and 0 < result.threshold < 1


def test_unreadable_photos_are_skipped_and_reported(run):
    failures = dict(run["result"].failures)
    assert set(failures) == {"cut-short", "notes"}
    assert "truncated" in failures["cut-short"] and "not" in failures["notes"]


def test_best_checkpoint_is_restored(run, photos):
    result = run["result"]
    candidates = [result.start_val["val_loss"]] + [h["val_loss"] for h in result.history]
    assert result.best_val_loss == min(candidates)
    expected = -1 if result.best_val_loss == candidates[0] else int(np.argmin(candidates[1:]))
    assert result.best_epoch == expected
    proba = fl.predict_proba(result.model, [(n, p) for n, p, _ in photos["val"]], backbone_id=LITE0)
    truth = [CLASSES.index(label) for _, _, label in photos["val"]]
    val_loss = -np.mean(np.log(proba[np.arange(len(truth)), truth]))
    assert val_loss == pytest.approx(result.best_val_loss, abs=1e-5)
    np.testing.assert_allclose(proba, result.val_proba, atol=1e-6)
    assert list(run["folder"].iterdir()) == []  # a finished run leaves no checkpoint to resume


def _untimed(history: list[dict]) -> list[dict]:
    return [{k: v for k, v in h.items() if k not in ("seconds", "photos_per_s")} for h in history]


def _assert_same_run(got: ft.FinetuneResult, want: ft.FinetuneResult) -> None:
    """Bit for bit the same run: history (but its timings), weights, best epoch, threshold."""
    assert _untimed(got.history) == _untimed(want.history)
    a, b = got.model.state_dict(), want.model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (got.best_epoch, got.best_val_loss, got.threshold) == (want.best_epoch, want.best_val_loss, want.threshold)
    assert (got.stop_reason, got.batch_size, got.failures) == (want.stop_reason, want.batch_size, want.failures)
    assert got.start_val == want.start_val and got.val_ids == want.val_ids
    np.testing.assert_array_equal(got.val_proba, want.val_proba)


def test_same_seed_same_result(run, photos, frozen):
    first, second = run["result"], _run(photos, frozen)
    assert _untimed(first.history) == _untimed(second.history)
    a, b = first.model.state_dict(), second.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_loader_worker_processes_repeat_themselves(photos, frozen):
    """Decoding and augmentation in a worker process: seeded there too, and the same
    probabilities as decoding in the main process (up to float rounding: the network then
    runs on one thread fewer)."""
    config = fc.FinetuneConfig(epochs=1, batch_size=3, head_only_epochs=0, num_workers=1)
    first, second = _run(photos, frozen, config=config), _run(photos, frozen, config=config)
    assert first.history[0]["train_loss"] == second.history[0]["train_loss"]
    items = [(n, p) for n, p, _ in photos["val"]]
    np.testing.assert_allclose(
        fl.predict_proba(first.model, items, backbone_id=LITE0, num_workers=1),
        fl.predict_proba(first.model, items, backbone_id=LITE0, num_workers=0), atol=1e-6,
    )


def test_training_loss_decreases_on_a_separable_set(photos):
    """Everything trains from the start, from a random head: the loss must come down."""
    config = fc.FinetuneConfig(epochs=4, batch_size=4, head_only_epochs=0, partial_epochs=0, warmup_epochs=0.5,
                               lr_head=3e-3, patience=4)
    train = photos["train"] + photos["more"][:2]
    result = ft.finetune(train, photos["val"], backbone_id=LITE0, classes=CLASSES, config=config)
    losses = [h["train_loss"] for h in result.history]
    assert len(losses) == 4 and [h["phase"] for h in result.history] == ["all"] * 4
    assert losses[-1] < 0.8 * losses[0], losses
    assert result.history[-1]["val_acc"] >= 0.75


def test_cancel_after_the_first_batch_keeps_the_starting_model(photos, frozen):
    calls = []

    def should_cancel() -> bool:
        calls.append(1)
        return len(calls) > 1  # let one batch through, then cancel

    result = _run(photos, frozen, should_cancel=should_cancel)
    assert result.cancelled and result.stop_reason == "cancelled" and not result.stopped_early
    assert result.history == [] and result.best_epoch == -1
    # the batch that ran before the cancel is undone: the head is the frozen head's again
    start = nw.build_classifier_model(LITE0, 2, pretrained=False)
    fc.init_head_from_frozen(start, frozen["arrays"], frozen["head"].classes_)
    assert torch.equal(result.model.head.weight, start.head.weight)
    assert not result.model.training


def test_time_budget_stops_cleanly(photos, frozen):
    result = _run(photos, frozen, config=fc.FinetuneConfig(epochs=5, batch_size=3, max_train_seconds=0.01))
    assert result.stop_reason == "time_budget" and not result.cancelled
    assert len(result.history) <= 1


def test_out_of_memory_halves_the_batch(photos, frozen, monkeypatch):
    real = ft.train_one_epoch

    def tight_memory(model, loader, *args, **kwargs):
        if loader.batch_size > 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(model, loader, *args, **kwargs)

    monkeypatch.setattr(ft, "train_one_epoch", tight_memory)
    config = fc.FinetuneConfig(epochs=1, batch_size=5, head_only_epochs=1)
    result = _run(photos, frozen, config=config)
    assert result.batch_size == 2 and len(result.history) == 1


# --------------------------------------------------------------------------- resuming

# Three epochs, one per phase (head, top, all), so that a resumed run must carry AdamW's
# state for groups unfrozen at different times, and the schedule across them.
RESUME = fc.FinetuneConfig(epochs=3, batch_size=3, head_only_epochs=1, partial_epochs=1, warmup_epochs=0.5,
                           patience=5)
STEPS = 2  # batches per epoch: 8 training items, batches of 3, the last one dropped


@pytest.fixture(scope="module")
def uninterrupted(photos, frozen, tmp_path_factory) -> ft.FinetuneResult:
    return _run(photos, frozen, tmp_path_factory.mktemp("uninterrupted"), config=RESUME)


@pytest.fixture(scope="module")
def cancelled(photos, frozen, tmp_path_factory) -> dict:
    """A run cancelled as its second epoch begins: the checkpoint of the first is left."""
    folder, epochs = tmp_path_factory.mktemp("cancelled"), []
    result = _run(photos, frozen, folder, config=RESUME, on_epoch=epochs.append, should_cancel=lambda: bool(epochs))
    return {"result": result, "folder": folder, "epochs": epochs}


def _with_checkpoint(cancelled, tmp_path):
    shutil.copy(cancelled["folder"] / ft.CHECKPOINT_FILE, tmp_path / ft.CHECKPOINT_FILE)
    return tmp_path


def test_resume_after_a_cancel_gives_the_uninterrupted_result(photos, frozen, uninterrupted, cancelled, tmp_path):
    first = cancelled["result"]
    assert first.cancelled and len(first.history) == 1
    folder = _with_checkpoint(cancelled, tmp_path)
    replayed, progress = [], []
    resumed = _run(photos, frozen, folder, config=RESUME, on_epoch=replayed.append,
                   on_progress=lambda d, t: progress.append((d, t)))
    assert progress[0] == (STEPS + 1, 3 * STEPS)  # the first epoch is not trained again
    assert replayed[0] == first.history[0]  # ...but reported as it was recorded, timing included
    assert len(replayed) == 3 and resumed.resumed_epochs == 1 and resumed.checkpoint_note is None
    _assert_same_run(resumed, uninterrupted)
    assert list(folder.iterdir()) == []  # finished: nothing left to resume


def test_resume_after_kill_9_gives_the_uninterrupted_result(photos, frozen, uninterrupted, tmp_path):
    """A real SIGKILL in a separate process, as when the computer or the app dies."""
    folder = tmp_path / "checkpoint"
    save_numpy(dict(frozen["arrays"]), str(tmp_path / "head.safetensors"))
    request = {
        "train": [[i, str(p), label] for i, p, label in photos["train"] + photos["broken"]],
        "val": [[i, str(p), label] for i, p, label in photos["val"]],
        "backbone": LITE0, "classes": CLASSES, "config": dataclasses.asdict(RESUME),
        "head": str(tmp_path / "head.safetensors"), "head_classes": list(frozen["head"].classes_), "checkpoint_dir": str(folder),
    }
    (tmp_path / "request.json").write_text(json.dumps(request))
    child = subprocess.Popen([sys.executable, "-m", "tests.finetune_child", str(tmp_path / "request.json")], cwd=REPO)
    try:
        give_up = time.monotonic() + 600
        while not (folder / ft.CHECKPOINT_FILE).exists():
            assert child.poll() is None, "the fine-tuning process ended before it wrote a checkpoint"
            assert time.monotonic() < give_up, "no checkpoint after 10 minutes"
            time.sleep(0.02)
        os.kill(child.pid, signal.SIGKILL)
    finally:
        child.kill()
        child.wait()
    assert child.returncode == -signal.SIGKILL
    progress = []
    resumed = _run(photos, frozen, folder, config=RESUME, on_progress=lambda d, t: progress.append((d, t)))
    assert progress[0][0] > STEPS and resumed.resumed_epochs >= 1  # continued, not started over
    _assert_same_run(resumed, uninterrupted)
    assert list(folder.iterdir()) == []


def test_resume_with_a_decoding_worker_process(photos, frozen, tmp_path):
    """Augmentation drawn in a worker process depends on the epoch alone, so a resumed
    run repeats it although the worker that drew the earlier epochs is gone."""
    config = dataclasses.replace(SMALL, num_workers=1)
    whole = _run(photos, frozen, tmp_path / "whole", config=config)
    epochs, progress = [], []
    _run(photos, frozen, tmp_path / "cut", config=config, on_epoch=epochs.append, should_cancel=lambda: bool(epochs))
    resumed = _run(photos, frozen, tmp_path / "cut", config=config, on_progress=lambda d, t: progress.append((d, t)))
    assert progress[0] == (STEPS + 1, 2 * STEPS)
    _assert_same_run(resumed, whole)


def test_the_checkpoint_holds_the_run_in_safetensors_and_json(cancelled):
    """No pickle: tensors in safetensors, the rest as JSON in its header; the best weights
    so far are those the cancelled run returned."""
    first, path = cancelled["result"], cancelled["folder"] / ft.CHECKPOINT_FILE
    with safe_open(str(path), framework="pt") as f:
        keys, meta = set(f.keys()), f.metadata()
    state = json.loads(meta["state"])
    assert state["progress"]["epoch"] == 1 and state["progress"]["history"] == first.history
    assert state["progress"]["batch_size"] == 3 and dict(state["progress"]["failures"]) == dict(first.failures)
    head = [i for i, g in enumerate(state["optimizer"]["param_groups"]) if g["name"] == "head"]
    assert {f"optimizer/{p}/{n}" for g in head for p in state["optimizer"]["param_groups"][g]["params"]
            for n in ("step", "exp_avg", "exp_avg_sq")} <= keys
    assert {"rng/torch", "best_eval/proba", "best_eval/targets"} <= keys
    saved = load_file(str(path))
    prefix = "best/" if any(k.startswith("best/") for k in saved) else "model/"
    best = {k[len(prefix):]: v for k, v in saved.items() if k.startswith(prefix)}
    want = first.model.state_dict()
    assert best.keys() == want.keys() and all(torch.equal(best[k], want[k]) for k in want)


def test_a_checkpoint_of_another_request_is_not_used(photos, frozen, run, cancelled, tmp_path):
    folder = _with_checkpoint(cancelled, tmp_path)
    other = _run(photos, frozen, folder)  # the same photos, other settings (SMALL)
    assert other.resumed_epochs == 0 and "other photos, labels or settings" in other.checkpoint_note
    assert _untimed(other.history) == _untimed(run["result"].history)  # exactly a fresh run
    (folder / ft.CHECKPOINT_FILE).write_bytes(b"half a file")
    found, note = ckpt.load_checkpoint(folder, "anything")
    assert found is None and "could not be read" in note


def test_a_checkpoint_that_does_not_fit_is_not_used(photos, frozen, uninterrupted, cancelled, tmp_path):
    """Asked the same but unusable (say, written by another version of the libraries): the
    run starts over, exactly as a fresh one, instead of failing at every attempt."""
    path = cancelled["folder"] / ft.CHECKPOINT_FILE
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    tensors = {k: v for k, v in load_file(str(path)).items() if k != "model/head.bias"}
    save_file(tensors, str(tmp_path / ft.CHECKPOINT_FILE), metadata=meta)
    result = _run(photos, frozen, tmp_path, config=RESUME)
    assert result.resumed_epochs == 0 and "could not be used" in result.checkpoint_note
    _assert_same_run(result, uninterrupted)


def test_the_fingerprint_covers_what_decides_the_run(photos, frozen):
    train = [(i, p, CLASSES.index(label)) for i, p, label in photos["train"]]
    val = [(i, p, CLASSES.index(label)) for i, p, label in photos["val"]]
    asked = {"backbone_id": LITE0, "classes": CLASSES, "train_items": train, "val_items": val, "config": RESUME,
             "head_arrays": frozen["arrays"], "head_classes": CLASSES, "device_type": "cpu"}
    base = ckpt.request_fingerprint(**asked)
    moved = [(i, f"/elsewhere/{i}.jpg", t) for i, _, t in train]
    assert ckpt.request_fingerprint(**dict(asked, train_items=moved)) == base  # paths do not matter
    nudged = dict(frozen["arrays"], **{"logreg.intercept": frozen["arrays"]["logreg.intercept"] + 1e-9})
    relabelled = [(train[0][0], train[0][1], 1 - train[0][2])] + train[1:]
    changes = [{"train_items": train[:-1]}, {"train_items": relabelled}, {"val_items": val[::-1]},
               {"config": dataclasses.replace(RESUME, seed=1)}, {"config": dataclasses.replace(RESUME, lr_head=2e-3)},
               {"head_arrays": nudged}, {"head_arrays": None}, {"device_type": "cuda"}, {"backbone_id": "resnet50"}]
    for change in changes:
        assert ckpt.request_fingerprint(**dict(asked, **change)) != base, change


# --------------------------------------------------------------------------- using the network


def test_safetensors_round_trip_gives_identical_predictions(run, photos, tmp_path):
    model = run["result"].model
    state = fl.state_dict_for_bundle(model)
    assert all(t.device.type == "cpu" and t.is_contiguous() for t in state.values())
    save_file(state, str(tmp_path / "network.safetensors"))
    loaded = fl.load_finetuned(LITE0, CLASSES, load_file(str(tmp_path / "network.safetensors")))
    items = [(n, p) for n, p, _ in photos["val"] + photos["more"]]
    np.testing.assert_array_equal(
        fl.predict_proba(loaded, items, backbone_id=LITE0), fl.predict_proba(model, items, backbone_id=LITE0)
    )
    with pytest.raises(ValueError, match="do not fit"):
        fl.load_finetuned(LITE0, ["a", "b", "c"], state)


def test_predict_proba_keeps_every_row(run, photos):
    failed = []
    items = [("ok", photos["paths"]["coffee-1"]), ("bad", photos["folder"] / "cut-short.jpg")]
    proba = fl.predict_proba(run["result"].model, items, backbone_id=LITE0,
                             on_failure=lambda i, why: failed.append((i, why)))
    assert proba.shape == (2, 2) and np.isfinite(proba[0]).all() and np.isnan(proba[1]).all()
    assert [i for i, _ in failed] == ["bad"]


# --------------------------------------------------------------------------- pieces


def test_train_transform_derives_from_the_backbone(photos):
    from torchvision.transforms import v2

    prep = bb.get_backbone(LITE0).preprocessing
    tf = fc.build_train_transform(LITE0)
    crop = next(t for t in tf.transforms if isinstance(t, v2.RandomResizedCrop))
    norm = next(t for t in tf.transforms if isinstance(t, v2.Normalize))
    assert tuple(crop.size) == (prep.crop_size, prep.crop_size) and crop.interpolation.value == prep.interpolation
    assert tuple(norm.mean) == prep.mean and tuple(norm.std) == prep.std
    assert not any(isinstance(t, (v2.RandomVerticalFlip, v2.RandomRotation)) for t in tf.transforms)
    x = tf(Image.open(photos["paths"]["astronaut-0"]).convert("RGB"))
    assert x.shape == (3, prep.crop_size, prep.crop_size) and x.dtype == torch.float32
    assert -1.0 <= float(x.min()) and float(x.max()) <= 1.0  # mean = std = 0.5


def test_depth_groups_follow_the_network():
    model = nw.build_classifier_model(LITE0, 2, pretrained=False)
    groups = fc.depth_groups(model.features)
    names = [n for g in groups for n, _ in g]
    assert len(groups) >= 5 and names[0] == "model.conv_stem.weight" and "model.bn2.bias" in {n for n, _ in groups[-1]}
    assert sorted(names) == sorted(n for n, _ in model.features.named_parameters())
    opt_groups = fc.param_groups(model, fc.FinetuneConfig())
    lrs = [g["lr"] for g in opt_groups if g["name"] != "head"]
    assert lrs == sorted(lrs, reverse=True)  # earlier layers learn more slowly


def test_the_first_groups_never_train():
    model = nw.build_classifier_model(LITE0, 2, pretrained=False)
    groups = fc.depth_groups(model.features)
    optimizer = torch.optim.AdamW(fc.param_groups(model, fc.FinetuneConfig()))
    for epoch, phase in ((0, "head"), (1, "top"), (2, "all"), (7, "all")):
        assert fc.set_trainable(model, optimizer, epoch) == phase
    trains = [all(p.requires_grad for _, p in g) for g in groups]
    assert trains == [False] * 3 + [True] * (len(groups) - 3)
    optimizer = torch.optim.AdamW(fc.param_groups(model, fc.FinetuneConfig(frozen_groups=0)))
    fc.set_trainable(model, optimizer, 2)
    assert all(p.requires_grad for p in model.features.parameters())


def test_bad_settings_and_inputs_are_plain_errors(photos):
    with pytest.raises(ValueError, match="epochs"):
        fc.FinetuneConfig(epochs=0)
    with pytest.raises(ValueError, match="layer_decay"):
        fc.FinetuneConfig(layer_decay=1.5)
    with pytest.raises(ValueError, match="not among the classes"):
        ft.finetune(photos["train"], [("x", photos["paths"]["coffee-1"], "cat")], backbone_id=LITE0, classes=CLASSES)
    with pytest.raises(ValueError, match="no validation photos"):
        ft.finetune(photos["train"], [], backbone_id=LITE0, classes=CLASSES)


# --------------------------------------------------------------------------- real product photos


def test_linear_probe_start_on_product_photos(product_photos):
    """Real catalog photos: the network starts exactly at the frozen head's validation
    loss and accuracy, and one epoch of head training does not make the kept model worse."""
    from sklearn.metrics import log_loss

    with open(product_photos / "labels.csv", newline="") as f:
        rows = sorted(csv.DictReader(f), key=lambda r: r["file"])
    person = [r for r in rows if r["label"] == "person"]
    other = [r for r in rows if r["label"] == "no_person"]
    as_items = lambda rs: [(r["file"], product_photos / r["file"], r["label"]) for r in rs]  # noqa: E731
    train, val = as_items(person[:10] + other[:10]), as_items(person[10:16] + other[10:16])
    model = nw.build_classifier_model(LITE0, 2).to(memory_format=torch.channels_last)
    X, Xv = _features(model, [p for _, p, _ in train]), _features(model, [p for _, p, _ in val])
    yv = [label for _, _, label in val]
    head = make_frozen_head(C=0.1).fit(X, [label for _, _, label in train])
    result = ft.finetune(train, val, backbone_id=LITE0, classes=CLASSES, head_arrays=head_to_arrays(head),
                         config=fc.FinetuneConfig(epochs=1, batch_size=8))
    assert result.start_val["val_acc"] == pytest.approx(np.mean(head.predict(Xv) == yv))
    assert result.start_val["val_loss"] == pytest.approx(log_loss(yv, head.predict_proba(Xv)), abs=1e-4)
    assert result.start_val["val_acc"] >= 0.75
    assert result.best_val_loss <= result.start_val["val_loss"]
    assert result.history[0]["phase"] == "head" and math.isfinite(result.history[0]["train_loss"])
