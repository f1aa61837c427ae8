"""Step 2: choose a backbone and extract features."""

import streamlit as st

from pages import ui

st.title("2 · Backbone")
ui.require_project()
ui.explain("backbone", "features")
ui.not_ready("backbone", what="This step turns every photo into features with a pretrained network.",
             needs="upload photos and a label sheet on the Data step.")
