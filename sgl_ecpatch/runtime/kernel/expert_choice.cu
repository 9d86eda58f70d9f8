// Expert-choice routing (Zhou et al. 2022) as CUDA kernels.
//
// Computes exactly the `expert_choice_topk` contract of the project (ROUTING.md):
//   scores S = softmax(logits.float()) per row (or sigmoid), key = S + bias[e],
//   capacity C = min(n, ceil(n * k * cf / E)) in integers (cf = num / den),
//   expert e chooses the C valid tokens with the largest key (ties: lower token),
//   token t keeps at most k of the experts that chose it (largest key, ties: lower
//   expert), "topk" fill adds its best non-kept experts, padding rows are -1/0,
//   vacant slots -1/0, renormalisation sums the row's weights in slot order.
//
// This file has no torch or pybind11 include on purpose: it compiles in seconds and
// the Python side calls the C entry points at the bottom through ctypes, passing
// raw device pointers and the current torch stream.
//
// Shape of the computation:
//   * ranking keys are mapped to order-preserving uint32 ("okey"), NaN -> 0, so the
//     total order on (key, token) is an integer order with no float compares;
//   * per expert, the threshold is the C-th largest (okey, -token) pair of its
//     column: the kernels write thr_key[e] and thr_tok[e], and token t is chosen by
//     e iff okey > thr_key[e] || (okey == thr_key[e] && t <= thr_tok[e]);
//   * per token, one warp ranks (chosen, okey, -e) as a 44-bit integer; the slots
//     are the ranks of the chosen experts when at most 32 chose it, else k rounds of
//     a warp-wide max.
// Launches (all on the caller's stream, no host sync, n read on the device):
//   T = 1, and on sm_90+ T <= 16 with E > 64 or T >= 12: row_block (one block per row,
//     T > 1 as one cluster of T blocks)
//   T <= 32 (T <= 24 for E > 256), E <= 512, T*E <= 16384:  fused_small (one block,
//     one launch), except 17 <= T <= 32 on sm_90+: cluster_route first
//   T <= 256, E <= 512 on sm_90+, where the ranks of cluster_route take at most
//     SGL_ECPATCH_KERNEL_RANK_MAX compares per thread (default 96 since session 6: E = 60
//     to T = 96, E = 128 to T = 64, E = 256 to T = 48, E = 512 to T = 32): cluster_route
//     (one cluster of 16 blocks, one launch)
//   T <= 512:    keys (stats, keys transposed) -> warp_select -> token_route
//   T <= 8192:   keys -> block_select (one block of 2-8 warps per expert) -> token_route
//   larger T:    keys -> select_radix (one block per expert) -> token_route
//                (sm_90+, only where SGL_ECPATCH_KERNEL_SELECT_SPLIT forces it:
//                select_split, a cluster of B = 2, 4 or 8 blocks per expert)
//   (T*E > 2^24: no transposed keys; select_radix gathers its column)
// The second and third launches use programmatic dependent launch on sm_90+.
// Every reduction has a fixed order and histograms use integer atomics only, so the
// output bits do not depend on scheduling.

#include <cuda_runtime.h>
#include <cuda_fp16.h>
#include <cooperative_groups.h>
#include <stdint.h>

