// attention_hopper.cu - flash attention forward on Hopper (sm_90a) in the structure of
// FlashAttention-3 (Shah et al. 2024): TMA and wgmma instead of cp.async and mma.sync.
//
//   flash_fwd_wgmma_kernel<D, false, false>  one block per (128-row query tile, query head); 3
//       warpgroups: warpgroup 0 produces (one thread issues every TMA load: the Q tile once,
//       then K and V tiles of 128 keys through a 2-stage mbarrier ring), warpgroups 1 and 2
//       each own 64 of the query rows. Per K/V tile a consumer computes S = Q.K^T with a
//       shared-memory wgmma (m64n128k16, both operands k-major), the online softmax in
//       registers (exp2 with the scale folded in, as the mma.sync kernel), then O += P.V with
//       P from registers as wgmma's A operand (m64nDk16; V m|n-major, the transpose taken by
//       the descriptor). setmaxnreg moves registers from the producer (40) to the consumers
//       (232), which hold S (64 fp32), O (D/2 fp32) and P (32 bf16x2). The query tile index is
//       grid.x, so a head's tiles run together and share its K/V in L2; causal tiles run
//       longest first.
//   flash_fwd_wgmma_kernel<D, true, false>   the same blocks, producer and outputs, with the
//       next two steps of FA3. Intra-warpgroup overlap (sec. 3.2, Algorithm 2): iteration j issues
//       S_{j+1} = Q.K_{j+1}^T and O += P_j.V_j back to back, waits for S_{j+1} alone
//       (wgmma.wait_group 1) and computes its softmax while P_j.V_j runs, then waits for that,
//       rescales O by alpha_{j+1} and hands stage j back; S_0 is computed alone before the
//       loop, the last P.V alone after it. The consumers hold a second S (64 fp32) while P_j
//       and O are in flight. Ping-pong (sec. 3.1): two named barriers pass a token so that the
//       consumers issue their GEMMs in turns, one warpgroup's running while the other computes
//       its softmax. A consumer holds stages j and j+1 at once, so the ring has 3 stages (it
//       fits for d = 128: 32 KB of Q + 3 x 64 KB of K and V).
//   flash_fwd_wgmma_kernel<D, true, true>   the ping-pong form on a persistent grid: at most
//       one block per SM, each walking the tiles t = blockIdx.x, + gridDim.x, ... of the
//       heads-major order t = head * n_qt + i (a head's query tiles next to each other, so
//       they share its K/V in L2; the longest first within a head when causal). The producer
//       loads the next tile's Q as soon as both consumers have released this one (a q-empty
//       barrier, after their last S), and its K/V tiles through the same ring, whose stage and
//       use count on across tiles; the consumers write a tile's O from registers while the
//       producer already loads for the next. setmaxnreg splits 24 / 240 (FA3's split): at 232
//       the consumers' schedule state beside S, O and P spilled at d = 128.
//
// Shared memory (1024-aligned, 128-byte swizzle written by TMA): Q [D/64][128 rows][128 B],
// then per stage K and V, each [D/64][128 rows][128 B] (one box {64 columns, 128 rows} per
// 64-column block), then the barriers. Rows past N are zero-filled by TMA (the maps have
// one head per outer index) and their keys masked to -inf.
#include "hopper.cuh"

#include <algorithm>
#include <math.h>

