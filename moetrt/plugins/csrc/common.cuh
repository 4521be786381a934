// Device helpers shared by the kernels: element conversion, 16-byte vectors, warp/block reductions.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

#include <type_traits>
#include <utility>

#include "moetrt_kernels.h"

namespace moetrt {

template <typename T> __device__ __forceinline__ float to_float(T v) { return static_cast<float>(v); }
template <> __device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
template <> __device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
template <typename T> __device__ __forceinline__ T from_float(float v) { return static_cast<T>(v); }
template <> __device__ __forceinline__ __half from_float(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float(float v) { return __float2bfloat16_rn(v); }

// 16 bytes of T: 4 floats or 8 halves.
template <typename T> struct Vec {
  static constexpr int N = 16 / sizeof(T);
  union { uint4 raw; T v[N]; };
  __device__ __forceinline__ void load(const T* p) { raw = *reinterpret_cast<const uint4*>(p); }
  // Weights, streamed once: read-only path, no L1 allocation (so the reused token vectors stay in L1), 256-byte L2
  // fetches. Measured on an H100 against a plain __ldg: the decode MoE layer 5-11% faster (1/8/16 tokens: 23.0 /
  // 72.4 / 127 us vs 24.7 / 76.4 / 142), the 350M batch-8 decode graph 1.642 ms vs 1.673; the L2 hint alone: no gain.
  __device__ __forceinline__ void load_global_nc(const T* p) {
    asm volatile("ld.global.nc.L1::no_allocate.L2::256B.v4.u32 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(raw.x), "=r"(raw.y), "=r"(raw.z), "=r"(raw.w)
                 : "l"(p));
  }
  __device__ __forceinline__ void load_cg(const T* p) {  // around L1: coherent in L2
    raw = __ldcg(reinterpret_cast<const uint4*>(p));
  }
  __device__ __forceinline__ void store(T* p) const { *reinterpret_cast<uint4*>(p) = raw; }
};

// kStream: weights streamed once (the grouped GEMM's B tiles), with a 256-byte L2 prefetch: a k-tile row is 128
// bytes, so DRAM serves each row's next k-tile with this one (H100, `tools/moe_ab.py`, MoE layer at 32 / 64 / 512 /
// 4096 tokens 177.0 / 265.0 / 408.1 / 548.7 us against 185.5 / 276.3 / 424.8 / 563.3 without, 128-byte prefetches
// no better than none; docs/bench/log.md). MOETRT_GEMM_L2_HINT (0, 64, 128, 256): build-time switch for A/Bs.
#ifndef MOETRT_GEMM_L2_HINT
#define MOETRT_GEMM_L2_HINT 256
#endif
#define MOETRT_STR2(x) #x
#define MOETRT_STR(x) MOETRT_STR2(x)
#if MOETRT_GEMM_L2_HINT
#define MOETRT_GEMM_PREFETCH ".L2::" MOETRT_STR(MOETRT_GEMM_L2_HINT) "B"
#else
#define MOETRT_GEMM_PREFETCH ""
#endif
// 16 bytes global -> shared, asynchronously (sm_80+); valid = false zero-fills the 16 destination bytes.
template <bool kStream = false>
__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, bool valid) {
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  const int n = valid ? 16 : 0;  // 0 source bytes: the 16 destination bytes are zero-filled
  if constexpr (kStream)
    asm volatile("cp.async.cg.shared.global" MOETRT_GEMM_PREFETCH " [%0], [%1], 16, %2;\n" ::"r"(s), "l"(gmem),
                 "r"(n));
  else
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(gmem), "r"(n));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N> __device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N)); }

// mma.sync.m16n8k16 with fp32 accumulators: D = A (16x16, row-major) * B (16x8, "col": stored [n][k]) + D.
template <typename T>
__device__ __forceinline__ void mma_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  if constexpr (std::is_same<T, __half>::value)
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
                 "{%0,%1,%2,%3};\n"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  else
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
                 "{%0,%1,%2,%3};\n"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
// GEMV on tensor cores (gemv.cu's gemv_mma_kernel, moe.cu's expert_mma_kernel): up to 16 rows of x are the
// A operand of mma.m16n8k16 and 8 weight rows the B operand. Lane (g, t) = (lane / 4, lane % 4) loads 16 bytes of
// weight row g and of x rows g and g + 8 at the same k; which k a fragment element stands for is free as long as
// A and B agree (it only orders the dot product), so a lane's 8 consecutive elements serve as its (2t, 2t + 1,
// 2t + 8, 2t + 9) of two k16 steps and every load stays 16 bytes. A chunk is kMmaChunk consecutive elements of
// K: 4 lanes (t) x kMmaVecs vectors x 8.
constexpr int kMmaVecs = 4, kMmaChunk = 32 * kMmaVecs;

