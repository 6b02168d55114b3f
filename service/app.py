"""FastAPI app factory: the OpenAI-compatible routes, /health, /ready, /metrics, and the optional dashboard router.

/health (liveness; Docker's HEALTHCHECK, Kubernetes' startup and liveness probes): 200 while the engine is loaded
and its loop makes progress; 503 while loading, draining, failed or stalled. /ready (readiness: route traffic
here?): 200 only while a new request would be admitted, so also 503 while the queue is full.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from service.engine_client import EngineClient
from service.errors import ApiError, bad_request, error_response, install_error_handlers
from service.metrics_text import scrape_text
from service.metrics_vllm import vllm_registry
from service.protocol import CompletionRequest, ErrorResponse, ModelCard, ModelList, now
from service.protocol_chat import ChatCompletionRequest
from service.protocol_responses import ChatCompletionResponse, CompletionResponse
from service.request_guard import RequestGuard
from service.routes_tokenize import tokenize_router
from service.serving import OpenAIServing, ServingOptions
from service.serving_chat import chat
from service.serving_completions import completions as complete
from service.settings import ServiceSettings
from service.version import package_version

logger = logging.getLogger("staticmoe.service")

MAX_REQUEST_ID = 256  # the body field's limit (service/protocol.py `request_id`)
ERROR_RESPONSES = {code: {"model": ErrorResponse} for code in (400, 401, 408, 413, 415, 429, 503, 504)}


def create_app(engine_client: EngineClient, settings: ServiceSettings) -> FastAPI:
    """The app starts the engine thread in its lifespan (if not started yet) and stops it on shutdown."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if not engine_client.started:
            engine_client.start(asyncio.get_running_loop())
        try:
            yield
        finally:
            engine_client.shutdown()

    app = FastAPI(title="staticmoe", version=package_version(), lifespan=lifespan,
                  description="OpenAI-compatible serving of Mixture-of-Experts LLMs")
    install_error_handlers(app)
    serving = OpenAIServing(engine_client, ServingOptions(
        served_model_name=settings.served_model_name,
        parse_special_tokens_in_content=settings.parse_special_tokens_in_content,
        ignore_unknown_fields=settings.ignore_unknown_fields, tool_call_parser=settings.tool_call_parser,
        reasoning_parser=settings.reasoning_parser))
    metric_registries = [engine_client.registry] + ([vllm_registry(engine_client.registry)]
                                                    if settings.vllm_metric_names else [])
    created = now()

    def model_card() -> ModelCard:
        engine = engine_client.engine
        return ModelCard(id=settings.served_model_name, created=created,
                         max_model_len=engine.max_model_len if engine is not None else None)

    @app.post("/v1/completions", response_model=CompletionResponse, responses=ERROR_RESPONSES,
              summary="Text completion (OpenAI-compatible; stream=true answers with SSE)")
    async def completions(body: CompletionRequest, request: Request):
        _take_request_id_header(body, request)
        return await complete(serving, body, request)

    @app.post("/v1/chat/completions", response_model=ChatCompletionResponse, responses=ERROR_RESPONSES,
              summary="Chat completion with the tokenizer's chat template (stream=true answers with SSE)")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        _take_request_id_header(body, request)
        return await chat(serving, body, request)

    @app.get("/v1/models", response_model=ModelList, responses={401: {"model": ErrorResponse}})
    async def models():
        return ModelList(data=[model_card()])

    @app.get("/v1/models/{model_id:path}", response_model=ModelCard,
             responses={401: {"model": ErrorResponse}, 404: {"model": ErrorResponse}})
    async def model(model_id: str):
        if model_id != settings.served_model_name:
            raise ApiError(404, f"The model '{model_id}' does not exist; this server serves "
                                f"'{settings.served_model_name}'", param="model", code="model_not_found")
        return model_card()

    @app.get("/health", responses={503: {"model": ErrorResponse}},
             summary="200 while the model is loaded and the engine makes progress; 503 while loading, draining, "
                     "failed or stalled")
    async def health():
        reason = engine_client.unavailable()
        if reason is None:
            return JSONResponse({"status": "ok"})
        return error_response(503, reason[1], code=reason[0], headers={"Retry-After": "1"})

    @app.get("/ready", responses={503: {"model": ErrorResponse}},
             summary="200 while a new request would be admitted; 503 as /health, and while the queue is full")
    async def ready():
        reason = engine_client.unavailable()
        if reason is None and engine_client.inflight >= engine_client.capacity:
            reason = ("queue_full", f"the request queue is full ({engine_client.inflight} sequences in flight)")
        if reason is None:
            return JSONResponse({"status": "ready"})
        return error_response(503, reason[1], code=reason[0], headers={"Retry-After": "1"})

    @app.post("/reset_prefix_cache", responses={401: {"model": ErrorResponse}, 503: {"model": ErrorResponse}},
              summary="Forget every cached prompt prefix (vLLM's admin path; needs the API key when one is set)")
    async def reset_prefix_cache():
        dropped = await engine_client.reset_prefix_cache()
        enabled = bool(getattr(getattr(engine_client.engine, "config", None), "enable_prefix_caching", False))
        return JSONResponse({"status": "ok", "prefix_caching": enabled, "blocks_dropped": dropped})

    @app.get("/metrics", summary="Prometheus metrics (text exposition format)")
    async def metrics():
        return Response(scrape_text(*metric_registries), media_type=CONTENT_TYPE_LATEST)

    def openapi_schema() -> dict:
        """FastAPI's schema, with `model` narrowed to the one served id (clients and fuzzers see what is valid)."""
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, description=app.description,
                                 routes=app.routes)
            for name in ("CompletionRequest", "ChatCompletionRequest"):
                model_field = schema.get("components", {}).get("schemas", {}).get(name, {}) \
                    .get("properties", {}).get("model")
                if model_field is not None:
                    model_field["anyOf"] = [{"type": "string", "enum": [settings.served_model_name]},
                                            {"type": "null"}]
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi_schema
    app.include_router(tokenize_router(serving))
    _include_dashboard(app)
    app.add_middleware(RequestGuard, api_key=settings.api_key, max_body_bytes=settings.max_body_bytes,
                       read_timeout_s=settings.read_timeout_s, allowed_hosts=settings.allowed_hosts)
    return app


def _take_request_id_header(body, request: Request) -> None:
    """X-Request-Id names the request (its response id), over the body's `request_id`, as vLLM reads them: a
    gateway's trace id then finds the answer. The request guard echoes the header on the response."""
    header = request.headers.get("x-request-id")
    if not header:
        return
    if len(header) > MAX_REQUEST_ID:
        raise bad_request(f"X-Request-Id is {len(header)} characters long; at most {MAX_REQUEST_ID} are allowed",
                          "X-Request-Id")
    body.request_id = header


def _include_dashboard(app: FastAPI) -> None:
    """service/dashboard.py (a separate module) adds a throughput dashboard when present."""
    try:
        dashboard = importlib.import_module("service.dashboard")
    except ModuleNotFoundError as err:
        if err.name != "service.dashboard":
            raise
        return
    app.include_router(dashboard.router)
