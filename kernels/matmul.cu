// matmul.cu - the GEMM family: C[batch] = epilogue(alpha * op(A) . op(B)) (+ C_old).
//
// Semantics are those of headroom.h (hr_matmul_params): op(A) is [m, k] (A stored [m, k] or,
// with trans_a, [k, m]); op(B) is [k, n] (B stored [k, n] or, with trans_b, [n, k]); C is
// row-major [m, n] in fp32 or bf16; a batch stride of 0 broadcasts A or B (never C when
// batch > 1: that would be a write race); the epilogue runs on the fp32 accumulator in the
// order alpha -> bias -> gelu_tanh -> residual -> C_old.
//
// Versions (one line each; details in each section):
//   matmul_f32_simt_kernel   : FP32 FFMA, 128x128x8 tile, 256 thr, 8x8 micro-tile, 3-stage cp.async ring.
//   matmul_bf16_mma_kernel   : BF16 mma.sync m16n8k16 + ldmatrix, 128x128x32 tile, 8 warps, 4-stage cp.async.
//   matmul_bf16_wgmma_kernel : BF16 wgmma m64n128k16 (sm_90a) fed by TMA + 5-stage mbarrier ring, persistent.
//   matmul_bf16_wgmma_cluster_kernel : its wide form on 2x1 clusters sharing B by TMA multicast.
//   (matmul_bf16_wgmma_kernel's wide form with TMA_STORE: C through shared memory and TMA stores.)
// Every version takes all four (trans_a, trans_b) forms and any m, n, k; the SIMT one writes
// fp32 C only; the wgmma launcher returns 801 when TMA cannot describe the operands.
//
// All three share one epilogue (epilogue_store), so the fused math is identical everywhere.
#include "common.cuh"
#include "raster.h"

#include "hopper.cuh"

#include <atomic>
#include <string.h>

// ------------------------------------------------------------------------------------
// Kernel arguments: hr_matmul_params resolved on the host (leading dimensions, alignment
// verdicts), passed by value so every kernel reads them from the constant bank.

struct MatmulArgs {
    const void *a;           // A: [batch][m, k] (trans_a = 0) or [batch][k, m] (trans_a = 1)
    const void *b;           // B: [batch][k, n] (trans_b = 0) or [batch][n, k] (trans_b = 1)
    void *c;                 // C: [batch][m, n], fp32 or bf16 (c_bf16)
    const float *bias;       // [n] fp32, or null
    const void *residual;    // [batch][m, n] in C's dtype (batch stride = stride_c), or null
    int64_t stride_a, stride_b, stride_c; // elements between batch entries (0 = broadcast)
    int m, n, k, batch;
    int lda, ldb;            // row pitch of the *stored* A and B, in elements
    int trans_a, trans_b;
    int epilogue;            // hr_epilogue
    int accumulate;          // 1: C += result
    float alpha;
    int a_vec, b_vec;        // every row of A / B starts 16-byte aligned: vector loads allowed
    int c_vec;               // C and residual allow the kernel's vector epilogue width
    int c_bf16;              // C (and residual) are bf16, else fp32
    int raster_group;        // wgmma: tile order in bands of this many tile rows (raster.h)
    int c_tma;               // wgmma-tma-store: C (and its tensor map) takes TMA stores
};

// ------------------------------------------------------------------------------------
// Shared epilogue. V consecutive columns of one row: x = alpha*acc (+bias) (gelu) (+res) (+C).
// The vector path is taken only when the host proved alignment (c_vec) and all V columns are
// inside the matrix; otherwise each column is guarded and handled alone.

template <int BYTES> struct RawOf;
template <> struct RawOf<4> { using type = uint32_t; };
template <> struct RawOf<8> { using type = uint2; };
template <> struct RawOf<16> { using type = uint4; };

template <typename T, int V>
__device__ __forceinline__ void load_vec(const T *ptr, float (&out)[V]) {
    using R = typename RawOf<V * (int)sizeof(T)>::type;
    const R raw = *reinterpret_cast<const R *>(ptr);
    T e[V];
    memcpy(e, &raw, sizeof(R)); // register shuffle only; avoids type-punning through pointers
#pragma unroll
    for (int i = 0; i < V; ++i) out[i] = hr::to_f32(e[i]);
}

template <typename T, int V>
__device__ __forceinline__ void store_vec(T *ptr, const float (&in)[V]) {
    using R = typename RawOf<V * (int)sizeof(T)>::type;
    T e[V];
#pragma unroll
    for (int i = 0; i < V; ++i) e[i] = hr::from_f32<T>(in[i]);
    R raw;
    memcpy(&raw, e, sizeof(R));
    *reinterpret_cast<R *>(ptr) = raw;
}

// alpha, bias, gelu: the part that does not touch C (one copy of the math whatever C's dtype).
template <int V>
__device__ __forceinline__ void epilogue_math(const MatmulArgs &p, int col, float (&x)[V]) {
#pragma unroll
    for (int i = 0; i < V; ++i) x[i] *= p.alpha;
    if (p.epilogue != HR_EPI_NONE) {
#pragma unroll
        for (int i = 0; i < V; ++i)
            if (col + i < p.n) x[i] += __ldg(p.bias + col + i);
    }
    if (p.epilogue == HR_EPI_BIAS_GELU) {
#pragma unroll
        for (int i = 0; i < V; ++i) x[i] = hr::gelu_tanh(x[i]); // cols past n are never stored
    }
}

// residual, C_old, store. One vector access when the host proved alignment (c_vec) and all V
// columns exist; otherwise each column is guarded and moved alone.
template <typename T, int V>
__device__ __forceinline__ void epilogue_finish(const MatmulArgs &p, int64_t idx, int col,
                                                float (&x)[V]) {
    T *c = static_cast<T *>(p.c) + idx;
    const T *res = p.residual ? static_cast<const T *>(p.residual) + idx : nullptr;
    if (p.c_vec && col + V <= p.n) {
        if (res) {
            float r[V];
            load_vec<T, V>(res, r);
#pragma unroll
            for (int i = 0; i < V; ++i) x[i] += r[i];
        }
        if (p.accumulate) {
            float o[V];
            load_vec<T, V>(c, o);
#pragma unroll
            for (int i = 0; i < V; ++i) x[i] += o[i];
        }
        store_vec<T, V>(c, x);
    } else {
#pragma unroll
        for (int i = 0; i < V; ++i) {
            if (col + i < p.n) {
                float y = x[i];
                if (res) y += hr::to_f32(res[i]);
                if (p.accumulate) y += hr::to_f32(c[i]);
                c[i] = hr::from_f32<T>(y);
            }
        }
    }
}

// V consecutive columns of one row: x = alpha*acc (+bias) (gelu) (+residual) (+C_old) -> C.
// BF16_OK = false compiles the fp32-only store (the SIMT kernel, whose launcher demands fp32).
template <int V, bool BF16_OK>
__device__ __forceinline__ void epilogue_store(const MatmulArgs &p, int64_t c_off, int row,
                                               int col, const float (&acc)[V]) {
    if (row >= p.m || col >= p.n) return;
    float x[V];
#pragma unroll
    for (int i = 0; i < V; ++i) x[i] = acc[i];
    epilogue_math<V>(p, col, x);
    const int64_t idx = c_off + (int64_t)row * p.n + col;
    if (BF16_OK && p.c_bf16)
        epilogue_finish<__nv_bfloat16, V>(p, idx, col, x);
    else
        epilogue_finish<float, V>(p, idx, col, x);
}

// Tile counts without int overflow for sizes near 2^31.
__host__ __device__ __forceinline__ int tiles_of(int size, int tile) {
    return (int)(((int64_t)size + tile - 1) / tile);
}

// ------------------------------------------------------------------------------------
// PTX wrappers shared by versions 1 and 2 (sm_80+): shared addresses and cp.async.

using hr::smem_u32;

