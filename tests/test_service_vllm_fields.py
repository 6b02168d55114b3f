"""Three fields answered as vLLM answers them, over real loopback HTTP: any int64 `seed` (negative ones too; choice
i samples with seed + i, never wrapping onto another seed's stream within a request); `continuous_usage_stats`
(each chunk carries its own choice's usage so far, the last one the request's totals); and `finish_reason` when
max_tokens cuts the text after a complete tool call (non-streamed with tool_choice auto: "tool_calls"; streamed,
or under tool_choice required: "length")."""

import json

import httpx
import pytest
import torch

from model.engine import SamplingParams
from model.engine.sampler import Sampler
from tests.api_fixtures import api, api_server  # noqa: F401
from tests.service_fixtures import served  # noqa: F401
from tests.test_service_tools import CALL, TOOLS, USER, regex_for

INT64_MIN, INT64_MAX = -2**63, 2**63 - 1
MESSAGES = [{"role": "user", "content": "Count to three"}]


def post(server, path: str, body: dict) -> httpx.Response:
    return httpx.post(server.base_url + path, json=body, headers=server.headers, timeout=120)


def stream(server, path: str, body: dict) -> list[dict | str]:
    """Every SSE event of one streamed request, parsed; the last is "[DONE]"."""
    events = []
    with httpx.stream("POST", server.base_url + path, json={**body, "stream": True}, headers=server.headers,
                      timeout=120) as response:
        assert response.status_code == 200, response.read()
        for line in response.iter_lines():
            if line:
                assert line.startswith("data: "), line
                data = line[len("data: "):]
                events.append(data if data == "[DONE]" else json.loads(data))
    assert events[-1] == "[DONE]"
    return events[:-1]


# ---- seed ---------------------------------------------------------------------------------------------------------
def texts(server, seed: int, n: int = 1) -> list[str]:
    r = post(server, "/v1/completions", {"prompt": "The cat sat", "max_tokens": 12, "temperature": 2.0,
                                          "ignore_eos": True, "seed": seed, "n": n})
    assert r.status_code == 200, r.text
    return [c["text"] for c in sorted(r.json()["choices"], key=lambda c: c["index"])]


def test_any_int64_seed_is_reproducible_and_its_own_stream(served):
    seeds = [INT64_MIN, INT64_MIN + 1, -2, -1, 0, 1, INT64_MAX - 1, INT64_MAX]
    first = {s: texts(served, s)[0] for s in seeds}
    assert all(texts(served, s)[0] == first[s] for s in (INT64_MIN, -1, INT64_MAX))  # the same seed, the same text
    assert len(set(first.values())) == len(seeds)  # every seed its own stream (-1 is not 1, nor 2**64 - 1 folded)


def test_choice_i_samples_with_seed_plus_i_across_zero_and_the_int64_limit(served):
    assert texts(served, -1, n=3) == [texts(served, s)[0] for s in (-1, 0, 1)]
    near_limit = texts(served, INT64_MAX, n=2)
    assert near_limit[0] != near_limit[1]
    assert near_limit[1] != texts(served, 0)[0]  # seed + 1 went past 2**63 - 1: no longer wrapped onto seed 0


@pytest.mark.parametrize("seed", [2**63, -2**63 - 1, 2**64, -2**70])
@pytest.mark.parametrize("path,body", [("/v1/completions", {"prompt": "a", "max_tokens": 1}),
                                       ("/v1/chat/completions", {"messages": MESSAGES, "max_tokens": 1})])
def test_seed_beyond_int64_is_a_400_naming_it(served, path, body, seed):
    r = post(served, path, {**body, "seed": seed})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == "seed" and r.json()["error"]["type"] == "invalid_request_error"


def test_engine_seeds_give_int64_distinct_generators_on_the_cpu_too():
    sampler = Sampler(torch.device("cpu"))

    def draws(seed):
        return torch.rand(4, generator=sampler.new_request_generator(seed)).tolist()

    int64 = [INT64_MIN, -1, 0, 1, INT64_MAX]
    assert len({tuple(draws(s)) for s in int64}) == len(int64)
    assert draws(-1) == draws(2**64 - 1) and draws(INT64_MIN) == draws(2**63)  # mod 2**64, as torch reads them
    assert draws(-1) != draws(INT64_MAX) and draws(INT64_MIN) != draws(0)  # the CPU generator reads 32 bits
    for seed in (INT64_MIN, 2**64 - 1):
        SamplingParams(seed=seed)
    for seed in (INT64_MIN - 1, 2**64):
        with pytest.raises(ValueError, match="seed"):
            SamplingParams(seed=seed)


# ---- continuous_usage_stats ----------------------------------------------------------------------------------------
CONTINUOUS = {"include_usage": True, "continuous_usage_stats": True}


def check_continuous(chunks: list[dict], prompt_of: dict[int, int], max_tokens: int, prompt_total: int) -> None:
    """Each chunk of choice i: i's prompt tokens and i's tokens so far (counted from the chunks' token_ids); the last
    chunk alone has no choices and the request's totals."""
    so_far = dict.fromkeys(prompt_of, 0)
    for c in chunks[:-1]:
        (choice,) = c["choices"]
        i = choice["index"]
        so_far[i] += len(choice.get("token_ids") or [])
        assert c["usage"] == {"prompt_tokens": prompt_of[i], "completion_tokens": so_far[i],
                              "total_tokens": prompt_of[i] + so_far[i]}, c
    assert so_far == dict.fromkeys(prompt_of, max_tokens)
    completion = max_tokens * len(prompt_of)
    assert chunks[-1]["choices"] == []
    assert chunks[-1]["usage"] == {"prompt_tokens": prompt_total, "completion_tokens": completion,
                                   "total_tokens": prompt_total + completion}


