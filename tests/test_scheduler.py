"""Block manager and scheduler, driven by a simulated model that writes tokens into a simulated paged cache.

The simulated cache checks what a real model relies on: every token a step reads (positions < context_len) is in
the slot its block table names, with the right token, even after blocks were freed and reused by preemption.
"""

import random

import pytest

from model.engine.block_manager import BlockManager, blocks_for
from model.engine.sampling_params import SamplingParams
from model.engine.scheduler import Scheduler
from model.engine.sequence import Sequence, SequenceStatus


def make_seq(i: int, prompt_len: int, max_tokens: int = 8) -> Sequence:
    prompt = [(i * 31 + j) % 1000 for j in range(prompt_len)]
    return Sequence(f"r{i}", prompt, SamplingParams(max_tokens=max_tokens, temperature=0.0), arrival_index=i)


class SimulatedModel:
    """Writes (request, position, token) into slots and verifies each sequence's whole context on every step."""

    def __init__(self, bm: BlockManager):
        self.bm = bm
        self.slots: dict[int, tuple[str, int, int]] = {}

    def run(self, out) -> list[int]:
        sampled = []
        for s in out.scheduled:
            seq = s.seq
            start = seq.num_computed_tokens
            end = start + s.num_new_tokens
            assert end <= len(seq.block_table) * self.bm.block_size, "block table too short for the chunk"
            for pos in range(start, end):
                self.slots[self.bm.slot(seq, pos)] = (seq.request_id, pos, seq.token_ids[pos])
            for pos in range(end):  # attention reads the whole context
                assert self.slots[self.bm.slot(seq, pos)] == (seq.request_id, pos, seq.token_ids[pos])
            if s.samples:
                sampled.append(sum(seq.token_ids) % 997)  # deterministic function of the context
        return sampled


def drive(sched: Scheduler, seqs: list[Sequence], arrivals: dict[int, list[Sequence]] | None = None,
          max_steps: int = 10_000) -> list:
    bm = sched.block_manager
    model = SimulatedModel(bm)
    arrivals = arrivals or {0: seqs}
    history = []
    for step in range(max_steps):
        for seq in arrivals.get(step, []):
            sched.add(seq)
        if not sched.has_unfinished() and step > max(arrivals):
            break
        out = sched.schedule()
        history.append(out)
        assert out.num_tokens <= sched.max_num_batched_tokens
        assert len(out.scheduled) <= sched.max_num_seqs
        assert len({id(s.seq) for s in out.scheduled}) == len(out.scheduled), "a sequence scheduled twice"
        assert all(s.seq.status == SequenceStatus.RUNNING for s in out.scheduled)
        used = sum(len(s.block_table) for s in sched.running)
        assert used == bm.num_blocks - bm.num_free_blocks, "blocks leaked or double counted"
        assert out.num_tokens == sum(s.num_new_tokens for s in out.scheduled)
        assert out.is_decode == all(s.num_new_tokens == 1 and s.samples for s in out.scheduled)
        arrival = [s.arrival_index for s in sched.running]
        assert arrival == sorted(arrival), "running must stay in arrival order (decodes are scheduled oldest first)"
        assert_tables_mirror_block_tables(bm, sched.running, sched.waiting)
        got = sched.update_after_step(out, model.run(out))
        for seq in got:
            if seq.num_output_tokens >= seq.params.max_tokens:
                sched.finish(seq, "length")
    else:
        raise AssertionError("did not finish")
    return history


def assert_tables_mirror_block_tables(bm: BlockManager, holding, not_holding=()) -> None:
    """Each sequence holding blocks owns a distinct row of bm.tables equal to its block table, zero after it."""
    rows = [seq.block_row for seq in holding if seq.block_table]
    assert len(set(rows)) == len(rows) and all(r >= 0 for r in rows), rows
    for seq in holding:
        if not seq.block_table:
            assert seq.block_row == -1
            continue
        row = bm.tables[seq.block_row].tolist()
        assert row[: len(seq.block_table)] == seq.block_table and not any(row[len(seq.block_table) :]), seq
    assert all(seq.block_row == -1 and not seq.block_table for seq in not_holding)


def test_block_tables_mirror_grows_and_reuses_rows():
    bm = BlockManager(num_blocks=64, block_size=2, first_block=1, max_seqs=1, max_blocks_per_seq=1)
    seqs = [make_seq(i, n) for i, n in enumerate([5, 1, 9])]
    for seq in seqs:
        bm.allocate(seq, seq.num_tokens)
    assert bm.tables.shape[0] >= 3 and bm.tables.shape[1] >= 5, "rows and columns grow on demand"
    assert_tables_mirror_block_tables(bm, seqs)
    bm.allocate(seqs[1], 4)  # one more block appended to an existing row
    assert_tables_mirror_block_tables(bm, seqs)
    freed_row = seqs[0].block_row
    bm.free(seqs[0])
    assert not bm.tables[freed_row].any(), "a freed row is zeroed"
    newcomer = make_seq(3, 2)
    bm.allocate(newcomer, 2)
    assert newcomer.block_row == freed_row
    assert_tables_mirror_block_tables(bm, [newcomer, *seqs[1:]], [seqs[0]])


def expected_tokens(seq: Sequence) -> list[int]:
    tokens = list(seq.prompt_token_ids)
    for _ in range(seq.params.max_tokens):
        tokens.append(sum(tokens) % 997)
    return tokens