namespace {

constexpr int kQ = 128, kStages = 2, kThreads = 384; // query rows per block
constexpr int kKV = 128;                              // keys per K/V tile
// Stages of the ping-pong form's ring: a consumer holds stages j and j+1 in iteration j.
constexpr int kStagesPingPong = 3;
constexpr float kLog2e = 1.4426950408889634f;

template <int D, int STAGES> struct FwdCfg {
    static constexpr int BLOCK_BYTES = 128 * 128;               // one 64-column block, 128 rows
    static constexpr int TILE_BYTES = (D / 64) * BLOCK_BYTES;   // a 128 x D bf16 tile
    static constexpr int KV_OFF = TILE_BYTES;                   // after Q; stage s: K, then V
    static constexpr int BAR_OFF = KV_OFF + STAGES * 2 * TILE_BYTES;
    // full[s], empty[s], q full, q empty (the persistent form's)
    static constexpr int SMEM_BYTES = 1024 + BAR_OFF + (2 * STAGES + 2) * 8;
};
template <bool PINGPONG> constexpr int kStagesOf = PINGPONG ? kStagesPingPong : kStages;
template <int D, bool PINGPONG> using FwdCfgOf = FwdCfg<D, kStagesOf<PINGPONG>>;
// setmaxnreg's split of the 64K registers (128 x P + 256 x C <= 65536). The persistent form's
// consumers hold a tile's schedule beside the ping-pong form's S, O and P, and get FA3's
// 24 / 240 split; the other forms keep 40 / 232.
template <bool PERSISTENT> constexpr int kProducerRegs = PERSISTENT ? 24 : 40;
template <bool PERSISTENT> constexpr int kConsumerRegs = PERSISTENT ? 240 : 232;
static_assert(128 * kProducerRegs<true> + 256 * kConsumerRegs<true> <= 65536, "register split");
// Within the 227 KB a block may opt in to on sm_90.
static_assert(FwdCfgOf<128, true>::SMEM_BYTES <= 227 * 1024, "ping-pong ring too large");

} // namespace

// The flag the host reads to learn whether the loaded image holds the real sm_90a kernel.
__device__ int hr_attn_wgmma_image_flag = HR_WGMMA_DEVICE;

#if HR_WGMMA_DEVICE
namespace {
constexpr float kLn2 = 0.6931471805599453f;
// Named barriers of the ping-pong form (PTX ISA "bar, barrier"): kBarPingPong + cw
// is consumer warpgroup cw's turn to issue, 256 threads (both consumers) per phase; 0 stays
// __syncthreads'.
constexpr int kBarPingPong = 1, kPingPongThreads = 256;

// 3-D TMA load with coordinates {column, row, head}.
__device__ __forceinline__ void tma_tile(uint32_t dst, const CUtensorMap *map, int col, int row,
                                         int head, uint32_t bar) {
    tma_load_3d(dst, map, col, row, head, bar);
}
// bar.sync / bar.arrive on ping-pong barrier kBarPingPong + w (w warp-uniform). Immediate ids,
// so that ptxas reserves just these barriers; the warp must be converged (.aligned).
template <int ID> __device__ __forceinline__ void bar_sync_id() {
    asm volatile("bar.sync %0, %1;\n" ::"n"(ID), "n"(kPingPongThreads) : "memory");
}
template <int ID> __device__ __forceinline__ void bar_arrive_id() {
    asm volatile("bar.arrive %0, %1;\n" ::"n"(ID), "n"(kPingPongThreads) : "memory");
}
__device__ __forceinline__ void pingpong_sync(int w) {
    if (w == 0) bar_sync_id<kBarPingPong>();
    else bar_sync_id<kBarPingPong + 1>();
}
__device__ __forceinline__ void pingpong_arrive(int w) {
    if (w == 0) bar_arrive_id<kBarPingPong>();
    else bar_arrive_id<kBarPingPong + 1>();
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

// P (bf16x2) as wgmma's register A operand, one m64k16 fragment per 16 keys.
using PFrag = uint32_t[kKV / 16][4];

// S = Q K^T: 64 x 128 per warpgroup; qa is this warpgroup's 64 rows of Q, sk a K stage.
// Issue only: no fence, commit or wait.
template <int D, int BLOCK_BYTES>
__device__ __forceinline__ void issue_s(float (&sacc)[64], uint32_t qa, uint32_t sk) {
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
        const uint32_t off = (kk / 4) * BLOCK_BYTES + (kk % 4) * 32;
        wgmma_m64n128k16<0, 0>(sacc, wg_desc(qa + off, 16u, 1024u),
                               wg_desc(sk + off, 16u, 1024u), kk > 0);
    }
}

// O += P V: V is [key][d] in 64-column blocks, m|n-major for this product: the k16 step kk
// starts 16 key rows (2048 bytes) in, and the next 64 columns of d are the next block (LBO).
// Issue only.
template <int D, int BLOCK_BYTES>
__device__ __forceinline__ void issue_pv(float (&oacc)[D / 2], const PFrag &pa, uint32_t sv) {
#pragma unroll
    for (int kk = 0; kk < kKV / 16; ++kk)
        PvMma<D>::run(oacc, pa[kk], wg_desc(sv + kk * 2048, BLOCK_BYTES, 1024u));
}

// Online softmax of the 64 x 128 score tile of keys n0.. in place: sacc becomes P (fp32), m
// and l the running row maxima and sums; mu and alpha as hr::online_softmax_step (alpha is the
// factor for what O accumulated before). Rows row_g (e = 0, 1) and row_g + 8 (e = 2, 3); the
// 4 lanes of a quad share a row. sacc[4j + e] is key n0 + 8j + 2t + (e & 1).
__device__ __forceinline__ void softmax_tile(float (&sacc)[64], int n0, int N, int causal, int q0,
                                             int row_g, int t, float scale_log2, float (&m)[2],
                                             float (&l)[2], float (&alpha)[2], float (&mu)[2]) {
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
}

// P in bf16: k16 step kk holds keys 16kk.. of rows row_g and row_g + 8.
__device__ __forceinline__ void pack_p(const float (&sacc)[64], PFrag &pa) {
    pack_a_frags<kKV / 16>(sacc, pa);
}
__device__ __forceinline__ void fence_p(PFrag &pa) { fence_frags<kKV / 16>(pa); }
} // namespace
#endif // HR_WGMMA_DEVICE