// Async global->shared copies; bytes past src_bytes are zero-filled in smem, and with
// src_bytes = 0 nothing is read (we still pass an aligned in-bounds address).
__device__ __forceinline__ void cp_async_16(uint32_t dst, const void *src, int src_bytes) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src),
                 "r"(src_bytes)
                 : "memory");
}
__device__ __forceinline__ void cp_async_4(uint32_t dst, const void *src, int src_bytes) {
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(dst), "l"(src),
                 "r"(src_bytes)
                 : "memory");
}
__device__ __forceinline__ void cp_async_commit() {
    asm volatile("cp.async.commit_group;\n" ::: "memory");
}
template <int N> __device__ __forceinline__ void cp_async_wait() {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

// ------------------------------------------------------------------------------------
// Version 1: FP32 SIMT.
//
// Both operand tiles live in smem "k-major": S[kk][r] with r along m (A) or n (B), so the
// inner loop reads 4 consecutive rows/cols as one float4. Tiles arrive by cp.async into a
// 3-stage ring (no register staging, which kept the kernel above 128 registers). An operand
// stored contiguous along k (A with trans_a = 0, B with trans_b = 1) is transposed on the way
// in by 4-byte copies; one stored contiguous along m|n is copied by one 16-byte copy per
// thread when aligned (4-byte copies otherwise). A row pad of 4 floats keeps the transposing
// writes conflict-free (the two row groups of a warp land 16 banks apart) while keeping every
// row 16-byte aligned for the float4 reads.

namespace simt {
constexpr int BM = 128, BN = 128, BK = 8, STAGES = 3, THREADS = 256;
constexpr int LDS = BM + 4; // padded smem row (floats)
static_assert(BM == BN, "one cursor/issue routine serves both operands");
} // namespace simt

// One operand's per-thread view of its 128 x 8 tiles. Each thread moves 4 elements that are
// consecutive in memory (along k for a k-contiguous operand, along m|n otherwise), so one
// pointer, one per-k-tile step and two bounds serve both orientations.
//   k-contiguous (A trans_a = 0, B trans_b = 1): 2 threads per row, 4 consecutive k each,
//     written to 4 smem rows (one column).
//   m|n-contiguous (A trans_a = 1, B trans_b = 0): 32 threads per k-row, 4 consecutive m|n
//     each, written as 4 consecutive floats of one smem row.
struct SimtCursor {
    const float *base; // batch entry's first element: a safe address for empty copies
    const float *ptr;  // this thread's first element in k-tile 0
    int64_t step;      // elements between consecutive k-tiles
    uint32_t soff;     // byte offset of this thread's first element inside a smem tile
    int kk;            // this thread's k offset inside a tile
    int rlim;          // rows (m or n) left from this thread's first row
    bool kc;           // k-contiguous
    bool vec;          // ptr is 16-byte aligned for every k-tile
};

__device__ __forceinline__ SimtCursor simt_cursor(const float *src, int ld, int rows, int r0,
                                                  bool kc, bool vec) {
    const int t = threadIdx.x;
    SimtCursor c;
    const int r = kc ? (t >> 1) : (t & 31) * 4;
    c.kk = kc ? (t & 1) * 4 : (t >> 5);
    c.rlim = rows - (r0 + r);
    c.base = src;
    c.ptr = kc ? src + (int64_t)(r0 + r) * ld + c.kk : src + (int64_t)c.kk * ld + (r0 + r);
    c.step = kc ? (int64_t)simt::BK : (int64_t)simt::BK * ld;
    c.soff = (uint32_t)(c.kk * simt::LDS + r) * 4u;
    c.kc = kc;
    c.vec = vec;
    return c;
}

// Issue the copies of k-tile kt into the smem tile at s_tile; zeros outside the matrix.
__device__ __forceinline__ void simt_issue(uint32_t s_tile, const SimtCursor &c, int k, int kt) {
    const int kpos = kt * simt::BK + c.kk;
    // Elements of this thread's 4-vector inside the matrix, counted along the contiguous dim.
    const int valid = c.kc ? (c.rlim > 0 ? min(max(k - kpos, 0), 4) : 0)
                           : (kpos < k ? min(max(c.rlim, 0), 4) : 0);
    const float *ptr = c.ptr + kt * c.step;
    const uint32_t dst = s_tile + c.soff;
    if (!c.kc && c.vec) {
        cp_async_16(dst, valid > 0 ? ptr : c.base, valid * 4);
    } else {
        // k-contiguous: element e goes to smem row kk+e; m|n-contiguous: to column r+e.
        const uint32_t dstep = c.kc ? simt::LDS * 4u : 4u;
#pragma unroll
        for (int e = 0; e < 4; ++e)
            cp_async_4(dst + e * dstep, e < valid ? ptr + e : c.base, e < valid ? 4 : 0);
    }
}

__global__ void __launch_bounds__(simt::THREADS, 2) matmul_f32_simt_kernel(const MatmulArgs p) {
    using namespace simt;
    __shared__ __align__(16) float As[STAGES][BK][LDS]; // op(A) tiles, k-major: As[s][kk][m]
    __shared__ __align__(16) float Bs[STAGES][BK][LDS]; // op(B) tiles, k-major: Bs[s][kk][n]
    constexpr uint32_t TILE_BYTES = BK * LDS * 4;

    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    // A warp covers a 4 x 8 patch of the 16 x 16 thread grid: its A reads are 4 distinct
    // float4s (one 64-byte wavefront) and its B reads 8 distinct float4s (one 128-byte one).
    const int ty = (warp >> 1) * 4 + (lane >> 3); // rows ty*4 + {0..3} and 64 + ty*4 + {0..3}
    const int tx = (warp & 1) * 8 + (lane & 7);   // cols tx*4 + {0..3} and 64 + tx*4 + {0..3}
    const bool a_kc = p.trans_a == 0;             // A stored [m, k]: contiguous along k
    const bool b_kc = p.trans_b != 0;             // B stored [n, k]: contiguous along k
    const int n0 = blockIdx.x * BN;
    const int tiles_m = tiles_of(p.m, BM);
    const int k_tiles = tiles_of(p.k, BK);
    const uint32_t sa0 = smem_u32(&As[0][0][0]), sb0 = smem_u32(&Bs[0][0][0]);

    // gridDim.y / gridDim.z are capped at 65535 by the launcher: loop over what remains.
    for (int bz = blockIdx.z; bz < p.batch; bz += gridDim.z) {
        const float *A = static_cast<const float *>(p.a) + bz * p.stride_a;
        const float *B = static_cast<const float *>(p.b) + bz * p.stride_b;
        for (int tm = blockIdx.y; tm < tiles_m; tm += gridDim.y) {
            const int m0 = tm * BM;
            const SimtCursor ca = simt_cursor(A, p.lda, p.m, m0, a_kc, p.a_vec != 0);
            const SimtCursor cb = simt_cursor(B, p.ldb, p.n, n0, b_kc, p.b_vec != 0);
            float acc[8][8];
#pragma unroll
            for (int i = 0; i < 8; ++i)
#pragma unroll
                for (int j = 0; j < 8; ++j) acc[i][j] = 0.0f;

            // Prologue: STAGES-1 tiles in flight; one commit per step keeps the group count
            // in step with kt even past the last tile.
#pragma unroll
            for (int s = 0; s < STAGES - 1; ++s) {
                if (s < k_tiles) {
                    simt_issue(sa0 + s * TILE_BYTES, ca, p.k, s);
                    simt_issue(sb0 + s * TILE_BYTES, cb, p.k, s);
                }
                cp_async_commit();
            }

            for (int kt = 0; kt < k_tiles; ++kt) {
                cp_async_wait<STAGES - 2>();
                __syncthreads(); // tile kt visible to all; everyone is done with step kt-1
                {
                    const int nk = kt + STAGES - 1; // refill the slot step kt-1 just freed
                    if (nk < k_tiles) {
                        simt_issue(sa0 + (nk % STAGES) * TILE_BYTES, ca, p.k, nk);
                        simt_issue(sb0 + (nk % STAGES) * TILE_BYTES, cb, p.k, nk);
                    }
                    cp_async_commit();
                }
                const int cur = kt % STAGES;
#pragma unroll
                for (int kk = 0; kk < BK; ++kk) {
                    const float4 a0 = *reinterpret_cast<const float4 *>(&As[cur][kk][ty * 4]);
                    const float4 a1 = *reinterpret_cast<const float4 *>(&As[cur][kk][64 + ty * 4]);
                    const float4 b0 = *reinterpret_cast<const float4 *>(&Bs[cur][kk][tx * 4]);
                    const float4 b1 = *reinterpret_cast<const float4 *>(&Bs[cur][kk][64 + tx * 4]);
                    const float a[8] = {a0.x, a0.y, a0.z, a0.w, a1.x, a1.y, a1.z, a1.w};
                    const float b[8] = {b0.x, b0.y, b0.z, b0.w, b1.x, b1.y, b1.z, b1.w};
#pragma unroll
                    for (int i = 0; i < 8; ++i)
#pragma unroll
                        for (int j = 0; j < 8; ++j) acc[i][j] = fmaf(a[i], b[j], acc[i][j]);
                }
            }
            cp_async_wait<0>(); // only empty groups can be left; drain them anyway
            __syncthreads();    // next tile's prologue overwrites stages still being read

            const int64_t c_off = bz * p.stride_c;
            // Opaque copy of the column: otherwise the compiler hoists the tile-invariant
            // bias/column addresses out of the tile loops and spills them across the mainloop.
            int col0 = n0 + tx * 4;
            asm volatile("" : "+r"(col0));
#pragma unroll
            for (int i = 0; i < 8; ++i) {
                const int row = m0 + (i < 4 ? ty * 4 + i : 64 + ty * 4 + (i - 4));
#pragma unroll
                for (int h = 0; h < 2; ++h) {
                    const float v[4] = {acc[i][h * 4 + 0], acc[i][h * 4 + 1], acc[i][h * 4 + 2],
                                        acc[i][h * 4 + 3]};
                    epilogue_store<4, false>(p, c_off, row, col0 + h * 64, v);
                }
            }
        }
    }
}

// ------------------------------------------------------------------------------------
// PTX wrappers for the tensor-core path (sm_80+): ldmatrix and mma.sync.

template <bool TRANS>
__device__ __forceinline__ void ldsm_x4(uint32_t addr, uint32_t (&r)[4]) {
    if (TRANS) {
        asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                     : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                     : "r"(addr)
                     : "memory");
    } else {
        asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                     : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                     : "r"(addr)
                     : "memory");
    }
}

// d += a . b for one 16x8x16 tile; a row-major 16x16, b "col" (k-contiguous per column).
__device__ __forceinline__ void mma_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                          uint32_t b1) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
                 "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// ------------------------------------------------------------------------------------
// Version 2: BF16 mma.sync with a cp.async ring.
//
// Warp w computes the 64x32 sub-tile at rows 64*(w/4), cols 32*(w%4): per k16 step 4 A
// fragments and 4 B fragments (6 ldmatrix.x4) feed 16 mma.sync. The grid is (n tiles,
// m tiles, batch) with y and z capped at 65535 and looped over inside the kernel.
//
// Each operand tile keeps its global orientation in smem, so every 16-byte chunk is copied
// verbatim (cp.async) and ldmatrix picks .trans when the tile is m/n-contiguous:
//   "KC" tile (k-contiguous: A with trans_a = 0, B with trans_b = 1): 128 rows x 32 k, 64-byte
//        rows of 4 chunks; chunk c of row r is stored at chunk c ^ ((r >> 1) & 3). Any 8
//        consecutive rows at one logical chunk then hit 8 distinct 16-byte bank groups.
//   "MN" tile (m/n-contiguous: A with trans_a = 1, B with trans_b = 0): 32 k-rows x 128,
//        256-byte rows of 16 chunks; chunk c of row r is stored at chunk c ^ (r & 7).
// ldmatrix reads 8 rows x 16 bytes per 8x8 matrix, so both layouts read conflict-free, and
// the cp.async writes (whole rows per group of threads) stay conflict-free too.

namespace tc {
constexpr int BM = 128, BN = 128, BK = 32, STAGES = 4, THREADS = 256;
constexpr int A_BYTES = BM * BK * 2;           // 8 KB
constexpr int B_BYTES = BN * BK * 2;           // 8 KB
constexpr int STAGE_BYTES = A_BYTES + B_BYTES; // 16 KB
constexpr int SMEM_BYTES = STAGES * STAGE_BYTES; // 64 KB: needs the opt-in above 48 KB
static_assert(BM == BN, "one loader serves both operands");
} // namespace tc

// Byte offset of logical 16-byte chunk c of row r inside a KC / MN tile.
__device__ __forceinline__ uint32_t kc_off(int r, int c) {
    return (uint32_t)(r * 64 + ((c ^ ((r >> 1) & 3)) << 4));
}
__device__ __forceinline__ uint32_t mn_off(int r, int c) {
    return (uint32_t)(r * 256 + ((c ^ (r & 7)) << 4));
}

