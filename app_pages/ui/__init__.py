"""Shared page helpers: the current project, links between steps, job progress panels.

Only drawing and session plumbing lives here; the work is in ``core``.
"""

from __future__ import annotations

import re
import time

import streamlit as st

from core.base.problems import InputError
from core.present import journey
from core.projects import jobs, workspace

STEP_TITLES = {
    "home": "Home",
    "data": "1 · Data",
    "backbone": "2 · Backbone",
    "train": "3 · Train & compare",
    "explore": "4 · Explore",
    "tag": "5 · Tag catalog",
    "report": "6 · Report",
}

# One line for every technical word, shown where the word appears.
GLOSSARY = {
    "backbone": "A network already trained on millions of everyday photos; we reuse what it learned.",
    "features": "The list of numbers a backbone computes for each photo, describing what it sees.",
    "fine-tuning": "Training the backbone itself a little on your photos, slower but sometimes more accurate.",
    "frozen": "The backbone is left unchanged; only a small classifier learns from its features (seconds).",
    "umap": "A map that places similar photos close together, so groups and odd ones out are easy to see.",
    "precision": "Of the photos the model tagged with a label, the share that really have it.",
    "recall": "Of the photos that really have a label, the share the model found.",
    "confidence": "How sure the model is of its answer, from 0 % to 100 %.",
    "cross-validation": "Training several times, each time testing on a different part of the photos, so every "
                        "photo is tested once by a model that never saw it.",
}

_PROJECT_KEY = "project_slug"
_PAGES_KEY = "_pages"
_MARKDOWN_SIGNS = re.compile(r"([\\`*_\[\]<>#|~$&:])")  # links, images, HTML, emphasis, code, tables, math, :icons:
_BLOCK_START = re.compile(r"^(\d+)([.)])|^([-+=])")  # a list or heading underline when the text starts a block
_AUTOLINK = re.compile(r"(?i)(https?|ftp|mailto|www)(?=\\?[:.])|(?=@)")  # where a bare address or email begins
_WORD_JOINER = "\u2060"  # invisible: breaks the address so no link is made, the text reads the same


def plain(value: object) -> str:
    """User text (class, project, file, column and catalog values, and core's sentences quoting
    them) to put inside a page's markdown so it shows as the very same text, with nothing live:
    the signs of links, images, HTML, emphasis, code, tables, math and ``:icons:`` are
    backslash-escaped (CommonMark's own way), and an invisible word joiner splits bare
    addresses and e-mails, which the page's renderer would otherwise turn into links even
    when escaped. Line breaks become spaces."""
    text = _MARKDOWN_SIGNS.sub(r"\\\1", " ".join(str(value).split()))
    text = _BLOCK_START.sub(lambda m: f"{m[1]}\\{m[2]}" if m[1] else f"\\{m[3]}", text)
    return _AUTOLINK.sub(lambda m: (m[1] or "") + _WORD_JOINER, text)


def file_error(filename: str, exc: BaseException) -> None:
    """Say why an uploaded file was refused: core's sentence, after the file's name unless the
    sentence already names it (the sheet reader's do: "'labels.csv' is a Photoshop file...")."""
    message = str(exc)
    st.error(plain(message) if filename and filename in message else f"{plain(filename)}: {plain(message)}")


def register_pages(pages: dict) -> None:
    """Remember the navigation's page objects so pages can link to each other."""
    st.session_state[_PAGES_KEY] = pages


def page(step: str):
    return st.session_state.get(_PAGES_KEY, {}).get(step)


def current_project() -> workspace.Project | None:
    """The open project: this tab's choice, else the link (?project=), else the last one used."""
    slug = st.session_state.get(_PROJECT_KEY) or st.query_params.get("project")
    if not slug:
        slug = workspace.last_project()
    if not slug:
        return None
    try:
        project = workspace.open_project(slug)
    except InputError:
        st.session_state.pop(_PROJECT_KEY, None)
        return None
    st.session_state[_PROJECT_KEY] = slug
    if st.query_params.get("project") != slug:
        st.query_params["project"] = slug
    return project


def set_current_project(slug: str | None) -> None:
    if slug:
        st.session_state[_PROJECT_KEY] = slug
        st.query_params["project"] = slug
        workspace.remember_last_project(slug)
    else:
        st.session_state.pop(_PROJECT_KEY, None)
        st.query_params.pop("project", None)
        workspace.remember_last_project(None)


