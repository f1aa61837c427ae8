"""Step 3: train a frozen-backbone classifier and a fine-tuned network, compare them honestly."""

import pandas as pd
import streamlit as st

from core import charts, extraction, jobs, journey, training
from pages import ui

st.title("3 · Train & compare")
st.caption("Two ways to learn your label, scored on the same photos the models never saw while learning.")
ui.explain("frozen", "fine-tuning", "precision", "recall")
project = ui.require_project()
progress = journey.progress(project)
backbone = project.get_meta("backbone")
if not progress.done["backbone"] or not backbone or not extraction.status(project, backbone).complete:
    ui.not_ready("train", what="This step trains two models on your labelled photos and compares them.",
                 needs="extract the features of your photos on the Backbone step.")
    st.stop()

names = project.class_names()
left, right = st.columns(2)
with left:
    st.subheader("Quick model")
    st.caption("A small classifier on the backbone's features. Seconds. **Recommended first.**")
    if st.button("Train the quick model", type="primary", key="train_frozen"):
        jobs.submit(project, "train-frozen", {"backbone": backbone})
        st.rerun()
    ui.job_panel(project, "train-frozen", noun="steps")
with right:
    st.subheader("Fine-tuned network")
    st.caption("Also adjusts the backbone itself to your photos. Minutes on a laptop; worth it when the quick model is not good enough.")
    runs = training.latest_runs(project)
    if st.button("Fine-tune the network", key="train_finetune", disabled="frozen" not in runs,
                 help="Starts from the quick model, so train that first."):
        jobs.submit(project, "train-finetune", {"backbone": backbone})
        st.rerun()
    job = ui.job_panel(project, "train-finetune", noun="epochs")
    if job and job.active and (history := jobs.events(project, job.id)):
        st.plotly_chart(charts.history_figure(history), width="stretch", key="live-history")

runs = training.latest_runs(project)
if not runs:
    st.info("Press **Train the quick model** to see how well your label can be learned.")
    st.stop()

comparison = training.compare(project)
if comparison is not None:
    (st.success if comparison.better else st.info)(f"**Verdict:** {comparison.verdict}")

cols = st.columns(len(runs))
titles = {"frozen": "Quick model (frozen backbone)", "finetuned": "Fine-tuned network"}
for col, kind in zip(cols, [k for k in ("frozen", "finetuned") if k in runs]):
    run = runs[kind]
    report = run.test_report
    with col:
        st.subheader(titles[kind])
        acc = report["balanced_accuracy"]
        st.metric("Balanced accuracy on held-out photos", f"{100 * acc['value']:.1f} %",
                  help="The average of the share found in each class, so a rare class counts as much as a common one.")
        st.caption(f"95 % range {100 * acc['low']:.1f} – {100 * acc['high']:.1f} % on {report['n']} photos. {run.headline}")
        for warning in report.get("warnings", []):
            st.warning(warning)
        rep = report["report"]
        table = pd.DataFrame(rep["data"], index=rep["index"], columns=rep["columns"]).rename(index=names)
        st.dataframe(table.style.format({c: "{:.0f}" if c == "support" else "{:.2f}" for c in table.columns}),
                     width="stretch")
        st.plotly_chart(charts.confusion_figure(report["confusion"], run.classes, names=names), width="stretch",
                        key=f"cm-{kind}")
        if run.positive:
            with st.expander("Curves and decision threshold"):
                st.caption(f"A photo is tagged **{names.get(run.positive, run.positive)}** when the model is at least "
                           f"{100 * (run.threshold or 0.5):.0f} % sure. The curves show the trade-off between finding "
                           "every tagged photo and tagging only the right ones.")
                for curve in ("roc", "pr"):
                    fig = charts.curves_figure(report, kind=curve)
                    if fig is not None:
                        st.plotly_chart(fig, width="stretch", key=f"{curve}-{kind}")
        wrong = training.test_predictions(project, run)
        wrong = wrong[wrong["label"] != wrong["predicted"]]
        with st.expander(f"Photos it got wrong ({len(wrong)})", expanded=0 < len(wrong) <= 8):
            captions = [f"{r.name}: {names.get(r.label, r.label)} → {names.get(r.predicted, r.predicted)} "
                        f"({100 * r.confidence:.0f} %)" for r in wrong.itertuples()]
            ui.thumb_grid(project, list(wrong["sha"]), captions, per_row=4)
        with open(run.bundle_path, "rb") as fh:
            st.download_button("Download this model", fh.read(), file_name=f"{project.slug}-{kind}-{run.id}.zip",
                               mime="application/zip", key=f"dl-{kind}")

ui.next_step("train", ready=True, hint="")
