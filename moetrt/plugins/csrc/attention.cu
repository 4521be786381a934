// Attention over an in-place KV cache.
//
// qkv [B, T, 3h] in Megatron order (per head: q, k, v of head_dim each); kv_cache [2, max_batch, H, max_seq, D];
// past_lengths [B]: tokens already cached per sequence. New K/V go to slots past_lengths[b] + t; query t sees
// slots <= past_lengths[b] + t. Scores, softmax and accumulation in fp32. out [B, T, h].
//
// T == 1 (decode): split-K over the cache in chunks of kChunk keys, one block per (chunk, head, sequence); the
// block owning slot past_lengths[b] writes the new K/V; the last block of a (sequence, head) to finish
// combines the partial softmaxes (a counter per (b, h) in the workspace, left at zero afterwards).
// T > 1 (prefill): K/V of all new tokens are written first, then one block per (query tile, head, sequence)
// walks key tiles of 64 with an online softmax; no T x T matrix exists beyond a tile. fp16/bf16 with head_dim
// 16..64 use tensor cores (WMMA: 4 warps x 16 queries; S = QK^T and PV in fp32 accumulators, the softmax in
// fp32, P rounded to the input type for the PV product); other cases a scalar kernel (2 threads per query).
#include <mma.h>

#include "common.cuh"

using namespace moetrt;