namespace ec {

constexpr int kDtF32 = 0, kDtBf16 = 1, kDtF16 = 2;
constexpr int kMaxExperts = 1024;  // 10 bits of expert index in the token rank
constexpr int kMaxTopK = 32;       // one slot per lane
constexpr unsigned kFull = 0xffffffffu;

// ---------------------------------------------------------------------------
// element helpers

template <int DT>
__device__ __forceinline__ float load_val(const void* p, long long i) {
  if (DT == kDtF32) {
    return __ldg(static_cast<const float*>(p) + i);
  } else if (DT == kDtBf16) {
    unsigned short bits = __ldg(static_cast<const unsigned short*>(p) + i);
    return __uint_as_float(static_cast<uint32_t>(bits) << 16);
  } else {
    unsigned short bits = __ldg(static_cast<const unsigned short*>(p) + i);
    return __half2float(__ushort_as_half(bits));
  }
}

__device__ __forceinline__ float load_any(const void* p, int dt, long long i) {
  if (dt == kDtF32) return load_val<kDtF32>(p, i);
  if (dt == kDtBf16) return load_val<kDtBf16>(p, i);
  return load_val<kDtF16>(p, i);
}

// Order-preserving map float32 -> uint32: a < b  <=>  okey(a) < okey(b) for numbers;
// -0 and +0 map to one value (they compare equal); NaN maps to 0, below -inf.
__device__ __forceinline__ uint32_t okey(float f) {
  if (f != f) return 0u;
  uint32_t u = __float_as_uint(f);
  if ((u << 1) == 0u) u = 0u;
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

// Softmax score of one element given its row's max m and sum s of exp(x - m); the
// same expression as torch's softmax (exp(x - max) / sum).
__device__ __forceinline__ float softmax_score(float x, float m, float s) {
  return expf(x - m) / s;
}

__device__ __forceinline__ float sigmoid_score(float x) {
  return 1.0f / (1.0f + expf(-x));
}

// One row in registers: lane `l` holds x[i] = logits[row, l + 32 i] (i < VPL); all
// loads are issued before the first use.
template <int DT, int VPL>
__device__ __forceinline__ void load_row(const void* logits, long long row, int E, int lane, float (&x)[VPL]) {
  const long long base = row * E;
#pragma unroll
  for (int i = 0; i < VPL; ++i) {
    const int e = lane + 32 * i;
    x[i] = e < E ? load_val<DT>(logits, base + e) : 0.0f;
  }
}

// The max of a lane's x[j] (expert e0 + 32 j, those below E), then over the warp (a xor
// butterfly); -inf where the lane holds none. The row max of scores_in_place and the
// two-warp keys kernel.
template <int N>
__device__ __forceinline__ float warp_row_max(const float (&x)[N], int e0, int E) {
  float m = -INFINITY;
#pragma unroll
  for (int j = 0; j < N; ++j)
    if (e0 + 32 * j < E) m = fmaxf(m, x[j]);
#pragma unroll
  for (int d = 16; d > 0; d >>= 1) m = fmaxf(m, __shfl_xor_sync(kFull, m, d));
  return m;
}

// Scores of a row held in registers, in place: x[i] becomes S[t, lane + 32 i].
// Softmax: the row max, then the sum of exp(x - max) with each lane in order of i and
// a xor butterfly (bitwise the same in every lane; this is also the order of torch's
// warp softmax for rows of <= 1024, which holds element lane + 32 i in lane), then
// exp / sum. Each exp is computed once; the result has the same bits as
// softmax_score(x, m, s), which the kernels use given (m, s) from the statistics
// buffer. A NaN anywhere in the row makes the row's scores NaN, as in torch.
template <int VPL>
__device__ __forceinline__ void scores_in_place(float (&x)[VPL], int E, int lane, bool sigmoid, float& m_out,
                                                float& s_out) {
  if (sigmoid) {
#pragma unroll
    for (int i = 0; i < VPL; ++i) x[i] = sigmoid_score(x[i]);
    m_out = 0.0f;
    s_out = 1.0f;
    return;
  }
  const float m = warp_row_max<VPL>(x, lane, E);
  float s = 0.0f;
#pragma unroll
  for (int i = 0; i < VPL; ++i) {
    if (lane + 32 * i < E) {
      x[i] = expf(x[i] - m);
      s += x[i];
    }
  }
#pragma unroll
  for (int d = 16; d > 0; d >>= 1) s += __shfl_xor_sync(kFull, s, d);
#pragma unroll
  for (int i = 0; i < VPL; ++i) x[i] = x[i] / s;
  m_out = m;
  s_out = s;
}

struct Params {
  const void* logits;
  int dtype;
  int T, E, k;
  const void* bias;  // may be null
  int bias_dtype;
  const void* n_ptr;  // may be null: then n = n_host
  int n_is_64;
  long long n_host;
  long long cf_num, cf_den;
  int sigmoid;
  int fill_topk;
  int renorm;
  int fused_max;       // largest T * E for the one-launch path
  int cluster_max_t;   // largest T for the one-cluster path (0: off; sm_90+ only)
  int select_split;    // blocks per expert of the large-T select: -1 (unset), 0, 1 one; 2/4/8 forced (sm_90+)
  int row_max_t;       // largest T for the block-per-row path (0: off; above 1: sm_90+ clusters)
  int keys_half_min_t; // smallest T whose keys kernel takes two rows a warp (E <= 64)
  int keys_wide_max_t; // largest T whose keys kernel takes two warps a row (256 < E <= 512)
  int rank_max;        // kernel C where its ranks take at most this many compares per thread (0: off)
  int num_sms;         // host only: the device's SM count (select_radix's block size)
  int smem_limit;      // host only: bytes of shared memory a block may have (static + dynamic)
  int screen;          // token kernel: screen rows before exact scores (softmax, "drop"; v13)
  float2* stats;       // [T] (m, s) of softmax rows; null: recompute per row
  uint32_t* keys_t;    // [E, T] ordered keys, transposed; null: select gathers them
  uint32_t* thr_key;   // [E]
  int* thr_tok;        // [E]
  float* out_w;        // [T, k]
  int* out_id;         // [T, k]
};

__device__ __forceinline__ int read_n(const Params& p) {
  long long n = p.n_host;
  if (p.n_ptr != nullptr) {
    n = p.n_is_64 ? *static_cast<const long long*>(p.n_ptr)
                  : static_cast<long long>(*static_cast<const int*>(p.n_ptr));
  }
  if (n < 0) n = 0;
  if (n > p.T) n = p.T;
  return static_cast<int>(n);
}

// C = 0 if n == 0 else min(n, ceil(n k num / (E den))); the host caps num/den at E
// so the product fits in 64 bits.
// A 64-bit division is a called subroutine of ~100 dependent instructions; where both
// operands fit 32 bits (T <= 65536 with k * cf_num <= 65536, E * cf_den < 2^32) the
// inline 32-bit division does it.
__device__ __forceinline__ int capacity(const Params& p, int n) {
  if (n == 0) return 0;
  const unsigned long long a = static_cast<unsigned long long>(n) * p.k * p.cf_num;
  const unsigned long long b = static_cast<unsigned long long>(p.E) * p.cf_den;
  unsigned long long c;
  if ((a | b) >> 32 == 0) {
    const uint32_t a32 = static_cast<uint32_t>(a), b32 = static_cast<uint32_t>(b);
    c = a32 / b32 + (a32 % b32 != 0u);
  } else {
    c = (a + b - 1) / b;
  }
  return c < static_cast<unsigned long long>(n) ? static_cast<int>(c) : n;
}

__device__ __forceinline__ float bias_at(const Params& p, int e) {
  return p.bias ? load_any(p.bias, p.bias_dtype, e) : 0.0f;
}

// The bias of experts lane + 32 i (0 without a bias, and for e >= E), the dtype decided
// once outside the loop so that the VPL loads are issued together.
template <int DT, int VPL>
__device__ __forceinline__ void bias_row_dt(const Params& p, int lane, float (&b)[VPL]) {
#pragma unroll
  for (int i = 0; i < VPL; ++i) {
    const int e = lane + 32 * i;
    const float v = load_val<DT>(p.bias, e < p.E ? e : p.E - 1);
    b[i] = e < p.E ? v : 0.0f;
  }
}

template <int VPL>
__device__ __forceinline__ void bias_row(const Params& p, int lane, float (&b)[VPL]) {
  if (p.bias == nullptr) {
#pragma unroll
    for (int i = 0; i < VPL; ++i) b[i] = 0.0f;
  } else if (p.bias_dtype == kDtF32) {
    bias_row_dt<kDtF32, VPL>(p, lane, b);
  } else if (p.bias_dtype == kDtBf16) {
    bias_row_dt<kDtBf16, VPL>(p, lane, b);
  } else {
    bias_row_dt<kDtF16, VPL>(p, lane, b);
  }
}

// Writes the threshold of expert e for the trivial capacities; returns true if done.
__device__ __forceinline__ bool trivial_threshold(const Params& p, int e, int n, int C) {
  if (C == 0) {  // nobody chosen
    p.thr_key[e] = 0xffffffffu;
    p.thr_tok[e] = -1;
    return true;
  }
  if (C >= n) {  // every valid token chosen
    p.thr_key[e] = 0u;
    p.thr_tok[e] = n;
    return true;
  }
  return false;
}

// Programmatic dependent launch (sm_90+): a kernel launched with the PDL attribute
// may start while its predecessor runs; it waits here before reading what the
// predecessor wrote. The predecessor lets it start once all its blocks are running.
__device__ __forceinline__ void wait_for_predecessor() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

__device__ __forceinline__ void allow_dependents() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;");
#endif
}

// ---------------------------------------------------------------------------
// Kernel 1 (large T): per row, the softmax statistics and every key; the keys go
// out transposed ([E, T]) through a shared-memory tile of 8 rows (one per warp), so
// that the select kernel reads each expert's column contiguously; each store is a
// full 32-byte sector.

constexpr int kKeysRows = 8;

// The last step of the keys kernels: a block's tile of ROWS rows (tile[e][ROWS + 1], rows
// t0 .. t0 + rows - 1 valid) goes out to keys_t[e][t0 + row]. Lane -> (expert
// 32 / ROWS * warp + lane / ROWS, row lane % ROWS): each expert's ROWS keys are one
// contiguous store of ROWS * 4 bytes (8 rows: a 32-byte sector).
template <int ROWS>
__device__ __forceinline__ void store_key_tile(const Params& p, const uint32_t* tile, int E, int t0, int rows,
                                               int warp, int warps, int lane) {
  constexpr int kPerWarp = 32 / ROWS;  // experts a warp stores at once
  const int r = lane % ROWS;
  for (int e = warp * kPerWarp + lane / ROWS; e < E; e += warps * kPerWarp) {
    if (r < rows) p.keys_t[static_cast<long long>(e) * p.T + t0 + r] = tile[e * (ROWS + 1) + r];
  }
}

template <int DT, int VPL>
__global__ void __launch_bounds__(kKeysRows * 32) keys_kernel(Params p) {
  extern __shared__ uint32_t tile[];  // [E][kKeysRows + 1]
  allow_dependents();
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int t0 = blockIdx.x * kKeysRows;
  const int n = read_n(p);
  const int E = p.E;
  const int t = t0 + warp;
  if (t < n) {
    float x[VPL];
    load_row<DT, VPL>(p.logits, t, E, lane, x);
    float m, s;
    scores_in_place<VPL>(x, E, lane, p.sigmoid, m, s);
    if (lane == 0 && p.stats) p.stats[t] = make_float2(m, s);
    if (p.keys_t != nullptr) {
#pragma unroll
      for (int i = 0; i < VPL; ++i) {
        const int e = lane + 32 * i;
        if (e < E) tile[e * (kKeysRows + 1) + warp] = okey(x[i] + bias_at(p, e));
      }
    }
  }
  if (p.keys_t == nullptr) return;  // uniform per block: no barrier below is reached
  __syncthreads();
  const int rows = min(kKeysRows, n - t0);
  if (rows <= 0) return;
  store_key_tile<kKeysRows>(p, tile, E, t0, rows, warp, kKeysRows, lane);
}

// Kernel 1 for 256 < E <= 512 at small T (v30): two warps a row, 16 warps a block of 8
// rows. One row a warp runs a chain of 16 exact exps and divisions a lane; here each warp
// holds half of the lane's elements (warp hw: i in [hw H, hw H + H), H = VPL / 2). Same
// bits as scores_in_place: the max is order-free; the lane's in-order sum is warp 0's
// partial continued by warp 1 in the same order (through shared memory), then the same
// butterfly. Measured (H200): E = 512 T = 64 / 256 -0.8 µs, T = 1024 +-0.1, T >= 4096
// +1 to +3.4 (the blocks' barriers cost more than the shorter chains save once the SMs
// are full); E = 128 and 256 no gain anywhere.
template <int DT, int VPL>
__global__ void __launch_bounds__(2 * kKeysRows * 32) keys_wide_kernel(Params p) {
  constexpr int H = VPL / 2;
  extern __shared__ uint32_t tile[];  // [E][kKeysRows + 1]
  __shared__ float s_max[kKeysRows][2];
  __shared__ float s_part[kKeysRows][32];
  __shared__ float s_sum[kKeysRows];
  allow_dependents();
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int r = warp >> 1, hw = warp & 1;
  const int t0 = blockIdx.x * kKeysRows;
  const int n = read_n(p);
  if (t0 >= n) return;  // uniform per block
  const int E = p.E;
  const int t = t0 + r;
  const bool valid = t < n;  // uniform per warp (a row past n computes on row 0, unwritten)
  const long long base = static_cast<long long>(valid ? t : 0) * E;
  const int e0 = lane + 32 * H * hw;  // expert of x[0]; x[j] is expert e0 + 32 j
  float x[H];
#pragma unroll
  for (int j = 0; j < H; ++j) x[j] = e0 + 32 * j < E ? load_val<DT>(p.logits, base + e0 + 32 * j) : 0.0f;
  float m = 0.0f, s = 1.0f;
  if (p.sigmoid) {  // uniform per block
#pragma unroll
    for (int j = 0; j < H; ++j) x[j] = sigmoid_score(x[j]);
  } else {
    const float mm = warp_row_max<H>(x, e0, E);
    if (lane == 0) s_max[r][hw] = mm;
    __syncthreads();
    m = fmaxf(s_max[r][0], s_max[r][1]);
    float part = 0.0f;
    if (hw == 0) {
#pragma unroll
      for (int j = 0; j < H; ++j) {
        if (e0 + 32 * j < E) {
          x[j] = expf(x[j] - m);
          part += x[j];
        }
      }
      s_part[r][lane] = part;
    } else {
#pragma unroll
      for (int j = 0; j < H; ++j)
        if (e0 + 32 * j < E) x[j] = expf(x[j] - m);
    }
    __syncthreads();
    if (hw == 1) {
      part = s_part[r][lane];  // the lane's sum over warp 0's elements, continued in order
#pragma unroll
      for (int j = 0; j < H; ++j)
        if (e0 + 32 * j < E) part += x[j];
#pragma unroll
      for (int d = 16; d > 0; d >>= 1) part += __shfl_xor_sync(kFull, part, d);
      if (lane == 0) s_sum[r] = part;
    }
    __syncthreads();
    s = s_sum[r];
#pragma unroll
    for (int j = 0; j < H; ++j) x[j] = x[j] / s;
  }
  if (valid && hw == 0 && lane == 0 && p.stats) p.stats[t] = make_float2(m, s);
  if (p.keys_t == nullptr) return;  // uniform per block: no barrier below is reached
  if (valid) {
#pragma unroll
    for (int j = 0; j < H; ++j) {
      const int e = e0 + 32 * j;
      if (e < E) tile[e * (kKeysRows + 1) + r] = okey(x[j] + bias_at(p, e));
    }
  }
  __syncthreads();
  store_key_tile<kKeysRows>(p, tile, E, t0, min(kKeysRows, n - t0), warp, 2 * kKeysRows, lane);
}

// Kernel 1 for E <= 64 at large T (v28): two rows a warp, one per half-warp. At E = 60,
// T = 16384 keys_kernel ran ~284 warp instructions a row at ~0.6 issued a cycle per
// scheduler (ncu: not selected 28%, wait 19%), a third of them per row rather than per
// element (set-up, two 5-step reductions, the store loop). Lane h of half-warp `half`
// holds what lanes h and h + 16 of the one-row layout hold: xa[i] = x[h + 32 i] and
// xb[i] = x[h + 16 + 32 i]. Same bits as scores_in_place: each of the two in-order
// partial sums is the one of its lane there; their sum is the butterfly's first step
// (d = 16) in both of those lanes (a + b == b + a); d = 8, 4, 2, 1 stay inside a half.
// The max is order-free. Every lane runs the arithmetic (a row past n reads row 0), so
// the shuffles never diverge; only valid rows are written.
constexpr int kKeysHalfRows = 2 * kKeysRows;

template <int DT, int VPL>
__global__ void __launch_bounds__(kKeysRows * 32) keys_half_kernel(Params p) {
  extern __shared__ uint32_t tile[];  // [E][kKeysHalfRows + 1]
  allow_dependents();
  const int lane = threadIdx.x & 31, h = lane & 15;
  const int r = 2 * (threadIdx.x >> 5) + (lane >> 4);  // the half's row in the block
  const int t0 = blockIdx.x * kKeysHalfRows;
  const int n = read_n(p);
  if (t0 >= n) return;  // uniform per block
  const int E = p.E;
  const int t = t0 + r;
  const bool valid = t < n;
  const long long base = static_cast<long long>(valid ? t : 0) * E;
  float xa[VPL], xb[VPL];
#pragma unroll
  for (int i = 0; i < VPL; ++i) {
    const int ea = h + 32 * i, eb = ea + 16;
    xa[i] = ea < E ? load_val<DT>(p.logits, base + ea) : 0.0f;
    xb[i] = eb < E ? load_val<DT>(p.logits, base + eb) : 0.0f;
  }
  float m = 0.0f, s = 1.0f;
  if (p.sigmoid) {
#pragma unroll
    for (int i = 0; i < VPL; ++i) {
      xa[i] = sigmoid_score(xa[i]);
      xb[i] = sigmoid_score(xb[i]);
    }
  } else {
    m = -INFINITY;
#pragma unroll
    for (int i = 0; i < VPL; ++i) {
      if (h + 32 * i < E) m = fmaxf(m, xa[i]);
      if (h + 16 + 32 * i < E) m = fmaxf(m, xb[i]);
    }
#pragma unroll
    for (int d = 8; d > 0; d >>= 1) m = fmaxf(m, __shfl_xor_sync(kFull, m, d));
    float sa = 0.0f, sb = 0.0f;
#pragma unroll
    for (int i = 0; i < VPL; ++i) {
      if (h + 32 * i < E) {
        xa[i] = expf(xa[i] - m);
        sa += xa[i];
      }
      if (h + 16 + 32 * i < E) {
        xb[i] = expf(xb[i] - m);
        sb += xb[i];
      }
    }
    s = sa + sb;
#pragma unroll
    for (int d = 8; d > 0; d >>= 1) s += __shfl_xor_sync(kFull, s, d);
#pragma unroll
    for (int i = 0; i < VPL; ++i) {
      xa[i] = xa[i] / s;
      xb[i] = xb[i] / s;
    }
  }
  if (valid && h == 0 && p.stats) p.stats[t] = make_float2(m, s);
  if (p.keys_t == nullptr) return;  // uniform per block: no barrier below is reached
  if (valid) {
#pragma unroll
    for (int i = 0; i < VPL; ++i) {
      const int ea = h + 32 * i, eb = ea + 16;
      if (ea < E) tile[ea * (kKeysHalfRows + 1) + r] = okey(xa[i] + bias_at(p, ea));
      if (eb < E) tile[eb * (kKeysHalfRows + 1) + r] = okey(xb[i] + bias_at(p, eb));
    }
  }
  __syncthreads();
  store_key_tile<kKeysHalfRows>(p, tile, E, t0, min(kKeysHalfRows, n - t0), threadIdx.x >> 5, kKeysRows, lane);
}

// cnt + (kj > kt) given nkt = ~kt: the carry out of kj + ~kt (set iff kj > kt). ptxas
// turns a pair of these into two adds with carry out and one add of both carries: 1.5
// instructions a compare, against 3 for `cnt += kj > kt` (compare, add, select).
__device__ __forceinline__ unsigned count_gt(unsigned cnt, unsigned kj, unsigned nkt) {
  unsigned r;
  asm("{\n .reg .u32 d;\n add.cc.u32 d, %1, %2;\n addc.u32 %0, %3, 0;\n}" : "=r"(r) : "r"(kj), "r"(nkt), "r"(cnt));
  return r;
}

// ---------------------------------------------------------------------------
// Kernel 2a (T <= 512): one warp per expert; the column's keys sit in registers
// (lane l holds tokens l + 32 i, i < KPL) and the C-th largest key is found bit by
// bit (below the bits all keys share), counting with the whole warp. Ties: the
// lowest token indices among the keys equal to it, by ballots in index order.

constexpr int kWarpSelectWarps = 4;  // v12: 8 -> 4, few experts spread over more SMs

__device__ __forceinline__ int warp_sum(int v) {
#pragma unroll
  for (int d = 16; d > 0; d >>= 1) v += __shfl_xor_sync(kFull, v, d);
  return v;
}

// The selections skip the high bits that every key of a column shares: the number of
// bits below the prefix common to its min and max (0-32), and the mask of that prefix.
__device__ __forceinline__ int bits_below_prefix(uint32_t lo, uint32_t hi) {
  const uint32_t diff = lo ^ hi;
  return diff ? 32 - __clz(diff) : 0;
}

__device__ __forceinline__ uint32_t prefix_mask(int bits) { return bits == 32 ? 0u : ~((1u << bits) - 1u); }

// Warp-wide reductions: one redux.sync instruction on sm_80+, a xor butterfly before.
__device__ __forceinline__ int warp_add(int v) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  return static_cast<int>(__reduce_add_sync(kFull, static_cast<unsigned>(v)));
#else
  return warp_sum(v);
#endif
}

// The warp's min of lo and max of hi, in place.
__device__ __forceinline__ void warp_min_max(uint32_t& lo, uint32_t& hi) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  lo = __reduce_min_sync(kFull, lo);
  hi = __reduce_max_sync(kFull, hi);
#else
#pragma unroll
  for (int d = 16; d > 0; d >>= 1) {
    lo = min(lo, __shfl_xor_sync(kFull, lo, d));
    hi = max(hi, __shfl_xor_sync(kFull, hi, d));
  }
#endif
}

// A lane's KPL keys of a column: tokens first + lane + 32 i below n (0 from n on), every
// load issued before the first use (clamped indices); lo and hi: the lane's min and max of
// the valid ones. The warp and block selects load their columns with it.
template <int KPL>
__device__ __forceinline__ void load_column_keys(const uint32_t* col, int first, int n, int lane, uint32_t (&key)[KPL],
                                                 uint32_t& lo, uint32_t& hi) {
  lo = 0xffffffffu;
  hi = 0u;
#pragma unroll
  for (int i = 0; i < KPL; ++i) {
    const int t = first + lane + 32 * i;
    const uint32_t kv = __ldg(col + (t < n ? t : 0));
    key[i] = t < n ? kv : 0u;
    lo = t < n ? min(lo, kv) : lo;
    hi = t < n ? max(hi, kv) : hi;
  }
}

