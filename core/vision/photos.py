"""Photos into network input: the one dataset and loader for extraction, fine-tuning and prediction.

A :class:`PhotoDataset` turns ``(photo id, path, target)`` items into tensors through a
transform, in DataLoader worker processes when there are some. A photo that cannot be read
becomes a plain reason, never an exception: one bad file must not stop a run. Large plain
JPEGs can instead travel as raw bytes to be decoded on the GPU (nvJPEG) with
:func:`decode_jpegs`, which applies the same EXIF orientation, pixel limit and
preprocessing as the PIL path.
"""

from __future__ import annotations

import functools
import hashlib
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from core.inputs.images import ImageError, load_for_model, max_pixels
from core.vision.device import worker_init

if TYPE_CHECKING:
    import torch

    from core.vision.backbones import Preprocessing


Item = tuple[str, "str | Path", int]  # (photo id, path, class index; -1 when unknown)

# ImageError kinds that depend on this time or this setting, not on the bytes: a photo that
# failed so may work next time, so it is not remembered as bad.
_TRANSIENT = {"unreadable_file", "image_too_large"}


def failure_reason(exc: Exception) -> str:
    """A plain sentence saying why a photo could not be used."""
    if isinstance(exc, ImageError):
        return str(exc)
    if isinstance(exc, FileNotFoundError):
        return "The file could not be found."
    if isinstance(exc, PermissionError):
        return "The file could not be opened (no permission to read it)."
    return f"The photo could not be prepared for the network ({type(exc).__name__}: {exc})."


def is_permanent(exc: Exception) -> bool:
    """True when the bytes themselves are bad (so the same content would fail again), not
    when the file was missing or locked this time, or over a limit that can change."""
    return isinstance(exc, ImageError) and getattr(exc, "kind", "") not in _TRANSIENT


# --------------------------------------------------------------------------- the transform, split


class Normalize:
    """The last steps of a published transform, done once per batch: uint8 (N, 3, H, W) →
    float scaled to [0, 1], minus ``mean``, over ``std`` (the same operations, in the same
    order, as torchvision's ToTensor and Normalize on one photo)."""

    def __init__(self, mean, std):
        self.mean, self.std = tuple(float(m) for m in mean), tuple(float(s) for s in std)

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        import torch

        mean = torch.tensor(self.mean, device=batch.device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, device=batch.device).view(1, -1, 1, 1)
        return batch.float().div_(255).sub_(mean).div_(std)


class _ToUint8:
    """PIL image → uint8 (3, H, W) tensor, no scaling (picklable for worker processes)."""

    def __call__(self, image) -> torch.Tensor:
        import torch
        from torchvision.transforms.v2 import functional as F

        out = image if isinstance(image, torch.Tensor) else F.pil_to_tensor(image)
        return out.as_subclass(torch.Tensor)


def split_transform(transform: Callable) -> tuple[Callable, Normalize] | None:
    """``transform`` (PIL image → normalised float tensor, as the library that published the
    weights made it) as two parts: the per-photo geometry, ending in a uint8 tensor, and the
    :class:`Normalize` that finishes a whole batch at once. None when its shape is not one of
    those known here (it then runs whole, photo by photo).

    Measured on 480 catalog photos (224 px JPEGs, 2-core CPU): timm's transform photo by photo
    took 0.35 s; split, 0.06 s of per-photo geometry and 0.16 s of normalising, all photos at
    once. With it, ``core bench extract`` rose from 0.83-0.89x to 0.90-0.94x of the network's
    forward-only speed (5 fresh runs each, same machine, same hour)."""
    import torch
    from torchvision import transforms as v1
    from torchvision.transforms import v2
    from torchvision.transforms._presets import ImageClassification

    if isinstance(transform, ImageClassification):  # torchvision's weights.transforms()
        geometry = v1.Compose([
            v1.Resize(transform.resize_size, interpolation=transform.interpolation, antialias=transform.antialias),
            v1.CenterCrop(transform.crop_size),
            _ToUint8(),
        ])
        return geometry, Normalize(transform.mean, transform.std)
    steps = list(getattr(transform, "transforms", ()))
    if len(steps) < 2 or not isinstance(steps[-1], (v1.Normalize, v2.Normalize)):
        return None
    names = [type(step).__name__ for step in steps]
    if names[-2] in ("ToTensor", "MaybeToTensor"):  # torchvision v1 / timm
        prefix = steps[:-2]
    elif names[-3:-1] == ["ToImage", "ToDtype"] and getattr(steps[-2], "scale", False) \
            and getattr(steps[-2], "dtype", None) == torch.float32:  # torchvision v2
        prefix = steps[:-3]
    else:
        return None
    normalize = steps[-1]
    return type(transform)([*prefix, _ToUint8()]), Normalize(normalize.mean, normalize.std)


