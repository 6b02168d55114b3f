// What bounds the FP8 grouped GEMMs' mainloop (issue 16): the H100's tile clocks (benchmarks/NOTES.md "Session 22")
// put it at 1,296 cycles per 128-deep K step of a 128x256 tile against 1,024 at the e4m3 tensor-core rate (79%),
// where the bf16 kernel's mainloop runs at 99% with the same bytes per stage, and Nsight's stall samples have the
// math warps waiting on their own wgmma (WARPGROUP.DEPBAR), not on data. Candidates: the promotion FMAs between
// wgmma batches, shared-memory bandwidth (m64n128 instructions read each warpgroup's A twice per K step, and the
// producer writes 48 KB a step into the same shared memory), or the instruction shape itself.
//
// This runs the kernel's mainloop shape without the rest of the kernel: one CTA per SM, two math warpgroups
// computing a 128x256 tile from four 48 KB stages of static shared memory (values do not matter), optionally a
// third warpgroup streaming 48 KB per K step into the stages by cp.async from an L2-resident buffer (the producer's
// traffic), and reports cycles per K step for each mainloop variant:
//   ss128+promote  the kernel today: per 128-column half, 4 x m64n128k32 (A and B from shared memory), wait, 64 FMAs
//   ss128          the same wgmmas without promotion (two accumulator sets, one wait per step)
//   ss256          4 x m64n256k32 per step: A read once per step per warpgroup, no promotion
//   rs128+promote  A loaded once per step by ldmatrix into registers, then the kernel's pattern with A from registers
//   rs128          the same without promotion
//   ss64pipe       64-column quarters into two alternating partial sets: quarter q's wgmmas are issued before
//                  quarter q-1 is waited for and promoted (wait_group 1), so a warpgroup's own FMAs overlap its
//                  tensor work instead of alternating with it (one drain per step, not two); registers 128 + 2 x 32
//   rs64pipe       the same with A from registers (ldmatrix once per step: 80 KB of reads a step, not 128)
//
//   nvcc -gencode=arch=compute_90a,code=sm_90a -O3 -std=c++17 -I csrc benchmarks/wgmma_rate.cu -o wgmma_rate
//   ./wgmma_rate            (gpu_check.sh step wgmma-rate)
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <vector>

#include "common/sm90_ptx.cuh"
#include "common/wgmma_ops.cuh"

namespace sm90 = staticmoe::sm90;

enum Mode : int { kSs128Promote, kSs128, kSs256, kRs128Promote, kRs128, kSs64Pipe, kRs64Pipe, kModes };
const char* const kModeNames[kModes] = {"ss128+promote", "ss128", "ss256", "rs128+promote", "rs128", "ss64pipe",
                                        "rs64pipe"};

constexpr int kStages = 4, kABytes = 128 * 128, kBBytes = 256 * 128, kStageBytes = kABytes + kBBytes;
constexpr int kSmemBytes = kStages * kStageBytes + 1024 + 64;
constexpr int kWriterLead = 2;  // K steps the writer may run ahead of the math warpgroups

