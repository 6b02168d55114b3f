#!/usr/bin/env python
"""Where a lockstep burst's TTFT goes on the host: the real server (uvicorn, FastAPI, engine thread) over loopback,
its model on a simulated device (benchmarks/simulated_device.py), driven by the load generator's multi-turn mode
with every conversation starting at once (bench_prefix_cache.py's shape), and every request's stages stamped.

Stages of one request (time.monotonic, one clock for both processes):
  sent        client: the request is about to be written
  http_in     RequestGuard entered (uvicorn parsed the headers)
  handler     the route's handler entered (body read, JSON parsed, pydantic validated)
  prepared    tokenizer thread done (prompt checked)
  submit      EngineClient.generate (the server's "arrival" for its TTFT histogram)
  added       engine thread: add_request done
  sched       engine thread: the step whose chunk samples the request is scheduled
  out         engine thread: the step that returns its first token ended (the server's TTFT)
  loop        event loop: the handler took the first output
  first       client: first chunk received

    python -m benchmarks.burst_host_profile [--turns 3] [--no-prefix-caching] [--eager-host-ms 25]
"""

from __future__ import annotations

import argparse
import asyncio
import contextvars
import gc
import json
import resource
import socket
import statistics
import subprocess
import sys
import time
import urllib.request

STAGES = ["sent", "http_in", "handler", "prepared", "submit", "added", "sched", "out", "loop", "first"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--conversations", type=int, default=64)
    p.add_argument("--turns", type=int, default=3)
    p.add_argument("--system-prompt-len", type=int, default=2048)
    p.add_argument("--user-len", type=int, default=128)
    p.add_argument("--turn-output-len", type=int, default=128)
    p.add_argument("--no-prefix-caching", action="store_true")
    p.add_argument("--eager-host-ms", type=float, default=25.0, help="host time to launch an eager step")
    p.add_argument("--client-processes", type=int, default=1)
    p.add_argument("--no-httptools", action="store_true", help="the server parses HTTP with h11 even if httptools is "
                                                               "installed")
    p.add_argument("--no-uvloop", action="store_true", help="asyncio's own event loop even if uvloop is installed")
    p.add_argument("--no-gc-freeze", action="store_true", help="leave the start-up heap to the garbage collector")
    p.add_argument("--profile-loop", action="store_true", help="cProfile the event-loop thread (to stderr)")
    p.add_argument("--switch-interval", type=float, default=0.0, help="sys.setswitchinterval in the server (0: keep)")
    p.add_argument("--serve", type=int, default=0, help=argparse.SUPPRESS)  # internal: be the server on this port
    p.add_argument("--json", help="write the raw timelines here")
    return p.parse_args(argv)


# ---- server side ----------------------------------------------------------------------------------------------------
def serve(args) -> int:
    for module, off in (("httptools", args.no_httptools), ("uvloop", args.no_uvloop)):
        if off:
            sys.modules[module] = None  # uvicorn's "auto" then takes h11 / asyncio's loop
    if args.switch_interval:
        sys.setswitchinterval(args.switch_interval)
    from fastapi.responses import JSONResponse

    import service.app as app_module
    from benchmarks.simulated_device import SimulatedDevice, simulated_engine
    from service.engine_client import ClientOptions, EngineClient
    from service.request_group import RequestGroup
    from service.request_guard import RequestGuard
    from service.serving import OpenAIServing
    from service.server import run_server
    from service.settings import ServiceSettings

    now = time.monotonic
    ctx: contextvars.ContextVar = contextvars.ContextVar("burst_request", default=None)
    requests, engine_marks, steps, lags, commands = [], {}, [], [], []
    device = SimulatedDevice(eager_host_ms=args.eager_host_ms)
    collections, gc_started = [], {}

    def on_gc(phase, info):  # the cyclic collector's pauses (they stop every thread: the GIL is held)
        if phase == "start":
            gc_started["t"] = now()
        elif info["generation"] == 2:
            collections.append((gc_started["t"], now() - gc_started["t"]))

    gc.callbacks.append(on_gc)

    lag_task = []

    async def watch_loop():
        """The event loop's lateness (> 2 ms) and its thread's CPU time, sampled every ~1 ms."""
        while True:
            start = now()
            await asyncio.sleep(0.001)
            late = now() - start - 0.001
            lags.append((start, late, time.thread_time()))

    guard_call = RequestGuard.__call__

    async def guard(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"] == "/v1/completions":
            if not lag_task:
                lag_task.append(asyncio.get_running_loop().create_task(watch_loop()))
                if args.profile_loop:
                    import cProfile
                    lag_task.append(cProfile.Profile())
                    lag_task[-1].enable()
            marks = {"http_in": now()}
            requests.append(marks)
            ctx.set(marks)
        return await guard_call(self, scope, receive, send)

    RequestGuard.__call__ = guard
    complete = app_module.complete

    async def handler(serving, body, request):
        ctx.get()["handler"] = now()
        return await complete(serving, body, request)

    app_module.complete = handler
    off_loop = OpenAIServing.off_loop

    async def timed_off_loop(self, fn, *a):
        result = await off_loop(self, fn, *a)
        if ctx.get() is not None:
            ctx.get()["prepared"] = now()
        return result

    OpenAIServing.off_loop = timed_off_loop
    generate = EngineClient.generate

    async def timed_generate(self, prompts, params, **kwargs):
        marks = ctx.get()
        marks["submit"], marks["prompt_len"] = now(), len(prompts[0])
        group = await generate(self, prompts, params, **kwargs)
        marks["rid"] = group.request_ids[0]
        return group

    EngineClient.generate = timed_generate
    anext_ = RequestGroup.__anext__

    async def timed_anext(self):
        item = await anext_(self)
        marks = ctx.get()
        if marks is not None and "loop" not in marks:
            marks["loop"] = now()
        return item

    RequestGroup.__anext__ = timed_anext
    dispatch, apply = EngineClient._dispatch, EngineClient._apply_commands

    def timed_dispatch(self, outputs, step_start, step_end):
        for o in outputs:
            if o.new_token_ids and "out" not in engine_marks.setdefault(o.request_id, {}):
                engine_marks[o.request_id]["out"] = step_end
        return dispatch(self, outputs, step_start, step_end)

    def timed_apply(self):
        if self._commands:
            start, n = now(), len(self._commands)
            apply(self)
            commands.append((start, now() - start, n))

    EngineClient._dispatch, EngineClient._apply_commands = timed_dispatch, timed_apply

    def build():
        engine = simulated_engine(device, enable_prefix_caching=not args.no_prefix_caching)
        add, schedule = engine.add_request, engine.scheduler.schedule

        def timed_add(request_id, prompt, params=None, **kwargs):
            add(request_id, prompt, params, **kwargs)
            engine_marks.setdefault(request_id, {})["added"] = now()

        def timed_schedule():
            start = now()
            out = schedule()
            end = now()
            for s in out.scheduled:
                marks = engine_marks.setdefault(s.seq.request_id, {})
                if s.samples and "sched" not in marks:
                    marks["sched"] = start
            steps.append(dict(t=start, cpu=time.thread_time(), schedule_ms=1e3 * (end - start), seqs=len(out.scheduled),
                              tokens=out.num_tokens, decode=out.is_decode,
                              waiting=len(engine.scheduler.waiting)))
            return out

        engine.add_request, engine.scheduler.schedule = timed_add, timed_schedule
        return engine

    options = dict(model_name="sim", max_queue=64, max_running=64, expert_metrics="off")
    if "freeze_heap" in ClientOptions.__dataclass_fields__:  # (absent before the fix: A/B runs on older trees)
        options["freeze_heap"] = not args.no_gc_freeze
    client = EngineClient(build, ClientOptions(**options))
    settings = ServiceSettings(served_model_name="sim")
    app = app_module.create_app(client, settings)

    @app.get("/_burst")
    async def timelines():
        if args.profile_loop and len(lag_task) > 1:
            import pstats
            lag_task[1].disable()
            pstats.Stats(lag_task[1], stream=sys.stderr).sort_stats("tottime").print_stats(35)
        merged = [dict(m, **engine_marks.get(m.get("rid"), {})) for m in requests]
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return JSONResponse(dict(full_collections=collections, frozen=gc.get_freeze_count(),
                                 loop_cpu_s=time.thread_time(), process_cpu_s=usage.ru_utime + usage.ru_stime,
                                 requests=merged, steps=steps, device=device.steps, lags=lags, commands=commands))

    return run_server(app, client, settings, "127.0.0.1", args.serve, "warning")


# ---- client side ----------------------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, timeout_s: float = 300.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise RuntimeError("the server did not become healthy")


def run_client(args, url: str) -> list[dict]:
    import service.loadgen.multiturn as multiturn

    sent = []
    send = multiturn.send_completion

    async def timed_send(client, u, headers, model, spec, temperature=0.0, extra_body=None):
        start = time.monotonic()
        result = await send(client, u, headers, model, spec, temperature, extra_body)
        sent.append(dict(sent=start, first=start + result.ttft_s, prompt_len=spec.prompt_len, ok=result.ok))
        return result

    multiturn.send_completion = timed_send
    conversations = multiturn.make_conversations(args.conversations, args.turns, args.system_prompt_len,
                                                 args.user_len, args.turn_output_len, 50304, seed=2)
    run = asyncio.run(multiturn.run_conversations(url, conversations, model="sim", processes=args.client_processes))
    if any(not r.ok for _, r in run.results):
        raise RuntimeError(next(r.error for _, r in run.results if not r.ok))
    return sent


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))] if values else float("nan")


