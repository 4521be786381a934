// Skinny GEMM for decode: y[m, n] = act(sum_k W[n, k] x[m, k] + bias[n]) for M <= 8 rows of x (32 in fp16/bf16), W
// [N, K] (out, in: a torch Linear weight). One warp per output column n reads W's row once with 16-byte loads
// (the bytes that bound the op) and applies it to all M rows of x (small, from L1/L2); fp32 accumulation,
// bias and activation fused; engines choose it or cuBLASLt per GEMM by timing both (docs/bench/log.md). From 2
// rows of fp16/bf16, gemv_mma_kernel does the same with tensor-core products (below).
//
// The AddLayerNorm variant takes x = LayerNorm(x + delta) as its input: every block recomputes the M normalised
// rows in shared memory (a few KB from L2, while its weights are in flight) with add_layernorm_kernel's exact
// arithmetic, and block 0 writes the sum; one kernel boundary fewer per pair, the same bits.
//
// Two epilogues replace the LayerNorm kernel between a GEMV and the next one altogether (kEpi):
//  - kEpiResidual (the GEMV before the LayerNorm): y = residual + T(act(x W^T + bias)), the residual stream itself
//    (add_layernorm's sum, the same bits), so that no kernel adds it;
//  - kEpiFolded (the GEMV after it), on that residual stream s with the LayerNorm's affine folded into the weights
//    (W' = W diag(gamma), colsum = W' 1, bias' = bias + W beta; moetrt_fold_layernorm at set-up):
//    y = act(r (s W'^T - mu colsum) + bias') with mu and r = 1 / sqrt(var + eps) of each row of s, which every block
//    gathers from the rows it loads for its products anyway (one pass, no extra reads). No normalised rows exist:
//    the bits differ from LayerNorm then GEMV (float64 comparison in tests/plugins/test_kernels.py).
#include "common.cuh"

using namespace moetrt;

namespace {

constexpr int kGemvWarps = 8;
// Weights up to which the kernel prefetches its rows' tails into L2 before the wait: beyond about half the L2,
// the first wave's prefetches evict each other (on an H200, gpt-moe-3.4b-8e's batch-1 decode step took 2.83 ms
// with them on every GEMV, 2.69 ms with this limit).
constexpr int64_t kPrefetchMaxBytes = 24 << 20;
// The LayerNorm prologue: the vectors of a row are spread over kLnThreads threads as in layernorm.cu (the same
// partial sums, hence the same statistics); its rows, gamma and beta live in at most this much shared memory
// (dynamic; with the static reduction scratch, under the 48 KB a launch gets without opting in).
constexpr int kLnThreads = 128, kLnMaxVecs = 8;
constexpr int kLnMaxSmem = 44 << 10;
// Rows of x up to which the plain GEMV first copies x into shared memory (one round trip to L2 for the block)
// instead of loading it beside each weight vector. Measured on an H100 (docs/bench/log.md): the 350M batch-1
// decode graph 0.721 ms staged vs 0.742; batch 8 1.567 staged vs 1.545, though 8-row GEMVs alone ran faster.
#ifndef MOETRT_GEMV_STAGE_MAX_ROWS
#define MOETRT_GEMV_STAGE_MAX_ROWS 4
#endif
constexpr int kStageMaxRows = MOETRT_GEMV_STAGE_MAX_ROWS;

enum { kEpiPlain = 0, kEpiResidual = 1, kEpiFolded = 2 };
template <typename T>
struct GemvEpi {
  const float* colsum;  // kEpiFolded: [N]
  const float* bias;    // kEpiFolded: [N], fp32 (the kernel's T bias is unused)
  const T* residual;    // kEpiResidual: [rows, N]
  float eps;            // kEpiFolded
};

template <typename T>
struct AddLn {  // normed = LayerNorm(x + delta) * gamma + beta, sum_out = x + delta (block 0; when both given)
  const T* x;
  const T* delta;
  const T* gamma;
  const T* beta;
  T* sum_out;
  float eps;
};

// Per-row block sums of v[m] with block_sum's order (warp butterflies, then one over the warps' partials).
template <int M>
__device__ __forceinline__ void block_sum_rows(float (&v)[M], float* scratch) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
#pragma unroll
  for (int m = 0; m < M; ++m) v[m] = warp_sum(v[m]);
  __syncthreads();  // scratch may still be read from a previous call
  if (lane == 0) {
#pragma unroll
    for (int m = 0; m < M; ++m) scratch[m * 32 + warp] = v[m];
  }
  __syncthreads();
#pragma unroll
  for (int m = 0; m < M; ++m) v[m] = warp_sum(lane < warps ? scratch[m * 32 + lane] : 0.f);
}