#define CHECK(call)                                                                                  \
  do {                                                                                               \
    cudaError_t err_ = (call);                                                                       \
    if (err_ != cudaSuccess) {                                                                       \
      std::fprintf(stderr, "%s:%d %s: %s\n", __FILE__, __LINE__, #call, cudaGetErrorString(err_)); \
      std::exit(1);                                                                                  \
    }                                                                                                \
  } while (0)

template <int kMode>
__device__ __forceinline__ void math_loop(uint8_t* smem, const float* scales, int iters, volatile int* steps_done,
                                          float* sink) {
  const int tid = threadIdx.x - 128, warpgroup = tid / 128, warp = (tid / 32) % 4, lane = tid % 32;
  float acc[128];
#pragma unroll
  for (int i = 0; i < 128; ++i) acc[i] = 0.f;
  float part[64], part2[64];
#pragma unroll
  for (int i = 0; i < 64; ++i) part[i] = part2[i] = 0.f;
  float q0[32], q1[32];  // the pipelined modes' alternating partial sets (quarters 0, 2 and 1, 3)
#pragma unroll
  for (int i = 0; i < 32; ++i) q0[i] = q1[i] = 0.f;
  for (int it = 0; it < iters; ++it) {
    const int s = it % kStages;
    uint8_t* a_tile = smem + s * kStageBytes;
    const uint64_t da = sm90::smem_desc_k128_swizzle(a_tile + warpgroup * 64 * 128);
    const uint64_t db = sm90::smem_desc_k128_swizzle(a_tile + kABytes);
    const float sc = scales[s * 4 + warpgroup];
    if constexpr (kMode == kSs256) {
      sm90::fence_accumulators(acc);
      sm90::wgmma_fence();
#pragma unroll
      for (int kk = 0; kk < 4; ++kk) sm90::wgmma_m64n256k32_e4m3(acc, da + 2 * kk, db + 2 * kk, 1);
      sm90::wgmma_commit();
      sm90::wgmma_wait<0>();
      sm90::fence_accumulators(acc);
    } else if constexpr (kMode == kSs128) {
      sm90::fence_accumulators(part);
      sm90::fence_accumulators(part2);
      sm90::wgmma_fence();
#pragma unroll
      for (int kk = 0; kk < 4; ++kk) sm90::wgmma_m64n128k32_e4m3(part, da + 2 * kk, db + 2 * kk, 1);
#pragma unroll
      for (int kk = 0; kk < 4; ++kk)
        sm90::wgmma_m64n128k32_e4m3(part2, da + 2 * kk, db + (128 * 128 >> 4) + 2 * kk, 1);
      sm90::wgmma_commit();
      sm90::wgmma_wait<0>();
      sm90::fence_accumulators(part);
      sm90::fence_accumulators(part2);
    } else if constexpr (kMode == kRs128) {
      uint32_t a[4][4];
#pragma unroll
      for (int kk = 0; kk < 4; ++kk) sm90::load_a_fragment_k32(a_tile, warpgroup * 64 + warp * 16, kk, lane, a[kk]);
      sm90::fence_accumulators(part);
      sm90::fence_accumulators(part2);
      sm90::wgmma_fence();
#pragma unroll
      for (int kk = 0; kk < 4; ++kk) sm90::wgmma_m64n128k32_e4m3_rs(part, a[kk], db + 2 * kk, 1);
#pragma unroll
      for (int kk = 0; kk < 4; ++kk) sm90::wgmma_m64n128k32_e4m3_rs(part2, a[kk], db + (128 * 128 >> 4) + 2 * kk, 1);
      sm90::wgmma_commit();
      sm90::wgmma_wait<0>();
      sm90::fence_accumulators(part);
      sm90::fence_accumulators(part2);
    } else if constexpr (kMode == kSs64Pipe || kMode == kRs64Pipe) {
      uint32_t a[4][4];
      if constexpr (kMode == kRs64Pipe) {
#pragma unroll
        for (int kk = 0; kk < 4; ++kk) sm90::load_a_fragment_k32(a_tile, warpgroup * 64 + warp * 16, kk, lane, a[kk]);
      }
#pragma unroll
      for (int q = 0; q < 4; ++q) {
        float(&cur)[32] = (q & 1) ? q1 : q0;
        float(&prev)[32] = (q & 1) ? q0 : q1;  // quarter q - 1
        sm90::fence_accumulators(cur);
        sm90::wgmma_fence();
#pragma unroll
        for (int kk = 0; kk < 4; ++kk) {
          if constexpr (kMode == kRs64Pipe)
            sm90::wgmma_m64n64k32_e4m3_rs(cur, a[kk], db + q * (64 * 128 >> 4) + 2 * kk, kk > 0);
          else
            sm90::wgmma_m64n64k32_e4m3(cur, da + 2 * kk, db + q * (64 * 128 >> 4) + 2 * kk, kk > 0);
        }
        sm90::wgmma_commit();
        if (q == 0) continue;
        sm90::wgmma_wait<1>();  // quarter q - 1 has retired; quarter q keeps the tensor cores busy meanwhile
        sm90::fence_accumulators(prev);
#pragma unroll
        for (int j = 0; j < 32; ++j) acc[(q - 1) * 32 + j] = fmaf(prev[j], sc, acc[(q - 1) * 32 + j]);
      }
      // The last quarter drains inside the step: a wgmma group still in flight across the loop's back edge makes
      // ptxas serialize every wgmma of the kernel (C7514).
      sm90::wgmma_wait<0>();
      sm90::fence_accumulators(q1);
#pragma unroll
      for (int j = 0; j < 32; ++j) acc[96 + j] = fmaf(q1[j], sc, acc[96 + j]);
    } else {  // the two promoting modes: per half, wgmmas into `part`, wait, acc += part x scale
      uint32_t a[4][4];
      if constexpr (kMode == kRs128Promote) {
#pragma unroll
        for (int kk = 0; kk < 4; ++kk) sm90::load_a_fragment_k32(a_tile, warpgroup * 64 + warp * 16, kk, lane, a[kk]);
      }
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        sm90::fence_accumulators(part);
        sm90::wgmma_fence();
#pragma unroll
        for (int kk = 0; kk < 4; ++kk) {
          if constexpr (kMode == kRs128Promote)
            sm90::wgmma_m64n128k32_e4m3_rs(part, a[kk], db + h * (128 * 128 >> 4) + 2 * kk, kk > 0);
          else
            sm90::wgmma_m64n128k32_e4m3(part, da + 2 * kk, db + h * (128 * 128 >> 4) + 2 * kk, kk > 0);
        }
        sm90::wgmma_commit();
        sm90::wgmma_wait<0>();
        sm90::fence_accumulators(part);
#pragma unroll
        for (int j = 0; j < 64; ++j) acc[h * 64 + j] = fmaf(part[j], sc, acc[h * 64 + j]);
      }
    }
    if (tid == 0) *steps_done = it + 1;
  }
  float total = 0.f;  // over the accumulators this mode writes (all three sets live would spill)
  if constexpr (kMode == kSs128 || kMode == kRs128) {
#pragma unroll
    for (int i = 0; i < 64; ++i) total += part[i] + part2[i];
  } else {
#pragma unroll
    for (int i = 0; i < 128; ++i) total += acc[i];
  }
  if (total == 12345.f) sink[blockIdx.x] = total;  // keeps every accumulator live
}