// Weight row `row` (nullptr: zeros), chunk c, into this lane's vectors (zeros past K).
template <typename T>
__device__ __forceinline__ void mma_gemv_load(Vec<T> (&wv)[kMmaVecs], const T* row, int c, int K, int t) {
#pragma unroll
  for (int u = 0; u < kMmaVecs; ++u) {
    const int k = c * kMmaChunk + (t + 4 * u) * 8;
    if (row && k < K) wv[u].load_global_nc(row + k);
    else wv[u].raw = make_uint4(0, 0, 0, 0);
  }
}
// acc += x rows (x0: A row g, x1: A row g + 8; nullptr: zeros) times the weights of chunk c. acc[0], acc[1]: A row g,
// outputs 2t and 2t + 1 of the 8; acc[2], acc[3]: A row g + 8.
// visit(j, v) sees each vector of x loaded (j = 0: row x0, 1: x1), not the zeros; by default nothing.
struct NoVisit {
  template <typename V>
  __device__ __forceinline__ void operator()(int, const V&) const {}
};
// acc += A rows g (a) and g + 8 (b) times weight vector wv: a lane's 8 consecutive elements as its (2t, 2t + 1,
// 2t + 8, 2t + 9) of two k16 steps
template <typename T>
__device__ __forceinline__ void mma_gemv_vec(float (&acc)[4], const Vec<T>& a, const Vec<T>& b, const Vec<T>& wv) {
  const uint32_t f0[4] = {a.raw.x, b.raw.x, a.raw.y, b.raw.y}, f1[4] = {a.raw.z, b.raw.z, a.raw.w, b.raw.w};
  mma_16816<T>(acc, f0, wv.raw.x, wv.raw.y);
  mma_16816<T>(acc, f1, wv.raw.z, wv.raw.w);
}
template <typename T, typename F = NoVisit>
__device__ __forceinline__ void mma_gemv_chunk(float (&acc)[4], const Vec<T> (&wv)[kMmaVecs], const T* x0,
                                               const T* x1, int c, int K, int t, const F& visit = F{}) {
#pragma unroll
  for (int u = 0; u < kMmaVecs; ++u) {
    const int k = c * kMmaChunk + (t + 4 * u) * 8;
    Vec<T> a, b;
    if (x0 && k < K) {
      a.load(x0 + k);
      visit(0, a);
    } else {
      a.raw = make_uint4(0, 0, 0, 0);
    }
    if (x1 && k < K) {
      b.load(x1 + k);
      visit(1, b);
    } else {
      b.raw = make_uint4(0, 0, 0, 0);
    }
    mma_gemv_vec<T>(acc, a, b, wv[u]);
  }
}

