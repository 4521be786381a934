#include "moetrt_kernels.h"

MOETRT_API int moetrt_abi_version(void) { return MOETRT_ABI_VERSION; }

MOETRT_API const char* moetrt_cuda_archs(void) { return MOETRT_CUDA_ARCHS; }

MOETRT_API const char* moetrt_error_string(int code) {
  switch (code) {
    case MOETRT_ERR_BAD_DTYPE: return "unsupported dtype code";
    case MOETRT_ERR_BAD_SHAPE: return "invalid shape argument";
    default: return cudaGetErrorString(static_cast<cudaError_t>(code));
  }
}
