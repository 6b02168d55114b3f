"""The bridge between asyncio request handlers and the (synchronous, single-threaded) engine.

One background thread owns the engine: it builds it (the service answers 503 meanwhile), applies queued
add/abort commands, runs `engine.step()` while there is work and hands each step's outputs to the event loop with
one `loop.call_soon_threadsafe` per step. No other thread touches the engine: this is the service's one concurrency
layer. A request with n > 1 choices is n engine requests feeding one RequestGroup. Admission is bounded (running
slots + --max-queue): beyond that, 429.

Progress heartbeat: the engine thread stamps the time at every turn of its loop (at least every second while idle).
A step that runs past --engine-stall-timeout makes the engine "stalled": /health and /ready answer 503, new requests
get 503 and the requests in flight end with 503 instead of waiting on a step that may never return.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import enum
import gc
import logging
import threading
import time
import uuid
import weakref
from dataclasses import dataclass
from typing import Callable

import torch
from prometheus_client import CollectorRegistry

from service.engine_interface import ServingEngine
from service.errors import ApiError
from service.metrics import EXPERT_SERIES_AUTO_LIMIT, MoeLayout, ServiceMetrics, dense_peak_flops
from service.request_group import RequestGroup
from service.request_timing import RequestTiming
from service.structured_request import index_vocabulary_ahead

logger = logging.getLogger("staticmoe.service")

ENGINE_FAILED_MESSAGE = "The engine failed while serving this request (the server log has the details)"


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
    request_timeout_s: float | None = 600.0  # admission to last token; None or 0 = no limit
    stall_timeout_s: float = 120.0   # an engine turn (one step) longer than this counts as a hung engine
    freeze_heap: bool = False        # after loading, freeze_startup_heap() (the server's; tests load many engines)

    def __post_init__(self):
        if not self.stall_timeout_s > 0:
            raise ValueError(f"the engine stall timeout must be > 0 s, got {self.stall_timeout_s}")
        if self.request_timeout_s is not None and self.request_timeout_s < 0:
            raise ValueError(f"the request timeout must be >= 0 s (0 = none), got {self.request_timeout_s}")


class EngineClient:
    def __init__(self, engine_factory: Callable[[], ServingEngine], options: ClientOptions,
                 registry: CollectorRegistry | None = None):
        self.engine_factory = engine_factory
        self.options = options
        self.registry = registry or CollectorRegistry()
        self.engine: ServingEngine | None = None
        self.metrics: ServiceMetrics | None = None
        self.state = EngineState.LOADING
        self.load_error: BaseException | None = None  # the model did not load
        self.loop_error: BaseException | None = None  # the engine loop raised
        self.loaded = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._watchdog: asyncio.Task | None = None
        self._lock = threading.Lock()
        self._commands: collections.deque = collections.deque()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._inflight = 0
        self._progress_at = time.monotonic()  # the engine thread's heartbeat
        self._groups: weakref.WeakSet[RequestGroup] = weakref.WeakSet()  # event loop only
        self._routes: dict[str, tuple[RequestGroup, int]] = {}  # engine thread only
        self._timing: RequestTiming | None = None
        self._last_moe_publish = 0.0

    # ---- lifecycle (event-loop side) ------------------------------------------------------------------------------
    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._thread = threading.Thread(target=self._run, name="staticmoe-engine", daemon=True)
        self._thread.start()
        self._watchdog = loop.create_task(self._watch_progress())

    def shutdown(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._watchdog is not None:
            self._watchdog.cancel()
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

    def fail_inflight(self, error: ApiError) -> None:
        """End every request in flight with `error` (event loop): streams get it in-band, others as the answer."""
        for group in list(self._groups):
            group.fail(error)

    @property
    def started(self) -> bool:
        return self._thread is not None

    @property
    def inflight(self) -> int:
        return self._inflight

    @property
    def capacity(self) -> int:
        """Sequences admitted at once: the running batch plus the queue."""
        return self.options.max_running + self.options.max_queue

    def is_drained(self) -> bool:
        return self._inflight == 0

    # ---- health ---------------------------------------------------------------------------------------------------
    def fatal_error(self) -> str | None:
        """Why this process can never serve again (the server then exits non-zero), or None."""
        if self.load_error is not None:
            return f"the model failed to load ({type(self.load_error).__name__}: {self.load_error})"
        if self.loop_error is not None:
            return f"the engine loop failed ({type(self.loop_error).__name__}: {self.loop_error})"
        workers = self.engine.workers if self.engine is not None else None
        if workers is not None and workers.failure is not None:  # seen even while a step waits in a collective
            return workers.failure
        if self.state in (EngineState.READY, EngineState.DRAINING) and not self._thread.is_alive():
            return "the engine thread ended"
        return None

    def stalled_for(self) -> float:
        """Seconds since the engine thread's last turn, once that exceeds the stall timeout; else 0."""
        if self.state not in (EngineState.READY, EngineState.DRAINING):
            return 0.0
        since = time.monotonic() - self._progress_at
        return since if since > self.options.stall_timeout_s else 0.0

    def unavailable(self) -> tuple[str, str] | None:
        """(code, message) saying why the engine cannot take requests now, or None while it can."""
        if self.fatal_error() is not None or self.state == EngineState.FAILED:
            return "failed", "the engine failed (the server log has the details)"
        if self.state == EngineState.LOADING:
            return "loading", "the model is loading"
        if self.state == EngineState.DRAINING:
            return "draining", "the server is draining for shutdown"
        if self.state != EngineState.READY:
            return self.state.value, f"the engine is {self.state.value}"
        stalled = self.stalled_for()
        if stalled:
            return "stalled", f"the engine has made no progress for {stalled:.0f} s (--engine-stall-timeout)"
        return None

    def is_healthy(self) -> bool:
        return self.unavailable() is None

    async def _watch_progress(self) -> None:
        """Fail the requests in flight once the engine stalls, so no client waits on a step that never returns."""
        interval = min(1.0, self.options.stall_timeout_s / 4)
        reported = False
        while True:
            await asyncio.sleep(interval)
            stalled = self.stalled_for()
            if stalled and not reported:
                logger.error("the engine has made no progress for %.0f s (a step hangs): /health answers 503 and "
                             "%d sequence(s) in flight are failed", stalled, self._inflight)
                self.fail_inflight(ApiError(503, "The engine stopped making progress; retry later",
                                            code="engine_stalled"))
            elif reported and not stalled:
                logger.warning("the engine makes progress again")
            reported = bool(stalled)

    # ---- requests (event-loop side) -------------------------------------------------------------------------------
    def check_accepting(self) -> None:
        """503 unless new requests are taken now (called before a request's work, and again at admission)."""
        reason = self.unavailable()
        if reason is None:
            return
        code, message = reason
        codes = {"loading": "model_loading", "draining": "shutting_down", "stalled": "engine_stalled"}
        raise ApiError(503, message[0].upper() + message[1:] + ("; retry shortly" if code == "loading" else ""),
                       code=codes.get(code, "unavailable"))

    def _admit(self, n: int) -> None:
        capacity = self.capacity
        with self._lock:
            self.check_accepting()
            if self._inflight + n > capacity:
                if self.metrics is not None:
                    self.metrics.rejected.labels("queue_full").inc()
                raise ApiError(429, f"The request queue is full ({self._inflight} sequences in flight, "
                                    f"limit {capacity}); retry later", code="queue_full")
            self._inflight += n

    def _release(self, n: int) -> None:
        with self._lock:
            self._inflight -= n

    async def generate(self, prompts: list[list[int]], params: list, prompts_checked: bool = False) -> RequestGroup:
        """Submit one engine request per (prompt, params) pair; raises ApiError (429/503) if refused.
        `prompts_checked`: every id is known to be an int in [0, vocab) (the engine thread then skips that check)."""
        self._admit(len(prompts))
        base = uuid.uuid4().hex
        group = RequestGroup([f"{base}-{i}" for i in range(len(prompts))], self.abort,
                             self.options.request_timeout_s or None)
        self._groups.add(group)
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._submit(("add", group, prompts, params, prompts_checked, time.monotonic(), future))
        added = asyncio.wrap_future(future)
        try:  # the group can end before the engine takes the request: a hung step, the drain, the deadline
            await asyncio.wait({added, group.ended}, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            added.cancel()  # an add the engine has not started is skipped
            group.abort()
            raise
        if not added.done():
            added.cancel()
            group.abort()
            raise group.ended.result()
        try:
            added.result()
        except ValueError as err:  # the engine refused the request (e.g. beyond max_model_len)
            group.abort()
            raise ApiError(400, str(err), code="invalid_value") from None
        return group

    def abort(self, request_ids: list[str]) -> None:
        self._submit(("abort", request_ids))

    async def reset_prefix_cache(self) -> int:
        """Forget the engine's cached prefixes, on the engine thread between steps. Returns the blocks dropped.
        503 as other requests get it (loading, failed, stalled), but also while draining: it adds no work."""
        if (reason := self.unavailable()) is not None and reason[0] != "draining":
            self.check_accepting()
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._submit(("reset_prefix_cache", future))
        done = asyncio.wrap_future(future)
        # the command waits for the step under way; a step that hangs must not hold the caller with it
        while not (await asyncio.wait({done}, timeout=min(1.0, self.options.stall_timeout_s / 4)))[0]:
            if self.stalled_for():
                done.cancel()  # not yet applied: skipped; applied meanwhile: harmless
                self.check_accepting()
        return done.result()

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
            self.loop_error = err
            with self._lock:
                self.state = EngineState.FAILED
            # the client learns that the engine failed, not why: exception text may describe the host or the model
            self._fail_all(ApiError(500, ENGINE_FAILED_MESSAGE, code="engine_error"))

    def _load(self) -> None:
        started = time.monotonic()
        engine = self.engine_factory()
        self.engine = engine
        self.metrics = ServiceMetrics(self.options.model_name, engine.max_model_len, self.registry)
        self._timing = RequestTiming(self.metrics)
        self._configure_moe_metrics(engine)
        self._progress_at = time.monotonic()
        # logged before /health turns 200, so whoever saw the server ready finds the line in its log
        logger.info("model %s loaded in %.1f s: device=%s dtype=%s max_model_len=%d kernel path: %s",
                    self.options.model_name, time.monotonic() - started, engine.device, engine.dtype,
                    engine.max_model_len, engine.kernel_path)
        with self._lock:
            if self.state == EngineState.LOADING:
                self.state = EngineState.READY
        self.loaded.set()
        if hasattr(engine, "tokenizer"):
            index_vocabulary_ahead(engine)
        if self.options.freeze_heap:
            freeze_startup_heap()

    def _configure_moe_metrics(self, engine: ServingEngine) -> None:
        mode = self.options.expert_metrics
        first = engine.moe_stats()  # its shape names the MoE layers (rows) and their experts
        experts = [len(row) for row in first.expert_tokens_total]
        labels = [str(i) for i in (first.layer_indices or range(len(experts)))]
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
        idle_wait = min(1.0, self.options.stall_timeout_s / 4)  # an idle engine's heartbeat stays fresh
        busy_before = False
        while not self._stop.is_set():
            self._progress_at = time.monotonic()
            self._wake.clear()
            self._apply_commands()
            if not engine.has_unfinished_requests():
                if busy_before:  # just went idle: publish exact final numbers once
                    self._publish(force_moe=True)
                    busy_before = False
                self._wake.wait(timeout=idle_wait)
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
                _, group, prompts, params, checked, arrival, future = command
                if not future.set_running_or_notify_cancel():  # the handler gave up waiting (client gone)
                    self._release(len(prompts))
                    continue
                added = []
                try:
                    for index, (prompt, p) in enumerate(zip(prompts, params)):
                        request_id = group.request_ids[index]
                        engine.add_request(request_id, prompt, p, prompt_checked=checked)
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
            elif command[0] == "reset_prefix_cache":
                future = command[1]
                if not future.set_running_or_notify_cancel():  # the handler gave up waiting
                    continue
                try:
                    future.set_result(engine.reset_prefix_cache())
                except Exception as err:  # noqa: BLE001 - reported to the caller, the loop goes on
                    future.set_exception(err)
                self._publish(force_moe=False)
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
        while self._commands:  # adds and resets never applied: their handlers wait on the future
            command = self._commands.popleft()
            if command[0] in ("add", "reset_prefix_cache") and command[-1].set_running_or_notify_cancel():
                command[-1].set_exception(error)
        groups = {id(g): g for g, _ in self._routes.values()}
        self._routes.clear()
        with self._lock:
            self._inflight = 0
        if self._loop is not None and not self._loop.is_closed():
            for group in groups.values():
                self._loop.call_soon_threadsafe(group.fail, error)


def freeze_startup_heap() -> None:
    """Move every object alive after start-up (torch, the model, the app: ~360k on the CPU) out of the cyclic
    garbage collector's reach. Each full collection otherwise walks them all with the GIL held, stopping the event
    loop and the engine alike: 180-370 ms pauses while serving (benchmarks/NOTES.md, "the olmoe lockstep burst").
    Objects made later are collected as before."""
    gc.collect()
    gc.freeze()


def _deliver_all(batches: list[tuple[RequestGroup, list]]) -> None:
    for group, items in batches:
        group.deliver(items)


def device_display_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return str(device)