// The producer's traffic: 48 KB per K step into the stage the math warpgroups will read kWriterLead steps later,
// 16-byte cp.async from this CTA's 96 KB of a global buffer (L2-resident: 132 x 96 KB).
__device__ __forceinline__ void writer_loop(uint8_t* smem, const uint8_t* src, int iters, volatile int* steps_done) {
  const int tid = threadIdx.x;
  const uint8_t* mine = src + size_t(blockIdx.x) * 2 * kStageBytes;
  for (int it = 0; it < iters; ++it) {
    while (*steps_done + kWriterLead < it) {
    }
    uint8_t* dst = smem + (it % kStages) * kStageBytes;
    const uint8_t* from = mine + (it % 2) * kStageBytes;
    for (int i = tid; i < kStageBytes / 16; i += 128) sm90::cp_async_16(dst + i * 16, from + i * 16, true);
    sm90::cp_async_commit();
    asm volatile("cp.async.wait_group 2;" ::: "memory");
  }
  asm volatile("cp.async.wait_group 0;" ::: "memory");
}

template <int kMode, bool kWriter>
__global__ void __launch_bounds__(384, 1)
    mainloop_kernel(const uint8_t* src, int iters, long long* cycles, float* sink) {
  extern __shared__ uint8_t smem_raw[];
  uint8_t* smem = reinterpret_cast<uint8_t*>((reinterpret_cast<uintptr_t>(smem_raw) + 1023) & ~uintptr_t(1023));
  float* scales = reinterpret_cast<float*>(smem + kStages * kStageBytes);
  volatile int* steps_done = reinterpret_cast<volatile int*>(scales + kStages * 4);
  for (int i = threadIdx.x; i < kStages * kStageBytes / 4; i += blockDim.x)
    reinterpret_cast<uint32_t*>(smem)[i] = 0x38383838u * (1 + (i & 1));  // small e4m3 values, no NaNs
  if (threadIdx.x < kStages * 4) scales[threadIdx.x] = 1.f + threadIdx.x * 1e-3f;
  if (threadIdx.x == 0) *steps_done = 0;
  __syncthreads();
  if (threadIdx.x < 128) {  // registers as the GEMM kernels split them (gemm_pipeline.cuh): 56 here, 224 for math
    sm90::setmaxnreg_dec<56>();
    if (kWriter) writer_loop(smem, src, iters, steps_done);
    return;
  }
  sm90::setmaxnreg_inc<224>();
  const long long t0 = clock64();
  math_loop<kMode>(smem, scales, iters, steps_done, sink);
  const long long t1 = clock64();
  if (threadIdx.x == 128) cycles[blockIdx.x] = t1 - t0;
}

