//! The collectives on their own: an all-reduce of one fp32 buffer per rank over a world of
//! ranks, timed, for the bus bandwidth that models a sharded step's communication where the
//! box has the GPUs to measure it.
//!
//! Bytes moved are nccl-tests' bus bytes, 2(N−1)/N · size for an all-reduce, so the case's
//! achieved bytes per second is its bus bandwidth (busBW), which is independent of N for a
//! ring and comparable with nccl-tests' figures. Memory model: one buffer per rank.
//! Validation: every rank's result against the f64 sum of every rank's input.

use crate::backend::{Backend, BackendKind, Tensor};
use crate::dtype::DType;
use crate::error::Result;
use crate::rng::Rng;
use crate::shard::comm_group;
use crate::shard::step::{on_every_rank, with_peers};
use crate::shard::Comm;
use crate::techniques::{
    tensor_check, Case, CaseInfo, Instance, Profile, Readback, Tamper, Validation,
};
use std::sync::Arc;

pub struct AllReduceCase {
    info: CaseInfo,
    len: usize,
    world: usize,
}

impl AllReduceCase {
    pub fn new(len: usize, world: usize) -> Self {
        let mut info = CaseInfo::new(
            "collective",
            "all-reduce",
            DType::F32,
            format!("n{len}-w{world}"),
        );
        let size = (len * 4) as f64;
        info.bytes_moved = 2.0 * (world as f64 - 1.0) / world as f64 * size;
        info.predicted_peak_bytes = (len * 4) as u64;
        // N terms added in fp32: at most (N−1)·2⁻²⁴ of the largest partial sum.
        info.tolerance = 1e-6 * world as f64;
        AllReduceCase { info, len, world }
    }
}

struct Rank {
    buffer: Tensor,
    input: Vec<f32>,
    comm: Box<dyn Comm>,
}

struct AllReduceInstance {
    peers: Vec<Arc<dyn Backend>>,
    ranks: Vec<Rank>,
    tolerance: f64,
}

impl Case for AllReduceCase {
    fn info(&self) -> &CaseInfo {
        &self.info
    }

    fn skip_reason(&self, _be: &dyn Backend) -> Option<String> {
        (self.world < 2).then(|| "an all-reduce over one rank moves nothing".into())
    }

    fn setup(&self, be: &dyn Backend, rng: &mut Rng) -> Result<Box<dyn Instance>> {
        let peers = (1..self.world)
            .map(|r| be.peer(r))
            .collect::<Result<Vec<_>>>()?;
        let backends = with_peers(be, &peers);
        let comms = comm_group(&backends)?;
        let mut ranks = Vec::with_capacity(self.world);
        for (r, (b, comm)) in backends.iter().zip(comms).enumerate() {
            let input = rng.fill(self.len, 1.0);
            let mut buffer = b.alloc(DType::F32, self.len, &format!("comm: rank {r} buffer"))?;
            b.write(&mut buffer, &input)?;
            ranks.push(Rank {
                buffer,
                input,
                comm,
            });
        }
        drop(backends);
        Ok(Box::new(AllReduceInstance {
            peers,
            ranks,
            tolerance: self.info.tolerance,
        }))
    }
}

impl AllReduceInstance {
    fn all_reduce(&mut self, be: &dyn Backend) -> Result<()> {
        let backends = with_peers(be, &self.peers);
        on_every_rank(
            &backends,
            &mut self.ranks,
            |be, r| r.comm.all_reduce(be, &mut r.buffer),
            |r, why| r.comm.abandon(why),
        )
    }
}

impl Instance for AllReduceInstance {
    /// One all-reduce of every rank's buffer in place (the sums grow run by run; the
    /// values do not matter to the time).
    fn run(&mut self, be: &dyn Backend) -> Result<()> {
        self.all_reduce(be)
    }

    fn validate(
        &mut self,
        be: &dyn Backend,
        _rng: &mut Rng,
        tamper: &mut Tamper<'_>,
    ) -> Result<Validation> {
        let backends = with_peers(be, &self.peers);
        for (b, r) in backends.iter().zip(self.ranks.iter_mut()) {
            b.write(&mut r.buffer, &r.input)?;
        }
        drop(backends);
        self.all_reduce(be)?;
        let want: Vec<f64> = (0..self.ranks[0].input.len())
            .map(|i| self.ranks.iter().map(|r| r.input[i] as f64).sum())
            .collect();
        let backends = with_peers(be, &self.peers);
        let mut checks = Vec::new();
        for (r, (b, rank)) in backends.iter().zip(&self.ranks).enumerate() {
            let mut got = b.read(&rank.buffer)?;
            let name = format!("rank {r} sum");
            tamper(Readback {
                name: &name,
                values: &mut got,
                row: 1,
            });
            checks.push(tensor_check(name, &got, &want, false, self.tolerance, 0.0));
        }
        Ok(Validation::from_checks(checks))
    }
}

/// 256 MiB per rank on GPUs (nccl-tests' bandwidth plateau) over 2, 4 and 8 GPUs (a case
/// needing more GPUs than the box has is skipped); 1 MiB over 2 and 4 simulated ranks on the
/// CPU, where it times the in-process exchange.
pub fn cases(_profile: Profile, kind: BackendKind) -> Vec<Box<dyn Case>> {
    let (len, worlds): (usize, &[usize]) = match kind {
        BackendKind::Cpu => (1 << 18, &[2, 4]),
        BackendKind::Cuda | BackendKind::Dry => (1 << 26, &[2, 4, 8]),
    };
    worlds
        .iter()
        .map(|&w| Box::new(AllReduceCase::new(len, w)) as Box<dyn Case>)
        .collect()
}

/// Odd lengths (not a multiple of any vector width) over 2 and 3 ranks.
pub fn check_cases() -> Vec<Box<dyn Case>> {
    [(1001, 2), (4097, 3)]
        .into_iter()
        .map(|(n, w)| Box::new(AllReduceCase::new(n, w)) as Box<dyn Case>)
        .collect()
}
