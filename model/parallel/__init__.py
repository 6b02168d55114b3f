"""Expert and tensor parallelism over torch.distributed (NCCL on GPUs, gloo on the CPU), as a transform of the
plain model: one process per rank, rank 0 runs the engine (`parallel_engine`) and broadcasts each step to the
workers. See docs/parallel.md."""

from model.parallel.config import ParallelConfig, RankLayout

__all__ = ["ParallelConfig", "RankLayout"]