// count(key[i] >= cand) over a lane's KPL keys (cand >= 1, so the absent keys, 0, never
// count): key >= cand is the carry of key + ~(cand - 1) (count_gt, v12: 1.5 instructions a
// compare), in two chains. One bisection round of the warp and block selects.
template <int KPL>
__device__ __forceinline__ unsigned count_ge(const uint32_t (&key)[KPL], uint32_t cand) {
  const uint32_t nk = ~(cand - 1u);
  unsigned c0 = 0u, c1 = 0u;
#pragma unroll
  for (int i = 0; i < KPL; i += 2) {
    c0 = count_gt(c0, key[i], nk);
    if (i + 1 < KPL) c1 = count_gt(c1, key[i + 1], nk);
  }
  return c0 + c1;
}

// The keys next to a bisection candidate in a lane: the smallest key >= cand (all ones if
// none) and the largest key below it (0 if none; absent keys are 0, below every cand >= 1).
// v19: a round that counts exactly C or C - 1 keys >= cand ends the bisection, since the
// C-th largest key is then the smallest key >= cand, or the largest one below it.
template <int KPL>
__device__ __forceinline__ void keys_around(const uint32_t (&key)[KPL], uint32_t cand, uint32_t& above,
                                            uint32_t& below) {
  above = 0xffffffffu;
  below = 0u;
#pragma unroll
  for (int i = 0; i < KPL; ++i) {
    above = key[i] >= cand ? min(above, key[i]) : above;
    below = key[i] < cand ? max(below, key[i]) : below;
  }
}

// Ties: the position 32 i + lane (i < KPL) of the need-th key equal to v in that order,
// counting only positions below `valid` (1 <= need; -1 if there are fewer): one ballot
// per i, and one more where the need-th is found. Used by the warp and block selects,
// whose lanes hold tokens (first + lane + 32 i).
template <int KPL>
__device__ __forceinline__ int nth_equal(const uint32_t (&key)[KPL], uint32_t v, int valid, int need, int lane) {
  const unsigned lt_mask = (1u << lane) - 1u;
#pragma unroll
  for (int i = 0; i < KPL; ++i) {
    const bool eq = lane + 32 * i < valid && key[i] == v;
    const unsigned bal = __ballot_sync(kFull, eq);
    const int c = __popc(bal);
    if (need <= c) return 32 * i + __ffs(__ballot_sync(kFull, eq && __popc(bal & lt_mask) == need - 1)) - 1;
    need -= c;
  }
  return -1;
}

// The C-th largest (key, -token) of a column of n keys, col[t] for t < n <= 32 * KPL
// (0 < C < n), found by one warp: lane l holds tokens l + 32 i; the bits every key
// shares are skipped, then one round per bit below them (largest v with
// count(key >= v) >= C), until a round counts C or C - 1 keys >= its candidate (v19:
// 9-13 rounds on average instead of ~28 for softmax keys of random logits); ties go to
// the lowest token indices among the keys equal to v, by ballots in index order.
template <int KPL>
__device__ __forceinline__ void warp_threshold(const uint32_t* col, int n, int C, int lane, uint32_t& v_out,
                                               int& tstar_out) {
  uint32_t key[KPL];
  uint32_t lo, hi;
  load_column_keys<KPL>(col, 0, n, lane, key, lo, hi);
  warp_min_max(lo, hi);
  const int bits = bits_below_prefix(lo, hi);
  uint32_t v = lo & prefix_mask(bits);  // the bits all keys share
  for (int b = bits - 1; b >= 0; --b) {
    const uint32_t cand = v | (1u << b);
    const int c = warp_add(static_cast<int>(count_ge<KPL>(key, cand)));
    if (c >= C) v = cand;
    if (c == C || c == C - 1) {  // v19: the C-th largest key is next to cand
      uint32_t above, below;
      keys_around<KPL>(key, cand, above, below);
      warp_min_max(above, below);
      v = c == C ? above : below;
      break;
    }
  }
  int greater = 0;
#pragma unroll
  for (int i = 0; i < KPL; ++i) greater += (lane + 32 * i < n) && key[i] > v;
  const int need = C - warp_add(greater);  // >= 1 keys equal to v still to take, lowest t first
  v_out = v;
  tstar_out = nth_equal<KPL>(key, v, n, need, lane);
}

template <int KPL>
__global__ void __launch_bounds__(kWarpSelectWarps * 32) warp_select_kernel(Params p) {
  allow_dependents();
  wait_for_predecessor();  // before any exit: our completion must imply keys_kernel's
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int e = blockIdx.x * kWarpSelectWarps + warp;
  if (e >= p.E) return;
  const int n = read_n(p);
  const int C = capacity(p, n);
  if (trivial_threshold(p, e, n, C)) return;  // uniform per warp; lanes write the same
  const uint32_t* col = p.keys_t + static_cast<long long>(e) * p.T;
  uint32_t v;
  int tstar;
  warp_threshold<KPL>(col, n, C, lane, v, tstar);
  if (lane == 0) {
    p.thr_key[e] = v;
    p.thr_tok[e] = tstar;
  }
}

// Kernel 2a' (512 < T <= 8192; v16, v20, v24-v26): the warp select's bisection with W warps
// per expert (one block of W warps: 4 warps of 8 keys a lane up to T = 1024, 6 of 8 up to
// 1536, 4 of 16 up to 2048, then 32 keys a lane with W = 4 up to 4096, else 8). Warp w
// holds tokens w * 32 KPL + lane + 32 i in registers, so token order is (warp, i, lane).
// Each round, every warp counts its keys >= the candidate with carries and one redux.sync,
// writes the count into a double-buffered slot, and after one __syncthreads every warp sums
// the W counts and takes the same decision (a warp only writes a round's slot again two
// rounds later, behind the next round's barrier, which every warp reaches only after
// reading). The rounds end early as in the warp select (v19), with one more barrier for the
// block's keys next to the candidate. Ties as in the warp select: the `need`-th lowest
// token among the keys equal to the threshold, found by the one warp whose share of those
// keys holds it. Thresholds: the same integers as every other select (the C-th largest
// (key, -token) pair).
constexpr int kBlockSelectMaxT = 8192;  // W = 8 warps of 32 keys a lane (v20; W = 16 at 16384 lost in v16 and v20)

template <int KPL, int W>
__global__ void __launch_bounds__(W * 32) block_select_kernel(Params p) {
  __shared__ int scnt[2][W];
  __shared__ uint32_t slo[W], shi[W];
  __shared__ int sgt[W], seq[W];
  allow_dependents();
  wait_for_predecessor();  // before any exit: our completion must imply keys_kernel's
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int e = blockIdx.x;
  const int n = read_n(p);
  const int C = capacity(p, n);
  if (trivial_threshold(p, e, n, C)) return;  // uniform per block
  const uint32_t* col = p.keys_t + static_cast<long long>(e) * p.T;
  const int first = warp * 32 * KPL;  // this warp's tokens: first + lane + 32 i
  uint32_t key[KPL];
  uint32_t lo, hi;
  load_column_keys<KPL>(col, first, n, lane, key, lo, hi);
  warp_min_max(lo, hi);
  if (lane == 0) {
    slo[warp] = lo;
    shi[warp] = hi;
  }
  __syncthreads();
#pragma unroll
  for (int w = 0; w < W; ++w) {
    lo = min(lo, slo[w]);
    hi = max(hi, shi[w]);
  }
  const int bits = bits_below_prefix(lo, hi);
  uint32_t v = lo & prefix_mask(bits);  // the bits all keys share
  for (int b = bits - 1; b >= 0; --b) {
    const uint32_t cand = v | (1u << b);
    const int c = warp_add(static_cast<int>(count_ge<KPL>(key, cand)));
    if (lane == 0) scnt[b & 1][warp] = c;
    __syncthreads();
    int total = 0;
#pragma unroll
    for (int w = 0; w < W; ++w) total += scnt[b & 1][w];
    if (total >= C) v = cand;
    if (total == C || total == C - 1) {  // v19, as in warp_threshold; uniform per block
      // slo and shi were last read before this round's barrier
      uint32_t above, below;
      keys_around<KPL>(key, cand, above, below);
      warp_min_max(above, below);
      if (lane == 0) {
        slo[warp] = above;
        shi[warp] = below;
      }
      __syncthreads();
      above = 0xffffffffu;
      below = 0u;
#pragma unroll
      for (int w = 0; w < W; ++w) {
        above = min(above, slo[w]);
        below = max(below, shi[w]);
      }
      v = total == C ? above : below;
      break;
    }
  }
  int greater = 0, eq = 0;
#pragma unroll
  for (int i = 0; i < KPL; ++i) {
    const bool valid = first + lane + 32 * i < n;
    greater += valid && key[i] > v;
    eq += valid && key[i] == v;
  }
  greater = warp_add(greater);
  eq = warp_add(eq);
  if (lane == 0) {
    sgt[warp] = greater;
    seq[warp] = eq;
  }
  __syncthreads();
  int need = C;  // >= 1 keys equal to v still to take, lowest token first
#pragma unroll
  for (int w = 0; w < W; ++w) need -= sgt[w] + (w < warp ? seq[w] : 0);
  if (need < 1 || need > eq) return;  // uniform per warp: exactly one warp goes on
  const int at = nth_equal<KPL>(key, v, n - first, need, lane);
  if (lane == 0) {
    p.thr_key[e] = v;
    p.thr_tok[e] = first + at;
  }
}

// ---------------------------------------------------------------------------
// Kernel 2b (large T): one block per expert, radix select on the column's keys.
// The column comes from keys_t (contiguous) or, where that workspace would be too
// large, is gathered from the logits. It is held in shared memory when it fits
// (n <= smem_keys), else re-read in every pass (a correct, slower path).
// Passes: digits of 12, 12 and 8 bits from the top; the first is counted while the
// column loads; after it, few keys still match the prefix.

constexpr int kSelectThreads = 512;      // per block where E > the SM count (2 blocks an SM)
constexpr int kSelectThreadsMax = 1024;  // where E <= the SM count: one expert's block has the SM
constexpr int kRadixBits = 12;
constexpr int kSelectBatch = 16;  // keys per thread loaded from global memory before the first is used
constexpr int kPassBatch = 4;     // the same for the passes' shared-memory reads

__device__ __forceinline__ int block_exclusive_scan(int v, int* swarp, int& total) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
  int x = v;
#pragma unroll
  for (int d = 1; d < 32; d <<= 1) {
    int y = __shfl_up_sync(kFull, x, d);
    if (lane >= d) x += y;
  }
  if (lane == 31) swarp[warp] = x;
  __syncthreads();
  if (warp == 0) {
    int w = lane < nw ? swarp[lane] : 0;
#pragma unroll
    for (int d = 1; d < 32; d <<= 1) {
      int y = __shfl_up_sync(kFull, w, d);
      if (lane >= d) w += y;
    }
    if (lane < nw) swarp[lane] = w;  // inclusive prefix of warp totals
  }
  __syncthreads();
  total = swarp[nw - 1];
  const int before_warp = warp > 0 ? swarp[warp - 1] : 0;
  const int r = before_warp + x - v;
  __syncthreads();  // swarp may be reused by the caller
  return r;
}

