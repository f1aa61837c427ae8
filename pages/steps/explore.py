"""Step 4: a map of the photos and likely label mistakes."""

import streamlit as st

from pages import ui

st.title("4 · Explore")
ui.require_project()
ui.explain("umap")
ui.not_ready(
    "explore",
    what="This step will show your photos on a map where similar photos sit together, and list likely label mistakes.",
    needs="train a model on the Train & compare step.",
)
