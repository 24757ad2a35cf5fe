//! One rank of a sharded training step: its share of the training state and the step's
//! schedule under a [`Strategy`], on the rank's own backend, talking to the other ranks
//! through a [`Comm`].
//!
//! The state, per parameter tensor of every block (see `model::PARAM_NAMES`):
//!
//! | strategy | compute copy | fp32 master | gradients | AdamW moments | between |
//! | --- | --- | --- | --- | --- | --- |
//! | ddp | full | full, where the compute copy is bf16 | full | full | buckets (a second copy of the gradients) |
//! | zero1 | full | shard, where the compute copy is bf16 | full | shard | buckets |
//! | zero2 | full | shard, where the compute copy is bf16 | shard | shard | |
//! | fsdp | gathered per block | shard | shard | shard | |
//!
//! The compute copy is what forward and backward read: matrices in the policy's dtype, the
//! layernorm weights and biases in fp32. Where it is fp32 it is the master weight itself
//! (so ZeRO-1/2 update their shard of it in a staging copy and all-gather it back, as
//! DeepSpeed updates its partition in place). Every tensor is sharded on its own (FSDP2's
//! per-parameter sharding), in shards of ⌈len/N⌉ elements.
//!
//! The schedule is the single-rank step's (`model::micro_batch`, the same kernels in the
//! same order), with this module's [`Units`] around each block:
//! - fsdp gathers a block before its forward, prefetching the next, and frees it after the
//!   forward (`fsdp`) or keeps it until its backward (`fsdp-noreshard`); before a block's
//!   backward it gathers it and prefetches the one before; a recomputed forward (activation
//!   checkpointing) gathers without prefetching and keeps the block for its backward;
//! - zero2 and fsdp give each block fresh full-size gradients for its backward, then
//!   reduce-scatter them into the rank's shard (adding to it after the first micro-batch)
//!   and free them: every micro-batch, as FSDP does without `no_sync`;
//! - ddp and zero1 all-reduce in buckets on the last micro-batch (DDP's `no_sync` before
//!   it): a bucket is reduced as soon as the backward has produced all of its gradients,
//!   by copying them into the bucket, all-reducing it and copying back.
//!
//! Collectives run in order with the compute (one stream per rank); the time they would
//! overlap with it on separate streams is not taken off.

use std::sync::Arc;

use crate::backend::{AdamW, Backend, Tensor};
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::model::{
    inputs_and_losses, micro_batch, InitialValues, LayerView, MicroBatch, ModelShape, ParamSpec,
    Policy, Step, Units,
};
use crate::shard::{
    buckets, comm_group, owned, shard_len, Bucket, Comm, ShardSpec, Strategy, Traffic,
};

/// The dtype parameter `param` of a block is computed in under `policy`.
pub fn compute_dtype(shape: &ModelShape, policy: &Policy, param: usize) -> DType {
    if policy.dtype == DType::Bf16 && shape.layout().params[param].matrix {
        DType::Bf16
    } else {
        DType::F32
    }
}

fn tag(shape: &ModelShape, category: &str, layer: usize, param: usize, what: &str) -> String {
    let name = shape.layout().params[param].name;
    if what.is_empty() {
        format!("{category}: layer {layer} {name}")
    } else {
        format!("{category}: layer {layer} {name} ({what})")
    }
}

/// The rank's share of the training state, and what its step needs besides.
pub struct RankState {
    pub units: RankUnits,
    /// One input per micro-batch of this rank's sequences.
    pub inputs: Vec<Tensor>,
    pub losses: Vec<Tensor>,
    /// What each micro-batch's loss is multiplied by (see `model::TrainState::loss_scale`).
    pub loss_scale: f32,
    /// Rank 0's extra bytes (metrics, logging tensors), alive through the step.
    pub extra: Option<Tensor>,
    pub step: u32,
    pub adamw: AdamW,
}

