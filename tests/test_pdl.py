"""Programmatic dependent launch (model/kernels/pdl.py) on the CPU: the switch, that every kernel taking `PDL` waits
for its predecessor before anything else (the rule that makes early launch safe), and sm_90a builds whose PTX
carries the grid-dependency wait before any global load or store, and nothing of it with PDL off."""

import ast
import inspect
import re

import pytest

from model.kernels import pdl
from tests.triton_fixtures import needs_triton, switch_setter

MODULES = ["model.kernels.triton_decode_moe", "model.kernels.triton_decode_moe_fp8", "model.kernels.triton_gemv",
           "model.kernels.triton_fp8_gemv", "model.kernels.triton_router_gemv", "model.layers.triton_decode_attention",
           "model.layers.triton_cache_write", "model.layers.triton_norm_rotary_write"]


@pytest.fixture
def switch(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    yield from switch_setter(monkeypatch, "STATICMOE_PDL", pdl.enabled)


def test_launch_options_follow_the_switch_the_device_and_the_interpreter(switch, monkeypatch):
    switch("0")
    assert pdl.launch() == {"PDL": False}
    switch("1")
    assert pdl.launch() == {"PDL": True, "launch_pdl": True}
    assert pdl.launch(device_is_cuda=False) == {"PDL": False}
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert pdl.launch() == {"PDL": False}
    switch("yes")
    with pytest.raises(ValueError, match="STATICMOE_PDL='yes': want 0 or 1"):
        pdl.launch()


def _pdl_kernels():
    """(module, kernel name, its source's AST) of every jitted kernel in MODULES with a PDL parameter."""
    import importlib

    found = []
    for name in MODULES:
        tree = ast.parse(inspect.getsource(importlib.import_module(name)))
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef) and any(a.arg == "PDL" for a in node.args.args):
                found.append((name, node.name, node))
    return found


def _first_statement(node) -> ast.stmt:
    return next(s for s in node.body if not (isinstance(s, ast.Expr) and isinstance(s.value, ast.Constant)))


def _helpers(kernels) -> set[str]:
    """Jitted helpers taking PDL that begin with the wait themselves (a kernel may start by calling one)."""
    return {name for _, name, node in kernels if ast.unparse(_first_statement(node)) == "wait_for_predecessor(PDL)"
            and any(isinstance(c, ast.Call) and getattr(c.func, "id", None) == name
                    for _, _, other in kernels for c in ast.walk(other))}


def test_every_pdl_kernel_waits_first():
    kernels = _pdl_kernels()
    assert len(kernels) >= 12, [k[1] for k in kernels]  # the decode path's kernels (pdl.py's docstring)
    helpers = _helpers(kernels)
    for module, name, node in kernels:
        first = _first_statement(node)
        call = first.value if isinstance(first, (ast.Expr, ast.Assign)) else None
        ok = ast.unparse(first) == "wait_for_predecessor(PDL)" or (
            isinstance(call, ast.Call) and getattr(call.func, "id", None) in helpers
            and any(ast.unparse(a) == "PDL" for a in call.args))
        assert ok, (module, name, ast.unparse(first))


def test_every_pdl_kernel_is_launched_with_the_options():
    """Each `kernel[grid](...)` call of a kernel taking PDL passes `**pdl.launch(...)` (the constexpr and the launch
    attribute together: a wait without the attribute is harmless, the attribute without the wait is not)."""
    import importlib

    kernels = _pdl_kernels()
    with_pdl = {name for _, name, _ in kernels} - _helpers(kernels)
    seen = set()
    for module in MODULES:
        for node in ast.walk(ast.parse(inspect.getsource(importlib.import_module(module)))):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Subscript) and \
                    isinstance(node.func.value, ast.Name) and node.func.value.id in with_pdl:
                spread = [ast.unparse(k.value) for k in node.keywords if k.arg is None]
                assert any(s.startswith("pdl.launch(") for s in spread), (module, node.func.value.id, spread)
                seen.add(node.func.value.id)
    assert seen == with_pdl, with_pdl - seen


@needs_triton
@pytest.mark.parametrize("on", [True, False])
def test_sm90_build_waits_before_touching_memory(on):
    from tests.test_triton_gemv import compile_decode_gemm

    ptx, _ = compile_decode_gemm(128, pdl=on)
    if not on:
        assert "griddepcontrol" not in ptx
        return
    wait = ptx.index("griddepcontrol.wait")
    # the successor launches as programs exit, not early (an early trigger measured slower: model/kernels/pdl.py)
    assert "griddepcontrol.launch_dependents" not in ptx
    memory = [m.start() for m in re.finditer(r"\b(ld|st|cp\.async|atom|red)\.(global|shared\.global)", ptx)]
    assert memory and min(memory) > wait, "a global access before the wait"


def test_the_decode_moe_bench_switches_it_on_only_inside(switch):
    from benchmarks.bench_decode_moe import pdl_on

    switch("0")
    with pdl_on():
        assert pdl.launch() == {"PDL": True, "launch_pdl": True}
    assert pdl.launch() == {"PDL": False}