namespace {

// Keys per decode block, and its threads: 256 and 256 against 128 and 128, on an H100 (docs/bench/log.md):
// 350M decode graphs 0.674 / 1.508 / 2.359 ms at batch 1 / 8 / 32 vs 0.722 / 1.548 / 2.393 (contexts of 129-256
// need no combining of splits), cache 2048 unchanged. 256 keys with 128 threads (half the keys loaded after the
// wait) measured slower than 128 and 128.
constexpr int kChunk = 256;
constexpr int kDecodeThreads = 256;
constexpr int kMaxHeadDim = 128;
constexpr int kMaxSplits = 256;    // max_seq <= kMaxSplits * kChunk

struct Layout {
  int64_t batch_stride, head_stride, half;  // elements: per cache row, per head, K->V offset
};

__host__ __device__ inline Layout cache_layout(int max_batch, int heads, int max_seq, int head_dim) {
  Layout l;
  l.head_stride = int64_t(max_seq) * head_dim;
  l.batch_stride = l.head_stride * heads;
  l.half = l.batch_stride * max_batch;
  return l;
}

// A group of D/N lanes holds one key (N elements of 16 bytes each lane); KPP keys per pass over the block;
// up to U = 8 passes' loads are issued before any is used. The first U passes' cached keys (slots before
// past_lengths[b]: earlier steps' results) are loaded before the wait for the preceding kernel, and with kEarlyV
// (grids of at most a wave or two, where latency binds, not occupancy) their values too; the new token's key and
// value come from qkv, not from the cache slot this kernel writes.
template <typename T, int D, bool kEarlyV>
__global__ void __launch_bounds__(kDecodeThreads) attention_decode_kernel(
    const T* __restrict__ qkv, T* __restrict__ cache, const int32_t* __restrict__ past_lengths, T* __restrict__ out,
    float* __restrict__ partial, int32_t* __restrict__ counters, int heads, int max_batch, int max_seq,
    int max_splits) {
  constexpr int N = Vec<T>::N, GROUP = D / N, KPP = kDecodeThreads / GROUP, PASSES = kChunk / KPP;
  constexpr int U = PASSES < 8 ? PASSES : 8;
  static_assert(GROUP <= 32 && (GROUP & (GROUP - 1)) == 0 && PASSES >= 1, "unsupported head_dim");
  launch_dependents();  // at entry (common.cuh: programmatic dependent launch)
  const int split = blockIdx.x, h = blockIdx.y, b = blockIdx.z;
  const int past = __ldcg(past_lengths + b);
  const int len = past + 1;
  const int start = split * kChunk;
  const int stop = min(start + kChunk, len);
  const Layout L = cache_layout(max_batch, heads, max_seq, D);
  T* kcache = cache + b * L.batch_stride + h * L.head_stride;
  T* vcache = kcache + L.half;
  const int lane_in_group = threadIdx.x % GROUP, key_slot = threadIdx.x / GROUP;
  Vec<T> k_first[U], v_first[U];
#pragma unroll
  for (int u = 0; u < U; ++u) {
    const int j = start + u * KPP + key_slot;
    if (j < past) {
      k_first[u].load_cg(kcache + int64_t(j) * D + lane_in_group * N);
      if (kEarlyV) v_first[u].load_cg(vcache + int64_t(j) * D + lane_in_group * N);
    }
  }
  // A chunk past this sequence's keys leaves at once rather than holding its slot until the wait is over
  // (H100, 350M decode graph at batch 1: 0.6126 against 0.6160 ms; docs/bench/log.md).
  if (start >= len) return;
  dependency_wait();  // its dependents were launched at entry
  const int splits = (len + kChunk - 1) / kChunk;
  const T* q = qkv + int64_t(b) * 3 * heads * D + int64_t(h) * 3 * D;
  __shared__ float score[kChunk];
  __shared__ float red_s[kDecodeThreads][N + 1];
  __shared__ float scratch[32];
  if (past >= start) {  // this block owns the new token's slot
    for (int d = threadIdx.x; d < D; d += blockDim.x) {
      kcache[int64_t(past) * D + d] = q[D + d];
      vcache[int64_t(past) * D + d] = q[2 * D + d];
    }
  }
  float qv[N];
  {
    Vec<T> qq;
    qq.load(q + lane_in_group * N);
    const float scale = rsqrtf(static_cast<float>(D));
#pragma unroll
    for (int i = 0; i < N; ++i) qv[i] = to_float(qq.v[i]) * scale;
  }

  // U passes' worth of this thread's 16-byte slices of keys (or values; `fresh` is the new token's), loaded
  // before any is used; the first U passes were loaded before the wait, except the new token's
  auto load_passes = [&](Vec<T>(&dst)[U], const Vec<T>(&first)[U], bool have_first, const T* rows,
                         const T* fresh, int p0) {
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int j = start + (p0 + u) * KPP + key_slot;
      if (j == past) dst[u].load(fresh + lane_in_group * N);
      else if (p0 == 0 && have_first) dst[u] = first[u];
      else if (j < stop) dst[u].load(rows + int64_t(j) * D + lane_in_group * N);
    }
  };
  for (int p0 = 0; p0 < PASSES; p0 += U) {
    Vec<T> kv[U];
    load_passes(kv, k_first, true, kcache, q + D, p0);
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int j = start + (p0 + u) * KPP + key_slot;
      float s = 0.f;
      if (j < stop) {
#pragma unroll
        for (int i = 0; i < N; ++i) s += qv[i] * to_float(kv[u].v[i]);
      }
#pragma unroll
      for (int o = GROUP / 2; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o, GROUP);
      if (j < stop && lane_in_group == 0) score[j - start] = s;
    }
  }
  __syncthreads();
  float m = -INFINITY;
  for (int j = threadIdx.x; j < stop - start; j += blockDim.x) m = fmaxf(m, score[j]);
  m = block_max(m, scratch);
  float l = 0.f;
  for (int j = threadIdx.x; j < stop - start; j += blockDim.x) {
    const float p = __expf(score[j] - m);
    score[j] = p;
    l += p;
  }
  l = block_sum(l, scratch);  // its barriers also publish the score writes

  float acc[N];
#pragma unroll
  for (int i = 0; i < N; ++i) acc[i] = 0.f;
  for (int p0 = 0; p0 < PASSES; p0 += U) {
    Vec<T> vv[U];
    load_passes(vv, v_first, kEarlyV, vcache, q + 2 * D, p0);
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int j = start + (p0 + u) * KPP + key_slot;
      if (j < stop) {
        const float p = score[j - start];
#pragma unroll
        for (int i = 0; i < N; ++i) acc[i] += p * to_float(vv[u].v[i]);
      }
    }
  }
