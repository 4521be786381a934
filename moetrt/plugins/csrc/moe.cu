// Mixture-of-Experts layer: gate + softmax + top-k, routing, expert FFNs, finalize. No host synchronisation.
//
// Assignments are numbered a = slot * N + token (all first choices, then all second choices), which is
// DeepSpeed's order for capacity: an expert keeps its first `capacity` assignments in that order.
// Two regimes for the expert FFNs, chosen on the host from N * top_k (known without a sync):
//  - few assignments (decode, <= kGemvMaxAssignments; fp32 always): GEMVs that read each hit expert's weights
//    once with 16-byte loads, on tensor cores in fp16/bf16 (expert_mma_kernel), else a persistent FMA kernel over
//    (active expert, 4-row chunk) items; one token with top-1 (batch-1 decode) skips the routing kernel: gate,
//    FC1 (the FMA kernel), FC2 (expert_fc2_one_kernel, or the FMA kernel past its size);
//  - many (prefill, fp16/bf16): a tensor-core (mma.sync) grouped GEMM over (expert, row tile, 128-column tile);
//    at decode sizes (17-64 assignments) FC1 and FC2 as one kernel, expert_ffn_kernel.
#include <algorithm>
#include <cstdlib>
#include <type_traits>

#include "common.cuh"

using namespace moetrt;

namespace {

constexpr int kGemvTok = 4;        // tokens per GEMV pass
constexpr int kGemvThreads = 256;
constexpr int kRouteThreads = 1024;
constexpr int kMaxExperts = 256;
// Above this many assignments fp16/bf16 use the grouped GEMM (measured on an H100, 64 experts, h 1024, f 4096:
// 32 tokens 194-201 us in the GEMM, 223-230 in the FMA GEMV; with the tensor-core GEMV taking up to 32
// assignments, 24 / 32 tokens 202 / 228 us against the GEMM's 166 / 188).
constexpr int kGemvMaxAssignments = 16;  // also the rows of expert_mma_kernel's one MMA pass

// expert_ffn_kernel's counters and flags (Workspace::ready): kMaxExperts per-expert counters, one count of claimed
// blocks, then one flag per block of its grid (at most kFfnMaxGrid blocks).
constexpr int kFfnMaxGrid = 1024;
constexpr int kFfnReady = kMaxExperts + 1 + kFfnMaxGrid;

struct Workspace {
  float* logits;  // [N, experts]
  int32_t *expert_of, *loc, *pos_of, *perm, *counts, *offsets, *active;
  int32_t* ready;  // [kFfnReady] for expert_ffn_kernel, zeroed by the routing kernel: the FC1 items finished per
                   // active expert, the blocks whose FC1 items are claimed, then a claim flag per block
  float *prob, *y;
  void* act;  // [A, ffn] of T: the experts' hidden activations, in permuted order
};

inline size_t align256(size_t n) { return (n + 255) / 256 * 256; }

// Carves the workspace; with base == nullptr only returns the size.
size_t carve(char* base, int64_t tokens, int experts, int top_k, int64_t hidden, int64_t ffn, size_t elem, Workspace* w) {
  const size_t A = size_t(tokens) * top_k;
  size_t off = 0;
  auto take = [&](size_t bytes) { char* p = base ? base + off : nullptr; off += align256(bytes); return p; };
  Workspace ws;
  ws.logits = reinterpret_cast<float*>(take(size_t(tokens) * experts * 4));
  ws.expert_of = reinterpret_cast<int32_t*>(take(A * 4));
  ws.prob = reinterpret_cast<float*>(take(A * 4));
  ws.loc = reinterpret_cast<int32_t*>(take(A * 4));
  ws.pos_of = reinterpret_cast<int32_t*>(take(A * 4));
  ws.perm = reinterpret_cast<int32_t*>(take(A * 4));
  ws.counts = reinterpret_cast<int32_t*>(take(size_t(experts) * 4));
  ws.offsets = reinterpret_cast<int32_t*>(take(size_t(experts + 1) * 4));
  ws.active = reinterpret_cast<int32_t*>(take(size_t(experts + 1) * 4));
  ws.ready = reinterpret_cast<int32_t*>(take(size_t(kFfnReady) * 4));
  ws.y = reinterpret_cast<float*>(take(A * size_t(hidden) * 4));
  ws.act = take(A * size_t(ffn) * elem);
  if (w) *w = ws;
  return off;
}

// ---- gate logits = x · Wgᵀ in fp32: a warp per expert, a tile of kGateTok tokens per block -----------------
// One token a block: H100, the first 8 layers of the 350M decode graphs at batch 8 / 32 (three alternating rounds),
// 0.3903-0.3919 / 0.7680-0.7685 ms against 0.4137-0.4143 / 0.7884-0.7944 with 8-token tiles (2: 0.393 / 0.770, 4:
// 0.399 / 0.774): more blocks, and one token's loads and dot products a warp, beat re-using a block's x tile.
#ifndef MOETRT_GATE_TOK
#define MOETRT_GATE_TOK 1
#endif
constexpr int kGateTok = MOETRT_GATE_TOK;
// From this many tokens the register-tiled kernel below computes the gate; fewer run this one (one expert a warp
// spreads the gate over most SMs; 4 experts a warp, re-using each block's x tile, measured slower up to 64 tokens).
#ifndef MOETRT_GATE_TILED_MIN_TOKENS
#define MOETRT_GATE_TILED_MIN_TOKENS 65
#endif
constexpr int kGateTiledMinTokens = MOETRT_GATE_TILED_MIN_TOKENS;
// With kLn (the AddLayerNorm before the MoE fused in, one token): each block normalises its token tile as
// moetrt_add_layernorm does (sum = x + delta rounded to T, fp32 statistics, normed rounded to T) straight into the
// tile it multiplies, and blocks of column 0 store sum and normed (FC1 reads normed after its wait); gamma and beta
// are loaded before the wait. hidden <= 128 * kGateLnVecs vectors of 16 bytes, add_layernorm_kernel's limit.
// Measured on an H100 (350M decode graphs, docs/bench/log.md): one token 0.589 against 0.609 ms with the separate
// LayerNorm. Fused up to 64 tokens (every token's loads in flight at once) it lost at 8 and 32 tokens with 8-token
// tiles (1.084 / 2.098 against 1.029 / 2.027 ms) and gained nothing with one-token blocks (first 8 layers at batch
// 4 / 8 / 16 / 32: 0.3052 / 0.3765 / 0.4960 / 0.7247 against 0.3059 / 0.3768 / 0.4952 / 0.7239), so from 2 tokens
// the LayerNorm stays its own kernel (kGateLnMaxTokens).
constexpr int kGateLnVecs = 8;
#ifndef MOETRT_GATE_LN_MAX_TOKENS
#define MOETRT_GATE_LN_MAX_TOKENS 1
#endif
constexpr int kGateLnMaxTokens = MOETRT_GATE_LN_MAX_TOKENS;
constexpr int kGateWRegs = 8;  // float4 of the gate row a lane holds in registers: 8 x 32 lanes x 4 = hidden 1024
struct GateLn {
  const void *x, *delta, *gamma, *beta;
  void *sum_out, *normed;  // normed: the MoE's input (`x` of the kernel, not read with kLn)
  float eps;
};
template <typename T, bool kLn, int TOK>
__global__ void __launch_bounds__(128) gate_logits_kernel(const T* __restrict__ x, const float* __restrict__ wg,
                                                          float* __restrict__ logits, int tokens, int hidden, int experts,
                                                          int tile, GateLn ln) {
  extern __shared__ float xs[];  // [tile][hidden], tile <= TOK tokens (1 or kGateTok: one token's code is small)
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, e = blockIdx.x * 4 + warp;
  constexpr int VN = Vec<T>::N;
  const int hv = hidden / VN;
  // Weights before the wait for the preceding kernel: the first kGateWRegs float4 of each lane's share of the gate
  // row into registers (the whole row up to hidden 1024), the rest into L2; with kLn this thread's first gamma /
  // beta vectors too.
  const float* row = wg + int64_t(e) * hidden;
  float4 wr[kGateWRegs];
#pragma unroll
  for (int u = 0; u < kGateWRegs; ++u) {
    const int i = lane * 4 + u * 128;
    if (e < experts && i < hidden) wr[u] = __ldg(reinterpret_cast<const float4*>(row + i));
  }
  if (e < experts && hidden > kGateWRegs * 128)
    prefetch_l2_range(row + kGateWRegs * 128, int64_t(hidden - kGateWRegs * 128) * sizeof(float), lane, 32);
  Vec<T> gam0, bet0;
  if constexpr (kLn) {
    if (threadIdx.x < hv) {
      gam0.load(static_cast<const T*>(ln.gamma) + threadIdx.x * VN);
      bet0.load(static_cast<const T*>(ln.beta) + threadIdx.x * VN);
    }
  }
  enter_after_predecessor();
  const int t0 = blockIdx.y * tile, nt = min(tile, tokens - t0);
  if constexpr (kLn) {
    const T* lx = static_cast<const T*>(ln.x) + int64_t(t0) * hidden;
    const T* ld = static_cast<const T*>(ln.delta);
    T* ls = static_cast<T*>(ln.sum_out);
    const bool store = blockIdx.x == 0;
    // Statistics exactly as add_layernorm_kernel forms them (same thread-to-vector map, same order of additions,
    // block_sum's tree over its 4 warps), so that the normalised values match its bits. Loops over the tile's
    // tokens are unrolled (every token's loads in flight at once; per-token loads, one after the other, made 8
    // tokens slower than two kernels); the loop over a thread's vectors is not (unrolled over its upper bound as
    // well, the kernel was far larger and the batch-1 graph took 0.680 ms instead of 0.609).
    float loc[TOK];
#pragma unroll
    for (int j = 0; j < TOK; ++j) loc[j] = 0.f;
#pragma unroll 1
    for (int v = threadIdx.x; v < hv; v += 128) {
      Vec<T> a[TOK], d[TOK];
#pragma unroll
      for (int j = 0; j < TOK; ++j) {
        if (j < nt) {
          a[j].load(lx + int64_t(j) * hidden + v * VN);
          if (ld) d[j].load(ld + int64_t(t0 + j) * hidden + v * VN);
        }
      }
#pragma unroll
      for (int j = 0; j < TOK; ++j) {
        if (j < nt) {
#pragma unroll
          for (int k = 0; k < VN; ++k) {
            if (ld) a[j].v[k] = from_float<T>(to_float(a[j].v[k]) + to_float(d[j].v[k]));  // the residual, in T
            const float r = to_float(a[j].v[k]);
            xs[j * hidden + v * VN + k] = r;
            loc[j] += r;
          }
          if (ld && ls && store) a[j].store(ls + int64_t(t0 + j) * hidden + v * VN);
        }
      }
    }
    // loc[j] := the block's sum of loc[j] for every token of the tile, in block_sum's order over the 4 warps; the
    // two passes use separate partials, so no barrier is needed before the second one writes
    __shared__ float part[2][TOK][4];
    auto block_totals = [&](float(&p)[TOK][4]) {
#pragma unroll
      for (int j = 0; j < TOK; ++j) {
        if (j < nt) {  // uniform over the block
          const float w = warp_sum(loc[j]);
          if (lane == 0) p[j][warp] = w;
        }
      }
      __syncthreads();
#pragma unroll
      for (int j = 0; j < TOK; ++j) loc[j] = (p[j][0] + p[j][2]) + (p[j][1] + p[j][3]);
    };
    float mean[TOK], rstd[TOK];
    block_totals(part[0]);
#pragma unroll
    for (int j = 0; j < TOK; ++j) {
      mean[j] = j < nt ? loc[j] / static_cast<float>(hidden) : 0.f;
      loc[j] = 0.f;
    }
#pragma unroll 1
    for (int v = threadIdx.x; v < hv; v += 128) {  // this thread's own xs entries: no barrier needed
#pragma unroll
      for (int j = 0; j < TOK; ++j) {
        if (j < nt) {
          const float* r = xs + j * hidden + v * VN;
#pragma unroll
          for (int k = 0; k < VN; ++k) { const float c = r[k] - mean[j]; loc[j] += c * c; }
        }
      }
    }
    block_totals(part[1]);
#pragma unroll
    for (int j = 0; j < TOK; ++j) rstd[j] = j < nt ? rsqrtf(loc[j] / static_cast<float>(hidden) + ln.eps) : 0.f;
    T* normed = static_cast<T*>(ln.normed);
#pragma unroll 1
    for (int v = threadIdx.x; v < hv; v += 128) {
      Vec<T> gam = gam0, bet = bet0;
      if (v != threadIdx.x) {
        gam.load(static_cast<const T*>(ln.gamma) + v * VN);
        bet.load(static_cast<const T*>(ln.beta) + v * VN);
      }
#pragma unroll
      for (int j = 0; j < TOK; ++j) {
        if (j < nt) {
          float* r = xs + j * hidden + v * VN;
          Vec<T> o;
#pragma unroll
          for (int k = 0; k < VN; ++k) {
            o.v[k] = from_float<T>((r[k] - mean[j]) * rstd[j] * to_float(gam.v[k]) + to_float(bet.v[k]));
            r[k] = to_float(o.v[k]);
          }
          if (store) o.store(normed + int64_t(t0 + j) * hidden + v * VN);
        }
      }
    }
  } else {
#pragma unroll 4
    for (int v = threadIdx.x; v < nt * hv; v += blockDim.x) {  // 16-byte loads, several in flight
      Vec<T> xv;
      xv.load(x + int64_t(t0) * hidden + v * VN);
#pragma unroll
      for (int i = 0; i < VN; ++i) xs[v * VN + i] = to_float(xv.v[i]);
    }
  }
  __syncthreads();
  if (e >= experts) return;
  float acc[TOK];
#pragma unroll
  for (int j = 0; j < TOK; ++j) acc[j] = 0.f;
  auto dot = [&](const float4& w, int i) {
#pragma unroll
    for (int j = 0; j < TOK; ++j)
      if (j < nt) {
        const float4 xv = *reinterpret_cast<const float4*>(xs + j * hidden + i);
        acc[j] += w.x * xv.x + w.y * xv.y + w.z * xv.z + w.w * xv.w;
      }
  };
#pragma unroll
  for (int u = 0; u < kGateWRegs; ++u) {
    const int i = lane * 4 + u * 128;
    if (i < hidden) dot(wr[u], i);
  }
#pragma unroll 1
  for (int i = lane * 4 + kGateWRegs * 128; i < hidden; i += 128)  // hidden > 1024: from L2
    dot(__ldg(reinterpret_cast<const float4*>(row + i)), i);
#pragma unroll
  for (int j = 0; j < TOK; ++j)
    if (j < nt) {
      const float v = warp_sum(acc[j]);
      if (lane == 0) logits[int64_t(t0 + j) * experts + e] = v;
    }
}

// ---- gate logits for many tokens (prefill): a 16-token x 64-expert tile per block, register-tiled ----------------
// Two groups of 128 threads take alternate 64-column chunks of the hidden size (halving the chain of dependent
// global loads a block waits through) and add up at the end. In a group each thread owns 2 tokens x 4 experts
// (experts tx + 16j: consecutive rows for consecutive lanes, so the padded float4 reads of the gate tile are
// conflict-free); x (as fp32) and the gate pass through shared memory, the next chunk loaded into registers while
// the current one is multiplied.
constexpr int kGateTileTok = 16, kGateTileExp = 64, kGateTileK = 64, kGateLd = kGateTileK + 4, kGateGroup = 128;
constexpr int kGateThreads = 2 * kGateGroup;
template <typename T>
__device__ __forceinline__ float4 load4_float(const T* p) {
  if constexpr (sizeof(T) == 4) {
    return *reinterpret_cast<const float4*>(p);
  } else {
    union { uint2 raw; T v[4]; } u;
    u.raw = *reinterpret_cast<const uint2*>(p);
    return make_float4(to_float(u.v[0]), to_float(u.v[1]), to_float(u.v[2]), to_float(u.v[3]));
  }
}
template <typename T>
__global__ void __launch_bounds__(kGateThreads) gate_logits_tiled_kernel(const T* __restrict__ x,
                                                                         const float* __restrict__ wg,
                                                                         float* __restrict__ logits, int tokens,
                                                                         int hidden, int experts) {
  constexpr int XL = kGateTileTok * kGateTileK / 4 / kGateGroup, WL = kGateTileExp * kGateTileK / 4 / kGateGroup;
  __shared__ __align__(16) float xs[2][kGateTileTok][kGateLd];
  __shared__ __align__(16) float ws[2][kGateTileExp][kGateLd];
  enter_after_predecessor();
  const int group = threadIdx.x / kGateGroup, tid = threadIdx.x % kGateGroup;
  const int t0 = blockIdx.y * kGateTileTok, e0 = blockIdx.x * kGateTileExp;
  const int tx = tid % 16, ty = tid / 16;
  float4 xr[XL], wr[WL];
  auto fetch = [&](int k0) {  // hidden % 8 == 0: a 4-column chunk is all in or all out
#pragma unroll
    for (int i = 0; i < XL; ++i) {
      const int q = tid + i * kGateGroup, t = t0 + q / (kGateTileK / 4), k = k0 + (q % (kGateTileK / 4)) * 4;
      xr[i] = t < tokens && k < hidden ? load4_float(x + int64_t(t) * hidden + k) : make_float4(0.f, 0.f, 0.f, 0.f);
    }
#pragma unroll
    for (int i = 0; i < WL; ++i) {
      const int q = tid + i * kGateGroup, e = e0 + q / (kGateTileK / 4), k = k0 + (q % (kGateTileK / 4)) * 4;
      wr[i] = e < experts && k < hidden ? __ldg(reinterpret_cast<const float4*>(wg + int64_t(e) * hidden + k))
                                        : make_float4(0.f, 0.f, 0.f, 0.f);
    }
  };
  float acc[2][4] = {};
  const int steps = (hidden + 2 * kGateTileK - 1) / (2 * kGateTileK);  // chunk pairs; the same count for both groups
  fetch(group * kGateTileK);
  for (int s = 0; s < steps; ++s) {
#pragma unroll
    for (int i = 0; i < XL; ++i) {
      const int q = tid + i * kGateGroup;
      *reinterpret_cast<float4*>(&xs[group][q / (kGateTileK / 4)][(q % (kGateTileK / 4)) * 4]) = xr[i];
    }
#pragma unroll
    for (int i = 0; i < WL; ++i) {
      const int q = tid + i * kGateGroup;
      *reinterpret_cast<float4*>(&ws[group][q / (kGateTileK / 4)][(q % (kGateTileK / 4)) * 4]) = wr[i];
    }
    __syncthreads();
    if (s + 1 < steps) fetch((2 * (s + 1) + group) * kGateTileK);
#pragma unroll
    for (int k = 0; k < kGateTileK; k += 4) {
      float4 xv[2], wv[4];
#pragma unroll
      for (int i = 0; i < 2; ++i) xv[i] = *reinterpret_cast<const float4*>(&xs[group][2 * ty + i][k]);
#pragma unroll
      for (int j = 0; j < 4; ++j) wv[j] = *reinterpret_cast<const float4*>(&ws[group][tx + 16 * j][k]);
#pragma unroll
      for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j)
          acc[i][j] += xv[i].x * wv[j].x + xv[i].y * wv[j].y + xv[i].z * wv[j].z + xv[i].w * wv[j].w;
    }
    __syncthreads();
  }
  float* partial = &ws[0][0][0];  // group 1's sums, [8][kGateGroup]: conflict-free, tid fastest
  if (group == 1)
#pragma unroll
    for (int i = 0; i < 8; ++i) partial[i * kGateGroup + tid] = acc[i / 4][i % 4];
  __syncthreads();
  if (group == 1) return;
#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int t = t0 + 2 * ty + i, e = e0 + tx + 16 * j;
      if (t < tokens && e < experts)
        logits[int64_t(t) * experts + e] = acc[i][j] + partial[(i * 4 + j) * kGateGroup + tid];
    }
}

