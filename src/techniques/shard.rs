//! Sharded data-parallel training: one optimizer step of the block stack over `world` ranks
//! under DDP, ZeRO-1, ZeRO-2 or FSDP (see `src/shard`), combined with the training
//! policies (checkpointing, attention, precision, micro-batching). Rank 0 runs on the
//! suite's backend, so the case's measured peak is rank 0's; every rank's peak is in the
//! record's `shard` part beside the per-rank model.
//!
//! Validation: after one step from fresh weights, the reduced gradients and the updated
//! master weights, assembled from every rank's shards, against one rank running the same
//! global batch (the same policy with `world × k` micro-batches) on the CPU backend, and
//! every replica against rank 0's. On the CPU with one micro-batch per rank the comparison
//! is bitwise: the ranks' in-process reduction adds the same terms in the same order as the
//! single rank's accumulation. Otherwise the gradients are held to the training family's
//! tolerances and the weights to AdamW's first step applied on the host to the gradients
//! the ranks reduced.

use crate::backend::cpu::CpuBackend;
use crate::backend::{AttentionShape, Backend, BackendKind};
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::model::{Checkpoint, InitialValues, ModelShape, Policy, TrainState};
use crate::report::Timeline;
use crate::rng::Rng;
use crate::shard::memory::model;
use crate::shard::step::World;
use crate::shard::{RankRecord, ShardRecord, ShardSpec, Strategy, Traffic};
use crate::techniques::attention::{self, Pass, Variant};
use crate::techniques::train::{
    grad_name, grad_tolerance, loss_check, reference_checks, REFERENCE_LIMIT,
};
use crate::techniques::{
    tensor_check, Case, CaseInfo, Instance, Profile, Readback, Tamper, Validation,
};

pub struct ShardCase {
    info: CaseInfo,
    shape: ModelShape,
    policy: Policy,
    spec: ShardSpec,
}

impl ShardCase {
    pub fn new(shape: ModelShape, policy: Policy, spec: ShardSpec) -> Self {
        let technique = format!("{}-{}", spec.strategy.name(), policy.name());
        let mut info = CaseInfo::new(
            "shard",
            &technique,
            policy.dtype,
            format!("{}{}", shape.name(), spec.suffix()),
        );
        let tokens = (shape.batch * shape.seq) as f64;
        let att = AttentionShape::new(shape.batch, shape.heads, shape.seq, shape.head_dim(), true);
        info.flops = 6.0 * shape.params() as f64 * tokens
            + shape.layers as f64 * attention::flops(Pass::ForwardBackward, &att);
        let m = model(&shape, &policy, &spec, 0);
        info.predicted_peak_bytes = m.memory.peak;
        info.bytes_moved = m.memory.peak as f64;
        info.tolerance = grad_tolerance(BackendKind::Cuda, &policy);
        ShardCase {
            info,
            shape,
            policy,
            spec,
        }
    }
}

struct ShardInstance {
    world: World,
    init: InitialValues,
    shape: ModelShape,
    policy: Policy,
    spec: ShardSpec,
    kind: BackendKind,
    /// One step's traffic per rank, as validation measured it.
    traffic: Vec<Traffic>,
    fresh: bool,
}

impl Case for ShardCase {
    fn info(&self) -> &CaseInfo {
        &self.info
    }

    fn skip_reason(&self, be: &dyn Backend) -> Option<String> {
        if self.shape.params() * self.shape.batch * self.shape.seq > REFERENCE_LIMIT {
            return Some(format!(
                "a sharded step is validated against the CPU reference, which this size ({} parameters × {} tokens) is beyond",
                self.shape.params(),
                self.shape.batch * self.shape.seq
            ));
        }
        let kernel = match self.policy.dtype {
            DType::F32 | DType::I32 => crate::backend::MatmulKernel::Simt,
            DType::Bf16 => crate::backend::MatmulKernel::Mma,
        };
        be.matmul_available(kernel, self.policy.dtype).err()
    }

    fn setup(&self, be: &dyn Backend, rng: &mut Rng) -> Result<Box<dyn Instance>> {
        let init = InitialValues::random(&self.shape, rng);
        let world = World::new(be, self.shape, self.policy, self.spec, &init)?;
        Ok(Box::new(ShardInstance {
            world,
            init,
            shape: self.shape,
            policy: self.policy,
            spec: self.spec,
            kind: be.kind(),
            traffic: Vec::new(),
            fresh: true,
        }))
    }
}