// The M rows of LayerNorm(x + delta) into xs [M][K] (shared), as add_layernorm_kernel computes them.
template <typename T, int M>
__device__ void add_layernorm_rows(const AddLn<T>& ln, T* xs, const T* gs, const T* bs, int K, float* scratch) {
  constexpr int VN = Vec<T>::N;
  const int vecs = K / VN;
  const bool mine = threadIdx.x < kLnThreads, writer = blockIdx.x == 0 && ln.delta && ln.sum_out;
  constexpr int G = M < 2 ? M : 2;  // rows whose loads are in flight together (more: registers past 64)
  float sum[M], sq[M];
#pragma unroll
  for (int m = 0; m < M; ++m) sum[m] = 0.f;
  for (int v = threadIdx.x; mine && v < vecs; v += kLnThreads) {
#pragma unroll
    for (int m0 = 0; m0 < M; m0 += G) {
      Vec<T> a[G], d[G];
#pragma unroll
      for (int g = 0; g < G && m0 + g < M; ++g) {
        a[g].load(ln.x + int64_t(m0 + g) * K + v * VN);
        if (ln.delta) d[g].load(ln.delta + int64_t(m0 + g) * K + v * VN);
      }
#pragma unroll
      for (int g = 0; g < G && m0 + g < M; ++g) {
#pragma unroll
        for (int j = 0; j < VN; ++j) {
          if (ln.delta) a[g].v[j] = from_float<T>(to_float(a[g].v[j]) + to_float(d[g].v[j]));  // residual, in T
          sum[m0 + g] += to_float(a[g].v[j]);
        }
        a[g].store(xs + (m0 + g) * K + v * VN);
        if (writer) a[g].store(ln.sum_out + int64_t(m0 + g) * K + v * VN);
      }
    }
  }
  block_sum_rows<M>(sum, scratch);
#pragma unroll
  for (int m = 0; m < M; ++m) {
    sum[m] /= static_cast<float>(K);  // the mean
    sq[m] = 0.f;
    for (int v = threadIdx.x; mine && v < vecs; v += kLnThreads) {
      Vec<T> a;
      a.load(xs + m * K + v * VN);
#pragma unroll
      for (int j = 0; j < VN; ++j) { const float c = to_float(a.v[j]) - sum[m]; sq[m] += c * c; }
    }
  }
  block_sum_rows<M>(sq, scratch);
#pragma unroll
  for (int m = 0; m < M; ++m) {
    const float rstd = rsqrtf(sq[m] / static_cast<float>(K) + ln.eps);
    for (int v = threadIdx.x; mine && v < vecs; v += kLnThreads) {
      Vec<T> a, g, b;
      a.load(xs + m * K + v * VN);
      g.load(gs + v * VN);
      b.load(bs + v * VN);
#pragma unroll
      for (int j = 0; j < VN; ++j)
        a.v[j] = from_float<T>((to_float(a.v[j]) - sum[m]) * rstd * to_float(g.v[j]) + to_float(b.v[j]));
      a.store(xs + m * K + v * VN);
    }
  }
  __syncthreads();
}

// The fused LayerNorm's gamma and beta (weights: before the wait) into shared memory after its M rows, in flight.
template <typename T, int M>
__device__ __forceinline__ void load_layernorm_weights(const AddLn<T>& ln, T* xs, int K) {
  constexpr int VN = Vec<T>::N;
  for (int v = threadIdx.x; v < K / VN; v += blockDim.x) {
    cp_async16(xs + M * K + v * VN, ln.gamma + v * VN, true);
    cp_async16(xs + (M + 1) * K + v * VN, ln.beta + v * VN, true);
  }
  cp_async_commit();
}
// After the wait, once gamma and beta have landed: the M rows of LayerNorm(x + delta) into xs, the GEMV's x.
template <typename T, int M>
__device__ __forceinline__ const T* layernorm_rows(const AddLn<T>& ln, T* xs, int K, float* scratch) {
  cp_async_wait<0>();
  __syncthreads();
  add_layernorm_rows<T, M>(ln, xs, xs + M * K, xs + (M + 1) * K, K, scratch);
  return xs;
}

// One row of x, K of 1025-4096 (fp16/bf16; the dense FC2 of decode at batch 1): the whole weight row in registers
// before the wait (16 vectors a lane) rather than its first 1024 elements with the rest read from L2 after the wait.
// H100, 8-layer 350M decode graph at batch 1: 0.2092-0.2101 ms against 0.2113-0.2117 (docs/bench/log.md).
constexpr int kPreAllVecs = 16;

// An output element from its dot product v: bias and activation, then kEpiResidual's add of res (the residual's
// element, read early) or kEpiFolded's normalisation (st, sq: the row's sum and sum of squares over its K elements;
// one pass in fp32, exact enough unless a row's mean is hundreds of times its deviation).
template <typename T, int kEpi>
__device__ __forceinline__ T epilogue(float v, float bias, float colsum, float st, float sq, int K, int act,
                                      float eps, float res) {
  if constexpr (kEpi == kEpiFolded) {
    const float mean = st / static_cast<float>(K);
    const float var = fmaxf(sq / static_cast<float>(K) - mean * mean, 0.f);
    const float r = rsqrtf(var + eps);
    return from_float<T>(activate(r * (v - mean * colsum) + bias, act));
  } else if constexpr (kEpi == kEpiResidual) {
    const T delta = from_float<T>(activate(v + bias, act));  // rounded as the separate GEMV writes it
    return from_float<T>(res + to_float(delta));
  } else {
    return from_float<T>(activate(v + bias, act));
  }
}

