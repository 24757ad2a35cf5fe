//! Validating, measuring and timing cases, and collecting them into a report.
//!
//! For each case: set up on fresh random inputs and run once with poisoned outputs inside
//! the measured memory region (peak allocated and reserved, the driver's view beside them),
//! compare with the f64 reference (an `invalid` case is never timed), then hand the set-up
//! case to the timer, which flushes the L2 cache before each timed run and times it with
//! device events. The report is rewritten after every case, so nothing measured is lost if
//! a later case brings the process down.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use crate::backend::BackendKind;
use crate::backend::{Backend, Tensor};
use crate::error::{Error, Result};
use crate::memory::{budget_from_env, format_bytes};
use crate::report::{self, CaseRecord, DevicePeak, MemoryRecord, Report, Status, TimeStats};
use crate::rng::Rng;
use crate::techniques::{registry, Case, Instance, Profile};

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
    /// Time it by the host clock (it does no device work), without flushing the cache.
    pub host_only: bool,
}

/// One run of the suite on one backend.
pub struct Session {
    pub backend: Arc<dyn Backend>,
    pub report: Report,
    rng: Rng,
    out_dir: Option<PathBuf>,
    /// The buffer that evicts the L2 between timed runs, allocated once for the whole run
    /// before any case (outside every case's figures and every budget).
    flush: Option<Arc<Mutex<Tensor>>>,
    /// Whether a device peak outside the tracked peak's bound makes a case invalid (`check`)
    /// or is only recorded (the benchmark, whose times are still worth having).
    strict_memory: bool,
    /// The case whose sticky device fault ended the device's usefulness to this process.
    fault: Option<String>,
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
        let flush = match backend.flush_buffer() {
            Ok(buffer) => buffer.map(|t| Arc::new(Mutex::new(t))),
            Err(e) => {
                let w = format!(
                    "the L2 flush buffer could not be allocated ({e}), so every time in this run is of warm caches"
                );
                eprintln!("headroom: warning: {w}");
                report.warnings.push(w);
                None
            }
        };
        Session {
            backend,
            report,
            rng: Rng::new(settings.seed),
            out_dir: None,
            flush,
            strict_memory: false,
            fault: None,
        }
    }

    /// Rewrite the report in `dir` after every case.
    pub fn write_to(&mut self, dir: PathBuf) {
        self.out_dir = Some(dir);
    }

    /// Make a disagreement between the device's own peak and the tracked one a failure.
    pub fn strict_memory(&mut self, strict: bool) {
        self.strict_memory = strict;
    }

    /// After a case that failed: if the device is left in a sticky fault (an illegal address,
    /// a failed launch), every later case in this process is skipped, naming the case that
    /// caused it, instead of failing one after another.
    pub fn note_fault(&mut self, case_id: &str, fault: Option<String>) {
        if self.fault.is_none() {
            if let Some(f) = fault {
                self.fault = Some(format!("device fault in {case_id} ({f})"));
            }
        }
    }

    /// The sticky fault that ended this process's use of the device, if one did.
    pub fn fault(&self) -> Option<&str> {
        self.fault.as_deref()
    }

    /// The memory pass and validation of one case.
    pub fn prepare(&mut self, case: &dyn Case) -> Prepared {
        let info = case.info();
        let host_only = case.host_only();
        let skipped = |reason: String| Prepared {
            record: CaseRecord::new(info, Status::Skipped(reason)),
            instance: None,
            host_only,
        };
        if let Some(fault) = &self.fault {
            return skipped(fault.clone());
        }
        let be = self.backend.clone();
        let be = be.as_ref();
        if let Some(reason) = case.skip_reason(be) {
            return skipped(reason);
        }
        let tracker = be.memory();
        // The driver's view starts first: it synchronizes and trims the pool, so nothing the
        // previous case left in flight or cached is counted here.
        let view = be.driver_view_begin();
        tracker.reset_peak();
        let base = tracker.stats();
        let outcome = view.and_then(|view| {
            let (inst, v) = case.setup(be, &mut self.rng).and_then(|mut inst| {
                let v = inst.validate(be, &mut self.rng, &mut crate::techniques::untouched)?;
                be.synchronize()?;
                Ok((inst, v))
            })?;
            let driver = view.map(|start| be.driver_view_end(start)).transpose()?;
            Ok((inst, v, driver))
        });
        let stats = tracker.stats();
        let peak_allocated = stats.peak_allocated - base.allocated;
        let mut memory = MemoryRecord {
            peak_allocated,
            peak_reserved: stats.peak_reserved - base.reserved,
            predicted: info.predicted_peak_bytes,
            driver: None,
            device: None,
        };
        if let Ok((_, _, Some(driver))) = &outcome {
            let device = DevicePeak {
                used: driver.used_peak(),
                reserved: driver.reserved_peak(),
                granularity: driver.granularity,
                live_buffers: stats.peak_live,
            };
            memory.driver = Some(*driver);
            memory.device = Some(device);
            if tracker.allocator_name().is_none() {
                // Direct allocation: what the driver's pool reserved is the reserved figure.
                memory.peak_reserved = device.reserved;
            }
        }
        let mut timeline = None;
        let mut shard = None;
        let (status, instance, validation) = match outcome {
            Ok((mut inst, v, _)) if v.passed() => {
                let disagreement = memory
                    .device
                    .and_then(|d| d.disagreement(peak_allocated))
                    .filter(|_| self.strict_memory);
                shard = inst.shard_record(peak_allocated);
                match (disagreement, inst.timeline(be)) {
                    (Some(why), _) => (Status::Invalid(why), None, Some(v)),
                    (None, Ok(t)) => {
                        timeline = t;
                        (Status::Ok, Some(inst), Some(v))
                    }
                    (None, Err(e)) => (
                        Status::Error(format!("while drawing its memory timeline: {e}")),
                        None,
                        Some(v),
                    ),
                }
            }
            Ok((inst, v, _)) => {
                shard = inst.shard_record(peak_allocated);
                (
                    Status::Invalid(format!(
                        "validation failed: {} (error {:.3e}, bound {:.1e})",
                        v.detail, v.error, v.tolerance
                    )),
                    None,
                    Some(v),
                )
            }
            Err(Error::OutOfMemory(oom)) => (Status::Oom(oom.to_string()), None, None),
            Err(Error::Unsupported(why)) => (Status::Skipped(why), None, None),
            Err(e) => (Status::Error(e.to_string()), None, None),
        };
        if matches!(status, Status::Error(_)) {
            self.note_fault(&info.id, be.sticky_fault());
        }
        let mut record = CaseRecord::new(info, status);
        if info.family == "alloc" {
            // Only allocator ids: for others `metrics` would build traces to find nothing.
            record.allocator = crate::techniques::alloc::metrics(&info.id);
        }
        record.timeline = timeline;
        record.shard = shard;
        record.memory = Some(memory);
        record.validation = validation;
        Prepared {
            record,
            instance,
            host_only,
        }
    }

    /// A timer for a validated case, warmed up.
    pub fn timer(&self, instance: Box<dyn Instance>, host_only: bool) -> Timer {
        let mut timer = Timer {
            be: self.backend.clone(),
            instance,
            flush: if host_only { None } else { self.flush.clone() },
            host_only,
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
                Some(e) => {
                    record.status = Status::Error(format!("while timing: {e}"));
                    self.note_fault(&record.id, self.backend.sticky_fault());
                }
                None if t.samples.is_empty() => {
                    record.status = Status::Error("no time was measured".into());
                }
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

/// Times one validated case: each run's time from device events (the host clock for cases
/// that do no device work, and on the CPU backend), the L2 flushed before each run outside
/// the timed region.
pub struct Timer {
    be: Arc<dyn Backend>,
    instance: Box<dyn Instance>,
    flush: Option<Arc<Mutex<Tensor>>>,
    host_only: bool,
    pub samples: Vec<f64>,
    pub error: Option<Error>,
}

impl Timer {
    /// A few untimed runs first (clocks up, caches and allocator warm), whose times are
    /// dropped, so the recorded samples describe the steady state.
    pub fn warm_up(&mut self, runs: u64) {
        // An error here is kept in `error`; the caller sees it before timing anything.
        let _ = self.run(runs);
        self.samples.clear();
    }

    /// Runs `iters` times; returns the summed run time in seconds (what criterion's
    /// `iter_custom` wants), or the first error, which is also kept in `error` (and every
    /// later call returns it at once).
    pub fn run(&mut self, iters: u64) -> Result<f64> {
        let mut total = 0.0f64;
        for _ in 0..iters {
            if let Some(e) = &self.error {
                return Err(e.clone());
            }
            let be = self.be.as_ref();
            let r = (|| -> Result<f64> {
                if let Some(f) = &self.flush {
                    let mut scratch = f.lock().unwrap_or_else(|p| p.into_inner());
                    be.flush_cache(&mut scratch)?;
                }
                let inst = &mut self.instance;
                if self.host_only {
                    let start = std::time::Instant::now();
                    inst.run(be)?;
                    Ok(start.elapsed().as_secs_f64())
                } else {
                    be.time(&mut || inst.run(be))
                }
            })();
            match r {
                Ok(t) => {
                    self.samples.push(t);
                    total += t;
                }
                Err(e) => {
                    self.error = Some(e.clone());
                    return Err(e);
                }
            }
        }
        Ok(total)
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
            if let Some(d) = &m.device {
                s.push_str(&format!(
                    " device {} reserved {}",
                    format_bytes(d.used),
                    format_bytes(d.reserved)
                ));
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

/// The one sentence for filters that select nothing.
pub fn nothing_matches(filters: &[String]) -> Error {
    let quoted: Vec<String> = filters.iter().map(|f| format!("'{f}'")).collect();
    Error::Invalid(format!(
        "no case id contains {}; `headroom cases` lists the benchmark cases and `headroom check` the validation cases",
        quoted.join(" or ")
    ))
}

/// Which cases a `cargo bench` command line selects. Criterion's own filter is one
/// positional argument (a regular expression, or an exact id after `--exact`); headroom reads
/// the same argument the same way it reads `headroom check`'s, as a substring of the case id,
/// and then tells criterion to time every case it hands over, so the two can never disagree
/// (`fwd+bwd` is a substring here, not a regular expression).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct BenchSelection {
    pub filter: Option<String>,
    pub exact: bool,
}

/// Criterion's options that take a value (criterion 0.8's command line), so that their
/// values are not mistaken for the filter (`--sample-size 20 matmul` filters on `matmul`).
const CRITERION_VALUE_OPTIONS: &[&str] = &[
    "-c",
    "--color",
    "--colour",
    "-s",
    "--save-baseline",
    "-b",
    "--baseline",
    "--baseline-lenient",
    "--format",
    "--profile-time",
    "--load-baseline",
    "--sample-size",
    "--warm-up-time",
    "--measurement-time",
    "--nresamples",
    "--noise-threshold",
    "--confidence-level",
    "--significance-level",
    "--plotting-backend",
    "--output-format",
];

impl BenchSelection {
    /// From the arguments after the program name, as criterion sees them.
    pub fn from_args(args: &[String]) -> Result<BenchSelection> {
        let mut sel = BenchSelection::default();
        let mut i = 0;
        while i < args.len() {
            let a = &args[i];
            if a == "--exact" {
                sel.exact = true;
            } else if CRITERION_VALUE_OPTIONS.contains(&a.as_str()) {
                i += 1; // its value
            } else if a.starts_with('-') {
                // A flag, or `--option=value`.
            } else if let Some(f) = &sel.filter {
                return Err(Error::Invalid(format!(
                    "cargo bench takes one filter, not '{f}' and '{a}'; a filter is any part of a case id"
                )));
            } else {
                sel.filter = Some(a.clone());
            }
            i += 1;
        }
        Ok(sel)
    }

    pub fn matches(&self, id: &str) -> bool {
        match &self.filter {
            None => true,
            Some(f) if self.exact => id == f,
            Some(f) => id.contains(f.as_str()),
        }
    }

    /// The filters, as `headroom check` would take them.
    pub fn filters(&self) -> Vec<String> {
        self.filter.iter().cloned().collect()
    }

    /// Whether the selection asks for the headline figure (`attention/headline`).
    pub fn wants_headline(&self) -> bool {
        match &self.filter {
            None => true,
            Some(f) if self.exact => f == "attention/headline",
            Some(f) => "attention/headline".contains(f.as_str()) || f.contains("headline"),
        }
    }

    /// The registered cases of `profile` on `kind` that the selection names, in order; an
    /// error with one sentence when it names nothing at all.
    pub fn cases(&self, profile: Profile, kind: BackendKind) -> Result<Vec<Box<dyn Case>>> {
        let cases: Vec<_> = registry(profile, kind)
            .into_iter()
            .filter(|c| self.matches(&c.info().id))
            .collect();
        if cases.is_empty() && !self.wants_headline() {
            return Err(nothing_matches(&self.filters()));
        }
        Ok(cases)
    }
}