// One operand's 128 x 32 tile (rows r0.. of m or n, k k0..) into the smem tile at s_tile.
// 512 chunks of 8 bf16, 2 per thread. vec: rows are 16-byte aligned -> cp.async with
// zero-fill of whatever lies past the matrix; otherwise guarded scalar loads (synchronous,
// into the same swizzled layout; the ring's barriers order them like the cp.async data).
template <bool KC>
__device__ __forceinline__ void tc_load_operand(uint32_t s_tile, const uint16_t *src, int ld,
                                                int rows, int k, int r0, int k0, bool vec) {
#pragma unroll
    for (int i = 0; i < 2; ++i) {
        const int id = threadIdx.x + i * tc::THREADS;
        uint32_t soff;
        const uint16_t *g;
        int valid; // elements of this chunk inside the matrix (0..8), contiguous from g
        if (KC) {
            const int r = id >> 2, c = id & 3;
            soff = kc_off(r, c);
            const int gr = r0 + r, gk = k0 + c * 8;
            g = src + (int64_t)gr * ld + gk;
            valid = gr < rows ? min(max(k - gk, 0), 8) : 0;
        } else {
            const int r = id >> 4, c = id & 15;
            soff = mn_off(r, c);
            const int gk = k0 + r, gr = r0 + c * 8;
            g = src + (int64_t)gk * ld + gr;
            valid = gk < k ? min(max(rows - gr, 0), 8) : 0;
        }
        if (vec) {
            // src-size 0 reads nothing; still hand it an aligned in-bounds address.
            cp_async_16(s_tile + soff, valid > 0 ? (const void *)g : (const void *)src,
                        valid * 2);
        } else {
            uint32_t w[4];
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const uint32_t lo = (2 * e < valid) ? (uint32_t)__ldg(g + 2 * e) : 0u;
                const uint32_t hi = (2 * e + 1 < valid) ? (uint32_t)__ldg(g + 2 * e + 1) : 0u;
                w[e] = lo | (hi << 16);
            }
            asm volatile("st.shared.v4.b32 [%0], {%1, %2, %3, %4};\n" ::"r"(s_tile + soff),
                         "r"(w[0]), "r"(w[1]), "r"(w[2]), "r"(w[3])
                         : "memory");
        }
    }
}

// A_KC: A stored [m, k] (trans_a = 0). B_KC: B stored [n, k] (trans_b = 1).
template <bool A_KC, bool B_KC>
__global__ void __launch_bounds__(tc::THREADS, 2) matmul_bf16_mma_kernel(const MatmulArgs p) {
    using namespace tc;
    extern __shared__ __align__(128) unsigned char tc_smem[]; // STAGES x {A tile, B tile}
    const uint32_t smem = smem_u32(tc_smem);

    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const int wm = warp >> 2; // warp's 64-row half of the block tile
    const int wn = warp & 3;  // warp's 32-column quarter
    const int n0 = blockIdx.x * BN;
    const int tiles_m = tiles_of(p.m, BM);
    const int k_tiles = tiles_of(p.k, BK);
    const bool a_vec = p.a_vec != 0, b_vec = p.b_vec != 0;

    // ldmatrix.x4 row addresses: lane l feeds row (l & 7) of 8x8 matrix (l >> 3).
    // A fragment (16x16 at rows mt*16, k ks*16): matrices = {rows 0-7, 8-15} x {k 0-7, 8-15},
    // in the order a0 (r0-7,k0-7), a1 (r8-15,k0-7), a2 (r0-7,k8-15), a3 (r8-15,k8-15).
    // B fragments for two n8 tiles (cols pp*16 + {0-7, 8-15}): order b0(nt), b1(nt),
    // b0(nt+1), b1(nt+1) where b0 covers k 0-7 and b1 k 8-15.
    auto a_frag_off = [&](int ks, int mt) -> uint32_t {
        if (A_KC) { // smem [m][k]: non-trans ldmatrix; lanes 0-15 rows, lanes 16-31 k+8
            const int r = wm * 64 + mt * 16 + (lane & 15);
            return kc_off(r, ks * 2 + (lane >> 4));
        } else {    // smem [k][m]: .trans; lanes 8-15 / 24-31 take m+8, lanes 16-31 k+8
            const int r = ks * 16 + ((lane >> 4) << 3) + (lane & 7);
            return mn_off(r, wm * 8 + mt * 2 + ((lane >> 3) & 1));
        }
    };
    auto b_frag_off = [&](int ks, int pp) -> uint32_t {
        if (B_KC) { // smem [n][k]: non-trans; lanes 8-15 / 24-31 take k+8, lanes 16-31 n+8
            const int r = wn * 32 + pp * 16 + ((lane >> 4) << 3) + (lane & 7);
            return kc_off(r, ks * 2 + ((lane >> 3) & 1));
        } else {    // smem [k][n]: .trans; lanes 8-15 / 24-31 take k+8, lanes 16-31 n+8
            const int r = ks * 16 + (((lane >> 3) & 1) << 3) + (lane & 7);
            return mn_off(r, wn * 4 + pp * 2 + (lane >> 4));
        }
    };

    for (int bz = blockIdx.z; bz < p.batch; bz += gridDim.z) {
        const uint16_t *A = static_cast<const uint16_t *>(p.a) + bz * p.stride_a;
        const uint16_t *B = static_cast<const uint16_t *>(p.b) + bz * p.stride_b;
        for (int tm = blockIdx.y; tm < tiles_m; tm += gridDim.y) {
            const int m0 = tm * BM;
            auto load_stage = [&](int stage, int kt) {
                const uint32_t sa = smem + stage * STAGE_BYTES;
                tc_load_operand<A_KC>(sa, A, p.lda, p.m, p.k, m0, kt * BK, a_vec);
                tc_load_operand<B_KC>(sa + A_BYTES, B, p.ldb, p.n, p.k, n0, kt * BK, b_vec);
            };

            float acc[4][4][4];
#pragma unroll
            for (int i = 0; i < 4; ++i)
#pragma unroll
                for (int j = 0; j < 4; ++j)
#pragma unroll
                    for (int e = 0; e < 4; ++e) acc[i][j][e] = 0.0f;

            // Prologue: STAGES-1 tiles in flight. Every step commits exactly one group (empty
            // past the end) so "wait_group STAGES-2" always means "tile kt has landed".
#pragma unroll
            for (int s = 0; s < STAGES - 1; ++s) {
                if (s < k_tiles) load_stage(s, s);
                cp_async_commit();
            }

            for (int kt = 0; kt < k_tiles; ++kt) {
                cp_async_wait<STAGES - 2>();
                __syncthreads(); // tile kt visible to all; everyone is done with step kt-1
                {
                    const int nk = kt + STAGES - 1; // refill the slot step kt-1 just freed
                    if (nk < k_tiles) load_stage(nk % STAGES, nk);
                    cp_async_commit();
                }
                const uint32_t sa = smem + (kt % STAGES) * STAGE_BYTES;
                const uint32_t sb = sa + A_BYTES;
#pragma unroll
                for (int ks = 0; ks < BK / 16; ++ks) {
                    uint32_t af[4][4], bf[4][2];
#pragma unroll
                    for (int mt = 0; mt < 4; ++mt) ldsm_x4<!A_KC>(sa + a_frag_off(ks, mt), af[mt]);
#pragma unroll
                    for (int pp = 0; pp < 2; ++pp) {
                        uint32_t r[4];
                        ldsm_x4<!B_KC>(sb + b_frag_off(ks, pp), r);
                        bf[2 * pp][0] = r[0];
                        bf[2 * pp][1] = r[1];
                        bf[2 * pp + 1][0] = r[2];
                        bf[2 * pp + 1][1] = r[3];
                    }
#pragma unroll
                    for (int mt = 0; mt < 4; ++mt)
#pragma unroll
                        for (int nt = 0; nt < 4; ++nt) mma_16816(acc[mt][nt], af[mt], bf[nt][0], bf[nt][1]);
                }
            }
            cp_async_wait<0>(); // only empty groups can be left; drain them anyway
            __syncthreads();    // next tile's prologue overwrites stages still being read

            // C fragment of m16n8: c0,c1 at (row g, cols 2q, 2q+1), c2,c3 at row g+8.
            const int64_t c_off = bz * p.stride_c;
#pragma unroll
            for (int mt = 0; mt < 4; ++mt) {
                const int row = m0 + wm * 64 + mt * 16 + (lane >> 2);
#pragma unroll
                for (int nt = 0; nt < 4; ++nt) {
                    const int col = n0 + wn * 32 + nt * 8 + (lane & 3) * 2;
                    const float lo[2] = {acc[mt][nt][0], acc[mt][nt][1]};
                    const float hi[2] = {acc[mt][nt][2], acc[mt][nt][3]};
                    epilogue_store<2, true>(p, c_off, row, col, lo);
                    epilogue_store<2, true>(p, c_off, row + 8, col, hi);
                }
            }
        }
    }
}

// ------------------------------------------------------------------------------------
// Version 3: BF16 wgmma on Hopper (sm_90a).
//
// Shared memory per stage: A tile 16 KB then B tile 16 KB, each 1024-byte aligned, written by
// TMA with 128-byte swizzle (16-byte chunk j of 128-byte row r lands at chunk j ^ (r % 8)).
//   K-major operand (A trans_a = 0, B trans_b = 1): one box {64 k, 128 rows}: 128 rows of
//     128 bytes; wgmma descriptor SBO = 1024 (8-row groups), LBO unused; the k16 step kk
//     starts kk*32 bytes into the row (the swizzle is applied on absolute address bits).
//   MN-major operand (A trans_a = 1, B trans_b = 0): two boxes {64 m|n, 64 k}, 8 KB each,
//     row = k; descriptor LBO = 8192 (next 64-wide m|n block), SBO = 1024 (next 8 k-rows);
//     the k16 step kk starts kk*16 rows = kk*2048 bytes in; wgmma transpose bit set.
// Block = 3 warpgroups: thread 0 of warpgroup 0 is the producer (issues every TMA), the other
// producer threads retire at once; consumer warpgroup w (of 2) owns tile rows 64w..64w+63 and
// all 128 columns. The grid is persistent (one block per SM, tiles strided by gridDim.x, in the
// order of raster.h: row by row, or in bands of raster_group tile rows), so
// the producer streams the next tile's k-tiles while the consumers run the epilogue, which
// stores straight from the accumulator registers with row/col guards.
// Barriers: full[s] (1 producer arrival + the stage's TMA bytes: 32 KB, less when a second
// m|n box lies wholly outside the matrix and is skipped) and empty[s] (256 consumer
// arrivals, each after that thread's wgmma reading stage s has retired).

