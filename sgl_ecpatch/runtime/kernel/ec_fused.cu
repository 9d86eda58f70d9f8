// Expert-choice routing: the one-block kernel for decode sizes (kernel 0), see
// expert_choice.cu for the overview.

#include "ec_token.cuh"

namespace ec {

// Kernel 0 (T <= 32, E <= 512 and T * E <= 16384, decode sizes): one block, one launch.
// Warp per row: keys and scores into shared memory; thread per expert: its C best
// tokens as a bit mask (C rounds of a max over at most 32 keys); warp per row again:
// the slots, from the row's scores in shared memory (v9b: the row is no longer loaded
// and scored twice; v9a kept only the scores and computed the keys in the C rounds:
// 1-2.5 µs slower at E <= 128, T = 16, measured).

constexpr int kFusedThreads = 512;  // kFusedMaxT and kFusedMaxElems: ec_common.cuh

// Expert e's C best of the n <= NT tokens in skeys ([t][E]) as a bit mask; ties: lower t.
// The column goes to registers first, every read issued together (v10e: the rounds read
// shared memory inside a branch per token, one dependent read after another); NT is the
// unrolled width, n rounded up to 8, 16 or 32 (a fixed 32 cost 0.2-0.6 µs at T <= 8).
template <int NT>
__device__ __forceinline__ unsigned long long column_choice(const uint32_t* skeys, int E, int e, int n, int C,
                                                            unsigned long long all) {
  uint32_t key[NT];
#pragma unroll
  for (int t = 0; t < NT; ++t) key[t] = skeys[(t < n ? t : 0) * E + e];
  unsigned long long avail = all;  // valid tokens not yet taken
  unsigned long long mask = 0ull;
  for (int r = 0; r < C; ++r) {
    int best_t = -1;
    uint32_t best_key = 0u;
#pragma unroll
    for (int t = 0; t < NT; ++t) {
      const bool better = ((avail >> t) & 1ull) && (best_t < 0 || key[t] > best_key);
      best_t = better ? t : best_t;
      best_key = better ? key[t] : best_key;
    }
    mask |= 1ull << best_t;
    avail &= ~(1ull << best_t);
  }
  return mask;
}

template <int DT, int VPL>
__global__ void __launch_bounds__(kFusedThreads) fused_small_kernel(Params p) {
  extern __shared__ uint32_t fsm[];  // [T][E] keys for phase 2, then [T][E] scores for phase 3
  uint32_t* skeys = fsm;
  float* sscore = reinterpret_cast<float*>(fsm + static_cast<size_t>(p.T) * p.E);
  __shared__ unsigned long long chosen_mask[kMaxExperts];
  __shared__ WarpScratchT<kFusedCand> scratch[kFusedThreads / 32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = kFusedThreads / 32;
  const int E = p.E;
  const int n = read_n(p);
  const int C = capacity(p, n);
  const bool select = C > 0 && C < n;
  if (select) {
    for (int t = warp; t < n; t += nwarps) {
      float x[VPL], m, s;
      load_row<DT, VPL>(p.logits, t, E, lane, x);
      scores_in_place<VPL>(x, E, lane, p.sigmoid, m, s);
#pragma unroll
      for (int i = 0; i < VPL; ++i) {
        const int e = lane + 32 * i;
        if (e < E) {
          skeys[t * E + e] = okey(x[i] + bias_at(p, e));
          sscore[t * E + e] = x[i];
        }
      }
    }
  }
  __syncthreads();
  const unsigned long long all = n == 64 ? ~0ull : ((1ull << n) - 1ull);
  for (int e = threadIdx.x; e < E; e += kFusedThreads) {
    unsigned long long mask = C == 0 ? 0ull : all;
    if (select) mask = n <= 8 ? column_choice<8>(skeys, E, e, n, C, all)
                      : n <= 16 ? column_choice<16>(skeys, E, e, n, C, all)
                                : column_choice<kFusedMaxT>(skeys, E, e, n, C, all);
    chosen_mask[e] = mask;
  }
  __syncthreads();
  for (int t = warp; t < p.T; t += nwarps) {
    if (t >= n) {
      write_padding_row(p, t, lane);
      continue;
    }
    float x[VPL];
    if (select) {  // phase 1 left the row's scores in shared memory
#pragma unroll
      for (int i = 0; i < VPL; ++i) {
        const int e = lane + 32 * i;
        x[i] = e < E ? sscore[t * E + e] : 0.0f;
      }
    } else {
      float m, s;
      load_row<DT, VPL>(p.logits, t, E, lane, x);
      scores_in_place<VPL>(x, E, lane, p.sigmoid, m, s);
    }
    route_token<VPL, kFusedCand>(p, t, lane, x, scratch[warp],
                     [&](int, int e, uint32_t) { return ((chosen_mask[e] >> t) & 1ull) != 0ull; });
  }
}


template <int DT, int VPL>
cudaError_t launch_fused(const Params& p, cudaStream_t stream) {
  const size_t smem = 2 * static_cast<size_t>(p.T) * p.E * sizeof(uint32_t);  // keys + scores
  cudaError_t err;
  if ((err = allow_smem(fused_small_kernel<DT, VPL>, smem)) != cudaSuccess) return err;
  return launch(fused_small_kernel<DT, VPL>, 1, kFusedThreads, smem, stream, false, p);
}

int fused_static_smem() { return static_smem(fused_small_kernel<kDtF32, 16>); }

// VPL <= 16 only (E <= 512: the row's registers fit the block's 512 threads)
#define EC_INST(DT, VPL) template cudaError_t launch_fused<DT, VPL>(const Params&, cudaStream_t);
#define EC_INST_DT(DT) EC_INST(DT, 2) EC_INST(DT, 4) EC_INST(DT, 8) EC_INST(DT, 16)
EC_FOR_DT(EC_INST_DT)
#undef EC_INST_DT
#undef EC_INST

}  // namespace ec
