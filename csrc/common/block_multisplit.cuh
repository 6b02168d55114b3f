// Stable multi-split ranks inside one thread block: each thread holds at most one small integer key, and its rank
// is the number of threads with the same key and a lower thread index. That is the core of a stable counting
// sort, computed with no serial pass over the block: ballots over the key's bits find the lanes of a warp with the
// same key (a warp-level multi-split), and a table of per-warp key counts adds the warps before it. Counts fit a
// byte (a warp holds at most 32 of a key), so the table is kWarps x num_keys bytes: 32 KB for 1024 threads and
// 1024 keys, in the caller's shared memory.
#pragma once
#include <cstdint>

namespace staticmoe {

// Lanes of this warp whose key equals this lane's, for keys in [0, 2^bits): one ballot per bit. Cheaper than
// __match_any_sync, whose cost on the H100 grows with the number of distinct keys in the warp.
__device__ __forceinline__ uint32_t lanes_with_same_key(uint32_t key, int bits) {
  uint32_t same = 0xffffffffu;
  for (int b = 0; b < bits; ++b) {
    const bool set = (key >> b) & 1u;
    const uint32_t ones = __ballot_sync(0xffffffffu, set);
    same &= set ? ones : ~ones;
  }
  return same;
}

template <int kThreads>
struct BlockMultisplit {
  static constexpr int kWarps = kThreads / 32;
  static_assert(kThreads % 32 == 0 && kWarps <= 32, "whole warps, at most 1024 threads");

  uint8_t* warp_counts;  // shared memory, table_bytes(num_keys) bytes, 4-byte aligned
  int32_t num_keys;

  // The table's bytes for `num_keys` keys (rows padded to whole 4-byte words).
  __host__ __device__ static constexpr int32_t table_bytes(int32_t num_keys) { return kWarps * ((num_keys + 3) & ~3); }

  // Called by every thread of the block; key in [0, num_keys), or negative to take no part (its result is then
  // meaningless). Begins with a barrier, so the table may be reused call after call.
  __device__ __forceinline__ int32_t rank(int32_t key) const {
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    __syncthreads();  // readers of the previous call's table are done
    uint32_t* words = reinterpret_cast<uint32_t*>(warp_counts);
    for (int i = threadIdx.x; i < table_bytes(num_keys) / 4; i += kThreads) words[i] = 0;
    // A key that takes no part is matched as num_keys, which no real key equals.
    const uint32_t peers = lanes_with_same_key(key >= 0 ? key : num_keys, 32 - __clz(num_keys));
    const uint32_t peers_below = peers & ((1u << lane) - 1);
    __syncthreads();  // the table is zero
    if (key >= 0 && peers_below == 0) warp_counts[warp * stride() + key] = uint8_t(__popc(peers));
    __syncthreads();
    int32_t rank = __popc(peers_below);
    if (key >= 0)
      for (int w = 0; w < warp; ++w) rank += warp_counts[w * stride() + key];
    return rank;
  }

  // After rank(): how many threads of the block held `key`.
  __device__ __forceinline__ int32_t count(int32_t key) const {
    int32_t n = 0;
#pragma unroll 8
    for (int w = 0; w < kWarps; ++w) n += warp_counts[w * stride() + key];
    return n;
  }

 private:
  __device__ __forceinline__ int32_t stride() const { return (num_keys + 3) & ~3; }
};

}  // namespace staticmoe
