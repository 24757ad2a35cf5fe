// layers.cu - the transformer block's non-matmul layer ops: layernorm (forward, input
// gradient, parameter gradients), tanh-GELU and its derivative, the f32 -> bf16 cast, the
// [T, parts*C] <-> [parts, B, H, N, d] head permutations, column sums (bias gradients), the
// MSE loss and the AdamW update.
//
// Layouts (see headroom.h): activations are [T, C] row-major in the function's dtype; per-row
// statistics (mean, rstd), layernorm parameters, every parameter gradient, the loss and all
// optimizer state are fp32. All math is fp32; bf16 appears only at loads and stores
// (hr::to_f32 / hr::from_f32, round to nearest even).
//
// Kernels (template parameter T = float or __nv_bfloat16, the storage type):
//   layernorm_fwd_kernel<T>         one warp per row: two-pass mean / biased variance (the row
//                                   is re-read from L1/L2, not cached), writes out, mean, rstd.
//   layernorm_bwd_kernel<T>         one warp per row: pass 1 sums g = d_out*w and g*xhat,
//                                   pass 2 writes dx (+)= rstd * (g - mean(g) - xhat*mean(g*xhat)).
//   layernorm_bwd_params_kernel<T>  32 columns x 16 row-lanes per block: d_weight += sum_t
//                                   d_out*xhat, d_bias += sum_t d_out, fixed-order column sums.
//   column_sum_kernel<T>            the same 32 x 16 partition: out[c] (+)= sum_r x[r, c].
//   gelu_fwd_kernel<T>              elementwise, 16-byte packs + scalar tail, grid-stride.
//   gelu_bwd_kernel<T>              elementwise dx = d_out * gelu'(x), exact tanh-form derivative.
//   cast_f32_bf16_kernel            elementwise, float4 in / 4 x bf16 (8 bytes) out.
//   heads_permute_kernel<T>         pure permutation both ways, 16-byte units along d when d
//                                   allows, element units otherwise; 32-bit index math when
//                                   the tensor is small enough (it always is in practice).
//   mse_loss_kernel<T>              1024-thread blocks: block 0 reduces 0.5*scale*sum(y^2) in a
//                                   fixed order (fixed per-thread strides, fixed smem tree), the
//                                   other blocks write dy = scale * y; in place (dy == y) the one
//                                   block does both, the writes after the sum's reads.
//   adamw_kernel                    elementwise AdamW, float4 packs + scalar tail, optional bf16
//                                   copy of the updated weights.
//
// Determinism: there are no floating-point atomics. Every sum has a fixed partition and a fixed
// combination order that do not depend on scheduling: a warp-per-row sum is per-lane sequential
// then an xor-butterfly (commutative pairs, so every lane ends with the same bits); a column sum
// is per-row-lane sequential then lanes 0..15 added in order through shared memory. The price
// of the column sums is parallelism: one block per 32 columns (C/32 blocks; 24 for C = 768),
// since a split over rows would need a workspace or atomics. The loss likewise runs its
// reduction in a single block.
//
// Vector paths (16-byte loads/stores) are taken when every pointer involved is 16-byte aligned
// and the row length is a multiple of the pack (4 floats or 8 bf16); otherwise the same kernel
// runs its scalar path, so any size works. Pointers that may legally alias (in-place gelu,
// dx == d_out, ...) carry no __restrict__: every element is read and then written by the same
// thread, so aliasing is harmless.
#include "common.cuh"

#include <initializer_list>
#include <math.h>

namespace {

using bf16 = __nv_bfloat16;

constexpr unsigned kFull = 0xffffffffu;
constexpr int kRowThreads = 256;  // layernorm: 8 warps = 8 rows per block
constexpr int kEwThreads = 256;   // elementwise / permutation kernels
constexpr int kColX = 32;         // column sums: columns per block (one warp wide)
constexpr int kColY = 16;         // column sums: row-lanes per block
constexpr int kLossThreads = 1024; // loss reduction block (power of two for the tree)

// Elements of T in one 16-byte pack.
template <typename T> constexpr int kPack = 16 / (int)sizeof(T);

// ====================================================================================
// Pack loads and stores (fp32 in registers, T in memory)
// ====================================================================================

// W == 1: one element. W > 1: W / 4 float4 loads (p must be 16-byte aligned).
template <int W>
__device__ __forceinline__ void load_elems(const float *p, float (&v)[W]) {
    if constexpr (W == 1) {
        v[0] = *p;
    } else {
        static_assert(W % 4 == 0, "float packs are float4s");
#pragma unroll
        for (int k = 0; k < W / 4; ++k) {
            const float4 f = reinterpret_cast<const float4 *>(p)[k];
            v[4 * k + 0] = f.x;
            v[4 * k + 1] = f.y;
            v[4 * k + 2] = f.z;
            v[4 * k + 3] = f.w;
        }
    }
}

// Element 2i of a bf16 pair sits in the low half of its 32-bit word (little-endian).
__device__ __forceinline__ float bf16_lo(uint32_t w) {
    return hr::to_f32(__ushort_as_bfloat16((unsigned short)(w & 0xffffu)));
}
__device__ __forceinline__ float bf16_hi(uint32_t w) {
    return hr::to_f32(__ushort_as_bfloat16((unsigned short)(w >> 16)));
}
using hr::pack_bf16x2;

// W == 1: one element. W > 1: W / 8 uint4 loads (p must be 16-byte aligned).
template <int W>
__device__ __forceinline__ void load_elems(const bf16 *p, float (&v)[W]) {
    if constexpr (W == 1) {
        v[0] = hr::to_f32(*p);
    } else {
        static_assert(W % 8 == 0, "bf16 loads are 16-byte packs");
#pragma unroll
        for (int k = 0; k < W / 8; ++k) {
            const uint4 u = reinterpret_cast<const uint4 *>(p)[k];
            v[8 * k + 0] = bf16_lo(u.x);
            v[8 * k + 1] = bf16_hi(u.x);
            v[8 * k + 2] = bf16_lo(u.y);
            v[8 * k + 3] = bf16_hi(u.y);
            v[8 * k + 4] = bf16_lo(u.z);
            v[8 * k + 5] = bf16_hi(u.z);
            v[8 * k + 6] = bf16_lo(u.w);
            v[8 * k + 7] = bf16_hi(u.w);
        }
    }
}

template <int W>
__device__ __forceinline__ void store_elems(float *p, const float (&v)[W]) {
    if constexpr (W == 1) {
        *p = v[0];
    } else {
        static_assert(W % 4 == 0, "float packs are float4s");
#pragma unroll
        for (int k = 0; k < W / 4; ++k)
            reinterpret_cast<float4 *>(p)[k] =
                make_float4(v[4 * k + 0], v[4 * k + 1], v[4 * k + 2], v[4 * k + 3]);
    }
}

// W == 1: one element; W == 4: one 8-byte store (p 8-byte aligned); W % 8 == 0: 16-byte stores.
template <int W>
__device__ __forceinline__ void store_elems(bf16 *p, const float (&v)[W]) {
    if constexpr (W == 1) {
        *p = hr::from_f32<bf16>(v[0]);
    } else if constexpr (W == 4) {
        *reinterpret_cast<uint2 *>(p) =
            make_uint2(pack_bf16x2(v[0], v[1]), pack_bf16x2(v[2], v[3]));
    } else {
        static_assert(W % 8 == 0, "bf16 stores are 8- or 16-byte packs");
#pragma unroll
        for (int k = 0; k < W / 8; ++k)
            reinterpret_cast<uint4 *>(p)[k] =
                make_uint4(pack_bf16x2(v[8 * k + 0], v[8 * k + 1]),
                           pack_bf16x2(v[8 * k + 2], v[8 * k + 3]),
                           pack_bf16x2(v[8 * k + 4], v[8 * k + 5]),
                           pack_bf16x2(v[8 * k + 6], v[8 * k + 7]));
    }
}

// Sum over the warp. Each xor stage adds the same two values on both partners (a + b and
// b + a have the same bits), so every lane ends with the identical, order-fixed total.
__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(kFull, v, off);
    return v;
}

// ====================================================================================
// LayerNorm
// ====================================================================================

