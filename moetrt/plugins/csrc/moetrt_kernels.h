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
MOETRT_API const char* moetrt_cuda_archs(void);  // e.g. "80,90": the SASS targets the library was built for
MOETRT_API const char* moetrt_error_string(int code);

// Programmatic dependent launch (Hopper and newer; on by default): kernels launched after this call may start
// while the kernel ahead of them in the stream still runs, waiting in-kernel for its results, which hides launch
// latency and lets weight reads begin early. Any stream or CUDA graph sees the same results either way. Entry
// points say where they read inputs before that wait. Returns the previous setting (1 on, 0 off).
MOETRT_API int moetrt_set_programmatic_launch(int enable);

// out[t, :] = wte[input_ids[t], :] + wpe[position_ids[t], :] for t < num_tokens.
// wte [vocab_size, hidden], wpe [max_positions, hidden], out [num_tokens, hidden], all `dtype`.
// Ids out of range are clamped (the launcher rejects them before the call).
MOETRT_API int moetrt_embedding(const int32_t* input_ids, const int32_t* position_ids,
                                const void* wte, const void* wpe, void* out,
                                int64_t num_tokens, int64_t hidden, int64_t vocab_size,
                                int64_t max_positions, int dtype, cudaStream_t stream);

// Activation codes: 0 = tanh-GeLU ("gelu_tanh"), 1 = erf-GeLU ("gelu"), 2 = none (bias_act only: y = x + bias).

// sum = x + delta (delta may be NULL: sum is x and is not written); normed = LayerNorm(sum) * gamma + beta with
// fp32 statistics. x, delta, sum, normed [rows, hidden]; gamma, beta [hidden]. hidden % (16 / sizeof(T)) == 0.
// gamma and beta are read before waiting for the preceding kernel (programmatic launch): the kernel just before
// this call in the stream must not write them.
MOETRT_API int moetrt_add_layernorm(const void* x, const void* delta, const void* gamma, const void* beta,
                                    void* sum_out, void* normed, int64_t rows, int64_t hidden, float epsilon,
                                    int dtype, cudaStream_t stream);

// y = act(x + bias); x, y [rows, cols] (may alias), bias [cols].
MOETRT_API int moetrt_bias_act(const void* x, const void* bias, void* y, int64_t rows, int64_t cols, int activation,
                               int dtype, cudaStream_t stream);

// Causal attention of `tokens` new tokens per sequence over the KV cache, written in place (see attention.cu).
// qkv [batch, tokens, 3 * heads * head_dim] (Megatron order), kv_cache [2, max_batch, heads, max_seq, head_dim],
// past_lengths [batch] int32, out [batch, tokens, heads * head_dim]. The workspace (size from
// moetrt_attention_workspace_size for the cache's max_batch; calls of any batch share it) must be zero-filled
// before its first use; calls leave it zeroed.
// Decode (tokens == 1) reads past_lengths and the cached K/V below it before waiting for the preceding kernel
// (programmatic launch): the kernel just before this call in the stream must not write them.
MOETRT_API int moetrt_attention_workspace_size(int max_batch, int num_heads, int head_dim, int max_seq, size_t* bytes);
MOETRT_API int moetrt_attention(const void* qkv, void* kv_cache, const int32_t* past_lengths, void* out, int batch,
                                int tokens, int num_heads, int head_dim, int max_batch, int max_seq, int dtype,
                                void* workspace, size_t workspace_bytes, cudaStream_t stream);

// MoE layer (see moe.cu). hidden [tokens, h]; gate_weight [experts, h] fp32; fc1_weight [experts, ffn, h];
// fc1_bias [experts, ffn]; fc2_weight [experts, h, ffn]; fc2_bias [experts, h]; residual [tokens, h] or NULL;
// out [tokens, h]. capacity_factor <= 0 never drops. moetrt_moe_capacity gives the capacity a call uses (0: none).
MOETRT_API int moetrt_moe_capacity(int64_t tokens, int experts, int top_k, float capacity_factor, int min_capacity);
MOETRT_API int moetrt_moe_workspace_size(int64_t tokens, int64_t hidden, int64_t ffn, int experts, int top_k,
                                         int dtype, size_t* bytes);
MOETRT_API int moetrt_moe(const void* hidden, const float* gate_weight, const void* fc1_weight, const void* fc1_bias,
                          const void* fc2_weight, const void* fc2_bias, const void* residual, void* out,
                          int64_t tokens, int64_t hidden_size, int64_t ffn, int experts, int top_k, int activation,
                          float capacity_factor, int min_capacity, int dtype, void* workspace,
                          size_t workspace_bytes, cudaStream_t stream);

// moetrt_moe over normed = LayerNorm(x + delta) as moetrt_add_layernorm computes it (sum_out = x + delta, written
// when delta is given; normed [tokens, h] is written too: the experts read it). One token (h up to 1024 vectors
// of 16 bytes) is normalised inside the gate kernel, one launch fewer; more tokens launch the LayerNorm first.
// The LayerNorm's gamma and beta are read before waiting for the preceding kernel.
MOETRT_API int moetrt_add_layernorm_moe(const void* x, const void* delta, const void* gamma, const void* beta,
                                        void* sum_out, void* normed, float epsilon, const float* gate_weight,
                                        const void* fc1_weight, const void* fc1_bias, const void* fc2_weight,
                                        const void* fc2_bias, const void* residual, void* out, int64_t tokens,
                                        int64_t hidden_size, int64_t ffn, int experts, int top_k, int activation,
                                        float capacity_factor, int min_capacity, int dtype, void* workspace,
                                        size_t workspace_bytes, cudaStream_t stream);

