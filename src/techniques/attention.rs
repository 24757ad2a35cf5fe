//! Attention, forward and backward: naive (materializes the B·H·N·N probabilities and keeps
//! them for backward) against flash-style (tiled online softmax, keeps one fp32 logsumexp
//! per row, recomputes the probabilities in backward; Dao 2023, FlashAttention-2, sec. 3.1).
//!
//! FLOPs as FlashAttention counts them: forward 4·B·H·N²·d, backward 2.5× the forward, both
//! halved when causal. Memory models: see [`model_peak_bytes`].

use crate::backend::{
    AttentionGrads, AttentionShape, Backend, BackendKind, Epi, Matmul, MatmulKernel, Tensor,
};
use crate::dtype::DType;
use crate::error::Result;
use crate::reference::Head;
use crate::rng::Rng;
use crate::techniques::{
    random_tensor, sample_indices, Case, CaseInfo, Comparison, Instance, Profile, Validation,
};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Variant {
    Naive,
    Flash,
}

impl Variant {
    pub fn name(self) -> &'static str {
        match self {
            Variant::Naive => "naive",
            Variant::Flash => "flash",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pass {
    Forward,
    ForwardBackward,
}

impl Pass {
    pub fn name(self) -> &'static str {
        match self {
            Pass::Forward => "fwd",
            Pass::ForwardBackward => "fwd+bwd",
        }
    }
}

/// The analytic peak of allocated bytes of one attention call, with
/// L = B·H·N·d elements per Q/K/V/O-shaped tensor, R = B·H·N statistics (f32) and
/// S = B·H·N² score elements, s = bytes per element:
/// - flash fwd:      Q, K, V, O + logsumexp                     = 4·L·s + 4·R
/// - flash fwd+bwd:  + dO, dQ, dK, dV + delta                   = 8·L·s + 8·R
/// - naive fwd:      Q, K, V, O + P (S and P share one buffer)  = 4·L·s + S·s
/// - naive fwd+bwd:  + dO, dQ, dK, dV, delta + dP (dS in place) = 8·L·s + 2·S·s + 4·R
pub fn model_peak_bytes(variant: Variant, pass: Pass, shape: &AttentionShape, dtype: DType) -> u64 {
    let s = dtype.size() as u64;
    let l = shape.qkv_len() as u64;
    let r = shape.stats_len() as u64;
    let sq = shape.scores_len() as u64;
    match (variant, pass) {
        (Variant::Flash, Pass::Forward) => 4 * l * s + 4 * r,
        (Variant::Flash, Pass::ForwardBackward) => 8 * l * s + 8 * r,
        (Variant::Naive, Pass::Forward) => 4 * l * s + sq * s,
        (Variant::Naive, Pass::ForwardBackward) => 8 * l * s + 2 * sq * s + 4 * r,
    }
}

/// FlashAttention's FLOP count: 4·B·H·N²·d forward, 2.5× that backward, halved when causal.
pub fn flops(pass: Pass, shape: &AttentionShape) -> f64 {
    let fwd = 4.0
        * (shape.batch * shape.heads) as f64
        * (shape.seq as f64).powi(2)
        * shape.head_dim as f64;
    let total = match pass {
        Pass::Forward => fwd,
        Pass::ForwardBackward => fwd * 3.5,
    };
    if shape.causal {
        total / 2.0
    } else {
        total
    }
}

pub struct AttentionCase {
    info: CaseInfo,
    variant: Variant,
    pass: Pass,
    shape: AttentionShape,
}

impl AttentionCase {
    pub fn new(variant: Variant, pass: Pass, dtype: DType, shape: AttentionShape) -> Self {
        let s = &shape;
        let name = format!(
            "{}/b{}-h{}-n{}-d{}{}",
            pass.name(),
            s.batch,
            s.heads,
            s.seq,
            s.head_dim,
            if s.causal { "-causal" } else { "" }
        );
        let mut info = CaseInfo::new("attention", variant.name(), dtype, name);
        info.flops = flops(pass, s);
        info.predicted_peak_bytes = model_peak_bytes(variant, pass, s, dtype);
        // Every buffer is read or written at least once per call.
        info.bytes_moved = info.predicted_peak_bytes as f64;
        AttentionCase {
            info,
            variant,
            pass,
            shape,
        }
    }

