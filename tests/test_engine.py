"""LLMEngine end to end on the CPU: continuous batching, chunked prefill, preemption, abort, seeds, stop conditions,
limits, a stepping thread, MoE stats; greedy output against HF transformers `generate` as the reference."""

import random

import pytest

from benchmarks.moe_cases import moe_flops_per_token
from model.engine import EngineConfig, LLMEngine, SamplingParams
from tests.engine_fixtures import (  # noqa: F401 - fixtures
    GREEDY, one_cpu_thread, random_prompts, run, solo, text_of, tiny, tokens_of,
)
from tests.model_fixtures import hf_greedy, make_hf_model, save_checkpoint


def test_requests_join_and_leave_and_match_running_alone(tiny, solo):
    prompts = random_prompts(12, seed=0)
    rng = random.Random(1)
    requests = {f"r{i}": (p, SamplingParams(max_tokens=rng.randint(1, 20), **GREEDY)) for i, p in enumerate(prompts)}
    arrivals: dict[int, list[str]] = {}
    for rid in requests:
        arrivals.setdefault(rng.randint(0, 40), []).append(rid)
    running_per_step = []
    outputs = run(tiny, requests, arrivals, on_step=lambda s, e: running_per_step.append(e.stats().num_running))
    assert max(running_per_step) > 3, "requests never ran together"
    left = [i for i in range(1, len(running_per_step)) if 0 < running_per_step[i] < running_per_step[i - 1]]
    joined_later = [i for i in range(1, len(running_per_step)) if running_per_step[i] > running_per_step[i - 1]
                    and left and i > left[0]]
    assert left and joined_later, f"no request left while others ran, then another joined: {running_per_step}"
    for rid, (prompt, params) in requests.items():
        outs = outputs[rid]
        assert outs[-1].finished and outs[-1].finish_reason == "length" and not any(o.finished for o in outs[:-1])
        assert tokens_of(outs) == solo(prompt, params.max_tokens), rid
        assert text_of(outs) == tiny.tokenizer.decode(tokens_of(outs))
        assert outs[-1].num_prompt_tokens == len(prompt) and outs[-1].num_output_tokens == params.max_tokens
    stats = tiny.stats()
    assert (stats.num_running, stats.num_waiting, stats.kv_cache_usage) == (0, 0, 0.0)


def test_greedy_matches_hf_generate_with_chunking_and_preemption(tmp_path):
    """A transformers-built checkpoint served by the engine with a tiny KV cache (forcing preemption) and a small
    token budget (forcing chunked prefill, mixed prefill/decode steps) gives HF `generate`'s greedy tokens."""
    hf = make_hf_model("qwen3_moe", seed=5)
    directory = save_checkpoint(hf, tmp_path / "ckpt")
    engine = LLMEngine(EngineConfig(model=str(directory), dtype="float32", block_size=4, num_kv_blocks=40,
                                    max_num_batched_tokens=24, max_num_seqs=6))
    rng = random.Random(2)
    requests = {f"h{i}": ([rng.randrange(320) for _ in range(rng.randint(8, 40))],
                          SamplingParams(max_tokens=16, **GREEDY)) for i in range(6)}
    outputs = run(engine, requests)
    assert engine.stats().num_preemptions_total > 0, "the KV cache was not small enough to preempt"
    for rid, (prompt, params) in requests.items():
        assert tokens_of(outputs[rid]) == hf_greedy(hf, prompt, 16), rid
    assert engine.stats().kv_cache_usage == 0.0


def test_preemption_on_tiny_kv_cache_keeps_greedy_output(solo):
    engine = LLMEngine(EngineConfig(model="tiny", num_kv_blocks=10, max_num_seqs=8, max_num_batched_tokens=64))
    prompts = random_prompts(6, seed=3, lengths=(40, 60, 20, 70, 33, 50))
    requests = {f"p{i}": (p, SamplingParams(max_tokens=24, **GREEDY)) for i, p in enumerate(prompts)}
    outputs = run(engine, requests)
    assert engine.stats().num_preemptions_total > 0
    for rid, (prompt, params) in requests.items():
        assert tokens_of(outputs[rid]) == solo(prompt, 24), rid
    assert engine.stats().kv_cache_usage == 0.0


