"""`reset_prefix_cache` while requests run (vLLM's admin call, docs/service.md: "use it after changing weights, or
before a cold-cache benchmark"; running requests keep their blocks). A request running at the reset goes on
attending to K/V computed before it, so the blocks it fills afterwards derive from pre-reset state too: they must
not be cached. They were: once a new request had cached the prefix again, a third one hit the running request's
post-reset blocks, whose K/V were computed over the old prefix (stale after a weight change; a 'cold' cache that
still hands out warm blocks). A request admitted after the reset caches as usual, and so does a running one once
it is preempted and recomputed.

Fixed by a reset count in the block manager: a sequence commits only in the count it took its first block in
(vLLM avoids the question by refusing the reset while any block is in use)."""


from model.engine.block_manager import BlockManager
from model.engine.sampling_params import SamplingParams
from model.engine.scheduler import Scheduler
from model.engine.sequence import Sequence

BS = 4


def compute(bm: BlockManager, seq: Sequence, end: int) -> None:
    """One launched step computing seq's tokens up to `end`, as Scheduler.advance commits them."""
    bm.allocate(seq, end)
    seq.num_computed_tokens = end
    bm.commit(seq)


def admit(bm: BlockManager, seq: Sequence) -> list[int]:
    hit = bm.cached_prefix(seq)
    bm.take_prefix(seq, hit)
    seq.num_computed_tokens = len(hit) * BS
    return list(hit)


def test_blocks_filled_after_a_reset_by_a_request_running_across_it_are_never_shared():
    bm = BlockManager(num_blocks=64, block_size=BS)
    tokens = list(range(1, 22))  # 5 full blocks + 1 token
    old = Sequence("old", tokens, SamplingParams(max_tokens=1), 0)
    compute(bm, old, 12)  # blocks 0-2 before the reset
    assert bm.num_cached_blocks == 3
    assert bm.reset_prefix_cache() == 3
    compute(bm, old, 20)  # blocks 3-4 after it, attending to blocks 0-2 computed before it
    stale = set(old.block_table)

    fresh = Sequence("fresh", tokens, SamplingParams(max_tokens=1), 1)
    assert admit(bm, fresh) == [], "the reset forgot every cached block"
    compute(bm, fresh, 20)  # all five blocks again, after the reset
    later = Sequence("later", tokens, SamplingParams(max_tokens=1), 2)
    hit = admit(bm, later)
    assert not set(hit) & stale, f"a block computed over pre-reset K/V was shared after the reset: {hit}"
    assert hit == fresh.block_table[:5], "the blocks computed after the reset are shared"


def test_a_request_preempted_after_the_reset_caches_its_recompute():
    bm = BlockManager(num_blocks=64, block_size=BS)
    sched = Scheduler(bm, max_num_seqs=4, max_num_batched_tokens=8, watermark=0.0)
    seq = Sequence("a", list(range(1, 18)), SamplingParams(max_tokens=4), 0)
    sched.add(seq)
    out = sched.schedule()
    sched.update_after_step(out, [])  # 8 tokens: 2 blocks cached
    sched.block_manager.reset_prefix_cache()
    sched._preempt(seq, out)  # its blocks go (plain: nothing cached any more); it is recomputed from scratch
    while seq.num_computed_tokens < 16:
        out = sched.schedule()
        sched.update_after_step(out, [5] * sum(s.samples for s in out.scheduled))
    assert bm.num_cached_blocks == 4, "a recompute after the reset attends to post-reset K/V only: cached"