/// What blocks read and write during the step, and the collectives that move it.
pub struct RankUnits {
    pub shape: ModelShape,
    pub policy: Policy,
    pub spec: ShardSpec,
    pub rank: usize,
    pub comm: Box<dyn Comm>,
    /// `[layer][param]`: the resident compute copy (none under fsdp).
    pub full: Vec<Vec<Tensor>>,
    /// `[layer][param]`: the separate fp32 master (full or shard), where there is one.
    pub master: Vec<Vec<Option<Tensor>>>,
    /// `[layer][param]`: gradients, full (ddp, zero1) or the rank's shard.
    pub grads: Vec<Vec<Tensor>>,
    pub m: Vec<Vec<Tensor>>,
    pub v: Vec<Vec<Tensor>>,
    pub bucket_plan: Vec<Bucket>,
    pub buckets: Vec<Tensor>,
    /// fsdp: the blocks gathered now.
    gathered: Vec<Option<Vec<Tensor>>>,
    /// zero2, fsdp: the full-size gradients of the blocks in backward now.
    unit_grads: Vec<Option<Vec<Tensor>>>,
    /// ddp, zero1: buckets reduced in this step.
    reduced: Vec<bool>,
    /// Which micro-batch runs now.
    micro: usize,
    /// A block's parameters.
    specs: Vec<ParamSpec>,
}

impl RankState {
    /// Allocates rank `comm.rank()`'s state and fills it from `init` (the global batch's
    /// inputs: this rank takes its contiguous share of the sequences).
    pub fn new(
        be: &dyn Backend,
        shape: ModelShape,
        policy: Policy,
        spec: ShardSpec,
        comm: Box<dyn Comm>,
        init: &InitialValues,
    ) -> Result<RankState> {
        shape.check()?;
        spec.check(&shape)?;
        if comm.world() != spec.world {
            return Err(Error::Invalid(format!(
                "a communicator of {} ranks for a world of {}",
                comm.world(),
                spec.world
            )));
        }
        let local_batch = shape.batch / spec.world;
        if policy.micro_batches == 0 || local_batch % policy.micro_batches != 0 {
            return Err(Error::Invalid(format!(
                "a rank's {local_batch} sequences (a global batch of {} over {} ranks) cannot be split into {} equal micro-batches",
                shape.batch, spec.world, policy.micro_batches
            )));
        }
        let rank = comm.rank();
        let (world, strategy) = (spec.world, spec.strategy);
        let lens = shape.layout().lens();
        let extra = if rank == 0 && spec.rank0_extra > 0 {
            let len = spec.rank0_extra.div_ceil(4) as usize;
            let mut t = be.alloc(DType::F32, len, "extra: rank-0 metrics and logs")?;
            be.zero(&mut t)?;
            Some(t)
        } else {
            None
        };
        let shard_values = |values: &[f32]| -> Vec<f32> {
            let (at, count) = owned(values.len(), world, rank);
            let mut v = values[at..at + count].to_vec();
            v.resize(shard_len(values.len(), world), 0.0);
            v
        };
        let weights = |l: usize, i: usize| init.weights.get(l).map(|w| &w[i]);
        let mut full = Vec::new();
        let mut master = Vec::new();
        for l in 0..shape.layers {
            let mut f_layer = Vec::new();
            let mut m_layer = Vec::new();
            for (i, &len) in lens.iter().enumerate() {
                let dt = compute_dtype(&shape, &policy, i);
                let separate = dt != DType::F32 || strategy.shards_params();
                let master_len = if strategy.shards_optimizer() {
                    shard_len(len, world)
                } else {
                    len
                };
                let m = if separate {
                    let mut t = be.alloc(
                        DType::F32,
                        master_len,
                        &tag(&shape, "weights", l, i, "fp32 master"),
                    )?;
                    match weights(l, i) {
                        Some(w) if master_len == len => be.write(&mut t, w)?,
                        Some(w) => be.write(&mut t, &shard_values(w))?,
                        None => be.zero(&mut t)?,
                    }
                    Some(t)
                } else {
                    None
                };
                if !strategy.shards_params() {
                    let mut t = be.alloc(dt, len, &tag(&shape, "weights", l, i, ""))?;
                    match weights(l, i) {
                        Some(w) => be.write(&mut t, w)?,
                        None => be.zero(&mut t)?,
                    }
                    f_layer.push(t);
                }
                m_layer.push(m);
            }
            if !strategy.shards_params() {
                full.push(f_layer);
            }
            master.push(m_layer);
        }
        let per_param = |category: &str, sharded: bool| -> Result<Vec<Vec<Tensor>>> {
            (0..shape.layers)
                .map(|l| {
                    lens.iter()
                        .enumerate()
                        .map(|(i, &len)| {
                            let n = if sharded { shard_len(len, world) } else { len };
                            let what = if sharded { "shard" } else { "" };
                            let mut t =
                                be.alloc(DType::F32, n, &tag(&shape, category, l, i, what))?;
                            be.zero(&mut t)?;
                            Ok(t)
                        })
                        .collect()
                })
                .collect()
        };
        let grads = per_param("grads", strategy.shards_grads())?;
        let m = per_param("optimizer", strategy.shards_optimizer())?;
        let v = per_param("optimizer", strategy.shards_optimizer())?;
        let bucket_plan = if strategy.uses_buckets() {
            buckets(&shape, spec.bucket_bytes)
        } else {
            Vec::new()
        };
        let mut bucket_tensors = Vec::new();
        for (b, plan) in bucket_plan.iter().enumerate() {
            let mut t = be.alloc(DType::F32, plan.len, &format!("comm: gradient bucket {b}"))?;
            be.zero(&mut t)?;
            bucket_tensors.push(t);
        }
        // This rank's sequences: a contiguous share of the global batch, in micro-batches.
        let local = ModelShape {
            batch: local_batch,
            ..shape
        };
        let (inputs, _, losses) = inputs_and_losses(be, &local, &policy, rank * local_batch, init)?;
        let reduced = vec![false; bucket_plan.len()];
        Ok(RankState {
            units: RankUnits {
                shape,
                policy,
                spec,
                rank,
                comm,
                full,
                master,
                grads,
                m,
                v,
                bucket_plan,
                buckets: bucket_tensors,
                gathered: (0..shape.layers).map(|_| None).collect(),
                unit_grads: (0..shape.layers).map(|_| None).collect(),
                reduced,
                micro: 0,
                specs: shape.layout().params,
            },
            inputs,
            losses,
            loss_scale: init.loss_scale(&shape),
            extra,
            step: 0,
            adamw: AdamW::default(),
        })
    }