def test_abort_frees_blocks_at_once():
    engine = LLMEngine(EngineConfig(model="tiny", max_num_seqs=2, max_num_batched_tokens=256, num_kv_blocks=64))
    params = SamplingParams(max_tokens=50, **GREEDY)
    for i in range(3):
        engine.add_request(f"a{i}", list(range(40 + i)), params)
    early = engine.step() + engine.step() + engine.step()
    stats = engine.stats()
    assert (stats.num_running, stats.num_waiting) == (2, 1)
    usage_before = stats.kv_cache_usage
    engine.abort_request("a0")  # running
    engine.abort_request("a2")  # waiting
    engine.abort_request("never-added")
    stats = engine.stats()
    assert (stats.num_running, stats.num_waiting) == (1, 0)
    assert stats.kv_cache_usage == pytest.approx(usage_before / 2)  # a0 and a1 held 3 blocks each
    outs = engine.step()
    aborted = {o.request_id: o for o in outs if o.finish_reason == "abort"}
    assert set(aborted) == {"a0", "a2"} and all(o.finished and not o.new_token_ids for o in aborted.values())
    received_a0 = sum(len(o.new_token_ids) for o in early if o.request_id == "a0")
    assert received_a0 >= 1 and aborted["a0"].num_output_tokens == received_a0
    assert aborted["a2"].num_output_tokens == 0
    assert not any(o.request_id == "a0" for o in outs if o.finish_reason != "abort"), "no tokens after the abort"
    rest = run(engine, {}, arrivals={0: []})
    a1 = [o for o in early + outs if o.request_id == "a1"] + rest["a1"]
    assert len(tokens_of(a1)) == 50 and a1[-1].finish_reason == "length"
    engine.abort_request("a1")  # finished: no-op, no output
    assert engine.step() == [] and engine.stats().kv_cache_usage == 0.0
    engine.add_request("a0", [1, 2, 3], SamplingParams(max_tokens=2))  # ids are reusable once finished


def test_stop_string_found_late_drops_the_extra_token(tiny, solo):
    """Stop strings are checked while the next step runs; the token computed meanwhile must not leak out."""
    prompt = random_prompts(1, seed=12, lengths=(25,))[0]
    full = solo(prompt, 30)
    tok = tiny.tokenizer
    printable = [i for i in range(len(full)) if 32 <= full[i] < 127]
    assert printable
    stop = tok.decode([full[printable[0]]])
    others = {f"b{i}": (p, SamplingParams(max_tokens=30, **GREEDY)) for i, p in enumerate(random_prompts(3, 13))}
    outputs = run(tiny, {"s": (prompt, SamplingParams(max_tokens=30, stop=[stop], **GREEDY)), **others})
    got = tokens_of(outputs["s"])
    assert got == full[: printable[0] + 1] and outputs["s"][-1].num_output_tokens == len(got)
    assert outputs["s"][-1].stop_reason == stop and stop not in text_of(outputs["s"])
    for rid, (p, _) in others.items():
        assert tokens_of(outputs[rid]) == solo(p, 30)
    assert tiny.stats().kv_cache_usage == 0.0


def test_seeded_sampling_reproduces_alone_and_batched(tiny):
    prompt = random_prompts(1, seed=4, lengths=(30,))[0]
    seeded = SamplingParams(max_tokens=24, temperature=1.0, top_p=0.95, seed=7, ignore_eos=True)
    alone1 = tokens_of(run(tiny, {"s": (prompt, seeded)})["s"])
    alone2 = tokens_of(run(tiny, {"s": (prompt, seeded)})["s"])
    others = {f"o{i}": (p, SamplingParams(max_tokens=20, temperature=0.8, ignore_eos=True))
              for i, p in enumerate(random_prompts(5, seed=5))}
    batched = run(tiny, {**others, "s": (prompt, seeded)}, arrivals={0: ["o0", "o1"], 2: ["s", "o2"], 3: ["o3", "o4"]})
    assert alone1 == alone2 == tokens_of(batched["s"])
    other_seed = SamplingParams(max_tokens=24, temperature=1.0, top_p=0.95, seed=8, ignore_eos=True)
    assert tokens_of(run(tiny, {"s": (prompt, other_seed)})["s"]) != alone1
    unseeded = SamplingParams(max_tokens=24, temperature=1.0, ignore_eos=True)
    assert tokens_of(run(tiny, {"u": (prompt, unseeded)})["u"]) != tokens_of(run(tiny, {"u": (prompt, unseeded)})["u"])


