"""Calibrated confidence and group-aware splits, measured on the shared photos.

For the shared catalog photos (product-photos, person / no person) and the everyday photos
(everyday-photos: 300 general photos, 39 with a person), with EfficientNet-Lite0 features:

1. Near-duplicates (``--near-duplicates``): cosine similarity of edited copies of a photo
   (JPEG quality 40, 60 % size, 90 % crop, mirrored, brighter) to the original, against the
   most similar *other* photo: the evidence for ``core.learning.groups.NEAR_DUPLICATE_SIMILARITY``.
2. Quick model, 5-fold outer cross-validation (every photo is held out once): the app's
   frozen head with its own inner cross-validation, threshold and calibration
   (``core.learning.crossval.cross_validate_head``) on each outer training part; the pooled
   held-out photos give the balanced accuracy (95 % bootstrap range) and the expected
   calibration error (ECE) before/after. Outer folds per photo vs group-aware (near-duplicate
   groups at the app's threshold, and at a loose 0.90 "same shoot" threshold to show what
   grouping changes when many photos are related).
3. Fine-tuned network (``--finetune``, slow on a CPU): on ``--finetune-folds`` outer folds,
   trained on the training part (85 / 15 train / validation, grouped like the app), its
   calibration fitted on the validation photos, ECE before/after on the held-out fold.

Features are cached under ``--cache`` (default /tmp/catalog-lens-bench-features).
Run:  .venv/bin/python benchmarks/bench_calibration.py [--sets product,everyday] [--finetune]
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold  # noqa: E402

from core.base.files import sha256_file  # noqa: E402
from core.learning import calibration, groups  # noqa: E402
from core.learning.crossval import cross_validate_head  # noqa: E402
from core.learning.evaluation import choose_threshold, evaluate_predictions  # noqa: E402
from core.learning.finetune_config import FinetuneConfig  # noqa: E402
from core.learning.splits import SplitPlan, plan_split  # noqa: E402
from core.vision.features import extract_features  # noqa: E402
from core.vision.store import FeatureStore  # noqa: E402

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
SETS = {"product": "product-photos", "everyday": "everyday-photos", "flatlay": "flat-lay"}
BACKBONE = "efficientnet_lite0"


def load_set(name: str, cache: Path):
    folder = SHARED / SETS[name]
    with open(folder / "labels.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    by_content: dict[str, tuple[Path, dict]] = {}  # a file listed twice, or copied, counts once (as in the app)
    for r in rows:
        by_content.setdefault(sha256_file(folder / r["file"]), (folder / r["file"], r))
    ids = list(by_content)
    paths = [path for path, _ in by_content.values()]
    rows = [row for _, row in by_content.values()]
    store = FeatureStore(cache)
    result = extract_features(list(zip(ids, paths, strict=True)), backbone_id=BACKBONE, store=store)
    # everyday-photos also marks "ambiguous" and "body_part_only" photos: its README counts them
    # as no person (39 person, 261 no person), and so does this benchmark
    y = np.array(["person" if r["label"] == "person" else "no_person" for r in rows])
    return store.load(result.key, ids), y, ids, paths


def near_duplicates(name: str, X, paths, cache: Path, n: int = 40) -> None:
    from PIL import Image, ImageOps

    rng = np.random.default_rng(0)
    edits = {
        "jpeg q40": lambda im: im,
        "60 % size": lambda im: im.resize((int(im.width * 0.6), int(im.height * 0.6))),
        "90 % crop": lambda im: im.crop((im.width // 20, im.height // 20, im.width * 19 // 20, im.height * 19 // 20)),
        "mirrored": ImageOps.mirror,
        "brighter": lambda im: Image.eval(im, lambda v: min(255, int(v * 1.15))),
    }
    folder = cache / "edited" / name
    folder.mkdir(parents=True, exist_ok=True)
    items, origin = [], []
    for i in rng.choice(len(paths), min(n, len(paths)), replace=False):
        im = Image.open(paths[i]).convert("RGB")
        for e, edit in edits.items():
            p = folder / f"{i}-{e.replace(' ', '_').replace('%', 'pct')}.jpg"
            if not p.exists():
                buf = io.BytesIO()
                edit(im).save(buf, "JPEG", quality=40 if e == "jpeg q40" else 90)
                p.write_bytes(buf.getvalue())
            items.append((f"{name}-{p.stem}", p))
            origin.append((int(i), e))
    store = FeatureStore(cache)
    r = extract_features(items, backbone_id=BACKBONE, store=store)
    E = store.load(r.key, [k for k, _ in items]).astype(np.float64)
    U = X / np.linalg.norm(X, axis=1, keepdims=True)
    EU = E / np.linalg.norm(E, axis=1, keepdims=True)
    copy_sim = np.array([EU[k] @ U[i] for k, (i, _) in enumerate(origin)])
    S = U @ U.T
    np.fill_diagonal(S, -1)
    pairs = S[np.triu_indices(len(X), 1)]
    pairs = pairs[pairs < 0.999]  # identical files are not "other photos"
    print(f"\n[{name}] near-duplicates: similarity of an edited copy to its original vs of distinct photos")
    for e in edits:
        v = copy_sim[[k for k, (_, ee) in enumerate(origin) if ee == e]]
        print(
            f"  edited copy, {e:<10} min {v.min():.3f}  5th percentile {np.quantile(v, 0.05):.3f}  median {np.median(v):.3f}"
        )
    print(
        f"  distinct photos: {len(pairs):,} pairs, 99.9th percentile {np.quantile(pairs, 0.999):.3f}, "
        f"max {pairs.max():.3f}"
    )
    for t in (0.85, 0.90, 0.92, 0.93, 0.95, 0.97):
        print(
            f"  threshold {t:.2f}: edited copies joined {100 * (copy_sim >= t).mean():5.1f} %, "
            f"distinct pairs joined {(pairs >= t).sum():4d}"
        )


def outer_plans(ids, y, grp, *, k: int = 5, seed: int = 0, n_repeats: int = 1):
    """Outer folds (each photo held out once, by group when ``grp`` has shared groups), each
    with inner cross-validation folds (by group too) on its training part, as the app plans them."""
    ids = np.asarray(ids)
    grouped = len(set(grp.tolist())) < len(grp)
    outer = (
        StratifiedGroupKFold(k, shuffle=True, random_state=seed)
        if grouped
        else StratifiedKFold(k, shuffle=True, random_state=seed)
    )
    for train, test in outer.split(ids, y, grp if grouped else None):
        k_in = int(max(2, min(5, *(len(set(grp[train][y[train] == c].tolist())) for c in set(y.tolist())))))
        folds = np.full((n_repeats, len(ids)), -1)
        for r in range(n_repeats):
            inner = (
                StratifiedGroupKFold(k_in, shuffle=True, random_state=seed + r)
                if grouped
                else StratifiedKFold(k_in, shuffle=True, random_state=seed + r)
            )
            for j, (_, held) in enumerate(inner.split(train, y[train], grp[train] if grouped else None)):
                folds[r, train[held]] = j
        yield SplitPlan(
            ids=list(ids),
            train_ids=list(ids[train]),
            val_ids=[],
            test_ids=list(ids[test]),
            cv_folds=folds.tolist(),
            n_splits=k_in,
            n_repeats=n_repeats,
            seed=seed,
            test_size=1 / k,
            val_size=0.0,
            small_data_threshold=1000,
        )


def pooled(truth, proba, thresholds, classes, positive: str = "person") -> dict:
    """Balanced accuracy (95 % range) and ECE of held-out photos pooled over folds, each at its fold's threshold."""
    truth = np.asarray(truth)
    pi = classes.index(positive)
    tagged = np.where(proba[:, pi] >= thresholds, positive, classes[1 - pi])
    onehot = np.column_stack([(tagged == c).astype(float) for c in classes])
    bal = evaluate_predictions(truth, onehot, classes=classes, positive=positive, threshold=0.5, n_boot=2000)
    conf = np.where(tagged == positive, proba[:, pi], 1 - proba[:, pi])
    return {
        "ece": calibration.calibration_error(conf, tagged == truth),
        "balanced_accuracy": bal.balanced_accuracy.to_dict(),
        "n": len(truth),
    }


