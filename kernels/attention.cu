// attention.cu - scaled dot-product attention: the pieces of naive attention (row softmax,
// its backward, delta) and fused FlashAttention-2 forward/backward kernels (Dao 2023,
// "FlashAttention-2: Faster Attention with Better Parallelism and Work Partitioning").
//
// Layouts (see headroom.h): Q, O, dO, dQ are [B, H, N, d] row-major in the function's dtype,
// K, V, dK, dV [B, Hkv, N, d] with G = H / Hkv query heads per kv head (grouped-query
// attention, Ainslie et al. 2023; G = 1 is multi-head attention): query head bh of the B*H
// grid reads kv head bh / G of the B*Hkv grid (b*Hkv + h/G = (b*H + h)/G as H = Hkv*G).
// lse and delta are fp32 [B, H, N]; naive scores are [B*H, N, N].
// All math is fp32 (bf16 kernels: bf16 tensor-core operands, fp32 accumulators/statistics).
//
// Kernels:
//   softmax_fwd_kernel<T>          one warp per score row: pass 1 online max/sum, pass 2 writes
//                                  P (exactly 0 where causal-masked) and optionally lse.
//   softmax_bwd_kernel<T>          one warp per score row: dS = P * (dP - delta), masked = 0;
//                                  element-wise read-then-write, so ds may alias dp.
//   attn_delta_kernel<T>           one warp per (b,h,i): delta = sum_c dO*O, fp32, fixed tree.
//   flash_fwd_f32_kernel<D>        SIMT fp32: 64-row Q tile per 256-thread block, 32-key K/V
//                                  tiles through shared memory, online softmax, P via smem.
//   flash_fwd_bf16_kernel<D>       mma.sync m16n8k16: 4 warps x 16 query rows (64-row tile),
//                                  64-key K/V tiles double-buffered with cp.async, S and P stay
//                                  in registers (P reused as the A operand of P.V).
//   flash_fwd_bf16_m128_kernel<D>  the same on 128-row Q tiles, 4 warps x 32 rows (two m16
//                                  blocks sharing each K/V fragment), K/V tiles of 64 keys
//                                  (d=64) or 32 (d=128) single-buffered with separate waits,
//                                  the scale folded into one FFMA;
//                                  grid.x = query tile (technique flash-m128).
//   flash_bwd_dkdv_f32_kernel<D>   SIMT fp32: one block per 32-key tile, loops over 32-row Q
//                                  tiles, dK/dV accumulated in registers.
//   flash_bwd_dq_f32_kernel<D>     SIMT fp32: one block per 32-row Q tile, loops over 32-key
//                                  tiles, dQ accumulated in registers.
//   flash_bwd_dkdv_bf16_kernel<D>  mma.sync: one block per 64-key tile (4 warps x 16 keys),
//                                  loops over Q tiles (64 rows for d=64, 32 for d=128) that
//                                  are cp.async double-buffered; dK/dV in registers.
//   flash_bwd_dq_bf16_kernel<D>    mma.sync: one block per 64-row Q tile (4 warps x 16 rows),
//                                  loops over K/V tiles (64 keys for d=64, 32 for d=128).
//   repeat_kv_kernel<T>            K/V [B,Hkv,N,d] -> [B,H,N,d] for the naive path (grid-stride).
//   reduce_kv_kernel<T>            its backward: one thread per dK/dV element sums its group's
//                                  G query heads in head order (fp32, deterministic).
// GQA: the forward and dQ kernels run one block per query head and read its kv head; the
// dK/dV kernels run one block per kv head and walk the G query heads of its group in head
// order inside (the accumulators stay in registers across them), so a kv head's gradient is
// one thread's fixed-order sum, never atomics.
// D (head_dim) is 64 or 128; causal is a runtime flag. The backward launchers first run
// attn_delta_kernel into p->delta, then the dK/dV kernel, then the dQ kernel: P is
// recomputed twice instead of reducing dQ with atomics, so every output element is summed
// by one thread in a fixed order (deterministic, bitwise reproducible).
#include "common.cuh"

#include <math.h>

