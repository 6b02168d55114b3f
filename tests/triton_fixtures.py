"""Running a Triton kernel check script on the CPU under Triton's interpreter, or compiled on the GPU.

TRITON_INTERPRET=1 must be set before a kernel is defined, so the CPU run is a subprocess. A script ends by printing
'ok'; the GPU run executes it in this process without that line.
"""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="Triton is not installed")


def run_interpreted(script: str, timeout: float = 900) -> None:
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=os.pathsep.join(filter(None, [
        str(ROOT), os.environ.get("PYTHONPATH")])))
    run = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=timeout)
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stderr[-3000:]


def run_compiled(script: str) -> None:
    import torch

    namespace = {}
    exec(script.replace("print('ok')", ""), namespace)  # noqa: S102 (our own test code)
    torch.cuda.synchronize()
