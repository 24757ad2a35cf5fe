//! The LM head and its cross-entropy loss, forward and backward, three ways (see
//! `model::head`): materialized f32 logits `[T, V]` kept for the backward, chunks of rows,
//! or fused kernels that never write the logits. What each buys is the `[T, V]` term of the
//! peak; what it costs is the time.
//!
//! FLOPs are the conventional ones of the head's products: 2·T·C·V forward, 4·T·C·V
//! backward, for every variant. The chunked and fused backwards recompute the logits
//! (another 2·T·C·V) and that recomputation is not counted: the figure is the work the
//! model needs, so time per FLOP shows the cost of recomputing.
//!
//! The memory model of a case is its inputs and outputs (hidden, weight, targets, loss,
//! d_hidden, d_weight) plus the head's peak in the ledger (`model::head::ledger_forward`
//! and `ledger_backward`), which tests pin to the measured peak to the byte.

use crate::backend::{Backend, BackendKind, MatmulKernel, Tensor};
use crate::dtype::DType;
use crate::error::Result;
use crate::model::head::{self, HeadLoss, HeadShape, IGNORE_INDEX};
use crate::reference::loss as reference;
use crate::rng::Rng;
use crate::techniques::{
    random_tensor, sample_indices, Bounds, Case, CaseInfo, Comparison, Instance, Profile, Readback,
    Tamper, Validation,
};

/// Hidden states uniform in [-HIDDEN_RANGE, HIDDEN_RANGE) and weights in
/// [-WEIGHT_RANGE/√C, WEIGHT_RANGE/√C): each logit is a sum of C products of variance
/// (HIDDEN_RANGE²/3)·(WEIGHT_RANGE²/(3C)), so its standard deviation is
/// HIDDEN_RANGE·WEIGHT_RANGE/3 = 4 at any C: peaked softmax rows whose maximum sits tens of
/// units above most of the row, not the near-uniform rows of small inputs (where a
/// gradient of zeros passes any relative bound).
const HIDDEN_RANGE: f32 = 2.0;
const WEIGHT_RANGE: f32 = 6.0;
/// Every IGNORE_ONE_IN-th row (from IGNORE_OFFSET) has the ignore index as its target.
const IGNORE_ONE_IN: usize = 11;
const IGNORE_OFFSET: usize = 5;
/// The loss is accumulated: validation starts it here (and d_weight at random values).
const LOSS_START: f32 = 0.5;
/// The gradients of a variant that stores dlogits in bf16 (materialized and chunked, as
/// PyTorch's bf16 cross-entropy backward does): each dlogit is rounded to bf16 (2^-9 of it)
/// before the sums that make d_hidden and d_weight, so an element is off by up to
/// 2^-9·Σ|dz·x| (x the weight's or the hidden state's element) however well the sum is
/// taken; where the terms nearly cancel (the target's scale·(p − 1) against the rest of the
/// row) that is far above bf16's bound relative to the tensor (measured on the CPU: up to
/// 1.35 of a bound raised threefold, over 60 seeds). Each element is allowed
/// STORED_DLOGITS_ROUNDINGS times that rounding's bound and held to bf16's bounds beyond it.
/// Measured on the CPU over the check cases: an allowance of one rounding left 6 of 60 seeds
/// failing (at up to 1.57 of it: the fp32 logits' and exponentials' own roundings add to the
/// dlogits'), two left none of 100; three leaves that margin again. An element off by 5% of
/// itself or of the tensor's RMS still fails: the mutation tests hold to that.
const STORED_DLOGITS_ROUNDINGS: f64 = 3.0;
/// Above this many T·C·V multiply-adds, validation samples rows (see `validate`).
const FULL_CHECK_WORK: usize = 1 << 31;
/// Sampled rows of the hidden states' gradient and log-sum-exp, and of the weight's
/// gradient, at larger sizes (the first and the last always among them).
const SAMPLED_ROWS: usize = 8;

pub struct LossCase {
    info: CaseInfo,
    variant: HeadLoss,
    shape: HeadShape,
}

impl LossCase {
    pub fn new(variant: HeadLoss, dtype: DType, shape: HeadShape) -> Self {
        let HeadShape {
            tokens: t,
            hidden: c,
            vocab: v,
        } = shape;
        let mut info = CaseInfo::new("loss", variant.name(), dtype, format!("t{t}-c{c}-v{v}"));
        let tcv = (t * c) as f64 * v as f64;
        info.flops = 6.0 * tcv;
        let io = io_bytes(dtype, shape);
        info.predicted_peak_bytes = io + head::peak_bytes(dtype, variant, shape);
        // At least: read hidden, weight and targets, write d_hidden, read and write d_weight.
        let s = dtype.size() as f64;
        info.bytes_moved = s * (2 * t * c + v * c) as f64 + 4.0 * t as f64 + 8.0 * (v * c) as f64;
        LossCase {
            info,
            variant,
            shape,
        }
    }