// ---- softmax + top-k, a warp per token (ties: the lowest expert index) -------------------------------------------
// The softmax's max and normaliser of one token's logits, on every lane.
__device__ __forceinline__ void warp_softmax_stats(const float* __restrict__ l, int experts, float& m, float& sum) {
  const int lane = threadIdx.x & 31;
  m = -INFINITY;
  for (int e = lane; e < experts; e += 32) m = fmaxf(m, l[e]);
  m = warp_max(m);
  sum = 0.f;
  for (int e = lane; e < experts; e += 32) sum += expf(l[e] - m);
  sum = warp_sum(sum);
}

// The largest logit other than `skip` and its expert, on every lane.
__device__ __forceinline__ void warp_argmax(const float* __restrict__ l, int experts, int skip, float& best, int& arg) {
  const int lane = threadIdx.x & 31;
  best = -INFINITY;
  arg = 0x7fffffff;
  for (int e = lane; e < experts; e += 32)
    if (e != skip && l[e] > best) { best = l[e]; arg = e; }  // increasing e: ties keep the lowest
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const float ob = __shfl_xor_sync(0xffffffffu, best, o);
    const int oa = __shfl_xor_sync(0xffffffffu, arg, o);
    if (ob > best || (ob == best && oa < arg)) { best = ob; arg = oa; }
  }
}

__device__ void warp_topk(const Workspace& w, int t, int tokens, int experts, int top_k) {
  const float* l = w.logits + int64_t(t) * experts;
  float m, sum;
  warp_softmax_stats(l, experts, m, sum);
  int first = -1;
  for (int k = 0; k < top_k; ++k) {
    float best;
    int arg;
    warp_argmax(l, experts, first, best, arg);
    if ((threadIdx.x & 31) == 0) {
      w.expert_of[k * tokens + t] = arg;
      w.prob[k * tokens + t] = expf(best - m) / sum;
    }
    first = arg;
  }
}

__global__ void topk_kernel(Workspace w, int tokens, int experts, int top_k) {
  enter_after_predecessor();
  const int t = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
  if (t < tokens) warp_topk(w, t, tokens, experts, top_k);
}

// Top-1 of one token's logits on every lane of the warp, with warp_topk's arithmetic (the same expert and
// probability bits): the expert GEMVs of a one-token top-1 layer route for themselves.
__device__ __forceinline__ void warp_top1(const float* __restrict__ l, int experts, int& arg, float& prob) {
  float m, sum, best;
  warp_softmax_stats(l, experts, m, sum);
  warp_argmax(l, experts, -1, best, arg);
  prob = expf(best - m) / sum;
}

