// What one hand-off between phases costs, with no routing work around it: the floor under
// any design that, like the kernel, needs every block's results of one phase before the
// next phase starts (each expert's threshold needs the whole column; each token needs
// every threshold). Built and driven by handoff_floor.py; not part of the runtime.
//
// A "phase" here: every thread reads one float written by a thread of another block in
// the phase before (so the dependency is real), adds one, writes it. Variants (hf_run's
// `variant`):
//   0, 1:  one launch per phase, in stream order (0) or with programmatic dependent launch
//          (1: the next launch starts early and waits in griddepcontrol.wait, as the
//          routing kernels do);
//   2:     one launch, the phases separated by a grid-wide barrier (an arrival counter and
//          a generation word in global memory; the last block to arrive resets the counter
//          and bumps the generation). The grid must be co-resident: the driver only asks
//          for grids that fit;
//   3:     one launch of one thread-block cluster (grid = cluster size, up to 16), the
//          phases separated by the cluster's hardware barrier, each block reading another
//          block's shared memory (what the one-launch route kernel does up to T ~ 64-170).

#include <cooperative_groups.h>
#include <cuda_runtime.h>

namespace cg = cooperative_groups;

namespace {

constexpr int kThreads = 256;

__device__ __forceinline__ void pdl_wait() { asm volatile("griddepcontrol.wait;" ::: "memory"); }
__device__ __forceinline__ void pdl_release() { asm volatile("griddepcontrol.launch_dependents;"); }

__device__ __forceinline__ void phase_step(const float* src, float* dst, int phase) {
  const int g = gridDim.x;
  const int from = ((blockIdx.x + phase + 1) % g) * kThreads + threadIdx.x;
  dst[blockIdx.x * kThreads + threadIdx.x] = (phase == 0 ? 0.f : src[from]) + 1.f;
}

__global__ void __launch_bounds__(kThreads) phase_kernel(const float* src, float* dst, int phase, int pdl) {
  if (pdl) {
    pdl_release();
    pdl_wait();
  }
  phase_step(src, dst, phase);
}

__device__ __forceinline__ void grid_barrier(unsigned* count, unsigned* gen) {
  __syncthreads();
  if (threadIdx.x == 0) {
    unsigned g0;
    asm volatile("ld.relaxed.gpu.u32 %0, [%1];" : "=r"(g0) : "l"(gen) : "memory");
    unsigned old;
    asm volatile("atom.add.acq_rel.gpu.u32 %0, [%1], 1;" : "=r"(old) : "l"(count) : "memory");
    if (old == gridDim.x - 1) {
      asm volatile("st.relaxed.gpu.u32 [%0], 0;" ::"l"(count) : "memory");
      asm volatile("red.release.gpu.add.u32 [%0], 1;" ::"l"(gen) : "memory");
    } else {
      unsigned g1;
      do {
        asm volatile("ld.acquire.gpu.u32 %0, [%1];" : "=r"(g1) : "l"(gen) : "memory");
      } while (g1 == g0);
    }
  }
  __syncthreads();
}

__global__ void __launch_bounds__(kThreads) barrier_kernel(float* bufs, int phases, unsigned* sync) {
  const size_t stride = static_cast<size_t>(gridDim.x) * kThreads;
  for (int ph = 0; ph < phases; ++ph) {
    if (ph) grid_barrier(sync, sync + 32);
    phase_step(bufs + (ph - 1 + 2) % 2 * stride, bufs + ph % 2 * stride, ph);
  }
}

__global__ void __launch_bounds__(kThreads) cluster_kernel(float* bufs, int phases) {
  __shared__ float val[kThreads];
  cg::cluster_group cluster = cg::this_cluster();
  const int g = static_cast<int>(cluster.num_blocks()), me = static_cast<int>(cluster.block_rank());
  float v = 1.f;
  for (int ph = 1; ph < phases; ++ph) {
    val[threadIdx.x] = v;
    cluster.sync();
    const float* other = cluster.map_shared_rank(val, (me + ph + 1) % g);
    v = other[threadIdx.x] + 1.f;
    cluster.sync();  // the next phase overwrites val
  }
  bufs[static_cast<size_t>((phases - 1) % 2) * g * kThreads + me * kThreads + threadIdx.x] = v;
}

// A launch of `grid` blocks of kThreads on `stream` with the one attribute `attr` where `on`.
cudaLaunchConfig_t config(int grid, cudaStream_t stream, cudaLaunchAttribute* attr, bool on) {
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = dim3(grid);
  cfg.blockDim = dim3(kThreads);
  cfg.stream = stream;
  cfg.attrs = attr;
  cfg.numAttrs = on ? 1 : 0;
  return cfg;
}

}  // namespace

extern "C" int hf_run(int variant, int grid, int phases, float* bufs, unsigned* sync, void* stream_ptr) {
  cudaStream_t stream = static_cast<cudaStream_t>(stream_ptr);
  cudaLaunchAttribute attr[1];
  if (variant == 3) {
    cudaFuncSetAttribute(cluster_kernel, cudaFuncAttributeNonPortableClusterSizeAllowed, 1);
    attr[0].id = cudaLaunchAttributeClusterDimension;
    attr[0].val.clusterDim.x = grid;
    attr[0].val.clusterDim.y = 1;
    attr[0].val.clusterDim.z = 1;
    const cudaLaunchConfig_t cfg = config(grid, stream, attr, true);
    return static_cast<int>(cudaLaunchKernelEx(&cfg, cluster_kernel, bufs, phases));
  }
  if (variant == 2) {
    barrier_kernel<<<grid, kThreads, 0, stream>>>(bufs, phases, sync);
    return static_cast<int>(cudaGetLastError());
  }
  const int pdl = variant == 1;
  const size_t stride = static_cast<size_t>(grid) * kThreads;
  attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr[0].val.programmaticStreamSerializationAllowed = 1;
  for (int ph = 0; ph < phases; ++ph) {
    const cudaLaunchConfig_t cfg = config(grid, stream, attr, pdl && ph > 0);
    const float* src = bufs + (ph + 1) % 2 * stride;
    float* dst = bufs + ph % 2 * stride;
    const cudaError_t err = cudaLaunchKernelEx(&cfg, phase_kernel, src, dst, ph, pdl);
    if (err != cudaSuccess) return static_cast<int>(err);
  }
  return 0;
}
