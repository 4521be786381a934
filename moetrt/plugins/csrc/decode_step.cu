// A whole batch-1 decode step in one persistent kernel (fp16/bf16): the ops of a rank's graph up to the LM head
// run as stages of one grid of a block per SM, separated by grid-wide barriers, instead of ~6 kernels a layer.
//
// Why: a batch-1 step of the 350M-64E model reads ~700 MB of weights (0.24 ms at the copy bandwidth) but as a
// CUDA graph of 147 latency-bound kernels took 0.61 ms (docs/performance.md). Here a stage costs a barrier (one
// atomic and a spin in L2), and every block streams the weight rows of the stage after next into shared memory
// (cp.async) while it computes the current one, so DRAM keeps streaming across stage boundaries: weights do not
// depend on activations. The expert FFNs' weights are known only once the gate has run; the FC1 stage routes,
// then loads its own rows and the FC2 stage's.
//
// Stages (moetrt_kernels.h: moetrt_decode_step) — each block owns a balanced contiguous range of output rows:
//  - GEMV: y = act(x · Wᵀ + b), x = a vector or LayerNorm(x [+ delta] | embedding) computed by every block in
//    shared memory with moetrt_add_layernorm's arithmetic (block 0 writes the sum and, if asked, the normed row);
//  - GATE: fp32 logits = x · Wgᵀ (fp32 weights), with the same LayerNorm prologue;
//  - FC1: routing (softmax + top-k of the logits, as moe.cu's warp_topk), hid[k] = act(x · W1[e_k]ᵀ + b1[e_k]);
//  - FC2: y = Σ_k w_k (hid[k] · W2[e_k]ᵀ + b2[e_k]) (top-2 weights renormalised, as moe.cu's finalize);
//  - ATTN: decode attention of one sequence, split over the cache in chunks of 64·2^i keys, the new K/V written
//    into the cache in place, the last block of a head combining the chunks (a counter per head, left at zero);
//  - LN: block 0 alone, for a LayerNorm no GEMV absorbs.
// Activations written in the kernel are read through L2 (ld.global.cg: L1 is not coherent across SMs); the
// barrier is cooperative-groups' scheme (fence, atomic arrive, acquire spin), its counter reset by the last
// block to leave, so the sync words are zero between launches. One token: the MoE capacity never drops.
#include "common.cuh"

using namespace moetrt;

namespace {

constexpr int kThreads = 512, kWarps = kThreads / 32;
constexpr int kMaxRes = MOETRT_DECODE_STEP_MAX_RESULTS;  // per-block dot products of a stage (rows x top_k)
constexpr int kXBytes = MOETRT_DECODE_STEP_X_BYTES;       // a stage's input vectors, or the attention scratch
constexpr int kHeadBytes = 1536;  // reduction scratch, routing, slot barriers, then a ring of 4 ops' fields
constexpr int kRing = 4;          // ops s .. s + 3 in shared memory at stage s (thread 0 fills s + 2's slot)
constexpr int kFixedBytes = kHeadBytes + kMaxRes * 4 + kXBytes;
constexpr int kSlots = 3;
constexpr int kMaxExperts = 256;  // stage s computes from slot s % 3 while s + 1 and s + 2 stream into the others

#ifdef MOETRT_STEP_PROFILE
__device__ unsigned long long g_step_prof[MOETRT_STEP_PROFILE][132][6];
__device__ __forceinline__ void prof(int s, int i) {
  if (threadIdx.x == 0 && s < MOETRT_STEP_PROFILE && blockIdx.x < 132) {
    unsigned long long t;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
    g_step_prof[s][blockIdx.x][i] = t;
  }
}
#else
__device__ __forceinline__ void prof(int, int) {}
#endif

__device__ __forceinline__ int64_t split_point(int64_t n, int part, int parts) { return n * part / parts; }

// Arrive (release: the block's writes, ordered by the bar.sync before it) and spin until every block has.
__device__ __forceinline__ void grid_barrier(unsigned* bar, unsigned& target) {
  __syncthreads();
  if (threadIdx.x == 0) {
    target += gridDim.x;
    asm volatile("red.release.gpu.global.add.u32 [%0], 1;\n" ::"l"(bar) : "memory");
    unsigned seen;
    do {
      asm volatile("ld.acquire.gpu.global.u32 %0, [%1];\n" : "=r"(seen) : "l"(bar) : "memory");
    } while (seen < target);
  }
  __syncthreads();
}

// ---- shared-memory slots filled by bulk copies (TMA), completion tracked by an mbarrier per slot -------------
__device__ __forceinline__ unsigned smem_addr(const void* p) { return static_cast<unsigned>(__cvta_generic_to_shared(p)); }
__device__ __forceinline__ void mbar_init(uint64_t* bar) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;\n" ::"r"(smem_addr(bar)) : "memory");
}
__device__ __forceinline__ void mbar_expect(uint64_t* bar, unsigned bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(smem_addr(bar)), "r"(bytes) : "memory");
}
__device__ __forceinline__ void mbar_wait(uint64_t* bar, unsigned parity) {
  unsigned done = 0;
  while (!done)
    asm volatile("{\n.reg .pred p;\nmbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\nselp.u32 %0, 1, 0, p;\n}\n"
                 : "=r"(done) : "r"(smem_addr(bar)), "r"(parity) : "memory");
}
__device__ __forceinline__ void bulk_copy(void* dst, const void* src, unsigned bytes, uint64_t* bar) {
  asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];\n"
               ::"r"(smem_addr(dst)), "l"(src), "r"(bytes), "r"(smem_addr(bar)) : "memory");
}