// ---- routing (one block): stable per-expert locations, capacity, offsets, the compact list of active experts,
// and the permutation --------------------------------------------------------------------------------------------
// More than kSmallRouteMax assignments (prefill), after topk_kernel.
__global__ void __launch_bounds__(kRouteThreads) route_kernel(Workspace w, int tokens, int experts, int top_k,
                                                               int capacity) {
  extern __shared__ int32_t rsm[];
  int32_t* wcount = rsm;                 // [32][experts]
  int32_t* base = rsm + 32 * experts;    // [experts] running count, then the kept count
  int32_t* total = base + experts;       // [experts] scratch, then the offsets
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int assignments = tokens * top_k;
  enter_after_predecessor();
  for (int e = threadIdx.x; e < experts; e += blockDim.x) base[e] = 0;
  __syncthreads();
  for (int a0 = 0; a0 < assignments; a0 += blockDim.x) {
    for (int i = threadIdx.x; i < 32 * experts; i += blockDim.x) wcount[i] = 0;
    __syncthreads();
    const int a = a0 + threadIdx.x;
    const int e = a < assignments ? w.expert_of[a] : -1;
    const unsigned peers = __match_any_sync(0xffffffffu, e);
    const int rank = __popc(peers & ((1u << lane) - 1u));
    if (e >= 0 && rank == 0) wcount[warp * experts + e] = __popc(peers);
    __syncthreads();
    for (int x = threadIdx.x; x < experts; x += blockDim.x) {
      int run = base[x];
      for (int v = 0; v < 32; ++v) { const int c = wcount[v * experts + x]; wcount[v * experts + x] = run; run += c; }
      total[x] = run;
    }
    __syncthreads();
    if (e >= 0) w.loc[a] = wcount[warp * experts + e] + rank;
    __syncthreads();
    for (int x = threadIdx.x; x < experts; x += blockDim.x) base[x] = total[x];
    __syncthreads();
  }
  for (int e = threadIdx.x; e < experts; e += blockDim.x) {
    base[e] = capacity > 0 ? min(base[e], capacity) : base[e];
    w.counts[e] = base[e];
  }
  __syncthreads();
  if (threadIdx.x == 0) {  // serial over experts, in shared memory
    int off = 0, n_active = 0;
    for (int e = 0; e < experts; ++e) {
      total[e] = off;
      w.offsets[e] = off;
      const int c = base[e];
      off += c;
      if (c > 0) w.active[1 + n_active++] = e;
    }
    w.offsets[experts] = off;
    w.active[0] = n_active;
  }
  __syncthreads();
  for (int a = threadIdx.x; a < assignments; a += blockDim.x) {
    const int e = w.expert_of[a], l = w.loc[a];
    if (l < base[e]) {
      const int p = total[e] + l;
      w.perm[p] = a;
      w.pos_of[a] = p;
    } else {
      w.pos_of[a] = -1;
    }
  }
}

// ---- routing at decode sizes (at most 64 assignments): one warp per token does softmax + top-k, then warp 0 alone
// builds what the expert kernels read (counts, offsets, active experts, perm, pos_of) with match/scan steps of a
// few hundred cycles, where route_kernel's block-wide passes and serial loop took microseconds. Same results as
// route_kernel (stable order a = slot * N + token, capacity), less loc, route_kernel's own scratch. Both regimes use
// it (the grouped GEMM at 17-64 assignments: H100, 350M decode graph at batch 32, two alternating rounds,
// 1.9382-1.9493 ms against 1.9740-1.9741 with route_kernel).
constexpr int kSmallRouteMax = 64;
__global__ void __launch_bounds__(1024) route_small_kernel(Workspace w, int tokens, int experts, int top_k,
                                                            int capacity, bool zero_ready) {
  __shared__ int32_t count_s[kMaxExperts];  // per-expert assignment counts, then the experts' first positions
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  enter_after_predecessor();
  for (int t = warp; t < tokens; t += blockDim.x >> 5) warp_topk(w, t, tokens, experts, top_k);
  for (int e = threadIdx.x; e < experts; e += blockDim.x) count_s[e] = 0;
  if (zero_ready)  // for expert_ffn_kernel after it
    for (int i = threadIdx.x; i < kFfnReady; i += blockDim.x) w.ready[i] = 0;
  __syncthreads();  // this block's expert_of / prob writes are visible
  if (warp != 0) return;
  const int A = tokens * top_k;
  int e_of[2], loc[2];
#pragma unroll
  for (int c = 0; c < 2; ++c) {  // assignment c * 32 + lane; chunk 0 counts before chunk 1
    const int a = c * 32 + lane;
    const int e = a < A ? w.expert_of[a] : -1;
    const unsigned peers = __match_any_sync(0xffffffffu, e);
    const int rank = __popc(peers & ((1u << lane) - 1u));
    const int before = e >= 0 ? count_s[e] : 0;
    __syncwarp();
    if (e >= 0 && rank == 0) count_s[e] = before + __popc(peers);
    __syncwarp();
    e_of[c] = e;
    loc[c] = before + rank;
  }
  const int per_lane = (experts + 31) / 32;  // lane owns experts [lane * per_lane, (lane + 1) * per_lane)
  int kept[kMaxExperts / 32], sum = 0, n_act = 0;
#pragma unroll
  for (int i = 0; i < kMaxExperts / 32; ++i) {
    const int e = lane * per_lane + i;
    kept[i] = i < per_lane && e < experts ? (capacity > 0 ? min(count_s[e], capacity) : count_s[e]) : 0;
    sum += kept[i];
    n_act += kept[i] > 0;
  }
  int sum_incl = sum, act_incl = n_act;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const int s1 = __shfl_up_sync(0xffffffffu, sum_incl, o), a1 = __shfl_up_sync(0xffffffffu, act_incl, o);
    if (lane >= o) { sum_incl += s1; act_incl += a1; }
  }
  int off = sum_incl - sum, idx = act_incl - n_act;
#pragma unroll
  for (int i = 0; i < kMaxExperts / 32; ++i) {
    const int e = lane * per_lane + i;
    if (i < per_lane && e < experts) {
      w.counts[e] = kept[i];
      w.offsets[e] = off;
      count_s[e] = off;
      if (kept[i] > 0) w.active[1 + idx++] = e;
      off += kept[i];
    }
  }
  if (lane == 31) {
    w.offsets[experts] = sum_incl;
    w.active[0] = act_incl;
  }
  __syncwarp();
#pragma unroll
  for (int c = 0; c < 2; ++c) {
    const int a = c * 32 + lane;
    if (a >= A) continue;
    if (capacity <= 0 || loc[c] < capacity) {
      const int p = count_s[e_of[c]] + loc[c];
      w.perm[p] = a;
      w.pos_of[a] = p;
    } else {
      w.pos_of[a] = -1;
    }
  }
}

// Top-1 with capacity, FC2 writing the output: the tokens the capacity dropped (assignment t is token t) pass the
// residual (or zeros) through; grid-stride over the whole grid.
template <typename T>
__device__ void pass_dropped(const Workspace& w, const T* __restrict__ residual, T* __restrict__ out, int tokens,
                             int rows) {
  constexpr int VN = Vec<T>::N;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < int64_t(tokens) * (rows / VN);
       i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t t = i / (rows / VN), c = (i % (rows / VN)) * VN;
    if (w.pos_of[t] >= 0) continue;
    Vec<T> o;
    if (residual) o.load(residual + t * rows + c);
    else o.raw = make_uint4(0, 0, 0, 0);
    o.store(out + t * rows + c);
  }
}

// ---- few tokens per expert: persistent GEMV, a warp per (active expert, group of RG output rows) ------------------
// kSingle (one token, top-1, which capacity never drops): no routing kernel runs; every warp takes the expert and
// its probability from the gate logits itself (warp_top1), the token is 0 and its activation row 0.
// FC1: act[p, r] = act(W1[e][r] · x[token(p)] + b1[e][r]);  FC2: y[p, r] = W2[e][r] · act[p] + b2[e][r], or with
// kOut (top-1, the finalize fused in): out[t, r] = residual[t, r] + prob[t] * (W2[e][r] · act[p] + b2[e][r]) for
// t = perm[p], and (may_drop) out[t] = residual[t] for the tokens the capacity dropped.
// Each lane issues 16 sixteen-byte weight loads (RG rows x CV vectors) before using any, the first ones as soon as
// the expert is known (before its token list is read); the weights are read once per expert, the token vectors
// (at most kGemvTok at a time) come from L1/L2.
template <typename T, bool FC1, int RG, bool kOut, bool kSingle = false>
__global__ void __launch_bounds__(kGemvThreads, 2) expert_gemv_kernel(
    const T* __restrict__ input, const T* __restrict__ weight, const T* __restrict__ bias, Workspace w,
    const T* __restrict__ residual, T* __restrict__ out, bool may_drop, int tokens, int rows, int K, int act_kind,
    int experts) {
  constexpr int VN = Vec<T>::N, CV = 16 / RG, TOK = kSingle ? 1 : kGemvTok;  // one token: no dead token slots
  static_assert(!(FC1 && kOut), "only FC2 writes the layer output");
  // FC2 of one token picks its expert from the gate logits and loads its weights before the wait: the gate ran
  // two kernels back (common.cuh: reads before the wait), so FC2's 8 MB stream while FC1 still runs.
  constexpr bool kEarly = kSingle && !FC1;
  if constexpr (!kEarly) enter_after_predecessor();
  const int lane = threadIdx.x & 31;
  const int warps = gridDim.x * (blockDim.x >> 5);
  const int KV = K / VN, vpl = (KV + 31) / 32;
  const int groups = (rows + RG - 1) / RG;
  if (kOut && may_drop && !kSingle) pass_dropped(w, residual, out, tokens, rows);
  int single_e = 0;
  float single_p = 0.f;
  if constexpr (kSingle) warp_top1(w.logits, experts, single_e, single_p);
  const int total = (kSingle ? 1 : w.active[0]) * groups;
  for (int item = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5); item < total; item += warps) {
    const int e = kSingle ? single_e : w.active[1 + item / groups], row0 = (item % groups) * RG;
    const T* W = weight + (int64_t(e) * rows + row0) * K;
    Vec<T> wv[RG][CV];
    auto load_weights = [&](int c0) {
#pragma unroll
      for (int r = 0; r < RG; ++r)
#pragma unroll
        for (int u = 0; u < CV; ++u) {
          const int v = (c0 + u) * 32 + lane;
          if (row0 + r < rows && v < KV) wv[r][u].load_global_nc(W + int64_t(r) * K + v * VN);
        }
    };
    load_weights(0);
    float bias_r[RG];  // with the weights, not after the dot products
#pragma unroll
    for (int r = 0; r < RG; ++r) bias_r[r] = row0 + r < rows ? to_float(bias[int64_t(e) * rows + row0 + r]) : 0.f;
    if constexpr (kEarly) enter_after_predecessor();  // FC1's activations from here on
    const int count = kSingle ? 1 : w.counts[e], off = kSingle ? 0 : w.offsets[e];
    for (int t0 = 0; t0 < count; t0 += TOK) {
      const int nt = min(TOK, count - t0);
      const T* src[TOK];
      int tok[TOK];
      float acc[RG][TOK];
#pragma unroll
      for (int j = 0; j < TOK; ++j) {
        const int p = off + t0 + min(j, nt - 1);
        if (FC1 || kOut) tok[j] = kSingle ? 0 : w.perm[p] % tokens;
        src[j] = input + int64_t(FC1 ? tok[j] : p) * K;
#pragma unroll
        for (int r = 0; r < RG; ++r) acc[r][j] = 0.f;
      }
      for (int c0 = 0; c0 < vpl; c0 += CV) {
        if (t0 > 0 || c0 > 0) load_weights(c0);
#pragma unroll
        for (int j = 0; j < TOK; ++j) {
          if (j >= nt) continue;
#pragma unroll
          for (int u = 0; u < CV; ++u) {
            const int v = (c0 + u) * 32 + lane;
            if (v >= KV) continue;
            Vec<T> xv;
            xv.load(src[j] + v * VN);
#pragma unroll
            for (int r = 0; r < RG; ++r)
#pragma unroll
              for (int i = 0; i < VN; ++i) acc[r][j] += to_float(wv[r][u].v[i]) * to_float(xv.v[i]);
          }
        }
      }
#pragma unroll
      for (int r = 0; r < RG; ++r)
#pragma unroll
        for (int j = 0; j < TOK; ++j) {
          if (j < nt && row0 + r < rows) {  // uniform across the warp
            const float s = warp_sum(acc[r][j]) + bias_r[r];
            if (lane == 0) {
              const int64_t p = off + t0 + j;
              if (FC1) {
                static_cast<T*>(w.act)[p * rows + row0 + r] = from_float<T>(activate(s, act_kind));
              } else if (kOut) {
                const int64_t o = int64_t(tok[j]) * rows + row0 + r;
                const float v = (kSingle ? single_p : w.prob[tok[j]]) * s;
                out[o] = from_float<T>(residual ? v + to_float(residual[o]) : v);
              } else {
                w.y[p * rows + row0 + r] = s;
              }
            }
          }
        }
    }
  }
  if constexpr (kEarly) enter_after_predecessor();  // a warp that had no item
}