// The three passes over one row, for packs of W elements (W = 1: scalar path; W = kPack<T>:
// 16-byte path, needs C % W == 0 and aligned pointers). Lane l owns packs l, l+32, ...
template <int W, typename T>
__device__ __forceinline__ void layernorm_fwd_row(const T *xr, const float *__restrict__ weight,
                                                  const float *__restrict__ bias, T *orow, int C,
                                                  float eps, int lane, float &mean_out,
                                                  float &rstd_out) {
    const int packs = C / W;
    float s = 0.f;
    for (int q = lane; q < packs; q += 32) {
        float v[W];
        load_elems<W>(xr + (int64_t)q * W, v);
#pragma unroll
        for (int k = 0; k < W; ++k) s += v[k];
    }
    const float mean = warp_sum(s) / (float)C;
    // Second pass over the row for the variance: sum((x - mean)^2) is better conditioned than
    // E[x^2] - mean^2 and is what the CPU backend computes.
    float ss = 0.f;
    for (int q = lane; q < packs; q += 32) {
        float v[W];
        load_elems<W>(xr + (int64_t)q * W, v);
#pragma unroll
        for (int k = 0; k < W; ++k) {
            const float d = v[k] - mean;
            ss += d * d;
        }
    }
    const float var = warp_sum(ss) / (float)C;
    const float rstd = 1.0f / sqrtf(var + eps); // not rsqrtf: stay close to the CPU's f32 math
    for (int q = lane; q < packs; q += 32) {
        float v[W], w[W], b[W];
        load_elems<W>(xr + (int64_t)q * W, v);
        load_elems<W>(weight + (int64_t)q * W, w);
        load_elems<W>(bias + (int64_t)q * W, b);
#pragma unroll
        for (int k = 0; k < W; ++k) v[k] = (v[k] - mean) * rstd * w[k] + b[k];
        store_elems<W>(orow + (int64_t)q * W, v);
    }
    mean_out = mean;
    rstd_out = rstd;
}

// x, out: [T, C]; weight, bias: [C]; mean, rstd: [T]. One warp per row, grid-stride over rows.
// x and out may be the same buffer: a row is fully read (passes 1-2) before pass 3 writes it,
// and each element of pass 3 is read and written by the same lane.
template <typename T>
__global__ void __launch_bounds__(kRowThreads)
layernorm_fwd_kernel(const T *x, const float *__restrict__ weight, const float *__restrict__ bias,
                     T *out, float *__restrict__ mean, float *__restrict__ rstd, int tokens, int C,
                     float eps, int vec) {
    const int lane = threadIdx.x & 31;
    const int warps = blockDim.x >> 5;
    const int64_t nwarps = (int64_t)gridDim.x * warps;
    for (int64_t row = (int64_t)blockIdx.x * warps + (threadIdx.x >> 5); row < tokens;
         row += nwarps) {
        const T *xr = x + row * C;
        T *orow = out + row * C;
        float mu, rs;
        if (vec)
            layernorm_fwd_row<kPack<T>>(xr, weight, bias, orow, C, eps, lane, mu, rs);
        else
            layernorm_fwd_row<1>(xr, weight, bias, orow, C, eps, lane, mu, rs);
        if (lane == 0) {
            mean[row] = mu;
            rstd[row] = rs;
        }
    }
}

template <int W, typename T>
__device__ __forceinline__ void layernorm_bwd_row(const T *gr, const T *xr,
                                                  const float *__restrict__ weight, T *dxr,
                                                  float mean, float rstd, int C, int accumulate,
                                                  int lane) {
    const int packs = C / W;
    // Pass 1: mean(g) and mean(g * xhat), g = d_out * w, xhat = (x - mean) * rstd.
    float sg = 0.f, sgx = 0.f;
    for (int q = lane; q < packs; q += 32) {
        float g[W], xv[W], w[W];
        load_elems<W>(gr + (int64_t)q * W, g);
        load_elems<W>(xr + (int64_t)q * W, xv);
        load_elems<W>(weight + (int64_t)q * W, w);
#pragma unroll
        for (int k = 0; k < W; ++k) {
            const float gk = g[k] * w[k];
            const float xh = (xv[k] - mean) * rstd;
            sg += gk;
            sgx += gk * xh;
        }
    }
    const float mean_g = warp_sum(sg) / (float)C;
    const float mean_gx = warp_sum(sgx) / (float)C;
    // Pass 2: dx (+)= rstd * (g - mean(g) - xhat * mean(g * xhat)).
    for (int q = lane; q < packs; q += 32) {
        float g[W], xv[W], w[W], o[W];
        load_elems<W>(gr + (int64_t)q * W, g);
        load_elems<W>(xr + (int64_t)q * W, xv);
        load_elems<W>(weight + (int64_t)q * W, w);
        if (accumulate) {
            load_elems<W>(dxr + (int64_t)q * W, o);
        } else {
#pragma unroll
            for (int k = 0; k < W; ++k) o[k] = 0.f;
        }
#pragma unroll
        for (int k = 0; k < W; ++k) {
            const float gk = g[k] * w[k];
            const float xh = (xv[k] - mean) * rstd;
            o[k] += rstd * (gk - mean_g - xh * mean_gx);
        }
        store_elems<W>(dxr + (int64_t)q * W, o);
    }
}

// d_out, x, dx: [T, C]; weight: [C]; mean, rstd: [T] from the forward. One warp per row.
// accumulate = 1 adds into dx (the residual stream's gradient), read in fp32.
template <typename T>
__global__ void __launch_bounds__(kRowThreads)
layernorm_bwd_kernel(const T *d_out, const T *x, const float *__restrict__ weight,
                     const float *__restrict__ mean, const float *__restrict__ rstd, T *dx,
                     int tokens, int C, int accumulate, int vec) {
    const int lane = threadIdx.x & 31;
    const int warps = blockDim.x >> 5;
    const int64_t nwarps = (int64_t)gridDim.x * warps;
    for (int64_t row = (int64_t)blockIdx.x * warps + (threadIdx.x >> 5); row < tokens;
         row += nwarps) {
        const int64_t off = row * C;
        const float mu = mean[row], rs = rstd[row];
        if (vec)
            layernorm_bwd_row<kPack<T>>(d_out + off, x + off, weight, dx + off, mu, rs, C,
                                        accumulate, lane);
        else
            layernorm_bwd_row<1>(d_out + off, x + off, weight, dx + off, mu, rs, C, accumulate,
                                 lane);
    }
}

// ====================================================================================
// Column sums (layernorm parameter gradients, bias gradients)
// ====================================================================================

// Thread (tx, ty) of a kColX x kColY block has summed rows ty, ty + kColY, ... of column
// blockIdx.x * kColX + tx (in row order). Combine the kColY row-lanes in order 0, 1, ... in
// shared memory; returns the column total in the ty == 0 warp (garbage elsewhere).
__device__ __forceinline__ float combine_row_lanes(float part, float (*sh)[kColX]) {
    sh[threadIdx.y][threadIdx.x] = part;
    __syncthreads();
    float total = 0.f;
    if (threadIdx.y == 0) {
        total = sh[0][threadIdx.x];
#pragma unroll
        for (int k = 1; k < kColY; ++k) total += sh[k][threadIdx.x];
    }
    return total;
}

// d_out, x: [T, C]; mean, rstd: [T]; d_weight, d_bias: [C], accumulated (+=).
// Grid: ceil(C / 32) blocks of 32 x 16 threads.
template <typename T>
__global__ void __launch_bounds__(kColX * kColY)
layernorm_bwd_params_kernel(const T *__restrict__ d_out, const T *__restrict__ x,
                            const float *__restrict__ mean, const float *__restrict__ rstd,
                            float *d_weight, float *d_bias, int tokens, int C) {
    __shared__ float sh_w[kColY][kColX];
    __shared__ float sh_b[kColY][kColX];
    const int c = blockIdx.x * kColX + threadIdx.x;
    float sw = 0.f, sb = 0.f;
    if (c < C) {
        // Loads do not depend on the running sums, so the unrolled loop keeps 4 rows of loads
        // in flight while the adds stay in row order.
#pragma unroll 4
        for (int t = threadIdx.y; t < tokens; t += kColY) {
            const int64_t off = (int64_t)t * C + c;
            const float g = hr::to_f32(d_out[off]);
            sw += g * (hr::to_f32(x[off]) - mean[t]) * rstd[t]; // the CPU's d_out*(x-mean)*rstd
            sb += g;
        }
    }
    const float tw = combine_row_lanes(sw, sh_w);
    const float tb = combine_row_lanes(sb, sh_b);
    if (threadIdx.y == 0 && c < C) {
        d_weight[c] += tw;
        d_bias[c] += tb;
    }
}

