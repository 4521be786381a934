"""How fast can a kernel only read device memory? (GPU machine; needs cupy.)

    python3 tools/read_ceiling.py

Streams 256 MB regions (rotating over 2 GiB, so L2 holds none of it) with 16-byte loads, several in flight per
thread, in two patterns: grid-stride (r4 / r8 / r16: loads in flight per thread) and one contiguous slice per block
(rblk), at 1-8 blocks an SM of 256 or 512 threads; then a 256 MB device-to-device copy. Prints the median
microseconds and bytes read per second of each, to compare the expert kernels' streaming rates with (the floors in
`moetrt bench` divide by the copy's bytes read + written per second). Diagnostic; not part of the test suite."""
import cupy as cp
import numpy as np

SRC = r"""
template <int U>
__device__ void stride_body(const uint4* __restrict__ p, long long n16, unsigned int* sink) {
  unsigned int acc = 0;
  const long long stride = (long long)gridDim.x * blockDim.x;
  uint4 v[U];
  for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n16; i += U * stride) {
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const long long j = i + u * stride;
      v[u] = j < n16 ? __ldcg(p + j) : make_uint4(0, 0, 0, 0);
    }
#pragma unroll
    for (int u = 0; u < U; ++u) acc ^= v[u].x ^ v[u].y ^ v[u].z ^ v[u].w;
  }
  if (acc == 0x9e3779b9u) sink[0] = acc;  // keeps the loads
}
extern "C" __global__ void r4(const uint4* p, long long n, unsigned int* s) { stride_body<4>(p, n, s); }
extern "C" __global__ void r8(const uint4* p, long long n, unsigned int* s) { stride_body<8>(p, n, s); }
extern "C" __global__ void r16(const uint4* p, long long n, unsigned int* s) { stride_body<16>(p, n, s); }
extern "C" __global__ void rblk(const uint4* __restrict__ p, long long n16, unsigned int* sink) {
  const long long per = (n16 + gridDim.x - 1) / gridDim.x, lo = blockIdx.x * per, hi = min(lo + per, n16);
  unsigned int acc = 0;
  uint4 v[8];
  for (long long i = lo + threadIdx.x; i < hi; i += 8 * blockDim.x) {
#pragma unroll
    for (int u = 0; u < 8; ++u) {
      const long long j = i + u * blockDim.x;
      v[u] = j < hi ? __ldcg(p + j) : make_uint4(0, 0, 0, 0);
    }
#pragma unroll
    for (int u = 0; u < 8; ++u) acc ^= v[u].x ^ v[u].y ^ v[u].z ^ v[u].w;
  }
  if (acc == 0x9e3779b9u) sink[0] = acc;
}
"""
REGION, REGIONS = 256 << 20, 8


def median_ms(run, reps=24):
    start, end = cp.cuda.Event(), cp.cuda.Event()
    for r in range(reps):  # warm-up
        run(r % REGIONS)
    times = []
    for r in range(reps):
        start.record()
        run(r % REGIONS)
        end.record()
        end.synchronize()
        times.append(cp.cuda.get_elapsed_time(start, end))
    return float(np.median(times))


def main():
    mod = cp.RawModule(code=SRC, options=("-std=c++17",))
    sms = cp.cuda.Device().attributes["MultiProcessorCount"]
    buf = cp.ones(REGIONS * REGION // 2, dtype=cp.float16)
    sink = cp.zeros(1, dtype=cp.uint32)
    n16 = REGION // 16
    for name in ("r4", "r8", "r16", "rblk"):
        kernel = mod.get_function(name)
        for per_sm in (1, 2, 4, 8):
            for threads in (256, 512):
                grid = sms * per_sm
                ms = median_ms(lambda r: kernel((grid,), (threads,), (cp.uint64(buf.data.ptr + r * REGION),
                                                                     cp.int64(n16), sink)))
                print(f"{name:5s} grid {grid:5d} x {threads:3d}: {ms * 1e3:8.1f} us  "
                      f"{REGION / ms / 1e9:6.3f} TB/s read")
    dst = cp.empty(REGION // 2, dtype=cp.float16)
    ms = median_ms(lambda r: cp.cuda.runtime.memcpyAsync(dst.data.ptr, buf.data.ptr + r * REGION, REGION,
                                                         cp.cuda.runtime.memcpyDeviceToDevice, 0))
    print(f"copy {REGION >> 20} MB: {ms * 1e3:8.1f} us  {2 * REGION / ms / 1e9:6.3f} TB/s read + written")


if __name__ == "__main__":
    main()