namespace {

using bf16 = __nv_bfloat16;

constexpr float kLog2e = 1.4426950408889634f; // exp(x) = exp2(x * log2(e))
constexpr float kLn2 = 0.6931471805599453f;
constexpr unsigned kFull = 0xffffffffu;

// ====================================================================================
// Naive-attention pieces
// ====================================================================================

// scores: [total_rows = B*H*N, N]; row r is query i = r % N of its (b,h) slice.
// Pass 1 keeps a per-lane running (max, sum) - the online softmax of Milakov & Gimelshein
// 2018 - so the row is read twice (max+sum, then write) rather than three times.
template <typename T>
__global__ void __launch_bounds__(256)
softmax_fwd_kernel(T *scores, float *lse, int64_t total_rows, int N, int causal) {
    const int lane = threadIdx.x & 31;
    const int64_t nwarps = (int64_t)gridDim.x * (blockDim.x >> 5);
    for (int64_t row = (int64_t)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
         row < total_rows; row += nwarps) {
        T *s = scores + row * N;
        const int i = (int)(row % N);
        const int len = causal ? i + 1 : N; // visible keys j < len
        float m = -INFINITY, sum = 0.f;
        for (int j = lane; j < len; j += 32) {
            const float x = hr::to_f32(s[j]);
            if (x > m) {
                sum = sum * expf(m - x) + 1.f; // m = -inf: expf(-inf) = 0
                m = x;
            } else if (x > -INFINITY) {
                sum += expf(x - m);
            }
        }
        // Merge (m, sum) across the warp. The xor tree gives every lane the same bits:
        // partners add the same two terms, and fp addition is commutative.
#pragma unroll
        for (int off = 16; off > 0; off >>= 1) {
            const float mo = __shfl_xor_sync(kFull, m, off);
            const float so = __shfl_xor_sync(kFull, sum, off);
            const float mn = fmaxf(m, mo);
            const float a = (m == -INFINITY) ? 0.f : sum * expf(m - mn);
            const float b = (mo == -INFINITY) ? 0.f : so * expf(mo - mn);
            sum = a + b;
            m = mn;
        }
        const bool empty = !(sum > 0.f); // only if every visible score is -inf
        const float inv = empty ? 0.f : 1.f / sum;
        if (lse != nullptr && lane == 0) lse[row] = empty ? -INFINITY : m + logf(sum);
        for (int j = lane; j < N; j += 32) {
            float y = 0.f;
            if (j < len && !empty) y = expf(hr::to_f32(s[j]) - m) * inv;
            s[j] = hr::from_f32<T>(y);
        }
    }
}

// P, dp, ds: [total_rows, N]. No __restrict__ on dp/ds: they may be the same buffer; each
// element is read and then written by the same thread.
template <typename T>
__global__ void __launch_bounds__(256)
softmax_bwd_kernel(const T *P, const T *dp, T *ds, const float *__restrict__ delta,
                   int64_t total_rows, int N, int causal) {
    const int lane = threadIdx.x & 31;
    const int64_t nwarps = (int64_t)gridDim.x * (blockDim.x >> 5);
    for (int64_t row = (int64_t)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
         row < total_rows; row += nwarps) {
        const int i = (int)(row % N);
        const int len = causal ? i + 1 : N;
        const float dl = delta[row];
        const T *pr = P + row * N;
        const T *dpr = dp + row * N;
        T *dsr = ds + row * N;
        for (int j = lane; j < N; j += 32) {
            float y = 0.f;
            if (j < len) y = hr::to_f32(pr[j]) * (hr::to_f32(dpr[j]) - dl);
            dsr[j] = hr::from_f32<T>(y);
        }
    }
}

// o, d_o: [total_rows = B*H*N, D]; delta: [total_rows]. FA2 sec. 3.1.2 (D_i = rowsum(dO∘O)).
// Lane c sums columns c, c+32, ...; then a fixed xor tree: deterministic.
template <typename T>
__global__ void __launch_bounds__(256)
attn_delta_kernel(const T *__restrict__ o, const T *__restrict__ d_o, float *__restrict__ delta,
                  int64_t total_rows, int D) {
    const int lane = threadIdx.x & 31;
    const int64_t nwarps = (int64_t)gridDim.x * (blockDim.x >> 5);
    for (int64_t row = (int64_t)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
         row < total_rows; row += nwarps) {
        const T *orow = o + row * D;
        const T *drow = d_o + row * D;
        float acc = 0.f;
        for (int c = lane; c < D; c += 32) acc = fmaf(hr::to_f32(drow[c]), hr::to_f32(orow[c]), acc);
#pragma unroll
        for (int off = 16; off > 0; off >>= 1) acc += __shfl_xor_sync(kFull, acc, off);
        if (lane == 0) delta[row] = acc;
    }
}

// ====================================================================================
// Flash attention, fp32 SIMT
// ====================================================================================
// 256 threads seen as 32 row groups x 8 column groups: thread (rg, cg) = (tid / 8, tid % 8)
// owns score columns cg + 8*jj (jj < 4) and output columns cg + 8*c (c < D/8) of rows
// rg + 32*i (i < R). The 8 threads of a row are 8 consecutive lanes, so row reductions
// are 3 xor shuffles. Tiles sit in shared memory with row stride D+1 floats: the 8
// distinct rows a warp reads at one k land in 8 different banks (D is a multiple of 32).

constexpr int kSimtThreads = 256;

// Rows [row0, row0 + ROWS) of one [N, D] slice g into s (stride D+1); rows >= N become 0.
template <int D, int ROWS>
__device__ __forceinline__ void simt_load_tile(float *s, const float *__restrict__ g, int row0,
                                               int N) {
    constexpr int CPR = D / 4; // float4 chunks per row
    static_assert((ROWS * CPR) % kSimtThreads == 0, "tile must split evenly over the block");
#pragma unroll
    for (int it = 0; it < ROWS * CPR / kSimtThreads; ++it) {
        const int c = threadIdx.x + it * kSimtThreads;
        const int r = c / CPR, cc = c % CPR;
        const int row = row0 + r;
        float4 v = make_float4(0.f, 0.f, 0.f, 0.f);
        if (row < N) v = __ldg(reinterpret_cast<const float4 *>(g + (int64_t)row * D) + cc);
        float *d = s + r * (D + 1) + cc * 4;
        d[0] = v.x;
        d[1] = v.y;
        d[2] = v.z;
        d[3] = v.w;
    }
}

// acc[i][jj] += sum_k A[rg + 32i][k] * B[cg + 8jj][k]   (A, B: smem, stride D+1)
template <int D, int R>
__device__ __forceinline__ void simt_abt(float (&acc)[R][4], const float *sA, const float *sB,
                                         int rg, int cg) {
    constexpr int LDS = D + 1;
#pragma unroll 8
    for (int k = 0; k < D; ++k) {
        float a[R], b[4];
#pragma unroll
        for (int i = 0; i < R; ++i) a[i] = sA[(rg + 32 * i) * LDS + k];
#pragma unroll
        for (int jj = 0; jj < 4; ++jj) b[jj] = sB[(cg + 8 * jj) * LDS + k];
#pragma unroll
        for (int i = 0; i < R; ++i)
#pragma unroll
            for (int jj = 0; jj < 4; ++jj) acc[i][jj] = fmaf(a[i], b[jj], acc[i][jj]);
    }
}

// acc[i][c] += sum_{n < NK} P[rg + 32i][n] * X[n][cg + 8c]   (P stride NK+1, X stride D+1)
template <int D, int R, int NK>
__device__ __forceinline__ void simt_px(float (&acc)[R][D / 8], const float *sP, const float *sX,
                                        int rg, int cg) {
#pragma unroll 4
    for (int n = 0; n < NK; ++n) {
        float pv[R];
#pragma unroll
        for (int i = 0; i < R; ++i) pv[i] = sP[(rg + 32 * i) * (NK + 1) + n];
#pragma unroll
        for (int c = 0; c < D / 8; ++c) {
            const float x = sX[n * (D + 1) + cg + 8 * c];
#pragma unroll
            for (int i = 0; i < R; ++i) acc[i][c] = fmaf(pv[i], x, acc[i][c]);
        }
    }
}

constexpr int kF32FwdBM = 64, kF32FwdBN = 32; // forward tiles (R = 2 rows per thread)
constexpr int kF32BwdT = 32;                  // backward tiles, both directions (R = 1)

template <int D>
constexpr size_t f32_fwd_smem() {
    return sizeof(float) * ((size_t)(kF32FwdBM + 2 * kF32FwdBN) * (D + 1) + kF32FwdBM * (kF32FwdBN + 1));
}
template <int D>
constexpr size_t f32_dkdv_smem() {
    return sizeof(float) * ((size_t)4 * kF32BwdT * (D + 1) + 2 * kF32BwdT * (kF32BwdT + 1) + 2 * kF32BwdT);
}
template <int D>
constexpr size_t f32_dq_smem() {
    return sizeof(float) * ((size_t)4 * kF32BwdT * (D + 1) + kF32BwdT * (kF32BwdT + 1));
}

// FA2 Algorithm 1 (sec. 3.1.1) for one (b,h) and one 64-row Q tile: stream K/V tiles,
// keep running row max m and (per-thread partial) row sum l, rescale O by exp(m_old-m_new),
// divide by l once at the end (the FA2 tweak over FA1). Scores are kept in log2 units
// (x = q.k * scale * log2 e) so each exponential is one exp2.
// grid = (B*H, ceil(N/64)); Q tiles are visited last-first so the longest causal tiles start first.
template <int D>
__global__ void __launch_bounds__(kSimtThreads)
flash_fwd_f32_kernel(const float *__restrict__ q,  // [B,H,N,D]
                     const float *__restrict__ k,  // [B,Hkv,N,D]
                     const float *__restrict__ v,  // [B,Hkv,N,D]
                     float *__restrict__ o,        // [B,H,N,D]
                     float *__restrict__ lse,      // [B,H,N] or nullptr
                     int N, int causal, float scale_log2, int group) {
    constexpr int BM = kF32FwdBM, BN = kF32FwdBN, R = 2, LDS = D + 1, LDP = BN + 1;
    extern __shared__ __align__(16) unsigned char smem_raw[];
    float *sQ = reinterpret_cast<float *>(smem_raw); // [BM][LDS]
    float *sK = sQ + BM * LDS;                       // [BN][LDS]
    float *sV = sK + BN * LDS;                       // [BN][LDS]
    float *sP = sV + BN * LDS;                       // [BM][LDP]

    const int n_qt = (N + BM - 1) / BM;
    const int q0 = (n_qt - 1 - (int)blockIdx.y) * BM;
    const int64_t bh = blockIdx.x;
    const int64_t off = bh * N * D, kv_off = (bh / group) * N * D; // kv head of query head bh
    q += off;
    k += kv_off;
    v += kv_off;
    o += off;
    const int tid = threadIdx.x, rg = tid >> 3, cg = tid & 7;
    // Causal: key tiles wholly above the diagonal of this Q tile are skipped (sec. 3.1.1).
    const int kv_end = causal ? min(N, q0 + BM) : N;
    const int n_kv = (kv_end + BN - 1) / BN;

    simt_load_tile<D, BM>(sQ, q, q0, N);

    float m[R], l[R], acc[R][D / 8];
#pragma unroll
    for (int i = 0; i < R; ++i) {
        m[i] = -INFINITY;
        l[i] = 0.f;
#pragma unroll
        for (int c = 0; c < D / 8; ++c) acc[i][c] = 0.f;
    }

    for (int j = 0; j < n_kv; ++j) {
        const int n0 = j * BN;
        __syncthreads(); // previous tile's readers of sK/sV/sP are done
        simt_load_tile<D, BN>(sK, k, n0, N);
        simt_load_tile<D, BN>(sV, v, n0, N);
        __syncthreads();

        float s[R][4];
#pragma unroll
        for (int i = 0; i < R; ++i)
#pragma unroll
            for (int jj = 0; jj < 4; ++jj) s[i][jj] = 0.f;
        simt_abt<D, R>(s, sQ, sK, rg, cg);

        // Only the ragged last tile and tiles crossing the diagonal need masks.
        const bool need_mask = (n0 + BN > N) || (causal && n0 + BN - 1 > q0);
#pragma unroll
        for (int i = 0; i < R; ++i) {
            const int row = q0 + rg + 32 * i;
            float mx = -INFINITY;
#pragma unroll
            for (int jj = 0; jj < 4; ++jj) {
                float x = s[i][jj] * scale_log2;
                if (need_mask) {
                    const int key = n0 + cg + 8 * jj;
                    if (key >= N || (causal && key > row)) x = -INFINITY;
                }
                s[i][jj] = x;
                mx = fmaxf(mx, x);
            }
            mx = fmaxf(mx, __shfl_xor_sync(kFull, mx, 1));
            mx = fmaxf(mx, __shfl_xor_sync(kFull, mx, 2));
            mx = fmaxf(mx, __shfl_xor_sync(kFull, mx, 4));
            const float m_new = fmaxf(m[i], mx);
            // A row with nothing visible yet keeps m = -inf; use 0 so exp2 sees no inf - inf.
            const float m_use = (m_new == -INFINITY) ? 0.f : m_new;
            const float alpha = exp2f(m[i] - m_use);
            m[i] = m_new;
            float rs = 0.f;
#pragma unroll
            for (int jj = 0; jj < 4; ++jj) {
                const float pj = exp2f(s[i][jj] - m_use);
                rs += pj;
                sP[(rg + 32 * i) * LDP + cg + 8 * jj] = pj;
            }
            l[i] = l[i] * alpha + rs;
#pragma unroll
            for (int c = 0; c < D / 8; ++c) acc[i][c] *= alpha;
        }
        __syncthreads(); // sP complete
        simt_px<D, R, BN>(acc, sP, sV, rg, cg);
    }

#pragma unroll
    for (int i = 0; i < R; ++i) {
        float lt = l[i];
        lt += __shfl_xor_sync(kFull, lt, 1);
        lt += __shfl_xor_sync(kFull, lt, 2);
        lt += __shfl_xor_sync(kFull, lt, 4);
        const int row = q0 + rg + 32 * i;
        if (row < N) {
            const float inv = 1.f / lt;
#pragma unroll
            for (int c = 0; c < D / 8; ++c) o[(int64_t)row * D + cg + 8 * c] = acc[i][c] * inv;
            // lse = ln(sum_j exp(scale q.k_j)) = m*ln2 + ln(l), m in log2 units.
            if (lse != nullptr && cg == 0) lse[bh * N + row] = m[i] * kLn2 + logf(lt);
        }
    }
}

// FA2 Algorithm 2 (sec. 3.1.2), dK/dV half: the block owns 32 keys and walks the Q tiles
// that can see them (causal: from the diagonal tile on). It computes the transposed tiles
// directly - S^T = K Q^T, dP^T = V dO^T - so every product reads smem rows, no transposes.
// GQA: the block's kv head is read by G query heads; it walks them in head order, the Q
// tiles of each in turn, into the same accumulators. grid = (B*Hkv, ceil(N/32)).
template <int D>
__global__ void __launch_bounds__(kSimtThreads)
flash_bwd_dkdv_f32_kernel(const float *__restrict__ q,     // [B,H,N,D]
                          const float *__restrict__ k,     // [B,Hkv,N,D]
                          const float *__restrict__ v,     // [B,Hkv,N,D]
                          const float *__restrict__ d_o,   // [B,H,N,D]
                          const float *__restrict__ lse,   // [B,H,N]
                          const float *__restrict__ delta, // [B,H,N]
                          float *__restrict__ dk,          // [B,Hkv,N,D]
                          float *__restrict__ dv,          // [B,Hkv,N,D]
                          int N, int causal, float scale, float scale_log2, int group) {
    constexpr int T = kF32BwdT, LDS = D + 1, LDP = T + 1;
    extern __shared__ __align__(16) unsigned char smem_raw[];
    float *sK = reinterpret_cast<float *>(smem_raw); // [T][LDS]
    float *sV = sK + T * LDS;                        // [T][LDS]
    float *sQ = sV + T * LDS;                        // [T][LDS]
    float *sdO = sQ + T * LDS;                       // [T][LDS]
    float *sPt = sdO + T * LDS;                      // [T keys][LDP]  P^T
    float *sdSt = sPt + T * LDP;                     // [T keys][LDP]  dS^T
    float *sL = sdSt + T * LDP;                      // [T] lse * log2(e)
    float *sDl = sL + T;                             // [T] delta

    const int64_t bkv = blockIdx.x, bh0 = bkv * group; // kv head; its group's first query head
    const int64_t kv_off = bkv * N * D;
    k += kv_off;
    v += kv_off;
    dk += kv_off;
    dv += kv_off;
    const int n0 = blockIdx.y * T;
    const int tid = threadIdx.x, rg = tid >> 3, cg = tid & 7;
    const int key = n0 + rg;

    simt_load_tile<D, T>(sK, k, n0, N);
    simt_load_tile<D, T>(sV, v, n0, N);

    float dka[1][D / 8], dva[1][D / 8];
#pragma unroll
    for (int c = 0; c < D / 8; ++c) dka[0][c] = dva[0][c] = 0.f;

    const int n_qt = (N + T - 1) / T;
    const int it0 = causal ? n0 / T : 0; // Q tiles before the diagonal see none of these keys
    const int per = n_qt - it0; // step x: query head x / per of the group, Q tile it0 + x % per
    for (int x = 0; x < group * per; ++x) {
        const int it = it0 + x % per;
        const int64_t bh = bh0 + x / per;
        const float *qh = q + bh * N * D, *doh = d_o + bh * N * D;
        const float *lh = lse + bh * N, *dlh = delta + bh * N;
        const int q0 = it * T;
        __syncthreads();
        simt_load_tile<D, T>(sQ, qh, q0, N);
        simt_load_tile<D, T>(sdO, doh, q0, N);
        if (tid < T) {
            const int row = q0 + tid;
            sL[tid] = row < N ? lh[row] * kLog2e : 0.f;
            sDl[tid] = row < N ? dlh[row] : 0.f;
        }
        __syncthreads();

        float st[1][4] = {{0.f, 0.f, 0.f, 0.f}}, dpt[1][4] = {{0.f, 0.f, 0.f, 0.f}};
        simt_abt<D, 1>(st, sK, sQ, rg, cg);   // S^T[key][q]
        simt_abt<D, 1>(dpt, sV, sdO, rg, cg); // dP^T[key][q]
#pragma unroll
        for (int jj = 0; jj < 4; ++jj) {
            const int ql = cg + 8 * jj, qrow = q0 + ql;
            float p = exp2f(st[0][jj] * scale_log2 - sL[ql]);
            if (qrow >= N || (causal && key > qrow)) p = 0.f;
            sPt[rg * LDP + ql] = p;
            sdSt[rg * LDP + ql] = p * (dpt[0][jj] - sDl[ql]);
        }
        __syncthreads();
        simt_px<D, 1, T>(dva, sPt, sdO, rg, cg); // dV += P^T dO
        simt_px<D, 1, T>(dka, sdSt, sQ, rg, cg); // dK += dS^T Q   (scale applied at the end)
    }
    if (key < N) {
#pragma unroll
        for (int c = 0; c < D / 8; ++c) {
            dk[(int64_t)key * D + cg + 8 * c] = dka[0][c] * scale;
            dv[(int64_t)key * D + cg + 8 * c] = dva[0][c];
        }
    }
}

// FA2 Algorithm 2, dQ half: the block owns 32 query rows and walks the visible K/V tiles,
// recomputing P and dS; dQ = scale * dS K stays in registers. grid = (B*H, ceil(N/32)),
// Q tiles last-first (longest causal rows first).
template <int D>
__global__ void __launch_bounds__(kSimtThreads)
flash_bwd_dq_f32_kernel(const float *__restrict__ q,     // [B,H,N,D]
                        const float *__restrict__ k,     // [B,Hkv,N,D]
                        const float *__restrict__ v,     // [B,Hkv,N,D]
                        const float *__restrict__ d_o,   // [B,H,N,D]
                        const float *__restrict__ lse,   // [B,H,N]
                        const float *__restrict__ delta, // [B,H,N]
                        float *__restrict__ dq,          // [B,H,N,D]
                        int N, int causal, float scale, float scale_log2, int group) {
    constexpr int T = kF32BwdT, LDS = D + 1, LDP = T + 1;
    extern __shared__ __align__(16) unsigned char smem_raw[];
    float *sQ = reinterpret_cast<float *>(smem_raw); // [T][LDS]
    float *sdO = sQ + T * LDS;                       // [T][LDS]
    float *sK = sdO + T * LDS;                       // [T][LDS]
    float *sV = sK + T * LDS;                        // [T][LDS]
    float *sdS = sV + T * LDS;                       // [T rows][LDP]

    const int n_qt = (N + T - 1) / T;
    const int q0 = (n_qt - 1 - (int)blockIdx.y) * T;
    const int64_t bh = blockIdx.x;
    const int64_t off = bh * N * D, kv_off = (bh / group) * N * D; // kv head of query head bh
    q += off;
    k += kv_off;
    v += kv_off;
    d_o += off;
    dq += off;
    const int tid = threadIdx.x, rg = tid >> 3, cg = tid & 7;
    const int row = q0 + rg;
    const float lse2 = row < N ? lse[bh * N + row] * kLog2e : 0.f;
    const float dl = row < N ? delta[bh * N + row] : 0.f;

    simt_load_tile<D, T>(sQ, q, q0, N);
    simt_load_tile<D, T>(sdO, d_o, q0, N);

    float dqa[1][D / 8];
#pragma unroll
    for (int c = 0; c < D / 8; ++c) dqa[0][c] = 0.f;

    const int kv_end = causal ? min(N, q0 + T) : N;
    const int n_kv = (kv_end + T - 1) / T;
    for (int j = 0; j < n_kv; ++j) {
        const int n0 = j * T;
        __syncthreads();
        simt_load_tile<D, T>(sK, k, n0, N);
        simt_load_tile<D, T>(sV, v, n0, N);
        __syncthreads();
        float s[1][4] = {{0.f, 0.f, 0.f, 0.f}}, dp[1][4] = {{0.f, 0.f, 0.f, 0.f}};
        simt_abt<D, 1>(s, sQ, sK, rg, cg);   // S[q][key]
        simt_abt<D, 1>(dp, sdO, sV, rg, cg); // dP[q][key]
#pragma unroll
        for (int jj = 0; jj < 4; ++jj) {
            const int key = n0 + cg + 8 * jj;
            float p = exp2f(s[0][jj] * scale_log2 - lse2);
            if (key >= N || (causal && key > row)) p = 0.f;
            sdS[rg * LDP + cg + 8 * jj] = p * (dp[0][jj] - dl);
        }
        __syncthreads();
        simt_px<D, 1, T>(dqa, sdS, sK, rg, cg); // dQ += dS K
    }
    if (row < N) {
#pragma unroll
        for (int c = 0; c < D / 8; ++c) dq[(int64_t)row * D + cg + 8 * c] = dqa[0][c] * scale;
    }
}

// ====================================================================================
// Flash attention, bf16 tensor cores (mma.sync m16n8k16, sm_80+)
// ====================================================================================
// Shared-memory tiles are [rows][D + 8] bf16: the 16-byte pad shifts consecutive rows by
// 4 banks, so the 8 row addresses of every ldmatrix 8x8 matrix (8 rows, one 16-byte column
// chunk each) cover all 32 banks: conflict-free without a swizzle, and rows stay 16-byte
// aligned for cp.async and uint4 stores.
//
// Fragment layouts (PTX ISA, mma.m16n8k16 .bf16): lane = 4*g + t.
//   A (16x16, row): a0a1 = (g, 2t..2t+1), a2a3 = (g+8, 2t..), a4a5 = (g, 8+2t..), a6a7 = (g+8, 8+2t..)
//   B (16x8, col):  b0b1 = (k = 2t..2t+1, n = g), b2b3 = (k = 8+2t.., n = g)
//   C (16x8, f32):  c0c1 = (g, 2t..2t+1), c2c3 = (g+8, 2t..2t+1)
// So the C fragments of two adjacent n8 blocks are exactly an A fragment of the next
// product once packed to bf16: P never leaves registers (FA2 sec. 3.3).

constexpr int kMmaThreads = 128; // 4 warps

using hr::smem_u32;

// 16-byte async copy global -> shared; pred = false zero-fills the 16 bytes (src-size 0,
// src must still be a valid address, so callers pass the slice base).
__device__ __forceinline__ void cp_async_16(void *dst, const void *src, bool pred) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_u32(dst)), "l"(src),
                 "r"(pred ? 16 : 0)
                 : "memory");
}
__device__ __forceinline__ void cp_async_4(void *dst, const void *src, bool pred) {
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(smem_u32(dst)), "l"(src),
                 "r"(pred ? 4 : 0)
                 : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

__device__ __forceinline__ void ldsm_x4(uint32_t (&r)[4], const bf16 *p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(smem_u32(p))
                 : "memory");
}
__device__ __forceinline__ void ldsm_x4_trans(uint32_t (&r)[4], const bf16 *p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(smem_u32(p))
                 : "memory");
}

