"""model/kernels/jit_monitor.py: after start-up, each first use of a Triton kernel specialisation is counted and
logged; the hook chains the one installed before and never asks Triton to skip a compile. Triton's runtime knobs
are stood in for by a plain object (CI has no Triton); on the GPU the real hook is exercised by any new shape."""

import logging

import pytest

from model.kernels import jit_monitor


class Knobs:
    jit_cache_hook = None


@pytest.fixture
def fresh(monkeypatch):
    monkeypatch.setattr(jit_monitor, "_installed", False)
    monkeypatch.setattr(jit_monitor, "_count", 0)


def test_new_specialisations_are_counted_and_logged_and_compiles_go_on(fresh, caplog):
    seen = []
    knobs = Knobs()
    knobs.jit_cache_hook = lambda **kw: seen.append(kw["repr"])  # a hook already there (returns None)
    assert jit_monitor.start(knobs)
    with caplog.at_level(logging.WARNING, logger="model.kernels.jit_monitor"):
        skip = knobs.jit_cache_hook(key="k1", repr="_paged_decode_kernel[SPLITS=8](...)", fn=None, compile={},
                                    is_manual_warmup=False, already_compiled=False)
        knobs.jit_cache_hook(key="k2", repr="_write_rows_kernel(...)", fn=None, compile={},
                             is_manual_warmup=False, already_compiled=False)
    assert not skip  # a truthy return would make Triton skip the compile and launch nothing
    assert jit_monitor.specializations_after_start() == 2
    assert seen == ["_paged_decode_kernel[SPLITS=8](...)", "_write_rows_kernel(...)"]  # chained
    assert "SPLITS=8" in caplog.text and "#2" in caplog.text


def test_manual_warmups_are_not_counted_and_start_is_idempotent(fresh):
    knobs = Knobs()
    assert jit_monitor.start(knobs) and jit_monitor.start(knobs)
    hook = knobs.jit_cache_hook
    assert not hook(key="k", repr="k()", fn=None, compile={}, is_manual_warmup=True, already_compiled=False)
    assert jit_monitor.specializations_after_start() == 0
    assert knobs.jit_cache_hook is hook  # the second start() did not wrap the hook again


def test_without_triton_nothing_is_installed(fresh, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_triton(name, *args, **kwargs):
        if name == "triton":
            raise ImportError("no triton here")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_triton)
    assert jit_monitor.start() is False
    assert jit_monitor.specializations_after_start() == 0