// A warp's share of a tensor-core GEMV: chunks c0, c0 + stride, ... below `chunks` of weight row `row`. The first
// kPre are loaded into `pre` by mma_gemv_preload (before the wait), the rest by mma_gemv_accumulate as it goes;
// MT MMAs a weight fragment, MMA i taking A rows xr[2i] and xr[2i + 1] (nullptr: zeros) into acc[i]; visit(h, v)
// sees each vector loaded from row xr[h].
template <typename T, int kPre>
__device__ __forceinline__ void mma_gemv_preload(Vec<T> (&pre)[kPre][kMmaVecs], const T* row, int c0, int stride,
                                                 int K, int t) {
#pragma unroll
  for (int i = 0; i < kPre; ++i) mma_gemv_load(pre[i], row, c0 + i * stride, K, t);  // past K: zeros
}
// kLow8: A rows g only (xr[1] is nullptr: at most 8 rows of x); the preloaded chunks then load the next chunk's x
// before this chunk's MMAs (which wait on this chunk's x), not after them: two chunks' L2 round trips overlap
// (H100, first 8 layers of the 350M decode graphs, three alternating rounds, batch 2 / 4 / 8: 0.2304 / 0.2859 /
// 0.3550 against 0.2337 / 0.2883 / 0.3569 ms; the dense FC2, K 4096, has 4 chunks a warp).
template <typename T, int kPre, int MT, bool kLow8 = false, typename F = NoVisit>
__device__ __forceinline__ void mma_gemv_accumulate(float (&acc)[MT][4], const Vec<T> (&pre)[kPre][kMmaVecs],
                                                    const T* row, const T* const (&xr)[2 * MT], int c0, int stride,
                                                    int chunks, int K, int t, const F& visit = F{}) {
  auto mma_all = [&](const Vec<T>(&wv)[kMmaVecs], int c) {
#pragma unroll
    for (int i = 0; i < MT; ++i)
      mma_gemv_chunk<T>(acc[i], wv, xr[2 * i], xr[2 * i + 1], c, K, t,
                        [&](int j, const Vec<T>& v) { visit(2 * i + j, v); });
  };
  if constexpr (kLow8 && MT == 1 && kPre > 1) {
    auto load_x = [&](Vec<T>(&a)[kMmaVecs], int c) {
#pragma unroll
      for (int u = 0; u < kMmaVecs; ++u) {
        const int k = c * kMmaChunk + (t + 4 * u) * 8;
        if (xr[0] && c < chunks && k < K) a[u].load(xr[0] + k);
        else a[u].raw = make_uint4(0, 0, 0, 0);
      }
    };
    Vec<T> xa[2][kMmaVecs], zero;
    zero.raw = make_uint4(0, 0, 0, 0);
    load_x(xa[0], c0);
#pragma unroll
    for (int i = 0; i < kPre; ++i) {
      const int c = c0 + i * stride;
      if (i + 1 < kPre) load_x(xa[(i + 1) & 1], c + stride);
      if (c >= chunks) continue;
#pragma unroll
      for (int u = 0; u < kMmaVecs; ++u) {
        if (xr[0] && c * kMmaChunk + (t + 4 * u) * 8 < K) visit(0, xa[i & 1][u]);
        mma_gemv_vec<T>(acc[0], xa[i & 1][u], zero, pre[i][u]);
      }
    }
  } else {
#pragma unroll
    for (int i = 0; i < kPre; ++i)
      if (c0 + i * stride < chunks) mma_all(pre[i], c0 + i * stride);
  }
#pragma unroll 2
  for (int c = c0 + kPre * stride; c < chunks; c += stride) {
    Vec<T> wv[kMmaVecs];
    mma_gemv_load(wv, row, c, K, t);
    mma_all(wv, c);
  }
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}
__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// Sum over the block; every thread gets the result. `scratch` holds >= 32 floats.
__device__ __forceinline__ float block_sum(float v, float* scratch) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = (blockDim.x + 31) >> 5;
  v = warp_sum(v);
  __syncthreads();  // scratch may still be read from a previous call
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  v = lane < warps ? scratch[lane] : 0.f;
  return warp_sum(v);
}
__device__ __forceinline__ float block_max(float v, float* scratch) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = (blockDim.x + 31) >> 5;
  v = warp_max(v);
  __syncthreads();
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  v = lane < warps ? scratch[lane] : -INFINITY;
  return warp_max(v);
}

// Activations, computed in fp32. kind: 0 = tanh-GeLU, 1 = erf-GeLU, 2 = none (bias add only).
__device__ __forceinline__ float activate(float x, int kind) {
  if (kind == 2) return x;
  if (kind == 0) {  // 0.5 x (1 + tanh u) = x sigmoid(2u): one exp and a fast divide instead of tanhf's ~20 instructions
    const float k0 = 0.7978845608028654f, k1 = 0.044715f;
    return __fdividef(x, 1.f + __expf(-2.f * k0 * (x + k1 * x * x * x)));  // a huge divisor gives 0, the limit
  }
  return 0.5f * x * (1.f + erff(x * 0.7071067811865476f));
}

inline int launch_status() { return static_cast<int>(cudaGetLastError()); }

// An attribute of the current device, looked up once per device; 0 when it cannot be read.
template <cudaDeviceAttr kAttr>
inline int device_attribute() {
  static int cached[64] = {0};
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess || dev < 0 || dev >= 64) return 0;
  if (!cached[dev] && cudaDeviceGetAttribute(&cached[dev], kAttr, dev) != cudaSuccess) cached[dev] = 0;
  return cached[dev];
}

// Multiprocessors of the current device (132, an H100's, if unknown).
inline int sm_count() {
  const int n = device_attribute<cudaDevAttrMultiProcessorCount>();
  return n > 0 ? n : 132;
}

