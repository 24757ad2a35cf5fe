//! Data-parallel training across ranks, as the frameworks shard it: DDP (a full replica per
//! rank, gradients all-reduced in buckets), ZeRO stages 1 and 2 (optimizer state, then
//! gradients, sharded) and FSDP / ZeRO-3 (parameters sharded too, gathered per block).
//!
//! - [`comm`]: the collectives, in-process for simulated ranks and solo for one rank of a
//!   large world (NCCL on GPUs lives beside them);
//! - [`step`]: one rank's training state and step under a strategy;
//! - [`memory`]: the per-rank analytic model of that step, to the byte.
//!
//! Every rank runs the same schedule on its own backend (its own tracked allocator), so each
//! rank's peak is measured, not inferred.

use serde::{Deserialize, Serialize};

use crate::backend::{Backend, BackendKind};
use crate::error::{Error, Result};
use crate::model::ModelShape;

pub mod comm;
pub mod memory;
pub mod step;

pub use comm::{owned, shard_len, Comm, InProcess, Solo, Traffic};

/// PyTorch DDP's default `bucket_cap_mb` (25 MiB) and its first bucket (1 MiB).
pub const DEFAULT_BUCKET_BYTES: u64 = 25 << 20;
pub const FIRST_BUCKET_BYTES: u64 = 1 << 20;

/// How the training state is spread over the ranks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Strategy {
    /// Every rank holds everything; gradients are all-reduced in buckets during backward.
    Ddp,
    /// Optimizer state (fp32 master weights where they are a separate copy, AdamW's
    /// moments) sharded; gradients all-reduced as DDP does; updated parameters all-gathered.
    Zero1,
    /// Gradients sharded too: each block's gradients are reduce-scattered as its backward
    /// ends, and only the rank's shard is kept.
    Zero2,
    /// Parameters sharded too (ZeRO-3, FSDP with `reshard_after_forward=True`): each block is
    /// all-gathered before its forward and again before its backward, the next one
    /// prefetched, and freed after use.
    Fsdp,
    /// FSDP with `reshard_after_forward=False`: a block gathered for its forward stays
    /// gathered until its backward has run.
    FsdpNoReshard,
}

impl Strategy {
    pub const ALL: [Strategy; 5] = [
        Strategy::Ddp,
        Strategy::Zero1,
        Strategy::Zero2,
        Strategy::Fsdp,
        Strategy::FsdpNoReshard,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Strategy::Ddp => "ddp",
            Strategy::Zero1 => "zero1",
            Strategy::Zero2 => "zero2",
            Strategy::Fsdp => "fsdp",
            Strategy::FsdpNoReshard => "fsdp-noreshard",
        }
    }

    /// A strategy by name (`zero3` is `fsdp`), or a sentence listing the names.
    pub fn parse(text: &str) -> Result<Strategy> {
        let t = text.trim().to_ascii_lowercase();
        if t == "zero3" {
            return Ok(Strategy::Fsdp);
        }
        Strategy::ALL
            .into_iter()
            .find(|s| s.name() == t)
            .ok_or_else(|| {
                Error::Invalid(format!(
                    "'{text}' is not a sharding strategy; use ddp, zero1, zero2, fsdp (or zero3) or fsdp-noreshard"
                ))
            })
    }

    /// Whether optimizer state is sharded.
    pub fn shards_optimizer(self) -> bool {
        self != Strategy::Ddp
    }
    /// Whether gradients are kept only as shards.
    pub fn shards_grads(self) -> bool {
        matches!(
            self,
            Strategy::Zero2 | Strategy::Fsdp | Strategy::FsdpNoReshard
        )
    }
    /// Whether parameters are kept only as shards between uses.
    pub fn shards_params(self) -> bool {
        matches!(self, Strategy::Fsdp | Strategy::FsdpNoReshard)
    }
    /// Whether gradients are all-reduced in DDP's buckets.
    pub fn uses_buckets(self) -> bool {
        matches!(self, Strategy::Ddp | Strategy::Zero1)
    }
}

/// A sharded step's configuration besides the model and the policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ShardSpec {
    pub strategy: Strategy,
    pub world: usize,
    /// DDP's bucket cap (the first bucket's is [`FIRST_BUCKET_BYTES`] or this, the smaller).
    pub bucket_bytes: u64,
    /// Bytes rank 0 keeps besides the step (metrics, logging tensors), allocated before the
    /// step and alive through it.
    pub rank0_extra: u64,
}

impl ShardSpec {
    pub fn new(strategy: Strategy, world: usize) -> ShardSpec {
        ShardSpec {
            strategy,
            world,
            bucket_bytes: DEFAULT_BUCKET_BYTES,
            rank0_extra: 0,
        }
    }

    /// The most ranks one schedule can be simulated or modeled for.
    pub const MAX_WORLD: usize = 1 << 20;

