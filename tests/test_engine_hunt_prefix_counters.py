"""The prefix-cache counters (vLLM's prefix_cache_queries / prefix_cache_hits, docs/service.md "Metrics") count the
prompt tokens *looked up* in the cache. A request with prompt_logprobs takes no cached prefix (cached positions
give no logits), so it is not looked up: vLLM returns before recording it (KVCacheManager.get_computed_blocks skips
requests with skip_reading_prefix_cache, which prompt_logprobs sets). Counting its tokens as queries with 0 hits
lowered the reported hit rate below the rate the lookups had."""

from model.engine.block_manager import BlockManager
from model.engine.sampling_params import SamplingParams
from model.engine.scheduler import Scheduler
from model.engine.sequence import Sequence

BS = 4


def run_to_end(sched: Scheduler) -> None:
    for _ in range(200):
        if not sched.has_unfinished():
            return
        out = sched.schedule()
        sched.update_after_step(out, [7] * sum(s.samples for s in out.scheduled))
        for seq in list(sched.running):
            if seq.num_output_tokens >= seq.params.max_tokens:
                sched.finish(seq, "length")
    raise AssertionError("did not finish")


def test_a_prompt_logprobs_request_is_not_counted_as_a_lookup():
    sched = Scheduler(BlockManager(num_blocks=32, block_size=BS), max_num_seqs=4, max_num_batched_tokens=64)
    prompt = list(range(1, 14))  # 13 tokens: 3 full blocks can be shared
    sched.add(Sequence("warm", prompt, SamplingParams(max_tokens=1), 0))
    run_to_end(sched)
    assert (sched.prefix_cache_queries_total, sched.prefix_cache_hits_total) == (13, 0)

    with_logprobs = Sequence("plp", prompt, SamplingParams(max_tokens=1, prompt_logprobs=1), 1)
    sched.add(with_logprobs)
    run_to_end(sched)
    assert with_logprobs.num_cached_tokens == 0, "a prompt_logprobs request computes every prompt position"
    assert (sched.prefix_cache_queries_total, sched.prefix_cache_hits_total) == (13, 0), \
        "a request that takes no cached prefix was counted as a lookup that missed"

    again = Sequence("again", prompt, SamplingParams(max_tokens=1), 2)
    sched.add(again)
    run_to_end(sched)
    assert again.num_cached_tokens == 12
    assert (sched.prefix_cache_queries_total, sched.prefix_cache_hits_total) == (26, 12)
