// Expert-choice routing kernels: what every translation unit shares. The overview of the
// kernels and of which one runs where is at the top of expert_choice.cu.
//
// The kernels are split over several .cu files (keys, select, token, the one-launch
// kernels, and the C interface in expert_choice.cu) so that the build compiles them in
// parallel; each file instantiates its launchers for the three logit dtypes and the five
// row widths (VPL), declared at the bottom of this header.

#pragma once

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
  unsigned long long* thr;  // [E]: each expert's threshold word (threshold_word; v35)
  unsigned long long* thr_lane;  // [32 VPL]: the same words, a lane's adjacent (v36; write_threshold)
  int thr_shift;       // log2 VPL
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

// Elements a lane holds in a row of E experts (expert lane + 32 i, i < VPL), rounded up to
// the kernels' instances: 2, 4, 8, 16 or 32.
inline int vpl_of(int E) {
  const int v = (E + 31) / 32;
  return v <= 2 ? 2 : v <= 4 ? 4 : v <= 8 ? 8 : v <= 16 ? 16 : 32;
}

// log2 vpl_of(E), for Params::thr_shift.
inline int thr_shift_of(int E) {
  int s = 0;
  while ((1 << s) < vpl_of(E)) ++s;
  return s;
}

// An expert's threshold (thr_key, thr_tok) as one 64-bit word (v35): thr_key in the high
// half, 0x7fffffff - thr_tok in the low half (thr_tok in [-1, 2^31 - 1], so the low half
// falls as thr_tok grows, -1 giving 2^31). Token t with key `key` is chosen by the expert
// iff threshold_word(key, t) >= the expert's word: key > thr_key, or key == thr_key and
// t <= thr_tok. One 64-bit load and one compare where the slots need it (two loads and
// four compares before).
__host__ __device__ __forceinline__ unsigned long long threshold_word(uint32_t key, int tok) {
  return (static_cast<unsigned long long>(key) << 32) | (0x7fffffffu - static_cast<uint32_t>(tok));
}

// Each word is written twice (v36): at p.thr[e], and at p.thr_lane[(e % 32) VPL + e / 32],
// where the words of the experts a lane holds (lane + 32 i, i < VPL) are adjacent, so that
// the token kernel's lane reads its VPL words with VPL / 2 16-byte loads (read one word at a
// time, ptxas issued the loads a few at a time, each batch waited for before the next).
// The thr_lane slots of experts >= E are never written, and what is read from them is
// masked.
__device__ __forceinline__ void write_threshold(const Params& p, int e, uint32_t key, int tok) {
  const unsigned long long w = threshold_word(key, tok);
  p.thr[e] = w;
  p.thr_lane[((e & 31) << p.thr_shift) | (e >> 5)] = w;
}

// Writes the threshold of expert e for the trivial capacities; returns true if done.
__device__ __forceinline__ bool trivial_threshold(const Params& p, int e, int n, int C) {
  if (C == 0) {  // nobody chosen (okey is at most 0xff800000, below this key)
    write_threshold(p, e, 0xffffffffu, -1);
    return true;
  }
  if (C >= n) {  // every valid token chosen
    write_threshold(p, e, 0u, n);
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

// cnt + (kj > kt) given nkt = ~kt: the carry out of kj + ~kt (set iff kj > kt). ptxas
// turns a pair of these into two adds with carry out and one add of both carries: 1.5
// instructions a compare, against 3 for `cnt += kj > kt` (compare, add, select).
__device__ __forceinline__ unsigned count_gt(unsigned cnt, unsigned kj, unsigned nkt) {
  unsigned r;
  asm("{\n .reg .u32 d;\n add.cc.u32 d, %1, %2;\n addc.u32 %0, %3, 0;\n}" : "=r"(r) : "r"(kj), "r"(nkt), "r"(cnt));
  return r;
}

// ---------------------------------------------------------------------------
// host side, shared by every launcher

// The one-block kernel's limits (ec_fused.cu): at T = 64 the one block measured 22-38 µs
// against 13-17 µs for three launches (v6 on H200): one SM does every row twice. Masks
// stay 64-bit (room to tune).
constexpr int kFusedMaxT = 32;
constexpr int kFusedMaxElems = 16384;  // 64 KiB of keys + 64 KiB of scores
constexpr long long kTransposeMaxElems = 1LL << 24;  // keys_t workspace up to 64 MiB

inline bool use_fused(int T, int E, int fused_max) {
  // E > 256 from T = 25: the three launches (H200, after v10c: T = 32 18.4 µs against
  // 20.1 for the one block)
  return T <= kFusedMaxT && E <= 512 && T * E <= fused_max && T * E <= kFusedMaxElems && !(E > 256 && T > 24);
}

inline bool use_transpose(int T, int E, int fused_max) {
  return !use_fused(T, E, fused_max) && static_cast<long long>(T) * E <= kTransposeMaxElems;
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

// ---------------------------------------------------------------------------
// the launchers of each translation unit, instantiated there for DT in {kDtF32, kDtBf16,
// kDtF16} and VPL in {2, 4, 8, 16, 32}

// ec_keys.cu: the first of the three launches (row statistics and, where p.keys_t is set,
// the transposed keys)
template <int DT, int VPL>
cudaError_t launch_keys(const Params& p, cudaStream_t stream);
// ec_select.cu: the second launch (each expert's threshold)
template <int DT>
cudaError_t launch_select(const Params& p, cudaStream_t stream, bool pdl);
// ec_token.cu: the third launch (each token's slots)
template <int DT, int VPL>
cudaError_t launch_token(const Params& p, cudaStream_t stream, bool pdl);
// ec_cluster.cu: one launch for the small sizes (the one cluster or the one block; false,
// with nothing launched, where neither applies), and the block-per-row launch
template <int DT, int VPL>
bool launch_one(const Params& p, cudaStream_t stream, cudaError_t& err);
template <int DT>
bool launch_row(const Params& p, cudaStream_t stream, cudaError_t& err);
// ec_fused.cu: the one-block launch (VPL <= 16), and its kernel's static shared memory
// (the same for every instance)
template <int DT, int VPL>
cudaError_t launch_fused(const Params& p, cudaStream_t stream);
int fused_static_smem();

// Explicit instantiations: EC_FOR_DT(X) expands X(DT) and EC_FOR_DT_VPL(X) X(DT, VPL)
// for every instance the dispatch in expert_choice.cu calls.
#define EC_FOR_DT(X) X(kDtF32) X(kDtBf16) X(kDtF16)
#define EC_FOR_VPL(X, DT) X(DT, 2) X(DT, 4) X(DT, 8) X(DT, 16) X(DT, 32)
#define EC_FOR_DT_VPL(X) EC_FOR_VPL(X, kDtF32) EC_FOR_VPL(X, kDtBf16) EC_FOR_VPL(X, kDtF16)
}  // namespace ec