template <typename T, int M, bool kLn, bool kStage = false, int kPreVecs = 32 / Vec<T>::N, int kEpi = kEpiPlain>
__global__ void __launch_bounds__(kGemvWarps * 32) gemv_kernel(const T* __restrict__ x, const T* __restrict__ w,
                                                                const T* __restrict__ bias, T* __restrict__ y,
                                                                int N, int K, int act, bool prefetch, AddLn<T> ln,
                                                                GemvEpi<T> epi) {
  static_assert(!(kLn && kEpi != kEpiPlain), "the LayerNorm prologue has the plain epilogue");
  constexpr int VN = Vec<T>::N, PRE = kPreVecs;  // vectors per lane: by default 1024 elements of a row in fp16/bf16
  extern __shared__ __align__(16) unsigned char smem[];
  __shared__ float scratch[kLn ? M * 32 : 1];
  const int lane = threadIdx.x & 31;
  const int n = blockIdx.x * kGemvWarps + (threadIdx.x >> 5);
  const bool active = n < N;
  const T* row = w + int64_t(active ? n : 0) * K;
  // The weights do not depend on the kernel before this one: the row's first PRE vectors per lane go to registers
  // and the rest of it to L2 while that kernel still runs (programmatic launch); x is read after the wait.
  Vec<T> pre[PRE];
#pragma unroll
  for (int u = 0; u < PRE; ++u) {
    const int k = (u * 32 + lane) * VN;
    if (active && k < K) pre[u].load_global_nc(row + k);
  }
  constexpr int kPreElems = PRE * 32 * VN;
  if (prefetch && active && K > kPreElems)
    prefetch_l2_range(row + kPreElems, int64_t(K - kPreElems) * sizeof(T), lane, 32);
  // weights too, before the wait: the bias, and with kEpiFolded the column sums
  const float bias_n = kEpi == kEpiFolded ? (active && lane < M ? epi.bias[n] : 0.f)
                                          : (bias && active && lane < M ? to_float(bias[n]) : 0.f);
  const float colsum_n = kEpi == kEpiFolded && active && lane < M ? epi.colsum[n] : 0.f;
  T* xs = reinterpret_cast<T*>(smem);  // kLn: the normalised rows [M][K], then gamma [K] and beta [K]
  if constexpr (kLn) load_layernorm_weights<T, M>(ln, xs, K);
  enter_after_predecessor();
  // the residual stream's element is read now, not after the products (the kernels before this one are done)
  const float res = kEpi == kEpiResidual && active && lane < M ? to_float(epi.residual[int64_t(lane) * N + n]) : 0.f;
  if constexpr (kLn) {
    x = layernorm_rows<T, M>(ln, xs, K, scratch);
  } else if constexpr (kStage) {
    for (int v = threadIdx.x; v < M * K / VN; v += blockDim.x) cp_async16(xs + v * VN, x + v * VN, true);
    cp_async_commit();
    cp_async_wait<0>();
    __syncthreads();
    x = xs;
  }
  if (!active) return;
  float acc[M], st[M], sq[M];  // kEpiFolded: this lane's sum and sum of squares of x, per row
#pragma unroll
  for (int m = 0; m < M; ++m) {
    acc[m] = st[m] = sq[m] = 0.f;
  }
  auto fma_vec = [&](const Vec<T>& wv, int k) {  // the warp's lanes cover each row of x once
#pragma unroll
    for (int m = 0; m < M; ++m) {
      Vec<T> xv;
      xv.load(x + int64_t(m) * K + k);
#pragma unroll
      for (int i = 0; i < VN; ++i) {
        acc[m] += to_float(wv.v[i]) * to_float(xv.v[i]);
        if constexpr (kEpi == kEpiFolded) {
          const float d = to_float(xv.v[i]);
          st[m] += d;
          sq[m] = fmaf(d, d, sq[m]);
        }
      }
    }
  };
#pragma unroll
  for (int u = 0; u < PRE; ++u) {
    const int k = (u * 32 + lane) * VN;
    if (k < K) fma_vec(pre[u], k);
  }
#pragma unroll 4
  for (int k = kPreElems + lane * VN; k < K; k += 32 * VN) {
    Vec<T> wv;
    wv.load_global_nc(row + k);
    fma_vec(wv, k);
  }
#pragma unroll
  for (int m = 0; m < M; ++m) {
    acc[m] = warp_sum(acc[m]);
    if constexpr (kEpi == kEpiFolded) {
      st[m] = warp_sum(st[m]);
      sq[m] = warp_sum(sq[m]);
    }
  }
  if (lane < M) {
    float v = 0.f, vs = 0.f, vq = 0.f;
#pragma unroll
    for (int m = 0; m < M; ++m) {
      v = lane == m ? acc[m] : v;
      vs = lane == m ? st[m] : vs;
      vq = lane == m ? sq[m] : vq;
    }
    y[int64_t(lane) * N + n] = epilogue<T, kEpi>(v, bias_n, colsum_n, vs, vq, K, act, epi.eps, res);
  }
}

// ---- 2 to 32 rows of fp16/bf16: tensor cores -----------------------------------------------------------------
// At 8 rows gemv_kernel issues 8 loads of x and 64 FMAs (with their conversions) per 16-byte weight vector and is
// bound by them, not by the weights (350M QKV: 7.7 us against F.linear's 6.2). Here mma.m16n8k16 computes the
// products (common.cuh: mma_gemv_chunk), x's rows being A's rows (two MMAs per weight fragment past 16 rows) and
// the block's 8 weight rows B: one 16-byte load of x per row and weight vector. M is the rows' capacity (8, 16,
// 32; `rows` of them are used), or with kLn their exact number (at most 8). A block covers 8 outputs; its warps
// split K (warp i takes chunks i, i + 8, ...), and their partial sums meet in shared memory, added in a fixed
// order. Weights and bias are read before
// the wait, as in gemv_kernel: the warp's first kPre chunks into registers (kPre = 4 for K > 1024, where a warp
// has several chunks: 2 blocks an SM then), the rest of its chunks into L2. fp32 accumulation.
#ifndef MOETRT_GEMV_MMA_MIN_ROWS
#define MOETRT_GEMV_MMA_MIN_ROWS 2
#endif
constexpr int kMmaMinRows = MOETRT_GEMV_MMA_MIN_ROWS;