class PhotoDataset:
    """Map-style dataset over ``(photo id, path, target)`` items for DataLoader workers.

    A sample is ``(position, kind, value, target)``: kind ``"tensor"`` (value: the
    transformed photo; uint8 when the transform splits, see :func:`split_transform`, and
    then :attr:`finish` normalises the batch in :func:`collate`), ``"jpeg"`` (value: :func:`raw_jpeg`'s bytes and orientation, for
    GPU decoding; only with ``raw_jpeg_min_side``) or ``"error"`` (value: ``(reason,
    permanent)``). The key is a position, or ``(position, seed)`` from
    :class:`EpochShuffle`: the random transform then draws from that seed alone. With
    ``keep_decoded`` (bytes) decoded photos are kept for later epochs (:meth:`_decode`).
    """

    def __init__(self, items: Sequence[Item], transform: Callable, *, load_size: int,
                 raw_jpeg_min_side: int | None = None, keep_decoded: int = 0):
        self.items = list(items)
        self.transform = transform
        split = split_transform(transform)
        self._per_photo, self.finish = split if split is not None else (transform, None)
        self.load_size = load_size
        self.raw_jpeg_min_side = raw_jpeg_min_side
        self.keep_decoded = keep_decoded
        self._decoded: dict[int, Any] = {}  # position -> decoded photo, kept for the next epoch
        self._decoded_bytes = 0

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, key: int | tuple[int, int]):
        index, seed = key if isinstance(key, tuple) else (key, None)
        _, path, target = self.items[index]
        if self.raw_jpeg_min_side is not None:
            try:
                raw = raw_jpeg(path, self.raw_jpeg_min_side)
            except Exception:  # noqa: BLE001 - the PIL path below says what is wrong with it
                raw = None
            if raw is not None:
                return index, "jpeg", raw, target
        try:
            return index, "tensor", self._transform(self._decode(index, path), seed), target
        except Exception as exc:  # noqa: BLE001 - one bad photo must never stop the run
            return index, "error", (failure_reason(exc), is_permanent(exc)), target

    def _decode(self, index: int, path):
        """The photo decoded at the load size; kept in memory for the next epoch while the
        decoded photos kept, it included, take at most ``keep_decoded`` bytes (in each process).
        The transforms never change a decoded photo: they return new ones."""
        image = self._decoded.get(index)
        if image is None:
            image = load_for_model(path, size=self.load_size)
            size = image.width * image.height * len(image.getbands())
            if self._decoded_bytes + size <= self.keep_decoded:
                self._decoded[index] = image
                self._decoded_bytes += size
        return image

    def _transform(self, image, seed: int | None):
        if seed is None:
            return self._per_photo(image)
        import torch

        # The process's own random stream is left as it was: in the main process it is
        # the network's (dropout, drop-path in some backbones).
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return self._per_photo(image)


class EpochShuffle:
    """A DataLoader sampler for training: every epoch a new order drawn from ``(seed,
    epoch)`` (the epoch is set with :meth:`set_epoch`, as for torch's DistributedSampler),
    each position paired with a seed for that photo's augmentation in that epoch.

    An epoch is then a function of the seed and its number alone: a run resumed at epoch
    ``e`` draws exactly what an uninterrupted run draws there, a batch size halved after
    running out of memory keeps the epoch's order, and worker processes (whose own random
    state would otherwise carry over from epoch to epoch, out of reach) change nothing.
    """

    def __init__(self, n: int, *, seed: int):
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n

    def __iter__(self) -> Iterator[tuple[int, int]]:
        import torch

        digest = hashlib.sha256(f"catalog-lens shuffle {self.seed} {self.epoch}".encode()).digest()
        generator = torch.Generator()
        generator.manual_seed(int.from_bytes(digest[:8], "little"))
        order = torch.randperm(self.n, generator=generator).tolist()
        seeds = torch.randint(0, 2**62, (self.n,), generator=generator).tolist()
        return iter([(i, seeds[i]) for i in order])


def collate(samples, finish: Callable | None = None) -> dict[str, Any]:
    """One batch: ``index`` and ``x``/``y`` for the decoded photos (``x`` None when there are
    none; uint8 photos are finished by ``finish``, the dataset's :class:`Normalize`),
    ``jpeg_index``/``jpegs``/``jpeg_y`` for raw JPEGs, and ``failures`` as
    ``(position, reason, permanent)``."""
    import torch

    out: dict[str, Any] = {"index": [], "x": None, "jpeg_index": [], "jpegs": [], "failures": []}
    tensors, targets, jpeg_targets = [], [], []
    for index, kind, value, target in samples:
        if kind == "tensor":
            out["index"].append(index)
            tensors.append(value)
            targets.append(target)
        elif kind == "jpeg":
            out["jpeg_index"].append(index)
            out["jpegs"].append(value)
            jpeg_targets.append(target)
        else:
            out["failures"].append((index, *value))
    if tensors:
        out["x"] = torch.stack(tensors)
        if finish is not None and out["x"].dtype == torch.uint8:
            out["x"] = finish(out["x"])
    out["y"] = torch.tensor(targets, dtype=torch.long)
    out["jpeg_y"] = torch.tensor(jpeg_targets, dtype=torch.long)
    return out