/// A tensor's elements as the ranks hold them, merged: where one rank holds only its shard
/// (NaN elsewhere), each element comes from the rank that owns it.
fn merge(parts: Vec<Vec<f32>>) -> Vec<f32> {
    let mut it = parts.into_iter();
    let mut out = it.next().unwrap_or_default();
    for p in it {
        for (o, x) in out.iter_mut().zip(p) {
            if o.is_nan() && !x.is_nan() {
                *o = x;
            }
        }
    }
    out
}

/// AdamW's first step from `w` with gradient `g` (moments zero), in f64: the bias
/// corrections make m̂ = g and v̂ = g², so w - lr·(g/(|g| + ε) + λ·w).
fn adamw_first_step(h: &crate::backend::AdamW, w: &[f32], g: &[f32]) -> Vec<f32> {
    let (lr, eps, wd) = (h.lr as f64, h.eps as f64, h.weight_decay as f64);
    w.iter()
        .zip(g)
        .map(|(&w, &g)| {
            let (w, g) = (w as f64, g as f64);
            (w - lr * (g / (g.abs() + eps) + wd * w)) as f32
        })
        .collect()
}

/// The updated weights' name as validation reads them back.
pub fn weight_name(shape: &ModelShape, layer: usize, param: usize) -> String {
    let name = shape.layout().params[param].name;
    format!("layer {layer} {name} (updated)")
}

impl Instance for ShardInstance {
    fn run(&mut self, be: &dyn Backend) -> Result<()> {
        self.world.step(be)
    }

