"""One load level spread over several client processes.

A single Python process that parses every SSE chunk of 64 streams (~8,000 chunks/s at 8 ms per token) spends most
of its time doing so, and its event loop then adds its own waiting to every TTFT it measures: on an H100 with
olmoe-1b-7b the server's own TTFT histogram gave 235 ms where the one-process client measured 458 ms
(benchmarks/results/gpu_runs.md, 2026-12-06 08:06). Sharding the requests over processes removes that bias.

`run_sharded(fn, shards)` runs the coroutine function `fn(**kwargs)` once per shard, each in its own process (spawned,
so no parent event loop or connection pool is inherited), all starting at one wall-clock instant, and returns
their results with the wall time from the first start to the last end. Workers are kept for the next level.
"""

from __future__ import annotations

import asyncio
import atexit
import multiprocessing
import os
import time
from concurrent.futures import ProcessPoolExecutor

START_MARGIN_S = 0.2  # every worker sleeps until the shared start instant: no shard starts ahead of the others

_pools: dict[int, ProcessPoolExecutor] = {}


def _pool(workers: int) -> ProcessPoolExecutor:
    if workers not in _pools:
        _pools[workers] = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))
        atexit.register(_pools[workers].shutdown, cancel_futures=True)
    return _pools[workers]


def _run_shard(fn, kwargs: dict, start_at: float):
    async def at_start():
        await asyncio.sleep(max(0.0, start_at - time.time()))
        begin = time.time()
        result = await fn(**kwargs)
        return result, begin, time.time()

    return asyncio.run(at_start())


async def run_sharded(fn, shards: list[dict]) -> tuple[list, float]:
    """([fn(**shard) for each shard], seconds from the earliest shard start to the latest shard end)."""
    pool = _pool(len(shards))
    await asyncio.get_running_loop().run_in_executor(pool, time.sleep, 0)  # at least one worker is up
    start_at = time.time() + START_MARGIN_S
    loop = asyncio.get_running_loop()
    done = await asyncio.gather(*(loop.run_in_executor(pool, _run_shard, fn, kw, start_at) for kw in shards))
    return [r for r, _, _ in done], max(e for _, _, e in done) - min(b for _, b, _ in done)


def default_client_processes() -> int:
    """A quarter of this machine's cores (the server under test needs the rest), 1 to 8."""
    return max(1, min(8, (os.cpu_count() or 1) // 4))


def shard_counts(total: int, parts: int) -> list[int]:
    """`total` split into `parts` near-equal non-negative counts (the first ones one larger)."""
    return [total // parts + (i < total % parts) for i in range(parts)]
