"""Which offline network, and which way of feeding it a photo, finds people best?

    .venv/bin/python benchmarks/bench_backbones.py extract [--cache /tmp/catalog-lens-bench]
    .venv/bin/python benchmarks/bench_backbones.py score   [--cache ...] [--write]

Data (skipped with a message when absent; never copied into the repository):
  everyday  ../shared/data/everyday-photos: 300 general photos, 39 with a person
  catalog   ../shared/data/product-photos: 480 studio catalog photos, 248 with a person
  flat-lay  ../shared/data/flat-lay: 300 garments on beds and rugs, no person (a check only:
            a head trained on the catalog photos scores them; never trained on)

Networks: every backbone whose weights are on this computer without a download
(EfficientNet-Lite0/1/2 come with the app; others are added when their weights are cached).

Input variants (one pass over each photo computes them all; features are cached per
network, data set and variant under --cache, so ``score`` can be rerun for free):
  squash      the whole photo resized to a square (the app's preprocessing)
  center      resized, then the centre 87.5 % square kept (timm's default; cuts the edges)
  letterbox   the whole photo, aspect kept, padded to a square with grey
  native      the whole photo, aspect kept, no padding, about as many pixels as the square
  flip        squash + its mirror image, features averaged (test-time flip)
  large       squash at 1.5x the size (e.g. 336 px for Lite0)
  multiscale  squash and large, features averaged
and ways to pool the last feature map: avg (the app's), avg+max (concatenated), and
avg+mid (plus the average-pooled output of an earlier stage, blocks[5]).

Scoring: the Train step's own procedure (core.learning.splits + core.learning.crossval):
a stratified 20 % test part, then the app's frozen head in repeated stratified 5-fold
cross-validation on the rest (5 repeats on everyday photos, 3 on catalog photos; the head's
regularisation C fixed at 1 on everyday photos, see EVERYDAY_C, and chosen once per network
by the head's own search on catalog photos); balanced accuracy with its 95 % range, and the held-out test
score. Flat-lay: the head fit on the catalog training part calls photos "person" at the
threshold the app's model ships with. Speed: the app's extraction (decode + preprocess +
network) on 48 everyday photos, networks interleaved, median of 3 rounds.
``--write`` stores the figures in core/vision/backbone_figures.json (read by the Backbone page).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from core.inputs.images import load_for_model  # noqa: E402
from core.vision import backbones as bb  # noqa: E402
from core.vision import networks as nw  # noqa: E402
from core.vision import weights as wt  # noqa: E402

DATA = ROOT.parent / "shared" / "data"
SETS = {"everyday": "everyday-photos", "catalog": "product-photos", "flatlay": "flat-lay"}
SHAPES = ("squash", "center", "letterbox", "native", "squash_flip", "large")
GREY = 0.0  # after normalising with mean = std = 0.5, mid-grey is 0


def offline_backbones() -> list[str]:
    return [b.id for b in bb.list_backbones() if wt.weights_status(b).available]


def read_labels(name: str) -> tuple[list[Path], np.ndarray]:
    folder = DATA / SETS[name]
    with open(folder / "labels.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    # The everyday sheet also says "ambiguous" (10) and "body_part_only" (9); its README counts
    # them as no_person (39 person, 261 no_person), and so do we: person vs everything else.
    return [folder / r["file"] for r in rows], np.array(
        [r["label"] if r["label"] == "person" else "no_person" for r in rows]
    )


# --------------------------------------------------------------------------- extraction


def _to_input(img, size_hw: tuple[int, int], interpolation) -> torch.Tensor:
    # PIL's resize, as the app's transform (timm / torchvision on a PIL image) does it.
    from torchvision.transforms.v2 import functional as F

    x = F.resize(img, list(size_hw), interpolation=interpolation)
    return (F.pil_to_tensor(x).float() / 255.0 - 0.5) / 0.5


def shapes_of(img, s: int, interpolation) -> dict[str, torch.Tensor]:
    """Every input variant of one photo for a network of input size ``s``."""
    from torchvision.transforms.v2 import functional as F

    w, h = img.size
    out = {"squash": _to_input(img, (s, s), interpolation)}
    short = math.floor(s / 0.875)
    scale = short / min(w, h)
    x = _to_input(img, (max(s, round(h * scale)), max(s, round(w * scale))), interpolation)
    out["center"] = F.center_crop(x, [s, s])
    scale = s / max(w, h)
    x = _to_input(img, (max(1, round(h * scale)), max(1, round(w * scale))), interpolation)
    pad = torch.full((3, s, s), GREY)
    top, left = (s - x.shape[1]) // 2, (s - x.shape[2]) // 2
    pad[:, top : top + x.shape[1], left : left + x.shape[2]] = x
    out["letterbox"] = pad
    scale = s / math.sqrt(w * h)  # the same number of pixels as the square, aspect kept
    out["native"] = _to_input(img, (max(32, round(h * scale)), max(32, round(w * scale))), interpolation)
    out["squash_flip"] = out["squash"].flip(-1)
    big = round(1.5 * s)
    out["large"] = _to_input(img, (big, big), interpolation)
    return out


def _pooled(model, x: torch.Tensor, mid: list) -> dict[str, np.ndarray]:
    mid.clear()
    fmap = model.model.forward_features(x.contiguous(memory_format=torch.channels_last))
    return {
        "avg": fmap.mean((2, 3)).float().numpy(),
        "max": fmap.amax((2, 3)).float().numpy(),
        "mid": mid[0].mean((2, 3)).float().numpy(),
    }


def _size(path: Path) -> tuple[int, int]:
    from PIL import Image

    with Image.open(path) as img:
        return img.size


def extract(cache: Path, nets: list[str], sets: list[str], shapes: Sequence[str] = SHAPES, chunk: int = 8) -> None:
    from torchvision.transforms import InterpolationMode

    cache.mkdir(parents=True, exist_ok=True)
    for net in nets:
        backbone = bb.get_backbone(net)
        model, _ = nw.load_feature_extractor(net, device="cpu")
        if not hasattr(model, "model") or not hasattr(model.model, "blocks"):
            print(f"{net}: not an EfficientNet-style timm model; variants skipped", flush=True)
            continue
        mid: list = []
        model.model.blocks[5].register_forward_hook(lambda _m, _i, o, mid=mid: mid.append(o))
        s = backbone.input_size
        interpolation = InterpolationMode(backbone.preprocessing.interpolation)
        for name in sets:
            target = cache / f"{net}__{name}.npz"
            if target.exists():
                print(f"{net} {name}: cached", flush=True)
                continue
            paths, _ = read_labels(name)
            # On photos that are square already (the catalog's), letterbox and native are squash.
            square = all(_size(p)[0] == _size(p)[1] for p in paths)
            computed = [x for x in shapes if not (square and x in ("letterbox", "native"))]
            feats: dict[str, list] = {}
            seconds = dict.fromkeys(computed, 0.0)
            started = time.perf_counter()
            for i in range(0, len(paths), chunk):
                t = time.perf_counter()
                variants = [
                    shapes_of(load_for_model(p, size=round(1.5 * s)), s, interpolation) for p in paths[i : i + chunk]
                ]
                decode = (time.perf_counter() - t) / len(computed)
                with torch.inference_mode():
                    for shape in computed:
                        t = time.perf_counter()
                        if shape == "native":  # sizes differ: one photo at a time
                            rows = [_pooled(model, v[shape][None], mid) for v in variants]
                            got = {k: np.concatenate([r[k] for r in rows]) for k in rows[0]}
                        else:
                            got = _pooled(model, torch.stack([v[shape] for v in variants]), mid)
                        seconds[shape] += time.perf_counter() - t + decode
                        for k, v in got.items():
                            feats.setdefault(f"{shape}.{k}", []).append(v.astype(np.float32))
                done = min(i + chunk, len(paths))
                if done % 80 < chunk:
                    print(f"{net} {name}: {done}/{len(paths)} ({time.perf_counter() - started:.0f} s)", flush=True)
            arrays = {k: np.concatenate(v) for k, v in feats.items()}
            for shape in {"letterbox", "native"} & set(shapes) - set(computed):
                seconds[shape] = seconds["squash"]
                arrays |= {f"{shape}.{k}": arrays[f"squash.{k}"] for k in ("avg", "max", "mid")}
            arrays["seconds"] = np.array([seconds.get(k, np.nan) for k in SHAPES])
            np.savez(target, **arrays)
            print(f"{net} {name}: done in {time.perf_counter() - started:.0f} s", flush=True)


# --------------------------------------------------------------------------- scoring

# On 240 everyday photos with 31 people the head's own search for C (on log-loss) swings
# from 0.001 (Lite2) to 10 (Lite0); balanced accuracy at the 0.5 threshold then measures the
# search, not the features. Everyday photos are therefore scored with one fixed C for every
# network and variant; catalog photos (stable search) with the C the app's head picks.
EVERYDAY_C = 1.0

# (name, shapes averaged, pooled parts concatenated): every variant scored.
VARIANTS = [
    ("squash", ("squash",), ("avg",)),
    ("center", ("center",), ("avg",)),
    ("letterbox", ("letterbox",), ("avg",)),
    ("native", ("native",), ("avg",)),
    ("flip", ("squash", "squash_flip"), ("avg",)),
    ("large", ("large",), ("avg",)),
    ("multiscale", ("squash", "large"), ("avg",)),
    ("squash avg+max", ("squash",), ("avg", "max")),
    ("squash avg+mid", ("squash",), ("avg", "mid")),
    ("multiscale+flip", ("squash", "squash_flip", "large"), ("avg",)),
]


def variant_features(arrays, shapes, parts) -> np.ndarray:
    return np.concatenate([np.mean([arrays[f"{s}.{p}"] for s in shapes], axis=0) for p in parts], axis=1)


def variant_cost(arrays, shapes) -> float:
    """Seconds per photo of a variant relative to squash alone (decoding shared)."""
    seconds = dict(zip(SHAPES, arrays["seconds"], strict=True))
    return sum(seconds[s] for s in shapes) / seconds["squash"]


def chosen_c(X, y) -> float:
    """The regularisation the app's head picks by its inner cross-validation (one fit)."""
    from core.learning.heads import CLASSIFIER_STEP, make_frozen_head

    clf = make_frozen_head().fit(X, y).named_steps[CLASSIFIER_STEP]
    return float(np.ravel(clf.C_ if hasattr(clf, "C_") else clf.C)[0])


