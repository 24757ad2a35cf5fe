//! Attention, forward and backward: naive (materializes the B·H·N·N probabilities and keeps
//! them for backward) against flash-style (tiled online softmax, keeps one fp32 logsumexp
//! per row, recomputes the probabilities in backward; Dao 2023, FlashAttention-2, sec. 3.1).
//!
//! FLOPs as FlashAttention counts them: forward 4·B·H·N²·d, backward 2.5× the forward, both
//! halved when causal. Memory models: see [`model_peak_bytes`].

use crate::backend::{
    AttentionGrads, AttentionShape, Backend, BackendKind, Epi, FlashBackward, FlashForward, Matmul,
    MatmulKernel, Tensor,
};
use crate::dtype::DType;
use crate::error::Result;
use crate::reference::{Head, RowStats};
use crate::rng::Rng;
use crate::techniques::{
    random_tensor, sample_indices, Bounds, Case, CaseInfo, Comparison, Instance, Profile, Readback,
    Tamper, Validation,
};

/// Q and K are uniform in [-QK_RANGE, QK_RANGE): each score q·k/sqrt(d) then has a standard
/// deviation of QK_RANGE²/3 = 3 at any head dimension (d terms of variance (QK_RANGE²/3)²,
/// times 1/d), so softmax rows are peaked, not the near-uniform rows of inputs in [-1, 1]
/// (standard deviation 1/3), where an all-zero dK passes any relative bound.
const QK_RANGE: f32 = 3.0;

/// One query row in BOOST_ONE_IN is multiplied by BOOST (a power of two: exact in bf16): its
/// scores spread BOOST times wider, so its maximum, and with it the online softmax's running
/// maximum, jumps by tens of units from one key tile to the next, and its logsumexp lies
/// far above its neighbours'.
const BOOST_ONE_IN: usize = 8;
const BOOST: f32 = 2.0;

