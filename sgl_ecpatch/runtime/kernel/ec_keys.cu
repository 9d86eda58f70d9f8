// Expert-choice routing: the keys kernels, the first of the three launches (see
// expert_choice.cu for the overview).

#include "ec_common.cuh"

namespace ec {


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

// One keys kernel: ROWS rows a block of `warps` warps, its tile of [E][ROWS + 1] keys in
// dynamic shared memory where the keys go out transposed.
template <int ROWS>
cudaError_t launch_keys_tiled(void (*kernel)(Params), int warps, const Params& p, cudaStream_t stream) {
  const size_t tile = p.keys_t ? static_cast<size_t>(p.E) * (ROWS + 1) * sizeof(uint32_t) : 0;
  const cudaError_t err = allow_smem(kernel, tile);
  if (err != cudaSuccess) return err;
  return launch(kernel, (p.T + ROWS - 1) / ROWS, warps * 32, tile, stream, false, p);
}

template <int DT, int VPL>
cudaError_t launch_keys(const Params& p, cudaStream_t stream) {
  if constexpr (VPL <= 2) {
    if (p.T >= p.keys_half_min_t)
      return launch_keys_tiled<kKeysHalfRows>(keys_half_kernel<DT, VPL>, kKeysRows, p, stream);
  }
  if constexpr (VPL == 16) {  // v30: 256 < E <= 512 only (it lost at E = 128-256 and above T = 2048)
    if (p.T <= p.keys_wide_max_t)
      return launch_keys_tiled<kKeysRows>(keys_wide_kernel<DT, VPL>, 2 * kKeysRows, p, stream);
  }
  return launch_keys_tiled<kKeysRows>(keys_kernel<DT, VPL>, kKeysRows, p, stream);
}

#define EC_INST(DT, VPL) template cudaError_t launch_keys<DT, VPL>(const Params&, cudaStream_t);
EC_FOR_DT_VPL(EC_INST)
#undef EC_INST

}  // namespace ec