// x: [rows, cols]; out: [cols] fp32. Grid: ceil(cols / 32) blocks of 32 x 16 threads.
template <typename T>
__global__ void __launch_bounds__(kColX * kColY)
column_sum_kernel(const T *__restrict__ x, float *out, int rows, int cols, int accumulate) {
    __shared__ float sh[kColY][kColX];
    const int c = blockIdx.x * kColX + threadIdx.x;
    float s = 0.f;
    if (c < cols) {
#pragma unroll 4
        for (int r = threadIdx.y; r < rows; r += kColY) s += hr::to_f32(x[(int64_t)r * cols + c]);
    }
    const float total = combine_row_lanes(s, sh);
    if (threadIdx.y == 0 && c < cols) out[c] = accumulate ? out[c] + total : total;
}

// ====================================================================================
// Elementwise: GELU, its derivative, the cast
// ====================================================================================

// d/dx of hr::gelu_tanh, exact for the tanh form (the CPU's gelu_tanh_grad, term by term):
// u = k0 (x + k1 x^3), t = tanh(u): 0.5 (1 + t) + 0.5 x (1 - t^2) k0 (1 + 3 k1 x^2).
__device__ __forceinline__ float gelu_tanh_grad(float x) {
    const float k0 = 0.7978845608028654f;
    const float k1 = 0.044715f;
    const float t = tanhf(k0 * (x + k1 * x * x * x));
    return 0.5f * (1.0f + t) + 0.5f * x * (1.0f - t * t) * k0 * (1.0f + 3.0f * k1 * x * x);
}

// x, out: [n]. vec: both 16-byte aligned; packs of kPack<T> first, then the scalar tail.
template <typename T>
__global__ void __launch_bounds__(kEwThreads)
gelu_fwd_kernel(const T *x, T *out, int64_t n, int vec) {
    constexpr int V = kPack<T>;
    const int64_t stride = (int64_t)gridDim.x * blockDim.x;
    const int64_t tid = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    int64_t done = 0;
    if (vec) {
        const int64_t packs = n / V;
        for (int64_t i = tid; i < packs; i += stride) {
            float v[V];
            load_elems<V>(x + i * V, v);
#pragma unroll
            for (int k = 0; k < V; ++k) v[k] = hr::gelu_tanh(v[k]);
            store_elems<V>(out + i * V, v);
        }
        done = packs * V;
    }
    for (int64_t i = done + tid; i < n; i += stride)
        out[i] = hr::from_f32<T>(hr::gelu_tanh(hr::to_f32(x[i])));
}

// x, d_out, out: [n]; out = d_out * gelu'(x). out may alias d_out or x.
template <typename T>
__global__ void __launch_bounds__(kEwThreads)
gelu_bwd_kernel(const T *x, const T *d_out, T *out, int64_t n, int vec) {
    constexpr int V = kPack<T>;
    const int64_t stride = (int64_t)gridDim.x * blockDim.x;
    const int64_t tid = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    int64_t done = 0;
    if (vec) {
        const int64_t packs = n / V;
        for (int64_t i = tid; i < packs; i += stride) {
            float v[V], g[V];
            load_elems<V>(x + i * V, v);
            load_elems<V>(d_out + i * V, g);
#pragma unroll
            for (int k = 0; k < V; ++k) v[k] = g[k] * gelu_tanh_grad(v[k]);
            store_elems<V>(out + i * V, v);
        }
        done = packs * V;
    }
    for (int64_t i = done + tid; i < n; i += stride)
        out[i] = hr::from_f32<T>(hr::to_f32(d_out[i]) * gelu_tanh_grad(hr::to_f32(x[i])));
}

// x: fp32 [n] -> out: bf16 [n]. vec: x 16-byte and out 8-byte aligned (4 elements per pack).
__global__ void __launch_bounds__(kEwThreads)
cast_f32_bf16_kernel(const float *__restrict__ x, bf16 *__restrict__ out, int64_t n, int vec) {
    const int64_t stride = (int64_t)gridDim.x * blockDim.x;
    const int64_t tid = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    int64_t done = 0;
    if (vec) {
        const int64_t packs = n / 4;
        for (int64_t i = tid; i < packs; i += stride) {
            float v[4];
            load_elems<4>(x + i * 4, v);
            store_elems<4>(out + i * 4, v);
        }
        done = packs * 4;
    }
    for (int64_t i = done + tid; i < n; i += stride) out[i] = hr::from_f32<bf16>(x[i]);
}

// ====================================================================================
// Head permutations
// ====================================================================================

// Units are uint4 (16 bytes) or single elements; du = units per head row (d or d / pack).
// i runs over the heads layout [P, B, H, N, du] (contiguous), tok is the same element in the
// tokens layout [B, N, P, H, du]. to_heads: dst[i] = src[tok]; else dst[tok] = src[i].
// Either way each d-long row is contiguous on both sides, so accesses coalesce per row.
// I is uint32_t when total < 2^31 (cheaper divisions, and i + stride cannot wrap), else uint64_t.
template <typename U, typename I>
__device__ __forceinline__ void permute_units(const U *__restrict__ src, U *__restrict__ dst,
                                              I total, I du, I N, I H, I B, I P, int to_heads) {
    const I stride = (I)gridDim.x * blockDim.x;
    for (I i = (I)blockIdx.x * blockDim.x + threadIdx.x; i < total; i += stride) {
        const I e = i % du;
        I r = i / du;
        const I n = r % N;
        r /= N;
        const I h = r % H;
        r /= H;
        const I b = r % B;
        const I p = r / B;
        const I tok = (((b * N + n) * P + p) * H + h) * du + e;
        if (to_heads)
            dst[i] = src[tok];
        else
            dst[tok] = src[i];
    }
}

// src, dst: [B, N, P, H, d] and [P, B, H, N, d] (which is which: to_heads). vec: d % pack == 0
// and both pointers 16-byte aligned. idx32: the unit count fits in 31 bits.
template <typename T>
__global__ void __launch_bounds__(kEwThreads)
heads_permute_kernel(const T *__restrict__ src, T *__restrict__ dst, int B, int N, int P, int H,
                     int d, int to_heads, int vec, int idx32) {
    if (vec) {
        const int du = d / kPack<T>;
        const uint4 *s = reinterpret_cast<const uint4 *>(src);
        uint4 *o = reinterpret_cast<uint4 *>(dst);
        const uint64_t total = (uint64_t)P * B * H * N * du;
        if (idx32)
            permute_units<uint4, uint32_t>(s, o, (uint32_t)total, du, N, H, B, P, to_heads);
        else
            permute_units<uint4, uint64_t>(s, o, total, du, N, H, B, P, to_heads);
    } else {
        const uint64_t total = (uint64_t)P * B * H * N * d;
        if (idx32)
            permute_units<T, uint32_t>(src, dst, (uint32_t)total, d, N, H, B, P, to_heads);
        else
            permute_units<T, uint64_t>(src, dst, total, d, N, H, B, P, to_heads);
    }
}

// ====================================================================================
// MSE loss
// ====================================================================================

// y, dy: [n]; loss: [1]. Block 0: loss = 0.5 * scale * sum(y^2) - thread j sums packs j, j + 1024,
// ... in order, then the tail elements done + j, done + j + 1024, ..., then a fixed
// shared-memory tree (the loss is one number, so its reduction is one block: no workspace).
// Blocks 1..G-1: dy = scale * y, grid-stride. With G == 1 (the launcher's choice when dy == y)
// block 0 writes dy itself, after every read of y for the sum has finished.
template <typename T>
__global__ void __launch_bounds__(kLossThreads)
mse_loss_kernel(const T *y, T *dy, float *__restrict__ loss, int64_t n, float scale, int vec) {
    constexpr int V = kPack<T>;
    const int64_t packs = vec ? n / V : 0;
    const int64_t done = packs * V;
    if (blockIdx.x == 0) {
        __shared__ float red[kLossThreads];
        const int tid = threadIdx.x;
        float s = 0.f;
        for (int64_t i = tid; i < packs; i += kLossThreads) {
            float v[V];
            load_elems<V>(y + i * V, v);
#pragma unroll
            for (int k = 0; k < V; ++k) s += v[k] * v[k];
        }
        for (int64_t i = done + tid; i < n; i += kLossThreads) {
            const float v = hr::to_f32(y[i]);
            s += v * v;
        }
        red[tid] = s;
        __syncthreads();
#pragma unroll
        for (int off = kLossThreads / 2; off > 0; off >>= 1) {
            if (tid < off) red[tid] += red[tid + off];
            __syncthreads();
        }
        if (tid == 0) loss[0] = 0.5f * scale * red[0];
        if (gridDim.x != 1) return;
    }
    const int64_t dy_blocks = gridDim.x == 1 ? 1 : gridDim.x - 1;
    const int64_t dy_block = gridDim.x == 1 ? 0 : blockIdx.x - 1;
    const int64_t stride = dy_blocks * blockDim.x;
    const int64_t tid = dy_block * blockDim.x + threadIdx.x;
    for (int64_t i = tid; i < packs; i += stride) {
        float v[V];
        load_elems<V>(y + i * V, v);
#pragma unroll
        for (int k = 0; k < V; ++k) v[k] = scale * v[k];
        store_elems<V>(dy + i * V, v);
    }
    for (int64_t i = done + tid; i < n; i += stride)
        dy[i] = hr::from_f32<T>(scale * hr::to_f32(y[i]));
}