// ---- programmatic dependent launch (sm_90+) ------------------------------------------------------------------
// Kernels go through launch() below, which (when enabled: moetrt_set_programmatic_launch) lets a kernel be
// scheduled while the kernel ahead of it in the stream is still running. The contract every kernel keeps:
//  - before dependency_wait() it reads only memory no kernel of the current call chain writes (weights, and
//    what the documented entry points say) and writes nothing;
//  - every block calls dependency_wait() before it exits, so a kernel completes only after its predecessor;
//  - it then calls launch_dependents(), letting the next kernel's blocks be scheduled, to wait in turn.
// Two kernels call launch_dependents() at entry instead, so that the kernel after them is scheduled (and loads its
// weights) while they wait: attention decode and the tensor-core GEMV of at most 8 rows (H100, first 8 layers of
// the 350M decode graphs, three alternating rounds, batch 1 / 2 / 4 / 8 / 16 / 32: 0.1912 / 0.2199 / 0.2823 /
// 0.3501 / 0.4878 / 0.7055 ms against 0.1973 / 0.2239 / 0.2857 / 0.3547 / 0.4882 / 0.7049; the same in every GEMV
// lost 1.2% at batch 1, in AddLayerNorm 0.7% at 32, in the MoE FC2s 1.5% at 1). Every other kernel of ours
// triggers only after its own wait returned, so in a chain of our kernels every kernel two or more back has
// completed by the time a kernel starts, unless the kernel right before it is one of those two: a kernel may read
// before its wait what kernels two or more back wrote (the MoE's FC2s, after FC1, read the gate logits or the
// routing that way) only where its predecessor triggers late, never what its immediate predecessor writes.
// (Library kernels, cuBLASLt's, make no such promise.)
// On older GPUs, or when disabled, both are no-ops and launches are ordinary stream-ordered ones.
__device__ __forceinline__ void dependency_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;\n" ::: "memory");
#endif
}
__device__ __forceinline__ void launch_dependents() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
#endif
}
// Both, in the order the contract needs: the start of a kernel that has nothing to do before its inputs exist.
__device__ __forceinline__ void enter_after_predecessor() {
  dependency_wait();
  launch_dependents();
}
// Pulls the 128-byte line holding p into L2 (for weights, before dependency_wait()).
__device__ __forceinline__ void prefetch_l2(const void* p) { asm volatile("prefetch.global.L2 [%0];\n" ::"l"(p)); }
// Every 128-byte line of [p, p + bytes), spread over `lanes` threads of which this is `lane`.
__device__ __forceinline__ void prefetch_l2_range(const void* p, int64_t bytes, int lane, int lanes) {
  const char* c = static_cast<const char*>(p);
  for (int64_t off = int64_t(lane) * 128; off < bytes; off += int64_t(lanes) * 128) prefetch_l2(c + off);
}

bool programmatic_launch_enabled();  // abi.cu: the switch, and whether the current device has the feature

// kernel<<<grid, block, smem, stream>>>(args...), with the programmatic-serialization attribute when enabled
// and `programmatic`. Callers pass false for prefill-sized work: measured on an H100, a 510-token prefill took
// 10.3 ms instead of 6.4 with it on everywhere (the attention kernel ran 3x slower, the grouped-GEMM MoE 1.2x),
// while decode steps, chains of small latency-bound kernels, gained 16%. Errors are left for launch_status()
// (cudaGetLastError), as with <<<>>>.
template <typename... Params, typename... Args>
inline void launch_if(bool programmatic, void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem,
                      cudaStream_t stream, Args&&... args) {
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = grid;
  cfg.blockDim = block;
  cfg.dynamicSmemBytes = smem;
  cfg.stream = stream;
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr[0].val.programmaticStreamSerializationAllowed = 1;
  cfg.attrs = attr;
  cfg.numAttrs = programmatic && programmatic_launch_enabled() ? 1 : 0;
  cudaLaunchKernelEx(&cfg, kernel, std::forward<Args>(args)...);
}
template <typename... Params, typename... Args>
inline void launch(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem, cudaStream_t stream,
                   Args&&... args) {
  launch_if(true, kernel, grid, block, smem, stream, std::forward<Args>(args)...);
}
// Rows of work up to which a row-wise kernel's launch counts as decode-sized (programmatic).
constexpr int64_t kProgrammaticMaxRows = 64;

}  // namespace moetrt

// Dispatch a templated launcher on the dtype code; returns MOETRT_ERR_BAD_DTYPE otherwise.
#define MOETRT_DISPATCH_DTYPE(dtype, T, ...)                  \
  switch (dtype) {                                            \
    case MOETRT_FP32: { using T = float; __VA_ARGS__ }        \
    case MOETRT_FP16: { using T = __half; __VA_ARGS__ }       \
    case MOETRT_BF16: { using T = __nv_bfloat16; __VA_ARGS__ } \
    default: return MOETRT_ERR_BAD_DTYPE;                     \
  }
