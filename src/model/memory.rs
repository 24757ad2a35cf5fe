//! The analytic memory model of one training step: what every buffer of the schedule in
//! `model/mod.rs` costs, in the order the schedule allocates and frees it, as expressions in
//! the model's shape and the policy. The peak and its split by category (weights, gradients,
//! optimizer state, inputs, saved activations, transient workspace) come out of that
//! ledger; tests pin them to the measured peak, to the byte, for every policy combination.
//!
//! Sizes, with T tokens per micro-batch, C hidden, s bytes per activation element, H heads,
//! N sequence length:
//! - a = T·C·s, one activation; st = 4·T, one f32 statistic per token;
//! - the attention core's statistic: flash 4·T·H (logsumexp), naive s·T·H·N (probabilities).
//!
//! Saved per block without checkpointing: ln1 (a), its mean and rstd (2 st), q, k, v (3a),
//! the attention output (a) and its statistic, x_mid (a), ln2 (a, 2 st), the fc output
//! before and after GELU (4a each), the block output (a): 16a + 4st + statistic. In 16-bit
//! activations that is 32·T·C + 16·T bytes + the core, beside Korthikanti et al.'s
//! 34·s·b·h + 5·a·s²·b (2022, sec. 4.1): no dropout masks here (their 2·sbh and, in the
//! attention core, 3·a·s²·b of mask and dropout output), and the block output kept
//! explicitly as the next block's input (their LN1 input).

use serde::{Deserialize, Serialize};

use crate::dtype::DType;
use crate::model::{Checkpoint, ModelShape, Policy};
use crate::techniques::attention::Variant;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Cat {
    Weights,
    Grads,
    Optimizer,
    Inputs,
    Activations,
    Workspace,
    /// A sharded step's buckets, gathered parameters and staging shards.
    Comm,
    /// Rank 0's extra bytes.
    Extra,
    /// The LM head's logits, their softmax statistics and their gradient.
    Logits,
}

/// How many categories a [`Ledger`] counts.
pub(crate) const CATEGORIES: usize = 9;

/// The model's peak and what it is made of at that moment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Breakdown {
    pub peak: u64,
    pub weights: u64,
    pub grads: u64,
    pub optimizer: u64,
    pub inputs: u64,
    pub activations: u64,
    pub workspace: u64,
    /// The LM head's logits (or their chunks), statistics and gradient.
    #[serde(default)]
    pub logits: u64,
}

/// The live bytes of each category as a schedule allocates and frees, and their split at
/// the highest total so far.
#[derive(Default)]
pub(crate) struct Ledger {
    pub(crate) live: [i64; CATEGORIES],
    pub(crate) peak: i64,
    pub(crate) at_peak: [i64; CATEGORIES],
}

impl Ledger {
    pub(crate) fn alloc(&mut self, cat: Cat, bytes: u64) {
        self.live[cat as usize] += bytes as i64;
        let total: i64 = self.live.iter().sum();
        if total > self.peak {
            self.peak = total;
            self.at_peak = self.live;
        }
    }
    pub(crate) fn free(&mut self, cat: Cat, bytes: u64) {
        self.live[cat as usize] -= bytes as i64;
        debug_assert!(
            self.live[cat as usize] >= 0,
            "model frees more {cat:?} than it holds"
        );
    }
}

/// What a schedule does around each block (see `model::Units`), in the ledger: nothing for
/// the single-rank step, gathers and reductions for a sharded one.
pub(crate) trait LedgerUnits {
    fn before_forward(&mut self, _l: &mut Ledger, _layer: usize, _recompute: bool) {}
    fn after_forward(&mut self, _l: &mut Ledger, _layer: usize, _recompute: bool) {}
    fn before_backward(&mut self, _l: &mut Ledger, _layer: usize) {}
    /// `micro`: which micro-batch; `last`: whether it is the step's last.
    fn after_backward(&mut self, _l: &mut Ledger, _layer: usize, _micro: usize, _last: bool) {}
}