def test_chat_continuous_usage_is_per_choice_from_the_role_chunk_on(served):
    prompt = post(served, "/v1/chat/completions", {"messages": MESSAGES, "max_tokens": 1}).json()["usage"]
    prompt = prompt["prompt_tokens"]
    chunks = stream(served, "/v1/chat/completions", {"messages": MESSAGES, "max_tokens": 5, "n": 3,
                                                     "ignore_eos": True, "return_token_ids": True,
                                                     "stream_options": CONTINUOUS})
    roles = [c for c in chunks if c["choices"] and c["choices"][0]["delta"].get("role")]
    assert sorted(c["choices"][0]["index"] for c in roles) == [0, 1, 2]
    for c in roles:  # before any token: the prompt alone, once per choice
        assert c["usage"] == {"prompt_tokens": prompt, "completion_tokens": 0, "total_tokens": prompt}
    check_continuous(chunks, {0: prompt, 1: prompt, 2: prompt}, 5, prompt)  # the prompt once, whatever n


def test_completions_continuous_usage_counts_each_choices_own_prompt(served):
    prompts = ["ab", "a longer prompt"]
    chunks = stream(served, "/v1/completions", {"prompt": prompts, "max_tokens": 4, "n": 2, "ignore_eos": True,
                                                "return_token_ids": True, "stream_options": CONTINUOUS})
    lens = [len(p.encode()) for p in prompts]  # the tiny model's tokens are bytes
    check_continuous(chunks, {0: lens[0], 1: lens[0], 2: lens[1], 3: lens[1]}, 4, sum(lens))


@pytest.mark.parametrize("options,usage_chunks,final", [
    ({"continuous_usage_stats": True}, True, True),  # include_usage defaults to true, as vLLM's
    ({"include_usage": False, "continuous_usage_stats": True}, False, False),  # continuous needs include_usage
    ({"include_usage": None, "continuous_usage_stats": True}, False, False),  # null is false in vLLM
    ({}, False, True),
    ({"include_usage": True}, False, True),
])
def test_stream_options_combinations(served, options, usage_chunks, final):
    chunks = stream(served, "/v1/chat/completions", {"messages": MESSAGES, "max_tokens": 3, "ignore_eos": True,
                                                     "stream_options": options})
    with_choices = [c for c in chunks if c["choices"]]
    assert all((c.get("usage") is not None) == usage_chunks for c in with_choices), with_choices
    assert (chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 3) == final


# ---- finish_reason after a complete tool call cut by max_tokens ----------------------------------------------------
def auto_chat(api_server, written: str, max_tokens: int, stream_it: bool):
    body = {"messages": USER, "tools": TOOLS, "max_tokens": max_tokens,
            "structured_outputs": {"regex": regex_for(written)}}
    if not stream_it:
        r = post(api_server, "/v1/chat/completions", body)
        assert r.status_code == 200, r.text
        choice = r.json()["choices"][0]
        return choice["finish_reason"], choice["message"].get("tool_calls") or [], choice["message"]["content"]
    chunks = [c for c in stream(api_server, "/v1/chat/completions", body) if c["choices"]]
    calls = [d for c in chunks for d in c["choices"][0]["delta"].get("tool_calls") or []]
    content = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
    return chunks[-1]["choices"][0]["finish_reason"], calls, content


@pytest.mark.parametrize("stream_it,expected", [(False, "tool_calls"), (True, "length")],
                         ids=["whole", "streamed"])
def test_auto_complete_call_then_length(api_server, stream_it, expected):
    written = CALL + "\nThat is all I need."
    finish, calls, content = auto_chat(api_server, written, len(CALL.encode()) + 4, stream_it)
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls] == \
        [("get_weather", {"city": "Paris", "unit": "C"})]
    assert content.strip() == "Tha"  # max_tokens did cut the text after the call
    assert finish == expected


@pytest.mark.parametrize("stream_it", [False, True], ids=["whole", "streamed"])
def test_auto_call_cut_inside_is_length_without_calls(api_server, stream_it):
    finish, calls, content = auto_chat(api_server, CALL + "\nThat is all.", len(CALL.encode()) - 3, stream_it)
    assert (finish, calls) == ("length", []) and content == CALL[:-3]


def test_required_complete_call_then_length_keeps_length(api_server):
    """tool_choice required, parallel calls: cut right after the first call's closing tag (the grammar still admits
    more), vLLM reports "length" streamed or not."""
    body = {"messages": USER, "tools": TOOLS, "tool_choice": "required", "parallel_tool_calls": True, "seed": 3,
            "return_token_ids": True}
    whole = post(api_server, "/v1/chat/completions", {**body, "max_tokens": 1000}).json()["choices"][0]
    assert whole["finish_reason"] == "tool_calls"
    ids = whole["token_ids"]
    end = bytes(t for t in ids if t < 256).index(b"</tool_call>") + len(b"</tool_call>")
    assert all(t < 256 for t in ids[:end])  # the tiny model's tokens are bytes: `end` tokens reach the tag
    r = post(api_server, "/v1/chat/completions", {**body, "max_tokens": end}).json()["choices"][0]
    assert r["finish_reason"] == "length" and len(r["message"]["tool_calls"]) == 1
    assert r["message"]["tool_calls"][0]["function"] == whole["message"]["tool_calls"][0]["function"]
    chunks = [c for c in stream(api_server, "/v1/chat/completions", {**body, "max_tokens": end}) if c["choices"]]
    assert [d for c in chunks for d in c["choices"][0]["delta"].get("tool_calls") or []]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