#pragma unroll
  for (int i = 0; i < N; ++i) red_s[threadIdx.x][i] = acc[i];
  __syncthreads();
  float* mine = partial + ((int64_t(b) * heads + h) * max_splits + split) * (D + 2);
  for (int d = threadIdx.x; d < D; d += blockDim.x) {
    const int lane = d / N, i = d % N;
    float s = 0.f;
    for (int ks = 0; ks < KPP; ++ks) s += red_s[ks * GROUP + lane][i];
    if (splits == 1) out[(int64_t(b) * heads + h) * D + d] = from_float<T>(s / l);
    else mine[2 + d] = s;
  }
  if (splits == 1) return;
  if (threadIdx.x == 0) { mine[0] = m; mine[1] = l; }

  // the last of this (b, h)'s blocks to finish combines the partial softmaxes
  __shared__ bool last;
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0) last = atomicAdd(&counters[b * heads + h], 1) == splits - 1;
  __syncthreads();
  if (!last) return;
  __threadfence();
  // combine: split weights through shared memory, then each output channel sums over the splits with
  // independent loads (read around L1: other blocks wrote these)
  const float* base = partial + (int64_t(b) * heads + h) * max_splits * (D + 2);
  __shared__ float split_m[kMaxSplits], split_w[kMaxSplits];
  for (int s = threadIdx.x; s < splits; s += blockDim.x) {
    split_m[s] = __ldcg(base + s * (D + 2));
    split_w[s] = __ldcg(base + s * (D + 2) + 1);  // l_s for now
  }
  __syncthreads();
  float M = -INFINITY;
  for (int s = 0; s < splits; ++s) M = fmaxf(M, split_m[s]);
  float total = 0.f;
  for (int s = 0; s < splits; ++s) total += split_w[s] * __expf(split_m[s] - M);
  __syncthreads();
  for (int s = threadIdx.x; s < splits; s += blockDim.x) split_w[s] = __expf(split_m[s] - M) / total;
  __syncthreads();
  for (int d = threadIdx.x; d < D; d += blockDim.x) {
    float v = 0.f;
#pragma unroll 8
    for (int s = 0; s < splits; ++s) v += split_w[s] * __ldcg(base + s * (D + 2) + 2 + d);
    out[(int64_t(b) * heads + h) * D + d] = from_float<T>(v);
  }
  if (threadIdx.x == 0) counters[b * heads + h] = 0;
}

template <typename T>
__global__ void kv_write_kernel(const T* __restrict__ qkv, T* __restrict__ cache, const int32_t* __restrict__ past_lengths,
                                int tokens, int heads, int head_dim, int max_batch, int max_seq) {
  enter_after_predecessor();
  const int t = blockIdx.x, b = blockIdx.y;
  const Layout L = cache_layout(max_batch, heads, max_seq, head_dim);
  const int slot = past_lengths[b] + t;
  const T* row = qkv + (int64_t(b) * tokens + t) * 3 * heads * head_dim;
  for (int i = threadIdx.x; i < heads * head_dim; i += blockDim.x) {
    const int h = i / head_dim, d = i % head_dim;
    const int64_t dst = b * L.batch_stride + h * L.head_stride + int64_t(slot) * head_dim + d;
    cache[dst] = row[(h * 3 + 1) * head_dim + d];
    cache[dst + L.half] = row[(h * 3 + 2) * head_dim + d];
  }
}

constexpr int kTile = 32;             // queries per block (small: short prompts still fill the SMs)
constexpr int kPrefillThreads = 64;   // two threads per query, each owning half of head_dim

