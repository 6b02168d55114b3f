"""Rank 0's side: start the workers (spawned on this host, or already started by torchrun), load rank 0's shard,
and keep watch. `WorkerGroup` is what the engine holds: it sends each step, and `check()` raises once a worker has
died, so the engine fails (the service's /health answers 503) instead of waiting forever.

Failure handling, by case:
- a worker dies while idle: the watchdog thread sees its process exit (spawned workers) and the engine's next
  `check()` raises — the service's loop polls it at least once a second;
- a worker dies mid-step: gloo fails the pending collective at once (the peer's sockets close); NCCL would wait
  for the collective timeout, so the watchdog also aborts the NCCL communicators to release rank 0's stream;
- a worker hangs: the collective times out (ParallelConfig.collective_timeout_s);
- rank 0 dies: workers' pending broadcast fails (closed sockets) and a thread in each spawned worker exits when its
  parent is gone.
"""

import atexit
import datetime
import logging
import multiprocessing
import multiprocessing.connection
import os
import threading

import torch
import torch.distributed as dist

from model.engine import EngineConfig, LLMEngine
from model.parallel.comm import ProcessGroups, init_process_groups
from model.parallel.config import ParallelConfig
from model.parallel.step_channel import EAGER, GRAPH, STOP, encode_items, send
from model.parallel.worker import prepare_rank, spawned_worker_main

logger = logging.getLogger(__name__)


class ParallelWorkerError(RuntimeError):
    """A rank of the parallel model is gone; the model cannot run any more steps."""


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ and "MASTER_ADDR" in os.environ


class WorkerGroup:
    def __init__(self, groups: ProcessGroups, processes: dict[int, multiprocessing.Process]):
        self.groups = groups
        self.processes = processes
        self.failure: str | None = None
        self._closed = False
        if processes:
            threading.Thread(target=self._watch, name="staticmoe-worker-watchdog", daemon=True).start()
        atexit.register(self.close)

    @property
    def pids(self) -> dict[int, int]:
        return {rank: p.pid for rank, p in self.processes.items()}

    def _watch(self) -> None:
        by_sentinel = {p.sentinel: rank for rank, p in self.processes.items()}
        ready = multiprocessing.connection.wait(list(by_sentinel))
        if self._closed:
            return
        rank = by_sentinel[ready[0]]
        process = self.processes[rank]
        process.join(timeout=1)
        self.failure = f"parallel worker rank {rank} (pid {process.pid}) exited with code {process.exitcode}"
        logger.error("%s; the model cannot run any more steps", self.failure)
        if self.groups.device.type == "cuda":  # release a stream stuck in a collective with the dead rank
            try:
                dist.distributed_c10d._abort_process_group()
            except Exception as err:  # noqa: BLE001 - best effort; the collective timeout still applies
                logger.warning("aborting the NCCL communicators failed: %r", err)

    def check(self) -> None:
        if self.failure is not None:
            raise ParallelWorkerError(self.failure)

    def send_step(self, graph_key: tuple[int, int] | None, step) -> None:
        """ModelRunner.step_listener: tell the workers to run the step rank 0 is about to run (its step items, or
        the DecodeInputs of graph `graph_key`)."""
        self.check()
        if graph_key is None:
            send(self.groups.control, EAGER, encode_items(step))
        else:
            send(self.groups.control, GRAPH, step.encode(), graph_key)

    def close(self, timeout: float = 10.0, graceful: bool = True) -> None:
        """Stop the workers (a STOP message, then terminate what is left) and leave the process groups."""
        if self._closed:
            return
        self._closed = True
        if graceful and self.failure is None:
            try:
                send(self.groups.control, STOP)
            except Exception as err:  # noqa: BLE001 - a worker already gone; terminate below
                logger.warning("could not send STOP to the workers: %r", err)
        for process in self.processes.values():
            process.join(timeout)
            if process.is_alive():
                process.terminate()
                process.join(5)
        try:
            self.groups.destroy()
        except Exception as err:  # noqa: BLE001
            logger.warning("destroying the process groups failed: %r", err)


def _spawn_workers(engine_config: EngineConfig, parallel: ParallelConfig, device: torch.device,
                   store_port: int) -> dict[int, multiprocessing.Process]:
    ctx = multiprocessing.get_context("spawn")  # never fork a process that may hold a CUDA context
    processes = {}
    for rank in range(1, parallel.world_size):
        process = ctx.Process(target=spawned_worker_main, name=f"staticmoe-rank{rank}", daemon=True,
                              args=(rank, parallel.world_size, store_port, engine_config, parallel, device.type,
                                    logging.getLogger().getEffectiveLevel()))
        process.start()
        logger.info("parallel worker rank %d started (pid %d)", rank, process.pid)
        processes[rank] = process
    return processes


def parallel_engine(engine_config: EngineConfig, parallel: ParallelConfig) -> LLMEngine:
    """The engine on rank 0 of a model sharded over `parallel.world_size` ranks, once every rank has loaded its
    shard; the other ranks follow its steps."""
    if engine_config.quantization != "none":
        raise ValueError(f"quantization={engine_config.quantization!r} runs on one GPU only (no tensor or expert "
                         f"parallelism yet)")
    model, tokenizer, workers = start_parallel(engine_config, parallel, engine_config.resolve_device())
    try:
        return LLMEngine(engine_config, model=model, tokenizer=tokenizer, workers=workers)
    except BaseException:
        workers.close(timeout=1.0, graceful=False)
        raise


def start_parallel(engine_config: EngineConfig, parallel: ParallelConfig, device: torch.device):
    """Rank 0: (its ParallelCausalLM, tokenizer, WorkerGroup) once every rank has loaded its shard."""
    world = parallel.world_size
    if launched_by_torchrun():
        if int(os.environ["RANK"]) != 0 or int(os.environ["WORLD_SIZE"]) != world:
            raise ValueError(f"torchrun RANK={os.environ['RANK']} WORLD_SIZE={os.environ['WORLD_SIZE']}: the engine "
                             f"runs on rank 0 of tensor_parallel={world} ranks")
        store, processes = None, {}
    else:
        if device.type == "cuda" and torch.cuda.device_count() < world:
            raise ValueError(f"tensor_parallel={world} needs {world} GPUs; {torch.cuda.device_count()} visible")
        if device.type == "cuda" and device.index not in (None, 0):
            raise ValueError(f"rank r runs on cuda:r, so rank 0 must be cuda:0, not {device}; choose the GPUs with "
                             f"CUDA_VISIBLE_DEVICES")
        store = dist.TCPStore("127.0.0.1", 0, world, is_master=True, wait_for_workers=False,
                              timeout=datetime.timedelta(seconds=parallel.start_timeout_s))
        processes = _spawn_workers(engine_config, parallel, device, store.port)
    try:
        groups = init_process_groups(0, world, device, store, parallel.collective_timeout_s)
    except BaseException:
        for process in processes.values():
            process.kill()
        raise
    workers = WorkerGroup(groups, processes)
    try:
        model, tokenizer, _ = prepare_rank(groups, engine_config, parallel)
    except BaseException as err:
        workers.close(timeout=1.0, graceful=False)
        if workers.failure is not None:
            raise ParallelWorkerError(f"{workers.failure} while the ranks were loading (see its log)") from err
        raise
    return model, tokenizer, workers
