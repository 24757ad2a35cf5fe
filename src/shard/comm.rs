//! Collectives between the ranks of a sharded training step: the [`Comm`] interface the
//! schedules call, an in-process implementation for simulated ranks (the CPU and dry
//! backends), and a solo one that stands for one rank of a world too large to simulate.
//!
//! Every collective works on whole tensors with shards of [`shard_len`] elements: rank r owns
//! elements `[r·s, min((r+1)·s, len))` of a full tensor of `len` elements, its shard tensor
//! holding `s = ⌈len / world⌉` elements, zero-padded past `len` on the last ranks (PyTorch's
//! FSDP pads its flat parameters the same way). Each rank counts the bytes it moves.

use std::sync::{Arc, Condvar, Mutex};

use serde::{Deserialize, Serialize};

use crate::backend::{Backend, BackendKind, Tensor};
use crate::error::{Error, Result};

/// Elements of each rank's shard of a tensor of `len` elements over `world` ranks.
pub fn shard_len(len: usize, world: usize) -> usize {
    len.div_ceil(world.max(1))
}

/// The elements of the full tensor that rank `rank` owns: `(offset, count)`; `count` is
/// less than the shard length on the last ranks where `len` does not divide, possibly 0.
pub fn owned(len: usize, world: usize, rank: usize) -> (usize, usize) {
    let s = shard_len(len, world);
    let start = (rank * s).min(len);
    (start, (len - start).min(s))
}

/// Payload bytes one rank hands to each kind of collective in one step: the size of the
/// full tensor of an all-reduce, the full (input) tensor of a reduce-scatter, the full
/// (output) tensor of an all-gather, as nccl-tests counts `size`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Traffic {
    pub all_reduce: u64,
    pub reduce_scatter: u64,
    pub all_gather: u64,
    /// Collective calls of any kind.
    pub calls: u64,
}

impl Traffic {
    pub fn add(&mut self, other: &Traffic) {
        self.all_reduce += other.all_reduce;
        self.reduce_scatter += other.reduce_scatter;
        self.all_gather += other.all_gather;
        self.calls += other.calls;
    }

    /// Seconds the collectives take over `world` ranks at bus bandwidth `bus_bytes_per_s`,
    /// with the ring formulas nccl-tests' busBW is defined by: all-reduce moves
    /// 2(N−1)/N of its size, reduce-scatter and all-gather (N−1)/N. Latency is not modeled.
    pub fn modeled_seconds(&self, world: usize, bus_bytes_per_s: f64) -> f64 {
        let n = world as f64;
        if world <= 1 || bus_bytes_per_s <= 0.0 {
            return 0.0;
        }
        let f = (n - 1.0) / n;
        (2.0 * f * self.all_reduce as f64
            + f * self.reduce_scatter as f64
            + f * self.all_gather as f64)
            / bus_bytes_per_s
    }
}

/// One rank's handle on its group. Every rank of the group calls the same collectives in
/// the same order (each call blocks until all ranks have made it, as NCCL's do).
pub trait Comm: Send {
    fn rank(&self) -> usize;
    fn world(&self) -> usize;
    /// What carries the collectives ("in-process", "nccl 2.21.5", ...).
    fn name(&self) -> String;
    /// `t` = the sum of every rank's `t` (f32), added in rank order.
    fn all_reduce(&mut self, be: &dyn Backend, t: &mut Tensor) -> Result<()>;
    /// `shard` (⌈len/N⌉ elements) = the sum over ranks of this rank's owned part of `full`
    /// (f32), zero past `len`.
    fn reduce_scatter(&mut self, be: &dyn Backend, full: &Tensor, shard: &mut Tensor)
        -> Result<()>;
    /// `full[owned(r)]` = rank r's `shard[..count]`, for every r.
    fn all_gather(&mut self, be: &dyn Backend, shard: &Tensor, full: &mut Tensor) -> Result<()>;
    /// The bytes this rank has handed to collectives since the last [`Comm::take_traffic`].
    fn take_traffic(&mut self) -> Traffic;
    /// Device memory the communication library took for itself when the group was made
    /// (NCCL's own buffers), where it could be measured.
    fn device_buffers(&self) -> Option<u64> {
        None
    }
    /// This rank stops early (it failed): the others must not wait for it at their next
    /// collective.
    fn abandon(&mut self, why: &str);
}

