"""The bridge between asyncio request handlers and the (synchronous, single-threaded) LLMEngine.

One background thread owns the engine: it builds it (the service answers 503 meanwhile), applies queued
add/abort commands, runs `engine.step()` while there is work and hands each step's outputs to the event loop with
one `loop.call_soon_threadsafe` per step. No other thread touches the engine. A request with n > 1 choices is n
engine requests feeding one asyncio queue. Admission is bounded (running slots + --max-queue): beyond that, 429.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import enum
import logging
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any, Callable

from prometheus_client import CollectorRegistry

from service.errors import ApiError
from service.metrics import EXPERT_SERIES_AUTO_LIMIT, MoeLayout, ServiceMetrics, dense_peak_flops
from service.request_timing import RequestTiming

logger = logging.getLogger("staticmoe.service")


class EngineState(enum.Enum):
    LOADING = "loading"
    READY = "ready"
    DRAINING = "draining"
    STOPPED = "stopped"
    FAILED = "failed"


@dataclass
class ClientOptions:
    model_name: str
    max_queue: int = 1024            # admitted requests beyond the running batch
    max_running: int = 256           # the engine's max_num_seqs
    expert_metrics: str = "auto"     # auto | on | off (per-expert counters; "off" also drops window gauges)
    moe_peak_flops: float | None = None  # override of the per-device table
    metrics_interval_s: float = 0.25  # how often a busy engine publishes MoE stats


class RequestGroup:
    """The engine requests of one HTTP request (n choices). Iterate for (choice index, RequestOutput)."""

    def __init__(self, client: "EngineClient", request_ids: list[str]):
        self.client = client
        self.request_ids = request_ids
        self.unfinished = set(request_ids)
        self.queue: asyncio.Queue = asyncio.Queue()

    def deliver(self, items: list) -> None:  # on the event loop
        for item in items:
            self.queue.put_nowait(item)

    def __aiter__(self):
        return self

    async def __anext__(self) -> tuple[int, Any]:
        if not self.unfinished:
            raise StopAsyncIteration
        item = await self.queue.get()
        if isinstance(item, BaseException):
            self.unfinished.clear()
            raise item
        index, output = item
        if output.finished:
            self.unfinished.discard(self.request_ids[index])
        return index, output

    def abort(self) -> None:
        """Cancel what is still running (client gone); the engine frees the KV blocks on its next loop turn."""
        if self.unfinished:
            self.client.abort(list(self.unfinished))
            self.unfinished.clear()


class EngineClient:
    def __init__(self, engine_factory: Callable[[], Any], options: ClientOptions,
                 registry: CollectorRegistry | None = None):
        self.engine_factory = engine_factory
        self.options = options
        self.registry = registry or CollectorRegistry()
        self.engine = None
        self.metrics: ServiceMetrics | None = None
        self.state = EngineState.LOADING
        self.load_error: BaseException | None = None
        self.loaded = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._commands: collections.deque = collections.deque()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._inflight = 0
        self._routes: dict[str, tuple[RequestGroup, int]] = {}  # engine thread only
        self._timing: RequestTiming | None = None
        self._last_moe_publish = 0.0

    # ---- lifecycle (event-loop side) ------------------------------------------------------------------------------
    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._thread = threading.Thread(target=self._run, name="staticmoe-engine", daemon=True)
        self._thread.start()

    def shutdown(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
            if not self._thread.is_alive():
                self._fail_all(ApiError(503, "The server shut down before the request finished", code="shutdown"))
        with self._lock:
            if self.state != EngineState.FAILED:
                self.state = EngineState.STOPPED

    def begin_drain(self) -> None:
        """SIGTERM: refuse new requests with 503; the ones in flight run to completion."""
        with self._lock:
            if self.state in (EngineState.LOADING, EngineState.READY):
                self.state = EngineState.DRAINING
        logger.info("draining: %d request(s) in flight, new requests get 503", self._inflight)

    @property
    def started(self) -> bool:
        return self._thread is not None

    @property
    def inflight(self) -> int:
        return self._inflight

    def is_drained(self) -> bool:
        return self._inflight == 0

    def _rank_failure(self) -> str | None:
        """Why a rank of a parallel model died; seen here even while the engine thread is stuck in a collective."""
        workers = getattr(self.engine, "workers", None)
        return None if workers is None else workers.failure

    def is_healthy(self) -> bool:
        if self._rank_failure() is not None:
            return False
        return (self.state == EngineState.READY and self._thread is not None and self._thread.is_alive())

    # ---- requests (event-loop side) -------------------------------------------------------------------------------
    def _admit(self, n: int) -> None:
        capacity = self.options.max_running + self.options.max_queue
        with self._lock:
            if self.state == EngineState.LOADING:
                raise ApiError(503, "The model is still loading; retry shortly", code="model_loading")
            if self._rank_failure() is not None:
                raise ApiError(503, "The model cannot serve: a parallel worker rank died", code="unavailable")
            if self.state != EngineState.READY:
                raise ApiError(503, f"The server is not accepting requests ({self.state.value})",
                               code="shutting_down" if self.state == EngineState.DRAINING else "unavailable")
            if n > capacity:
                raise ApiError(400, f"n={n} exceeds this server's capacity of {capacity} concurrent sequences",
                               param="n", code="invalid_value")
            if self._inflight + n > capacity:
                if self.metrics is not None:
                    self.metrics.rejected.labels("queue_full").inc()
                raise ApiError(429, f"The request queue is full ({self._inflight} sequences in flight, "
                                    f"limit {capacity}); retry later", code="queue_full")
            self._inflight += n

    def _release(self, n: int) -> None:
        with self._lock:
            self._inflight -= n

    async def generate(self, prompts: list[list[int]], params: list[Any]) -> RequestGroup:
        """Submit one engine request per (prompt, params) pair; raises ApiError (400/429/503) if refused."""
        self._admit(len(prompts))
        base = uuid.uuid4().hex
        group = RequestGroup(self, [f"{base}-{i}" for i in range(len(prompts))])
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._submit(("add", group, prompts, params, time.monotonic(), future))
        try:
            await asyncio.wrap_future(future)
        except asyncio.CancelledError:
            group.abort()
            raise
        except ValueError as err:  # the engine refused the request (e.g. beyond max_model_len)
            raise ApiError(400, str(err), code="invalid_value") from None
        return group

    def abort(self, request_ids: list[str]) -> None:
        self._submit(("abort", request_ids))

    def _submit(self, command: tuple) -> None:
        self._commands.append(command)
        self._wake.set()

    # ---- the engine thread ----------------------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            self._load()
        except BaseException as err:  # noqa: BLE001 - any failure to load is reported through /health
            logger.exception("engine failed to load")
            self.load_error = err
            with self._lock:
                self.state = EngineState.FAILED
            self.loaded.set()
            return
        try:
            self._loop_forever()
        except BaseException as err:  # noqa: BLE001
            logger.exception("engine loop failed; failing all requests in flight")
            with self._lock:
                self.state = EngineState.FAILED
            self._fail_all(ApiError(500, f"engine failure: {type(err).__name__}: {err}", code="engine_error"))

    def _load(self) -> None:
        started = time.monotonic()
        engine = self.engine_factory()
        self.engine = engine
        self.metrics = ServiceMetrics(self.options.model_name, max_model_len(engine), self.registry)
        self._timing = RequestTiming(self.metrics)
        self._configure_moe_metrics(engine)
        with self._lock:
            if self.state == EngineState.LOADING:
                self.state = EngineState.READY
        self.loaded.set()
        logger.info("model %s loaded in %.1f s: device=%s dtype=%s max_model_len=%d kernel path: %s",
                    self.options.model_name, time.monotonic() - started, engine.device,
                    getattr(engine, "dtype", "?"), max_model_len(engine), engine.kernel_path)

    def _configure_moe_metrics(self, engine) -> None:
        mode = self.options.expert_metrics
        first = engine.moe_stats()  # its shape names the MoE layers (rows) and their experts
        experts = [len(row) for row in first.expert_tokens_total]
        labels = [str(i) for i in (getattr(first, "layer_indices", None) or range(len(experts)))]
        if not experts:  # expert accounting off in the engine: size from the config instead
            cfg = engine.model_config
            labels = [str(i) for i in range(int(cfg.num_layers))]
            experts = [int(cfg.num_experts)] * len(labels)
        device_name = first.device_name or device_display_name(engine.device)
        precision = getattr(first, "precision", "") or "bfloat16"
        peak = self.options.moe_peak_flops or dense_peak_flops(device_name, precision)
        self.metrics.configure_moe(MoeLayout(
            layer_labels=labels, experts_per_layer=experts, device_name=device_name, peak_flops=peak,
            precision=precision,
            expert_counters=mode == "on" or (mode == "auto" and sum(experts) <= EXPERT_SERIES_AUTO_LIMIT),
            expert_window_metrics=mode != "off"))
        self.metrics.update_moe(first)

    def _loop_forever(self) -> None:
        engine = self.engine
        busy_before = False
        while not self._stop.is_set():
            self._wake.clear()
            self._apply_commands()
            if not engine.has_unfinished_requests():
                if busy_before:  # just went idle: publish exact final numbers once
                    self._publish(force_moe=True)
                    busy_before = False
                self._wake.wait(timeout=1.0)
                continue
            busy_before = True
            step_start = time.monotonic()
            outputs = engine.step()
            step_end = time.monotonic()
            self._publish(force_moe=not engine.has_unfinished_requests())
            self._dispatch(outputs, step_start, step_end)

    def _apply_commands(self) -> None:
        engine = self.engine
        while self._commands:
            command = self._commands.popleft()
            if command[0] == "add":
                _, group, prompts, params, arrival, future = command
                added = []
                try:
                    for index, (prompt, p) in enumerate(zip(prompts, params)):
                        request_id = group.request_ids[index]
                        engine.add_request(request_id, prompt, p)
                        added.append(request_id)
                        self._routes[request_id] = (group, index)
                        self._timing.on_added(request_id, arrival)
                except BaseException as err:  # noqa: BLE001 - all-or-nothing for the n choices
                    for request_id in added:
                        engine.abort_request(request_id)
                        self._routes.pop(request_id, None)
                        self._timing.forget(request_id)
                    self._release(len(prompts))
                    future.set_exception(err)
                    continue
                future.set_result(None)
            else:
                for request_id in command[1]:
                    if self._routes.pop(request_id, None) is not None:
                        engine.abort_request(request_id)
                        self._timing.on_aborted(request_id)
                        self._release(1)
                self._publish(force_moe=False)  # the freed KV blocks show up in /metrics at once

    def _dispatch(self, outputs: list, step_start: float, step_end: float) -> None:
        by_group: dict[int, tuple[RequestGroup, list]] = {}
        finished = 0
        for output in outputs:
            self._timing.on_output(output, step_start, step_end)
            route = self._routes.get(output.request_id)
            if route is None:  # aborted meanwhile
                continue
            group, index = route
            by_group.setdefault(id(group), (group, []))[1].append((index, output))
            if output.finished:
                del self._routes[output.request_id]
                finished += 1
        if finished:
            self._release(finished)
        if by_group:
            self._loop.call_soon_threadsafe(_deliver_all, list(by_group.values()))

    def _publish(self, force_moe: bool) -> None:
        engine, metrics = self.engine, self.metrics
        metrics.update_engine_stats(engine.stats())
        now = time.monotonic()
        if force_moe or now - self._last_moe_publish >= self.options.metrics_interval_s:
            metrics.update_moe(engine.moe_stats())
            self._last_moe_publish = now

    def _fail_all(self, error: BaseException) -> None:
        while self._commands:  # adds never applied: their handlers wait on the future
            command = self._commands.popleft()
            if command[0] == "add" and not command[-1].done():
                command[-1].set_exception(error)
        groups = {id(g): g for g, _ in self._routes.values()}
        self._routes.clear()
        with self._lock:
            self._inflight = 0
        if self._loop is not None:
            for group in groups.values():
                self._loop.call_soon_threadsafe(group.deliver, [error])


def _deliver_all(batches: list[tuple[RequestGroup, list]]) -> None:
    for group, items in batches:
        group.deliver(items)


def max_model_len(engine) -> int:
    for source in (engine, getattr(engine, "config", None)):
        value = getattr(source, "max_model_len", None)
        if isinstance(value, int) and value > 0:
            return value
    return int(engine.model_config.max_position_embeddings)


def device_display_name(device) -> str:
    import torch

    if getattr(device, "type", str(device)) == "cuda":
        return torch.cuda.get_device_name(device)
    return str(device)