//
// The wide form (WIDE = true, technique wgmma-wide): 128x256 tiles, each consumer warpgroup
// on m64n256k16 with 128 accumulators per thread, which fits because `setmaxnreg` moves
// registers from the producer warpgroup (40) to the consumers (232); 4 stages of 48 KB; B's
// k-major box is 256 rows and its m|n-major tile four 64-wide boxes (those wholly past the
// edge skipped); one empty-barrier arrival per consumer warpgroup instead of one per
// thread; the first MMA of a tile overwrites the accumulators (scale-d = 0) instead of
// adding to zeroed ones. It visits tiles in bands (raster.h) like wgmma-banded.
//
// The cluster form (matmul_bf16_wgmma_cluster_kernel, technique wgmma-cluster): the wide form in
// 2x1 thread-block clusters (PTX ISA "Cluster of Cooperative Thread Arrays"). The cluster, not
// the CTA, takes work: pair t in [0, ceil(tiles_m / 2) tiles_n batch), from %clusterid.x in
// steps of %nclusterid.x, ordered by raster.h on the pair grid (bands of raster_group / 2 pair
// rows); the CTA of rank r (%cluster_ctarank) computes tile (2 tm' + r, tn): the two share B's
// k-tiles. Per stage each CTA loads its own A, and half of B's boxes (k-major: one of two
// 128-row boxes, the map's box being {64, 128}; n-major: two of four 64-wide boxes) multicast
// to the same smem offset in both CTAs, complete_tx on full[s] at the same offset in both
// (cp.async.bulk.tensor .multicast::cluster, mask 0b11). Boxes wholly past the edge are issued
// by neither CTA: B's (counted from n0 alone, which both share) and A's (the whole tile of rank
// 1 in the last pairs when tiles_m is odd). Barriers:
//   full[s]: 2 arrivals, this CTA's producer (expect_tx: its A bytes plus ALL of B's) and the
//     peer's producer (a remote arrive after its issues), plus the bytes. The peer's arrival
//     makes each CTA's use u + 1 of stage s wait for both producers even where the peer
//     issued no B box, so the CTAs stay within one use of each other per stage and no
//     barrier phase ever collects arrivals of two uses.
//   empty[s]: 4 arrivals, the leader of each consumer warpgroup of both CTAs (on its own CTA's
//     barrier and, by mapa and a plain remote arrive, on the peer's): a
//     producer writes both CTAs' stage s.
// Both CTAs walk the same pairs and k-tiles: a tile wholly past m is still computed, on stale
// A (its B half still feeds the peer), and stores nothing (row guards). A cluster barrier
// (barrier.cluster arrive.release + wait.acquire) replaces __syncthreads after the barrier
// init, before any multicast or remote arrival, and another precedes exit, so that no CTA
// leaves while its peer may still write its smem or arrive on its barriers; every thread of
// both CTAs passes both, the idle producer threads and clusters without work included.
//
// The TMA-store form (WIDE and TMA_STORE, technique wgmma-tma-store): the wide form whose
// epilogue goes through shared memory and TMA stores where the host could describe C to TMA
// (args.c_tma: C 16-byte aligned, its rows and batch stride multiples of 16 bytes), and
// straight from the registers, as the wide form, where it could not. Each consumer warpgroup
// stores its 64 x 256 part in column chunks of 128 bytes (64 bf16 or 32 fp32 columns: one box
// {128 B, 64 rows} of a 128-byte swizzled map) through two 8 KB buffers of its own, which
// alternate over all its chunks, tile after tile:
//   the issuing thread (the warpgroup's first) waits until at most one of its store groups
//   still reads shared memory (cp.async.bulk.wait_group.read 1: the other buffer's), so the
//   buffer's last store has read it; the warpgroup meets at its named barrier (1 + cw, 128
//   threads); each thread applies the epilogue (alpha, bias, gelu, residual, C_old: the same
//   math, order and rounding as the direct path) to its values of the chunk and writes them in
//   the map's swizzle (16-byte unit u of row r at u ^ (r % 8): the 8 rows a warp writes at once
//   hit distinct banks), then fence.proxy.async; the warpgroup meets again; the issuing thread
//   stores the box and commits it as a group.
// The warpgroup goes on to its next tile's k-tiles while the last stores drain, and the
// issuing thread waits for all its groups to have read shared memory before it exits. TMA
// clips rows past m and columns past n; chunks wholly past n are skipped, and a warpgroup
// whose 64 rows lie wholly past m stores nothing. The four buffers (32 KB) fit beside the
// wide form's 4 stages: 230,464 bytes of the 232,448 a block may have.

namespace hg {
constexpr int BM = 128, BK = 64, THREADS = 384;
constexpr int A_BYTES = BM * BK * 2;                 // 16 KB
constexpr int CONSUMERS = 256;                       // threads of the two consumer warpgroups
static_assert(CONSUMERS == THREADS - 128, "warpgroup 0 produces, the rest consume");
template <bool WIDE> struct Cfg {
    static constexpr int BN = WIDE ? 256 : 128;
    static constexpr int STAGES = WIDE ? 4 : 5;
    static constexpr int B_BYTES = BN * BK * 2;                  // 16 or 32 KB
    static constexpr int STAGE_BYTES = A_BYTES + B_BYTES;        // multiple of 1024
    static constexpr int ACC = BN / 2;                           // fp32 accumulators per thread
    static constexpr int EMPTY_ARRIVALS = WIDE ? 2 : CONSUMERS;  // per warpgroup, or per thread
    static constexpr int SMEM_BYTES =
        1024 /* alignment slack */ + STAGES * STAGE_BYTES + 2 * STAGES * 8;
    static_assert(SMEM_BYTES <= 227 * 1024, "fits Hopper's shared memory per block");
};
// The TMA-store form's staging for C: 2 consumer warpgroups x 2 buffers of one 64-row,
// 128-byte-wide box, after the stages (before the barriers).
constexpr int STORE_BOX_BYTES = 64 * 128;
constexpr int STORE_BYTES = 2 * 2 * STORE_BOX_BYTES;
template <bool WIDE, bool TMA_STORE>
constexpr int kSmemBytes = Cfg<WIDE>::SMEM_BYTES + (TMA_STORE ? STORE_BYTES : 0);
static_assert(kSmemBytes<true, true> <= 227 * 1024, "the TMA-store form fits");
// The cluster form: the wide form's tiles and stages, its own barrier counts and B box.
struct ClusterCfg : Cfg<true> {
    static constexpr int FULL_ARRIVALS = 2;  // this CTA's producer (expect_tx) and the peer's
    static constexpr int EMPTY_ARRIVALS = 4; // each consumer warpgroup of both CTAs
    static constexpr int B_BOX_ROWS = BN / 2; // k-major B's box: one CTA's half of the tile
};
} // namespace hg

// The flag the host reads to learn whether the loaded image holds the real sm_90a kernel.
__device__ int hr_wgmma_image_flag = HR_WGMMA_DEVICE;



#if HR_WGMMA_DEVICE
// The TMA-store form's epilogue (see above). x: two adjacent columns col, col + 1 of one row;
// alpha, bias, gelu, then residual and C_old as epilogue_finish adds them (rows past m and
// columns past n read nothing: TMA never stores them).
template <typename T>
__device__ __forceinline__ void epilogue_pair(const MatmulArgs &p, int64_t c_off, int row,
                                              int col, float (&x)[2]) {
    epilogue_math<2>(p, col, x);
    if (row >= p.m) return;
    const int64_t idx = c_off + (int64_t)row * p.n + col;
    const T *res = p.residual ? static_cast<const T *>(p.residual) + idx : nullptr;
    const T *c = static_cast<const T *>(p.c) + idx;
    if (p.c_vec && col + 2 <= p.n) {
        if (res) {
            float r[2];
            load_vec<T, 2>(res, r);
            x[0] += r[0];
            x[1] += r[1];
        }
        if (p.accumulate) {
            float o[2];
            load_vec<T, 2>(c, o);
            x[0] += o[0];
            x[1] += o[1];
        }
    } else {
#pragma unroll
        for (int i = 0; i < 2; ++i) {
            if (col + i < p.n) {
                if (res) x[i] += hr::to_f32(res[i]);
                if (p.accumulate) x[i] += hr::to_f32(c[i]);
            }
        }
    }
}

// Two elements of C in its dtype to shared memory (the rounding store_vec does).
template <typename T> __device__ __forceinline__ void st_shared_pair(uint32_t addr, const float (&x)[2]);
template <> __device__ __forceinline__ void st_shared_pair<__nv_bfloat16>(uint32_t addr,
                                                                          const float (&x)[2]) {
    __nv_bfloat16 e[2] = {hr::from_f32<__nv_bfloat16>(x[0]), hr::from_f32<__nv_bfloat16>(x[1])};
    uint32_t raw;
    memcpy(&raw, e, sizeof(raw));
    asm volatile("st.shared.b32 [%0], %1;\n" ::"r"(addr), "r"(raw) : "memory");
}
template <> __device__ __forceinline__ void st_shared_pair<float>(uint32_t addr,
                                                                  const float (&x)[2]) {
    asm volatile("st.shared.v2.f32 [%0], {%1, %2};\n" ::"r"(addr), "f"(x[0]), "f"(x[1])
                 : "memory");
}

// bar.sync by consumer warpgroup cw's 128 threads on named barrier 1 + cw (immediate ids, so
// that ptxas reserves just these two besides __syncthreads' 0).
__device__ __forceinline__ void warpgroup_bar_sync(int cw) {
    if (cw == 0) asm volatile("bar.sync 1, 128;\n" ::: "memory");
    else asm volatile("bar.sync 2, 128;\n" ::: "memory");
}

// One consumer warpgroup's 64 x BN part of a tile (rows row0.., columns n0..) through its two
// staging buffers at `bufs` and TMA stores (see the TMA-store form above). `r` is the
// thread's first row within the 64 (its second is r + 8); `n_stored` counts this
// warpgroup's chunks so far (the same in all its threads): chunk i uses buffer i % 2.
template <int BN, typename T>
__device__ __forceinline__ void store_tile_tma(const MatmulArgs &p, const CUtensorMap *map,
                                               const float (&acc)[BN / 2], uint32_t bufs, int bz,
                                               int row0, int n0, int cw, int r, int lane,
                                               uint32_t &n_stored) {
    constexpr int ES = (int)sizeof(T), CW = 128 / ES, NB = CW / 8, CHUNKS = BN / CW;
    const bool leader = (threadIdx.x & 127) == 0;
    const int64_t c_off = (int64_t)bz * p.stride_c;
#pragma unroll
    for (int q = 0; q < CHUNKS; ++q) {
        const int c0 = n0 + q * CW;
        if (c0 >= p.n) break; // uniform over the warpgroup
        const uint32_t buf = bufs + (n_stored & 1u) * hg::STORE_BOX_BYTES;
        // This buffer's last store (two chunks ago) has read it once at most one group, the
        // other buffer's, is still reading.
        if (leader) bulk_wait_read<1>();
        warpgroup_bar_sync(cw);
#pragma unroll
        for (int jj = 0; jj < NB; ++jj) {
            const int j = q * NB + jj; // the n8 block of the accumulator
            const int cc = jj * 8 + (lane & 3) * 2; // column within the chunk
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                float x[2] = {acc[4 * j + 2 * h], acc[4 * j + 2 * h + 1]};
                epilogue_pair<T>(p, c_off, row0 + r + 8 * h, c0 + cc, x);
                const int rr = r + 8 * h;
                const uint32_t byte = (uint32_t)(cc * ES);
                st_shared_pair<T>(buf + rr * 128 + ((((byte >> 4) ^ (uint32_t)(rr & 7))) << 4) +
                                      (byte & 15u),
                                  x);
            }
        }
        fence_proxy_async_shared();
        warpgroup_bar_sync(cw);
        if (leader) {
            tma_store_3d(map, buf, c0, row0, bz);
            bulk_commit();
        }
        ++n_stored;
    }
}
#endif // HR_WGMMA_DEVICE

