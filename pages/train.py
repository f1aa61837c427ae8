"""Step 3: train a frozen-backbone classifier and a fine-tuned network, compare them."""

import streamlit as st

from pages import ui

st.title("3 · Train & compare")
ui.require_project()
ui.explain("frozen", "fine-tuning")
ui.not_ready(
    "train",
    what="This step will train two models on your labelled photos and compare them on the same held-out photos.",
    needs="extract the features of your photos on the Backbone step.",
)