    pub fn variant(&self) -> HeadLoss {
        self.variant
    }
}

/// The case's own buffers: hidden, weight, targets, loss, d_hidden, d_weight.
pub fn io_bytes(dtype: DType, shape: HeadShape) -> u64 {
    let s = dtype.size() as u64;
    let (t, c, v) = (shape.tokens as u64, shape.hidden as u64, shape.vocab as u64);
    s * t * c + s * v * c + 4 * t + 4 + s * t * c + 4 * v * c
}

struct LossInstance {
    variant: HeadLoss,
    shape: HeadShape,
    dtype: DType,
    scale: f32,
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    loss: Tensor,
    d_hidden: Tensor,
    d_weight: Tensor,
    /// The stored inputs and the accumulators' starting values.
    host_hidden: Vec<f32>,
    host_weight: Vec<f32>,
    host_targets: Vec<i32>,
    d_weight_start: Vec<f32>,
}

impl Case for LossCase {
    fn info(&self) -> &CaseInfo {
        &self.info
    }

    fn skip_reason(&self, be: &dyn Backend) -> Option<String> {
        match (self.variant, self.info.dtype) {
            (HeadLoss::Fused, _) => None,
            (_, DType::Bf16) => be.matmul_available(MatmulKernel::Mma, DType::Bf16).err(),
            (_, dt) => be.matmul_available(MatmulKernel::Simt, dt).err(),
        }
    }

    fn setup(&self, be: &dyn Backend, rng: &mut Rng) -> Result<Box<dyn Instance>> {
        let dt = self.info.dtype;
        let HeadShape {
            tokens: t,
            hidden: c,
            vocab: v,
        } = self.shape;
        let (hidden, host_hidden) = random_tensor(be, rng, dt, t * c, HIDDEN_RANGE, "hidden")?;
        let (weight, host_weight) = random_tensor(
            be,
            rng,
            dt,
            v * c,
            WEIGHT_RANGE / (c as f32).sqrt(),
            "head weight",
        )?;
        let host_targets: Vec<i32> = (0..t)
            .map(|i| {
                if i % IGNORE_ONE_IN == IGNORE_OFFSET {
                    IGNORE_INDEX
                } else {
                    rng.below(v) as i32
                }
            })
            .collect();
        let mut targets = be.alloc(DType::I32, t, "targets")?;
        let as_f32: Vec<f32> = host_targets.iter().map(|&y| y as f32).collect();
        be.write(&mut targets, &as_f32)?;
        let counted = host_targets.iter().filter(|&&y| y != IGNORE_INDEX).count();
        let loss = be.alloc(DType::F32, 1, "loss")?;
        let d_hidden = be.alloc(dt, t * c, "d_hidden")?;
        // The mean over counted tokens, as torch's reduction="mean".
        let scale = 1.0 / counted.max(1) as f32;
        // d_weight starts at values of the order of its gradient (scale/V: one token's
        // softmax mass per row), so that neither hides the other.
        let (d_weight, d_weight_start) =
            random_tensor(be, rng, DType::F32, v * c, scale / v as f32, "d_weight")?;
        Ok(Box::new(LossInstance {
            variant: self.variant,
            shape: self.shape,
            dtype: dt,
            scale,
            hidden,
            weight,
            targets,
            loss,
            d_hidden,
            d_weight,
            host_hidden,
            host_weight,
            host_targets,
            d_weight_start,
        }))
    }
}

impl LossInstance {
    fn forward(&mut self, be: &dyn Backend) -> Result<head::HeadSaved> {
        head::head_forward(
            be,
            self.dtype,
            self.variant,
            self.shape,
            &self.hidden,
            &self.weight,
            &self.targets,
            self.scale,
            &mut self.loss,
        )
    }

    fn backward(&mut self, be: &dyn Backend, saved: head::HeadSaved) -> Result<()> {
        head::head_backward(
            be,
            self.dtype,
            self.variant,
            self.shape,
            &self.hidden,
            &self.weight,
            &self.targets,
            self.scale,
            saved,
            &mut self.d_hidden,
            &mut self.d_weight,
        )
    }

    /// Row t's f64 logits.
    fn logits_row(&self, t: usize) -> Vec<f64> {
        let c = self.shape.hidden;
        let h = &self.host_hidden[t * c..(t + 1) * c];
        self.host_weight
            .chunks(c)
            .map(|w| h.iter().zip(w).map(|(&a, &b)| a as f64 * b as f64).sum())
            .collect()
    }
}

impl Instance for LossInstance {
    fn run(&mut self, be: &dyn Backend) -> Result<()> {
        let saved = self.forward(be)?;
        self.backward(be, saved)
    }

