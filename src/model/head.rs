//! The LM head and its cross-entropy loss, three ways, with the exact memory each costs.
//!
//! logits = hidden·weightᵀ (hidden `[T, C]`, weight `[V, C]` as torch's `nn.Linear`), then
//! loss += scale·Σ_t (logsumexp(logits[t]) − logits[t, target[t]]) over targets that are not
//! [`IGNORE_INDEX`]. The variants differ only in how much of the `[T, V]` logits exist at once:
//!
//! - materialized: the f32 logits `[T, V]` are made and kept for the backward with their
//!   log-sum-exp (what an eager framework keeps for `cross_entropy`'s backward: the upcast
//!   logits), and the backward makes dlogits `[T, V]` in the compute dtype;
//! - chunked: `rows` tokens at a time: each chunk's logits are made, reduced and freed; the
//!   backward recomputes them chunk by chunk. The chunk's hidden states, targets and
//!   log-sum-exp are copied into chunk buffers, and the backward's d_hidden chunk copied out
//!   (the ops and the matmul take whole tensors, not views), which is at most
//!   `rows·(2·C·s + 8)` bytes beside the `rows·V·(4 + s)` of the logits and their gradient,
//!   and is counted;
//! - fused: one kernel never writes the logits (online log-sum-exp over vocabulary blocks,
//!   Milakov & Gimelshein 2018, as in Liger-Kernel's and Apple's Cut Cross-Entropy, Wijmans
//!   et al. 2024); the backward recomputes them tile by tile. Only the log-sum-exp `[T]` is
//!   kept.
//!
//! Every buffer of this module is tagged `"logits: ..."` and booked as [`Cat::Logits`] in
//! the ledger, allocation by allocation in the schedule's order, so the measured peak equals
//! the ledger's to the byte.

use crate::backend::{Backend, Epi, Matmul, Tensor};
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::model::matmul_in;
use crate::model::memory::{Cat, Ledger};

/// PyTorch's default `ignore_index`: a target that adds no loss and no gradient.
pub const IGNORE_INDEX: i32 = -100;

/// How the head's logits and their loss are computed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum HeadLoss {
    Materialized,
    /// `rows` tokens' logits at a time.
    Chunked {
        rows: usize,
    },
    Fused,
}

impl HeadLoss {
    /// The chunk the chunked variant takes when none is named.
    pub const DEFAULT_CHUNK_ROWS: usize = 1024;
    /// Chunks of [`HeadLoss::DEFAULT_CHUNK_ROWS`] tokens: what `plan` and the cases use.
    pub const CHUNKED: HeadLoss = HeadLoss::Chunked {
        rows: Self::DEFAULT_CHUNK_ROWS,
    };

    /// The name in training policies' ids and plans, one `-`-free token: `materialized`,
    /// `chunked<rows>`, `fused`.
    pub fn id(&self) -> String {
        match self {
            HeadLoss::Chunked { rows } => format!("chunked{rows}"),
            other => other.name().into(),
        }
    }

    /// The variant [`HeadLoss::id`] names (`chunked` alone: the default chunk).
    pub fn parse_id(s: &str) -> Option<HeadLoss> {
        match s {
            "materialized" => Some(HeadLoss::Materialized),
            "fused" => Some(HeadLoss::Fused),
            "chunked" => Some(HeadLoss::CHUNKED),
            _ => s
                .strip_prefix("chunked")
                .and_then(|r| r.parse().ok())
                .filter(|&rows: &usize| rows > 0)
                .map(|rows| HeadLoss::Chunked { rows }),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            HeadLoss::Materialized => "materialized",
            HeadLoss::Chunked { .. } => "chunked",
            HeadLoss::Fused => "fused",
        }
    }

    /// "materialized", "fused", "chunked" (of [`HeadLoss::DEFAULT_CHUNK_ROWS`]) or
    /// "chunked-<rows>".
    pub fn parse(s: &str) -> Result<HeadLoss> {
        let bad = || {
            Error::Invalid(format!(
                "'{s}' is not a head loss; use materialized, chunked, chunked-<rows> (rows > 0) or fused"
            ))
        };
        match s {
            "materialized" => Ok(HeadLoss::Materialized),
            "fused" => Ok(HeadLoss::Fused),
            "chunked" => Ok(HeadLoss::Chunked {
                rows: Self::DEFAULT_CHUNK_ROWS,
            }),
            _ => match s.strip_prefix("chunked-").map(str::parse::<usize>) {
                Some(Ok(rows)) if rows > 0 => Ok(HeadLoss::Chunked { rows }),
                _ => Err(bad()),
            },
        }
    }
}

