"""Helpers of the parallel tests: run a function on W gloo ranks in spawned processes, and drive a model through a
fixed schedule of prefill chunks and decode steps (the same on one rank and on W ranks).

Kept free of transformers imports: every spawned rank imports this module, and on a 2-core runner each second of
import time is paid W times.
"""

from __future__ import annotations

import datetime
import io
import multiprocessing
import os
import queue
import time
import traceback

import torch
import torch.distributed as dist

from model.forward_batch import ForwardBatch

# seq id -> new tokens, per step: a chunked prefill of "a", "b" joining later, then decode steps of both.
SCHEDULE: list[dict[str, list[int]]] = [
    {"a": [5, 17, 33, 2, 101, 64, 9]},
    {"a": [250], "b": [7, 8, 9, 10, 11]},
    {"a": [3], "b": [12, 13, 14, 15, 16, 200, 42]},
    {"a": [77], "b": [1]},
    {"a": [78], "b": [2]},
    {"a": [79], "b": [300]},
]


class PagedSteps:
    """Runs steps of {seq id: new tokens} through a model over a paged cache with shuffled blocks, as the engine
    would (a step whose sequences all bring one token is a pure decode step)."""

    def __init__(self, model, block_size: int = 4, num_blocks: int = 64):
        self.model = model
        self.block_size = block_size
        self.device = next(model.parameters()).device
        dtype = next(model.parameters()).dtype
        self.kv_cache = torch.zeros(model.kv_cache_shape(num_blocks, block_size), dtype=dtype, device=self.device)
        self.free = torch.randperm(num_blocks, generator=torch.Generator().manual_seed(0)).tolist()
        self.seqs: dict[str, dict] = {}

    def step(self, step: dict[str, list[int]]) -> torch.Tensor:
        """Logits [S, V] of the last row of each sequence, in the step's order."""
        block_size, dev = self.block_size, self.device
        ids, positions, slots, tables, ctx, qlens, wanted = [], [], [], [], [], [], []
        for seq_id, tokens in step.items():
            seq = self.seqs.setdefault(seq_id, {"len": 0, "blocks": []})
            start, end = seq["len"], seq["len"] + len(tokens)
            while len(seq["blocks"]) * block_size < end:
                seq["blocks"].append(self.free.pop())
            for pos, token in zip(range(start, end), tokens):
                ids.append(token)
                positions.append(pos)
                slots.append(seq["blocks"][pos // block_size] * block_size + pos % block_size)
            wanted.append(len(ids) - 1)
            seq["len"] = end
            tables.append(seq["blocks"])
            ctx.append(end)
            qlens.append(len(tokens))
        width = max(len(t) for t in tables)
        qsl = [0]
        for n in qlens:
            qsl.append(qsl[-1] + n)
        batch = ForwardBatch(
            input_ids=torch.tensor(ids, device=dev), positions=torch.tensor(positions, device=dev),
            slot_mapping=torch.tensor(slots, device=dev),
            block_tables=torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32, device=dev),
            context_lens=torch.tensor(ctx, dtype=torch.int32, device=dev),
            query_start_loc=torch.tensor(qsl, dtype=torch.int32, device=dev),
            logits_indices=torch.tensor(wanted, device=dev), is_decode=all(n == 1 for n in qlens),
            query_lens_host=qlens, context_lens_host=ctx,
        )
        with torch.inference_mode():
            return self.model(batch, self.kv_cache).cpu()


def run_schedule(model, schedule=SCHEDULE, block_size: int = 4, num_blocks: int = 64) -> list[torch.Tensor]:
    """Logits [S, V] of every step (the last row of each sequence), K/V in a paged cache with shuffled blocks."""
    steps = PagedSteps(model, block_size, num_blocks)
    return [steps.step(step) for step in schedule]


def greedy(model, prompt: list[int], max_tokens: int, chunk: int = 5) -> list[int]:
    """Greedy continuation: the prompt in prefill chunks of `chunk` tokens, then one decode step per token."""
    steps = PagedSteps(model)
    for i in range(0, len(prompt), chunk):
        logits = steps.step({"s": prompt[i : i + chunk]})
    out = [int(logits[-1].argmax())]
    while len(out) < max_tokens:
        out.append(int(steps.step({"s": [out[-1]]})[-1].argmax()))
    return out


def _rank_main(rank: int, world: int, port: int, target, args, results, device_type: str) -> None:
    try:
        from model.parallel.comm import init_process_groups

        torch.set_num_threads(1)
        store = dist.TCPStore("127.0.0.1", port, world + 1, is_master=False, timeout=datetime.timedelta(seconds=60))
        device = torch.device("cuda", rank) if device_type == "cuda" else torch.device("cpu")
        groups = init_process_groups(rank, world, device, store, collective_timeout_s=60)
        result = target(groups, *args)
        buffer = io.BytesIO()  # tensors as bytes: a queue would share their storage, gone once this rank exits
        torch.save(result, buffer)
        results.put((rank, "ok", buffer.getvalue()))
        groups.destroy()
    except BaseException:  # noqa: BLE001 - reported to the test
        results.put((rank, "error", traceback.format_exc()))


def spawn_ranks(world: int, target, args=(), timeout: float = 90.0, device_type: str = "cpu") -> list:
    """Run target(groups, *args) on ranks 0..world-1 (spawned processes; gloo on the CPU, NCCL with device_type
    "cuda", rank r on GPU r); returns their results by rank.
    A rank's exception fails the call with its traceback; the whole run is bounded by `timeout`."""
    ctx = multiprocessing.get_context("spawn")
    store = dist.TCPStore("127.0.0.1", 0, world + 1, is_master=True, wait_for_workers=False,
                          timeout=datetime.timedelta(seconds=60))
    results = ctx.Queue()
    env_threads = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = "1"
    procs = [ctx.Process(target=_rank_main, args=(r, world, store.port, target, args, results, device_type),
                         daemon=True)
             for r in range(world)]
    try:
        for p in procs:
            p.start()
    finally:
        if env_threads is None:
            os.environ.pop("OMP_NUM_THREADS")
        else:
            os.environ["OMP_NUM_THREADS"] = env_threads
    deadline = time.monotonic() + timeout
    collected: dict[int, object] = {}
    errors: dict[int, str] = {}
    try:
        while len(collected) + len(errors) < world:
            # after a failure, give the other ranks a moment to report theirs (the first error is often only
            # "connection closed" from a rank whose peer crashed)
            wait = deadline - time.monotonic() if not errors else min(5.0, deadline - time.monotonic())
            try:
                rank, status, value = results.get(timeout=max(0.1, wait))
            except queue.Empty:
                if errors:
                    break
                raise TimeoutError(f"ranks {sorted(set(range(world)) - set(collected))} did not finish in "
                                   f"{timeout:.0f} s") from None
            (errors if status == "error" else collected)[rank] = value
        if errors:
            raise RuntimeError("\n".join(f"rank {r} failed:\n{tb}" for r, tb in sorted(errors.items())))
    finally:
        for p in procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
    return [torch.load(io.BytesIO(collected[r]), weights_only=False) for r in range(world)]


def parity_target(groups, cases: list[tuple[str, int, int]]) -> dict:
    """On every rank: load each (checkpoint, tensor_parallel, expert_parallel) case sharded, run SCHEDULE.
    Rank 0 returns {case: [logits per step]}; the other ranks return the bytes they read per case."""
    from model.parallel.config import ParallelConfig
    from model.parallel.loading import load_parallel_model

    out = {}
    for directory, tp, ep in cases:
        model, _, stats = load_parallel_model(directory, ParallelConfig(tp, ep), groups.rank, groups.comm,
                                              random_weights=False, dtype=torch.float32, device=groups.device)
        logits = run_schedule(model)  # every rank runs the forward (collectives); rank 0 keeps the logits
        out[(directory, tp, ep)] = logits if groups.rank == 0 else stats.bytes_read
    return out


def parity_and_greedy_target(groups, cases: list[tuple[str, int, int]], prompt: list[int], max_tokens: int) -> dict:
    """`parity_target`'s SCHEDULE logits plus the `greedy` continuation of `prompt`, per case, from rank 0."""
    from model.parallel.config import ParallelConfig
    from model.parallel.loading import load_parallel_model

    out = {}
    for directory, tp, ep in cases:
        model, _, _ = load_parallel_model(directory, ParallelConfig(tp, ep), groups.rank, groups.comm,
                                          random_weights=False, dtype=torch.float32, device=groups.device)
        result = (run_schedule(model), greedy(model, prompt, max_tokens))  # every rank runs (collectives)
        out[(directory, tp, ep)] = result if groups.rank == 0 else None
    return out
