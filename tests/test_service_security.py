"""Requests a browser page or a slow client could make (issue 17 items 8 and 9), against real loopback servers.

- Cross-site "simple" requests (text/plain, forms, no content type; no CORS preflight) get 415: only JSON is read.
- A Host header outside the allowlist gets 400 (DNS rebinding onto a loopback server); probes are exempt.
- `--host` on a non-loopback address without an API key refuses to start unless explicitly allowed.
- A client that sends headers and a byte of the body, or nothing at all, is answered 408 and closed after
  --read-timeout; the server keeps serving meanwhile. Connections beyond --max-connections get 503.
"""

import socket
import subprocess
import sys
import time

import httpx
import openai
import pytest

pytest.register_assert_rewrite("tests.service_fixtures")
from service import cli  # noqa: E402
from tests.service_fixtures import REPO_ROOT, ServerProcess, free_port, wait_for  # noqa: E402

pytest_plugins = ["tests.service_fixtures"]


def post(server, body: bytes, content_type: str | None, **headers) -> httpx.Response:
    if content_type is not None:
        headers["Content-Type"] = content_type
    return httpx.post(server.base_url + "/v1/completions", content=body, headers={**server.headers, **headers},
                      timeout=60)


@pytest.mark.parametrize("content_type", [None, "text/plain", "text/plain;charset=UTF-8",
                                          "application/x-www-form-urlencoded", "multipart/form-data; boundary=x",
                                          "application/jsonp", "text/json"])
def test_non_json_bodies_get_415(served, content_type):
    response = post(served, b'{"prompt": "a", "max_tokens": 2}', content_type)
    assert response.status_code == 415, response.text
    assert response.json()["error"]["code"] == "unsupported_media_type"


@pytest.mark.parametrize("content_type", ["application/json", "application/json; charset=utf-8",
                                          "Application/JSON", "application/vnd.api+json"])
def test_json_content_types_are_served(served, content_type):
    response = post(served, b'{"prompt": "a", "max_tokens": 2}', content_type)
    assert response.status_code == 200, response.text


def test_host_header_outside_the_allowlist_gets_400(served):
    port = served.port
    for host in ("evil.example", f"evil.example:{port}", "127.0.0.1.evil.example", f"localhost.:{port}"):
        for response in (post(served, b'{"prompt": "a"}', "application/json", Host=host),
                         httpx.get(served.base_url + "/v1/models", headers={**served.headers, "Host": host}),
                         httpx.get(served.base_url + "/metrics", headers={"Host": host})):
            assert response.status_code == 400, (host, response.text)
            assert response.json()["error"]["code"] == "invalid_host"
        assert httpx.get(served.base_url + "/health", headers={"Host": host}).status_code == 200  # probes
    for host in (f"localhost:{port}", f"127.0.0.1:{port}", "LOCALHOST", f"[::1]:{port}"):
        response = httpx.get(served.base_url + "/v1/models", headers={**served.headers, "Host": host})
        assert response.status_code == 200, (host, response.text)


def test_allowed_hosts_flag_replaces_the_default():
    server = ServerProcess(["--allowed-hosts", "api.example.com, other.example"]).wait_healthy()
    try:
        def models(host):
            return httpx.get(server.base_url + "/v1/models", headers={"Host": host}).status_code

        assert models("api.example.com:443") == models("other.example") == 200
        assert models("127.0.0.1") == models("evil.example") == 400
        client = openai.OpenAI(base_url=server.base_url + "/v1", api_key="x", max_retries=0,
                               default_headers={"Host": "api.example.com"})
        assert client.models.retrieve("tiny").id == "tiny"
    finally:
        server.stop()


