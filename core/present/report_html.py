"""The management report as one self-contained HTML file: photos and charts inside, no script.

:func:`to_html` writes a :class:`~core.present.report.Report` as HTML that opens offline in
any browser and prints on A4 (photos are inlined JPEGs, charts are HTML/CSS bars and
tables, no link or address outside the file), so the page, the download and
``python -m core report`` say the same thing.
"""

from __future__ import annotations

import base64
import html
from pathlib import Path

import pandas as pd

from core.base.files import atomic_write_text
from core.learning.evaluation import range_text
from core.present.charts import PALETTE
from core.present.report import (
    PER_CLASS_COLUMNS,
    MethodResult,
    Photo,
    Report,
    build_report,
    mark_downloaded,
    percent,
)
from core.projects.workspace import Project

__all__ = ["to_html", "write_html"]

_CSS = """
:root { --ink:#1B2433; --muted:#5B6576; --line:#DDE3EC; --soft:#F3F6FB; --blue:#2F6FEB; }
* { box-sizing:border-box; }
body { font-family:-apple-system,"Segoe UI",Roboto,Helvetica,Arial,sans-serif; color:var(--ink); margin:0;
       background:#fff; font-size:16px; line-height:1.5; }
main { max-width:980px; margin:0 auto; padding:32px 28px 48px; }
header { display:flex; align-items:center; gap:16px; border-bottom:3px solid var(--blue); padding-bottom:14px; }
header img { width:52px; height:52px; }
header h1 { font-size:28px; margin:0; }
header p { margin:2px 0 0; color:var(--muted); }
h2 { font-size:21px; margin:30px 0 10px; padding-bottom:4px; border-bottom:1px solid var(--line); }
h3 { font-size:17px; margin:18px 0 6px; }
section { break-inside:avoid-page; }
.question { font-size:20px; background:var(--soft); border-left:5px solid var(--blue); padding:12px 16px; margin:18px 0; }
.short li { margin:4px 0; }
.grid { display:flex; flex-wrap:wrap; gap:10px; }
figure { margin:0; width:150px; }
figure img { width:150px; height:150px; object-fit:contain; background:var(--soft); border:1px solid var(--line); border-radius:6px; }
figcaption { font-size:12px; color:var(--muted); line-height:1.3; margin-top:3px; overflow-wrap:anywhere;
  display:-webkit-box; -webkit-box-orient:vertical; -webkit-line-clamp:3; line-clamp:3; overflow:hidden; }
table { border-collapse:collapse; margin:6px 0 12px; font-size:14px; }
th, td { border:1px solid var(--line); padding:5px 10px; text-align:right; }
th:first-child, td:first-child { text-align:left; }
th { background:var(--soft); font-weight:600; }
.bars { width:100%; max-width:720px; }
.bar { display:flex; align-items:center; gap:10px; margin:5px 0; font-size:14px; }
.bar .name { width:190px; flex:none; text-align:right; }
.bar .track { flex:1; background:var(--soft); border-radius:4px; height:22px; }
.bar .fill { height:22px; border-radius:4px; }
.bar .num { width:120px; flex:none; color:var(--muted); }
.stack { display:flex; height:22px; border-radius:4px; overflow:hidden; flex:1; }
.legend span { display:inline-block; margin-right:14px; font-size:13px; }
.legend i { display:inline-block; width:11px; height:11px; margin-right:5px; border-radius:2px; vertical-align:-1px; }
.metric { font-size:34px; font-weight:700; color:var(--blue); margin:0; }
.muted { color:var(--muted); font-size:14px; }
.verdict { background:#EAF7EE; border-left:5px solid #2BA84A; padding:10px 14px; }
.cols { display:flex; gap:28px; flex-wrap:wrap; }
.cols > div { flex:1; min-width:300px; }
ul.limits li { margin:5px 0; }
footer { margin-top:36px; color:var(--muted); font-size:12px; border-top:1px solid var(--line); padding-top:8px; }
* { -webkit-print-color-adjust:exact; print-color-adjust:exact; }
@page { size:A4; margin:14mm 12mm; }
@media print { main { padding:0; max-width:none; } body { font-size:12.5px; } h2 { break-after:avoid; }
  figure { width:118px; } figure img { width:118px; height:118px; } .metric { font-size:26px; } }
"""


def _e(text) -> str:
    return html.escape(str(text), quote=True)


def _img(jpeg: bytes, alt: str) -> str:
    return f'<img alt="{_e(alt)}" src="data:image/jpeg;base64,{base64.b64encode(jpeg).decode()}">'


def _photos(photos: list[Photo]) -> str:
    if not photos:
        return '<p class="muted">No photo to show.</p>'
    return '<div class="grid">' + "".join(
        f"<figure>{_img(p.jpeg, p.caption)}<figcaption title=\"{_e(p.caption)}\">{_e(p.caption)}</figcaption></figure>"
        for p in photos) + "</div>"


def _colour(i: int) -> str:
    return PALETTE[i % len(PALETTE)]


def _bars(counts: dict[str, int]) -> str:
    total = max(sum(counts.values()), 1)
    top = max(counts.values(), default=1) or 1
    rows = "".join(
        f'<div class="bar"><span class="name">{_e(k)}</span><span class="track"><div class="fill" '
        f'style="width:{100 * v / top:.1f}%;background:{_colour(i)}"></div></span>'
        f'<span class="num">{v:,} ({100 * v / total:.0f} %)</span></div>'
        for i, (k, v) in enumerate(counts.items()))
    return f'<div class="bars">{rows}</div>'


