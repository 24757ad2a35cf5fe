/*
 * headroom.h - the only contract between the CUDA kernels and Rust.
 *
 * Plain C (bindgen reads it; no CUDA header is needed to parse it). Every launcher
 * takes a pointer to its parameter struct and a stream, launches on that stream,
 * and returns the CUDA error code of the launch (0 = success): cudaGetLastError()
 * right after the launch, so bad configurations are reported, never swallowed.
 *
 * Conventions shared by all launchers:
 *   - tensors are dense and row-major; element types are given by the function name
 *     (`_f32` = float, `_bf16` = __nv_bfloat16 stored as 16 bits);
 *   - every size is an element count; no launcher requires a size to be a multiple
 *     of any tile: edges are handled inside the kernels;
 *   - launchers never allocate: every workspace is passed in by the caller, so the
 *     caller's tracked allocator sees every byte.
 */
#ifndef HEADROOM_H
#define HEADROOM_H

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* Same type as cudaStream_t / CUstream. */
typedef struct CUstream_st *hr_stream_t;

/* Storage dtypes. */
typedef enum hr_dtype { HR_F32 = 0, HR_BF16 = 1, HR_I32 = 2 } hr_dtype;

/* ----------------------------------------------------------------------------------
 * Utility: copy and fill (the harness's bandwidth probe and output poisoning)
 * -------------------------------------------------------------------------------- */

typedef struct hr_copy_params {
    const void *src;
    void *dst;
    uint64_t bytes; /* any count; 16-byte vector path when both pointers and bytes allow */
} hr_copy_params;

int hr_copy(const hr_copy_params *p, hr_stream_t stream);

/* ----------------------------------------------------------------------------------
 * Matmul: C[batch] = epilogue(alpha * op(A[batch]) . op(B[batch])) (+ C if accumulate)
 *
 *   op(A) is [m, k]: A is stored [m, k] (trans_a = 0) or [k, m] (trans_a = 1)
 *   op(B) is [k, n]: B is stored [k, n] (trans_b = 0) or [n, k] (trans_b = 1)
 *   C is [m, n], stored as float (c_dtype = HR_F32) or bf16 (c_dtype = HR_BF16).
 *   batch >= 1; the stride_* (in elements) separate consecutive matrices; a stride
 *   of 0 broadcasts A or B to every batch entry (stride_c = 0 with batch > 1 is refused:
 *   every entry would write the same C).
 *
 * Epilogue, applied to the fp32 accumulator before the store, in this order:
 *   x = alpha * acc; x += bias[col] (HR_EPI_BIAS, HR_EPI_BIAS_GELU; bias is fp32 [n]);
 *   x = gelu_tanh(x) (HR_EPI_BIAS_GELU); x += residual[row, col] (residual != NULL,
 *   same dtype and layout as C); then if accumulate != 0: x += C_old (read in fp32).
 * Forms backward needs: A.B (0,0), A.B^T (0,1), A^T.B (1,0). (1,1) is also accepted.
 * -------------------------------------------------------------------------------- */

typedef enum hr_epilogue {
    HR_EPI_NONE = 0,
    HR_EPI_BIAS = 1,
    HR_EPI_BIAS_GELU = 2
} hr_epilogue;

typedef struct hr_matmul_params {
    const void *a;
    const void *b;
    void *c;
    const float *bias;    /* fp32 [n], or NULL unless the epilogue needs it */
    const void *residual; /* [m, n] in c_dtype, or NULL */
    int32_t m, n, k;
    int32_t batch;
    int64_t stride_a, stride_b, stride_c; /* elements between batch entries (residual uses stride_c) */
    int32_t trans_a, trans_b;
    int32_t epilogue;   /* hr_epilogue */
    int32_t c_dtype;    /* hr_dtype of C (and residual) */
    int32_t accumulate; /* 1: C += result */
    float alpha;
    /* hr_matmul_bf16_wgmma only: the persistent grid visits its output tiles in bands of
     * this many tile rows, down each column of a band (kernels/raster.h); 0 or 1: row by
     * row. The other kernels ignore it. */
    int32_t raster_group;
} hr_matmul_params;

