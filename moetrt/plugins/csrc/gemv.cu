// Skinny GEMM for decode: y[m, n] = act(sum_k W[n, k] x[m, k] + bias[n]) for M <= 8 rows of x, with W stored
// [N, K] (out, in: a torch Linear weight). One warp per output column n reads W's row once with 16-byte loads
// (the bytes that bound the op) and applies it to all M rows of x (small, from L1/L2); fp32 accumulation,
// bias and activation fused. Chosen over cuBLASLt for M <= 8 by measurement (docs/performance.md).
#include "common.cuh"

using namespace moetrt;

namespace {

constexpr int kGemvWarps = 8;
// Weights up to which the kernel prefetches its rows' tails into L2 before the wait: beyond about half the L2,
// the first wave's prefetches evict each other (on an H200, gpt-moe-3.4b-8e's batch-1 decode step took 2.83 ms
// with them on every GEMV, 2.69 ms with this limit).
constexpr int64_t kPrefetchMaxBytes = 24 << 20;

template <typename T, int M>
__global__ void __launch_bounds__(kGemvWarps * 32) gemv_kernel(const T* __restrict__ x, const T* __restrict__ w,
                                                                const T* __restrict__ bias, T* __restrict__ y,
                                                                int N, int K, int act, bool prefetch) {
  constexpr int VN = Vec<T>::N, PRE = 32 / VN;  // PRE vectors per lane: 1024 elements of a row in fp16/bf16
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
  const float bias_n = bias && active && lane < M ? to_float(bias[n]) : 0.f;  // a weight too: before the wait
  enter_after_predecessor();
  if (!active) return;
  float acc[M];
#pragma unroll
  for (int m = 0; m < M; ++m) acc[m] = 0.f;
  auto fma_vec = [&](const Vec<T>& wv, int k) {
#pragma unroll
    for (int m = 0; m < M; ++m) {
      Vec<T> xv;
      xv.load(x + int64_t(m) * K + k);
#pragma unroll
      for (int i = 0; i < VN; ++i) acc[m] += to_float(wv.v[i]) * to_float(xv.v[i]);
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
  for (int m = 0; m < M; ++m) acc[m] = warp_sum(acc[m]);
  if (lane < M) {
    float v = 0.f;
#pragma unroll
    for (int m = 0; m < M; ++m) v = lane == m ? acc[m] : v;
    y[int64_t(lane) * N + n] = from_float<T>(activate(v + bias_n, act));
  }
}

template <typename T>
int launch_gemv(const T* x, const T* w, const T* bias, T* y, int rows, int N, int K, int act, cudaStream_t stream) {
  if (K % Vec<T>::N) return MOETRT_ERR_BAD_SHAPE;
  const unsigned grid = static_cast<unsigned>((N + kGemvWarps - 1) / kGemvWarps);
  const bool prefetch = int64_t(N) * K * int64_t(sizeof(T)) <= kPrefetchMaxBytes;
  switch (rows) {
    case 1: launch(gemv_kernel<T, 1>, grid, kGemvWarps * 32, 0, stream, x, w, bias, y, N, K, act, prefetch); break;
    case 2: launch(gemv_kernel<T, 2>, grid, kGemvWarps * 32, 0, stream, x, w, bias, y, N, K, act, prefetch); break;
    case 3: launch(gemv_kernel<T, 3>, grid, kGemvWarps * 32, 0, stream, x, w, bias, y, N, K, act, prefetch); break;
    case 4: launch(gemv_kernel<T, 4>, grid, kGemvWarps * 32, 0, stream, x, w, bias, y, N, K, act, prefetch); break;
    case 5: launch(gemv_kernel<T, 5>, grid, kGemvWarps * 32, 0, stream, x, w, bias, y, N, K, act, prefetch); break;
    case 6: launch(gemv_kernel<T, 6>, grid, kGemvWarps * 32, 0, stream, x, w, bias, y, N, K, act, prefetch); break;
    case 7: launch(gemv_kernel<T, 7>, grid, kGemvWarps * 32, 0, stream, x, w, bias, y, N, K, act, prefetch); break;
    case 8: launch(gemv_kernel<T, 8>, grid, kGemvWarps * 32, 0, stream, x, w, bias, y, N, K, act, prefetch); break;
    default: return MOETRT_ERR_BAD_SHAPE;
  }
  return launch_status();
}

}  // namespace

MOETRT_API int moetrt_gemv(const void* x, const void* weight, const void* bias, void* y, int64_t rows, int64_t n,
                           int64_t k, int activation, int dtype, cudaStream_t stream) {
  if (rows < 0 || rows > 8 || n <= 0 || k <= 0 || n > 0x7fffffff || k > 0x7fffffff || activation < 0 ||
      activation > 2)
    return MOETRT_ERR_BAD_SHAPE;
  if (rows == 0) return 0;
  MOETRT_DISPATCH_DTYPE(dtype, T, {
    return launch_gemv<T>(static_cast<const T*>(x), static_cast<const T*>(weight), static_cast<const T*>(bias),
                          static_cast<T*>(y), static_cast<int>(rows), static_cast<int>(n), static_cast<int>(k),
                          activation, stream);
  })
}