def _stacked(table: pd.DataFrame) -> str:
    tags = [str(c) for c in table.columns]
    legend = "".join(f'<span><i style="background:{_colour(i)}"></i>{_e(t)}</span>' for i, t in enumerate(tags))
    rows = []
    for group, counts in table.iterrows():
        total = max(int(counts.sum()), 1)
        parts = "".join(
            f'<div title="{_e(t)}: {int(n)}" style="width:{100 * n / total:.2f}%;background:{_colour(i)}"></div>'
            for i, (t, n) in enumerate(counts.items()) if n)
        first = int(counts.iloc[0])
        rows.append(f'<div class="bar"><span class="name">{_e(group)}</span><span class="stack">{parts}</span>'
                    f'<span class="num">{total:,} rows · {100 * first / total:.0f} % {_e(tags[0])}</span></div>')
    return f'<div class="legend">{legend}</div><div class="bars">{"".join(rows)}</div>'


def _confusion(method: MethodResult) -> str:
    head = "".join(f"<th>said “{_e(c)}”</th>" for c in method.classes)
    body = []
    for name, row in zip(method.classes, method.confusion):
        total = max(sum(row), 1)
        cells = "".join(
            f'<td style="background:rgba(47,111,235,{0.08 + 0.6 * n / total:.2f})">{n}</td>' for n in row)
        body.append(f"<tr><td>really “{_e(name)}”</td>{cells}</tr>")
    return f"<table><tr><th></th>{head}</tr>{''.join(body)}</table>"


def _per_class(method: MethodResult) -> str:
    rows = "".join(
        f"<tr><td>{_e(name)}</td><td>{percent(r.found)}</td><td>{percent(r.right_when_said)}</td><td>{int(r.photos)}</td></tr>"
        for name, r in method.per_class.iterrows())
    heads = "".join(f"<th>{_e(title)}</th>" for title in PER_CLASS_COLUMNS.values())
    return f"<table><tr><th>Class</th>{heads}</tr>{rows}</table>"


def _logo() -> str:
    logo = Path(__file__).resolve().parents[2] / "assets" / "logo.png"
    if not logo.is_file():
        return ""
    return f'<img alt="Catalog Lens" src="data:image/png;base64,{base64.b64encode(logo.read_bytes()).decode()}">'


def to_html(report: Report) -> str:
    """The report as one HTML file that opens offline and prints cleanly (A4)."""
    out = [f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>{_e(report.project)} · Catalog Lens "
           f"report</title><style>{_CSS}</style></head><body><main>",
           f"<header>{_logo()}<div><h1>{_e(report.project)}</h1><p>Catalog Lens report · {_e(report.created)}</p>"
           "</div></header>",
           f'<p class="question">{_e(report.question)}</p>',
           "<section><h2>In short</h2><ul class='short'>" + "".join(f"<li>{_e(s)}</li>" for s in report.in_short)
           + "</ul></section>",
           "<section><h2>What it learned from</h2>"
           f"<p>{sum(report.classes.values()):,} photos labelled by hand. {report.held_out} of them were set aside "
           "before training to check the models.</p>" + _bars(report.classes)]
    for name, photos in report.examples.items():
        out.append(f"<h3>Examples: {_e(name)}</h3>{_photos(photos)}")
    out.append("</section><section><h2>How well it works</h2>")
    if report.verdict:
        out.append(f'<p class="verdict"><b>Quick model or fine-tuned network?</b> {_e(report.verdict)}</p>')
    out.append('<div class="cols">')
    for m in report.methods:
        acc = m.accuracy
        used = " · <b>used for tagging</b>" if m.used_for_tagging else ""
        out.append(f"<div><h3>{_e(m.title)}</h3><p class='metric'>{percent(acc['value'])}</p>"
                   f"<p class='muted'>right (each class counting equally) · {range_text(acc['low'], acc['high'])}"
                   f" · {m.n_test} held-out photos · trained {m.trained_on}{used}</p>"
                   f"<p>{_e(m.detail)}</p>{_per_class(m)}{_confusion(m)}</div>")
    out.append("</div>")
    out.append("<p class='muted'><b>Recall</b>: of the photos that really have a label, the share the model found. "
               "<b>Precision</b>: of the photos the model gave a label, the share that really have it.</p>")
    out.append(f"<h3>Examples of mistakes ({len(report.mistakes)})</h3>" + (
        _photos(report.mistakes) if report.mistakes else "<p>It made no mistake on the held-out photos.</p>")
        + "</section>")
    out.append("<section><h2>The catalog now</h2>")
    cat = report.catalog
    if cat is None:
        out.append("<p>No catalog has been tagged yet.</p>")
    else:
        out.append(f"<p>{_e(cat.summary)}</p>" + _bars(cat.counts))
        if cat.by_category is not None and not cat.by_category.empty:
            out.append(f"<h3>By {_e(cat.category_column)}</h3>" + _stacked(cat.by_category))
        for name, photos in cat.examples.items():
            if photos:
                out.append(f"<h3>Tagged “{_e(name)}”</h3>{_photos(photos)}")
    out.append("</section><section><h2>What was not checked</h2><ul class='limits'>"
               + "".join(f"<li>{_e(s)}</li>" for s in report.limits) + "</ul></section>")
    out.append(f"<footer>Made with Catalog Lens from project “{_e(report.project)}” on {_e(report.created)}. "
               f"Backbone: {_e(report.backbone)}.</footer></main></body></html>")
    return "\n".join(out)




def write_html(project: Project, out: Path, **choices) -> Path:
    """Build the report and write it to ``out`` (the command line); the Report step is then done."""
    atomic_write_text(Path(out), to_html(build_report(project, **choices)))
    mark_downloaded(project)
    return Path(out)