// ---- one token, top-1 (batch-1 decode): FC2 on its own, its code run once before the wait -------------------------
// A kernel's code after griddepcontrol.wait is fetched cold: it last ran a layer ago, and the SM's instruction cache
// has held a dozen other kernels since. Measured with %globaltimer stamps in the 350M batch-1 decode step (H100):
// the generic FC2 (25 KB of SASS) took 2.9 us after its wait to read the 8 KB activation row, where a lone kernel
// reading it takes 1.1, and 1.6-1.9 us more for its 128 FMAs a lane. So this kernel runs its post-wait code once
// before the wait on a stand-in (one vector of its weight row re-read in place of every activation vector, the result
// discarded) and then again, from the instruction cache, on the activations. The pass loop is not unrolled: both
// passes are the same instructions. Batch-1 decode graph 0.561 -> 0.538 ms; the slim kernel without the first pass
// 0.550; FC1 given the same treatment (a first pass on expert 0) lost: 0.564-0.569 ms (docs/bench/log.md).
//
// out[r] = residual[r] + prob * (W2[e][r] . act + b2[e][r]), a warp per row, K <= 32 * kOneVecsFc2 vectors. The
// gate ran two kernels back, so the expert is known before the wait (common.cuh) and the row is in registers while
// FC1 runs.
constexpr int kOneVecsFc2 = 16;
template <typename T>
__global__ void __launch_bounds__(kGemvThreads, 2) expert_fc2_one_kernel(
    const T* __restrict__ act, const T* __restrict__ weight, const T* __restrict__ bias, const float* __restrict__ logits,
    const T* __restrict__ residual, T* __restrict__ out, int rows, int K, int experts) {
  constexpr int VN = Vec<T>::N;
  const int lane = threadIdx.x & 31, row = blockIdx.x * (kGemvThreads / 32) + (threadIdx.x >> 5);
  const int KV = K / VN;
  int e;
  float prob;
  warp_top1(logits, experts, e, prob);
  const bool active = row < rows;
  const T* W = weight + (int64_t(e) * rows + (active ? row : 0)) * K;
  Vec<T> wv[kOneVecsFc2];
#pragma unroll
  for (int u = 0; u < kOneVecsFc2; ++u) {
    const int v = u * 32 + lane;
    if (active && v < KV) wv[u].load_global_nc(W + v * VN);
    else wv[u].raw = make_uint4(0, 0, 0, 0);
  }
  const float b = active ? to_float(bias[int64_t(e) * rows + row]) : 0.f;
  float acc = 0.f;
#pragma unroll 1
  for (int pass = 0; pass < 2; ++pass) {
    if (pass == 1) enter_after_predecessor();  // FC1's activations from here on
    const T* xs = (pass == 1 ? act : W) + lane * VN;  // pass 0: one vector of the weight row, re-read
    const int step = pass == 1 ? 32 * VN : 0;
    acc = 0.f;
#pragma unroll
    for (int u = 0; u < kOneVecsFc2; ++u) {
      if (u * 32 + lane >= KV) continue;
      Vec<T> xv;
      xv.load(xs + u * step);
#pragma unroll
      for (int i = 0; i < VN; ++i) acc += to_float(wv[u].v[i]) * to_float(xv.v[i]);
    }
  }
  const float s = warp_sum(acc) + b;
  if (active && lane == 0) {
    const float v = prob * s;
    out[row] = from_float<T>(residual ? v + to_float(residual[row]) : v);
  }
}

// ---- few tokens per expert, fp16/bf16: tensor cores ---------------------------------------------------------------
// A block per (active-expert slot, R x 8 output rows); blocks of slots past the active count exit at once. The
// expert's assignments (at most kGemvMaxAssignments = 16) are the A rows of mma.m16n8k16 (common.cuh:
// mma_gemv_chunk), each group of 8 weight rows B; the warps split K in chunks (warp i takes i, i + 8, ...), the
// first kPre of them (of every row group) loaded as soon as the expert is known, and their partial sums meet in
// shared memory in a fixed order. One 16-byte activation load per weight vector and no FMAs: expert_gemv_kernel
// above spends 4 token loads and 32 FMAs per weight vector at 4 rows a warp, and with 1 row a warp re-reads the
// token per row. FC2 (K 4096) from 4 assignments takes R = 2 with kPre = 2 (H100, 350M decode graphs at batch 4 /
// 8 / 16: 0.836 / 1.021 / 1.374 ms against 0.845 / 1.039 / 1.400 with R = 1, kPre = 4; at batch 2 0.752 against
// 0.741, hence from 4; R = 4 and FC1 with R = 2 or 4 measured slower). Epilogues as expert_gemv_kernel's (FC1:
// bias + activation into act; FC2: into y, or with kOut the output).
//
// Blocks are numbered slot-fastest (block b: slot b % slots, row group b / slots), so that the blocks of slots past the
// active count (at 8 tokens about 3 of the 8 slots: ~1400 of FC1's 4096 blocks), which exit at once, are spread over
// the grid instead of running as its tail after every active one. H100, the first 8 layers of the 350M decode graphs
// at batch 4 / 8 / 16 (three alternating rounds, medians): 0.3054 / 0.3733 / 0.4822 ms against 0.3059 / 0.3768 /
// 0.4952 slot-major.
template <typename T, bool FC1, bool kOut, int kPre, int R = 1>
__global__ void __launch_bounds__(kGemvThreads, kPre * R == 1 ? 4 : 2) expert_mma_kernel(
    const T* __restrict__ input, const T* __restrict__ weight, const T* __restrict__ bias, Workspace w,
    const T* __restrict__ residual, T* __restrict__ out, bool may_drop, int tokens, int rows, int K, int act_kind) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  static_assert(!(FC1 && kOut), "only FC2 writes the layer output");
  static_assert(kGemvMaxAssignments <= 16, "an expert's assignments fill one MMA's 16 rows");
  constexpr int W = kGemvThreads / 32;
  // FC2 at one row group a block (2-3 assignments) reads the routing (two kernels back, common.cuh) and loads its
  // first kPre chunks before its wait, streaming weights during FC1's last wave. H100, first 8 layers of the 350M
  // decode graphs, three alternating rounds: batch 2 0.2565 against 0.2653 ms; the same for the two-row-group FC2
  // (from 4 assignments: 128 registers, 2 blocks an SM) lost 0.5-2% at batch 4-16.
  constexpr bool kEarly = !FC1 && R == 1;
  __shared__ float part[W][16][8 * R];
  auto enter = [&] {
    enter_after_predecessor();
    if (kOut && may_drop) pass_dropped(w, residual, out, tokens, rows);
  };
  if constexpr (!kEarly) enter();
  const int blocks_per_expert = (rows + 8 * R - 1) / (8 * R);
  const int slots = gridDim.x / blocks_per_expert;
  const int slot = blockIdx.x % slots, n0 = (blockIdx.x / slots) * 8 * R;
  // the active count and this slot's expert in one round trip (slot < experts: active[1 + slot] exists)
  const int n_active = w.active[0], e = w.active[1 + slot];
  if (slot >= n_active) {
    if constexpr (kEarly) enter();
    return;
  }
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, t = lane & 3;
  const int chunks = (K + kMmaChunk - 1) / kMmaChunk;
  const T* wrow[R];
  Vec<T> wv[R][kPre][kMmaVecs];
#pragma unroll
  for (int r = 0; r < R; ++r) {
    wrow[r] = n0 + 8 * r + g < rows ? weight + (int64_t(e) * rows + n0 + 8 * r + g) * K : nullptr;
    mma_gemv_preload(wv[r], wrow[r], warp, W, K, t);
  }
  constexpr int OPT = (16 * 8 * R + kGemvThreads - 1) / kGemvThreads;  // outputs a thread writes (at most)
  float bias_v[OPT];
#pragma unroll
  for (int o = 0; o < OPT; ++o) {  // output i = threadIdx.x + o * threads: (assignment i / (8R), row n0 + i % (8R))
    const int c = (threadIdx.x + o * kGemvThreads) % (8 * R);
    bias_v[o] = n0 + c < rows ? to_float(bias[int64_t(e) * rows + n0 + c]) : 0.f;
  }
  if constexpr (kEarly) enter();
  const int count = w.counts[e], off = w.offsets[e];  // <= kGemvMaxAssignments <= 16: one pass
  auto src = [&](int m) -> const T* {  // A row m: assignment off + m (FC1: its token's hidden row)
    if (m >= count) return nullptr;
    return input + int64_t(FC1 ? w.perm[off + m] % tokens : off + m) * K;
  };
  const T* const xr[2] = {src(g), src(g + 8)};
#pragma unroll
  for (int r = 0; r < R; ++r) {
    float acc[1][4] = {};
    mma_gemv_accumulate<T, kPre, 1>(acc, wv[r], wrow[r], xr, warp, W, chunks, K, t);
    part[warp][g][8 * r + 2 * t] = acc[0][0];
    part[warp][g][8 * r + 2 * t + 1] = acc[0][1];
    part[warp][g + 8][8 * r + 2 * t] = acc[0][2];
    part[warp][g + 8][8 * r + 2 * t + 1] = acc[0][3];
  }
  __syncthreads();
#pragma unroll
  for (int o = 0; o < OPT; ++o) {
    const int i = threadIdx.x + o * kGemvThreads, m = i / (8 * R), c = i % (8 * R);
    if (m >= count || n0 + c >= rows) continue;
    float s = bias_v[o];
#pragma unroll
    for (int j = 0; j < W; ++j) s += part[j][m][c];
    const int64_t p = off + m, n = n0 + c;
    if (FC1) {
      static_cast<T*>(w.act)[p * rows + n] = from_float<T>(activate(s, act_kind));
    } else if (kOut) {
      const int tok = w.perm[p] % tokens;
      const int64_t o = int64_t(tok) * rows + n;
      const float v = w.prob[tok] * s;
      out[o] = from_float<T>(residual ? v + to_float(residual[o]) : v);
    } else {
      w.y[p * rows + n] = s;
    }
  }
