"""How long the statistics side takes on realistic feature shapes.

Synthetic features shaped like pooled CNN codes (EfficientNet-Lite0: 1280 dimensions,
non-negative, correlated), because real features need the extraction engine. Measures:

* UMAP: the first map in a fresh process (numba compilation) vs later maps;
* the frozen head's fit with inner cross-validation of C, with single-threaded BLAS (ours)
  and with the library default, plus held-out balanced accuracy against a fixed C=1;
* cross_validate_head with the default plan (5x5 repeated CV under 1,000 photos,
  one 5-fold pass above).

Run:  .venv/bin/python benchmarks/bench_heads.py [--quick] [--json out.json]
Timings on shared 2-core machines swing by +-40 %: compare within one run.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def features(n: int, k: int, *, d: int = 1280, seed: int = 0):
    from sklearn.datasets import make_classification

    X, y = make_classification(
        n,
        d,
        n_informative=48,
        n_redundant=96,
        n_classes=k,
        n_clusters_per_class=2,
        class_sep=2.5,
        flip_y=0.02,
        random_state=seed,
    )
    X = np.maximum(X, 0).astype(np.float32)  # ReLU-pooled codes are non-negative
    return X, np.array([f"class{c:02d}" for c in y]), [f"{seed}-{i:06d}" for i in range(n)]


def timed(fn, *args, **kwargs):
    t = time.perf_counter()
    out = fn(*args, **kwargs)
    return time.perf_counter() - t, out


def bench_umap(sizes):
    from core.learning.projection import project_2d

    rows = []
    for i, n in enumerate(sizes):
        X, _, _ = features(n, 5, seed=1)
        first, _ = timed(project_2d, X)
        again, _ = timed(project_2d, X)
        pca, _ = timed(project_2d, X, method="pca")
        rows.append({"n": n, "umap_first_s": first, "umap_again_s": again, "pca_s": pca, "cold": i == 0})
    return rows


def bench_heads(shapes, *, compare_threads: bool):
    from sklearn.base import clone
    from sklearn.metrics import balanced_accuracy_score

    from core.learning.crossval import cross_validate_head
    from core.learning.heads import make_frozen_head
    from core.learning.splits import plan_split

    rows = []
    for n, k in shapes:
        X, y, ids = features(n, k)
        half = np.arange(n) % 2 == 0
        fit_s, head = timed(make_frozen_head().fit, X[half], y[half])
        row = {"n": n, "classes": k, "fit_half_s": fit_s, "C": float(np.ravel(head[-1].C_)[0])}
        row["bal_acc_cv_C"] = balanced_accuracy_score(y[~half], head.predict(X[~half]))
        fixed = make_frozen_head(C=1.0).fit(X[half], y[half])
        row["bal_acc_C1"] = balanced_accuracy_score(y[~half], fixed.predict(X[~half]))
        if compare_threads and n <= 1000:  # the default-BLAS fit takes minutes at 5,000 under load
            from sklearn.linear_model import LogisticRegressionCV
            from sklearn.pipeline import Pipeline

            plain = clone(make_frozen_head())
            p = plain[-1].get_params()
            plain = Pipeline([("scale", plain[0]), ("logreg", LogisticRegressionCV(**p))])
            row["fit_half_default_blas_s"], _ = timed(plain.fit, X[half], y[half])
        plan = plan_split(ids, y)
        cv_s, res = timed(cross_validate_head, X, y, plan=plan)
        row |= {
            "plan": f"{plan.n_repeats}x{plan.n_splits}",
            "cv_total_s": cv_s,
            "final_fit_s": res.fit_seconds,
            "cv_bal_acc": res.summary["balanced_accuracy"]["mean"],
            "cv_low": res.summary["balanced_accuracy"]["low"],
            "cv_high": res.summary["balanced_accuracy"]["high"],
            "test_bal_acc": res.test_report.balanced_accuracy.value,
        }
        rows.append(row)
        print(f"  done {n}x1280, {k} classes", file=sys.stderr, flush=True)
    return rows


def table(rows, cols):
    def fmt(v):
        return f"{v:.3g}" if isinstance(v, float) else str(v)

    widths = [max(len(c), *(len(fmt(r.get(c, ""))) for r in rows)) for c in cols]
    lines = ["  ".join(c.rjust(w) for c, w in zip(cols, widths, strict=True))]
    lines += ["  ".join(fmt(r.get(c, "")).rjust(w) for c, w in zip(cols, widths, strict=True)) for r in rows]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="500 photos only")
    ap.add_argument("--no-thread-compare", action="store_true", help="skip the (slow) default-BLAS fit")
    ap.add_argument("--json", type=Path, help="also write the figures here")
    args = ap.parse_args()

    t0 = time.perf_counter()
    import umap  # noqa: F401  (import time is not the JIT; measure it apart)

    import_s = time.perf_counter() - t0
    umap_rows = bench_umap([500] if args.quick else [500, 5000])
    shapes = [(500, 2), (500, 10)] if args.quick else [(500, 2), (500, 10), (5000, 2), (5000, 10)]
    head_rows = bench_heads(shapes, compare_threads=not args.no_thread_compare)

    print(f"\nimport umap: {import_s:.2f} s\n")
    print("UMAP / PCA maps (first = first map in this process, includes numba compilation if cold)")
    print(table(umap_rows, ["n", "cold", "umap_first_s", "umap_again_s", "pca_s"]))
    print("\nFrozen head: fit on half the photos with inner 5-fold CV of C; balanced accuracy on the other half")
    cols = ["n", "classes", "fit_half_s", "fit_half_default_blas_s", "C", "bal_acc_cv_C", "bal_acc_C1"]
    print(table(head_rows, cols))
    print("\ncross_validate_head with the default plan (CV on the training part + final fit + test report)")
    cols = ["n", "classes", "plan", "cv_total_s", "final_fit_s", "cv_bal_acc", "cv_low", "cv_high", "test_bal_acc"]
    print(table(head_rows, cols))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"umap_import_s": import_s, "umap": umap_rows, "heads": head_rows}, indent=1))


if __name__ == "__main__":
    main()
