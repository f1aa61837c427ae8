"""core.vision.photos: the one photo dataset and loader, and the GPU JPEG path (run on the CPU)."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from core.vision import photos as ph


def test_gpu_jpeg_path_applies_the_pixel_limit_in_force(tmp_path, monkeypatch):
    """CATALOG_LENS_MAX_PIXELS bounds the nvJPEG path as it bounds PIL's (it used the constant)."""
    path = tmp_path / "big.jpg"
    Image.fromarray(np.full((300, 400, 3), 128, np.uint8)).save(path)
    assert ph.raw_jpeg(path, 16) is not None
    monkeypatch.setenv("CATALOG_LENS_MAX_PIXELS", "100000")  # 120,000 px photo: over the limit
    assert ph.raw_jpeg(path, 16) is None
    # ...so the photo takes the PIL path, which refuses it with the plain reason
    dataset = ph.PhotoDataset([("big", path, -1)], lambda img: img, load_size=16, raw_jpeg_min_side=16)
    _, kind, (reason, permanent), _ = dataset[0]
    assert kind == "error" and "too large" in reason and not permanent


def test_one_batch_keeps_good_photos_raw_jpegs_and_failures_apart(tmp_path):
    Image.fromarray(np.full((40, 60, 3), 200, np.uint8)).save(tmp_path / "a.png")
    Image.fromarray(np.full((400, 600, 3), 90, np.uint8)).save(tmp_path / "b.jpg")
    (tmp_path / "c.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really")
    items = [("a", tmp_path / "a.png", 1), ("b", tmp_path / "b.jpg", 0), ("c", tmp_path / "c.jpg", 1)]
    dataset = ph.PhotoDataset(items, lambda img: torch.zeros(3, 4, 4), load_size=32, raw_jpeg_min_side=100)
    batch = ph.collate([dataset[i] for i in range(3)])
    assert batch["index"] == [0] and batch["x"].shape == (1, 3, 4, 4) and batch["y"].tolist() == [1]
    assert batch["jpeg_index"] == [1] and batch["jpeg_y"].tolist() == [0]
    (index, reason, permanent), = batch["failures"]
    assert index == 2 and permanent and reason


def test_each_epoch_of_the_shuffle_depends_on_the_seed_and_the_epoch_alone(tmp_path):
    """A resumed run starts a new loader at epoch e: it must draw what epoch e drew before,
    the order and every photo's augmentation, whatever happened to the process's random state."""
    from torchvision.transforms import v2

    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 80, 3), dtype=np.uint8)).save(tmp_path / "a.png")
    items = [(str(i), tmp_path / "a.png", 0) for i in range(10)]
    dataset = ph.PhotoDataset(items, v2.Compose([v2.RandomResizedCrop(16), v2.ToImage()]), load_size=64)

    def epoch(seed: int, number: int):
        sampler = ph.EpochShuffle(len(items), seed=seed)
        sampler.set_epoch(number)
        keys = list(sampler)
        torch.manual_seed(number * 7 + 1)  # any state of the process's own generator
        return [i for i, _ in keys], [dataset[k][2] for k in keys[:3]]

    order, crops = epoch(0, 3)
    again, crops_again = epoch(0, 3)
    assert sorted(order) == list(range(10)) and order == again
    assert all(torch.equal(a, b) for a, b in zip(crops, crops_again, strict=True))
    assert epoch(0, 4)[0] != order and epoch(1, 3)[0] != order
    loader = ph.make_loader(dataset, batch_size=4, device=torch.device("cpu"), workers=0, shuffle=True, seed=0,
                            drop_last=True)
    loader.sampler.set_epoch(3)
    assert [i for batch in loader for i in batch["index"]] == order[:8]


def _real_photos(tmp_path, n: int = 3):
    from skimage import data

    paths = []
    for i, name in enumerate(("astronaut", "coffee", "chelsea")[:n]):
        path = tmp_path / f"{name}.jpg"
        Image.fromarray(getattr(data, name)()).save(path, quality=90)
        paths.append((name, path, i % 2))
    return paths


def test_published_transforms_split_into_per_photo_geometry_and_one_batch_normalisation(tmp_path):
    """Scaling and normalising run once per batch (uint8 per photo): the batch is the same as
    the library's transform applied photo by photo, for timm's, torchvision's and the training one."""
    from core.inputs.images import load_for_model
    from core.learning.finetune_config import build_train_transform
    from core.vision.networks import build_transform

    items = _real_photos(tmp_path)
    for transform in (build_transform("efficientnet_lite0"), build_transform("resnet18"),
                      build_train_transform("efficientnet_lite0")):
        dataset = ph.PhotoDataset(items, transform, load_size=256)
        assert dataset.finish is not None
        samples = [dataset[(i, 1234 + i)] for i in range(len(items))]
        assert all(kind == "tensor" and value.dtype == torch.uint8 for _, kind, value, _ in samples)
        batch = next(iter(ph.make_loader(dataset, batch_size=3, device=torch.device("cpu"), workers=0)))
        expected = []
        for i, (_, path, _) in enumerate(items):
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(1234 + i)
                expected.append(transform(load_for_model(path, size=256)))
        assert batch["x"].dtype == torch.float32
        assert torch.allclose(ph.collate(samples, finish=dataset.finish)["x"], torch.stack(expected), atol=1e-6)
        if "RandomResizedCrop" not in repr(transform):  # evaluation: bit for bit, in the loader's own batch
            assert torch.equal(batch["x"], torch.stack([transform(load_for_model(p, size=256)) for _, p, _ in items]))


def test_a_transform_of_unknown_shape_runs_whole_photo_by_photo(tmp_path):
    items = _real_photos(tmp_path, 1)
    dataset = ph.PhotoDataset(items, lambda img: torch.ones(3, 2, 2), load_size=64)
    assert dataset.finish is None
    batch = next(iter(ph.make_loader(dataset, batch_size=1, device=torch.device("cpu"), workers=0)))
    assert torch.equal(batch["x"], torch.ones(1, 3, 2, 2))


def test_decoded_photos_are_kept_for_the_next_epoch_within_the_budget(tmp_path):
    """Fine-tuning decodes each photo once, not once an epoch; what does not fit the budget is
    decoded again, and a kept photo gives what a fresh decode gives, augmentation included."""
    from torchvision.transforms import v2

    rng = np.random.default_rng(0)
    for name in "abc":
        Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(tmp_path / f"{name}.png")
    items = [(name, tmp_path / f"{name}.png", 0) for name in "abc"]
    transform = v2.Compose([v2.RandomResizedCrop(16), v2.ColorJitter(0.2, 0.2, 0.2), v2.ToImage()])
    fresh = ph.PhotoDataset(items, transform, load_size=48)
    kept = ph.PhotoDataset(items, transform, load_size=48, keep_decoded=2 * 48 * 64 * 3)  # room for two
    first = [kept[(i, 11)] for i in range(3)]
    for name in "abc":
        (tmp_path / f"{name}.png").unlink()  # what is decoded again now fails
    again = [kept[(i, 11)] for i in range(3)]
    assert [kind for _, kind, _, _ in again] == ["tensor", "tensor", "error"]
    for (_, _, x, _), (_, _, y, _) in zip(first[:2], again[:2], strict=True):
        assert torch.equal(x, y)
    assert all(kind == "error" for _, kind, _, _ in (fresh[(i, 11)] for i in range(3)))