template <int DT>
__global__ void __launch_bounds__(kSelectThreadsMax) select_radix_kernel(Params p, int smem_keys) {
  extern __shared__ uint32_t col[];
  __shared__ unsigned hist[1 << kRadixBits];
  __shared__ int swarp[32];
  __shared__ unsigned s_bin, s_rem;
  __shared__ int s_tok, s_all_equal_taken;
  allow_dependents();
  const int e = blockIdx.x;
  const int tid = threadIdx.x;
  const int bd = blockDim.x;
  for (int i = tid; i < (1 << kRadixBits); i += bd) hist[i] = 0u;  // the first pass's bins
  if (tid == 0) s_all_equal_taken = 0;
  __syncthreads();
  wait_for_predecessor();  // before any exit: our completion must imply keys_kernel's
  const int n = read_n(p);
  const int C = capacity(p, n);
  if (trivial_threshold(p, e, n, C)) return;  // uniform per block
  const float b = bias_at(p, e);
  const bool cached = n <= smem_keys;
  const uint32_t* gcol = p.keys_t ? p.keys_t + static_cast<long long>(e) * p.T : nullptr;

  auto gather_key = [&](int t) -> uint32_t {
    const float x = load_val<DT>(p.logits, static_cast<long long>(t) * p.E + e);
    float s;
    if (p.sigmoid) {
      s = sigmoid_score(x);
    } else {
      const float2 st = p.stats[t];
      s = softmax_score(x, st.x, st.y);
    }
    return okey(s + b);
  };
  auto key_at = [&](int t) -> uint32_t {
    return cached ? col[t] : (gcol ? __ldg(gcol + t) : gather_key(t));
  };

  // v29: the first pass takes the top kRadixBits bits and counts them while the column
  // loads (clock64, E = 60, T = 16384, H200: the load ~6,500 cycles, waiting on the L2, and
  // a separate first pass after it ~4,100). Session 6 skipped the bits common to the
  // column's min and max first, which needs every key before any counting: it saved
  // passes only for columns of few distinct keys.
  if (gcol != nullptr && cached) {
    // v12: kSelectBatch loads per thread in flight, with no branch between them. The
    // loop before chose the key's source per element, and ptxas waited for each load
    // inside its branch: 32 dependent DRAM round trips per thread at T = 16384.
    for (int base = 0; base < n; base += kSelectBatch * bd) {  // uniform trip count
      uint32_t u[kSelectBatch];
#pragma unroll
      for (int j = 0; j < kSelectBatch; ++j) {
        const int t = base + j * bd + tid;
        u[j] = __ldg(gcol + (t < n ? t : 0));
      }
#pragma unroll
      for (int j = 0; j < kSelectBatch; ++j) {
        const int t = base + j * bd + tid;
        if (t < n) {
          col[t] = u[j];
          atomicAdd(&hist[u[j] >> (32 - kRadixBits)], 1u);
        }
      }
    }
  } else {
    for (int t = tid; t < n; t += bd) {
      const uint32_t u = gcol ? __ldg(gcol + t) : gather_key(t);
      if (cached) col[t] = u;
      atomicAdd(&hist[u >> (32 - kRadixBits)], 1u);
    }
  }
  __syncthreads();  // col and the first pass's counts
  int shift = 32 - kRadixBits;  // the digit's lowest bit
  unsigned nbins = 1u << kRadixBits;
  uint32_t mask = 0u, prefix = 0u;
  unsigned remaining = static_cast<unsigned>(C);  // rank (1-based) still to find
  for (;;) {
    // thread `tid` owns bins [tid * per, tid * per + per); larger bins = larger keys
    const unsigned per = (nbins + bd - 1) / bd;
    const unsigned first = tid * per;
    unsigned local = 0u;
    for (unsigned j = 0; j < per; ++j)
      if (first + j < nbins) local += hist[first + j];
    int total;
    const int below = block_exclusive_scan(static_cast<int>(local), swarp, total);
    const unsigned above = static_cast<unsigned>(total - below) - local;  // keys in higher bins
    if (local > 0u && above < remaining && remaining <= above + local) {
      unsigned acc = above;
      for (int j = static_cast<int>(per) - 1; j >= 0; --j) {
        if (first + j >= nbins) continue;
        const unsigned h = hist[first + j];
        if (acc + h >= remaining) {
          s_bin = first + j;
          s_rem = remaining - acc;
          s_all_equal_taken = (shift == 0 && h == remaining - acc) ? 1 : 0;
          break;
        }
        acc += h;
      }
    }
    __syncthreads();
    prefix |= s_bin << shift;
    mask |= (nbins - 1u) << shift;
    remaining = s_rem;
    if (shift == 0) break;
    const int width = shift < kRadixBits ? shift : kRadixBits;  // the next pass: 12, then 8 bits
    shift -= width;
    nbins = 1u << width;
    for (unsigned i = tid; i < nbins; i += bd) hist[i] = 0u;
    __syncthreads();
    if (cached) {  // shared-memory reads issued kPassBatch at a time, no branch between
      for (int base = 0; base < n; base += kPassBatch * bd) {
        uint32_t u[kPassBatch];
#pragma unroll
        for (int j = 0; j < kPassBatch; ++j) {
          const int t = base + j * bd + tid;
          u[j] = col[t < n ? t : 0];
        }
#pragma unroll
        for (int j = 0; j < kPassBatch; ++j) {
          if (base + j * bd + tid < n && (u[j] & mask) == prefix) atomicAdd(&hist[(u[j] >> shift) & (nbins - 1u)], 1u);
        }
      }
    } else {
      for (int t = tid; t < n; t += bd) {
        const uint32_t u = key_at(t);
        if ((u & mask) == prefix) atomicAdd(&hist[(u >> shift) & (nbins - 1u)], 1u);
      }
    }
    __syncthreads();
  }
  // The threshold key is `prefix`; among the keys equal to it, take the `remaining`
  // lowest token indices. When that is all of them, no scan is needed.
  if (s_all_equal_taken) {
    if (tid == 0) {
      p.thr_key[e] = prefix;
      p.thr_tok[e] = n;
    }
    return;
  }
  const int chunk = (n + bd - 1) / bd;
  const int lo_t = min(n, tid * chunk), hi_t = min(n, lo_t + chunk);
  int cnt = 0;
  for (int t = lo_t; t < hi_t; ++t) cnt += (key_at(t) == prefix);
  int total;
  const int before = block_exclusive_scan(cnt, swarp, total);
  if (static_cast<unsigned>(before) < remaining && remaining <= static_cast<unsigned>(before + cnt)) {
    int need = static_cast<int>(remaining) - before;
    for (int t = lo_t; t < hi_t; ++t) {
      if (key_at(t) == prefix && --need == 0) {
        s_tok = t;
        break;
      }
    }
  }
  __syncthreads();
  if (tid == 0) {
    p.thr_key[e] = prefix;
    p.thr_tok[e] = s_tok;
  }
}

// ---------------------------------------------------------------------------
// Kernel 2c (large T, sm_90+, transposed keys): the radix select of kernel 2b with each
// expert's column split over a thread-block cluster of B blocks (B = 2, 4 or 8, chosen
// on the host: E * B about 2-4x the SM count, >= 1024 tokens per block). Block r of
// expert e's cluster owns tokens [r S, r S + S) (S = ceil(T / B), cut at n), so token
// order is block order, then index; its slice stays in its shared memory.
// The column's min and max (for the common-prefix skip) are reduced over the cluster
// through distributed shared memory (DSMEM). Each pass of 8-bit digits: a local
// histogram (256 bins, one per thread), cluster.sync(), then every block sums the B
// histograms bin by bin (DSMEM reads) and takes the same bin decision as kernel 2b.
// The histograms are double-buffered: a block resets buffer b two passes after it
// used it, behind the next pass's cluster.sync(), which no block passes before every
// block has read buffer b; so one cluster barrier per pass. The first pass's keys
// crowd into few bins (softmax scores share their exponent bits): its increments are
// warp-aggregated with __match_any_sync; later passes see few keys and plain atomics.
// Ties (keys equal to the threshold): the last pass's local bin is this block's count
// of them; an exclusive prefix over lower block ranks (DSMEM) names the one block that
// holds the `remaining`-th tie, and that block writes thr_key[e] and thr_tok[e].
// Results are exact integers (integer atomics, integer sums), bit-identical to 2b.

constexpr int kSplitThreads = 256;
constexpr int kSplitBits = 8;  // 256 bins: one per thread
constexpr int kSplitMaxB = 8;  // portable cluster sizes only
constexpr int kSplitSmemKeysMax = 32768;  // 128 KiB slice per block

__global__ void __launch_bounds__(kSplitThreads) select_split_kernel(Params p, int B, int S) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  namespace cg = cooperative_groups;
  extern __shared__ uint32_t col[];  // [S]: this block's slice of the column
  __shared__ unsigned hist[2][1 << kSplitBits];
  __shared__ int swarp[32];
  __shared__ unsigned s_lo, s_hi, s_glo, s_ghi;
  __shared__ unsigned s_bin, s_rem;
  __shared__ int s_all_equal_taken, s_before;
  cg::cluster_group cluster = cg::this_cluster();
  allow_dependents();
  wait_for_predecessor();  // before any exit: our completion must imply keys_kernel's
  const int r = static_cast<int>(cluster.block_rank());
  const int e = blockIdx.x / B;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int n = read_n(p);
  const int C = capacity(p, n);
  if (C == 0 || C >= n) {  // uniform per cluster: every block leaves before any barrier
    if (r == 0) trivial_threshold(p, e, n, C);
    return;
  }
  auto slice_lo = [&](int q) { return min(n, q * S); };
  const int t_lo = slice_lo(r), len = slice_lo(r + 1) - t_lo;
  const uint32_t* gcol = p.keys_t + static_cast<long long>(e) * p.T + t_lo;
  uint32_t lo = 0xffffffffu, hi = 0u;
#pragma unroll 4
  for (int i = tid; i < len; i += kSplitThreads) {
    const uint32_t u = __ldg(gcol + i);
    col[i] = u;
    lo = min(lo, u);
    hi = max(hi, u);
  }
  lo = __reduce_min_sync(kFull, lo);
  hi = __reduce_max_sync(kFull, hi);
  if (lane == 0) {
    swarp[warp] = static_cast<int>(lo);
    swarp[16 + warp] = static_cast<int>(hi);
  }
  __syncthreads();
  if (warp == 0) {
    constexpr int nw = kSplitThreads / 32;
    lo = lane < nw ? static_cast<unsigned>(swarp[lane]) : 0xffffffffu;
    hi = lane < nw ? static_cast<unsigned>(swarp[16 + lane]) : 0u;
    lo = __reduce_min_sync(kFull, lo);
    hi = __reduce_max_sync(kFull, hi);
    if (lane == 0) {
      s_lo = lo;
      s_hi = hi;
    }
  }
  cluster.sync();  // every block started, its slice and (s_lo, s_hi) written
  if (warp == 0) {
    lo = lane < B ? *cluster.map_shared_rank(&s_lo, lane) : 0xffffffffu;
    hi = lane < B ? *cluster.map_shared_rank(&s_hi, lane) : 0u;
    lo = __reduce_min_sync(kFull, lo);
    hi = __reduce_max_sync(kFull, hi);
    if (lane == 0) {
      s_glo = lo;
      s_ghi = hi;
      s_all_equal_taken = 0;
    }
  }
  __syncthreads();
  int bits_left = bits_below_prefix(s_glo, s_ghi);
  uint32_t mask = prefix_mask(bits_left);
  uint32_t prefix = s_glo & mask;
  unsigned remaining = static_cast<unsigned>(C);  // rank (1-based) still to find
  const bool any_pass = bits_left > 0;
  int buf = 0;
  bool first = true;
  while (bits_left > 0) {
    const int width = bits_left < kSplitBits ? bits_left : kSplitBits;
    const int shift = bits_left - width;
    const unsigned nbins = 1u << width;
    unsigned* h = hist[buf];
    h[tid] = 0u;
    __syncthreads();
    if (first) {  // every key matches the prefix; few distinct bins per warp
      for (int base = 0; base < len; base += kSplitThreads) {  // uniform trip count
        const int i = base + tid;
        const unsigned bin = i < len ? (col[i] >> shift) & (nbins - 1u) : 0xffffffffu;
        const unsigned peers = __match_any_sync(kFull, bin);
        if (i < len && (__ffs(peers) - 1) == lane) atomicAdd(&h[bin], static_cast<unsigned>(__popc(peers)));
      }
    } else {
      for (int i = tid; i < len; i += kSplitThreads) {
        const uint32_t u = col[i];
        if ((u & mask) == prefix) atomicAdd(&h[(u >> shift) & (nbins - 1u)], 1u);
      }
    }
    cluster.sync();  // every block's histogram of this pass is complete
    unsigned g = 0u;
    if (static_cast<unsigned>(tid) < nbins) {
#pragma unroll
      for (int q = 0; q < kSplitMaxB; ++q)
        if (q < B) g += cluster.map_shared_rank(h, q)[tid];
    }
    int total;
    const int below = block_exclusive_scan(static_cast<int>(g), swarp, total);
    const unsigned above = static_cast<unsigned>(total - below) - g;  // keys in higher bins
    if (g > 0u && above < remaining && remaining <= above + g) {
      s_bin = static_cast<unsigned>(tid);
      s_rem = remaining - above;
      s_all_equal_taken = (shift == 0 && g == remaining - above) ? 1 : 0;
    }
    __syncthreads();
    prefix |= s_bin << shift;
    mask |= (nbins - 1u) << shift;
    remaining = s_rem;
    bits_left = shift;
    buf ^= 1;
    first = false;
  }
  // The threshold key is `prefix`; among the keys equal to it, the `remaining` lowest
  // token indices are taken. This block's count of them: the last pass's local bin
  // (its low bits are the key's last bits), or the whole slice when no pass ran.
  const unsigned* hl = hist[buf ^ 1];
  const unsigned bin = any_pass ? s_bin : 0u;
  if (!s_all_equal_taken && warp == 0) {
    unsigned c = 0u;
    if (lane < r) {
      c = any_pass ? cluster.map_shared_rank(hl, lane)[bin]
                   : static_cast<unsigned>(slice_lo(lane + 1) - slice_lo(lane));
    }
    c = __reduce_add_sync(kFull, c);
    if (lane == 0) s_before = static_cast<int>(c);
  }
  __syncthreads();
  cluster.barrier_arrive();  // this block's last read of another block's shared memory is done
  const unsigned mine = any_pass ? hl[bin] : static_cast<unsigned>(len);
  if (s_all_equal_taken) {
    if (r == 0 && tid == 0) {
      p.thr_key[e] = prefix;
      p.thr_tok[e] = n;
    }
  } else {
    const unsigned before = static_cast<unsigned>(s_before);
    if (before < remaining && remaining <= before + mine) {  // uniform per block: the tie is here
      // warp w scans the contiguous run [w W, w W + W) of the slice, W a multiple of 32
      constexpr int nw = kSplitThreads / 32;
      const int W = ((len + nw - 1) / nw + 31) & ~31;
      const int w_lo = min(len, warp * W), w_hi = min(len, w_lo + W);
      int cnt = 0;
      for (int base = w_lo; base < w_hi; base += 32) {
        const int i = base + lane;
        cnt += __popc(__ballot_sync(kFull, i < w_hi && col[i] == prefix));
      }
      if (lane == 0) swarp[warp] = cnt;
      __syncthreads();
      int need = static_cast<int>(remaining - before);
      for (int w = 0; w < warp; ++w) need -= swarp[w];
      if (need >= 1 && need <= cnt) {  // uniform per warp: exactly one warp
        const unsigned lt_mask = (1u << lane) - 1u;
        for (int base = w_lo; base < w_hi; base += 32) {
          const int i = base + lane;
          const bool eq = i < w_hi && col[i] == prefix;
          const unsigned bal = __ballot_sync(kFull, eq);
          const int c = __popc(bal);
          if (need <= c) {
            const unsigned who = __ballot_sync(kFull, eq && __popc(bal & lt_mask) == need - 1);
            if (lane == 0) {
              p.thr_key[e] = prefix;
              p.thr_tok[e] = t_lo + base + __ffs(who) - 1;
            }
            break;
          }
          need -= c;
        }
      }
    }
  }
  cluster.barrier_wait();  // no block leaves while another may still read its shared memory
