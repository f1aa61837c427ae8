"""Feature extraction on real photos: correct, cached, resumable, never stopped by one bad file."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from core.inputs.images import load_for_model
from core.vision import backbones as bb
from core.vision import features as ft
from core.vision import networks as nw
from core.vision import photos as ph
from core.vision import tuning
from core.vision import weights as wt
from core.vision.device import infer_with_backoff
from core.vision.store import FeatureStore

LITE0 = "efficientnet_lite0"


@pytest.fixture(scope="module", autouse=True)
def isolated_cache(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CATALOG_LENS_CACHE_DIR", str(tmp_path_factory.mktemp("lens-cache")))
        yield


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> dict:
    """Real photos as JPEG and PNG, the same photo under a second name, and a corrupt file."""
    from skimage import data

    folder = tmp_path_factory.mktemp("photos")
    arrays = {
        "chelsea.jpg": data.chelsea(),
        "coffee.png": data.coffee(),
        "astronaut.jpg": data.astronaut(),
        "rocket.jpg": data.rocket(),
        "camera.png": data.camera(),  # greyscale
    }
    for name, array in arrays.items():
        Image.fromarray(array).save(folder / name)
    shutil.copy(folder / "chelsea.jpg", folder / "copy of chelsea.jpg")
    good = (folder / "coffee.png").read_bytes()
    (folder / "broken.png").write_bytes(good[: len(good) // 3])
    items = [(_sha(folder / n), folder / n) for n in [*arrays, "copy of chelsea.jpg", "broken.png"]]
    return {
        "items": items,
        "good": [sha for sha, _ in items[:5]],
        "broken": items[-1][0],
        "folder": folder,
    }


@pytest.fixture(scope="module")
def full_run(photos, tmp_path_factory):
    store = FeatureStore(tmp_path_factory.mktemp("features"))
    progress = []
    result = ft.extract_features(
        photos["items"], backbone_id=LITE0, store=store, batch_size=2,
        on_progress=lambda done, total: progress.append((done, total)),
    )
    return store, result, progress


def test_extracts_every_good_photo_once(photos, full_run):
    store, result, progress = full_run
    assert result.computed == 5 and result.reused == 0 and not result.cancelled
    assert result.device == "cpu" and result.batch_size == 2 and result.photos_per_s > 0
    feats = store.load(result.key, photos["good"])
    assert feats.shape == (5, 1280) and feats.dtype == np.float32
    assert np.isfinite(feats).all() and (np.abs(feats).sum(1) > 0).all()
    assert progress[0] == (0, 6) and progress[-1] == (6, 6)  # 6 distinct photos
    assert [d for d, _ in progress] == sorted(d for d, _ in progress)
    assert result.key.startswith(f"{LITE0}__57934424")


def test_corrupt_file_is_a_failure_with_a_reason(photos, full_run):
    _, result, _ = full_run
    assert len(result.failed) == 1
    sha, reason = result.failed[0]
    assert sha == photos["broken"] and reason and "Traceback" not in reason


def test_second_run_computes_nothing_and_returns_the_same(photos, full_run):
    store, first, _ = full_run
    before = store.load(first.key, photos["good"])
    second = ft.extract_features(photos["items"], backbone_id=LITE0, store=store, batch_size=2)
    assert second.computed == 0 and second.reused == 5
    assert [sha for sha, _ in second.failed] == [photos["broken"]]  # remembered, not retried
    np.testing.assert_array_equal(store.load(first.key, photos["good"]), before)


def test_features_are_deterministic(photos, full_run, tmp_path):
    store, first, _ = full_run
    again = FeatureStore(tmp_path)
    ft.extract_features(photos["items"], backbone_id=LITE0, store=again, batch_size=2)
    np.testing.assert_array_equal(
        again.load(first.key, photos["good"]), store.load(first.key, photos["good"])
    )


def test_worker_processes_give_the_same_features(photos, full_run, tmp_path):
    store, first, _ = full_run
    other = FeatureStore(tmp_path)
    result = ft.extract_features(
        photos["items"], backbone_id=LITE0, store=other, batch_size=3, num_workers=1
    )
    assert result.computed == 5 and len(result.failed) == 1
    np.testing.assert_allclose(
        other.load(first.key, photos["good"]), store.load(first.key, photos["good"]), atol=1e-4
    )


def test_a_large_network_batch_still_gives_every_decoding_worker_photos(photos, tmp_path):
    """On a GPU the chosen batch is 256: 480 photos then made 2 decoding batches, so 2 of 8
    workers decoded and the pipeline ran at 82 photos/s beside a network doing 18,800/s. The
    decoding batches are now small enough for every worker to get several."""
    progress = []
    result = ft.extract_features(
        photos["items"], backbone_id=LITE0, store=FeatureStore(tmp_path), batch_size=256, num_workers=2,
        on_progress=lambda done, total: progress.append(done),
    )
    assert result.computed == 5 and len(result.failed) == 1
    assert len(progress) - 1 >= 4, progress  # one call per decoding batch after the first
    assert ft.loader_batch(256, 480, 8) == 15 and ft.loader_batch(4, 600, 0) == 4


def test_cancel_keeps_finished_chunks_and_resume_completes(photos, full_run, tmp_path):
    store, first, _ = full_run
    partial = FeatureStore(tmp_path)
    batches_done = []

    def on_progress(done, total):
        batches_done.append(done)

    result = ft.extract_features(
        photos["items"], backbone_id=LITE0, store=partial, batch_size=2,
        on_progress=on_progress, should_cancel=lambda: len(batches_done) >= 2,
    )
    assert result.cancelled and result.computed == 2
    assert len(partial.has(first.key)) == 2  # the first batch, complete
    assert not list((tmp_path / first.key).glob(".tmp-*"))
    resumed = ft.extract_features(photos["items"], backbone_id=LITE0, store=partial, batch_size=2)
    assert resumed.reused == 2 and resumed.computed == 3 and not resumed.cancelled
    np.testing.assert_allclose(
        partial.load(first.key, photos["good"]), store.load(first.key, photos["good"]), atol=1e-5
    )
    assert len(list((tmp_path / first.key).glob("chunk-*.npz"))) == 2
    expected = partial.load(first.key, photos["good"])
    partial.compact(first.key)
    assert len(list((tmp_path / first.key).glob("chunk-*.npz"))) == 1
    np.testing.assert_array_equal(FeatureStore(tmp_path).load(first.key, photos["good"]), expected)


def test_store_loads_rows_in_the_order_asked(tmp_path):
    store = FeatureStore(tmp_path)
    rows = np.arange(12, dtype=np.float32).reshape(4, 3)
    store.add("k", ["a", "b"], rows[:2])
    store.add("k", ["c", "d"], rows[2:])
    assert store.has("k") == {"a", "b", "c", "d"} and store.keys() == ["k"]
    np.testing.assert_array_equal(store.load("k", ["d", "a", "c", "a"]), rows[[3, 0, 2, 0]])
    with pytest.raises(KeyError, match="2 of 3 photos have no features"):
        store.load("k", ["a", "x", "y"])
    (tmp_path / "k" / ".tmp-crashed.npz").write_bytes(b"half a chunk")  # a crash mid-write
    assert store.has("k") == {"a", "b", "c", "d"}
    assert store.load("k", []).shape == (0, 3)
    store.delete("k")
    assert store.keys() == [] and store.has("k") == set()
    with pytest.raises(ValueError, match="key"):
        store.has("../elsewhere")


def test_batch_size_chooser_returns_a_candidate_and_remembers_it():
    model = bb.get_backbone(LITE0).builder().eval()
    chosen = tuning.choose_run_settings(model, "cpu", candidates=(1, 2, 4), input_size=32, rounds=2, min_images=4)
    assert chosen.batch_size in (1, 2, 4)
    # One candidate is a robust choice: it is saved, and later calls return it without measuring.
    assert tuning.choose_batch_size(model, "cpu", candidates=(2,), input_size=32, remember_as="test-lite0") == 2
    assert tuning.choose_batch_size(model, "cpu", candidates=(8,), remember_as="test-lite0") == 2


def test_the_smallest_batch_within_a_few_percent_of_the_fastest_is_chosen():
    # Seconds per photo, five interleaved rounds, as measured on a shared 2-core machine
    # (issue 12: 4 is clearly best there; a single noisy sample once picked 1).
    samples = {(1, True): [1 / 64.8, 1 / 40.0, 1 / 61.0, 1 / 63.0, 1 / 66.0],
               (2, True): [1 / 98.0, 1 / 101.0, 1 / 70.0, 1 / 99.5, 1 / 97.0],
               (4, True): [1 / 124.0, 1 / 126.0, 1 / 90.0, 1 / 125.0, 1 / 121.0],
               (8, True): [1 / 127.0, 1 / 119.0, 1 / 124.0, 1 / 80.0, 1 / 122.0],
               (16, True): [1 / 76.2, 1 / 75.0, 1 / 74.0, 1 / 77.0, 1 / 60.0]}
    assert tuning.pick_batch(samples) == ((4, True), True)  # 8 is under 1 % faster at best: a tie, 4 is smaller
    assert tuning.pick_batch(samples, tolerance=0.0) == ((8, True), False)  # noise would decide: not saved
    burst = {**samples, (1, True): [1 / 130.0, 1 / 40.0, 1 / 41.0, 1 / 39.0, 1 / 42.0]}
    assert tuning.pick_batch(burst) == ((1, True), False)  # one lucky sample: used now, measured again later
    # 8 and 16 as good as each other (they trade places run after run): 8 is kept, and saved,
    # so later jobs do not spend ~20 s choosing again (before: never saved, the medians preferred 16)
    close = {(8, True): [1 / 87.0, 1 / 82.0, 1 / 81.0], (16, True): [1 / 86.5, 1 / 86.0, 1 / 85.9]}
    assert tuning.pick_batch(close) == ((8, True), True)


def test_measure_speed_is_positive_and_remembered():
    model = bb.get_backbone(LITE0).builder().eval()
    tuning.choose_batch_size(model, "cpu", candidates=(4,), rounds=1, remember_as=LITE0)
    speed = tuning.measure_speed(LITE0, device="cpu", n_images=8)
    assert speed > 0 and tuning.measure_speed(LITE0, device="cpu", n_images=8) == pytest.approx(speed, rel=0.01)


def test_missing_weights_stop_before_any_work(photos, tmp_path, monkeypatch):
    import urllib.error

    def refuse(*args, **kwargs):
        raise urllib.error.URLError("offline")

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(wt.urllib.request, "urlopen", refuse)
    with pytest.raises(wt.WeightsUnavailable, match="Import weights"):
        ft.extract_features(photos["items"], backbone_id="resnet18", store=FeatureStore(tmp_path))


# --------------------------------------------------------------------------- GPU decode path, run on the CPU


@pytest.mark.parametrize("orientation", range(1, 9))
def test_orientation_matches_pil(orientation):
    array = np.random.default_rng(orientation).integers(0, 255, (5, 7, 3), dtype=np.uint8)
    image = Image.fromarray(array)
    exif = image.getexif()
    exif[0x0112] = orientation
    image.info["exif"] = exif.tobytes()
    expected = np.asarray(ImageOps.exif_transpose(image))
    got = ph.orient(torch.from_numpy(array).permute(2, 0, 1), orientation).permute(1, 2, 0)
    np.testing.assert_array_equal(got.numpy(), expected)


def test_tensor_decode_path_matches_the_pil_path(photos, tmp_path):
    """The nvJPEG path (bytes → decode → resize on the device) is checked here on the CPU
    against the PIL path, including an EXIF-rotated photo."""
    from skimage import data

    rotated = tmp_path / "rotated.jpg"
    image = Image.fromarray(data.astronaut())
    exif = image.getexif()
    exif[0x0112] = 6
    image.save(rotated, quality=95, exif=exif.tobytes())
    backbone = bb.get_backbone(LITE0)
    model, transform = nw.load_feature_extractor(LITE0)
    prep = backbone.preprocessing
    for path in [photos["folder"] / "chelsea.jpg", rotated]:
        raw = ph.raw_jpeg(path, 1)
        assert raw is not None
        via_tensor = ph.decode_jpegs([raw], torch.device("cpu"), prep)[0]
        via_pil = transform(load_for_model(path, size=prep.resize_size))
        assert via_tensor.shape == via_pil.shape == (3, 224, 224)
        assert (via_tensor - via_pil).abs().mean().item() < 0.02
        with torch.inference_mode():
            a, b = model(torch.stack([via_tensor, via_pil]))
        assert torch.nn.functional.cosine_similarity(a, b, dim=0).item() > 0.99
    assert ph.raw_jpeg(photos["folder"] / "coffee.png", 1) is None  # PNG: PIL path
    assert ph.raw_jpeg(photos["folder"] / "chelsea.jpg", 10_000) is None  # small: PIL path


def test_out_of_memory_halves_the_batch_and_retries_the_same_rows():
    class Picky(torch.nn.Module):
        def forward(self, x):
            if len(x) > 2:
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
            return x.flatten(1)[:, :4] * 1.0

    x = torch.arange(5 * 3 * 2 * 2, dtype=torch.float32).reshape(5, 3, 2, 2)
    state = {"batch": 8}
    out = infer_with_backoff(Picky(), x, torch.device("cpu"), state)
    assert state["batch"] == 2
    np.testing.assert_array_equal(out, x.flatten(1)[:, :4].numpy())


def test_openmp_threads_wait_passively_unless_the_user_says_otherwise():
    """Spinning OpenMP threads collapse the network when another process needs a core
    (measured, issue 12: 0.6 against 10.2 photos/s); the policy must be set before torch loads."""
    import os
    import subprocess
    import sys

    code = ("import os, sys; import core.vision.features, torch; "
            "print(os.environ.get('OMP_WAIT_POLICY'), 'torch' in sys.modules)")
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.split() == ["PASSIVE", "True"]
    out = subprocess.run([sys.executable, "-c", code], env=dict(env, OMP_WAIT_POLICY="ACTIVE"), capture_output=True,
                         text=True, check=True).stdout
    assert out.split() == ["ACTIVE", "True"]
