// attention_hopper.cu - flash attention forward on Hopper (sm_90a) in the structure of
// FlashAttention-3 (Shah et al. 2024): TMA and wgmma instead of cp.async and mma.sync.
//
//   flash_fwd_wgmma_kernel<D>  one block per (128-row query tile, query head); 3 warpgroups:
//       warpgroup 0 produces (one thread issues every TMA load: the Q tile once, then K and V
//       tiles of 128 keys through a 2-stage mbarrier ring), warpgroups 1 and 2 each own 64 of
//       the query rows. Per K/V tile a consumer computes S = Q.K^T with a shared-memory wgmma
//       (m64n128k16, both operands k-major), the online softmax in registers (exp2 with the
//       scale folded in, as the mma.sync kernel), then O += P.V with P from registers as
//       wgmma's A operand (m64nDk16; V m|n-major, the transpose taken by the descriptor).
//       setmaxnreg moves registers from the producer (40) to the consumers (232), which hold
//       S (64 fp32), O (D/2 fp32) and P (32 bf16x2). The query tile index is grid.x, so a
//       head's tiles run together and share its K/V in L2; causal tiles run longest first.
//
// Not yet (the next steps of the FA3 structure): intra-warpgroup overlap of the next S with
// the current softmax, ping-pong between the two consumers, a persistent schedule.
//
// Shared memory (1024-aligned, 128-byte swizzle written by TMA): Q [D/64][128 rows][128 B],
// then per stage K and V, each [D/64][128 rows][128 B] (one box {64 columns, 128 rows} per
// 64-column block), then the barriers. Rows past N are zero-filled by TMA (the maps have
// one head per outer index) and their keys masked to -inf.
#include "hopper.cuh"

#include <math.h>

namespace {

constexpr int kQ = 128, kStages = 2, kThreads = 384; // query rows per block
constexpr float kLog2e = 1.4426950408889634f;

template <int D> struct FwdCfg {
    static constexpr int BLOCK_BYTES = 128 * 128;               // one 64-column block, 128 rows
    static constexpr int TILE_BYTES = (D / 64) * BLOCK_BYTES;   // a 128 x D bf16 tile
    static constexpr int KV_OFF = TILE_BYTES;                   // after Q; stage s: K, then V
    static constexpr int BAR_OFF = KV_OFF + kStages * 2 * TILE_BYTES;
    // full[s], empty[s], q
    static constexpr int SMEM_BYTES = 1024 + BAR_OFF + (2 * kStages + 1) * 8;
};

} // namespace

// The flag the host reads to learn whether the loaded image holds the real sm_90a kernel.
__device__ int hr_attn_wgmma_image_flag = HR_WGMMA_DEVICE;

#if HR_WGMMA_DEVICE
namespace {
constexpr int kKV = 128; // keys per K/V tile
constexpr float kLn2 = 0.6931471805599453f;

__device__ __forceinline__ uint32_t smem_addr(const void *p) {
    return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}
// 3-D TMA load with coordinates {column, row, head}.
__device__ __forceinline__ void tma_tile(uint32_t dst, const CUtensorMap *map, int col, int row,
                                         int head, uint32_t bar) {
    tma_load_3d(dst, map, col, row, head, bar);
}
__device__ __forceinline__ uint32_t pack_bf16(float lo, float hi) {
    const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<const uint32_t *>(&v);
}

template <int D> struct PvMma;
template <> struct PvMma<64> {
    static __device__ __forceinline__ void run(float (&o)[32], const uint32_t (&a)[4],
                                               uint64_t db) {
        wgmma_rs_m64n64k16(o, a, db, 1);
    }
};
template <> struct PvMma<128> {
    static __device__ __forceinline__ void run(float (&o)[64], const uint32_t (&a)[4],
                                               uint64_t db) {
        wgmma_rs_m64n128k16(o, a, db, 1);
    }
};
} // namespace
#endif // HR_WGMMA_DEVICE

