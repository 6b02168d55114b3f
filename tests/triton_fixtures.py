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


def compile_for_sm90(kernel, names: list[str], types: list[str], consts: dict, divisible: list[str],
                     pdl: bool = False, **options) -> tuple[str, str]:
    """`kernel` compiled by Triton for sm_90a on a GPU-less machine, with the constexprs `consts` and the launcher's
    divisibility-by-16 hints on the arguments `divisible`: (PTX, cuobjdump's "REG:..." resource line). A kernel with
    the `PDL` constexpr (model/kernels/pdl.py) gets it from `pdl`, launched as a dependent launch when on."""
    import tempfile

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    if "PDL" in kernel.arg_names:
        consts = consts | {"PDL": pdl}
        options = options | ({"launch_pdl": True} if pdl else {})

    signature = dict(zip(names, types)) | {k: "constexpr" for k in consts}
    hints = {(names.index(n),): [["tt.divisibility", 16]] for n in divisible}
    compiled = triton.compile(ASTSource(kernel, signature, consts, hints), target=GPUTarget("cuda", 90, 32),
                              options=options)
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(compiled.asm["cubin"])
        cubin.flush()
        usage = subprocess.run([triton.knobs.nvidia.cuobjdump.path, "--dump-resource-usage", cubin.name],
                               capture_output=True, text=True, check=True).stdout
    return compiled.asm["ptx"], next(line for line in usage.splitlines() if "REG:" in line)


def switch_setter(monkeypatch, name: str, cached, initial: str | None = None):
    """For a fixture (`yield from`): set_to(value) sets the environment switch `name` (None unsets it) and clears
    `cached`, the functools.cache'd function that reads it once per process; cleared again after the test.
    `initial`: a value set before the test starts."""
    def set_to(value):
        cached.cache_clear()
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, value)
    if initial is not None:
        set_to(initial)
    yield set_to
    cached.cache_clear()


def scattered_block_tables(lens: list[int], page: int, generator):
    """Block tables for sequences of `lens` tokens whose KV blocks are scattered at random over the cache, each table
    padded past the sequence's own blocks: (tables [len(lens), width] int64, width, num_blocks of the cache)."""
    import torch

    blocks_per_seq = [(n + page - 1) // page for n in lens]
    width = max(blocks_per_seq) + 2
    num_blocks = sum(blocks_per_seq) + 3
    order = torch.randperm(num_blocks, generator=generator).tolist()
    tables = torch.zeros(len(lens), width, dtype=torch.int64)
    for b, n in enumerate(blocks_per_seq):
        tables[b, :n] = torch.tensor([order.pop() for _ in range(n)])
    return tables, width, num_blocks
