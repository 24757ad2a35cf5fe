//! The per-rank analytic memory model of a sharded training step: every buffer of
//! [`super::step`]'s schedule, in the order it allocates and frees them, in the same ledger
//! as the single-rank model (`model::memory`), so that the two can only agree. Tests pin it
//! to the measured peak of every rank, to the byte, for every strategy and policy, and run
//! it at worlds of up to 1024 ranks against the dry backend.
//!
//! Besides the peak it counts the bytes the rank hands to collectives in one step, which the
//! schedule also counts, and from which communication time is modeled.
//!
//! [`model_states`] is the same accounting of weights, gradients and optimizer state alone,
//! with the bytes per element as parameters: with the ZeRO paper's mixed precision (2-byte
//! parameters and gradients, 12 bytes of fp32 master and Adam moments) it gives the paper's
//! 16Ψ, 4Ψ + 12Ψ/N, 2Ψ + 14Ψ/N and 16Ψ/N.

use serde::{Deserialize, Serialize};

use crate::dtype::DType;
use crate::model::memory::{input_bytes, micro_batches, Cat, Ledger, LedgerUnits};
use crate::model::{ModelShape, Policy};
use crate::shard::step::compute_dtype;
use crate::shard::{buckets, shard_len, ShardSpec, Strategy, Traffic};

/// One rank's modeled peak and what it is made of at that moment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RankBreakdown {
    pub peak: u64,
    pub weights: u64,
    pub grads: u64,
    pub optimizer: u64,
    pub inputs: u64,
    pub activations: u64,
    pub workspace: u64,
    /// Buckets, gathered parameters, staging shards.
    pub comm: u64,
    /// Rank 0's extra bytes (zero on the other ranks).
    pub extra: u64,
    /// The LM head's logits, statistics and gradient.
    #[serde(default)]
    pub logits: u64,
}

impl RankBreakdown {
    fn from_ledger(l: &Ledger) -> Self {
        let p = l.at_peak.map(|x| x as u64);
        RankBreakdown {
            peak: l.peak as u64,
            weights: p[Cat::Weights as usize],
            grads: p[Cat::Grads as usize],
            optimizer: p[Cat::Optimizer as usize],
            inputs: p[Cat::Inputs as usize],
            activations: p[Cat::Activations as usize],
            workspace: p[Cat::Workspace as usize],
            comm: p[Cat::Comm as usize],
            extra: p[Cat::Extra as usize],
            logits: p[Cat::Logits as usize],
        }
    }

    /// Weights, gradients and optimizer state: what the strategy shards.
    pub fn model_states(&self) -> u64 {
        self.weights + self.grads + self.optimizer
    }
}

/// What a rank's step costs: its peak by category, and its collectives' bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RankModel {
    pub memory: RankBreakdown,
    pub traffic: Traffic,
}

/// Bytes per parameter element of each part of the model states.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StateWidths {
    /// The copy forward and backward read.
    pub compute: u64,
    /// A separate fp32 master, or 0 where the compute copy is the master.
    pub master: u64,
    pub grad: u64,
    /// Optimizer state besides the master (Adam's two moments: 8).
    pub optimizer: u64,
    /// Whether a parameter-sharding strategy keeps a shard of the compute copy besides the
    /// master's (DeepSpeed's ZeRO-3 keeps its fp16 partition; FSDP2, and headroom, cast the
    /// master's shard when gathering instead).
    pub compute_shard: bool,
}

impl StateWidths {
    /// The ZeRO paper's mixed-precision Adam (Rajbhandari et al. 2020, sec. 3.1): fp16
    /// parameters and gradients, fp32 master, momentum and variance (K = 12).
    pub const ZERO_PAPER: StateWidths = StateWidths {
        compute: 2,
        master: 4,
        grad: 2,
        optimizer: 8,
        compute_shard: true,
    };

    /// headroom's own, for a parameter computed in `dt`: fp32 gradients and moments; the
    /// master is separate only where the compute copy is not fp32.
    pub fn headroom(dt: DType) -> StateWidths {
        StateWidths {
            compute: dt.size() as u64,
            master: if dt == DType::F32 { 0 } else { 4 },
            grad: 4,
            optimizer: 8,
            compute_shard: false,
        }
    }
}