def cross_validated(X, y, *, C: float, repeats: int, seed: int = 0) -> dict:
    """The Train step's procedure: split plan (20 % test), repeated stratified 5-fold CV of
    the frozen head on the rest, then the head fit on the training part. The head's
    regularisation is fixed at ``C`` (chosen once per network and data set by the head's own
    inner search on the squash features): that search costs ~17 s a fit on a busy 2-core
    machine, 26 fits per variant."""
    from core.learning.crossval import cross_validate_head
    from core.learning.heads import make_frozen_head
    from core.learning.splits import plan_split

    ids = [f"p{i:04d}" for i in range(len(y))]
    plan = plan_split(ids, y, seed=seed, n_repeats=repeats)
    result = cross_validate_head(X, y, plan=plan, ids=ids, positive="person", make_head=lambda: make_frozen_head(C=C))
    ba = result.summary["balanced_accuracy"]
    test = result.test_report.balanced_accuracy
    return {
        "mean": ba["mean"],
        "low": ba["low"],
        "high": ba["high"],
        "test": test.value,
        "test_low": test.low,
        "test_high": test.high,
        "model": result.model,
        "calibration": result.calibration,
        "threshold": result.threshold,
        "C": C,
    }


def measure_speeds(nets: list[str], rounds: int = 3, n: int = 48) -> dict[str, float]:
    """Photos/s of the app's extraction (decode + preprocess + network), on everyday photos,
    networks interleaved round after round; medians."""
    import tempfile

    from core.vision.features import extract_features
    from core.vision.store import FeatureStore

    paths, _ = read_labels("everyday")
    items = [(f"speed{i:04d}", p) for i, p in enumerate(paths[:n])]
    got: dict[str, list[float]] = {net: [] for net in nets}
    for net in nets:  # warm: weights loaded, batch size chosen
        with tempfile.TemporaryDirectory() as tmp:
            extract_features(items[:8], backbone_id=net, store=FeatureStore(Path(tmp)), device="cpu")
    for _ in range(rounds):
        for net in nets:
            with tempfile.TemporaryDirectory() as tmp:
                result = extract_features(items, backbone_id=net, store=FeatureStore(Path(tmp)), device="cpu")
            got[net].append(result.photos_per_s)
    return {net: statistics.median(v) for net, v in got.items()}