// Blocks an SM is sized for (registers): 4 (1 chunk in registers), 2 (4 chunks), fewer past 16 rows. Past 16 rows
// with one chunk, 3 blocks an SM (80 registers, a few spilled) only where that makes the grid one wave (the 350M
// QKV's 384 blocks); else 2 (up to 128 registers). H100, alone at 24 / 32 rows (us): QKV 5.3-5.5 / 5.8 with 3 against
// 6.1-6.5 / 7.1 with 2; the 1024 x 1024 out projection 3.5 / 3.6 against 3.0 / 2.8-3.0; FC1 4096 x 1024
// 8.1 / 9.8-10.2 against 6.8-7.1 / 7.6-7.9 (tools/gemv_ab.py).
constexpr int mma_min_blocks(int M, int kPre) { return kPre == 1 ? (M > 16 ? 2 : 4) : (M > 16 ? 1 : 2); }

// kEpiFolded: a lane's sums and sums of squares of x for A rows g + 8h, added over its quad (t) and stored for the
// warp by lane t = 0 (rows below M)
template <int M, int H>
__device__ __forceinline__ void quad_row_stats(float (&st)[H], float (&sq)[H], float (&out)[M][2], int g, int t) {
#pragma unroll
  for (int h = 0; h < H; ++h) {
#pragma unroll
    for (int o = 1; o < 4; o <<= 1) {
      st[h] += __shfl_xor_sync(0xffffffffu, st[h], o);
      sq[h] += __shfl_xor_sync(0xffffffffu, sq[h], o);
    }
    const int r = g + 8 * h;
    if (t == 0 && 8 * h < M && r < M) {
      out[r][0] = st[h];
      out[r][1] = sq[h];
    }
  }
}

template <typename T, int M, bool kLn, int kPre, int kEpi = kEpiPlain, int kMinBlocks = 0>  // 0: mma_min_blocks
__global__ void __launch_bounds__(kGemvWarps * 32, kMinBlocks ? kMinBlocks : mma_min_blocks(M, kPre))
    gemv_mma_kernel(const T* __restrict__ x, const T* __restrict__ w, const T* __restrict__ bias, T* __restrict__ y,
                    int rows, int N, int K, int act, bool prefetch, AddLn<T> ln, GemvEpi<T> epi) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  static_assert(M <= 32 && (!kLn || M <= 8) && Vec<T>::N == 8, "32 rows of x at most, 16-bit elements");
  static_assert(!(kLn && kEpi != kEpiPlain), "the LayerNorm prologue has the plain epilogue");
  if constexpr (M <= 8) launch_dependents();  // at entry (common.cuh: programmatic dependent launch)
  constexpr int MT = (M + 15) / 16;  // MMAs per weight fragment
  const int R = kLn ? M : rows;
  extern __shared__ __align__(16) unsigned char smem[];
  __shared__ float scratch[kLn ? M * 32 : 1];
  __shared__ float part[kGemvWarps][M][8];
  __shared__ float stat[kEpi == kEpiFolded ? kGemvWarps : 1][M][2];  // per warp and row: sum, squares of x
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, t = lane & 3;
  const int n0 = blockIdx.x * 8, chunks = (K + kMmaChunk - 1) / kMmaChunk;
  const T* wrow = n0 + g < N ? w + int64_t(n0 + g) * K : nullptr;
  Vec<T> pre[kPre][kMmaVecs];
  mma_gemv_preload(pre, wrow, warp, kGemvWarps, K, t);
  if (prefetch && wrow && t < 2)
    for (int c = warp + kPre * kGemvWarps; c < chunks; c += kGemvWarps)
      if (c * kMmaChunk + t * 64 < K) prefetch_l2(wrow + c * kMmaChunk + t * 64);
  const int m_out = threadIdx.x >> 3, r_out = threadIdx.x & 7;  // this thread writes y[m_out, n0 + r_out]
  const bool writer = m_out < R && n0 + r_out < N;
  const float bias_v = kEpi == kEpiFolded ? (writer ? epi.bias[n0 + r_out] : 0.f)
                                          : (bias && writer ? to_float(bias[n0 + r_out]) : 0.f);
  const float colsum_v = kEpi == kEpiFolded && writer ? epi.colsum[n0 + r_out] : 0.f;
  T* xs = reinterpret_cast<T*>(smem);  // kLn: the normalised rows [M][K], then gamma [K] and beta [K]
  if constexpr (kLn) load_layernorm_weights<T, M>(ln, xs, K);
  if constexpr (M <= 8) dependency_wait();  // its dependents were launched at entry
  else enter_after_predecessor();
  if constexpr (kLn) x = layernorm_rows<T, M>(ln, xs, K, scratch);
  float acc[MT][4] = {};
  const T* xr[2 * MT];  // A rows g, g + 8 (, g + 16, g + 24)
#pragma unroll
  for (int h = 0; h < 2 * MT; ++h) xr[h] = (8 * h < M && g + 8 * h < R) ? x + int64_t(g + 8 * h) * K : nullptr;
  // kEpiFolded: this lane's sum and sum of squares of x for its A rows, from the vectors the MMAs load (each
  // element of a row once over the quad's lanes and the warps' chunks)
  float st[2 * MT], sq[2 * MT];