/* FP32 on the SIMT cores (FFMA only, no TF32). A, B float; c_dtype must be HR_F32. */
int hr_matmul_f32_simt(const hr_matmul_params *p, hr_stream_t stream);
/* BF16 operands, fp32 accumulation, tensor cores via mma.sync (sm_80+), cp.async pipeline. */
int hr_matmul_bf16_mma(const hr_matmul_params *p, hr_stream_t stream);
/* BF16 on Hopper: wgmma fed by TMA with an mbarrier pipeline (sm_90a only).
 * Returns cudaErrorNotSupported (801) when the binary has no sm_90a code or the
 * device is not sm_90; callers then fall back to hr_matmul_bf16_mma. */
int hr_matmul_bf16_wgmma(const hr_matmul_params *p, hr_stream_t stream);
/* The same on 128x256 tiles (two consumer warpgroups on m64n256k16, registers moved to
 * them with setmaxnreg, 4 stages), with the same requirements and fallback code. */
int hr_matmul_bf16_wgmma_wide(const hr_matmul_params *p, hr_stream_t stream);
/* The wide form in 2x1 thread-block clusters: the two CTAs of a cluster compute vertically
 * adjacent tiles and each loads half of their shared B tile, multicast to both. */
int hr_matmul_bf16_wgmma_cluster(const hr_matmul_params *p, hr_stream_t stream);
/* The wide form with its epilogue through shared memory and TMA stores, overlapped with the
 * next tile's main loop; where TMA cannot take C (not 16-byte aligned, or rows or a used
 * batch stride not multiples of 16 bytes) it stores from registers as the wide form. */
int hr_matmul_bf16_wgmma_tma_store(const hr_matmul_params *p, hr_stream_t stream);
/* 1 if this build carries sm_90a wgmma code, else 0. */
int hr_matmul_wgmma_compiled(void);

/* ----------------------------------------------------------------------------------
 * Attention. Q, O and their gradients are [B, H, N, d] in the function's dtype; K, V and
 * their gradients [B, Hkv, N, d], Hkv = kv_heads dividing H (grouped-query attention: query
 * head h reads kv head h / (H / Hkv); Hkv = H is multi-head attention); statistics
 * (logsumexp, delta) are fp32 [B, H, N]. scale is usually 1/sqrt(d).
 * causal: key j is visible to query i iff j <= i. d must be 64 or 128.
 * -------------------------------------------------------------------------------- */

typedef struct hr_attention_params {
    const void *q;         /* [B, H, N, d] */
    const void *k, *v;     /* [B, Hkv, N, d] */
    void *o;               /* [B, H, N, d] */
    float *lse;            /* fp32 [B, H, N]: logsumexp of each scaled score row (natural log) */
    const void *d_o;       /* backward: dO [B, H, N, d] */
    float *delta;          /* backward workspace: fp32 [B, H, N], delta = rowsum(dO * O) */
    void *dq, *dk, *dv;    /* backward outputs: dq [B, H, N, d]; dk, dv [B, Hkv, N, d] */
    int32_t batch, heads, seq, head_dim;
    int32_t kv_heads;      /* Hkv: divides heads (= heads for multi-head attention) */
    int32_t causal;
    float scale;
} hr_attention_params;

/* Flash-style forward: tiled online softmax, writes o and lse, no N x N buffer. */
int hr_flash_attention_forward_f32(const hr_attention_params *p, hr_stream_t stream);
int hr_flash_attention_forward_bf16(const hr_attention_params *p, hr_stream_t stream);
/* The bf16 forward on 128-row query tiles (4 warps x 32 rows, mma.sync, sm_80+), query tile
 * on grid.x. Same outputs; needs B*H <= 65535 and scale > 0, else cudaErrorInvalidValue. */
int hr_flash_attention_forward_bf16_m128(const hr_attention_params *p, hr_stream_t stream);
/* The bf16 forward on Hopper (sm_90a): TMA, wgmma with P in registers, a producer warpgroup
 * and two consumers. Same outputs; returns cudaErrorNotSupported (801) where the device or
 * build cannot run it. */
int hr_flash_attention_forward_bf16_wgmma(const hr_attention_params *p, hr_stream_t stream);
/* The same with the next two steps of FlashAttention-3: each consumer overlaps the softmax of
 * the next S with the current P.V, and the two consumers ping-pong so that one's softmax runs
 * under the other's products. */
int hr_flash_attention_forward_bf16_wgmma_pingpong(const hr_attention_params *p,
                                                   hr_stream_t stream);
/* The ping-pong forward on a persistent grid (at most one block per SM) that walks the query
 * tiles head by head, the longest first when causal. Same contract and outputs. */