// ====================================================================================
// AdamW
// ====================================================================================

struct AdamWArgs {
    float lr, beta1, beta2, eps, weight_decay;
    float bc1, bc2; // 1 - beta^step, computed on the host
};

// The CPU backend's update, term for term.
__device__ __forceinline__ void adamw_one(float &p, float g, float &m, float &v,
                                          const AdamWArgs &a) {
    m = a.beta1 * m + (1.0f - a.beta1) * g;
    v = a.beta2 * v + (1.0f - a.beta2) * g * g;
    const float mhat = m / a.bc1;
    const float vhat = v / a.bc2;
    p -= a.lr * (mhat / (sqrtf(vhat) + a.eps) + a.weight_decay * p);
}

// param, grad, m, v: fp32 [n]; param_bf16: bf16 [n] or NULL. vec: the fp32 buffers 16-byte
// aligned and param_bf16 8-byte aligned (4 elements per pack).
__global__ void __launch_bounds__(kEwThreads)
adamw_kernel(float *param, const float *grad, float *m, float *v, bf16 *param_bf16, int64_t n,
             AdamWArgs a, int vec) {
    const int64_t stride = (int64_t)gridDim.x * blockDim.x;
    const int64_t tid = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    int64_t done = 0;
    if (vec) {
        const int64_t packs = n / 4;
        for (int64_t i = tid; i < packs; i += stride) {
            float pp[4], gg[4], mm[4], vv[4];
            load_elems<4>(param + i * 4, pp);
            load_elems<4>(grad + i * 4, gg);
            load_elems<4>(m + i * 4, mm);
            load_elems<4>(v + i * 4, vv);
#pragma unroll
            for (int k = 0; k < 4; ++k) adamw_one(pp[k], gg[k], mm[k], vv[k], a);
            store_elems<4>(param + i * 4, pp);
            store_elems<4>(m + i * 4, mm);
            store_elems<4>(v + i * 4, vv);
            if (param_bf16 != nullptr) store_elems<4>(param_bf16 + i * 4, pp);
        }
        done = packs * 4;
    }
    for (int64_t i = done + tid; i < n; i += stride) {
        float pp = param[i], mm = m[i], vv = v[i];
        adamw_one(pp, grad[i], mm, vv, a);
        param[i] = pp;
        m[i] = mm;
        v[i] = vv;
        if (param_bf16 != nullptr) param_bf16[i] = hr::from_f32<bf16>(pp);
    }
}

// ====================================================================================
// Launch helpers
// ====================================================================================

using hr::aligned;

// Grid for a grid-stride loop over `units` work items with `threads`-thread blocks: enough
// blocks to fill every SM once (2048 resident threads each), never more than the work needs,
// at least one. Returns a CUDA error code (0 = success).
int grid_stride_blocks(int64_t units, int threads, unsigned *blocks) {
    int device = 0, sms = 0;
    HR_TRY(cudaGetDevice(&device));
    HR_TRY(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
    int64_t b = hr::ceil_div(units, threads);
    const int64_t cap = (int64_t)(sms > 0 ? sms : 1) * (2048 / threads);
    if (b > cap) b = cap;
    if (b < 1) b = 1;
    *blocks = (unsigned)b;
    return 0;
}

unsigned row_blocks(int tokens) {
    return (unsigned)hr::ceil_div(tokens, kRowThreads / 32); // tokens < 2^31: fits easily
}

bool ln_shape_ok(const hr_layernorm_params *p) {
    return p != nullptr && p->tokens >= 1 && p->channels >= 1;
}

template <typename T>
int launch_layernorm_fwd(const hr_layernorm_params *p, cudaStream_t stream) {
    // eps must be a non-negative number (NaN fails the comparison).
    if (!ln_shape_ok(p) || !p->x || !p->weight || !p->bias || !p->out || !p->mean || !p->rstd ||
        !(p->eps >= 0.f))
        return cudaErrorInvalidValue;
    const int vec = p->channels % kPack<T> == 0 && aligned(p->x, 16) && aligned(p->out, 16) &&
                    aligned(p->weight, 16) && aligned(p->bias, 16);
    layernorm_fwd_kernel<T><<<row_blocks(p->tokens), kRowThreads, 0, stream>>>(
        static_cast<const T *>(p->x), p->weight, p->bias, static_cast<T *>(p->out), p->mean,
        p->rstd, p->tokens, p->channels, p->eps, vec);
    HR_RETURN_LAUNCH_STATUS();
}

template <typename T>
int launch_layernorm_bwd(const hr_layernorm_params *p, cudaStream_t stream) {
    if (!ln_shape_ok(p) || !p->x || !p->weight || !p->mean || !p->rstd || !p->d_out || !p->dx)
        return cudaErrorInvalidValue;
    const int vec = p->channels % kPack<T> == 0 && aligned(p->x, 16) && aligned(p->d_out, 16) &&
                    aligned(p->dx, 16) && aligned(p->weight, 16);
    layernorm_bwd_kernel<T><<<row_blocks(p->tokens), kRowThreads, 0, stream>>>(
        static_cast<const T *>(p->d_out), static_cast<const T *>(p->x), p->weight, p->mean,
        p->rstd, static_cast<T *>(p->dx), p->tokens, p->channels, p->accumulate != 0, vec);
    HR_RETURN_LAUNCH_STATUS();
}

template <typename T>
int launch_layernorm_bwd_params(const hr_layernorm_params *p, cudaStream_t stream) {
    if (!ln_shape_ok(p) || !p->x || !p->mean || !p->rstd || !p->d_out || !p->d_weight ||
        !p->d_bias)
        return cudaErrorInvalidValue;
    const unsigned blocks = (unsigned)hr::ceil_div(p->channels, kColX);
    layernorm_bwd_params_kernel<T><<<blocks, dim3(kColX, kColY), 0, stream>>>(
        static_cast<const T *>(p->d_out), static_cast<const T *>(p->x), p->mean, p->rstd,
        p->d_weight, p->d_bias, p->tokens, p->channels);
    HR_RETURN_LAUNCH_STATUS();
}

template <typename T>
int launch_gelu_fwd(const hr_elementwise_params *p, cudaStream_t stream) {
    if (p == nullptr || !p->x || !p->out || p->n < 1) return cudaErrorInvalidValue;
    const int vec = aligned(p->x, 16) && aligned(p->out, 16);
    unsigned blocks = 0;
    const int64_t units = vec ? p->n / kPack<T> + 1 : p->n;
    if (const int e = grid_stride_blocks(units, kEwThreads, &blocks)) return e;
    gelu_fwd_kernel<T><<<blocks, kEwThreads, 0, stream>>>(static_cast<const T *>(p->x),
                                                          static_cast<T *>(p->out), p->n, vec);
    HR_RETURN_LAUNCH_STATUS();
}

template <typename T>
int launch_gelu_bwd(const hr_elementwise_params *p, cudaStream_t stream) {
    if (p == nullptr || !p->x || !p->d_out || !p->out || p->n < 1) return cudaErrorInvalidValue;
    const int vec = aligned(p->x, 16) && aligned(p->d_out, 16) && aligned(p->out, 16);
    unsigned blocks = 0;
    const int64_t units = vec ? p->n / kPack<T> + 1 : p->n;
    if (const int e = grid_stride_blocks(units, kEwThreads, &blocks)) return e;
    gelu_bwd_kernel<T><<<blocks, kEwThreads, 0, stream>>>(
        static_cast<const T *>(p->x), static_cast<const T *>(p->d_out), static_cast<T *>(p->out),
        p->n, vec);
    HR_RETURN_LAUNCH_STATUS();
}

bool heads_ok(const hr_heads_params *p) {
    return p != nullptr && p->src && p->dst && p->batch >= 1 && p->heads >= 1 && p->seq >= 1 &&
           p->head_dim >= 1 && (p->parts == 1 || p->parts == 3);
}

template <typename T>
int launch_heads(const hr_heads_params *p, int to_heads, cudaStream_t stream) {
    if (!heads_ok(p)) return cudaErrorInvalidValue;
    const int vec =
        p->head_dim % kPack<T> == 0 && aligned(p->src, 16) && aligned(p->dst, 16);
    const int du = vec ? p->head_dim / kPack<T> : p->head_dim;
    // Five positive int32 factors can overflow 64 bits; a tensor that fits in memory cannot.
    int64_t units = du;
    for (const int64_t f : {(int64_t)p->parts, (int64_t)p->batch, (int64_t)p->heads,
                            (int64_t)p->seq}) {
        if (units > INT64_MAX / 16 / f) return cudaErrorInvalidValue; // keep bytes < 2^63
        units *= f;
    }
    const int idx32 = units <= (int64_t)INT32_MAX;
    unsigned blocks = 0;
    if (const int e = grid_stride_blocks(units, kEwThreads, &blocks)) return e;
    heads_permute_kernel<T><<<blocks, kEwThreads, 0, stream>>>(
        static_cast<const T *>(p->src), static_cast<T *>(p->dst), p->batch, p->seq, p->parts,
        p->heads, p->head_dim, to_heads, vec, idx32);
    HR_RETURN_LAUNCH_STATUS();
}

template <typename T>
int launch_column_sum(const hr_column_sum_params *p, cudaStream_t stream) {
    if (p == nullptr || !p->x || !p->out || p->rows < 1 || p->cols < 1)
        return cudaErrorInvalidValue;
    const unsigned blocks = (unsigned)hr::ceil_div(p->cols, kColX);
    column_sum_kernel<T><<<blocks, dim3(kColX, kColY), 0, stream>>>(
        static_cast<const T *>(p->x), p->out, p->rows, p->cols, p->accumulate != 0);
    HR_RETURN_LAUNCH_STATUS();
}

template <typename T>
int launch_mse_loss(const hr_loss_params *p, cudaStream_t stream) {
    if (p == nullptr || !p->y || !p->dy || !p->loss || p->n < 1 || !(p->scale == p->scale))
        return cudaErrorInvalidValue;
    const int vec = aligned(p->y, 16) && aligned(p->dy, 16);
    // In place (dy == y): block 0 must finish reading y for the sum before anything writes dy,
    // so the whole op runs in that one block (each element is then read and written by the
    // same thread).
    const uintptr_t y0 = reinterpret_cast<uintptr_t>(p->y);
    const uintptr_t d0 = reinterpret_cast<uintptr_t>(p->dy);
    const uintptr_t bytes = (uintptr_t)p->n * sizeof(T);
    const bool overlap = y0 < d0 + bytes && d0 < y0 + bytes;
    if (overlap && p->dy != p->y) return cudaErrorInvalidValue; // partial overlap: no order works
    unsigned blocks = 1;
    if (!overlap) {
        unsigned dy_blocks = 0;
        if (const int e = grid_stride_blocks(vec ? p->n / kPack<T> + 1 : p->n, kLossThreads,
                                             &dy_blocks))
            return e;
        blocks = 1 + dy_blocks;
    }
    mse_loss_kernel<T><<<blocks, kLossThreads, 0, stream>>>(
        static_cast<const T *>(p->y), static_cast<T *>(p->dy), p->loss, p->n, p->scale, vec);
    HR_RETURN_LAUNCH_STATUS();
}

} // namespace