/// Above this sequence length, validation compares sampled rows instead of whole heads.
const FULL_CHECK_SEQ: usize = 1024;
/// Sampled query rows (O, logsumexp, delta, dQ) and key rows (dK, dV) per head at larger N,
/// the first and the last always among them.
const SAMPLED_QUERY_ROWS: usize = 16;
const SAMPLED_KEY_ROWS: usize = 8;

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
/// L = B·H·N·d elements per Q/O-shaped tensor, Lkv = B·Hkv·N·d per K/V-shaped one (= L
/// without grouped-query attention), R = B·H·N statistics (f32) and S = B·H·N² score
/// elements, s = bytes per element:
/// - flash fwd:      Q, O, K, V + logsumexp                       = (2·L + 2·Lkv)·s + 4·R
/// - flash fwd+bwd:  + dO, dQ, dK, dV + delta                     = (4·L + 4·Lkv)·s + 8·R
/// - naive fwd:      Q, O, K, V + P (S and P share one buffer)    = (2·L + 2·Lkv)·s + S·s
/// - naive fwd+bwd:  + dO, dQ, dK, dV, delta + dP (dS in place)   = (4·L + 4·Lkv)·s + 2·S·s + 4·R
///
/// With Hkv < H the naive variant also pays what eager attention pays for grouped-query
/// attention: K and V repeated to every query head (+ 2·L·s), and in backward the
/// query-head-sized dK and dV its matmuls write before they are summed per group (+ 2·L·s).
/// Flash reads the kv heads in place and pays nothing more.
pub fn model_peak_bytes(variant: Variant, pass: Pass, shape: &AttentionShape, dtype: DType) -> u64 {
    let s = dtype.size() as u64;
    let l = shape.qkv_len() as u64;
    let lkv = shape.kv_len() as u64;
    let r = shape.stats_len() as u64;
    let sq = shape.scores_len() as u64;
    let repeated = |tensors: u64| if shape.is_gqa() { tensors * l * s } else { 0 };
    match (variant, pass) {
        (Variant::Flash, Pass::Forward) => (2 * l + 2 * lkv) * s + 4 * r,
        (Variant::Flash, Pass::ForwardBackward) => (4 * l + 4 * lkv) * s + 8 * r,
        (Variant::Naive, Pass::Forward) => (2 * l + 2 * lkv) * s + sq * s + repeated(2),
        (Variant::Naive, Pass::ForwardBackward) => {
            (4 * l + 4 * lkv) * s + 2 * sq * s + 4 * r + repeated(4)
        }
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

/// The products the kernels actually run, in the same units as [`flops`] (one product of an
/// N x N score matrix with d is 2·B·H·N²·d). The forward runs two (S = QKᵀ, O = PV). The
/// flash backward runs seven where the convention counts five: the dK/dV kernel recomputes
/// S and dP = dO·Vᵀ and forms dV = Pᵀ·dO and dK = dSᵀ·Q, and the dQ kernel recomputes S and
/// dP again before dQ = dS·K (so that no output is summed with atomics). The naive backward
/// keeps P and runs four (dV, dP, dQ, dK). Causal halves all, as in the convention.
pub fn work_flops(variant: Variant, pass: Pass, shape: &AttentionShape) -> f64 {
    let products = match (variant, pass) {
        (_, Pass::Forward) => 2.0,
        (Variant::Flash, Pass::ForwardBackward) => 2.0 + 7.0,
        (Variant::Naive, Pass::ForwardBackward) => 2.0 + 4.0,
    };
    // flops(Forward) is two products.
    flops(Pass::Forward, shape) * products / 2.0
}

pub struct AttentionCase {
    info: CaseInfo,
    variant: Variant,
    pass: Pass,
    shape: AttentionShape,
    /// the kernel of a flash forward ([`AttentionCase::forward_by`])
    forward: FlashForward,
    /// the kernels of a flash backward ([`AttentionCase::backward_by`])
    backward: FlashBackward,
}

impl AttentionCase {
    pub fn new(variant: Variant, pass: Pass, dtype: DType, shape: AttentionShape) -> Self {
        let s = &shape;
        // Multi-head ids are unchanged; grouped-query ones append the kv heads.
        let name = format!(
            "{}/b{}-h{}-n{}-d{}{}{}",
            pass.name(),
            s.batch,
            s.heads,
            s.seq,
            s.head_dim,
            if s.causal { "-causal" } else { "" },
            if s.is_gqa() {
                format!("-kv{}", s.kv_heads)
            } else {
                String::new()
            }
        );
        let mut info = CaseInfo::new("attention", variant.name(), dtype, name);
        info.flops = flops(pass, s);
        info.work_flops = match work_flops(variant, pass, s) {
            w if w == info.flops => 0.0,
            w => w,
        };
        info.predicted_peak_bytes = model_peak_bytes(variant, pass, s, dtype);
        // Every buffer is read or written at least once per call.
        info.bytes_moved = info.predicted_peak_bytes as f64;
        AttentionCase {
            info,
            variant,
            pass,
            shape,
            forward: FlashForward::Standard,
            backward: FlashBackward::Standard,
        }
    }

    /// The bf16 flash forward by `kernel` (technique [`FlashForward::technique`]): the flash
    /// case's memory model and validation, its own id until a GPU has checked it.
    pub fn forward_by(kernel: FlashForward, shape: AttentionShape) -> Self {
        let mut case = AttentionCase::new(Variant::Flash, Pass::Forward, DType::Bf16, shape)
            .retitled(kernel.technique());
        case.forward = kernel;
        case
    }

    /// The case under technique `technique`: its id's `flash` component replaced.
    fn retitled(mut self, technique: &str) -> Self {
        self.info = CaseInfo {
            id: self
                .info
                .id
                .replace("attention/flash/", &format!("attention/{technique}/")),
            technique: technique.into(),
            ..self.info
        };
        self
    }

    /// The bf16 flash forward and backward, the backward by `kernel` (technique
    /// [`FlashBackward::technique`]) after the standard forward: the flash case's memory model
    /// and validation of every gradient, its own id until a GPU has checked it.
    pub fn backward_by(kernel: FlashBackward, shape: AttentionShape) -> Self {
        let mut case =
            AttentionCase::new(Variant::Flash, Pass::ForwardBackward, DType::Bf16, shape)
                .retitled(kernel.technique());
        case.backward = kernel;
        case
    }

    pub fn variant(&self) -> Variant {
        self.variant
    }
}

struct AttentionInstance {
    variant: Variant,
    /// the kernel of a flash forward
    forward: FlashForward,
    /// the kernels of a flash backward
    backward: FlashBackward,
    shape: AttentionShape,
    dtype: DType,
    q: Tensor,
    /// K and V: [B, Hkv, N, d]
    k: Tensor,
    v: Tensor,
    o: Tensor,
    /// naive with Hkv < H: K and V repeated to [B, H, N, d] (`Backend::repeat_kv`)
    repeated: Option<Repeated>,
    /// flash: logsumexp [B,H,N] (f32)
    lse: Option<Tensor>,
    /// naive: scores, then probabilities [B,H,N,N]
    p: Option<Tensor>,
    bwd: Option<Backward>,
    host: [Vec<f32>; 4], // q, k, v, dO
}

/// The query-head-sized copies eager grouped-query attention multiplies with.
struct Repeated {
    k: Tensor,
    v: Tensor,
    /// backward: dK and dV per query head, before `Backend::reduce_kv`
    dk: Option<Tensor>,
    dv: Option<Tensor>,
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
        if self.forward != FlashForward::Standard {
            return be.flash_forward_available(self.forward).err();
        }
        if self.backward != FlashBackward::Standard {
            return be.flash_backward_available(self.backward).err();
        }
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
        s.check_kv_heads().map_err(crate::error::Error::Invalid)?;
        let (len, kv_len) = (s.qkv_len(), s.kv_len());
        let (mut q, mut qv) = random_tensor(be, rng, dt, len, QK_RANGE, "Q")?;
        let (k, kv) = random_tensor(be, rng, dt, kv_len, QK_RANGE, "K")?;
        for row in qv.chunks_mut(s.head_dim) {
            if rng.below(BOOST_ONE_IN) == 0 {
                row.iter_mut().for_each(|x| *x = dt.round(*x * BOOST));
            }
        }
        be.write(&mut q, &qv)?;
        let (v, vv) = random_tensor(be, rng, dt, kv_len, 1.0, "V")?;
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
                let dk = be.alloc(dt, kv_len, "dK")?;
                let dv = be.alloc(dt, kv_len, "dV")?;
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
        let repeated = if self.variant == Variant::Naive && s.is_gqa() {
            let bwd = self.pass == Pass::ForwardBackward;
            Some(Repeated {
                k: be.alloc(dt, len, "K repeated")?,
                v: be.alloc(dt, len, "V repeated")?,
                dk: bwd
                    .then(|| be.alloc(dt, len, "dK per query head"))
                    .transpose()?,
                dv: bwd
                    .then(|| be.alloc(dt, len, "dV per query head"))
                    .transpose()?,
            })
        } else {
            None
        };
        Ok(Box::new(AttentionInstance {
            variant: self.variant,
            forward: self.forward,
            backward: self.backward,
            shape: *s,
            dtype: dt,
            q,
            k,
            v,
            o,
            repeated,
            lse,
            p,
            bwd,
            host: [qv, kv, vv, dov],
        }))
    }
}

fn matmul_kernel(dtype: DType) -> MatmulKernel {
    match dtype {
        DType::F32 | DType::I32 => MatmulKernel::Simt,
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
        // Grouped-query: K and V repeated to every query head first, as eager attention does.
        let (k, v) = match self.repeated.as_mut() {
            Some(r) => {
                be.repeat_kv(&self.shape, &self.k, &mut r.k)?;
                be.repeat_kv(&self.shape, &self.v, &mut r.v)?;
                (&r.k, &r.v)
            }
            None => (&self.k, &self.v),
        };
        // S = scale · Q Kᵀ, then P = softmax(S) in place, then O = P V.
        be.matmul(kern, &mm_s, &self.q, k, Epi::none(), p)?;
        be.softmax_forward(&self.shape, p)?;
        be.matmul(kern, &mm_o, p, v, Epi::none(), &mut self.o)
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
        // Grouped-query: the matmuls see the repeated K and V and write dK and dV per query
        // head, which `reduce_kv` then sums per group (the backward of `repeat_kv`).
        let (k, v, dk, dv) = match self.repeated.as_mut() {
            Some(r) => (
                &r.k,
                &r.v,
                r.dk.as_mut().expect("naive GQA backward has per-head dK"),
                r.dv.as_mut().expect("naive GQA backward has per-head dV"),
            ),
            None => (&self.k, &self.v, &mut g.dk, &mut g.dv),
        };
        // dV = Pᵀ dO; dP = dO Vᵀ; delta = rowsum(dO∘O); dS = P∘(dP − delta);
        // dQ = scale · dS K; dK = scale · dSᵀ Q.
        be.matmul(kern, &mm_dv, p, &g.d_o, Epi::none(), dv)?;
        be.matmul(kern, &mm_dp, &g.d_o, v, Epi::none(), dp)?;
        be.attention_delta(&shape, &self.o, &g.d_o, &mut g.delta)?;
        be.softmax_backward(&shape, p, dp, &g.delta)?;
        be.matmul(kern, &mm_dq, dp, k, Epi::none(), &mut g.dq)?;
        be.matmul(kern, &mm_dk, dp, &self.q, Epi::none(), dk)?;
        if let Some(r) = self.repeated.as_ref() {
            let (dk, dv) = (r.dk.as_ref(), r.dv.as_ref());
            be.reduce_kv(&shape, dk.expect("per-head dK"), &mut g.dk)?;
            be.reduce_kv(&shape, dv.expect("per-head dV"), &mut g.dv)?;
        }
        Ok(())
    }
}

impl Instance for AttentionInstance {
    fn run(&mut self, be: &dyn Backend) -> Result<()> {
        match self.variant {
            Variant::Flash => {
                let lse = self.lse.as_mut().expect("flash has lse");
                be.flash_attention_forward_by(
                    self.forward,
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
                    be.flash_attention_backward_by(
                        self.backward,
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

    fn validate(
        &mut self,
        be: &dyn Backend,
        rng: &mut Rng,
        tamper: &mut Tamper<'_>,
    ) -> Result<Validation> {
        be.poison(&mut self.o)?;
        if let Some(t) = self.lse.as_mut() {
            be.poison(t)?;
        }
        if let Some(t) = self.p.as_mut() {
            be.poison(t)?;
        }
        if let Some(r) = self.repeated.as_mut() {
            for t in [&mut r.k, &mut r.v] {
                be.poison(t)?;
            }
            for t in [r.dk.as_mut(), r.dv.as_mut()].into_iter().flatten() {
                be.poison(t)?;
            }
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
        let [qv, kv, vv, dov] = &self.host;
        let mut o = be.read(&self.o)?;
        let mut lse = self.lse.as_ref().map(|t| be.read(t)).transpose()?;
        let mut grads = match &self.bwd {
            Some(g) => Some(Grads {
                dq: be.read(&g.dq)?,
                dk: be.read(&g.dk)?,
                dv: be.read(&g.dv)?,
                delta: be.read(&g.delta)?,
            }),
            None => None,
        };
        // Naive bf16 stores its scores, probabilities and dP/dS in bf16: a score s is off by
        // up to 2^-8·|s| once stored, so its probabilities by up to 2^-7·max|s| of
        // themselves, which at scores of tens is several percent, and a 5% error in O could
        // not be told from that. So P and dS are read back and held to the f64 softmax and
        // its gradient (P to a bound from its scores' rounding), and O, dV, dQ and dK, each a
        // product of a stored P or dS, to the f64 product of what was stored.
        let stored = self.variant == Variant::Naive && self.dtype == DType::Bf16;
        let mut p = match (&self.p, stored) {
            (Some(t), true) => Some(be.read(t)?),
            _ => None,
        };
        let mut ds = match (self.bwd.as_ref().and_then(|g| g.dp.as_ref()), stored) {
            (Some(t), true) => Some(be.read(t)?),
            _ => None,
        };
        // delta_i = dO_i · O_i over the O this run wrote (read before any tamper): the
        // kernels' delta is that, so the fp32 statistic is held to fp32 bounds in a bf16 case
        // too, and the dQ and dK references use it (with the exact O, a bf16 case's dQ and dK
        // would carry O's rounding, which at peaked softmax rows is large against them).
        let delta_ref: Vec<f64> = if grads.is_some() {
            o.chunks(d)
                .zip(dov.chunks(d))
                .map(|(a, b)| a.iter().zip(b).map(|(x, y)| *x as f64 * *y as f64).sum())
                .collect()
        } else {
            Vec::new()
        };
        // A row of O, dQ, dK or dV is one token of one head (d elements); of logsumexp and
        // delta, one query row (one element); of P and dS, one query row's N keys.
        tamper(Readback {
            name: "O",
            values: &mut o,
            row: d,
        });
        if let Some(l) = lse.as_mut() {
            tamper(Readback {
                name: "logsumexp",
                values: l,
                row: 1,
            });
        }
        if let Some(g) = grads.as_mut() {
            for (name, values, row) in [
                ("dQ", &mut g.dq, d),
                ("dK", &mut g.dk, d),
                ("dV", &mut g.dv, d),
                ("delta", &mut g.delta, 1),
            ] {
                tamper(Readback { name, values, row });
            }
        }
        if let Some(values) = p.as_mut() {
            tamper(Readback {
                name: "P",
                values,
                row: n,
            });
        }
        if let Some(values) = ds.as_mut() {
            tamper(Readback {
                name: "dS",
                values,
                row: n,
            });
        }

        let mut cmp = Comparison::new(self.dtype);
        cmp.bounds("logsumexp", Bounds::statistic());
        cmp.bounds("delta", Bounds::statistic());
        cmp.all_finite("O", &o);
        if let Some(l) = &lse {
            cmp.all_finite("logsumexp", l);
        }
        if let Some(g) = &grads {
            cmp.all_finite("dQ", &g.dq);
            cmp.all_finite("dK", &g.dk);
            cmp.all_finite("dV", &g.dv);
            cmp.all_finite("delta", &g.delta);
        }
        if let Some(p) = &p {
            cmp.all_finite("P", p);
        }
        if let Some(ds) = &ds {
            cmp.all_finite("dS", ds);
        }
        let full = n <= FULL_CHECK_SEQ;
        // The largest |score| of the rows P was compared on, for P's bound.
        let mut max_score = 0f64;
        // A few kv heads, always including the first and the last (edges of the B·Hkv grid),
        // each with every query head of its group: a kv head's dK and dV are sums over its
        // group's query heads (Ainslie et al. 2023, sec. 2), so their references need them
        // all. With Hkv = H that is a few heads of the B·H grid, one query head each.
        let group = s.group();
        for kvh in sample_indices(rng, s.batch * s.kv_heads, 2) {
            let kspan = kvh * n * d..(kvh + 1) * n * d;
            let keys: Vec<usize> = if full {
                (0..n).collect()
            } else {
                sample_indices(rng, n, SAMPLED_KEY_ROWS)
            };
            // f64 dK and dV of the compared key rows, summed over the group in head order.
            let mut dk_ref = vec![vec![0f64; d]; keys.len()];
            let mut dv_ref = vec![vec![0f64; d]; keys.len()];
            let add = |acc: &mut [f64], x: &[f64]| acc.iter_mut().zip(x).for_each(|(a, b)| *a += b);
            // sum_i dO_i over the group's query rows (all of dV's column sums, see below).
            let mut dv_col_want = vec![0f64; d];
            for bh in kvh * group..(kvh + 1) * group {
                let span = bh * n * d..(bh + 1) * n * d;
                let head = Head {
                    q: &qv[span.clone()],
                    k: &kv[kspan.clone()],
                    v: &vv[kspan.clone()],
                    d,
                    n,
                };
                let d_o: &[f32] = if dov.is_empty() {
                    &[]
                } else {
                    &dov[span.clone()]
                };
                let delta = if delta_ref.is_empty() {
                    &[][..]
                } else {
                    &delta_ref[bh * n..(bh + 1) * n]
                };
                let at = |name: &'static str, i: usize, c: usize| {
                    move || format!("{name}[head {bh}][{i},{c}]")
                };
                let row =
                    |x: &[f32], i: usize| x[span.start + i * d..span.start + (i + 1) * d].to_vec();
                let compare_row = |cmp: &mut Comparison,
                                   name: &'static str,
                                   got: &[f32],
                                   want: &[f64],
                                   i: usize| {
                    for c in 0..d {
                        cmp.add(name, &at(name, i, c), got[c], want[c]);
                    }
                };
                let queries = if full {
                    (0..n).collect()
                } else {
                    sample_indices(rng, n, SAMPLED_QUERY_ROWS)
                };
                for (c, w) in dv_col_want.iter_mut().enumerate() {
                    *w += (0..n)
                        .map(|i| d_o.get(i * d + c).copied().unwrap_or(0.0) as f64)
                        .sum::<f64>();
                }
                if stored {
                    let pv = p.as_deref().expect("naive bf16 reads P back");
                    let ph = &pv[bh * n * n..(bh + 1) * n * n];
                    // alpha · sum_j M_ij X_j (a row of a product) or sum_i M_ij X_i (a column).
                    let product =
                        |m: &[f32], x: &[f32], alpha: f64, at: usize, transposed: bool| {
                            let mut out = vec![0f64; d];
                            for t in 0..n {
                                let w = if transposed {
                                    m[t * n + at]
                                } else {
                                    m[at * n + t]
                                };
                                if w != 0.0 {
                                    for (o, xv) in out.iter_mut().zip(&x[t * d..(t + 1) * d]) {
                                        *o += alpha * w as f64 * *xv as f64;
                                    }
                                }
                            }
                            out
                        };
                    for &i in &queries {
                        let sc = head.scores(&s, i);
                        max_score = sc.iter().fold(max_score, |m, x| m.max(x.abs()));
                        let probs = head.probs(&s, i);
                        for j in 0..n {
                            let want = probs.get(j).copied().unwrap_or(0.0);
                            cmp.add("P", &at("P", i, j), ph[i * n + j], want);
                        }
                        compare_row(
                            &mut cmp,
                            "O",
                            &row(&o, i),
                            &product(ph, head.v, 1.0, i, false),
                            i,
                        );
                    }
                    let Some(g) = &grads else { continue };
                    let dsv = ds.as_deref().expect("naive bf16 backward reads dS back");
                    let dsh = &dsv[bh * n * n..(bh + 1) * n * n];
                    let scale = s.scale as f64;
                    for &i in &queries {
                        // dS_ij = P_ij (dP_ij - delta_i) over the stored P and the stored
                        // (bf16) dP = dO_i · V_j.
                        let doi = &d_o[i * d..(i + 1) * d];
                        for j in 0..n {
                            let pij = ph[i * n + j] as f64;
                            let (want, dp) = if pij == 0.0 {
                                (0.0, 0.0)
                            } else {
                                let dp: f64 = doi
                                    .iter()
                                    .zip(&head.v[j * d..(j + 1) * d])
                                    .map(|(a, b)| *a as f64 * *b as f64)
                                    .sum();
                                (pij * (DType::Bf16.round(dp as f32) as f64 - delta[i]), dp)
                            };
                            // The kernel's fp32 sum of dP may round to the bf16 neighbour of
                            // the reference's (one ulp, at most 2^-7·|dP|), which P·(dP - delta)
                            // keeps in full where dP and delta nearly cancel.
                            let allowance = pij * dp.abs() * 2f64.powi(-7);
                            cmp.add_allowing(
                                "dS",
                                &at("dS", i, j),
                                dsh[i * n + j],
                                want,
                                allowance,
                            );
                        }
                        compare_row(
                            &mut cmp,
                            "dQ",
                            &row(&g.dq, i),
                            &product(dsh, head.k, scale, i, false),
                            i,
                        );
                        let t = bh * n + i;
                        cmp.add("delta", &at("delta", i, 0), g.delta[t], delta_ref[t]);
                    }
                    // Grouped-query: each query head's dK and dV were stored (bf16) before
                    // `reduce_kv` summed them, so the reference sums them rounded likewise;
                    // G roundings of parts larger than their sum would exceed one rounding's
                    // bound otherwise.
                    let stored_part = |x: Vec<f64>| -> Vec<f64> {
                        if s.is_gqa() {
                            x.into_iter()
                                .map(|v| DType::Bf16.round(v as f32) as f64)
                                .collect()
                        } else {
                            x
                        }
                    };
                    for (r, &j) in keys.iter().enumerate() {
                        add(&mut dv_ref[r], &stored_part(product(ph, d_o, 1.0, j, true)));
                        add(
                            &mut dk_ref[r],
                            &stored_part(product(dsh, head.q, scale, j, true)),
                        );
                    }
                } else if full {
                    // Everything, exactly.
                    let zeros = vec![0f32; n * d];
                    let r = if d_o.is_empty() {
                        head.full(&s, &zeros, None)
                    } else {
                        head.full(&s, d_o, Some(delta))
                    };
                    for i in 0..n {
                        compare_row(&mut cmp, "O", &row(&o, i), &r.o[i * d..(i + 1) * d], i);
                        if let Some(l) = &lse {
                            cmp.add("logsumexp", &at("logsumexp", i, 0), l[bh * n + i], r.lse[i]);
                        }
                        if let Some(g) = &grads {
                            let x = i * d..(i + 1) * d;
                            compare_row(&mut cmp, "dQ", &row(&g.dq, i), &r.dq[x], i);
                            let t = bh * n + i;
                            cmp.add("delta", &at("delta", i, 0), g.delta[t], delta_ref[t]);
                        }
                    }
                    for (k, &j) in keys.iter().enumerate() {
                        add(&mut dk_ref[k], &r.dk[j * d..(j + 1) * d]);
                        add(&mut dv_ref[k], &r.dv[j * d..(j + 1) * d]);
                    }
                } else {
                    // Sampled query rows: O, logsumexp, delta and dQ exactly, at O(N·d) each.
                    for &i in &queries {
                        compare_row(&mut cmp, "O", &row(&o, i), &head.output(&s, i), i);
                        if let Some(l) = &lse {
                            cmp.add(
                                "logsumexp",
                                &at("logsumexp", i, 0),
                                l[bh * n + i],
                                head.lse(&s, i),
                            );
                        }
                        if let Some(g) = &grads {
                            let want = head.dq(&s, d_o, Some(delta[i]), i);
                            compare_row(&mut cmp, "dQ", &row(&g.dq, i), &want, i);
                            let t = bh * n + i;
                            cmp.add("delta", &at("delta", i, 0), g.delta[t], delta_ref[t]);
                        }
                    }
                    if grads.is_none() {
                        continue;
                    }
                    // Sampled key rows of dK and dV: each needs every query row's P_ij and
                    // dS_ij, so every row's f64 logsumexp first (O(N²·d) per head, on every
                    // core), then O(N·d) per key row.
                    let stats: RowStats = head.row_stats(&s, d_o, Some(delta));
                    for (r, &j) in keys.iter().enumerate() {
                        let (dk, dv) = head.dk_dv_row(&s, d_o, &stats, j);
                        add(&mut dk_ref[r], &dk);
                        add(&mut dv_ref[r], &dv);
                    }
                }
            }
            let Some(g) = &grads else { continue };
            // dK and dV rows of the kv head, [B, Hkv, N, d].
            for (r, &j) in keys.iter().enumerate() {
                for (name, got, want) in [("dK", &g.dk, &dk_ref[r]), ("dV", &g.dv, &dv_ref[r])] {
                    for c in 0..d {
                        cmp.add(
                            name,
                            &|| format!("{name}[kv head {kvh}][{j},{c}]"),
                            got[kspan.start + j * d + c],
                            want[c],
                        );
                    }
                }
            }
            // At sampled sizes, all of dV at once through sum_j dV_j = sum_i dO_i over the
            // group's query rows (rows of P sum to one), which sees a wrong key tile the
            // sampled rows may miss.
            if !full {
                for (c, want) in dv_col_want.iter().enumerate() {
                    let got: f64 = (0..n).map(|j| g.dv[kspan.start + j * d + c] as f64).sum();
                    cmp.add(
                        "dV column sums",
                        &|| format!("dV column sums[kv head {kvh}][0,{c}]"),
                        got as f32,
                        *want,
                    );
                }
            }
        }
        if grads.is_some() {
            // dQ and dK vanish in exact arithmetic where every row sees a single key (N = 1):
            // dS_ij = P_ij (dP_ij - delta_i) = 0 when P_ij = 1, so there they are the rounding
            // of dP - delta. A hundredth of dV's scale (dV_j = sum_i P_ij dO_i never vanishes)
            // stands in for their scale then; in every other `check` case their own RMS is
            // above that floor.
            let floor = 1e-2 * cmp.scale_of("dV");
            for t in ["dQ", "dK", "dS"] {
                cmp.floor(t, floor);
            }
        }
        if p.is_some() {
            // A stored score is off by up to 2^-8 of itself, so a probability by up to
            // 2·2^-8·max|s| of itself (its own score's error and the row's mean error), plus
            // one bf16 rounding of its own (2^-8), to first order; 1.5x that for the second.
            let rtol = 1.5 * (2.0 * max_score + 1.0) * 2f64.powi(-8);
            cmp.bounds(
                "P",
                Bounds {
                    relative: rtol,
                    atol_of_rms: Bounds::of(DType::Bf16).atol_of_rms,
                    rtol,
                },
            );
        }
        Ok(cmp.finish())
    }
}

/// The gradients and the backward's statistic, as read back.
struct Grads {
    dq: Vec<f32>,
    dk: Vec<f32>,
    dv: Vec<f32>,
    delta: Vec<f32>,
}

/// B·N kept at 16384 tokens (B at least 1), H = 16 heads, d = 128, as FlashAttention-2's
/// benchmarks do, so every N does comparable work per token.
fn gpu_shape(seq: usize, causal: bool) -> AttentionShape {
    AttentionShape::new((16384 / seq).max(1), 16, seq, 128, causal)
}

pub fn cases(profile: Profile, kind: BackendKind) -> Vec<Box<dyn Case>> {
    let mut out: Vec<Box<dyn Case>> = Vec::new();
    let mut alternatives: Vec<AttentionShape> = Vec::new();
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
            // The alternative forwards and backwards beside it (skipped on the CPU, with the
            // reason); the backwards' twin is the flash forward+backward of that shape.
            push(
                Variant::Flash,
                Pass::ForwardBackward,
                DType::Bf16,
                AttentionShape::new(1, 2, 128, 128, true),
            );
            alternatives.push(AttentionShape::new(1, 2, 128, 128, true));
            // Grouped-query attention (two query heads per kv head): what eager attention's
            // repeated K/V cost against flash reading the kv heads in place.
            for v in [Variant::Naive, Variant::Flash] {
                push(
                    v,
                    Pass::ForwardBackward,
                    DType::Bf16,
                    AttentionShape::new(1, 4, 128, 64, false).with_kv_heads(2),
                );
            }
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
                // The alternative forwards (FlashForward::ALTERNATIVES) beside the standard one
                // on the same shapes, at both head dims (the hidden size kept at 2048), causal
                // and not.
                // The alternative backwards (FlashBackward::ALTERNATIVES) likewise, beside the
                // standard forward and backward (d = 128 has them below: gpu_shape).
                for d in [64, 128] {
                    for causal in [false, true] {
                        let s = AttentionShape::new((16384 / n).max(1), 2048 / d, n, d, causal);
                        if d != 128 || causal {
                            push(Variant::Flash, Pass::Forward, DType::Bf16, s);
                        }
                        if d != 128 {
                            push(Variant::Flash, Pass::ForwardBackward, DType::Bf16, s);
                        }
                        alternatives.push(s);
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
            // Grouped-query attention at one length, 4 query heads per kv head (16 query
            // heads, 4 kv heads: Llama-2 70B's ratio is 8, Mistral 7B's 4): eager attention
            // repeats K and V to every query head, flash reads the kv heads in place.
            for v in [Variant::Naive, Variant::Flash] {
                push(
                    v,
                    Pass::ForwardBackward,
                    DType::Bf16,
                    gpu_shape(4096, false).with_kv_heads(4),
                );
            }
            push(
                Variant::Flash,
                Pass::ForwardBackward,
                DType::Bf16,
                gpu_shape(4096, true).with_kv_heads(4),
            );
        }
    }
    for s in alternatives {
        for kernel in FlashForward::ALTERNATIVES {
            out.push(Box::new(AttentionCase::forward_by(kernel, s)));
        }
        for kernel in FlashBackward::ALTERNATIVES {
            out.push(Box::new(AttentionCase::backward_by(kernel, s)));
        }
    }
    out
}

/// Both variants, both dtypes, both head dims, causal and not, forward and every gradient,
/// at every tile edge of kernels/attention.cu. Its tiles: the forward's Q tiles are 64 rows
/// (fp32 and bf16), its K/V tiles 32 keys (fp32) or 64 (bf16); the backward's tiles are 32
/// by 32 (fp32), and 64 keys by 64 query rows (bf16, d = 64) or 64 by 32 (bf16, d = 128).
/// So N = 1 is one ragged row of every tile; 63, 64 and 65 end just inside, on and just past
/// the first 64-row tile (and the second 32-row one); 127, 128 and 129 the same for the second
/// 64-row tile (and the fourth 32-row one); on a GPU N = 1000 (15·64 + 40, 31·32 + 8) runs
/// many whole tiles then a ragged one. The CPU keeps B·H = 2 so that `check` stays short.
pub fn check_cases(kind: BackendKind) -> Vec<Box<dyn Case>> {
    let mut out: Vec<Box<dyn Case>> = Vec::new();
    let (seqs, batch, heads): (&[usize], usize, usize) = match kind {
        BackendKind::Cpu => (&[1, 63, 64, 65, 127, 128, 129], 1, 2),
        BackendKind::Cuda | BackendKind::Dry => (&[1, 63, 64, 65, 127, 128, 129, 1000], 2, 3),
    };
    for &n in seqs {
        for v in [Variant::Naive, Variant::Flash] {
            for dt in [DType::F32, DType::Bf16] {
                for d in [64, 128] {
                    for causal in [false, true] {
                        let s = AttentionShape::new(batch, heads, n, d, causal);
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
    out.extend(gqa_check_cases(kind));
    // On the CPU they are skipped with the reason (no alternative runs there), so that a
    // filter naming one finds its cases everywhere.
    out.extend(alternative_check_cases());
    out
}

/// The alternative forwards ([`FlashForward::ALTERNATIVES`]) and backwards
/// ([`FlashBackward::ALTERNATIVES`], forward and every gradient). The forwards' query tiles
/// are 128 rows and their K/V tiles 128 keys (wgmma), 64 (`flash-m128`, d = 64) or 32
/// (d = 128); the wgmma backward's dK/dV blocks take 128 keys and walk 64-row query tiles,
/// its dQ blocks the other way round. So
/// N = 1, 127, 128, 129, 255, 256, 257 and 1000 (7·128 + 104 = 15·64 + 40 = 31·32 + 8) take
/// every edge of each; d = 64 and 128, causal (where the diagonal crosses a 128-row query
/// tile's two or four K/V tiles) and not, and grouped-query heads (G = 2 and MQA) so that a
/// wrong kv-head index reads a neighbour's K/V (and a dK/dV block sums a group of query heads,
/// or all of them). And 2 x 32 heads of N = 1000: 512 query tiles,
/// several per block of a persistent grid (132 SMs on an H100, 148 on a B200), so that the
/// last head, which validation always compares, is a block's third or fourth tile: its Q
/// follows another tile's, its K/V stages and barrier phases continue the earlier tiles', and
/// causal tiles of different lengths follow each other.
pub fn alternative_check_cases() -> Vec<Box<dyn Case>> {
    let mut shapes: Vec<AttentionShape> = Vec::new();
    for n in [1, 127, 128, 129, 255, 256, 257, 1000] {
        for d in [64, 128] {
            for causal in [false, true] {
                shapes.push(AttentionShape::new(2, 3, n, d, causal));
            }
        }
    }
    for (heads, kv) in [(4, 2), (4, 1)] {
        for causal in [false, true] {
            shapes.push(AttentionShape::new(2, heads, 1000, 128, causal).with_kv_heads(kv));
        }
    }
    for (d, causal) in [(64, true), (128, false), (128, true)] {
        shapes.push(AttentionShape::new(2, 32, 1000, d, causal));
    }
    let mut out: Vec<Box<dyn Case>> = Vec::new();
    for kernel in FlashForward::ALTERNATIVES {
        for &s in &shapes {
            out.push(Box::new(AttentionCase::forward_by(kernel, s)));
        }
    }
    for kernel in FlashBackward::ALTERNATIVES {
        for &s in &shapes {
            out.push(Box::new(AttentionCase::backward_by(kernel, s)));
        }
    }
    out
}

/// (batch, heads, kv_heads) of a grouped-query check case.
type GqaHeads = (usize, usize, usize);

/// Grouped-query attention (Ainslie et al. 2023): query heads per kv head G = 2 and 4, and
/// multi-query attention (one kv head), at lengths that end inside a tile (65: one row past
/// the first 64-row tile; 1000 on a GPU: many tiles then a ragged one), causal and not, both
/// dtypes, flash and naive. Two kv heads per batch entry at least where G < H, so a wrong
/// kv-head index reads a neighbour's K/V, and B = 2 on a GPU so it may cross a batch entry.
/// The CPU keeps d = 64 and N = 65 so that `check` stays short; a GPU runs both head dims
/// (their dK/dV kernels tile differently).
pub fn gqa_check_cases(kind: BackendKind) -> Vec<Box<dyn Case>> {
    let mut out: Vec<Box<dyn Case>> = Vec::new();
    let (seqs, dims, shapes): (&[usize], &[usize], &[GqaHeads]) = match kind {
        BackendKind::Cpu => (&[65], &[64], &[(1, 4, 2), (1, 8, 2), (1, 4, 1)]),
        BackendKind::Cuda | BackendKind::Dry => {
            (&[65, 1000], &[64, 128], &[(2, 6, 3), (2, 8, 2), (2, 4, 1)])
        }
    };
    for &n in seqs {
        for &(batch, heads, kv_heads) in shapes {
            for v in [Variant::Naive, Variant::Flash] {
                for dt in [DType::F32, DType::Bf16] {
                    for &d in dims {
                        for causal in [false, true] {
                            let s = AttentionShape::new(batch, heads, n, d, causal)
                                .with_kv_heads(kv_heads);
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