// c += a * b  (16x8x16, bf16 in, fp32 accumulate)
__device__ __forceinline__ void mma_bf16_16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0,
                                               uint32_t b1) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
        "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

using hr::pack_bf16x2;

// A fragment: the 16x16 block at (r0, c0) of a row-major smem matrix (stride STR).
// ldmatrix matrices 0..3 = (rows +0, cols +0), (+8, +0), (+0, +8), (+8, +8) = a0a1..a6a7.
template <int STR>
__device__ __forceinline__ void ld_frag_a(uint32_t (&a)[4], const bf16 *s, int r0, int c0, int lane) {
    const int mi = lane >> 3;
    ldsm_x4(a, s + (r0 + (mi & 1) * 8 + (lane & 7)) * STR + c0 + (mi >> 1) * 8);
}
// B fragments of two n8 blocks from a matrix stored [n][k] (k contiguous: K or V rows in
// S = Q K^T, dP = dO V^T): rows n0..n0+15, cols k0..k0+15. b[0..1]: n0..n0+7, b[2..3]: n0+8..
// Matrices 0..3 = (n +0, k +0), (n +0, k +8), (n +8, k +0), (n +8, k +8).
template <int STR>
__device__ __forceinline__ void ld_frag_b_nk(uint32_t (&b)[4], const bf16 *s, int n0, int k0, int lane) {
    const int mi = lane >> 3;
    ldsm_x4(b, s + (n0 + (mi >> 1) * 8 + (lane & 7)) * STR + k0 + (mi & 1) * 8);
}
// B fragments of two n8 blocks from a matrix stored [k][n] (n contiguous: V in P V, K in
// dS K, dO / Q in the dK/dV products), transposed by ldmatrix.trans: rows k0..k0+15,
// cols n0..n0+15. Matrices 0..3 = (k +0, n +0), (k +8, n +0), (k +0, n +8), (k +8, n +8).
template <int STR>
__device__ __forceinline__ void ld_frag_b_kn(uint32_t (&b)[4], const bf16 *s, int k0, int n0, int lane) {
    const int mi = lane >> 3;
    ldsm_x4_trans(b, s + (k0 + (mi & 1) * 8 + (lane & 7)) * STR + n0 + (mi >> 1) * 8);
}