    pub fn variant(&self) -> Variant {
        self.variant
    }
}

struct AttentionInstance {
    variant: Variant,
    shape: AttentionShape,
    dtype: DType,
    tolerance: f64,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    o: Tensor,
    /// flash: logsumexp [B,H,N] (f32)
    lse: Option<Tensor>,
    /// naive: scores, then probabilities [B,H,N,N]
    p: Option<Tensor>,
    bwd: Option<Backward>,
    host: [Vec<f32>; 4], // q, k, v, dO
}

struct Backward {
    d_o: Tensor,
    dq: Tensor,
    dk: Tensor,
    dv: Tensor,
    delta: Tensor,
    /// naive: dP, then dS in place
    dp: Option<Tensor>,
}

impl Case for AttentionCase {
    fn info(&self) -> &CaseInfo {
        &self.info
    }

    fn skip_reason(&self, be: &dyn Backend) -> Option<String> {
        if self.variant == Variant::Naive {
            return be
                .matmul_available(matmul_kernel(self.info.dtype), self.info.dtype)
                .err();
        }
        None
    }

    fn setup(&self, be: &dyn Backend, rng: &mut Rng) -> Result<Box<dyn Instance>> {
        let dt = self.info.dtype;
        let s = &self.shape;
        let len = s.qkv_len();
        let (q, qv) = random_tensor(be, rng, dt, len, 1.0, "Q")?;
        let (k, kv) = random_tensor(be, rng, dt, len, 1.0, "K")?;
        let (v, vv) = random_tensor(be, rng, dt, len, 1.0, "V")?;
        let o = be.alloc(dt, len, "O")?;
        let (lse, p) = match self.variant {
            Variant::Flash => (
                Some(be.alloc(DType::F32, s.stats_len(), "logsumexp")?),
                None,
            ),
            Variant::Naive => (
                None,
                Some(be.alloc(dt, s.scores_len(), "scores/probabilities")?),
            ),
        };
        let (bwd, dov) = match self.pass {
            Pass::Forward => (None, Vec::new()),
            Pass::ForwardBackward => {
                let (d_o, dov) = random_tensor(be, rng, dt, len, 1.0, "dO")?;
                let dq = be.alloc(dt, len, "dQ")?;
                let dk = be.alloc(dt, len, "dK")?;
                let dv = be.alloc(dt, len, "dV")?;
                let delta = be.alloc(DType::F32, s.stats_len(), "delta")?;
                let dp = match self.variant {
                    Variant::Naive => Some(be.alloc(dt, s.scores_len(), "dP/dS")?),
                    Variant::Flash => None,
                };
                (
                    Some(Backward {
                        d_o,
                        dq,
                        dk,
                        dv,
                        delta,
                        dp,
                    }),
                    dov,
                )
            }
        };
        Ok(Box::new(AttentionInstance {
            variant: self.variant,
            shape: *s,
            dtype: dt,
            tolerance: self.info.tolerance,
            q,
            k,
            v,
            o,
            lse,
            p,
            bwd,
            host: [qv, kv, vv, dov],
        }))
    }
}

fn matmul_kernel(dtype: DType) -> MatmulKernel {
    match dtype {
        DType::F32 => MatmulKernel::Simt,
        DType::Bf16 => MatmulKernel::Mma,
    }
}

impl AttentionInstance {
    /// The batched products of naive attention over the B·H heads.
    fn bmm(&self, m: usize, n: usize, k: usize, ta: bool, tb: bool, alpha: f32) -> Matmul {
        let mut mm = Matmul::new(m, n, k)
            .transposed(ta, tb)
            .batched(self.shape.rows());
        mm.alpha = alpha;
        mm
    }

    fn naive_forward(&mut self, be: &dyn Backend) -> Result<()> {
        let (n, d) = (self.shape.seq, self.shape.head_dim);
        let kern = matmul_kernel(self.dtype);
        let mm_s = self.bmm(n, n, d, false, true, self.shape.scale);
        let mm_o = self.bmm(n, d, n, false, false, 1.0);
        let p = self.p.as_mut().expect("naive has P");
        // S = scale · Q Kᵀ, then P = softmax(S) in place, then O = P V.
        be.matmul(kern, &mm_s, &self.q, &self.k, Epi::none(), p)?;
        be.softmax_forward(&self.shape, p)?;
        be.matmul(kern, &mm_o, p, &self.v, Epi::none(), &mut self.o)
    }