// ====================================================================================
// extern "C" launchers (headroom.h)
// ====================================================================================

extern "C" int hr_layernorm_forward_f32(const hr_layernorm_params *p, hr_stream_t stream) {
    return launch_layernorm_fwd<float>(p, stream);
}
extern "C" int hr_layernorm_forward_bf16(const hr_layernorm_params *p, hr_stream_t stream) {
    return launch_layernorm_fwd<bf16>(p, stream);
}
extern "C" int hr_layernorm_backward_f32(const hr_layernorm_params *p, hr_stream_t stream) {
    return launch_layernorm_bwd<float>(p, stream);
}
extern "C" int hr_layernorm_backward_bf16(const hr_layernorm_params *p, hr_stream_t stream) {
    return launch_layernorm_bwd<bf16>(p, stream);
}
extern "C" int hr_layernorm_backward_params_f32(const hr_layernorm_params *p,
                                                hr_stream_t stream) {
    return launch_layernorm_bwd_params<float>(p, stream);
}
extern "C" int hr_layernorm_backward_params_bf16(const hr_layernorm_params *p,
                                                 hr_stream_t stream) {
    return launch_layernorm_bwd_params<bf16>(p, stream);
}

extern "C" int hr_gelu_forward_f32(const hr_elementwise_params *p, hr_stream_t stream) {
    return launch_gelu_fwd<float>(p, stream);
}
extern "C" int hr_gelu_forward_bf16(const hr_elementwise_params *p, hr_stream_t stream) {
    return launch_gelu_fwd<bf16>(p, stream);
}
extern "C" int hr_gelu_backward_f32(const hr_elementwise_params *p, hr_stream_t stream) {
    return launch_gelu_bwd<float>(p, stream);
}
extern "C" int hr_gelu_backward_bf16(const hr_elementwise_params *p, hr_stream_t stream) {
    return launch_gelu_bwd<bf16>(p, stream);
}

extern "C" int hr_cast_f32_to_bf16(const hr_elementwise_params *p, hr_stream_t stream) {
    if (p == nullptr || !p->x || !p->out || p->n < 1) return cudaErrorInvalidValue;
    const int vec = aligned(p->x, 16) && aligned(p->out, 8);
    unsigned blocks = 0;
    const int64_t units = vec ? p->n / 4 + 1 : p->n;
    if (const int e = grid_stride_blocks(units, kEwThreads, &blocks)) return e;
    cast_f32_bf16_kernel<<<blocks, kEwThreads, 0, stream>>>(
        static_cast<const float *>(p->x), static_cast<bf16 *>(p->out), p->n, vec);
    HR_RETURN_LAUNCH_STATUS();
}

extern "C" int hr_tokens_to_heads_f32(const hr_heads_params *p, hr_stream_t stream) {
    return launch_heads<float>(p, 1, stream);
}
extern "C" int hr_tokens_to_heads_bf16(const hr_heads_params *p, hr_stream_t stream) {
    return launch_heads<bf16>(p, 1, stream);
}
extern "C" int hr_heads_to_tokens_f32(const hr_heads_params *p, hr_stream_t stream) {
    return launch_heads<float>(p, 0, stream);
}
extern "C" int hr_heads_to_tokens_bf16(const hr_heads_params *p, hr_stream_t stream) {
    return launch_heads<bf16>(p, 0, stream);
}

extern "C" int hr_column_sum_f32(const hr_column_sum_params *p, hr_stream_t stream) {
    return launch_column_sum<float>(p, stream);
}
extern "C" int hr_column_sum_bf16(const hr_column_sum_params *p, hr_stream_t stream) {
    return launch_column_sum<bf16>(p, stream);
}

extern "C" int hr_mse_loss_f32(const hr_loss_params *p, hr_stream_t stream) {
    return launch_mse_loss<float>(p, stream);
}
extern "C" int hr_mse_loss_bf16(const hr_loss_params *p, hr_stream_t stream) {
    return launch_mse_loss<bf16>(p, stream);
}

extern "C" int hr_adamw(const hr_adamw_params *p, hr_stream_t stream) {
    if (p == nullptr || !p->param || !p->grad || !p->m || !p->v || p->n < 1 || p->step < 1)
        return cudaErrorInvalidValue;
    AdamWArgs a;
    a.lr = p->lr;
    a.beta1 = p->beta1;
    a.beta2 = p->beta2;
    a.eps = p->eps;
    a.weight_decay = p->weight_decay;
    // Bias corrections in double, rounded once: the f32 value nearest 1 - beta^t.
    a.bc1 = (float)(1.0 - pow((double)p->beta1, (double)p->step));
    a.bc2 = (float)(1.0 - pow((double)p->beta2, (double)p->step));
    const int vec = aligned(p->param, 16) && aligned(p->grad, 16) && aligned(p->m, 16) &&
                    aligned(p->v, 16) && aligned(p->param_bf16, 8);
    unsigned blocks = 0;
    const int64_t units = vec ? p->n / 4 + 1 : p->n;
    if (const int e = grid_stride_blocks(units, kEwThreads, &blocks)) return e;
    adamw_kernel<<<blocks, kEwThreads, 0, stream>>>(p->param, p->grad, p->m, p->v,
                                                    static_cast<bf16 *>(p->param_bf16), p->n, a,
                                                    vec);
    HR_RETURN_LAUNCH_STATUS();
}