def quick_model(name: str, X, y, grp, *, label: str) -> dict:
    classes, positive = sorted(set(y.tolist())), "person"
    truth, raw, cal, t_raw, t_cal, t0 = [], [], [], [], [], time.perf_counter()
    for plan in outer_plans(list(map(str, range(len(y)))), y, grp):
        cv = cross_validate_head(X, y, plan=plan, positive=positive, n_boot=0)
        truth += [y[int(i)] for i in cv.test_ids]
        raw.append(cv.raw_test_proba)
        cal.append(cv.test_proba)
        t_raw += [cv.raw_threshold] * len(cv.test_ids)
        t_cal += [cv.threshold] * len(cv.test_ids)
    out = {
        "before": pooled(truth, np.concatenate(raw), np.array(t_raw), classes),
        "after": pooled(truth, np.concatenate(cal), np.array(t_cal), classes),
    }
    ba = out["after"]["balanced_accuracy"]
    print(
        f"  {label:<46} balanced accuracy {100 * ba['value']:5.1f} % ({100 * ba['low']:.1f}-{100 * ba['high']:.1f})"
        f"   ECE before {100 * out['before']['ece']:5.1f}  after {100 * out['after']['ece']:5.1f} points"
        f"   ({time.perf_counter() - t0:.0f} s)"
    )
    return out