// acc (16 x 8NB) += A (16 x 16KS, register fragments) . B^T, B stored [8NB][>=16KS] in smem.
template <int STR, int KS, int NB>
__device__ __forceinline__ void warp_mma_abt(float (&acc)[NB][4], const uint32_t (&a)[KS][4],
                                             const bf16 *sB, int lane) {
    static_assert(NB % 2 == 0, "n blocks come in pairs");
#pragma unroll
    for (int ks = 0; ks < KS; ++ks)
#pragma unroll
        for (int nb = 0; nb < NB; nb += 2) {
            uint32_t b[4];
            ld_frag_b_nk<STR>(b, sB, nb * 8, ks * 16, lane);
            mma_bf16_16816(acc[nb], a[ks], b[0], b[1]);
            mma_bf16_16816(acc[nb + 1], a[ks], b[2], b[3]);
        }
}
// Same, with A read from smem rows a_r0..a_r0+15 one k step at a time (keeps registers low).
template <int STR, int KS, int NB>
__device__ __forceinline__ void warp_mma_abt_sa(float (&acc)[NB][4], const bf16 *sA, int a_r0,
                                                const bf16 *sB, int lane) {
#pragma unroll
    for (int ks = 0; ks < KS; ++ks) {
        uint32_t a[4];
        ld_frag_a<STR>(a, sA, a_r0, ks * 16, lane);
#pragma unroll
        for (int nb = 0; nb < NB; nb += 2) {
            uint32_t b[4];
            ld_frag_b_nk<STR>(b, sB, nb * 8, ks * 16, lane);
            mma_bf16_16816(acc[nb], a, b[0], b[1]);
            mma_bf16_16816(acc[nb + 1], a, b[2], b[3]);
        }
    }
}
// acc (16 x 8NB) += bf16(P) (16 x 16KS, fp32 C fragments p[2KS]) . B, B stored [16KS][8NB]
// in smem (n contiguous). The register-reuse step of FA2: C fragments -> A fragments.
template <int STR, int KS, int NB>
__device__ __forceinline__ void warp_mma_pb(float (&acc)[NB][4], const float (&p)[2 * KS][4],
                                            const bf16 *sB, int lane) {
#pragma unroll
    for (int ks = 0; ks < KS; ++ks) {
        uint32_t a[4];
        a[0] = pack_bf16x2(p[2 * ks][0], p[2 * ks][1]);         // (g,   k 2t..)
        a[1] = pack_bf16x2(p[2 * ks][2], p[2 * ks][3]);         // (g+8, k 2t..)
        a[2] = pack_bf16x2(p[2 * ks + 1][0], p[2 * ks + 1][1]); // (g,   k 8+2t..)
        a[3] = pack_bf16x2(p[2 * ks + 1][2], p[2 * ks + 1][3]); // (g+8, k 8+2t..)
#pragma unroll
        for (int nb = 0; nb < NB; nb += 2) {
            uint32_t b[4];
            ld_frag_b_kn<STR>(b, sB, ks * 16, nb * 8, lane);
            mma_bf16_16816(acc[nb], a, b[0], b[1]);
            mma_bf16_16816(acc[nb + 1], a, b[2], b[3]);
        }
    }
}

// Rows [row0, row0 + ROWS) of one [N, D] bf16 slice into smem (stride D+8) with cp.async;
// rows >= N are zero-filled (so padded keys/values are finite zeros, never stale data).
template <int D, int ROWS>
__device__ __forceinline__ void bf16_load_tile_async(bf16 *s, const bf16 *__restrict__ g, int row0,
                                                     int N) {
    constexpr int CPR = D / 8, STR = D + 8;
    static_assert((ROWS * CPR) % kMmaThreads == 0, "tile must split evenly over the block");
#pragma unroll
    for (int it = 0; it < ROWS * CPR / kMmaThreads; ++it) {
        const int c = threadIdx.x + it * kMmaThreads;
        const int r = c / CPR, cc = c % CPR;
        const int row = row0 + r;
        const bool ok = row < N;
        cp_async_16(s + r * STR + cc * 8, ok ? g + (int64_t)row * D + cc * 8 : g, ok);
    }
}
// ROWS fp32 statistics (lse or delta) starting at row0; rows >= N zero-filled.
template <int ROWS>
__device__ __forceinline__ void f32_load_vec_async(float *s, const float *__restrict__ g, int row0,
                                                   int N) {
    static_assert(ROWS <= kMmaThreads, "one element per thread");
    if (threadIdx.x < ROWS) {
        const int row = row0 + threadIdx.x;
        const bool ok = row < N;
        cp_async_4(s + threadIdx.x, ok ? g + row : g, ok);
    }
}

// Each warp writes its 16 x D fp32 accumulator block (rows r0.. of smem tile s, packed
// bf16) then stores the rows < N of it to global with 16-byte stores.
template <int D>
__device__ __forceinline__ void warp_store_rows_bf16(const float (&acc)[D / 8][4], float mul,
                                                     bf16 *s, int r0, bf16 *__restrict__ g,
                                                     int grow0, int N, int lane) {
    constexpr int STR = D + 8, CPR = D / 8;
    const int gq = lane >> 2, t = lane & 3;
    __syncwarp();
#pragma unroll
    for (int nb = 0; nb < D / 8; ++nb) {
        *reinterpret_cast<uint32_t *>(s + (r0 + gq) * STR + nb * 8 + 2 * t) =
            pack_bf16x2(acc[nb][0] * mul, acc[nb][1] * mul);
        *reinterpret_cast<uint32_t *>(s + (r0 + gq + 8) * STR + nb * 8 + 2 * t) =
            pack_bf16x2(acc[nb][2] * mul, acc[nb][3] * mul);
    }
    __syncwarp();
#pragma unroll
    for (int it = 0; it < 16 * CPR / 32; ++it) {
        const int c = lane + it * 32;
        const int r = c / CPR, cc = c % CPR;
        const int row = grow0 + r;
        if (row < N)
            *reinterpret_cast<uint4 *>(g + (int64_t)row * D + cc * 8) =
                *reinterpret_cast<const uint4 *>(s + (r0 + r) * STR + cc * 8);
    }
}

constexpr int kBfFwdBM = 64, kBfFwdBN = 64;
// Rows of the tile streamed by the backward kernels: d=128 halves it (registers, smem).
template <int D> struct BfBwdInner { static constexpr int value = D == 64 ? 64 : 32; };
constexpr int kBfBwdBN = 64; // keys per dK/dV block
constexpr int kBfBwdBM = 64; // query rows per dQ block

template <int D>
constexpr size_t bf_fwd_smem() {
    return sizeof(bf16) * (size_t)(kBfFwdBM + 4 * kBfFwdBN) * (D + 8);
}
template <int D>
constexpr size_t bf_dkdv_smem() {
    return sizeof(bf16) * (size_t)(2 * kBfBwdBN + 4 * BfBwdInner<D>::value) * (D + 8) +
           sizeof(float) * 4 * BfBwdInner<D>::value;
}
template <int D>
constexpr size_t bf_dq_smem() {
    return sizeof(bf16) * (size_t)(2 * kBfBwdBM + 4 * BfBwdInner<D>::value) * (D + 8);
}

// FA2 Algorithm 1 with the sec. 3.3 warp partitioning: each of the 4 warps owns 16 query
// rows and all of K/V, so the softmax statistics never cross warps. Q fragments are loaded
// once into registers; K/V tiles j+1 stream in (cp.async) while tile j is computed.
// grid = (B*H, ceil(N/64)), Q tiles last-first.
template <int D>
__global__ void __launch_bounds__(kMmaThreads)
flash_fwd_bf16_kernel(const bf16 *__restrict__ q, // [B,H,N,D]
                      const bf16 *__restrict__ k, // [B,Hkv,N,D]
                      const bf16 *__restrict__ v, // [B,Hkv,N,D]
                      bf16 *__restrict__ o,       // [B,H,N,D]
                      float *__restrict__ lse,    // [B,H,N] or nullptr
                      int N, int causal, float scale_log2, int group) {
    constexpr int BM = kBfFwdBM, BN = kBfFwdBN, STR = D + 8, KS = D / 16;
    extern __shared__ __align__(16) unsigned char smem_raw[];
    bf16 *sQ = reinterpret_cast<bf16 *>(smem_raw); // [BM][STR] (reused to stage O)
    bf16 *sK = sQ + BM * STR;                      // [2][BN][STR]
    bf16 *sV = sK + 2 * BN * STR;                  // [2][BN][STR]

    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const int g = lane >> 2, t = lane & 3;
    const int n_qt = (N + BM - 1) / BM;
    const int q0 = (n_qt - 1 - (int)blockIdx.y) * BM;
    const int64_t bh = blockIdx.x;
    const int64_t off = bh * N * D, kv_off = (bh / group) * N * D; // kv head of query head bh
    q += off;
    k += kv_off;
    v += kv_off;
    o += off;
    const int kv_end = causal ? min(N, q0 + BM) : N; // skip tiles above the diagonal
    const int n_kv = (kv_end + BN - 1) / BN;

    bf16_load_tile_async<D, BM>(sQ, q, q0, N);
    cp_async_commit(); // group: Q
    bf16_load_tile_async<D, BN>(sK, k, 0, N);
    bf16_load_tile_async<D, BN>(sV, v, 0, N);
    cp_async_commit(); // group: K/V tile 0
    cp_async_wait<1>(); // Q landed
    __syncthreads();

    uint32_t qf[KS][4];
#pragma unroll
    for (int ks = 0; ks < KS; ++ks) ld_frag_a<STR>(qf[ks], sQ, warp * 16, ks * 16, lane);

    float oacc[D / 8][4];
#pragma unroll
    for (int nb = 0; nb < D / 8; ++nb) oacc[nb][0] = oacc[nb][1] = oacc[nb][2] = oacc[nb][3] = 0.f;
    float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.f, 0.f}; // rows g and g+8 of this warp
    const int row_g = q0 + warp * 16 + g;

    for (int j = 0; j < n_kv; ++j) {
        const int buf = j & 1, n0 = j * BN;
        if (j + 1 < n_kv) { // prefetch the next tile into the other buffer
            bf16_load_tile_async<D, BN>(sK + (buf ^ 1) * BN * STR, k, n0 + BN, N);
            bf16_load_tile_async<D, BN>(sV + (buf ^ 1) * BN * STR, v, n0 + BN, N);
        }
        cp_async_commit();  // always commit (maybe empty) so "wait 1" means "tile j landed"
        cp_async_wait<1>();
        __syncthreads();
        const bf16 *cK = sK + buf * BN * STR;
        const bf16 *cV = sV + buf * BN * STR;

        float s[BN / 8][4];
#pragma unroll
        for (int nb = 0; nb < BN / 8; ++nb) s[nb][0] = s[nb][1] = s[nb][2] = s[nb][3] = 0.f;
        warp_mma_abt<STR, KS, BN / 8>(s, qf, cK, lane); // S = Q K^T

        const bool need_mask = (n0 + BN > N) || (causal && n0 + BN - 1 > q0);
        float mx[2] = {-INFINITY, -INFINITY};
#pragma unroll
        for (int nb = 0; nb < BN / 8; ++nb)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                float x = s[nb][e] * scale_log2;
                if (need_mask) {
                    const int key = n0 + nb * 8 + 2 * t + (e & 1);
                    const int row = row_g + (e >> 1) * 8;
                    if (key >= N || (causal && key > row)) x = -INFINITY;
                }
                s[nb][e] = x;
                mx[e >> 1] = fmaxf(mx[e >> 1], x);
            }
        float alpha[2], mu[2];
        hr::online_softmax_step(mx, m, mu, alpha);
        float rs[2] = {0.f, 0.f};
