// Expert-choice routing: the one-cluster kernels for small T (kernel C: one cluster of 16
// blocks; kernel R: a block per row) and the choice of the one-launch path (launch_one),
// see expert_choice.cu for the overview.

#include "ec_token.cuh"

namespace ec {

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
      route_token<VPL, 32>(p, t, lane, x, scratch[warp], [&](int, int e, uint32_t key) {
        const uint2 th = sthr[e];  // both words in one read, no branch
        return (key > th.x) | ((key == th.x) & (t <= static_cast<int>(th.y)));
      });
    }
  }
#endif
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

// Kernel C where its ranks take at most p.rank_max compares per thread (the block's
// pairs times T, over 512 threads) and the pairs fit kRankPairs per thread.
inline bool cluster_fits(const Params& p, int nb, int npad) {
  const long long pairs = static_cast<long long>((p.E + nb - 1) / nb) * npad;
  return pairs <= kRankPairs * kClusterWarps * 32 &&
         pairs * p.T <= static_cast<long long>(p.rank_max) * kClusterWarps * 32;
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

template <int DT, int VPL>
bool launch_one(const Params& p, cudaStream_t stream, cudaError_t& err) {
  err = cudaSuccess;
  if constexpr (VPL <= 16) {  // E <= 512: the row's registers fit 512 threads
    const bool fused_ok = use_fused(p.T, p.E, p.fused_max);
    const bool cluster_ok = p.T <= p.cluster_max_t && p.T <= kClusterMaxT;
    // the one cluster before the one block from T = 17 (session 4: T = 24 E = 8 / 60 / 128
    // 8.0 / 8.3 / 9.1 µs against 10.0 / 8.5 / 10.0)
    if (fused_ok && cluster_ok && p.T > 16 && launch_cluster<DT, VPL>(p, stream, err)) return true;
    if (fused_ok) {
      err = launch_fused<DT, VPL>(p, stream);
      return true;
    }
    if (cluster_ok && launch_cluster<DT, VPL>(p, stream, err)) return true;
  }
  return false;
}

#define EC_INST(DT, VPL) template bool launch_one<DT, VPL>(const Params&, cudaStream_t, cudaError_t&);
EC_FOR_DT_VPL(EC_INST)
#undef EC_INST
#define EC_INST(DT) template bool launch_row<DT>(const Params&, cudaStream_t, cudaError_t&);
EC_FOR_DT(EC_INST)
#undef EC_INST

}  // namespace ec