#endif
}

template <typename T, bool FC1, bool kOut = false, bool kSingle = false>
void launch_gemv(const T* input, const T* weight, const T* bias, const Workspace& w, const T* residual, T* out,
                 bool may_drop, int tokens, int rows, int K, int act_kind, int assignments, int experts,
                 bool programmatic, cudaStream_t stream) {
  if constexpr (sizeof(T) == 2 && !kSingle) {  // tensor cores: a block per (expert slot, 8 or 16 rows)
    // K > 1024 (FC2): from 4 assignments a block covers 2 row groups (16 rows), 2 chunks of each preloaded
    const bool short_k = K <= kMmaChunk * (kGemvThreads / 32), pairs = !short_k && assignments >= 4;
    const int block_rows = pairs ? 16 : 8;  // as expert_mma_kernel's 8 * R
    const int grid = std::min(assignments, experts) * ((rows + block_rows - 1) / block_rows);
    if (pairs)
      launch_if(programmatic, expert_mma_kernel<T, FC1, kOut, 2, 2>, grid, kGemvThreads, 0, stream, input, weight,
                bias, w, residual, out, may_drop, tokens, rows, K, act_kind);
    else if (!short_k)
      launch_if(programmatic, expert_mma_kernel<T, FC1, kOut, 4>, grid, kGemvThreads, 0, stream, input, weight, bias,
                w, residual, out, may_drop, tokens, rows, K, act_kind);
    else
      launch_if(programmatic, expert_mma_kernel<T, FC1, kOut, 1>, grid, kGemvThreads, 0, stream, input, weight, bias,
                w, residual, out, may_drop, tokens, rows, K, act_kind);
    return;
  }
  // 4 rows per warp: each token vector loaded serves 4 rows (FC2's activation rows are as long as its weight
  // rows). With one or two assignments that leaves too few warps for FC2's 1024 rows: one row each then.
  // at most min(assignments, experts) experts are hit: no more warps than rows to cover them
  const int rows_per_warp = (!FC1 && assignments <= 2) ? 1 : 4;
  const int64_t max_items = int64_t(std::min(assignments, experts)) * ((rows + rows_per_warp - 1) / rows_per_warp);
  const int grid = static_cast<int>(std::min<int64_t>(sm_count() * 8, (max_items + 7) / 8));
  if (!FC1 && assignments <= 2)
    launch_if(programmatic, expert_gemv_kernel<T, FC1, 1, kOut, kSingle>, grid, kGemvThreads, 0, stream, input,
              weight, bias, w, residual, out, may_drop, tokens, rows, K, act_kind, experts);
  else
    launch_if(programmatic, expert_gemv_kernel<T, FC1, 4, kOut, kSingle>, grid, kGemvThreads, 0, stream, input,
              weight, bias, w, residual, out, may_drop, tokens, rows, K, act_kind, experts);
}

// ---- many tokens per expert: grouped GEMM on tensor cores (mma.sync, fp16/bf16 in, fp32 accumulate) ---------

// Four 8x8 matrices of 16-bit elements from shared memory; lane l gives the address of row l % 8 of matrix l / 8.
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&d)[4], const void* p) {
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(p));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(d[0]), "=r"(d[1]), "=r"(d[2]), "=r"(d[3])
               : "r"(s));
}
// Tile shapes per BM: BN output columns (weight rows) and BK of the reduction per pipeline stage. Operand tiles are
// [rows][BK] of 16-bit elements with the 16-byte chunk c of row r stored at chunk c ^ (r % 8): cp.async writing
// rows and ldmatrix reading one chunk of 8 consecutive rows then both touch all 32 banks once. (32-wide k-tiles,
// 64-byte rows, measured slower: docs/bench/log.md.) BN is 128, except for 32-row tiles at decode sizes (up to
// kGemmNarrowMax assignments): a decode step of 24-32 tokens routes to ~13 experts, whose 128-column tiles (~100 for
// FC2) leave much of the 264-block grid idle, while 64-column tiles (48 KB, 4 blocks an SM) spread them (H100, first 8
// layers of the 350M decode graph, batch 24 / 32: 0.6526 / 0.6751 ms against 0.6599 / 0.6777 with 128); the 510-token
// prefill, also on 32-row tiles, is ~1% faster with 128 (docs/bench/log.md).
constexpr int kGemmNarrowMax = 64;
static_assert(kGemmNarrowMax <= kSmallRouteMax, "expert_ffn_kernel's counters are zeroed by route_small_kernel");
// MOETRT_FFN_GEMM=0: build-time switch for A/Bs, the decode-sized grouped GEMM as two kernels (FC1, FC2) instead of
// expert_ffn_kernel
#ifndef MOETRT_FFN_GEMM
#define MOETRT_FFN_GEMM 1
#endif
constexpr bool kFfnGemm = MOETRT_FFN_GEMM;
// MOETRT_GEMM_SKIP_PAD=0: build-time switch for A/Bs of the 32-row tiles' skipped m-tile (expert_gemm_kernel)
#ifndef MOETRT_GEMM_SKIP_PAD
#define MOETRT_GEMM_SKIP_PAD 1
#endif
constexpr bool kSkipPad = MOETRT_GEMM_SKIP_PAD;
#ifndef MOETRT_GEMM32_BK
#define MOETRT_GEMM32_BK 64
#endif
#ifndef MOETRT_GEMM32_STAGES
#define MOETRT_GEMM32_STAGES 4
#endif
template <int BM> __host__ __device__ constexpr int gemm_bk() { return BM == 32 ? MOETRT_GEMM32_BK : 64; }
template <int BK> __device__ __forceinline__ int swizzled(int r, int chunk) {
  static_assert(BK >= 64 && BK % 64 == 0, "the swizzle needs rows of a multiple of 128 bytes");
  return r * BK + ((chunk ^ (r & 7)) << 3);
}
template <int BM> __host__ __device__ constexpr int gemm_stages() {
  return BM >= 128 ? 3 : BM == 32 ? MOETRT_GEMM32_STAGES : 4;
}
// Warps over the rows of a tile (4 more over its BN columns each): more warps hide more latency, fewer rows a
// warp means more fragment loads per MMA.
template <int BM> __host__ __device__ constexpr int gemm_warps_m() { return BM >= 64 ? 2 : 1; }
template <int BM> __host__ __device__ constexpr int gemm_threads() { return 128 * gemm_warps_m<BM>(); }
template <int BM, int BN> __host__ __device__ constexpr int gemm_smem_bytes() {
  return gemm_stages<BM>() * (BM + BN) * gemm_bk<BM>() * 2;
}

// A block computes BM x BN output tiles of one expert (BM = 32, 64, 128 follows the tokens per expert, so that
// short experts do not pay for a 128-row tile); its warps form a WM x 4 grid, each over BM/WM rows and BN/4
// columns. A block takes work items (expert, row tile, column tile) in a grid-stride loop as one stream of
// k-tiles: the cp.async pipeline runs on into the next item while this one's last k-tiles and epilogue compute,
// so no item starts on an empty pipeline. Each thread copies the same 16-byte chunk column of rows
// tid / 8 + i * (threads / 8) of every tile, and so holds its own rows' token indices (looked up one item ahead).
// kOut (FC2 of top-1): the finalize fused in, as in the GEMV regime: out[t] = residual[t] + prob[t] * row, and
// (may_drop) out[t] = residual[t] for the tokens the capacity dropped.
//
// The routing a block's prologue gathers into shared memory (gemm_prologue), for its items.
struct GemmRouting {
  int32_t tile_start[kMaxExperts + 1], active[kMaxExperts], count[kMaxExperts], off[kMaxExperts];
};

__device__ __forceinline__ int ld_acquire_gpu(const int32_t* p) {
  int v;
  asm volatile("ld.acquire.gpu.global.b32 %0, [%1];\n" : "=r"(v) : "l"(p) : "memory");
  return v;
}

// tile_start[i]: row tiles of the active experts before the i-th (a scan 32 at a time), with each active expert's
// id, count and offset; the caller has passed its dependency wait.
template <int BM>
__device__ void gemm_prologue(const Workspace& w, GemmRouting& rt, int& n_active) {
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  n_active = w.active[0];
  for (int i = threadIdx.x; i < n_active; i += blockDim.x) {
    const int e = w.active[1 + i];
    rt.active[i] = e;
    rt.count[i] = w.counts[e];
    rt.off[i] = w.offsets[e];
  }
  __syncthreads();
  if (warp == 0) {
    int carry = 0;
    if (lane == 0) rt.tile_start[0] = 0;
    for (int i0 = 0; i0 < n_active; i0 += 32) {
      int v = i0 + lane < n_active ? (rt.count[i0 + lane] + BM - 1) / BM : 0;
#pragma unroll
      for (int o = 1; o < 32; o <<= 1) {
        const int u = __shfl_up_sync(0xffffffffu, v, o);
        if (lane >= o) v += u;
      }
      if (i0 + lane < n_active) rt.tile_start[i0 + lane + 1] = carry + v;
      carry += __shfl_sync(0xffffffffu, v, 31);
    }
  }
  __syncthreads();
}

