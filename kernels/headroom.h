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
} hr_matmul_params;

/* FP32 on the SIMT cores (FFMA only, no TF32). A, B float; c_dtype must be HR_F32. */
int hr_matmul_f32_simt(const hr_matmul_params *p, hr_stream_t stream);
/* BF16 operands, fp32 accumulation, tensor cores via mma.sync (sm_80+), cp.async pipeline. */
int hr_matmul_bf16_mma(const hr_matmul_params *p, hr_stream_t stream);
/* BF16 on Hopper: wgmma fed by TMA with an mbarrier pipeline (sm_90a only).
 * Returns cudaErrorNotSupported (801) when the binary has no sm_90a code or the
 * device is not sm_90; callers then fall back to hr_matmul_bf16_mma. */
int hr_matmul_bf16_wgmma(const hr_matmul_params *p, hr_stream_t stream);
/* 1 if this build carries sm_90a wgmma code, else 0. */
int hr_matmul_wgmma_compiled(void);

/* ----------------------------------------------------------------------------------
 * Attention. Q, K, V, O and their gradients are [B, H, N, d] in the function's dtype;
 * statistics (logsumexp, delta) are fp32 [B, H, N]. scale is usually 1/sqrt(d).
 * causal: key j is visible to query i iff j <= i. d must be 64 or 128.
 * -------------------------------------------------------------------------------- */

typedef struct hr_attention_params {
    const void *q, *k, *v; /* [B, H, N, d] */
    void *o;               /* [B, H, N, d] */
    float *lse;            /* fp32 [B, H, N]: logsumexp of each scaled score row (natural log) */
    const void *d_o;       /* backward: dO [B, H, N, d] */
    float *delta;          /* backward workspace: fp32 [B, H, N], delta = rowsum(dO * O) */
    void *dq, *dk, *dv;    /* backward outputs [B, H, N, d] */
    int32_t batch, heads, seq, head_dim;
    int32_t causal;
    float scale;
} hr_attention_params;

/* Flash-style forward: tiled online softmax, writes o and lse, no N x N buffer. */
int hr_flash_attention_forward_f32(const hr_attention_params *p, hr_stream_t stream);
int hr_flash_attention_forward_bf16(const hr_attention_params *p, hr_stream_t stream);
/* Flash-style backward: computes delta, then recomputes S and P tile by tile from
 * q, k and lse; writes dq, dk, dv (overwriting). Deterministic: no floating-point
 * atomics; every output element is reduced by one thread in a fixed order. */
int hr_flash_attention_backward_f32(const hr_attention_params *p, hr_stream_t stream);
int hr_flash_attention_backward_bf16(const hr_attention_params *p, hr_stream_t stream);

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

/* -- norm, MLP and embedding ops (RMSNorm, SwiGLU, token embedding) -- */

/* -- grouped-query attention ops -- */

#ifdef __cplusplus
}
#endif

#endif /* HEADROOM_H */
