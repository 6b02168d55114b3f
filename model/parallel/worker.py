"""The loop of ranks 1..W-1: load the shard, mirror the engine's start-up (KV cache sizing, padding K/V, CUDA-graph
capture: each runs collectives, so all ranks run them in the same order), then run every step rank 0 sends.

Start-up must match `LLMEngine.__init__` call for call: ModelRunner(...) (which profiles memory on the GPU and agrees
on the KV cache size), write_pad_kv(), capture_cuda_graphs(). tests/test_parallel_engine.py fails (a collective
timeout, not a hang) if they drift apart.
"""

import datetime
import logging
import os
import threading
import time

import torch
import torch.distributed as dist

from model.engine.config import EngineConfig
from model.engine.model_runner import ModelRunner
from model.parallel.comm import ProcessGroups, init_process_groups
from model.parallel.config import ParallelConfig
from model.parallel.loading import load_parallel_model
from model.parallel.step_channel import GRAPH, STOP, decode_items, receive

logger = logging.getLogger(__name__)


def prepare_rank(groups: ProcessGroups, engine_config: EngineConfig, parallel: ParallelConfig):
    """Load this rank's shard and wait for all ranks (a monitored barrier names a rank that never arrives)."""
    dtype = engine_config.resolve_dtype(groups.device)
    model, tokenizer, _ = load_parallel_model(engine_config.model, parallel, groups.rank, groups.comm,
                                              random_weights=engine_config.random_weights, dtype=dtype,
                                              device=groups.device, seed=0, agree_min=groups.min_int)
    dist.monitored_barrier(group=groups.control, timeout=datetime.timedelta(seconds=parallel.start_timeout_s),
                           wait_all_ranks=True)
    return model, tokenizer, dtype


def follow_steps(runner: ModelRunner, groups: ProcessGroups) -> int:
    """Run rank 0's steps until it says stop; returns the number of steps run."""
    steps = 0
    while True:
        kind, payload, key = receive(groups.control)
        if kind == STOP:
            return steps
        if kind == GRAPH:
            runner.replay_encoded(key, payload)
        else:
            runner.run_items(decode_items(payload))
        steps += 1


def run_worker(groups: ProcessGroups, engine_config: EngineConfig, parallel: ParallelConfig) -> None:
    model, _, dtype = prepare_rank(groups, engine_config, parallel)
    runner = ModelRunner(model, engine_config, groups.device, dtype)
    runner.write_pad_kv()
    runner.capture_cuda_graphs()
    logger.info("rank %d ready: %d KV blocks, %d CUDA graphs", groups.rank, runner.num_usable_blocks,
                runner.num_graphs)
    steps = follow_steps(runner, groups)
    logger.info("rank %d stopping after %d steps", groups.rank, steps)


def _exit_with_parent() -> None:
    """A spawned worker whose parent (rank 0, the server) is gone has nothing left to serve."""
    parent = os.getppid()

    def watch():
        while True:
            time.sleep(1.0)
            if os.getppid() != parent:
                os._exit(3)

    threading.Thread(target=watch, name="staticmoe-parent-watch", daemon=True).start()


def worker_device(device_type: str, local_rank: int) -> torch.device:
    return torch.device("cuda", local_rank) if device_type == "cuda" else torch.device("cpu")


def spawned_worker_main(rank: int, world: int, store_port: int, engine_config: EngineConfig,
                        parallel: ParallelConfig, device_type: str, log_level: int) -> None:
    """Entry point of a worker process spawned by rank 0 on the same host."""
    logging.basicConfig(level=log_level, format=f"%(asctime)s %(levelname)s rank{rank} %(name)s: %(message)s")
    _exit_with_parent()
    if device_type == "cpu":
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    store = dist.TCPStore("127.0.0.1", store_port, world, is_master=False,
                          timeout=datetime.timedelta(seconds=parallel.start_timeout_s))
    groups = init_process_groups(rank, world, worker_device(device_type, rank), store, parallel.collective_timeout_s)
    try:
        run_worker(groups, engine_config, parallel)
    finally:
        groups.destroy()


def torchrun_worker_main(engine_config: EngineConfig, parallel: ParallelConfig) -> None:
    """Ranks > 0 under torchrun (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT in the environment)."""
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if world != parallel.world_size:
        raise ValueError(f"torchrun started {world} ranks but --tensor-parallel is {parallel.world_size}")
    device = worker_device(engine_config.resolve_device().type, int(os.environ.get("LOCAL_RANK", rank)))
    groups = init_process_groups(rank, world, device, None, parallel.collective_timeout_s)
    try:
        run_worker(groups, engine_config, parallel)
    finally:
        groups.destroy()
