"""Which photos does the "unlike the training photos" flag send to review? Measured on the shared photos.

The app's quick model (EfficientNet-Lite0 features, the frozen head with its own
cross-validation, threshold and calibration: ``core.learning.crossval.cross_validate_head``)
is trained on the training part of the 480 catalog photos (the app's split plan, one per
``--seeds``), its novelty check fitted as the Train step fits it
(``core.learning.novelty.fit_novelty``: the training photos and their classes, limits
calibrated on the held-out part). Printed per seed:

- held-out catalog photos flagged (in-domain: the price of the check, about 1 in 20 by design);
- flat-lay phone photos (300 garments on beds and rugs, never trained on) called "person", and
  how many of those calls each check leaves unflagged: the first check alone (distance to the
  training photos) and with the class-conditional one (distance to those of the class called).

Features are the app's own extraction, cached under ``--cache`` (default
/tmp/catalog-lens-bench-features). Skips with a message when the shared photos are absent.
Run:  .venv/bin/python benchmarks/bench_novelty.py [--seeds 0 1 2 3]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench_calibration import SETS, SHARED, load_set  # noqa: E402
from core.learning.calibration import apply_calibration  # noqa: E402
from core.learning.crossval import cross_validate_head  # noqa: E402
from core.learning.evaluation import predict_labels  # noqa: E402
from core.learning.heads import single_threaded_blas  # noqa: E402
from core.learning.novelty import fit_novelty  # noqa: E402
from core.learning.splits import plan_split  # noqa: E402


def measure(seed: int, catalog: tuple, flat: np.ndarray) -> dict:
    X, y, ids = catalog
    plan = plan_split(ids, y, seed=seed)
    with single_threaded_blas():
        cv = cross_validate_head(X, y, plan=plan, ids=ids, positive="person")
    row = {sha: i for i, sha in enumerate(ids)}
    train = [row[i] for i in plan.train_ids + plan.val_ids]
    test = [row[i] for i in plan.test_ids]
    classes = list(cv.classes)
    both = fit_novelty(X[train], X[test], y_train=y[train], y_held_out=y[test], classes=classes, seed=seed)
    first = fit_novelty(X[train], X[test], seed=seed)

    def called(features):
        proba = apply_calibration(cv.model.predict_proba(features), cv.calibration)
        labels = predict_labels(proba, classes=classes, positive="person", threshold=cv.threshold)
        return np.asarray([classes.index(str(label)) for label in labels])

    held_out = X[test]
    flat_called = called(flat)
    person = flat_called == classes.index("person")
    flat_flags = (first.unlike(flat), both.unlike(flat, flat_called))  # first check alone, both checks
    return {
        "held_out": len(test),
        "held_out_flagged": (int(first.unlike(held_out).sum()), int(both.unlike(held_out, called(held_out)).sum())),
        "flat": len(flat),
        "flat_person": int(person.sum()),
        "flat_flagged": tuple(int(f.sum()) for f in flat_flags),
        "person_unflagged": tuple(int((person & ~f).sum()) for f in flat_flags),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="*", default=[0, 1, 2, 3])
    parser.add_argument("--cache", type=Path, default=Path("/tmp/catalog-lens-bench-features"))
    args = parser.parse_args(argv)
    missing = [SETS[n] for n in ("product", "flatlay") if not (SHARED / SETS[n] / "labels.csv").is_file()]
    if missing:
        print(f"Skipped: the shared photos are not here ({', '.join(missing)} under {SHARED}).")
        return 0
    X, y, ids, _ = load_set("product", args.cache)
    flat, _, _, _ = load_set("flatlay", args.cache)
    print("seed | held-out catalog flagged: first check / both | flat-lay called person | "
          "flat-lay flagged: first / both | person calls left unflagged: first / both")
    for seed in args.seeds:
        m = measure(seed, (X, y, ids), flat)
        print(f"{seed:>4} | {m['held_out_flagged'][0]:>3} / {m['held_out_flagged'][1]:<3} of {m['held_out']:<4} | "
              f"{m['flat_person']:>3} of {m['flat']:<5} | {m['flat_flagged'][0]:>3} / {m['flat_flagged'][1]:<3} | "
              f"{m['person_unflagged'][0]:>3} / {m['person_unflagged'][1]}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
