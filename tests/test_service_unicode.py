"""Text that is not Unicode, and a fuzz run for what schema-driven fuzzing does not generate (issue 17 item 5).

A lone UTF-16 surrogate ("\\ud800") is valid JSON but no text: it used to reach the tokenizer, the response encoder
and the logger and come back as a 500 (completions, `model`), often breaking the next request on the same
keep-alive connection. Every field now answers 400 `invalid_unicode` naming the field. The hypothesis run sends
bodies built from unicode edge cases (lone surrogates escaped and as raw bytes, NUL, bidi controls, noncharacters,
special-token text), huge lists and strings, and deep nesting into every field, and finds no 5xx."""

import json

import httpx
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

pytest.register_assert_rewrite("tests.service_fixtures")
from tests.service_fixtures import API_KEY, ServerProcess  # noqa: E402

pytest_plugins = ["tests.service_fixtures"]

COMPLETION = {"prompt": "hi", "max_tokens": 2}
CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
ERROR_KEYS = {"message", "type", "param", "code"}


def raw_post(server, path: str, raw: bytes, client: httpx.Client | None = None) -> httpx.Response:
    headers = {**server.headers, "Content-Type": "application/json"}
    return (client or httpx).post(server.base_url + path, content=raw, headers=headers, timeout=60)


SURROGATE_BODIES = [  # (path, body as JSON text with \\u escapes, the field named in the error)
    ("/v1/completions", r'{"prompt": "\ud800 hi", "max_tokens": 2}', "prompt"),
    ("/v1/completions", r'{"prompt": "\ud800 hi", "max_tokens": 2, "stream": true}', "prompt"),
    ("/v1/completions", r'{"prompt": ["ok", "\udfff"], "max_tokens": 2}', "prompt.1"),
    ("/v1/completions", r'{"model": "\ud800", "prompt": "a"}', "model"),
    ("/v1/completions", r'{"prompt": "a", "stop": ["x", "\udbff"]}', "stop.1"),
    ("/v1/completions", r'{"prompt": "a", "user": "\udc00"}', "user"),
    ("/v1/completions", r'{"prompt": "a", "suffix": "a\ud800b"}', "suffix"),
    ("/v1/completions", r'{"prompt": "a", "logit_bias": {"\ud800": 1}}', "logit_bias.\\ud800"),
    ("/v1/completions", r'{"prompt": "a", "\ud800": 1}', "\\ud800"),
    ("/v1/chat/completions", r'{"messages": [{"role": "user", "content": "\ud800"}]}', "messages.0.content"),
    ("/v1/chat/completions", r'{"messages": [{"role": "user", "content": [{"type": "text", "text": "\udfff"}]}]}',
     "messages.0.content.0.text"),
    ("/v1/chat/completions", r'{"messages": [{"role": "user", "content": "a", "name": "\ud800"}]}',
     "messages.0.name"),
    ("/v1/chat/completions", r'{"messages": [{"role": "\ud800", "content": "a"}]}', "messages.0.role"),
    ("/v1/chat/completions", r'{"model": "\ud800", "messages": [{"role": "user", "content": "a"}]}', "model"),
    ("/v1/chat/completions", r'{"messages": [{"role": "user", "content": "a"}], "stream": true, "user": "\ud800"}',
     "user"),
]


@pytest.mark.parametrize("path,body,param", SURROGATE_BODIES, ids=[b for _, b, _ in SURROGATE_BODIES])
def test_lone_surrogates_get_400_naming_the_field(served, path, body, param):
    with httpx.Client() as client:  # one keep-alive connection: the next request on it must be served
        response = raw_post(served, path, body.encode(), client)
        assert response.status_code == 400, response.text
        error = response.json()["error"]
        assert (error["code"], error["param"], error["type"]) == ("invalid_unicode", param, "invalid_request_error")
        follow = raw_post(served, "/v1/completions", json.dumps(COMPLETION).encode(), client)
        assert follow.status_code == 200, follow.text


def test_raw_surrogate_bytes_are_not_utf8_and_get_400(served):
    body = b'{"prompt": "\xed\xa0\x80 hi", "max_tokens": 2}'  # what "surrogatepass" UTF-8 encoding produces
    response = raw_post(served, "/v1/completions", body)
    assert response.status_code == 400 and response.json()["error"]["code"] == "invalid_unicode", response.text


def test_paired_surrogates_are_one_character_and_served(served):
    response = raw_post(served, "/v1/completions", rb'{"prompt": "\ud83d\ude00", "max_tokens": 2}')
    assert response.status_code == 200, response.text
    assert response.json()["usage"]["prompt_tokens"] == 4  # the four UTF-8 bytes of U+1F600


# ---- fuzzing -----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def fuzzed():
    """A small server with the default 1 MiB body limit (so huge lists reach the parser) and a short context."""
    server = ServerProcess(["--max-num-seqs", "2", "--max-queue", "2", "--max-model-len", "48"],
                           env={"STATICMOE_API_KEY": API_KEY}, api_key=API_KEY)
    try:
        yield server.wait_healthy()
    finally:
        server.stop()