__device__ __forceinline__ int op_kind(const int64_t* op) { return static_cast<int>(op[MK_OP]); }
__device__ __forceinline__ bool routed(int kind) { return kind == MK_FC1 || kind == MK_FC2; }
__device__ __forceinline__ bool static_fill(int kind) { return kind == MK_GEMV || kind == MK_GATE || kind == MK_ATTN; }

// A GEMV-like stage's share for this block and its slot layout: output rows [n0, n0 + rows) of kk matrices (the
// top-k experts'), the first rs rows of each in the slot (k-major), then each matrix's bias over the rows (from
// the 16-byte boundary at or below n0: element bias_lead is row n0), then gamma and beta of a LayerNorm prologue.
struct Rows {
  int64_t n0, row_bytes;
  int rows, rs, kk, bias_lead, bias_bytes, bias_off, ln_off, fill_bytes;
};

template <typename T>
__device__ __forceinline__ Rows rows_of(const int64_t* op, int slot_bytes) {
  Rows r;
  const int kind = op_kind(op);
  const int64_t N = op[MK_N], K = op[MK_K];
  r.kk = routed(kind) ? static_cast<int>(op[MK_TOP_K]) : 1;
  r.n0 = split_point(N, blockIdx.x, gridDim.x);
  r.rows = static_cast<int>(split_point(N, blockIdx.x + 1, gridDim.x) - r.n0);
  r.row_bytes = K * (kind == MK_GATE ? 4 : int64_t(sizeof(T)));
  constexpr int VN = 16 / sizeof(T);
  const int64_t a0 = r.n0 / VN * VN, a1 = (r.n0 + r.rows + VN - 1) / VN * VN;
  const bool bias = op[MK_BIAS] != 0 && r.rows > 0;
  r.bias_lead = static_cast<int>(r.n0 - a0);
  r.bias_bytes = bias ? static_cast<int>((a1 - a0) * sizeof(T)) : 0;
  const int ln = r.rows > 0 && op[MK_LN_KIND] != MK_LN_NONE ? static_cast<int>(2 * K * sizeof(T)) : 0;
  const int64_t room = slot_bytes - int64_t(r.kk) * r.bias_bytes - ln;
  r.rs = static_cast<int>(min(int64_t(r.rows), room / (r.kk * r.row_bytes)));
  r.bias_off = static_cast<int>(r.kk * r.rs * r.row_bytes);
  r.ln_off = r.bias_off + r.kk * r.bias_bytes;
  r.fill_bytes = r.ln_off + ln;
  return r;
}

// Row n0 + r of matrix k (expert e[k] of a routed stage), in global memory.
template <typename T>
__device__ __forceinline__ const char* weight_row(const int64_t* op, const Rows& r, const int* experts, int k, int row) {
  const int64_t e = routed(op_kind(op)) ? experts[k] : 0;
  return reinterpret_cast<const char*>(op[MK_W]) + ((e * op[MK_N] + r.n0 + row) * r.row_bytes);
}

// Keys per attention item (head, chunk) and the chunks per head for a context of len keys.
__device__ __forceinline__ int attention_chunk(int len, int heads, int max_splits) {
  const int per_head = max(1, static_cast<int>(gridDim.x) / heads);
  int chunk = 256;
  while (chunk * per_head < len || (len + chunk - 1) / chunk > max_splits) chunk *= 2;
  return chunk;
}

// Cached keys [start, stop) of an attention item the slot holds: K rows, then as many V rows.
template <typename T>
__device__ __forceinline__ int attention_slot_keys(int start, int stop, int D, int slot_bytes) {
  return max(0, min(stop - start, slot_bytes / (2 * D * static_cast<int>(sizeof(T)))));
}

