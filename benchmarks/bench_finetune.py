"""Fine-tuning on the shared product photos: speed on this machine and accuracy against the
frozen head on the same held-out photos.

Split: stratified 70 / 15 / 15 (train / validation / test) with core.learning.splits.plan_split.
The fine-tuned network trains on train, early-stops and chooses its threshold on
validation, and starts from a frozen head fitted on train only (LP-FT). The frozen head it
is compared with is the app's: fitted on train + validation, threshold from its
cross-validation; its features come from the model's own feature extractor. Both are
scored on the same test photos, and on 300 flat-lay phone photos without people (how
many does each call "person"?) when ../shared/data/flat-lay is there.

Run:  .venv/bin/python benchmarks/bench_finetune.py [--epochs N] [--random-head] [--batch-sweep]
      .venv/bin/python benchmarks/bench_finetune.py --compare OTHER_CHECKOUT [--repeats 2]
With ``--compare`` the default run goes as a child process from this checkout and from the
other one (an earlier commit: ``git worktree add --detach ../before main``), alternating
(other, this, this, other, ...), and prints each one's seconds per epoch, the ratio and the
held-out result of each.
Timings on shared 2-core machines swing by +-40 % (more when another job runs): the
per-epoch photos/s are the figures to compare, and only within one run.
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import core  # noqa: E402,F401  (first: sets OpenMP's wait policy before torch loads)

# isort: split
import torch  # noqa: E402

from core.inputs.images import load_for_model  # noqa: E402
from core.learning import finetune as ft  # noqa: E402
from core.learning import finetune_config as fc  # noqa: E402
from core.learning import finetune_loop as fl  # noqa: E402
from core.learning.comparison import compare_methods  # noqa: E402
from core.learning.crossval import cross_validate_head
from core.learning.evaluation import evaluate_predictions  # noqa: E402
from core.learning.heads import head_to_arrays, make_frozen_head  # noqa: E402
from core.learning.splits import plan_split  # noqa: E402
from core.vision import backbones as bb  # noqa: E402
from core.vision import networks as nw  # noqa: E402
from core.vision.device import describe_device, pick_device  # noqa: E402

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "product-photos"
FLAT_LAY = SHARED.parent / "flat-lay"  # garments on beds and rugs, no people: a domain-shift check


def frozen_features(paths: list[Path], backbone_id: str, device, batch_size: int = 16) -> tuple[np.ndarray, float]:
    """Features from the classifier model's own extractor on the evaluation transform."""
    backbone = bb.get_backbone(backbone_id)
    model = nw.build_classifier_model(backbone_id, 2).eval().to(device, memory_format=torch.channels_last)
    tf = nw.build_transform(backbone)
    out, started = [], time.perf_counter()
    with torch.inference_mode():
        for i in range(0, len(paths), batch_size):
            x = torch.stack([tf(load_for_model(p, size=backbone.preprocessing.resize_size))
                             for p in paths[i : i + batch_size]])
            out.append(model.features(x.to(device, memory_format=torch.channels_last)).float().cpu().numpy())
    return np.concatenate(out), time.perf_counter() - started


def batch_sweep(backbone_id: str, device, sizes=(4, 8, 16, 32), steps: int = 5) -> None:
    """Training-step throughput (forward + backward + AdamW, everything trainable, BatchNorm
    on its pretrained statistics as by default) by batch size."""
    model = nw.build_classifier_model(backbone_id, 2).to(device, memory_format=torch.channels_last).train()
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.eval()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    size = bb.get_backbone(backbone_id).input_size
    print("\nTraining step throughput, synthetic input, whole network trainable:")
    torch.manual_seed(0)
    for bs in sizes:
        x = torch.randn(bs, 3, size, size, device=device).to(memory_format=torch.channels_last)
        y = torch.randint(0, 2, (bs,), device=device)
        times = []
        for i in range(steps + 1):
            t = time.perf_counter()
            loss = torch.nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            if device.type == "cuda":
                torch.cuda.synchronize()
            if i:  # the first step pays one-off costs
                times.append(time.perf_counter() - t)
        med = statistics.median(times)
        print(f"  batch {bs:3d}: {bs / med:6.1f} photos/s  ({med:.2f} s/step, median of {steps})")


def print_epochs(title: str, result: ft.FinetuneResult) -> None:
    print(f"\n{title}")
    if result.start_val:
        print(f"  start (linear probe)            val loss {result.start_val['val_loss']:.4f}  "
              f"val acc {result.start_val['val_acc']:.3f}")
    print("  epoch phase  train loss  train acc  val loss  val acc       lr   seconds  photos/s")
    for h in result.history:
        mark = "*" if h["epoch"] == result.best_epoch else " "
        print(f"  {h['epoch']:>4}{mark} {h['phase']:<5}  {h['train_loss']:10.4f}  {h['train_acc']:9.3f}  "
              f"{h['val_loss']:8.4f}  {h['val_acc']:7.3f}  {h['lr']:.1e}  {h['seconds']:8.1f}  {h['photos_per_s']:8.1f}")
    print(f"  stop: {result.stop_reason}; best epoch {result.best_epoch} (-1 = the start); "
          f"{result.seconds:.0f} s in all; batch {result.batch_size}; threshold {result.threshold:.3f}")


