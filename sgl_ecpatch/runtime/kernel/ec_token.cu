// Expert-choice routing: the token kernel, the third of the three launches (see
// expert_choice.cu for the overview).

#include "ec_token.cuh"

namespace ec {

// v34: from E = 257 the block stages every threshold in shared memory after its wait (each
// thread's loads coalesced and issued together, one round trip), and the slots read them
// there. Read straight from global memory inside route_token, ptxas issued the lane's VPL
// pairs of loads (one 64-bit word each since v35) a few at a time, each batch waited for
// before the next: ~6 dependent round trips to the L2 at E = 512 (SASS of <bf16, 16>).
// H200, E = 512: -0.4 to -0.5 µs at T = 64-1024, -1.2 to -1.9 at T = 4096-8192; at E <= 256,
// where a lane reads 2-8 of them, it lost up to 0.5 µs (the barrier), so there the loads
// stay where they were.
template <int VPL>
constexpr bool kStageThresholds = VPL >= 16;

// v36: LANE (E <= 256, T <= kLaneWordsMaxT, rows scored before the wait): the lane's VPL
// threshold words in VPL / 2 16-byte loads issued together (thr_lane). H200, E = 256 T =
// 64-2048: -0.5 to -0.9 µs. Read that way everywhere it lost: where the screen runs (one word
// an expert, no longer coalesced), at E = 512 (staged), and from T = 4096 at E = 128-256
// (the words' registers cost occupancy once the rows fill the chip): those keep v35's reads.
constexpr int kLaneWordsMaxT = 2048;

template <int DT, int VPL, bool LANE>
__global__ void __launch_bounds__(kTokenWarps * 32) token_route_kernel(Params p) {
  constexpr bool kStaged = kStageThresholds<VPL>;
  constexpr bool kLane = LANE && !kStaged;
  __shared__ WarpScratch scratch[kTokenWarps];
  __shared__ unsigned long long sthr[kStaged ? 32 * VPL : 1];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int t = blockIdx.x * kTokenWarps + warp;
  // never a whole block: the others wait below; where the thresholds are staged, a last
  // block's spare warps (t >= T) stay to help until the block's barrier
  if (!kStaged && t >= p.T) return;
  const int n = read_n(p);
  // the logits are the caller's: load them before waiting for the select kernel, and
  // (v22) their scores too, computed as keys_kernel computes them (scores_in_place: the
  // same bits), and (v32) their keys, so that after the wait only the thresholds are read
  // and compared (v32: -0.1 to -0.5 µs at T = 64-4096, H200). Not where the screen
  // runs (it skips most exact scores, using the keys kernel's statistics), nor above
  // T = 4096, where most rows start after the select anyway and the row's max and sum
  // cost more than reading them (E = 60 T = 16384 +0.7 µs, H200).
  const bool screened = screens(p);
  const bool early = !screened && p.T <= kEarlyScoresMaxT;
  float x[VPL];
  uint32_t keys[VPL];
  if (t < n) {  // uniform per warp
    load_row<DT, VPL>(p.logits, t, p.E, lane, x);
    if (early) {
      float m, s;
      scores_in_place<VPL>(x, p.E, lane, p.sigmoid, m, s);
      row_keys<VPL>(p, lane, x, keys);  // v32: and the keys
    }
  }
  wait_for_predecessor();  // before any exit: our completion must imply the select's
  unsigned long long th[kLane ? VPL : 1];
  if constexpr (kLane) {
    if (early) {  // uniform (the host launches LANE only where it holds)
      const ulonglong2* src = reinterpret_cast<const ulonglong2*>(p.thr_lane + lane * VPL);
#pragma unroll
      for (int j = 0; j < VPL / 2; ++j) {
        const ulonglong2 v = src[j];
        th[2 * j] = v.x;
        th[2 * j + 1] = v.y;
      }
    }
  }
  if constexpr (kStaged) {
    constexpr int kStage = (32 * VPL + kTokenWarps * 32 - 1) / (kTokenWarps * 32);
    unsigned long long w[kStage];
#pragma unroll
    for (int j = 0; j < kStage; ++j) {
      const int e = threadIdx.x + kTokenWarps * 32 * j;
      w[j] = p.thr[e < p.E ? e : p.E - 1];
    }
#pragma unroll
    for (int j = 0; j < kStage; ++j) {
      const int e = threadIdx.x + kTokenWarps * 32 * j;
      if (e < p.E) sthr[e] = w[j];
    }
    __syncthreads();
    if (t >= p.T) return;
  }
  if (t >= n) {  // padding row
    write_padding_row(p, t, lane);
    return;
  }
  if (!early) {
    if (p.sigmoid) {
#pragma unroll
      for (int i = 0; i < VPL; ++i) x[i] = sigmoid_score(x[i]);
    } else {
      const float2 st = p.stats[t];  // from keys_kernel, the same bits as its scores
      if (screened && route_token_screened<VPL>(p, t, lane, x, st.x, st.y, scratch[warp])) return;
#pragma unroll
      for (int i = 0; i < VPL; ++i) x[i] = softmax_score(x[i], st.x, st.y);
    }
    row_keys<VPL>(p, lane, x, keys);
  }
  route_token<VPL, 32, true>(p, t, lane, x, scratch[warp], [&](int i, int e, uint32_t key) {
    unsigned long long word;
    if constexpr (kStaged) {
      word = sthr[e];
    } else if constexpr (kLane) {
      word = early ? th[i] : p.thr[e];
    } else {
      word = p.thr[e];
    }
    return threshold_word(key, t) >= word;
  }, keys);
}

template <int DT, int VPL>
cudaError_t launch_token(const Params& p, cudaStream_t stream, bool pdl) {
  const int grid = (p.T + kTokenWarps - 1) / kTokenWarps;
  if constexpr (!kStageThresholds<VPL>) {
    if (!screens(p) && p.T <= kLaneWordsMaxT)
      return launch(token_route_kernel<DT, VPL, true>, grid, kTokenWarps * 32, 0, stream, pdl, p);
  }
  return launch(token_route_kernel<DT, VPL, false>, grid, kTokenWarps * 32, 0, stream, pdl, p);
}

#define EC_INST(DT, VPL) template cudaError_t launch_token<DT, VPL>(const Params&, cudaStream_t, bool);
EC_FOR_DT_VPL(EC_INST)
#undef EC_INST

}  // namespace ec
