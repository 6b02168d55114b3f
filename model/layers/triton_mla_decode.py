"""Paged MLA decode attention (absorbed form) as one Triton kernel over the latent cache.

Every head of a sequence attends to the same cache rows [kv_lora_rank + rope] (model/layers/mla_decode.py), so one
program takes BLOCK_H heads of one sequence as the rows of its query matrix and reads each cache row once for all
of them: scores = q_latent · c + q_pe · k_pe, then the online softmax accumulates p · c, [BLOCK_H, kv_lora_rank] in
fp32. The latent c is both key and value, loaded once per tile. As the GQA decode kernel
(model/layers/triton_decode_attention.py), small batches split each sequence's keys over several programs
(split-K over the context) so the GPU fills, and that file's combine kernel merges the splits' (max, sum, acc).

Heads beyond one program's `block_h` (V3's 128) take more programs that read the same rows again; the grid puts a
sequence's head groups next to each other in launch order, so those reads mostly hit L2. With many heads the kernel
is compute-bound rather than byte-bound (128 heads: 2 x 128 x 1088 FLOPs per 1152-byte cache row, ~220 FLOP/byte),
so wider programs (more heads as the dot's M) matter there; benchmarks/bench_mla.py --sweep measures them.
kv_lora_rank and the rope width must be powers of two >= 16 (512 and 64 in every DeepSeek model).
"""

from dataclasses import dataclass, replace

import torch

from model.layers.triton_decode_attention import num_sms, power_of_two_splits
from model.layers.triton_paged import tl, triton

@dataclass(frozen=True)
class MlaKernelConfig:
    """Launch choices (benchmarks/bench_mla.py --sweep measures the alternatives). Keys per tile: [32, 512] bf16 is
    32 KB of shared memory per pipeline stage; fp32 (tests) takes half the keys for the same bytes. At most
    `max_splits` splits: the combine holds [splits, kv_lora_rank] fp32 per row in registers. `block_h`: at most this
    many heads per program (16, the smallest M of tl.dot, up to 64; the accumulator is [block_h, kv_lora_rank] fp32,
    so wide programs need more warps)."""
    block_h: int = 16
    block_n: int = 32
    num_warps: int = 4
    num_stages: int = 2
    max_splits: int = 16

    def __post_init__(self):
        if self.block_h < 16 or self.block_h & (self.block_h - 1):
            raise ValueError(f"block_h must be a power of two >= 16, got {self.block_h}")

    def keys_per_tile(self, dtype: torch.dtype) -> int:
        return self.block_n if dtype.itemsize <= 2 else max(16, self.block_n // 2)

    def heads_per_program(self, num_heads: int) -> int:
        """A power of two in [16, block_h], no wider than the heads there are."""
        return max(16, min(self.block_h, triton.next_power_of_2(num_heads) if triton else self.block_h))


# Measured (H100, bf16, batch 64, context 4096, bench_mla.py --sweep, benchmarks/NOTES.md "MLA decode launch"):
# 16 heads: 16 per program, 32 keys, 4 warps, 3 stages 1.31x the byte floor (2 stages 1.37x); 128 heads: 64 per
# program, 64 keys, 8 warps, 3 stages 3.65x (16 per program: 8.05x; 32: 5.79x at best).
NARROW_CONFIG = MlaKernelConfig(block_h=16, block_n=32, num_warps=4, num_stages=3)
WIDE_CONFIG = MlaKernelConfig(block_h=64, block_n=64, num_warps=8, num_stages=3)


def config_for(num_heads: int, dtype: torch.dtype = torch.bfloat16) -> MlaKernelConfig:
    """The measured launch for this many query heads (V2-Lite 16, V3 128 per GPU); between them (unmeasured) narrow.
    fp32 (tests) keeps 2 stages: its [32, 576] fp32 tiles take 72 KB each."""
    config = WIDE_CONFIG if num_heads >= 64 else NARROW_CONFIG
    return config if dtype.itemsize <= 2 else replace(config, num_stages=2)


def supported(kv_lora_rank: int, rope_dim: int) -> bool:
    return all(n >= 16 and not n & (n - 1) for n in (kv_lora_rank, rope_dim))


if triton is not None:
    from model.layers.triton_decode_attention import combine_splits, split_partials
    from model.layers.triton_paged import dot, online_softmax_step

    @triton.jit(do_not_specialize=["table_stride", "max_keys", "split_len"])
    def _paged_mla_decode_kernel(
        q_ptr, cache_ptr, tables_ptr, lens_ptr, out_ptr, part_max_ptr, part_sum_ptr, part_acc_ptr,
        scale, table_stride, max_keys, split_len,
        NUM_HEADS: tl.constexpr, BLOCK_H: tl.constexpr, RANK: tl.constexpr, ROPE: tl.constexpr,
        PAGE: tl.constexpr, BLOCK_N: tl.constexpr, IEEE: tl.constexpr, SPLITS: tl.constexpr,
    ):
        group = tl.program_id(0)  # fastest: the head groups of one sequence run side by side and share its rows in L2
        seq = tl.program_id(1)
        split = tl.program_id(2)
        width = RANK + ROPE
        context_len = tl.minimum(tl.load(lens_ptr + seq).to(tl.int32), max_keys)
        offs_h = group * BLOCK_H + tl.arange(0, BLOCK_H)
        real_h = offs_h < NUM_HEADS
        offs_r = tl.arange(0, RANK)
        offs_p = tl.arange(0, ROPE)
        offs_n = tl.arange(0, BLOCK_N)
        q_rows = seq.to(tl.int64) * NUM_HEADS + offs_h  # [BLOCK_H]
        q_lat = tl.load(q_ptr + q_rows[:, None] * width + offs_r[None, :], mask=real_h[:, None], other=0.0)
        q_pe = tl.load(q_ptr + q_rows[:, None] * width + RANK + offs_p[None, :], mask=real_h[:, None], other=0.0)

        lo = split * split_len  # a whole number of BLOCK_N tiles
        hi = tl.minimum(context_len, lo + split_len)
        end = tl.where(lo < hi, hi, lo)  # no key in this split: an empty loop
        m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_H], tl.float32)
        acc = tl.zeros([BLOCK_H, RANK], tl.float32)
        for key0 in range(lo, end, BLOCK_N):
            pos = key0 + offs_n  # [BLOCK_N]
            visible = pos < hi
            block = tl.load(tables_ptr + seq.to(tl.int64) * table_stride + pos // PAGE, mask=visible, other=0)
            row = cache_ptr + (block.to(tl.int64) * PAGE + pos % PAGE)[:, None] * width
            c = tl.load(row + offs_r[None, :], mask=visible[:, None], other=0.0)  # [BLOCK_N, RANK] key and value
            pe = tl.load(row + RANK + offs_p[None, :], mask=visible[:, None], other=0.0)  # [BLOCK_N, ROPE]
            scores = dot(q_lat, tl.trans(c), IEEE) + dot(q_pe, tl.trans(pe), IEEE)  # [BLOCK_H, BLOCK_N]
            scores = tl.where(visible[None, :], scores * scale, float("-inf"))
            m_i, l_i, acc = online_softmax_step(m_i, l_i, acc, scores, c, IEEE)
        if SPLITS == 1:
            out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]  # a padding row (no keys) yields zeros, not NaN
            tl.store(out_ptr + q_rows[:, None] * RANK + offs_r[None, :], out.to(out_ptr.dtype.element_ty),
                     mask=real_h[:, None])
        else:  # partial results [B * Hq, SPLITS(, RANK)], merged by _combine_splits_kernel
            part = q_rows * SPLITS + split
            tl.store(part_max_ptr + part, m_i, mask=real_h)
            tl.store(part_sum_ptr + part, l_i, mask=real_h)
            tl.store(part_acc_ptr + part[:, None] * RANK + offs_r[None, :], acc, mask=real_h[:, None])


