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

// Launch attributes: PDL always, a thread-block cluster of `cluster_x` CTAs along x when it is above 1.
struct PdlLaunch {
  cudaLaunchAttribute attrs[2];
  cudaLaunchConfig_t config = {};
  PdlLaunch(dim3 grid, dim3 block, size_t smem, cudaStream_t stream, unsigned cluster_x = 1) {
    attrs[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attrs[0].val.programmaticStreamSerializationAllowed = 1;
    attrs[1].id = cudaLaunchAttributeClusterDimension;
    attrs[1].val.clusterDim.x = cluster_x;
    attrs[1].val.clusterDim.y = 1;
    attrs[1].val.clusterDim.z = 1;
    config.gridDim = grid;
    config.blockDim = block;
    config.dynamicSmemBytes = smem;
    config.stream = stream;
    config.attrs = attrs;
    config.numAttrs = cluster_x > 1 ? 2 : 1;
  }
  PdlLaunch(const PdlLaunch&) = delete;  // config.attrs points into this object
  PdlLaunch& operator=(const PdlLaunch&) = delete;
};

template <typename... KernelArgs, typename... Args>
cudaError_t launch_with_pdl(void (*kernel)(KernelArgs...), dim3 grid, dim3 block, size_t smem, cudaStream_t stream,
                            Args&&... args) {
  PdlLaunch launch(grid, block, smem, stream);
  return cudaLaunchKernelEx(&launch.config, kernel, std::forward<Args>(args)...);
}

template <typename... KernelArgs, typename... Args>
cudaError_t launch_cluster_with_pdl(void (*kernel)(KernelArgs...), dim3 grid, dim3 block, size_t smem,
                                    unsigned cluster_x, cudaStream_t stream, Args&&... args) {
  PdlLaunch launch(grid, block, smem, stream, cluster_x);
  return cudaLaunchKernelEx(&launch.config, kernel, std::forward<Args>(args)...);
}

}  // namespace staticmoe