/// T tokens, C hidden, a vocabulary of V.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HeadShape {
    pub tokens: usize,
    pub hidden: usize,
    pub vocab: usize,
}

impl HeadShape {
    fn check(&self, variant: HeadLoss) -> Result<()> {
        if self.tokens == 0 || self.hidden == 0 || self.vocab == 0 {
            return Err(Error::Invalid(format!(
                "a head of {} tokens, {} hidden and a vocabulary of {} needs all three positive",
                self.tokens, self.hidden, self.vocab
            )));
        }
        if let HeadLoss::Chunked { rows: 0 } = variant {
            return Err(Error::Invalid(
                "a chunked head needs chunks of at least one row".into(),
            ));
        }
        Ok(())
    }
}

/// What the forward keeps for the backward.
pub struct HeadSaved {
    /// f32 `[T]`: each row's log-sum-exp (0 for ignored rows).
    lse: Tensor,
    /// f32 `[T, V]`, the materialized variant only.
    logits: Option<Tensor>,
}

impl HeadSaved {
    /// The forward's log-sum-exp, f32 `[T]`.
    pub fn lse(&self) -> &Tensor {
        &self.lse
    }
}

fn buf(be: &dyn Backend, dtype: DType, len: usize, what: &str) -> Result<Tensor> {
    be.alloc(dtype, len, &format!("logits: {what}"))
}

fn check_io(
    shape: &HeadShape,
    dt: DType,
    hidden: &Tensor,
    weight: &Tensor,
    targets: &Tensor,
) -> Result<()> {
    let HeadShape {
        tokens: t,
        hidden: c,
        vocab: v,
    } = *shape;
    if hidden.len() != t * c
        || weight.len() != v * c
        || targets.len() != t
        || hidden.dtype() != dt
        || weight.dtype() != dt
        || targets.dtype() != DType::I32
    {
        return Err(Error::Invalid(format!(
            "the head takes hidden {dt} [{t}, {c}], weight {dt} [{v}, {c}] and i32 targets [{t}]; got {} {}, {} {}, {} {}",
            hidden.dtype(),
            hidden.len(),
            weight.dtype(),
            weight.len(),
            targets.dtype(),
            targets.len()
        )));
    }
    Ok(())
}

/// logits f32 `[rows, V]` = hidden `[rows, C]`·weightᵀ.
fn logits_of(
    be: &dyn Backend,
    dt: DType,
    rows: usize,
    shape: &HeadShape,
    hidden: &Tensor,
    weight: &Tensor,
    logits: &mut Tensor,
) -> Result<()> {
    let mm = Matmul::new(rows, shape.vocab, shape.hidden).transposed(false, true);
    matmul_in(be, dt, &mm, hidden, weight, Epi::none(), logits)
}

/// d_hidden `[rows, C]` = dlogits·weight; d_weight `[V, C]` += dlogitsᵀ·hidden.
#[allow(clippy::too_many_arguments)]
fn grads_of(
    be: &dyn Backend,
    dt: DType,
    rows: usize,
    shape: &HeadShape,
    dlogits: &Tensor,
    hidden: &Tensor,
    weight: &Tensor,
    d_hidden: &mut Tensor,
    d_weight: &mut Tensor,
) -> Result<()> {
    let (c, v) = (shape.hidden, shape.vocab);
    matmul_in(
        be,
        dt,
        &Matmul::new(rows, c, v),
        dlogits,
        weight,
        Epi::none(),
        d_hidden,
    )?;
    let mut mm = Matmul::new(v, c, rows).transposed(true, false);
    mm.accumulate = true;
    matmul_in(be, dt, &mm, dlogits, hidden, Epi::none(), d_weight)
}

/// The chunks of the chunked variant: (first row, rows).
fn chunks(tokens: usize, rows: usize) -> impl Iterator<Item = (usize, usize)> {
    (0..tokens)
        .step_by(rows.max(1))
        .map(move |t0| (t0, rows.min(tokens - t0)))
}

