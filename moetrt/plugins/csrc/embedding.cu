// Embedding: out[t] = wte[input_ids[t]] + wpe[position_ids[t]], summed in fp32 and rounded once.
#include "common.cuh"

using namespace moetrt;

namespace {

template <typename T>
__global__ void embedding_kernel(const int32_t* __restrict__ ids, const int32_t* __restrict__ pos,
                                 const T* __restrict__ wte, const T* __restrict__ wpe, T* __restrict__ out,
                                 int64_t hidden, int64_t vocab, int64_t max_pos) {
  enter_after_predecessor();
  const int64_t t = blockIdx.x;  // one block per token
  const int64_t id = min(max(static_cast<int64_t>(ids[t]), int64_t(0)), vocab - 1);
  const int64_t p = min(max(static_cast<int64_t>(pos[t]), int64_t(0)), max_pos - 1);
  for (int64_t i = threadIdx.x; i < hidden; i += blockDim.x)
    out[t * hidden + i] = from_float<T>(to_float(wte[id * hidden + i]) + to_float(wpe[p * hidden + i]));
}

}  // namespace

MOETRT_API int moetrt_embedding(const int32_t* input_ids, const int32_t* position_ids, const void* wte,
                                const void* wpe, void* out, int64_t num_tokens, int64_t hidden,
                                int64_t vocab_size, int64_t max_positions, int dtype, cudaStream_t stream) {
  if (num_tokens < 0 || num_tokens > 0x7fffffff || hidden <= 0 || vocab_size <= 0 || max_positions <= 0)
    return MOETRT_ERR_BAD_SHAPE;
  if (num_tokens == 0) return 0;
  MOETRT_DISPATCH_DTYPE(dtype, T, {
    launch_if(num_tokens <= kProgrammaticMaxRows, embedding_kernel<T>, static_cast<unsigned>(num_tokens), 256, 0,
              stream, input_ids, position_ids, static_cast<const T*>(wte), static_cast<const T*>(wpe),
              static_cast<T*>(out), hidden, vocab_size, max_positions);
    return launch_status();
  })
}