/// Model-state bytes per rank `(weights, gradients, optimizer)` of tensors of `lens`
/// elements, each with its widths, under `strategy` over `world` ranks, as the schedule
/// holds them between steps: a sharded part takes ⌈len/N⌉ elements. The separate master
/// counts as weights (as in the step's tags); where the compute copy is the master and it is
/// replicated (ddp, zero1, zero2), nothing more is kept for it.
pub fn model_states(
    strategy: Strategy,
    world: usize,
    tensors: &[(usize, StateWidths)],
) -> (u64, u64, u64) {
    let (mut weights, mut grads, mut optimizer) = (0, 0, 0);
    for &(len, w) in tensors {
        let full = len as u64;
        let shard = shard_len(len, world) as u64;
        let separate_master = w.master > 0 || strategy.shards_params();
        let master_width = if w.master > 0 { w.master } else { w.compute };
        if !strategy.shards_params() {
            weights += w.compute * full;
        } else if w.compute_shard && w.master > 0 {
            weights += w.compute * shard;
        }
        if separate_master {
            let n = if strategy.shards_optimizer() {
                shard
            } else {
                full
            };
            weights += master_width * n;
        }
        grads += w.grad * if strategy.shards_grads() { shard } else { full };
        optimizer += w.optimizer
            * if strategy.shards_optimizer() {
                shard
            } else {
                full
            };
    }
    (weights, grads, optimizer)
}

/// Every parameter tensor of `shape` with headroom's widths under `policy`.
pub fn headroom_tensors(shape: &ModelShape, policy: &Policy) -> Vec<(usize, StateWidths)> {
    let lens = shape.layout().lens();
    (0..shape.layers)
        .flat_map(|_| {
            lens.iter()
                .enumerate()
                .map(|(i, &len)| (len, StateWidths::headroom(compute_dtype(shape, policy, i))))
        })
        .collect()
}

/// The step of rank `rank` under `spec` (`shape.batch` is the global batch).
pub fn model(shape: &ModelShape, policy: &Policy, spec: &ShardSpec, rank: usize) -> RankModel {
    let strategy = spec.strategy;
    let world = spec.world.max(1);
    let lens = shape.layout().lens();
    let mut l = Ledger::default();
    // The state, as `RankState::new` allocates it.
    if rank == 0 && spec.rank0_extra > 0 {
        l.alloc(Cat::Extra, spec.rank0_extra.div_ceil(4) * 4);
    }
    let (weights, grads, optimizer) =
        model_states(strategy, world, &headroom_tensors(shape, policy));
    l.alloc(Cat::Weights, weights);
    l.alloc(Cat::Grads, grads);
    l.alloc(Cat::Optimizer, optimizer);
    let plan = if strategy.uses_buckets() {
        buckets(shape, spec.bucket_bytes)
    } else {
        Vec::new()
    };
    l.alloc(Cat::Comm, plan.iter().map(|b| 4 * b.len as u64).sum());
    let local = ModelShape {
        batch: shape.batch / world,
        ..*shape
    };
    l.alloc(
        Cat::Inputs,
        input_bytes(&local, policy) * policy.micro_batches as u64,
    );
    l.alloc(Cat::Workspace, 4 * policy.micro_batches as u64);
    let mut units = LedgerRank {
        strategy,
        world,
        sizes: lens
            .iter()
            .enumerate()
            .map(|(i, &len)| (len, compute_dtype(shape, policy, i).size() as u64))
            .collect(),
        gathered: vec![false; shape.layers],
        traffic: Traffic::default(),
    };
    micro_batches(&mut l, &local, policy, &mut units);
    let mut traffic = units.traffic;
    if strategy.uses_buckets() {
        traffic.all_reduce += plan.iter().map(|b| 4 * b.len as u64).sum::<u64>();
        traffic.calls += plan.len() as u64;
    }
    // The optimizer, as `RankUnits::optimizer` stages it.
    if matches!(strategy, Strategy::Zero1 | Strategy::Zero2) {
        for _ in 0..shape.layers {
            for &(len, size) in &units.sizes {
                let s = shard_len(len, world) as u64;
                let staged = if strategy.shards_grads() { 0 } else { 4 * s };
                l.alloc(Cat::Comm, staged);
                // The updated shard: in the compute dtype (a cast of the separate master) or
                // the fp32 compute copy's own part.
                l.alloc(Cat::Comm, size * s);
                l.free(Cat::Comm, size * s + staged);
                traffic.all_gather += size * len as u64;
                traffic.calls += 1;
            }
        }
    }
    RankModel {
        memory: RankBreakdown::from_ledger(&l),
        traffic,
    }
}

