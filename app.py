"""Catalog Lens: teach the computer to tag your product photos.

Run with ``streamlit run app.py``. This file declares the journey and draws the sidebar;
each step is a thin script in ``app_pages/steps/`` over the ``core`` package.
"""

from __future__ import annotations

import threading
from pathlib import Path

import streamlit as st

from app_pages import ui
from core.base.problems import InputError
from core.present import journey
from core.projects import workspace

ASSETS = Path(__file__).parent / "assets"

st.set_page_config(
    page_title="Catalog Lens",
    page_icon=str(ASSETS / "logo.png") if (ASSETS / "logo.png").exists() else "🔍",
    layout="wide",
)


@st.cache_resource(show_spinner=False)
def _device_badge() -> str:
    from core.vision.device import describe_device, pick_device

    return describe_device(pick_device())


# The picker's next value, set before it is drawn: a value dropped instead (session_state.pop)
# lets the browser keep showing the old project until a reload.
_PICK = "_project_picker_next"


def _project_picker(project: workspace.Project | None) -> None:
    projects = workspace.list_projects()
    st.sidebar.subheader("Project")
    if _PICK in st.session_state:  # a project was just created or deleted: the picker shows it
        st.session_state["project_picker"] = st.session_state.pop(_PICK)
        st.session_state["new_project_name"] = ""
    if projects:
        slugs = [p.slug for p in projects]
        names = {p.slug: p.name for p in projects}
        index = slugs.index(project.slug) if project and project.slug in slugs else None
        chosen = st.sidebar.selectbox(
            "Open project", slugs, index=index, format_func=names.get,
            placeholder="Choose a project", label_visibility="collapsed", key="project_picker",
        )
        if chosen and (project is None or chosen != project.slug):
            ui.set_current_project(chosen)
            st.rerun()
    with st.sidebar.expander("New project", expanded=not projects):
        name = st.text_input("Name", placeholder="e.g. Person in photo", key="new_project_name")
        if st.button("Create project", type="primary", key="create_project"):
            try:
                created = workspace.create_project(name)
            except InputError as exc:
                st.error(str(exc))
            else:
                ui.set_current_project(created.slug)
                st.session_state[_PICK] = created.slug
                st.rerun()
    if project is not None:
        with st.sidebar.expander("Manage project"):
            new_name = st.text_input("Rename to", value=project.name, key=f"rename-{project.slug}")
            if st.button("Rename", key="rename") and new_name != project.name:
                try:
                    project.rename(new_name)
                    st.rerun()
                except InputError as exc:
                    st.error(str(exc))
            sure = st.checkbox(f"Yes, delete '{ui.plain(project.name)}' and all its photos", key=f"sure-{project.slug}")
            if st.button("Delete project", disabled=not sure, key="delete"):
                workspace.delete_project(project.slug)
                ui.set_current_project(None)
                st.session_state[_PICK] = None
                st.rerun()


@st.cache_resource(show_spinner=False)
def _warm_up_umap() -> threading.Thread:
    """UMAP's first fit in a process costs seconds of compilation: pay it once, in the background."""
    from core.learning.projection import warm_up_umap

    thread = threading.Thread(target=warm_up_umap, name="umap-warm-up", daemon=True)
    thread.start()
    return thread


_warm_up_umap()
project = ui.current_project()
progress = journey.progress(project)


def _title(step: str) -> str:
    return ui.STEP_TITLES[step] + ("  ✓" if progress.done.get(step) else "")


pages = {
    "home": st.Page("app_pages/steps/home.py", title="Home", icon=":material/home:", default=True),
    "data": st.Page("app_pages/steps/data.py", title=_title("data"), url_path="data"),
    "backbone": st.Page("app_pages/steps/backbone.py", title=_title("backbone"), url_path="backbone"),
    "train": st.Page("app_pages/steps/train.py", title=_title("train"), url_path="train"),
    "explore": st.Page("app_pages/steps/explore.py", title=_title("explore"), url_path="explore"),
    "tag": st.Page("app_pages/steps/tag.py", title=_title("tag"), url_path="tag"),
    "report": st.Page("app_pages/steps/report.py", title=_title("report"), url_path="report"),
}
ui.register_pages(pages)
nav = st.navigation({"": [pages["home"]], "Your journey": [pages[s] for s in journey.STEPS]})
# Sidebar widgets come after st.navigation: widgets drawn before it lose their values on rerun.
_project_picker(project)

if (ASSETS / "logo.png").exists():
    st.logo(str(ASSETS / "logo.png"), size="large")
st.sidebar.divider()
st.sidebar.caption(f"Computing on: **{_device_badge()}**")
nav.run()