    /// The rank's sequences as a model shape (its batch, the global one's other sizes).
    pub fn local_shape(&self) -> ModelShape {
        ModelShape {
            batch: self.units.shape.batch / self.units.spec.world,
            ..self.units.shape
        }
    }

    /// Forward and backward of every micro-batch, gradients reduced as the strategy does.
    pub fn forward_backward(&mut self, be: &dyn Backend) -> Result<()> {
        for layer in &mut self.units.grads {
            for g in layer {
                be.zero(g)?;
            }
        }
        self.units.reduced.iter_mut().for_each(|r| *r = false);
        let local = self.local_shape();
        for j in 0..self.units.policy.micro_batches {
            self.units.micro = j;
            let step = Step {
                shape: local,
                policy: self.units.policy,
                loss_scale: self.loss_scale,
                micro: j,
            };
            let data = MicroBatch {
                input: &self.inputs[j],
                targets: None,
            };
            micro_batch(be, &step, &mut self.units, data, &mut self.losses[j])?;
        }
        if let Some(b) = self.units.reduced.iter().position(|r| !r) {
            return Err(Error::Invalid(format!(
                "bug: gradient bucket {b} was never all-reduced"
            )));
        }
        Ok(())
    }

    /// One optimizer step: forward, backward, the gradients' reduction, AdamW on what the
    /// rank owns, and the updated parameters gathered back where they are replicated.
    pub fn step(&mut self, be: &dyn Backend) -> Result<()> {
        self.forward_backward(be)?;
        be.memory().mark_phase("optimizer");
        self.step += 1;
        self.units.optimizer(be, &self.adamw, self.step)
    }

