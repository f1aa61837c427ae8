"""Step 1: photos and the label sheet in; what matched, what did not and why; fixes."""

import streamlit as st

from app_pages import ui
from core import tasks
from core.base.problems import InputError
from core.inputs import columns, images, sheets
from core.learning import groups
from core.projects import intake

PHOTO_TYPES = [*sorted(e.lstrip(".") for e in images.IMAGE_EXTENSIONS), "zip"]

st.title("1 · Data")
st.caption("Add your product photos and the label sheet you already have. Everything is saved as you go.")
project = ui.require_project()

left, right = st.columns(2)
with left:
    st.subheader("Photos")
    files = st.file_uploader(
        "Photos, or a zip of folders of photos", type=PHOTO_TYPES, accept_multiple_files=True,
        key=ui.upload_key("photos"), help="JPEG, PNG, HEIC (iPhone), WebP, GIF, BMP, TIFF, or a .zip. Re-uploading a photo adds nothing.",
    )
    if files:
        for f in files:
            intake.stage_upload(project, filename=f.name, data=f)
        tasks.submit(project, "intake")
        ui.reset_upload("photos")
        st.rerun()
with right:
    st.subheader("Label sheet")
    sheet_file = st.file_uploader(
        "CSV, TSV or Excel: one row per photo, with its file name and its label", type=sheets.SHEET_TYPES,
        key=ui.upload_key("sheet"),
    )
    if sheet_file is not None:
        try:
            intake.apply_sheet(project, filename=sheet_file.name, data=sheet_file.getvalue())
            ui.reset_upload("sheet")
            st.rerun()
        except InputError as exc:
            ui.file_error(sheet_file.name, exc)
    state = intake.sheet_state(project)
    if state:
        st.caption(f"Using **{ui.plain(state.filename)}**: photo names from column "
                   f"**{ui.plain(state.image_column or '?')}**, labels from column **{ui.plain(state.label_column or '?')}**"
                   + (f", products from column **{ui.plain(state.group_column)}**." if state.group_column else "."))
        with st.expander("Change the columns", expanded=not (state.image_column and state.label_column)):
            cols = list(state.columns)
            image_col = st.selectbox("Column with the photo file names", cols,
                                     index=cols.index(state.image_column) if state.image_column in cols else None)
            label_col = st.selectbox("Column with the labels", cols,
                                     index=cols.index(state.label_column) if state.label_column in cols else None)
            no_group = "(none: find near-duplicate photos instead)"
            group_col = st.selectbox("Column with the product (optional): photos of one product stay together when "
                                     "the models are tested", [no_group, *cols],
                                     index=cols.index(state.group_column) + 1 if state.group_column in cols else 0)
            if st.button("Use these columns") and image_col and label_col:
                intake.apply_sheet(project, filename=state.filename, image_column=image_col, label_column=label_col,
                                   group_column="" if group_col == no_group else group_col)
                st.rerun()

job = ui.job_panel(project, "intake", noun="files")
if job and job.status == "done" and job.result and not st.session_state.get(f"seen-{job.id}"):
    r = job.result
    st.success(f"Checked {r['files_seen']} files: {r['photos_added']} new photos added, "
               f"{r['photos_known']} already in the project, {r['problems']} could not be used.")
    st.session_state[f"seen-{job.id}"] = True

summary = intake.data_summary(project)
if summary["photos"] == 0 and not state:
    st.info("Nothing here yet. Drop your photos (or a zip) on the left and your label sheet on the right.")
    st.stop()

c = st.columns(5)
c[0].metric("Photos", summary["photos"])
c[1].metric("Labelled", summary["labelled"])
c[2].metric("Without a label", summary["unlabelled"])
c[3].metric("Left out", summary["excluded"])
c[4].metric("Problems", summary["errors"], help=f"{summary['warnings']} more warnings")
if summary["match"]:
    m = summary["match"]
    st.caption(f"The sheet has {m['rows_total']} rows: {m['rows_matched']} matched a photo, "
               f"{m['rows_unmatched']} did not (see Problems).")
if summary["duplicate_files"]:
    dup = summary["duplicate_files"]
    st.caption(f"{dup} file{' is an exact copy' if dup == 1 else 's are exact copies'} of another file; each photo is used once "
               "for training (see Problems).")

names = project.class_names()
classes = list(summary["classes"])
if classes:
    st.write("**Photos per class:** " + " · ".join(f"{ui.plain(names.get(k, k))}: {v}" for k, v in summary["classes"].items()))
    coded = columns.labels_look_coded(classes)
    with st.expander("Name the classes", expanded=coded and not names):
        st.caption("Your labels are short codes. Give each a name people will understand, e.g. 1 → “Person in photo”.")
        with st.form("class_names", border=False):
            new = {k: st.text_input(f"Label “{ui.plain(k)}”", value=names.get(k, "")) for k in classes}
            if st.form_submit_button("Save names"):
                project.set_class_names(new)
                st.rerun()

if summary["labelled"]:
    grouping = groups.photo_grouping(project, list(project.training_set()["sha"]))
    st.caption(ui.plain(grouping.summary()) if grouping.source != "none" else
               "Near-duplicate photos (several shots of one product) are looked for once the photos' features are "
               "extracted on the Backbone step; they are then kept together when the models are tested.")

blockers = [p for p in intake.refresh_blockers(project) if p.severity == "error"]
for p in blockers:
    st.warning(ui.plain(p.message))

tab_photos, tab_fix, tab_problems = st.tabs(["Photos by class", "Fix labels", f"Problems ({summary['errors'] + summary['warnings']})"])
table = intake.review_table(project)
with tab_photos:
    groups = [*classes, ""] if (table["label"] == "").any() else classes
    if groups:
        group = st.radio("Show", groups, horizontal=True, format_func=lambda k: ui.plain(names.get(k, k)) if k else "Without a label")
        subset = table[(table["label"] == group)]
        shown = ui.paged(list(subset.itertuples()), key=f"page-{group}")
        ui.thumb_grid(project, [r.sha for r in shown], [ui.plain(r.name) for r in shown])
with tab_fix:
    st.caption("Change a label or tick “Leave out” for photos that should not be used, then press Save. "
               "Your fixes are kept even if you upload a new sheet.")
    edited = st.data_editor(
        table, hide_index=True, disabled=["name", "label_source"], column_order=["name", "label", "excluded", "label_source"],
        column_config={
            "label": st.column_config.SelectboxColumn("Label", options=classes or None,
                                                      format_func=lambda c: names.get(c, c) if c else c),
            "excluded": st.column_config.CheckboxColumn("Leave out"),
            "label_source": st.column_config.TextColumn("From", help="sheet, manual fix, or conflict in the sheet"),
            "name": st.column_config.TextColumn("Photo"),
        }, key="fix_table",
    )
    if st.button("Save fixes", type="primary"):
        n = intake.apply_fixes(project, table, edited)
        st.toast(f"Saved {n} fixes.")
        st.rerun()
with tab_problems:
    problems = project.problems()
    if problems.empty:
        st.success("No problems found.")
    else:
        st.dataframe(problems[["severity", "file", "row", "message"]], hide_index=True, width="stretch")
        # Every row's problem (a big sheet's list is summarised above); built only when clicked.
        st.download_button("Download the full problem list (CSV)", lambda: intake.problem_list_csv(project),
                           file_name=f"{project.slug}-problems.csv", mime="text/csv")

ui.next_step("data", ready=not blockers and summary["labelled"] > 0,
             hint="it opens once you have at least two classes with 3 labelled photos each.")
