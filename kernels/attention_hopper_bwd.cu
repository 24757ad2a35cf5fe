// attention_hopper_bwd.cu - flash attention backward on Hopper (sm_90a): the deterministic
// two-kernel backward of attention.cu (delta, then a dK/dV kernel, then a dQ kernel, each
// recomputing P, so that every output element is summed by one thread in a fixed order and
// no atomics are needed), with TMA loads through mbarrier rings and wgmma instead of
// cp.async and mma.sync. Both kernels have attention_hopper.cu's block: warpgroup 0 produces
// (one warp; the other three leave), warpgroups 1 and 2 each own 64 rows of the block's
// tile, and setmaxnreg moves registers from the producer (40) to the consumers (232).
//
//   flash_bwd_dkdv_wgmma_kernel<D>  one block per (128-key tile, kv head). The K and V tiles
//       come once; then, for each query head of the kv head's group in head order and each
//       64-row query tile that sees the keys, Q and dO through a 3-stage ring, beside the
//       tile's logsumexp (times log2 e) and delta, which the producer warp's lanes copy into
//       the stage (TMA cannot take an fp32 row of any length). A consumer computes
//       S^T = K.Q^T and dP^T = V.dO^T (shared-memory wgmma, m64n64k16, both operands
//       k-major), P^T and dS^T = P^T (dP^T - delta) in registers, then dV += P^T.dO and
//       dK += dS^T.Q with P^T and dS^T as wgmma's register A operand (m64nDk16; dO and Q
//       m|n-major, the transpose taken by the descriptor). dK and dV stay in registers
//       (2 x D/2 fp32) over all of the group's query tiles.
//   flash_bwd_dq_wgmma_kernel<D>    one block per (128-row query tile, query head). Q and dO
//       come once; K and V tiles of 64 keys through a 3-stage ring. A consumer computes
//       S = Q.K^T and dP = dO.V^T, dS = P (dP - delta), then dQ += dS.K (K m|n-major).
// The softmax scale is applied once, to dK and dQ as they are stored. Shared memory
// (1024-aligned, 128-byte swizzle written by TMA): each tile is [D/64][rows][128 B], one box
// {64 columns, rows} per 64-column block, as in attention_hopper.cu. Rows past N are
// zero-filled by TMA; their probabilities are masked to 0 where they would reach an output.
#include "hopper.cuh"

#include <algorithm>
#include <math.h>

namespace {

constexpr int kThreads = 384;
constexpr int kStages = 3;
constexpr int kKeys = 128;    // keys per dK/dV block (2 consumer warpgroups x 64)
constexpr int kQStep = 64;    // query rows per step of the dK/dV kernel
constexpr int kRows = 128;    // query rows per dQ block (2 consumer warpgroups x 64)
constexpr int kKeyStep = 64;  // keys per step of the dQ kernel
constexpr int kProducerRegs = 40, kConsumerRegs = 232;
static_assert(128 * kProducerRegs + 256 * kConsumerRegs <= 65536, "register split");
constexpr float kLog2e = 1.4426950408889634f;

// A tile of R rows x D columns: D/64 blocks of R rows x 128 bytes.
template <int D, int R> struct Tile {
    static constexpr int BLOCK = R * 128;
    static constexpr int BYTES = (D / 64) * BLOCK;
};

// dK/dV kernel: K, V (128 rows), then per stage Q and dO (64 rows), then per stage the
// statistics (64 lse, 64 delta), then the barriers: kv full, full[s], empty[s].
template <int D> struct DkdvCfg {
    using KV = Tile<D, kKeys>;
    using Q = Tile<D, kQStep>;
    static constexpr int STAGE_OFF = 2 * KV::BYTES; // stage s: Q, then dO
    static constexpr int STAT_OFF = STAGE_OFF + kStages * 2 * Q::BYTES;
    static constexpr int STAT_BYTES = 2 * kQStep * 4;
    static constexpr int BAR_OFF = STAT_OFF + kStages * STAT_BYTES;
    static constexpr int SMEM_BYTES = 1024 + BAR_OFF + (1 + 2 * kStages) * 8;
};
// dQ kernel: Q, dO (128 rows), then per stage K and V (64 rows), then the barriers: q full,
// full[s], empty[s].
template <int D> struct DqCfg {
    using Q = Tile<D, kRows>;
    using KV = Tile<D, kKeyStep>;
    static constexpr int STAGE_OFF = 2 * Q::BYTES; // stage s: K, then V
    static constexpr int BAR_OFF = STAGE_OFF + kStages * 2 * KV::BYTES;
    static constexpr int SMEM_BYTES = 1024 + BAR_OFF + (1 + 2 * kStages) * 8;
};
static_assert(DkdvCfg<128>::SMEM_BYTES <= 227 * 1024, "dK/dV ring too large");
static_assert(DqCfg<128>::SMEM_BYTES <= 227 * 1024, "dQ ring too large");

} // namespace

