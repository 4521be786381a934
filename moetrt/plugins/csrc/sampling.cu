// Runtime helpers around the step graph: gathering the rows whose logits are wanted, and token sampling.
//
// Sampling runs one block per row. Greedy is an argmax (lowest index on ties, as numpy's argmax). Otherwise
// the logits are scaled by 1/temperature; top-k keeps the values >= the k-th largest (found exactly, bit by
// bit, on the order-preserving integer image of the floats: 32 counting passes); top-p keeps the values >= the
// largest threshold whose kept probability mass is >= top_p (32 more passes); a uniform number from a
// counter-based hash of (seed, step, row) then picks the token by inverse CDF in index order. Ties at a
// threshold are all kept. Deterministic for a given input.
#include "common.cuh"

using namespace moetrt;

namespace {

constexpr int kThreads = 1024;

template <typename T>
__global__ void gather_rows_kernel(const T* __restrict__ src, const int32_t* __restrict__ rows, T* __restrict__ dst,
                                   int64_t cols, int64_t src_rows) {
  enter_after_predecessor();
  const int64_t r = blockIdx.x;
  const int64_t s = min(max(static_cast<int64_t>(rows[r]), int64_t(0)), src_rows - 1);
  for (int64_t i = threadIdx.x; i < cols; i += blockDim.x) dst[r * cols + i] = src[s * cols + i];
}

__device__ __forceinline__ uint32_t order_key(float f) {  // monotone: a < b  <=>  key(a) < key(b)
  const uint32_t b = __float_as_uint(f);
  return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}

__device__ __forceinline__ uint64_t splitmix64(uint64_t z) {
  z += 0x9e3779b97f4a7c15ull;
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

// Sum of an integer over the block (every thread gets it).
__device__ __forceinline__ unsigned block_count(unsigned v, unsigned* scratch) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  __syncthreads();
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  v = lane < (kThreads / 32) ? scratch[lane] : 0u;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// Where a row's token goes besides `out`: with input_ids, the next decode step's inputs (its token id, and its past
// length and position one further, in place); with host_tokens, mapped pinned memory the host reads once the
// kernel is done. Saves a decode step the copies between the sampling and the next graph (moetrt_sample_advance).
struct Advance {
  int32_t *input_ids, *position_ids, *past_lengths, *host_tokens;
};
__device__ __forceinline__ void emit_token(int32_t* out, const Advance& a, int32_t token) {
  const int b = blockIdx.x;
  out[b] = token;
  if (a.host_tokens) a.host_tokens[b] = token;
  if (a.input_ids) {
    a.input_ids[b] = token;
    const int32_t past = a.past_lengths[b] + 1;
    a.past_lengths[b] = past;
    a.position_ids[b] = past;  // one new token a sequence: its position is the past length
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads) sample_kernel(const T* __restrict__ logits, int32_t* __restrict__ out,
                                                          int64_t vocab, float inv_temperature, int top_k,
                                                          float top_p, uint64_t seed, uint64_t step, Advance adv) {
  __shared__ float fscratch[32];
  __shared__ unsigned uscratch[32];
  __shared__ float chunk_prefix[kThreads];
  enter_after_predecessor();
  const T* x = logits + static_cast<int64_t>(blockIdx.x) * vocab;
  const int tid = threadIdx.x;

  if (inv_temperature <= 0.f || top_k == 1) {  // greedy
    float best = -INFINITY;
    int64_t best_i = vocab;
    for (int64_t i = tid; i < vocab; i += kThreads) {
      const float v = to_float(x[i]);
      if (best_i == vocab || v > best) best = v, best_i = i;  // strided ascending: first max kept
    }
    const float m = block_max(best, fscratch);
    // lowest index holding the maximum
    int64_t cand = best == m ? best_i : vocab;
    __shared__ int64_t imin[32];
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) cand = min(cand, __shfl_xor_sync(0xffffffffu, cand, o));
    __syncthreads();
    if ((tid & 31) == 0) imin[tid >> 5] = cand;
    __syncthreads();
    if (tid == 0) {
      int64_t r = imin[0];
      for (int w = 1; w < kThreads / 32; ++w) r = min(r, imin[w]);
      emit_token(out, adv, static_cast<int32_t>(r));
    }
    return;
  }

  float local_max = -INFINITY;
  for (int64_t i = tid; i < vocab; i += kThreads) local_max = fmaxf(local_max, to_float(x[i]) * inv_temperature);
  const float m = block_max(local_max, fscratch);

  // top-k: the largest key K with count(key >= K) >= top_k, i.e. the k-th largest value.
  uint32_t kth = 0;
  if (top_k > 0 && top_k < vocab) {
    for (int bit = 31; bit >= 0; --bit) {
      const uint32_t cand = kth | (1u << bit);
      unsigned c = 0;
      for (int64_t i = tid; i < vocab; i += kThreads) c += order_key(to_float(x[i]) * inv_temperature) >= cand;
      if (block_count(c, uscratch) >= static_cast<unsigned>(top_k)) kth = cand;
    }
  }
  // top-p: the largest key P >= kth whose kept mass is >= top_p of the mass kept by top-k.
  uint32_t thr = kth;
  if (top_p < 1.f) {
    float kept = 0.f;
    for (int64_t i = tid; i < vocab; i += kThreads) {
      const float s = to_float(x[i]) * inv_temperature;
      if (order_key(s) >= kth) kept += __expf(s - m);
    }
    const float target = block_sum(kept, fscratch) * top_p;
    uint32_t p = 0;
    for (int bit = 31; bit >= 0; --bit) {
      const uint32_t cand = p | (1u << bit);
      float mass = 0.f;
      for (int64_t i = tid; i < vocab; i += kThreads) {
        const float s = to_float(x[i]) * inv_temperature;
        if (order_key(s) >= cand) mass += __expf(s - m);
      }
      if (block_sum(mass, fscratch) >= target) p = cand;
    }
    thr = max(thr, p);
  }

  // Inverse CDF in index order over the kept tokens: each thread owns a contiguous chunk.
  const int64_t chunk = (vocab + kThreads - 1) / kThreads;
  const int64_t lo = min(vocab, tid * chunk), hi = min(vocab, lo + chunk);
  float mine = 0.f;
  int64_t last_kept = -1;
  for (int64_t i = lo; i < hi; ++i) {
    const float s = to_float(x[i]) * inv_temperature;
    if (order_key(s) >= thr) mine += __expf(s - m), last_kept = i;
  }
  chunk_prefix[tid] = mine;
  __syncthreads();
  for (int off = 1; off < kThreads; off <<= 1) {  // inclusive scan (Hillis-Steele)
    const float add = tid >= off ? chunk_prefix[tid - off] : 0.f;
    __syncthreads();
    chunk_prefix[tid] += add;
    __syncthreads();
  }
  const float total = chunk_prefix[kThreads - 1];
  const uint64_t bits = splitmix64(seed ^ splitmix64(step * 0x2545f4914f6cdd1dull + blockIdx.x));
  const float u = static_cast<float>(static_cast<double>(bits >> 11) * 0x1.0p-53) * total;
  const float before = chunk_prefix[tid] - mine;
  __shared__ int64_t picked;
  if (tid == 0) picked = -1;
  __syncthreads();
  if (mine > 0.f && u >= before && u < before + mine) {  // at most one thread's range holds u
    float acc = before;
    int64_t choice = last_kept;
    for (int64_t i = lo; i < hi; ++i) {
      const float s = to_float(x[i]) * inv_temperature;
      if (order_key(s) < thr) continue;
      acc += __expf(s - m);
      if (u < acc) { choice = i; break; }
    }
    picked = choice;
  }
  __syncthreads();
  if (picked < 0) {  // u fell past the last kept token through rounding: take the last kept token
    int64_t v = last_kept;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = max(v, __shfl_xor_sync(0xffffffffu, v, o));
    __shared__ int64_t imax[32];
    if ((tid & 31) == 0) imax[tid >> 5] = v;
    __syncthreads();
    if (tid == 0) {
      for (int w = 1; w < kThreads / 32; ++w) v = max(v, imax[w]);
      picked = max(v, imax[0]);
    }
    __syncthreads();
  }
  if (tid == 0) emit_token(out, adv, static_cast<int32_t>(picked));
}

}  // namespace

MOETRT_API int moetrt_gather_rows(const void* src, const int32_t* rows, void* dst, int64_t num_rows, int64_t cols,
                                  int64_t src_rows, int dtype, cudaStream_t stream) {
  if (num_rows < 0 || num_rows > 0x7fffffff || cols <= 0 || src_rows <= 0) return MOETRT_ERR_BAD_SHAPE;
  if (num_rows == 0) return 0;
  MOETRT_DISPATCH_DTYPE(dtype, T, {
    launch(gather_rows_kernel<T>, static_cast<unsigned>(num_rows), 256, 0, stream, static_cast<const T*>(src), rows,
           static_cast<T*>(dst), cols, src_rows);
    return launch_status();
  })
}

MOETRT_API int moetrt_sample_advance(const void* logits, int32_t* out_tokens, int batch, int64_t vocab,
                                     float temperature, int top_k, float top_p, uint64_t seed, uint64_t step, int dtype,
                                     int32_t* input_ids, int32_t* position_ids, int32_t* past_lengths,
                                     int32_t* host_tokens, cudaStream_t stream) {
  if (batch < 0 || vocab <= 0 || vocab > 0x7fffffff || top_k < 0 || !(top_p > 0.f && top_p <= 1.f) ||
      temperature < 0.f || (input_ids && (!position_ids || !past_lengths)))
    return MOETRT_ERR_BAD_SHAPE;
  if (batch == 0) return 0;
  const float inv_t = temperature > 0.f ? 1.f / temperature : 0.f;
  const Advance adv{input_ids, position_ids, past_lengths, host_tokens};
  MOETRT_DISPATCH_DTYPE(dtype, T, {
    launch(sample_kernel<T>, batch, kThreads, 0, stream, static_cast<const T*>(logits), out_tokens, vocab, inv_t,
           top_k, top_p, seed, step, adv);
    return launch_status();
  })
}

MOETRT_API int moetrt_sample(const void* logits, int32_t* out_tokens, int batch, int64_t vocab, float temperature,
                             int top_k, float top_p, uint64_t seed, uint64_t step, int dtype, cudaStream_t stream) {
  return moetrt_sample_advance(logits, out_tokens, batch, vocab, temperature, top_k, top_p, seed, step, dtype, nullptr,
                               nullptr, nullptr, nullptr, stream);
}