    /// Small cases are compared whole with the f64 reference. Above `FULL_CHECK_WORK`, the
    /// log-sum-exp and d_hidden are compared on sampled rows (each with its own f64 logits),
    /// and the loss and sampled rows of d_weight, which need every row's log-sum-exp, are
    /// computed in f64 from the read-back log-sum-exp (itself checked on the sample).
    fn validate(
        &mut self,
        be: &dyn Backend,
        rng: &mut Rng,
        tamper: &mut Tamper<'_>,
    ) -> Result<Validation> {
        let HeadShape {
            tokens: t,
            hidden: c,
            vocab: v,
        } = self.shape;
        be.write(&mut self.loss, &[LOSS_START])?;
        be.write(&mut self.d_weight, &self.d_weight_start)?;
        be.poison(&mut self.d_hidden)?;
        let saved = self.forward(be)?;
        let mut lse = be.read(saved.lse())?;
        self.backward(be, saved)?;
        let mut loss = be.read(&self.loss)?;
        let mut dh = be.read(&self.d_hidden)?;
        let mut dw = be.read(&self.d_weight)?;
        for (name, values, row) in [
            ("loss", &mut loss, 1),
            ("lse", &mut lse, 1),
            ("d_hidden", &mut dh, c),
            ("d_weight", &mut dw, c),
        ] {
            tamper(Readback {
                name,
                values: values.as_mut_slice(),
                row,
            });
        }
        let mut cmp = Comparison::new(self.dtype);
        // fp32 in every case: the loss and the statistic come from f32 logits of the stored
        // inputs, and d_weight is an f32 accumulation (of bf16-rounded dlogits where the
        // variant stores them: bf16 bounds then).
        cmp.bounds("loss", Bounds::statistic());
        cmp.bounds("lse", Bounds::statistic());
        // What rounding the stored dlogits may move each gradient element by (0 where they
        // stay in fp32).
        let stored = if self.dtype == DType::Bf16 && self.variant != HeadLoss::Fused {
            STORED_DLOGITS_ROUNDINGS * DType::Bf16.epsilon() / 2.0
        } else {
            0.0
        };
        for (name, values) in [
            ("loss", &loss),
            ("lse", &lse),
            ("d_hidden", &dh),
            ("d_weight", &dw),
        ] {
            cmp.all_finite(name, values);
        }
        let scale = self.scale as f64;
        let full = t * c * v <= FULL_CHECK_WORK;
        let ys = &self.host_targets;
        let counted = |r: usize| ys[r] != IGNORE_INDEX;
        if full {
            let r = reference::head_cross_entropy(
                &self.host_hidden,
                &self.host_weight,
                ys,
                IGNORE_INDEX,
                scale,
                c,
            );
            cmp.add(
                "loss",
                &|| "loss".into(),
                loss[0],
                LOSS_START as f64 + r.loss,
            );
            for (j, (&g, &w)) in lse.iter().zip(&r.lse).enumerate() {
                cmp.add("lse", &|| format!("lse[{j}]"), g, w);
            }
            for (j, (&g, &w)) in dh.iter().zip(&r.d_hidden).enumerate() {
                cmp.add_allowing(
                    "d_hidden",
                    &|| format!("d_hidden[{}, {}]", j / c, j % c),
                    g,
                    w,
                    stored * r.d_hidden_abs[j],
                );
            }
            for (j, ((&g, &w), &s)) in dw
                .iter()
                .zip(&r.d_weight)
                .zip(&self.d_weight_start)
                .enumerate()
            {
                cmp.add_allowing(
                    "d_weight",
                    &|| format!("d_weight[{}, {}]", j / c, j % c),
                    g,
                    w + s as f64,
                    stored * r.d_weight_abs[j],
                );
            }
            return Ok(cmp.finish());
        }
        // Sampled rows: f64 logits, log-sum-exp and d_hidden of each.
        for r in sample_indices(rng, t, SAMPLED_ROWS) {
            let z = self.logits_row(r);
            let want_lse = if counted(r) {
                let m = z.iter().fold(f64::NEG_INFINITY, |a, &b| a.max(b));
                m + z.iter().map(|&x| (x - m).exp()).sum::<f64>().ln()
            } else {
                0.0
            };
            cmp.add("lse", &|| format!("lse[{r}]"), lse[r], want_lse);
            let (mut want, mut want_abs) = (vec![0f64; c], vec![0f64; c]);
            if counted(r) {
                for (j, &zj) in z.iter().enumerate() {
                    let onehot = if j == ys[r] as usize { 1.0 } else { 0.0 };
                    let g = scale * ((zj - want_lse).exp() - onehot);
                    let w_row = &self.host_weight[j * c..(j + 1) * c];
                    for ((o, a), &w) in want.iter_mut().zip(want_abs.iter_mut()).zip(w_row) {
                        *o += g * w as f64;
                        *a += (g * w as f64).abs();
                    }
                }
            }
            for (k, &w) in want.iter().enumerate() {
                cmp.add_allowing(
                    "d_hidden",
                    &|| format!("d_hidden[{r}, {k}]"),
                    dh[r * c + k],
                    w,
                    stored * want_abs[k],
                );
            }
        }
        // The loss from every row's read-back log-sum-exp and its target's f64 logit.
        let dot = |r: usize, j: usize| -> f64 {
            self.host_hidden[r * c..(r + 1) * c]
                .iter()
                .zip(&self.host_weight[j * c..(j + 1) * c])
                .map(|(&a, &b)| a as f64 * b as f64)
                .sum()
        };
        let mut want_loss = LOSS_START as f64;
        for r in (0..t).filter(|&r| counted(r)) {
            want_loss += scale * (lse[r] as f64 - dot(r, ys[r] as usize));
        }
        cmp.add("loss", &|| "loss".into(), loss[0], want_loss);
        // Sampled rows of d_weight, with the read-back log-sum-exp.
        for j in sample_indices(rng, v, SAMPLED_ROWS) {
            let mut want: Vec<f64> = self.d_weight_start[j * c..(j + 1) * c]
                .iter()
                .map(|&x| x as f64)
                .collect();
            let mut want_abs = vec![0f64; c];
            for r in (0..t).filter(|&r| counted(r)) {
                let onehot = if j == ys[r] as usize { 1.0 } else { 0.0 };
                let g = scale * ((dot(r, j) - lse[r] as f64).exp() - onehot);
                let h_row = &self.host_hidden[r * c..(r + 1) * c];
                for ((o, a), &h) in want.iter_mut().zip(want_abs.iter_mut()).zip(h_row) {
                    *o += g * h as f64;
                    *a += (g * h as f64).abs();
                }
            }
            for (k, &w) in want.iter().enumerate() {
                cmp.add_allowing(
                    "d_weight",
                    &|| format!("d_weight[{j}, {k}]"),
                    dw[j * c + k],
                    w,
                    stored * want_abs[k],
                );
            }
        }
        Ok(cmp.finish())
    }
}