def seconds_per_epoch(result_history: list[dict]) -> float:
    """Mean seconds of the epochs that ran (training and the validation pass after it)."""
    return statistics.mean(h["seconds"] for h in result_history) if result_history else float("nan")


def compare(other: Path, *, repeats: int, passthrough: list[str]) -> None:
    """The default run from this checkout and from ``other``, alternating; figures side by side."""
    this = Path(__file__).resolve().parents[1]
    repos = {"this checkout": this, f"compare ({other.name})": other.resolve()}
    runs: dict[str, list[dict]] = {name: [] for name in repos}
    with tempfile.TemporaryDirectory() as tmp:
        for attempt in range(repeats):
            for name, repo in (reversed(repos.items()) if attempt % 2 == 0 else repos.items()):
                out = Path(tmp) / f"{attempt}-{len(runs[name])}-{repo.name}.json"
                started = time.perf_counter()
                proc = subprocess.run([sys.executable, "benchmarks/bench_finetune.py", "--json", str(out), *passthrough],
                                      cwd=repo, capture_output=True, text=True)
                if proc.returncode:
                    sys.exit(f"{repo}: bench_finetune failed:\n{proc.stderr[-2000:]}")
                methods = json.loads(out.read_text())["methods"]
                method = methods["fine-tuned (LP-FT)"]
                runs[name].append(method)
                print(f"  {name:<28} {seconds_per_epoch(method['history']):6.1f} s/epoch  "
                      f"{len(method['history'])} epochs  test acc {method['acc']:.3f} "
                      f"[{method['low']:.3f}-{method['high']:.3f}]  flat-lay called person: fine-tuned "
                      f"{method['flat_lay_called_person']}, quick model "
                      f"{methods['frozen head (app)']['flat_lay_called_person']}  "
                      f"({time.perf_counter() - started:.0f} s in all)", flush=True)
    medians = {name: statistics.median(seconds_per_epoch(m["history"]) for m in ms) for name, ms in runs.items()}
    for name, ms in runs.items():
        print(f"median seconds per epoch, {name}: {medians[name]:.1f}; test accuracy "
              f"{', '.join(format(m['acc'], '.3f') for m in ms)}")
    before, after = medians[f"compare ({other.name})"], medians["this checkout"]
    print(f"speed-up this/compare (seconds per epoch): {before / after:.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backbone", default=bb.DEFAULT_BACKBONE_ID)
    parser.add_argument("--device", default=None)
    parser.add_argument("--epochs", type=int, default=fc.FinetuneConfig().epochs)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=None, help="default: by device")
    parser.add_argument("--train-bn-stats", action="store_true", help="update BatchNorm statistics while training")
    parser.add_argument("--frozen-groups", type=int, default=fc.FinetuneConfig().frozen_groups,
                        help="groups from the input that never train (default: the app's)")
    parser.add_argument("--random-head", action="store_true", help="also fine-tune from a random head")
    parser.add_argument("--batch-sweep", action="store_true", help="also time training steps by batch size")
    parser.add_argument("--json", type=Path, default=None, help="write the figures here")
    parser.add_argument("--compare", type=Path, help="another checkout: time the same run there too, alternating")
    parser.add_argument("--repeats", type=int, default=2, help="with --compare: runs from each checkout")
    args = parser.parse_args()
    if args.compare:
        print(f"Fine-tuning at the default settings, {args.repeats} run(s) from each checkout, alternating:")
        compare(args.compare, repeats=args.repeats, passthrough=["--epochs", str(args.epochs), "--seed", str(args.seed)])
        return

    if not (SHARED / "labels.csv").is_file():
        print(f"Skipping: the shared product photos are not at {SHARED} (a fresh clone has no ../shared).")
        return
    device = pick_device(args.device)
    print(f"Device: {describe_device(device)}; torch {torch.__version__}; backbone {args.backbone}; "
          f"threads {torch.get_num_threads()}")
    with open(SHARED / "labels.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    ids = [r["file"] for r in rows]
    label = {r["file"]: r["label"] for r in rows}
    plan = plan_split(ids, [label[i] for i in ids], seed=args.seed, test_size=0.15, val_size=0.15 / 0.85)
    classes = sorted(set(label.values()))
    print(f"Photos: {len(ids)}; train {len(plan.train_ids)}, validation {len(plan.val_ids)}, test {len(plan.test_ids)}")

    X, feat_s = frozen_features([SHARED / i for i in plan.ids], args.backbone, device)
    row = {i: k for k, i in enumerate(plan.ids)}
    y = np.array([label[i] for i in plan.ids])
    print(f"Frozen features: {len(X)} photos in {feat_s:.1f} s ({len(X) / feat_s:.0f} photos/s)")

    started = time.perf_counter()
    cv = cross_validate_head(X, y, plan=plan, n_boot=1000)
    frozen_s = time.perf_counter() - started
    test_rows = [row[i] for i in plan.test_ids]
    y_test = y[test_rows]
    frozen_head = make_frozen_head().fit(X[[row[i] for i in plan.training_ids]], y[[row[i] for i in plan.training_ids]])
    frozen_proba = frozen_head.predict_proba(X[test_rows])

    probe = make_frozen_head().fit(X[[row[i] for i in plan.train_ids]], y[[row[i] for i in plan.train_ids]])
    item = lambda i: (i, SHARED / i, label[i])  # noqa: E731
    train_items = [item(i) for i in plan.train_ids]
    val_items = [item(i) for i in plan.val_ids]
    config = fc.FinetuneConfig(epochs=args.epochs, seed=args.seed, batch_size=args.batch_size,
                               train_bn_stats=args.train_bn_stats, frozen_groups=args.frozen_groups)
    runs = {}
    result = ft.finetune(train_items, val_items, backbone_id=args.backbone, classes=classes, config=config,
                         head_arrays=head_to_arrays(probe), head_classes=list(probe.classes_), device=device)
    runs["fine-tuned (LP-FT)"] = result
    print_epochs(f"Fine-tuning from the frozen head, default config, {args.epochs} epochs:", result)
    print(f"  seconds per epoch (training and validation, mean of {len(result.history)}): "
          f"{seconds_per_epoch(result.history):.1f}")
    if args.random_head:
        result = ft.finetune(train_items, val_items, backbone_id=args.backbone, classes=classes, config=config,
                             device=device)
        runs["fine-tuned (random head)"] = result
        print_epochs(f"Fine-tuning from a random head, default config, {args.epochs} epochs:", result)

    positive = classes[1]
    print(f"\nTest photos: {len(plan.test_ids)} (accuracy, 95 % bootstrap interval)")
    print(f"  {'method':<26} {'threshold':>9}  {'acc @0.5':>8}  {'acc @thr':>8}  {'interval':>13}  {'train s':>7}  "
          f"flat-lay called {positive!r}")
    summary = {"device": describe_device(device), "n_test": len(plan.test_ids), "methods": {}}

    flat = sorted(FLAT_LAY.glob("*.jpg")) if FLAT_LAY.is_dir() else []
    flat_X = frozen_features(flat, args.backbone, device)[0] if flat else None

    def flat_lay_errors(proba, threshold) -> str:
        if not flat:
            return "-"
        return f"{int((proba[:, 1] >= threshold).sum())}/{len(flat)}"

    def show(name, proba, threshold, seconds, flat_errors):
        at_half = evaluate_predictions(y_test, proba, classes=classes, n_boot=0)
        rep = evaluate_predictions(y_test, proba, classes=classes, threshold=threshold)
        a = rep.accuracy
        print(f"  {name:<26} {threshold:9.3f}  {at_half.accuracy.value:8.3f}  {a.value:8.3f}  "
              f"[{a.low:.3f}-{a.high:.3f}]  {seconds:7.0f}  {flat_errors:>9}")
        summary["methods"][name] = {"threshold": threshold, "acc_at_0.5": at_half.accuracy.value, "acc": a.value,
                                    "low": a.low, "high": a.high, "train_seconds": seconds,
                                    "flat_lay_called_person": flat_errors}

    frozen_flat = flat_lay_errors(frozen_head.predict_proba(flat_X), cv.threshold) if flat else "-"
    show("frozen head (app)", frozen_proba, cv.threshold, frozen_s, frozen_flat)
    for name, res in runs.items():
        proba = fl.predict_proba(res.model, [(i, SHARED / i) for i in plan.test_ids], backbone_id=args.backbone,
                                 device=device)
        flat_proba = fl.predict_proba(res.model, [(p.name, p) for p in flat], backbone_id=args.backbone,
                                      device=device) if flat else None
        show(name, proba, res.threshold, res.seconds, flat_lay_errors(flat_proba, res.threshold) if flat else "-")
        summary["methods"][name]["history"] = res.history
        summary["methods"][name]["best_epoch"] = res.best_epoch
        cmp = compare_methods(y_test, frozen_proba, proba, classes=classes, threshold_a=cv.threshold,
                              threshold_b=res.threshold, cost_a_seconds=frozen_s, cost_b_seconds=res.seconds)
        print(f"    vs frozen: only frozen right {cmp.only_a_right}, only fine-tuned right {cmp.only_b_right}, "
              f"McNemar p = {cmp.p_value:.2f}: {cmp.verdict}")

    if args.batch_sweep:
        batch_sweep(args.backbone, device)
    if args.json:
        args.json.write_text(json.dumps(summary, indent=1, default=float))


if __name__ == "__main__":
    main()