// ====================================================================================
// Norm, MLP and embedding ops: RMSNorm, SwiGLU, token embedding
// ====================================================================================
//
//   rmsnorm_fwd_kernel<T>          one warp per row: sum of squares, then out = x*rstd*w.
//   rmsnorm_bwd_kernel<T>          one warp per row: pass 1 sums g*x (g = d_out*w), pass 2
//                                  writes dx (+)= rstd * (g - x * rstd^2 * mean(g*x)).
//   rmsnorm_bwd_params_kernel<T>   the column-sum partition above: d_weight += sum_t
//                                  d_out*x*rstd.
//   swiglu_fwd_kernel<T>           elementwise out = silu(gate)*up, 16-byte packs + tail.
//   swiglu_bwd_kernel<T>           elementwise d_gate, d_up.
//   embedding_fwd_kernel<T>        grid-stride over (token, pack): a gather of table rows (+
//                                  the position row), fp32 add, 16-byte packs when C allows.
//   embedding_bwd_table_kernel<T>  thread (column c, vocabulary slice s) walks every token in
//                                  order and adds d_out[t, c] into d_table[ids[t], c] when
//                                  ids[t] is in its slice: each element has one owner that adds
//                                  its tokens in token order, so the result is bitwise
//                                  repeatable, with no atomics and no workspace. Cost: every
//                                  thread reads all T ids (broadcast within a warp, from L1/L2)
//                                  and d_out is read once in all; the slices (up to 64, enough
//                                  for ~2048 threads per SM) exist only to spread C columns
//                                  over the GPU. Latency-bound for long T: T dependent steps
//                                  per thread.
//   embedding_bwd_pos_kernel<T>    one thread per d_positions element: tokens p, p+seq, ...
//                                  in order.
//
// RMSNorm backward (derivation; Zhang & Sennrich 2019 give the forward): y_j = x_j r w_j with
// r = (mean(x^2) + eps)^-1/2 and dr/dx_k = -r^3 x_k / C, so with g = w * dy
// dx_k = sum_j g_j (delta_jk r + x_j dr/dx_k) = r (g_k - x_k r^2 mean_j(g_j x_j)).
// SwiGLU (Shazeer 2020): silu(g) = g sigma(g), silu'(g) = sigma(g) (1 + g (1 - sigma(g))).
namespace {

template <int W, typename T>
__device__ __forceinline__ void rmsnorm_fwd_row(const T *xr, const float *__restrict__ weight,
                                                T *orow, int C, float eps, int lane,
                                                float &rstd_out) {
    const int packs = C / W;
    float ss = 0.f;
    for (int q = lane; q < packs; q += 32) {
        float v[W];
        load_elems<W>(xr + (int64_t)q * W, v);
#pragma unroll
        for (int k = 0; k < W; ++k) ss += v[k] * v[k];
    }
    const float rstd = 1.0f / sqrtf(warp_sum(ss) / (float)C + eps); // as the CPU: not rsqrtf
    for (int q = lane; q < packs; q += 32) {
        float v[W], w[W];
        load_elems<W>(xr + (int64_t)q * W, v);
        load_elems<W>(weight + (int64_t)q * W, w);
#pragma unroll
        for (int k = 0; k < W; ++k) v[k] = v[k] * rstd * w[k];
        store_elems<W>(orow + (int64_t)q * W, v);
    }
    rstd_out = rstd;
}

// x, out: [T, C]; weight: [C]; rstd: [T]. One warp per row. x and out may alias (each row is
// read whole before it is written, each element by the same lane).
// At least one block per SM (see fused_forward_kernel in loss.cu): with the default occupancy
// target ptxas spills the fp32 instantiation on sm_8x.
template <typename T>
__global__ void __launch_bounds__(kRowThreads, 1)
rmsnorm_fwd_kernel(const T *x, const float *__restrict__ weight, T *out,
                   float *__restrict__ rstd, int tokens, int C, float eps, int vec) {
    const int lane = threadIdx.x & 31;
    const int warps = blockDim.x >> 5;
    const int64_t nwarps = (int64_t)gridDim.x * warps;
    for (int64_t row = (int64_t)blockIdx.x * warps + (threadIdx.x >> 5); row < tokens;
         row += nwarps) {
        float rs;
        if (vec)
            rmsnorm_fwd_row<kPack<T>>(x + row * C, weight, out + row * C, C, eps, lane, rs);
        else
            rmsnorm_fwd_row<1>(x + row * C, weight, out + row * C, C, eps, lane, rs);
        if (lane == 0) rstd[row] = rs;
    }
}

template <int W, typename T>
__device__ __forceinline__ void rmsnorm_bwd_row(const T *gr, const T *xr,
                                                const float *__restrict__ weight, T *dxr,
                                                float rstd, int C, int accumulate, int lane) {
    const int packs = C / W;
    float sgx = 0.f;
    for (int q = lane; q < packs; q += 32) {
        float g[W], xv[W], w[W];
        load_elems<W>(gr + (int64_t)q * W, g);
        load_elems<W>(xr + (int64_t)q * W, xv);
        load_elems<W>(weight + (int64_t)q * W, w);
#pragma unroll
        for (int k = 0; k < W; ++k) sgx += g[k] * w[k] * xv[k];
    }
    const float kx = rstd * rstd * (warp_sum(sgx) / (float)C);
    for (int q = lane; q < packs; q += 32) {
        float g[W], xv[W], w[W], o[W];
        load_elems<W>(gr + (int64_t)q * W, g);
        load_elems<W>(xr + (int64_t)q * W, xv);
        load_elems<W>(weight + (int64_t)q * W, w);
        if (accumulate) {
            load_elems<W>(dxr + (int64_t)q * W, o);
        } else {
#pragma unroll
            for (int k = 0; k < W; ++k) o[k] = 0.f;
        }
#pragma unroll
        for (int k = 0; k < W; ++k) o[k] += rstd * (g[k] * w[k] - xv[k] * kx);
        store_elems<W>(dxr + (int64_t)q * W, o);
    }
}

// d_out, x, dx: [T, C]; weight: [C]; rstd: [T] from the forward. One warp per row.
template <typename T>
__global__ void __launch_bounds__(kRowThreads)
rmsnorm_bwd_kernel(const T *d_out, const T *x, const float *__restrict__ weight,
                   const float *__restrict__ rstd, T *dx, int tokens, int C, int accumulate,
                   int vec) {
    const int lane = threadIdx.x & 31;
    const int warps = blockDim.x >> 5;
    const int64_t nwarps = (int64_t)gridDim.x * warps;
    for (int64_t row = (int64_t)blockIdx.x * warps + (threadIdx.x >> 5); row < tokens;
         row += nwarps) {
        const int64_t off = row * C;
        if (vec)
            rmsnorm_bwd_row<kPack<T>>(d_out + off, x + off, weight, dx + off, rstd[row], C,
                                      accumulate, lane);
        else
            rmsnorm_bwd_row<1>(d_out + off, x + off, weight, dx + off, rstd[row], C, accumulate,
                               lane);
    }
}

// d_out, x: [T, C]; rstd: [T]; d_weight: [C] (+=). Grid: ceil(C / 32) blocks of 32 x 16.
template <typename T>
__global__ void __launch_bounds__(kColX * kColY)
rmsnorm_bwd_params_kernel(const T *__restrict__ d_out, const T *__restrict__ x,
                          const float *__restrict__ rstd, float *d_weight, int tokens, int C) {
    __shared__ float sh[kColY][kColX];
    const int c = blockIdx.x * kColX + threadIdx.x;
    float s = 0.f;
    if (c < C) {
#pragma unroll 4
        for (int t = threadIdx.y; t < tokens; t += kColY) {
            const int64_t off = (int64_t)t * C + c;
            s += hr::to_f32(d_out[off]) * hr::to_f32(x[off]) * rstd[t]; // the CPU's order
        }
    }
    const float total = combine_row_lanes(s, sh);
    if (threadIdx.y == 0 && c < C) d_weight[c] += total;
}

// The CPU backend's f32 expressions (cpu.rs silu, silu_and_grad). expf, not __expf.
__device__ __forceinline__ float silu(float g) { return g / (1.0f + expf(-g)); }
__device__ __forceinline__ void silu_and_grad(float g, float &s, float &ds) {
    const float sg = 1.0f / (1.0f + expf(-g));
    s = g * sg;
    ds = sg * (1.0f + g * (1.0f - sg));
}

// gate, up, out: [n]. vec: every pointer 16-byte aligned. out may alias gate or up.
template <typename T>
__global__ void __launch_bounds__(kEwThreads)
swiglu_fwd_kernel(const T *gate, const T *up, T *out, int64_t n, int vec) {
    constexpr int V = kPack<T>;
    const int64_t stride = (int64_t)gridDim.x * blockDim.x;
    const int64_t tid = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    int64_t done = 0;
    if (vec) {
        const int64_t packs = n / V;
        for (int64_t i = tid; i < packs; i += stride) {
            float g[V], u[V];
            load_elems<V>(gate + i * V, g);
            load_elems<V>(up + i * V, u);
#pragma unroll
            for (int k = 0; k < V; ++k) g[k] = silu(g[k]) * u[k];
            store_elems<V>(out + i * V, g);
        }
        done = packs * V;
    }
    for (int64_t i = done + tid; i < n; i += stride)
        out[i] = hr::from_f32<T>(silu(hr::to_f32(gate[i])) * hr::to_f32(up[i]));
}

// gate, up, d_out, d_gate, d_up: [n]. Each element is read and written by one thread, so the
// gradients may alias their inputs.
template <typename T>
__global__ void __launch_bounds__(kEwThreads)
swiglu_bwd_kernel(const T *gate, const T *up, const T *d_out, T *d_gate, T *d_up, int64_t n,
                  int vec) {
    constexpr int V = kPack<T>;
    const int64_t stride = (int64_t)gridDim.x * blockDim.x;
    const int64_t tid = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    int64_t done = 0;
    if (vec) {
        const int64_t packs = n / V;
        for (int64_t i = tid; i < packs; i += stride) {
            float g[V], u[V], d[V];
            load_elems<V>(gate + i * V, g);
            load_elems<V>(up + i * V, u);
            load_elems<V>(d_out + i * V, d);
#pragma unroll
            for (int k = 0; k < V; ++k) {
                float s, ds;
                silu_and_grad(g[k], s, ds);
                g[k] = d[k] * u[k] * ds;
                u[k] = d[k] * s;
            }
            store_elems<V>(d_gate + i * V, g);
            store_elems<V>(d_up + i * V, u);
        }
        done = packs * V;
    }
    for (int64_t i = done + tid; i < n; i += stride) {
        float s, ds;
        silu_and_grad(hr::to_f32(gate[i]), s, ds);
        const float d = hr::to_f32(d_out[i]), u = hr::to_f32(up[i]);
        d_gate[i] = hr::from_f32<T>(d * u * ds);
        d_up[i] = hr::from_f32<T>(d * s);
    }
}

// Token t's id outside the vocabulary, as *bad records it: the token in the high word, the
// id's bits in the low, so the minimum over threads (and launches) names the first token.
__device__ __forceinline__ void report_bad_id(unsigned long long *bad, int64_t t, int id) {
    atomicMin(bad, ((unsigned long long)t << 32) | (unsigned long long)(uint32_t)id);
}

// The id of token t, clamped into [0, vocab); an id outside is recorded in *bad (integer
// atomics: the outcome does not depend on the order).
__device__ __forceinline__ int checked_id(const int32_t *__restrict__ ids, int64_t t,
                                          int vocab, unsigned long long *bad, bool report) {
    const int id = ids[t];
    if (id >= 0 && id < vocab) return id;
    if (report) report_bad_id(bad, t, id);
    return id < 0 ? 0 : vocab - 1;
}

template <int W, typename T>
__device__ __forceinline__ void embedding_fwd_units(const int32_t *__restrict__ ids,
                                                    const T *__restrict__ table,
                                                    const T *__restrict__ positions, T *out,
                                                    unsigned long long *bad, int tokens, int C,
                                                    int vocab,
                                                    int seq) {
    const int64_t per_row = C / W;
    const int64_t units = (int64_t)tokens * per_row;
    const int64_t stride = (int64_t)gridDim.x * blockDim.x;
    for (int64_t u = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; u < units; u += stride) {
        const int64_t t = u / per_row;
        const int64_t q = u - t * per_row;
        const int id = checked_id(ids, t, vocab, bad, q == 0);
        float v[W];
        load_elems<W>(table + (int64_t)id * C + q * W, v);
        if (positions != nullptr) {
            float p[W];
            load_elems<W>(positions + (t % seq) * C + q * W, p);
#pragma unroll
            for (int k = 0; k < W; ++k) v[k] += p[k];
        }
        store_elems<W>(out + t * C + q * W, v);
    }
}

// ids: [T]; table: [V, C]; positions: [seq, C] or NULL; out: [T, C].
template <typename T>
__global__ void __launch_bounds__(kEwThreads)
embedding_fwd_kernel(const int32_t *__restrict__ ids, const T *__restrict__ table,
                     const T *__restrict__ positions, T *out, unsigned long long *bad, int tokens,
                     int C,
                     int vocab, int seq, int vec) {
    if (vec)
        embedding_fwd_units<kPack<T>>(ids, table, positions, out, bad, tokens, C, vocab, seq);
    else
        embedding_fwd_units<1>(ids, table, positions, out, bad, tokens, C, vocab, seq);
}

// ids: [T]; d_out: [T, C]; d_table: fp32 [V, C] (+=). Grid: (ceil(C / kEwThreads), slices).
template <typename T>
__global__ void __launch_bounds__(kEwThreads)
embedding_bwd_table_kernel(const int32_t *__restrict__ ids, const T *__restrict__ d_out,
                           float *__restrict__ d_table, unsigned long long *bad, int tokens, int C,
                           int vocab) {
    const int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= C) return;
    const int slices = gridDim.y;
    const int lo = (int)((int64_t)vocab * blockIdx.y / slices);
    const int hi = (int)((int64_t)vocab * (blockIdx.y + 1) / slices);
    const bool report = blockIdx.y == 0 && c == 0;
    for (int t = 0; t < tokens; ++t) {
        const int id = ids[t];
        if (id < 0 || id >= vocab) {
            if (report) report_bad_id(bad, t, id); // skipped: never written out of bounds
            continue;
        }
        if (id < lo || id >= hi) continue;
        d_table[(int64_t)id * C + c] += hr::to_f32(d_out[(int64_t)t * C + c]);
    }
}

