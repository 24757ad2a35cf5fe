//! The allocator shootout's cases: each allocator replays each trace on a simulated device,
//! the same on the CPU and the GPU backends. Ids: `alloc/<allocator>/sim/<trace>`, e.g.
//! `alloc/caching-max-split-128MiB/sim/varying-shapes`.
//!
//! A case allocates nothing through the backend's tracked allocator (its predicted and
//! measured peaks are 0): what it measures is the allocator's own [`AllocatorMetrics`], which
//! [`metrics`] returns for the report. Validation is the allocator's invariants after the
//! replay (no overlapping live blocks, allocated == the live requests, reserved >= allocated,
//! nothing held after everything is freed and the cache emptied): error 0 when they hold,
//! infinite when one breaks. Running out of memory is an outcome the metrics record, not a
//! failure of the case.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use crate::alloc::trace::{fragmenting_trace, replay_simulated, steady_trace};
use crate::alloc::{AllocatorMetrics, AllocatorSpec, Trace};
use crate::backend::dry::DryBackend;
use crate::backend::{Backend, BackendKind};
use crate::dtype::DType;
use crate::error::Result;
use crate::model::{Checkpoint, InitialValues, ModelShape, Policy, TrainState};
use crate::rng::Rng;
use crate::techniques::attention::Variant;
use crate::techniques::{Case, CaseInfo, Instance, Profile, Validation};

/// The metrics of the latest validation of each allocator case, by case id.
static METRICS: Mutex<BTreeMap<String, AllocatorMetrics>> = Mutex::new(BTreeMap::new());

pub struct AllocCase {
    info: CaseInfo,
    spec: AllocatorSpec,
    trace: Arc<Trace>,
    capacity: u64,
}

impl AllocCase {
    pub fn new(spec: AllocatorSpec, trace: Arc<Trace>, capacity: u64) -> Self {
        let mut info = CaseInfo::new(
            "alloc",
            &spec.id(),
            DType::F32,
            format!("sim/{}", trace.name),
        );
        // The dtype is a placeholder: the id has the simulated space in its place.
        info.id = format!("alloc/{}/sim/{}", spec.id(), trace.name);
        info.tolerance = 0.0;
        AllocCase {
            info,
            spec,
            trace,
            capacity,
        }
    }

    pub fn spec(&self) -> AllocatorSpec {
        self.spec
    }

    /// Replays the trace on a fresh simulated device (invariants checked about 256 times).
    pub fn replay(&self, check: bool) -> Result<AllocatorMetrics> {
        let every = check.then(|| (self.trace.events.len() / 256).max(1));
        replay_simulated(&self.trace, self.spec, self.capacity, every)
    }
}

struct AllocInstance {
    id: String,
    case: AllocCase,
}

impl Case for AllocCase {
    fn info(&self) -> &CaseInfo {
        &self.info
    }
    fn setup(&self, _be: &dyn Backend, _rng: &mut Rng) -> Result<Box<dyn Instance>> {
        Ok(Box::new(AllocInstance {
            id: self.info.id.clone(),
            case: AllocCase::new(self.spec, self.trace.clone(), self.capacity),
        }))
    }
}

impl Instance for AllocInstance {
    /// One replay of the whole trace: what is timed.
    fn run(&mut self, _be: &dyn Backend) -> Result<()> {
        self.case.replay(false).map(|_| ())
    }

    fn validate(&mut self, _be: &dyn Backend, _rng: &mut Rng) -> Result<Validation> {
        let m = self.case.replay(true)?;
        let v = Validation {
            error: if m.invariant_violation.is_some() {
                f64::INFINITY
            } else {
                0.0
            },
            tolerance: 0.0,
            compared: m.events_replayed,
            detail: match &m.invariant_violation {
                Some(v) => format!("invariant broken: {v}"),
                None => summary(&m),
            },
        };
        METRICS
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(self.id.clone(), m);
        Ok(v)
    }
}