#pragma unroll
  for (int h = 0; h < 2 * MT; ++h) st[h] = sq[h] = 0.f;
  auto stats = [&](int h, const Vec<T>& a) {
    if constexpr (kEpi == kEpiFolded) {
#pragma unroll
      for (int i = 0; i < 8; ++i) {
        const float d = to_float(a.v[i]);
        st[h] += d;
        sq[h] = fmaf(d, d, sq[h]);
      }
    }
  };
  // the writer's residual element, read before the products
  const float res = kEpi == kEpiResidual && writer ? to_float(epi.residual[int64_t(m_out) * N + n0 + r_out]) : 0.f;
  mma_gemv_accumulate<T, kPre, MT, (M <= 8)>(acc, pre, wrow, xr, warp, kGemvWarps, chunks, K, t, stats);
  if constexpr (kEpi == kEpiFolded) quad_row_stats<M>(st, sq, stat[warp], g, t);
#pragma unroll
  for (int h = 0; h < 2 * MT; ++h) {
    const int r = g + 8 * h;
    if (8 * h < M && r < M) {
      part[warp][r][2 * t] = acc[h / 2][(h % 2) * 2];
      part[warp][r][2 * t + 1] = acc[h / 2][(h % 2) * 2 + 1];
    }
  }
  __syncthreads();
  if (writer) {
    float s = 0.f, vs = 0.f, vq = 0.f;
#pragma unroll
    for (int i = 0; i < kGemvWarps; ++i) {
      s += part[i][m_out][r_out];
      if constexpr (kEpi == kEpiFolded) {
        vs += stat[i][m_out][0];
        vq += stat[i][m_out][1];
      }
    }
    y[int64_t(m_out) * N + n0 + r_out] = epilogue<T, kEpi>(s, bias_v, colsum_v, vs, vq, K, act, epi.eps, res);
  }
#endif
}

// ---- 9-32 rows: NT groups of 8 outputs a block ----------------------------------------------------------------
// Past 8 rows gemv_mma_kernel loads 2 (16 rows) or 4 (32 rows) vectors of x per weight vector, and each block reads
// all of x for its 8 outputs. Here a warp applies every x vector it loads to NT weight groups (8 * NT outputs a
// block), so x is loaded NT times less often. Otherwise as gemv_mma_kernel with K of one chunk a warp (at most 1024:
// the launch's condition): warp i takes chunk i, every weight vector of it in registers before the wait, partial
// sums meeting in shared memory in a fixed order, fp32 accumulation. H100, first 8 layers
// of the 350M decode graphs, each library with an engine it tuned, three rounds: batch 12 / 16 / 24 / 32 0.4437 /
// 0.4668 / 0.6096 / 0.6718 ms against 0.4511 / 0.4730 with it from 17 rows only, and 0.6308 / 0.6857 at 24 / 32
// without it (another call; docs/bench/log.md). Past 16 rows it triggers its dependents at entry, as the <= 8-row
// kernels do (8-layer batch 32 0.6368-0.6371 against 0.6377-0.6380 ms; at 16 rows that lost 2.4%).
#ifndef MOETRT_GEMV_WIDE
#define MOETRT_GEMV_WIDE 1
#endif
template <typename T, int M, int NT, int kEpi>
__global__ void __launch_bounds__(kGemvWarps * 32, 2)
    gemv_mma_wide_kernel(const T* __restrict__ x, const T* __restrict__ w, const T* __restrict__ bias,
                         T* __restrict__ y, int rows, int N, int K, int act, GemvEpi<T> epi) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  static_assert(M <= 32 && Vec<T>::N == 8, "32 rows of x at most, 16-bit elements");
  constexpr int MT = (M + 15) / 16, W = kGemvWarps, NO = 8 * NT, THREADS = kGemvWarps * 32;
  constexpr int OPT = (M * NO + THREADS - 1) / THREADS;  // outputs a thread writes
  if constexpr (M > 16) launch_dependents();  // at entry past 16 rows (above); its dependents wait for its end
  __shared__ float part[W][M][NO];
  __shared__ float stat[kEpi == kEpiFolded ? W : 1][M][2];  // per warp and row: sum, squares of x
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, t = lane & 3;
  const int n0 = blockIdx.x * NO, chunks = (K + kMmaChunk - 1) / kMmaChunk;
  const T* wrow[NT];
  Vec<T> pre[NT][kMmaVecs];  // this warp's chunk (zeros past K)
#pragma unroll
  for (int n = 0; n < NT; ++n) {
    wrow[n] = n0 + 8 * n + g < N ? w + int64_t(n0 + 8 * n + g) * K : nullptr;
    mma_gemv_load(pre[n], wrow[n], warp, K, t);
  }
  float bias_v[OPT], colsum_v[OPT];
#pragma unroll
  for (int o = 0; o < OPT; ++o) {
    const int i = threadIdx.x + o * THREADS, c = n0 + i % NO;
    const bool ok = i < M * NO && c < N;
    bias_v[o] = kEpi == kEpiFolded ? (ok ? epi.bias[c] : 0.f) : (bias && ok ? to_float(bias[c]) : 0.f);
    colsum_v[o] = kEpi == kEpiFolded && ok ? epi.colsum[c] : 0.f;
  }
  if constexpr (M > 16) dependency_wait();
  else enter_after_predecessor();
  float res[OPT];  // the residual stream's elements, read before the products
