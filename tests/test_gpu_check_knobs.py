"""scripts/gpu_check.sh layer-knob-ab on this machine, with a stand-in `python3` that records the environment each
benchmark and test run gets: 0/1 switches and NAME=VALUE switches are set as documented (on at 1 or VALUE, off at
0), one variable listed with two values ends on the value of the setting that names it."""

import os
import stat
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run_ab(tmp_path, knobs: str, settings: str) -> list[str]:
    fake = tmp_path / "bin"
    fake.mkdir()
    log = tmp_path / "calls.txt"
    script = fake / "python3"
    script.write_text("#!/bin/sh\n"
                      f'echo "$* | A=$STATICMOE_AB_ONOFF S=$STATICMOE_AB_CYCLES" >> {log}\n')
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    env = dict(os.environ, PATH=f"{fake}:{os.environ['PATH']}", OUT=str(tmp_path / "out"), AB_KNOB=knobs,
               AB_SETTINGS=settings, AB_PASSES="a", AB_TESTS="tests/x.py", AB_POINTS="fp8:qwen3:64:balanced")
    run = subprocess.run(["bash", "scripts/gpu_check.sh", "layer-knob-ab"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stdout + run.stderr
    return [line for line in log.read_text().splitlines() if "profile_moe.py" in line or "pytest" in line]


def test_value_switches_and_their_settings(tmp_path):
    value1, value2 = "STATICMOE_AB_CYCLES=800", "STATICMOE_AB_CYCLES=1600"
    calls = run_ab(tmp_path, f"STATICMOE_AB_ONOFF {value1} {value2}",
                   f"none {value1} {value2} STATICMOE_AB_ONOFF+{value2}")
    tests = [c.split(" | ")[1] for c in calls if "pytest" in c]
    assert tests == ["A=1 S=", "A= S=800", "A= S=1600"]  # each switch alone, then unset again
    bench = [c.split(" | ")[1] for c in calls if "profile_moe.py" in c]
    assert bench == ["A=0 S=0", "A=0 S=800", "A=0 S=1600", "A=1 S=1600"]