#pragma unroll
        for (int nb = 0; nb < BN / 8; ++nb)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const float pe = exp2f(s[nb][e] - mu[e >> 1]);
                s[nb][e] = pe;
                rs[e >> 1] += pe;
            }
#pragma unroll
        for (int h = 0; h < 2; ++h) l[h] = l[h] * alpha[h] + rs[h];
#pragma unroll
        for (int nb = 0; nb < D / 8; ++nb) {
            oacc[nb][0] *= alpha[0];
            oacc[nb][1] *= alpha[0];
            oacc[nb][2] *= alpha[1];
            oacc[nb][3] *= alpha[1];
        }
        warp_mma_pb<STR, BN / 16, D / 8>(oacc, s, cV, lane); // O += P V
        __syncthreads(); // buffer `buf` is refilled by the next iteration's prefetch
    }
    cp_async_wait<0>();

    // l is a per-lane partial over this lane's columns: finish it across the quad.
#pragma unroll
    for (int h = 0; h < 2; ++h) {
        l[h] += __shfl_xor_sync(kFull, l[h], 1);
        l[h] += __shfl_xor_sync(kFull, l[h], 2);
    }
    const float inv0 = 1.f / l[0], inv1 = 1.f / l[1];
#pragma unroll
    for (int nb = 0; nb < D / 8; ++nb) {
        oacc[nb][0] *= inv0;
        oacc[nb][1] *= inv0;
        oacc[nb][2] *= inv1;
        oacc[nb][3] *= inv1;
    }
    // sQ rows of this warp are read only by this warp (its Q fragments), so it can stage O there.
    warp_store_rows_bf16<D>(oacc, 1.f, sQ, warp * 16, o, q0 + warp * 16, N, lane);
    if (lse != nullptr && t == 0) {
        if (row_g < N) lse[bh * N + row_g] = m[0] * kLn2 + logf(l[0]);
        if (row_g + 8 < N) lse[bh * N + row_g + 8] = m[1] * kLn2 + logf(l[1]);
    }
}

// The 128-row form (technique flash-m128, FA2's tiling for the forward): each of the 4 warps
// owns 32 query rows as two m16 blocks, so every K and V fragment read from shared memory
// feeds two MMAs instead of one (half the ldmatrix traffic per MMA of the 64-row form). Q
// stays in shared memory and its fragments are read per k step (registers go to the two
// blocks' S and O). K and V are single-buffered with separate cp.async groups: V_j streams
// in while S_j = Q K_j^T is computed, K_{j+1} while the softmax and O += P V_j run. The
// softmax works on raw scores: the row maximum is taken before scaling (scale > 0, checked
// by the launcher) and each p = exp2(s * scale_log2 - m) is one FFMA and one MUFU.EX2.
// grid = (ceil(N/128), B*H): the query tiles of a head are neighbours in launch order and
// share its K/V in L2; causal tiles run longest first.
constexpr int kM128BM = 128;
// Keys per K/V tile: d = 128 holds 128 fp32 of O per thread, so its S tile is 32 keys wide.
template <int D> struct M128BN { static constexpr int value = D == 64 ? 64 : 32; };
template <int D>
constexpr size_t bf_fwd_m128_smem() {
    return sizeof(bf16) * (size_t)(kM128BM + 2 * M128BN<D>::value) * (D + 8);
}

// acc[b] (16 x 8NB, row block b) += A_b . B^T for the two row blocks at smem rows a_r0 and
// a_r0 + 16 of A (16KS columns); each B fragment (B stored [8NB][>=16KS]) is loaded once.
template <int STR, int KS, int NB>
__device__ __forceinline__ void warp_mma2_abt(float (&acc)[2][NB][4], const bf16 *sA, int a_r0,
                                              const bf16 *sB, int lane) {
    static_assert(NB % 2 == 0, "n blocks come in pairs");
#pragma unroll
    for (int ks = 0; ks < KS; ++ks) {
        uint32_t a0[4], a1[4];
        ld_frag_a<STR>(a0, sA, a_r0, ks * 16, lane);
        ld_frag_a<STR>(a1, sA, a_r0 + 16, ks * 16, lane);
#pragma unroll
        for (int nb = 0; nb < NB; nb += 2) {
            uint32_t b[4];
            ld_frag_b_nk<STR>(b, sB, nb * 8, ks * 16, lane);
            mma_bf16_16816(acc[0][nb], a0, b[0], b[1]);
            mma_bf16_16816(acc[0][nb + 1], a0, b[2], b[3]);
            mma_bf16_16816(acc[1][nb], a1, b[0], b[1]);
            mma_bf16_16816(acc[1][nb + 1], a1, b[2], b[3]);
        }
    }
}
// acc[b] (16 x 8NB) += bf16(P_b) . B for both row blocks, B stored [16KS][8NB] (n
// contiguous), each B fragment loaded once; P_b's C fragments become A fragments as in
// warp_mma_pb.
template <int STR, int KS, int NB>
__device__ __forceinline__ void warp_mma2_pb(float (&acc)[2][NB][4], const float (&p)[2][2 * KS][4],
                                             const bf16 *sB, int lane) {
#pragma unroll
    for (int ks = 0; ks < KS; ++ks) {
        uint32_t a[2][4];
#pragma unroll
        for (int b = 0; b < 2; ++b) {
            a[b][0] = pack_bf16x2(p[b][2 * ks][0], p[b][2 * ks][1]);
            a[b][1] = pack_bf16x2(p[b][2 * ks][2], p[b][2 * ks][3]);
            a[b][2] = pack_bf16x2(p[b][2 * ks + 1][0], p[b][2 * ks + 1][1]);
            a[b][3] = pack_bf16x2(p[b][2 * ks + 1][2], p[b][2 * ks + 1][3]);
        }
#pragma unroll
        for (int nb = 0; nb < NB; nb += 2) {
            uint32_t bf[4];
            ld_frag_b_kn<STR>(bf, sB, ks * 16, nb * 8, lane);
            mma_bf16_16816(acc[0][nb], a[0], bf[0], bf[1]);
            mma_bf16_16816(acc[0][nb + 1], a[0], bf[2], bf[3]);
            mma_bf16_16816(acc[1][nb], a[1], bf[0], bf[1]);
            mma_bf16_16816(acc[1][nb + 1], a[1], bf[2], bf[3]);
        }
    }
}

template <int D>
__global__ void __launch_bounds__(kMmaThreads)
flash_fwd_bf16_m128_kernel(const bf16 *__restrict__ q, // [B,H,N,D]
                           const bf16 *__restrict__ k, // [B,Hkv,N,D]
                           const bf16 *__restrict__ v, // [B,Hkv,N,D]
                           bf16 *__restrict__ o,       // [B,H,N,D]
                           float *__restrict__ lse,    // [B,H,N] or nullptr
                           int N, int causal, float scale_log2, int group) {
    constexpr int BM = kM128BM, BN = M128BN<D>::value, STR = D + 8, KS = D / 16;
    extern __shared__ __align__(16) unsigned char smem_raw[];
    bf16 *sQ = reinterpret_cast<bf16 *>(smem_raw); // [BM][STR] (reused to stage O)
    bf16 *sK = sQ + BM * STR;                      // [BN][STR]
    bf16 *sV = sK + BN * STR;                      // [BN][STR]

    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const int g = lane >> 2, t = lane & 3;
    const int n_qt = (N + BM - 1) / BM;
    const int q0 = (causal ? n_qt - 1 - (int)blockIdx.x : (int)blockIdx.x) * BM;
    const int64_t bh = blockIdx.y;
    const int64_t off = bh * N * D, kv_off = (bh / group) * N * D; // kv head of query head bh
    q += off;
    k += kv_off;
    v += kv_off;
    o += off;
    const int kv_end = causal ? min(N, q0 + BM) : N; // skip tiles above the diagonal
    const int n_kv = (kv_end + BN - 1) / BN;
    const int r0 = warp * 32; // this warp's rows of the tile: r0.. (block 0), r0 + 16.. (block 1)
    const int row_g = q0 + r0 + g; // rows row_g + 16 b + 8 h, b, h in {0, 1}

    bf16_load_tile_async<D, BM>(sQ, q, q0, N);
    bf16_load_tile_async<D, BN>(sK, k, 0, N);
    cp_async_commit(); // group: Q and K_0

    float oacc[2][D / 8][4];
#pragma unroll
    for (int b = 0; b < 2; ++b)
#pragma unroll
        for (int nb = 0; nb < D / 8; ++nb)
            oacc[b][nb][0] = oacc[b][nb][1] = oacc[b][nb][2] = oacc[b][nb][3] = 0.f;
    // Running maxima (log2 domain, scaled) and partial sums of rows row_g + 16 b + 8 h: [2b + h].
    float m[4] = {-INFINITY, -INFINITY, -INFINITY, -INFINITY}, l[4] = {0.f, 0.f, 0.f, 0.f};

    for (int j = 0; j < n_kv; ++j) {
        const int n0 = j * BN;
        cp_async_wait<0>(); // K_j (and Q on the first pass) landed
        __syncthreads();    // ... for every thread; and every warp is done with V_{j-1}
        // (The tile's rows from its own base: the offsets stay thread constants.)
        bf16_load_tile_async<D, BN>(sV, v + (int64_t)n0 * D, 0, N - n0);
        cp_async_commit(); // group: V_j

        float s[2][BN / 8][4];
#pragma unroll
        for (int b = 0; b < 2; ++b)
#pragma unroll
            for (int nb = 0; nb < BN / 8; ++nb) s[b][nb][0] = s[b][nb][1] = s[b][nb][2] = s[b][nb][3] = 0.f;
        warp_mma2_abt<STR, KS, BN / 8>(s, sQ, r0, sK, lane); // S = Q K^T (raw)

        const bool need_mask = (n0 + BN > N) || (causal && n0 + BN - 1 > q0 + r0);
        float mx[2][2] = {{-INFINITY, -INFINITY}, {-INFINITY, -INFINITY}};
#pragma unroll
        for (int b = 0; b < 2; ++b)
#pragma unroll
            for (int nb = 0; nb < BN / 8; ++nb)
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    float x = s[b][nb][e];
                    if (need_mask) {
                        const int key = n0 + nb * 8 + 2 * t + (e & 1);
                        const int row = row_g + 16 * b + (e >> 1) * 8;
                        if (key >= N || (causal && key > row)) x = -INFINITY;
                    }
                    s[b][nb][e] = x;
                    mx[b][e >> 1] = fmaxf(mx[b][e >> 1], x);
                }

        cp_async_wait<0>(); // V_j landed
        __syncthreads();    // ... for every thread; and every warp is done with K_j
        if (j + 1 < n_kv) {
            bf16_load_tile_async<D, BN>(sK, k + (int64_t)(n0 + BN) * D, 0, N - n0 - BN);
            cp_async_commit(); // group: K_{j+1}
        }

#pragma unroll
        for (int b = 0; b < 2; ++b) {
            // scale_log2 > 0, so the maximum of the raw scores scales to the maximum of the
            // scaled ones; -inf (a row with no visible key yet) stays -inf.
            float mxs[2], mb[2] = {m[2 * b], m[2 * b + 1]}, alpha[2], mu[2];
#pragma unroll
            for (int h = 0; h < 2; ++h) mxs[h] = mx[b][h] == -INFINITY ? -INFINITY : mx[b][h] * scale_log2;
            hr::online_softmax_step(mxs, mb, mu, alpha);
            float rs[2] = {0.f, 0.f};
#pragma unroll
            for (int nb = 0; nb < BN / 8; ++nb)
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    const float pe = exp2f(fmaf(s[b][nb][e], scale_log2, -mu[e >> 1]));
                    s[b][nb][e] = pe;
                    rs[e >> 1] += pe;
                }
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                m[2 * b + h] = mb[h];
                l[2 * b + h] = l[2 * b + h] * alpha[h] + rs[h];
            }