def _pct(d: dict, key: str = "mean", low: str = "low", high: str = "high") -> str:
    if d[low] is None:
        return f"{100 * d[key]:5.1f} %"
    return f"{100 * d[key]:5.1f} % ({100 * d[low]:.1f}-{100 * d[high]:.1f})"


def _print_row(row: dict) -> None:
    e, c = row["everyday"], row["catalog"]
    print(
        f"{row['backbone']:<20} {row['variant']:<17} {_pct(e):<26} {100 * e['test']:7.1f}% "
        f"{_pct(c):<26} {100 * c['test']:7.1f}% {row['flatlay_person']:>4}/{row['flatlay_n']} "
        f"{row['relative_time']:4.1f}x",
        flush=True,
    )


def person_confidence(model, calibration, X: np.ndarray) -> np.ndarray:
    """The confidence in "person" the app's frozen model states for each row of ``X``: its head's
    probability, calibrated as the app calibrates it (the threshold it ships with is on that scale)."""
    from core.learning.calibration import apply_calibration

    return apply_calibration(model.predict_proba(X), calibration)[:, list(model.classes_).index("person")]


def score_network(cache: Path, net: str, labels: dict) -> list[dict]:
    """Every variant of one network, scored; kept in the cache (JSON) for later runs."""
    from core.learning.heads import single_threaded_blas

    done = cache / f"score__{net}.json"
    if done.exists():
        rows = json.loads(done.read_text())
        for row in rows:
            _print_row(row)
        return rows
    files = {name: cache / f"{net}__{name}.npz" for name in SETS}
    if not all(f.exists() for f in files.values()):
        print(f"{net:<20} features not extracted yet (run the extract step)")
        return []
    arrays = {name: np.load(f) for name, f in files.items()}
    with single_threaded_blas():
        cs = {"everyday": EVERYDAY_C, "catalog": chosen_c(arrays["catalog"]["squash.avg"], labels["catalog"])}
    print(f"{net:<20} C: everyday {cs['everyday']:g} (fixed), catalog {cs['catalog']:g} (the head's own search)")
    flat_names = [p.name for p in read_labels("flatlay")[0]]
    rows = []
    for variant, shapes, parts in VARIANTS:
        if not all(f"{x}.avg" in arrays[name] for x in shapes for name in SETS):
            print(f"{net:<20} {variant:<17} not extracted (extract --shapes ...)")
            continue
        feats = {name: variant_features(arrays[name], shapes, parts) for name in SETS}
        with single_threaded_blas():
            everyday = cross_validated(feats["everyday"], labels["everyday"], C=cs["everyday"], repeats=5)
            catalog = cross_validated(feats["catalog"], labels["catalog"], C=cs["catalog"], repeats=3)
            model, calibration = catalog.pop("model"), catalog.pop("calibration")
            del everyday["model"], everyday["calibration"]
            p = person_confidence(model, calibration, feats["flatlay"])
        threshold = catalog["threshold"]  # the one the app's frozen model ships with
        flat = int((p >= threshold).sum())
        row = {
            "backbone": net,
            "variant": variant,
            "everyday": everyday,
            "catalog": catalog,
            "flatlay_person": flat,
            "flatlay_n": len(p),
            "flatlay_max": float(p.max()),
            "flatlay_person_at_half": int((p >= 0.5).sum()),
            "threshold": threshold,
            "flatlay_top": [(flat_names[i], round(float(p[i]), 3)) for i in np.argsort(-p)[:5]],
            "relative_time": variant_cost(arrays["everyday"], shapes),
        }
        rows.append(row)
        _print_row(row)
    done.write_text(json.dumps(rows, indent=1))
    return rows