def test_stop_strings_and_stop_token_ids(tiny, solo):
    tok = tiny.tokenizer
    prompt = random_prompts(1, seed=6, lengths=(20,))[0]
    full = solo(prompt, 40)
    printable = [i for i in range(1, len(full) - 1) if all(32 <= t < 127 for t in full[i : i + 2])]
    assert printable, "pick another prompt: the greedy output has no two printable bytes in a row"
    stop = tok.decode(full[printable[0] : printable[0] + 2])
    full_text = tok.decode(full)
    outs = run(tiny, {"s": (prompt, SamplingParams(max_tokens=40, stop=[stop], **GREEDY))})["s"]
    assert (outs[-1].finish_reason, outs[-1].stop_reason) == ("stop", stop)
    assert text_of(outs) == full_text[: full_text.index(stop)]
    got = tokens_of(outs)
    assert got == full[: len(got)] and tok.decode(got).endswith(stop)

    stop_id = full[5]
    outs = run(tiny, {"t": (prompt, SamplingParams(max_tokens=40, stop_token_ids=[stop_id], **GREEDY))})["t"]
    cut = full.index(stop_id) + 1
    assert (outs[-1].finish_reason, outs[-1].stop_reason) == ("stop", stop_id)
    assert tokens_of(outs) == full[:cut]
    assert text_of(outs) == tok.decode(full[: cut - 1])


def test_eos_ends_generation_unless_ignored(tiny, solo):
    """Find prompts whose greedy output (EOS ignored) contains an EOS id; without ignore_eos they stop there."""
    eos = set(tiny.eos_token_ids)
    found = 0
    for prompt in random_prompts(24, seed=7, lengths=(3, 9, 14, 22)):
        full = solo(prompt, 40)
        hit = next((i for i, t in enumerate(full) if t in eos), None)
        if hit is None:
            continue
        found += 1
        outs = run(tiny, {"e": (prompt, SamplingParams(max_tokens=40, temperature=0.0))})["e"]
        assert tokens_of(outs) == full[: hit + 1]
        assert (outs[-1].finish_reason, outs[-1].stop_reason) == ("stop", None)
        if found == 2:
            break
    assert found, "no prompt produced an EOS token; widen the search"


def test_limits_and_bad_requests_raise_value_error():
    engine = LLMEngine(EngineConfig(model="tiny", max_model_len=128, num_kv_blocks=32))
    assert engine.max_model_len == 128
    with pytest.raises(ValueError, match="max_model_len"):
        engine.add_request("x", [1] * 100, SamplingParams(max_tokens=29))
    engine.add_request("ok", [1] * 100, SamplingParams(max_tokens=28))
    with pytest.raises(ValueError, match="already in use"):
        engine.add_request("ok", [1], SamplingParams())
    with pytest.raises(ValueError, match="at least one token"):
        engine.add_request("empty", [], SamplingParams())
    with pytest.raises(ValueError, match="not a valid id"):
        engine.add_request("bad", [1, 100_000], SamplingParams())
    for bad in (-1, True, 2.0, "3"):  # bool is an int subclass, but not a token id
        with pytest.raises(ValueError, match=f"prompt token {bad!r} is not a valid id"):
            engine.add_request("bad", [1, bad, 2], SamplingParams())
    with pytest.raises(ValueError, match="max_position_embeddings"):
        LLMEngine(EngineConfig(model="tiny", max_model_len=1 << 20))
    with pytest.raises(ValueError, match="does not fit the KV cache"):
        LLMEngine(EngineConfig(model="tiny", max_model_len=1024, num_kv_blocks=8))
    with pytest.raises(ValueError, match="max_num_seqs"):
        EngineConfig(max_num_seqs=0)
    with pytest.raises(ValueError, match="async_scheduling must be True or False"):
        EngineConfig(async_scheduling="no")
    assert LLMEngine(EngineConfig(model="tiny", num_kv_blocks=8)).max_model_len == 8 * 16