// dst[r, :] = src[rows[r], :] for r < num_rows (src [src_rows, cols]; rows clamped into range).
MOETRT_API int moetrt_gather_rows(const void* src, const int32_t* rows, void* dst, int64_t num_rows, int64_t cols,
                                  int64_t src_rows, int dtype, cudaStream_t stream);

// One token per row of logits [batch, vocab] into out_tokens [batch] (see sampling.cu): temperature 0 or
// top_k 1 is greedy; top_k 0 and top_p 1 are off; (seed, step, row) seed the row's random number.
MOETRT_API int moetrt_sample(const void* logits, int32_t* out_tokens, int batch, int64_t vocab, float temperature,
                             int top_k, float top_p, uint64_t seed, uint64_t step, int dtype, cudaStream_t stream);
// moetrt_sample that also sets up the next decode step: with input_ids (then position_ids and past_lengths too, all
// [batch] int32 on the device), row b's token goes to input_ids[b] and past_lengths[b] and position_ids[b] both
// become past_lengths[b] + 1; with host_tokens (pinned host memory, device-accessible under unified addressing)
// the tokens go there as well, readable once the kernel has completed. Either may be NULL.
MOETRT_API int moetrt_sample_advance(const void* logits, int32_t* out_tokens, int batch, int64_t vocab,
                                     float temperature, int top_k, float top_p, uint64_t seed, uint64_t step, int dtype,
                                     int32_t* input_ids, int32_t* position_ids, int32_t* past_lengths,
                                     int32_t* host_tokens, cudaStream_t stream);

// y[m, :] = act(x[m, :] @ weight^T + bias) for m < rows <= 8; x [rows, k], weight [n, k] (out, in), bias [n] or
// NULL, y [rows, n]; activation as above (2 = none). k % (16 / sizeof(T)) == 0. For decode-sized GEMMs.
// The weight and bias are read before waiting for the preceding kernel (programmatic launch): the kernel just
// before this call in the stream must not write them.
MOETRT_API int moetrt_gemv(const void* x, const void* weight, const void* bias, void* y, int64_t rows, int64_t n,
                           int64_t k, int activation, int dtype, cudaStream_t stream);

// moetrt_gemv over normed = LayerNorm(x + delta) (delta NULL: of x) as moetrt_add_layernorm computes it, without
// storing normed: y = act(normed @ weight^T + bias); sum_out = x + delta when both are given. x, delta, sum_out
// [rows, k]; gamma, beta [k]; k <= 1024 * (16 / sizeof(T)) and (rows + 2) * k * sizeof(T) <= 44 KB. y must not
// overlap x, delta or sum_out (blocks write y while others still read them). weight, bias, gamma and beta are
// read before waiting for the preceding kernel.
MOETRT_API int moetrt_add_layernorm_gemv(const void* x, const void* delta, const void* gamma, const void* beta,
                                         void* sum_out, const void* weight, const void* bias, void* y, int64_t rows,
                                         int64_t n, int64_t k, float epsilon, int activation, int dtype,
                                         cudaStream_t stream);

// moetrt_gemv with the residual added after the bias and activation: y = residual + T(act(x @ weight^T + bias)),
// the residual stream that add_layernorm would form (the same bits). residual [rows, n], not overlapping y unless
// equal to it.
MOETRT_API int moetrt_gemv_residual(const void* x, const void* weight, const void* bias, const void* residual, void* y,
                                    int64_t rows, int64_t n, int64_t k, int activation, int dtype,
                                    cudaStream_t stream);

// A GEMV after a LayerNorm, on the un-normalised rows x with the LayerNorm's affine folded into weight' = weight
// diag(gamma), colsum = weight' 1 (fp32) and bias' = bias + weight beta (fp32):
// y = act(r * (x @ weight'^T - mu * colsum) + bias'), mu and r = 1 / sqrt(var + epsilon) per row of x.
MOETRT_API int moetrt_gemv_folded(const void* x, const void* weight, const float* colsum, const float* bias, void* y,
                                  int64_t rows, int64_t n, int64_t k, float epsilon, int activation, int dtype,
                                  cudaStream_t stream);
// The inputs of moetrt_gemv_folded from the LayerNorm's gamma, beta [k] and the GEMM's weight [n, k] and bias [n]
// (may be null), all of dtype: folded = weight diag(gamma) (dtype; each product rounded once), colsum (fp32 [n],
// sums of the rounded folded rows) and bias_out = bias + weight beta (fp32 [n]). Set-up work, not a decode kernel:
// launched without programmatic dependence.
MOETRT_API int moetrt_fold_layernorm(const void* weight, const void* gamma, const void* beta, const void* bias,
                                     void* folded, float* colsum, float* bias_out, int64_t n, int64_t k, int dtype,
                                     cudaStream_t stream);
