// loss.cu - the LM head's cross-entropy: over materialized fp32 logits, and fused with the
// head's product so that the [T, V] logits are never written (online log-sum-exp over the
// vocabulary, Milakov & Gimelshein 2018; the fused backward recomputes the logits, as
// Liger-Kernel's and Cut Cross-Entropy's (Wijmans et al. 2024) do).
//
// Layouts (headroom.h): hidden [T, C] and weight [V, C] row-major in the function's dtype;
// logits fp32 [T, V]; targets int32 [T]; lse fp32 [T]; loss fp32 [1] (+=); d_weight fp32
// [V, C] (+=). All math is fp32; bf16 appears only at loads and stores.
//
// Kernels (T = float or __nv_bfloat16, the storage type):
//   ce_forward_kernel           one block per row: per-thread online (max, sum) over a strided
//                               slice of the row, merged by an xor butterfly in each warp and
//                               the 8 warps in order; lse[t] = max + log(sum).
//   loss_kernel<T>              one 1024-thread block: term_t = lse[t] - z[t, y[t]] (z read
//                               from the logits, or recomputed as one warp's dot product in the
//                               fused form), per-warp sums in row order, the warps in order,
//                               loss += scale * sum. The loss is one number, so its reduction
//                               is one block: no workspace, no float atomics.
//   ce_backward_kernel<T>       element-wise dlogits = scale * (exp(z - lse) - onehot).
//   fused_forward_kernel<T>     a block of `rows` tokens (their hidden states in shared memory
//                               as fp32) sweeps the vocabulary, one vocabulary row per warp at
//                               a time: each lane takes a strided slice of C (coalesced weight
//                               reads), an xor butterfly gives every lane the rows' logits, and
//                               each warp keeps an online (max, sum) per row; the warps merge in
//                               order at the end.
//   fused_dhidden_kernel<T>     the same sweep recomputes the logits of its rows; after every
//                               8 vocabulary rows (one per warp) their dlogits go to shared
//                               memory and each thread adds dlogits . weight into the fp32
//                               d_hidden columns it owns (shared memory), in vocabulary order.
//   fused_dweight_kernel<T>     the transpose: a block of `rows` vocabulary rows (their weights
//                               in shared memory) sweeps the tokens, 8 per step, and each thread
//                               adds dlogits^T . hidden into the fp32 d_weight columns it owns,
//                               in token order, then adds them to d_weight.
//
// Speed: these are FFMA (SIMT) kernels, correctness first. Each weight element loaded is used
// for `rows` tokens (up to 8: as many hidden rows as fit in shared memory, 160 KiB or the
// device's opt-in limit), so the fused kernels are bound by L2 bandwidth and FFMA issue, not
// by tensor cores: at Llama 3's head they take several times a bf16 tensor-core matmul's time.
// What they show is the memory: no [T, V] buffer. The dlogits stay fp32 in the fused backward
// (the CPU backend does the same), where the materialized path stores them in the compute
// dtype.
//
// Determinism: no floating-point atomics; every sum has a fixed partition and order.
#include "common.cuh"

#include <algorithm>
#include <math.h>

namespace {

using bf16 = __nv_bfloat16;

constexpr unsigned kFull = 0xffffffffu;
constexpr int kThreads = 256;       // 8 warps
constexpr int kWarps = kThreads / 32;
constexpr int kLossThreads = 1024;  // the loss's single block (a power of two for the tree)
constexpr int kMaxRows = 8;         // tokens (or vocabulary rows) per fused block
constexpr size_t kSmemBudget = 160 * 1024;

// (m, s) <- the log-sum-exp state of both halves: s·e^m + s2·e^m2 = s'·e^m'.
__device__ __forceinline__ void lse_merge(float &m, float &s, float m2, float s2) {
    const float mn = fmaxf(m, m2);
    if (mn == -INFINITY) return; // both empty
    s = s * expf(m - mn) + s2 * expf(m2 - mn);
    m = mn;
}

// One more element x into the state.
__device__ __forceinline__ void lse_push(float &m, float &s, float x) {
    if (x > m) {
        s = s * expf(m - x) + 1.0f;
        m = x;
    } else {
        s += expf(x - m);
    }
}

__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) x += __shfl_xor_sync(kFull, x, off);
    return x;
}