def report(args, client: list[dict], server: dict) -> None:
    by_len = {}
    for c in client:
        by_len.setdefault(c["prompt_len"], {})["client"] = by_len.get(c["prompt_len"], {}).get("client", []) + [c]
    for r in server["requests"]:
        by_len.setdefault(r["prompt_len"], {}).setdefault("server", []).append(r)
    lengths = sorted(by_len)
    print(f"caching {'off' if args.no_prefix_caching else 'on'}, eager host {args.eager_host_ms} ms; times in ms "
          f"from the turn's first send, p50 / p90 over its {args.conversations} requests")
    print("| turn | " + " | ".join(STAGES[1:]) + " | TTFT client p50 | server TTFT p50 | http_in -> loop p50 |")
    print("|---" * (len(STAGES) + 3) + "|")
    for turn, length in enumerate(lengths, 1):
        cl, sv = by_len[length].get("client", []), by_len[length].get("server", [])
        t0 = min(c["sent"] for c in cl)
        cells = []
        for stage in STAGES[1:-1]:
            offsets = [1e3 * (r[stage] - t0) for r in sv if stage in r]
            cells.append(f"{pct(offsets, .5):.0f} / {pct(offsets, .9):.0f}")
        firsts = [1e3 * (c["first"] - t0) for c in cl]
        cells.append(f"{pct(firsts, .5):.0f} / {pct(firsts, .9):.0f}")
        ttft = statistics.median(1e3 * (c["first"] - c["sent"]) for c in cl)
        server_ttft = statistics.median(1e3 * (r["out"] - r["submit"]) for r in sv if "out" in r)
        in_to_loop = statistics.median(1e3 * (r["loop"] - r["http_in"]) for r in sv if "loop" in r)
        print(f"| {turn} | " + " | ".join(cells) + f" | {ttft:.0f} | {server_ttft:.0f} | {in_to_loop:.0f} |")
        window = (t0, max(c["first"] for c in cl))
        burst_steps = [s for s in server["steps"] if window[0] <= s["t"] <= window[1]]
        dev = [d for d in server["device"] if window[0] <= d["start"] <= window[1]]
        eager = [d for d in dev if not d["decode"]]
        lags = [lag for t, lag, _ in server["lags"] if window[0] <= t <= window[1] and lag > 0.002]
        loop_cpu = [cpu for t, _, cpu in server["lags"] if window[0] <= t <= window[1]]
        engine_cpu = [s["cpu"] for s in burst_steps]
        cmds = [c for c in server["commands"] if window[0] <= c[0] <= window[1]]
        loop_ms = 1e3 * (loop_cpu[-1] - loop_cpu[0]) if loop_cpu else 0.0
        engine_ms = 1e3 * (engine_cpu[-1] - engine_cpu[0]) if engine_cpu else 0.0
        print(f"    steps until the last first token: {len(burst_steps)} ({len(eager)} eager: host "
              f"{sum(1e3 * (d['launched'] - d['start']) for d in eager):.0f} ms for "
              f"{sum(d['tokens'] for d in eager)} tokens; decode {len(dev) - len(eager)}); schedule() "
              f"{sum(s['schedule_ms'] for s in burst_steps):.1f} ms; add commands {len(cmds)} "
              f"({sum(1e3 * c[1] for c in cmds):.1f} ms); event-loop lateness > 2 ms: {len(lags)} times, "
              f"{1e3 * sum(lags):.0f} ms; CPU time: event loop {loop_ms:.0f} ms, engine thread {engine_ms:.0f} ms; "
              f"waiting at each step: {[s['waiting'] for s in burst_steps][:20]}")


