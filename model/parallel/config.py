"""`ParallelConfig` (how many ranks, how experts are split) and `RankLayout` (which heads, vocabulary rows, experts
and intermediate columns one rank holds), checked against the model once, with errors naming the field.

Semantics (as SGLang's `--tp/--ep` and TensorRT-LLM's `tp_size/moe_ep_size`): the world is `tensor_parallel` ranks.
Attention heads, vocabulary, dense MLPs and shared experts are split over all of them. The routed experts are cut
into `expert_parallel` contiguous ranges (one per group of `tensor_parallel // expert_parallel` ranks), and inside a
group each expert's intermediate dimension is split again. So `--expert-parallel` = `--tensor-parallel` is pure
expert parallelism for the MoE layers, `--expert-parallel 1` pure tensor parallelism, anything between a mix.
Rank r sits in expert group r // (tp // ep) at position r % (tp // ep).
Latent attention (MLA, DeepSeek) splits its query heads the same way; its one latent cache per token is kept whole
on every rank (`_shard_mla_attention` in model/parallel/model.py).
"""

from dataclasses import dataclass

from model.config import ModelConfig

KERNEL_ALIGN = 8  # the fused MoE op needs I (per rank) to be a multiple of 8


@dataclass(frozen=True)
class ParallelConfig:
    tensor_parallel: int = 1  # ranks (one process and one GPU each)
    expert_parallel: int = 1  # contiguous expert ranges; divides tensor_parallel
    collective_timeout_s: float = 300.0  # a collective that waits longer fails (a peer died or hangs)
    start_timeout_s: float = 1800.0  # loading the model and meeting the other ranks

    def __post_init__(self):
        for name in ("tensor_parallel", "expert_parallel"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.tensor_parallel % self.expert_parallel:
            raise ValueError(f"expert_parallel={self.expert_parallel} must divide tensor_parallel="
                             f"{self.tensor_parallel} (the world is tensor_parallel ranks; experts are split "
                             f"into expert_parallel ranges over them)")
        if self.collective_timeout_s <= 0 or self.start_timeout_s <= 0:
            raise ValueError("timeouts must be positive")

    @property
    def world_size(self) -> int:
        return self.tensor_parallel

    @property
    def expert_tensor_parallel(self) -> int:
        """Ranks sharing one expert range (each holds 1/this of every expert's intermediate dimension)."""
        return self.tensor_parallel // self.expert_parallel


def split_evenly(total: int, parts: int, index: int) -> tuple[int, int]:
    """[start, stop) of part `index` when `total` items go to `parts` contiguous parts, the first ones one larger."""
    base, extra = divmod(total, parts)
    start = index * base + min(index, extra)
    return start, start + base + (index < extra)


def _divide(value: int, by: int, what: str, flag: str) -> int:
    if value % by:
        raise ValueError(f"{flag}={by} does not divide {what}={value}")
    return value // by


@dataclass(frozen=True)
class RankLayout:
    """What rank `rank` of a `world`-rank model holds. Ranges are [start, stop) in global indices."""

    rank: int
    world: int
    q_heads: tuple[int, int]
    kv_heads: tuple[int, int]  # MLA: (0, 1), its one latent cache
    kv_replicas: int  # ranks holding the same K/V head (tensor_parallel > num_kv_heads; MLA: all of them)
    vocab: tuple[int, int]  # real rows; the local table has `vocab_rows_per_rank` rows (the last ranks pad)
    vocab_rows_per_rank: int
    experts: tuple[int, int]
    moe_columns: tuple[int, int]  # columns of each expert's intermediate dimension
    dense_columns: tuple[int, int]  # of a dense MLP's intermediate dimension (0, 0 when the model has none)
    shared_columns: tuple[int, int]  # of the shared expert's intermediate dimension (0, 0 when none)

    @property
    def num_local_experts(self) -> int:
        return self.experts[1] - self.experts[0]

    @staticmethod
    def build(config: ModelConfig, parallel: ParallelConfig, rank: int) -> "RankLayout":
        tp, ep, etp = parallel.tensor_parallel, parallel.expert_parallel, parallel.expert_tensor_parallel
        if not 0 <= rank < tp:
            raise ValueError(f"rank {rank} outside a world of {tp}")
        if config.attention_sinks or config.expert_bias or config.router_bias:
            raise ValueError(f"tensor/expert parallelism does not shard {config.model_type}'s attention sinks and "
                             "expert/router biases yet: serve it on one GPU")
        q_per_rank = _divide(config.num_heads, tp, "num_attention_heads", "tensor_parallel")
        if config.mla is not None:  # one latent (and rope key) per token that all heads read: on every rank
            kv, replicas = (0, 1), tp
        elif config.num_kv_heads % tp == 0:
            kv_per_rank, replicas = config.num_kv_heads // tp, 1
            kv = (rank * kv_per_rank, (rank + 1) * kv_per_rank)
        elif tp % config.num_kv_heads == 0:  # fewer K/V heads than ranks: each is kept by tp / Hkv ranks
            replicas = tp // config.num_kv_heads
            kv = (rank // replicas, rank // replicas + 1)
        else:
            raise ValueError(f"tensor_parallel={tp} and num_key_value_heads={config.num_kv_heads}: one must divide "
                             f"the other")
        if config.num_experts < ep:
            raise ValueError(f"expert_parallel={ep} exceeds the number of experts {config.num_experts}")
        moe_per_rank = _divide(config.moe_intermediate_size, etp, "moe_intermediate_size",
                               "tensor_parallel // expert_parallel")
        if moe_per_rank % KERNEL_ALIGN:
            raise ValueError(f"moe_intermediate_size={config.moe_intermediate_size} split {etp} ways gives "
                             f"{moe_per_rank} columns per rank; the MoE kernel needs a multiple of {KERNEL_ALIGN} "
                             f"(raise expert_parallel)")
        ep_rank, etp_rank = divmod(rank, etp)
        rows = -(-config.vocab_size // tp)
        vocab_start = min(rank * rows, config.vocab_size)

        def columns(size: int, name: str) -> tuple[int, int]:
            if not size:
                return 0, 0
            per = _divide(size, tp, name, "tensor_parallel")
            return rank * per, (rank + 1) * per

        return RankLayout(
            rank=rank, world=tp,
            q_heads=(rank * q_per_rank, (rank + 1) * q_per_rank), kv_heads=kv, kv_replicas=replicas,
            vocab=(vocab_start, min(vocab_start + rows, config.vocab_size)), vocab_rows_per_rank=rows,
            experts=split_evenly(config.num_experts, ep, ep_rank),
            moe_columns=(etp_rank * moe_per_rank, (etp_rank + 1) * moe_per_rank),
            dense_columns=columns(config.intermediate_size if config.dense_layers else 0, "intermediate_size"),
            shared_columns=columns(config.shared_expert_intermediate_size, "shared_expert_intermediate_size"),
        )