/// Chunks of `rows` at check sizes: several chunks and a short last one.
const CHECK_CHUNK_ROWS: usize = 16;

fn variants(chunk_rows: usize) -> [HeadLoss; 3] {
    [
        HeadLoss::Materialized,
        HeadLoss::Chunked { rows: chunk_rows },
        HeadLoss::Fused,
    ]
}

fn shape(tokens: usize, hidden: usize, vocab: usize) -> HeadShape {
    HeadShape {
        tokens,
        hidden,
        vocab,
    }
}

/// The benchmark cases: a small vocabulary on the CPU; on a GPU, Llama 3 8B's head (4096
/// hidden, a vocabulary of 128256) over 8192 tokens, where the materialized f32 logits
/// alone are 4.2 GB.
pub fn cases(profile: Profile, kind: BackendKind) -> Vec<Box<dyn Case>> {
    let mut out: Vec<Box<dyn Case>> = Vec::new();
    match kind {
        BackendKind::Cpu => {
            let dtypes: &[DType] = match profile {
                Profile::Quick => &[DType::Bf16],
                Profile::Full => &[DType::Bf16, DType::F32],
            };
            for &dt in dtypes {
                for variant in variants(64) {
                    out.push(Box::new(LossCase::new(variant, dt, shape(256, 128, 4099))));
                }
            }
        }
        BackendKind::Cuda | BackendKind::Dry => {
            let tokens: &[usize] = match profile {
                Profile::Quick => &[8192],
                Profile::Full => &[2048, 8192, 16384],
            };
            for &t in tokens {
                for variant in variants(HeadLoss::DEFAULT_CHUNK_ROWS) {
                    out.push(Box::new(LossCase::new(
                        variant,
                        DType::Bf16,
                        shape(t, 4096, 128256),
                    )));
                }
            }
            // fp32: what precision costs at one size.
            for variant in variants(HeadLoss::DEFAULT_CHUNK_ROWS) {
                out.push(Box::new(LossCase::new(
                    variant,
                    DType::F32,
                    shape(2048, 1024, 32003),
                )));
            }
        }
    }
    out
}

/// The validation cases: every variant in both dtypes at sizes no multiple of any tile (67
/// tokens in chunks of 16, vocabularies of 1031 and 515), on every backend.
pub fn check_cases() -> Vec<Box<dyn Case>> {
    let mut out: Vec<Box<dyn Case>> = Vec::new();
    for dt in [DType::F32, DType::Bf16] {
        for s in [shape(67, 96, 1031), shape(33, 72, 515)] {
            for variant in variants(CHECK_CHUNK_ROWS) {
                out.push(Box::new(LossCase::new(variant, dt, s)));
            }
        }
    }
    out
}