struct NoUnits;
impl LedgerUnits for NoUnits {}

/// Per-micro-batch sizes of the schedule's buffers.
struct Sizes {
    a: u64,
    st: u64,
    core: u64,
    delta: u64,
    scores: u64,
    naive: bool,
}

impl Sizes {
    fn new(shape: &ModelShape, policy: &Policy) -> Self {
        let s = policy.dtype.size() as u64;
        let t = (shape.batch / policy.micro_batches * shape.seq) as u64;
        let (c, h, n) = (shape.hidden as u64, shape.heads as u64, shape.seq as u64);
        let naive = policy.attention == Variant::Naive;
        let scores = s * t * h * n;
        Sizes {
            a: t * c * s,
            st: 4 * t,
            core: if naive { scores } else { 4 * t * h },
            delta: 4 * t * h,
            scores,
            naive,
        }
    }

    /// A block's saved activations besides its output.
    fn rest(&self, keep_core: bool) -> u64 {
        14 * self.a + 4 * self.st + if keep_core { self.a + self.core } else { 0 }
    }

    fn block_forward(&self, l: &mut Ledger, keep_core: bool) {
        use Cat::*;
        let a = self.a;
        l.alloc(Activations, a + 2 * self.st); // ln1, mean, rstd
        for _ in 0..3 {
            l.alloc(Workspace, a); // q/k/v in tokens layout
            l.alloc(Activations, a); // ... permuted to heads
            l.free(Workspace, a);
        }
        l.alloc(Activations, a + self.core); // attention output + statistic
        l.alloc(Workspace, a); // attention output in tokens layout
        l.alloc(Activations, a); // x_mid
        l.free(Workspace, a);
        if !keep_core {
            l.free(Activations, a + self.core);
        }
        l.alloc(Activations, a + 2 * self.st); // ln2, mean, rstd
        l.alloc(Activations, 4 * a); // fc
        l.alloc(Activations, 4 * a); // GELU
        l.alloc(Activations, a); // block output
    }

    fn block_backward(&self, l: &mut Ledger, core_kept: bool) {
        use Cat::*;
        let a = self.a;
        l.alloc(Workspace, 4 * a); // dGELU
        l.free(Activations, 4 * a); // GELU output
        l.alloc(Workspace, 4 * a); // dfc
        l.free(Workspace, 4 * a);
        l.free(Activations, 4 * a); // fc output
        l.alloc(Workspace, a); // dln2
        l.free(Workspace, 4 * a);
        l.free(Activations, a); // ln2
        l.free(Workspace, a);
        l.free(Activations, a + 2 * self.st); // x_mid, ln2 statistics
        if !core_kept {
            l.alloc(Activations, a + self.core); // selective: recompute the core
        }
        l.alloc(Workspace, a); // d attention output (tokens)
        l.alloc(Workspace, a); // attention output (tokens)
        l.free(Workspace, a);
        l.alloc(Workspace, a); // dO (heads)
        l.free(Workspace, a);
        l.alloc(Workspace, 3 * a + self.delta); // dq, dk, dv, delta
        if self.naive {
            l.alloc(Workspace, self.scores); // dP
            l.free(Workspace, self.scores);
        }
        l.free(Workspace, self.delta);
        l.free(Activations, 3 * a + a + self.core); // q, k, v and the core
        l.free(Workspace, a); // dO
        l.alloc(Workspace, a); // dln1
        for _ in 0..3 {
            l.alloc(Workspace, a); // dq/dk/dv in tokens layout
            l.free(Workspace, a); // ... its heads layout
            l.free(Workspace, a);
        }
        l.free(Activations, a + 2 * self.st); // ln1 and its statistics
        l.free(Workspace, a); // dln1
    }
}

