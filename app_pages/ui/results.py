"""Drawing one trained model's results (Train & compare page)."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pandas as pd
import streamlit as st

from app_pages.ui import plain, thumb_grid
from core.base.durations import duration_text
from core.base.problems import InputError
from core.inputs import images
from core.learning import calibration, finetune_config, models, predictor, runs, training
from core.learning.evaluation import range_text
from core.present import charts
from core.projects.workspace import Project

TITLES = {"frozen": "Quick model (frozen backbone)", "finetuned": "Fine-tuned network"}
COLUMNS = {"precision": "Precision", "recall": "Recall", "f1": "F1 (both in one)", "support": "Photos"}


def run_panel(project: Project, run: runs.RunRecord, names: dict[str, str]) -> None:
    """Headline with its range, report table, confusion matrix, threshold, mistakes, download."""
    report = run.test_report
    st.subheader(TITLES[run.kind])
    acc = report["balanced_accuracy"]
    st.metric("Balanced accuracy on held-out photos", f"{100 * acc['value']:.1f} %",
              help="The average of the share found in each class, so a rare class counts as much as a common one.")
    st.caption(f"{range_text(acc['low'], acc['high'])} on {report['n']} photos. {plain(run.headline)}")
    for warning in report.get("warnings", []):
        st.warning(plain(warning))
    rep = report["report"]
    table = pd.DataFrame(rep["data"], index=rep["index"], columns=rep["columns"]).rename(
        index={**names, "macro avg": "Average (classes equal)", "weighted avg": "Average (by photos)"},
        columns=COLUMNS)
    st.dataframe(table.style.format({c: "{:.0f}" if c == COLUMNS["support"] else "{:.0%}" for c in table.columns}),
                 width="stretch")
    st.plotly_chart(charts.confusion_figure(report["confusion"], run.classes, names=names), width="stretch",
                    key=f"cm-{run.kind}")
    _confidence(run)
    if run.positive:
        _threshold(project, run, names)
    wrong = runs.test_predictions(project, run)
    wrong = wrong[wrong["label"] != wrong["predicted"]]
    with st.expander(f"Photos it got wrong ({len(wrong)})", expanded=0 < len(wrong) <= 8):
        captions = [f"{plain(r.name)}: {plain(names.get(r.label, r.label))} → {plain(names.get(r.predicted, r.predicted))} "
                    f"({100 * r.confidence:.0f} %)" for r in wrong.itertuples()]
        thumb_grid(project, list(wrong["sha"]), captions, per_row=4)
    st.download_button("Download this model", models.export_bundle(project, run.id),
                       file_name=f"{project.slug}-{run.kind}-{run.id}.zip", mime="application/zip", key=f"dl-{run.kind}",
                       help="One file to tag photos with elsewhere (command line, another project); it keeps the "
                            "confidence setting chosen here.")
    _onnx_download(project, run)


def _onnx_download(project: Project, run: runs.RunRecord) -> None:
    """The model for other tools (ONNX): made on request (it takes a minute), then downloaded."""
    tip = "For your data team: the model as one ONNX file, which runs in other tools without this app."
    made = models.onnx_file(project, run.id)
    if made is not None:
        st.download_button("Download for other tools (ONNX)", made.read_bytes(), file_name=f"{project.slug}-{run.kind}-{run.id}.onnx",
                           mime="application/octet-stream", key=f"onnx-{run.kind}", help=tip)
    elif st.button("Prepare a copy for other tools (ONNX)", key=f"make-onnx-{run.kind}", help=tip):
        with st.spinner("Preparing the copy for other tools (about a minute)…"):
            models.export_onnx(project, run.id)
        st.rerun()


def _confidence(run: runs.RunRecord) -> None:
    """Whether "90 % sure" means right 9 times in 10, in words and as a reliability chart."""
    rel = run.extra.get("reliability") or {}
    if not rel.get("after"):
        return
    before = rel["before"] if rel.get("before") != rel["after"] else None
    st.markdown("**Can you take its confidence literally?** " + calibration.reliability_sentence(rel["after"], before=before))
    with st.expander("Reliability chart: how sure it said it was, and how often it was right"):
        st.caption("Each dot is a group of held-out photos. On the dotted line, “80 % sure” means right 8 times in 10."
                   + (" Its confidence was adjusted on photos it did not learn from; the slider and the review flag use "
                      "the adjusted confidence." if before else ""))
        fig = charts.reliability_figure(rel)
        if fig is not None:
            st.plotly_chart(fig, width="stretch", key=f"rel-{run.kind}")


def _threshold(project: Project, run: runs.RunRecord, names: dict[str, str]) -> None:
    pos = plain(names.get(run.positive, run.positive))
    with st.expander("How sure must the model be to tag a photo?"):
        current = models.threshold(project, run.id) or 0.5
        shown = min(95, max(5, round(100 * current)))
        pct = st.slider(f"Tag “{pos}” from this confidence", 5, 95, shown, 1, format="%d %%", key=f"thr-{run.kind}")
        value = current if pct == shown else pct / 100  # untouched: exactly the setting in force
        effect = training.threshold_effect(project, run, value)
        st.write(f"At this setting, on the {effect['n']} held-out photos: **{effect['missed']} of "
                 f"{effect['n_positive']}** photos with “{pos}” are missed and **{effect['flagged']} of "
                 f"{effect['n_negative']}** photos without it are wrongly tagged.")
        st.caption(f"The model's own setting ({100 * (run.threshold or 0.5):.0f} %, chosen without the held-out "
                   f"photos) misses {effect['base_missed']} and wrongly tags {effect['base_flagged']}.")
        if abs(value - current) > 1e-9:
            if st.button("Use this setting for tagging", key=f"use-thr-{run.kind}"):
                models.set_threshold(project, run.id, value)
                st.rerun()
        elif run.threshold is not None and abs(current - run.threshold) > 1e-9:
            st.success(f"Tagging with this model uses {100 * current:.0f} %, set here. Tag the catalog again for "
                       "it to apply to rows already tagged.", icon=":material/check:")
        for curve in ("roc", "pr"):
            fig = charts.curves_figure(run.test_report, kind=curve)
            if fig is not None:
                st.plotly_chart(fig, width="stretch", key=f"{curve}-{run.kind}")


def try_a_photo(project: Project, models: list[dict]) -> None:
    """Drop any photo and see each model's answer."""
    with st.expander("Try a photo"):
        upload = st.file_uploader("Any photo", type=sorted(e.lstrip(".") for e in images.IMAGE_EXTENSIONS),
                                  key="try_photo")
        if upload is None:
            return
        names = project.class_names()
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / Path(upload.name).name
            path.write_bytes(upload.getvalue())
            left, right = st.columns([1, 2])
            left.image(images.preview(upload.getvalue(), size=440), width=220)  # never the raw upload
            for model in models[:3]:
                with st.spinner(f"Asking {TITLES.get(model['kind'], model['kind'])}…"):
                    row = predictor.predict_images(model["path"], [(upload.name, path)],
                                                   threshold=model["threshold"] if model["positive"] else None).iloc[0]
                title = TITLES.get(model["kind"], model["kind"])
                if row["error"]:
                    right.error(f"{plain(upload.name)}: {plain(row['error'])}")
                    return
                label = names.get(row["predicted_label"], row["predicted_label"])
                doubt = " — but the photo is unlike the training photos, so check it" if row["unlike_training"] else ""
                right.markdown(f"**{title}:** {plain(label)} — {100 * row['confidence']:.0f} % sure{doubt}")