// The flag the host reads to learn whether the loaded image holds the real sm_90a kernels.
__device__ int hr_attn_bwd_wgmma_image_flag = HR_WGMMA_DEVICE;

#if HR_WGMMA_DEVICE
namespace {

// bar.sync on named barrier 1 + w (warp-uniform w), the 128 threads of consumer warpgroup w.
__device__ __forceinline__ void warpgroup_sync(int w) {
    if (w == 0) asm volatile("bar.sync 1, 128;\n" ::: "memory");
    else asm volatile("bar.sync 2, 128;\n" ::: "memory");
}

// A 64 x 64 fp32 accumulator as wgmma's register A operand (pack_a_frags<4>).
using Frag = uint32_t[4][4];

// acc[64 x 64] = A . B^T over D: A the 64 rows at `a` and B the 64 rows at `b` of k-major
// tiles whose 64-column blocks are A_BLOCK and B_BLOCK bytes apart. Issue only.
template <int D, int A_BLOCK, int B_BLOCK>
__device__ __forceinline__ void issue_abt(float (&acc)[32], uint32_t a, uint32_t b) {
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk)
        wgmma_m64n64k16<0, 0>(acc, wg_desc(a + (kk / 4) * A_BLOCK + (kk % 4) * 32, 16u, 1024u),
                              wg_desc(b + (kk / 4) * B_BLOCK + (kk % 4) * 32, 16u, 1024u),
                              kk > 0);
}
// acc[64 x D] += F . B: F 64 x 64 in registers, B the 64 x D tile at `b` (rows are F's
// columns; m|n-major for this product: k16 step kk starts 16 rows, 2048 bytes, in; the next
// 64 columns are the next block, B_BLOCK bytes on). Issue only.
template <int D, int B_BLOCK>
__device__ __forceinline__ void issue_fb(float (&acc)[D / 2], const Frag &f, uint32_t b) {
#pragma unroll
    for (int kk = 0; kk < 4; ++kk) {
        const uint64_t db = wg_desc(b + kk * 2048, B_BLOCK, 1024u);
        if constexpr (D == 64) wgmma_rs_m64n64k16(acc, f[kk], db, 1);
        else wgmma_rs_m64n128k16(acc, f[kk], db, 1);
    }
}

// Store rows [row0, row0 + 64) of a [N, D] bf16 head from the accumulator layout (acc[4j+e]:
// row row0 + 16 warp4 + g + 8 (e >> 1), column 8j + 2t + (e & 1)), times `mul`; rows >= N
// are not stored.
template <int D>
__device__ __forceinline__ void store_rows(const float (&acc)[D / 2], float mul,
                                           __nv_bfloat16 *head, int row_g, int N, int t) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
        const int row = row_g + 8 * h;
        if (row >= N) continue;
#pragma unroll
        for (int j = 0; j < D / 8; ++j)
            *reinterpret_cast<__nv_bfloat162 *>(head + (int64_t)row * D + 8 * j + 2 * t) =
                __floats2bfloat162_rn(acc[4 * j + 2 * h] * mul, acc[4 * j + 2 * h + 1] * mul);
    }
}

} // namespace
#endif // HR_WGMMA_DEVICE

