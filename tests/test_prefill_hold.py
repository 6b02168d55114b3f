"""Scheduler `prefill_hold_steps`: while sequences decode, prompts that arrive one by one wait (a bounded number of
steps) and prefill together, so fewer steps are mixed (eager on the GPU). Outputs must not change, only when."""

import random

import pytest

from model.engine import EngineConfig, LLMEngine, SamplingParams
from model.engine.block_manager import BlockManager
from model.engine.scheduler import Scheduler
from tests.test_scheduler import drive, expected_tokens, make_seq


def admissions(history) -> list[tuple[int, list[str]]]:
    """(step, request ids) of the steps that prefilled prompts (every prompt here fits one chunk)."""
    found = []
    for step, out in enumerate(history):
        ids = [s.seq.request_id for s in out.scheduled if s.num_new_tokens > 1]
        if ids:
            found.append((step, ids))
    return found


def staggered(hold: int, budget: int = 512, max_num_seqs: int = 16):
    """4 long decoders from step 0, then one short prompt arriving at each of steps 3..8."""
    sched = Scheduler(BlockManager(num_blocks=512, block_size=4), max_num_seqs=max_num_seqs,
                      max_num_batched_tokens=budget, prefill_hold_steps=hold)
    first = [make_seq(i, 6, max_tokens=40) for i in range(4)]
    late = [make_seq(10 + i, 5, max_tokens=3) for i in range(6)]
    arrivals = {0: first, **{3 + i: [seq] for i, seq in enumerate(late)}}
    history = drive(sched, first + late, arrivals)
    return history, first + late


def test_prompts_arriving_one_a_step_are_admitted_together_and_outputs_stay_the_same():
    history, seqs = staggered(hold=4)
    assert all(seq.token_ids == expected_tokens(seq) for seq in seqs)
    late = admissions(history)[1:]  # the first is the four decoders' prefill
    # r10 arrives before step 3's schedule and waits 3 steps; r11..r13 join it; r14, r15 form the next group
    assert late == [(6, ["r10", "r11", "r12", "r13"]), (10, ["r14", "r15"])], late
    held_steps = [out for step, out in enumerate(history) if 3 <= step <= 9 and step != 6]
    assert all(out.is_decode for out in held_steps), "the steps between the groups are pure decode steps"


def test_without_a_hold_every_arrival_makes_a_mixed_step():
    history, seqs = staggered(hold=0)
    assert all(seq.token_ids == expected_tokens(seq) for seq in seqs)
    assert [step for step, _ in admissions(history)[1:]] == [3, 4, 5, 6, 7, 8]


def test_no_hold_when_nothing_decodes():
    sched = Scheduler(BlockManager(num_blocks=64, block_size=4), max_num_seqs=8, max_num_batched_tokens=64,
                      prefill_hold_steps=10)
    sched.add(make_seq(0, 9))
    out = sched.schedule()
    assert [s.seq.request_id for s in out.scheduled] == ["r0"], "an idle engine admits at once"


def decoding_scheduler(max_num_seqs: int, budget: int) -> Scheduler:
    """A scheduler with hold 10 and one sequence, r0, decoding."""
    sched = Scheduler(BlockManager(num_blocks=256, block_size=4), max_num_seqs=max_num_seqs,
                      max_num_batched_tokens=budget, prefill_hold_steps=10)
    sched.add(make_seq(0, 4, max_tokens=30))
    sched.update_after_step(sched.schedule(), [1])
    return sched


def test_no_hold_once_the_admissible_prompts_make_a_full_step():
    sched = decoding_scheduler(max_num_seqs=16, budget=20)
    for i in (1, 2):
        sched.add(make_seq(i, 10))  # 20 tokens = the budget
    out = sched.schedule()
    assert {s.seq.request_id for s in out.scheduled} == {"r0", "r1", "r2"}


def test_prompts_that_no_free_slot_could_take_do_not_end_the_hold():
    # 2 free slots and a queue of 6 long prompts: the two that fit make 10 tokens, under the 20-token budget
    sched = decoding_scheduler(max_num_seqs=3, budget=20)
    for i in range(1, 7):
        sched.add(make_seq(i, 5 if i <= 2 else 50))
    out = sched.schedule()
    assert [s.seq.request_id for s in out.scheduled] == ["r0"], "held: the queue beyond the free slots is not a step"
    # at concurrency = max_num_seqs (each arrival takes the slot its predecessor freed) the hold still holds
    sched = decoding_scheduler(max_num_seqs=2, budget=20)
    sched.add(make_seq(1, 5))
    assert [s.seq.request_id for s in sched.schedule().scheduled] == ["r0"]


def test_a_step_that_prefills_anyway_admits_at_once():
    sched = Scheduler(BlockManager(num_blocks=256, block_size=4), max_num_seqs=8, max_num_batched_tokens=8,
                      prefill_hold_steps=10)
    sched.add(make_seq(0, 4, max_tokens=30))
    sched.update_after_step(sched.schedule(), [1])  # r0 decodes from now on
    sched.add(make_seq(1, 12))  # longer than the budget: prefilled in chunks
    for _ in range(12):  # held until the hold expires
        out = sched.schedule()
        sched.update_after_step(out, [1])
        if len(out.scheduled) > 1:
            break
    assert out.num_non_decode == 1, "r1's first chunk"
    sched.add(make_seq(2, 3))
    out = sched.schedule()  # r1's second chunk makes the step eager: r2 rides along
    assert [s.seq.request_id for s in out.scheduled] == ["r0", "r1", "r2"]


def test_config_rejects_a_negative_hold():
    with pytest.raises(ValueError, match="prefill_hold_steps"):
        EngineConfig(prefill_hold_steps=-1)


def run_engine(hold: int) -> tuple[dict[str, list[int]], int]:
    """Greedy tiny-model requests arriving one per step while others decode: (tokens per request, mixed steps)."""
    engine = LLMEngine(EngineConfig(model="tiny", device="cpu", max_num_seqs=8, max_num_batched_tokens=256,
                                    num_kv_blocks=128, prefill_hold_steps=hold))
    rng = random.Random(5)
    prompts = [[rng.randrange(256) for _ in range(rng.randint(5, 30))] for _ in range(7)]
    tokens: dict[str, list[int]] = {}
    mixed = 0
    for step in range(200):
        if step < len(prompts):
            engine.add_request(f"q{step}", prompts[step], SamplingParams(max_tokens=12 if step else 40,
                                                                         temperature=0.0, ignore_eos=True))
        if not engine.has_unfinished_requests():
            break
        sched = engine.scheduler
        before = engine.scheduler.schedule

        def schedule():
            out = before()
            nonlocal mixed
            mixed += bool(out.num_non_decode) and out.num_non_decode < len(out.scheduled)
            return out
        sched.schedule = schedule
        for out in engine.step():
            tokens.setdefault(out.request_id, []).extend(out.new_token_ids)
        sched.schedule = before
    return tokens, mixed


def test_engine_outputs_are_identical_with_a_hold_and_it_has_fewer_mixed_steps():
    plain, plain_mixed = run_engine(0)
    held, held_mixed = run_engine(4)
    assert len(plain) == 7 and all(len(t) == (40 if r == "q0" else 12) for r, t in plain.items())
    assert held == plain
    assert held_mixed < plain_mixed, (held_mixed, plain_mixed)
