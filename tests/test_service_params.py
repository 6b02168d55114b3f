"""Nothing silently ignored (issue 20): over HTTP with the official client, every sampling parameter changes the
output as defined; refused fields and unknown fields get a 400 naming them (unknown ones are accepted with
--ignore-unknown-fields); docs/service.md's parameter table lists every request field."""

import re

import httpx
import openai
import pytest

from service.protocol import REFUSED, CompletionRequest
from service.protocol_chat import CHAT_REFUSED, ChatCompletionRequest
from tests.api_fixtures import api, api_server  # noqa: F401
from tests.service_fixtures import API_KEY, REPO_ROOT, served  # noqa: F401

EOS = 258  # the tiny model's <|im_end|>
GREEDY = {"temperature": 0, "max_tokens": 12}


@pytest.fixture(scope="module")
def client(served):
    return openai.OpenAI(base_url=served.base_url + "/v1", api_key=API_KEY, max_retries=0, timeout=60)


def complete(client, prompt="The cat sat", **fields) -> openai.types.Completion:
    known = {k: fields.pop(k) for k in ("temperature", "max_tokens", "seed", "n", "stop", "logit_bias")
             if k in fields}
    return client.completions.create(model="tiny", prompt=prompt, **known,
                                     extra_body={"ignore_eos": True, **fields})


def post(server, path, body):
    return httpx.post(server.base_url + path, json=body, headers=server.headers, timeout=60)


# ---- unknown and refused fields ----------------------------------------------------------------------------------
UNKNOWN = [
    ("/v1/completions", {"prompt": "a", "max_tokens": 1, "frobnicate": 1}, "frobnicate"),
    ("/v1/completions", {"prompt": "a", "stream": True, "stream_options": {"include_usage": True, "x": 1}},
     "stream_options.x"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "a", "mood": "happy"}]}, "messages.0.mood"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "a"}],
                              "response_format": {"type": "json_schema", "json_schema": {"schema": {}, "x": 1}}},
     "response_format.json_schema.x"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "a"}],
                              "tools": [{"type": "function", "function": {"name": "f", "returns": "int"}}]},
     "tools.0.function.returns"),
    ("/tokenize", {"prompt": "a", "extra": True}, "extra"),
]


@pytest.mark.parametrize("path,body,param", UNKNOWN, ids=[u[2] for u in UNKNOWN])
def test_unknown_fields_get_400_naming_them(served, api_server, path, body, param):
    response = post(served, path, body)
    assert response.status_code == 400, response.text
    assert (response.json()["error"]["param"], response.json()["error"]["code"]) == (param, "unknown_field")
    assert post(api_server, path, body).status_code == 200  # --ignore-unknown-fields


REFUSED_VALUES = {"use_beam_search": True, "length_penalty": 0.5, "spaces_between_special_tokens": False,
                  "priority": 1, "logits_processors": ["x"], "kv_transfer_params": {}, "vllm_xargs": {"a": 1},
                  "guided_decoding_backend": "xgrammar", "guided_whitespace_pattern": " ", "echo": True,
                  "continue_final_message": True, "chat_template": "{{ x }}", "documents": [],
                  "mm_processor_kwargs": {}, "prediction": {"type": "content"},
                  "audio": {}, "web_search_options": {}, "functions": [], "function_call": "auto",
                  "verbosity": "low", "store": True, "add_special_tokens": True}
REFUSED_CASES = [("/v1/completions", {"prompt": "a", name: REFUSED_VALUES[name]}, name) for name in REFUSED] + \
    [("/v1/chat/completions", {"messages": [{"role": "user", "content": "a"}], name: REFUSED_VALUES[name]}, name)
     for name in CHAT_REFUSED] + [
    ("/v1/completions", {"prompt": "a", "suffix": "z"}, "suffix"),
    ("/v1/completions", {"prompt": "a", "prompt_embeds": "AAAA"}, "prompt_embeds"),
    ("/v1/completions", {"prompt": "a", "n": 2, "best_of": 3}, "best_of"),
    ("/v1/completions", {"prompt": "a", "structured_outputs": {"regex": "a", "disable_fallback": True}},
     "structured_outputs.disable_fallback")]


@pytest.mark.parametrize("path,body,param", REFUSED_CASES, ids=[c[2] for c in REFUSED_CASES])
def test_refused_fields_get_400_naming_them(served, path, body, param):
    response = post(served, path, body)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param


def test_refused_fields_at_their_defaults_are_accepted(served):
    body = {"prompt": "a", "max_tokens": 1, "use_beam_search": False, "length_penalty": 1.0, "priority": 0,
            "spaces_between_special_tokens": True, "guided_decoding_backend": "auto", "best_of": 1}
    assert post(served, "/v1/completions", body).status_code == 200
    chat = {"messages": [{"role": "user", "content": "a"}], "max_tokens": 1, "echo": False, "store": False,
            "metadata": {"k": "v"}, "service_tier": "auto", "modalities": ["text"], "prompt_cache_key": "p",
            "safety_identifier": "s", "user": "u"}
    assert post(served, "/v1/chat/completions", chat).status_code == 200


# ---- every honoured parameter changes the output ------------------------------------------------------------------
def test_logit_bias_and_allowed_token_ids(client):
    assert complete(client, logit_bias={str(ord("z")): 100}, **GREEDY).choices[0].text == "z" * 12
    text = complete(client, allowed_token_ids=list(b"ab"), **GREEDY).choices[0].text
    assert text and set(text) <= {"a", "b"}


