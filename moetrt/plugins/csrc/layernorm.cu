// AddLayerNorm (fp32 statistics) and BiasAct.
#include "common.cuh"

using namespace moetrt;

namespace {

constexpr int kLnThreads = 128;
constexpr int kLnMaxVecs = 8;  // 16-byte vectors per thread: hidden <= 128 * 8 * (16 / sizeof(T))

// One block per row. The row stays in registers between the two statistics passes; gamma and beta (weights) are
// loaded before the wait for the preceding kernel, so their latency is not added after the statistics. VPT is
// the vectors a thread holds, the fewest the hidden size needs (loops unrolled over 8 for a row that needs 1 made
// the kernel 27.6 KB of code); the sums' order does not depend on it.
template <typename T, int VPT>
__global__ void __launch_bounds__(kLnThreads) add_layernorm_kernel(
    const T* __restrict__ x, const T* __restrict__ delta, const T* __restrict__ gamma,
    const T* __restrict__ beta, T* __restrict__ sum_out, T* __restrict__ normed, int64_t hidden, float eps) {
  constexpr int N = Vec<T>::N;
  __shared__ float scratch[32];
  const int vecs = static_cast<int>(hidden / N);
  Vec<T> g[VPT], b[VPT];
#pragma unroll
  for (int i = 0; i < VPT; ++i) {
    const int v = threadIdx.x + i * kLnThreads;
    if (v < vecs) {
      g[i].load(gamma + v * N);
      b[i].load(beta + v * N);
    }
  }
  enter_after_predecessor();
  const int64_t row = blockIdx.x;
  float vals[VPT][N];
  float local = 0.f;
#pragma unroll
  for (int i = 0; i < VPT; ++i) {
    const int v = threadIdx.x + i * kLnThreads;
    if (v < vecs) {
      Vec<T> a;
      a.load(x + row * hidden + v * N);
      Vec<T> d;
      if (delta) d.load(delta + row * hidden + v * N);
#pragma unroll
      for (int j = 0; j < N; ++j) {
        vals[i][j] = to_float(a.v[j]) + (delta ? to_float(d.v[j]) : 0.f);
        if (delta) a.v[j] = from_float<T>(vals[i][j]);
        vals[i][j] = to_float(from_float<T>(vals[i][j]));  // the residual stream is stored in T
        local += vals[i][j];
      }
      if (delta && sum_out) a.store(sum_out + row * hidden + v * N);
    }
  }
  const float mean = block_sum(local, scratch) / static_cast<float>(hidden);
  float sq = 0.f;
#pragma unroll
  for (int i = 0; i < VPT; ++i) {
    if (threadIdx.x + i * kLnThreads < vecs) {
#pragma unroll
      for (int j = 0; j < N; ++j) { const float c = vals[i][j] - mean; sq += c * c; }
    }
  }
  const float rstd = rsqrtf(block_sum(sq, scratch) / static_cast<float>(hidden) + eps);
#pragma unroll
  for (int i = 0; i < VPT; ++i) {
    const int v = threadIdx.x + i * kLnThreads;
    if (v < vecs) {
      Vec<T> o;
#pragma unroll
      for (int j = 0; j < N; ++j)
        o.v[j] = from_float<T>((vals[i][j] - mean) * rstd * to_float(g[i].v[j]) + to_float(b[i].v[j]));
      o.store(normed + row * hidden + v * N);
    }
  }
}

template <typename T>
__global__ void bias_act_kernel(const T* __restrict__ x, const T* __restrict__ bias, T* __restrict__ y,
                                int64_t rows, int64_t cols, int kind) {
  constexpr int N = Vec<T>::N;
  enter_after_predecessor();
  const int64_t total = rows * cols / N;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t col = (i * N) % cols;
    Vec<T> a, b;
    a.load(x + i * N);
    b.load(bias + col);
#pragma unroll
    for (int j = 0; j < N; ++j) a.v[j] = from_float<T>(activate(to_float(a.v[j]) + to_float(b.v[j]), kind));
    a.store(y + i * N);
  }
}

}  // namespace

MOETRT_API int moetrt_add_layernorm(const void* x, const void* delta, const void* gamma, const void* beta,
                                    void* sum_out, void* normed, int64_t rows, int64_t hidden, float epsilon,
                                    int dtype, cudaStream_t stream) {
  if (rows < 0 || rows > 0x7fffffff || hidden <= 0) return MOETRT_ERR_BAD_SHAPE;
  if (rows == 0) return 0;
  MOETRT_DISPATCH_DTYPE(dtype, T, {
    constexpr int N = Vec<T>::N;
    if (hidden % N || hidden > int64_t(kLnThreads) * kLnMaxVecs * N) return MOETRT_ERR_BAD_SHAPE;
    const int64_t vpt = (hidden / N + kLnThreads - 1) / kLnThreads;
    auto kernel = vpt <= 1 ? add_layernorm_kernel<T, 1>
                : vpt <= 2 ? add_layernorm_kernel<T, 2>
                : vpt <= 4 ? add_layernorm_kernel<T, 4>
                           : add_layernorm_kernel<T, kLnMaxVecs>;
    launch_if(rows <= kProgrammaticMaxRows, kernel, static_cast<unsigned>(rows), kLnThreads, 0, stream,
              static_cast<const T*>(x), static_cast<const T*>(delta), static_cast<const T*>(gamma),
              static_cast<const T*>(beta), static_cast<T*>(sum_out), static_cast<T*>(normed), hidden, epsilon);
    return launch_status();
  })
}

MOETRT_API int moetrt_bias_act(const void* x, const void* bias, void* y, int64_t rows, int64_t cols, int activation,
                               int dtype, cudaStream_t stream) {
  if (rows < 0 || cols <= 0 || activation < 0 || activation > 2) return MOETRT_ERR_BAD_SHAPE;
  if (rows == 0) return 0;
  MOETRT_DISPATCH_DTYPE(dtype, T, {
    if (cols % Vec<T>::N) return MOETRT_ERR_BAD_SHAPE;
    const int64_t vecs = rows * cols / Vec<T>::N;
    const unsigned blocks = static_cast<unsigned>(std::min<int64_t>((vecs + 255) / 256, 65535));
    launch_if(rows <= kProgrammaticMaxRows, bias_act_kernel<T>, blocks, 256, 0, stream, static_cast<const T*>(x),
              static_cast<const T*>(bias), static_cast<T*>(y), rows, cols, activation);
    return launch_status();
  })
}