// grid = (ceil(N / 128) key tiles, B * Hkv); causal: key tile 0, which the most query rows
// see, first.
template <int D>
__global__ void __launch_bounds__(kThreads, 1)
    flash_bwd_dkdv_wgmma_kernel(const __grid_constant__ CUtensorMap tma_q,
                                const __grid_constant__ CUtensorMap tma_k,
                                const __grid_constant__ CUtensorMap tma_v,
                                const __grid_constant__ CUtensorMap tma_do,
                                const float *__restrict__ lse, const float *__restrict__ delta,
                                __nv_bfloat16 *dk, __nv_bfloat16 *dv, int N, int causal,
                                float scale, float scale_log2, int group) {
#if HR_WGMMA_DEVICE
    using C = DkdvCfg<D>;
    extern __shared__ __align__(1024) unsigned char bwd_smem[];
    const uint32_t base = (hr::smem_u32(bwd_smem) + 1023u) & ~1023u;
    unsigned char *gbase = bwd_smem + (base - hr::smem_u32(bwd_smem)); // the same, generic
    const uint32_t sk = base, sv = base + C::KV::BYTES;
    const uint32_t kvbar = base + C::BAR_OFF;
    const uint32_t full0 = kvbar + 8;          // full[s]  = full0 + 8 s
    const uint32_t empty0 = full0 + 8 * kStages; // empty[s] = empty0 + 8 s
    const int tid = threadIdx.x, wg = tid >> 7;

    const int n0 = (int)blockIdx.x * kKeys;
    const int bkv = (int)blockIdx.y, bh0 = bkv * group; // its group's first query head
    const int n_qt = (N + kQStep - 1) / kQStep;
    const int it0 = causal ? n0 / kQStep : 0; // earlier query tiles see none of these keys
    const int per = n_qt - it0;               // query tiles of one head that see them
    const int steps = group * per;            // step x: head bh0 + x / per, tile it0 + x % per
    auto stat_lse = [&](int s) { return reinterpret_cast<float *>(gbase + C::STAT_OFF + s * C::STAT_BYTES); };

    if (tid == 0) {
        mbar_init(kvbar, 1);
        for (int s = 0; s < kStages; ++s) {
            mbar_init(full0 + 8 * s, 32);  // the producer warp's lanes (lane 0 with the bytes)
            mbar_init(empty0 + 8 * s, 2);  // one arrival per consumer warpgroup
        }
        asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
    }
    __syncthreads();

    if (wg == 0) {
        setmaxnreg_dec<kProducerRegs>();
        if (tid >= 32) return;
        const int lane = tid;
        if (lane == 0) {
            asm volatile("prefetch.tensormap [%0];\n" ::"l"(reinterpret_cast<uint64_t>(&tma_q))
                         : "memory");
            asm volatile("prefetch.tensormap [%0];\n" ::"l"(reinterpret_cast<uint64_t>(&tma_do))
                         : "memory");
            mbar_arrive_expect_tx(kvbar, 2 * C::KV::BYTES);
#pragma unroll
            for (int cb = 0; cb < D / 64; ++cb) {
                tma_load_3d(sk + cb * C::KV::BLOCK, &tma_k, cb * 64, n0, bkv, kvbar);
                tma_load_3d(sv + cb * C::KV::BLOCK, &tma_v, cb * 64, n0, bkv, kvbar);
            }
        }
        for (int x = 0; x < steps; ++x) {
            const int s = x % kStages;
            const int bh = bh0 + x / per, qs = (it0 + x % per) * kQStep;
            // Every lane waits: each writes the stage's statistics after the consumers' release.
            mbar_wait(empty0 + 8 * s, ((x / kStages) & 1) ^ 1);
            float *sl = stat_lse(s), *sd = sl + kQStep;
            for (int r = lane; r < kQStep; r += 32) {
                const int row = qs + r;
                const int64_t at = (int64_t)bh * N + row;
                sl[r] = row < N ? lse[at] * kLog2e : 0.f;
                sd[r] = row < N ? delta[at] : 0.f;
            }
            const uint32_t full = full0 + 8 * s;
            if (lane == 0) {
                const uint32_t sq = base + C::STAGE_OFF + s * 2 * C::Q::BYTES;
                const uint32_t sdo = sq + C::Q::BYTES;
                mbar_arrive_expect_tx(full, 2 * C::Q::BYTES);
#pragma unroll
                for (int cb = 0; cb < D / 64; ++cb) {
                    tma_load_3d(sq + cb * C::Q::BLOCK, &tma_q, cb * 64, qs, bh, full);
                    tma_load_3d(sdo + cb * C::Q::BLOCK, &tma_do, cb * 64, qs, bh, full);
                }
            } else {
                // Release: this lane's statistics are visible to whoever waits on the phase.
                mbar_arrive(full);
            }
        }
        return;
    }

    setmaxnreg_inc<kConsumerRegs>();
    const int cw = wg - 1, warp4 = (tid >> 5) & 3, lane = tid & 31;
    const int g = lane >> 2, t = lane & 3;
    // This warpgroup's 64 keys of K and V (k-major A operands).
    const uint32_t ka = sk + cw * 64 * 128, va = sv + cw * 64 * 128;
    const int key_g = n0 + cw * 64 + warp4 * 16 + g; // this thread's keys: key_g, key_g + 8

    float dka[D / 2], dva[D / 2];
#pragma unroll
    for (int i = 0; i < D / 2; ++i) dka[i] = dva[i] = 0.f;

    mbar_wait(kvbar, 0);
    __syncwarp();
    for (int x = 0; x < steps; ++x) {
        const int s = x % kStages;
        const int qs = (it0 + x % per) * kQStep;
        mbar_wait(full0 + 8 * s, (x / kStages) & 1);
        __syncwarp();
        const uint32_t sq = base + C::STAGE_OFF + s * 2 * C::Q::BYTES;
        const uint32_t sdo = sq + C::Q::BYTES;
        const float *sl = stat_lse(s), *sd = sl + kQStep;

        // S^T = K Q^T and dP^T = V dO^T: rows this warpgroup's keys, columns the step's rows.
        float st[32], dpt[32];
        fence_acc(st);
        fence_acc(dpt);
        wgmma_fence();
        issue_abt<D, C::KV::BLOCK, C::Q::BLOCK>(st, ka, sq);
        wgmma_commit();
        issue_abt<D, C::KV::BLOCK, C::Q::BLOCK>(dpt, va, sdo);
        wgmma_commit();
        wgmma_wait<1>();
        fence_acc(st);

        // P^T: st[4j + e] is key key_g + 8 (e >> 1) against query row qs + 8j + 2t + (e & 1).
        // Padded rows (>= N) and, when causal, keys after the row are 0.
        const bool need_mask = (qs + kQStep > N) || (causal && qs < n0 + kKeys - 1);
#pragma unroll
        for (int i = 0; i < 32; ++i) {
            const int c = (i >> 2) * 8 + 2 * t + (i & 1);
            float p = exp2f(st[i] * scale_log2 - sl[c]);
            if (need_mask) {
                const int row = qs + c, key = key_g + ((i >> 1) & 1) * 8;
                if (row >= N || (causal && key > row)) p = 0.f;
            }
            st[i] = p;
        }
        wgmma_wait<0>();
        fence_acc(dpt);
#pragma unroll
        for (int i = 0; i < 32; ++i) {
            const int c = (i >> 2) * 8 + 2 * t + (i & 1);
            dpt[i] = st[i] * (dpt[i] - sd[c]); // dS^T
        }
        Frag pf, dsf;
        pack_a_frags<4>(st, pf);
        pack_a_frags<4>(dpt, dsf);

        // dV += P^T dO, dK += dS^T Q.
        fence_acc(dva);
        fence_acc(dka);
        fence_frags<4>(pf);
        fence_frags<4>(dsf);
        wgmma_fence();
        issue_fb<D, C::Q::BLOCK>(dva, pf, sdo);
        issue_fb<D, C::Q::BLOCK>(dka, dsf, sq);
        wgmma_commit();
        wgmma_wait<0>();
        fence_acc(dva);
        fence_acc(dka);
        // Every thread of the warpgroup has read the stage's statistics and its products have
        // retired: one arrival hands the stage back.
        warpgroup_sync(cw);
        if ((tid & 127) == 0) mbar_arrive(empty0 + 8 * s);
    }

    const int64_t kv_off = (int64_t)bkv * N * D;
    store_rows<D>(dka, scale, dk + kv_off, key_g, N, t);
    store_rows<D>(dva, 1.f, dv + kv_off, key_g, N, t);
#endif // HR_WGMMA_DEVICE
}