    /// Every buffer that lives across the step, as (tag, bytes): what is live when a step
    /// starts.
    pub fn live_buffers(&self) -> Vec<(String, u64)> {
        let u = &self.units;
        u.full
            .iter()
            .flatten()
            .chain(u.master.iter().flatten().flatten())
            .chain(u.grads.iter().flatten())
            .chain(u.m.iter().flatten())
            .chain(u.v.iter().flatten())
            .chain(&u.buckets)
            .chain(&self.inputs)
            .chain(&self.losses)
            .chain(&self.extra)
            .map(|t| (t.tag().to_string(), t.bytes()))
            .collect()
    }

    /// The bytes this rank handed to collectives since the last call.
    pub fn take_traffic(&mut self) -> Traffic {
        self.units.comm.take_traffic()
    }
}

impl RankUnits {
    fn layers(&self) -> usize {
        self.shape.layers
    }

    /// fsdp: gather block `l`'s parameters if they are not gathered now.
    fn ensure(&mut self, be: &dyn Backend, l: usize) -> Result<()> {
        if !self.spec.strategy.shards_params() || self.gathered[l].is_some() {
            return Ok(());
        }
        let lens = self.shape.layout().lens();
        let mut unit = Vec::with_capacity(lens.len());
        for (i, &len) in lens.iter().enumerate() {
            let dt = compute_dtype(&self.shape, &self.policy, i);
            let mut full = be.alloc(dt, len, &tag(&self.shape, "comm", l, i, "gathered"))?;
            let shard = self.master[l][i]
                .as_ref()
                .expect("fsdp keeps every master shard");
            if dt == DType::F32 {
                self.comm.all_gather(be, shard, &mut full)?;
            } else {
                let mut cast = be.alloc(
                    dt,
                    shard.len(),
                    &tag(&self.shape, "comm", l, i, "cast shard"),
                )?;
                be.cast_to_bf16(shard, &mut cast)?;
                self.comm.all_gather(be, &cast, &mut full)?;
            }
            unit.push(full);
        }
        self.gathered[l] = Some(unit);
        Ok(())
    }

    fn release(&mut self, l: usize) {
        self.gathered[l] = None;
    }

    /// zero2, fsdp: block `l`'s full gradients into the rank's shards, then freed.
    fn reduce_scatter_unit(&mut self, be: &dyn Backend, l: usize) -> Result<()> {
        let unit = self.unit_grads[l]
            .take()
            .ok_or_else(|| Error::Invalid(format!("bug: layer {l} has no gradients to reduce")))?;
        for (i, full) in unit.iter().enumerate() {
            if self.micro == 0 {
                self.comm.reduce_scatter(be, full, &mut self.grads[l][i])?;
            } else {
                // Later micro-batches add to the shard: reduce into a staging shard first.
                let s = self.grads[l][i].len();
                let mut part = be.alloc(
                    DType::F32,
                    s,
                    &tag(&self.shape, "comm", l, i, "reduced shard"),
                )?;
                self.comm.reduce_scatter(be, full, &mut part)?;
                be.column_sum(&part, 1, s, &mut self.grads[l][i], true)?;
            }
        }
        Ok(())
    }

    /// ddp, zero1: every bucket whose gradients are all complete once block `l`'s backward
    /// has run, all-reduced.
    fn reduce_buckets(&mut self, be: &dyn Backend, l: usize) -> Result<()> {
        for b in 0..self.bucket_plan.len() {
            if self.reduced[b] || self.bucket_plan[b].lowest_layer < l {
                continue;
            }
            let bucket = &mut self.buckets[b];
            for &(layer, i, at) in &self.bucket_plan[b].members {
                let g = &self.grads[layer][i];
                be.copy_range(bucket, at, g, 0, g.len())?;
            }
            self.comm.all_reduce(be, bucket)?;
            for &(layer, i, at) in &self.bucket_plan[b].members {
                let g = &mut self.grads[layer][i];
                let n = g.len();
                be.copy_range(g, 0, bucket, at, n)?;
            }
            self.reduced[b] = true;
        }
        Ok(())
    }