// d_out: [T, C]; d_positions: fp32 [seq, C] (+=). Grid-stride over seq * C elements.
template <typename T>
__global__ void __launch_bounds__(kEwThreads)
embedding_bwd_pos_kernel(const T *__restrict__ d_out, float *__restrict__ d_positions,
                         int tokens, int C, int seq) {
    const int64_t n = (int64_t)seq * C;
    const int64_t stride = (int64_t)gridDim.x * blockDim.x;
    for (int64_t e = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; e < n; e += stride) {
        const int64_t p = e / C, c = e - p * C;
        float acc = d_positions[e];
        for (int64_t t = p; t < tokens; t += seq) acc += hr::to_f32(d_out[t * C + c]);
        d_positions[e] = acc;
    }
}

bool rms_shape_ok(const hr_rmsnorm_params *p) {
    return p != nullptr && p->tokens >= 1 && p->channels >= 1;
}

template <typename T>
int launch_rmsnorm_fwd(const hr_rmsnorm_params *p, cudaStream_t stream) {
    if (!rms_shape_ok(p) || !p->x || !p->weight || !p->out || !p->rstd || !(p->eps >= 0.f))
        return cudaErrorInvalidValue;
    const int vec = p->channels % kPack<T> == 0 && aligned(p->x, 16) && aligned(p->out, 16) &&
                    aligned(p->weight, 16);
    rmsnorm_fwd_kernel<T><<<row_blocks(p->tokens), kRowThreads, 0, stream>>>(
        static_cast<const T *>(p->x), p->weight, static_cast<T *>(p->out), p->rstd, p->tokens,
        p->channels, p->eps, vec);
    HR_RETURN_LAUNCH_STATUS();
}

template <typename T>
int launch_rmsnorm_bwd(const hr_rmsnorm_params *p, cudaStream_t stream) {
    if (!rms_shape_ok(p) || !p->x || !p->weight || !p->rstd || !p->d_out || !p->dx)
        return cudaErrorInvalidValue;
    const int vec = p->channels % kPack<T> == 0 && aligned(p->x, 16) && aligned(p->d_out, 16) &&
                    aligned(p->dx, 16) && aligned(p->weight, 16);
    rmsnorm_bwd_kernel<T><<<row_blocks(p->tokens), kRowThreads, 0, stream>>>(
        static_cast<const T *>(p->d_out), static_cast<const T *>(p->x), p->weight, p->rstd,
        static_cast<T *>(p->dx), p->tokens, p->channels, p->accumulate != 0, vec);
    HR_RETURN_LAUNCH_STATUS();
}

