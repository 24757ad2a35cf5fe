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
typedef enum hr_dtype { HR_F32 = 0, HR_BF16 = 1 } hr_dtype;

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
 *   of 0 broadcasts one matrix to every batch entry.
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

/* The message for a CUDA error code returned by a launcher. */
const char *hr_error_string(int code);

#ifdef __cplusplus
}
#endif

#endif /* HEADROOM_H */