template <int D>
__global__ void __launch_bounds__(kThreads, 1)
    flash_fwd_wgmma_kernel(const __grid_constant__ CUtensorMap tma_q,
                           const __grid_constant__ CUtensorMap tma_k,
                           const __grid_constant__ CUtensorMap tma_v, __nv_bfloat16 *o,
                           float *lse, int N, int causal, float scale_log2, int group) {
#if HR_WGMMA_DEVICE
    using C = FwdCfg<D>;
    extern __shared__ __align__(1024) unsigned char fa_smem[];
    const uint32_t base = (smem_addr(fa_smem) + 1023u) & ~1023u;
    const uint32_t sq = base; // the Q tile
    const uint32_t full0 = base + C::BAR_OFF;   // full[s]  = full0 + 8 s
    const uint32_t empty0 = full0 + 8 * kStages; // empty[s] = empty0 + 8 s
    const uint32_t qbar = empty0 + 8 * kStages;
    const int tid = threadIdx.x, wg = tid >> 7;

    const int n_qt = (N + kQ - 1) / kQ;
    // Causal: the tiles with the most keys first.
    const int q0 = (causal ? n_qt - 1 - (int)blockIdx.x : (int)blockIdx.x) * kQ;
    const int bh = blockIdx.y, bkv = bh / group;
    const int kv_end = causal ? min(N, q0 + kQ) : N;
    const int n_kv = (kv_end + kKV - 1) / kKV;

    if (tid == 0) {
        for (int s = 0; s < kStages; ++s) {
            mbar_init(full0 + 8 * s, 1);
            mbar_init(empty0 + 8 * s, 2); // one arrival per consumer warpgroup
        }
        mbar_init(qbar, 1);
        asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
    }
    __syncthreads();

    if (wg == 0) {
        setmaxnreg_dec<40>();
        if (tid == 0) {
            asm volatile("prefetch.tensormap [%0];\n" ::"l"(reinterpret_cast<uint64_t>(&tma_q))
                         : "memory");
            asm volatile("prefetch.tensormap [%0];\n" ::"l"(reinterpret_cast<uint64_t>(&tma_k))
                         : "memory");
            asm volatile("prefetch.tensormap [%0];\n" ::"l"(reinterpret_cast<uint64_t>(&tma_v))
                         : "memory");
            mbar_arrive_expect_tx(qbar, C::TILE_BYTES);
#pragma unroll
            for (int cb = 0; cb < D / 64; ++cb)
                tma_tile(sq + cb * C::BLOCK_BYTES, &tma_q, cb * 64, q0, bh, qbar);
            for (int j = 0; j < n_kv; ++j) {
                const int s = j % kStages;
                mbar_wait(empty0 + 8 * s, ((j / kStages) & 1) ^ 1);
                const uint32_t full = full0 + 8 * s;
                const uint32_t sk = base + C::KV_OFF + s * 2 * C::TILE_BYTES;
                const uint32_t sv = sk + C::TILE_BYTES;
                mbar_arrive_expect_tx(full, 2 * C::TILE_BYTES);
#pragma unroll
                for (int cb = 0; cb < D / 64; ++cb) {
                    tma_tile(sk + cb * C::BLOCK_BYTES, &tma_k, cb * 64, j * kKV, bkv, full);
                    tma_tile(sv + cb * C::BLOCK_BYTES, &tma_v, cb * 64, j * kKV, bkv, full);
                }
            }
        }
        return;
    }

    setmaxnreg_inc<232>();
    const int cw = wg - 1, warp4 = (tid >> 5) & 3, lane = tid & 31;
    const int g = lane >> 2, t = lane & 3;
    const int row_g = q0 + cw * 64 + warp4 * 16 + g; // this thread's rows: row_g, row_g + 8

    float oacc[D / 2];
#pragma unroll
    for (int i = 0; i < D / 2; ++i) oacc[i] = 0.f;
    float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.f, 0.f};

    mbar_wait(qbar, 0);
    __syncwarp();
    // Q: this warpgroup's 64 rows of every 64-column block; k16 step kk is 32 bytes along a row.
    const uint32_t qa = sq + cw * 64 * 128;

    for (int j = 0; j < n_kv; ++j) {
        const int s = j % kStages;
        const int n0 = j * kKV;
        mbar_wait(full0 + 8 * s, (j / kStages) & 1);
        __syncwarp();
        const uint32_t sk = base + C::KV_OFF + s * 2 * C::TILE_BYTES;
        const uint32_t sv = sk + C::TILE_BYTES;

        // S = Q K^T: 64 x 128 per warpgroup.
        float sacc[64];
        fence_acc(sacc);
        wgmma_fence();
#pragma unroll
        for (int kk = 0; kk < D / 16; ++kk) {
            const uint32_t off = (kk / 4) * C::BLOCK_BYTES + (kk % 4) * 32;
            wgmma_m64n128k16<0, 0>(sacc, wg_desc(qa + off, 16u, 1024u),
                                   wg_desc(sk + off, 16u, 1024u), kk > 0);
        }
        wgmma_commit();
        wgmma_wait<0>();
        fence_acc(sacc);

        // Online softmax on rows row_g (e = 0, 1) and row_g + 8 (e = 2, 3); the 4 lanes of a
        // quad share a row. sacc[4j + e] is key n0 + 8j + 2t + (e & 1).
        const bool need_mask = (n0 + kKV > N) || (causal && n0 + kKV - 1 > q0);
        float mx[2] = {-INFINITY, -INFINITY};
#pragma unroll
        for (int i = 0; i < 64; ++i) {
            float x = sacc[i] * scale_log2;
            if (need_mask) {
                const int key = n0 + (i >> 2) * 8 + 2 * t + (i & 1);
                const int row = row_g + ((i >> 1) & 1) * 8;
                if (key >= N || (causal && key > row)) x = -INFINITY;
            }
            sacc[i] = x;
            mx[(i >> 1) & 1] = fmaxf(mx[(i >> 1) & 1], x);
        }
        float alpha[2], mu[2];
        hr::online_softmax_step(mx, m, mu, alpha);
        float rs[2] = {0.f, 0.f};
#pragma unroll
        for (int i = 0; i < 64; ++i) {
            const float p = exp2f(sacc[i] - mu[(i >> 1) & 1]);
            sacc[i] = p;
            rs[(i >> 1) & 1] += p;
        }
#pragma unroll
        for (int h = 0; h < 2; ++h) l[h] = l[h] * alpha[h] + rs[h];
#pragma unroll
        for (int i = 0; i < D / 2; ++i) oacc[i] *= alpha[(i >> 1) & 1];

        // P as wgmma's register A operand: k16 step kk holds keys 16kk.. of rows row_g and
        // row_g + 8, the mma.m16n8k16 A layout, which is the accumulator layout of two n8
        // blocks.
        uint32_t pa[kKV / 16][4];
#pragma unroll
        for (int kk = 0; kk < kKV / 16; ++kk) {
            pa[kk][0] = pack_bf16(sacc[8 * kk + 0], sacc[8 * kk + 1]);
            pa[kk][1] = pack_bf16(sacc[8 * kk + 2], sacc[8 * kk + 3]);
            pa[kk][2] = pack_bf16(sacc[8 * kk + 4], sacc[8 * kk + 5]);
            pa[kk][3] = pack_bf16(sacc[8 * kk + 6], sacc[8 * kk + 7]);
        }

        // O += P V: V is [key][d] in 64-column blocks, m|n-major for this product: the k16
        // step kk starts 16 key rows (2048 bytes) in, and the next 64 columns of d are the
        // next block (LBO).
        fence_acc(oacc);
        wgmma_fence();
#pragma unroll
        for (int kk = 0; kk < kKV / 16; ++kk)
            PvMma<D>::run(oacc, pa[kk], wg_desc(sv + kk * 2048, C::BLOCK_BYTES, 1024u));
        wgmma_commit();
        wgmma_wait<0>();
        fence_acc(oacc);
        // Both products of this stage have retired: give K and V back to the producer.
        if ((tid & 127) == 0) mbar_arrive(empty0 + 8 * s);
    }