/// The step's peak allocated bytes under `policy`, split by category at the peak.
pub fn model(shape: &ModelShape, policy: &Policy) -> Breakdown {
    use Cat::*;
    let mut l = Ledger::default();
    let params = shape.params() as u64;
    l.alloc(Weights, 4 * params);
    if policy.dtype == DType::Bf16 {
        l.alloc(Weights, 2 * shape.matrix_params() as u64);
    }
    l.alloc(Grads, 4 * params);
    l.alloc(Optimizer, 8 * params);
    let z = Sizes::new(shape, policy);
    l.alloc(Inputs, z.a * policy.micro_batches as u64);
    l.alloc(Workspace, 4 * policy.micro_batches as u64); // one loss per micro-batch
    micro_batches(&mut l, shape, policy, &mut NoUnits);
    let p = l.at_peak;
    Breakdown {
        peak: l.peak as u64,
        weights: p[Weights as usize] as u64,
        grads: p[Grads as usize] as u64,
        optimizer: p[Optimizer as usize] as u64,
        inputs: p[Inputs as usize] as u64,
        activations: p[Activations as usize] as u64,
        workspace: p[Workspace as usize] as u64,
        logits: p[Logits as usize] as u64,
    }
}

/// Bytes of one micro-batch's input: `shape.batch` is the sequences of the rank.
pub(crate) fn input_bytes(shape: &ModelShape, policy: &Policy) -> u64 {
    Sizes::new(shape, policy).a
}

/// Every micro-batch's forward and backward (`model::micro_batch`) in the ledger, with the
/// units' hooks where the schedule calls them; `shape.batch` is the sequences of the rank.
pub(crate) fn micro_batches(
    l: &mut Ledger,
    shape: &ModelShape,
    policy: &Policy,
    units: &mut dyn LedgerUnits,
) {
    use Cat::*;
    let z = Sizes::new(shape, policy);
    let layers = shape.layers;
    let seg = policy.checkpoint.segment(layers);
    let recompute = policy.checkpoint.recomputes();
    let keep_core = policy.checkpoint != Checkpoint::Selective;
    for micro in 0..policy.micro_batches {
        let last = micro + 1 == policy.micro_batches;
        for b in 0..layers {
            units.before_forward(l, b, false);
            z.block_forward(l, keep_core);
            units.after_forward(l, b, false);
            if recompute {
                l.free(Activations, z.rest(keep_core));
                if b % seg != 0 {
                    l.free(Activations, z.a); // this block's input, recomputed later
                }
            }
        }
        l.alloc(Workspace, z.a); // d residual
        l.free(Activations, z.a); // the last output, after the loss
        let mut start = ((layers - 1) / seg) * seg;
        loop {
            let end = (start + seg).min(layers);
            if recompute {
                for b in start..end {
                    units.before_forward(l, b, true);
                    z.block_forward(l, true);
                    units.after_forward(l, b, true);
                    if b + 1 == end {
                        l.free(Activations, z.a); // the segment's output is not needed
                    }
                }
            }
            for b in (start..end).rev() {
                units.before_backward(l, b);
                z.block_backward(l, keep_core);
                units.after_backward(l, b, micro, last);
                if b > 0 {
                    l.free(Activations, z.a); // the block's input
                }
            }
            if start == 0 {
                break;
            }
            start -= seg;
        }
        l.free(Workspace, z.a); // d residual
    }
}

/// Bytes one block saves for backward without checkpointing (its output included).
pub fn saved_activations_per_layer(shape: &ModelShape, policy: &Policy) -> u64 {
    let z = Sizes::new(shape, policy);
    z.rest(true) + z.a
}

/// Korthikanti et al. 2022's estimate of the same, in 16-bit activations:
/// s·b·h·(34 + 5·a·s/h) bytes (sequence s, micro-batch b, hidden h, a heads).
pub fn korthikanti_per_layer(shape: &ModelShape, policy: &Policy) -> u64 {
    let (s, b, h, a) = (
        shape.seq as u64,
        (shape.batch / policy.micro_batches) as u64,
        shape.hidden as u64,
        shape.heads as u64,
    );
    s * b * h * 34 + 5 * a * s * s * b
}