// grid = (ceil(N / 128) query tiles, B * H); causal: the tiles with the most keys first.
template <int D>
__global__ void __launch_bounds__(kThreads, 1)
    flash_bwd_dq_wgmma_kernel(const __grid_constant__ CUtensorMap tma_q,
                              const __grid_constant__ CUtensorMap tma_k,
                              const __grid_constant__ CUtensorMap tma_v,
                              const __grid_constant__ CUtensorMap tma_do,
                              const float *__restrict__ lse, const float *__restrict__ delta,
                              __nv_bfloat16 *dq, int N, int causal, float scale, float scale_log2,
                              int group) {
#if HR_WGMMA_DEVICE
    using C = DqCfg<D>;
    extern __shared__ __align__(1024) unsigned char bwd_smem[];
    const uint32_t base = (hr::smem_u32(bwd_smem) + 1023u) & ~1023u;
    const uint32_t sq = base, sdo = base + C::Q::BYTES;
    const uint32_t qbar = base + C::BAR_OFF;
    const uint32_t full0 = qbar + 8;
    const uint32_t empty0 = full0 + 8 * kStages;
    const int tid = threadIdx.x, wg = tid >> 7;

    const int n_qt = (N + kRows - 1) / kRows;
    const int i = (int)blockIdx.x;
    const int q0 = (causal ? n_qt - 1 - i : i) * kRows;
    const int bh = (int)blockIdx.y, bkv = bh / group;
    const int kv_end = causal ? min(N, q0 + kRows) : N;
    const int n_kv = (kv_end + kKeyStep - 1) / kKeyStep;

    if (tid == 0) {
        mbar_init(qbar, 1);
        for (int s = 0; s < kStages; ++s) {
            mbar_init(full0 + 8 * s, 1);
            mbar_init(empty0 + 8 * s, 2); // one arrival per consumer warpgroup
        }
        asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
    }
    __syncthreads();

    if (wg == 0) {
        setmaxnreg_dec<kProducerRegs>();
        if (tid == 0) {
            asm volatile("prefetch.tensormap [%0];\n" ::"l"(reinterpret_cast<uint64_t>(&tma_k))
                         : "memory");
            asm volatile("prefetch.tensormap [%0];\n" ::"l"(reinterpret_cast<uint64_t>(&tma_v))
                         : "memory");
            mbar_arrive_expect_tx(qbar, 2 * C::Q::BYTES);
#pragma unroll
            for (int cb = 0; cb < D / 64; ++cb) {
                tma_load_3d(sq + cb * C::Q::BLOCK, &tma_q, cb * 64, q0, bh, qbar);
                tma_load_3d(sdo + cb * C::Q::BLOCK, &tma_do, cb * 64, q0, bh, qbar);
            }
            for (int j = 0; j < n_kv; ++j) {
                const int s = j % kStages;
                mbar_wait(empty0 + 8 * s, ((j / kStages) & 1) ^ 1);
                const uint32_t full = full0 + 8 * s;
                const uint32_t sk = base + C::STAGE_OFF + s * 2 * C::KV::BYTES;
                const uint32_t sv = sk + C::KV::BYTES;
                mbar_arrive_expect_tx(full, 2 * C::KV::BYTES);
#pragma unroll
                for (int cb = 0; cb < D / 64; ++cb) {
                    tma_load_3d(sk + cb * C::KV::BLOCK, &tma_k, cb * 64, j * kKeyStep, bkv, full);
                    tma_load_3d(sv + cb * C::KV::BLOCK, &tma_v, cb * 64, j * kKeyStep, bkv, full);
                }
            }
        }
        return;
    }

    setmaxnreg_inc<kConsumerRegs>();
    const int cw = wg - 1, warp4 = (tid >> 5) & 3, lane = tid & 31;
    const int g = lane >> 2, t = lane & 3;
    // This warpgroup's 64 rows of Q and dO (k-major A operands).
    const uint32_t qa = sq + cw * 64 * 128, doa = sdo + cw * 64 * 128;
    const int row_g = q0 + cw * 64 + warp4 * 16 + g; // this thread's rows: row_g, row_g + 8
    float lse2[2], dl[2];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
        const int row = row_g + 8 * h;
        lse2[h] = row < N ? lse[(int64_t)bh * N + row] * kLog2e : 0.f;
        dl[h] = row < N ? delta[(int64_t)bh * N + row] : 0.f;
    }

    float dqa[D / 2];
