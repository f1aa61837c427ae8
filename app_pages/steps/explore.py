"""Step 4: a map of the photos and the likely label mistakes, fixed in place."""

import streamlit as st

from app_pages import ui
from core.learning import explore, runs
from core.present import charts, journey
from core.projects.state import ProjectState

st.title("4 · Explore")
st.caption("Similar photos sit close together. Odd ones out and photos in the other group's cloud deserve a look.")
ui.explain("umap", "confidence")
project = ui.require_project()
if not journey.progress(project).done["train"]:
    ui.not_ready("explore", what="This step shows your photos on a map and lists likely label mistakes.",
                 needs="train the quick model on the Train & compare step.", on="train")
    st.stop()

names = project.class_names()
with st.spinner("Drawing the map (the first one takes a few seconds)…"):
    points = explore.feature_map(project)
if points.empty:
    st.info("Not enough photos with features to draw a map yet.")
    st.stop()
frozen = runs.latest_runs(project).get("frozen")
if frozen is not None:
    ProjectState(project).mark_explored(frozen.id)

colour_by = st.radio("Colour by", ["Label", "Model's answer", "Right or wrong"], horizontal=True)
label_of = points["label"].map(lambda v: names.get(v, v) if v else "no label")
if colour_by == "Label":
    colour = label_of
elif colour_by == "Model's answer":
    colour = points["predicted"].map(lambda v: names.get(v, v) if v else "not scored")
else:
    colour = (points["predicted"] == points["label"]).map({True: "model agrees", False: "model disagrees"})
hover = [f"{charts.escape(n)}<br>label: {charts.escape(lbl)}" for n, lbl in zip(points["name"], label_of)]
event = st.plotly_chart(charts.map_figure(points[["x", "y"]].to_numpy(), list(colour), hover), width="stretch",
                        on_select="rerun", selection_mode=("points", "lasso", "box"), key="feature_map")
chosen = sorted({p["customdata"] for p in (event.selection.points if event else []) if "customdata" in p})
if chosen:
    st.write(f"**{len(chosen)} selected photo{'' if len(chosen) == 1 else 's'}**")
    sel = points.iloc[chosen[:48]]
    ui.thumb_grid(project, list(sel["sha"]), [f"{ui.plain(n)} · {ui.plain(names.get(lbl, lbl))}" for n, lbl in zip(sel["name"], sel["label"])])
else:
    st.caption("Click a point to see its photo. For a group, pick the lasso in the map's toolbar and draw around it.")

st.subheader("Likely label mistakes")
st.caption("Photos whose label the model, trained without them, finds hardest to believe. Check each one.")
issues = explore.label_issues(project)
issues = issues[issues["likely_issue"]] if not issues.empty else issues
if issues.empty:
    st.success("No photo looks mislabelled.")
for row in issues.head(12).itertuples():
    img, text, act = st.columns([1, 3, 2])
    img.image(project.thumbnail(row.id), width=120)
    text.markdown(f"**{ui.plain(row.name)}** is labelled **{ui.plain(names.get(row.given_label, row.given_label))}**; "
                  f"the model says **{ui.plain(names.get(row.suggested_label, row.suggested_label))}** ({100 * row.suggested_confidence:.0f} % sure).")
    if act.button(f"Change to {ui.plain(names.get(row.suggested_label, row.suggested_label))}", key=f"fix-{row.id}"):
        project.set_override(row.id, label=row.suggested_label)
        st.toast(f"{ui.plain(row.name)} relabelled. Train again to use the fix.")
        st.rerun()
    if act.button("Leave it out of training", key=f"drop-{row.id}"):
        project.set_override(row.id, excluded=True)
        st.rerun()

ui.next_step("explore", ready=True, hint="")
