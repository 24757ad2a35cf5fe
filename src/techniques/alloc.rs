//! The allocator shootout's cases: each allocator replays each trace on a simulated device,
//! the same on the CPU and the GPU backends. Ids: `alloc/<allocator>/sim/<trace>`, e.g.
//! `alloc/caching-max-split-128MiB/sim/varying-shapes`. On a GPU the driver's own
//! stream-ordered pool also replays every trace (`alloc/pool/device/<trace>`), with the `pool`
//! model's peak reserved beside its own in the validation's detail.
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

use crate::alloc::trace::{fragmenting_trace, replay_simulated, steady_trace, walkthrough_trace};
use crate::alloc::{AllocatorMetrics, AllocatorSpec, Trace};
use crate::backend::dry::DryBackend;
use crate::backend::{Backend, BackendKind};
use crate::dtype::DType;
use crate::error::Result;
use crate::model::{Checkpoint, InitialValues, ModelShape, Policy, TrainState};
use crate::rng::Rng;
use crate::techniques::attention::Variant;
use crate::techniques::{Case, CaseInfo, Instance, Profile, Tamper, Validation};

/// The metrics of the latest validation of each allocator case, by case id.
static METRICS: Mutex<BTreeMap<String, AllocatorMetrics>> = Mutex::new(BTreeMap::new());

pub struct AllocCase {
    info: CaseInfo,
    spec: AllocatorSpec,
    trace: Arc<Trace>,
    capacity: u64,
    /// Replays on the real driver of the GPU instead of the simulated space.
    on_device: bool,
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
            on_device: false,
        }
    }

    /// The same allocator and trace replayed on the GPU's real driver (`alloc/<allocator>/
    /// device/<trace>`), so the simulated model can be held against what the driver does.
    pub fn on_device(spec: AllocatorSpec, trace: Arc<Trace>, capacity: u64) -> Self {
        let mut case = AllocCase::new(spec, trace, capacity);
        case.info.id = format!("alloc/{}/device/{}", spec.id(), case.trace.name);
        case.info.shape = format!("device/{}", case.trace.name);
        case.on_device = true;
        case
    }

    fn copy(&self) -> AllocCase {
        AllocCase {
            info: self.info.clone(),
            spec: self.spec,
            trace: self.trace.clone(),
            capacity: self.capacity,
            on_device: self.on_device,
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

    /// Replays the trace where the case says: the simulated device, or `be`'s real driver.
    fn replay_on(&self, be: &dyn Backend, check: bool) -> Result<AllocatorMetrics> {
        if !self.on_device {
            return self.replay(check);
        }
        let space = be.driver_space(self.capacity)?.ok_or_else(|| {
            crate::error::Error::Unsupported("replaying on the driver needs a GPU".into())
        })?;
        let every = check.then(|| (self.trace.events.len() / 256).max(1));
        let mut alloc = self.spec.build(space);
        crate::alloc::replay(&self.trace, alloc.as_mut(), every)
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
    /// A replay runs on the host (a simulated space, or driver calls made from the host):
    /// timed by the host clock.
    fn host_only(&self) -> bool {
        true
    }
    fn skip_reason(&self, be: &dyn Backend) -> Option<String> {
        (self.on_device && be.kind() != BackendKind::Cuda)
            .then(|| "replaying on the driver's own allocator needs a GPU".to_string())
    }
    fn setup(&self, _be: &dyn Backend, _rng: &mut Rng) -> Result<Box<dyn Instance>> {
        Ok(Box::new(AllocInstance {
            id: self.info.id.clone(),
            case: self.copy(),
        }))
    }
}

impl Instance for AllocInstance {
    /// One replay of the whole trace: what is timed.
    fn run(&mut self, be: &dyn Backend) -> Result<()> {
        self.case.replay_on(be, false).map(|_| ())
    }

    fn validate(
        &mut self,
        be: &dyn Backend,
        _rng: &mut Rng,
        _tamper: &mut Tamper<'_>,
    ) -> Result<Validation> {
        let m = self.case.replay_on(be, true)?;
        // On the driver, the simulated model of the same allocator is replayed beside it and
        // their agreement recorded (the model's assumptions are the thing under test; a
        // difference is a finding, not a failure of the case).
        let agreement = if self.case.on_device {
            let model = self.case.replay(false)?;
            format!(
                "; the {} model's peak reserved {} against the driver's {} ({:+.2}%){}",
                self.case.spec.id(),
                crate::memory::format_bytes(model.peak_reserved),
                crate::memory::format_bytes(m.peak_reserved),
                if model.peak_reserved > 0 {
                    (m.peak_reserved as f64 / model.peak_reserved as f64 - 1.0) * 100.0
                } else {
                    0.0
                },
                match (&model.oom, &m.oom) {
                    (None, None) => String::new(),
                    (a, b) => format!(
                        ", out of memory in the model at {}, on the driver at {}",
                        a.as_ref()
                            .map_or("no event".into(), |o| format!("event {}", o.event)),
                        b.as_ref()
                            .map_or("no event".into(), |o| format!("event {}", o.event))
                    ),
                }
            )
        } else {
            String::new()
        };
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
                None => format!("{}{agreement}", summary(&m)),
            },
            tensors: Vec::new(),
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
        "peak reserved {} / allocated {} = {:.2}x (requested {}), {} driver calls, allocate p50 {:.0} ns p99 {:.0} ns",
        format_bytes(m.peak_reserved),
        format_bytes(m.peak_allocated),
        m.reserved_over_allocated,
        format_bytes(m.peak_requested),
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
        arch: crate::model::Arch::GPT,
    };
    let policy = |checkpoint, micro_batches| Policy {
        checkpoint,
        attention: Variant::Flash,
        dtype: DType::Bf16,
        micro_batches,
        head: crate::model::HeadLoss::Materialized,
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
    let mut traces = vec![
        Arc::new(fragmenting_trace()),
        Arc::new(walkthrough_trace()),
        Arc::new(steady_trace()),
    ];
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

/// Every allocator on every trace on the simulated space, the same on every backend and
/// profile (milliseconds each); on a GPU also the driver's stream-ordered pool replaying the
/// same traces for real, held against the `pool` model.
pub fn cases(_profile: Profile, kind: BackendKind) -> Vec<Box<dyn Case>> {
    let sim = all_cases();
    let device: Vec<AllocCase> = if kind == BackendKind::Cuda {
        sim.iter()
            .filter(|c| c.spec == AllocatorSpec::Pool)
            .map(|c| AllocCase::on_device(c.spec, c.trace.clone(), c.capacity))
            .collect()
    } else {
        Vec::new()
    };
    sim.into_iter()
        .chain(device)
        .map(|c| Box::new(c) as Box<dyn Case>)
        .collect()
}

/// The same cases: each checks its allocator's invariants over a whole trace.
pub fn check_cases(kind: BackendKind) -> Vec<Box<dyn Case>> {
    cases(Profile::Quick, kind)
}
