//! Validating, measuring and timing cases, and collecting them into a report.
//!
//! For each case: set up on fresh random inputs and run once with poisoned outputs inside
//! the measured memory region (peak allocated and reserved, the driver's view beside them),
//! compare with the f64 reference (an `invalid` case is never timed), then hand the set-up
//! case to the timer, which flushes the L2 cache before each timed run and times it with
//! device events. The report is rewritten after every case, so nothing measured is lost if
//! a later case brings the process down.

use std::path::PathBuf;
use std::sync::Arc;

use crate::backend::{Backend, Tensor};
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::memory::{budget_from_env, format_bytes};
use crate::report::{self, CaseRecord, MemoryRecord, Report, Status, TimeStats, Timeline};
use crate::rng::Rng;
use crate::techniques::{Case, Instance, Profile};

/// Settings read from the environment (so they pass through `cargo bench`).
#[derive(Debug, Clone)]
pub struct Settings {
    pub profile: Profile,
    pub budget: Option<u64>,
    pub seed: u64,
}

impl Settings {
    pub fn from_env() -> Result<Settings> {
        Ok(Settings {
            profile: Profile::from_env()?,
            budget: budget_from_env()?,
            seed: Rng::fresh_seed(),
        })
    }
}

/// A case after its memory pass and validation: its record so far, and the set-up case when
/// it may be timed.
pub struct Prepared {
    pub record: CaseRecord,
    pub instance: Option<Box<dyn Instance>>,
}

/// One run of the suite on one backend.
pub struct Session {
    pub backend: Arc<dyn Backend>,
    pub report: Report,
    rng: Rng,
    out_dir: Option<PathBuf>,
}

impl Session {
    pub fn new(backend: Arc<dyn Backend>, settings: &Settings, profile: &str) -> Self {
        let mut report = Report::new(
            profile,
            backend.facts().clone(),
            settings.budget,
            settings.seed,
        );
        report.allocator = backend.memory().allocator_name();
        Session {
            backend,
            report,
            rng: Rng::new(settings.seed),
            out_dir: None,
        }
    }

    /// Rewrite the report in `dir` after every case.
    pub fn write_to(&mut self, dir: PathBuf) {
        self.out_dir = Some(dir);
    }

    /// The memory pass and validation of one case.
    pub fn prepare(&mut self, case: &dyn Case) -> Prepared {
        let info = case.info();
        let be = self.backend.as_ref();
        if let Some(reason) = case.skip_reason(be) {
            return Prepared {
                record: CaseRecord::new(info, Status::Skipped(reason)),
                instance: None,
            };
        }
        let tracker = be.memory();
        tracker.reset_peak();
        let base = tracker.stats();
        let free_before = be.driver_view_begin().unwrap_or(0);
        if case.record_timeline() {
            tracker.start_timeline();
        }
        let outcome = case.setup(be, &mut self.rng).and_then(|mut inst| {
            let v = inst.validate(be, &mut self.rng)?;
            be.synchronize()?;
            Ok((inst, v))
        });
        let stats = tracker.stats();
        let memory = MemoryRecord {
            peak_allocated: stats.peak_allocated - base.allocated,
            peak_reserved: stats.peak_reserved - base.reserved,
            predicted: info.predicted_peak_bytes,
            driver: be.driver_view_end(free_before).ok().flatten(),
        };
        let (status, instance, validation) = match outcome {
            Ok((inst, v)) if v.passed() => (Status::Ok, Some(inst), Some(v)),
            Ok((_, v)) => (
                Status::Invalid(format!(
                    "error {:.3e} exceeds the tolerance {:.1e} ({})",
                    v.error, v.tolerance, v.detail
                )),
                None,
                Some(v),
            ),
            Err(Error::OutOfMemory(oom)) => (Status::Oom(oom.to_string()), None, None),
            Err(Error::Unsupported(why)) => (Status::Skipped(why), None, None),
            Err(e) => (Status::Error(e.to_string()), None, None),
        };
        let mut record = CaseRecord::new(info, status);
        if info.family == "alloc" {
            // Only allocator ids: for others `metrics` would build traces to find nothing.
            record.allocator = crate::techniques::alloc::metrics(&info.id);
        }
        if case.record_timeline() {
            record.timeline = Some(Timeline::from_events(&tracker.take_timeline()));
        }
        record.memory = Some(memory);
        record.validation = validation;
        Prepared { record, instance }
    }