// Thread 0: the block's weight rows, biases and LayerNorm parameters of `op` into the slot, as one mbarrier phase.
// Returns whether there was anything to copy (every thread computes the same answer).
template <typename T>
__device__ bool fill_slot(const int64_t* op, unsigned char* slot, uint64_t* bar, int slot_bytes, const int* experts,
                          int past) {
  if (op_kind(op) == MK_ATTN) {  // the cached keys and values of the block's first item (they precede this step)
    const int H = static_cast<int>(op[MK_HEADS]), D = static_cast<int>(op[MK_HEAD_DIM]);
    const int chunk = attention_chunk(past + 1, H, static_cast<int>(op[MK_MAX_SPLITS]));
    const int splits = (past + chunk) / chunk, item = blockIdx.x;
    if (item >= H * splits) return false;
    const int h = item / splits, start = (item % splits) * chunk;
    const int n = attention_slot_keys<T>(start, min(start + chunk, past), D, slot_bytes);
    if (n == 0) return false;
    if (threadIdx.x == 0) {
      const unsigned bytes = n * D * sizeof(T);
      const int64_t off = (int64_t(h) * op[MK_MAX_SEQ] + start) * D;
      mbar_expect(bar, 2 * bytes);
      bulk_copy(slot, reinterpret_cast<const T*>(op[MK_W]) + off, bytes, bar);
      bulk_copy(slot + bytes, reinterpret_cast<const T*>(op[MK_BIAS]) + off, bytes, bar);
    }
    return true;
  }
  const Rows r = rows_of<T>(op, slot_bytes);
  if (r.fill_bytes == 0) return false;
  if (threadIdx.x == 0) {
    mbar_expect(bar, r.fill_bytes);
    for (int k = 0; k < r.kk; ++k) {
      if (r.rs) bulk_copy(slot + int64_t(k) * r.rs * r.row_bytes, weight_row<T>(op, r, experts, k, 0),
                          static_cast<unsigned>(r.rs * r.row_bytes), bar);
      if (r.bias_bytes) {
        const int64_t e = routed(op_kind(op)) ? experts[k] : 0;
        bulk_copy(slot + r.bias_off + k * r.bias_bytes,
                  reinterpret_cast<const T*>(op[MK_BIAS]) + e * op[MK_N] + r.n0 - r.bias_lead, r.bias_bytes, bar);
      }
    }
    if (r.fill_bytes > r.ln_off) {
      const unsigned half = (r.fill_bytes - r.ln_off) / 2;
      bulk_copy(slot + r.ln_off, reinterpret_cast<const void*>(op[MK_LN_GAMMA]), half, bar);
      bulk_copy(slot + r.ln_off + half, reinterpret_cast<const void*>(op[MK_LN_BETA]), half, bar);
    }
  }
  return true;
}

// LayerNorm(source) into xs (T, rounded as add_layernorm_kernel rounds): source = x, x + delta (rounded to T: the
// residual stream), or wte[id] + wpe[pos] (summed in fp32, rounded once, as embedding.cu). `write`: block 0 stores
// the sum (for delta / embedding) and the normed row where the op gives them.
template <typename T>
__device__ void layernorm_prologue(const int64_t* op, T* xs, float* red, bool write, const T* gamma, const T* beta) {
  constexpr int VN = Vec<T>::N;
  const int kind = static_cast<int>(op[MK_LN_KIND]);
  const int64_t K = op[MK_K];
  const int vecs = static_cast<int>(K / VN);
  const T* x = reinterpret_cast<const T*>(op[MK_LN_X]);
  const T* delta = reinterpret_cast<const T*>(op[MK_LN_DELTA]);
  T* sum_out = write ? reinterpret_cast<T*>(op[MK_LN_SUM]) : nullptr;
  T* normed_out = write ? reinterpret_cast<T*>(op[MK_LN_NORMED]) : nullptr;
  const T *wte_row = nullptr, *wpe_row = nullptr;
  if (kind == MK_LN_EMBED) {
    const int64_t id = min(max(int64_t(__ldcg(reinterpret_cast<const int32_t*>(op[MK_IDS]))), int64_t(0)), op[MK_VOCAB] - 1);
    const int64_t p = min(max(int64_t(__ldcg(reinterpret_cast<const int32_t*>(op[MK_POS]))), int64_t(0)), op[MK_MAX_POS] - 1);
    wte_row = reinterpret_cast<const T*>(op[MK_WTE]) + id * K;
    wpe_row = reinterpret_cast<const T*>(op[MK_WPE]) + p * K;
  }
  float sum = 0.f;
  for (int v = threadIdx.x; v < vecs; v += kThreads) {
    Vec<T> a;
    if (kind == MK_LN_EMBED) {
      Vec<T> e, q;
      e.load(wte_row + v * VN);
      q.load(wpe_row + v * VN);
#pragma unroll
      for (int j = 0; j < VN; ++j) a.v[j] = from_float<T>(to_float(e.v[j]) + to_float(q.v[j]));
    } else {
      a.load_cg(x + v * VN);
      if (kind == MK_LN_ADD) {
        Vec<T> d;
        d.load_cg(delta + v * VN);
#pragma unroll
        for (int j = 0; j < VN; ++j) a.v[j] = from_float<T>(to_float(a.v[j]) + to_float(d.v[j]));
      }
    }
#pragma unroll
    for (int j = 0; j < VN; ++j) sum += to_float(a.v[j]);
    a.store(xs + v * VN);
    if (sum_out && kind != MK_LN_PLAIN) a.store(sum_out + v * VN);
  }
  const float mean = block_sum(sum, red) / static_cast<float>(K);
  float sq = 0.f;
  for (int v = threadIdx.x; v < vecs; v += kThreads) {
    Vec<T> a;
    a.load(xs + v * VN);
#pragma unroll
    for (int j = 0; j < VN; ++j) { const float c = to_float(a.v[j]) - mean; sq += c * c; }
  }
  const float rstd = rsqrtf(block_sum(sq, red) / static_cast<float>(K) + __int_as_float(static_cast<int>(op[MK_EPS])));
  for (int v = threadIdx.x; v < vecs; v += kThreads) {
    Vec<T> a, g, b;
    a.load(xs + v * VN);
    g.load(gamma + v * VN);
    b.load(beta + v * VN);
#pragma unroll
    for (int j = 0; j < VN; ++j) a.v[j] = from_float<T>((to_float(a.v[j]) - mean) * rstd * to_float(g.v[j]) + to_float(b.v[j]));
    a.store(xs + v * VN);
    if (normed_out) a.store(normed_out + v * VN);
  }
  __syncthreads();
}