#pragma unroll
            for (int nb = 0; nb < D / 8; ++nb) {
                oacc[b][nb][0] *= alpha[0];
                oacc[b][nb][1] *= alpha[0];
                oacc[b][nb][2] *= alpha[1];
                oacc[b][nb][3] *= alpha[1];
            }
        }
        warp_mma2_pb<STR, BN / 16, D / 8>(oacc, s, sV, lane); // O += P V
    }

    // l is a per-lane partial over this lane's columns: finish it across the quad.
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        l[i] += __shfl_xor_sync(kFull, l[i], 1);
        l[i] += __shfl_xor_sync(kFull, l[i], 2);
    }
#pragma unroll
    for (int b = 0; b < 2; ++b) {
        const float inv0 = 1.f / l[2 * b], inv1 = 1.f / l[2 * b + 1];
#pragma unroll
        for (int nb = 0; nb < D / 8; ++nb) {
            oacc[b][nb][0] *= inv0;
            oacc[b][nb][1] *= inv0;
            oacc[b][nb][2] *= inv1;
            oacc[b][nb][3] *= inv1;
        }
        // The warp's rows of sQ are read only by this warp (its Q fragments): stage O there.
        warp_store_rows_bf16<D>(oacc[b], 1.f, sQ, r0 + 16 * b, o, q0 + r0 + 16 * b, N, lane);
    }
    if (lse != nullptr && t == 0) {
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            const int row = row_g + 16 * (i >> 1) + 8 * (i & 1);
            if (row < N) lse[bh * N + row] = m[i] * kLn2 + logf(l[i]);
        }
    }
}

// FA2 Algorithm 2 (sec. 3.1.2), dK/dV half on tensor cores. Each warp owns 16 keys; the
// transposed tiles S^T = K Q^T and dP^T = V dO^T put keys on the fragment rows, so P^T and
// dS^T are A fragments of dV += P^T dO and dK += dS^T Q with no shuffles. K and V stay in
// smem (A fragments re-read per Q tile: fewer registers for d = 128); Q/dO/lse/delta tiles
// are double-buffered. GQA: the block walks the G query heads of its kv head in head order,
// their Q tiles flattened into one stream (head-major) so the double buffer prefetches across
// a head boundary too. grid = (B*Hkv, ceil(N/64)); causal blocks near 0 are the long ones and
// launch first.
template <int D>
__global__ void __launch_bounds__(kMmaThreads)
flash_bwd_dkdv_bf16_kernel(const bf16 *__restrict__ q,      // [B,H,N,D]
                           const bf16 *__restrict__ k,      // [B,Hkv,N,D]
                           const bf16 *__restrict__ v,      // [B,Hkv,N,D]
                           const bf16 *__restrict__ d_o,    // [B,H,N,D]
                           const float *__restrict__ lse,   // [B,H,N]
                           const float *__restrict__ delta, // [B,H,N]
                           bf16 *__restrict__ dk,           // [B,Hkv,N,D]
                           bf16 *__restrict__ dv,           // [B,Hkv,N,D]
                           int N, int causal, float scale, float scale_log2, int group) {
    constexpr int BN = kBfBwdBN, BQ = BfBwdInner<D>::value, STR = D + 8, KS = D / 16;
    extern __shared__ __align__(16) unsigned char smem_raw[];
    bf16 *sK = reinterpret_cast<bf16 *>(smem_raw); // [BN][STR] (reused to stage dK)
    bf16 *sV = sK + BN * STR;                      // [BN][STR] (reused to stage dV)
    bf16 *sQ = sV + BN * STR;                      // [2][BQ][STR]
    bf16 *sdO = sQ + 2 * BQ * STR;                 // [2][BQ][STR]
    float *sL = reinterpret_cast<float *>(sdO + 2 * BQ * STR); // [2][BQ] lse
    float *sDl = sL + 2 * BQ;                                   // [2][BQ] delta

    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const int g = lane >> 2, t = lane & 3;
    const int64_t bkv = blockIdx.x, bh0 = bkv * group; // kv head; its group's first query head
    const int64_t kv_off = bkv * N * D, hs = (int64_t)N * D; // hs: one head's elements
    q += bh0 * hs;
    d_o += bh0 * hs;
    lse += bh0 * N;
    delta += bh0 * N;
    k += kv_off;
    v += kv_off;
    dk += kv_off;
    dv += kv_off;
    const int n0 = blockIdx.y * BN;
    const int n_qt = (N + BQ - 1) / BQ;
    const int it0 = causal ? n0 / BQ : 0; // earlier Q tiles see none of these keys
    const int per = n_qt - it0;           // Q tiles of one query head that see these keys
    const int steps = group * per;        // step x: query head x / per, tile it0 + x % per

    bf16_load_tile_async<D, BN>(sK, k, n0, N);
    bf16_load_tile_async<D, BN>(sV, v, n0, N);
    bf16_load_tile_async<D, BQ>(sQ, q, it0 * BQ, N);
    bf16_load_tile_async<D, BQ>(sdO, d_o, it0 * BQ, N);
    f32_load_vec_async<BQ>(sL, lse, it0 * BQ, N);
    f32_load_vec_async<BQ>(sDl, delta, it0 * BQ, N);
    cp_async_commit();

    float dka[D / 8][4], dva[D / 8][4];
#pragma unroll
    for (int nb = 0; nb < D / 8; ++nb)
#pragma unroll
        for (int e = 0; e < 4; ++e) dka[nb][e] = dva[nb][e] = 0.f;
    const int key_g = n0 + warp * 16 + g; // this lane's keys: key_g, key_g + 8

    for (int x = 0; x < steps; ++x) {
        const int buf = x & 1, qs = (it0 + x % per) * BQ;
        if (x + 1 < steps) {
            const int nb_ = buf ^ 1, hn = (x + 1) / per, qn = (it0 + (x + 1) % per) * BQ;
            bf16_load_tile_async<D, BQ>(sQ + nb_ * BQ * STR, q + hn * hs, qn, N);
            bf16_load_tile_async<D, BQ>(sdO + nb_ * BQ * STR, d_o + hn * hs, qn, N);
            f32_load_vec_async<BQ>(sL + nb_ * BQ, lse + (int64_t)hn * N, qn, N);
            f32_load_vec_async<BQ>(sDl + nb_ * BQ, delta + (int64_t)hn * N, qn, N);
        }
        cp_async_commit();
        cp_async_wait<1>();
        __syncthreads();
        const bf16 *cQ = sQ + buf * BQ * STR;
        const bf16 *cdO = sdO + buf * BQ * STR;
        const float *cL = sL + buf * BQ;
        const float *cD = sDl + buf * BQ;

        float st[BQ / 8][4], dpt[BQ / 8][4];
#pragma unroll
        for (int nb = 0; nb < BQ / 8; ++nb)
#pragma unroll
            for (int e = 0; e < 4; ++e) st[nb][e] = dpt[nb][e] = 0.f;
        warp_mma_abt_sa<STR, KS, BQ / 8>(st, sK, warp * 16, cQ, lane);   // S^T  = K Q^T
        warp_mma_abt_sa<STR, KS, BQ / 8>(dpt, sV, warp * 16, cdO, lane); // dP^T = V dO^T

        // Padded query rows (>= N) were zero-filled (lse = 0 there): mask them like causal.
        const bool need_mask = (qs + BQ > N) || (causal && qs < n0 + BN - 1);
#pragma unroll
        for (int nb = 0; nb < BQ / 8; ++nb)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int ql = nb * 8 + 2 * t + (e & 1);
                float p = exp2f(st[nb][e] * scale_log2 - cL[ql] * kLog2e);
                if (need_mask) {
                    const int qrow = qs + ql, key = key_g + (e >> 1) * 8;
                    if (qrow >= N || (causal && key > qrow)) p = 0.f;
                }
                st[nb][e] = p;                              // P^T
                dpt[nb][e] = p * (dpt[nb][e] - cD[ql]);     // dS^T
            }
        warp_mma_pb<STR, BQ / 16, D / 8>(dva, st, cdO, lane); // dV += P^T dO
        warp_mma_pb<STR, BQ / 16, D / 8>(dka, dpt, cQ, lane); // dK += dS^T Q
        __syncthreads();
    }
    cp_async_wait<0>();

    // Rows of sK/sV of this warp were read only by this warp (its A fragments).
    warp_store_rows_bf16<D>(dka, scale, sK, warp * 16, dk, n0 + warp * 16, N, lane);
    warp_store_rows_bf16<D>(dva, 1.f, sV, warp * 16, dv, n0 + warp * 16, N, lane);
}

