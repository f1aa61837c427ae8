"""Step 3: train a frozen-backbone classifier and a fine-tuned network, compare them honestly."""

import streamlit as st

from app_pages import ui
from app_pages.ui import results
from core import tasks
from core.learning import extraction, groups, models, runs, training
from core.present import charts, journey
from core.projects import jobs
from core.projects.state import ProjectState

st.title("3 · Train & compare")
st.caption("Two ways to learn your label, scored on the same photos the models never saw while learning.")
ui.explain("frozen", "fine-tuning", "precision", "recall", "cross-validation")
project = ui.require_project()
progress = journey.progress(project)
backbone = ProjectState(project).backbone
if not progress.done["backbone"] or not backbone or not extraction.status(project, backbone).complete:
    ui.not_ready("train", what="This step trains two models on your labelled photos and compares them.",
                 needs="extract the features of your photos on the Backbone step.", on="backbone")
    st.stop()

names = project.class_names()
left, right = st.columns(2)
with left:
    st.subheader("Quick model")
    st.caption("A small classifier on the backbone's features. Seconds. **Recommended first.**  \n"
               + training.what_is_learned(backbone, "frozen", len(progress.classes)))
    if st.button("Train the quick model", type="primary", key="train_frozen"):
        tasks.submit(project, "train-frozen", {"backbone": backbone})
        st.rerun()
    ui.job_panel(project, "train-frozen", noun="steps")
with right:
    st.subheader("Fine-tuned network")
    st.caption("Also adjusts the backbone itself to your photos. Minutes on a laptop; worth it when the quick model "
               "is not good enough.  \n" + training.what_is_learned(backbone, "finetuned", len(progress.classes)))
    latest = runs.latest_runs(project)
    length = results.finetune_length(project)
    if st.button("Fine-tune the network", key="train_finetune", disabled="frozen" not in latest,
                 help="Starts from the quick model, so train that first."):
        tasks.submit(project, "train-finetune", {"backbone": backbone, "length": length})
        st.rerun()
    job = ui.job_panel(project, "train-finetune", noun="steps")
    if job and job.active and (history := jobs.events(project, job.id)):
        st.plotly_chart(charts.history_figure(history), width="stretch", key="live-history")

latest = runs.latest_runs(project)
if not latest:
    st.info("Press **Train the quick model** to see how well your label can be learned.")
    st.stop()

changed = runs.labels_changed(project, latest.get("frozen") or next(iter(latest.values())))
if changed:
    st.warning(ui.plain(changed), icon=":material/update:")
st.caption(ui.plain(groups.split_sentence((latest.get("frozen") or next(iter(latest.values()))).extra.get("split"))))
comparison = training.compare(project, names=("Quick model", "Fine-tuned network"))
if comparison is not None:
    (st.success if comparison.better else st.info)(f"**Verdict:** {ui.plain(comparison.verdict)}")

cols = st.columns(len(latest))
for col, kind in zip(cols, [k for k in ("frozen", "finetuned") if k in latest]):
    with col:
        results.run_panel(project, latest[kind], names)

st.subheader("Model to use for tagging")
available = models.list_models(project)
chosen = models.tagging_model(project)
ids = [m["id"] for m in available]
labels = {m["id"]: f"{results.TITLES.get(m['kind'], m['kind'])}" + (" · imported" if m["source"] != "trained" else "")
          + f" ({m['id']})" for m in available}
pick = st.radio("Model to use for tagging", ids, index=ids.index(chosen["id"]), format_func=labels.get,
                label_visibility="collapsed")
if pick != chosen["id"]:
    models.choose_tagging_model(project, pick)
results.try_a_photo(project, available)
results.import_model(project)

ui.next_step("train", ready=True, hint="")
