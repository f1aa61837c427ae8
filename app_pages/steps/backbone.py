"""Step 2: choose a pretrained network and turn every photo into features (cached)."""

import tempfile
from pathlib import Path

import pandas as pd
import streamlit as st

from app_pages import ui
from core import tasks
from core.learning import extraction
from core.present import journey
from core.projects.state import ProjectState
from core.vision import backbones, figures, weights

st.title("2 · Backbone")
st.caption("Pick the network that will describe your photos. The recommended one is a good start everywhere.")
ui.explain("backbone", "features")
project = ui.require_project()
if not journey.progress(project).done["data"]:
    ui.not_ready("backbone", what="This step turns every photo into features with a pretrained network.",
                 needs="upload photos and a label sheet with at least two classes (3 photos each) on the Data step.", on="data")
    st.stop()

entries = backbones.list_backbones()
device = st.session_state.get("device_choice", "auto")
state = ProjectState(project)
last = state.last_extraction
rows, ready = [], {}
for b in entries:
    status = weights.weights_status(b)
    ready[b.id] = ("works offline" if b.offline else "ready, downloaded" if status.available
                   else f"needs a {status.size_mb:.0f} MB download")
    speed = extraction.known_speed(b.id, device=None if device == "auto" else device)
    if not speed and last.get("backbone") == b.id and last.get("photos_per_s"):
        speed = last["photos_per_s"]  # this project's last extraction, photo decoding included
    rows.append({  # what decides first on the left; the long description last, so nothing needed is off-screen
        "Network": b.name + ("  ★ recommended" if b.id == backbones.DEFAULT_BACKBONE_ID else ""),
        "Ready to use": "yes (works offline)" if b.offline else ("yes" if status.available else f"downloads {status.size_mb:.0f} MB"),
        "Speed here": f"{speed:.0f} photos/s" if speed else "not measured",
        "ImageNet accuracy": f"{b.imagenet_top1:.1f} %",
        "Size": f"{b.params_features / 1e6:.1f} M numbers",
        "Good for": b.good_for,
    })
st.dataframe(pd.DataFrame(rows), hide_index=True, width="stretch",
             column_config={"Network": st.column_config.TextColumn(width=230),
                            "Good for": st.column_config.TextColumn(width="large")})
with st.expander("What do these columns mean?"):
    st.markdown("**ImageNet accuracy**: how often the network named the right object among 1,000 kinds in a standard test; "
                "higher usually means better features.  \n**Size**: how many learned numbers it has; bigger is slower.  \n"
                "**Speed here**: photos per second on this computer.")
measured = figures.figures_table()
if measured is not None:
    st.subheader("How well the offline networks find people (measured)")
    st.dataframe(measured, hide_index=True, width="stretch")
    st.caption(figures.figures_note())
if st.button("Measure speeds on this computer", help="Times each network on this machine (about a minute)."):
    tasks.submit(project, "speeds", {"device": None if device == "auto" else device})
    st.rerun()
ui.job_panel(project, "speeds", noun="networks")

ids = [b.id for b in entries]
names = {b.id: b.name + (" (recommended)" if b.id == backbones.DEFAULT_BACKBONE_ID else "") + f" · {ready[b.id]}"
         for b in entries}
current = state.backbone or backbones.DEFAULT_BACKBONE_ID
chosen = st.selectbox("Network to use", ids, index=ids.index(current) if current in ids else 0, format_func=names.get)
status = weights.weights_status(chosen)
if not status.available:
    st.warning(status.message)
    with st.expander("Import a weights file", expanded=True):
        upload = st.file_uploader("Weights file (.pth or .safetensors)", type=["pth", "pt", "safetensors", "bin"],
                                  key=ui.upload_key("weights"))
        if upload is not None:
            with tempfile.TemporaryDirectory() as tmp:
                path = Path(tmp) / upload.name
                path.write_bytes(upload.getvalue())
                try:
                    weights.import_weights(chosen, path)
                except ValueError as exc:
                    ui.file_error(upload.name, exc)
                else:
                    ui.reset_upload("weights")
                    st.rerun()

with st.expander("Advanced: where to compute"):
    st.selectbox("Device", ["auto", "cpu", "cuda", "mps"], key="device_choice",
                 help="'auto' uses an NVIDIA GPU if there is one, else an Apple GPU, else the processor.")

status_now = extraction.status(project, chosen)
job = ui.job_panel(project, "extract", where={"backbone": chosen})
running = job is not None and job.active
if status_now.complete:
    info = last
    detail = ""
    if info.get("backbone") == chosen and info.get("computed"):
        detail = f" (last run: {info['computed']} photos in {info['seconds']:.0f} s on {info['device']}, {info['photos_per_s']:.0f} photos/s)"
    st.success(f"Features are ready for all {status_now.ready} photos{detail}.")
    if status_now.failed:
        st.warning(f"{status_now.failed} photos could not be read; they are listed under Problems on the Data step.")
    if state.backbone != chosen:  # features already there for this network: it is the one in use now
        state.set_backbone(chosen)
        st.rerun()
elif not running:
    todo = status_now.photos - status_now.ready - status_now.failed
    label = "Extract features" if status_now.ready == 0 else f"Extract features for the {todo} new photos"
    if st.button(label, type="primary", disabled=not status.available):
        tasks.submit(project, "extract", {"backbone": chosen, "device": None if device == "auto" else device})
        st.rerun()
    if status_now.ready:
        st.caption(f"{status_now.ready} of {status_now.photos} photos already have features; only the rest are computed.")

ui.next_step("backbone", ready=status_now.complete, hint="it opens once the features are extracted.")