    /// A timer for a validated case; allocates the cache-flush buffer outside the measured
    /// memory region.
    pub fn timer(&self, instance: Box<dyn Instance>) -> Timer {
        let be = self.backend.clone();
        let cache = be.cache_bytes();
        let scratch = if cache > 0 {
            // Twice the L2 (rounded to whole f32s) evicts everything the last run left.
            be.alloc(DType::F32, (2 * cache as usize).div_ceil(4), "L2 flush")
                .ok()
        } else {
            None
        };
        let mut timer = Timer {
            be,
            instance,
            scratch,
            samples: Vec::new(),
            error: None,
        };
        timer.warm_up(3);
        timer
    }

    /// Add a finished case to the report (and rewrite the report on disk).
    pub fn push(&mut self, mut record: CaseRecord, timer: Option<Timer>) -> Result<&CaseRecord> {
        if let Some(t) = timer {
            match t.error {
                Some(e) => record.status = Status::Error(format!("while timing: {e}")),
                None => record.time = TimeStats::from_samples(&t.samples),
            }
        }
        self.report.cases.push(record);
        self.report.finalize();
        if let Some(dir) = &self.out_dir {
            report::write_all(&self.report, dir)?;
        }
        Ok(self.report.cases.last().expect("just pushed"))
    }
}

/// Times one validated case: each run's time from device events (wall clock on the CPU),
/// the L2 flushed before each run, outside the timed region.
pub struct Timer {
    be: Arc<dyn Backend>,
    instance: Box<dyn Instance>,
    scratch: Option<Tensor>,
    pub samples: Vec<f64>,
    pub error: Option<Error>,
}

impl Timer {
    /// A few untimed runs first (clocks up, caches and allocator warm), whose times are
    /// dropped, so the recorded samples describe the steady state.
    pub fn warm_up(&mut self, runs: u64) {
        self.run(runs);
        self.samples.clear();
    }

    /// Runs `iters` times; returns the summed run time in seconds (what criterion's
    /// `iter_custom` wants). After an error, returns at once and keeps the first error.
    pub fn run(&mut self, iters: u64) -> f64 {
        let mut total = 0.0f64;
        for _ in 0..iters {
            if self.error.is_some() {
                return total.max(1e-9);
            }
            let be = self.be.as_ref();
            let r = (|| -> Result<f64> {
                if let Some(s) = self.scratch.as_mut() {
                    be.flush_cache(s)?;
                }
                let inst = &mut self.instance;
                be.time(&mut || inst.run(be))
            })();
            match r {
                Ok(t) => {
                    self.samples.push(t);
                    total += t;
                }
                Err(e) => self.error = Some(e),
            }
        }
        total
    }
}

/// One line for a case's outcome: status, time and rate, memory against its model, error.
pub fn summary_line(r: &CaseRecord) -> String {
    let mut s = format!("{:<8} {}", r.status.name(), r.id);
    if let Some(t) = &r.time {
        s.push_str(&format!("  {:.3} ms", t.median_s * 1e3));
    }
    if let Some(f) = r.flops_per_s {
        s.push_str(&format!("  {:.2} TFLOP/s", f / 1e12));
    } else if let Some(b) = r.bytes_per_s {
        s.push_str(&format!("  {:.1} GB/s", b / 1e9));
    }
    if let Some(x) = r.speed_vs_baseline {
        s.push_str(&format!("  {x:.2}x cuBLAS"));
    }
    if let Some(m) = &r.memory {
        let shown = r.status == Status::Ok || matches!(r.status, Status::Invalid(_));
        if shown && (m.peak_allocated > 0 || m.predicted > 0) {
            s.push_str(&format!(
                "  peak {} (model {})",
                format_bytes(m.peak_allocated),
                format_bytes(m.predicted)
            ));
            if m.peak_reserved != m.peak_allocated {
                s.push_str(&format!(" reserved {}", format_bytes(m.peak_reserved)));
            }
        }
    }
    if let Some(v) = &r.validation {
        s.push_str(&format!("  err {:.2e} <= {:.1e}", v.error, v.tolerance));
    }
    if let Some(m) = &r.allocator {
        s.push_str(&format!("  {}", crate::techniques::alloc::summary(m)));
    }
    if let Some(msg) = r.status.message() {
        s.push_str(&format!("  ({msg})"));
    }
    s
}

/// Whether a case id matches the command line's filters (any substring; none = all).
pub fn matches_filters(id: &str, filters: &[String]) -> bool {
    filters.is_empty() || filters.iter().any(|f| id.contains(f.as_str()))
}