template <int kMode, bool kWriter>
double median_cycles_per_step(const uint8_t* src, int sms, int iters, long long* d_cycles, float* d_sink) {
  auto kernel = mainloop_kernel<kMode, kWriter>;
  CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmemBytes));
  kernel<<<sms, 384, kSmemBytes>>>(src, iters / 10, d_cycles, d_sink);  // warm-up
  kernel<<<sms, 384, kSmemBytes>>>(src, iters, d_cycles, d_sink);
  CHECK(cudaGetLastError());
  CHECK(cudaDeviceSynchronize());
  std::vector<long long> c(sms);
  CHECK(cudaMemcpy(c.data(), d_cycles, sms * sizeof(long long), cudaMemcpyDeviceToHost));
  std::sort(c.begin(), c.end());
  return double(c[sms / 2]) / iters;
}

template <int kMode>
void report(const uint8_t* src, int sms, int iters, long long* d_cycles, float* d_sink) {
  // A 128x256x128 step is 4,194,304 FMAs; the e4m3 tensor cores do 4,096 per SM per clock.
  constexpr double kIdeal = 128.0 * 256 * 128 / 4096;
  const double alone = median_cycles_per_step<kMode, false>(src, sms, iters, d_cycles, d_sink);
  const double fed = median_cycles_per_step<kMode, true>(src, sms, iters, d_cycles, d_sink);
  std::printf("%-14s  %7.0f cycles/step (%3.0f%% of rate)   with 48 KB/step written: %7.0f (%3.0f%%)\n",
              kModeNames[kMode], alone, 100 * kIdeal / alone, fed, 100 * kIdeal / fed);
}

int main() {
  int sms = 0;
  CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0));
  const int iters = 4096;
  uint8_t* src;
  long long* d_cycles;
  float* d_sink;
  CHECK(cudaMalloc(&src, size_t(sms) * 2 * kStageBytes));
  CHECK(cudaMemset(src, 0x38, size_t(sms) * 2 * kStageBytes));
  CHECK(cudaMalloc(&d_cycles, sms * sizeof(long long)));
  CHECK(cudaMalloc(&d_sink, sms * sizeof(float)));
  cudaDeviceProp prop;
  CHECK(cudaGetDeviceProperties(&prop, 0));
  std::printf("%s, %d SMs; 128x256 tile, 128-deep K steps, 2 math warpgroups, %d steps; ideal 1024 cycles/step\n",
              prop.name, sms, iters);
  report<kSs128Promote>(src, sms, iters, d_cycles, d_sink);
  report<kSs128>(src, sms, iters, d_cycles, d_sink);
  report<kSs256>(src, sms, iters, d_cycles, d_sink);
  report<kRs128Promote>(src, sms, iters, d_cycles, d_sink);
  report<kRs128>(src, sms, iters, d_cycles, d_sink);
  report<kSs64Pipe>(src, sms, iters, d_cycles, d_sink);
  report<kRs64Pipe>(src, sms, iters, d_cycles, d_sink);
  return 0;
}