    /// AdamW on what this rank owns, and the updated parameters back where they are
    /// replicated.
    fn optimizer(&mut self, be: &dyn Backend, h: &AdamW, step: u32) -> Result<()> {
        let strategy = self.spec.strategy;
        let (world, rank) = (self.spec.world, self.rank);
        for l in 0..self.layers() {
            for i in 0..self.specs.len() {
                let len = self.shape.layout().lens()[i];
                if strategy == Strategy::Ddp {
                    let (m, v) = (&mut self.m[l][i], &mut self.v[l][i]);
                    match self.master[l][i].as_mut() {
                        Some(master) => be.adamw(
                            h,
                            step,
                            master,
                            &self.grads[l][i],
                            m,
                            v,
                            Some(&mut self.full[l][i]),
                        )?,
                        None => {
                            be.adamw(h, step, &mut self.full[l][i], &self.grads[l][i], m, v, None)?
                        }
                    }
                    continue;
                }
                if strategy.shards_params() {
                    let master = self.master[l][i].as_mut().expect("fsdp master shard");
                    be.adamw(
                        h,
                        step,
                        master,
                        &self.grads[l][i],
                        &mut self.m[l][i],
                        &mut self.v[l][i],
                        None,
                    )?;
                    continue;
                }
                // zero1, zero2: the owned part of the gradient and of the replicated copy.
                let (at, count) = owned(len, world, rank);
                let s = shard_len(len, world);
                let staged_grad = if strategy.shards_grads() {
                    None
                } else {
                    let mut t = be.alloc(
                        DType::F32,
                        s,
                        &tag(&self.shape, "comm", l, i, "gradient shard"),
                    )?;
                    if count < s {
                        be.zero(&mut t)?;
                    }
                    be.copy_range(&mut t, 0, &self.grads[l][i], at, count)?;
                    Some(t)
                };
                let grad = staged_grad.as_ref().unwrap_or(&self.grads[l][i]);
                let (m, v) = (&mut self.m[l][i], &mut self.v[l][i]);
                match self.master[l][i].as_mut() {
                    Some(master) => {
                        let dt = compute_dtype(&self.shape, &self.policy, i);
                        let mut cast =
                            be.alloc(dt, s, &tag(&self.shape, "comm", l, i, "updated shard"))?;
                        be.adamw(h, step, master, grad, m, v, Some(&mut cast))?;
                        self.comm.all_gather(be, &cast, &mut self.full[l][i])?;
                    }
                    None => {
                        let mut own = be.alloc(
                            DType::F32,
                            s,
                            &tag(&self.shape, "comm", l, i, "updated shard"),
                        )?;
                        if count < s {
                            be.zero(&mut own)?;
                        }
                        be.copy_range(&mut own, 0, &self.full[l][i], at, count)?;
                        be.adamw(h, step, &mut own, grad, m, v, None)?;
                        self.comm.all_gather(be, &own, &mut self.full[l][i])?;
                    }
                }
            }
        }
        Ok(())
    }

    /// The full fp32 master weights of block `l` as this rank holds them (the replicated
    /// copy, or its own shard padded with NaN where other ranks own the elements), for
    /// validation.
    pub fn read_master(&self, be: &dyn Backend, l: usize, i: usize) -> Result<Vec<f32>> {
        let len = self.shape.layout().lens()[i];
        match (&self.master[l][i], self.full.get(l).map(|f| &f[i])) {
            (Some(m), _) if m.len() == len => be.read(m),
            (Some(m), _) => {
                let (at, count) = owned(len, self.spec.world, self.rank);
                let mut out = vec![f32::NAN; len];
                out[at..at + count].copy_from_slice(&be.read(m)?[..count]);
                Ok(out)
            }
            (None, Some(f)) => be.read(f),
            (None, None) => Err(Error::Invalid(format!(
                "bug: layer {l} {} has neither a master nor a compute copy",
                self.specs[i].name
            ))),
        }
    }

    /// This rank's gradient of block `l`'s parameter `i` after the step's reduction: the
    /// full gradient, or its own shard padded with NaN elsewhere.
    pub fn read_grad(&self, be: &dyn Backend, l: usize, i: usize) -> Result<Vec<f32>> {
        let len = self.shape.layout().lens()[i];
        let g = be.read(&self.grads[l][i])?;
        if g.len() == len {
            return Ok(g);
        }
        let (at, count) = owned(len, self.spec.world, self.rank);
        let mut out = vec![f32::NAN; len];
        out[at..at + count].copy_from_slice(&g[..count]);
        Ok(out)
    }