def make_loader(
    dataset: PhotoDataset,
    *,
    batch_size: int,
    device: torch.device,
    workers: int,
    shuffle: bool = False,
    seed: int = 0,
    drop_last: bool = False,
    persistent: bool = False,
):
    """A DataLoader over ``dataset`` with :func:`collate`: pinned memory for CUDA, decoding
    workers with one thread each. ``shuffle`` draws each epoch's order and augmentation
    from ``seed`` and the epoch (:class:`EpochShuffle`; set it with
    ``loader.sampler.set_epoch``)."""
    import torch

    generator = torch.Generator()  # only seeds the worker processes now
    generator.manual_seed(seed)
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=EpochShuffle(len(dataset), seed=seed) if shuffle else None,
        drop_last=drop_last,
        num_workers=workers,
        collate_fn=functools.partial(collate, finish=dataset.finish),
        pin_memory=device.type == "cuda",
        worker_init_fn=worker_init if workers else None,
        generator=generator,
        persistent_workers=persistent and workers > 0,
        prefetch_factor=4 if workers else None,
    )


# --------------------------------------------------------------------------- the GPU JPEG path


def raw_jpeg(path: str | Path, min_side: int):
    """(bytes as a uint8 tensor, EXIF orientation) for a plain JPEG at least ``min_side``
    pixels on its shorter side and within the pixel limit in force
    (:func:`core.inputs.images.max_pixels`), else None: those are worth decoding on the GPU;
    everything else takes the safe PIL path, which also says why a photo is refused."""
    import torch
    from PIL import Image

    with Image.open(path) as img:
        if img.format != "JPEG" or img.mode not in ("RGB", "L"):
            return None
        width, height = img.size
        if min(width, height) < min_side or width * height > max_pixels():
            return None
        orientation = int(img.getexif().get(0x0112, 1) or 1)
    data = Path(path).read_bytes()
    return torch.frombuffer(bytearray(data), dtype=torch.uint8), orientation


def orient(img: torch.Tensor, orientation: int) -> torch.Tensor:
    """Apply an EXIF orientation (as PIL's ``exif_transpose``) to a (C, H, W) tensor."""
    import torch

    if orientation == 2:
        return img.flip(-1)
    if orientation == 3:
        return img.flip(-1).flip(-2)
    if orientation == 4:
        return img.flip(-2)
    if orientation == 5:
        return img.transpose(-1, -2)
    if orientation == 6:
        return torch.rot90(img, k=-1, dims=(-2, -1))
    if orientation == 7:
        return img.transpose(-1, -2).flip(-1).flip(-2)
    if orientation == 8:
        return torch.rot90(img, k=1, dims=(-2, -1))
    return img


def tensor_transform(img: torch.Tensor, prep: Preprocessing) -> torch.Tensor:
    """The backbone's preprocessing on a decoded uint8 (3, H, W) tensor, on its device."""
    import torch
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms.v2 import functional as F

    mode = InterpolationMode(prep.interpolation)
    size = [prep.crop_size, prep.crop_size] if prep.crop_mode == "squash" else [prep.resize_size]
    x = F.resize(img.float(), size, interpolation=mode, antialias=True).clamp_(0, 255)
    x = F.center_crop(x, [prep.crop_size, prep.crop_size]) / 255.0
    mean = torch.tensor(prep.mean, device=x.device).view(3, 1, 1)
    std = torch.tensor(prep.std, device=x.device).view(3, 1, 1)
    return (x - mean) / std


def decode_jpegs(jpegs, device: torch.device, prep: Preprocessing) -> list:
    """Decode :func:`raw_jpeg` pairs on ``device`` (nvJPEG on CUDA) and preprocess them.
    Returns one tensor per photo, or None where that photo needs the PIL path."""
    from torchvision.io import ImageReadMode, decode_jpeg

    datas = [data for data, _ in jpegs]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torchvision.io → TorchCodec
        try:
            images = decode_jpeg(datas, mode=ImageReadMode.RGB, device=device)
        except Exception:  # one bad file fails the whole batch: retry one by one
            images = []
            for data in datas:
                try:
                    images.append(decode_jpeg(data, mode=ImageReadMode.RGB, device=device))
                except Exception:
                    images.append(None)
    return [
        None if img is None else tensor_transform(orient(img, orientation), prep)
        for img, (_, orientation) in zip(images, jpegs, strict=True)
    ]