// A block's items of one GEMM (FC1: input rows through perm, bias + activation into act; FC2: act rows, into y
// or, with kOut, the output), as one stream of k-tiles: items first, first + stride, ... below total. kDep 1
// counts each finished item in ready[slot]; kDep 2 waits, before loading an item's activation rows, until its
// expert's FC1 items are all counted (ready_per_tile of them per row tile).
template <typename T, bool FC1, int BM, int BN, bool kOut, int kDep>
__device__ __forceinline__ void gemm_items(unsigned char* smem, const GemmRouting& rt, int n_active, int first,
                                           int total, int stride, const T* __restrict__ input,
                                           const T* __restrict__ weight, const T* __restrict__ bias, const Workspace& w,
                                           const T* __restrict__ residual, T* __restrict__ out, int tokens, int rows,
                                           int K, int act_kind, int32_t* ready, int ready_per_tile) {
  constexpr int BK = gemm_bk<BM>();
  constexpr int S = gemm_stages<BM>(), WM = gemm_warps_m<BM>(), MI = BM / 16 / WM, NI = BN / 32;
  constexpr int kChunks = BK / 8, kRowStep = gemm_threads<BM>() / kChunks;  // rows per pass of the block
  constexpr int AR = BM / kRowStep, BR = BN / kRowStep;                    // rows each thread copies
  T* As = reinterpret_cast<T*>(smem);  // [S][BM * BK]
  T* Bs = As + S * BM * BK;            // [S][BN * BK]
  const int32_t* tile_start_s = rt.tile_start;
  const int32_t* active_s = rt.active;
  const int32_t* count_s = rt.count;
  const int32_t* off_s = rt.off;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int wm0 = (warp / 4) * (BM / WM), wn0 = (warp % 4) * (BN / 4);  // this warp's rows and columns in the tile
  const int ch = threadIdx.x % kChunks, row_lo = threadIdx.x / kChunks;
  const int n_tiles = (rows + BN - 1) / BN;
  const int k_tiles = (K + BK - 1) / BK;
  const int n_mine = first < total ? (total - first + stride - 1) / stride : 0;
  struct Tile { int e, m0, n0, count, off, slot, m_tiles; };
  auto item_of = [&](int j) { return first + j * stride; };
  auto has = [&](int j) { return j < n_mine; };  // the block's j-th item exists
  auto describe = [&](int j) {  // this block's j-th item
    const int item = item_of(j), mt_all = item / n_tiles;
    int lo = 0, hi = n_active;  // the active expert whose row tiles hold mt_all
    while (hi - lo > 1) {
      const int mid = (lo + hi) >> 1;
      if (tile_start_s[mid] <= mt_all) lo = mid;
      else hi = mid;
    }
    Tile t;
    t.e = active_s[lo];
    t.m0 = (mt_all - tile_start_s[lo]) * BM;
    t.n0 = (item % n_tiles) * BN;
    t.count = count_s[lo];
    t.off = off_s[lo];
    t.slot = lo;
    t.m_tiles = tile_start_s[lo + 1] - tile_start_s[lo];
    return t;
  };
  // kDep == 2: an item's activations exist once the FC1 items of its expert (m_tiles x ready_per_tile of them)
  // have each counted themselves in ready[slot] (kDep == 1, after their epilogue); thread 0 waits, the block follows
  auto await_rows = [&](const Tile& t) {
    if constexpr (kDep == 2) {
      if (threadIdx.x == 0) {
        const int target = t.m_tiles * ready_per_tile;
        while (ld_acquire_gpu(ready + t.slot) < target) __nanosleep(100);
        __threadfence();
      }
      __syncthreads();
    }
  };
  // the row of `input` behind each A row this thread copies (-1: past the expert's tokens); for FC1 in two
  // halves, the perm load one item ahead and the "% tokens" when the item comes up, so that no warp waits on it
  auto source_rows = [&](const Tile& t, int (&src)[AR]) {
#pragma unroll
    for (int i = 0; i < AR; ++i) {
      const int r = t.m0 + row_lo + i * kRowStep, p = t.off + r;
      src[i] = r < t.count ? (FC1 ? w.perm[p] : p) : -1;
    }
  };
  auto take_rows = [&](int (&dst)[AR], const int (&src)[AR]) {
#pragma unroll
    for (int i = 0; i < AR; ++i) dst[i] = FC1 && src[i] >= 0 ? src[i] % tokens : src[i];
  };
  // the load cursor: item ld_j, k-tile ld_kt; the next item's rows are looked up when the cursor enters an item.
  // Per item, each thread's source row pointers (k offset included); its shared-memory offsets never change.
  int ld_j = 0, ld_kt = 0, ld_src[AR], nx_src[AR], a_off[AR], b_off[BR];
  const T* a_ptr[AR];
  const T* b_ptr = weight;
  int b_rows = 0;  // of this thread's B rows, how many exist (the last column tile may be short)
#pragma unroll
  for (int i = 0; i < AR; ++i) a_off[i] = swizzled<BK>(row_lo + i * kRowStep, ch);
#pragma unroll
  for (int i = 0; i < BR; ++i) b_off[i] = swizzled<BK>(row_lo + i * kRowStep, ch);
  Tile ld{}, nx{};
  auto enter_item = [&]() {
#pragma unroll
    for (int i = 0; i < AR; ++i) a_ptr[i] = ld_src[i] >= 0 ? input + int64_t(ld_src[i]) * K + ch * 8 : nullptr;
    b_ptr = weight + (int64_t(ld.e) * rows + ld.n0 + row_lo) * K + ch * 8;
    b_rows = min(BR, (rows - ld.n0 - row_lo + kRowStep - 1) / kRowStep);
  };
  if (has(0)) {
    ld = describe(0);
    await_rows(ld);
    source_rows(ld, ld_src);
    take_rows(ld_src, ld_src);
    enter_item();
  }
  if (has(1)) { nx = describe(1); source_rows(nx, nx_src); }  // one item ahead
  auto load_next = [&](int stage) {  // one commit group per k-tile, empty once this block's items are all loaded
    if (has(ld_j)) {
      const int kofs = ld_kt * BK;
      const bool k_ok = kofs + ch * 8 < K;
      T* a = As + stage * BM * BK;
      T* b = Bs + stage * BN * BK;
#pragma unroll
      for (int i = 0; i < AR; ++i) {
        const bool ok = a_ptr[i] && k_ok;
        cp_async16(a + a_off[i], ok ? a_ptr[i] + kofs : input, ok);
      }
#pragma unroll
      for (int i = 0; i < BR; ++i) {
        const bool ok = i < b_rows && k_ok;
        cp_async16<true>(b + b_off[i], ok ? b_ptr + int64_t(i) * kRowStep * K + kofs : weight, ok);
      }
      if (++ld_kt == k_tiles) {
        ld_kt = 0;
        if (has(++ld_j)) {
          ld = nx;
          await_rows(ld);
          take_rows(ld_src, nx_src);
          enter_item();
          if (has(ld_j + 1)) { nx = describe(ld_j + 1); source_rows(nx, nx_src); }
        }
      }
    }
    cp_async_commit();
  };
#pragma unroll
  for (int s = 0; s < S - 1; ++s) load_next(s);  // wait_group<S - 2> below then always means "step s landed"
  float acc[MI][NI][4];
  Tile cur{};
  const int steps = n_mine * k_tiles;
  for (int s = 0, kt = 0, j = 0; s < steps; ++s) {
    if (kt == 0) {
      cur = describe(j);
#pragma unroll
      for (int a = 0; a < MI; ++a)
#pragma unroll
        for (int b = 0; b < NI; ++b)
#pragma unroll
          for (int c = 0; c < 4; ++c) acc[a][b][c] = 0.f;
    }
    cp_async_wait<S - 2>();
    __syncthreads();  // step s visible to all; stage (s - 1) % S no longer read
    load_next((s + S - 1) % S);
    const T* a = As + (s % S) * BM * BK;
    const T* b = Bs + (s % S) * BN * BK;
    // fragments double-buffered in registers: ldmatrix for k-step kk + 1 is issued before the MMAs of kk (asm
    // volatile keeps source order, so this order is the schedule)
    uint32_t af[2][MI][4], bf[2][NI / 2][4];
    // 32-row tiles: an m-tile past the item's tokens holds zero rows, its fragments and MMAs are skipped (at decode
    // sizes a tile has ~1-3 tokens: half of its MMAs). Not in the wider tiles: there the branches cost more than
    // they save (4096 tokens 612 against 537 us, H100, docs/bench/log.md).
    const int live = kSkipPad && BM == 32 ? cur.count - cur.m0 - wm0 : BM;
    auto load_fragments = [&](int buf, int kk) {
#pragma unroll
      for (int mi = 0; mi < MI; ++mi)
        if (mi * 16 < live)
          ldmatrix_x4(af[buf][mi], a + swizzled<BK>(wm0 + mi * 16 + (lane & 15), kk * 2 + (lane >> 4)));
#pragma unroll
      for (int nj = 0; nj < NI / 2; ++nj)  // n-tiles 2nj and 2nj + 1: (n 0-7 | 8-15) x (k 0-7 | 8-15)
        ldmatrix_x4(bf[buf][nj], b + swizzled<BK>(wn0 + nj * 16 + (lane & 7) + ((lane >> 4) << 3),
                                                  kk * 2 + ((lane >> 3) & 1)));
    };
    load_fragments(0, 0);
#pragma unroll
    for (int kk = 0; kk < BK / 16; ++kk) {
      if (kk + 1 < BK / 16) load_fragments((kk + 1) & 1, kk + 1);
      const int cb = kk & 1;
#pragma unroll
      for (int mi = 0; mi < MI; ++mi)
        if (mi * 16 < live) {
#pragma unroll
          for (int ni = 0; ni < NI; ++ni)
            mma_16816<T>(acc[mi][ni], af[cb][mi], bf[cb][ni / 2][(ni % 2) * 2], bf[cb][ni / 2][(ni % 2) * 2 + 1]);
        }
    }
    if (++kt < k_tiles) continue;
    kt = 0;
    ++j;
    // epilogue from the accumulators: lane holds rows g, g + 8 and columns 2t, 2t + 1 of each 16x8 tile
    const int g = lane >> 2, t2 = (lane & 3) * 2;
#pragma unroll
    for (int ni = 0; ni < NI; ++ni) {
      const int c = cur.n0 + wn0 + ni * 8 + t2;
      if (c >= rows) continue;  // rows % 8 == 0: c + 1 < rows as well
      const float b0 = to_float(bias[int64_t(cur.e) * rows + c]), b1 = to_float(bias[int64_t(cur.e) * rows + c + 1]);
#pragma unroll
      for (int mi = 0; mi < MI; ++mi)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const int r = cur.m0 + wm0 + mi * 16 + g + h * 8;
          if (r >= cur.count) continue;
          const int64_t o = int64_t(cur.off + r) * rows + c;
          const float s0 = acc[mi][ni][2 * h] + b0, s1 = acc[mi][ni][2 * h + 1] + b1;
          if (FC1) {
            T pair[2] = {from_float<T>(activate(s0, act_kind)), from_float<T>(activate(s1, act_kind))};
            *reinterpret_cast<uint32_t*>(static_cast<T*>(w.act) + o) = *reinterpret_cast<const uint32_t*>(pair);
          } else if (kOut) {  // top-1: the assignment's token is perm[p] itself
            const int t = w.perm[cur.off + r];
            const float pr = w.prob[t];
            const int64_t to = int64_t(t) * rows + c;
            float r0 = 0.f, r1 = 0.f;
            if (residual) { r0 = to_float(residual[to]); r1 = to_float(residual[to + 1]); }
            T pair[2] = {from_float<T>(r0 + pr * s0), from_float<T>(r1 + pr * s1)};
            *reinterpret_cast<uint32_t*>(out + to) = *reinterpret_cast<const uint32_t*>(pair);
          } else {
            *reinterpret_cast<float2*>(w.y + o) = make_float2(s0, s1);
          }
        }
    }
    if constexpr (kDep == 1) {  // this item's activations are stored: count it for its expert's FC2 items
      __syncthreads();
      if (threadIdx.x == 0) {
        __threadfence();
        atomicAdd(ready + cur.slot, 1);
      }
    }
  }
  cp_async_wait<0>();
}

template <typename T, bool FC1, int BM, int BN, bool kOut>
__global__ void __launch_bounds__(gemm_threads<BM>()) expert_gemm_kernel(
    const T* __restrict__ input, const T* __restrict__ weight, const T* __restrict__ bias, Workspace w,
    const T* __restrict__ residual, T* __restrict__ out, bool may_drop, int tokens, int rows, int K, int act_kind) {
  static_assert(!(FC1 && kOut), "only FC2 writes the layer output");
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800  // bf16 MMA exists on sm_80+ only (and not in the host pass)
  extern __shared__ __align__(128) unsigned char smem[];
  __shared__ GemmRouting rt;
  enter_after_predecessor();
  if (kOut && may_drop) pass_dropped(w, residual, out, tokens, rows);
  int n_active;
  gemm_prologue<BM>(w, rt, n_active);
  const int total = rt.tile_start[n_active] * ((rows + BN - 1) / BN);
  gemm_items<T, FC1, BM, BN, kOut, 0>(smem, rt, n_active, blockIdx.x, total, gridDim.x, input, weight, bias, w,
                                      residual, out, tokens, rows, K, act_kind, nullptr, 0);
#elif defined(__CUDA_ARCH__)
  __trap();  // built for an architecture without bf16/fp16 MMA: never return silently
#endif
}

