//! The report: one self-contained JSON file per run (schema below), plus a Markdown summary
//! and SVG plots beside it, so a run on one box can be read and compared on another.
//!
//! Schema `headroom-report/2`. Readers accept any report whose major schema number they
//! know (1 and 2) and ignore fields they do not; a report from a newer major version is
//! refused with a sentence naming both versions. Version 2 added, per case, the device's own
//! measured peaks beside the tracked ones (`memory.device`) and the validation of every
//! output tensor on its own (`validation.tensors`), and per run, `warnings`.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::device::{DeviceFacts, DriverMemoryView};
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::techniques::{CaseInfo, Validation};

pub mod compare;
pub mod markdown;
pub mod plan;
pub mod svg;

fn is_zero(x: &f64) -> bool {
    *x == 0.0
}

pub const SCHEMA_NAME: &str = "headroom-report";
pub const SCHEMA_VERSION: u32 = 2;

/// The suite's version and the commit it was built from.
pub fn suite_version() -> String {
    env!("CARGO_PKG_VERSION").to_string()
}
pub fn suite_commit() -> String {
    env!("HEADROOM_COMMIT").to_string()
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Report {
    /// `headroom-report/2`
    pub schema: String,
    pub suite_version: String,
    pub commit: String,
    /// Seconds since the Unix epoch when the run ended.
    pub created_unix: u64,
    /// `quick` or `full`, or `check`.
    pub profile: String,
    pub device: DeviceFacts,
    pub budget_bytes: Option<u64>,
    /// `HEADROOM_ALLOCATOR` when set: every case's reserved figure is that allocator's,
    /// simulated on the case's requests.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allocator: Option<String>,
    /// The seed of the run's random inputs (`HEADROOM_SEED` replays it).
    pub seed: u64,
    pub ceilings: Ceilings,
    pub cases: Vec<CaseRecord>,
    /// The longest sequence each attention variant trains under a budget (when measured).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub headline: Vec<crate::techniques::attention::Headline>,
    /// What makes the run's figures less than they should be, one sentence each (for example
    /// a cache flush buffer that could not be allocated).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<String>,
}

/// What the run measured as the card's ceilings; every case's rate is also given as a
/// fraction of the matching one.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Ceilings {
    /// Device-to-device copy (bytes read + written per second).
    pub copy_bytes_per_s: Option<f64>,
    /// The best cuBLAS fp32 (TF32 off) matmul rate of the run.
    pub cublas_f32_flops_per_s: Option<f64>,
    /// The best cuBLAS bf16 matmul rate of the run.
    pub cublas_bf16_flops_per_s: Option<f64>,
    /// The best all-reduce bus bandwidth of the run over two or more ranks (nccl-tests'
    /// busBW: 2(N−1)/N · size / time), where the box had the GPUs to measure it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bus_bytes_per_s: Option<f64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "status", content = "message", rename_all = "lowercase")]
pub enum Status {
    Ok,
    /// Did not fit: the allocator's message.
    Oom(String),
    /// Validation failed: never timed.
    Invalid(String),
    /// Cannot run here: the reason.
    Skipped(String),
    /// Something else went wrong (a CUDA error): the message.
    Error(String),
}

impl Status {
    pub fn name(&self) -> &'static str {
        match self {
            Status::Ok => "ok",
            Status::Oom(_) => "oom",
            Status::Invalid(_) => "invalid",
            Status::Skipped(_) => "skipped",
            Status::Error(_) => "error",
        }
    }
    pub fn message(&self) -> Option<&str> {
        match self {
            Status::Ok => None,
            Status::Oom(m) | Status::Invalid(m) | Status::Skipped(m) | Status::Error(m) => Some(m),
        }
    }
}

/// Time of one run, from device events on a GPU (the wall clock on the CPU backend).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TimeStats {
    pub median_s: f64,
    pub min_s: f64,
    pub max_s: f64,
    /// 10th and 90th percentiles: the spread `compare` uses to call a difference noise.
    pub p10_s: f64,
    pub p90_s: f64,
    pub samples: usize,
}

