"""On the GPU (pytest -m gpu): sampling with every issue-20 feature at once makes no host synchronisation (CUDA's
sync debug mode turns any into an error), and a decode step of the real engine with them stays a graph replay."""

import pytest
import torch

from model.engine import EngineConfig, LLMEngine, SamplingParams
from model.engine.logprobs import LogprobsMode
from model.engine.penalties import PenaltyState
from model.engine.sampler import Sampler, SamplingExtras
from model.engine.structured_output import GrammarMasks, compile_grammar
from model.byte_tokenizer import ByteTokenizer

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("mode", list(LogprobsMode))
def test_sampling_with_every_feature_makes_no_host_sync(mode):
    device = torch.device("cuda")
    B, V = 64, 151936
    logits = torch.randn(B, V, device=device)
    penalties = PenaltyState(V, device, max_rows=B)
    rows = [penalties.acquire(list(range(i, i + 50)), list(range(i, i + 9))) for i in range(B)]
    tokenizer = ByteTokenizer()
    grammar = compile_grammar("json_schema", {"type": "object"}, tokenizer, V, [258])
    matchers = [grammar.new_matcher() for _ in range(8)]
    bitmask = GrammarMasks(V, pin=True).fill(matchers)
    params = [SamplingParams(temperature=0.0 if i % 4 == 0 else 0.8, top_k=50 if i % 3 else -1, top_p=0.9,
                             min_p=0.05, presence_penalty=0.5, frequency_penalty=0.3, repetition_penalty=1.2,
                             logit_bias={5: 3.0, 7: -2.0}, allowed_token_ids=[1, 2, 3] if i == 1 else None,
                             logprobs=5 if i % 2 else None, seed=i if i % 5 == 0 else None) for i in range(B)]
    sampler = Sampler(device, logprobs_mode=mode, penalties=penalties)
    generators = [sampler.new_request_generator(p.seed) if p.seed is not None else None for p in params]
    extras = SamplingExtras(banned=[(i, 258) for i in range(0, B, 2)], penalty_rows=rows,
                            grammar_rows=list(range(8, 16)), grammar_bitmask=bitmask)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = sampler.sample(logits, params, generators, extras)
        host = out.logprobs.to_host()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    ids = out.sampled_ids.tolist()
    assert ids[1] in (1, 2, 3)
    assert all(i != 258 for i in ids[0::2])
    assert host.logprobs.shape == (B,)


def test_decode_steps_with_penalties_and_logprobs_replay_graphs():
    engine = LLMEngine(EngineConfig(model="tiny", max_num_seqs=16))
    replays = []
    original = engine.runner._replay
    engine.runner._replay = lambda *a, **k: replays.append(1) or original(*a, **k)
    for i in range(8):
        engine.add_request(f"r{i}", [1, 2, 3 + i], SamplingParams(max_tokens=20, temperature=0.7, seed=i,
                                                                  frequency_penalty=0.5, logprobs=3, min_p=0.1))
    outputs = []
    while engine.has_unfinished_requests():
        outputs += engine.step()
    assert len(replays) >= 15
    assert all(o.logprobs and len(o.logprobs[0].top) == 3 for o in outputs if o.new_token_ids)
