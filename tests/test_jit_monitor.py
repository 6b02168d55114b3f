"""model/kernels/jit_monitor.py: while armed (after an engine's start-up), each first use of a Triton kernel
specialisation is counted and logged with the kernel's name and constants; the hook chains the one installed before
and never asks Triton to skip a compile. Triton's runtime knobs are stood in for by a plain object and the hook is
called with the keyword arguments Triton 3.6's `JITFunction._call_hook` passes (CI has no Triton)."""

import logging

import pytest

from model.kernels import jit_monitor


class Knobs:
    jit_cache_hook = None


class JitFunction:  # what Triton passes as `fn`: its `.name` is the kernel's
    name = "_paged_decode_kernel"


def triton_kwargs(constants: dict, is_manual_warmup=False) -> dict:
    """As Triton 3.6 calls the hook; its `repr` is built from a string key and comes out cut to one character."""
    return dict(key="[('*bf16', 'D'), ...]{'num_warps': 4}", repr="_paged_decode_kernel[num_warps=4](q_ptr: (",
                fn=JitFunction(), compile={"constants": constants, "configs": [{(3,): [["tt.divisibility", 16]]}],
                                           "signature": {"q_ptr": "*bf16"}},
                is_manual_warmup=is_manual_warmup, already_compiled=False)


@pytest.fixture
def fresh(monkeypatch):
    for name, value in (("_installed", False), ("_armed", False), ("_count", 0)):
        monkeypatch.setattr(jit_monitor, name, value)


def test_new_specialisations_are_counted_named_and_compiles_go_on(fresh, caplog):
    seen = []
    knobs = Knobs()
    knobs.jit_cache_hook = lambda **kw: seen.append(kw["fn"].name)  # a hook already there (returns None)
    assert jit_monitor.start(knobs)
    with caplog.at_level(logging.WARNING, logger="model.kernels.jit_monitor"):
        skip = knobs.jit_cache_hook(**triton_kwargs({"SPLITS": 8, "HAS_SINKS": False}))
        knobs.jit_cache_hook(**triton_kwargs({"SPLITS": 16, "HAS_SINKS": False}))
    assert not skip  # a truthy return would make Triton skip the compile and launch nothing
    assert jit_monitor.specializations_after_start() == 2
    assert seen == ["_paged_decode_kernel", "_paged_decode_kernel"]  # chained
    assert "_paged_decode_kernel (specialisation {(3,): [['tt.divisibility', 16]]}; constants SPLITS=8, " \
        "HAS_SINKS=False" in caplog.text  # the specialisation first, then the constants
    assert "SPLITS=16" in caplog.text and "#2" in caplog.text and "tt.divisibility" in caplog.text


def test_paused_during_another_start_up_and_manual_warmups_not_counted(fresh):
    knobs = Knobs()
    assert jit_monitor.start(knobs)
    hook = knobs.jit_cache_hook
    assert not hook(**triton_kwargs({"SPLITS": 1}, is_manual_warmup=True))
    jit_monitor.pause()  # a second engine of the process starts up: its compiles are its warm-up
    assert not hook(**triton_kwargs({"SPLITS": 2}))
    assert jit_monitor.specializations_after_start() == 0
    assert jit_monitor.start(knobs) and knobs.jit_cache_hook is hook  # re-armed, not wrapped twice
    hook(**triton_kwargs({"SPLITS": 4}))
    assert jit_monitor.specializations_after_start() == 1


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


def test_a_kernel_the_monitor_cannot_describe_still_compiles(fresh):
    class Weird:  # constants whose items() raises
        def items(self):
            raise RuntimeError("odd constants")

        def __bool__(self):
            return True

    knobs = Knobs()
    assert jit_monitor.start(knobs)
    kwargs = triton_kwargs({})
    kwargs["compile"]["constants"] = Weird()
    assert not knobs.jit_cache_hook(**kwargs)  # no exception, and Triton is told to go on