    pub fn check(&self, shape: &ModelShape) -> Result<()> {
        if self.world == 0 {
            return Err(Error::Invalid(
                "a world size of 0 has no rank to train on; use 1 or more GPUs".into(),
            ));
        }
        if self.world > Self::MAX_WORLD {
            return Err(Error::Invalid(format!(
                "a world of {} ranks is beyond the {} this model handles",
                self.world,
                Self::MAX_WORLD
            )));
        }
        if self.bucket_bytes == 0 {
            return Err(Error::Invalid(
                "a bucket size of 0 bytes holds no gradient; use at least 1 byte (PyTorch's default is 25MiB)".into(),
            ));
        }
        if shape.batch % self.world != 0 {
            return Err(Error::Invalid(format!(
                "a global batch of {} sequences cannot be split evenly over {} ranks",
                shape.batch, self.world
            )));
        }
        if shape.vocab() > 0 {
            return Err(Error::Invalid(format!(
                "model {}: sharding a model with a vocabulary (its embedding, final norm and head as a unit of their own) is not modeled yet; plan or run the block stack without -v, or on one GPU",
                shape.name()
            )));
        }
        Ok(())
    }

    /// The case-id part: `-w4`, with `-x<bytes>` when rank 0 keeps extra bytes and
    /// `-bk<bytes>` when the bucket cap is not PyTorch's default.
    pub fn suffix(&self) -> String {
        let mut s = format!("-w{}", self.world);
        if self.bucket_bytes != DEFAULT_BUCKET_BYTES {
            s.push_str(&format!("-bk{}", self.bucket_bytes));
        }
        if self.rank0_extra > 0 {
            s.push_str(&format!("-x{}", self.rank0_extra));
        }
        s
    }
}

/// One bucket of DDP's gradient all-reduce: its parameters as (layer, param index), in the
/// order they are laid out in the bucket, with their element offsets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bucket {
    pub members: Vec<(usize, usize, usize)>,
    /// Elements (f32).
    pub len: usize,
    /// The lowest layer among the members: the bucket is ready once that layer's backward
    /// has run.
    pub lowest_layer: usize,
}

/// DDP's bucket assignment (`_compute_bucket_assignment_by_size`): parameters in reverse
/// order of registration (the order backward produces their gradients), added to the open
/// bucket until it holds at least its cap; the first bucket's cap is
/// min(1 MiB, `cap`), every other one's `cap`.
pub fn buckets(shape: &ModelShape, cap: u64) -> Vec<Bucket> {
    let lens = shape.layout().lens();
    let mut out = Vec::new();
    let mut open = Bucket {
        members: Vec::new(),
        len: 0,
        lowest_layer: usize::MAX,
    };
    let limit = |n: usize| {
        if n == 0 {
            FIRST_BUCKET_BYTES.min(cap)
        } else {
            cap
        }
    };
    for l in (0..shape.layers).rev() {
        for i in (0..lens.len()).rev() {
            open.members.push((l, i, open.len));
            open.len += lens[i];
            open.lowest_layer = open.lowest_layer.min(l);
            if (open.len as u64) * 4 >= limit(out.len()) {
                out.push(std::mem::replace(
                    &mut open,
                    Bucket {
                        members: Vec::new(),
                        len: 0,
                        lowest_layer: usize::MAX,
                    },
                ));
            }
        }
    }
    if !open.members.is_empty() {
        out.push(open);
    }
    out
}

/// A communicator per rank for these backends: NCCL on GPUs, in-process otherwise.
pub fn comm_group(backends: &[&dyn Backend]) -> Result<Vec<Box<dyn Comm>>> {
    match backends.first().map(|b| b.kind()) {
        None => Err(Error::Invalid(
            "a world of 0 ranks has no one to train".into(),
        )),
        #[cfg(headroom_cuda)]
        Some(BackendKind::Cuda) => nccl::group(backends),
        #[cfg(not(headroom_cuda))]
        Some(BackendKind::Cuda) => Err(Error::Unsupported(
            "this build has no CUDA kernels, so no NCCL".into(),
        )),
        Some(_) => Ok(InProcess::group(backends.len())?
            .into_iter()
            .map(|c| Box::new(c) as Box<dyn Comm>)
            .collect()),
    }
}

#[cfg(headroom_cuda)]
pub mod nccl;

/// A sharded case's per-rank figures in the report.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ShardRecord {
    pub strategy: String,
    pub world: usize,
    #[serde(default)]
    pub bucket_bytes: u64,
    #[serde(default)]
    pub rank0_extra: u64,
    /// What carried the collectives (`in-process`, `nccl 2.21.5`, `torch.distributed/nccl`).
    #[serde(default)]
    pub comm: String,
    pub ranks: Vec<RankRecord>,
    /// Bytes one rank handed to collectives in one step (the same on every rank).
    #[serde(default)]
    pub traffic: Traffic,
    /// Memory NCCL itself took on the device when its communicator was made (free memory
    /// before minus after; device-wide, so a cross-check), where it was measured.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nccl_buffers: Option<u64>,
}

/// One rank's peak, measured and modeled.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RankRecord {
    pub rank: usize,
    pub peak_allocated: u64,
    /// The analytic model's peak for this rank, with its categories at the peak.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<memory::RankBreakdown>,
}