    /// The compute copy of block `l`'s parameter `i` (ddp, zero1, zero2), for the check
    /// that replicas agree.
    pub fn read_full(&self, be: &dyn Backend, l: usize, i: usize) -> Result<Option<Vec<f32>>> {
        match self.full.get(l) {
            Some(f) => Ok(Some(be.read(&f[i])?)),
            None => Ok(None),
        }
    }
}

impl Units for RankUnits {
    fn before_forward(&mut self, be: &dyn Backend, l: usize, recompute: bool) -> Result<()> {
        self.ensure(be, l)?;
        if !recompute && l + 1 < self.layers() {
            self.ensure(be, l + 1)?;
        }
        Ok(())
    }

    fn after_forward(&mut self, _be: &dyn Backend, l: usize, recompute: bool) -> Result<()> {
        if !recompute && self.spec.strategy == Strategy::Fsdp {
            self.release(l);
        }
        Ok(())
    }

    fn before_backward(&mut self, be: &dyn Backend, l: usize) -> Result<()> {
        if self.spec.strategy.shards_grads() {
            let lens = self.shape.layout().lens();
            let mut unit = Vec::with_capacity(lens.len());
            for (i, &len) in lens.iter().enumerate() {
                let mut g = be.alloc(
                    DType::F32,
                    len,
                    &tag(&self.shape, "grads", l, i, "unsharded"),
                )?;
                be.zero(&mut g)?;
                unit.push(g);
            }
            self.unit_grads[l] = Some(unit);
        }
        self.ensure(be, l)?;
        if l > 0 {
            self.ensure(be, l - 1)?;
        }
        Ok(())
    }

    fn after_backward(&mut self, be: &dyn Backend, l: usize, last: bool) -> Result<()> {
        if self.spec.strategy.shards_grads() {
            self.reduce_scatter_unit(be, l)?;
        } else if last {
            self.reduce_buckets(be, l)?;
        }
        if self.spec.strategy.shards_params() {
            self.release(l);
        }
        Ok(())
    }

    fn unit(&mut self, l: usize) -> Result<(LayerView<'_>, &mut [Tensor])> {
        let grads: &mut [Tensor] = match self.unit_grads[l].as_mut() {
            Some(g) => g,
            None => &mut self.grads[l],
        };
        let base: &[Tensor] = match (&self.gathered[l], self.full.get(l)) {
            (Some(g), _) => g,
            (None, Some(f)) => f,
            (None, None) => {
                return Err(Error::Invalid(format!(
                    "bug: layer {l}'s parameters are not gathered"
                )))
            }
        };
        Ok((
            LayerView {
                base,
                bf16: None,
                specs: &self.specs,
            },
            grads,
        ))
    }
}

/// The states of a whole world, one rank each, and the backends of ranks 1 and up (rank
/// 0's is the caller's, handed to every call).
pub struct World {
    pub peers: Vec<Arc<dyn Backend>>,
    pub ranks: Vec<RankState>,
}

impl World {
    /// Every rank's state: rank 0 on `be`, the others on backends from [`Backend::peer`],
    /// talking through [`comm_group`].
    pub fn new(
        be: &dyn Backend,
        shape: ModelShape,
        policy: Policy,
        spec: ShardSpec,
        init: &InitialValues,
    ) -> Result<World> {
        spec.check(&shape)?;
        let peers = (1..spec.world)
            .map(|r| be.peer(r))
            .collect::<Result<Vec<_>>>()?;
        let backends = with_peers(be, &peers);
        let comms = comm_group(&backends)?;
        let ranks = run_ranks(&backends, comms, |be, comm| {
            RankState::new(be, shape, policy, spec, comm, init)
        })?;
        Ok(World { peers, ranks })
    }

    /// Every rank's backend, rank 0's being `be`.
    pub fn backends<'a>(&'a self, be: &'a dyn Backend) -> Vec<&'a dyn Backend> {
        with_peers(be, &self.peers)
    }

