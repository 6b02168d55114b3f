"""ASGI middleware in front of the app: the checks that need no handler, in the order they can fail.

1. Host allowlist (400): a browser page that points a DNS name it controls at a loopback server (DNS rebinding)
   still sends its own name as Host. /health and /ready are exempt (probes send a pod IP).
2. API key (401) on /v1/*, /tokenize, /detokenize and /reset_prefix_cache; on a POST it closes the connection.
3. A JSON content type on every POST/PUT/PATCH (415): a web page can send text/plain or a form cross-site without
   a CORS preflight (a "simple request"), but not application/json, so refusing the rest closes that door.
4. Body size (413: Content-Length first, then counted while it streams in, never buffered past the limit) and
   body deadline (408): a client that sends headers and then trickles or stops cannot hold the handler.
5. Lone UTF-16 surrogates anywhere in the JSON (400, service/unicode_check.py).
Every response, the guard's own refusals included, carries back the client's X-Request-Id (as OpenAI's API sends
x-request-id), so a trace through a gateway finds its answer.
A GET (or other bodiless method) that declares a body anyway is answered with `Connection: close`, so that body is
never read. The body is then replayed to the app; after the replay `receive` passes through, so the app still sees
`http.disconnect`.
"""

from __future__ import annotations

import asyncio
import hmac
import time

from service.errors import error_bytes
from service.unicode_check import lone_surrogate_field, printable

PROTECTED_PREFIX = "/v1/"
PROTECTED_PATHS = ("/tokenize", "/detokenize")  # vLLM's utility routes run the tokenizer: as costly as /v1/*
PROBE_PATHS = ("/health", "/ready")
BODY_METHODS = ("POST", "PUT", "PATCH")
ADMIN_PATHS = ("/reset_prefix_cache",)  # change server state: the API key guards them as it guards /v1/


class RequestGuard:
    def __init__(self, app, api_key: str | None, max_body_bytes: int, read_timeout_s: float,
                 allowed_hosts: tuple[str, ...]):
        self.app = app
        self.api_key = api_key.encode() if api_key else None
        self.max_body_bytes = max_body_bytes
        self.read_timeout_s = read_timeout_s
        self.any_host = "*" in allowed_hosts
        self.allowed_hosts = frozenset(allowed_hosts)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = time.monotonic()
        headers = dict(scope.get("headers") or [])
        path = scope["path"]
        request_id = headers.get(b"x-request-id")
        if request_id:
            send = _adding_headers(send, [(b"x-request-id", request_id)])
        if not self.any_host and path not in PROBE_PATHS and not self._host_allowed(headers.get(b"host", b"")):
            return await _respond(send, 400, "The Host header names a host this server does not serve (see "
                                             "--allowed-hosts)", "invalid_host", {b"connection": b"close"})
        if self.api_key is not None and (path.startswith(PROTECTED_PREFIX) or path in PROTECTED_PATHS
                                         or path in ADMIN_PATHS):
            if not self._authorized(headers.get(b"authorization", b"")):
                # a body left unread would be read and dropped by uvicorn to keep the connection alive, however
                # large: the size limit comes after the key, so close instead (as 413 and 415 do)
                closing = {b"connection": b"close"} if scope["method"] in BODY_METHODS else {}
                return await _respond(send, 401, "Invalid or missing API key (send 'Authorization: Bearer <key>')",
                                      "invalid_api_key", {b"www-authenticate": b"Bearer", **closing})
        if scope["method"] not in BODY_METHODS:
            if headers.get(b"content-length", b"0") != b"0" or b"transfer-encoding" in headers:
                # no route reads a body here, and uvicorn would read and drop it, however large, to keep the
                # connection alive: close it after the answer instead
                send = _adding_headers(send, [(b"connection", b"close")])
            return await self.app(scope, receive, send)
        if not _is_json(headers.get(b"content-type", b"")):
            return await _respond(send, 415, "Request bodies must be JSON: send 'Content-Type: application/json'",
                                  "unsupported_media_type", {b"connection": b"close"})

        declared = headers.get(b"content-length")
        if declared is not None:
            try:
                declared_size = int(declared)
            except ValueError:
                return await _respond(send, 400, "Invalid Content-Length header", "invalid_header")
            if declared_size > self.max_body_bytes:
                return await _respond(send, 413, self._too_large(declared_size), "request_too_large",
                                      {b"connection": b"close"})

        chunks, size = [], 0
        deadline = started + self.read_timeout_s
        while True:
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - time.monotonic()))
            except asyncio.TimeoutError:
                return await _respond(send, 408, f"The request body did not arrive within {self.read_timeout_s:g} "
                                                 f"s (--read-timeout)", "read_timeout", {b"connection": b"close"})
            if message["type"] == "http.disconnect":
                return  # client gave up while sending; nobody to answer
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                return await _respond(send, 413, self._too_large(size, at_least=True), "request_too_large",
                                      {b"connection": b"close"})
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        field = lone_surrogate_field(body)
        if field is not None:
            where = f"'{field}'" if field else "the body"
            return await _respond(send, 400, f"Invalid value for {where}: it holds a lone UTF-16 surrogate (an "
                                             f"unpaired \\ud800-\\udfff), which is not Unicode text",
                                  "invalid_unicode", param=printable(field) or None)
        replayed = False

        async def replay_receive():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        return await self.app(scope, replay_receive, send)

    def _host_allowed(self, host_header: bytes) -> bool:
        host = host_header.decode("latin-1").strip().lower()
        if host.startswith("["):  # [v6]:port
            name = host[: host.find("]") + 1] if "]" in host else host
        else:
            name = host.rsplit(":", 1)[0] if host.count(":") == 1 else host
        return name in self.allowed_hosts

    def _authorized(self, header: bytes) -> bool:
        scheme, _, token = header.partition(b" ")
        if scheme.lower() != b"bearer":
            token = b""
        # compare_digest takes constant time for equal-length inputs and never short-circuits on content
        return hmac.compare_digest(token.strip(), self.api_key)

    def _too_large(self, size: int, at_least: bool = False) -> str:
        qualifier = "at least " if at_least else ""
        return f"Request body of {qualifier}{size} bytes exceeds the limit of {self.max_body_bytes} bytes"


def _adding_headers(send, extra: list[tuple[bytes, bytes]]):
    """`send` with `extra` added to the response headers (e.g. the request's X-Request-Id, whose bytes h11 already
    checked)."""
    async def sending(message):
        if message["type"] == "http.response.start":
            message = {**message, "headers": [*message.get("headers", ()), *extra]}
        await send(message)
    return sending


def _is_json(content_type: bytes) -> bool:
    media = content_type.split(b";", 1)[0].strip().lower()
    return media == b"application/json" or (media.startswith(b"application/") and media.endswith(b"+json"))


async def _respond(send, status: int, message: str, code: str, extra_headers: dict | None = None,
                   param: str | None = None) -> None:
    body = error_bytes(status, message, code, param)
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += list((extra_headers or {}).items())
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})
