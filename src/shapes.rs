//! The shapes of the problems the suite solves: plain descriptions with no buffers, shared by
//! the backends that run them, the f64 references that check them and the reports that
//! describe them.

/// Epilogue fused into a matmul (see `kernels/headroom.h`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Epilogue {
    None,
    Bias,
    BiasGelu,
}

/// The workspace handed to cuBLAS for each call (`cublasSetWorkspace`), from the tracked
/// allocator: 32 MiB, the size the cuBLAS documentation recommends for Hopper (and what
/// PyTorch configures there), used on every card so a case's bytes are the same everywhere.
pub const CUBLAS_WORKSPACE_BYTES: u64 = 32 << 20;

/// Which matmul implementation runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MatmulKernel {
    /// FP32 FFMA on the SIMT cores.
    Simt,
    /// BF16 tensor cores through mma.sync (sm_80+).
    Mma,
    /// BF16 wgmma + TMA (sm_90a).
    Wgmma,
    /// The same wgmma kernel visiting its tiles in bands of [`WGMMA_BAND_ROWS`] tile rows
    /// (`kernels/raster.h`) instead of row by row, so the A and B panels in flight stay in
    /// L2. Its own technique until a GPU has validated and timed it beside `wgmma`.
    WgmmaBanded,
    /// wgmma on 128 x 256 tiles: two consumer warpgroups on m64n256k16 with registers moved
    /// to them by `setmaxnreg`, 4 stages, one empty-barrier arrival per warpgroup, the first
    /// MMA of a tile overwriting the accumulators; tiles in bands like `WgmmaBanded`. Its own
    /// technique until a GPU has validated and timed it.
    WgmmaWide,
    /// The wide form in 2x1 thread-block clusters: the two blocks of a cluster compute
    /// vertically adjacent tiles and each loads half of their shared B tile, multicast to
    /// both by TMA. Its own technique until a GPU has validated and timed it.
    WgmmaCluster,
    /// The wide form with its epilogue through shared memory and TMA stores, overlapped with
    /// the next tile's main loop (where TMA can take C; elsewhere it stores from registers
    /// as the wide form). Its own technique until a GPU has validated and timed it.
    WgmmaTmaStore,
    /// The library baseline (fp32 sgemm with TF32 off, or bf16 GemmEx).
    Cublas,
}

/// Tile rows per band of [`MatmulKernel::WgmmaBanded`]: on 132 SMs at 8192³ (64 x 64 tiles
/// of 128 x 128) the tiles in flight touch about 26 panels of A and B instead of 65.
pub const WGMMA_BAND_ROWS: i32 = 8;

impl MatmulKernel {
    /// Whether the kernel is Hopper's wgmma (in any tile shape or order).
    pub fn is_wgmma(self) -> bool {
        matches!(
            self,
            MatmulKernel::Wgmma
                | MatmulKernel::WgmmaBanded
                | MatmulKernel::WgmmaWide
                | MatmulKernel::WgmmaCluster
                | MatmulKernel::WgmmaTmaStore
        )
    }

    pub fn name(self) -> &'static str {
        match self {
            MatmulKernel::Simt => "simt",
            MatmulKernel::Mma => "mma",
            MatmulKernel::Wgmma => "wgmma",
            MatmulKernel::WgmmaBanded => "wgmma-banded",
            MatmulKernel::WgmmaWide => "wgmma-wide",
            MatmulKernel::WgmmaCluster => "wgmma-cluster",
            MatmulKernel::WgmmaTmaStore => "wgmma-tma-store",
            MatmulKernel::Cublas => "cublas",
        }
    }
}

/// The kernel a bf16 flash forward runs on. Every form computes the same outputs (O and the
/// logsumexp); each but the first is its own technique until a GPU has validated and timed it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FlashForward {
    /// The backend's own flash forward (on CUDA: mma.sync on 64-row query tiles).
    Standard,
    /// mma.sync on 128-row query tiles, 32 rows per warp, K/V single-buffered, the scale
    /// folded into the exponent's FFMA, query tiles on `grid.x` (sm_80+).
    Mma128,
    /// Hopper (sm_90a): TMA loads, wgmma with P in registers, a producer warpgroup and two
    /// consumers.
    Wgmma,
    /// The Hopper forward with FlashAttention-3's overlap of the next S with the current
    /// softmax, and ping-pong between the two consumers.
    WgmmaPingPong,
    /// The ping-pong forward on a persistent grid (at most one block per SM) walking the query
    /// tiles head by head, the longest first when causal; the next tile's loads overlap this
    /// one's output.
    WgmmaPersistent,
}

impl FlashForward {
    /// Every alternative to [`FlashForward::Standard`].
    pub const ALTERNATIVES: [FlashForward; 4] = [
        FlashForward::Mma128,
        FlashForward::Wgmma,
        FlashForward::WgmmaPingPong,
        FlashForward::WgmmaPersistent,
    ];

    /// The technique (case-id component) of a case run on this kernel.
    pub fn technique(self) -> &'static str {
        match self {
            FlashForward::Standard => "flash",
            FlashForward::Mma128 => "flash-m128",
            FlashForward::Wgmma => "flash-wgmma",
            FlashForward::WgmmaPingPong => "flash-wgmma-pp",
            FlashForward::WgmmaPersistent => "flash-wgmma-persistent",
        }
    }

    /// Whether the kernel is one of the Hopper (sm_90a) forwards.
    pub fn is_wgmma(self) -> bool {
        matches!(
            self,
            FlashForward::Wgmma | FlashForward::WgmmaPingPong | FlashForward::WgmmaPersistent
        )
    }
}

