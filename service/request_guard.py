"""ASGI middleware in front of the app: API-key check (401) and request-body size limit (413).

It runs before FastAPI parses anything, so an oversized or unauthenticated body is never buffered past the limit.
The body is read here (Content-Length is checked first; chunked bodies are counted as they stream in) and then
replayed to the app; after the replay, `receive` passes through, so the app still sees `http.disconnect`.
"""

from __future__ import annotations

import hmac

from service.errors import error_bytes

PROTECTED_PREFIX = "/v1/"
ADMIN_PATHS = ("/reset_prefix_cache",)  # change server state: the API key guards them as it guards /v1/


class RequestGuard:
    def __init__(self, app, api_key: str | None, max_body_bytes: int):
        self.app = app
        self.api_key = api_key.encode() if api_key else None
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        if self.api_key is not None and (scope["path"].startswith(PROTECTED_PREFIX) or scope["path"] in ADMIN_PATHS):
            if not self._authorized(headers.get(b"authorization", b"")):
                return await _respond(send, 401, "Invalid or missing API key (send 'Authorization: Bearer <key>')",
                                      "invalid_api_key", {b"www-authenticate": b"Bearer"})
        if scope["method"] not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        if scope["path"].startswith(PROTECTED_PREFIX) and b"json" not in headers.get(b"content-type", b"json"):
            # every /v1 body is JSON; `curl -d` sends a form content type by default, parse it as JSON anyway
            scope = dict(scope, headers=[(k, v) for k, v in scope["headers"] if k != b"content-type"]
                         + [(b"content-type", b"application/json")])

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
        while True:
            message = await receive()
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
        replayed = False

        async def replay_receive():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        return await self.app(scope, replay_receive, send)

    def _authorized(self, header: bytes) -> bool:
        scheme, _, token = header.partition(b" ")
        if scheme.lower() != b"bearer":
            token = b""
        # compare_digest takes constant time for equal-length inputs and never short-circuits on content
        return hmac.compare_digest(token.strip(), self.api_key)

    def _too_large(self, size: int, at_least: bool = False) -> str:
        qualifier = "at least " if at_least else ""
        return f"Request body of {qualifier}{size} bytes exceeds the limit of {self.max_body_bytes} bytes"


async def _respond(send, status: int, message: str, code: str, extra_headers: dict | None = None) -> None:
    body = error_bytes(status, message, code)
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += list((extra_headers or {}).items())
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})
