"""The repository's scripts on a machine (issue 17 item 11): `scripts/serve.sh` does not re-install a checkout that
is installed already, and `.ci/system-deps.sh` (run by `scripts/test.sh`) does not leave prometheus.service enabled
at boot. Both run against stub tools that record their calls, so nothing is installed here."""

import os
import stat
import subprocess
from pathlib import Path

from tests.service_fixtures import REPO_ROOT

RECORDER = """#!/usr/bin/env bash
echo "$(basename "$0") $*" >> "{log}"
"""


def stub(path: Path, log: Path) -> None:
    path.write_text(RECORDER.format(log=log))
    path.chmod(path.stat().st_mode | stat.S_IXUSR)


def test_serve_sh_installs_once_then_starts_at_once(tmp_path):
    venv, log = tmp_path / "venv", tmp_path / "calls.log"
    (venv / "bin").mkdir(parents=True)
    stub(venv / "bin" / "python", log)
    stub(venv / "bin" / "staticmoe", log)
    env = {**os.environ, "STATICMOE_VENV": str(venv)}
    for run in range(2):
        done = subprocess.run(["bash", "scripts/serve.sh", "--port", "1"], cwd=REPO_ROOT, env=env,
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        calls = log.read_text().splitlines()
        assert calls[-1] == "staticmoe serve --port 1"
        pip_installs = [c for c in calls if c.startswith("python -m pip install")]
        if run == 0:
            assert any("-e .[test]" in c for c in pip_installs), calls
            first = len(pip_installs)
    assert len(pip_installs) == first, "the second start re-ran pip install"


def test_system_deps_disables_the_prometheus_unit_it_installs(tmp_path):
    log, bin_dir = tmp_path / "calls.log", tmp_path / "bin"
    bin_dir.mkdir()
    stub(bin_dir / "systemctl", log)
    unit = "staticmoe-test-unit"  # not a real unit: the helper's file clean-up touches nothing here
    script = f'source .ci/system-deps.sh && SUDO="" && disable_boot_start {unit}'
    done = subprocess.run(["bash", "-c", script], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"})
    assert done.returncode == 0, done.stderr
    assert f"systemctl disable {unit}.service" in log.read_text().splitlines()
    text = (REPO_ROOT / ".ci" / "system-deps.sh").read_text()
    install = text.index("apt-get install")
    assert "disable_boot_start prometheus" in text[install:], "the prometheus package's unit stays enabled"