impl TimeStats {
    /// Statistics of per-run times in seconds; None when there are none.
    pub fn from_samples(samples: &[f64]) -> Option<TimeStats> {
        let mut v: Vec<f64> = samples.iter().copied().filter(|x| x.is_finite()).collect();
        if v.is_empty() {
            return None;
        }
        v.sort_by(|a, b| a.total_cmp(b));
        let q = |p: f64| {
            let pos = p * (v.len() - 1) as f64;
            let (lo, hi) = (pos.floor() as usize, pos.ceil() as usize);
            v[lo] + (v[hi] - v[lo]) * (pos - lo as f64)
        };
        Some(TimeStats {
            median_s: q(0.5),
            min_s: v[0],
            max_s: v[v.len() - 1],
            p10_s: q(0.1),
            p90_s: q(0.9),
            samples: v.len(),
        })
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MemoryRecord {
    /// Peak of the tracked allocated bytes over setup and one run.
    pub peak_allocated: u64,
    /// Peak of what the allocator held from the driver over the same region.
    pub peak_reserved: u64,
    /// The case's analytic model.
    pub predicted: u64,
    /// The driver's own view (GPU only).
    pub driver: Option<DriverMemoryView>,
    /// The device's own measured peaks over the same region and their agreement with the
    /// tracked peak (GPU only; absent before schema 2).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device: Option<DevicePeak>,
}

/// The peak the device itself measured for a case: the stream-ordered pool's used and
/// reserved high-water marks over the region, less their values at its start (the pool
/// trimmed to what is in use first). The pool maps memory in units of the device's
/// allocation granularity, so each live buffer may occupy up to one granule more than it
/// asked for: the device's used peak must lie in [tracked, tracked + live · granularity],
/// where live is the most buffers alive at once in the region.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct DevicePeak {
    pub used: u64,
    pub reserved: u64,
    /// The granularity (`cuMemGetAllocationGranularity`, minimum) and the most buffers
    /// alive at once, whose product bounds the difference.
    pub granularity: u64,
    pub live_buffers: u64,
}

impl DevicePeak {
    /// The largest used peak the tracked peak allows.
    pub fn bound(&self, tracked: u64) -> u64 {
        tracked + self.live_buffers * self.granularity
    }
    /// Why the device's peak disagrees with the tracked one, if it does.
    pub fn disagreement(&self, tracked: u64) -> Option<String> {
        if self.used < tracked || self.used > self.bound(tracked) {
            Some(format!(
                "the device's own peak {} ({} bytes) is outside [{}, {}] bytes: the tracked peak \
                 and at most one granule of {} for each of {} live buffers",
                crate::memory::format_bytes(self.used),
                self.used,
                tracked,
                self.bound(tracked),
                crate::memory::format_bytes(self.granularity),
                self.live_buffers
            ))
        } else {
            None
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CaseRecord {
    pub id: String,
    pub family: String,
    pub technique: String,
    pub dtype: DType,
    pub shape: String,
    #[serde(flatten)]
    pub status: Status,
    pub flops: f64,
    /// The kernels' own arithmetic where it differs from `flops`' convention (see
    /// [`CaseInfo::work_flops`]); absent when the same.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub work_flops: f64,
    pub bytes_moved: f64,
    pub time: Option<TimeStats>,
    pub memory: Option<MemoryRecord>,
    pub validation: Option<Validation>,
    /// Achieved FLOP/s (median time), when the case does arithmetic.
    pub flops_per_s: Option<f64>,
    /// `work_flops` over the median time: the rate of the arithmetic the hardware did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub work_flops_per_s: Option<f64>,
    /// Achieved bytes/s (median time).
    pub bytes_per_s: Option<f64>,
    /// The rate as a fraction of the run's matching ceiling.
    pub fraction_of_ceiling: Option<f64>,
    /// Median time of the family's baseline for the same shape over this case's (cuBLAS for
    /// matmul): above 1 means faster than the baseline.
    pub speed_vs_baseline: Option<f64>,
    /// Allocated bytes by category after every allocation and release of the measured
    /// region (training steps).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeline: Option<Timeline>,
    /// The allocator shootout's metrics (allocator cases only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allocator: Option<crate::alloc::AllocatorMetrics>,
    /// Every rank's peak and the collectives' bytes (sharded cases only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shard: Option<crate::shard::ShardRecord>,
}

/// A memory timeline: `points[i][c]` is the live bytes of `categories[c]` at point i, the
/// first point being the region's start and each later one the state after one event.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Timeline {
    pub categories: Vec<String>,
    pub points: Vec<Vec<u64>>,
    /// Where each phase of the region begins: (index into `points`, label), in order
    /// (absent in reports written before phases were marked).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub phases: Vec<(usize, String)>,
}

/// A tag's category: the part before its ':' (`weights: layer 3 q.weight` -> `weights`).
fn category(tag: &str) -> &str {
    tag.split(':').next().unwrap_or("other").trim()
}

impl Timeline {
    /// Groups a tracker's events by the category before the ':' of their tags, counting from
    /// zero at the region's start.
    pub fn from_events(events: &[crate::memory::MemoryEvent]) -> Timeline {
        Timeline::recorded(&[], events, &[])
    }

    /// A recorded region: `start` is what was live when it began (tag, bytes), grouped by
    /// category like the events; `phases` are the tracker's marks (events recorded before
    /// each phase began, label), which become indices into the points.
    pub fn recorded(
        start: &[(String, u64)],
        events: &[crate::memory::MemoryEvent],
        phases: &[(usize, String)],
    ) -> Timeline {
        let mut categories: Vec<String> = Vec::new();
        let mut live: Vec<i64> = Vec::new();
        fn index(cat: &str, categories: &mut Vec<String>, live: &mut Vec<i64>) -> usize {
            match categories.iter().position(|c| c == cat) {
                Some(i) => i,
                None => {
                    categories.push(cat.to_string());
                    live.push(0);
                    categories.len() - 1
                }
            }
        }
        for (tag, bytes) in start {
            let i = index(category(tag), &mut categories, &mut live);
            live[i] += *bytes as i64;
        }
        let mut points = Vec::with_capacity(events.len() + 1);
        if !start.is_empty() {
            points.push(live.clone());
        }
        for e in events {
            let i = index(category(&e.tag), &mut categories, &mut live);
            live[i] += e.delta;
            points.push(live.clone());
        }
        let width = categories.len();
        let points = points
            .into_iter()
            .map(|mut p: Vec<i64>| {
                p.resize(width, 0);
                p.into_iter().map(|x| x.max(0) as u64).collect()
            })
            .collect();
        // Without a starting point, point i is the state after event i, so a phase that
        // begins after k events begins at point k - 1 (the last point before it).
        let offset = |k: usize| {
            if start.is_empty() {
                k.saturating_sub(1)
            } else {
                k
            }
        };
        let phases = phases
            .iter()
            .map(|(k, label)| (offset(*k), label.clone()))
            .collect();
        Timeline {
            categories,
            points,
            phases,
        }
    }

    /// The largest total over the timeline.
    pub fn peak(&self) -> u64 {
        self.points
            .iter()
            .map(|p| p.iter().sum::<u64>())
            .max()
            .unwrap_or(0)
    }
}

impl CaseRecord {
    pub fn new(info: &CaseInfo, status: Status) -> Self {
        CaseRecord {
            id: info.id.clone(),
            family: info.family.clone(),
            technique: info.technique.clone(),
            dtype: info.dtype,
            shape: info.shape.clone(),
            status,
            flops: info.flops,
            work_flops: info.work_flops,
            bytes_moved: info.bytes_moved,
            time: None,
            memory: None,
            validation: None,
            flops_per_s: None,
            work_flops_per_s: None,
            bytes_per_s: None,
            fraction_of_ceiling: None,
            speed_vs_baseline: None,
            timeline: None,
            allocator: None,
            shard: None,
        }
    }
}

impl Report {
    pub fn new(profile: &str, device: DeviceFacts, budget: Option<u64>, seed: u64) -> Self {
        Report {
            schema: format!("{SCHEMA_NAME}/{SCHEMA_VERSION}"),
            suite_version: suite_version(),
            commit: suite_commit(),
            created_unix: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
            profile: profile.into(),
            device,
            budget_bytes: budget,
            allocator: None,
            seed,
            ceilings: Ceilings::default(),
            cases: Vec::new(),
            headline: Vec::new(),
            warnings: Vec::new(),
        }
    }

    /// Derives the ceilings, rates, fractions of ceiling and baseline ratios from the cases'
    /// times. Idempotent: `report` calls it again when rebuilding.
    pub fn finalize(&mut self) {
        let rate = |c: &CaseRecord| c.time.as_ref().map(|t| c.flops / t.median_s);
        let best = |cases: &[CaseRecord], family: &str, technique: &str, dtype: DType| {
            cases
                .iter()
                .filter(|c| {
                    c.status == Status::Ok
                        && c.family == family
                        && c.technique == technique
                        && c.dtype == dtype
                })
                .filter_map(rate)
                .fold(None, |acc: Option<f64>, r| {
                    Some(acc.map_or(r, |a| a.max(r)))
                })
        };
        self.ceilings.cublas_f32_flops_per_s = best(&self.cases, "matmul", "cublas", DType::F32);
        self.ceilings.cublas_bf16_flops_per_s = best(&self.cases, "matmul", "cublas", DType::Bf16);
        self.ceilings.copy_bytes_per_s = self
            .cases
            .iter()
            .filter(|c| c.status == Status::Ok && c.family == "copy")
            .filter_map(|c| c.time.as_ref().map(|t| c.bytes_moved / t.median_s))
            .fold(None, |acc: Option<f64>, r| {
                Some(acc.map_or(r, |a| a.max(r)))
            });
        self.ceilings.bus_bytes_per_s = self
            .cases
            .iter()
            .filter(|c| {
                c.status == Status::Ok && c.family == "collective" && c.technique == "all-reduce"
            })
            .filter_map(|c| c.time.as_ref().map(|t| c.bytes_moved / t.median_s))
            .fold(None, |acc: Option<f64>, r| {
                Some(acc.map_or(r, |a| a.max(r)))
            });
        let ceilings = self.ceilings.clone();
        let baselines: Vec<(String, f64)> = self
            .cases
            .iter()
            .filter(|c| c.status == Status::Ok && c.technique == "cublas")
            .filter_map(|c| {
                c.time.as_ref().map(|t| {
                    (
                        format!("{}/{}/{}", c.family, c.dtype.name(), c.shape),
                        t.median_s,
                    )
                })
            })
            .collect();
        for c in &mut self.cases {
            let Some(t) = c.time.as_ref().filter(|_| c.status == Status::Ok) else {
                c.flops_per_s = None;
                c.work_flops_per_s = None;
                c.bytes_per_s = None;
                c.fraction_of_ceiling = None;
                c.speed_vs_baseline = None;
                continue;
            };
            c.flops_per_s = (c.flops > 0.0).then(|| c.flops / t.median_s);
            c.work_flops_per_s = (c.work_flops > 0.0).then(|| c.work_flops / t.median_s);
            c.bytes_per_s = (c.bytes_moved > 0.0).then(|| c.bytes_moved / t.median_s);
            let flop_ceiling = match c.dtype {
                DType::F32 | DType::I32 => ceilings.cublas_f32_flops_per_s,
                DType::Bf16 => ceilings.cublas_bf16_flops_per_s,
            };
            c.fraction_of_ceiling = match (
                c.flops_per_s,
                flop_ceiling,
                c.bytes_per_s,
                ceilings.copy_bytes_per_s,
            ) {
                (Some(r), Some(peak), _, _) => Some(r / peak),
                (None, _, Some(r), Some(bw)) => Some(r / bw),
                _ => None,
            };
            let key = format!("{}/{}/{}", c.family, c.dtype.name(), c.shape);
            c.speed_vs_baseline = baselines
                .iter()
                .find(|(k, _)| *k == key)
                .map(|(_, base)| base / t.median_s);
        }
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).expect("a report always serializes")
    }

    /// Parse a report, refusing other files and newer schemas with one sentence.
    pub fn from_json(text: &str, origin: &str) -> Result<Report> {
        let value: serde_json::Value = serde_json::from_str(text).map_err(|e| {
            Error::Invalid(format!(
                "{origin} is not a headroom report: it is not valid JSON ({e})"
            ))
        })?;
        let schema = value
            .get("schema")
            .and_then(|s| s.as_str())
            .map(str::to_string)
            .ok_or_else(|| {
                Error::Invalid(format!(
                    "{origin} is not a headroom report: it has no \"schema\" field"
                ))
            })?;
        let version = schema
            .as_str()
            .strip_prefix(&format!("{SCHEMA_NAME}/"))
            .and_then(|v| v.parse::<u32>().ok())
            .ok_or_else(|| {
                Error::Invalid(format!(
                    "{origin} is not a headroom report: its schema is \"{schema}\""
                ))
            })?;
        if version > SCHEMA_VERSION {
            return Err(Error::Invalid(format!(
                "{origin} uses schema {SCHEMA_NAME}/{version}, newer than the {SCHEMA_NAME}/{SCHEMA_VERSION} this headroom {} reads; use a newer headroom",
                suite_version()
            )));
        }
        serde_json::from_value(value).map_err(|e| {
            Error::Invalid(format!(
                "{origin} is a damaged headroom report ({schema}): {e}"
            ))
        })
    }

    pub fn read(path: &Path) -> Result<Report> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| Error::Io(format!("could not read {}: {e}", path.display())))?;
        Report::from_json(&text, &path.display().to_string())
    }