    fn naive_backward(&mut self, be: &dyn Backend) -> Result<()> {
        let (n, d) = (self.shape.seq, self.shape.head_dim);
        let kern = matmul_kernel(self.dtype);
        let scale = self.shape.scale;
        let shape = self.shape;
        let mm_dv = self.bmm(n, d, n, true, false, 1.0);
        let mm_dp = self.bmm(n, n, d, false, true, 1.0);
        let mm_dq = self.bmm(n, d, n, false, false, scale);
        let mm_dk = self.bmm(n, d, n, true, false, scale);
        let p = self.p.as_ref().expect("naive has P");
        let g = self.bwd.as_mut().expect("backward buffers");
        let dp = g.dp.as_mut().expect("naive has dP");
        // dV = Pᵀ dO; dP = dO Vᵀ; delta = rowsum(dO∘O); dS = P∘(dP − delta);
        // dQ = scale · dS K; dK = scale · dSᵀ Q.
        be.matmul(kern, &mm_dv, p, &g.d_o, Epi::none(), &mut g.dv)?;
        be.matmul(kern, &mm_dp, &g.d_o, &self.v, Epi::none(), dp)?;
        be.attention_delta(&shape, &self.o, &g.d_o, &mut g.delta)?;
        be.softmax_backward(&shape, p, dp, &g.delta)?;
        be.matmul(kern, &mm_dq, dp, &self.k, Epi::none(), &mut g.dq)?;
        be.matmul(kern, &mm_dk, dp, &self.q, Epi::none(), &mut g.dk)
    }
}

impl Instance for AttentionInstance {
    fn run(&mut self, be: &dyn Backend) -> Result<()> {
        match self.variant {
            Variant::Flash => {
                let lse = self.lse.as_mut().expect("flash has lse");
                be.flash_attention_forward(
                    &self.shape,
                    &self.q,
                    &self.k,
                    &self.v,
                    &mut self.o,
                    lse,
                )?;
                if let Some(g) = self.bwd.as_mut() {
                    let grads = AttentionGrads {
                        delta: &mut g.delta,
                        dq: &mut g.dq,
                        dk: &mut g.dk,
                        dv: &mut g.dv,
                    };
                    be.flash_attention_backward(
                        &self.shape,
                        &self.q,
                        &self.k,
                        &self.v,
                        &self.o,
                        &g.d_o,
                        lse,
                        grads,
                    )?;
                }
                Ok(())
            }
            Variant::Naive => {
                self.naive_forward(be)?;
                if self.bwd.is_some() {
                    self.naive_backward(be)?;
                }
                Ok(())
            }
        }
    }

