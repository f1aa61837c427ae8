"""The downloaded HTML report in a real Chromium: long photo captions stay under their photo.

A caption like ``Spring shoot 2024/n03599486_jinrikisha.JPEG`` (no space to break at) ran
into the next photo's caption. Now it wraps anywhere, at most three lines, the whole text
in its tooltip.
"""

from __future__ import annotations

import io

import pytest
from PIL import Image

from core.present import report, report_html
from tests.browser.conftest import shot

LONG = [
    "Spring shoot 2024/n03599486_jinrikisha.JPEG",
    "row 12 · 97 % sure",
    "Autumn-Winter-2025-lookbook-final-selection/IMG_20250911_143211_edited_v3_FINAL.jpeg",
    "a.jpg",
    "n02123045_tabby_cat_on_the_sofa_in_the_living_room_near_the_window.png",
]


def _report() -> report.Report:
    from skimage import data

    buf = io.BytesIO()
    Image.fromarray(data.astronaut()).resize((150, 150)).save(buf, "JPEG")
    photos = [report.Photo(caption, buf.getvalue()) for caption in LONG]
    return report.Report(
        project="Captions",
        created="4 December 2026",
        question="Does the photo show a person?",
        in_short=["A line."],
        classes={"person": 5, "no_person": 5},
        held_out=4,
        backbone="EfficientNet-Lite0",
        examples={"person": photos},
        methods=[],
        verdict=None,
        mistakes=photos,
        catalog=None,
        limits=["Nothing else."],
    )


@pytest.mark.parametrize("width", [1024, 1400, 600])
def test_long_captions_stay_under_their_photo(browser, width):
    page = browser.new_page(viewport={"width": width, "height": 900})
    try:
        page.set_content(report_html.to_html(_report()))
        boxes = page.eval_on_selector_all(
            "figure",
            """figs => figs.map(f => {
            const c = f.querySelector('figcaption'), r = f.getBoundingClientRect(), b = c.getBoundingClientRect();
            return {fig: [r.left, r.right, r.top], cap: [b.left, b.right, b.bottom],
                    overflow: c.scrollWidth - c.clientWidth, title: c.title, text: c.textContent};
        })""",
        )
        shot(page, f"report-captions-{width}")
        assert len(boxes) == 2 * len(LONG)
        for box in boxes:
            assert box["overflow"] <= 0, box  # nothing runs out sideways
            assert box["fig"][0] - 0.5 <= box["cap"][0] and box["cap"][1] <= box["fig"][1] + 0.5, box
            assert box["title"] == box["text"]  # the full caption is one hover away when it is cut short
        for left, right in zip(boxes, boxes[1:]):
            if left["fig"][2] == right["fig"][2]:  # neighbours on one row never overlap
                assert left["cap"][1] <= right["fig"][0], (left, right)
    finally:
        page.close()
