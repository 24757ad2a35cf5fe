// common.cuh - device helpers shared by every kernel family.
//
// Kept small on purpose: element conversion, the tanh-GELU every family must agree on
// bit-for-bit with the CPU backend's formula, and the launch-check every launcher ends with.
#pragma once

#include <cuda_runtime.h>
#include <cuda_bf16.h>
#include <math.h>
#include <stdint.h>

#include "headroom.h"

namespace hr {

__host__ __device__ inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Whether `p` is a multiple of `bytes` (a power of two): what vector loads, cp.async and TMA
// ask of a tensor's address. NULL counts as aligned.
inline bool aligned(const void *p, uintptr_t bytes) {
    return (reinterpret_cast<uintptr_t>(p) & (bytes - 1)) == 0;
}

// Element access in fp32 whatever the storage type.
__device__ __forceinline__ float to_f32(float x) { return x; }
__device__ __forceinline__ float to_f32(__nv_bfloat16 x) { return __bfloat162float(x); }
template <typename T> __device__ __forceinline__ T from_f32(float x);
template <> __device__ __forceinline__ float from_f32<float>(float x) { return x; }
// Round to nearest even, as the CPU backend's half::bf16::from_f32 does.
template <> __device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float x) {
    return __float2bfloat16_rn(x);
}

// The shared-state-space address of a pointer into shared memory.
__device__ __forceinline__ uint32_t smem_u32(const void *p) {
    return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// Two fp32 -> packed bf16x2, each rounded to nearest even (as from_f32); lo in the low half
// (the lower column, the lower k of an MMA fragment).
__device__ __forceinline__ uint32_t pack_bf16x2(float lo, float hi) {
    const __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
    return (uint32_t)__bfloat16_as_ushort(h.x) | ((uint32_t)__bfloat16_as_ushort(h.y) << 16);
}

// GELU, tanh approximation (Hendrycks & Gimpel 2016, eq. in sec. 2), the GPT-2 form.
// The CPU backend evaluates the same expression in f32.
__device__ __forceinline__ float gelu_tanh(float x) {
    const float k0 = 0.7978845608028654f; // sqrt(2/pi)
    const float k1 = 0.044715f;
    return 0.5f * x * (1.0f + tanhf(k0 * (x + k1 * x * x * x)));
}

// One step of the online softmax (FlashAttention-2, Algorithm 1) for the two rows a thread
// of an m16 fragment holds (g and g + 8): mx holds this thread's maxima of the new scores
// (log2 domain) and is reduced over the quad of lanes that share a row; m is the running
// maximum, updated; mu the maximum to subtract (0 while a row has seen only -inf, so that
// exp2 gives 0, not NaN); alpha the factor for what was accumulated before.
__device__ __forceinline__ void online_softmax_step(float (&mx)[2], float (&m)[2], float (&mu)[2],
                                                    float (&alpha)[2]) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
        mx[h] = fmaxf(mx[h], __shfl_xor_sync(0xffffffffu, mx[h], 1));
        mx[h] = fmaxf(mx[h], __shfl_xor_sync(0xffffffffu, mx[h], 2));
        const float m_new = fmaxf(m[h], mx[h]);
        mu[h] = (m_new == -INFINITY) ? 0.f : m_new;
        alpha[h] = exp2f(m[h] - mu[h]);
        m[h] = m_new;
    }
}

} // namespace hr

// Every launcher ends with this: the launch's own error (bad configuration, too much
// shared memory, no kernel image for the device) is returned to Rust, never dropped.
#define HR_RETURN_LAUNCH_STATUS() return static_cast<int>(cudaGetLastError())
// For host calls inside a launcher (attribute setting etc.).
#define HR_TRY(call)                                                                   \
    do {                                                                               \
        cudaError_t hr_err_ = (call);                                                  \
        if (hr_err_ != cudaSuccess) return static_cast<int>(hr_err_);                  \
    } while (0)