def require_project() -> workspace.Project:
    """The open project, or a friendly stop telling the user to create one."""
    project = current_project()
    if project is None:
        st.info("Create or open a project in the sidebar first (**Project** ▸ **New project**).")
        st.stop()
    return project


def explain(*words: str) -> None:
    """One caption line per technical word used on the page."""
    st.caption("  \n".join(f"**{'UMAP' if w == 'umap' else w.capitalize()}**: {GLOSSARY[w]}" for w in words))


def not_ready(step: str, *, what: str, needs: str, on: str) -> None:
    """A step that cannot run yet says what it will do and what it needs first, and links
    to the step ``on`` which that is done (not merely the previous one)."""
    st.info(f"{what}  \n**First:** {needs}")
    if on not in STEP_TITLES or on == step:
        raise ValueError(f"not_ready({step!r}) must link to another step, got {on!r}.")
    if page(on):
        st.page_link(page(on), label=f"Go to {STEP_TITLES[on]}", icon=":material/arrow_forward:")


def next_step(step: str, *, ready: bool, hint: str) -> None:
    """The 'next step' footer at the bottom of every page."""
    st.divider()
    order = ["home", *journey.STEPS]
    following = order[order.index(step) + 1] if order.index(step) + 1 < len(order) else None
    if following is None:
        return
    if ready and page(following):
        st.page_link(page(following), label=f"Next: {STEP_TITLES[following]}", icon=":material/arrow_forward:")
    else:
        st.caption(f"Next step: {STEP_TITLES[following]} — {hint}")


def upload_key(name: str) -> str:
    """A widget key that changes after each processed upload, so the uploader empties itself."""
    return f"{name}-{st.session_state.get(f'_uk_{name}', 0)}"


def reset_upload(name: str) -> None:
    st.session_state[f"_uk_{name}"] = st.session_state.get(f"_uk_{name}", 0) + 1


def _eta(job: jobs.Job) -> str:
    if not job.total or not job.started_at or job.done <= 0:
        return ""
    elapsed = time.time() - job.started_at
    rate = job.done / max(elapsed, 1e-6)
    left = (job.total - job.done) / rate if rate > 0 else 0
    eta = f"about {left:.0f} s left" if left < 90 else f"about {left / 60:.0f} min left"
    return f" · {rate:.1f}/s · {eta}"


def job_panel(project: workspace.Project, kind: str, *, noun: str = "photos", where: dict | None = None) -> jobs.Job | None:
    """Progress of the latest job of a kind; polls while it runs and reruns the page when it ends.

    Works after a refresh or in a second tab, because the state is read from the workspace.
    """
    job = jobs.latest(project, kind, where=where)
    if job is None:
        return None
    if job.active:
        _live_panel(project, job.id, noun)
    elif job.status == "failed":
        st.error(f"The last run failed: {plain(job.error)}")
    elif job.status == "interrupted":
        st.warning(f"The last run was interrupted ({job.done} of {job.total} {noun} done). Start it again to resume.")
    elif job.status == "cancelled":
        st.warning(f"The last run was cancelled after {job.done} of {job.total} {noun}. Start it again to resume.")
    return job


@st.fragment(run_every=1.0)
def _live_panel(project: workspace.Project, job_id: str, noun: str) -> None:
    job = jobs.get(project, job_id)
    if job is None:
        return
    if not job.active:
        st.rerun(scope="app")
    label = job.message or "Working"
    text = f"{label}: {job.done} of {job.total} {noun}{_eta(job)}" if job.total else f"{label}…"
    cols = st.columns([5, 1])
    cols[0].progress(job.fraction, text=text)
    if cols[1].button("Cancel", key=f"cancel-{job.id}", help="Stop now; what is finished is kept."):
        jobs.cancel(project, job.id)
        st.toast("Cancelling… the work stops after the current step.")


def thumb_grid(project: workspace.Project, shas: list[str], captions: list[str], *, per_row: int = 8) -> None:
    """Photos as a grid of small previews with captions."""
    for start in range(0, len(shas), per_row):
        cols = st.columns(per_row)
        for col, sha, caption in zip(cols, shas[start:start + per_row], captions[start:start + per_row]):
            col.image(project.thumbnail(sha), caption=caption, width="stretch")  # a placeholder if broken


def paged(items: list, *, key: str, per_page: int = 24) -> list:
    """One page of a long list, with a page chooser when needed."""
    pages_count = max(1, -(-len(items) // per_page))
    if pages_count == 1:
        return items
    number = st.number_input(f"Page (of {pages_count})", 1, pages_count, 1, key=key)
    return items[(number - 1) * per_page: number * per_page]
