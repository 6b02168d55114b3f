// GEMM2's weights pulled into L2 by the CTAs GEMM1 leaves without a tile (decode).
// At a few tokens GEMM1's persistent grid has more CTAs than tiles (Qwen3-30B-A3B at T = 1: 8 experts x 6 N tiles =
// 48 of 132), and neither GEMM streams HBM at full rate: each is too short to ramp up, and GEMM2 may start only when
// GEMM1 has finished (its PDL wait covers GEMM1's writes). The idle CTAs issue bulk L2 prefetches of the routed
// experts' GEMM2 weights while GEMM1 runs, so GEMM2 reads them from L2. Only when they fit well inside L2
// (`max_bytes`), since GEMM1's own weights stream through L2 at the same time. Opt-in, STATICMOE_L2_PREFETCH_MIB
// (benchmarks/NOTES.md, session 11).
#pragma once
#include <cstdint>

#include "common/sm90_ptx.cuh"
#include "static_batch/task_map.h"

namespace staticmoe::moe {

struct L2Prefetch {
  const uint8_t* base = nullptr;  // GEMM2's weights: expert e's bytes at base + e * expert_bytes; null = off
  int64_t expert_bytes = 0;       // a multiple of 16
  int64_t max_bytes = 0;          // no prefetch when the routed experts' weights are larger
};

constexpr int64_t kL2PrefetchChunk = 32768;  // bytes per prefetch instruction

// Called by `threads` threads (this one: `thread`) of each CTA that has no tile; `idle` of `num_idle` such CTAs.
__device__ __forceinline__ void prefetch_routed_weights(const L2Prefetch& p, const TaskMap& map, int32_t num_slots,
                                                        int32_t idle, int32_t num_idle, int32_t thread,
                                                        int32_t threads) {
  if (p.base == nullptr || num_idle <= 0 || int64_t(num_slots) * p.expert_bytes > p.max_bytes) return;
  const int64_t per_expert = (p.expert_bytes + kL2PrefetchChunk - 1) / kL2PrefetchChunk;
  const int64_t chunks = per_expert * num_slots;
  for (int64_t c = int64_t(idle) * threads + thread; c < chunks; c += int64_t(num_idle) * threads) {
    const int32_t expert = map.slot_task[c / per_expert];
    const int64_t offset = (c % per_expert) * kL2PrefetchChunk;
    const int64_t bytes = p.expert_bytes - offset < kL2PrefetchChunk ? p.expert_bytes - offset : kL2PrefetchChunk;
    sm90::prefetch_l2_bulk(p.base + int64_t(expert) * p.expert_bytes + offset, uint32_t(bytes));
  }
}

}  // namespace staticmoe::moe