template <typename T>
int launch_rmsnorm_bwd_params(const hr_rmsnorm_params *p, cudaStream_t stream) {
    if (!rms_shape_ok(p) || !p->x || !p->rstd || !p->d_out || !p->d_weight)
        return cudaErrorInvalidValue;
    const unsigned blocks = (unsigned)hr::ceil_div(p->channels, kColX);
    rmsnorm_bwd_params_kernel<T><<<blocks, dim3(kColX, kColY), 0, stream>>>(
        static_cast<const T *>(p->d_out), static_cast<const T *>(p->x), p->rstd, p->d_weight,
        p->tokens, p->channels);
    HR_RETURN_LAUNCH_STATUS();
}

template <typename T>
int launch_swiglu_fwd(const hr_swiglu_params *p, cudaStream_t stream) {
    if (p == nullptr || !p->gate || !p->up || !p->out || p->n < 1) return cudaErrorInvalidValue;
    const int vec = aligned(p->gate, 16) && aligned(p->up, 16) && aligned(p->out, 16);
    unsigned blocks = 0;
    const int64_t units = vec ? p->n / kPack<T> + 1 : p->n;
    if (const int e = grid_stride_blocks(units, kEwThreads, &blocks)) return e;
    swiglu_fwd_kernel<T><<<blocks, kEwThreads, 0, stream>>>(
        static_cast<const T *>(p->gate), static_cast<const T *>(p->up), static_cast<T *>(p->out),
        p->n, vec);
    HR_RETURN_LAUNCH_STATUS();
}

template <typename T>
int launch_swiglu_bwd(const hr_swiglu_params *p, cudaStream_t stream) {
    if (p == nullptr || !p->gate || !p->up || !p->d_out || !p->d_gate || !p->d_up || p->n < 1)
        return cudaErrorInvalidValue;
    const int vec = aligned(p->gate, 16) && aligned(p->up, 16) && aligned(p->d_out, 16) &&
                    aligned(p->d_gate, 16) && aligned(p->d_up, 16);
    unsigned blocks = 0;
    const int64_t units = vec ? p->n / kPack<T> + 1 : p->n;
    if (const int e = grid_stride_blocks(units, kEwThreads, &blocks)) return e;
    swiglu_bwd_kernel<T><<<blocks, kEwThreads, 0, stream>>>(
        static_cast<const T *>(p->gate), static_cast<const T *>(p->up),
        static_cast<const T *>(p->d_out), static_cast<T *>(p->d_gate), static_cast<T *>(p->d_up),
        p->n, vec);
    HR_RETURN_LAUNCH_STATUS();
}

bool embedding_shape_ok(const hr_embedding_params *p) {
    return p != nullptr && p->ids && p->bad_token && p->tokens >= 1 && p->channels >= 1 &&
           p->vocab >= 1;
}

template <typename T>
int launch_embedding_fwd(const hr_embedding_params *p, cudaStream_t stream) {
    if (!embedding_shape_ok(p) || !p->table || !p->out || (p->positions && p->seq < 1))
        return cudaErrorInvalidValue;
    const int vec = p->channels % kPack<T> == 0 && aligned(p->table, 16) &&
                    aligned(p->positions, 16) && aligned(p->out, 16);
    unsigned blocks = 0;
    const int64_t units = (int64_t)p->tokens * (vec ? p->channels / kPack<T> : p->channels);
    if (const int e = grid_stride_blocks(units, kEwThreads, &blocks)) return e;
    embedding_fwd_kernel<T><<<blocks, kEwThreads, 0, stream>>>(
        p->ids, static_cast<const T *>(p->table), static_cast<const T *>(p->positions),
        static_cast<T *>(p->out), reinterpret_cast<unsigned long long *>(p->bad_token), p->tokens,
        p->channels, p->vocab, p->seq, vec);
    HR_RETURN_LAUNCH_STATUS();
}

template <typename T>
int launch_embedding_bwd(const hr_embedding_params *p, cudaStream_t stream) {
    if (!embedding_shape_ok(p) || !p->d_out || !p->d_table || (p->d_positions && p->seq < 1))
        return cudaErrorInvalidValue;
    // Vocabulary slices: enough threads to fill the GPU (2048 per SM) when C alone is too few,
    // at most 64 (each slice re-reads every id) and at most one id per slice.
    int device = 0, sms = 0;
    HR_TRY(cudaGetDevice(&device));
    HR_TRY(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
    int64_t slices = hr::ceil_div((int64_t)(sms > 0 ? sms : 1) * 2048, (int64_t)p->channels);
    if (slices > 64) slices = 64;
    if (slices > p->vocab) slices = p->vocab;
    if (slices < 1) slices = 1;
    const dim3 grid((unsigned)hr::ceil_div(p->channels, kEwThreads), (unsigned)slices);
    embedding_bwd_table_kernel<T><<<grid, kEwThreads, 0, stream>>>(
        p->ids, static_cast<const T *>(p->d_out), p->d_table,
        reinterpret_cast<unsigned long long *>(p->bad_token), p->tokens,
        p->channels, p->vocab);
    HR_TRY(cudaGetLastError());
    if (p->d_positions != nullptr) {
        unsigned blocks = 0;
        if (const int e = grid_stride_blocks((int64_t)p->seq * p->channels, kEwThreads, &blocks))
            return e;
        embedding_bwd_pos_kernel<T><<<blocks, kEwThreads, 0, stream>>>(
            static_cast<const T *>(p->d_out), p->d_positions, p->tokens, p->channels, p->seq);
    }
    HR_RETURN_LAUNCH_STATUS();
}

} // namespace

extern "C" int hr_rmsnorm_forward_f32(const hr_rmsnorm_params *p, hr_stream_t stream) {
    return launch_rmsnorm_fwd<float>(p, stream);
}
extern "C" int hr_rmsnorm_forward_bf16(const hr_rmsnorm_params *p, hr_stream_t stream) {
    return launch_rmsnorm_fwd<bf16>(p, stream);
}
extern "C" int hr_rmsnorm_backward_f32(const hr_rmsnorm_params *p, hr_stream_t stream) {
    return launch_rmsnorm_bwd<float>(p, stream);
}
extern "C" int hr_rmsnorm_backward_bf16(const hr_rmsnorm_params *p, hr_stream_t stream) {
    return launch_rmsnorm_bwd<bf16>(p, stream);
}
extern "C" int hr_rmsnorm_backward_params_f32(const hr_rmsnorm_params *p, hr_stream_t stream) {
    return launch_rmsnorm_bwd_params<float>(p, stream);
}
extern "C" int hr_rmsnorm_backward_params_bf16(const hr_rmsnorm_params *p, hr_stream_t stream) {
    return launch_rmsnorm_bwd_params<bf16>(p, stream);
}
extern "C" int hr_swiglu_forward_f32(const hr_swiglu_params *p, hr_stream_t stream) {
    return launch_swiglu_fwd<float>(p, stream);
}
extern "C" int hr_swiglu_forward_bf16(const hr_swiglu_params *p, hr_stream_t stream) {
    return launch_swiglu_fwd<bf16>(p, stream);
}
extern "C" int hr_swiglu_backward_f32(const hr_swiglu_params *p, hr_stream_t stream) {
    return launch_swiglu_bwd<float>(p, stream);
}
extern "C" int hr_swiglu_backward_bf16(const hr_swiglu_params *p, hr_stream_t stream) {
    return launch_swiglu_bwd<bf16>(p, stream);
}
extern "C" int hr_embedding_forward_f32(const hr_embedding_params *p, hr_stream_t stream) {
    return launch_embedding_fwd<float>(p, stream);
}
extern "C" int hr_embedding_forward_bf16(const hr_embedding_params *p, hr_stream_t stream) {
    return launch_embedding_fwd<bf16>(p, stream);
}
extern "C" int hr_embedding_backward_f32(const hr_embedding_params *p, hr_stream_t stream) {
    return launch_embedding_bwd<float>(p, stream);
}
extern "C" int hr_embedding_backward_bf16(const hr_embedding_params *p, hr_stream_t stream) {
    return launch_embedding_bwd<bf16>(p, stream);
}