#pragma unroll
  for (int o = 0; o < OPT; ++o) {
    const int i = threadIdx.x + o * THREADS, m = i / NO, c = n0 + i % NO;
    res[o] = kEpi == kEpiResidual && i < M * NO && m < rows && c < N ? to_float(epi.residual[int64_t(m) * N + c]) : 0.f;
  }
  float acc[NT][MT][4] = {};
  const T* xr[2 * MT];  // A rows g, g + 8 (, g + 16, g + 24)
#pragma unroll
  for (int h = 0; h < 2 * MT; ++h) xr[h] = (8 * h < M && g + 8 * h < rows) ? x + int64_t(g + 8 * h) * K : nullptr;
  float st[2 * MT], sq[2 * MT];
#pragma unroll
  for (int h = 0; h < 2 * MT; ++h) st[h] = sq[h] = 0.f;
  auto chunk = [&](const Vec<T>(&wv)[NT][kMmaVecs], int c) {
#pragma unroll
    for (int u = 0; u < kMmaVecs; ++u) {
      const int k = c * kMmaChunk + (t + 4 * u) * 8;
      Vec<T> a[2 * MT];
#pragma unroll
      for (int h = 0; h < 2 * MT; ++h) {
        if (xr[h] && k < K) {
          a[h].load(xr[h] + k);
          if constexpr (kEpi == kEpiFolded) {
#pragma unroll
            for (int e = 0; e < 8; ++e) {
              const float d = to_float(a[h].v[e]);
              st[h] += d;
              sq[h] = fmaf(d, d, sq[h]);
            }
          }
        } else {
          a[h].raw = make_uint4(0, 0, 0, 0);
        }
      }
#pragma unroll
      for (int n = 0; n < NT; ++n)
#pragma unroll
        for (int i = 0; i < MT; ++i) mma_gemv_vec<T>(acc[n][i], a[2 * i], a[2 * i + 1], wv[n][u]);
    }
  };
  if (warp < chunks) chunk(pre, warp);
  if constexpr (kEpi == kEpiFolded) quad_row_stats<M>(st, sq, stat[warp], g, t);
#pragma unroll
  for (int n = 0; n < NT; ++n)
#pragma unroll
    for (int h = 0; h < 2 * MT; ++h) {
      const int r = g + 8 * h;
      if (8 * h < M && r < M) {
        part[warp][r][8 * n + 2 * t] = acc[n][h / 2][(h % 2) * 2];
        part[warp][r][8 * n + 2 * t + 1] = acc[n][h / 2][(h % 2) * 2 + 1];
      }
    }
  __syncthreads();
#pragma unroll
  for (int o = 0; o < OPT; ++o) {
    const int i = threadIdx.x + o * THREADS, m = i / NO, c = i % NO;
    if (i >= M * NO || m >= rows || n0 + c >= N) continue;
    float s = 0.f, vs = 0.f, vq = 0.f;
#pragma unroll
    for (int j = 0; j < W; ++j) {
      s += part[j][m][c];
      if constexpr (kEpi == kEpiFolded) {
        vs += stat[j][m][0];
        vq += stat[j][m][1];
      }
    }
    y[int64_t(m) * N + n0 + c] = epilogue<T, kEpi>(s, bias_v[o], colsum_v[o], vs, vq, K, act, epi.eps, res[o]);
  }
#endif
}

// Whether a GEMV prefetches its weight rows' tails into L2 before the wait (kPrefetchMaxBytes).
template <typename T>
bool prefetch_weights(int N, int K) {
  return int64_t(N) * K * int64_t(sizeof(T)) <= kPrefetchMaxBytes;
}

// rows (<= M, the capacity: 8, 16 or 32) of x through the tensor-core kernel, without a LayerNorm.
template <typename T, int M, int kEpi>
void launch_mma(const T* x, const T* w, const T* bias, T* y, int rows, int N, int K, int act, const GemvEpi<T>& epi,
                cudaStream_t stream) {
  const unsigned blocks = static_cast<unsigned>((N + 7) / 8);  // 8 outputs a block
  const bool prefetch = prefetch_weights<T>(N, K);
  const bool one_chunk = K <= kMmaChunk * kGemvWarps;  // a chunk a warp
  if constexpr (M > 8 && MOETRT_GEMV_WIDE) {  // 16 outputs a block where that still fills the SMs
    if (one_chunk && N % 16 == 0 && N / 16 >= sm_count()) {
      launch(gemv_mma_wide_kernel<T, M, 2, kEpi>, static_cast<unsigned>(N / 16), kGemvWarps * 32, 0, stream, x, w,
             bias, y, rows, N, K, act, epi);
      return;
    }
  }
  auto kernel = one_chunk ? gemv_mma_kernel<T, M, false, 1, kEpi> : gemv_mma_kernel<T, M, false, 4, kEpi>;
  if constexpr (M > 16) {  // one wave at 3 blocks an SM, not at 2 (mma_min_blocks)
    if (one_chunk && blocks > 2u * sm_count() && blocks <= 3u * sm_count())
      kernel = gemv_mma_kernel<T, M, false, 1, kEpi, 3>;
  }
  launch(kernel, blocks, kGemvWarps * 32, 0, stream, x, w, bias, y, rows, N, K, act, prefetch, AddLn<T>{}, epi);
}