def test_add_and_abort_between_steps(tiny, solo):
    """The service's pattern: its engine thread steps, and applies the requests that arrive and the aborts between
    steps (the engine has no locks of its own; service/engine_client.py is the one concurrency layer)."""
    prompts = random_prompts(8, seed=8)
    outputs: dict[str, list] = {}

    def step():
        for out in tiny.step():
            outputs.setdefault(out.request_id, []).append(out)

    for i, p in enumerate(prompts):
        tiny.add_request(f"t{i}", p, SamplingParams(max_tokens=12, **GREEDY))
        if i == 3:
            used = tiny.stats().kv_cache_usage
            tiny.abort_request("t1")
            assert tiny.stats().kv_cache_usage <= used  # its blocks are free before the next step
        step()
    while tiny.has_unfinished_requests():
        step()
    assert outputs["t1"][-1].finish_reason == "abort"
    for i, p in enumerate(prompts):
        assert outputs[f"t{i}"][-1].finished
        if i != 1:
            assert tokens_of(outputs[f"t{i}"]) == solo(p, 12)


def test_moe_stats_count_every_routed_token_and_time_sampled_steps():
    engine = LLMEngine(EngineConfig(model="tiny", moe_timing_every=2, max_num_batched_tokens=64))
    prompts = random_prompts(5, seed=9)
    requests = {f"m{i}": (p, SamplingParams(max_tokens=10, **GREEDY)) for i, p in enumerate(prompts)}
    run(engine, requests)
    snap = engine.moe_stats()
    c = engine.model_config
    fed = sum(len(p) + 10 - 1 for p, _ in requests.values())  # the last sampled token is never fed back
    assert snap.device_name == "cpu"
    assert len(snap.expert_tokens_total) == c.num_layers and snap.layer_indices == list(range(c.num_layers))
    for layer in snap.expert_tokens_total:
        assert len(layer) == c.num_experts and sum(layer) == fed * c.top_k
    assert snap.flops_total == fed * c.num_layers * moe_flops_per_token(c)
    assert snap.timed and all(sec > 0 and flops > 0 for sec, flops in snap.timed)
    assert engine.moe_stats().timed == [], "timed entries are handed out once"
    for window, total in zip(snap.window_expert_tokens, snap.expert_tokens_total):
        assert all(0 <= w <= t for w, t in zip(window, total))
    off = LLMEngine(EngineConfig(model="tiny", expert_metrics=False))
    run(off, {"x": ([1, 2, 3], SamplingParams(max_tokens=3))})
    assert all(sum(layer) == 0 for layer in off.moe_stats().expert_tokens_total)


STOP_LETTERS = list("aeionrst")  # sampled bytes hit one of them every ~30 tokens, so some requests stop on one