#endif
}

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
// is_chosen(e, key) says whether expert e chose token t.
template <int VPL, int CAND, typename ChosenFn>
__device__ __forceinline__ void route_token(const Params& p, int t, int lane, const float (&sc_row)[VPL],
                                            WarpScratchT<CAND>& ws, ChosenFn is_chosen) {
  const int k = p.k;
  const long long out_base = static_cast<long long>(t) * k;
  unsigned long long rank[VPL];
  float score[VPL];
  // No branch around a load here: the expert index is clamped into [0, E) and the
  // result masked after. v10c: with `if (e < E)` around the bias and threshold reads,
  // ptxas waited for each element's loads inside its branch, VPL dependent round trips
  // per row (seen in the SASS of the token kernel and of kernel C).
  float b[VPL];
  bias_row<VPL>(p, lane, b);
#pragma unroll
  for (int i = 0; i < VPL; ++i) {
    const int e = lane + 32 * i;
    const int ec = e < p.E ? e : p.E - 1;
    const uint32_t key = okey(sc_row[i] + b[i]);
    const bool chosen = is_chosen(ec, key);
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
    const uint32_t tk = p.thr_key[ec];
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
  const uint32_t tk = p.thr_key[e];
  const int tt = p.thr_tok[e];
  const bool chosen = mine && ((key > tk) | ((key == tk) & (t <= tt)));
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

template <int DT, int VPL>
__global__ void __launch_bounds__(kTokenWarps * 32) token_route_kernel(Params p) {
  __shared__ WarpScratch scratch[kTokenWarps];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int t = blockIdx.x * kTokenWarps + warp;
  if (t >= p.T) return;  // never a whole block: the others wait below
  const int n = read_n(p);
  // the logits are the caller's: load them before waiting for the select kernel, and
  // (v22) their scores too, computed as keys_kernel computes them (scores_in_place: the
  // same bits), so that after the wait only the thresholds are read. Not where the screen
  // runs (it skips most exact scores, using the keys kernel's statistics), nor above
  // T = 4096, where most rows start after the select anyway and the row's max and sum
  // cost more than reading them (E = 60 T = 16384 +0.7 µs, H200).
  const bool screened = p.screen && !p.fill_topk && !p.sigmoid;
  const bool early = !screened && p.T <= kEarlyScoresMaxT;
  float x[VPL];
  if (t < n) {  // uniform per warp
    load_row<DT, VPL>(p.logits, t, p.E, lane, x);
    if (early) {
      float m, s;
      scores_in_place<VPL>(x, p.E, lane, p.sigmoid, m, s);
    }
  }
  wait_for_predecessor();  // before any exit: our completion must imply the select's
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
  }
  route_token<VPL, 32>(p, t, lane, x, scratch[warp], [&](int e, uint32_t key) {
    const uint32_t tk = p.thr_key[e];
    const int tt = p.thr_tok[e];
    return (key > tk) | ((key == tk) & (t <= tt));  // both read, no branch
  });
}

// ---------------------------------------------------------------------------
// Kernel C (T <= 256, E <= 512, few compares, sm_90+): one launch of one thread-block
// cluster of nb = 16 blocks of 16 warps (8 blocks, T <= 128, where 16 cannot run). Block
// b owns rows [b R, b R + R), R = ceil(T / nb) <= 16 (one row per warp), and experts
// b + nb j.
// Phase 1: the warp's row's scores (kept in registers until phase 3); each key is stored
// with st.async into the block that owns its expert (column e / nb, row t), whose
// mbarrier counts the bytes (v11c).
// Phase 2: each block finds its experts' thresholds on its own columns by ranks (v11);
// the thresholds go to every block with st.async, counted by a second mbarrier. Only
// where that takes few compares per thread (SGL_ECPATCH_KERNEL_RANK_MAX): above, the
// three launches are faster (v11h: a warp-per-expert bisection on the pushed columns
// lost to them at T = 128-256 once their select took redux.sync).
// Phase 3: the warp's row's slots, thresholds read locally.
// No block reads another's shared memory, so no cluster barrier is needed after the one
// at the start (every block started, its mbarriers initialised) and a block may exit as
// soon as its rows are written.
// v7-v10 exchanged the keys by remote reads between two cluster.sync() (MEMBAR.ALL.GPU in
// the SASS); v7a gave each warp up to 4 rows (R rounded up to 32, T <= 1024): the rows'
// latency chains ran in series and it was 1.1-2.6x slower than three launches.

constexpr int kClusterWarps = 16;
constexpr int kClusterMaxT = 256;
constexpr int kRankPairs = 8;      // rank form: (expert, token) pairs per thread, at most

__host__ __device__ inline int cluster_rows(int T, int nb) { return (T + nb - 1) / nb; }

// Words of shared memory before the keys: the thresholds, E pairs (thr_key, thr_tok),
// rounded up to 4 words (uint4 reads of the keys).
__host__ __device__ inline int cluster_keys_offset(int E) { return (2 * E + 3) / 4 * 4; }

// The thresholds, then the columns of the block's experts, [ceil(E / nb)][npad].
inline size_t cluster_smem(int E, int nb, int npad) {
  return (cluster_keys_offset(E) + static_cast<size_t>((E + nb - 1) / nb) * npad) * 4;
}

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
// Distributed shared memory without cluster barriers (v11c): an mbarrier in each block
// counts the bytes that other blocks' st.async stores deliver into its shared memory, so
// a block waits for exactly its own data. cluster.sync() compiles to MEMBAR.ALL.GPU plus
// the barrier (sm_90 SASS), ~800-2,700 cycles each in session 4's clock64 trace.
__device__ __forceinline__ uint32_t smem_u32(const void* ptr) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(ptr));
}
__device__ __forceinline__ uint32_t remote_u32(uint32_t local, int block) {  // same offset in `block`
  uint32_t r;
  asm volatile("mapa.shared::cluster.u32 %0, %1, %2;" : "=r"(r) : "r"(local), "r"(block));
  return r;
}
__device__ __forceinline__ void mbar_init(uint32_t bar) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;" ::"r"(bar) : "memory");
}
__device__ __forceinline__ void mbar_expect(uint32_t bar, uint32_t bytes) {  // the one arrival
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(bar), "r"(bytes) : "memory");
}
// Waits for phase 0 of `bar`. A wait that never ends would hang the server: after ~2^24
// polls (seconds) it traps instead, which fails the launch loudly.
__device__ __forceinline__ void mbar_wait0(uint32_t bar) {
  uint32_t done = 0;
  for (int i = 0; i < (1 << 24) && !done; ++i) {
    asm volatile(
        "{\n .reg .pred p;\n mbarrier.try_wait.parity.shared::cta.b64 p, [%1], 0;\n selp.u32 %0, 1, 0, p;\n}"
        : "=r"(done)
        : "r"(bar)
        : "memory");
  }
  if (!done) __trap();
}
__device__ __forceinline__ void st_async_u32(uint32_t raddr, uint32_t v, uint32_t rbar) {
  asm volatile("st.async.shared::cluster.mbarrier::complete_tx::bytes.u32 [%0], %1, [%2];" ::"r"(raddr), "r"(v),
               "r"(rbar)
               : "memory");
}
__device__ __forceinline__ void st_async_v2(uint32_t raddr, uint32_t a, uint32_t b, uint32_t rbar) {
  asm volatile("st.async.shared::cluster.mbarrier::complete_tx::bytes.v2.u32 [%0], {%1, %2}, [%3];" ::"r"(raddr),
               "r"(a), "r"(b), "r"(rbar)
               : "memory");
}

// Phase 2 of kernel C (v11; 0 < C < n): block b finds the thresholds of experts b + nb j
// (j < epb). Phase 1 stored their columns into its shared memory (scol, [epb][npad],
// zero from n on). The thread of pair (expert, token t)
// counts the tokens that beat t in the column: a larger key, or an equal key at a lower
// index. That count is t's rank; the token of rank C - 1 is the threshold, written into
// every block's shared memory (one 8-byte st.async per block, by nb lanes of its warp,
// counted by that block's mbarrier `bar`).
// Per group of 32 tokens (uniform per warp, as npad is a multiple of 32) the compare is
// one carry: groups before t's own count keys >= kt (kj + ~(kt - 1) carries; for kt = 0,
// a NaN key, every earlier token beats t: 32 per group), later groups keys > kt, and
// t's own group kj + 1 > kt for the lanes below (okey is at most 0xff800000: no
// overflow). Exact integers: the same thresholds as the bisection. Cost: epb * npad * n
// compares over the block's 512 threads, against ~30 dependent rounds of compares and a
// warp reduction for the bisection (~9,000-10,000 cycles, clock64 trace, session 4).
__device__ __forceinline__ void cluster_rank_thresholds(const uint32_t* scol, int E, int n, int C, int brank,
                                                        int nb, int npad, uint32_t sthr, uint32_t bar) {
  constexpr int kThreads = kClusterWarps * 32;
  const int total = (E - brank + nb - 1) / nb * npad;  // this block's pairs
  const int lane = threadIdx.x & 31;
  const int nch = (n + 31) >> 5;
#pragma unroll
  for (int i = 0; i < kRankPairs; ++i) {
    const int q = threadIdx.x + kThreads * i;
    if (q >= total) break;  // uniform per warp (total is a multiple of 32)
    const int j = q / npad, t = q - j * npad;
    const int ct = t >> 5;
    if (ct >= nch) continue;  // a group past n: uniform per warp
    const uint32_t* col = scol + j * npad;
    const uint32_t kt = col[t], ngt = ~kt, nge = ~(kt - 1u);
    unsigned c0 = kt == 0u ? 32u * ct : 0u, c1 = 0, c2 = 0, c3 = 0;  // four chains of dependent adds
    for (int c = 0; c < nch; ++c) {
      if (c == ct) continue;  // uniform per warp
      const uint4* src = reinterpret_cast<const uint4*>(col + 32 * c);
      const uint32_t nk = c < ct ? nge : ngt;
#pragma unroll
      for (int l = 0; l < 8; ++l) {
        const uint4 w = src[l];
        c0 = count_gt(c0, w.x, nk);
        c1 = count_gt(c1, w.y, nk);
        c2 = count_gt(c2, w.z, nk);
        c3 = count_gt(c3, w.w, nk);
      }
    }
    const uint4* own = reinterpret_cast<const uint4*>(col + 32 * ct);
#pragma unroll
    for (int l = 0; l < 8; ++l) {
      const uint4 w = own[l];
      c0 = count_gt(c0, w.x + (4 * l < lane), ngt);
      c1 = count_gt(c1, w.y + (4 * l + 1 < lane), ngt);
      c2 = count_gt(c2, w.z + (4 * l + 2 < lane), ngt);
      c3 = count_gt(c3, w.w + (4 * l + 3 < lane), ngt);
    }
    const int cnt = static_cast<int>(c0 + c1 + c2 + c3);
    const unsigned win = __ballot_sync(kFull, t < n && cnt == C - 1);  // at most one lane
    if (win) {  // uniform per warp
      const int src_lane = __ffs(win) - 1;
      const uint32_t key = __shfl_sync(kFull, kt, src_lane);
      if (lane < nb) {
        const uint32_t off = sthr + 8u * static_cast<uint32_t>(brank + nb * j);
        st_async_v2(remote_u32(off, lane), key, static_cast<uint32_t>((t & ~31) + src_lane), remote_u32(bar, lane));
      }
    }
  }
}
#endif