template <typename T, int M, int kEpi>
void launch_rows(const T* x, const T* w, const T* bias, T* y, int N, int K, int act, const AddLn<T>* ln,
                 const GemvEpi<T>& epi, cudaStream_t stream) {
  const unsigned grid = static_cast<unsigned>((N + kGemvWarps - 1) / kGemvWarps);
  const bool prefetch = prefetch_weights<T>(N, K);
  constexpr int kPre = 32 / Vec<T>::N;
  if constexpr (sizeof(T) == 2 && M >= kMmaMinRows) {
    const unsigned blocks = static_cast<unsigned>((N + 7) / 8);  // 8 outputs a block
    if (ln)
      launch(gemv_mma_kernel<T, M, true, 1>, blocks, kGemvWarps * 32, size_t(M + 2) * K * sizeof(T), stream, x, w,
             bias, y, M, N, K, act, prefetch, *ln, epi);
    else
      launch_mma<T, 8, kEpi>(x, w, bias, y, M, N, K, act, epi, stream);
    return;
  }
  if constexpr (M == 1 && sizeof(T) == 2) {
    if (!ln && K > 1024 && K <= 32 * kPreAllVecs * Vec<T>::N && K * sizeof(T) <= size_t(kLnMaxSmem)) {
      launch(gemv_kernel<T, 1, false, true, kPreAllVecs, kEpi>, grid, kGemvWarps * 32, size_t(K) * sizeof(T), stream,
             x, w, bias, y, N, K, act, false, AddLn<T>{}, epi);
      return;
    }
  }
  if (ln)
    launch(gemv_kernel<T, M, true>, grid, kGemvWarps * 32, size_t(M + 2) * K * sizeof(T), stream, x, w, bias, y, N,
           K, act, prefetch, *ln, epi);
  else if (M <= kStageMaxRows && size_t(M) * K * sizeof(T) <= size_t(kLnMaxSmem))
    launch(gemv_kernel<T, M, false, true, kPre, kEpi>, grid, kGemvWarps * 32, size_t(M) * K * sizeof(T), stream, x,
           w, bias, y, N, K, act, prefetch, AddLn<T>{}, epi);
  else
    launch(gemv_kernel<T, M, false, false, kPre, kEpi>, grid, kGemvWarps * 32, 0, stream, x, w, bias, y, N, K, act,
           prefetch, AddLn<T>{}, epi);
}

// kEpi other than kEpiPlain: ln is null (the entries below)
template <typename T, int kEpi = kEpiPlain>
int launch_gemv(const T* x, const T* w, const T* bias, T* y, int rows, int N, int K, int act, const AddLn<T>* ln,
                cudaStream_t stream, const GemvEpi<T>& epi = GemvEpi<T>{}) {
  if (K % Vec<T>::N) return MOETRT_ERR_BAD_SHAPE;
  if (ln && (rows > 8 || K > kLnThreads * kLnMaxVecs * Vec<T>::N ||
             size_t(rows + 2) * K * sizeof(T) > size_t(kLnMaxSmem)))
    return MOETRT_ERR_BAD_SHAPE;
  if (rows > 8) {  // 9-32 rows: fp16/bf16 only, on tensor cores
    if constexpr (sizeof(T) != 2) {
      return MOETRT_ERR_BAD_SHAPE;
    } else {
      if (rows <= 16) launch_mma<T, 16, kEpi>(x, w, bias, y, rows, N, K, act, epi, stream);
      else launch_mma<T, 32, kEpi>(x, w, bias, y, rows, N, K, act, epi, stream);
      return launch_status();
    }
  }
  switch (rows) {
    case 1: launch_rows<T, 1, kEpi>(x, w, bias, y, N, K, act, ln, epi, stream); break;
    case 2: launch_rows<T, 2, kEpi>(x, w, bias, y, N, K, act, ln, epi, stream); break;
    case 3: launch_rows<T, 3, kEpi>(x, w, bias, y, N, K, act, ln, epi, stream); break;
    case 4: launch_rows<T, 4, kEpi>(x, w, bias, y, N, K, act, ln, epi, stream); break;
    case 5: launch_rows<T, 5, kEpi>(x, w, bias, y, N, K, act, ln, epi, stream); break;
    case 6: launch_rows<T, 6, kEpi>(x, w, bias, y, N, K, act, ln, epi, stream); break;
    case 7: launch_rows<T, 7, kEpi>(x, w, bias, y, N, K, act, ln, epi, stream); break;
    case 8: launch_rows<T, 8, kEpi>(x, w, bias, y, N, K, act, ln, epi, stream); break;
    default: return MOETRT_ERR_BAD_SHAPE;
  }
  return launch_status();
}

bool bad_gemv_args(int64_t rows, int64_t n, int64_t k, int activation) {
  return rows < 0 || rows > 32 || n <= 0 || k <= 0 || n > 0x7fffffff || k > 0x7fffffff || activation < 0 ||
         activation > 2;
}

}  // namespace

MOETRT_API int moetrt_gemv(const void* x, const void* weight, const void* bias, void* y, int64_t rows, int64_t n,
                           int64_t k, int activation, int dtype, cudaStream_t stream) {
  if (bad_gemv_args(rows, n, k, activation)) return MOETRT_ERR_BAD_SHAPE;
  if (rows == 0) return 0;
  MOETRT_DISPATCH_DTYPE(dtype, T, {
    return launch_gemv<T>(static_cast<const T*>(x), static_cast<const T*>(weight), static_cast<const T*>(bias),
                          static_cast<T*>(y), static_cast<int>(rows), static_cast<int>(n), static_cast<int>(k),
                          activation, nullptr, stream);
  })
}