def mla_splits(num_seqs: int, groups: int, max_keys: int, device: torch.device, tile: int) -> int:
    """Key splits per sequence: about two programs per SM, rounded up, then down to a power of two, each with at
    least one tile of keys: the rule the launch configs above were swept with (the GQA kernel's choose_splits has
    since moved to four per SM from an H200 sweep; MLA's is not swept yet: `bench_mla.py --sweep-splits`)."""
    if device.type != "cuda":
        return 1
    return power_of_two_splits(-(-2 * num_sms(device) // (num_seqs * groups)), -(-max_keys // tile))


def paged_mla_decode(
    q: torch.Tensor,  # [B, Hq, r + rope]: q_latent and q_pe
    latent_cache: torch.Tensor,  # [num_blocks, block_size, r + rope] contiguous
    block_tables: torch.Tensor,  # [B, max_blocks] int
    context_lens: torch.Tensor,  # [B] int
    scale: float,
    kv_lora_rank: int,
    splits: int | None = None,  # None: mla_splits (shapes only, so CUDA graphs keep it)
    config: MlaKernelConfig | None = None,  # None: config_for(heads)
) -> torch.Tensor:
    """-> [B, Hq, r] in q's dtype."""
    num_seqs, num_heads, width = q.shape
    num_blocks, page, cache_width = latent_cache.shape
    rope = width - kv_lora_rank
    if cache_width != width or not supported(kv_lora_rank, rope):
        raise ValueError(f"the Triton MLA kernel needs q and cache rows of kv_lora_rank + rope with both powers of "
                         f"two >= 16; got q {tuple(q.shape)}, cache {tuple(latent_cache.shape)}, rank {kv_lora_rank}")
    if not latent_cache.is_contiguous():
        raise ValueError("the latent cache must be contiguous")
    q = q.contiguous()
    config = config or config_for(num_heads, q.dtype)
    out = torch.empty(num_seqs, num_heads, kv_lora_rank, dtype=q.dtype, device=q.device)
    block_h = config.heads_per_program(num_heads)
    groups = -(-num_heads // block_h)
    max_keys = block_tables.shape[1] * page
    tile = config.keys_per_tile(q.dtype)
    splits = splits or min(config.max_splits, mla_splits(num_seqs, groups, max_keys, q.device, tile))
    split_len = -(-max_keys // (splits * tile)) * tile
    partials = split_partials(num_seqs * num_heads, splits, kv_lora_rank, out)
    _paged_mla_decode_kernel[(groups, num_seqs, splits)](
        q, latent_cache, block_tables, context_lens, out, *partials,
        scale, block_tables.stride(0), max_keys, split_len,
        NUM_HEADS=num_heads, BLOCK_H=block_h, RANK=kv_lora_rank, ROPE=rope, PAGE=page, BLOCK_N=tile,
        IEEE=q.dtype == torch.float32, SPLITS=splits, num_warps=config.num_warps,
        num_stages=config.num_stages,
    )
    combine_splits(partials, out, num_seqs * num_heads, splits, kv_lora_rank)
    return out
