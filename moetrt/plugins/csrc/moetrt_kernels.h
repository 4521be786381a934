// C ABI of libmoetrt_kernels.
//
// Every entry point takes device pointers, sizes and a cudaStream_t, returns an
// int (0 = success, otherwise a cudaError_t value or one of the MOETRT_ERR_*
// codes below), never allocates, and is deterministic for a given input.
// Callers (the Python launchers in moetrt/plugins) validate shapes, dtypes and
// alignment; kernels trust them.
#pragma once
#include <cuda_runtime.h>
#include <stdint.h>

#define MOETRT_API extern "C" __attribute__((visibility("default")))

// Element types, shared with moetrt/plugins/kernels.py (DTYPE_CODES).
enum moetrt_dtype { MOETRT_FP32 = 0, MOETRT_FP16 = 1, MOETRT_BF16 = 2 };

// Errors raised by argument checks inside the library (cudaError_t values are < 1000).
enum moetrt_error { MOETRT_ERR_BAD_DTYPE = 1001, MOETRT_ERR_BAD_SHAPE = 1002 };

MOETRT_API int moetrt_abi_version(void);
MOETRT_API const char* moetrt_error_string(int code);

// out[t, :] = wte[input_ids[t], :] + wpe[position_ids[t], :] for t < num_tokens.
// wte [vocab_size, hidden], wpe [max_positions, hidden], out [num_tokens, hidden], all `dtype`.
// Ids out of range are clamped (the launcher rejects them before the call).
MOETRT_API int moetrt_embedding(const int32_t* input_ids, const int32_t* position_ids,
                                const void* wte, const void* wpe, void* out,
                                int64_t num_tokens, int64_t hidden, int64_t vocab_size,
                                int64_t max_positions, int dtype, cudaStream_t stream);