#pragma unroll
    for (int h = 0; h < 2; ++h) {
        l[h] += __shfl_xor_sync(0xffffffffu, l[h], 1);
        l[h] += __shfl_xor_sync(0xffffffffu, l[h], 2);
    }
    const float inv[2] = {1.f / l[0], 1.f / l[1]};
    // oacc[4j + e]: row row_g + 8 (e >> 1), column 8j + 2t + (e & 1).
    __nv_bfloat16 *orow = o + (int64_t)bh * N * D;
#pragma unroll
    for (int h = 0; h < 2; ++h) {
        const int row = row_g + 8 * h;
        if (row >= N) continue;
#pragma unroll
        for (int jb = 0; jb < D / 8; ++jb) {
            const __nv_bfloat162 v = __floats2bfloat162_rn(oacc[4 * jb + 2 * h] * inv[h],
                                                           oacc[4 * jb + 2 * h + 1] * inv[h]);
            *reinterpret_cast<__nv_bfloat162 *>(orow + (int64_t)row * D + 8 * jb + 2 * t) = v;
        }
        if (lse != nullptr && t == 0) lse[(int64_t)bh * N + row] = m[h] * kLn2 + logf(l[h]);
    }
#endif // HR_WGMMA_DEVICE
}

namespace {

// Does `device` run the real sm_90a attention kernel (see sm90a_image_runs)?
bool attn_wgmma_usable(int device) {
    static std::atomic<int> cache[64];
    return sm90a_image_runs(device, flash_fwd_wgmma_kernel<64>, hr_attn_wgmma_image_flag, cache);
}

// {d, N, heads} map of a [heads, N, d] bf16 tensor; boxes of {64 columns, 128 rows}.
bool encode_heads(PFN_cuTensorMapEncodeTiled_v12000 encode, CUtensorMap *map, const void *ptr,
                  int heads, int n, int d) {
    cuuint64_t dims[3] = {(cuuint64_t)d, (cuuint64_t)n, (cuuint64_t)heads};
    cuuint64_t strides[2] = {(cuuint64_t)d * 2, (cuuint64_t)n * d * 2};
    cuuint32_t box[3] = {64, 128, 1}, estr[3] = {1, 1, 1};
    return encode(map, CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, 3, const_cast<void *>(ptr), dims, strides,
                  box, estr, CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
                  CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
                  CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE) == CUDA_SUCCESS;
}

template <int D> int launch_fwd_wgmma(const hr_attention_params *p, cudaStream_t stream) {
    const PFN_cuTensorMapEncodeTiled_v12000 encode = tensor_map_encoder();
    if (encode == nullptr) return (int)cudaErrorNotSupported;
    const int bh = p->batch * p->heads, bkv = p->batch * p->kv_heads;
    alignas(64) CUtensorMap mq, mk, mv;
    if (!encode_heads(encode, &mq, p->q, bh, p->seq, D) ||
        !encode_heads(encode, &mk, p->k, bkv, p->seq, D) ||
        !encode_heads(encode, &mv, p->v, bkv, p->seq, D))
        return (int)cudaErrorNotSupported;
    HR_TRY(cudaFuncSetAttribute(flash_fwd_wgmma_kernel<D>,
                                cudaFuncAttributeMaxDynamicSharedMemorySize, FwdCfg<D>::SMEM_BYTES));
    const dim3 grid((unsigned)hr::ceil_div(p->seq, kQ), (unsigned)bh);
    flash_fwd_wgmma_kernel<D><<<grid, kThreads, FwdCfg<D>::SMEM_BYTES, stream>>>(
        mq, mk, mv, static_cast<__nv_bfloat16 *>(p->o), p->lse, p->seq, p->causal,
        p->scale * kLog2e, p->heads / p->kv_heads);
    HR_RETURN_LAUNCH_STATUS();
}

} // namespace