// KT keys per shared-memory tile: K and V tiles as fp32 stay under 48 KB.
template <typename T, int D, int KT = (D <= 64 ? 64 : 32)>
__global__ void __launch_bounds__(kPrefillThreads) attention_prefill_kernel(
    const T* __restrict__ qkv, const T* __restrict__ cache, const int32_t* __restrict__ past_lengths,
    T* __restrict__ out, int tokens, int heads, int max_batch, int max_seq) {
  constexpr int HALF = D / 2;
  enter_after_predecessor();
  const int qt = blockIdx.x, h = blockIdx.y, b = blockIdx.z;
  const int past = past_lengths[b];
  const Layout L = cache_layout(max_batch, heads, max_seq, D);
  const T* kcache = cache + b * L.batch_stride + h * L.head_stride;
  const T* vcache = kcache + L.half;
  __shared__ float k_s[KT][D + 1];
  __shared__ float v_s[KT][D + 1];
  const int qi = threadIdx.x / 2, part = threadIdx.x % 2;
  const int t = qt * kTile + qi;
  const bool valid = t < tokens;
  const int my_slot = past + t;
  float q[HALF], acc[HALF];
  const float scale = rsqrtf(static_cast<float>(D));
  const T* qrow = qkv + (int64_t(b) * tokens + min(t, tokens - 1)) * 3 * heads * D + h * 3 * D + part * HALF;
#pragma unroll
  for (int i = 0; i < HALF; ++i) { q[i] = to_float(qrow[i]) * scale; acc[i] = 0.f; }
  float m = -INFINITY, l = 0.f;
  const int last_slot = past + min(tokens, (qt + 1) * kTile) - 1;  // keys this block needs
  for (int k0 = 0; k0 <= last_slot; k0 += KT) {
    __syncthreads();
    for (int i = threadIdx.x; i < KT * D; i += blockDim.x) {
      const int r = i / D, c = i % D;
      const bool in = k0 + r <= last_slot;
      k_s[r][c] = in ? to_float(kcache[int64_t(k0 + r) * D + c]) : 0.f;
      v_s[r][c] = in ? to_float(vcache[int64_t(k0 + r) * D + c]) : 0.f;
    }
    __syncthreads();
    const int kmax = min(KT, my_slot - k0 + 1);  // keys visible to this query in the tile
    for (int j = 0; j < KT; ++j) {
      float s = 0.f;
#pragma unroll
      for (int i = 0; i < HALF; ++i) s += q[i] * k_s[j][part * HALF + i];
      s += __shfl_xor_sync(0xffffffffu, s, 1);
      if (!valid || j >= kmax) continue;  // both threads of a query take the same branch
      const float m_new = fmaxf(m, s);
      const float corr = __expf(m - m_new), p = __expf(s - m_new);
      l = l * corr + p;
#pragma unroll
      for (int i = 0; i < HALF; ++i) acc[i] = acc[i] * corr + p * v_s[j][part * HALF + i];
      m = m_new;
    }
  }
  if (!valid) return;
  T* orow = out + (int64_t(b) * tokens + t) * heads * D + h * D + part * HALF;
#pragma unroll
  for (int i = 0; i < HALF; ++i) orow[i] = from_float<T>(acc[i] / l);
}


// Tensor-core prefill: a block of 4 warps owns 64 queries (16 per warp) of one (sequence, head).
constexpr int kWQ = 64, kWK = 64, kWThreads = 128;