int hr_flash_attention_forward_bf16_wgmma_persistent(const hr_attention_params *p,
                                                     hr_stream_t stream);
/* 1 if the current device runs the sm_90a attention kernel, else 0. */
int hr_flash_attention_wgmma_usable(void);
/* Flash-style backward: computes delta, then recomputes S and P tile by tile from
 * q, k and lse; writes dq, dk, dv (overwriting). Deterministic: no floating-point
 * atomics; every output element is reduced by one thread in a fixed order (a kv head's
 * dk and dv sum its group's query heads in head order). */
int hr_flash_attention_backward_f32(const hr_attention_params *p, hr_stream_t stream);
int hr_flash_attention_backward_bf16(const hr_attention_params *p, hr_stream_t stream);
/* The bf16 backward on Hopper (sm_90a): the same two deterministic kernels (dK/dV per key
 * tile and kv head, then dQ per query tile and head, each recomputing P) with TMA loads
 * through mbarrier rings and wgmma. Same contract and outputs; returns cudaErrorNotSupported
 * (801) where the device or build cannot run it; cudaErrorInvalidValue for tensors not
 * 16-byte aligned or B*H > 65535. */
int hr_flash_attention_backward_bf16_wgmma(const hr_attention_params *p, hr_stream_t stream);
/* 1 if the current device runs the sm_90a attention backward kernels, else 0. */
int hr_flash_attention_backward_wgmma_usable(void);

/* Naive attention pieces (the matmuls are hr_matmul_*):
 * scores/probabilities are [rows = B*H, N, N] in the function's dtype. */
typedef struct hr_softmax_params {
    void *scores;      /* in place: S (already scaled) -> P = softmax(S) row by row */
    float *lse;        /* optional fp32 [rows * N] logsumexp per row, or NULL */
    const void *dp;    /* backward: dP [rows, N, N] ... */
    void *ds;          /* ... written as dS = P * (dP - delta) (may alias dp) */
    const float *delta;/* backward: fp32 [rows * N] */
    int32_t rows;      /* B * H */
    int32_t seq;       /* N */
    int32_t causal;    /* masked entries become exactly 0 in P and dS */
} hr_softmax_params;

int hr_softmax_forward_f32(const hr_softmax_params *p, hr_stream_t stream);
int hr_softmax_forward_bf16(const hr_softmax_params *p, hr_stream_t stream);
/* reads p->scores as P, p->dp, p->delta; writes p->ds */
int hr_softmax_backward_f32(const hr_softmax_params *p, hr_stream_t stream);
int hr_softmax_backward_bf16(const hr_softmax_params *p, hr_stream_t stream);

/* delta[i] = sum_j dO[i, j] * O[i, j] over rows of length head_dim (fp32 accumulation).
 * Uses q/k/v-free fields of hr_attention_params: o, d_o, delta, batch, heads, seq, head_dim. */
int hr_attention_delta_f32(const hr_attention_params *p, hr_stream_t stream);
int hr_attention_delta_bf16(const hr_attention_params *p, hr_stream_t stream);

/* ----------------------------------------------------------------------------------
 * Transformer-block layer ops (layers.cu). Activations are [T, C] row-major in the
 * function's dtype (T = tokens = B * N); per-row statistics and every parameter gradient
 * are fp32. Every reduction runs in a fixed order (no floating-point atomics), so the
 * same inputs give bitwise the same outputs run after run.
 * -------------------------------------------------------------------------------- */

typedef struct hr_layernorm_params {
    const void *x;      /* [T, C] input */
    const float *weight;/* [C] */
    const float *bias;  /* [C] */
    void *out;          /* forward: [T, C] */
    float *mean;        /* [T]: forward writes, backward reads */
    float *rstd;        /* [T]: 1 / sqrt(var + eps), forward writes, backward reads */
    const void *d_out;  /* backward: dL/d(out) [T, C] */
    void *dx;           /* backward: dL/dx [T, C] */
    float *d_weight;    /* backward params: [C], accumulated (+=) */
    float *d_bias;      /* backward params: [C], accumulated (+=) */
    int32_t tokens, channels;
    int32_t accumulate; /* backward: 1 = dx += result (the residual stream's gradient) */
    float eps;
} hr_layernorm_params;

