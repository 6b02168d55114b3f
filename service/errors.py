"""One OpenAI-style error body for every failure: {"error": {"message", "type", "param", "code"}}.

Bad input is always a 4xx with a message that names the offending field; a 5xx means a bug or an engine failure.
"""

from __future__ import annotations

import json
import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

logger = logging.getLogger("staticmoe.service")

ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    405: "invalid_request_error",
    408: "invalid_request_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "service_unavailable_error",
    504: "timeout_error",
}


class ApiError(Exception):
    """Raised anywhere in the service; turned into the OpenAI error body by the handler below."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code


def bad_request(message: str, param: str | None = None, code: str | None = "invalid_value") -> ApiError:
    return ApiError(400, message, param=param, code=code)


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": ERROR_TYPES.get(status, "invalid_request_error"),
                      "param": param, "code": code}}


class AsciiJSONResponse(JSONResponse):
    """JSON with non-ASCII escaped: an error message that quotes client text can always be encoded."""

    def render(self, content) -> bytes:
        return json.dumps(content, ensure_ascii=True, separators=(",", ":")).encode("ascii")


def error_response(status: int, message: str, param: str | None = None, code: str | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    return AsciiJSONResponse(error_body(status, message, param, code), status_code=status, headers=headers)


def error_bytes(status: int, message: str, code: str | None = None, param: str | None = None) -> bytes:
    """The same body pre-encoded, for the raw ASGI middleware that answers before FastAPI runs."""
    return json.dumps(error_body(status, message, param, code)).encode()


def _describe_validation_error(err: dict) -> tuple[str, str | None, str]:
    """One pydantic error → (message, param, code). `param` is the dotted JSON path without the leading 'body'."""
    loc = [str(part) for part in err.get("loc", ()) if part != "body"]
    # pydantic names union members in the location ("str", "list[int]", "function-after[...]"): drop those
    loc = [part for part in loc if not (part[:1].isalpha() and ("[" in part or part in {"str", "int", "float",
                                                                                           "bool", "list"}))]
    # ...and models in a union of request bodies (/tokenize: TokenizeCompletionRequest | TokenizeChatRequest)
    loc = [part for part in loc if not (part[:1].isupper() and part.isalnum())]
    param = ".".join(loc) or None
    kind = err.get("type", "")
    if kind == "json_invalid":
        detail = err.get("ctx", {}).get("error", "invalid JSON")
        return f"Malformed JSON body: {detail}", None, "invalid_json"
    if kind == "missing" and not loc:
        return "A JSON request body is required", None, "missing_body"
    if kind == "missing":
        return f"Missing required field '{param}'", param, "missing_field"
    if kind == "extra_forbidden":
        return f"Unknown field '{param}'", param, "unknown_field"
    message = err.get("msg", "invalid value")
    if param:
        message = f"Invalid value for '{param}': {message}"
    return message, param, "invalid_value"


async def _validation_handler(request: Request, exc: RequestValidationError) -> JSONResponse:
    errors = exc.errors()
    if not errors:
        return error_response(400, "Invalid request", None, "invalid_value")
    message, param, code = _describe_validation_error(errors[0])
    if code == "invalid_value":
        # A union of types (prompt, stop, content) yields one error per member: list what each would need.
        field = (param or "").split(".")[0]
        reasons = []
        for err in errors:
            other = _describe_validation_error(err)[1] or ""
            reason = err.get("msg", "") + (f" (at '{other}')" if other != param else "")
            if other.split(".")[0] == field and reason not in reasons:
                reasons.append(reason)
        if len(reasons) > 1:
            message = f"Invalid value for '{param}': " + "; or ".join(reasons[:4])
    return error_response(400, message, param, code)


async def _api_error_handler(request: Request, exc: ApiError) -> JSONResponse:
    headers = {"Retry-After": "1"} if exc.status in (429, 503) else None
    if exc.status == 401:
        headers = {"WWW-Authenticate": "Bearer"}
    return error_response(exc.status, exc.message, exc.param, exc.code, headers)


def _undecodable_body(exc: StarletteHTTPException) -> str | None:
    """Why FastAPI could not decode a body that json.loads itself refused with something other than a
    JSONDecodeError (FastAPI then says only "There was an error parsing the body"), or None."""
    cause = exc.__cause__
    if isinstance(cause, UnicodeDecodeError):
        return (f"Malformed JSON body: it is not valid {cause.encoding.upper().replace('-SIG', '')} text "
                f"(byte 0x{cause.object[cause.start]:02x} at position {cause.start}); JSON must be UTF-8")
    if isinstance(cause, RecursionError):
        return "Malformed JSON body: arrays or objects nested too deeply to decode"
    return None


async def _http_error_handler(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    if exc.status_code == 400 and (undecodable := _undecodable_body(exc)) is not None:
        return error_response(400, undecodable, code="invalid_json")
    message = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
    if exc.status_code == 404:
        message = f"No route {request.method} {request.url.path}"
    return error_response(exc.status_code, message, code=None, headers=getattr(exc, "headers", None))


async def _unexpected_error_handler(request: Request, exc: Exception) -> JSONResponse:
    logger.exception("unhandled error on %s %s", request.method, request.url.path)
    return error_response(500, f"Internal server error: {type(exc).__name__}", code="internal_error")


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(RequestValidationError, _validation_handler)
    app.add_exception_handler(ApiError, _api_error_handler)
    app.add_exception_handler(StarletteHTTPException, _http_error_handler)
    app.add_exception_handler(Exception, _unexpected_error_handler)