def import_model(project: Project) -> None:
    """Bring in a model bundle trained elsewhere (checked before it is kept)."""
    with st.expander("Import a model"):
        st.caption("A model file downloaded from Catalog Lens (a .zip). It is checked before it is kept.")
        upload = st.file_uploader("Model file", type=["zip"], key="import_model")
        if upload is None:
            return
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "model.zip"
            path.write_bytes(upload.getvalue())
            try:
                model_id = models.import_bundle(project, path)
            except (InputError, ValueError) as exc:
                st.error(f"{plain(upload.name)}: {plain(exc)}")
            else:
                st.success(f"Imported model {model_id}. Choose it above to tag with it.")


def finetune_length(project: Project) -> str:
    """The quick / thorough choice for fine-tuning, each with how long it takes here."""
    estimates = training.finetune_estimates(project)
    lengths = finetune_config.LENGTHS

    def label(name: str) -> str:
        text = f"{name.capitalize()}: up to {lengths[name]} rounds"
        if estimates:
            text += f", about {duration_text(estimates['lengths'][name]['seconds'], rough=True)} here"
        return text

    names = list(lengths)
    length = st.radio("How long to fine-tune", names, index=names.index(finetune_config.DEFAULT_LENGTH),
                      format_func=label, key="finetune_length")
    if estimates:
        basis = ("the last fine-tuning on this computer" if estimates["measured"] else
                 "the feature-extraction speed on this computer (the first fine-tuning measures it better)")
        st.caption(f"A round is one pass over the {estimates['train_photos']} training photos; it stops sooner once "
                   f"a round no longer improves. Times estimated from {basis}.")
    return length
