"""Home: what the app does and where this project is in the journey."""

import streamlit as st

from app_pages import ui
from core.present import journey

st.title("Catalog Lens")
st.markdown(
    "Catalog Lens learns to tag your product photos — for example *“is a person in this "
    "photo?”* — from a few dozen examples you have already labelled.  \n"
    "It reuses a network that has seen millions of photos, so training takes seconds, "
    "and shows you honestly how often it is right.  \n"
    "Then it tags your whole catalog export, gives it back as a spreadsheet with the doubtful "
    "photos flagged for a quick look, and writes a one-page report for management."
)

project = ui.current_project()
progress = journey.progress(project)
if project is None:
    st.info("Start by creating a project in the sidebar: **New project** ▸ give it a name ▸ **Create project**.")
    st.stop()

st.subheader(f"Project: {ui.plain(project.name)}")
cols = st.columns(3)
cols[0].metric("Photos", progress.photos)
cols[1].metric("Labelled for training", progress.labelled)
cols[2].metric("Classes", len(progress.classes))

steps = {
    "data": "Upload photos and your label sheet; fix what did not match.",
    "backbone": "Pick a pretrained network and let it describe every photo.",
    "train": "Train two models, compare them honestly, keep the better one.",
    "explore": "See your photos on a map; find and fix likely label mistakes.",
    "tag": "Tag your whole catalog export and download it.",
    "report": "One page for management: what was done and how well it works.",
}
for step, text in steps.items():
    mark = ":material/check_circle:" if progress.done[step] else (":material/arrow_circle_right:" if step == progress.next_step else ":material/radio_button_unchecked:")
    left, right = st.columns([4, 1])
    left.markdown(f"{mark} **{ui.STEP_TITLES[step]}** — {text}")
    if step == progress.next_step and ui.page(step):
        right.page_link(ui.page(step), label="Go", icon=":material/arrow_forward:")