def test_random_workload_with_aborts_and_preemption(solo):
    """Random arrivals, lengths, sampling params, stop strings and aborts on a small KV cache: every request ends
    exactly once, greedy ones match their solo run, and no block is left behind."""
    rng = random.Random(15)
    engine = LLMEngine(EngineConfig(model="tiny", num_kv_blocks=24, max_num_seqs=6, max_num_batched_tokens=48))
    requests, arrivals, aborts = {}, {}, {}
    for i, prompt in enumerate(random_prompts(30, seed=16, lengths=(1, 7, 33, 80, 120, 15))):
        kind = rng.choice(["greedy", "sampled", "stop"])
        params = SamplingParams(max_tokens=rng.randint(1, 40), ignore_eos=kind == "greedy",
                                temperature=0.0 if kind == "greedy" else rng.choice([0.5, 1.0]),
                                top_p=rng.choice([1.0, 0.9]), top_k=rng.choice([-1, 20]),
                                stop=STOP_LETTERS if kind == "stop" else [])
        requests[f"w{i}"] = (prompt, params)
        arrivals.setdefault(rng.randint(0, 60), []).append(f"w{i}")
        if rng.random() < 0.2:
            aborts.setdefault(rng.randint(0, 80), []).append(f"w{i}")
    outputs = run(engine, requests, arrivals,
                  on_step=lambda step, e: [e.abort_request(rid) for rid in aborts.get(step, [])])
    assert engine.stats().num_preemptions_total > 0
    assert any(outs[-1].finish_reason == "abort" for outs in outputs.values())
    assert any(outs[-1].stop_reason in STOP_LETTERS for outs in outputs.values())
    for rid, (prompt, params) in requests.items():
        outs = outputs.get(rid)
        if outs is None:  # aborted before it was added
            assert any(rid in ids for ids in aborts.values())
            continue
        assert [o.finished for o in outs].count(True) == 1 and outs[-1].finished, rid
        got = tokens_of(outs)
        assert len(got) <= params.max_tokens and outs[-1].num_output_tokens == len(got)
        if outs[-1].finish_reason == "abort":
            continue
        if params.stop:
            assert not any(s in text_of(outs) for s in params.stop)
        if params.temperature == 0.0:
            assert got == solo(prompt, params.max_tokens), rid
    stats = engine.stats()
    assert (stats.num_running, stats.num_waiting, stats.kv_cache_usage) == (0, 0, 0.0)


def _outcome(outs) -> tuple:
    last = outs[-1]
    return tokens_of(outs), text_of(outs), last.finish_reason, last.stop_reason, last.num_output_tokens


def test_asynchronous_scheduling_gives_the_outputs_of_synchronous_steps(solo):
    """Launching each step before the previous one's ids are read must change no output: greedy and seeded
    requests, stop strings, stop token ids, EOS and max_tokens, joining at different steps on a KV cache small
    enough to preempt. Tokens sampled past a stop are dropped, and no placeholder ever leaves the engine."""
    from model.engine.sequence import PENDING_TOKEN

    rng = random.Random(21)
    requests, arrivals = {}, {}
    for i, prompt in enumerate(random_prompts(16, seed=22, lengths=(2, 9, 31, 70, 3, 45))):
        kind = rng.choice(["greedy", "seeded", "stop", "eos"])
        max_tokens = 30 if kind == "stop" else rng.randint(1, 30)
        params = SamplingParams(max_tokens=max_tokens, temperature=0.0 if kind in ("greedy", "eos") else 0.9,
                                seed=None if kind in ("greedy", "eos") else 100 + i, ignore_eos=kind != "eos",
                                stop=STOP_LETTERS if kind == "stop" else [],
                                stop_token_ids=[rng.randrange(256)] if kind == "seeded" else [])
        requests[f"r{i}"] = (prompt, params)
        arrivals.setdefault(rng.randint(0, 25), []).append(f"r{i}")
    results = {}
    for mode in (False, True):
        engine = LLMEngine(EngineConfig(model="tiny", num_kv_blocks=12, max_num_seqs=6, max_num_batched_tokens=40,
                                        async_scheduling=mode))
        ran_ahead = []
        outputs = run(engine, requests, arrivals, on_step=lambda step, e: ran_ahead.append(e._in_flight is not None))
        assert any(ran_ahead) == mode
        assert not any(PENDING_TOKEN in o.new_token_ids for outs in outputs.values() for o in outs)
        assert engine.stats().kv_cache_usage == 0.0 and not engine.has_unfinished_requests()
        results[mode] = {rid: _outcome(outs) for rid, outs in outputs.items()}
        assert engine.stats().num_preemptions_total > 0
    assert results[True] == results[False]
    reasons = {(r[2], r[3] in STOP_LETTERS) for r in results[True].values()}
    assert ("stop", True) in reasons and ("length", False) in reasons  # a stop string and max_tokens were hit
    for rid, (prompt, params) in requests.items():
        if params.temperature == 0.0 and params.ignore_eos:
            assert results[True][rid][0] == solo(prompt, params.max_tokens), rid
