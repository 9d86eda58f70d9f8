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
//   * per token, one warp ranks (chosen, okey, -e) as a 44-bit integer and takes
//     the k best in k rounds of a warp-wide max.
// Launches (all on the caller's stream, no host sync, n read on the device):
//   small T (<= 64):  select_small (stats + per-expert threshold) -> token_route
//   large T:          row_stats -> select_radix (one block per expert) -> token_route
// Every reduction has a fixed order and histograms use integer atomics only, so the
// output bits do not depend on scheduling.

#include <cuda_runtime.h>
#include <cuda_fp16.h>
#include <stdint.h>

namespace ec {

constexpr int kDtF32 = 0, kDtBf16 = 1, kDtF16 = 2;
constexpr int kMaxExperts = 1024;  // 10 bits of expert index in the token rank
constexpr int kMaxTopK = 32;       // one slot per lane
constexpr int kSmallT = 64;        // select_small handles up to 2 tokens per lane
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

// Row max and sum of exp(x - max) by one warp: each lane walks e = lane + 32 i in
// order, then a xor butterfly (bitwise the same result in every lane). Every kernel
// that needs row statistics calls this function, so all of them see the same bits.
template <int DT>
__device__ __forceinline__ void row_stats_warp(const void* logits, long long row, int E, int lane,
                                               float& m_out, float& s_out) {
  const long long base = row * E;
  float m = -INFINITY;
  for (int e = lane; e < E; e += 32) m = fmaxf(m, load_val<DT>(logits, base + e));
#pragma unroll
  for (int d = 16; d > 0; d >>= 1) m = fmaxf(m, __shfl_xor_sync(kFull, m, d));
  // A NaN anywhere in the row makes the row's scores NaN, as in torch.
  float s = 0.0f;
  for (int e = lane; e < E; e += 32) s += expf(load_val<DT>(logits, base + e) - m);
#pragma unroll
  for (int d = 16; d > 0; d >>= 1) s += __shfl_xor_sync(kFull, s, d);
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
  float2* stats;       // [T] (m, s), large-T softmax only
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
__device__ __forceinline__ int capacity(const Params& p, int n) {
  if (n == 0) return 0;
  long long a = static_cast<long long>(n) * p.k * p.cf_num;
  long long b = static_cast<long long>(p.E) * p.cf_den;
  long long c = (a + b - 1) / b;
  return c < n ? static_cast<int>(c) : n;
}

__device__ __forceinline__ float bias_at(const Params& p, int e) {
  return p.bias ? load_any(p.bias, p.bias_dtype, e) : 0.0f;
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

// ---------------------------------------------------------------------------
// Kernel 1 (large T, softmax): row statistics, one warp per row.

template <int DT>
__global__ void row_stats_kernel(Params p) {
  const int lane = threadIdx.x & 31;
  const int t = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
  const int n = read_n(p);
  if (t >= n) return;
  float m, s;
  row_stats_warp<DT>(p.logits, t, p.E, lane, m, s);
  if (lane == 0) p.stats[t] = make_float2(m, s);
}

// ---------------------------------------------------------------------------
// Kernel 2a (T <= 64): one warp per expert, rank by shuffles. The block first
// computes the row statistics of the (at most 64) valid rows into shared memory.

template <int DT>
__global__ void select_small_kernel(Params p) {
  __shared__ float2 sstats[kSmallT];
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int nwarps = blockDim.x >> 5;
  const int n = read_n(p);
  const int C = capacity(p, n);
  const bool need_stats = !p.sigmoid && C > 0 && C < n;
  if (need_stats) {
    for (int t = warp; t < n; t += nwarps) {
      float m, s;
      row_stats_warp<DT>(p.logits, t, p.E, lane, m, s);
      if (lane == 0) sstats[t] = make_float2(m, s);
    }
  }
  __syncthreads();
  const int e = blockIdx.x * nwarps + warp;
  if (e >= p.E) return;
  if (trivial_threshold(p, e, n, C)) return;  // uniform per warp; lanes write the same
  const float b = bias_at(p, e);
  uint32_t key[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int t = lane + 32 * r;
    key[r] = 0u;
    if (t < n) {
      const float x = load_val<DT>(p.logits, static_cast<long long>(t) * p.E + e);
      const float s = p.sigmoid ? sigmoid_score(x) : softmax_score(x, sstats[t].x, sstats[t].y);
      key[r] = okey(s + b);
    }
  }
  // rank of each own token = number of valid tokens before it in (key desc, t asc)
  int rank[2] = {0, 0};
  for (int r2 = 0; r2 < 2; ++r2) {
    if (32 * r2 >= n) break;  // uniform
    for (int j = 0; j < 32; ++j) {
      const uint32_t other = __shfl_sync(kFull, key[r2], j);
      const int to = j + 32 * r2;
      if (to >= n) break;  // uniform
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        const int t = lane + 32 * r;
        if (other > key[r] || (other == key[r] && to < t)) ++rank[r];
      }
    }
  }
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int t = lane + 32 * r;
    if (t < n && rank[r] == C - 1) {
      p.thr_key[e] = key[r];
      p.thr_tok[e] = t;
    }
  }
}

// ---------------------------------------------------------------------------
// Kernel 2b (large T): one block per expert, radix select on the column's keys.
// Keys are computed once into shared memory when the column fits (n <= smem_keys),
// else recomputed from the logits in every pass (a correct, slower path).

constexpr int kSelectThreads = 512;

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
__global__ void __launch_bounds__(kSelectThreads) select_radix_kernel(Params p, int smem_keys) {
  extern __shared__ uint32_t col[];
  __shared__ unsigned hist[256];
  __shared__ int swarp[32];
  __shared__ unsigned s_bin, s_rem;
  __shared__ int s_tok;
  const int e = blockIdx.x;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int bd = blockDim.x;
  const int n = read_n(p);
  const int C = capacity(p, n);
  if (trivial_threshold(p, e, n, C)) return;  // uniform per block
  const float b = bias_at(p, e);
  const bool cached = n <= smem_keys;

  auto compute_key = [&](int t) -> uint32_t {
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

  if (cached) {
    for (int t = tid; t < n; t += bd) col[t] = compute_key(t);
    __syncthreads();
  }

  uint32_t prefix = 0u, mask = 0u;
  unsigned remaining = static_cast<unsigned>(C);  // rank (1-based) still to find
  for (int shift = 24; shift >= 0; shift -= 8) {
    for (int i = tid; i < 256; i += bd) hist[i] = 0u;
    __syncthreads();
    for (int base = warp * 32; base < n; base += bd) {
      const int t = base + lane;
      bool act = t < n;
      uint32_t u = 0u;
      if (act) u = cached ? col[t] : compute_key(t);
      act = act && ((u & mask) == prefix);
      const unsigned digit = (u >> shift) & 255u;
      const unsigned active = __ballot_sync(kFull, act);
      if (act) {
        const unsigned peers = __match_any_sync(active, digit);
        if (lane == __ffs(peers) - 1) atomicAdd(&hist[digit], static_cast<unsigned>(__popc(peers)));
      }
    }
    __syncthreads();
    if (warp == 0) {
      // lane l owns bins [8l, 8l + 8); find the bin holding the remaining-th key
      // counted from the top.
      unsigned local = 0u;
#pragma unroll
      for (int j = 0; j < 8; ++j) local += hist[lane * 8 + j];
      unsigned suffix = local;  // sum over lanes >= lane
#pragma unroll
      for (int d = 1; d < 32; d <<= 1) {
        unsigned y = __shfl_down_sync(kFull, suffix, d);
        if (lane + d < 32) suffix += y;
      }
      const unsigned above = suffix - local;  // keys in higher lanes' bins
      if (above < remaining && remaining <= suffix) {
        unsigned acc = above;
        for (int j = 7; j >= 0; --j) {
          const unsigned h = hist[lane * 8 + j];
          if (acc + h >= remaining) {
            s_bin = static_cast<unsigned>(lane * 8 + j);
            s_rem = remaining - acc;
            break;
          }
          acc += h;
        }
      }
    }
    __syncthreads();
    prefix |= s_bin << shift;
    mask |= 255u << shift;
    remaining = s_rem;
  }
  // The threshold key is `prefix`; take the `remaining` lowest token indices among
  // the tokens whose key equals it. Each thread scans a contiguous range.
  const int chunk = (n + bd - 1) / bd;
  const int lo = min(n, tid * chunk), hi = min(n, lo + chunk);
  int cnt = 0;
  for (int t = lo; t < hi; ++t) cnt += ((cached ? col[t] : compute_key(t)) == prefix);
  int total;
  const int before = block_exclusive_scan(cnt, swarp, total);
  if (static_cast<unsigned>(before) < remaining && remaining <= static_cast<unsigned>(before + cnt)) {
    int need = static_cast<int>(remaining) - before;
    for (int t = lo; t < hi; ++t) {
      if ((cached ? col[t] : compute_key(t)) == prefix && --need == 0) {
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
// Kernel 3: one warp per token. Lane `l` holds experts e = l + 32 i (i < VPL).
// Rank of (t, e) in the token's slot order, as an integer (larger = earlier):
//   bit 43: chosen by e | bits 11..42: okey | bits 0..10: 1024 - e (lower e first)
// 0 marks "taken or absent". k rounds of a warp-wide max give the slots in order.

constexpr int kTokenWarps = 4;

template <int DT, int VPL>
__global__ void __launch_bounds__(kTokenWarps * 32) token_route_kernel(Params p) {
  const int lane = threadIdx.x & 31;
  const int t = blockIdx.x * kTokenWarps + (threadIdx.x >> 5);
  if (t >= p.T) return;
  const int n = read_n(p);
  const int k = p.k;
  const long long out_base = static_cast<long long>(t) * k;
  if (t >= n) {  // padding row
    if (lane < k) {
      p.out_id[out_base + lane] = -1;
      p.out_w[out_base + lane] = 0.0f;
    }
    return;
  }
  float m = 0.0f, s = 1.0f;
  if (!p.sigmoid) {
    if (p.stats != nullptr) {
      const float2 st = p.stats[t];
      m = st.x;
      s = st.y;
    } else {
      row_stats_warp<DT>(p.logits, t, p.E, lane, m, s);
    }
  }
  const long long row = static_cast<long long>(t) * p.E;
  unsigned long long rank[VPL];
  float score[VPL];
#pragma unroll
  for (int i = 0; i < VPL; ++i) {
    const int e = lane + 32 * i;
    rank[i] = 0ull;
    score[i] = 0.0f;
    if (e < p.E) {
      const float x = load_val<DT>(p.logits, row + e);
      const float sc = p.sigmoid ? sigmoid_score(x) : softmax_score(x, m, s);
      const uint32_t key = okey(sc + bias_at(p, e));
      const uint32_t tk = __ldg(p.thr_key + e);
      const int tt = __ldg(p.thr_tok + e);
      const bool chosen = key > tk || (key == tk && t <= tt);
      rank[i] = (static_cast<unsigned long long>(chosen) << 43) |
                (static_cast<unsigned long long>(key) << 11) |
                static_cast<unsigned long long>(kMaxExperts - e);
      score[i] = sc;
    }
  }
  float my_w = 0.0f;
  int my_id = -1;
  float sum = 0.0f;
  for (int j = 0; j < k; ++j) {
    unsigned long long best = 0ull;
#pragma unroll
    for (int i = 0; i < VPL; ++i) best = rank[i] > best ? rank[i] : best;
#pragma unroll
    for (int d = 16; d > 0; d >>= 1) {
      const unsigned long long o = __shfl_xor_sync(kFull, best, d);
      best = o > best ? o : best;
    }
    if (best == 0ull) break;                          // no expert left (uniform)
    if (!(best >> 43) && !p.fill_topk) break;         // "drop": only kept experts
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
  if (p.renorm && sum > 0.0f) my_w = my_w / sum;
  if (lane < k) {
    p.out_id[out_base + lane] = my_id;
    p.out_w[out_base + lane] = my_w;
  }
}

// ---------------------------------------------------------------------------
// host side

template <int DT>
cudaError_t launch_token(const Params& p, cudaStream_t stream) {
  const int grid = (p.T + kTokenWarps - 1) / kTokenWarps;
  const int block = kTokenWarps * 32;
  const int vpl = (p.E + 31) / 32;
  if (vpl <= 2) token_route_kernel<DT, 2><<<grid, block, 0, stream>>>(p);
  else if (vpl <= 4) token_route_kernel<DT, 4><<<grid, block, 0, stream>>>(p);
  else if (vpl <= 8) token_route_kernel<DT, 8><<<grid, block, 0, stream>>>(p);
  else if (vpl <= 16) token_route_kernel<DT, 16><<<grid, block, 0, stream>>>(p);
  else token_route_kernel<DT, 32><<<grid, block, 0, stream>>>(p);
  return cudaGetLastError();
}

constexpr int kSmemKeysMax = 16384;  // 64 KiB of keys per select block

template <int DT>
cudaError_t launch_all(Params p, cudaStream_t stream) {
  cudaError_t err;
  if (p.T <= kSmallT) {
    const int warps = 16;
    const int grid = (p.E + warps - 1) / warps;
    p.stats = nullptr;
    select_small_kernel<DT><<<grid, warps * 32, 0, stream>>>(p);
    if ((err = cudaGetLastError()) != cudaSuccess) return err;
    return launch_token<DT>(p, stream);
  }
  if (!p.sigmoid) {
    const int warps = 8;
    row_stats_kernel<DT><<<(p.T + warps - 1) / warps, warps * 32, 0, stream>>>(p);
    if ((err = cudaGetLastError()) != cudaSuccess) return err;
  } else {
    p.stats = nullptr;
  }
  const int smem_keys = p.T < kSmemKeysMax ? p.T : kSmemKeysMax;
  const size_t smem = static_cast<size_t>(smem_keys) * sizeof(uint32_t);
  if (smem > 48 * 1024) {  // host-side attribute of the current device; legal while capturing
    err = cudaFuncSetAttribute(select_radix_kernel<DT>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                               static_cast<int>(smem));
    if (err != cudaSuccess) return err;
  }
  select_radix_kernel<DT><<<p.E, kSelectThreads, smem, stream>>>(p, smem_keys);
  if ((err = cudaGetLastError()) != cudaSuccess) return err;
  return launch_token<DT>(p, stream);
}

}  // namespace ec

extern "C" {

// Version of this C interface; the Python side checks it after loading.
int ec_abi_version() { return 1; }

// Bytes of device workspace for T tokens and E experts (stats, then thresholds).
long long ec_workspace_bytes(int T, int E) {
  return static_cast<long long>(T) * 8 + static_cast<long long>(E) * 8 + 16;
}

const char* ec_error_string(int code) {
  if (code == -1) return "unsupported shape: E must be in [1, 1024] and k in [1, min(E, 32)]";
  if (code == -2) return "unsupported dtype";
  if (code == -3) return "could not select the CUDA device";
  return cudaGetErrorString(static_cast<cudaError_t>(code));
}

// Routes `T` rows of `logits` ([T, E], contiguous; dtype 0 = float32, 1 = bfloat16,
// 2 = float16). `n_ptr` (device int32/int64 scalar, may be null: then n_host) is the
// number of valid rows. Writes out_w [T, k] float32 and out_id [T, k] int32. Returns
// 0 or an error code (see ec_error_string).
int ec_route(const void* logits, int dtype, int T, int E, int k, const void* bias, int bias_dtype,
             const void* n_ptr, int n_is_64, long long n_host, long long cf_num, long long cf_den,
             int sigmoid, int fill_topk, int renorm, void* workspace, float* out_w, int* out_id,
             int device, void* stream) {
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
  char* ws = static_cast<char*>(workspace);
  p.stats = reinterpret_cast<float2*>(ws);
  p.thr_key = reinterpret_cast<uint32_t*>(ws + static_cast<long long>(T) * 8);
  p.thr_tok = reinterpret_cast<int*>(ws + static_cast<long long>(T) * 8 + static_cast<long long>(E) * 4);
  p.out_w = out_w;
  p.out_id = out_id;
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  cudaError_t err;
  if (dtype == ec::kDtF32) err = ec::launch_all<ec::kDtF32>(p, s);
  else if (dtype == ec::kDtBf16) err = ec::launch_all<ec::kDtBf16>(p, s);
  else if (dtype == ec::kDtF16) err = ec::launch_all<ec::kDtF16>(p, s);
  else err = static_cast<cudaError_t>(-2);
  if (prev != device) cudaSetDevice(prev);
  return static_cast<int>(err);
}

}  // extern "C"
