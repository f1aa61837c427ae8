"""Step 5: tag a whole catalog export, review the doubtful rows, download the sheet."""

import json
from pathlib import Path

import streamlit as st

from app_pages import ui
from core import tagging, tasks
from core.base.problems import InputError
from core.inputs import catalog as catalog_module
from core.inputs import sheets
from core.learning import models, runs
from core.present import charts
from core.projects import workspace
from core.projects.state import ProjectState


@st.cache_data(max_entries=2, show_spinner=False)
def _preview(data: bytes, filename: str) -> tuple:
    """The uploaded catalog's first rows, columns and guessed photo columns (read once per upload)."""
    sheet = sheets.read_sheet(data, filename=filename, purpose="catalog")
    return sheet.frame.head(5), [str(c) for c in sheet.frame.columns], catalog_module.guess_columns(sheet)[1]


def _new_run(project, model: dict, catalog, photos) -> None:
    """An uploaded catalog's preview, the run's settings and its Start button. A catalog that
    cannot be read, or a run that cannot start, says why, and the rest of the page (the last
    run's rows) stays."""
    try:
        head, columns, guessed = _preview(catalog.getvalue(), catalog.name)
    except InputError as exc:
        ui.file_error(catalog.name, exc)
        return
    st.dataframe(head, hide_index=True, width="stretch")
    image_columns = st.multiselect("Columns with the photos (file names, paths or links)", columns,
                                   default=[c for c in guessed if c in columns])
    rule = st.radio("When a row has several photos, tag it when…", ["any", "all", "first", "majority"],
                    horizontal=True, format_func={"any": "any photo shows it", "all": "all photos show it",
                                                  "first": "the first photo shows it",
                                                  "majority": "most photos show it"}.get)
    review = st.slider("Flag for review when the model is less sure than", 50, 99, 75, 1, format="%d %%",
                       key="review_below") / 100
    if st.button("Start tagging", type="primary", disabled=not image_columns):
        try:
            run_id = tagging.start_project_run(
                project, catalog_name=catalog.name, catalog_data=catalog.getvalue(),
                bundle_path=Path(model["path"]), zip_data=photos.getvalue() if photos else None,
                options=tagging.TagOptions(image_columns=image_columns, rule=rule, review_below=review),
                threshold=model["threshold"] if model["positive"] else None)
        except InputError as exc:
            st.error(f"Tagging could not start: {ui.plain(exc)}")
            return
        tasks.submit(project, "tag", {"run": run_id})
        ui.reset_upload("catalog")
        ui.reset_upload("catalog_zip")
        st.rerun()


st.title("5 · Tag catalog")
st.caption("Upload your catalog export; every row comes back with the tag added. No row is ever dropped.")
ui.explain("confidence")
project = ui.require_project()
model = models.tagging_model(project)
state = ProjectState(project)
if model is None:
    ui.not_ready("tag", what="This step runs your model over every photo of a catalog export.",
                 needs="train a model on the Train & compare step.", on="train")
    st.stop()
names = project.class_names()
st.caption(f"Model: **{ui.plain(model['name'] or model['id'])}** (change it on the Train & compare step).")

with st.expander("New tagging run", expanded=not state.tagging_run):
    catalog = st.file_uploader("Catalog export (CSV, TSV or Excel)", type=sheets.SHEET_TYPES,
                               key=ui.upload_key("catalog"))
    photos = st.file_uploader("Its photos as a zip (not needed for photo links or photos already in the project)",
                              type=["zip"], key=ui.upload_key("catalog_zip"))
    if catalog is not None:
        _new_run(project, model, catalog, photos)

@st.cache_data(max_entries=8, show_spinner=False)
def _thumbnails(slug: str, folder_str: str, rows: tuple) -> dict[int, bytes]:
    """The review rows' thumbnails, decoded once per set of rows (not on every rerun)."""
    items = [{"row": row, "photos": list(photos)} for row, photos in rows]
    return tagging.review_thumbnails(Path(folder_str), items, workspace.open_project(slug))


run_id = state.tagging_run
if not run_id:
    st.stop()
folder = tagging.project_run_folder(project, run_id)
job = ui.job_panel(project, "tag", noun="rows", where={"run": run_id})
if job is not None and job.status in ("interrupted", "cancelled") and st.button("Resume tagging", type="primary"):
    tasks.submit(project, "tag", {"run": run_id})
    st.rerun()
results = tagging.results_frame(folder)
run = tagging.load_run(folder)
if results.empty:
    st.stop()

fixed = tagging.overrides(folder)
final = tagging.final_labels(results, fixed)
order = runs.class_order(project)
st.subheader(f"{ui.plain(run['catalog_name'])}: {len(results)} of {run['rows']} rows done")
unlike, tagged = tagging.unlike_rows(results)
if tagged and unlike >= tagging.MOSTLY_UNLIKE * tagged:
    st.warning(f"**{unlike} of {tagged} tagged rows ({100 * unlike / tagged:.0f} %) have photos unlike the ones the "
               "model learned from**, so their tags are guesses: this catalog looks different from your training "
               "photos (other backgrounds, settings or kinds of product). Answer some of them below and add your "
               "answers to the training photos, then train again.", icon=":material/warning:")