    /// `f` on every rank at once, each on its own thread.
    pub fn each(
        &mut self,
        be: &dyn Backend,
        f: impl Fn(&dyn Backend, &mut RankState) -> Result<()> + Sync,
    ) -> Result<()> {
        let backends = with_peers(be, &self.peers);
        each_rank(&backends, &mut self.ranks, f)
    }

    /// One optimizer step on every rank at once.
    pub fn step(&mut self, be: &dyn Backend) -> Result<()> {
        self.each(be, |be, st| st.step(be))
    }

    /// Every rank's traffic since the last call (rank order).
    pub fn take_traffic(&mut self) -> Vec<Traffic> {
        self.ranks.iter_mut().map(|r| r.take_traffic()).collect()
    }
}

/// Every rank's backend: `be` for rank 0, then the peers'.
pub fn with_peers<'a>(be: &'a dyn Backend, peers: &'a [Arc<dyn Backend>]) -> Vec<&'a dyn Backend> {
    std::iter::once(be)
        .chain(peers.iter().map(|p| p.as_ref()))
        .collect()
}

/// Runs `f` for every rank on a thread of its own, handing each its communicator; the
/// first error (by rank) is returned.
pub fn run_ranks<T: Send>(
    backends: &[&dyn Backend],
    comms: Vec<Box<dyn Comm>>,
    f: impl Fn(&dyn Backend, Box<dyn Comm>) -> Result<T> + Sync,
) -> Result<Vec<T>> {
    if comms.len() != backends.len() {
        return Err(Error::Invalid(format!(
            "{} communicators for {} ranks",
            comms.len(),
            backends.len()
        )));
    }
    first_error(on_threads(backends.iter().copied().zip(comms), &f))
}

/// Runs `f` on every rank's state on a thread of its own; a rank that fails abandons its
/// communicator so that no other waits for it; the first error (by rank) is returned, an
/// out-of-memory error before the errors it caused on other ranks.
pub fn each_rank(
    backends: &[&dyn Backend],
    ranks: &mut [RankState],
    f: impl Fn(&dyn Backend, &mut RankState) -> Result<()> + Sync,
) -> Result<()> {
    on_every_rank(backends, ranks, f, |st, why| st.units.comm.abandon(why))
}

/// [`each_rank`] for any per-rank state: `abandon` tells the rank's communicator that the
/// rank failed.
pub fn on_every_rank<S: Send>(
    backends: &[&dyn Backend],
    states: &mut [S],
    f: impl Fn(&dyn Backend, &mut S) -> Result<()> + Sync,
    abandon: impl Fn(&mut S, &str) + Sync,
) -> Result<()> {
    if states.len() != backends.len() {
        return Err(Error::Invalid(format!(
            "{} rank states for {} backends",
            states.len(),
            backends.len()
        )));
    }
    if states.len() == 1 {
        return f(backends[0], &mut states[0]);
    }
    let run = |be: &dyn Backend, st: &mut S| {
        let r = f(be, st);
        if let Err(e) = &r {
            abandon(st, &e.to_string());
        }
        r
    };
    first_error(on_threads(
        backends.iter().copied().zip(states.iter_mut()),
        &run,
    ))
    .map(|_| ())
}

/// `f` on each (backend, item) on a thread of its own; the results in rank order.
fn on_threads<'a, I: Send, T: Send>(
    items: impl Iterator<Item = (&'a dyn Backend, I)>,
    f: &(impl Fn(&dyn Backend, I) -> Result<T> + Sync),
) -> Vec<Result<T>> {
    std::thread::scope(|scope| {
        let handles: Vec<_> = items
            .map(|(be, item)| scope.spawn(move || f(be, item)))
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(Error::Invalid("a rank's thread panicked".into())))
            })
            .collect()
    })
}

/// Every rank's result, or the first error: an out-of-memory error before any other (the
/// others are what it caused on the ranks waiting for it).
fn first_error<T>(results: Vec<Result<T>>) -> Result<Vec<T>> {
    let mut out = Vec::with_capacity(results.len());
    let mut first = None;
    for r in results {
        match r {
            Ok(t) => out.push(t),
            Err(e @ Error::OutOfMemory(_)) => return Err(e),
            Err(e) => {
                first.get_or_insert(e);
            }
        }
    }
    first.map_or(Ok(out), Err)
}
