"""Step 6: the management report, on screen and as one HTML file to send or print."""

import streamlit as st

from app_pages import ui
from core.learning import runs
from core.learning.evaluation import range_text
from core.present import charts, report, report_html
from core.projects.state import ProjectState

st.title("6 · Report")
st.caption("One page for management: the question, the photos it learned from, how well it works, what the "
           "catalog looks like now, and what was not checked. The download says exactly what this page says.")
project = ui.require_project()
if not runs.latest_runs(project):
    ui.not_ready("report", what="This step writes a one-page summary for management that you can download and print.",
                 needs="train a model on the Train & compare step (tagging a catalog adds the catalog's figures).", on="train")
    st.stop()

with st.spinner("Writing the report…"):
    built = report.build_report(project)

with st.expander("Change the wording or the catalog column"):
    question = st.text_input("The question the model answers, in your words", value=built.question,
                             key=f"report-question-{project.slug}")
    options = built.catalog.category_columns if built.catalog else []
    category = None
    if options:
        choices = ["", *options]
        category = st.selectbox("Split the catalog's tags by", choices,
                                index=choices.index(built.catalog.category_column or ""),
                                format_func=lambda c: c or "(no split)", key=f"report-category-{project.slug}")
    if question != built.question or (category is not None and category != (built.catalog.category_column or "")):
        ProjectState(project).save_report_choices(question=question, category=category)
        st.rerun()

unnamed = [c for c in built.classes if len(c) <= 2 or c.isdigit()]
if unnamed:
    st.warning(f"Your classes are still called {', '.join(f'“{ui.plain(c)}”' for c in unnamed)}. Give them names a manager "
               "understands (e.g. 1 → “Person in photo”) on the **1 · Data** step, under *Name the classes*.")
st.info(f"**The question:** {ui.plain(built.question)}")
st.markdown("\n".join(f"- {ui.plain(line)}" for line in built.in_short))
st.download_button(
    "Download the report (HTML)", report_html.to_html(built), file_name=f"{project.slug}-report.html", mime="text/html",
    type="primary", icon=":material/download:", on_click=lambda: report.mark_downloaded(project))
st.caption("One file with the photos and charts inside: it opens offline in any browser. "
           "For a PDF, open it and print (Ctrl+P ▸ Save as PDF).")

st.header("What it learned from")
st.write(f"{sum(built.classes.values()):,} photos labelled by hand. {built.held_out} of them were set aside before "
         "training to check the models.")
st.plotly_chart(charts.share_figure(built.classes, horizontal=True), width="stretch", key="report-classes")
for name, photos in built.examples.items():
    st.markdown(f"**Examples: {ui.plain(name)}**")
    if photos:
        st.image([p.jpeg for p in photos], caption=[ui.plain(p.caption) for p in photos], width=150)

st.header("How well it works")
ui.explain("precision", "recall")
if built.verdict:
    st.success(f"**Quick model or fine-tuned network?** {ui.plain(built.verdict)}")
for col, method in zip(st.columns(len(built.methods)), built.methods):
    with col:
        st.subheader(method.title)
        if method.used_for_tagging:
            st.badge("Used for tagging", icon=":material/check:", color="green")
        acc = method.accuracy
        st.metric("Right answers (each class counting equally)", report.percent(acc["value"]),
                  help="Balanced accuracy on photos the model never saw while learning.")
        st.caption(f"{range_text(acc['low'], acc['high'])} on {method.n_test} held-out photos · "
                   f"trained {method.trained_on}")
        st.write(ui.plain(method.detail))
        table = method.per_class.rename(columns=report.PER_CLASS_COLUMNS)
        st.dataframe(table.style.format({c: "{:.0%}" for c in table.columns[:2]}), width="stretch")
        st.plotly_chart(charts.confusion_figure(method.confusion, method.classes), width="stretch",
                        key=f"report-cm-{method.kind}")
st.markdown(f"**Examples of mistakes ({len(built.mistakes)})**")
if built.mistakes:
    st.image([p.jpeg for p in built.mistakes], caption=[ui.plain(p.caption) for p in built.mistakes], width=150)
else:
    st.caption("It made no mistake on the held-out photos.")

st.header("The catalog now")
cat = built.catalog
if cat is None:
    st.info("No catalog has been tagged yet. Tag one on the **5 · Tag catalog** step and it appears here.")
else:
    st.write(ui.plain(cat.summary))
    st.plotly_chart(charts.share_figure(cat.counts, horizontal=True), width="stretch", key="report-catalog")
    if cat.by_category is not None and not cat.by_category.empty:
        st.markdown(f"**By {ui.plain(cat.category_column)}**")
        st.plotly_chart(charts.grouped_share_figure(cat.by_category), width="stretch", key="report-category")
    for name, photos in cat.examples.items():
        if photos:
            st.markdown(f"**Tagged “{ui.plain(name)}”**")
            st.image([p.jpeg for p in photos], caption=[ui.plain(p.caption) for p in photos], width=150)

st.header("What was not checked")
st.markdown("\n".join(f"- {ui.plain(line)}" for line in built.limits))

st.divider()
if ui.page("home"):
    st.page_link(ui.page("home"), label="Back to Home", icon=":material/home:")