// The decode-sized expert FFN as one kernel (17-64 assignments, 32-row tiles): each block takes FC1's items
// round-robin, then FC2's; an FC2 item waits until its expert's FC1 items are done (counters in the workspace,
// zeroed by the routing kernel). The blocks that run out of FC1 items start FC2 while the others finish FC1,
// instead of the whole grid waiting at a kernel boundary.
// No deadlock where the grid is not all resident (another stream's kernels, MPS, a small green context): a block
// claims its FC1 items with a flag on entry, and before its FC2 items a block makes sure every block's FC1 items are
// claimed, running those of any block that has not started itself. Every FC1 item is then held by a running block
// that waits on nothing, so every wait ends. (A cooperative launch, which guarantees a resident grid, cost ~4 us a
// call; items dealt from a counter, which need no such guarantee, ran slower: docs/bench/log.md, 25th session.)
template <typename T, int BM, int BN, bool kOut>
__global__ void __launch_bounds__(gemm_threads<BM>()) expert_ffn_kernel(
    const T* __restrict__ hidden, const T* __restrict__ fc1_w, const T* __restrict__ fc1_b,
    const T* __restrict__ fc2_w, const T* __restrict__ fc2_b, Workspace w, const T* __restrict__ residual,
    T* __restrict__ out, bool may_drop, int tokens, int h, int f, int act_kind) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  extern __shared__ __align__(128) unsigned char smem[];
  __shared__ GemmRouting rt;
  __shared__ int32_t mine_s, all_s, n_taken_s, taken_s[gemm_threads<BM>()];
  int32_t* done = w.ready;                       // per active-expert slot: FC1 items finished
  int32_t* n_claimed = w.ready + kMaxExperts;    // blocks whose FC1 items are claimed
  int32_t* claim = n_claimed + 1;                // per block: its FC1 items claimed
  enter_after_predecessor();
  if (threadIdx.x == blockDim.x - 1) {  // a thread the prologue's first loop leaves idle
    mine_s = atomicExch(claim + blockIdx.x, 1) == 0;
    if (mine_s) atomicAdd(n_claimed, 1);
  }
  if (kOut && may_drop) pass_dropped(w, residual, out, tokens, h);
  int n_active;
  gemm_prologue<BM>(w, rt, n_active);  // its barriers publish mine_s
  const int m_tiles = rt.tile_start[n_active], n1 = (f + BN - 1) / BN, n2 = (h + BN - 1) / BN;
  const int G = gridDim.x, total1 = m_tiles * n1, total2 = m_tiles * n2;
  auto fc1_items = [&](int b) {  // block b's FC1 items, by whichever block claimed them
    gemm_items<T, true, BM, BN, false, 1>(smem, rt, n_active, b, total1, G, hidden, fc1_w, fc1_b, w, nullptr, nullptr,
                                          tokens, f, h, act_kind, done, 0);
    __syncthreads();  // the pipeline's stages are no longer read
  };
  if (mine_s) fc1_items(blockIdx.x);
  if (threadIdx.x == 0) all_s = ld_acquire_gpu(n_claimed) >= G;
  __syncthreads();
  if (!all_s) {  // some block has not started: take over the FC1 items of those still unclaimed
    for (int c0 = 0; c0 < G; c0 += blockDim.x) {
      if (threadIdx.x == 0) n_taken_s = 0;
      __syncthreads();
      const int c = c0 + threadIdx.x;
      if (c < G && ld_acquire_gpu(claim + c) == 0 && atomicExch(claim + c, 1) == 0) {
        atomicAdd(n_claimed, 1);
        taken_s[atomicAdd(&n_taken_s, 1)] = c;
      }
      __syncthreads();
      const int n_taken = n_taken_s;
      for (int i = 0; i < n_taken; ++i) fc1_items(taken_s[i]);
    }
  }
  gemm_items<T, false, BM, BN, kOut, 2>(smem, rt, n_active, blockIdx.x, total2, G, static_cast<const T*>(w.act), fc2_w,
                                        fc2_b, w, residual, out, tokens, h, f, act_kind, done, n1);
#elif defined(__CUDA_ARCH__)
  __trap();
#endif
}

// ---- finalize: out[t] = residual[t] + sum_k w_k y[pos(t, k)], dropped assignments weigh 0 ---------------
template <typename T>
__global__ void finalize_kernel(Workspace w, const T* __restrict__ residual, T* __restrict__ out, int tokens,
                                int hidden, int top_k) {
  enter_after_predecessor();
  const int t = blockIdx.x;
  float wt[2] = {0.f, 0.f};
  int pos[2] = {-1, -1};
  float sum = 0.f;
  for (int k = 0; k < top_k; ++k) {
    pos[k] = w.pos_of[k * tokens + t];
    wt[k] = pos[k] >= 0 ? w.prob[k * tokens + t] : 0.f;
    sum += wt[k];
  }
  if (top_k > 1) {
    const float denom = fmaxf(sum, 1.1920928955078125e-07f);  // float32 eps, as DeepSpeed clamps
    for (int k = 0; k < top_k; ++k) wt[k] /= denom;
  }
  constexpr int VN = Vec<T>::N;
  for (int v = threadIdx.x; v < hidden / VN; v += blockDim.x) {  // VN elements (16 bytes of T) per step
    float s[VN];
#pragma unroll
    for (int i = 0; i < VN; ++i) s[i] = 0.f;
    for (int k = 0; k < top_k; ++k) {
      if (pos[k] < 0) continue;
      const float* y = w.y + int64_t(pos[k]) * hidden + v * VN;
#pragma unroll
      for (int i = 0; i < VN; i += 4) {
        const float4 q = *reinterpret_cast<const float4*>(y + i);
        s[i] += wt[k] * q.x; s[i + 1] += wt[k] * q.y; s[i + 2] += wt[k] * q.z; s[i + 3] += wt[k] * q.w;
      }
    }
    Vec<T> o;
    if (residual) o.load(residual + int64_t(t) * hidden + v * VN);
#pragma unroll
    for (int i = 0; i < VN; ++i) o.v[i] = from_float<T>(s[i] + (residual ? to_float(o.v[i]) : 0.f));
    o.store(out + int64_t(t) * hidden + v * VN);
  }
}


template <typename T, bool FC1, int BM, int BN, bool kOut = false>
void launch_expert_gemm(const T* input, const T* weight, const T* bias, const Workspace& w, const T* residual, T* out,
                        bool may_drop, int tokens, int rows, int K, int act_kind, cudaStream_t stream) {
  constexpr int bytes = gemm_smem_bytes<BM, BN>();
  static int per_sm = 0;  // the shared-memory limit is raised, and the resident blocks found, once per process
  if (!per_sm) {
    cudaFuncSetAttribute(expert_gemm_kernel<T, FC1, BM, BN, kOut>, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
    cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, expert_gemm_kernel<T, FC1, BM, BN, kOut>, gemm_threads<BM>(),
                                                  bytes);
    per_sm = std::max(1, per_sm);
  }
  launch_if(false, expert_gemm_kernel<T, FC1, BM, BN, kOut>, sm_count() * per_sm, gemm_threads<BM>(), bytes, stream,
            input, weight, bias, w, residual, out, may_drop, tokens, rows, K, act_kind);  // one wave, persistent
}

// expert_ffn_kernel: one wave of what fits (at most kFfnMaxGrid blocks), programmatic where the step's other kernels
// are (launch_moe_regime). MOETRT_DEBUG_FFN_OVERSUBSCRIBE=1 (read once a process, for tests) gives each block all
// the shared memory an SM has and launches kFfnMaxGrid blocks: one block an SM is resident while the others wait,
// as where other kernels or MPS hold most of the GPU, and every resident block has FC2 items that wait on FC1 items
// of blocks not yet started (the claims' takeover, exercised).
template <typename T, int BM, int BN, bool kOut>
void launch_ffn_gemm(const T* hidden, const T* fc1_w, const T* fc1_b, const T* fc2_w, const T* fc2_b,
                     const Workspace& w, const T* residual, T* out, bool may_drop, int tokens, int h, int f,
                     int act_kind, bool programmatic, cudaStream_t stream) {
  auto kernel = expert_ffn_kernel<T, BM, BN, kOut>;
  static int per_sm = 0, bytes = gemm_smem_bytes<BM, BN>(), grid = 0;
  if (!per_sm) {
    const char* over = std::getenv("MOETRT_DEBUG_FFN_OVERSUBSCRIBE");
    if (over && std::atoi(over)) {
      int dev = 0;
      cudaFuncAttributes attr{};
      cudaGetDevice(&dev);
      cudaFuncGetAttributes(&attr, kernel);
      cudaDeviceGetAttribute(&bytes, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev);
      bytes -= int(attr.sharedSizeBytes);  // the static shared memory beside it
    }
    cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
    cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, gemm_threads<BM>(), bytes);
    per_sm = std::max(1, per_sm);
    grid = over && std::atoi(over) ? kFfnMaxGrid : std::min(sm_count() * per_sm, kFfnMaxGrid);
  }
  launch_if(programmatic, kernel, grid, gemm_threads<BM>(), bytes, stream, hidden, fc1_w, fc1_b, fc2_w, fc2_b, w,
            residual, out, may_drop, tokens, h, f, act_kind);
}

// FC1 with row tiles of BM; FC2 with 128-row tiles where FC1 has 64 (measured at 4096 tokens, 64 per expert: one
// tile per expert took FC2 from 256 to 225 us and FC1 from 276 to 299 us); top-1's FC2 writes the output.
template <typename T, int BM, int BN = 128>
void launch_gemm(const T* hidden, const T* fc1_w, const T* fc1_b, const T* fc2_w, const T* fc2_b, const Workspace& w,
                 const T* residual, T* out, bool fused_out, bool may_drop, int tokens, int h, int f, int act_kind,
                 cudaStream_t stream) {
  constexpr int BM2 = BM == 64 ? 128 : BM;
  launch_expert_gemm<T, true, BM, BN>(hidden, fc1_w, fc1_b, w, nullptr, nullptr, false, tokens, f, h, act_kind,
                                      stream);
  const T* act = static_cast<const T*>(w.act);
  if (fused_out)
    launch_expert_gemm<T, false, BM2, BN, true>(act, fc2_w, fc2_b, w, residual, out, may_drop, tokens, h, f,
                                                act_kind, stream);
  else
    launch_expert_gemm<T, false, BM2, BN>(act, fc2_w, fc2_b, w, nullptr, nullptr, false, tokens, h, f, act_kind,
                                          stream);
}