template <int D, bool PINGPONG, bool PERSISTENT>
__global__ void __launch_bounds__(kThreads, 1)
    flash_fwd_wgmma_kernel(const __grid_constant__ CUtensorMap tma_q,
                           const __grid_constant__ CUtensorMap tma_k,
                           const __grid_constant__ CUtensorMap tma_v, __nv_bfloat16 *o,
                           float *lse, int N, int causal, float scale_log2, int group,
                           int heads_total) {
#if HR_WGMMA_DEVICE
    static_assert(PINGPONG || !PERSISTENT, "the persistent schedule is the ping-pong form's");
    constexpr int NS = kStagesOf<PINGPONG>;
    using C = FwdCfg<D, NS>;
    extern __shared__ __align__(1024) unsigned char fa_smem[];
    const uint32_t base = (hr::smem_u32(fa_smem) + 1023u) & ~1023u;
    const uint32_t sq = base; // the Q tile
    const uint32_t full0 = base + C::BAR_OFF; // full[s]  = full0 + 8 s
    const uint32_t empty0 = full0 + 8 * NS;   // empty[s] = empty0 + 8 s
    const uint32_t qbar = empty0 + 8 * NS;
    // Persistent form: Q's stage is free again (one arrival per consumer warpgroup once its
    // last S of the tile has retired).
    const uint32_t qempty = qbar + 8;
    const int tid = threadIdx.x, wg = tid >> 7;

    const int n_qt = (N + kQ - 1) / kQ;
    // The tiles this block computes, t = first, first + step, ... < end. The per-block forms
    // have one, from blockIdx (x the query tile, y the head). The persistent form walks the
    // heads-major order t = head * n_qt + i over a grid of at most one block per SM.
    // (The launcher keeps n_qt * heads_total within int.)
    const int first = PERSISTENT ? (int)blockIdx.x : 0;
    const int step = PERSISTENT ? (int)gridDim.x : 1;
    const int end = PERSISTENT ? n_qt * heads_total : 1;
    // Tile t's first query row and head. Causal: the tiles with the most keys first.
    auto tile_at = [&](int t, int &q0, int &bh) {
        int i;
        if constexpr (PERSISTENT) {
            bh = t / n_qt;
            i = t - bh * n_qt;
        } else {
            bh = (int)blockIdx.y;
            i = (int)blockIdx.x;
        }
        q0 = (causal ? n_qt - 1 - i : i) * kQ;
    };
    // K/V tiles of the tile whose first query row is q0.
    auto kv_tiles = [&](int q0) {
        const int kv_end = causal ? min(N, q0 + kQ) : N;
        return (kv_end + kKV - 1) / kKV;
    };

    if (tid == 0) {
        for (int s = 0; s < NS; ++s) {
            mbar_init(full0 + 8 * s, 1);
            mbar_init(empty0 + 8 * s, 2); // one arrival per consumer warpgroup
        }
        mbar_init(qbar, 1);
        if constexpr (PERSISTENT) mbar_init(qempty, 2);
        asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
    }
    __syncthreads();

    if (wg == 0) {
        setmaxnreg_dec<kProducerRegs<PERSISTENT>>();
        if (tid == 0) {
            asm volatile("prefetch.tensormap [%0];\n" ::"l"(reinterpret_cast<uint64_t>(&tma_q))
                         : "memory");
            asm volatile("prefetch.tensormap [%0];\n" ::"l"(reinterpret_cast<uint64_t>(&tma_k))
                         : "memory");
            asm volatile("prefetch.tensormap [%0];\n" ::"l"(reinterpret_cast<uint64_t>(&tma_v))
                         : "memory");
            // it counts K/V tiles over all of this block's tiles: stage it % NS, use it / NS.
            uint32_t it = 0;
            int n = 0; // tiles done
            for (int t = first; t < end; t += step, ++n) {
                int q0, bh;
                tile_at(t, q0, bh);
                const int bkv = bh / group, n_kv = kv_tiles(q0);
                if constexpr (PERSISTENT) mbar_wait(qempty, (n & 1) ^ 1);
                mbar_arrive_expect_tx(qbar, C::TILE_BYTES);
#pragma unroll
                for (int cb = 0; cb < D / 64; ++cb)
                    tma_tile(sq + cb * C::BLOCK_BYTES, &tma_q, cb * 64, q0, bh, qbar);
                for (int j = 0; j < n_kv; ++j, ++it) {
                    const uint32_t s = it % NS;
                    mbar_wait(empty0 + 8 * s, ((it / NS) & 1) ^ 1);
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
        }
        return;
    }

    setmaxnreg_inc<kConsumerRegs<PERSISTENT>>();
    const int cw = wg - 1, warp4 = (tid >> 5) & 3, lane = tid & 31;
    const int g = lane >> 2, t = lane & 3;
    // Q: this warpgroup's 64 rows of every 64-column block; k16 step kk is 32 bytes along a row.
    const uint32_t qa = sq + cw * 64 * 128;
    // The stage of the K/V tile this block uses it-th (the producer's order).
    auto stage_of = [](uint32_t it) { return it % NS; };
    auto use_of = [](uint32_t it) { return (it / NS) & 1; };

    uint32_t kv_base = 0; // K/V tiles of this block's earlier tiles
    int n = 0;
    for (int tile = first; tile < end; tile += step, ++n) {
        int q0, bh;
        tile_at(tile, q0, bh);
        // Both consumer warpgroups take the same n_kv: the ping-pong barriers below count
        // n_kv + 1 syncs and arrivals per warpgroup and tile (trimming one warpgroup's K/V
        // tiles, say on the causal diagonal, would leave a barrier a phase short: a hang).
        const int n_kv = kv_tiles(q0);
        const int row_g = q0 + cw * 64 + warp4 * 16 + g; // this thread's rows: row_g, row_g + 8

        float oacc[D / 2];
#pragma unroll
        for (int i = 0; i < D / 2; ++i) oacc[i] = 0.f;
        float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.f, 0.f};

        mbar_wait(qbar, n & 1);
        __syncwarp();
        // Persistent form: this warpgroup has read Q for the last time (its last S retired).
        auto release_q = [&]() {
            if constexpr (PERSISTENT) {
                if ((tid & 127) == 0) mbar_arrive(qempty);
                __syncwarp();
            }
        };

        if constexpr (!PINGPONG) {
            for (int j = 0; j < n_kv; ++j) {
                const int s = j % NS;
                const int n0 = j * kKV;
                mbar_wait(full0 + 8 * s, (j / NS) & 1);
                __syncwarp();
                const uint32_t sk = base + C::KV_OFF + s * 2 * C::TILE_BYTES;
                const uint32_t sv = sk + C::TILE_BYTES;

                float sacc[64];
                fence_acc(sacc);
                wgmma_fence();
                issue_s<D, C::BLOCK_BYTES>(sacc, qa, sk);
                wgmma_commit();
                wgmma_wait<0>();
                fence_acc(sacc);

                float alpha[2], mu[2];
                softmax_tile(sacc, n0, N, causal, q0, row_g, t, scale_log2, m, l, alpha, mu);
#pragma unroll
                for (int i = 0; i < D / 2; ++i) oacc[i] *= alpha[(i >> 1) & 1];

                PFrag pa;
                pack_p(sacc, pa);
                fence_acc(oacc);
                wgmma_fence();
                issue_pv<D, C::BLOCK_BYTES>(oacc, pa, sv);
                wgmma_commit();
                wgmma_wait<0>();
                fence_acc(oacc);
                // Both products of this stage have retired: give K and V back to the producer.
                if ((tid & 127) == 0) mbar_arrive(empty0 + 8 * s);
            }
        } else {
            // Ping-pong (FA3 sec. 3.1). A consumer's GEMM issues are its events e = 0..n_kv: e = 0
            // issues S_0, 0 < e < n_kv issues S_e and P_{e-1} V_{e-1}, e = n_kv the last P V.
            // Before event e a warpgroup syncs on its own barrier B_cw (id kBarPingPong + cw, 256
            // threads: its 128 plus 128 arrivals of the other), after issuing it arrives on the
            // other's. Warpgroup 2 arrives on B_1 once up front (warpgroup 1's head start) and
            // skips its arrival after its last event, so the issues run
            //   W1 e0 < W2 e0 < W1 e1 < W2 e1 < ... < W1 e(n_kv) < W2 e(n_kv)
            // and each barrier sees exactly n_kv + 1 syncs and n_kv + 1 arrivals:
            //   B_1: head start, W2 e0 .. e(n_kv - 1)   against W1's syncs at e0 .. e(n_kv);
            //   B_2: W1 e0 .. e(n_kv)                    against W2's syncs at e0 .. e(n_kv).
            // n_kv = 1: B_1 {head start, W2 e0} / {W1 e0, W1 e1}; B_2 {W1 e0, W1 e1} / {W2 e0, W2
            // e1}. n_kv = 2: three of each per barrier; n_kv = 3: four. Nothing is left armed at
            // the end of a tile, so the persistent form repeats the protocol tile by tile. No phase
            // over-runs: the other warpgroup's next arrival on B_w comes after its own sync, which
            // needs this warpgroup's arrival after the sync on B_w returned.
            // No deadlock with the mbarriers: a warpgroup waits for tile e before its sync for
            // event e; the producer's load of tile e needs both releases of tile e - NS, and a
            // warpgroup releases tile k after its event k + 1 with only its own wgmma to wait for,
            // before it waits for tile k + 2. Event e - NS + 1 <= e - 1 needs no tile past e - 1,
            // so the turn order never waits on a load that waits on the turn order. Persistent
            // form: the producer loads the next tile's Q once both warpgroups have released this
            // one (after their last S, before their last P V), and they wait for it only after
            // their last event of this tile; its K/V tiles come through the same ring, in order.
            if (cw == 1) pingpong_arrive(0);

            float sacc[64];
            float alpha[2], mu[2];
            PFrag pa;

            // Prologue: S_0 alone, its softmax (O is still 0: alpha_0 is not needed).
            mbar_wait(full0 + 8 * stage_of(kv_base), use_of(kv_base));
            __syncwarp();
            pingpong_sync(cw);
            fence_acc(sacc);
            wgmma_fence();
            issue_s<D, C::BLOCK_BYTES>(sacc, qa,
                                       base + C::KV_OFF + stage_of(kv_base) * 2 * C::TILE_BYTES);
            wgmma_commit();
            pingpong_arrive(cw ^ 1);
            wgmma_wait<0>();
            fence_acc(sacc);
            if (n_kv == 1) release_q();
            softmax_tile(sacc, 0, N, causal, q0, row_g, t, scale_log2, m, l, alpha, mu);
            pack_p(sacc, pa);

            // Iteration j (0 <= j < n_kv - 1) is issue_and_softmax(j), then retire(j).
            // issue_and_softmax(j): stage j holds K_j, V_j (S_j retired, P_j in pa); stage j + 1
            // is waited for before S_{j+1} is issued, then S_{j+1} and P_j V_j go out back to back
            // and S_{j+1}'s softmax runs while P_j V_j is in the tensor cores.
            auto issue_and_softmax = [&](int j) {
                const uint32_t s = stage_of(kv_base + j), s1 = stage_of(kv_base + j + 1);
                const uint32_t sv = base + C::KV_OFF + s * 2 * C::TILE_BYTES + C::TILE_BYTES;
                const uint32_t sk1 = base + C::KV_OFF + s1 * 2 * C::TILE_BYTES;
                mbar_wait(full0 + 8 * s1, use_of(kv_base + j + 1));
                __syncwarp();
                pingpong_sync(cw);
                // Pin O's rescale and P's packing before the fence: no register of either may be
                // written between the fence and the retirement of the P V below.
                fence_acc(sacc);
                fence_acc(oacc);
                fence_p(pa);
                wgmma_fence();
                issue_s<D, C::BLOCK_BYTES>(sacc, qa, sk1);
                wgmma_commit();
                issue_pv<D, C::BLOCK_BYTES>(oacc, pa, sv);
                wgmma_commit();
                pingpong_arrive(cw ^ 1);
                // At most one group pending (PTX ISA "wgmma.wait_group"): S_{j+1}, the older, has
                // retired. The softmax reads and writes sacc only; O and pa stay as they are until
                // P_j V_j retires.
                wgmma_wait<1>();
                fence_acc(sacc);
                softmax_tile(sacc, (j + 1) * kKV, N, causal, q0, row_g, t, scale_log2, m, l, alpha,
                             mu);
                fence_acc(sacc);
            };
            // retire(j): P_j V_j has retired; O (holding P_j V_j, in terms of m_j) to the new
            // maximum m_{j+1}; stage j back to the producer (S_j retired an iteration earlier);
            // P_{j+1} packed into pa, free now.
            auto retire = [&](int j) {
                wgmma_wait<0>();
                fence_acc(oacc);
                fence_acc(sacc);
#pragma unroll
                for (int i = 0; i < D / 2; ++i) oacc[i] *= alpha[(i >> 1) & 1];
                if ((tid & 127) == 0) mbar_arrive(empty0 + 8 * stage_of(kv_base + j));
                pack_p(sacc, pa);
            };
            // ptxas hoists a wgmma.wait_group to the top of its basic block, which would put the
            // wait for P_j V_j ahead of S_{j+1}'s softmax and undo the overlap; so the loop is
            // rotated: retire(j - 1) opens the body and the softmax ends it, a loop edge between.
            if (n_kv > 1) {
                issue_and_softmax(0);
                for (int j = 1; j + 1 < n_kv; ++j) {
                    retire(j - 1);
                    issue_and_softmax(j);
                }
                // S_{n_kv - 1}, the last product that reads Q, retired in the last call.
                release_q();
                retire(n_kv - 2);
            }

            // Epilogue: the last P V alone. Warpgroup 2's last event arrives nowhere (see above).
            {
                const uint32_t s = stage_of(kv_base + n_kv - 1);
                const uint32_t sv = base + C::KV_OFF + s * 2 * C::TILE_BYTES + C::TILE_BYTES;
                // Converged after the releasing thread's branch (bar and wgmma: .aligned).
                __syncwarp();
                pingpong_sync(cw);
                fence_acc(oacc);
                fence_p(pa);
                wgmma_fence();
                issue_pv<D, C::BLOCK_BYTES>(oacc, pa, sv);
                wgmma_commit();
                if (cw == 0) pingpong_arrive(1);
                wgmma_wait<0>();
                fence_acc(oacc);
                if ((tid & 127) == 0) mbar_arrive(empty0 + 8 * s);
            }
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
        kv_base += n_kv;
    }
#endif // HR_WGMMA_DEVICE
}

namespace {

// Does `device` run the real sm_90a attention kernels (see sm90a_image_runs)? Every form
// lives in this file's image.
bool attn_wgmma_usable(int device) {
    static std::atomic<int> cache[64];
    return sm90a_image_runs(device, flash_fwd_wgmma_kernel<64, false, false>,
                            hr_attn_wgmma_image_flag, cache);
}

template <int D, bool PINGPONG, bool PERSISTENT>
int launch_fwd_wgmma(const hr_attention_params *p, cudaStream_t stream) {
    const PFN_cuTensorMapEncodeTiled_v12000 encode = tensor_map_encoder();
    if (encode == nullptr) return (int)cudaErrorNotSupported;
    const int bh = p->batch * p->heads, bkv = p->batch * p->kv_heads;
    alignas(64) CUtensorMap mq, mk, mv;
    if (!encode_rows(encode, &mq, p->q, bh, p->seq, D, kQ) ||
        !encode_rows(encode, &mk, p->k, bkv, p->seq, D, kKV) ||
        !encode_rows(encode, &mv, p->v, bkv, p->seq, D, kKV))
        return (int)cudaErrorNotSupported;
    constexpr int smem = FwdCfgOf<D, PINGPONG>::SMEM_BYTES;
    HR_TRY(cudaFuncSetAttribute(flash_fwd_wgmma_kernel<D, PINGPONG, PERSISTENT>,
                                cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
    const int64_t n_qt = hr::ceil_div(p->seq, kQ);
    dim3 grid((unsigned)n_qt, (unsigned)bh);
    if constexpr (PERSISTENT) {
        // One block per SM (its registers, 384 x 168 of 64K, allow no second), never more
        // than tiles.
        int device = 0, sms = 0;
        HR_TRY(cudaGetDevice(&device));
        HR_TRY(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
        grid = dim3((unsigned)std::min<int64_t>(n_qt * bh, sms), 1);
    }
    flash_fwd_wgmma_kernel<D, PINGPONG, PERSISTENT><<<grid, kThreads, smem, stream>>>(
        mq, mk, mv, static_cast<__nv_bfloat16 *>(p->o), p->lse, p->seq, p->causal,
        p->scale * kLog2e, p->heads / p->kv_heads, bh);
    HR_RETURN_LAUNCH_STATUS();
}

// The two entry points' shared contract: validation, then the form's launch.
template <bool PINGPONG, bool PERSISTENT>
int forward_wgmma(const hr_attention_params *p, hr_stream_t stream) {
    if (p == nullptr || p->q == nullptr || p->k == nullptr || p->v == nullptr || p->o == nullptr)
        return (int)cudaErrorInvalidValue;
    // 16-byte aligned, as the other forwards ask: TMA's global addresses must be, and O is
    // written in bf16 pairs.
    if (!hr::aligned(p->q, 16) || !hr::aligned(p->k, 16) || !hr::aligned(p->v, 16) ||
        !hr::aligned(p->o, 16))
        return (int)cudaErrorInvalidValue;
    if (p->batch < 1 || p->heads < 1 || p->seq < 1 || p->kv_heads < 1 ||
        p->heads % p->kv_heads != 0 || (p->head_dim != 64 && p->head_dim != 128) ||
        hr::ceil_div(p->seq, kQ) > INT32_MAX)
        return (int)cudaErrorInvalidValue;
    // The per-tile forms put the heads on grid.y; the persistent form numbers every (query
    // tile, head) in an int.
    if (PERSISTENT ? hr::ceil_div(p->seq, kQ) * p->batch * p->heads > INT32_MAX
                   : (int64_t)p->batch * p->heads > 65535)
        return (int)cudaErrorInvalidValue;
    int device = 0;
    HR_TRY(cudaGetDevice(&device));
    if (!attn_wgmma_usable(device)) return (int)cudaErrorNotSupported;
    const cudaStream_t s = (cudaStream_t)stream;
    return p->head_dim == 64 ? launch_fwd_wgmma<64, PINGPONG, PERSISTENT>(p, s)
                             : launch_fwd_wgmma<128, PINGPONG, PERSISTENT>(p, s);
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
    return forward_wgmma<false, false>(p, stream);
}

// The intra-warpgroup overlapped, ping-pong form; the same contract and outputs.
extern "C" int hr_flash_attention_forward_bf16_wgmma_pingpong(const hr_attention_params *p,
                                                              hr_stream_t stream) {
    return forward_wgmma<true, false>(p, stream);
}

// The ping-pong form on a persistent grid (at most one block per SM) walking the query tiles
// heads-major, longest first when causal; the same contract and outputs.
extern "C" int hr_flash_attention_forward_bf16_wgmma_persistent(const hr_attention_params *p,
                                                                hr_stream_t stream) {
    return forward_wgmma<true, true>(p, stream);
}