template <typename T, int D>
__global__ void __launch_bounds__(kWThreads) attention_prefill_wmma_kernel(
    const T* __restrict__ qkv, const T* __restrict__ cache, const int32_t* __restrict__ past_lengths,
    T* __restrict__ out, int tokens, int heads, int max_batch, int max_seq) {
  namespace wmma = nvcuda::wmma;
  constexpr int VN = 16 / sizeof(T);  // elements per 16-byte vector
  __shared__ __align__(32) T q_s[kWQ][D];
  __shared__ __align__(32) T k_s[kWK][D];
  __shared__ __align__(32) T v_s[kWK][D];
  __shared__ __align__(32) float s_s[4][16][kWK];  // scores, then the P·V product of the tile
  __shared__ __align__(32) T p_s[4][16][kWK];
  enter_after_predecessor();
  const int q0 = blockIdx.x * kWQ, h = blockIdx.y, b = blockIdx.z;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int past = past_lengths[b];
  const Layout L = cache_layout(max_batch, heads, max_seq, D);
  const T* kcache = cache + b * L.batch_stride + h * L.head_stride;
  const T* vcache = kcache + L.half;
  const int64_t row_stride = int64_t(3) * heads * D;
  for (int i = threadIdx.x; i < kWQ * D / VN; i += kWThreads) {
    const int r = i / (D / VN), c = (i % (D / VN)) * VN;
    Vec<T> v;
    if (q0 + r < tokens) v.load(qkv + (int64_t(b) * tokens + q0 + r) * row_stride + h * 3 * D + c);
    else v.raw = make_uint4(0, 0, 0, 0);
    v.store(&q_s[r][c]);
  }
  // this lane's share of the warp's 16 rows: row lane/2, half the columns
  const int row = lane / 2, half = lane % 2;
  const int t = q0 + warp * 16 + row;
  const int my_slot = past + t;
  const bool valid = t < tokens;
  constexpr int OC = D / 2;
  float o[OC];
#pragma unroll
  for (int i = 0; i < OC; ++i) o[i] = 0.f;
  float m = -INFINITY, l = 0.f;
  const float scale = rsqrtf(static_cast<float>(D));
  const int last_slot = past + min(tokens, q0 + kWQ) - 1;
  const int warp_last = past + min(tokens - 1, q0 + warp * 16 + 15);  // the warp's last query slot
  using WT = T;
  for (int k0 = 0; k0 <= last_slot; k0 += kWK) {
    __syncthreads();
    for (int i = threadIdx.x; i < kWK * D / VN; i += kWThreads) {
      const int r = i / (D / VN), c = (i % (D / VN)) * VN;
      Vec<T> kv, vv;
      if (k0 + r <= last_slot) {
        kv.load(kcache + int64_t(k0 + r) * D + c);
        vv.load(vcache + int64_t(k0 + r) * D + c);
      } else {
        kv.raw = vv.raw = make_uint4(0, 0, 0, 0);
      }
      kv.store(&k_s[r][c]);
      vv.store(&v_s[r][c]);
    }
    __syncthreads();
    if (k0 > warp_last) continue;  // every key of the tile is after every query of this warp
    // S = Q K^T for the warp's 16 queries x 64 keys
#pragma unroll
    for (int n = 0; n < kWK / 16; ++n) {
      wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
      wmma::fill_fragment(acc, 0.f);
#pragma unroll
      for (int kk = 0; kk < D / 16; ++kk) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, WT, wmma::row_major> a;
        wmma::fragment<wmma::matrix_b, 16, 16, 16, WT, wmma::col_major> bm;
        wmma::load_matrix_sync(a, reinterpret_cast<const WT*>(&q_s[warp * 16][kk * 16]), D);
        wmma::load_matrix_sync(bm, reinterpret_cast<const WT*>(&k_s[n * 16][kk * 16]), D);
        wmma::mma_sync(acc, a, bm, acc);
      }
      wmma::store_matrix_sync(&s_s[warp][0][n * 16], acc, kWK, wmma::mem_row_major);
    }
    __syncwarp();
    // online softmax over this tile's 64 columns: 2 lanes per row, 32 columns each
    constexpr int HC = kWK / 2;
    float sv[HC];
    float tile_max = -INFINITY;
#pragma unroll
    for (int j = 0; j < HC; ++j) {
      const int c = half * HC + j;
      const bool vis = valid && k0 + c <= my_slot;
      sv[j] = vis ? s_s[warp][row][c] * scale : -INFINITY;
      tile_max = fmaxf(tile_max, sv[j]);
    }
    tile_max = fmaxf(tile_max, __shfl_xor_sync(0xffffffffu, tile_max, 1));
    const float m_new = fmaxf(m, tile_max);
    const float corr = m_new == -INFINITY ? 1.f : __expf(m - m_new);
    float psum = 0.f;
#pragma unroll
    for (int j = 0; j < HC; ++j) {
      const float pj = sv[j] == -INFINITY ? 0.f : __expf(sv[j] - m_new);
      psum += pj;
      p_s[warp][row][half * HC + j] = from_float<T>(pj);
    }
    psum += __shfl_xor_sync(0xffffffffu, psum, 1);
    l = l * corr + psum;
    m = m_new;
    __syncwarp();
    // the tile's P V (16 x D) into s_s, then added to this lane's accumulators
#pragma unroll
    for (int n = 0; n < D / 16; ++n) {
      wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
      wmma::fill_fragment(acc, 0.f);
#pragma unroll
      for (int kk = 0; kk < kWK / 16; ++kk) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, WT, wmma::row_major> a;
        wmma::fragment<wmma::matrix_b, 16, 16, 16, WT, wmma::row_major> bm;
        wmma::load_matrix_sync(a, reinterpret_cast<const WT*>(&p_s[warp][0][kk * 16]), kWK);
        wmma::load_matrix_sync(bm, reinterpret_cast<const WT*>(&v_s[kk * 16][n * 16]), D);
        wmma::mma_sync(acc, a, bm, acc);
      }
      wmma::store_matrix_sync(&s_s[warp][0][n * 16], acc, kWK, wmma::mem_row_major);
    }
    __syncwarp();