def print_totals(args, client: list[dict], server: dict) -> None:
    chunks = args.conversations * args.turns * (args.turn_output_len + 2)
    start = min(c["sent"] for c in client)
    print(f"whole run: {len(client)} requests, ~{chunks} SSE chunks; event-loop thread CPU "
          f"{server['loop_cpu_s']:.2f} s, server process CPU {server['process_cpu_s']:.2f} s; full (gen-2) garbage "
          f"collections while serving: {[round(1e3 * d) for t, d in server['full_collections'] if t >= start]} ms; "
          f"objects frozen out of the collector: {server['frozen']}")


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.serve:
        return serve(args)
    port = free_port()
    switches = ("no-prefix-caching", "no-httptools", "no-uvloop", "no-gc-freeze", "profile-loop")
    cmd = [sys.executable, "-m", "benchmarks.burst_host_profile", "--serve", str(port), "--eager-host-ms",
           str(args.eager_host_ms), "--switch-interval", str(args.switch_interval)]
    cmd += [f"--{name}" for name in switches if getattr(args, name.replace("-", "_"))]
    server = subprocess.Popen(cmd)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_healthy(url)
        client = run_client(args, url)
        with urllib.request.urlopen(url + "/_burst", timeout=60) as r:
            timelines = json.load(r)
    finally:
        server.terminate()
        server.wait(30)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(client=client, server=timelines), f)
    report(args, client, timelines)
    print_totals(args, client, timelines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