#pragma unroll
    for (int k = 0; k < D / 2; ++k) dqa[k] = 0.f;

    mbar_wait(qbar, 0);
    __syncwarp();
    for (int j = 0; j < n_kv; ++j) {
        const int s = j % kStages, n0 = j * kKeyStep;
        mbar_wait(full0 + 8 * s, (j / kStages) & 1);
        __syncwarp();
        const uint32_t sk = base + C::STAGE_OFF + s * 2 * C::KV::BYTES;
        const uint32_t sv = sk + C::KV::BYTES;

        // S = Q K^T and dP = dO V^T: rows this warpgroup's, columns the step's keys.
        float sa[32], dpa[32];
        fence_acc(sa);
        fence_acc(dpa);
        wgmma_fence();
        issue_abt<D, C::Q::BLOCK, C::KV::BLOCK>(sa, qa, sk);
        wgmma_commit();
        issue_abt<D, C::Q::BLOCK, C::KV::BLOCK>(dpa, doa, sv);
        wgmma_commit();
        wgmma_wait<1>();
        fence_acc(sa);

        // sa[4j + e] is row row_g + 8 (e >> 1) against key n0 + 8j + 2t + (e & 1). Keys past
        // N (zero-filled) and, when causal, keys after the row are 0.
        const bool need_mask = (n0 + kKeyStep > N) || (causal && n0 + kKeyStep - 1 > q0);
#pragma unroll
        for (int e = 0; e < 32; ++e) {
            const int h = (e >> 1) & 1;
            float p = exp2f(sa[e] * scale_log2 - lse2[h]);
            if (need_mask) {
                const int key = n0 + (e >> 2) * 8 + 2 * t + (e & 1);
                if (key >= N || (causal && key > row_g + 8 * h)) p = 0.f;
            }
            sa[e] = p;
        }
        wgmma_wait<0>();
        fence_acc(dpa);
#pragma unroll
        for (int e = 0; e < 32; ++e) dpa[e] = sa[e] * (dpa[e] - dl[(e >> 1) & 1]); // dS
        Frag dsf;
        pack_a_frags<4>(dpa, dsf);

        // dQ += dS K.
        fence_acc(dqa);
        fence_frags<4>(dsf);
        wgmma_fence();
        issue_fb<D, C::KV::BLOCK>(dqa, dsf, sk);
        wgmma_commit();
        wgmma_wait<0>();
        fence_acc(dqa);
        // Both products of this stage have retired (only wgmma reads it): hand it back.
        if ((tid & 127) == 0) mbar_arrive(empty0 + 8 * s);
    }
    store_rows<D>(dqa, scale, dq + (int64_t)bh * N * D, row_g, N, t);
