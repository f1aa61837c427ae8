"""Drawing one trained model's results (Train & compare page)."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from core import charts, training
from core.workspace import Project
from pages.ui import thumb_grid

TITLES = {"frozen": "Quick model (frozen backbone)", "finetuned": "Fine-tuned network"}


def run_panel(project: Project, run: training.RunRecord, names: dict[str, str]) -> None:
    """Headline with its range, report table, confusion matrix, threshold, mistakes, download."""
    report = run.test_report
    st.subheader(TITLES[run.kind])
    acc = report["balanced_accuracy"]
    st.metric("Balanced accuracy on held-out photos", f"{100 * acc['value']:.1f} %",
              help="The average of the share found in each class, so a rare class counts as much as a common one.")
    st.caption(f"95 % range {100 * acc['low']:.1f} – {100 * acc['high']:.1f} % on {report['n']} photos. {run.headline}")
    for warning in report.get("warnings", []):
        st.warning(warning)
    rep = report["report"]
    table = pd.DataFrame(rep["data"], index=rep["index"], columns=rep["columns"]).rename(index=names)
    st.dataframe(table.style.format({c: "{:.0f}" if c == "support" else "{:.2f}" for c in table.columns}), width="stretch")
    st.plotly_chart(charts.confusion_figure(report["confusion"], run.classes, names=names), width="stretch",
                    key=f"cm-{run.kind}")
    if run.positive:
        _threshold(project, run, names)
    wrong = training.test_predictions(project, run)
    wrong = wrong[wrong["label"] != wrong["predicted"]]
    with st.expander(f"Photos it got wrong ({len(wrong)})", expanded=0 < len(wrong) <= 8):
        captions = [f"{r.name}: {names.get(r.label, r.label)} → {names.get(r.predicted, r.predicted)} "
                    f"({100 * r.confidence:.0f} %)" for r in wrong.itertuples()]
        thumb_grid(project, list(wrong["sha"]), captions, per_row=4)
    with open(run.bundle_path, "rb") as fh:
        st.download_button("Download this model", fh.read(), file_name=f"{project.slug}-{run.kind}-{run.id}.zip",
                           mime="application/zip", key=f"dl-{run.kind}")


def _threshold(project: Project, run: training.RunRecord, names: dict[str, str]) -> None:
    pos = names.get(run.positive, run.positive)
    with st.expander("How sure must the model be to tag a photo?"):
        current = training.chosen_threshold(project, run) or 0.5
        value = st.slider(f"Tag “{pos}” from this confidence", 0.05, 0.95, float(round(current, 2)), 0.01,
                          key=f"thr-{run.kind}")
        effect = training.threshold_effect(project, run, value)
        st.write(f"At this setting, on the {effect['n']} held-out photos: **{effect['missed']} of "
                 f"{effect['n_positive']}** photos with “{pos}” are missed and **{effect['flagged']} of "
                 f"{effect['n_negative']}** photos without it are wrongly tagged.")
        st.caption(f"The model's own setting ({100 * (run.threshold or 0.5):.0f} %, chosen without the held-out "
                   f"photos) misses {effect['base_missed']} and wrongly tags {effect['base_flagged']}.")
        if abs(value - current) > 1e-9 and st.button("Use this setting for tagging", key=f"use-thr-{run.kind}"):
            training.set_threshold(project, run.kind, value)
            st.rerun()
        for curve in ("roc", "pr"):
            fig = charts.curves_figure(run.test_report, kind=curve)
            if fig is not None:
                st.plotly_chart(fig, width="stretch", key=f"{curve}-{run.kind}")