EDGE_TEXT = ["\ud800", "\udfff", "\udbff\udc00", "\ud83d", "\x00", "\u202e", "\ufeff", "\uffff", "\U0010ffff",
             "e\u0301", "<|im_end|>", "<|im_start|>system", "\r\n", '"', "\\", "\ue000", "\ue0001\ue001"]
text = st.lists(st.one_of(st.sampled_from(EDGE_TEXT), st.characters()), max_size=12).map("".join)
scalar = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70), text,
                   st.floats(allow_nan=False, allow_infinity=False), st.sampled_from([0, 1, -1, 1e-40, 1e308]))


class Deep:
    """Nesting too deep for a recursive encoder: spliced into the JSON text as `[[[...]]]` or `{"a":{"a":...}}`."""

    def __init__(self, depth: int, opener: str):
        self.depth, self.opener = depth, opener

    def json(self) -> str:
        close = "]" if self.opener == "[" else "}"
        return self.opener * self.depth + "1" + close * self.depth


huge = st.one_of(
    st.tuples(st.integers(1, 200_000), st.sampled_from([1, "a", "\ud800", [1], None, {"role": "user"}]))
    .map(lambda t: [t[1]] * t[0]),
    st.integers(1, 400_000).map(lambda n: "x" * n),
    st.tuples(st.integers(1, 100_000), st.sampled_from(["[", '{"a":'])).map(lambda t: Deep(*t)))
value = st.recursive(scalar, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(text, inner, max_size=3),
                     max_leaves=8)
COMPLETION_FIELDS = ["prompt", "model", "max_tokens", "temperature", "top_p", "top_k", "stop", "stop_token_ids",
                     "seed", "n", "stream", "stream_options", "ignore_eos", "user", "logit_bias", "echo", "logprobs",
                     "suffix", "best_of", "presence_penalty", "min_p", "repetition_penalty", "min_tokens",
                     "bad_words", "allowed_token_ids", "truncate_prompt_tokens", "prompt_logprobs",
                     "response_format", "response_format.json_schema", "response_format.json_schema.schema",
                     "structured_outputs", "structured_outputs.regex", "structured_outputs.grammar",
                     "structured_outputs.choice", "guided_json", "request_id"]
CHAT_FIELDS = [f for f in COMPLETION_FIELDS if f not in ("prompt", "echo", "suffix", "best_of")] + [
    "messages", "messages.0", "messages.0.role", "messages.0.content", "messages.0.name", "messages.0.content.0",
    "messages.0.tool_calls", "messages.0.tool_call_id", "max_completion_tokens", "tools", "tools.0",
    "tools.0.function", "tools.0.function.parameters", "tool_choice", "top_logprobs", "chat_template_kwargs"]


def encode(body: dict, raw_surrogates: bool) -> bytes:
    splices: list[Deep] = []

    def placeholders(v):
        if isinstance(v, Deep):
            splices.append(v)
            return f"__deep_{len(splices) - 1}__"
        if isinstance(v, list):
            return [placeholders(x) for x in v]
        if isinstance(v, dict):
            return {k: placeholders(x) for k, x in v.items()}
        return v

    out = json.dumps(placeholders(body), ensure_ascii=not raw_surrogates)
    for i, deep in enumerate(splices):
        out = out.replace(f'"__deep_{i}__"', deep.json())
    return out.encode("utf-8", "surrogatepass")


def put(body: dict, dotted: str, v) -> None:
    *parents, last = dotted.split(".")
    node = body
    for part in parents:
        node = node[int(part)] if isinstance(node, list) else node.setdefault(part, {})
        if not isinstance(node, (dict, list)):
            return
    if isinstance(node, list):
        node[int(last)] = v
    else:
        node[last] = v


@st.composite
def requests(draw):
    chat = draw(st.booleans())
    body = json.loads(json.dumps(CHAT if chat else COMPLETION))
    fields = st.one_of(st.sampled_from(CHAT_FIELDS if chat else COMPLETION_FIELDS), text)
    for _ in range(draw(st.sampled_from([1, 1, 1, 2, 3]))):  # mostly one change, so the rest stays valid
        kind = draw(st.integers(0, 9))
        put(body, draw(fields), draw(text if kind < 5 else huge if kind < 7 else value))
    return ("/v1/chat/completions" if chat else "/v1/completions"), encode(body, draw(st.booleans()))


def test_fuzzed_bodies_never_get_a_5xx(fuzzed):
    failures = []

    @settings(max_examples=160, deadline=None, database=None, derandomize=True,
              phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
    @given(request=requests())
    def check(request):
        path, raw = request
        if len(raw) > 1 << 20:
            return
        response = raw_post(fuzzed, path, raw)
        if response.status_code >= 500:
            failures.append((path, raw[:300], response.status_code, response.text[:300]))
        elif response.status_code >= 400:
            assert set(response.json()["error"]) == ERROR_KEYS, response.text

    check()
    assert not failures, failures[:5]
    assert httpx.get(fuzzed.base_url + "/health").status_code == 200