    fn validate(&mut self, be: &dyn Backend, rng: &mut Rng) -> Result<Validation> {
        be.poison(&mut self.o)?;
        if let Some(t) = self.lse.as_mut() {
            be.poison(t)?;
        }
        if let Some(t) = self.p.as_mut() {
            be.poison(t)?;
        }
        if let Some(g) = self.bwd.as_mut() {
            for t in [&mut g.dq, &mut g.dk, &mut g.dv, &mut g.delta] {
                be.poison(t)?;
            }
            if let Some(t) = g.dp.as_mut() {
                be.poison(t)?;
            }
        }
        self.run(be)?;
        let s = self.shape;
        let (n, d) = (s.seq, s.head_dim);
        let o = be.read(&self.o)?;
        let lse = self.lse.as_ref().map(|t| be.read(t)).transpose()?;
        let grads = match &self.bwd {
            Some(g) => Some((be.read(&g.dq)?, be.read(&g.dk)?, be.read(&g.dv)?)),
            None => None,
        };
        let mut cmp = Comparison::new();
        cmp.all_finite("O", &o);
        if let Some(l) = &lse {
            cmp.all_finite("logsumexp", l);
        }
        if let Some((dq, dk, dv)) = &grads {
            cmp.all_finite("dQ", dq);
            cmp.all_finite("dK", dk);
            cmp.all_finite("dV", dv);
        }
        let [qv, kv, vv, dov] = &self.host;
        // A few heads, always including the last (edges of the B·H grid).
        for bh in sample_indices(rng, s.rows(), 2) {
            let span = bh * n * d..(bh + 1) * n * d;
            let head = Head {
                q: &qv[span.clone()],
                k: &kv[span.clone()],
                v: &vv[span.clone()],
                d,
                n,
            };
            let d_o: &[f32] = if dov.is_empty() {
                &[]
            } else {
                &dov[span.clone()]
            };
            let at = |name: &'static str, i: usize, c: usize| {
                move || format!("{name}[head {bh}][{i},{c}]")
            };
            if n <= 1024 {
                // Everything, exactly.
                let zeros = vec![0f32; n * d];
                let r = head.full(&s, if d_o.is_empty() { &zeros } else { d_o });
                for i in 0..n {
                    for c in 0..d {
                        cmp.add(&at("O", i, c), o[span.start + i * d + c], r.o[i * d + c]);
                    }
                    if let Some(l) = &lse {
                        cmp.add(&at("logsumexp", i, 0), l[bh * n + i], r.lse[i]);
                    }
                }
                if let Some((dq, dk, dv)) = &grads {
                    for x in 0..n * d {
                        let (i, c) = (x / d, x % d);
                        cmp.add(&at("dQ", i, c), dq[span.start + x], r.dq[x]);
                        cmp.add(&at("dK", i, c), dk[span.start + x], r.dk[x]);
                        cmp.add(&at("dV", i, c), dv[span.start + x], r.dv[x]);
                    }
                }
            } else {
                // Sampled query rows: O, logsumexp and dQ exactly, at O(N·d) each.
                for i in sample_indices(rng, n, 16) {
                    let ro = head.output(&s, i);
                    for c in 0..d {
                        cmp.add(&at("O", i, c), o[span.start + i * d + c], ro[c]);
                    }
                    if let Some(l) = &lse {
                        cmp.add(&at("logsumexp", i, 0), l[bh * n + i], head.lse(&s, i));
                    }
                    if let Some((dq, _, _)) = &grads {
                        let r = head.dq(&s, d_o, i);
                        for c in 0..d {
                            cmp.add(&at("dQ", i, c), dq[span.start + i * d + c], r[c]);
                        }
                    }
                }
                // dK and dV need every query row per key (O(N²·d) per head); here dV is held
                // to the identity sum_j dV_j = sum_i dO_i (rows of P sum to one); `check`
                // compares dK and dV element by element at N <= 1024 through the same kernels.
                if let Some((_, _, dv)) = &grads {
                    for c in 0..d {
                        let got: f64 = (0..n).map(|j| dv[span.start + j * d + c] as f64).sum();
                        let want: f64 = (0..n).map(|i| d_o[i * d + c] as f64).sum();
                        cmp.add(&at("sum_j dV", 0, c), got as f32, want);
                    }
                }
            }
        }
        Ok(cmp.finish(self.tolerance))
    }
}

/// B·N kept at 16384 tokens (B at least 1), H = 16 heads, d = 128, as FlashAttention-2's
/// benchmarks do, so every N does comparable work per token.
fn gpu_shape(seq: usize, causal: bool) -> AttentionShape {
    AttentionShape::new((16384 / seq).max(1), 16, seq, 128, causal)
}

pub fn cases(profile: Profile, kind: BackendKind) -> Vec<Box<dyn Case>> {
    let mut out: Vec<Box<dyn Case>> = Vec::new();
    let mut push = |v: Variant, p: Pass, dt: DType, s: AttentionShape| {
        out.push(Box::new(AttentionCase::new(v, p, dt, s)))
    };
    match kind {
        BackendKind::Cpu => {
            let seqs: &[usize] = match profile {
                Profile::Quick => &[64, 128],
                Profile::Full => &[64, 128, 256],
            };
            for &n in seqs {
                for v in [Variant::Naive, Variant::Flash] {
                    for dt in [DType::F32, DType::Bf16] {
                        push(
                            v,
                            Pass::ForwardBackward,
                            dt,
                            AttentionShape::new(1, 2, n, 64, false),
                        );
                    }
                }
            }
            push(
                Variant::Flash,
                Pass::Forward,
                DType::Bf16,
                AttentionShape::new(1, 2, 128, 128, true),
            );
        }
        BackendKind::Cuda | BackendKind::Dry => {
            let seqs: &[usize] = match profile {
                Profile::Quick => &[1024, 4096, 8192],
                Profile::Full => &[512, 1024, 2048, 4096, 8192, 16384, 32768],
            };
            for &n in seqs {
                for v in [Variant::Naive, Variant::Flash] {
                    for p in [Pass::Forward, Pass::ForwardBackward] {
                        push(v, p, DType::Bf16, gpu_shape(n, false));
                    }
                }
                push(
                    Variant::Flash,
                    Pass::ForwardBackward,
                    DType::Bf16,
                    gpu_shape(n, true),
                );
            }
            // fp32: what precision costs at one length.
            for v in [Variant::Naive, Variant::Flash] {
                push(v, Pass::ForwardBackward, DType::F32, gpu_shape(2048, false));
            }
        }
    }
    out
}

