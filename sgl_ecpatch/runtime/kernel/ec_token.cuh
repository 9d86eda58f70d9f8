// Expert-choice routing: a token's slots from its row of scores (route_token and the
// screened form), shared by the token kernel (ec_token.cu) and the one-launch kernels
// (ec_fused.cu, ec_cluster.cu).

#pragma once

#include "ec_common.cuh"

namespace ec {


// ---------------------------------------------------------------------------
// Kernel 3: one warp per token. Lane `l` holds experts e = l + 32 i (i < VPL).
// Rank of (t, e) in the token's slot order, as an integer (larger = earlier):
//   bit 43: chosen by e | bits 11..42: okey | bits 0..10: 1024 - e (lower e first)
// 0 marks "taken or absent".
// Fast path: when at most 32 experts chose the token (and, for "topk", at least k
// did), they are compacted into shared memory and each one's slot is its rank
// among them. Otherwise k rounds of a warp-wide max give the slots in order.

constexpr int kTokenWarps = 4;
constexpr int kEarlyScoresMaxT = 4096;  // v22: the token kernel's scores before its wait up to here

// max of v[OFF .. OFF + N) of a register array, as a balanced tree (short chains)
template <int N, int OFF, int VPL>
__device__ __forceinline__ unsigned long long max_tree(const unsigned long long (&v)[VPL]) {
  if constexpr (N == 1) {
    return v[OFF];
  } else {
    const unsigned long long a = max_tree<N / 2, OFF, VPL>(v);
    const unsigned long long b = max_tree<N / 2, OFF + N / 2, VPL>(v);
    return a > b ? a : b;
  }
}

// CAND: candidates the rank fast path takes, 32 (one per lane) or 64 (two per lane).
// The one-block kernel takes 64 (v9): at E = 512, T = 16 a token is chosen by ~32
// experts on average (C = 1), so with 32 about half the rows took k rounds of a
// warp-wide max (ncu: that kernel was instruction-bound, 8 cycles per issued
// instruction, mostly fixed-latency waits). The other kernels keep 32: few experts
// choose each token there, and 64 measured ~1 µs slower at E = 60, T = 1024.
template <int CAND>
struct WarpScratchT {
  unsigned long long cand_rank[CAND];
  float cand_w[CAND];
  float slot_w[32];
  int slot_id[32];
};
using WarpScratch = WarpScratchT<32>;
constexpr int kFusedCand = 64;

// Writes row t's k slots. `sc_row` holds the row's scores (S[t, lane + 32 i]);
// is_chosen(i, e, key) says whether expert e (the lane's i-th, clamped below E) chose token t.
// With KEYS, `keys` holds the row's keys already (row_keys; the token kernel computes them
// before it waits for the select kernel, v32).
template <int VPL, int CAND, bool KEYS = false, typename ChosenFn>
__device__ __forceinline__ void route_token(const Params& p, int t, int lane, const float (&sc_row)[VPL],
                                            WarpScratchT<CAND>& ws, ChosenFn is_chosen,
                                            const uint32_t* keys = nullptr) {
  const int k = p.k;
  const long long out_base = static_cast<long long>(t) * k;
  unsigned long long rank[VPL];
  float score[VPL];
  // No branch around a load here: the expert index is clamped into [0, E) and the
  // result masked after. v10c: with `if (e < E)` around the bias and threshold reads,
  // ptxas waited for each element's loads inside its branch, VPL dependent round trips
  // per row (seen in the SASS of the token kernel and of kernel C).
  float b[VPL];
  if constexpr (!KEYS) bias_row<VPL>(p, lane, b);
#pragma unroll
  for (int i = 0; i < VPL; ++i) {
    const int e = lane + 32 * i;
    const int ec = e < p.E ? e : p.E - 1;
    const uint32_t key = KEYS ? keys[i] : okey(sc_row[i] + b[i]);
    const bool chosen = is_chosen(i, ec, key);
    rank[i] = e < p.E ? (static_cast<unsigned long long>(chosen) << 43) |
                            (static_cast<unsigned long long>(key) << 11) |
                            static_cast<unsigned long long>(kMaxExperts - e)
                      : 0ull;
    score[i] = e < p.E ? sc_row[i] : 0.0f;
  }
  // compact the chosen experts
  const unsigned lt_mask = (1u << lane) - 1u;
  int num_chosen = 0;
#pragma unroll
  for (int i = 0; i < VPL; ++i) {
    const bool ch = (rank[i] >> 43) != 0ull;
    const unsigned bal = __ballot_sync(kFull, ch);
    const int pos = num_chosen + __popc(bal & lt_mask);
    if (ch && pos < CAND) {
      ws.cand_rank[pos] = rank[i];
      ws.cand_w[pos] = score[i];
    }
    num_chosen += __popc(bal);
  }
  float my_w = 0.0f;
  int my_id = -1;
  float sum = 0.0f;
  if (num_chosen <= CAND && (!p.fill_topk || num_chosen >= k)) {
    __syncwarp();
    const int used = num_chosen < k ? num_chosen : k;
    // lane holds candidates lane and lane + 32; each one's slot is its rank among all
    // (ranks are unique: the expert index is part of the rank), one pass for both
    const int c1 = lane + 32;
    const unsigned long long v0 = lane < num_chosen ? ws.cand_rank[lane] : ~0ull;
    const unsigned long long v1 = c1 < num_chosen ? ws.cand_rank[c1] : ~0ull;
    int r0 = 0, r1 = 0;
    if constexpr (CAND > 32) {
      for (int j = 0; j < num_chosen; ++j) {
        const unsigned long long x = ws.cand_rank[j];
        r0 += x > v0;
        r1 += x > v1;
      }
    } else {
      for (int j = 0; j < num_chosen; ++j) r0 += ws.cand_rank[j] > v0;
    }
    if (lane < num_chosen && r0 < k) {
      float w = ws.cand_w[lane];
      if (w != w) w = 0.0f;  // a NaN score weighs 0
      ws.slot_w[r0] = w;
      ws.slot_id[r0] = kMaxExperts - static_cast<int>(v0 & 2047ull);
    }
    if (CAND > 32 && c1 < num_chosen && r1 < k) {
      float w = ws.cand_w[c1];
      if (w != w) w = 0.0f;
      ws.slot_w[r1] = w;
      ws.slot_id[r1] = kMaxExperts - static_cast<int>(v1 & 2047ull);
    }
    __syncwarp();
    for (int j = 0; j < used; ++j) sum += ws.slot_w[j];  // slot order, float32
    if (lane < used) {
      my_w = ws.slot_w[lane];
      my_id = ws.slot_id[lane];
    }
    __syncwarp();  // the scratch may be reused for the warp's next token
  } else {
    for (int j = 0; j < k; ++j) {
      unsigned long long best = max_tree<VPL, 0, VPL>(rank);
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
      {  // warp max of a 64-bit value as two redux.sync: the high words, then the low
         // words of the lanes holding that high word (v9d; was 5 rounds of 2 shuffles)
        const unsigned hi = __reduce_max_sync(kFull, static_cast<unsigned>(best >> 32));
        const unsigned mine = static_cast<unsigned>(best >> 32) == hi ? static_cast<unsigned>(best) : 0u;
        best = (static_cast<unsigned long long>(hi) << 32) | __reduce_max_sync(kFull, mine);
      }
#else
#pragma unroll
      for (int d = 16; d > 0; d >>= 1) {
        const unsigned long long o = __shfl_xor_sync(kFull, best, d);
        best = o > best ? o : best;
      }
#endif
      if (best == 0ull) break;                   // no expert left (uniform)
      if (!(best >> 43) && !p.fill_topk) break;  // "drop": only kept experts
      const int e = kMaxExperts - static_cast<int>(best & 2047ull);
      const int owner = e & 31;
      float w = 0.0f;
      if (lane == owner) {
#pragma unroll
        for (int i = 0; i < VPL; ++i) {
          if (rank[i] == best) {
            w = score[i];
            rank[i] = 0ull;
          }
        }
      }
      w = __shfl_sync(kFull, w, owner);
      if (w != w) w = 0.0f;  // a NaN score weighs 0
      sum += w;              // slot order, float32, as every path does
      if (lane == j) {
        my_w = w;
        my_id = e;
      }
    }
  }
  if (p.renorm && sum > 0.0f) my_w = my_w / sum;
  if (lane < k) {
    p.out_id[out_base + lane] = my_id;
    p.out_w[out_base + lane] = my_w;
  }
}

// The ranking keys of a row held in registers: key[i] = okey(S[t, lane + 32 i] + bias[e]),
// as route_token computes them.
template <int VPL>
__device__ __forceinline__ void row_keys(const Params& p, int lane, const float (&sc_row)[VPL], uint32_t (&key)[VPL]) {
  float b[VPL];
  bias_row<VPL>(p, lane, b);
#pragma unroll
  for (int i = 0; i < VPL; ++i) key[i] = okey(sc_row[i] + b[i]);
}

// Whether the token kernel screens its rows (route_token_screened): softmax, fill "drop", and
// the host's choice (p.screen). The kernel and its launcher both ask this.
__host__ __device__ __forceinline__ bool screens(const Params& p) { return p.screen && !p.fill_topk && !p.sigmoid; }

__device__ __forceinline__ void write_padding_row(const Params& p, int t, int lane) {
  const long long out_base = static_cast<long long>(t) * p.k;
  if (lane < p.k) {
    p.out_id[out_base + lane] = -1;
    p.out_w[out_base + lane] = 0.0f;
  }
}

// v13, token kernel, softmax with fill "drop" (the default): most of a row's experts are
// far below their threshold, and only the experts that chose the token are used, so the
// row is first screened with an upper bound of each key that needs no exact exp or
// division: A = max(approx_exp(x - m) * approx(1 / s) * (1 + 2^-10), 2^-125) >= S, since
// the approximations err by under 1e-5 relative, and an exp flushed to zero means
// S < 2^-126 (s >= 1: the row max adds exp(0)). Rounding is monotone, so
// okey(A + b) >= okey(S + b) = key, and okey(A + b) < thr_key[e] proves that e did not
// choose t (a NaN anywhere gives key 0, which only thr_key 0 admits, and 0 >= 0).
// The experts that pass (a superset of the chosen) get the exact score, key and choice
// test, one per lane; the slots are their ranks. Same bits as route_token's fast path:
// the same score and key expressions, slots in rank order, the sum in slot order.
// Returns false, having written nothing, where more than 32 experts pass.
template <int VPL>
__device__ __forceinline__ bool route_token_screened(const Params& p, int t, int lane, const float (&x)[VPL], float m,
                                                     float s, WarpScratch& ws) {
  const int k = p.k;
  float b[VPL];
  bias_row<VPL>(p, lane, b);
  const float inv_s = __fdividef(1.0f, s);
  const unsigned lt_mask = (1u << lane) - 1u;
  int num = 0;
#pragma unroll
  for (int i = 0; i < VPL; ++i) {
    const int e = lane + 32 * i;
    const int ec = e < p.E ? e : p.E - 1;
    const uint32_t tk = static_cast<uint32_t>(p.thr[ec] >> 32);  // the threshold's key
    const float a = fmaxf(__expf(x[i] - m) * inv_s * 1.0009765625f, 0x1p-125f);
    const bool pass = e < p.E && okey(a + b[i]) >= tk;
    const unsigned bal = __ballot_sync(kFull, pass);
    const int pos = num + __popc(bal & lt_mask);
    if (pass && pos < 32) {
      ws.cand_rank[pos] = static_cast<unsigned long long>(e);
      ws.cand_w[pos] = x[i];
    }
    num += __popc(bal);
  }
  if (num > 32) return false;  // uniform per warp
  __syncwarp();
  const bool mine = lane < num;
  const int e = mine ? static_cast<int>(ws.cand_rank[lane]) : 0;
  const float sc = mine ? softmax_score(ws.cand_w[lane], m, s) : 0.0f;
  const uint32_t key = okey(sc + bias_at(p, e));
  const bool chosen = mine && threshold_word(key, t) >= p.thr[e];
  // rank: larger key first, ties to the lower expert (0: not chosen)
  const unsigned long long rank =
      chosen ? (static_cast<unsigned long long>(key) << 11) | static_cast<unsigned long long>(kMaxExperts - e) : 0ull;
  const int used_all = __popc(__ballot_sync(kFull, chosen));
  int r = 0;
  for (int j = 0; j < num; ++j) r += __shfl_sync(kFull, rank, j) > rank;
  if (chosen && r < k) {
    ws.slot_w[r] = sc != sc ? 0.0f : sc;  // a NaN score weighs 0
    ws.slot_id[r] = e;
  }
  __syncwarp();
  const int used = used_all < k ? used_all : k;
  float sum = 0.0f;
  for (int j = 0; j < used; ++j) sum += ws.slot_w[j];  // slot order, float32
  float my_w = lane < used ? ws.slot_w[lane] : 0.0f;
  const int my_id = lane < used ? ws.slot_id[lane] : -1;
  __syncwarp();  // the scratch may be reused for the warp's next token
  if (p.renorm && sum > 0.0f) my_w = my_w / sum;
  if (lane < k) {
    const long long out_base = static_cast<long long>(t) * k;
    p.out_id[out_base + lane] = my_id;
    p.out_w[out_base + lane] = my_w;
  }
  return true;
}

}  // namespace ec
