// Expert-choice routing: the select kernels, the second of the three launches: each
// expert's threshold (thr_key, thr_tok) from its column of keys (see expert_choice.cu for
// the overview).

#include "ec_common.cuh"

namespace ec {

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
    write_threshold(p, e, v, tstar);
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
    write_threshold(p, e, v, first + at);
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
      write_threshold(p, e, prefix, n);
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
    write_threshold(p, e, prefix, s_tok);
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
// holds the `remaining`-th tie, and that block writes the threshold of e.
// Results are exact integers (integer atomics, integer sums), bit-identical to 2b.

constexpr int kSplitThreads = 256;
constexpr int kSplitBits = 8;  // 256 bins: one per thread
constexpr int kSplitMaxB = 8;  // portable cluster sizes only
constexpr int kSplitSmemKeysMax = 32768;  // 128 KiB slice per block

// (kSplitThreads, 1): with no minimum of blocks, ptxas held this kernel to 32 registers and
// spilled one word once v36 wrote each threshold twice (38 registers with the minimum).
__global__ void __launch_bounds__(kSplitThreads, 1) select_split_kernel(Params p, int B, int S) {
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
      write_threshold(p, e, prefix, n);
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
              write_threshold(p, e, prefix, t_lo + base + __ffs(who) - 1);
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

constexpr int kSmemKeysMax = 16384;                  // 64 KiB of keys per select block
constexpr int kWarpSelectMaxT = 1024;                // the warp select, and from T = 513 4 warps of 8 keys a lane

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

#define EC_INST(DT) template cudaError_t launch_select<DT>(const Params&, cudaStream_t, bool);
EC_FOR_DT(EC_INST)
#undef EC_INST

}  // namespace ec