    /// One step on every rank from the fresh state, then the reduced gradients and updated
    /// weights against the single rank's step (see the module's documentation).
    fn validate(
        &mut self,
        be: &dyn Backend,
        _rng: &mut Rng,
        tamper: &mut Tamper<'_>,
    ) -> Result<Validation> {
        if !self.fresh {
            return Err(Error::Invalid(
                "bug: a sharded case validates the step from its fresh state only".into(),
            ));
        }
        self.fresh = false;
        self.world.step(be)?;
        self.traffic = self.world.take_traffic();
        let (sh, policy, world) = (self.shape, self.policy, self.spec.world);
        let backends = self.world.backends(be);
        let mut loss = 0f32;
        for (r, st) in self.world.ranks.iter().enumerate() {
            for t in &st.losses {
                loss += backends[r].read(t)?[0];
            }
        }
        let specs = sh.layout().params;
        let rows: Vec<usize> = specs.iter().map(|p| p.row).collect();
        let lens: Vec<usize> = specs.iter().map(|p| p.len).collect();
        let mut grads = Vec::with_capacity(sh.layers);
        let mut weights = Vec::with_capacity(sh.layers);
        // The gradients as the ranks reduced them, before any tampering: what the weights'
        // expected update is computed from, so that a corrupted gradient read-back is
        // blamed on the gradient alone.
        let mut reduced = Vec::new();
        let mut checks = vec![loss_check(loss)];
        for l in 0..sh.layers {
            let (mut g_layer, mut w_layer) = (Vec::new(), Vec::new());
            for (i, &row) in rows.iter().enumerate() {
                let mut parts = Vec::with_capacity(world);
                let mut wparts = Vec::with_capacity(world);
                // A replicated compute copy must be the same bits on every rank as on rank 0.
                let first = self.world.ranks[0].units.read_full(backends[0], l, i)?;
                for (r, st) in self.world.ranks.iter().enumerate() {
                    parts.push(st.units.read_grad(backends[r], l, i)?);
                    wparts.push(st.units.read_master(backends[r], l, i)?);
                    if let (true, Some(first)) = (r > 0, &first) {
                        if let Some(mut mine) = st.units.read_full(backends[r], l, i)? {
                            let name = format!("rank {r} replica of {}", weight_name(&sh, l, i));
                            tamper(Readback {
                                name: &name,
                                values: &mut mine,
                                row,
                            });
                            checks.push(tensor_check(name, &mine, first, true, 0.0, 0.0));
                        }
                    }
                }
                let mut g = merge(parts);
                let mut w = merge(wparts);
                reduced.push(g.clone());
                tamper(Readback {
                    name: &grad_name(&sh, l, i),
                    values: &mut g,
                    row,
                });
                tamper(Readback {
                    name: &weight_name(&sh, l, i),
                    values: &mut w,
                    row,
                });
                g_layer.push(g);
                w_layer.push(w);
            }
            grads.push(g_layer);
            weights.push(w_layer);
        }
        // One rank, the same global batch as world × k micro-batches, on the host.
        let cpu = CpuBackend::new(None, None);
        let single = Policy {
            micro_batches: policy.micro_batches * world,
            ..policy
        };
        let mut r = TrainState::new(&cpu, sh, single, &self.init)?;
        r.step(&cpu)?;
        let want_grads = r.read_grads(&cpu)?;
        let exact = self.kind == BackendKind::Cpu && policy.micro_batches == 1;
        let how = if exact {
            for l in 0..sh.layers {
                for i in 0..lens.len() {
                    let want_w = cpu.read(&r.params.master[l][i])?;
                    checks.push(tensor_check(
                        grad_name(&sh, l, i),
                        &grads[l][i],
                        &want_grads[l][i],
                        true,
                        0.0,
                        0.0,
                    ));
                    checks.push(tensor_check(
                        weight_name(&sh, l, i),
                        &weights[l][i],
                        &want_w,
                        true,
                        0.0,
                        0.0,
                    ));
                }
            }
            format!(
                "every reduced gradient and updated weight bitwise against one rank's step over {} micro-batches",
                single.micro_batches
            )
        } else {
            // Micro-batches on ranks sum in another order than one rank's (fp32 rounding
            // only); on a GPU the kernels differ from the host's as in the training family.
            let tolerance = match self.kind {
                BackendKind::Cpu => 1e-4,
                _ => grad_tolerance(self.kind, &policy),
            };
            checks.extend(reference_checks(
                &sh,
                &grads,
                &want_grads,
                tolerance,
                policy.dtype,
            ));
            // The weights: AdamW's first step on the host from the gradients the ranks
            // reduced. The device rounds each of a handful of f32 operations: 1e-6 of the
            // tensor's largest weight is some 16 roundings of it.
            for l in 0..sh.layers {
                for i in 0..lens.len() {
                    let g = &reduced[l * lens.len() + i];
                    let want_w =
                        adamw_first_step(&self.world.ranks[0].adamw, &self.init.weights[l][i], g);
                    checks.push(tensor_check(
                        weight_name(&sh, l, i),
                        &weights[l][i],
                        &want_w,
                        false,
                        1e-6,
                        0.0,
                    ));
                }
            }
            format!(
                "every reduced gradient against one rank's step over {} micro-batches (tolerance {tolerance:.0e}), every updated weight against AdamW's first step on the host (1e-6)",
                single.micro_batches
            )
        };
        let mut v = Validation::from_checks(checks);
        v.detail = format!(
            "checked {how}; replicas bitwise against rank 0's; {}",
            v.detail
        );
        Ok(v)
    }

    /// Rank 0's memory through one optimizer step of the whole world, from what lives across
    /// steps, with the phases marked.
    fn timeline(&mut self, be: &dyn Backend) -> Result<Option<Timeline>> {
        let start = self.world.ranks[0].live_buffers();
        let tracker = be.memory();
        tracker.start_timeline();
        let stepped = self.world.step(be);
        let events = tracker.take_timeline();
        let phases = tracker.take_phases();
        stepped?;
        self.world.take_traffic();
        Ok(Some(Timeline::recorded(&start, &events, &phases)))
    }

    fn shard_record(&self, rank0_peak: u64) -> Option<ShardRecord> {
        let peaks = std::iter::once(rank0_peak).chain(
            self.world
                .peers
                .iter()
                .map(|p| p.memory().stats().peak_allocated),
        );
        let ranks = peaks
            .enumerate()
            .map(|(r, peak)| RankRecord {
                rank: r,
                peak_allocated: peak,
                model: Some(model(&self.shape, &self.policy, &self.spec, r).memory),
            })
            .collect();
        Some(ShardRecord {
            strategy: self.spec.strategy.name().into(),
            world: self.spec.world,
            bucket_bytes: self.spec.bucket_bytes,
            rank0_extra: self.spec.rank0_extra,
            comm: self.world.ranks[0].units.comm.name(),
            ranks,
            traffic: self.traffic.first().copied().unwrap_or_default(),
            nccl_buffers: self.world.ranks[0].units.comm.device_buffers(),
        })
    }
}