/// Checks a shard/full pair and returns the owned `(offset, count)` of `rank`.
pub fn check_pair(
    what: &str,
    full: &Tensor,
    shard: &Tensor,
    world: usize,
    rank: usize,
) -> Result<(usize, usize)> {
    if shard.len() != shard_len(full.len(), world) || shard.dtype() != full.dtype() {
        return Err(Error::Invalid(format!(
            "{what}: {} ({} {} elements) is not a shard of {} ({} {} elements) over {world} ranks",
            shard.tag(),
            shard.len(),
            shard.dtype().name(),
            full.tag(),
            full.len(),
            full.dtype().name()
        )));
    }
    Ok(owned(full.len(), world, rank))
}

/// The ranks of one process, each driven by its own thread, exchanging host copies of
/// their tensors through shared slots. Sums are f32 in rank order, so the result is the
/// same bits on every rank and in every run. On the dry backend nothing is exchanged (there
/// are no values), but every rank still meets the others at each collective.
pub struct InProcess {
    rank: usize,
    shared: Arc<Shared>,
    traffic: Traffic,
}

struct Shared {
    world: usize,
    gate: Mutex<Gate>,
    turn: Condvar,
    slots: Mutex<Vec<Vec<f32>>>,
}

/// A barrier that a failing rank can break: the others then return an error instead of
/// waiting forever for it.
#[derive(Default)]
struct Gate {
    arrived: usize,
    generation: u64,
    failed: Option<String>,
}

impl Shared {
    fn wait(&self) -> Result<()> {
        let broken = |why: &String| Error::Invalid(format!("a collective was abandoned: {why}"));
        let mut g = self.gate.lock().expect("comm state");
        if let Some(why) = &g.failed {
            return Err(broken(why));
        }
        g.arrived += 1;
        if g.arrived == self.world {
            g.arrived = 0;
            g.generation += 1;
            self.turn.notify_all();
            return Ok(());
        }
        let generation = g.generation;
        while g.generation == generation && g.failed.is_none() {
            g = self.turn.wait(g).expect("comm state");
        }
        match (&g.failed, g.generation == generation) {
            (Some(why), true) => Err(broken(why)),
            _ => Ok(()),
        }
    }
}

impl InProcess {
    /// The handles of a group of `world` ranks, rank order.
    pub fn group(world: usize) -> Result<Vec<InProcess>> {
        if world == 0 {
            return Err(Error::Invalid(
                "a world of 0 ranks has no one to train".into(),
            ));
        }
        let shared = Arc::new(Shared {
            world,
            gate: Mutex::new(Gate::default()),
            turn: Condvar::new(),
            slots: Mutex::new(vec![Vec::new(); world]),
        });
        Ok((0..world)
            .map(|rank| InProcess {
                rank,
                shared: shared.clone(),
                traffic: Traffic::default(),
            })
            .collect())
    }

    /// Deposit `mine`, wait for every rank, run `f` on every rank's deposit, wait again so
    /// that no slot is overwritten while another rank still reads it.
    fn exchange<T>(&self, mine: Vec<f32>, f: impl FnOnce(&[Vec<f32>]) -> T) -> Result<T> {
        self.shared.slots.lock().expect("comm state")[self.rank] = mine;
        self.shared.wait()?;
        let out = {
            let slots = self.shared.slots.lock().expect("comm state");
            f(&slots)
        };
        self.shared.wait()?;
        Ok(out)
    }
}

impl Comm for InProcess {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world(&self) -> usize {
        self.shared.world
    }
    fn name(&self) -> String {
        "in-process".into()
    }

    fn all_reduce(&mut self, be: &dyn Backend, t: &mut Tensor) -> Result<()> {
        self.traffic.all_reduce += t.bytes();
        self.traffic.calls += 1;
        let dry = be.kind() == BackendKind::Dry;
        let mine = if dry { Vec::new() } else { be.read(t)? };
        let sum = self.exchange(mine, |slots| {
            let mut acc = slots[0].clone();
            for s in &slots[1..] {
                for (a, b) in acc.iter_mut().zip(s) {
                    *a += *b;
                }
            }
            acc
        })?;
        if !dry {
            be.write(t, &sum)?;
        }
        Ok(())
    }

