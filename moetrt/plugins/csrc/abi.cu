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
  if (!g_programmatic.load(std::memory_order_relaxed)) return false;
  static int major[64] = {0};  // compute capability per device, looked up once
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess || dev < 0 || dev >= 64) return false;
  if (!major[dev]) {
    int m = 0;
    if (cudaDeviceGetAttribute(&m, cudaDevAttrComputeCapabilityMajor, dev) != cudaSuccess) return false;
    major[dev] = m;
  }
  return major[dev] >= 9;
}
}  // namespace moetrt