#pragma unroll
    for (int i = 0; i < OC; ++i) o[i] = o[i] * corr + s_s[warp][row][half * OC + i];
    __syncwarp();
  }
  if (!valid) return;
  T* orow = out + (int64_t(b) * tokens + t) * heads * D + h * D + half * OC;
  const float inv = 1.f / l;
#pragma unroll
  for (int i = 0; i < OC; ++i) orow[i] = from_float<T>(o[i] * inv);
}

template <typename T>
bool launch_prefill_wmma(const T* qkv, T* cache, const int32_t* past, T* out, int batch, int tokens, int heads,
                         int head_dim, int max_batch, int max_seq, cudaStream_t stream) {
  if constexpr (sizeof(T) != 2) {
    return false;  // fp32: the scalar kernel
  } else {
    const dim3 grid((tokens + kWQ - 1) / kWQ, heads, batch);
    switch (head_dim) {
      case 16:
        launch_if(false, attention_prefill_wmma_kernel<T, 16>, grid, kWThreads, 0, stream, qkv, cache, past, out,
                  tokens, heads, max_batch, max_seq);
        return true;
      case 32:
        launch_if(false, attention_prefill_wmma_kernel<T, 32>, grid, kWThreads, 0, stream, qkv, cache, past, out,
                  tokens, heads, max_batch, max_seq);
        return true;
      case 64:
        launch_if(false, attention_prefill_wmma_kernel<T, 64>, grid, kWThreads, 0, stream, qkv, cache, past, out,
                  tokens, heads, max_batch, max_seq);
        return true;
      default:
        return false;
    }
  }
}