    fn reduce_scatter(
        &mut self,
        be: &dyn Backend,
        full: &Tensor,
        shard: &mut Tensor,
    ) -> Result<()> {
        let (world, rank) = (self.world(), self.rank);
        let (start, count) = check_pair("reduce-scatter", full, shard, world, rank)?;
        self.traffic.reduce_scatter += full.bytes();
        self.traffic.calls += 1;
        let dry = be.kind() == BackendKind::Dry;
        let mine = if dry { Vec::new() } else { be.read(full)? };
        let s = shard.len();
        let sum = self.exchange(mine, |slots| {
            let mut acc = vec![0f32; s];
            if !dry {
                acc[..count].copy_from_slice(&slots[0][start..start + count]);
                for other in &slots[1..] {
                    for (a, b) in acc[..count].iter_mut().zip(&other[start..start + count]) {
                        *a += *b;
                    }
                }
            }
            acc
        })?;
        if !dry {
            be.write(shard, &sum)?;
        }
        Ok(())
    }

    fn all_gather(&mut self, be: &dyn Backend, shard: &Tensor, full: &mut Tensor) -> Result<()> {
        let world = self.world();
        check_pair("all-gather", full, shard, world, self.rank)?;
        self.traffic.all_gather += full.bytes();
        self.traffic.calls += 1;
        let dry = be.kind() == BackendKind::Dry;
        let mine = if dry { Vec::new() } else { be.read(shard)? };
        let len = full.len();
        let gathered = self.exchange(mine, |slots| {
            let mut out = Vec::with_capacity(if dry { 0 } else { len });
            if !dry {
                for (r, s) in slots.iter().enumerate() {
                    let (_, count) = owned(len, world, r);
                    out.extend_from_slice(&s[..count]);
                }
            }
            out
        })?;
        if !dry {
            be.write(full, &gathered)?;
        }
        Ok(())
    }

    fn take_traffic(&mut self) -> Traffic {
        std::mem::take(&mut self.traffic)
    }

    fn abandon(&mut self, why: &str) {
        let mut g = self.shared.gate.lock().expect("comm state");
        g.failed
            .get_or_insert_with(|| format!("rank {} failed: {why}", self.rank));
        self.shared.turn.notify_all();
    }
}

/// One rank of a world of `world` ranks, the others absent: every collective checks its
/// shapes and counts its bytes but moves nothing. With the dry backend it gives one rank's
/// exact memory at any world size (every rank runs the same schedule on buffers of the same
/// sizes); its values mean nothing.
pub struct Solo {
    pub rank: usize,
    pub world: usize,
    traffic: Traffic,
}

impl Solo {
    pub fn new(rank: usize, world: usize) -> Result<Solo> {
        if world == 0 || rank >= world {
            return Err(Error::Invalid(format!(
                "rank {rank} of a world of {world} ranks does not exist"
            )));
        }
        Ok(Solo {
            rank,
            world,
            traffic: Traffic::default(),
        })
    }
}

impl Comm for Solo {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world(&self) -> usize {
        self.world
    }
    fn name(&self) -> String {
        "solo (no other rank present)".into()
    }
    fn all_reduce(&mut self, _be: &dyn Backend, t: &mut Tensor) -> Result<()> {
        self.traffic.all_reduce += t.bytes();
        self.traffic.calls += 1;
        Ok(())
    }
    fn reduce_scatter(
        &mut self,
        _be: &dyn Backend,
        full: &Tensor,
        shard: &mut Tensor,
    ) -> Result<()> {
        check_pair("reduce-scatter", full, shard, self.world, self.rank)?;
        self.traffic.reduce_scatter += full.bytes();
        self.traffic.calls += 1;
        Ok(())
    }
    fn all_gather(&mut self, _be: &dyn Backend, shard: &Tensor, full: &mut Tensor) -> Result<()> {
        check_pair("all-gather", full, shard, self.world, self.rank)?;
        self.traffic.all_gather += full.bytes();
        self.traffic.calls += 1;
        Ok(())
    }
    fn take_traffic(&mut self) -> Traffic {
        std::mem::take(&mut self.traffic)
    }
    fn abandon(&mut self, _why: &str) {}
}