def finetuned(name: str, y, ids, paths, grp, *, folds: int, epochs: int, frozen_groups: int,
              batch_size: int | None = None, lr_scale: float = 1.0, seed: int = 0) -> None:
    from core.learning import finetune, finetune_loop

    classes, positive = sorted(set(y.tolist())), "person"
    sha = np.asarray(ids)
    truth, raw_all, cal_all, t_raw, t_cal = [], [], [], [], []
    label = dict(zip(sha, y, strict=True))
    path = dict(zip(sha, paths, strict=True))

    def items(part):
        return [(i, path[i], label[i]) for i in part]

    default = FinetuneConfig()
    recipe = {"frozen_groups": frozen_groups, "batch_size": batch_size,
              "lr_head": default.lr_head * lr_scale, "lr_backbone": default.lr_backbone * lr_scale}
    for n, plan in enumerate(outer_plans(list(sha), y, grp)):
        if n >= folds:
            break
        train = [i for i in plan.ids if i not in set(plan.test_ids)]
        inner = plan_split(
            train,
            [label[i] for i in train],
            groups=[int(grp[list(sha).index(i)]) for i in train],
            test_size=0.15,
            val_size=0.0,
            n_repeats=0,
        )  # "test" here = validation
        fit_ids, val_ids = inner.train_ids, inner.test_ids
        result = finetune.finetune(
            items(fit_ids),
            items(val_ids),
            backbone_id=BACKBONE,
            classes=classes,
            config=FinetuneConfig(epochs=epochs, seed=seed, **recipe),
            positive=positive,
        )
        raw = finetune_loop.predict_proba(result.model, [(i, path[i]) for i in plan.test_ids], backbone_id=BACKBONE)
        vtruth = [label[i] for i in result.val_ids]
        cal = calibration.fit_calibration(
            vtruth, result.val_proba, classes=classes, positive=positive, fitted_on="validation photos"
        )
        thr = (
            result.threshold
            if cal is None
            else choose_threshold(vtruth, cal.apply(result.val_proba)[:, classes.index(positive)], positive=positive)
        )
        truth += [label[i] for i in plan.test_ids]
        raw_all.append(raw)
        cal_all.append(calibration.apply_calibration(raw, cal))
        t_raw += [result.threshold] * len(plan.test_ids)
        t_cal += [thr] * len(plan.test_ids)
        print(
            f"    fold {n + 1}: {len(fit_ids)} train / {len(val_ids)} validation / {len(plan.test_ids)} held out, "
            f"{result.seconds:.0f} s, calibration {cal.to_dict() if cal else None}"
        )
    before = pooled(truth, np.concatenate(raw_all), np.array(t_raw), classes)
    after = pooled(truth, np.concatenate(cal_all), np.array(t_cal), classes)
    ba = after["balanced_accuracy"]
    print(
        f"  fine-tuned ({folds} outer fold{'s' if folds > 1 else ''}, {epochs} epochs), {len(truth)} held-out photos: "
        f"balanced accuracy {100 * ba['value']:.1f} % ({100 * ba['low']:.1f}-{100 * ba['high']:.1f})   "
        f"ECE before {100 * before['ece']:.1f}  after {100 * after['ece']:.1f} points"
    )
    return {"before": before, "after": after}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sets", default="product,everyday")
    parser.add_argument("--cache", type=Path, default=Path("/tmp/catalog-lens-bench-features"))
    parser.add_argument("--near-duplicates", action="store_true")
    parser.add_argument("--finetune", action="store_true", help="also the fine-tuned network (slow on a CPU)")
    parser.add_argument("--finetune-folds", type=int, default=1)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--frozen-groups", type=int, default=FinetuneConfig().frozen_groups,
                        help="fine-tuning: groups from the input that never train (default: the app's)")
    parser.add_argument("--batch-size", type=int, default=None, help="fine-tuning batch (default: the app's)")
    parser.add_argument("--finetune-seed", type=int, default=0, help="fine-tuning's random seed (same folds)")
    parser.add_argument("--lr-scale", type=float, default=1.0, help="fine-tuning learning rates times this")
    parser.add_argument("--skip-quick", action="store_true", help="only the fine-tuned network")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    if not SHARED.is_dir():
        print(f"Skipping: the shared photos are not at {SHARED} (a fresh clone has no ../shared).")
        return
    figures = {}
    for name in args.sets.split(","):
        X, y, ids, paths = load_set(name, args.cache)
        print(f"\n== {SETS[name]}: {len(y)} photos, {int((y == 'person').sum())} with a person; Lite0 features")
        if args.near_duplicates:
            near_duplicates(name, X.astype(np.float64), paths, args.cache)
        per_photo = np.arange(len(y))
        near = groups.near_duplicate_groups(X)
        loose = groups.near_duplicate_groups(X, threshold=0.90)
        print(
            f"  near-duplicate groups at {groups.NEAR_DUPLICATE_SIMILARITY}: {len(set(near.tolist()))} groups "
            f"({len(y) - len(set(near.tolist()))} photos joined); at 0.90: {len(set(loose.tolist()))} groups"
        )
        figures[name] = {}
        if not args.skip_quick:
            print("  quick model, 5-fold outer cross-validation (pooled held-out photos):")
            figures[name] = {
                "per_photo": quick_model(name, X, y, per_photo, label="split per photo"),
                "near_duplicates": quick_model(
                    name, X, y, near, label=f"group-aware (near-duplicates ≥ {groups.NEAR_DUPLICATE_SIMILARITY})"
                ),
                "same_shoot": quick_model(name, X, y, loose, label="group-aware (similar ≥ 0.90, same shoot)"),
            }
        if args.finetune:
            figures[name]["finetuned"] = finetuned(
                name, y, ids, paths, near, folds=args.finetune_folds, epochs=args.epochs,
                frozen_groups=args.frozen_groups, batch_size=args.batch_size, lr_scale=args.lr_scale,
                seed=args.finetune_seed,
            )
    if args.json:
        args.json.write_text(json.dumps(figures, indent=1))


if __name__ == "__main__":
    main()