/// The policies each strategy runs with in the suite: the memory-lean one people pair with
/// sharding (selective recomputation, flash, bf16), and plain fp32 without checkpointing.
fn suite_policies() -> [Policy; 2] {
    [
        Policy {
            checkpoint: Checkpoint::Selective,
            attention: Variant::Flash,
            dtype: DType::Bf16,
            micro_batches: 1,
            head: crate::model::HeadLoss::Materialized,
        },
        Policy {
            checkpoint: Checkpoint::None,
            attention: Variant::Flash,
            dtype: DType::F32,
            micro_batches: 1,
            head: crate::model::HeadLoss::Materialized,
        },
    ]
}

/// Every strategy at 2 and 4 simulated ranks on the CPU; on a GPU, at world size 1 (the
/// box's other GPUs, where present, at 2 and 4: a case whose GPUs are missing is skipped).
pub fn cases(_profile: Profile, kind: BackendKind) -> Vec<Box<dyn Case>> {
    let (shape, worlds): (ModelShape, &[usize]) = match kind {
        BackendKind::Cpu => (
            ModelShape {
                layers: 2,
                hidden: 128,
                heads: 2,
                seq: 32,
                batch: 4,
                arch: crate::model::Arch::GPT,
            },
            &[2, 4],
        ),
        // As large as the host reference can check in seconds (params × tokens ≈ 4e8).
        BackendKind::Cuda | BackendKind::Dry => (
            ModelShape {
                layers: 2,
                hidden: 128,
                heads: 2,
                seq: 128,
                batch: 8,
                arch: crate::model::Arch::GPT,
            },
            &[1, 2, 4],
        ),
    };
    let mut out: Vec<Box<dyn Case>> = Vec::new();
    for &world in worlds {
        for strategy in Strategy::ALL {
            for (n, policy) in suite_policies().into_iter().enumerate() {
                // fp32 once per world, with DDP and FSDP only: the strategies' contrast.
                if n == 1 && !matches!(strategy, Strategy::Ddp | Strategy::Fsdp) {
                    continue;
                }
                out.push(Box::new(ShardCase::new(
                    shape,
                    policy,
                    ShardSpec::new(strategy, world),
                )));
            }
        }
    }
    out
}

/// Every strategy at 1 to 4 ranks on a model with an odd sequence length, under each
/// checkpointing policy and with micro-batches, plus rank 0's extra bytes and small buckets.
pub fn check_cases(kind: BackendKind) -> Vec<Box<dyn Case>> {
    let shape = ModelShape {
        layers: 3,
        hidden: 128,
        heads: 2,
        seq: 17,
        batch: 24,
        arch: crate::model::Arch::GPT,
    };
    let worlds: &[usize] = match kind {
        BackendKind::Cpu | BackendKind::Dry => &[1, 2, 3, 4],
        BackendKind::Cuda => &[1, 2],
    };
    let mut out: Vec<Box<dyn Case>> = Vec::new();
    for &world in worlds {
        for strategy in Strategy::ALL {
            let policies = [
                (Checkpoint::None, Variant::Flash, DType::F32, 1),
                (Checkpoint::Full, Variant::Naive, DType::Bf16, 1),
                (Checkpoint::Selective, Variant::Flash, DType::Bf16, 2),
            ];
            for (checkpoint, attention, dtype, micro_batches) in policies {
                let mut spec = ShardSpec::new(strategy, world);
                spec.bucket_bytes = 256 << 10;
                spec.rank0_extra = 4099;
                let p = Policy {
                    checkpoint,
                    attention,
                    dtype,
                    micro_batches,
                    head: crate::model::HeadLoss::Materialized,
                };
                out.push(Box::new(ShardCase::new(shape, p, spec)));
            }
        }
    }
    out
}
