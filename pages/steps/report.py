"""Step 6: the management report."""

import streamlit as st

from pages import ui

st.title("6 · Report")
ui.require_project()
ui.not_ready(
    "report",
    what="This step will write a one-page summary for management that you can download and print.",
    needs="train a model, then tag your catalog.",
)