/* out = (x - mean) * rstd * weight + bias, biased variance, fp32 statistics. */
int hr_layernorm_forward_f32(const hr_layernorm_params *p, hr_stream_t stream);
int hr_layernorm_forward_bf16(const hr_layernorm_params *p, hr_stream_t stream);
/* dx (+)= rstd * (g - mean(g) - xhat * mean(g * xhat)) with g = d_out * weight. */
int hr_layernorm_backward_f32(const hr_layernorm_params *p, hr_stream_t stream);
int hr_layernorm_backward_bf16(const hr_layernorm_params *p, hr_stream_t stream);
/* d_weight += sum_t d_out * xhat; d_bias += sum_t d_out (column sums, fixed order). */
int hr_layernorm_backward_params_f32(const hr_layernorm_params *p, hr_stream_t stream);
int hr_layernorm_backward_params_bf16(const hr_layernorm_params *p, hr_stream_t stream);

typedef struct hr_elementwise_params {
    const void *x;      /* input (gelu: pre-activation; cast: fp32 source) */
    const void *d_out;  /* backward: upstream gradient, same shape */
    void *out;          /* output (gelu forward: activation; backward: dL/dx) */
    int64_t n;          /* elements */
} hr_elementwise_params;

/* GELU, tanh form (common.cuh's hr::gelu_tanh) and its exact derivative. */
int hr_gelu_forward_f32(const hr_elementwise_params *p, hr_stream_t stream);
int hr_gelu_forward_bf16(const hr_elementwise_params *p, hr_stream_t stream);
int hr_gelu_backward_f32(const hr_elementwise_params *p, hr_stream_t stream);
int hr_gelu_backward_bf16(const hr_elementwise_params *p, hr_stream_t stream);
/* out (bf16) = round-to-nearest-even(x (f32)). */
int hr_cast_f32_to_bf16(const hr_elementwise_params *p, hr_stream_t stream);

typedef struct hr_heads_params {
    const void *src;
    void *dst;
    int32_t batch, heads, seq, head_dim;
    int32_t parts;      /* 1 or 3 (q, k, v) */
} hr_heads_params;

/* src [B, N, parts, H, d] (= [T, parts * C]) -> dst [parts, B, H, N, d]. */
int hr_tokens_to_heads_f32(const hr_heads_params *p, hr_stream_t stream);
int hr_tokens_to_heads_bf16(const hr_heads_params *p, hr_stream_t stream);
/* src [parts, B, H, N, d] -> dst [B, N, parts, H, d]: the inverse. */
int hr_heads_to_tokens_f32(const hr_heads_params *p, hr_stream_t stream);
int hr_heads_to_tokens_bf16(const hr_heads_params *p, hr_stream_t stream);

typedef struct hr_column_sum_params {
    const void *x;      /* [rows, cols] */
    float *out;         /* [cols] fp32 */
    int32_t rows, cols;
    int32_t accumulate; /* 1: out += sums */
} hr_column_sum_params;

/* out[c] (+)= sum_r x[r, c], summed in a fixed order (the bias gradient). */
int hr_column_sum_f32(const hr_column_sum_params *p, hr_stream_t stream);
int hr_column_sum_bf16(const hr_column_sum_params *p, hr_stream_t stream);

typedef struct hr_loss_params {
    const void *y;      /* [n] the last block's output */
    void *dy;           /* [n] dL/dy = scale * y */
    float *loss;        /* [1] L = 0.5 * scale * sum(y^2), reduced in a fixed order */
    int64_t n;          /* elements */
    float scale;        /* 1 / (elements of the whole global batch): micro-batches then sum
                           to the full batch's loss and gradients */
} hr_loss_params;

int hr_mse_loss_f32(const hr_loss_params *p, hr_stream_t stream);
int hr_mse_loss_bf16(const hr_loss_params *p, hr_stream_t stream);

typedef struct hr_adamw_params {
    float *param;       /* [n] fp32 master weights, updated in place */
    const float *grad;  /* [n] fp32 */
    float *m, *v;       /* [n] fp32 moments, updated in place */
    void *param_bf16;   /* [n] bf16 copy of the updated weights, or NULL */
    int64_t n;
    float lr, beta1, beta2, eps, weight_decay;
    int32_t step;       /* 1-based, for the bias corrections */
} hr_adamw_params;