/// The forward of the head and its loss: `loss` (f32 `[1]`) += scale·Σ cross-entropy.
/// hidden `[T, C]` and weight `[V, C]` in `dt`; targets i32 `[T]` ([`IGNORE_INDEX`] adds
/// nothing).
#[allow(clippy::too_many_arguments)]
pub fn head_forward(
    be: &dyn Backend,
    dt: DType,
    variant: HeadLoss,
    shape: HeadShape,
    hidden: &Tensor,
    weight: &Tensor,
    targets: &Tensor,
    scale: f32,
    loss: &mut Tensor,
) -> Result<HeadSaved> {
    shape.check(variant)?;
    check_io(&shape, dt, hidden, weight, targets)?;
    let (t, c, v) = (shape.tokens, shape.hidden, shape.vocab);
    let mut lse = buf(be, DType::F32, t, "lse")?;
    match variant {
        HeadLoss::Materialized => {
            let mut logits = buf(be, DType::F32, t * v, "logits")?;
            logits_of(be, dt, t, &shape, hidden, weight, &mut logits)?;
            be.cross_entropy_forward(&logits, targets, IGNORE_INDEX, scale, &mut lse, loss)?;
            Ok(HeadSaved {
                lse,
                logits: Some(logits),
            })
        }
        HeadLoss::Chunked { rows } => {
            for (t0, n) in chunks(t, rows) {
                let mut h = buf(be, dt, n * c, "hidden chunk")?;
                be.copy_range(&mut h, 0, hidden, t0 * c, n * c)?;
                let mut y = buf(be, DType::I32, n, "targets chunk")?;
                be.copy_range(&mut y, 0, targets, t0, n)?;
                let mut z = buf(be, DType::F32, n * v, "logits chunk")?;
                logits_of(be, dt, n, &shape, &h, weight, &mut z)?;
                drop(h);
                let mut l = buf(be, DType::F32, n, "lse chunk")?;
                be.cross_entropy_forward(&z, &y, IGNORE_INDEX, scale, &mut l, loss)?;
                drop(z);
                be.copy_range(&mut lse, t0, &l, 0, n)?;
            }
            Ok(HeadSaved { lse, logits: None })
        }
        HeadLoss::Fused => {
            be.fused_cross_entropy_forward(
                hidden,
                weight,
                targets,
                IGNORE_INDEX,
                scale,
                &mut lse,
                loss,
            )?;
            Ok(HeadSaved { lse, logits: None })
        }
    }
}

/// The backward of [`head_forward`] (the loss's gradient is 1): d_hidden `[T, C]` in `dt` is
/// written, d_weight f32 `[V, C]` accumulated. Consumes what the forward saved.
#[allow(clippy::too_many_arguments)]
pub fn head_backward(
    be: &dyn Backend,
    dt: DType,
    variant: HeadLoss,
    shape: HeadShape,
    hidden: &Tensor,
    weight: &Tensor,
    targets: &Tensor,
    scale: f32,
    saved: HeadSaved,
    d_hidden: &mut Tensor,
    d_weight: &mut Tensor,
) -> Result<()> {
    shape.check(variant)?;
    check_io(&shape, dt, hidden, weight, targets)?;
    let (t, c, v) = (shape.tokens, shape.hidden, shape.vocab);
    if d_hidden.len() != t * c
        || d_hidden.dtype() != dt
        || d_weight.len() != v * c
        || d_weight.dtype() != DType::F32
    {
        return Err(Error::Invalid(format!(
            "the head's gradients are d_hidden {dt} [{t}, {c}] and d_weight f32 [{v}, {c}]; got {} {} and {} {}",
            d_hidden.dtype(),
            d_hidden.len(),
            d_weight.dtype(),
            d_weight.len()
        )));
    }
    let HeadSaved { lse, logits } = saved;
    match variant {
        HeadLoss::Materialized => {
            let logits = logits.ok_or_else(|| {
                Error::Invalid("the materialized head's backward needs the forward's logits".into())
            })?;
            let mut dl = buf(be, dt, t * v, "dlogits")?;
            be.cross_entropy_backward(&logits, targets, IGNORE_INDEX, scale, &lse, &mut dl)?;
            drop(logits);
            drop(lse);
            grads_of(be, dt, t, &shape, &dl, hidden, weight, d_hidden, d_weight)
        }
        HeadLoss::Chunked { rows } => {
            for (t0, n) in chunks(t, rows) {
                let mut h = buf(be, dt, n * c, "hidden chunk")?;
                be.copy_range(&mut h, 0, hidden, t0 * c, n * c)?;
                let mut y = buf(be, DType::I32, n, "targets chunk")?;
                be.copy_range(&mut y, 0, targets, t0, n)?;
                let mut l = buf(be, DType::F32, n, "lse chunk")?;
                be.copy_range(&mut l, 0, &lse, t0, n)?;
                let mut z = buf(be, DType::F32, n * v, "logits chunk")?;
                logits_of(be, dt, n, &shape, &h, weight, &mut z)?;
                let mut dl = buf(be, dt, n * v, "dlogits chunk")?;
                be.cross_entropy_backward(&z, &y, IGNORE_INDEX, scale, &l, &mut dl)?;
                drop(z);
                drop(l);
                drop(y);
                let mut dh = buf(be, dt, n * c, "d_hidden chunk")?;
                grads_of(be, dt, n, &shape, &dl, &h, weight, &mut dh, d_weight)?;
                drop(dl);
                drop(h);
                be.copy_range(d_hidden, t0 * c, &dh, 0, n * c)?;
            }
            Ok(())
        }
        HeadLoss::Fused => be.fused_cross_entropy_backward(
            hidden,
            weight,
            targets,
            IGNORE_INDEX,
            scale,
            &lse,
            d_hidden,
            false,
            d_weight,
        ),
    }
}