template <int DT, int VPL>
__global__ void __launch_bounds__(kClusterWarps * 32, 1) cluster_route_kernel(Params p, int R, int nb, int npad) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  extern __shared__ uint32_t csm[];
  __shared__ WarpScratch scratch[kClusterWarps];
  __shared__ uint64_t mbar[2];  // keys received, thresholds received
  const int rank = static_cast<int>(cooperative_groups::this_cluster().block_rank());
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int E = p.E;
  uint2* sthr = reinterpret_cast<uint2*>(csm);     // [E] (thr_key, thr_tok)
  uint32_t* scol = csm + cluster_keys_offset(E);  // this block's experts' columns, [epb][npad]
  const int epb = (E - rank + nb - 1) / nb;       // its experts: rank + nb j, j < epb
  const int t = rank * R + warp;                  // this warp's row
  const bool row_in = warp < R && t < p.T;
  // phase 1: the row's scores (registers) and keys. The row's loads go out first, from a
  // clamped row and without a branch, so that n and C overlap them.
  float x[VPL];
  load_row<DT, VPL>(p.logits, row_in ? t : 0, E, lane, x);
  const int n = read_n(p);
  const int C = capacity(p, n);
  const bool row_valid = row_in && t < n;
  const bool select = C > 0 && C < n;
  const uint32_t bar_keys = smem_u32(&mbar[0]), bar_thr = smem_u32(&mbar[1]);
  if (threadIdx.x == 0) {
    mbar_init(bar_keys);
    mbar_init(bar_thr);
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
  }
  if (select) {  // the columns' tails past n stay zero: no block stores there
    const int total = epb * npad;
    for (int q = threadIdx.x; q < total; q += kClusterWarps * 32)
      if (q % npad >= n) scol[q] = 0u;
  }
  // other blocks store into this one: it must have started, its barriers initialised
  asm volatile("barrier.cluster.arrive.relaxed.aligned;" ::: "memory");
  uint32_t key[VPL];
  if (row_valid) {
    float m, s;
    scores_in_place<VPL>(x, E, lane, p.sigmoid, m, s);
    float b[VPL];
    bias_row<VPL>(p, lane, b);  // 0 past E
#pragma unroll
    for (int i = 0; i < VPL; ++i) key[i] = okey(x[i] + b[i]);
  }
  asm volatile("barrier.cluster.wait.aligned;" ::: "memory");
  if (!select) {  // trivial capacities: each block writes its own copy
    for (int e = threadIdx.x; e < E; e += kClusterWarps * 32)
      sthr[e] = C == 0 ? make_uint2(0xffffffffu, 0xffffffffu) : make_uint2(0u, static_cast<uint32_t>(n));
    __syncthreads();
  } else {
    // each key to the block that owns its expert (e mod nb), column e / nb, row t
    if (threadIdx.x == 0) mbar_expect(bar_keys, static_cast<uint32_t>(epb * n * 4));
    if (row_valid) {
      const int shift = __ffs(nb) - 1;  // nb is 8 or 16
      const uint32_t base = smem_u32(scol);
#pragma unroll
      for (int i = 0; i < VPL; ++i) {
        const int e = lane + 32 * i;
        const int blk = e & (nb - 1);
        if (e < E)
          st_async_u32(remote_u32(base + 4u * static_cast<uint32_t>((e >> shift) * npad + t), blk), key[i],
                       remote_u32(bar_keys, blk));
      }
    }
    if (threadIdx.x == 0) mbar_expect(bar_thr, static_cast<uint32_t>(E * 8));
    mbar_wait0(bar_keys);
    __syncthreads();  // the zeroed tails, written by other threads of this block
    // phase 2: per expert, the C-th largest (key, -token) of its column, into every block
    cluster_rank_thresholds(scol, E, n, C, rank, nb, npad, smem_u32(sthr), bar_thr);
    mbar_wait0(bar_thr);
  }
  // phase 3: the slots of this warp's row
  if (warp < R && t < p.T) {
    if (t >= n) {
      write_padding_row(p, t, lane);
    } else {
      route_token<VPL, 32>(p, t, lane, x, scratch[warp], [&](int e, uint32_t key) {
        const uint2 th = sthr[e];  // both words in one read, no branch
        return (key > th.x) | ((key == th.x) & (t <= static_cast<int>(th.y)));
      });
    }
  }
#endif
}

// ---------------------------------------------------------------------------
// Kernel 0 (T <= 32, E <= 512 and T * E <= 16384, decode sizes): one block, one launch.
// Warp per row: keys and scores into shared memory; thread per expert: its C best
// tokens as a bit mask (C rounds of a max over at most 32 keys); warp per row again:
// the slots, from the row's scores in shared memory (v9b: the row is no longer loaded
// and scored twice; v9a kept only the scores and computed the keys in the C rounds:
// 1-2.5 µs slower at E <= 128, T = 16, measured).

constexpr int kFusedThreads = 512;
// At T = 64 the one block measured 22-38 µs against 13-17 µs for three launches
// (v6 on H200): one SM does every row twice. Masks stay 64-bit (room to tune).
constexpr int kFusedMaxT = 32;
constexpr int kFusedMaxElems = 16384;  // 64 KiB of keys + 64 KiB of scores

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
                     [&](int e, uint32_t) { return ((chosen_mask[e] >> t) & 1ull) != 0ull; });
  }
}

// ---------------------------------------------------------------------------
// Kernel R (decode sizes; v10): one block per row, one thread per expert. T = 1 is a
// plain launch of one block (any card); 2 <= T <= 16 one thread-block cluster of T
// blocks (sm_90+, E > 64 or T >= 12: measured faster than the one block there).
// Profiled on the H200 (ncu, v9d): in the one-block kernel a single warp did a row's
// whole chain, about 3,300 dependent instructions at E = 512 (1,700 of them the k
// rounds of a warp-wide max), so T = 1 cost 11 µs against 7 for SGLang's router.
// Here the row is spread over ceil(E / 32) warps:
//   scores: block max (warp max, then the warps' maxima), exp per thread, the sum in
//     the order of scores_in_place (lane l adds elements l, l + 32, ... in order, then a
//     xor butterfly; done by warp 0 from shared memory), exp / sum per thread: the same
//     bits as every other path;
//   expert choice (T > 1, 0 < C < n): each valid row's block stores its keys into every
//     other valid row's block (st.async, counted there by an mbarrier; v11d), and thread
//     e of block t counts, in its own shared memory, the tokens that beat t in column e:
//     chosen iff fewer than C do. No block reads another's shared memory, so one cluster
//     barrier at the start (every block started, its mbarrier initialised) is the only one;
//   slots: each warp orders its own experts' 44-bit ranks (as route_token's) and keeps
//     its best k as candidates; each candidate's slot is the number of candidates of
//     all warps that rank above it (reads that every lane makes at one address).
// v10b (measured, dropped) had no cluster: every block scored all n rows itself. It was
// slower at every size, T = 1 included (E = 60: 7.8-8.1 µs against 5.5), for reasons
// not pinned down (its per-row loops and a shared-memory atomic max per row and warp).

constexpr int kRowMaxT = 16;        // the largest cluster of H100/H200 (non-portable above 8)
constexpr int kRowClusterMinE = 65;  // T > 1 takes kernel R from this many experts,
constexpr int kRowClusterMinT = 12;  // and from this T with fewer (H200, v11d: T = 12-16 with
                                     // E = 8 / 32 / 64 0.3-0.4 µs faster than the one block,
                                     // T <= 8 0.1-0.4 µs slower)

template <int DT>
__global__ void __launch_bounds__(kMaxExperts) row_block_kernel(Params p) {
  __shared__ float sred[32];
  __shared__ float sex[kMaxExperts];
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  extern __shared__ uint32_t rkeys[];  // T > 1: the cluster's rows' keys, [T][blockDim.x] (v11d)
  __shared__ uint64_t rbar;            // counts the bytes of the other rows' keys
#endif
  __shared__ __align__(16) unsigned long long srank[kMaxExperts];
  __shared__ __align__(16) unsigned long long cand_v[kMaxExperts + 2];  // warp w's r-th best at w k + r; 0: none
  __shared__ float cand_w[kMaxExperts];
  __shared__ float slot_w[kMaxTopK];
  __shared__ int slot_id[kMaxTopK];
  __shared__ float ssum;
  const int e = threadIdx.x, lane = e & 31, warp = e >> 5, nw = blockDim.x >> 5;
  const int E = p.E, k = p.k;
  const int t = blockIdx.x;  // this block's row
  const bool in = e < E;
  // the row's load goes out before n and C are computed (t < T: always a row)
  const float x = in ? load_val<DT>(p.logits, static_cast<long long>(t) * E + e) : 0.0f;
  const int n = read_n(p);
  const int C = capacity(p, n);
  const bool valid = t < n;  // uniform per block
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  const bool select = gridDim.x > 1 && C > 0 && C < n;  // uniform over the cluster
  if (select) {  // other blocks store into this one: it must have started, rbar initialised
    if (e == 0) {
      mbar_init(smem_u32(&rbar));
      asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
    }
    asm volatile("barrier.cluster.arrive.relaxed.aligned;" ::: "memory");
  }
#endif
  float score = 0.0f;
  uint32_t key = 0u;
  if (valid) {
    if (p.sigmoid) {
      score = in ? sigmoid_score(x) : 0.0f;
    } else {
      float m = in ? fmaxf(-INFINITY, x) : -INFINITY;
#pragma unroll
      for (int d = 16; d > 0; d >>= 1) m = fmaxf(m, __shfl_xor_sync(kFull, m, d));
      if (lane == 0) sred[warp] = m;
      __syncthreads();
      m = -INFINITY;
#pragma unroll
      for (int w = 0; w < kMaxExperts / 32; ++w)  // fixed trip count: the loads are issued together
        if (w < nw) m = fmaxf(m, sred[w]);
      const float ex = in ? expf(x - m) : 0.0f;
      sex[e] = ex;
      __syncthreads();
      if (warp == 0) {
        float s = 0.0f;
#pragma unroll
        for (int i = 0; i < kMaxExperts / 32; ++i) {
          const int j = lane + 32 * i;
          if (j < E) s += sex[j];
        }
#pragma unroll
        for (int d = 16; d > 0; d >>= 1) s += __shfl_xor_sync(kFull, s, d);
        if (lane == 0) ssum = s;
      }
      __syncthreads();
      score = in ? ex / ssum : 0.0f;
    }
    key = in ? okey(score + bias_at(p, e)) : 0u;
  }
  bool chosen = valid && in && C > 0;  // C >= n: every valid token is chosen
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  if (select) {
    // v11d: every valid row's keys go to every other valid row's block (st.async, counted
    // by its mbarrier); each block then counts locally. v10 read them remotely after a
    // cluster.sync(), each read in its own branch: T - 1 dependent DSMEM round trips.
    asm volatile("barrier.cluster.wait.aligned;" ::: "memory");
    if (valid) {
      const uint32_t bar = smem_u32(&rbar);
      if (e == 0) mbar_expect(bar, static_cast<uint32_t>((n - 1) * E * 4));
      if (in) {
        const uint32_t off = smem_u32(rkeys + t * blockDim.x + e);
#pragma unroll
        for (int u = 0; u < kRowMaxT; ++u)
          if (u < n && u != t) st_async_u32(remote_u32(off, u), key, remote_u32(bar, u));
      }
      mbar_wait0(bar);
      if (in) {
        int beat = 0;
#pragma unroll
        for (int u = 0; u < kRowMaxT; ++u) {  // clamped rows, every read issued together
          const uint32_t ku = rkeys[(u < n ? u : 0) * blockDim.x + e];
          beat += (u < n && u != t) & ((ku > key) | ((ku == key) & (u < t)));
        }
        chosen = beat < C;
      }
    }
  }
#endif
  if (valid) {
    // ranks: bit 43 chosen | bits 11..42 key | bits 0..10 1024 - e; 0: not a slot
    const unsigned long long v =
        (in && (chosen || p.fill_topk))
            ? (static_cast<unsigned long long>(chosen) << 43) | (static_cast<unsigned long long>(key) << 11) |
                  static_cast<unsigned long long>(kMaxExperts - e)
            : 0ull;
    srank[e] = v;
    __syncwarp();
    int pos = 0;  // place among the warp's own experts (broadcast reads, two per load)
    const ulonglong2* wr = reinterpret_cast<const ulonglong2*>(srank + warp * 32);
#pragma unroll
    for (int j = 0; j < 16; ++j) {
      const ulonglong2 q = wr[j];
      pos += (q.x > v) + (q.y > v);
    }
    const int cnt = __popc(__ballot_sync(kFull, v != 0ull));
    if (lane < k && lane >= cnt) cand_v[warp * k + lane] = 0ull;
    if (v != 0ull && pos < k) {
      cand_v[warp * k + pos] = v;
      cand_w[warp * k + pos] = score;
    }
    if (e == 0) cand_v[nw * k] = 0ull;  // pads the list to an even length
    if (warp == 0 && lane < k) {        // vacant unless a candidate takes the slot
      slot_w[lane] = 0.0f;
      slot_id[lane] = -1;
    }
    __syncthreads();
    // each candidate's slot: how many candidates of all warps rank above it (every
    // lane reads the same address: a broadcast; two candidates per load)
    const int M = nw * k;
    if (e < M) {
      const unsigned long long c = cand_v[e];
      if (c != 0ull) {
        const ulonglong2* pairs = reinterpret_cast<const ulonglong2*>(cand_v);
        int g = 0;
#pragma unroll 8
        for (int i = 0; i < (M + 1) / 2; ++i) {
          const ulonglong2 q = pairs[i];
          g += (q.x > c) + (q.y > c);
        }
        if (g < k) {
          float wt = cand_w[e];
          if (wt != wt) wt = 0.0f;  // a NaN score weighs 0
          slot_w[g] = wt;
          slot_id[g] = kMaxExperts - static_cast<int>(c & 2047ull);
        }
      }
    }
    __syncthreads();
    if (warp == 0) {
      float sum = 0.0f;  // slot order, float32; vacant slots add +0.0, which changes no bit
#pragma unroll
      for (int j = 0; j < kMaxTopK; ++j)
        if (j < k) sum += slot_w[j];
      float my_w = lane < k ? slot_w[lane] : 0.0f;
      const int my_id = lane < k ? slot_id[lane] : -1;
      if (p.renorm && sum > 0.0f) my_w = my_w / sum;
      const long long out_base = static_cast<long long>(t) * k;
      if (lane < k) {
        p.out_id[out_base + lane] = my_id;
        p.out_w[out_base + lane] = my_w;
      }
    }
  } else if (warp == 0) {
    write_padding_row(p, t, lane);
  }
}