extern "C" int hr_flash_attention_wgmma_usable(void) {
    int device = 0;
    if (cudaGetDevice(&device) != cudaSuccess) {
        cudaGetLastError();
        return 0;
    }
    return attn_wgmma_usable(device) ? 1 : 0;
}

// Returns cudaErrorNotSupported (801) when the device or build cannot run it or the driver
// has no cuTensorMapEncodeTiled; cudaErrorInvalidValue for a shape it does not take.
extern "C" int hr_flash_attention_forward_bf16_wgmma(const hr_attention_params *p,
                                                     hr_stream_t stream) {
    if (p == nullptr || p->q == nullptr || p->k == nullptr || p->v == nullptr || p->o == nullptr)
        return (int)cudaErrorInvalidValue;
    if (p->batch < 1 || p->heads < 1 || p->seq < 1 || p->kv_heads < 1 ||
        p->heads % p->kv_heads != 0 || (p->head_dim != 64 && p->head_dim != 128) ||
        (int64_t)p->batch * p->heads > 65535 || hr::ceil_div(p->seq, kQ) > INT32_MAX)
        return (int)cudaErrorInvalidValue;
    int device = 0;
    HR_TRY(cudaGetDevice(&device));
    if (!attn_wgmma_usable(device)) return (int)cudaErrorNotSupported;
    const cudaStream_t s = (cudaStream_t)stream;
    return p->head_dim == 64 ? launch_fwd_wgmma<64>(p, s) : launch_fwd_wgmma<128>(p, s);
}