// FA2 Algorithm 2, dQ half on tensor cores: each warp owns 16 query rows (Q and dO
// fragments in registers, lse/delta of its rows in registers), walks the visible K/V tiles
// (double-buffered), and accumulates dQ = scale * dS K; dS is reused from the C fragments
// as the A operand. grid = (B*H, ceil(N/64)), Q tiles last-first.
template <int D>
__global__ void __launch_bounds__(kMmaThreads)
flash_bwd_dq_bf16_kernel(const bf16 *__restrict__ q,      // [B,H,N,D]
                         const bf16 *__restrict__ k,      // [B,Hkv,N,D]
                         const bf16 *__restrict__ v,      // [B,Hkv,N,D]
                         const bf16 *__restrict__ d_o,    // [B,H,N,D]
                         const float *__restrict__ lse,   // [B,H,N]
                         const float *__restrict__ delta, // [B,H,N]
                         bf16 *__restrict__ dq,           // [B,H,N,D]
                         int N, int causal, float scale, float scale_log2, int group) {
    constexpr int BM = kBfBwdBM, BKV = BfBwdInner<D>::value, STR = D + 8, KS = D / 16;
    extern __shared__ __align__(16) unsigned char smem_raw[];
    bf16 *sQ = reinterpret_cast<bf16 *>(smem_raw); // [BM][STR] (reused to stage dQ)
    bf16 *sdO = sQ + BM * STR;                     // [BM][STR]
    bf16 *sK = sdO + BM * STR;                     // [2][BKV][STR]
    bf16 *sV = sK + 2 * BKV * STR;                 // [2][BKV][STR]

    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const int g = lane >> 2, t = lane & 3;
    const int n_qt = (N + BM - 1) / BM;
    const int q0 = (n_qt - 1 - (int)blockIdx.y) * BM;
    const int64_t bh = blockIdx.x;
    const int64_t off = bh * N * D, kv_off = (bh / group) * N * D; // kv head of query head bh
    q += off;
    k += kv_off;
    v += kv_off;
    d_o += off;
    dq += off;
    const int kv_end = causal ? min(N, q0 + BM) : N;
    const int n_kv = (kv_end + BKV - 1) / BKV;

    bf16_load_tile_async<D, BM>(sQ, q, q0, N);
    bf16_load_tile_async<D, BM>(sdO, d_o, q0, N);
    cp_async_commit(); // group: Q, dO
    bf16_load_tile_async<D, BKV>(sK, k, 0, N);
    bf16_load_tile_async<D, BKV>(sV, v, 0, N);
    cp_async_commit(); // group: K/V tile 0

    const int row_g = q0 + warp * 16 + g; // this lane's rows: row_g, row_g + 8
    float lse2[2], dl[2];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
        const int row = row_g + 8 * h;
        lse2[h] = row < N ? lse[bh * N + row] * kLog2e : 0.f;
        dl[h] = row < N ? delta[bh * N + row] : 0.f;
    }

    cp_async_wait<1>();
    __syncthreads();
    uint32_t qf[KS][4], dof[KS][4];
#pragma unroll
    for (int ks = 0; ks < KS; ++ks) {
        ld_frag_a<STR>(qf[ks], sQ, warp * 16, ks * 16, lane);
        ld_frag_a<STR>(dof[ks], sdO, warp * 16, ks * 16, lane);
    }

    float dqa[D / 8][4];
#pragma unroll
    for (int nb = 0; nb < D / 8; ++nb) dqa[nb][0] = dqa[nb][1] = dqa[nb][2] = dqa[nb][3] = 0.f;

    for (int j = 0; j < n_kv; ++j) {
        const int buf = j & 1, n0 = j * BKV;
        if (j + 1 < n_kv) {
            bf16_load_tile_async<D, BKV>(sK + (buf ^ 1) * BKV * STR, k, n0 + BKV, N);
            bf16_load_tile_async<D, BKV>(sV + (buf ^ 1) * BKV * STR, v, n0 + BKV, N);
        }
        cp_async_commit();
        cp_async_wait<1>();
        __syncthreads();
        const bf16 *cK = sK + buf * BKV * STR;
        const bf16 *cV = sV + buf * BKV * STR;

        float s[BKV / 8][4], dp[BKV / 8][4];
#pragma unroll
        for (int nb = 0; nb < BKV / 8; ++nb)
#pragma unroll
            for (int e = 0; e < 4; ++e) s[nb][e] = dp[nb][e] = 0.f;
        warp_mma_abt<STR, KS, BKV / 8>(s, qf, cK, lane);   // S  = Q K^T
        warp_mma_abt<STR, KS, BKV / 8>(dp, dof, cV, lane); // dP = dO V^T

        const bool need_mask = (n0 + BKV > N) || (causal && n0 + BKV - 1 > q0);
#pragma unroll
        for (int nb = 0; nb < BKV / 8; ++nb)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                float p = exp2f(s[nb][e] * scale_log2 - lse2[e >> 1]);
                if (need_mask) {
                    const int key = n0 + nb * 8 + 2 * t + (e & 1);
                    const int row = row_g + (e >> 1) * 8;
                    if (key >= N || (causal && key > row)) p = 0.f;
                }
                dp[nb][e] = p * (dp[nb][e] - dl[e >> 1]); // dS
            }
        warp_mma_pb<STR, BKV / 16, D / 8>(dqa, dp, cK, lane); // dQ += dS K
        __syncthreads();
    }
    cp_async_wait<0>();
    warp_store_rows_bf16<D>(dqa, scale, sQ, warp * 16, dq, q0 + warp * 16, N, lane);
}

// ====================================================================================
// Grouped-query attention: K/V between kv-head and query-head layouts (naive path)
// ====================================================================================
// dst [B*H, per] = src [B*Hkv, per] with row bh of dst = row bh / G of src (per = N*d).
// What eager GQA does before its matmuls (e.g. Llama's repeat_kv), so its memory is real.
template <typename T>
__global__ void __launch_bounds__(256)
repeat_kv_kernel(const T *__restrict__ src, T *__restrict__ dst, int64_t total, int64_t per,
                 int group) {
    const int64_t stride = (int64_t)gridDim.x * blockDim.x;
    for (int64_t e = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; e < total; e += stride) {
        const int64_t bh = e / per, r = e - bh * per;
        dst[e] = src[(bh / group) * per + r];
    }
}

// dst [B*Hkv, per] = sum_{g < G} src [kv*G + g, per]: one thread per output element, fp32 in
// head order, one rounding to T (deterministic; the backward of repeat_kv_kernel).
template <typename T>
__global__ void __launch_bounds__(256)
reduce_kv_kernel(const T *__restrict__ src, T *__restrict__ dst, int64_t total, int64_t per,
                 int group) {
    const int64_t stride = (int64_t)gridDim.x * blockDim.x;
    for (int64_t e = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; e < total; e += stride) {
        const int64_t kv = e / per, r = e - kv * per;
        const T *s = src + kv * group * per + r;
        float acc = 0.f;
        for (int g = 0; g < group; ++g) acc += hr::to_f32(s[g * per]);
        dst[e] = hr::from_f32<T>(acc);
    }
}

// ====================================================================================
// Launch helpers
// ====================================================================================

inline bool aligned16(const void *p) { return hr::aligned(p, 16); }

// Shapes every attention launcher shares. grid.x = B*H (< 2^31), grid.y = Q or K/V tiles
// (<= 65535 for the smallest tile, 32 rows).
inline bool attn_shape_ok(const hr_attention_params *p) {
    if (p->batch < 1 || p->heads < 1 || p->seq < 1) return false;
    if (p->kv_heads < 1 || p->heads % p->kv_heads != 0) return false;
    if (p->head_dim != 64 && p->head_dim != 128) return false;
    if ((int64_t)p->batch * p->heads > INT32_MAX) return false;
    if (hr::ceil_div(p->seq, 32) > 65535) return false;
    return true;
}

template <typename Kernel>
inline int allow_smem(Kernel kernel, size_t bytes) {
    if (bytes > 48 * 1024)
        HR_TRY(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)bytes));
    return 0;
}

// Enough warps (8 per block) to cover every row, capped; kernels grid-stride past the cap.
inline unsigned row_blocks(int64_t rows) {
    int64_t b = hr::ceil_div(rows, 8);
    if (b > (int64_t)1 << 20) b = (int64_t)1 << 20;
    return (unsigned)b;
}

template <typename T>
int launch_delta(const hr_attention_params *p, cudaStream_t stream) {
    const int64_t rows = (int64_t)p->batch * p->heads * p->seq;
    attn_delta_kernel<T><<<row_blocks(rows), 256, 0, stream>>>(
        static_cast<const T *>(p->o), static_cast<const T *>(p->d_o), p->delta, rows, p->head_dim);
    HR_RETURN_LAUNCH_STATUS();
}

template <int D>
int launch_fwd_f32(const hr_attention_params *p, cudaStream_t stream) {
    const size_t smem = f32_fwd_smem<D>();
    HR_TRY((cudaError_t)allow_smem(flash_fwd_f32_kernel<D>, smem));
    const dim3 grid((unsigned)(p->batch * p->heads), (unsigned)hr::ceil_div(p->seq, kF32FwdBM));
    flash_fwd_f32_kernel<D><<<grid, kSimtThreads, smem, stream>>>(
        static_cast<const float *>(p->q), static_cast<const float *>(p->k),
        static_cast<const float *>(p->v), static_cast<float *>(p->o), p->lse, p->seq, p->causal,
        p->scale * kLog2e, p->heads / p->kv_heads);
    HR_RETURN_LAUNCH_STATUS();
}

template <int D>
int launch_fwd_bf16(const hr_attention_params *p, cudaStream_t stream) {
    const size_t smem = bf_fwd_smem<D>();
    HR_TRY((cudaError_t)allow_smem(flash_fwd_bf16_kernel<D>, smem));
    const dim3 grid((unsigned)(p->batch * p->heads), (unsigned)hr::ceil_div(p->seq, kBfFwdBM));
    flash_fwd_bf16_kernel<D><<<grid, kMmaThreads, smem, stream>>>(
        static_cast<const bf16 *>(p->q), static_cast<const bf16 *>(p->k),
        static_cast<const bf16 *>(p->v), static_cast<bf16 *>(p->o), p->lse, p->seq, p->causal,
        p->scale * kLog2e, p->heads / p->kv_heads);
    HR_RETURN_LAUNCH_STATUS();
}

template <int D>
int launch_fwd_bf16_m128(const hr_attention_params *p, cudaStream_t stream) {
    const size_t smem = bf_fwd_m128_smem<D>();
    HR_TRY((cudaError_t)allow_smem(flash_fwd_bf16_m128_kernel<D>, smem));
    const dim3 grid((unsigned)hr::ceil_div(p->seq, kM128BM), (unsigned)(p->batch * p->heads));
    flash_fwd_bf16_m128_kernel<D><<<grid, kMmaThreads, smem, stream>>>(
        static_cast<const bf16 *>(p->q), static_cast<const bf16 *>(p->k),
        static_cast<const bf16 *>(p->v), static_cast<bf16 *>(p->o), p->lse, p->seq, p->causal,
        p->scale * kLog2e, p->heads / p->kv_heads);
    HR_RETURN_LAUNCH_STATUS();
}

template <int D>
int launch_bwd_f32(const hr_attention_params *p, cudaStream_t stream) {
    HR_TRY((cudaError_t)launch_delta<float>(p, stream));
    const unsigned bh = (unsigned)(p->batch * p->heads), bkv = (unsigned)(p->batch * p->kv_heads);
    const int group = p->heads / p->kv_heads;
    const unsigned tiles = (unsigned)hr::ceil_div(p->seq, kF32BwdT);
    const auto q = static_cast<const float *>(p->q), k = static_cast<const float *>(p->k),
               v = static_cast<const float *>(p->v), d_o = static_cast<const float *>(p->d_o);
    const float sl2 = p->scale * kLog2e;

    const size_t smem_kv = f32_dkdv_smem<D>();
    HR_TRY((cudaError_t)allow_smem(flash_bwd_dkdv_f32_kernel<D>, smem_kv));
    flash_bwd_dkdv_f32_kernel<D><<<dim3(bkv, tiles), kSimtThreads, smem_kv, stream>>>(
        q, k, v, d_o, p->lse, p->delta, static_cast<float *>(p->dk), static_cast<float *>(p->dv),
        p->seq, p->causal, p->scale, sl2, group);
    HR_TRY(cudaGetLastError());

    const size_t smem_q = f32_dq_smem<D>();
    HR_TRY((cudaError_t)allow_smem(flash_bwd_dq_f32_kernel<D>, smem_q));
    flash_bwd_dq_f32_kernel<D><<<dim3(bh, tiles), kSimtThreads, smem_q, stream>>>(
        q, k, v, d_o, p->lse, p->delta, static_cast<float *>(p->dq), p->seq, p->causal, p->scale,
        sl2, group);
    HR_RETURN_LAUNCH_STATUS();
}