/// One line: reserved vs allocated, driver calls, latency, and the out-of-memory if any.
pub fn summary(m: &AllocatorMetrics) -> String {
    use crate::memory::format_bytes;
    let mut s = format!(
        "peak reserved {} / allocated {} = {:.2}x, {} driver calls, allocate p50 {:.0} ns p99 {:.0} ns",
        format_bytes(m.peak_reserved),
        format_bytes(m.peak_allocated),
        m.reserved_over_allocated,
        m.driver_calls,
        m.alloc_latency_median_ns,
        m.alloc_latency_p99_ns
    );
    if let Some(o) = &m.oom {
        s.push_str(&format!(
            "; out of memory at event {} ({} for {}){}",
            o.event,
            format_bytes(o.requested),
            o.tag,
            if o.despite_free_memory() {
                format!(" despite {} free", format_bytes(o.free_bytes))
            } else {
                String::new()
            }
        ));
    }
    s
}

/// The allocator metrics of a case id: those of its latest validation in this process, else
/// a fresh replay (the simulation is deterministic except for the latencies). None when the
/// id is not an allocator case.
pub fn metrics(case_id: &str) -> Option<AllocatorMetrics> {
    if let Some(m) = METRICS
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .get(case_id)
    {
        return Some(m.clone());
    }
    all_cases()
        .into_iter()
        .find(|c| c.info.id == case_id)
        .and_then(|c| c.replay(true).ok())
}

/// The allocation trace of `steps` optimizer steps of a training schedule, recorded on the
/// dry backend (the schedule's exact allocations at full size, nothing computed), with a
/// device capacity 10% above its peak of live bytes: a card the model just fits.
pub fn training_trace(
    name: &str,
    shape: ModelShape,
    policy: Policy,
    steps: usize,
) -> Result<Trace> {
    let be = DryBackend::new(None);
    be.memory().start_timeline();
    {
        let mut state = TrainState::new(&be, shape, policy, &InitialValues::unset())?;
        for _ in 0..steps {
            state.step(&be)?;
        }
    }
    let mut trace = Trace::from_timeline(name, &be.memory().take_timeline())?;
    trace.capacity = Some(trace.peak_live_bytes() / 10 * 11);
    Ok(trace)
}

/// Two steps of GPT-2 small (bf16, flash), without checkpointing and with selective
/// recomputation over four micro-batches.
fn training_traces() -> Vec<Trace> {
    let gpt2 = ModelShape {
        layers: 12,
        hidden: 768,
        heads: 12,
        seq: 1024,
        batch: 8,
    };
    let policy = |checkpoint, micro_batches| Policy {
        checkpoint,
        attention: Variant::Flash,
        dtype: DType::Bf16,
        micro_batches,
    };
    [
        ("train-gpt2-small-none", policy(Checkpoint::None, 1)),
        (
            "train-gpt2-small-selective-mb4",
            policy(Checkpoint::Selective, 4),
        ),
    ]
    .into_iter()
    .map(|(name, p)| {
        training_trace(name, gpt2, p, 2).expect("the dry run of a valid shape cannot fail")
    })
    .collect()
}

fn all_cases() -> Vec<AllocCase> {
    let mut traces = vec![Arc::new(fragmenting_trace()), Arc::new(steady_trace())];
    traces.extend(training_traces().into_iter().map(Arc::new));
    let mut v = Vec::new();
    for t in &traces {
        let capacity = t.capacity.unwrap_or(u64::MAX);
        for spec in AllocatorSpec::all() {
            v.push(AllocCase::new(spec, t.clone(), capacity));
        }
    }
    v
}

/// Every allocator on the fragmenting and the steady trace; the same on every backend and
/// profile (the replay runs on the simulated space, in milliseconds).
pub fn cases(_profile: Profile, _kind: BackendKind) -> Vec<Box<dyn Case>> {
    all_cases()
        .into_iter()
        .map(|c| Box::new(c) as Box<dyn Case>)
        .collect()
}

/// The same cases: each checks its allocator's invariants over a whole trace.
pub fn check_cases() -> Vec<Box<dyn Case>> {
    cases(Profile::Quick, BackendKind::Cpu)
}
