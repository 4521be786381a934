#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "moetrt_kernels.h"

namespace {

template <typename T> __device__ __forceinline__ float to_float(T v) { return static_cast<float>(v); }
template <> __device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
template <> __device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
template <typename T> __device__ __forceinline__ T from_float(float v) { return static_cast<T>(v); }
template <> __device__ __forceinline__ __half from_float(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float(float v) { return __float2bfloat16_rn(v); }

// One block per token; the sum is formed in fp32 and rounded once.
template <typename T>
__global__ void embedding_kernel(const int32_t* __restrict__ ids, const int32_t* __restrict__ pos,
                                 const T* __restrict__ wte, const T* __restrict__ wpe,
                                 T* __restrict__ out, int64_t hidden, int64_t vocab, int64_t max_pos) {
  const int64_t t = blockIdx.x;
  const int64_t id = min(max(static_cast<int64_t>(ids[t]), int64_t(0)), vocab - 1);
  const int64_t p = min(max(static_cast<int64_t>(pos[t]), int64_t(0)), max_pos - 1);
  const T* w = wte + id * hidden;
  const T* q = wpe + p * hidden;
  T* o = out + t * hidden;
  for (int64_t i = threadIdx.x; i < hidden; i += blockDim.x) {
    o[i] = from_float<T>(to_float(w[i]) + to_float(q[i]));
  }
}

template <typename T>
int launch(const int32_t* ids, const int32_t* pos, const void* wte, const void* wpe, void* out,
           int64_t n, int64_t hidden, int64_t vocab, int64_t max_pos, cudaStream_t stream) {
  if (n == 0) return 0;
  embedding_kernel<T><<<static_cast<unsigned>(n), 256, 0, stream>>>(
      ids, pos, static_cast<const T*>(wte), static_cast<const T*>(wpe), static_cast<T*>(out), hidden,
      vocab, max_pos);
  return static_cast<int>(cudaGetLastError());
}

}  // namespace

MOETRT_API int moetrt_embedding(const int32_t* input_ids, const int32_t* position_ids, const void* wte,
                                const void* wpe, void* out, int64_t num_tokens, int64_t hidden,
                                int64_t vocab_size, int64_t max_positions, int dtype,
                                cudaStream_t stream) {
  if (num_tokens < 0 || num_tokens > 0x7fffffff || hidden <= 0 || vocab_size <= 0 || max_positions <= 0)
    return MOETRT_ERR_BAD_SHAPE;
  switch (dtype) {
    case MOETRT_FP32: return launch<float>(input_ids, position_ids, wte, wpe, out, num_tokens, hidden, vocab_size, max_positions, stream);
    case MOETRT_FP16: return launch<__half>(input_ids, position_ids, wte, wpe, out, num_tokens, hidden, vocab_size, max_positions, stream);
    case MOETRT_BF16: return launch<__nv_bfloat16>(input_ids, position_ids, wte, wpe, out, num_tokens, hidden, vocab_size, max_positions, stream);
    default: return MOETRT_ERR_BAD_DTYPE;
  }
}