#endif // HR_WGMMA_DEVICE
}

namespace {

bool bwd_wgmma_usable(int device) {
    static std::atomic<int> cache[64];
    return sm90a_image_runs(device, flash_bwd_dq_wgmma_kernel<64>, hr_attn_bwd_wgmma_image_flag,
                            cache);
}

template <int D> int launch_bwd_wgmma(const hr_attention_params *p, cudaStream_t stream) {
    const PFN_cuTensorMapEncodeTiled_v12000 encode = tensor_map_encoder();
    if (encode == nullptr) return (int)cudaErrorNotSupported;
    const int bh = p->batch * p->heads, bkv = p->batch * p->kv_heads;
    const int group = p->heads / p->kv_heads, n = p->seq;
    const float sl2 = p->scale * kLog2e;
    // dK/dV: query-side tiles of 64 rows, key-side of 128; dQ: the other way round.
    alignas(64) CUtensorMap q64, do64, k128, v128, q128, do128, k64, v64;
    if (!encode_rows(encode, &q64, p->q, bh, n, D, kQStep) ||
        !encode_rows(encode, &do64, p->d_o, bh, n, D, kQStep) ||
        !encode_rows(encode, &k128, p->k, bkv, n, D, kKeys) ||
        !encode_rows(encode, &v128, p->v, bkv, n, D, kKeys) ||
        !encode_rows(encode, &q128, p->q, bh, n, D, kRows) ||
        !encode_rows(encode, &do128, p->d_o, bh, n, D, kRows) ||
        !encode_rows(encode, &k64, p->k, bkv, n, D, kKeyStep) ||
        !encode_rows(encode, &v64, p->v, bkv, n, D, kKeyStep))
        return (int)cudaErrorNotSupported;

    // delta = rowsum(dO * O), the kernels' statistic beside lse.
    HR_TRY((cudaError_t)hr_attention_delta_bf16(p, (hr_stream_t)stream));

    constexpr int smem_kv = DkdvCfg<D>::SMEM_BYTES;
    HR_TRY(cudaFuncSetAttribute(flash_bwd_dkdv_wgmma_kernel<D>,
                                cudaFuncAttributeMaxDynamicSharedMemorySize, smem_kv));
    flash_bwd_dkdv_wgmma_kernel<D>
        <<<dim3((unsigned)hr::ceil_div(n, kKeys), (unsigned)bkv), kThreads, smem_kv, stream>>>(
            q64, k128, v128, do64, p->lse, p->delta, static_cast<__nv_bfloat16 *>(p->dk),
            static_cast<__nv_bfloat16 *>(p->dv), n, p->causal, p->scale, sl2, group);
    HR_TRY(cudaGetLastError());

    constexpr int smem_q = DqCfg<D>::SMEM_BYTES;
    HR_TRY(cudaFuncSetAttribute(flash_bwd_dq_wgmma_kernel<D>,
                                cudaFuncAttributeMaxDynamicSharedMemorySize, smem_q));
    flash_bwd_dq_wgmma_kernel<D>
        <<<dim3((unsigned)hr::ceil_div(n, kRows), (unsigned)bh), kThreads, smem_q, stream>>>(
            q128, k64, v64, do128, p->lse, p->delta, static_cast<__nv_bfloat16 *>(p->dq), n,
            p->causal, p->scale, sl2, group);
    HR_RETURN_LAUNCH_STATUS();
}

} // namespace