if stale := tagging.out_of_date(run, model):
    st.info(f"These rows were tagged {stale} than the one chosen now. Start a new tagging run (above) with the "
            "same catalog to apply it.", icon=":material/update:")
st.plotly_chart(charts.share_figure(tagging.tag_counts(final, names=names, order=order), horizontal=True),
                width="stretch", key="tag-share")
original = tagging.catalog_rows(folder)
columns, default = tagging.split_columns(original, image_columns=run["options"].get("image_columns", []),
                                         saved=state.report_choices.category)
default = default or ""
choices = ["", *columns]
split = st.selectbox("Split by a column of the catalog (the report uses the same)", choices,
                     index=choices.index(default), format_func=lambda c: c or "(no split)", key=f"split-{run_id}")
if split != default:
    state.save_report_choices(category=split)
if split:
    table = tagging.share_by(original[split].astype(str), final, names=names, order=order)
    st.plotly_chart(charts.grouped_share_figure(table), width="stretch", key="tag-split")

queue = [r for r in tagging.iter_rows_needing_review(folder, limit=24) if r["row"] not in fixed]
left_to_review = int(results["needs_review"].sum()) - len(fixed)
st.subheader(f"To review ({left_to_review} row{'' if left_to_review == 1 else 's'})")
st.caption("Rows the model is unsure about, could not tag, or whose photo is unlike the training photos (its "
           "tag is then a guess). Your answer goes into the download.")
classes = sorted(set(results["predicted_label"]) - {""}) or list(names)
thumbs = _thumbnails(project.slug, str(folder), tuple((r["row"], tuple(r["photos"])) for r in queue[:12]))
for item in queue[:12]:
    pic, text, act = st.columns([1, 3, 2])
    pic.image(thumbs[item["row"]], width=110)  # the placeholder when the photo cannot be shown
    said = names.get(item["predicted_label"], item["predicted_label"]) or "no tag"
    sure = f" ({100 * item['confidence']:.0f} % sure)" if item["confidence"] == item["confidence"] and item["confidence"] else ""
    text.markdown(f"Row {item['sheet_row']}: **{ui.plain(said)}**{sure}  \n{ui.plain(item['tag_error'] or '')}")
    answer = act.selectbox("Answer", ["—", *classes], key=f"rev-{item['row']}", format_func=lambda c: names.get(c, c),
                           label_visibility="collapsed")
    if answer != "—":
        tagging.set_override(folder, item["row"], answer)
        st.rerun()

if fixed:
    st.caption(f"You answered {len(fixed)} rows.")
    if st.button("Add my answers to the training photos", help="Their photos join the project with your labels; "
                 "train again to learn from them."):
        st.toast(f"Added {tagging.add_reviews_to_training(project, folder)} photos to the training labels.")

@st.cache_data(max_entries=4, show_spinner="Preparing the download…")
def _downloads(folder_str: str, version: tuple, fixed_json: str, tags_as: str, names_json: str) -> list:
    """The output files, rebuilt only when the results, the answers or the choice of names change."""
    fixed_rows = {int(k): v for k, v in json.loads(fixed_json).items()}
    return tagging.downloads(Path(folder_str), overrides=fixed_rows, tags_as=tags_as, names=json.loads(names_json))


readable = tagging.tag_names(folder, names)
tags_as = "names"
if readable:
    example = next(iter(readable.items()))
    tags_as = st.radio("Tags in the download", tagging.TAG_VALUES, horizontal=True, key="tags-as",
                       format_func={"names": f"Your class names (e.g. “{ui.plain(example[1])}”), codes kept beside them",
                                    "codes": f"The codes of your label sheet only (e.g. “{ui.plain(example[0])}”)"}.get)
# Results only ever grow, so their count (with the answers) says when the files must be rebuilt.
files = _downloads(str(folder), (len(results),), json.dumps({str(k): v for k, v in fixed.items()}), tags_as,
                   json.dumps(names, sort_keys=True))
LABELS = {"csv": ("Download as CSV", "text/csv"),
          "xlsx": ("Download as Excel", "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet"),
          "parquet": ("Download as Parquet", "application/vnd.apache.parquet")}
for col, file in zip(st.columns(len(files)), files):
    label, mime = LABELS[file.fmt]
    if file.data is None:
        col.info(file.refused, icon=":material/table_rows:")
    else:
        col.download_button(label, file.data, file_name=file.file_name, mime=mime, key=f"download-{file.fmt}",
                            type="primary" if file.fmt == "csv" else "secondary")
st.caption("CSV and Excel open in any spreadsheet program; Parquet is for data tools (Power BI, Python, R).")

ui.next_step("tag", ready=len(results) == run["rows"], hint="it opens once the catalog is tagged.")
