#include <atomic>

#include "common.cuh"

MOETRT_API int moetrt_abi_version(void) { return MOETRT_ABI_VERSION; }

MOETRT_API const char* moetrt_cuda_archs(void) { return MOETRT_CUDA_ARCHS; }

MOETRT_API const char* moetrt_error_string(int code) {
  switch (code) {
    case MOETRT_ERR_BAD_DTYPE: return "unsupported dtype code";
    case MOETRT_ERR_BAD_SHAPE: return "invalid shape argument";
    default: return cudaGetErrorString(static_cast<cudaError_t>(code));
  }
}

namespace {
std::atomic<int> g_programmatic{1};
}

MOETRT_API int moetrt_set_programmatic_launch(int enable) { return g_programmatic.exchange(enable ? 1 : 0); }

namespace moetrt {
bool programmatic_launch_enabled() {
  return g_programmatic.load(std::memory_order_relaxed) && device_attribute<cudaDevAttrComputeCapabilityMajor>() >= 9;
}
}  // namespace moetrt
