"""Deep-link shim: see pages/README.md. The real page is in pages/steps/."""

from pages.ui.legacy import run_app

run_app()
