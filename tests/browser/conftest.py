"""A real Streamlit server and a real Chromium for the journey tests."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
ARTIFACTS = REPO / ".artifacts"
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """``streamlit run app.py`` on a free port with its own empty workspace."""
    home = tmp_path_factory.mktemp("browser-home")
    port = _free_port()
    env = dict(os.environ, CATALOG_LENS_HOME=str(home))
    log = open(home / "server.log", "wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "streamlit", "run", "app.py", "--server.headless", "true",
         "--server.port", str(port), "--server.address", "127.0.0.1"],
        cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 90
    while time.time() < deadline:
        try:
            if urllib.request.urlopen(f"{url}/_stcore/health", timeout=2).read() == b"ok":
                break
        except OSError:
            time.sleep(0.3)
    else:
        proc.kill()
        pytest.fail(f"streamlit did not start; log: {(home / 'server.log').read_text()[-2000:]}")
    yield {"url": url, "home": home}
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()


@pytest.fixture(scope="module")
def browser():
    chromium = shutil.which("chromium") or "/usr/bin/chromium"
    if not Path(chromium).exists():
        pytest.skip("Debian's chromium is not installed (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.when == "call":
        item.call_failed = report.failed
        if report.failed:  # CI keeps no screenshots: put what the page said and the server's log in the report
            for title, text in _at_failure(item.funcargs):
                report.sections.append((title, text))


def _at_failure(funcargs: dict) -> list[tuple[str, str]]:
    """The page's visible text and the end of the server's log, for a failed browser test's report."""
    found = []
    page, server = funcargs.get("page"), funcargs.get("server")
    if page is not None:
        try:
            found.append((f"page text at failure ({page.url})", page.locator("body").inner_text(timeout=5_000)))
        except Exception as exc:  # noqa: BLE001 - a report must not hide the test's own failure
            found.append(("page text at failure", f"could not be read: {exc}"))
    if server is not None and (server["home"] / "server.log").exists():
        found.append(("server log, last 4000 characters", (server["home"] / "server.log").read_text(errors="replace")[-4000:]))
    return found


@pytest.fixture
def page(browser, request):
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    pg = context.new_page()
    pg.set_default_timeout(60_000)
    yield pg
    if getattr(request.node, "call_failed", False):  # what the browser showed when it failed
        shot(pg, f"FAILED-{request.node.name}")
    context.close()


def shot(page, name: str) -> Path:
    """Save a full-page screenshot under .artifacts/ for people to look at."""
    ARTIFACTS.mkdir(exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    return path
