"""README's two commands: the first starts the app, the second installs and runs every test.

The test command installs Debian's chromium when it is missing: directly as root (there is
often no sudo in a container: "sudo: command not found", exit 127) and through sudo for a
normal user. Run here with stand-ins for ``apt-get``, ``sudo`` and ``id`` on PATH that
record what was called, so nothing is installed.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess

import pytest

from tests.conftest import REPO

README = (REPO / "README.md").read_text()


def _blocks() -> list[str]:
    return re.findall(r"```bash\n(.*?)\n```", README, re.S)


def test_readme_starts_with_the_two_commands():
    first, second = _blocks()[:2]
    assert first.startswith("python3 -m venv .venv") and "streamlit run app.py" in first
    assert second == re.search(r"<!-- test-command -->\n```bash\n(.*?)\n```", README, re.S).group(1)
    assert "pytest" in second
    assert "GB" in README.split(second)[0] and "min" in README.split(second)[0]  # size and time, said first


@pytest.mark.parametrize("uid", [0, 1000])
def test_test_command_installs_chromium_as_root_and_as_a_user(tmp_path, uid):
    command = _blocks()[1]
    prefix = command.split(" && python3 -m venv")[0]  # the chromium part only
    bin_dir, log = tmp_path / "bin", tmp_path / "calls.log"
    bin_dir.mkdir()
    for name, body in {
        "apt-get": f'echo "apt-get $*" >> {log}',
        "sudo": f'echo "sudo" >> {log}; "$@"',
        "id": f"echo {uid}",
    }.items():
        (bin_dir / name).write_text(f"#!/bin/sh\n{body}\n")
        (bin_dir / name).chmod(0o755)
    bash = shutil.which("bash")
    env = {**os.environ, "PATH": f"{bin_dir}:/nonexistent"}  # no chromium, no real sudo
    if uid == 0:
        (bin_dir / "sudo").unlink()  # root in a container: no sudo at all
    done = subprocess.run([bash, "-c", prefix], env=env, capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    calls = log.read_text().splitlines()
    assert calls[-1] == "apt-get install -y -qq chromium"
    assert ("sudo" in calls) == (uid != 0)