def test_open_host_without_an_api_key_refuses_to_start():
    env = {"PYTHONPATH": str(REPO_ROOT)}
    proc = subprocess.run([sys.executable, "-m", "service", "serve", "--host", "0.0.0.0", "--port",
                           str(free_port())], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0
    assert "--api-key" in proc.stderr and "--allow-unauthenticated" in proc.stderr, proc.stderr


@pytest.mark.parametrize("argv,api_key,hosts", [
    (["serve"], None, ("localhost", "127.0.0.1", "[::1]", "::1")),
    (["serve", "--host", "0.0.0.0", "--api-key", "k"], "k", ("*",)),
    (["serve", "--host", "10.1.2.3", "--allow-unauthenticated"], None, ("*",)),
    (["serve", "--host", "::1"], None, ("localhost", "127.0.0.1", "[::1]", "::1")),
    (["serve", "--host", "0.0.0.0", "--api-key", "k", "--allowed-hosts", "a.example,b.example"], "k",
     ("a.example", "b.example")),
])
def test_settings_fail_closed_and_pick_the_host_allowlist(monkeypatch, argv, api_key, hosts):
    for name in ("STATICMOE_API_KEY", "STATICMOE_HOST", "STATICMOE_ALLOWED_HOSTS"):
        monkeypatch.delenv(name, raising=False)
    settings = cli.service_settings(cli.build_parser().parse_args(argv), "tiny")
    assert (settings.api_key, settings.allowed_hosts) == (api_key, hosts)


# ---- slow clients ------------------------------------------------------------------------------------------------
READ_TIMEOUT_S = 1


@pytest.fixture(scope="module")
def strict_reader():
    server = ServerProcess(["--read-timeout", str(READ_TIMEOUT_S), "--max-connections", "256"])
    try:
        yield server.wait_healthy()
    finally:
        server.stop()


def connect(server) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=20)
    return sock


def read_all(sock: socket.socket) -> bytes:
    """What the server sends until it closes the connection (a timeout raises: the connection was held)."""
    chunks = []
    while chunk := sock.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)


def test_fifty_trickling_bodies_get_408_and_the_server_keeps_serving(strict_reader):
    """50 connections that send headers and one byte of a 100-byte body: before, held indefinitely."""
    head = (f"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1:{strict_reader.port}\r\n"
            f"Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{{").encode()
    socks = [connect(strict_reader) for _ in range(50)]
    started = time.monotonic()
    for sock in socks:
        sock.sendall(head)
    served = httpx.post(strict_reader.base_url + "/v1/completions", json={"prompt": "a", "max_tokens": 2},
                        timeout=20)
    assert served.status_code == 200, served.text
    answers = [read_all(sock) for sock in socks]
    assert time.monotonic() - started < 15
    for answer in answers:
        assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
        assert b'"read_timeout"' in answer
    for sock in socks:
        sock.close()


@pytest.mark.parametrize("sent", [b"", b"POST /v1/completions HTTP/1.1\r\nHost: x", b"GET /health HTTP/1.1\r\n"])
def test_connections_that_never_finish_their_headers_are_closed(strict_reader, sent):
    sock = connect(strict_reader)
    started = time.monotonic()
    sock.sendall(sent)
    answer = read_all(sock)
    assert time.monotonic() - started < 15
    if sent:  # part of a request: told why
        assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
    else:
        assert answer == b""
    sock.close()


def read_one_response(sock: socket.socket) -> bytes:
    data = b""
    while b"\r\n\r\n" not in data:
        data += sock.recv(65536)
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(next(line.split(b":")[1] for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")))
    while len(body) < length:
        body += sock.recv(65536)
    return head + b"\r\n\r\n" + body


def test_a_keep_alive_connection_gets_a_new_deadline_after_each_response(strict_reader):
    sock = connect(strict_reader)
    request = f"GET /health HTTP/1.1\r\nHost: 127.0.0.1:{strict_reader.port}\r\n\r\n".encode()
    sock.sendall(request)
    assert read_one_response(sock).startswith(b"HTTP/1.1 200")
    sock.sendall(b"GET /health HTTP/1.1\r\n")  # half a second request, then silence
    assert read_all(sock).startswith(b"HTTP/1.1 408")
    sock.close()


def test_connections_beyond_the_cap_get_503():
    server = ServerProcess(["--max-connections", "4"]).wait_healthy()
    try:
        def status():
            return httpx.get(server.base_url + "/v1/models", timeout=20).status_code

        idle = [connect(server) for _ in range(4)]
        wait_for(lambda: status() == 503, timeout=10)  # once the server has accepted the four
        for sock in idle:
            sock.close()
        wait_for(lambda: status() == 200, timeout=10)
    finally:
        server.stop()
