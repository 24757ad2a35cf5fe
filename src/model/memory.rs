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
use crate::model::head::{self, HeadShape};
use crate::model::{Checkpoint, HeadLoss, Mlp, ModelShape, Norm, Policy};
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
    /// One `[T, C]` activation.
    a: u64,
    /// One `[T, kv]` activation (k or v; `a` without grouping).
    akv: u64,
    /// One `[T, F]` activation of the MLP.
    af: u64,
    /// Bytes of one norm's statistics (LayerNorm: mean and rstd; RMSNorm: rstd).
    ns: u64,
    core: u64,
    delta: u64,
    scores: u64,
    naive: bool,
    /// A repeated K or V for naive grouped attention (0 without grouping).
    rep: u64,
    swiglu: bool,
    /// With a vocabulary: the head's ledger.
    head: Option<(DType, HeadLoss, HeadShape)>,
}

impl Sizes {
    fn new(shape: &ModelShape, policy: &Policy) -> Self {
        let s = policy.dtype.size() as u64;
        let t = (shape.batch / policy.micro_batches * shape.seq) as u64;
        let (c, h, n) = (shape.hidden as u64, shape.heads as u64, shape.seq as u64);
        let naive = policy.attention == Variant::Naive;
        let scores = s * t * h * n;
        let st = 4 * t;
        Sizes {
            a: t * c * s,
            akv: t * shape.kv_dim() as u64 * s,
            af: t * shape.ffn() as u64 * s,
            ns: if shape.arch.norm == Norm::LayerNorm {
                2 * st
            } else {
                st
            },
            core: if naive { scores } else { 4 * t * h },
            delta: 4 * t * h,
            scores,
            naive,
            rep: if naive && shape.kv_heads() != shape.heads {
                t * c * s
            } else {
                0
            },
            swiglu: shape.arch.mlp == Mlp::SwiGlu,
            head: (shape.vocab() > 0).then(|| {
                (
                    policy.dtype,
                    policy.head,
                    HeadShape {
                        tokens: t as usize,
                        hidden: shape.hidden,
                        vocab: shape.vocab(),
                    },
                )
            }),
        }
    }

    fn mlp_acts(&self) -> u64 {
        if self.swiglu {
            3 * self.af
        } else {
            2 * self.af
        }
    }

    /// A block's saved activations besides its output.
    fn rest(&self, keep_core: bool) -> u64 {
        4 * self.a
            + 2 * self.akv
            + 2 * self.ns
            + self.mlp_acts()
            + if keep_core { self.a + self.core } else { 0 }
    }

    /// The repeated K then V of naive grouped attention's forward, each freed after use.
    fn repeats(&self, l: &mut Ledger, times: usize) {
        if self.rep > 0 {
            for _ in 0..times {
                l.alloc(Cat::Workspace, self.rep);
                l.free(Cat::Workspace, self.rep);
            }
        }
    }

    fn attention_forward(&self, l: &mut Ledger) {
        l.alloc(Cat::Activations, self.a + self.core); // attention output + statistic
        if self.naive {
            self.repeats(l, 2);
        }
    }

    fn block_forward(&self, l: &mut Ledger, keep_core: bool) {
        use Cat::*;
        let a = self.a;
        l.alloc(Activations, a + self.ns); // ln1 and its statistics
        for w in [a, self.akv, self.akv] {
            l.alloc(Workspace, w); // q/k/v in tokens layout
            l.alloc(Activations, w); // ... permuted to heads
            l.free(Workspace, w);
        }
        self.attention_forward(l);
        l.alloc(Workspace, a); // attention output in tokens layout
        l.alloc(Activations, a); // x_mid
        l.free(Workspace, a);
        if !keep_core {
            l.free(Activations, a + self.core);
        }
        l.alloc(Activations, a + self.ns); // ln2 and its statistics
        l.alloc(Activations, self.mlp_acts()); // fc and GELU, or gate, up and SwiGLU
        l.alloc(Activations, a); // block output
    }

    fn block_backward(&self, l: &mut Ledger, core_kept: bool) {
        use Cat::*;
        let (a, af) = (self.a, self.af);
        l.alloc(Workspace, af); // d of the MLP's activation
        l.free(Activations, af); // the activation
        if self.swiglu {
            l.alloc(Workspace, 2 * af); // d gate, d up
            l.free(Workspace, af);
            l.free(Activations, 2 * af); // gate, up
            l.alloc(Workspace, a); // dln2
            l.free(Workspace, 2 * af);
        } else {
            l.alloc(Workspace, af); // dfc
            l.free(Workspace, af);
            l.free(Activations, af); // fc output
            l.alloc(Workspace, a); // dln2
            l.free(Workspace, af);
        }
        l.free(Activations, a); // ln2
        l.free(Workspace, a);
        l.free(Activations, a + self.ns); // x_mid, ln2 statistics
        if !core_kept {
            self.attention_forward(l); // selective: recompute the core
        }
        l.alloc(Workspace, a); // d attention output (tokens)
        l.alloc(Workspace, a); // attention output (tokens)
        l.free(Workspace, a);
        l.alloc(Workspace, a); // dO (heads)
        l.free(Workspace, a);
        l.alloc(Workspace, a + 2 * self.akv + self.delta); // dq, dk, dv, delta
        if self.naive {
            l.alloc(Workspace, self.scores); // dP
            self.repeats(l, 4); // dV over every head, V, K, dK over every head
            l.free(Workspace, self.scores);
        }
        l.free(Workspace, self.delta);
        l.free(Activations, a + 2 * self.akv + a + self.core); // q, k, v and the core
        l.free(Workspace, a); // dO
        l.alloc(Workspace, a); // dln1
        for w in [a, self.akv, self.akv] {
            l.alloc(Workspace, w); // dq/dk/dv in tokens layout
            l.free(Workspace, w); // ... its heads layout
            l.free(Workspace, w);
        }
        l.free(Activations, a + self.ns); // ln1 and its statistics
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
    l.alloc(
        Inputs,
        input_bytes(shape, policy) * policy.micro_batches as u64,
    );
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

/// Bytes of one micro-batch's inputs (hidden states; or token ids and targets, i32 each):
/// `shape.batch` is the sequences of the rank.
pub(crate) fn input_bytes(shape: &ModelShape, policy: &Policy) -> u64 {
    if shape.vocab() > 0 {
        2 * 4 * (shape.batch / policy.micro_batches * shape.seq) as u64
    } else {
        Sizes::new(shape, policy).a
    }
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
        if z.head.is_some() {
            l.alloc(Activations, z.a); // the embedding's output, block 0's input
        }
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
        match z.head {
            None => {
                l.alloc(Workspace, z.a); // d residual
                l.free(Activations, z.a); // the last output, after the loss
            }
            Some((dt, variant, hs)) => {
                l.alloc(Activations, z.a + z.ns); // final norm and its statistics
                head::ledger_forward(l, dt, variant, hs);
                l.alloc(Workspace, z.a); // d final norm
                head::ledger_backward(l, dt, variant, hs);
                l.free(Activations, z.a); // the final norm's output
                l.alloc(Workspace, z.a); // d residual
                l.free(Workspace, z.a); // d final norm
                l.free(Activations, z.ns + z.a); // its statistics, the last output
            }
        }
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
        if z.head.is_some() {
            l.free(Activations, z.a); // the embedding's output, before its backward
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
