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
// These files have no torch or pybind11 include on purpose: they compile in seconds and
// the Python side calls the C entry points at the bottom of this file through ctypes,
// passing raw device pointers and the current torch stream.
//
// Shape of the computation:
//   * ranking keys are mapped to order-preserving uint32 ("okey"), NaN -> 0, so the
//     total order on (key, token) is an integer order with no float compares;
//   * per expert, the threshold is the C-th largest (okey, -token) pair of its
//     column (thr_key[e], thr_tok[e], written as one 64-bit word, threshold_word), and
//     token t is chosen by e iff okey > thr_key[e] || (okey == thr_key[e] && t <= thr_tok[e]);
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
//
// Files: ec_common.cuh (element helpers, Params, launch helpers, the launchers' declarations),
// ec_keys.cu (kernel 1), ec_select.cu (kernels 2a-2c), ec_token.cuh / ec_token.cu (kernel 3
// and the slot logic it shares), ec_fused.cu (kernel 0), ec_cluster.cu (kernels C and R),
// and this file: the dispatch and the C interface. The build compiles the .cu files in parallel.

#include "ec_common.cuh"

namespace ec {

template <int DT, int VPL>
cudaError_t launch_vpl(Params p, cudaStream_t stream, bool pdl) {
  cudaError_t err;
  if (launch_one<DT, VPL>(p, stream, err)) return err;
  if (p.sigmoid) p.stats = nullptr;
  if (!use_transpose(p.T, p.E, p.fused_max)) p.keys_t = nullptr;  // the select kernel gathers its column
  if (p.keys_t != nullptr || !p.sigmoid) {                        // keys and/or statistics
    if ((err = launch_keys<DT, VPL>(p, stream)) != cudaSuccess) return err;
  }
  if ((err = launch_select<DT>(p, stream, pdl)) != cudaSuccess) return err;
  return launch_token<DT, VPL>(p, stream, pdl);
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

// The workspace's layout (byte offsets), for ec_workspace_bytes and ec_route alike: the
// threshold words in a lane's order [32 VPL] first (16-byte loads of them need the
// allocation's alignment), then in expert order [E], the row statistics [T], and outside
// the one-launch path (up to 2^24 elements) the transposed keys, 256-byte aligned.
struct WorkspaceLayout {
  long long thr, stats, keys, bytes;
};

inline WorkspaceLayout workspace_layout(int T, int E, int fused_max) {
  WorkspaceLayout w;
  w.thr = 32LL * vpl_of(E) * 8;
  w.stats = w.thr + static_cast<long long>(E) * 8;
  w.keys = (w.stats + static_cast<long long>(T) * 8 + 255) / 256 * 256;
  w.bytes = w.stats + static_cast<long long>(T) * 8 + 256;
  if (use_transpose(T, E, fused_max)) w.bytes += static_cast<long long>(T) * E * 4;
  return w;
}

}  // namespace ec

extern "C" {

// Version of this C interface; the Python side checks it after loading.
int ec_abi_version() { return 11; }

// The largest T * E the one-block kernel (fused_small, keys and scores in shared memory)
// takes on `device` with `smem_limit` (0: the device's maximum): the Python side lowers
// fused_max to it (session 6: T * E = 16384 needs 152 KiB, over sm_86/89's 99 KiB).
int ec_fused_max_elems(int device, int smem_limit) {
  const int fixed = ec::fused_static_smem();
  return max(0, (ec::smem_budget(device, smem_limit) - fixed) / static_cast<int>(2 * sizeof(uint32_t)));
}

// Bytes of device workspace for T tokens and E experts (ec::workspace_layout). The
// workspace must be 16-byte aligned (torch's allocations are).
long long ec_workspace_bytes(int T, int E, int fused_max) { return ec::workspace_layout(T, E, fused_max).bytes; }

const char* ec_error_string(int code) {
  if (code == -1) return "unsupported shape: E must be in [1, 1024] and k in [1, min(E, 32)]";
  if (code == -2) return "unsupported dtype";
  if (code == -3) return "could not select the CUDA device";
  if (code == -4) return "the workspace must be 16-byte aligned";
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
  if (reinterpret_cast<uintptr_t>(workspace) % 16 != 0) return -4;
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
  const ec::WorkspaceLayout wl = ec::workspace_layout(T, E, fused_max);
  p.thr_lane = reinterpret_cast<unsigned long long*>(ws);
  p.thr_shift = ec::thr_shift_of(E);
  p.thr = reinterpret_cast<unsigned long long*>(ws + wl.thr);
  p.stats = reinterpret_cast<float2*>(ws + wl.stats);
  p.keys_t = ec::use_transpose(T, E, fused_max) ? reinterpret_cast<uint32_t*>(ws + wl.keys) : nullptr;
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