extern "C" int hr_flash_attention_backward_wgmma_usable(void) {
    int device = 0;
    if (cudaGetDevice(&device) != cudaSuccess) {
        cudaGetLastError();
        return 0;
    }
    return bwd_wgmma_usable(device) ? 1 : 0;
}

// The Hopper backward; the contract of hr_flash_attention_backward_bf16. Returns
// cudaErrorNotSupported (801) where the device or build cannot run it or the driver has no
// cuTensorMapEncodeTiled; cudaErrorInvalidValue for arguments it does not take.
extern "C" int hr_flash_attention_backward_bf16_wgmma(const hr_attention_params *p,
                                                      hr_stream_t stream) {
    if (p == nullptr || !p->q || !p->k || !p->v || !p->o || !p->lse || !p->d_o || !p->delta ||
        !p->dq || !p->dk || !p->dv)
        return (int)cudaErrorInvalidValue;
    // TMA's global addresses must be 16-byte aligned; the outputs are written in bf16 pairs.
    const void *const tensors[] = {p->q, p->k, p->v, p->o, p->d_o, p->dq, p->dk, p->dv};
    for (const void *ptr : tensors)
        if (!hr::aligned(ptr, 16)) return (int)cudaErrorInvalidValue;
    if (p->batch < 1 || p->heads < 1 || p->seq < 1 || p->kv_heads < 1 ||
        p->heads % p->kv_heads != 0 || (p->head_dim != 64 && p->head_dim != 128) ||
        (int64_t)p->batch * p->heads > 65535)
        return (int)cudaErrorInvalidValue;
    int device = 0;
    HR_TRY(cudaGetDevice(&device));
    if (!bwd_wgmma_usable(device)) return (int)cudaErrorNotSupported;
    const cudaStream_t s = (cudaStream_t)stream;
    return p->head_dim == 64 ? launch_bwd_wgmma<64>(p, s) : launch_bwd_wgmma<128>(p, s);
}