MOETRT_API int moetrt_add_layernorm_gemv(const void* x, const void* delta, const void* gamma, const void* beta,
                                         void* sum_out, const void* weight, const void* bias, void* y, int64_t rows,
                                         int64_t n, int64_t k, float epsilon, int activation, int dtype,
                                         cudaStream_t stream) {
  if (bad_gemv_args(rows, n, k, activation)) return MOETRT_ERR_BAD_SHAPE;
  if (rows == 0) return 0;
  MOETRT_DISPATCH_DTYPE(dtype, T, {
    const AddLn<T> ln{static_cast<const T*>(x), static_cast<const T*>(delta), static_cast<const T*>(gamma),
                      static_cast<const T*>(beta), static_cast<T*>(sum_out), epsilon};
    return launch_gemv<T>(nullptr, static_cast<const T*>(weight), static_cast<const T*>(bias), static_cast<T*>(y),
                          static_cast<int>(rows), static_cast<int>(n), static_cast<int>(k), activation, &ln, stream);
  })
}

MOETRT_API int moetrt_gemv_residual(const void* x, const void* weight, const void* bias, const void* residual, void* y,
                                    int64_t rows, int64_t n, int64_t k, int activation, int dtype,
                                    cudaStream_t stream) {
  if (bad_gemv_args(rows, n, k, activation) || !residual) return MOETRT_ERR_BAD_SHAPE;
  if (rows == 0) return 0;
  MOETRT_DISPATCH_DTYPE(dtype, T, {
    const GemvEpi<T> epi{nullptr, nullptr, static_cast<const T*>(residual), 0.f};
    return launch_gemv<T, kEpiResidual>(static_cast<const T*>(x), static_cast<const T*>(weight),
                                        static_cast<const T*>(bias), static_cast<T*>(y), static_cast<int>(rows),
                                        static_cast<int>(n), static_cast<int>(k), activation, nullptr, stream, epi);
  })
}

namespace {
// fold_layernorm: a warp per weight row n. folded[n][k] = weight[n][k] * gamma[k], the fp32 product of two 16-bit
// values (or two fp32 ones) rounded once to T, as the float64 product would be; colsum[n] sums the rounded folded
// row and bias_out[n] = bias[n] + weight[n] . beta, both in fp32.
template <typename T>
__global__ void fold_layernorm_kernel(const T* __restrict__ weight, const T* __restrict__ gamma,
                                      const T* __restrict__ beta, const T* __restrict__ bias, T* __restrict__ folded,
                                      float* __restrict__ colsum, float* __restrict__ bias_out, int n, int k) {
  const int lane = threadIdx.x & 31;
  const int64_t row = int64_t(blockIdx.x) * (blockDim.x / 32) + (threadIdx.x >> 5);
  if (row >= n) return;
  const T* w = weight + row * k;
  T* f = folded + row * k;
  float sum = 0.f, dot = 0.f;
  for (int i = lane; i < k; i += 32) {
    const float wi = to_float(w[i]);
    const T fi = from_float<T>(__fmul_rn(wi, to_float(gamma[i])));
    f[i] = fi;
    sum += to_float(fi);
    dot = __fmaf_rn(wi, to_float(beta[i]), dot);
  }
  sum = warp_sum(sum);
  dot = warp_sum(dot);
  if (lane == 0) {
    colsum[row] = sum;
    bias_out[row] = (bias ? to_float(bias[row]) : 0.f) + dot;
  }
}
}  // namespace

MOETRT_API int moetrt_fold_layernorm(const void* weight, const void* gamma, const void* beta, const void* bias,
                                     void* folded, float* colsum, float* bias_out, int64_t n, int64_t k, int dtype,
                                     cudaStream_t stream) {
  if (n <= 0 || k <= 0 || n > 0x7fffffff || k > 0x7fffffff || !weight || !gamma || !beta || !folded || !colsum ||
      !bias_out)
    return MOETRT_ERR_BAD_SHAPE;
  MOETRT_DISPATCH_DTYPE(dtype, T, {
    const unsigned blocks = static_cast<unsigned>((n + 7) / 8);
    fold_layernorm_kernel<T><<<blocks, 256, 0, stream>>>(
        static_cast<const T*>(weight), static_cast<const T*>(gamma), static_cast<const T*>(beta),
        static_cast<const T*>(bias), static_cast<T*>(folded), colsum, bias_out, static_cast<int>(n),
        static_cast<int>(k));
    return launch_status();
  })
}

MOETRT_API int moetrt_gemv_folded(const void* x, const void* weight, const float* colsum, const float* bias, void* y,
                                  int64_t rows, int64_t n, int64_t k, float epsilon, int activation, int dtype,
                                  cudaStream_t stream) {
  if (bad_gemv_args(rows, n, k, activation) || !colsum || !bias) return MOETRT_ERR_BAD_SHAPE;
  if (rows == 0) return 0;
  MOETRT_DISPATCH_DTYPE(dtype, T, {
    const GemvEpi<T> epi{colsum, bias, nullptr, epsilon};
    return launch_gemv<T, kEpiFolded>(static_cast<const T*>(x), static_cast<const T*>(weight), nullptr,
                                      static_cast<T*>(y), static_cast<int>(rows), static_cast<int>(n),
                                      static_cast<int>(k), activation, nullptr, stream, epi);
  })
}
