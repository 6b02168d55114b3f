// Programmatic dependent launch (PDL, sm_90): a kernel launched with this helper may start while the kernel before
// it on the stream is still finishing, so its launch latency and prologue (barrier setup, tensor-map prefetch)
// overlap the predecessor's tail. Every such kernel calls wait_for_predecessor() before it reads anything the
// predecessor wrote, and may call allow_dependents() once the next kernel may begin its own prologue.
// Captured into CUDA graphs as programmatic edges; without PDL support the two device calls are no-ops.
#pragma once
#include <cuda_runtime.h>

namespace staticmoe {

__device__ __forceinline__ void wait_for_predecessor() { asm volatile("griddepcontrol.wait;" ::: "memory"); }
__device__ __forceinline__ void allow_dependents() { asm volatile("griddepcontrol.launch_dependents;" ::: "memory"); }

template <typename... KernelArgs, typename... Args>
cudaError_t launch_with_pdl(void (*kernel)(KernelArgs...), dim3 grid, dim3 block, size_t smem, cudaStream_t stream,
                            Args&&... args) {
  cudaLaunchAttribute attr;
  attr.id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr.val.programmaticStreamSerializationAllowed = 1;
  cudaLaunchConfig_t config = {};
  config.gridDim = grid;
  config.blockDim = block;
  config.dynamicSmemBytes = smem;
  config.stream = stream;
  config.attrs = &attr;
  config.numAttrs = 1;
  return cudaLaunchKernelEx(&config, kernel, std::forward<Args>(args)...);
}

}  // namespace staticmoe