/* AdamW (Loshchilov & Hutter 2019, alg. 2): decoupled weight decay, bias-corrected moments:
 * m = b1 m + (1-b1) g; v = b2 v + (1-b2) g^2; mhat = m / (1-b1^t); vhat = v / (1-b2^t);
 * p -= lr * (mhat / (sqrt(vhat) + eps) + wd * p). */
int hr_adamw(const hr_adamw_params *p, hr_stream_t stream);

/* The message for a CUDA error code returned by a launcher. */
const char *hr_error_string(int code);

/* -- loss ops (head + cross-entropy) -- */

/* Cross-entropy over a vocabulary of V for T rows, ignore index `ignore_index` (rows whose
 * target equals it: lse = 0, no loss, zero gradient). A target outside [0, V) that is not
 * the ignore index is never used as an index: its row's lse, and so the loss, become NaN.
 * loss is fp32 [1] and accumulated (+=), reduced in a fixed order in one block (no float
 * atomics): every launcher is bitwise repeatable. */
typedef struct hr_cross_entropy_params {
    const float *logits;    /* materialized ops: [T, V] fp32 */
    const void *hidden;     /* fused ops: [T, C] in the function's dtype */
    const void *weight;     /* fused ops: [V, C] in the function's dtype */
    const int32_t *targets; /* [T] */
    float *lse;             /* [T] fp32: forward writes, backward reads */
    float *loss;            /* [1] fp32, accumulated (forward) */
    void *dlogits;          /* materialized backward: [T, V] in the function's dtype */
    void *d_hidden;         /* fused backward: [T, C] in the function's dtype */
    float *d_weight;        /* fused backward: [V, C] fp32, accumulated (+=) */
    int32_t tokens, channels, vocab;
    int32_t ignore_index;
    int32_t accumulate;     /* fused backward: 1 = d_hidden += result */
    float scale;
} hr_cross_entropy_params;

/* lse[t] = logsumexp(logits[t]); loss += scale * sum_t (lse[t] - logits[t, y[t]]).
 * (_f32: the logits are fp32 whatever the model's dtype; there is one form.) */
int hr_cross_entropy_forward(const hr_cross_entropy_params *p, hr_stream_t stream);
/* dlogits = scale * (exp(logits - lse) - onehot(y)), stored in the function's dtype. */
int hr_cross_entropy_backward_f32(const hr_cross_entropy_params *p, hr_stream_t stream);
int hr_cross_entropy_backward_bf16(const hr_cross_entropy_params *p, hr_stream_t stream);
/* The forward over logits = hidden . weight^T, never stored (online log-sum-exp). */
int hr_fused_cross_entropy_forward_f32(const hr_cross_entropy_params *p, hr_stream_t stream);
int hr_fused_cross_entropy_forward_bf16(const hr_cross_entropy_params *p, hr_stream_t stream);
/* The backward, the logits recomputed: d_hidden (+)= dlogits . weight (one kernel over row
 * blocks), d_weight += dlogits^T . hidden (one kernel over vocabulary blocks). */
int hr_fused_cross_entropy_backward_f32(const hr_cross_entropy_params *p, hr_stream_t stream);
int hr_fused_cross_entropy_backward_bf16(const hr_cross_entropy_params *p, hr_stream_t stream);

/* -- norm, MLP and embedding ops (RMSNorm, SwiGLU, token embedding) -- */

/* RMSNorm (Zhang & Sennrich 2019). Activations [T, C] in the function's dtype; weight,
 * rstd and d_weight fp32. Fixed-order reductions, as the layernorm's. */
typedef struct hr_rmsnorm_params {
    const void *x;       /* [T, C] input */
    const float *weight; /* [C] */
    void *out;           /* forward: [T, C] */
    float *rstd;         /* [T]: 1 / sqrt(mean(x^2) + eps), forward writes, backward reads */
    const void *d_out;   /* backward: dL/d(out) [T, C] */
    void *dx;            /* backward: dL/dx [T, C] */
    float *d_weight;     /* backward params: [C], accumulated (+=) */
    int32_t tokens, channels;
    int32_t accumulate;  /* backward: 1 = dx += result */
    float eps;
} hr_rmsnorm_params;