// The row's lse from every thread's state, in thread 0 (the warps merged in order).
__device__ float block_lse(float m, float s) {
    __shared__ float wm[kWarps], ws[kWarps];
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) {
        const float m2 = __shfl_xor_sync(kFull, m, off);
        const float s2 = __shfl_xor_sync(kFull, s, off);
        lse_merge(m, s, m2, s2);
    }
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    if (lane == 0) {
        wm[warp] = m;
        ws[warp] = s;
    }
    __syncthreads();
    float rm = -INFINITY, rs = 0.f;
    if (threadIdx.x == 0)
        for (int w = 0; w < kWarps; ++w) lse_merge(rm, rs, wm[w], ws[w]);
    return rm + logf(rs);
}

__global__ void __launch_bounds__(kThreads)
ce_forward_kernel(const float *__restrict__ logits, const int32_t *__restrict__ targets,
                  float *__restrict__ lse, int tokens, int vocab, int ignore) {
    const int t = blockIdx.x;
    const int y = targets[t];
    if (y == ignore || y < 0 || y >= vocab) {
        if (threadIdx.x == 0) lse[t] = y == ignore ? 0.f : NAN;
        return;
    }
    const float *row = logits + (int64_t)t * vocab;
    float m = -INFINITY, s = 0.f;
    for (int v = threadIdx.x; v < vocab; v += kThreads) lse_push(m, s, row[v]);
    const float r = block_lse(m, s);
    if (threadIdx.x == 0) lse[t] = r;
}