/// Both variants, both dtypes, both head dims, causal and not, forward and every gradient,
/// at sequence lengths that are no multiple of any tile.
pub fn check_cases(kind: BackendKind) -> Vec<Box<dyn Case>> {
    let mut out: Vec<Box<dyn Case>> = Vec::new();
    let seqs: &[usize] = match kind {
        BackendKind::Cpu => &[1, 77],
        BackendKind::Cuda | BackendKind::Dry => &[1, 77, 129, 1000],
    };
    for &n in seqs {
        for v in [Variant::Naive, Variant::Flash] {
            for dt in [DType::F32, DType::Bf16] {
                for d in [64, 128] {
                    for causal in [false, true] {
                        let s = AttentionShape::new(2, 3, n, d, causal);
                        out.push(Box::new(AttentionCase::new(
                            v,
                            Pass::ForwardBackward,
                            dt,
                            s,
                        )));
                    }
                }
            }
        }
    }
    out
}

/// The headline figure: under `budget`, the longest sequence each variant can train
/// (forward+backward) according to its memory model, confirmed by real runs.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Headline {
    pub budget_bytes: u64,
    pub variant: String,
    pub dtype: DType,
    pub batch: usize,
    pub heads: usize,
    pub head_dim: usize,
    /// The largest N whose modelled peak fits the budget.
    pub longest_seq: usize,
    pub model_bytes_at_longest: u64,
    pub model_bytes_one_more: u64,
    /// Outcome of a real forward+backward at `longest_seq` (expected `ok`).
    pub run_at_longest: String,
    /// Outcome at `longest_seq + 1` (expected `oom`).
    pub run_one_more: String,
}

/// The largest N with `model_peak_bytes(N) <= budget` (the model grows with N), or 0.
pub fn longest_fitting_seq(
    variant: Variant,
    dtype: DType,
    budget: u64,
    batch: usize,
    heads: usize,
    head_dim: usize,
) -> usize {
    let bytes = |n: usize| {
        let s = AttentionShape::new(batch, heads, n, head_dim, false);
        model_peak_bytes(variant, Pass::ForwardBackward, &s, dtype)
    };
    if bytes(1) > budget {
        return 0;
    }
    let (mut lo, mut hi) = (1usize, 2usize);
    while bytes(hi) <= budget {
        lo = hi;
        hi *= 2;
    }
    while hi - lo > 1 {
        let mid = lo + (hi - lo) / 2;
        if bytes(mid) <= budget {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    lo
}

/// Finds each variant's longest sequence under `budget` from its model and runs it, and
/// the next length up, on `be` with the tracker's budget set to `budget` for the runs.
pub fn headline(
    be: &dyn Backend,
    budget: u64,
    dtype: DType,
    heads: usize,
    head_dim: usize,
    rng: &mut Rng,
) -> Vec<Headline> {
    let tracker = be.memory();
    let saved = tracker.budget();
    tracker.set_budget(Some(budget));
    let mut out = Vec::new();
    for variant in [Variant::Naive, Variant::Flash] {
        let n = longest_fitting_seq(variant, dtype, budget, 1, heads, head_dim);
        let shape = |n| AttentionShape::new(1, heads, n, head_dim, false);
        let run = |n: usize, rng: &mut Rng| -> String {
            if n == 0 {
                return "not run (nothing fits)".into();
            }
            let case = AttentionCase::new(variant, Pass::ForwardBackward, dtype, shape(n));
            let outcome = case.setup(be, rng).and_then(|mut inst| {
                inst.run(be)?;
                be.synchronize()
            });
            match outcome {
                Ok(()) => "ok".into(),
                Err(crate::error::Error::OutOfMemory(e)) => format!("oom ({e})"),
                Err(e) => format!("error ({e})"),
            }
        };
        let model = |n: usize| {
            if n == 0 {
                0
            } else {
                model_peak_bytes(variant, Pass::ForwardBackward, &shape(n), dtype)
            }
        };
        out.push(Headline {
            budget_bytes: budget,
            variant: variant.name().into(),
            dtype,
            batch: 1,
            heads,
            head_dim,
            longest_seq: n,
            model_bytes_at_longest: model(n),
            model_bytes_one_more: model(n + 1),
            run_at_longest: run(n, rng),
            run_one_more: run(n + 1, rng),
        });
    }
    tracker.set_budget(saved);
    out
}