template <typename T>
int launch_attention(const T* qkv, T* cache, const int32_t* past, T* out, int batch, int tokens, int heads,
                     int head_dim, int max_batch, int max_seq, float* partial, int32_t* counters, cudaStream_t stream) {
  if (tokens == 1) {
    const dim3 grid((max_seq + kChunk - 1) / kChunk, heads, batch);
    const int splits = grid.x;
    const bool early_v = int64_t(grid.x) * heads * batch <= 2 * sm_count();
#define MOETRT_DECODE(DIM)                                                                                     \
  if (early_v)                                                                                                 \
    launch(attention_decode_kernel<T, DIM, true>, grid, kDecodeThreads, 0, stream, qkv, cache, past, out,     \
           partial, counters, heads, max_batch, max_seq, splits);                                              \
  else                                                                                                         \
    launch(attention_decode_kernel<T, DIM, false>, grid, kDecodeThreads, 0, stream, qkv, cache, past, out,    \
           partial, counters, heads, max_batch, max_seq, splits);
    switch (head_dim) {
      case 16: MOETRT_DECODE(16) break;
      case 32: MOETRT_DECODE(32) break;
      case 64: MOETRT_DECODE(64) break;
      case 128: MOETRT_DECODE(128) break;
      default: return MOETRT_ERR_BAD_SHAPE;
    }
#undef MOETRT_DECODE
    return launch_status();
  }
  launch_if(false, kv_write_kernel<T>, dim3(tokens, batch), 256, 0, stream, qkv, cache, past, tokens, heads, head_dim,
            max_batch, max_seq);
  if (launch_prefill_wmma<T>(qkv, cache, past, out, batch, tokens, heads, head_dim, max_batch, max_seq, stream))
    return launch_status();
  const dim3 grid((tokens + kTile - 1) / kTile, heads, batch);
  switch (head_dim) {
#define MOETRT_PREFILL(DIM)                                                                                    \
  launch_if(false, attention_prefill_kernel<T, DIM>, grid, kPrefillThreads, 0, stream, qkv, cache, past, out, tokens, \
            heads, max_batch, max_seq);
    case 64: MOETRT_PREFILL(64) break;
    case 128: MOETRT_PREFILL(128) break;
    case 16: MOETRT_PREFILL(16) break;
    case 32: MOETRT_PREFILL(32) break;
#undef MOETRT_PREFILL
    default: return MOETRT_ERR_BAD_SHAPE;
  }
  return launch_status();
}

}  // namespace

// The layout depends on max_batch only (counters for every (b, h) of the cache, then the partials), never on a
// call's batch: calls of different batch sizes share one workspace, and one call's partials must not land where
// another expects its zeroed counters.
MOETRT_API int moetrt_attention_workspace_size(int max_batch, int num_heads, int head_dim, int max_seq,
                                               size_t* bytes) {
  if (max_batch < 0 || num_heads <= 0 || head_dim <= 0 || max_seq <= 0 || !bytes) return MOETRT_ERR_BAD_SHAPE;
  const size_t splits = (max_seq + kChunk - 1) / kChunk;
  const size_t counters = size_t(max_batch) * num_heads * sizeof(int32_t);
  *bytes = ((counters + 255) / 256) * 256 + size_t(max_batch) * num_heads * splits * (head_dim + 2) * sizeof(float);
  return 0;
}

MOETRT_API int moetrt_attention(const void* qkv, void* kv_cache, const int32_t* past_lengths, void* out, int batch,
                                int tokens, int num_heads, int head_dim, int max_batch, int max_seq, int dtype,
                                void* workspace, size_t workspace_bytes, cudaStream_t stream) {
  if (batch < 0 || tokens < 0 || batch > max_batch || tokens > max_seq || num_heads <= 0 || head_dim <= 0 ||
      head_dim > kMaxHeadDim || max_seq > kMaxSplits * kChunk)
    return MOETRT_ERR_BAD_SHAPE;
  if (batch == 0 || tokens == 0) return 0;
  size_t need = 0;
  moetrt_attention_workspace_size(max_batch, num_heads, head_dim, max_seq, &need);
  if (workspace_bytes < need) return MOETRT_ERR_BAD_SHAPE;
  int32_t* counters = static_cast<int32_t*>(workspace);
  float* partial = reinterpret_cast<float*>(static_cast<char*>(workspace) +
                                            ((size_t(max_batch) * num_heads * sizeof(int32_t) + 255) / 256) * 256);
  MOETRT_DISPATCH_DTYPE(dtype, T, {
    return launch_attention<T>(static_cast<const T*>(qkv), static_cast<T*>(kv_cache), past_lengths,
                               static_cast<T*>(out), batch, tokens, num_heads, head_dim, max_batch, max_seq,
                               partial, counters, stream);
  })
}