// TA: A stored [k, m] (m-major). TB: B stored [n, k] (k-major; wgmma's untransposed B).
// WIDE: the 128x256 form; TMA_STORE (with WIDE): its epilogue through TMA stores of C by
// tma_c where p.c_tma (see above); the other forms never read tma_c.
template <bool TA, bool TB, bool WIDE, bool TMA_STORE>
__global__ void __launch_bounds__(hg::THREADS, 1)
    matmul_bf16_wgmma_kernel(const __grid_constant__ CUtensorMap tma_a,
                             const __grid_constant__ CUtensorMap tma_b,
                             const __grid_constant__ CUtensorMap tma_c, const MatmulArgs p) {
#if HR_WGMMA_DEVICE
    static_assert(WIDE || !TMA_STORE, "the TMA-store epilogue is the wide form's");
    using namespace hg;
    using C = Cfg<WIDE>;
    constexpr int BN = C::BN, STAGES = C::STAGES, B_BYTES = C::B_BYTES;
    constexpr int STAGE_BYTES = C::STAGE_BYTES;
    extern __shared__ __align__(1024) unsigned char hg_smem[];
    // 128B-swizzle atoms must sit on 1024-byte boundaries of the shared window.
    const uint32_t base = (smem_u32(hg_smem) + 1023u) & ~1023u;
    // The TMA-store form's buffers for C, after the stages: warpgroup cw's at stores + 16 KB cw.
    const uint32_t stores = base + STAGES * STAGE_BYTES;
    const uint32_t full0 = stores + (TMA_STORE ? STORE_BYTES : 0); // full[s]  = full0 + 8 s
    const uint32_t empty0 = full0 + STAGES * 8;         // empty[s] = empty0 + 8 s
    const int tid = threadIdx.x, wg = tid >> 7;

    if (tid == 0) {
        for (int s = 0; s < STAGES; ++s) {
            mbar_init(full0 + 8 * s, 1);
            mbar_init(empty0 + 8 * s, C::EMPTY_ARRIVALS);
        }
        // Make the initialised barriers visible to the async (TMA) proxy.
        asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
    }
    __syncthreads(); // the only block-wide barrier: roles split below and never rejoin

    const int tiles_n = tiles_of(p.n, BN), tiles_m = tiles_of(p.m, BM);
    const int64_t tiles_mn = (int64_t)tiles_n * tiles_m;
    const int64_t total = tiles_mn * p.batch;
    const int k_tiles = tiles_of(p.k, BK);

    if (wg == 0) {
        // Producer: one thread streams every k-tile of every tile this block owns.
        if constexpr (WIDE) setmaxnreg_dec<40>(); // the whole warpgroup, converged here
        if (tid == 0) {
            asm volatile("prefetch.tensormap [%0];\n" ::"l"(reinterpret_cast<uint64_t>(&tma_a))
                         : "memory");
            asm volatile("prefetch.tensormap [%0];\n" ::"l"(reinterpret_cast<uint64_t>(&tma_b))
                         : "memory");
            uint32_t it = 0; // k-tiles issued so far: stage = it % STAGES, use = it / STAGES
            for (int64_t t = blockIdx.x; t < total; t += gridDim.x) {
                const HrTileCoord tc = hr_tile_coord(t, tiles_m, tiles_n, p.raster_group);
                const int bz = tc.bz, m0 = tc.tm * BM, n0 = tc.tn * BN;
                // A broadcast operand (stride 0) was encoded with a batch extent of 1.
                const int za = p.stride_a != 0 ? bz : 0;
                const int zb = p.stride_b != 0 ? bz : 0;
                for (int kt = 0; kt < k_tiles; ++kt, ++it) {
                    const uint32_t s = it % STAGES;
                    const uint32_t use = it / STAGES;
                    // Wait for the consumers to free the slot (a fresh barrier passes parity 1).
                    mbar_wait(empty0 + 8 * s, (use & 1) ^ 1);
                    const uint32_t full = full0 + 8 * s;
                    const uint32_t sa = base + s * STAGE_BYTES, sb = sa + A_BYTES;
                    const int k0 = kt * BK;
                    // Parts of a box outside the tensor are zero-filled and still counted in
                    // the transaction bytes. A second m|n box lying wholly past the edge is
                    // not issued: its stale smem only feeds rows/cols the epilogue never stores.
                    const bool a_hi = !TA || m0 + 64 < p.m;
                    // B's m|n-major 64-wide boxes that hold a column of the matrix.
                    int b_boxes = 1;
                    if (!TB)
                        while (b_boxes < BN / 64 && n0 + 64 * b_boxes < p.n) ++b_boxes;
                    const uint32_t bytes = (a_hi ? A_BYTES : A_BYTES / 2) +
                                           (TB ? B_BYTES : (uint32_t)b_boxes * 8192u);
                    mbar_arrive_expect_tx(full, bytes);
                    if (!TA) {
                        tma_load_3d(sa, &tma_a, k0, m0, za, full);
                    } else {
                        tma_load_3d(sa, &tma_a, m0, k0, za, full);
                        if (a_hi) tma_load_3d(sa + A_BYTES / 2, &tma_a, m0 + 64, k0, za, full);
                    }
                    if (TB) {
                        tma_load_3d(sb, &tma_b, k0, n0, zb, full);
                    } else {
                        for (int j = 0; j < b_boxes; ++j)
                            tma_load_3d(sb + 8192u * j, &tma_b, n0 + 64 * j, k0, zb, full);
                    }
                }
            }
        }
    } else {
        // Consumers: warpgroup cw computes rows 64cw..64cw+63 of each 128xBN tile.
        if constexpr (WIDE) setmaxnreg_inc<232>();
        const int cw = wg - 1;
        const int warp4 = (tid >> 5) & 3, lane = tid & 31;
        // Descriptor pieces that do not change: start offsets within a stage and LBO.
        const uint32_t a_off = (uint32_t)cw * 8192u; // 64 rows x 128 B, or box cw (8 KB)
        const uint32_t a_lbo = TA ? 8192u : 16u;
        const uint32_t a_step = TA ? 2048u : 32u;    // bytes per k16 step
        const uint32_t b_lbo = TB ? 16u : 8192u;
        const uint32_t b_step = TB ? 32u : 2048u;
        uint32_t it = 0;
        uint32_t n_stored = 0; // the TMA-store form: this warpgroup's C chunks so far
        for (int64_t t = blockIdx.x; t < total; t += gridDim.x) {
            // The producer's order, tile for tile.
            const HrTileCoord tc = hr_tile_coord(t, tiles_m, tiles_n, p.raster_group);
            const int bz = tc.bz, m0 = tc.tm * BM, n0 = tc.tn * BN;

            float acc[C::ACC];
            if constexpr (!WIDE) {
#pragma unroll
                for (int i = 0; i < C::ACC; ++i) acc[i] = 0.0f;
            }
            fence_acc(acc);

            uint32_t prev = 0;
            for (int kt = 0; kt < k_tiles; ++kt, ++it) {
                const uint32_t s = it % STAGES;
                mbar_wait(full0 + 8 * s, (it / STAGES) & 1);
                __syncwarp(); // .aligned wgmma below wants the warp converged after the spin
                const uint32_t sa = base + s * STAGE_BYTES + a_off;
                const uint32_t sb = base + s * STAGE_BYTES + A_BYTES;
                wgmma_fence(); // order the accumulator writes above before the async MMAs
#pragma unroll
                for (int kk = 0; kk < BK / 16; ++kk) {
                    const uint64_t da = wg_desc(sa + kk * a_step, a_lbo, 1024u);
                    const uint64_t db = wg_desc(sb + kk * b_step, b_lbo, 1024u);
                    // The wide form's first MMA of a tile overwrites the accumulators (k >= 1).
                    const int scale_d = WIDE ? (kt > 0 || kk > 0) : 1;
                    wgmma_tile<BN, TA ? 1 : 0, TB ? 0 : 1>(acc, da, db, scale_d);
                }
                wgmma_commit();
                // Keep this k-tile's MMAs in flight; the previous one has retired once at most
                // one group is pending, so its stage can go back to the producer.
                if (kt > 0) {
                    wgmma_wait<1>();
                    if (!WIDE || (tid & 127) == 0) mbar_arrive(empty0 + 8 * prev);
                }
                prev = s;
            }
            wgmma_wait<0>();
            fence_acc(acc);
            if (!WIDE || (tid & 127) == 0) mbar_arrive(empty0 + 8 * prev);

            // Accumulator layout (per warp, like mma.m16n8 C repeated over n8 blocks j):
            // acc[4j + {0,1}] at (row 16*warp4 + lane/4, cols 8j + 2*(lane%4) + {0,1}),
            // acc[4j + {2,3}] at the same cols, row + 8.
            if constexpr (TMA_STORE) {
                if (p.c_tma) {
                    const int row0 = m0 + cw * 64; // this warpgroup's rows; none past m: no work
                    if (row0 < p.m) {
                        const uint32_t bufs = stores + (uint32_t)cw * 2u * STORE_BOX_BYTES;
                        const int r = warp4 * 16 + (lane >> 2);
                        if (p.c_bf16)
                            store_tile_tma<BN, __nv_bfloat16>(p, &tma_c, acc, bufs, bz, row0, n0,
                                                              cw, r, lane, n_stored);
                        else
                            store_tile_tma<BN, float>(p, &tma_c, acc, bufs, bz, row0, n0, cw, r,
                                                      lane, n_stored);
                    }
                    continue;
                }
            }
            const int64_t c_off = (int64_t)bz * p.stride_c;
            const int row = m0 + cw * 64 + warp4 * 16 + (lane >> 2);
#pragma unroll
            for (int j = 0; j < BN / 8; ++j) {
                const int col = n0 + j * 8 + (lane & 3) * 2;
                const float lo[2] = {acc[4 * j + 0], acc[4 * j + 1]};
                const float hi[2] = {acc[4 * j + 2], acc[4 * j + 3]};
                epilogue_store<2, true>(p, c_off, row, col, lo);
                epilogue_store<2, true>(p, c_off, row + 8, col, hi);
            }
        }
        // The TMA-store form: shared memory must outlive every store that reads it.
        if constexpr (TMA_STORE)
            if ((tid & 127) == 0) bulk_wait_read<0>();
    }
#endif // HR_WGMMA_DEVICE
}