// Softmax + top-k of the E logits (moe.cu's warp_softmax_stats / warp_argmax arithmetic: ties keep the lowest
// expert) into experts[k] and the combine weights w[k] (top-2: renormalised, float32 eps clamp).
__device__ void route(const float* logits, int E, int top_k, int* experts, float* w) {
  if (threadIdx.x >= 32) return;
  const int lane = threadIdx.x;
  constexpr int kPer = kMaxExperts / 32;
  float l[kPer];
#pragma unroll
  for (int i = 0; i < kPer; ++i) l[i] = lane + 32 * i < E ? __ldcg(logits + lane + 32 * i) : -INFINITY;
  float m = -INFINITY;
#pragma unroll
  for (int i = 0; i < kPer; ++i) m = fmaxf(m, l[i]);
  m = warp_max(m);
  float sum = 0.f;
#pragma unroll
  for (int i = 0; i < kPer; ++i)
    if (lane + 32 * i < E) sum += expf(l[i] - m);
  sum = warp_sum(sum);
  float p[2] = {0.f, 0.f};
  int first = -1;
  for (int k = 0; k < top_k; ++k) {
    float best = -INFINITY;
    int arg = 0x7fffffff;
#pragma unroll
    for (int i = 0; i < kPer; ++i) {
      const int e = lane + 32 * i;
      if (e < E && e != first && l[i] > best) { best = l[i]; arg = e; }
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
      const float ob = __shfl_xor_sync(0xffffffffu, best, o);
      const int oa = __shfl_xor_sync(0xffffffffu, arg, o);
      if (ob > best || (ob == best && oa < arg)) { best = ob; arg = oa; }
    }
    p[k] = expf(best - m) / sum;
    if (lane == 0) experts[k] = arg;
    first = arg;
  }
  if (lane == 0) {
    if (top_k > 1) {
      const float denom = fmaxf(p[0] + p[1], 1.1920928955078125e-07f);
      w[0] = p[0] / denom;
      w[1] = p[1] / denom;
    } else {
      w[0] = p[0];
    }
  }
}

// The dot products of a GEMV-like stage: item i = (k, row) for k-major i; weights from the slot (rows < rs) or
// global memory; x from xs (FC2: xs + k·K, its k-th hidden vector). Results into res[i].
template <typename T, typename W>
__device__ void stage_dots(const int64_t* op, const Rows& r, const unsigned char* slot, const int* experts,
                           const T* xs, float* res) {
  constexpr int WN = 16 / sizeof(W);  // weight elements per 16-byte vector
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int K = static_cast<int>(op[MK_K]);
  const bool fc2 = op_kind(op) == MK_FC2;
  for (int i = warp; i < r.kk * r.rows; i += kWarps) {
    const int k = i / r.rows, row = i % r.rows;
    const bool in_smem = row < r.rs;
    const W* wr = reinterpret_cast<const W*>(in_smem ? reinterpret_cast<const char*>(slot) + (int64_t(k) * r.rs + row) * r.row_bytes
                                                     : weight_row<T>(op, r, experts, k, row));
    const T* x = xs + (fc2 ? int64_t(k) * K : 0);
    float acc = 0.f;
#pragma unroll 4
    for (int v = lane; v < K / WN; v += 32) {
      uint4 raw;
      if (in_smem) {
        raw = *reinterpret_cast<const uint4*>(wr + v * WN);
      } else {
        asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];\n"
                     : "=r"(raw.x), "=r"(raw.y), "=r"(raw.z), "=r"(raw.w)
                     : "l"(wr + v * WN));
      }
      if constexpr (std::is_same<W, float>::value) {
        const float wf[4] = {__uint_as_float(raw.x), __uint_as_float(raw.y), __uint_as_float(raw.z), __uint_as_float(raw.w)};
#pragma unroll
        for (int j = 0; j < 4; ++j) acc += wf[j] * to_float(x[v * 4 + j]);
      } else {
        Vec<T> wv, xv;
        wv.raw = raw;
        xv.load(x + v * WN);
#pragma unroll
        for (int j = 0; j < WN; ++j) acc += to_float(wv.v[j]) * to_float(xv.v[j]);
      }
    }
    acc = warp_sum(acc);
    if (lane == 0) res[i] = acc;
  }
  __syncthreads();
}