/// [`head_forward`]'s allocations and frees in the ledger; what it leaves allocated (the
/// saved tensors) stays booked until [`ledger_backward`].
pub(crate) fn ledger_forward(l: &mut Ledger, dt: DType, variant: HeadLoss, shape: HeadShape) {
    let (t, c, v, s) = sizes(dt, shape);
    l.alloc(Cat::Logits, 4 * t); // lse
    match variant {
        HeadLoss::Materialized => l.alloc(Cat::Logits, 4 * t * v),
        HeadLoss::Chunked { rows } => {
            for (_, n) in chunks(t as usize, rows) {
                let n = n as u64;
                l.alloc(Cat::Logits, s * n * c); // hidden chunk
                l.alloc(Cat::Logits, 4 * n); // targets chunk
                l.alloc(Cat::Logits, 4 * n * v); // logits chunk
                l.free(Cat::Logits, s * n * c);
                l.alloc(Cat::Logits, 4 * n); // lse chunk
                l.free(Cat::Logits, 4 * n * v);
                l.free(Cat::Logits, 4 * n + 4 * n); // lse and targets chunks
            }
        }
        HeadLoss::Fused => {}
    }
}

/// [`head_backward`]'s allocations and frees, the saved tensors' release included.
pub(crate) fn ledger_backward(l: &mut Ledger, dt: DType, variant: HeadLoss, shape: HeadShape) {
    let (t, c, v, s) = sizes(dt, shape);
    match variant {
        HeadLoss::Materialized => {
            l.alloc(Cat::Logits, s * t * v); // dlogits
            l.free(Cat::Logits, 4 * t * v); // the saved logits
            l.free(Cat::Logits, 4 * t); // lse
            l.free(Cat::Logits, s * t * v); // dlogits, after both products
        }
        HeadLoss::Chunked { rows } => {
            for (_, n) in chunks(t as usize, rows) {
                let n = n as u64;
                l.alloc(Cat::Logits, s * n * c); // hidden chunk
                l.alloc(Cat::Logits, 4 * n); // targets chunk
                l.alloc(Cat::Logits, 4 * n); // lse chunk
                l.alloc(Cat::Logits, 4 * n * v); // logits chunk
                l.alloc(Cat::Logits, s * n * v); // dlogits chunk
                l.free(Cat::Logits, 4 * n * v + 4 * n + 4 * n); // logits, lse, targets chunks
                l.alloc(Cat::Logits, s * n * c); // d_hidden chunk
                l.free(Cat::Logits, s * n * v + s * n * c); // dlogits and hidden chunks
                l.free(Cat::Logits, s * n * c); // d_hidden chunk
            }
            l.free(Cat::Logits, 4 * t); // lse
        }
        HeadLoss::Fused => l.free(Cat::Logits, 4 * t),
    }
}

/// (T, C, V, bytes per compute-dtype element) as u64.
fn sizes(dt: DType, shape: HeadShape) -> (u64, u64, u64, u64) {
    (
        shape.tokens as u64,
        shape.hidden as u64,
        shape.vocab as u64,
        dt.size() as u64,
    )
}

/// The peak bytes of the head's forward and backward beyond its inputs and outputs, by the
/// ledger (all of them logits bytes).
pub fn peak_bytes(dt: DType, variant: HeadLoss, shape: HeadShape) -> u64 {
    let mut l = Ledger::default();
    ledger_forward(&mut l, dt, variant, shape);
    ledger_backward(&mut l, dt, variant, shape);
    l.peak as u64
}