def score(cache: Path, nets: list[str], *, write: bool) -> int:
    from core.vision import figures

    labels = {name: read_labels(name)[1] for name in SETS}
    header = (
        f"{'network':<20} {'variant':<17} {'everyday BA (95 % range)':<26} {'held-out':>8} "
        f"{'catalog BA (95 % range)':<26} {'held-out':>8} {'flat-lay':>8} {'time':>5}"
    )
    print(header)
    print("-" * len(header))
    rows = [row for net in nets for row in score_network(cache, net, labels)]
    print("\nflat-lay photos the catalog-trained head scores highest (p(person)), threshold per network:")
    for row in rows:
        if row["variant"] in ("squash", "squash avg+max", "squash avg+mid", "flip"):
            top = ", ".join(f"{n} {v:.2f}" for n, v in row["flatlay_top"][:4])
            print(f"  {row['backbone']:<20} {row['variant']:<15} t={row['threshold']:.2f}: {top}")
    if not write:  # speeds take minutes on a busy machine: measured for the stored figures only
        return 0
    speeds = measure_speeds([n for n in nets if any(r["backbone"] == n for r in rows)])
    print("\nphotos/s (decode + preprocess + network, CPU, median of 3 interleaved rounds):")
    for net, v in speeds.items():
        print(f"  {net:<20} {v:6.1f}")
    cores = os.cpu_count()
    machine = f"a shared {cores}-core {platform.machine()} Linux server (CPU only, busy), torch {torch.__version__}"
    path = figures.save_figures(rows, speeds, machine=machine)
    print(f"\nfigures written to {path}")
    return 0


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    global DATA
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("step", choices=["extract", "score"])
    parser.add_argument("--cache", type=Path, default=Path("/tmp/catalog-lens-bench"))
    parser.add_argument("--data", type=Path, default=DATA, help="the shared photos (default ../shared/data)")
    parser.add_argument("--backbones", nargs="*", default=None, help="default: every one available offline")
    parser.add_argument("--write", action="store_true", help="store the figures for the Backbone page")
    parser.add_argument("--sets", nargs="*", default=list(SETS), choices=list(SETS))
    parser.add_argument("--shapes", nargs="*", default=list(SHAPES), choices=list(SHAPES), help="extract: inputs")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = parser.parse_args(argv)
    DATA = args.data
    missing = [d for d in SETS.values() if not (DATA / d / "labels.csv").is_file()]
    if missing:
        print(f"Skipped: the shared photos are not here ({', '.join(missing)} under {DATA}).")
        return 0
    nets = args.backbones or offline_backbones()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.step == "extract":
        extract(args.cache, nets, args.sets, args.shapes)
        return 0
    return score(args.cache, nets, write=args.write)


if __name__ == "__main__":
    sys.exit(main())