def test_block_manager_allocates_frees_and_maps_slots():
    bm = BlockManager(num_blocks=4, block_size=4)
    a, b = make_seq(0, 5), make_seq(1, 3)
    assert bm.blocks_needed(a, 5) == 2 and blocks_for(5, 4) == 2
    bm.allocate(a, 5)
    bm.allocate(b, 3)
    assert bm.num_free_blocks == 1 and bm.usage == pytest.approx(0.75)
    assert bm.slot(a, 4) == a.block_table[1] * 4 + 0
    assert bm.slot(a, 3) == a.block_table[0] * 4 + 3
    assert len(set(a.block_table) | set(b.block_table)) == 3
    with pytest.raises(RuntimeError, match="out of KV blocks"):
        bm.allocate(b, 12)
    bm.allocate(a, 8)  # still two blocks, no growth
    assert bm.num_free_blocks == 1
    saved = list(a.block_table)
    bm.free(a)
    assert bm.num_free_blocks == 3 and a.block_table == []
    a.block_tables = [saved]
    with pytest.raises(RuntimeError, match="double free"):
        bm.free(a)


def test_chunked_prefill_respects_budget_and_outputs_match():
    bm = BlockManager(num_blocks=256, block_size=4)
    sched = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=32)
    seqs = [make_seq(i, n, max_tokens=6) for i, n in enumerate([70, 5, 33, 1, 64, 12])]
    history = drive(sched, seqs)
    first = history[0]
    assert [s.num_new_tokens for s in first.scheduled] == [32], "oldest prompt takes the whole first budget"
    assert any(len(out.scheduled) > 1 and not out.is_decode for out in history), "prefill and decode never mixed"
    for seq in seqs:
        assert seq.token_ids == expected_tokens(seq)
    assert bm.num_free_blocks == bm.num_blocks
    assert sched.num_preemptions_total == 0


def test_decodes_are_scheduled_before_prefill():
    bm = BlockManager(num_blocks=256, block_size=4)
    sched = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=16)
    early = [make_seq(i, 4, max_tokens=20) for i in range(3)]
    late = make_seq(3, 100, max_tokens=2)
    drive(sched, early, arrivals={0: early, 2: [late]})
    # run again, inspecting the step where the long prompt arrives: all decodes present, prompt gets the rest
    bm = BlockManager(num_blocks=256, block_size=4)
    sched = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=16)
    early = [make_seq(i, 4, max_tokens=20) for i in range(3)]
    late = make_seq(3, 100, max_tokens=2)
    for s in early:
        sched.add(s)
    model = SimulatedModel(bm)
    sched.update_after_step(out := sched.schedule(), model.run(out))
    sched.add(late)
    out = sched.schedule()
    decodes = [s for s in out.scheduled if s.num_new_tokens == 1 and s.samples]
    assert {s.seq.request_id for s in decodes} == {"r0", "r1", "r2"}
    assert out.scheduled[:3] == decodes
    assert out.scheduled[3].seq is late and out.scheduled[3].num_new_tokens == 16 - 3
    assert not out.scheduled[3].samples


def test_max_num_seqs_limits_running():
    bm = BlockManager(num_blocks=256, block_size=4)
    sched = Scheduler(bm, max_num_seqs=3, max_num_batched_tokens=512)
    seqs = [make_seq(i, 6, max_tokens=4) for i in range(10)]
    history = drive(sched, seqs)
    assert max(len(out.scheduled) for out in history) == 3
    assert all(seq.token_ids == expected_tokens(seq) for seq in seqs)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_preemption_by_recompute_keeps_outputs(seed):
    rng = random.Random(seed)
    bm = BlockManager(num_blocks=12, block_size=4)  # 48 token slots for ~10 sequences of up to 30 tokens
    sched = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=24)
    seqs = [make_seq(i, rng.randint(1, 18), max_tokens=rng.randint(1, 12)) for i in range(10)]
    arrivals: dict[int, list[Sequence]] = {}
    for seq in seqs:
        arrivals.setdefault(rng.randint(0, 6), []).append(seq)
    drive(sched, seqs, arrivals)
    assert sched.num_preemptions_total > 0, "the test did not exercise preemption"
    assert any(seq.num_preemptions for seq in seqs)
    for seq in seqs:
        assert seq.token_ids == expected_tokens(seq)
    assert bm.num_free_blocks == bm.num_blocks


def test_preempted_sequence_restarts_from_scratch_and_oldest_keeps_running():
    bm = BlockManager(num_blocks=4, block_size=4)
    sched = Scheduler(bm, max_num_seqs=4, max_num_batched_tokens=64)
    old, new = make_seq(0, 8, max_tokens=8), make_seq(1, 7, max_tokens=8)
    sched.add(old)
    sched.add(new)
    model = SimulatedModel(bm)
    out = sched.schedule()  # both prompts fit: 2 + 2 blocks
    assert [s.num_new_tokens for s in out.scheduled] == [8, 7]
    sched.update_after_step(out, model.run(out))
    out = sched.schedule()  # old needs a third block (position 8): `new` is preempted
    assert out.preempted == [new]
    assert new.status == SequenceStatus.WAITING and new.num_computed_tokens == 0 and new.block_table == []
    assert new.num_tokens == 8, "the sampled token survives preemption and is recomputed"
    assert [s.seq for s in out.scheduled] == [old]


def test_abort_frees_blocks_everywhere():
    bm = BlockManager(num_blocks=64, block_size=4)
    sched = Scheduler(bm, max_num_seqs=1, max_num_batched_tokens=64)
    running, waiting = make_seq(0, 10), make_seq(1, 10)
    sched.add(running)
    sched.add(waiting)
    sched.schedule()
    assert running.status == SequenceStatus.RUNNING and bm.num_free_blocks == 61
    assert sched.abort("r0") is running and running.finish_reason == "abort"
    assert bm.num_free_blocks == 64 and not sched.running
    assert sched.abort("r1") is waiting and not sched.waiting
    assert sched.abort("r1") is None and sched.abort("nope") is None
    assert not sched.has_unfinished()