// kGemm: the grouped-GEMM regime (prefill), whose launches are ordinary ones (measured: with programmatic launch,
// 4096 tokens took 1.11 ms instead of 0.90), except at decode sizes, where gate, routing and expert_ffn_kernel are
// programmatic (H100, first 8 layers of the 350M decode graph, batch 20 / 24 / 32, three alternating rounds:
// 0.5901-0.5914 / 0.5820-0.5827 / 0.6453-0.6456 ms against 0.5955-0.5966 / 0.5883-0.5904 / 0.6497-0.6508; the two
// kernels it replaced had gained nothing from it); the GEMV regime's (decode) are programmatic.
template <typename T, bool kGemm>
int launch_moe_regime(const T* hidden, const float* gate_weight, const T* fc1_w, const T* fc1_b, const T* fc2_w,
                      const T* fc2_b, const T* residual, T* out, int tokens, int h, int f, int experts, int top_k,
                      int act_kind, int capacity, const Workspace& w, const GateLn* ln, cudaStream_t stream) {
  const int A = tokens * top_k;
  const int per_expert = A / std::min(A, experts);  // tokens per expert if balanced
  const int bm = per_expert <= 32 ? 32 : per_expert <= 64 ? 64 : 128;
  const bool ffn = kGemm && sizeof(T) == 2 && kFfnGemm && bm == 32 && A <= kGemmNarrowMax;  // expert_ffn_kernel
  const bool programmatic = (!kGemm || ffn) && A <= kProgrammaticMaxRows;
  const bool gate_ln = ln && tokens <= kGateLnMaxTokens && h / Vec<T>::N <= 128 * kGateLnVecs;
  if (ln && !gate_ln) {  // the LayerNorm as its own kernel
    const int dtype = std::is_same_v<T, float> ? MOETRT_FP32 : std::is_same_v<T, __half> ? MOETRT_FP16 : MOETRT_BF16;
    const int err = moetrt_add_layernorm(ln->x, ln->delta, ln->gamma, ln->beta, ln->sum_out, ln->normed, tokens, h,
                                         ln->eps, dtype, stream);
    if (err) return err;
  }
  if (tokens >= kGateTiledMinTokens) {  // prefill: the gate is a small GEMM
    const dim3 grid((experts + kGateTileExp - 1) / kGateTileExp, (tokens + kGateTileTok - 1) / kGateTileTok);
    launch_if(false, gate_logits_tiled_kernel<T>, grid, kGateThreads, 0, stream, hidden, gate_weight, w.logits, tokens,
              h, experts);
  } else {
    const int tile = std::max(1, std::min({kGateTok, tokens, 12288 / h}));  // token tile in <= 48 KB of smem
    const dim3 grid((experts + 3) / 4, (tokens + tile - 1) / tile);
    auto kernel = gate_ln ? (tile == 1 ? gate_logits_kernel<T, true, 1> : gate_logits_kernel<T, true, kGateTok>)
                          : (tile == 1 ? gate_logits_kernel<T, false, 1> : gate_logits_kernel<T, false, kGateTok>);
    launch_if(programmatic, kernel, grid, 128, tile * h * sizeof(float), stream, hidden, gate_weight,
              w.logits, tokens, h, experts, tile, gate_ln ? *ln : GateLn{});
  }
  if (!kGemm && tokens == 1 && top_k == 1) {  // one assignment, never dropped: the GEMVs route for themselves
    constexpr int kBlockWarps = kGemvThreads / 32;
    launch_gemv<T, true, false, true>(hidden, fc1_w, fc1_b, w, nullptr, nullptr, false, 1, f, h, act_kind, 1, experts,
                                      programmatic, stream);
    if (f <= 32 * kOneVecsFc2 * Vec<T>::N)
      launch_if(programmatic, expert_fc2_one_kernel<T>, (h + kBlockWarps - 1) / kBlockWarps, kGemvThreads, 0, stream,
                static_cast<const T*>(w.act), fc2_w, fc2_b, w.logits, residual, out, h, f, experts);
    else
      launch_gemv<T, false, true, true>(static_cast<const T*>(w.act), fc2_w, fc2_b, w, residual, out, false, 1, h, f,
                                        act_kind, 1, experts, programmatic, stream);
    return launch_status();
  }
  if (A <= kSmallRouteMax) {
    launch_if(programmatic, route_small_kernel, 1, 32 * std::min(tokens, 32), 0, stream, w, tokens, experts, top_k,
              capacity, ffn);
  } else {
    launch_if(programmatic, topk_kernel, (tokens + 7) / 8, 256, 0, stream, w, tokens, experts, top_k);
    launch_if(programmatic, route_kernel, 1, kRouteThreads, (34 * experts) * sizeof(int32_t), stream, w,
              tokens, experts, top_k, capacity);
  }
  if constexpr (kGemm) {
    if constexpr (sizeof(T) == 2) {
      const bool fused = top_k == 1, drop = capacity > 0;
      if (ffn) {
        if (fused)
          launch_ffn_gemm<T, 32, 64, true>(hidden, fc1_w, fc1_b, fc2_w, fc2_b, w, residual, out, drop, tokens, h, f,
                                           act_kind, programmatic, stream);
        else
          launch_ffn_gemm<T, 32, 64, false>(hidden, fc1_w, fc1_b, fc2_w, fc2_b, w, nullptr, nullptr, false, tokens, h,
                                            f, act_kind, programmatic, stream);
      } else if (bm == 32 && A <= kGemmNarrowMax)
        launch_gemm<T, 32, 64>(hidden, fc1_w, fc1_b, fc2_w, fc2_b, w, residual, out, fused, drop, tokens, h, f,
                               act_kind, stream);
      else if (bm == 32)
        launch_gemm<T, 32>(hidden, fc1_w, fc1_b, fc2_w, fc2_b, w, residual, out, fused, drop, tokens, h, f, act_kind,
                           stream);
      else if (bm == 64)
        launch_gemm<T, 64>(hidden, fc1_w, fc1_b, fc2_w, fc2_b, w, residual, out, fused, drop, tokens, h, f, act_kind,
                           stream);
      else
        launch_gemm<T, 128>(hidden, fc1_w, fc1_b, fc2_w, fc2_b, w, residual, out, fused, drop, tokens, h, f,
                            act_kind, stream);
      if (fused) return launch_status();
    }
  } else {
    launch_gemv<T, true>(hidden, fc1_w, fc1_b, w, nullptr, nullptr, false, tokens, f, h, act_kind, A, experts,
                         programmatic, stream);
    if (top_k == 1) {  // FC2 writes the output itself
      launch_gemv<T, false, true>(static_cast<const T*>(w.act), fc2_w, fc2_b, w, residual, out, capacity > 0,
                                  tokens, h, f, act_kind, A, experts, programmatic, stream);
      return launch_status();
    }
    launch_gemv<T, false>(static_cast<const T*>(w.act), fc2_w, fc2_b, w, nullptr, nullptr, false, tokens, h, f,
                          act_kind, A, experts, programmatic, stream);
  }
  launch_if(programmatic, finalize_kernel<T>, tokens, 128, 0, stream, w, residual, out, tokens, h, top_k);
  return launch_status();
}

template <typename T>
int launch_moe(const T* hidden, const float* gate_weight, const T* fc1_w, const T* fc1_b, const T* fc2_w,
               const T* fc2_b, const T* residual, T* out, int tokens, int h, int f, int experts, int top_k,
               int act_kind, int capacity, const Workspace& w, const GateLn* ln, cudaStream_t stream) {
  if (sizeof(T) == 2 && tokens * top_k > kGemvMaxAssignments)
    return launch_moe_regime<T, true>(hidden, gate_weight, fc1_w, fc1_b, fc2_w, fc2_b, residual, out, tokens, h, f,
                                      experts, top_k, act_kind, capacity, w, ln, stream);
  return launch_moe_regime<T, false>(hidden, gate_weight, fc1_w, fc1_b, fc2_w, fc2_b, residual, out, tokens, h, f,
                                     experts, top_k, act_kind, capacity, w, ln, stream);
}

}  // namespace

MOETRT_API int moetrt_moe_capacity(int64_t tokens, int experts, int top_k, float capacity_factor, int min_capacity) {
  if (capacity_factor <= 0.f) return 0;
  const float product = static_cast<float>(double(tokens) / experts) * (float(top_k) * capacity_factor);
  const int cap = static_cast<int>(ceilf(product));
  return cap > min_capacity ? cap : min_capacity;
}

MOETRT_API int moetrt_moe_workspace_size(int64_t tokens, int64_t hidden, int64_t ffn, int experts, int top_k, int dtype,
                                         size_t* bytes) {
  if (tokens < 0 || hidden <= 0 || ffn <= 0 || experts <= 0 || !bytes) return MOETRT_ERR_BAD_SHAPE;
  const size_t elem = dtype == MOETRT_FP32 ? 4 : 2;
  *bytes = carve(nullptr, tokens, experts, top_k, hidden, ffn, elem, nullptr);
  return 0;
}

namespace {
int moe_entry(const void* hidden, const float* gate_weight, const void* fc1_weight, const void* fc1_bias,
              const void* fc2_weight, const void* fc2_bias, const void* residual, void* out, int64_t tokens,
              int64_t hidden_size, int64_t ffn, int experts, int top_k, int activation, float capacity_factor,
              int min_capacity, int dtype, void* workspace, size_t workspace_bytes, const GateLn* ln,
              cudaStream_t stream) {
  if (tokens < 0 || tokens * 2 > 0x7fffffff || hidden_size <= 0 || ffn <= 0 || experts <= 0 ||
      experts > kMaxExperts || (top_k != 1 && top_k != 2) || top_k > experts || (activation != 0 && activation != 1) ||
      hidden_size % 8 || ffn % 8 || hidden_size > 12288)
    return MOETRT_ERR_BAD_SHAPE;
  if (tokens == 0) return 0;
  size_t need = 0;
  moetrt_moe_workspace_size(tokens, hidden_size, ffn, experts, top_k, dtype, &need);
  if (workspace_bytes < need) return MOETRT_ERR_BAD_SHAPE;
  Workspace w;
  carve(static_cast<char*>(workspace), tokens, experts, top_k, hidden_size, ffn, dtype == MOETRT_FP32 ? 4 : 2, &w);
  const int capacity = moetrt_moe_capacity(tokens, experts, top_k, capacity_factor, min_capacity);
  MOETRT_DISPATCH_DTYPE(dtype, T, {
    return launch_moe<T>(static_cast<const T*>(hidden), gate_weight, static_cast<const T*>(fc1_weight),
                         static_cast<const T*>(fc1_bias), static_cast<const T*>(fc2_weight),
                         static_cast<const T*>(fc2_bias), static_cast<const T*>(residual), static_cast<T*>(out),
                         static_cast<int>(tokens), static_cast<int>(hidden_size), static_cast<int>(ffn), experts,
                         top_k, activation, capacity, w, ln, stream);
  })
}
}  // namespace

MOETRT_API int moetrt_moe(const void* hidden, const float* gate_weight, const void* fc1_weight, const void* fc1_bias,
                          const void* fc2_weight, const void* fc2_bias, const void* residual, void* out, int64_t tokens,
                          int64_t hidden_size, int64_t ffn, int experts, int top_k, int activation,
                          float capacity_factor, int min_capacity, int dtype, void* workspace, size_t workspace_bytes,
                          cudaStream_t stream) {
  return moe_entry(hidden, gate_weight, fc1_weight, fc1_bias, fc2_weight, fc2_bias, residual, out, tokens, hidden_size,
                   ffn, experts, top_k, activation, capacity_factor, min_capacity, dtype, workspace, workspace_bytes,
                   nullptr, stream);
}

MOETRT_API int moetrt_add_layernorm_moe(const void* x, const void* delta, const void* gamma, const void* beta,
                                        void* sum_out, void* normed, float epsilon, const float* gate_weight,
                                        const void* fc1_weight, const void* fc1_bias, const void* fc2_weight,
                                        const void* fc2_bias, const void* residual, void* out, int64_t tokens,
                                        int64_t hidden_size, int64_t ffn, int experts, int top_k, int activation,
                                        float capacity_factor, int min_capacity, int dtype, void* workspace,
                                        size_t workspace_bytes, cudaStream_t stream) {
  if (!x || !gamma || !beta || !normed) return MOETRT_ERR_BAD_SHAPE;
  const GateLn ln{x, delta, gamma, beta, delta ? sum_out : nullptr, normed, epsilon};
  return moe_entry(normed, gate_weight, fc1_weight, fc1_bias, fc2_weight, fc2_bias, residual, out, tokens, hidden_size,
                   ffn, experts, top_k, activation, capacity_factor, min_capacity, dtype, workspace, workspace_bytes,
                   &ln, stream);
}