/// The kernels a bf16 flash backward runs on. Every form computes the same outputs (delta, dQ,
/// dK, dV); each but the first is its own technique until a GPU has validated and timed it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FlashBackward {
    /// The backend's own flash backward (on CUDA: the mma.sync dK/dV and dQ kernels).
    Standard,
    /// Hopper (sm_90a): the same two deterministic kernels with TMA loads through mbarrier
    /// rings and wgmma (P and dS as register operands), a producer warp and two consumer
    /// warpgroups.
    Wgmma,
}

impl FlashBackward {
    /// Every alternative to [`FlashBackward::Standard`].
    pub const ALTERNATIVES: [FlashBackward; 1] = [FlashBackward::Wgmma];

    /// The technique (case-id component) of a case run on this kernel (its forward is the
    /// standard one, so that the backward alone differs from the `flash` twin).
    pub fn technique(self) -> &'static str {
        match self {
            FlashBackward::Standard => "flash",
            FlashBackward::Wgmma => "flash-wgmma-bwd",
        }
    }
}

/// One (batched) matmul: `C = epilogue(alpha * op(A) . op(B)) (+ residual) (+ C)`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Matmul {
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub batch: usize,
    /// Elements between consecutive batch entries; 0 broadcasts one matrix.
    pub stride_a: usize,
    pub stride_b: usize,
    pub stride_c: usize,
    pub trans_a: bool,
    pub trans_b: bool,
    pub epilogue: Epilogue,
    pub accumulate: bool,
    pub alpha: f32,
}

impl Matmul {
    /// A single `[m,k] x [k,n]` product with no epilogue.
    pub fn new(m: usize, n: usize, k: usize) -> Self {
        Matmul {
            m,
            n,
            k,
            batch: 1,
            stride_a: m * k,
            stride_b: k * n,
            stride_c: m * n,
            trans_a: false,
            trans_b: false,
            epilogue: Epilogue::None,
            accumulate: false,
            alpha: 1.0,
        }
    }

    pub fn transposed(mut self, trans_a: bool, trans_b: bool) -> Self {
        self.trans_a = trans_a;
        self.trans_b = trans_b;
        self
    }

    pub fn batched(mut self, batch: usize) -> Self {
        self.batch = batch;
        self
    }
}

/// The shape of an attention problem: Q and O are `[batch, heads, seq, head_dim]`, K and V
/// `[batch, kv_heads, seq, head_dim]`. With fewer kv heads than query heads this is
/// grouped-query attention (Ainslie et al. 2023, "GQA", sec. 2): query head h reads kv head
/// `h / (heads / kv_heads)`; `kv_heads == 1` is multi-query attention (Shazeer 2019).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AttentionShape {
    pub batch: usize,
    pub heads: usize,
    /// Heads of K and V; divides `heads` (equal to it for multi-head attention).
    pub kv_heads: usize,
    pub seq: usize,
    pub head_dim: usize,
    pub causal: bool,
    pub scale: f32,
}

impl AttentionShape {
    /// Multi-head attention: as many kv heads as query heads.
    pub fn new(batch: usize, heads: usize, seq: usize, head_dim: usize, causal: bool) -> Self {
        AttentionShape {
            batch,
            heads,
            kv_heads: heads,
            seq,
            head_dim,
            causal,
            scale: 1.0 / (head_dim as f32).sqrt(),
        }
    }
    /// The same problem with `kv_heads` heads of K and V (see [`AttentionShape::check_kv_heads`]).
    pub fn with_kv_heads(mut self, kv_heads: usize) -> Self {
        self.kv_heads = kv_heads;
        self
    }
    /// Whether the kv heads divide the query heads, or a sentence saying why not.
    pub fn check_kv_heads(&self) -> Result<(), String> {
        if self.kv_heads == 0 || self.heads % self.kv_heads != 0 {
            return Err(format!(
                "grouped-query attention needs the kv heads to divide the query heads (got {} query heads, {} kv heads); pick kv_heads among the divisors of heads",
                self.heads, self.kv_heads
            ));
        }
        Ok(())
    }
    /// Query heads per kv head (H / Hkv; 1 for multi-head attention).
    pub fn group(&self) -> usize {
        self.heads / self.kv_heads.max(1)
    }
    /// Whether K and V have fewer heads than Q.
    pub fn is_gqa(&self) -> bool {
        self.kv_heads != self.heads
    }
    /// Elements of Q (and O, dO, dQ; and of K and V repeated to every query head).
    pub fn qkv_len(&self) -> usize {
        self.batch * self.heads * self.seq * self.head_dim
    }
    /// Elements of K (and V, dK, dV): `[batch, kv_heads, seq, head_dim]`.
    pub fn kv_len(&self) -> usize {
        self.batch * self.kv_heads * self.seq * self.head_dim
    }
    /// Rows of the score matrices (B * H).
    pub fn rows(&self) -> usize {
        self.batch * self.heads
    }
    /// Elements of the logsumexp / delta vectors.
    pub fn stats_len(&self) -> usize {
        self.rows() * self.seq
    }
    /// Elements of one materialized score matrix stack (B * H * N * N).
    pub fn scores_len(&self) -> usize {
        self.rows() * self.seq * self.seq
    }
    /// The kv head (over the B·Hkv grid) that query head `bh` (over the B·H grid) reads:
    /// b·Hkv + h/G = (b·H + h)/G, since H = Hkv·G.
    pub fn kv_head_of(&self, bh: usize) -> usize {
        bh / self.group()
    }
}

/// A layernorm over `tokens` rows of `channels`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LayerNorm {
    pub tokens: usize,
    pub channels: usize,
    pub eps: f32,
}

/// AdamW's hyper-parameters (Loshchilov & Hutter 2019).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamW {
    pub lr: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    pub weight_decay: f32,
}

impl Default for AdamW {
    fn default() -> Self {
        AdamW {
            lr: 1e-3,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.01,
        }
    }
}