// ---------------------------------------------------------------------------
// host side

constexpr int kSmemKeysMax = 16384;                  // 64 KiB of keys per select block
constexpr long long kTransposeMaxElems = 1LL << 24;  // keys_t workspace up to 64 MiB

constexpr int kWarpSelectMaxT = 1024;                // the warp select, and from T = 513 4 warps of 8 keys a lane

inline bool use_fused(int T, int E, int fused_max) {
  // E > 256 from T = 25: the three launches (H200, after v10c: T = 32 18.4 µs against
  // 20.1 for the one block)
  return T <= kFusedMaxT && E <= 512 && T * E <= fused_max && T * E <= kFusedMaxElems && !(E > 256 && T > 24);
}

inline bool use_transpose(int T, int E, int fused_max) {
  return !use_fused(T, E, fused_max) && static_cast<long long>(T) * E <= kTransposeMaxElems;
}

inline int vpl_of(int E) {
  const int v = (E + 31) / 32;
  return v <= 2 ? 2 : v <= 4 ? 4 : v <= 8 ? 8 : v <= 16 ? 16 : 32;
}

// Launch with programmatic stream serialization (PDL) where `pdl`: the kernel may
// start before its predecessor ends and waits in wait_for_predecessor().
template <typename... KArgs, typename... Args>
cudaError_t launch(void (*kernel)(KArgs...), int grid, int block, size_t smem, cudaStream_t stream, bool pdl,
                   Args... args) {
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = dim3(grid);
  cfg.blockDim = dim3(block);
  cfg.dynamicSmemBytes = smem;
  cfg.stream = stream;
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr[0].val.programmaticStreamSerializationAllowed = 1;
  cfg.attrs = attr;
  cfg.numAttrs = pdl ? 1 : 0;
  return cudaLaunchKernelEx(&cfg, kernel, args...);
}

template <typename... KArgs>
cudaError_t allow_smem(void (*kernel)(KArgs...), size_t smem) {
  if (smem == 0) return cudaSuccess;  // static + dynamic may pass 48 KiB: always raise the limit
  return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
}

// A kernel's static shared memory in bytes (0 where the query fails).
template <typename... KArgs>
int static_smem(void (*kernel)(KArgs...)) {
  cudaFuncAttributes fa;
  if (cudaFuncGetAttributes(&fa, kernel) != cudaSuccess) {
    cudaGetLastError();
    return 0;
  }
  return static_cast<int>(fa.sharedSizeBytes);
}

// The shared memory a block may have on `device`: its opt-in maximum (227 KiB on sm_90,
// 163 on sm_80, 99 on sm_86/89, 64 on sm_75), or `limit` where that is positive and lower
// (the SGL_ECPATCH_KERNEL_SMEM_LIMIT knob: the tests reproduce smaller cards with it).
inline int smem_budget(int device, int limit) {
  int optin = 0;
  if (cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device) != cudaSuccess) {
    cudaGetLastError();
    optin = 48 * 1024;  // every CUDA card since Kepler
  }
  return limit > 0 && limit < optin ? limit : optin;
}

// Kernel C where its ranks take at most p.rank_max compares per thread (the block's
// pairs times T, over 512 threads) and the pairs fit kRankPairs per thread.
inline bool cluster_fits(const Params& p, int nb, int npad) {
  const long long pairs = static_cast<long long>((p.E + nb - 1) / nb) * npad;
  return pairs <= kRankPairs * kClusterWarps * 32 &&
         pairs * p.T <= static_cast<long long>(p.rank_max) * kClusterWarps * 32;
}

// The launch configuration of `grid` blocks in clusters of `cluster` (1: no cluster
// attribute). attr[0] is the cluster size; attr[1] is left for the PDL attribute, which
// a caller adds by raising cfg.numAttrs (attr must outlive the launch).
inline void cluster_config(cudaLaunchConfig_t& cfg, cudaLaunchAttribute (&attr)[2], int grid, int block, size_t smem,
                           int cluster, cudaStream_t stream) {
  cfg = {};
  cfg.gridDim = dim3(grid);
  cfg.blockDim = dim3(block);
  cfg.dynamicSmemBytes = smem;
  cfg.stream = stream;
  attr[0].id = cudaLaunchAttributeClusterDimension;
  attr[0].val.clusterDim.x = cluster;
  attr[0].val.clusterDim.y = 1;
  attr[0].val.clusterDim.z = 1;
  attr[1].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr[1].val.programmaticStreamSerializationAllowed = 1;
  cfg.attrs = attr;
  cfg.numAttrs = cluster > 1 ? 1 : 0;
}

// Whether at least one cluster of this configuration fits the device (the error of a
// failed query is cleared).
template <typename Kernel>
inline bool cluster_runs(Kernel kernel, const cudaLaunchConfig_t& cfg) {
  int clusters = 0;
  if (cudaOccupancyMaxActiveClusters(&clusters, kernel, &cfg) == cudaSuccess && clusters >= 1) return true;
  cudaGetLastError();
  return false;
}

// One-cluster launch (kernel C) of NB blocks. Whether such a cluster with this much shared
// memory can run at all is asked once per kernel, cluster size and shared-memory size
// (cached per process; the answer is the same for every card of one model). Returns
// false, with nothing launched, where it cannot or should not run.
template <int DT, int VPL, int NB>
bool launch_cluster_nb(const Params& p, cudaStream_t stream, cudaError_t& err) {
  void (*kernel)(Params, int, int, int) = cluster_route_kernel<DT, VPL>;
  static size_t ok_upto = 0, bad_from = ~static_cast<size_t>(0);
  const int R = cluster_rows(p.T, NB);
  const int npad = (p.T + 31) / 32 * 32;
  const size_t smem = cluster_smem(p.E, NB, npad);
  if (R > kClusterWarps || !cluster_fits(p, NB, npad)) return false;
  if (smem >= bad_from || smem + sizeof(WarpScratch) * kClusterWarps > 227 * 1024) return false;
  if (cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)) !=
          cudaSuccess ||
      (NB > 8 && cudaFuncSetAttribute(kernel, cudaFuncAttributeNonPortableClusterSizeAllowed, 1) != cudaSuccess)) {
    cudaGetLastError();
    bad_from = smem;
    return false;
  }
  cudaLaunchConfig_t cfg;
  cudaLaunchAttribute attr[2];
  cluster_config(cfg, attr, NB, kClusterWarps * 32, smem, NB, stream);
  if (smem > ok_upto) {
    if (!cluster_runs(kernel, cfg)) {
      bad_from = smem;
      return false;
    }
    ok_upto = smem;
  }
  err = cudaLaunchKernelEx(&cfg, kernel, p, R, NB, npad);
  return true;
}

template <int DT, int VPL>
bool launch_cluster(const Params& p, cudaStream_t stream, cudaError_t& err) {
  err = cudaSuccess;
  return launch_cluster_nb<DT, VPL, 16>(p, stream, err) || launch_cluster_nb<DT, VPL, 8>(p, stream, err);
}

// Blocks per expert of the radix select (kernel 2c), 1 for kernel 2b. Only where the knob
// forces it (2, 4 or 8; raised until the slice fits kSplitSmemKeysMax). The automatic
// choice (v8: E <= 66, T / B >= 1024) lost its last points in session 5: one block per
// expert won from T = 4096 once its loads were batched (v12), and the W-warp select won
// below (v16: E = 60 T = 2048 14.4 vs 15.4 µs; at T = 3000 the split read 30.9, H200).
inline int split_blocks(const Params& p) {
  if (p.keys_t == nullptr || p.select_split < 2) return 1;
  int B = p.select_split >= 8 ? 8 : p.select_split >= 4 ? 4 : 2;
  while (B < kSplitMaxB && (p.T + B - 1) / B > kSplitSmemKeysMax) B *= 2;
  return (p.T + B - 1) / B > kSplitSmemKeysMax ? 1 : B;
}

// Kernel 2c as clusters of B blocks per expert, with PDL where `pdl`. Whether such a
// cluster with this much shared memory can run is asked once per B and shared-memory
// size (cached per process). Returns false, with nothing launched, where it cannot.
inline bool launch_select_split(const Params& p, int B, cudaStream_t stream, bool pdl, cudaError_t& err) {
  static size_t ok_upto[kSplitMaxB + 1] = {}, bad_from[kSplitMaxB + 1] = {};
  static size_t attr_set = 0;  // only ever raised: a captured graph's larger launch stays valid
  if (B < 2 || B > kSplitMaxB) return false;
  const int S = (p.T + B - 1) / B;
  const size_t smem = static_cast<size_t>(S) * sizeof(uint32_t);
  if (bad_from[B] != 0 && smem >= bad_from[B]) return false;
  if (smem > attr_set) {
    if (cudaFuncSetAttribute(select_split_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                             static_cast<int>(smem)) != cudaSuccess) {
      cudaGetLastError();
      bad_from[B] = smem;
      return false;
    }
    attr_set = smem;
  }
  cudaLaunchConfig_t cfg;
  cudaLaunchAttribute attr[2];
  cluster_config(cfg, attr, p.E * B, kSplitThreads, smem, B, stream);
  if (smem > ok_upto[B]) {
    if (!cluster_runs(select_split_kernel, cfg)) {
      bad_from[B] = smem;
      return false;
    }
    ok_upto[B] = smem;
  }
  cfg.numAttrs = pdl ? 2 : 1;
  err = cudaLaunchKernelEx(&cfg, select_split_kernel, p, B, S);
  return true;
}

// The second launch: each expert's threshold (thr_key, thr_tok) from the transposed keys,
// or gathered from the logits where keys_t is null; with PDL where `pdl`.
template <int DT>
cudaError_t launch_select(const Params& p, cudaStream_t stream, bool pdl) {
  cudaError_t err;
  // warp-per-expert select up to T = 1024 (v12, with carries for its compares and 4 warps
  // a block: E = 60-256 T = 512-1024 2-6 µs faster than select_radix; before v12 it won
  // only at E >= 512 there)
  if (p.keys_t != nullptr && p.T <= kWarpSelectMaxT) {
    const int grid = (p.E + kWarpSelectWarps - 1) / kWarpSelectWarps;
    // v24: 512 < T <= 1024 as 4 warps of 8 keys a lane (0.5-0.9 µs faster than one warp of
    // 32 once v19 had cut the rounds; at T <= 512 the warp select stays ahead)
    if (p.T <= 256) return launch(warp_select_kernel<8>, grid, kWarpSelectWarps * 32, 0, stream, pdl, p);
    if (p.T <= 512) return launch(warp_select_kernel<16>, grid, kWarpSelectWarps * 32, 0, stream, pdl, p);
    return launch(block_select_kernel<8, 4>, p.E, 128, 0, stream, pdl, p);
  }
  const int split = split_blocks(p);
  // v16: W warps per expert up to T = 4096; v20 (with v19's early end): W = 8 to T = 8192,
  // unless the knob forces a split (tests)
  if (p.keys_t != nullptr && p.T <= kBlockSelectMaxT && split == 1) {
    // v25: 1024 < T <= 2048 as 4 warps of 16 keys a lane (-0.7 to -1.0 µs at E <= 128
    // against 2 warps of 32; fewer keys a lane lost at T = 4096-8192 and past 8192); v26:
    // 6 warps of 8 up to T = 1536 (4 warps of 16 left two of them empty there: -0.4 to -0.9)
    if (p.T <= 1536) return launch(block_select_kernel<8, 6>, p.E, 192, 0, stream, pdl, p);
    if (p.T <= 2048) return launch(block_select_kernel<16, 4>, p.E, 128, 0, stream, pdl, p);
    if (p.T <= 4096) return launch(block_select_kernel<32, 4>, p.E, 128, 0, stream, pdl, p);
    return launch(block_select_kernel<32, 8>, p.E, 256, 0, stream, pdl, p);
  }
  if (split > 1 && launch_select_split(p, split, stream, pdl, err)) return err;
  // the column is cached where it fits beside the histogram (session 6: 64 KiB of keys
  // did not fit sm_75's 64 KiB a block; the keys past the cache are re-read every pass)
  static const int radix_static = static_smem(select_radix_kernel<DT>);
  const int cache_cap = max(0, (p.smem_limit - radix_static) / static_cast<int>(sizeof(uint32_t)));
  const int smem_keys = min(min(p.T, kSmemKeysMax), cache_cap);
  const size_t smem = static_cast<size_t>(smem_keys) * sizeof(uint32_t);
  if ((err = cudaFuncSetAttribute(select_radix_kernel<DT>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                  static_cast<int>(smem))) != cudaSuccess)
    return err;
  const int sel_threads = p.E <= p.num_sms ? kSelectThreadsMax : kSelectThreads;
  return launch(select_radix_kernel<DT>, p.E, sel_threads, smem, stream, pdl, p, smem_keys);
}