// The cluster form (see above). TA, TB as for matmul_bf16_wgmma_kernel; everything not about
// the cluster (roles, setmaxnreg, descriptors, MMA loop, epilogue) is the wide form's, line
// for line. Launch with cluster dimensions (2, 1, 1) only.
template <bool TA, bool TB>
__global__ void __launch_bounds__(hg::THREADS, 1)
    matmul_bf16_wgmma_cluster_kernel(const __grid_constant__ CUtensorMap tma_a,
                                     const __grid_constant__ CUtensorMap tma_b,
                                     const MatmulArgs p) {
#if HR_WGMMA_DEVICE
    using namespace hg;
    using C = ClusterCfg;
    constexpr int BN = C::BN, STAGES = C::STAGES, B_BYTES = C::B_BYTES;
    constexpr int STAGE_BYTES = C::STAGE_BYTES;
    // B's boxes per stage, CTA r issuing the r-th half: k-major two of 128 rows (the map's
    // box), m|n-major four of 64 columns.
    constexpr int B_BOXES = TB ? 2 : 4, HALF = B_BOXES / 2;
    constexpr int B_BOX_N = BN / B_BOXES;
    constexpr uint32_t B_BOX_BYTES = B_BYTES / B_BOXES;
    static_assert(!TB || B_BOX_N == C::B_BOX_ROWS, "k-major B's box is the tensor map's");
    extern __shared__ __align__(1024) unsigned char hg_smem[];
    // 128B-swizzle atoms must sit on 1024-byte boundaries of the shared window. Both CTAs get
    // the same offsets (same kernel, same dynamic smem), as multicast and mapa require.
    const uint32_t base = (smem_u32(hg_smem) + 1023u) & ~1023u;
    const uint32_t full0 = base + STAGES * STAGE_BYTES; // full[s]  = full0 + 8 s
    const uint32_t empty0 = full0 + STAGES * 8;         // empty[s] = empty0 + 8 s
    const int tid = threadIdx.x, wg = tid >> 7;

    if (tid == 0) {
        for (int s = 0; s < STAGES; ++s) {
            mbar_init(full0 + 8 * s, C::FULL_ARRIVALS);
            mbar_init(empty0 + 8 * s, C::EMPTY_ARRIVALS);
        }
        // Make the initialised barriers visible to the async (TMA) proxy and the cluster.
        asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
    }
    // Both CTAs' barriers exist before either multicasts into the other or arrives on its
    // barriers. Every thread of both CTAs.
    __syncwarp();
    cluster_sync();

    // Pairs of vertically adjacent tiles, ceil(tiles_m / 2) pair rows. Both CTAs of a cluster
    // derive first, step and total alike: they walk the same pairs, hence the same k-tiles and
    // stages, which the barriers they share depend on. Each role reads the cluster registers
    // after its setmaxnreg, so that nothing computed here lives across it.
    const int tiles_n = tiles_of(p.n, BN), tiles_m = tiles_of(p.m, BM);
    const int pairs_m = (tiles_m + 1) / 2;
    const int64_t total = (int64_t)tiles_n * pairs_m * p.batch;
    const int k_tiles = tiles_of(p.k, BK);
    // Pair t -> this CTA's tile: raster.h orders the pair grid (the launcher passes
    // raster_group in pair rows); CTA r takes tile row 2 tm' + r, which may lie past m.
    auto tile_of = [&](int64_t t) {
        HrTileCoord tc = hr_tile_coord(t, pairs_m, tiles_n, p.raster_group);
        tc.tm = 2 * tc.tm + (int)cluster_ctarank();
        return tc;
    };

    if (wg == 0) {
        // Producer: one thread streams every k-tile of every tile this CTA owns.
        setmaxnreg_dec<40>(); // the whole warpgroup, converged here
        if (tid == 0) {
            asm volatile("prefetch.tensormap [%0];\n" ::"l"(reinterpret_cast<uint64_t>(&tma_a))
                         : "memory");
            asm volatile("prefetch.tensormap [%0];\n" ::"l"(reinterpret_cast<uint64_t>(&tma_b))
                         : "memory");
            uint32_t it = 0; // k-tiles issued so far: stage = it % STAGES, use = it / STAGES
            for (int64_t t = cluster_id_x(); t < total; t += cluster_count_x()) {
                const HrTileCoord tc = tile_of(t);
                const int bz = tc.bz, m0 = tc.tm * BM, n0 = tc.tn * BN;
                // A broadcast operand (stride 0) was encoded with a batch extent of 1.
                const int za = p.stride_a != 0 ? bz : 0;
                const int zb = p.stride_b != 0 ? bz : 0;
                for (int kt = 0; kt < k_tiles; ++kt, ++it) {
                    const uint32_t s = it % STAGES;
                    const uint32_t use = it / STAGES;
                    // Wait for the consumers of both CTAs to free the slot (a fresh barrier
                    // passes parity 1).
                    mbar_wait(empty0 + 8 * s, (use & 1) ^ 1);
                    const uint32_t full = full0 + 8 * s;
                    const uint32_t sa = base + s * STAGE_BYTES, sb = sa + A_BYTES;
                    const int k0 = kt * BK;
                    const uint32_t rank = cluster_ctarank();
                    // A: this CTA's tile, to itself alone. Parts of a box outside the tensor
                    // are zero-filled and counted; boxes wholly past m are not issued (with
                    // tiles_m odd, the whole tile of rank 1 in the last pairs): their stale
                    // smem feeds only rows the epilogue never stores.
                    const int a_boxes = TA ? (m0 < p.m) + (m0 + 64 < p.m) : (m0 < p.m);
                    // B: the boxes holding a column of the matrix (a prefix; box 0 at least,
                    // n0 < n), each multicast to both CTAs by the CTA whose half holds it.
                    // b_boxes comes from n0 alone: both CTAs issue the same union, disjointly,
                    // and expect the same B bytes.
                    int b_boxes = 1;
                    while (b_boxes < B_BOXES && n0 + B_BOX_N * b_boxes < p.n) ++b_boxes;
                    // Expect this CTA's A plus ALL of B (both halves complete_tx here). The
                    // peer's bytes may land first: the tx-count runs negative meanwhile, and
                    // the phase cannot complete before this arrival.
                    const uint32_t bytes = (uint32_t)a_boxes * (TA ? A_BYTES / 2 : A_BYTES) +
                                           (uint32_t)b_boxes * B_BOX_BYTES;
                    mbar_arrive_expect_tx(full, bytes);
                    if (!TA) {
                        if (a_boxes > 0) tma_load_3d(sa, &tma_a, k0, m0, za, full);
                    } else {
#pragma unroll
                        for (int j = 0; j < 2; ++j)
                            if (j < a_boxes)
                                tma_load_3d(sa + (A_BYTES / 2) * j, &tma_a, m0 + 64 * j, k0, za,
                                            full);
                    }
#pragma unroll
                    for (int h = 0; h < HALF; ++h) {
                        const int j = (int)rank * HALF + h;
                        if (j < b_boxes) {
                            const uint32_t dst = sb + B_BOX_BYTES * j;
                            if (TB)
                                tma_load_3d_multicast(dst, &tma_b, k0, n0 + B_BOX_N * j, zb, full,
                                                      0x3);
                            else
                                tma_load_3d_multicast(dst, &tma_b, n0 + B_BOX_N * j, k0, zb, full,
                                                      0x3);
                        }
                    }
                    // The peer's full[s] waits for this producer too, whether or not it issued
                    // a B box (rank 1 issues none when n0 + 128 >= n): neither CTA consumes
                    // use u + 1 of stage s before both producers have seen their empty[s]
                    // complete use u. Without it, where rank 1 issues no B, rank 0's consumers
                    // could arrive for use u + 1 on rank 1's empty[s] before rank 1's own
                    // arrivals for use u, and a phase would mix two uses. It publishes nothing
                    // (complete_tx counts the bytes): default semantics.
                    mbar_arrive_remote(mapa_shared(full, rank ^ 1u));
                }
            }
        }
    } else {
        // Consumers: warpgroup cw computes rows 64cw..64cw+63 of each 128x256 tile.
        setmaxnreg_inc<232>();
        const int cw = wg - 1;
        const int warp4 = (tid >> 5) & 3, lane = tid & 31;
        // Descriptor pieces that do not change: start offsets within a stage and LBO.
        const uint32_t a_off = (uint32_t)cw * 8192u; // 64 rows x 128 B, or box cw (8 KB)
        const uint32_t a_lbo = TA ? 8192u : 16u;
        const uint32_t a_step = TA ? 2048u : 32u;    // bytes per k16 step
        const uint32_t b_lbo = TB ? 16u : 8192u;
        const uint32_t b_step = TB ? 32u : 2048u;
        // Give stage s back once this warpgroup's MMAs reading it have retired: both CTAs'
        // producers write it, so the leader arrives on this CTA's empty[s] and on the peer's.
        auto release = [&](uint32_t s) {
            if ((tid & 127) == 0) {
                mbar_arrive(empty0 + 8 * s);
                // Plain arrive (as CUTLASS's consumer release): the stage was read by wgmma,
                // retired by wait_group, and this thread wrote nothing the peer needs; a
                // cluster-scope release cost a GPU-wide fence per k-tile on the issue path.
                mbar_arrive_remote(mapa_shared(empty0 + 8 * s, cluster_ctarank() ^ 1u));
            }
        };
        uint32_t it = 0;
        for (int64_t t = cluster_id_x(); t < total; t += cluster_count_x()) {
            // The producer's order, tile for tile.
            const HrTileCoord tc = tile_of(t);
            const int bz = tc.bz, m0 = tc.tm * BM, n0 = tc.tn * BN;

            float acc[C::ACC];
            fence_acc(acc);

            uint32_t prev = 0;
            for (int kt = 0; kt < k_tiles; ++kt, ++it) {
                const uint32_t s = it % STAGES;
                mbar_wait(full0 + 8 * s, (it / STAGES) & 1);
                __syncwarp(); // .aligned wgmma below wants the warp converged after the spin
                const uint32_t sa = base + s * STAGE_BYTES + a_off;
                const uint32_t sb = base + s * STAGE_BYTES + A_BYTES;
                wgmma_fence(); // order the accumulator writes above before the async MMAs
#pragma unroll
                for (int kk = 0; kk < BK / 16; ++kk) {
                    const uint64_t da = wg_desc(sa + kk * a_step, a_lbo, 1024u);
                    const uint64_t db = wg_desc(sb + kk * b_step, b_lbo, 1024u);
                    // The first MMA of a tile overwrites the accumulators (k >= 1).
                    const int scale_d = kt > 0 || kk > 0;
                    wgmma_tile<BN, TA ? 1 : 0, TB ? 0 : 1>(acc, da, db, scale_d);
                }
                wgmma_commit();
                // Keep this k-tile's MMAs in flight; the previous one has retired once at most
                // one group is pending, so its stage can go back to the producers.
                if (kt > 0) {
                    wgmma_wait<1>();
                    release(prev);
                }
                prev = s;
            }
            wgmma_wait<0>();
            fence_acc(acc);
            release(prev);

            // Accumulator layout as in the other forms. Rows past m (the whole tile of rank 1
            // in the last pairs when tiles_m is odd) are not stored.
            const int64_t c_off = (int64_t)bz * p.stride_c;
            const int row = m0 + cw * 64 + warp4 * 16 + (lane >> 2);
#pragma unroll
            for (int j = 0; j < BN / 8; ++j) {
                const int col = n0 + j * 8 + (lane & 3) * 2;
                const float lo[2] = {acc[4 * j + 0], acc[4 * j + 1]};
                const float hi[2] = {acc[4 * j + 2], acc[4 * j + 3]};
                epilogue_store<2, true>(p, c_off, row, col, lo);
                epilogue_store<2, true>(p, c_off, row + 8, col, hi);
            }
        }
    }
    // No CTA exits while its peer may still multicast into its shared memory or arrive on its
    // barriers: every thread of both CTAs (the idle producer threads and clusters without
    // work too) meets here, after its own last remote arrival; each CTA's consumers have
    // waited for every byte multicast into it. The producer warp reconverges with lane 0.
    __syncwarp();
    cluster_sync();
#endif // HR_WGMMA_DEVICE
}