/* out = x * rstd * weight. */
int hr_rmsnorm_forward_f32(const hr_rmsnorm_params *p, hr_stream_t stream);
int hr_rmsnorm_forward_bf16(const hr_rmsnorm_params *p, hr_stream_t stream);
/* dx (+)= rstd * (g - x * rstd^2 * mean(g * x)) with g = d_out * weight. */
int hr_rmsnorm_backward_f32(const hr_rmsnorm_params *p, hr_stream_t stream);
int hr_rmsnorm_backward_bf16(const hr_rmsnorm_params *p, hr_stream_t stream);
/* d_weight += sum_t d_out * x * rstd (column sums in token order). */
int hr_rmsnorm_backward_params_f32(const hr_rmsnorm_params *p, hr_stream_t stream);
int hr_rmsnorm_backward_params_bf16(const hr_rmsnorm_params *p, hr_stream_t stream);

/* SwiGLU (Shazeer 2020), element-wise over n elements, silu(g) = g / (1 + e^-g). */
typedef struct hr_swiglu_params {
    const void *gate, *up; /* [n] */
    const void *d_out;     /* backward: [n] */
    void *out;             /* forward: silu(gate) * up */
    void *d_gate;          /* backward: d_out * up * silu'(gate) */
    void *d_up;            /* backward: d_out * silu(gate) */
    int64_t n;
} hr_swiglu_params;

int hr_swiglu_forward_f32(const hr_swiglu_params *p, hr_stream_t stream);
int hr_swiglu_forward_bf16(const hr_swiglu_params *p, hr_stream_t stream);
int hr_swiglu_backward_f32(const hr_swiglu_params *p, hr_stream_t stream);
int hr_swiglu_backward_bf16(const hr_swiglu_params *p, hr_stream_t stream);

/* Token embedding: ids int32 [T]; table [V, C], positions [seq, C] (or NULL) and out [T, C]
 * in the function's dtype; d_out [T, C] in the function's dtype; d_table fp32 [V, C] and
 * d_positions fp32 [seq, C] (or NULL), accumulated (+=). Index math is 64-bit.
 * An id outside [0, V) is never read or written: the kernels clamp the forward's read (and
 * skip the token in the backward) and fold it into *bad_token, a word the caller sets to all
 * ones (UINT64_MAX) and reads when it synchronizes: it then holds (t << 32) | (uint32_t)id for
 * the first such token t of every launch since (an atomic minimum, so one word serves many
 * launches and no launch needs a copy back), UINT64_MAX if none. */
typedef struct hr_embedding_params {
    const int32_t *ids;
    const void *table;
    const void *positions;
    void *out;
    const void *d_out;
    float *d_table;
    float *d_positions;
    uint64_t *bad_token;
    int32_t tokens, channels, vocab, seq;
} hr_embedding_params;

/* out[t] = table[ids[t]] (+ positions[t mod seq]), summed in fp32. */
int hr_embedding_forward_f32(const hr_embedding_params *p, hr_stream_t stream);
int hr_embedding_forward_bf16(const hr_embedding_params *p, hr_stream_t stream);
/* d_table[ids[t]] += d_out[t]; d_positions[t mod seq] += d_out[t]. Deterministic: every
 * element is owned by one thread that adds its tokens in token order. */
int hr_embedding_backward_f32(const hr_embedding_params *p, hr_stream_t stream);
int hr_embedding_backward_bf16(const hr_embedding_params *p, hr_stream_t stream);

/* -- grouped-query attention ops -- */

/* K or V between its kv-head layout [B, Hkv, N, d] and the query-head layout [B, H, N, d]
 * that eager (materialized) attention multiplies with: H = Hkv * G. */
typedef struct hr_repeat_kv_params {
    const void *src;
    void *dst;
    int32_t batch, heads, kv_heads, seq, head_dim;
} hr_repeat_kv_params;

/* dst [B, H, N, d] = src [B, Hkv, N, d] with each kv head repeated G times. */
int hr_repeat_kv_f32(const hr_repeat_kv_params *p, hr_stream_t stream);
int hr_repeat_kv_bf16(const hr_repeat_kv_params *p, hr_stream_t stream);
/* dst [B, Hkv, N, d] = sum over the G query heads of each group of src [B, H, N, d]: one
 * thread per output element, fp32 sum in head order, one rounding (deterministic). */
int hr_reduce_kv_f32(const hr_repeat_kv_params *p, hr_stream_t stream);
int hr_reduce_kv_bf16(const hr_repeat_kv_params *p, hr_stream_t stream);

#ifdef __cplusplus
}
#endif

#endif /* HEADROOM_H */