template <typename T>
__device__ void stage_epilogue(const int64_t* op, const Rows& r, const unsigned char* slot, const int* experts,
                               const float* wts, const float* res) {
  const int kind = op_kind(op), act = static_cast<int>(op[MK_ACT]);
  const int64_t N = op[MK_N];
  auto bias = [&](int k, int j) {  // the slot's copy of matrix k's bias, row n0 + j
    return r.bias_bytes ? to_float(reinterpret_cast<const T*>(slot + r.bias_off + k * r.bias_bytes)[r.bias_lead + j]) : 0.f;
  };
  for (int j = threadIdx.x; j < r.rows; j += kThreads) {
    const int64_t n = r.n0 + j;
    if (kind == MK_GATE) {
      reinterpret_cast<float*>(op[MK_Y])[n] = res[j];
    } else if (kind == MK_GEMV) {
      reinterpret_cast<T*>(op[MK_Y])[n] = from_float<T>(activate(res[j] + bias(0, j), act));
    } else if (kind == MK_FC1) {
      for (int k = 0; k < r.kk; ++k)
        reinterpret_cast<T*>(op[MK_Y])[k * N + n] = from_float<T>(activate(res[k * r.rows + j] + bias(k, j), act));
    } else {  // FC2
      float v = 0.f;
      for (int k = 0; k < r.kk; ++k) v += wts[k] * (res[k * r.rows + j] + bias(k, j));
      reinterpret_cast<T*>(op[MK_Y])[n] = from_float<T>(v);
    }
  }
}

