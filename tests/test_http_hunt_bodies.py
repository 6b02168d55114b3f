"""Request bodies that JSON's own decoder cannot read: bytes that are not UTF-8 and nesting deeper than Python's
recursion limit. Both are malformed JSON (docs/service.md "Errors": 400 `invalid_json`); before, FastAPI's
generic "There was an error parsing the body" came back with `code: null` and no hint of what was wrong."""

import httpx
import pytest

pytest.register_assert_rewrite("tests.service_fixtures")
from tests.service_fixtures import ServerProcess  # noqa: E402

pytest_plugins = ["tests.service_fixtures"]

ERROR_KEYS = {"message", "type", "param", "code"}


def post_raw(server: ServerProcess, path: str, raw: bytes) -> httpx.Response:
    return httpx.post(server.base_url + path, content=raw, timeout=60,
                      headers={**server.headers, "Content-Type": "application/json"})


def invalid_json_error(response: httpx.Response) -> dict:
    assert response.status_code == 400, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == ERROR_KEYS, body
    error = body["error"]
    assert error["type"] == "invalid_request_error" and error["code"] == "invalid_json", error
    return error


@pytest.mark.parametrize("path,raw", [
    ("/v1/completions", b'{"prompt": "caf\xe9", "max_tokens": 2}'),       # latin-1, not UTF-8
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "\xff\xfe"}]}'),
    ("/tokenize", b'{"prompt": "\xc3"}'),                                 # a truncated 2-byte sequence
])
def test_a_body_that_is_not_utf8_is_invalid_json_naming_the_byte(served, path, raw):
    error = invalid_json_error(post_raw(served, path, raw))
    assert "UTF-8" in error["message"], error
    bad = next(i for i in range(len(raw)) if raw[i] >= 0x80)
    assert f"position {bad}" in error["message"], error  # where to look in the body


@pytest.mark.parametrize("path,field", [("/v1/completions", '"prompt": "a", "user"'),
                                        ("/v1/chat/completions", '"messages": [], "metadata"'),
                                        ("/detokenize", '"tokens"')])
def test_a_body_nested_beyond_the_decoders_limit_is_invalid_json(served, path, field):
    depth = 30_000  # 60 kB, under the fixture's 64 KiB body limit
    raw = ("{" + field + ": " + "[" * depth + "]" * depth + "}").encode()
    error = invalid_json_error(post_raw(served, path, raw))
    assert "nest" in error["message"], error
    # the server keeps serving
    assert post_raw(served, "/v1/completions", b'{"prompt": "a", "max_tokens": 1}').status_code == 200


def test_a_401_does_not_read_the_unauthenticated_body_it_refused(served):
    """Before: the 401 kept the connection open, so uvicorn read and discarded the refused body, however large:
    a client with no key could upload without limit (the 413 check comes after the key check). The 413 and 415
    answers already close the connection."""
    import socket

    declared = 64 * 1024 * 1024
    with socket.create_connection(("127.0.0.1", served.port), timeout=10) as sock:
        sock.sendall(f"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     f"Content-Length: {declared}\r\nAuthorization: Bearer wrong\r\n\r\n".encode())
        head = sock.recv(65536)
        assert head.startswith(b"HTTP/1.1 401"), head
        assert b"connection: close" in head.lower(), head
        sent, chunk = 0, b"x" * 65536
        try:
            while sent < declared:
                sock.sendall(chunk)
                sent += len(chunk)
        except OSError:  # the server closed the connection: the rest is never read
            pass
    assert sent < declared // 4, f"the server took {sent >> 20} MiB of a body it refused"


@pytest.mark.parametrize("path", ["/health", "/metrics", "/v1/models", "/no-such-route"])
def test_a_get_with_a_body_is_answered_and_its_body_never_read(served, path):
    """Before: GET routes never read a body, and uvicorn read and dropped whatever one was declared to keep the
    connection alive: 64 MiB (or any size) on /health, which needs no key."""
    import socket

    declared = 64 * 1024 * 1024
    with socket.create_connection(("127.0.0.1", served.port), timeout=10) as sock:
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {served.api_key}\r\n"
                     f"Content-Length: {declared}\r\n\r\n".encode())
        head = sock.recv(65536)
        assert head.startswith(b"HTTP/1.1 "), head
        sent, chunk = 0, b"x" * 65536
        try:
            while sent < declared:
                sock.sendall(chunk)
                sent += len(chunk)
        except OSError:
            pass
    assert sent < declared // 4, f"the server took {sent >> 20} MiB of a body no route reads"
    # a plain GET keeps its keep-alive connection
    with httpx.Client(base_url=served.base_url, headers=served.headers) as client:
        first = client.get("/health")
        assert first.status_code == 200 and "close" not in first.headers.get("connection", "")
