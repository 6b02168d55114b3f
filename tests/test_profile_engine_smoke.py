"""benchmarks/profile_engine.py wraps engine internals by name (LLMEngine._forward, runner.execute, ...): a CPU dry
run of `step-phases` on the tiny model catches a rename before a GPU session finds it (one did: `_launch`).
`prefill` times with CUDA events: GPU only."""

from benchmarks import profile_engine


def test_step_phases_dry_run_times_every_phase(capsys):
    for metrics in (True, False):
        profile_engine.step_phases("tiny", batches=(2,), input_len=16, output_len=8, expert_metrics=metrics)
    out = capsys.readouterr().out
    for phase in ("schedule", "execute", "_forward", "_sample", "_read_back", "_emit_pending"):
        assert f"    {phase} " in out, phase
    assert out.count("tiny batch 2:") == 2