template <int D>
int launch_bwd_bf16(const hr_attention_params *p, cudaStream_t stream) {
    HR_TRY((cudaError_t)launch_delta<bf16>(p, stream));
    const unsigned bh = (unsigned)(p->batch * p->heads), bkv = (unsigned)(p->batch * p->kv_heads);
    const int group = p->heads / p->kv_heads;
    const auto q = static_cast<const bf16 *>(p->q), k = static_cast<const bf16 *>(p->k),
               v = static_cast<const bf16 *>(p->v), d_o = static_cast<const bf16 *>(p->d_o);
    const float sl2 = p->scale * kLog2e;

    const size_t smem_kv = bf_dkdv_smem<D>();
    HR_TRY((cudaError_t)allow_smem(flash_bwd_dkdv_bf16_kernel<D>, smem_kv));
    flash_bwd_dkdv_bf16_kernel<D>
        <<<dim3(bkv, (unsigned)hr::ceil_div(p->seq, kBfBwdBN)), kMmaThreads, smem_kv, stream>>>(
            q, k, v, d_o, p->lse, p->delta, static_cast<bf16 *>(p->dk), static_cast<bf16 *>(p->dv),
            p->seq, p->causal, p->scale, sl2, group);
    HR_TRY(cudaGetLastError());

    const size_t smem_q = bf_dq_smem<D>();
    HR_TRY((cudaError_t)allow_smem(flash_bwd_dq_bf16_kernel<D>, smem_q));
    flash_bwd_dq_bf16_kernel<D>
        <<<dim3(bh, (unsigned)hr::ceil_div(p->seq, kBfBwdBM)), kMmaThreads, smem_q, stream>>>(
            q, k, v, d_o, p->lse, p->delta, static_cast<bf16 *>(p->dq), p->seq, p->causal,
            p->scale, sl2, group);
    HR_RETURN_LAUNCH_STATUS();
}

bool fwd_params_ok(const hr_attention_params *p) {
    // lse may be NULL (forward-only callers); everything else is required. The vector
    // (float4 / cp.async 16-byte) paths need 16-byte aligned tensors (cudaMalloc gives 256).
    return p != nullptr && attn_shape_ok(p) && p->q && p->k && p->v && p->o && aligned16(p->q) &&
           aligned16(p->k) && aligned16(p->v) && aligned16(p->o);
}
bool bwd_params_ok(const hr_attention_params *p) {
    return p != nullptr && attn_shape_ok(p) && p->q && p->k && p->v && p->o && p->lse && p->d_o &&
           p->delta && p->dq && p->dk && p->dv && aligned16(p->q) && aligned16(p->k) &&
           aligned16(p->v) && aligned16(p->d_o) && aligned16(p->dq) && aligned16(p->dk) &&
           aligned16(p->dv);
}
bool delta_params_ok(const hr_attention_params *p) {
    return p != nullptr && p->o && p->d_o && p->delta && p->batch >= 1 && p->heads >= 1 &&
           p->seq >= 1 && (p->head_dim == 64 || p->head_dim == 128);
}
bool softmax_params_ok(const hr_softmax_params *p) {
    return p != nullptr && p->scores && p->rows >= 1 && p->seq >= 1;
}

template <typename T>
int launch_softmax_fwd(const hr_softmax_params *p, cudaStream_t stream) {
    const int64_t rows = (int64_t)p->rows * p->seq;
    softmax_fwd_kernel<T><<<row_blocks(rows), 256, 0, stream>>>(static_cast<T *>(p->scores), p->lse,
                                                                rows, p->seq, p->causal);
    HR_RETURN_LAUNCH_STATUS();
}
template <typename T>
int launch_softmax_bwd(const hr_softmax_params *p, cudaStream_t stream) {
    const int64_t rows = (int64_t)p->rows * p->seq;
    softmax_bwd_kernel<T><<<row_blocks(rows), 256, 0, stream>>>(
        static_cast<const T *>(p->scores), static_cast<const T *>(p->dp), static_cast<T *>(p->ds),
        p->delta, rows, p->seq, p->causal);
    HR_RETURN_LAUNCH_STATUS();
}

bool repeat_kv_params_ok(const hr_repeat_kv_params *p) {
    return p != nullptr && p->src && p->dst && p->batch >= 1 && p->heads >= 1 &&
           p->kv_heads >= 1 && p->heads % p->kv_heads == 0 && p->seq >= 1 && p->head_dim >= 1;
}

// reduce = false: repeat_kv_kernel over the query-head layout; true: reduce_kv_kernel over
// the kv-head layout. Grid-stride, capped like row_blocks.
template <typename T>
int launch_repeat_kv(const hr_repeat_kv_params *p, bool reduce, cudaStream_t stream) {
    const int64_t per = (int64_t)p->seq * p->head_dim;
    const int group = p->heads / p->kv_heads;
    const int64_t total = (int64_t)p->batch * (reduce ? p->kv_heads : p->heads) * per;
    int64_t blocks = hr::ceil_div(total, 256);
    if (blocks > (int64_t)1 << 20) blocks = (int64_t)1 << 20;
    const auto src = static_cast<const T *>(p->src);
    const auto dst = static_cast<T *>(p->dst);
    if (reduce)
        reduce_kv_kernel<T><<<(unsigned)blocks, 256, 0, stream>>>(src, dst, total, per, group);
    else
        repeat_kv_kernel<T><<<(unsigned)blocks, 256, 0, stream>>>(src, dst, total, per, group);
    HR_RETURN_LAUNCH_STATUS();
}

} // namespace

// ====================================================================================
// extern "C" launchers (headroom.h)
// ====================================================================================

extern "C" int hr_softmax_forward_f32(const hr_softmax_params *p, hr_stream_t stream) {
    if (!softmax_params_ok(p)) return cudaErrorInvalidValue;
    return launch_softmax_fwd<float>(p, stream);
}
extern "C" int hr_softmax_forward_bf16(const hr_softmax_params *p, hr_stream_t stream) {
    if (!softmax_params_ok(p)) return cudaErrorInvalidValue;
    return launch_softmax_fwd<bf16>(p, stream);
}
extern "C" int hr_softmax_backward_f32(const hr_softmax_params *p, hr_stream_t stream) {
    if (!softmax_params_ok(p) || !p->dp || !p->ds || !p->delta) return cudaErrorInvalidValue;
    return launch_softmax_bwd<float>(p, stream);
}
extern "C" int hr_softmax_backward_bf16(const hr_softmax_params *p, hr_stream_t stream) {
    if (!softmax_params_ok(p) || !p->dp || !p->ds || !p->delta) return cudaErrorInvalidValue;
    return launch_softmax_bwd<bf16>(p, stream);
}

extern "C" int hr_attention_delta_f32(const hr_attention_params *p, hr_stream_t stream) {
    if (!delta_params_ok(p)) return cudaErrorInvalidValue;
    return launch_delta<float>(p, stream);
}
extern "C" int hr_attention_delta_bf16(const hr_attention_params *p, hr_stream_t stream) {
    if (!delta_params_ok(p)) return cudaErrorInvalidValue;
    return launch_delta<bf16>(p, stream);
}

extern "C" int hr_flash_attention_forward_f32(const hr_attention_params *p, hr_stream_t stream) {
    if (!fwd_params_ok(p)) return cudaErrorInvalidValue;
    return p->head_dim == 64 ? launch_fwd_f32<64>(p, stream) : launch_fwd_f32<128>(p, stream);
}
extern "C" int hr_flash_attention_forward_bf16(const hr_attention_params *p, hr_stream_t stream) {
    if (!fwd_params_ok(p)) return cudaErrorInvalidValue;
    return p->head_dim == 64 ? launch_fwd_bf16<64>(p, stream) : launch_fwd_bf16<128>(p, stream);
}
// The 128-row form takes B*H on grid.y (at most 65535) and folds the scale into the exponent
// after taking row maxima of the raw scores, which needs scale > 0.
extern "C" int hr_flash_attention_forward_bf16_m128(const hr_attention_params *p,
                                                    hr_stream_t stream) {
    if (!fwd_params_ok(p) || (int64_t)p->batch * p->heads > 65535 || !(p->scale > 0.f) ||
        !isfinite(p->scale))
        return cudaErrorInvalidValue;
    return p->head_dim == 64 ? launch_fwd_bf16_m128<64>(p, stream)
                             : launch_fwd_bf16_m128<128>(p, stream);
}
extern "C" int hr_flash_attention_backward_f32(const hr_attention_params *p, hr_stream_t stream) {
    if (!bwd_params_ok(p)) return cudaErrorInvalidValue;
    return p->head_dim == 64 ? launch_bwd_f32<64>(p, stream) : launch_bwd_f32<128>(p, stream);
}
extern "C" int hr_flash_attention_backward_bf16(const hr_attention_params *p, hr_stream_t stream) {
    if (!bwd_params_ok(p)) return cudaErrorInvalidValue;
    return p->head_dim == 64 ? launch_bwd_bf16<64>(p, stream) : launch_bwd_bf16<128>(p, stream);
}

extern "C" int hr_repeat_kv_f32(const hr_repeat_kv_params *p, hr_stream_t stream) {
    if (!repeat_kv_params_ok(p)) return cudaErrorInvalidValue;
    return launch_repeat_kv<float>(p, false, stream);
}
extern "C" int hr_repeat_kv_bf16(const hr_repeat_kv_params *p, hr_stream_t stream) {
    if (!repeat_kv_params_ok(p)) return cudaErrorInvalidValue;
    return launch_repeat_kv<bf16>(p, false, stream);
}
extern "C" int hr_reduce_kv_f32(const hr_repeat_kv_params *p, hr_stream_t stream) {
    if (!repeat_kv_params_ok(p)) return cudaErrorInvalidValue;
    return launch_repeat_kv<float>(p, true, stream);
}
extern "C" int hr_reduce_kv_bf16(const hr_repeat_kv_params *p, hr_stream_t stream) {
    if (!repeat_kv_params_ok(p)) return cudaErrorInvalidValue;
    return launch_repeat_kv<bf16>(p, true, stream);
}
