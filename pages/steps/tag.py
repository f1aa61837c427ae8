"""Step 5: tag a whole catalog export."""

import streamlit as st

from pages import ui

st.title("5 · Tag catalog")
ui.require_project()
ui.not_ready(
    "tag",
    what="This step will run your model over every photo of a catalog export and give the sheet back with the tags added.",
    needs="train a model on the Train & compare step.",
)