template <int DT, int VPL>
cudaError_t launch_vpl(Params p, cudaStream_t stream, bool pdl) {
  cudaError_t err;
  if constexpr (VPL <= 16) {  // E <= 512: the row's registers fit 512 threads
    const bool fused_ok = use_fused(p.T, p.E, p.fused_max);
    const bool cluster_ok = p.T <= p.cluster_max_t && p.T <= kClusterMaxT;
    // the one cluster before the one block from T = 17 (session 4: T = 24 E = 8 / 60 / 128
    // 8.0 / 8.3 / 9.1 µs against 10.0 / 8.5 / 10.0)
    if (fused_ok && cluster_ok && p.T > 16 && launch_cluster<DT, VPL>(p, stream, err)) return err;
    if (fused_ok) {
      const size_t smem = 2 * static_cast<size_t>(p.T) * p.E * sizeof(uint32_t);  // keys + scores
      if ((err = allow_smem(fused_small_kernel<DT, VPL>, smem)) != cudaSuccess) return err;
      return launch(fused_small_kernel<DT, VPL>, 1, kFusedThreads, smem, stream, false, p);
    }
    if (cluster_ok && launch_cluster<DT, VPL>(p, stream, err)) return err;
  }
  if (p.sigmoid) p.stats = nullptr;
  if (!use_transpose(p.T, p.E, p.fused_max)) p.keys_t = nullptr;  // the select kernel gathers its column
  if (p.keys_t != nullptr || !p.sigmoid) {           // keys and/or statistics
    bool launched = false;  // one of the keys kernel's variants
    if constexpr (VPL <= 2) {
      if (p.T >= p.keys_half_min_t) {
        const size_t tile = p.keys_t ? static_cast<size_t>(p.E) * (kKeysHalfRows + 1) * sizeof(uint32_t) : 0;
        if ((err = allow_smem(keys_half_kernel<DT, VPL>, tile)) != cudaSuccess) return err;
        err = launch(keys_half_kernel<DT, VPL>, (p.T + kKeysHalfRows - 1) / kKeysHalfRows, kKeysRows * 32, tile,
                     stream, false, p);
        launched = true;
      }
    }
    if constexpr (VPL == 16) {  // v30: 256 < E <= 512 only (it lost at E = 128-256 and above T = 2048)
      if (!launched && p.T <= p.keys_wide_max_t) {
        const size_t tile = p.keys_t ? static_cast<size_t>(p.E) * (kKeysRows + 1) * sizeof(uint32_t) : 0;
        if ((err = allow_smem(keys_wide_kernel<DT, VPL>, tile)) != cudaSuccess) return err;
        err = launch(keys_wide_kernel<DT, VPL>, (p.T + kKeysRows - 1) / kKeysRows, 2 * kKeysRows * 32, tile, stream,
                     false, p);
        launched = true;
      }
    }
    if (!launched) {
      const size_t tile = p.keys_t ? static_cast<size_t>(p.E) * (kKeysRows + 1) * sizeof(uint32_t) : 0;
      if ((err = allow_smem(keys_kernel<DT, VPL>, tile)) != cudaSuccess) return err;
      err = launch(keys_kernel<DT, VPL>, (p.T + kKeysRows - 1) / kKeysRows, kKeysRows * 32, tile, stream, false, p);
    }
    if (err != cudaSuccess) return err;
  }
  if ((err = launch_select<DT>(p, stream, pdl)) != cudaSuccess) return err;
  return launch(token_route_kernel<DT, VPL>, (p.T + kTokenWarps - 1) / kTokenWarps, kTokenWarps * 32, 0, stream, pdl,
                p);
}

// Block-per-row launch (kernel R): one block for T = 1, else one cluster of T blocks
// (sm_90+, E >= kRowClusterMinE or T >= kRowClusterMinT; the host sets row_max_t to 1
// below sm_90). Whether a cluster of T blocks of this size can run is asked once per
// (T, warps) and cached per process. Returns false, with nothing launched, where it cannot.
template <int DT>
bool launch_row(const Params& p, cudaStream_t stream, cudaError_t& err) {
  if (p.T > p.row_max_t || p.T > kRowMaxT || (p.T > 1 && p.T < kRowClusterMinT && p.E < kRowClusterMinE))
    return false;
  void (*kernel)(Params) = row_block_kernel<DT>;
  const int warps = (p.E + 31) / 32;
  const size_t smem = p.T > 1 ? static_cast<size_t>(p.T) * warps * 32 * sizeof(uint32_t) : 0;  // the rows' keys
  cudaLaunchConfig_t cfg;
  cudaLaunchAttribute attr[2];
  cluster_config(cfg, attr, p.T, warps * 32, smem, p.T, stream);
  if (p.T > 1) {
    static signed char state[kRowMaxT + 1][kMaxExperts / 32 + 1] = {};  // 0 unknown, 1 runs, -1 cannot
    signed char& st = state[p.T][warps];
    if (st == 0) {
      const bool attrs_ok =
          (p.T <= 8 || cudaFuncSetAttribute(kernel, cudaFuncAttributeNonPortableClusterSizeAllowed, 1) == cudaSuccess) &&
          cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                               kRowMaxT * kMaxExperts * static_cast<int>(sizeof(uint32_t))) == cudaSuccess;
      if (!attrs_ok) cudaGetLastError();
      st = attrs_ok && cluster_runs(kernel, cfg) ? 1 : -1;
    }
    if (st < 0) return false;
  }
  err = cudaLaunchKernelEx(&cfg, kernel, p);
  return true;
}

template <int DT>
cudaError_t launch_all(const Params& p, cudaStream_t stream, bool pdl) {
  cudaError_t err = cudaSuccess;
  if (launch_row<DT>(p, stream, err)) return err;
  switch (vpl_of(p.E)) {
    case 2: return launch_vpl<DT, 2>(p, stream, pdl);
    case 4: return launch_vpl<DT, 4>(p, stream, pdl);
    case 8: return launch_vpl<DT, 8>(p, stream, pdl);
    case 16: return launch_vpl<DT, 16>(p, stream, pdl);
    default: return launch_vpl<DT, 32>(p, stream, pdl);
  }
}

}  // namespace ec

extern "C" {

// Version of this C interface; the Python side checks it after loading.
int ec_abi_version() { return 11; }

// The largest T * E the one-block kernel (fused_small, keys and scores in shared memory)
// takes on `device` with `smem_limit` (0: the device's maximum): the Python side lowers
// fused_max to it (session 6: T * E = 16384 needs 152 KiB, over sm_86/89's 99 KiB).
int ec_fused_max_elems(int device, int smem_limit) {
  const int fixed = ec::static_smem(ec::fused_small_kernel<ec::kDtF32, 16>);  // the same for every instance
  return max(0, (ec::smem_budget(device, smem_limit) - fixed) / static_cast<int>(2 * sizeof(uint32_t)));
}

// Bytes of device workspace for T tokens and E experts: row statistics [T], the
// thresholds [E] twice, and outside the one-launch path (up to 2^24 elements) the
// transposed keys.
long long ec_workspace_bytes(int T, int E, int fused_max) {
  long long bytes = static_cast<long long>(T) * 8 + static_cast<long long>(E) * 8 + 256;
  if (ec::use_transpose(T, E, fused_max)) bytes += static_cast<long long>(T) * E * 4;
  return bytes;
}

const char* ec_error_string(int code) {
  if (code == -1) return "unsupported shape: E must be in [1, 1024] and k in [1, min(E, 32)]";
  if (code == -2) return "unsupported dtype";
  if (code == -3) return "could not select the CUDA device";
  return cudaGetErrorString(static_cast<cudaError_t>(code));
}

// Routes `T` rows of `logits` ([T, E], contiguous; dtype 0 = float32, 1 = bfloat16,
// 2 = float16). `n_ptr` (device int32/int64 scalar, may be null: then n_host) is the
// number of valid rows. `workspace` holds ec_workspace_bytes(T, E) bytes. Writes
// out_w [T, k] float32 and out_id [T, k] int32. `pdl_enabled` lets the second and third
// kernels start early (programmatic dependent launch, sm_90+); `fused_max` is the
// largest T * E routed by the one-launch kernel; `cluster_max_t` the largest T routed
// by the one-cluster kernel (sm_90+, T <= 256; 0 turns it off);
// `select_split` the blocks per expert of the large-T select (sm_90+: -1, 0 or 1 is one
// block, 2/4/8 forces a cluster of that many); `row_max_t` the largest T routed
// by one block per row (T = 1: one block; up to 16 on sm_90+ with E > 64 or from T = 12:
// one cluster of T blocks; 0 turns it off); `rank_max` the most compares per thread of the
// one-cluster kernel's ranks (above, and at 0, it is not used); `smem_limit` the shared
// memory a block may have (0: the device's opt-in maximum); `keys_half_min_t` the smallest
// T at which the keys kernel takes two rows a warp, one per half-warp, where E <= 64;
// `keys_wide_max_t` the largest T at which it takes two warps a row where 256 < E <= 512.
// Returns 0 or an error code
// (see ec_error_string).
int ec_route(const void* logits, int dtype, int T, int E, int k, const void* bias, int bias_dtype,
             const void* n_ptr, int n_is_64, long long n_host, long long cf_num, long long cf_den,
             int sigmoid, int fill_topk, int renorm, void* workspace, float* out_w, int* out_id,
             int device, void* stream, int pdl_enabled, int fused_max, int cluster_max_t,
             int select_split, int row_max_t, int rank_max, int smem_limit, int keys_half_min_t,
             int keys_wide_max_t) {
  if (E < 1 || E > ec::kMaxExperts || k < 1 || k > E || k > ec::kMaxTopK) return -1;
  if (T <= 0) return 0;
  int prev = -1;
  if (cudaGetDevice(&prev) != cudaSuccess) return -3;
  if (prev != device && cudaSetDevice(device) != cudaSuccess) return -3;
  ec::Params p;
  p.logits = logits;
  p.dtype = dtype;
  p.T = T;
  p.E = E;
  p.k = k;
  p.bias = bias;
  p.bias_dtype = bias_dtype;
  p.n_ptr = n_ptr;
  p.n_is_64 = n_is_64;
  p.n_host = n_host;
  p.cf_num = cf_num;
  p.cf_den = cf_den;
  p.sigmoid = sigmoid;
  p.fill_topk = fill_topk;
  p.renorm = renorm;
  p.fused_max = fused_max;
  p.cluster_max_t = cluster_max_t;
  p.select_split = select_split;
  p.row_max_t = row_max_t;
  p.rank_max = rank_max;
  p.keys_half_min_t = keys_half_min_t;
  p.keys_wide_max_t = keys_wide_max_t;
  p.num_sms = 0;
  p.smem_limit = ec::smem_budget(device, smem_limit);
  p.screen = 0;
  char* ws = static_cast<char*>(workspace);
  const long long off_thr = static_cast<long long>(T) * 8;
  const long long off_keys = (off_thr + static_cast<long long>(E) * 8 + 255) / 256 * 256;
  p.stats = reinterpret_cast<float2*>(ws);
  p.thr_key = reinterpret_cast<uint32_t*>(ws + off_thr);
  p.thr_tok = reinterpret_cast<int*>(ws + off_thr + static_cast<long long>(E) * 4);
  p.keys_t = ec::use_transpose(T, E, fused_max) ? reinterpret_cast<uint32_t*>(ws + off_keys) : nullptr;
  p.out_w = out_w;
  p.out_id = out_id;
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  int major = 0;
  cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device);
  // PDL on sm_90+ at every size. v5-v14 turned it off at T = 4096 with E <= 256, and v15 at
  // 1024 < T < 4096 with 128 <= E < 512, each where it then measured a loss; after v15/v16
  // (one block per expert with batched loads, the W-warp select) it measured no loss
  // anywhere (session 5, calls 7 and 12, H200: e.g. E = 60 T = 16384 32.3 -> 30.0 µs,
  // E = 128 T = 2048 16.6 -> 15.4).
  const bool pdl = major >= 9 && pdl_enabled;
  if (major < 9) {  // thread-block clusters: sm_90+
    p.cluster_max_t = 0;
    p.select_split = 0;
    if (p.row_max_t > 1) p.row_max_t = 1;  // T = 1 needs no cluster
  }
  cudaDeviceGetAttribute(&p.num_sms, cudaDevAttrMultiProcessorCount, device);
  // v13: the screen saved 3-5 µs at E = 256-512, T = 16384 and cost 0.4-1.1 µs at T <= 1024
  // and with E <= 64 (H200): it runs where T * E >= 2^21 with E >= 128
  p.screen = E >= 128 && static_cast<long long>(T) * E >= (1LL << 21);
  cudaError_t err;
  if (dtype == ec::kDtF32) err = ec::launch_all<ec::kDtF32>(p, s, pdl);
  else if (dtype == ec::kDtBf16) err = ec::launch_all<ec::kDtBf16>(p, s, pdl);
  else if (dtype == ec::kDtF16) err = ec::launch_all<ec::kDtF16>(p, s, pdl);
  else err = static_cast<cudaError_t>(-2);
  if (prev != device) cudaSetDevice(prev);
  return static_cast<int>(err);
}

}  // extern "C"