// ------------------------------------------------------------------------------------
// Host side: validation, alignment verdicts, launches.

namespace {

constexpr int kInvalid = static_cast<int>(cudaErrorInvalidValue);   // 1
constexpr int kNotSupported = static_cast<int>(cudaErrorNotSupported); // 801

using hr::aligned;

// Common checks of the contract; fills everything but the vector verdicts.
int prepare(const hr_matmul_params *p, MatmulArgs *a) {
    if (p == nullptr) return kInvalid;
    if (p->m < 1 || p->n < 1 || p->k < 1 || p->batch < 1) return kInvalid;
    if (p->a == nullptr || p->b == nullptr || p->c == nullptr) return kInvalid;
    if (p->trans_a != 0 && p->trans_a != 1) return kInvalid;
    if (p->trans_b != 0 && p->trans_b != 1) return kInvalid;
    if (p->epilogue != HR_EPI_NONE && p->epilogue != HR_EPI_BIAS &&
        p->epilogue != HR_EPI_BIAS_GELU)
        return kInvalid;
    if (p->epilogue != HR_EPI_NONE && p->bias == nullptr) return kInvalid;
    if (p->c_dtype != HR_F32 && p->c_dtype != HR_BF16) return kInvalid;
    if (p->stride_a < 0 || p->stride_b < 0 || p->stride_c < 0) return kInvalid;
    // A stride of 0 broadcasts an input, but every batch entry writing one C would be a
    // write race (and with accumulate, a lost update): refuse it like any bad shape.
    if (p->batch > 1 && p->stride_c == 0) return kInvalid;
    a->a = p->a;
    a->b = p->b;
    a->c = p->c;
    a->bias = p->bias;
    a->residual = p->residual;
    // With one batch entry the strides are never used: zero them so they cannot spoil
    // the alignment verdicts below.
    a->stride_a = p->batch > 1 ? p->stride_a : 0;
    a->stride_b = p->batch > 1 ? p->stride_b : 0;
    a->stride_c = p->batch > 1 ? p->stride_c : 0;
    a->m = p->m;
    a->n = p->n;
    a->k = p->k;
    a->batch = p->batch;
    a->lda = p->trans_a ? p->m : p->k;
    a->ldb = p->trans_b ? p->k : p->n;
    a->trans_a = p->trans_a;
    a->trans_b = p->trans_b;
    a->epilogue = p->epilogue;
    a->accumulate = p->accumulate != 0;
    a->alpha = p->alpha;
    a->c_bf16 = p->c_dtype == HR_BF16;
    a->raster_group = p->raster_group;
    a->a_vec = a->b_vec = a->c_vec = 0;
    a->c_tma = 0;
    return 0;
}

// Rows of an operand all start on `bytes` boundaries (elements of `esize` bytes).
bool operand_vec(const void *ptr, int ld, int64_t stride, int esize, int bytes) {
    const int per = bytes / esize;
    return aligned(ptr, bytes) && ld % per == 0 && stride % per == 0;
}

// The epilogue may move V consecutive elements of C (and residual) as one access.
bool epilogue_vec(const MatmulArgs &a, int V) {
    const int esize = a.c_bf16 ? 2 : 4;
    const uintptr_t bytes = (uintptr_t)V * esize;
    return aligned(a.c, bytes) && (a.residual == nullptr || aligned(a.residual, bytes)) &&
           a.n % V == 0 && a.stride_c % V == 0;
}

dim3 tile_grid(const MatmulArgs &a, int bm, int bn) {
    const int tm = tiles_of(a.m, bm);
    return dim3((unsigned)tiles_of(a.n, bn), (unsigned)(tm < 65535 ? tm : 65535),
                (unsigned)(a.batch < 65535 ? a.batch : 65535));
}

} // namespace

extern "C" int hr_matmul_f32_simt(const hr_matmul_params *p, hr_stream_t stream) {
    MatmulArgs a;
    const int err = prepare(p, &a);
    if (err) return err;
    if (p->c_dtype != HR_F32) return kInvalid;
    a.a_vec = operand_vec(a.a, a.lda, a.stride_a, 4, 16);
    a.b_vec = operand_vec(a.b, a.ldb, a.stride_b, 4, 16);
    a.c_vec = epilogue_vec(a, 4);
    matmul_f32_simt_kernel<<<tile_grid(a, simt::BM, simt::BN), simt::THREADS, 0,
                             (cudaStream_t)stream>>>(a);
    HR_RETURN_LAUNCH_STATUS();
}

extern "C" int hr_matmul_bf16_mma(const hr_matmul_params *p, hr_stream_t stream) {
    MatmulArgs a;
    const int err = prepare(p, &a);
    if (err) return err;
    a.a_vec = operand_vec(a.a, a.lda, a.stride_a, 2, 16);
    a.b_vec = operand_vec(a.b, a.ldb, a.stride_b, 2, 16);
    a.c_vec = epilogue_vec(a, 2);
    const bool a_kc = a.trans_a == 0, b_kc = a.trans_b != 0;
    void (*kernel)(const MatmulArgs) =
        a_kc ? (b_kc ? matmul_bf16_mma_kernel<true, true> : matmul_bf16_mma_kernel<true, false>)
             : (b_kc ? matmul_bf16_mma_kernel<false, true> : matmul_bf16_mma_kernel<false, false>);
    HR_TRY(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                tc::SMEM_BYTES));
    kernel<<<tile_grid(a, tc::BM, tc::BN), tc::THREADS, tc::SMEM_BYTES, (cudaStream_t)stream>>>(a);
    HR_RETURN_LAUNCH_STATUS();
}