// Decode attention of sequence 0: items (head, chunk) over the blocks, chunks of 256 keys or more (contexts up to 256
// need no combining across blocks). A group of D / VN lanes takes a key at a time (keys g, g + groups, ... of the
// chunk) with an online softmax; a warp's groups merge by shuffles, the block's warps in shared memory.
template <typename T>
__device__ void stage_attention(const int64_t* op, unsigned char* scratch, const unsigned char* slot, int slot_bytes,
                                int past) {
  constexpr int VN = Vec<T>::N;
  const int H = static_cast<int>(op[MK_HEADS]), D = static_cast<int>(op[MK_HEAD_DIM]);
  const int64_t max_seq = op[MK_MAX_SEQ];
  const int max_splits = static_cast<int>(op[MK_MAX_SPLITS]);
  const T* qkv = reinterpret_cast<const T*>(op[MK_X]);
  T* kc = reinterpret_cast<T*>(op[MK_W]);
  T* vc = reinterpret_cast<T*>(op[MK_BIAS]);
  T* out = reinterpret_cast<T*>(op[MK_Y]);
  float* ws = reinterpret_cast<float*>(op[MK_WS]);
  int* counters = reinterpret_cast<int*>(op[MK_COUNTERS]);
  const int len = past + 1;
  const int chunk = attention_chunk(len, H, max_splits);
  const int splits = (len + chunk - 1) / chunk;
  const int LPK = D / VN, GPW = 32 / LPK, NG = kWarps * GPW;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, sub = lane % LPK, g = warp * GPW + lane / LPK;
  float* gm = reinterpret_cast<float*>(scratch);  // [warps] maxima, [warps] sums, [warps][D] accumulators
  float* gl = gm + kWarps;
  float* ga = gl + kWarps;
  int* last = reinterpret_cast<int*>(ga + kWarps * D);
  const float scale = rsqrtf(static_cast<float>(D));
  for (int item = blockIdx.x; item < H * splits; item += gridDim.x) {
    const int h = item / splits, c = item % splits;
    const int start = c * chunk, stop = min(len, start + chunk);
    const T* qh = qkv + int64_t(h) * 3 * D;
    const int in_slot = item == static_cast<int>(blockIdx.x) ? attention_slot_keys<T>(start, min(stop, past), D, slot_bytes) : 0;
    const T* slot_k = reinterpret_cast<const T*>(slot);
    const int64_t head_off = int64_t(h) * max_seq * D;
    if (past >= start && past < stop && threadIdx.x < 2 * LPK) {  // the new token's K and V into the cache
      const int which = threadIdx.x / LPK, s = threadIdx.x % LPK;
      Vec<T> v;
      v.load_cg(qh + (1 + which) * D + s * VN);
      v.store((which ? vc : kc) + head_off + int64_t(past) * D + s * VN);
    }
    Vec<T> qv;
    qv.load_cg(qh + sub * VN);
    float q[VN], acc[VN];
#pragma unroll
    for (int i = 0; i < VN; ++i) { q[i] = to_float(qv.v[i]) * scale; acc[i] = 0.f; }
    float m = -INFINITY, l = 0.f;
    constexpr int U = 4;  // keys whose loads are in flight together; the loop is uniform over the block (shuffles)
    for (int base = start; base < stop; base += U * NG) {
      Vec<T> kv[U], vv[U];
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int j = base + u * NG + g;
        if (j < stop) {
          if (j < start + in_slot) {  // cached keys the slot holds (the block's first item)
            kv[u].load(slot_k + int64_t(j - start) * D + sub * VN);
            vv[u].load(slot_k + int64_t(in_slot + j - start) * D + sub * VN);
          } else {
            kv[u].load_cg(j == past ? qh + D + sub * VN : kc + head_off + int64_t(j) * D + sub * VN);
            vv[u].load_cg(j == past ? qh + 2 * D + sub * VN : vc + head_off + int64_t(j) * D + sub * VN);
          }
        } else {
          kv[u].raw = vv[u].raw = make_uint4(0, 0, 0, 0);
        }
      }
#pragma unroll
      for (int u = 0; u < U; ++u) {
        float s = 0.f;
#pragma unroll
        for (int i = 0; i < VN; ++i) s += q[i] * to_float(kv[u].v[i]);
        for (int o = LPK / 2; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
        if (base + u * NG + g >= stop) continue;
        const float mn = fmaxf(m, s), corr = expf(m - mn), p = expf(s - mn);
        l = l * corr + p;
#pragma unroll
        for (int i = 0; i < VN; ++i) acc[i] = acc[i] * corr + p * to_float(vv[u].v[i]);
        m = mn;
      }
    }
    for (int o = LPK; o < 32; o <<= 1) {  // the warp's groups, lanes of the same dimensions
      const float mo = __shfl_xor_sync(0xffffffffu, m, o), lo = __shfl_xor_sync(0xffffffffu, l, o);
      const float mn = fmaxf(m, mo);
      const float f = m == -INFINITY ? 0.f : expf(m - mn), fo = mo == -INFINITY ? 0.f : expf(mo - mn);
      l = l * f + lo * fo;
#pragma unroll
      for (int i = 0; i < VN; ++i) acc[i] = acc[i] * f + __shfl_xor_sync(0xffffffffu, acc[i], o) * fo;
      m = mn;
    }
    if (lane < LPK) {
      if (lane == 0) { gm[warp] = m; gl[warp] = l; }
#pragma unroll
      for (int i = 0; i < VN; ++i) ga[warp * D + lane * VN + i] = acc[i];
    }
    __syncthreads();
    float M = -INFINITY, L = 0.f, A = 0.f;
    if (threadIdx.x < D) {
      for (int i = 0; i < kWarps; ++i) M = fmaxf(M, gm[i]);
      for (int i = 0; i < kWarps; ++i) {
        const float f = gm[i] == -INFINITY ? 0.f : expf(gm[i] - M);
        L += gl[i] * f;
        A += ga[i * D + threadIdx.x] * f;
      }
      if (splits == 1) {
        out[h * D + threadIdx.x] = from_float<T>(A / L);
      } else {
        float* part = ws + (int64_t(h) * max_splits + c) * (D + 2);
        part[2 + threadIdx.x] = A;
        if (threadIdx.x == 0) { part[0] = M; part[1] = L; }
      }
    }
    if (splits > 1) {
      __threadfence();
      __syncthreads();
      if (threadIdx.x == 0) *last = atomicAdd(counters + h, 1) == splits - 1;
      __syncthreads();
      if (*last) {
        __threadfence();
        if (threadIdx.x < D) {
          const float* part = ws + int64_t(h) * max_splits * (D + 2);
          float M2 = -INFINITY;
          for (int i = 0; i < splits; ++i) M2 = fmaxf(M2, __ldcg(part + i * (D + 2)));
          float L2 = 0.f, A2 = 0.f;
          for (int i = 0; i < splits; ++i) {
            const float f = expf(__ldcg(part + i * (D + 2)) - M2);
            L2 += __ldcg(part + i * (D + 2) + 1) * f;
            A2 += __ldcg(part + i * (D + 2) + 2 + threadIdx.x) * f;
          }
          out[h * D + threadIdx.x] = from_float<T>(A2 / L2);
        }
        if (threadIdx.x == 0) counters[h] = 0;
      }
    }
    __syncthreads();
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads, 1) decode_step_kernel(const int64_t* __restrict__ ops, int num_ops,
                                                                  unsigned* __restrict__ sync, int slot_bytes) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  extern __shared__ __align__(128) unsigned char smem[];
  int64_t* ring = reinterpret_cast<int64_t*>(smem + 512);      // [kRing][MK_FIELDS]
  float* red = reinterpret_cast<float*>(smem + 256);            // block reductions
  int* experts = reinterpret_cast<int*>(smem + 384);            // routing: experts[2], weights[2]
  float* wts = reinterpret_cast<float*>(smem + 392);
  uint64_t* bars = reinterpret_cast<uint64_t*>(smem + 448);     // a barrier per slot
  float* res = reinterpret_cast<float*>(smem + kHeadBytes);     // [kMaxRes]
  unsigned char* xbuf = smem + kHeadBytes + kMaxRes * 4;       // [kXBytes]
  unsigned char* slots = smem + kFixedBytes;                   // kSlots x slot_bytes
  T* xs = reinterpret_cast<T*>(xbuf);
  unsigned target = 0;
  int past = -1;  // the sequence's cached tokens (every attention op reads the same past_lengths)
  unsigned fills = 0;    // bit q: slot q's current phase parity (fills completed or pending, mod 2)
  unsigned pending = 0;  // bit q: slot q holds an unwaited fill for its stage
  auto op_at = [&](int s) { return ring + (s % kRing) * MK_FIELDS; };
  auto load_op = [&](int s) {  // op s's 256 bytes into the ring, asynchronously (16 threads)
    if (s < num_ops && threadIdx.x < MK_FIELDS * 8 / 16)
      cp_async16(op_at(s) + threadIdx.x * 2, ops + s * MK_FIELDS + threadIdx.x * 2, true);
    cp_async_commit();
  };
  auto slot = [&](int s) { return slots + (s % kSlots) * int64_t(slot_bytes); };
  auto fill = [&](const int64_t* o, int s) {
    if (op_kind(o) == MK_ATTN && past < 0) past = __ldcg(reinterpret_cast<const int32_t*>(o[MK_PAST]));
    if (fill_slot<T>(o, slot(s), bars + s % kSlots, slot_bytes, experts, past)) {
      fills ^= 1u << (s % kSlots);
      pending |= 1u << (s % kSlots);
    }
  };
  if (threadIdx.x == 0) {
    for (int q = 0; q < kSlots; ++q) mbar_init(bars + q);
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
  }
  for (int s = 0; s < kRing; ++s) load_op(s);
  cp_async_wait<0>();
  __syncthreads();
  for (int s = 0; s < 2 && s < num_ops; ++s)
    if (static_fill(op_kind(op_at(s)))) fill(op_at(s), s);
  int routed_by = -1;  // the stage whose routing experts / wts hold
  for (int s = 0; s < num_ops; ++s) {
    prof(s, 0);
    cp_async_wait<0>();  // op s + 3 (loaded during stage s - 1)
    __syncthreads();
    const int64_t* op = op_at(s);
    if (s + 2 < num_ops && static_fill(op_kind(op_at(s + 2))))
      fill(op_at(s + 2), s + 2);  // its slot's last stage, s - 1, is done here
    const int kind = op_kind(op), q = s % kSlots;
    if (routed(kind)) {
      if (!(kind == MK_FC2 && routed_by == s - 1)) {  // FC2 after its FC1 keeps the FC1's routing
        route(reinterpret_cast<const float*>(op[MK_LOGITS]), static_cast<int>(op[MK_EXPERTS]),
              static_cast<int>(op[MK_TOP_K]), experts, wts);
        __syncthreads();
      }
      routed_by = s;
      if (!(pending >> q & 1)) fill(op, s);
      if (kind == MK_FC1 && s + 1 < num_ops && op_kind(op_at(s + 1)) == MK_FC2)
        fill(op_at(s + 1), s + 1);  // the same routing
    }
    if (pending >> q & 1) {
      mbar_wait(bars + q, (fills >> q & 1) ^ 1);  // the phase this fill completes
      pending &= ~(1u << q);
    }
    prof(s, 1);
    const unsigned char* sl = slot(s);
    if (kind == MK_ATTN) {
      if (past < 0) past = __ldcg(reinterpret_cast<const int32_t*>(op[MK_PAST]));
      stage_attention<T>(op, xbuf, sl, slot_bytes, past);
    } else if (kind == MK_LN) {
      if (blockIdx.x == 0)
        layernorm_prologue<T>(op, xs, red, true, reinterpret_cast<const T*>(op[MK_LN_GAMMA]),
                              reinterpret_cast<const T*>(op[MK_LN_BETA]));
    } else {
      const Rows r = rows_of<T>(op, slot_bytes);
      if (r.rows > 0 || (blockIdx.x == 0 && op[MK_LN_KIND] != MK_LN_NONE)) {
        if (op[MK_LN_KIND] != MK_LN_NONE) {
          const bool in_slot = r.fill_bytes > r.ln_off;
          const T* gamma = in_slot ? reinterpret_cast<const T*>(sl + r.ln_off) : reinterpret_cast<const T*>(op[MK_LN_GAMMA]);
          const T* beta = in_slot ? gamma + op[MK_K] : reinterpret_cast<const T*>(op[MK_LN_BETA]);
          layernorm_prologue<T>(op, xs, red, blockIdx.x == 0, gamma, beta);
          prof(s, 2);
        } else {
          constexpr int VN = Vec<T>::N;
          const int64_t n = (kind == MK_FC2 ? r.kk : 1) * op[MK_K];
          const T* x = reinterpret_cast<const T*>(op[MK_X]);
          for (int64_t v = threadIdx.x; v < n / VN; v += kThreads) {
            Vec<T> a;
            a.load_cg(x + v * VN);
            a.store(xs + v * VN);
          }
          __syncthreads();
        }
        if (r.rows > 0) {
          if (kind == MK_GATE) stage_dots<T, float>(op, r, sl, experts, xs, res);
          else stage_dots<T, T>(op, r, sl, experts, xs, res);
          stage_epilogue<T>(op, r, sl, experts, wts, res);
        }
      }
    }
    prof(s, 3);
    __syncthreads();
    load_op(s + kRing);  // into op s's entry, free now
    prof(s, 4);
    if (s + 1 < num_ops) grid_barrier(sync, target);
  }
  if (threadIdx.x == 0) {  // the last block out leaves the sync words at zero for the next launch
    __threadfence();
    if (atomicAdd(sync + 1, 1u) == gridDim.x - 1) {
      sync[0] = 0;
      sync[1] = 0;
      __threadfence();
    }
  }
#endif
}