    /// Writes the JSON atomically: a temporary file beside it, then a rename, so a reader
    /// never sees half a report.
    pub fn write(&self, path: &Path) -> Result<()> {
        write_atomic(path, self.to_json().as_bytes())
    }
}

/// Write `bytes` to `path` through a temporary file and a rename.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    let io = |e: std::io::Error| Error::Io(format!("could not write {}: {e}", path.display()));
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(io)?;
    }
    let tmp = path.with_extension(format!("tmp-{}", std::process::id()));
    let mut f = std::fs::File::create(&tmp).map_err(io)?;
    f.write_all(bytes).map_err(io)?;
    f.sync_all().map_err(io)?;
    std::fs::rename(&tmp, path).map_err(io)
}

/// Where reports go: `HEADROOM_REPORT_DIR`, else `<target>/headroom` (from
/// `CARGO_TARGET_DIR` or the running binary's place under `target/`), else
/// `./target/headroom`.
pub fn report_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("HEADROOM_REPORT_DIR") {
        return PathBuf::from(d);
    }
    if let Some(d) = std::env::var_os("CARGO_TARGET_DIR") {
        return PathBuf::from(d).join("headroom");
    }
    if let Ok(exe) = std::env::current_exe() {
        if let Some(target) = exe
            .ancestors()
            .find(|a| a.file_name().is_some_and(|n| n == "target"))
        {
            return target.join("headroom");
        }
    }
    PathBuf::from("target/headroom")
}

/// Writes the JSON, the Markdown summary and the plots; returns the JSON's path.
pub fn write_all(report: &Report, dir: &Path) -> Result<PathBuf> {
    let slug = report.device.slug();
    let json = dir.join(format!("{slug}.json"));
    report.write(&json)?;
    write_atomic(
        &dir.join(format!("{slug}.md")),
        markdown::render(report).as_bytes(),
    )?;
    svg::write_plots(report, dir, &slug)?;
    svg::write_timelines(report, dir, &slug)?;
    Ok(json)
}