namespace {

// The cluster kernel (A and B's maps) and the per-block forms (A, B and C's maps).
using WgmmaKernel = void (*)(const CUtensorMap, const CUtensorMap, const MatmulArgs);
using WgmmaKernelC = void (*)(const CUtensorMap, const CUtensorMap, const CUtensorMap,
                              const MatmulArgs);

template <bool WIDE, bool TMA_STORE> WgmmaKernelC wgmma_kernel_for(bool ta, bool tb) {
    return ta ? (tb ? matmul_bf16_wgmma_kernel<true, true, WIDE, TMA_STORE>
                    : matmul_bf16_wgmma_kernel<true, false, WIDE, TMA_STORE>)
              : (tb ? matmul_bf16_wgmma_kernel<false, true, WIDE, TMA_STORE>
                    : matmul_bf16_wgmma_kernel<false, false, WIDE, TMA_STORE>);
}

// Does `device` run the real sm_90a matmul kernel (see sm90a_image_runs)?
bool wgmma_usable(int device) {
    static std::atomic<int> cache[64];
    return sm90a_image_runs(device, matmul_bf16_wgmma_kernel<false, false, false, false>,
                            hr_wgmma_image_flag, cache);
}


// 3-D map {inner, outer, batch} of one bf16 operand. k_major: inner = k, one box
// {64 k, box_rows rows} per stage; else inner = m|n, boxes {64, 64 k}. A broadcast or
// single-entry operand gets batch extent 1 (the kernel then always asks for z = 0).
bool encode_operand(PFN_cuTensorMapEncodeTiled_v12000 encode, CUtensorMap *map, const void *ptr,
                    bool k_major, int box_rows, int rows, int k, int ld, int64_t stride,
                    int batch) {
    cuuint64_t dims[3], strides[2];
    cuuint32_t box[3], estr[3] = {1, 1, 1};
    if (k_major) {
        dims[0] = (cuuint64_t)k;
        dims[1] = (cuuint64_t)rows;
        box[0] = 64;
        box[1] = (cuuint32_t)box_rows;
    } else {
        dims[0] = (cuuint64_t)rows;
        dims[1] = (cuuint64_t)k;
        box[0] = 64;
        box[1] = 64;
    }
    box[2] = 1;
    const bool batched = stride != 0 && batch > 1;
    dims[2] = batched ? (cuuint64_t)batch : 1;
    strides[0] = (cuuint64_t)ld * 2;
    strides[1] = batched ? (cuuint64_t)stride * 2 : strides[0] * dims[1];
    const CUresult r =
        encode(map, CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, 3, const_cast<void *>(ptr), dims, strides,
               box, estr, CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
               CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
    return r == CUDA_SUCCESS;
}

// The TMA-store form's map of C ([batch][m, n], bf16 or fp32): {n, m, batch}, boxes of 128
// bytes by 64 rows, 128-byte swizzle. False (the kernel then stores from registers) unless
// TMA can take C: 16-byte aligned, rows and a used batch stride multiples of 16 bytes.
bool encode_c(PFN_cuTensorMapEncodeTiled_v12000 encode, CUtensorMap *map, const MatmulArgs &a) {
    const int esize = a.c_bf16 ? 2 : 4;
    const bool batched = a.batch > 1;
    if (!aligned(a.c, 16) || ((int64_t)a.n * esize) % 16 != 0 ||
        (batched && (a.stride_c * esize) % 16 != 0))
        return false;
    cuuint64_t dims[3] = {(cuuint64_t)a.n, (cuuint64_t)a.m, batched ? (cuuint64_t)a.batch : 1};
    cuuint64_t strides[2] = {(cuuint64_t)a.n * esize,
                             batched ? (cuuint64_t)a.stride_c * esize
                                     : (cuuint64_t)a.n * esize * (cuuint64_t)a.m};
    cuuint32_t box[3] = {(cuuint32_t)(128 / esize), 64, 1}, estr[3] = {1, 1, 1};
    return encode(map,
                  a.c_bf16 ? CU_TENSOR_MAP_DATA_TYPE_BFLOAT16 : CU_TENSOR_MAP_DATA_TYPE_FLOAT32, 3,
                  a.c, dims, strides, box, estr, CU_TENSOR_MAP_INTERLEAVE_NONE,
                  CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_NONE,
                  CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE) == CUDA_SUCCESS;
}

} // namespace

namespace {
// What every wgmma launcher does first: the contract's checks, the sm_90a and TMA verdicts,
// and the operands' tensor maps (k-major B in boxes of b_box_rows rows). Returns 0, or the
// code the launcher returns.
int prepare_wgmma(const hr_matmul_params *p, int b_box_rows, MatmulArgs *a, CUtensorMap *map_a,
                  CUtensorMap *map_b, int *device) {
    const int err = prepare(p, a);
    if (err) return err;
    HR_TRY(cudaGetDevice(device));
    if (!wgmma_usable(*device)) return kNotSupported;
    if (!operand_vec(a->a, a->lda, a->stride_a, 2, 16) ||
        !operand_vec(a->b, a->ldb, a->stride_b, 2, 16))
        return kNotSupported;
    const PFN_cuTensorMapEncodeTiled_v12000 encode = tensor_map_encoder();
    if (encode == nullptr) return kNotSupported;
    const bool ta = a->trans_a != 0, tb = a->trans_b != 0;
    if (!encode_operand(encode, map_a, a->a, /*k_major=*/!ta, hg::BM, a->m, a->k, a->lda,
                        a->stride_a, a->batch) ||
        !encode_operand(encode, map_b, a->b, /*k_major=*/tb, b_box_rows, a->n, a->k, a->ldb,
                        a->stride_b, a->batch))
        return kNotSupported;
    a->a_vec = a->b_vec = 1;
    a->c_vec = epilogue_vec(*a, 2);
    return 0;
}

// The per-block forms of the wgmma kernel: encodes the operands' tensor maps (and C's, for
// the TMA-store form, where TMA can take C) and launches one block per SM (or per tile, when
// there are fewer), tiles in the order p->raster_group asks for.
template <bool WIDE, bool TMA_STORE>
int launch_wgmma(const hr_matmul_params *p, hr_stream_t stream) {
    using C = hg::Cfg<WIDE>;
    constexpr int smem = hg::kSmemBytes<WIDE, TMA_STORE>;
    MatmulArgs a;
    alignas(64) CUtensorMap map_a, map_b, map_c;
    int device = 0;
    const int err = prepare_wgmma(p, C::BN, &a, &map_a, &map_b, &device);
    if (err) return err;
    const bool ta = a.trans_a != 0, tb = a.trans_b != 0;
    // Never read where c_tma is 0; a copy of A's map rather than uninitialised bytes.
    map_c = map_a;
    if (TMA_STORE) {
        const PFN_cuTensorMapEncodeTiled_v12000 encode = tensor_map_encoder();
        a.c_tma = encode != nullptr && encode_c(encode, &map_c, a) ? 1 : 0;
    }

    int sms = 0;
    HR_TRY(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
    const int64_t total = (int64_t)tiles_of(a.m, hg::BM) * tiles_of(a.n, C::BN) * a.batch;
    const int64_t blocks = total < (int64_t)sms ? total : (int64_t)sms; // persistent: 1 per SM
    const WgmmaKernelC kernel = wgmma_kernel_for<WIDE, TMA_STORE>(ta, tb);
    HR_TRY(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
    kernel<<<(unsigned)blocks, hg::THREADS, smem, (cudaStream_t)stream>>>(map_a, map_b, map_c,
                                                                           a);
    HR_RETURN_LAUNCH_STATUS();
}

WgmmaKernel wgmma_cluster_kernel_for(bool ta, bool tb) {
    return ta ? (tb ? matmul_bf16_wgmma_cluster_kernel<true, true>
                    : matmul_bf16_wgmma_cluster_kernel<true, false>)
              : (tb ? matmul_bf16_wgmma_cluster_kernel<false, true>
                    : matmul_bf16_wgmma_cluster_kernel<false, false>);
}

// How many clusters of `cfg`'s shape can run at once (cudaOccupancyMaxActiveClusters). It
// depends on the device and the kernel, not on the grid, shape or stream, so it is cached per
// device and form (0 unknown, else clusters + 1); an error is returned and not cached.
int max_active_clusters(int device, int form, WgmmaKernel kernel, const cudaLaunchConfig_t &cfg,
                        int *clusters) {
    static std::atomic<int> cache[64][4];
    const bool cached = device >= 0 && device < 64;
    if (cached) {
        const int c = cache[device][form].load(std::memory_order_relaxed);
        if (c != 0) {
            *clusters = c - 1;
            return 0;
        }
    }
    int n = 0;
    // A failed query means the device cannot say: not supported (the caller falls back),
    // with the error cleared so that it does not surface at the next launch.
    if (cudaOccupancyMaxActiveClusters(&n, kernel, &cfg) != cudaSuccess) {
        cudaGetLastError();
        return kNotSupported;
    }
    if (cached) cache[device][form].store(n + 1, std::memory_order_relaxed);
    *clusters = n;
    return 0;
}

// The cluster form: persistent 2x1 clusters, as many as fit at once (or one per tile pair,
// when there are fewer), launched with cudaLaunchKernelEx for the cluster dimension.
int launch_wgmma_cluster(const hr_matmul_params *p, hr_stream_t stream) {
    using C = hg::ClusterCfg;
    MatmulArgs a;
    alignas(64) CUtensorMap map_a, map_b;
    int device = 0;
    const int err = prepare_wgmma(p, C::B_BOX_ROWS, &a, &map_a, &map_b, &device);
    if (err) return err;
    const bool ta = a.trans_a != 0, tb = a.trans_b != 0;
    // raster_group counts tile rows, as for the other forms; the kernel orders pair rows
    // (2 tile rows each): bands of raster_group / 2 pairs, at least one (0 or 1: row by row,
    // which on pairs is bands of 2 tile rows).
    a.raster_group = p->raster_group >= 2 ? p->raster_group / 2 : p->raster_group;

    const WgmmaKernel kernel = wgmma_cluster_kernel_for(ta, tb);
    HR_TRY(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                C::SMEM_BYTES));
    cudaLaunchAttribute attr[1];
    attr[0].id = cudaLaunchAttributeClusterDimension;
    attr[0].val.clusterDim.x = 2;
    attr[0].val.clusterDim.y = 1;
    attr[0].val.clusterDim.z = 1;
    cudaLaunchConfig_t cfg = {};
    cfg.gridDim = dim3(2, 1, 1); // one cluster, the smallest valid grid, for the query
    cfg.blockDim = dim3(hg::THREADS, 1, 1);
    cfg.dynamicSmemBytes = C::SMEM_BYTES;
    cfg.stream = (cudaStream_t)stream;
    cfg.attrs = attr;
    cfg.numAttrs = 1;
    // At one block per SM, at most floor(SMs / 2); fewer where a GPC's SMs cannot all pair up.
    int fit = 0;
    const int qerr = max_active_clusters(device, (ta ? 2 : 0) + (tb ? 1 : 0), kernel, cfg, &fit);
    if (qerr) return qerr;
    if (fit < 1) return kNotSupported;
    const int64_t pairs =
        (int64_t)((tiles_of(a.m, hg::BM) + 1) / 2) * tiles_of(a.n, C::BN) * a.batch;
    const int64_t clusters = pairs < (int64_t)fit ? pairs : (int64_t)fit;
    cfg.gridDim = dim3((unsigned)(2 * clusters), 1, 1);
    HR_TRY(cudaLaunchKernelEx(&cfg, kernel, map_a, map_b, a));
    HR_RETURN_LAUNCH_STATUS();
}
} // namespace

// All four forms are supported. Returns 801 (caller falls back to hr_matmul_bf16_mma) when:
// the device is not compute capability 9.0 or its loaded image lacks the sm_90a kernel; the
// driver has no cuTensorMapEncodeTiled; A or B is not 16-byte aligned; a stored leading
// dimension (k or m for A, n or k for B) or a used batch stride is not a multiple of 8
// elements (TMA strides are multiples of 16 bytes); or the driver rejects the tensor map.
extern "C" int hr_matmul_bf16_wgmma(const hr_matmul_params *p, hr_stream_t stream) {
    return launch_wgmma<false, false>(p, stream);
}

extern "C" int hr_matmul_bf16_wgmma_wide(const hr_matmul_params *p, hr_stream_t stream) {
    return launch_wgmma<true, false>(p, stream);
}

// The same requirements and return codes. Where TMA cannot take C (C not 16-byte aligned,
// or n or a used batch stride not a multiple of 16 bytes of C's dtype), its epilogue stores
// from the registers as hr_matmul_bf16_wgmma_wide's.
extern "C" int hr_matmul_bf16_wgmma_tma_store(const hr_matmul_params *p, hr_stream_t stream) {
    return launch_wgmma<true, true>(p, stream);
}

// Same requirements and return codes; also 801 when no 2-CTA cluster of this kernel fits on
// the device.
extern "C" int hr_matmul_bf16_wgmma_cluster(const hr_matmul_params *p, hr_stream_t stream) {
    return launch_wgmma_cluster(p, stream);
}

namespace {
// Whether nvcc compiled any compute capability 9.0 target into this file (host-side view;
// __CUDA_ARCH_LIST__ says 900 for sm_90 and sm_90a alike).
constexpr bool arch_list_has_900() {
#ifdef __CUDA_ARCH_LIST__
    constexpr int archs[] = {__CUDA_ARCH_LIST__};
    for (int a : archs)
        if (a == 900) return true;
#endif
    return false;
}
} // namespace

// On a compute capability 9.0 device the answer is exact: the image the runtime loads there
// is asked whether it holds the wgmma body. Elsewhere the sm_90a image cannot be inspected,
// so the answer is whether the build targeted 9.0 at all (the caller then reports the GPU,
// not the build, as the reason wgmma cannot run). No GPU or no driver: 0.
extern "C" int hr_matmul_wgmma_compiled(void) {
    int device = 0, major = 0, minor = 0;
    if (cudaGetDevice(&device) != cudaSuccess ||
        cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) != cudaSuccess ||
        cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device) != cudaSuccess) {
        cudaGetLastError();
        return 0;
    }
    if (major == 9 && minor == 0) return wgmma_usable(device) ? 1 : 0;
    return arch_list_has_900() ? 1 : 0;
}
