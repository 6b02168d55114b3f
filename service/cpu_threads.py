"""How many CPU threads torch uses in the serving process (`--cpu-threads`)."""

from __future__ import annotations

import logging
import os

import torch

logger = logging.getLogger("staticmoe.service")


def set_cpu_threads(requested: int | None, device: torch.device) -> None:
    """Runs on the engine thread before the engine is built. By default a CPU engine takes half the CPUs the
    process may use: torch's default (a thread per core, spinning while it waits) collapsed throughput ~10x when
    another process competed for the cores, and it leaves none to the HTTP side. An explicit OMP_NUM_THREADS wins;
    0 keeps torch's choice; a GPU engine keeps it unless a number is given."""
    if requested is None and device.type == "cpu" and not os.environ.get("OMP_NUM_THREADS"):
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        requested = max(1, cpus // 2)
    if requested:
        torch.set_num_threads(requested)
    logger.info("torch CPU threads: %d", torch.get_num_threads())