/// The largest peak over the ranks, and the rank that has it: rank 0 (with its extra bytes)
/// or any other (they are all alike).
pub fn peak_rank(shape: &ModelShape, policy: &Policy, spec: &ShardSpec) -> (usize, RankModel) {
    let zero = model(shape, policy, spec, 0);
    if spec.world == 1 || spec.rank0_extra == 0 {
        return (0, zero);
    }
    let other = model(shape, policy, spec, 1);
    if other.memory.peak > zero.memory.peak {
        (1, other)
    } else {
        (0, zero)
    }
}

/// The ledger side of `RankUnits`' hooks.
struct LedgerRank {
    strategy: Strategy,
    world: usize,
    /// Per parameter of a block: (elements, bytes per element of its compute copy).
    sizes: Vec<(usize, u64)>,
    gathered: Vec<bool>,
    traffic: Traffic,
}

impl LedgerRank {
    fn ensure(&mut self, l: &mut Ledger, layer: usize) {
        if !self.strategy.shards_params() || self.gathered[layer] {
            return;
        }
        for &(len, size) in &self.sizes {
            l.alloc(Cat::Comm, size * len as u64);
            if size != 4 {
                let cast = size * shard_len(len, self.world) as u64;
                l.alloc(Cat::Comm, cast);
                l.free(Cat::Comm, cast);
            }
            self.traffic.all_gather += size * len as u64;
            self.traffic.calls += 1;
        }
        self.gathered[layer] = true;
    }

    fn release(&mut self, l: &mut Ledger, layer: usize) {
        if self.gathered[layer] {
            let bytes: u64 = self.sizes.iter().map(|&(n, s)| s * n as u64).sum();
            l.free(Cat::Comm, bytes);
            self.gathered[layer] = false;
        }
    }

    fn unit_grad_bytes(&self) -> u64 {
        self.sizes.iter().map(|&(n, _)| 4 * n as u64).sum()
    }
}

impl LedgerUnits for LedgerRank {
    fn before_forward(&mut self, l: &mut Ledger, layer: usize, recompute: bool) {
        self.ensure(l, layer);
        if !recompute && layer + 1 < self.gathered.len() {
            self.ensure(l, layer + 1);
        }
    }

    fn after_forward(&mut self, l: &mut Ledger, layer: usize, recompute: bool) {
        if !recompute && self.strategy == Strategy::Fsdp {
            self.release(l, layer);
        }
    }

    fn before_backward(&mut self, l: &mut Ledger, layer: usize) {
        if self.strategy.shards_grads() {
            l.alloc(Cat::Grads, self.unit_grad_bytes());
        }
        self.ensure(l, layer);
        if layer > 0 {
            self.ensure(l, layer - 1);
        }
    }

    fn after_backward(&mut self, l: &mut Ledger, layer: usize, micro: usize, _last: bool) {
        if self.strategy.shards_grads() {
            for &(len, _) in &self.sizes {
                if micro > 0 {
                    let part = 4 * shard_len(len, self.world) as u64;
                    l.alloc(Cat::Comm, part);
                    l.free(Cat::Comm, part);
                }
                self.traffic.reduce_scatter += 4 * len as u64;
                self.traffic.calls += 1;
            }
            l.free(Cat::Grads, self.unit_grad_bytes());
        }
        if self.strategy.shards_params() {
            self.release(l, layer);
        }
    }
}