// One 1024-thread block: warp w takes rows w, w + 32, ... in order; for each, z[t, y] comes
// from the logits (lane 0) or as hidden[t] . weight[y] (lanes over C, coalesced, an xor
// butterfly), and lane 0 adds lse[t] - z[t, y] to the warp's sum; the 32 warp sums are then
// added in order. A target outside [0, V) that is not ignored adds NaN (never an index).
template <typename T>
__global__ void __launch_bounds__(kLossThreads)
loss_kernel(const float *logits, const T *hidden, const T *weight,
            const int32_t *__restrict__ targets, const float *__restrict__ lse,
            float *__restrict__ loss, int tokens, int channels, int vocab, int ignore,
            float scale) {
    constexpr int kLossWarps = kLossThreads / 32;
    __shared__ float red[kLossWarps];
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    float sum = 0.f;
    for (int t = warp; t < tokens; t += kLossWarps) {
        const int y = targets[t];
        if (y == ignore) continue;
        if (y < 0 || y >= vocab) {
            sum += NAN;
            continue;
        }
        float z = 0.f;
        if (logits != nullptr) {
            if (lane == 0) z = logits[(int64_t)t * vocab + y];
        } else {
            const T *h = hidden + (int64_t)t * channels;
            const T *w = weight + (int64_t)y * channels;
            for (int c = lane; c < channels; c += 32) z += hr::to_f32(h[c]) * hr::to_f32(w[c]);
            z = warp_sum(z);
        }
        sum += lse[t] - z; // lane 0's sum is the one kept
    }
    if (lane == 0) red[warp] = sum;
    __syncthreads();
    if (threadIdx.x == 0) {
        float total = 0.f;
        for (int w = 0; w < kLossWarps; ++w) total += red[w];
        loss[0] += scale * total;
    }
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
ce_backward_kernel(const float *__restrict__ logits, const int32_t *__restrict__ targets,
                   const float *__restrict__ lse, T *__restrict__ dlogits, int tokens, int vocab,
                   int ignore, float scale) {
    for (int t = blockIdx.y; t < tokens; t += gridDim.y) {
        const int y = targets[t];
        const float l = lse[t];
        const int64_t base = (int64_t)t * vocab;
        for (int v = blockIdx.x * kThreads + threadIdx.x; v < vocab; v += gridDim.x * kThreads) {
            float g = 0.f;
            if (y != ignore) g = scale * (expf(logits[base + v] - l) - (v == y ? 1.f : 0.f));
            dlogits[base + v] = hr::from_f32<T>(g);
        }
    }
}

// rows x channels of src (row-major, `ld` elements apart) into fp32 shared memory; rows past
// `valid` are zero.
template <typename T>
__device__ void load_rows(float *dst, const T *src, int valid, int rows, int channels) {
    for (int i = threadIdx.x; i < rows * channels; i += kThreads) {
        const int r = i / channels;
        dst[i] = r < valid ? hr::to_f32(src[i]) : 0.f;
    }
}

// acc[r] = sh[r] . w over the rows, every lane ending with the same sums.
template <typename T>
__device__ __forceinline__ void warp_dots(const float *sh, const T *w, int rows, int channels,
                                          float (&acc)[kMaxRows]) {
    const int lane = threadIdx.x % 32;
#pragma unroll
    for (int r = 0; r < kMaxRows; ++r) acc[r] = 0.f;
    for (int c = lane; c < channels; c += 32) {
        const float wv = hr::to_f32(w[c]);
#pragma unroll
        for (int r = 0; r < kMaxRows; ++r)
            if (r < rows) acc[r] += sh[r * channels + c] * wv;
    }
#pragma unroll
    for (int r = 0; r < kMaxRows; ++r) acc[r] = warp_sum(acc[r]);
}

// At least one block per SM, not the occupancy ptxas otherwise aims for on sm_8x (it caps the
// fp32 instantiation at 40 registers there and spills).
template <typename T>
__global__ void __launch_bounds__(kThreads, 1)
fused_forward_kernel(const T *__restrict__ hidden, const T *__restrict__ weight,
                     const int32_t *__restrict__ targets, float *__restrict__ lse, int tokens,
                     int channels, int vocab, int ignore, int rows) {
    extern __shared__ float hs[]; // [rows][channels]
    __shared__ float wm[kWarps][kMaxRows], wsum[kWarps][kMaxRows];
    const int row0 = blockIdx.x * rows;
    const int nr = min(rows, tokens - row0);
    load_rows(hs, hidden + (int64_t)row0 * channels, nr, rows, channels);
    __syncthreads();
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    float m[kMaxRows], s[kMaxRows], acc[kMaxRows];
#pragma unroll
    for (int r = 0; r < kMaxRows; ++r) {
        m[r] = -INFINITY;
        s[r] = 0.f;
    }
    for (int v = warp; v < vocab; v += kWarps) {
        warp_dots(hs, weight + (int64_t)v * channels, nr, channels, acc);
#pragma unroll
        for (int r = 0; r < kMaxRows; ++r)
            if (r < nr) lse_push(m[r], s[r], acc[r]);
    }
    if (lane == 0) {
#pragma unroll
        for (int r = 0; r < kMaxRows; ++r) {
            wm[warp][r] = m[r];
            wsum[warp][r] = s[r];
        }
    }
    __syncthreads();
    if (threadIdx.x < nr) {
        const int r = threadIdx.x, t = row0 + r;
        float rm = -INFINITY, rs = 0.f;
        for (int w = 0; w < kWarps; ++w) lse_merge(rm, rs, wm[w][r], wsum[w][r]);
        const int y = targets[t];
        lse[t] = y == ignore ? 0.f : (y < 0 || y >= vocab) ? NAN : rm + logf(rs);
    }
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
fused_dhidden_kernel(const T *__restrict__ hidden, const T *__restrict__ weight,
                     const int32_t *__restrict__ targets, const float *__restrict__ lse,
                     T *d_hidden, int tokens, int channels, int vocab, int ignore, float scale,
                     int rows, int accumulate) {
    extern __shared__ float smem[];
    float *hs = smem;                     // [rows][channels] hidden
    float *dh = smem + rows * channels;   // [rows][channels] fp32 d_hidden
    __shared__ float dl[kWarps][kMaxRows];
    __shared__ int ys[kMaxRows];
    __shared__ float ls[kMaxRows];
    const int row0 = blockIdx.x * rows;
    const int nr = min(rows, tokens - row0);
    load_rows(hs, hidden + (int64_t)row0 * channels, nr, rows, channels);
    for (int i = threadIdx.x; i < rows * channels; i += kThreads) dh[i] = 0.f;
    if (threadIdx.x < kMaxRows) {
        const int r = threadIdx.x;
        ys[r] = r < nr ? targets[row0 + r] : ignore;
        ls[r] = r < nr ? lse[row0 + r] : 0.f;
    }
    __syncthreads();
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    float acc[kMaxRows];
    for (int v0 = 0; v0 < vocab; v0 += kWarps) {
        const int v = v0 + warp;
        if (v < vocab) warp_dots(hs, weight + (int64_t)v * channels, nr, channels, acc);
        if (lane == 0) {
#pragma unroll
            for (int r = 0; r < kMaxRows; ++r) {
                const bool live = v < vocab && r < nr && ys[r] != ignore;
                dl[warp][r] =
                    live ? scale * (expf(acc[r] - ls[r]) - (v == ys[r] ? 1.f : 0.f)) : 0.f;
            }
        }
        __syncthreads();
        const int nv = min(kWarps, vocab - v0);
        for (int c = threadIdx.x; c < channels; c += kThreads) {
            for (int w = 0; w < nv; ++w) {
                const float wv = hr::to_f32(weight[(int64_t)(v0 + w) * channels + c]);
#pragma unroll
                for (int r = 0; r < kMaxRows; ++r)
                    if (r < nr) dh[r * channels + c] += dl[w][r] * wv;
            }
        }
        __syncthreads();
    }
    for (int i = threadIdx.x; i < nr * channels; i += kThreads) {
        T *out = d_hidden + (int64_t)row0 * channels + i;
        const float x = dh[i] + (accumulate ? hr::to_f32(*out) : 0.f);
        *out = hr::from_f32<T>(x);
    }
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
fused_dweight_kernel(const T *__restrict__ hidden, const T *__restrict__ weight,
                     const int32_t *__restrict__ targets, const float *__restrict__ lse,
                     float *__restrict__ d_weight, int tokens, int channels, int vocab,
                     int ignore, float scale, int rows) {
    extern __shared__ float smem[];
    float *wsh = smem;                     // [rows][channels] weight
    float *dw = smem + rows * channels;    // [rows][channels] fp32 sums
    __shared__ float dl[kWarps][kMaxRows];
    const int v0 = blockIdx.x * rows;
    const int nv = min(rows, vocab - v0);
    load_rows(wsh, weight + (int64_t)v0 * channels, nv, rows, channels);
    for (int i = threadIdx.x; i < rows * channels; i += kThreads) dw[i] = 0.f;
    __syncthreads();
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    float acc[kMaxRows];
    for (int t0 = 0; t0 < tokens; t0 += kWarps) {
        const int t = t0 + warp;
        const int y = t < tokens ? targets[t] : ignore;
        const bool live = y != ignore;
        if (live) warp_dots(wsh, hidden + (int64_t)t * channels, nv, channels, acc);
        if (lane == 0) {
            const float l = live ? lse[t] : 0.f;
#pragma unroll
            for (int r = 0; r < kMaxRows; ++r)
                dl[warp][r] = live && r < nv
                                  ? scale * (expf(acc[r] - l) - (v0 + r == y ? 1.f : 0.f))
                                  : 0.f;
        }
        __syncthreads();
        const int nt = min(kWarps, tokens - t0);
        for (int c = threadIdx.x; c < channels; c += kThreads) {
            for (int w = 0; w < nt; ++w) {
                const float hv = hr::to_f32(hidden[(int64_t)(t0 + w) * channels + c]);
#pragma unroll
                for (int r = 0; r < kMaxRows; ++r)
                    if (r < nv) dw[r * channels + c] += dl[w][r] * hv;
            }
        }
        __syncthreads();
    }
    for (int i = threadIdx.x; i < nv * channels; i += kThreads)
        d_weight[(int64_t)v0 * channels + i] += dw[i];
}

// Rows per fused block: as many as `bufs` fp32 rows of `channels` fit in the shared memory
// budget (at most kMaxRows); the dynamic shared memory bytes in *bytes.
int fused_rows(int channels, int bufs, int *rows, size_t *bytes) {
    int dev = 0, optin = 0;
    HR_TRY(cudaGetDevice(&dev));
    HR_TRY(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev));
    // Leave room for the kernels' static shared memory (under 1 KiB).
    const size_t budget = std::min(kSmemBudget, (size_t)optin - 2048);
    const size_t per_row = (size_t)bufs * channels * sizeof(float);
    const size_t fit = budget / per_row;
    if (fit < 1) return cudaErrorInvalidValue; // C too large for one row in shared memory
    *rows = (int)std::min(fit, (size_t)kMaxRows);
    *bytes = per_row * *rows;
    return 0;
}

bool bad_common(const hr_cross_entropy_params *p) {
    return p == nullptr || !p->targets || !p->lse || p->tokens < 1 || p->vocab < 1 ||
           !(p->scale == p->scale);
}

int launch_ce_forward(const hr_cross_entropy_params *p, cudaStream_t stream) {
    if (bad_common(p) || !p->logits || !p->loss) return cudaErrorInvalidValue;
    ce_forward_kernel<<<p->tokens, kThreads, 0, stream>>>(p->logits, p->targets, p->lse,
                                                          p->tokens, p->vocab, p->ignore_index);
    HR_TRY(cudaGetLastError());
    loss_kernel<float><<<1, kLossThreads, 0, stream>>>(p->logits, nullptr, nullptr, p->targets,
                                                       p->lse, p->loss, p->tokens, 0, p->vocab,
                                                       p->ignore_index, p->scale);
    HR_RETURN_LAUNCH_STATUS();
}

template <typename T>
int launch_ce_backward(const hr_cross_entropy_params *p, cudaStream_t stream) {
    if (bad_common(p) || !p->logits || !p->dlogits) return cudaErrorInvalidValue;
    const dim3 grid((unsigned)std::min<int64_t>(hr::ceil_div(p->vocab, kThreads), 64),
                    (unsigned)std::min(p->tokens, 65535));
    ce_backward_kernel<T><<<grid, kThreads, 0, stream>>>(
        p->logits, p->targets, p->lse, static_cast<T *>(p->dlogits), p->tokens, p->vocab,
        p->ignore_index, p->scale);
    HR_RETURN_LAUNCH_STATUS();
}

template <typename T>
int launch_fused_forward(const hr_cross_entropy_params *p, cudaStream_t stream) {
    if (bad_common(p) || !p->hidden || !p->weight || !p->loss || p->channels < 1)
        return cudaErrorInvalidValue;
    int rows = 0;
    size_t bytes = 0;
    if (const int e = fused_rows(p->channels, 1, &rows, &bytes)) return e;
    HR_TRY(cudaFuncSetAttribute(fused_forward_kernel<T>,
                                cudaFuncAttributeMaxDynamicSharedMemorySize, (int)bytes));
    const T *h = static_cast<const T *>(p->hidden);
    const T *w = static_cast<const T *>(p->weight);
    fused_forward_kernel<T><<<(unsigned)hr::ceil_div(p->tokens, rows), kThreads, bytes, stream>>>(
        h, w, p->targets, p->lse, p->tokens, p->channels, p->vocab, p->ignore_index, rows);
    HR_TRY(cudaGetLastError());
    loss_kernel<T><<<1, kLossThreads, 0, stream>>>(nullptr, h, w, p->targets, p->lse, p->loss,
                                                   p->tokens, p->channels, p->vocab,
                                                   p->ignore_index, p->scale);
    HR_RETURN_LAUNCH_STATUS();
}

template <typename T>
int launch_fused_backward(const hr_cross_entropy_params *p, cudaStream_t stream) {
    if (bad_common(p) || !p->hidden || !p->weight || !p->d_hidden || !p->d_weight ||
        p->channels < 1)
        return cudaErrorInvalidValue;
    int rows = 0;
    size_t bytes = 0;
    if (const int e = fused_rows(p->channels, 2, &rows, &bytes)) return e;
    const T *h = static_cast<const T *>(p->hidden);
    const T *w = static_cast<const T *>(p->weight);
    HR_TRY(cudaFuncSetAttribute(fused_dhidden_kernel<T>,
                                cudaFuncAttributeMaxDynamicSharedMemorySize, (int)bytes));
    fused_dhidden_kernel<T><<<(unsigned)hr::ceil_div(p->tokens, rows), kThreads, bytes, stream>>>(
        h, w, p->targets, p->lse, static_cast<T *>(p->d_hidden), p->tokens, p->channels,
        p->vocab, p->ignore_index, p->scale, rows, p->accumulate != 0);
    HR_TRY(cudaGetLastError());
    HR_TRY(cudaFuncSetAttribute(fused_dweight_kernel<T>,
                                cudaFuncAttributeMaxDynamicSharedMemorySize, (int)bytes));
    fused_dweight_kernel<T><<<(unsigned)hr::ceil_div(p->vocab, rows), kThreads, bytes, stream>>>(
        h, w, p->targets, p->lse, p->d_weight, p->tokens, p->channels, p->vocab,
        p->ignore_index, p->scale, rows);
    HR_RETURN_LAUNCH_STATUS();
}

} // namespace

// ====================================================================================
// extern "C" launchers (headroom.h)
// ====================================================================================

extern "C" int hr_cross_entropy_forward(const hr_cross_entropy_params *p, hr_stream_t stream) {
    return launch_ce_forward(p, stream);
}
extern "C" int hr_cross_entropy_backward_f32(const hr_cross_entropy_params *p,
                                             hr_stream_t stream) {
    return launch_ce_backward<float>(p, stream);
}
extern "C" int hr_cross_entropy_backward_bf16(const hr_cross_entropy_params *p,
                                              hr_stream_t stream) {
    return launch_ce_backward<bf16>(p, stream);
}
extern "C" int hr_fused_cross_entropy_forward_f32(const hr_cross_entropy_params *p,
                                                  hr_stream_t stream) {
    return launch_fused_forward<float>(p, stream);
}
extern "C" int hr_fused_cross_entropy_forward_bf16(const hr_cross_entropy_params *p,
                                                   hr_stream_t stream) {
    return launch_fused_forward<bf16>(p, stream);
}
extern "C" int hr_fused_cross_entropy_backward_f32(const hr_cross_entropy_params *p,
                                                   hr_stream_t stream) {
    return launch_fused_backward<float>(p, stream);
}
extern "C" int hr_fused_cross_entropy_backward_bf16(const hr_cross_entropy_params *p,
                                                    hr_stream_t stream) {
    return launch_fused_backward<bf16>(p, stream);
}