template <typename T>
int launch_decode_step(const int64_t* ops, int num_ops, unsigned* sync, cudaStream_t stream) {
  static int smem = 0, blocks = 0;
  if (!smem) {
    if (device_attribute<cudaDevAttrComputeCapabilityMajor>() < 9) return MOETRT_ERR_BAD_SHAPE;  // bulk copies
    smem = device_attribute<cudaDevAttrMaxSharedMemoryPerBlockOptin>();
    if (smem <= kFixedBytes) return MOETRT_ERR_BAD_SHAPE;
    smem &= ~15;
    cudaFuncSetAttribute(decode_step_kernel<T>, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
    cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, decode_step_kernel<T>, kThreads, smem);
    if (blocks < 1) {
      const int err = launch_status();
      smem = 0;
      return err ? err : MOETRT_ERR_BAD_SHAPE;
    }
  }
  const int slot_bytes = ((smem - kFixedBytes) / kSlots) & ~127;
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = dim3(sm_count());
  cfg.blockDim = dim3(kThreads);
  cfg.dynamicSmemBytes = smem;
  cfg.stream = stream;
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeCooperative;  // every block resident at once: the barriers need it
  attr[0].val.cooperative = 1;
  cfg.attrs = attr;
  cfg.numAttrs = 1;
  cudaLaunchKernelEx(&cfg, decode_step_kernel<T>, ops, num_ops, sync, slot_bytes);
  return launch_status();
}

}  // namespace

#ifdef MOETRT_STEP_PROFILE
MOETRT_API int moetrt_decode_step_profile(unsigned long long* host) {
  return static_cast<int>(cudaMemcpyFromSymbol(host, g_step_prof, sizeof(g_step_prof)));
}
#endif

MOETRT_API int moetrt_decode_step_grid(int* blocks) {
  *blocks = sm_count();
  return 0;
}

MOETRT_API int moetrt_decode_step(const int64_t* ops, int num_ops, void* sync, int dtype, cudaStream_t stream) {
  if (num_ops <= 0) return MOETRT_ERR_BAD_SHAPE;
  switch (dtype) {
    case MOETRT_FP16: return launch_decode_step<__half>(ops, num_ops, static_cast<unsigned*>(sync), stream);
    case MOETRT_BF16: return launch_decode_step<__nv_bfloat16>(ops, num_ops, static_cast<unsigned*>(sync), stream);
    default: return MOETRT_ERR_BAD_DTYPE;
  }
}