def test_penalties_change_greedy_output(client):
    long = {**GREEDY, "max_tokens": 30}
    plain = complete(client, **long).choices[0].text
    assert len(set(plain)) < 30, "the baseline should repeat something for the penalties to act on"
    for field, value in (("presence_penalty", 2.0), ("frequency_penalty", 2.0), ("repetition_penalty", 3.0)):
        text = complete(client, **long, **{field: value}).choices[0].text
        assert text != plain, field
        assert len(set(text)) > len(set(plain)), f"{field} should make the output more varied"


def test_min_p_one_is_greedy_at_any_temperature(client):
    plain = complete(client, **GREEDY).choices[0].text
    assert complete(client, temperature=2.0, max_tokens=12, seed=5, min_p=1.0).choices[0].text == plain
    assert complete(client, temperature=2.0, max_tokens=12, seed=5).choices[0].text != plain


def test_min_tokens_and_eos(client):
    eos_first = {str(EOS): 100}
    short = client.completions.create(model="tiny", prompt="a", temperature=0, max_tokens=10, logit_bias=eos_first)
    assert (short.choices[0].text, short.usage.completion_tokens) == ("", 1)
    held = client.completions.create(model="tiny", prompt="a", temperature=0, max_tokens=10, logit_bias=eos_first,
                                     extra_body={"min_tokens": 4})
    assert held.usage.completion_tokens == 5 and held.choices[0].finish_reason == "stop"


def test_bad_words_ban_their_tokens(client):
    likely_z = {str(ord("z")): 100}
    assert complete(client, **GREEDY, logit_bias=likely_z).choices[0].text == "z" * 12
    assert "z" not in complete(client, **GREEDY, logit_bias=likely_z, bad_words=["z"]).choices[0].text
    text = complete(client, **GREEDY, logit_bias=likely_z, bad_words=["zz"]).choices[0].text
    assert "zz" not in text and text.count("z") == 6  # every other token: "z" once, then anything but "z"


def test_stop_string_kept_with_include_stop_str_in_output(client):
    plain = complete(client, **GREEDY).choices[0].text
    stop = plain[3:5]
    cut = complete(client, **GREEDY, stop=[stop]).choices[0].text
    kept = complete(client, **GREEDY, stop=[stop], include_stop_str_in_output=True).choices[0].text
    assert kept == cut + stop and kept == plain[: len(kept)]


def test_skip_special_tokens(client):
    eos = {str(EOS): 100}
    hidden = complete(client, temperature=0, max_tokens=3, logit_bias=eos).choices[0].text
    shown = complete(client, temperature=0, max_tokens=3, logit_bias=eos, skip_special_tokens=False).choices[0].text
    assert hidden == "" and shown == "<|im_end|>" * 3


def test_truncate_prompt_tokens_keeps_the_end(client):
    prompt = "0123456789 the long prompt"
    cut = complete(client, prompt=prompt, **GREEDY, truncate_prompt_tokens=5)
    assert cut.usage.prompt_tokens == 5
    assert cut.choices[0].text == complete(client, prompt=prompt[-5:], **GREEDY).choices[0].text
    assert cut.choices[0].text != complete(client, prompt=prompt, **GREEDY).choices[0].text
    chat = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": prompt}],
                                          max_tokens=2, extra_body={"truncate_prompt_tokens": 7})
    assert chat.usage.prompt_tokens == 7


def test_return_token_ids_request_id_and_stream_usage(client):
    r = complete(client, **GREEDY, return_token_ids=True, request_id="my-id-1")
    assert r.id == "cmpl-my-id-1"
    choice = r.choices[0].model_extra
    assert choice["prompt_token_ids"] == list(b"The cat sat") and len(choice["token_ids"]) == 12
    chunks = list(client.completions.create(model="tiny", prompt="a", max_tokens=3, stream=True,
                                            stream_options={"include_usage": True},
                                            extra_body={"ignore_eos": True,
                                                        "stream_options": {"include_usage": True,
                                                                           "continuous_usage_stats": True}}))
    counts = [c.usage.completion_tokens for c in chunks if c.choices]
    assert counts == [1, 2, 3] and chunks[-1].usage.completion_tokens == 3


def test_min_tokens_above_max_tokens_is_refused(served):
    response = post(served, "/v1/completions", {"prompt": "a", "max_tokens": 2, "min_tokens": 3})
    assert response.status_code == 400 and response.json()["error"]["param"] == "min_tokens"
    response = post(served, "/v1/completions", {"prompt": "a", "logit_bias": {"999": 1}})
    assert response.status_code == 400 and response.json()["error"]["param"] == "logit_bias"
    response = post(served, "/v1/completions", {"prompt": "a", "logit_bias": {"x": 1}})
    assert response.status_code == 400 and response.json()["error"]["param"] == "logit_bias.x"


# ---- the documentation ----------------------------------------------------------------------------------------------
def test_docs_parameter_table_lists_every_field():
    text = (REPO_ROOT / "docs" / "service.md").read_text()
    section = text[text.index("### Parameters"):]
    section = section[: section.index("\n### ", 5)]
    rows = dict(re.findall(r"^\| `([a-z_]+)` \| ([a-z ,/]+?) \|", section, re.M))
    fields = set(CompletionRequest.model_fields) | set(ChatCompletionRequest.model_fields)
    aliases = {"schema_": "schema", "json_": "json"}
    missing = {aliases.get(f, f) for f in fields} - set(rows)
    assert not missing, f"docs/service.md has no row for {sorted(missing)}"
    both_ways = {"echo", "add_special_tokens"}  # supported by completions, refused (non-default) by chat
    refused = (set(REFUSED) | set(CHAT_REFUSED) | {"suffix", "prompt_embeds", "best_of"}) - both_ways
    for name, status in rows.items():
        assert status in ("supported", "refused", "accepted"), (name, status)
        assert (status == "refused") == (name in refused), (name, status)
