"""Run the whole app when Streamlit's legacy page mode picked a top-level page file.

Streamlit (1.67) runs a fresh server's first session in its old "one file in pages/ =
one page" mode when a ``pages/`` folder sits beside ``app.py``. If that first session is
a deep link (a refresh on ``/train`` after a restart), the file ``pages/train.py`` runs
instead of ``app.py``. Each such file calls :func:`run_app`, which runs ``app.py``; its
``st.navigation`` then switches Streamlit to the normal mode and shows the right step.
"""

from __future__ import annotations

import runpy
from pathlib import Path

APP = Path(__file__).resolve().parents[2] / "app.py"


def run_app() -> None:
    runpy.run_path(str(APP), run_name="__main__")
