//! PyTorch memory snapshots: the pickle `torch.cuda.memory._dump_snapshot` writes after
//! `torch.cuda.memory._record_memory_history()`, read into an allocation trace per device
//! and replayed through every allocator, with how faithfully the caching model reproduces
//! the snapshot's own segments.
//!
//! The format (torch/cuda/memory.py, `_snapshot`): a dict with `segments` (the allocator's
//! state at the dump) and `device_traces`, one list per device of entries with `action`
//! (`alloc`, `free_requested`, `free_completed`, `segment_alloc`, `segment_free`,
//! `segment_map`, `segment_unmap`, `snapshot`, `oom`, `annotate`), `addr`, `size`, `stream`,
//! `frames` (`filename`, `line`, `name`) and, for `oom`, `device_free`. Newer PyTorch adds
//! `allocator_settings`.
//!
//! From a device's entries the trace is: every `alloc` an allocation (tagged with its
//! innermost frame), every `free_completed` its release (the moment the block can be reused;
//! `free_requested` only precedes it), an `oom` an allocation of the refused size that is
//! released at once if it succeeds; blocks freed in the trace but allocated before recording
//! began are allocated first, in the order they are freed.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::{Arc, Mutex};

use serde_pickle::{HashableValue, Value};

use super::space::{DriverCalls, SpaceResult};
use super::trace::{replay_observed, AllocatorMetrics, Trace, TraceEvent};
use super::{AddressSpace, AllocatorSpec, CachingOptions, SimulatedSpace};
use crate::error::{invalid, Error, Result};

/// One device's history from a snapshot.
#[derive(Debug, Clone, PartialEq)]
pub struct DeviceHistory {
    pub device: usize,
    /// The replayable trace (see the module's documentation).
    pub trace: Trace,
    /// Segment actions as PyTorch's allocator performed them: (+size for `segment_alloc`
    /// and `segment_map`, −size for `segment_free` and `segment_unmap`), each with the index
    /// of the trace event it preceded.
    pub segments: Vec<(usize, i64)>,
    /// Whether the allocator mapped pages (expandable segments).
    pub expandable: bool,
    /// The refused request of the first `oom`, with the memory CUDA reported free then and
    /// the reserved bytes the snapshot's segments add up to at that moment.
    pub oom: Option<SnapshotOom>,
    /// Frees of blocks allocated before recording began (allocated first in the trace).
    pub preexisting: usize,
    /// Frees of addresses that the trace never shows allocated and whose size is unknown.
    pub unmatched_frees: usize,
}

#[derive(Debug, Clone, PartialEq)]
pub struct SnapshotOom {
    pub requested: u64,
    pub device_free: u64,
    pub reserved: u64,
    /// The innermost frame of the refused allocation.
    pub frame: String,
}

impl SnapshotOom {
    /// The device's memory as PyTorch saw it: what it had reserved plus what was still free.
    pub fn capacity(&self) -> u64 {
        self.reserved + self.device_free
    }
}

/// A snapshot, read.
#[derive(Debug, Clone, PartialEq)]
pub struct Snapshot {
    pub devices: Vec<DeviceHistory>,
    /// `allocator_settings`' `max_split_size` when it is set (not unlimited).
    pub max_split: Option<u64>,
}

const HOW_TO_RECORD: &str = "record one with torch.cuda.memory._record_memory_history() before the run and torch.cuda.memory._dump_snapshot(\"snapshot.pickle\") after it";

fn key(k: &str) -> HashableValue {
    HashableValue::String(k.into())
}

fn get<'a>(d: &'a BTreeMap<HashableValue, Value>, k: &str) -> Option<&'a Value> {
    d.get(&key(k))
}

fn as_u64(v: &Value) -> Option<u64> {
    match v {
        Value::I64(i) => u64::try_from(*i).ok(),
        Value::Int(b) => b.to_string().parse().ok(),
        Value::Bool(b) => Some(u64::from(*b)),
        _ => None,
    }
}

fn as_str(v: &Value) -> Option<&str> {
    match v {
        Value::String(s) => Some(s),
        _ => None,
    }
}

/// The innermost frame of an entry, `file:line name`, or `?`.
fn frame_of(entry: &BTreeMap<HashableValue, Value>) -> String {
    let Some(Value::List(frames)) = get(entry, "frames") else {
        return "?".into();
    };
    for f in frames {
        if let Value::Dict(f) = f {
            let file = get(f, "filename").and_then(as_str).unwrap_or("?");
            let line = get(f, "line").and_then(as_u64).unwrap_or(0);
            let name = get(f, "name").and_then(as_str).unwrap_or("?");
            return format!("{file}:{line} {name}");
        }
    }
    "?".into()
}

/// Reads the snapshot at `path`.
pub fn read(path: &Path) -> Result<Snapshot> {
    let bytes = std::fs::read(path)
        .map_err(|e| Error::Io(format!("could not read {}: {e}", path.display())))?;
    parse(&bytes, &path.display().to_string())
}

/// Reads a snapshot from its bytes; `name` names it in messages and traces.
pub fn parse(bytes: &[u8], name: &str) -> Result<Snapshot> {
    let value = serde_pickle::value_from_slice(bytes, serde_pickle::DeOptions::new()).map_err(
        |e| {
            invalid(format!(
                "{name} could not be read as a pickle ({e}); it may be truncated or not a snapshot: expected the file torch.cuda.memory._dump_snapshot writes ({HOW_TO_RECORD})"
            ))
        },
    )?;
    let Value::Dict(top) = value else {
        return Err(invalid(format!(
            "{name} is a pickle, but not of a memory snapshot: expected a dict with 'segments' and 'device_traces' ({HOW_TO_RECORD})"
        )));
    };
    let traces = match get(&top, "device_traces") {
        Some(Value::List(t)) => t,
        _ => {
            return Err(invalid(format!(
                "{name} is a pickle, but not of a memory snapshot: it has no 'device_traces' list ({HOW_TO_RECORD})"
            )))
        }
    };
    let max_split = match get(&top, "allocator_settings") {
        Some(Value::Dict(s)) => get(s, "max_split_size")
            .and_then(as_u64)
            .filter(|&b| b > 0 && b < u64::MAX / 2),
        _ => None,
    };
    let mut devices = Vec::new();
    for (device, entries) in traces.iter().enumerate() {
        let Value::List(entries) = entries else {
            return Err(invalid(format!(
                "{name}: device_traces[{device}] is not a list of trace entries"
            )));
        };
        if entries.is_empty() {
            continue;
        }
        devices.push(history(name, device, entries)?);
    }
    if devices.is_empty() {
        return Err(invalid(format!(
            "{name} records no allocation history (its device_traces are empty): it was dumped without recording; {HOW_TO_RECORD}"
        )));
    }
    Ok(Snapshot { devices, max_split })
}

fn history(name: &str, device: usize, entries: &[Value]) -> Result<DeviceHistory> {
    // First pass: which freed addresses were never allocated in the trace (live before
    // recording began), with the sizes their frees report.
    let mut live: HashMap<u64, u64> = HashMap::new();
    let mut before: Vec<(u64, u64, u32)> = Vec::new();
    let mut streams: HashMap<u64, u32> = HashMap::new();
    let mut stream_of = |s: u64| -> u32 {
        let n = streams.len() as u32;
        *streams.entry(s).or_insert(n)
    };
    let mut parsed = Vec::with_capacity(entries.len());
    for (i, e) in entries.iter().enumerate() {
        let Value::Dict(e) = e else {
            return Err(invalid(format!(
                "{name}: device {device} trace entry {i} is not a dict"
            )));
        };
        let action = get(e, "action").and_then(as_str).ok_or_else(|| {
            invalid(format!(
                "{name}: device {device} trace entry {i} has no 'action'"
            ))
        })?;
        let addr = get(e, "addr").and_then(as_u64).unwrap_or(0);
        let size = get(e, "size").and_then(as_u64).unwrap_or(0);
        let stream = stream_of(get(e, "stream").and_then(as_u64).unwrap_or(0));
        match action {
            "alloc" => {
                live.insert(addr, size);
            }
            "free_completed" if live.remove(&addr).is_none() && size > 0 => {
                before.push((addr, size, stream));
            }
            _ => {}
        }
        parsed.push((action.to_string(), addr, size, stream, e));
    }
    let mut events = Vec::with_capacity(parsed.len() + before.len());
    let mut ids: HashMap<u64, u64> = HashMap::new();
    let mut next = 0u64;
    for &(addr, size, stream) in &before {
        ids.insert(addr, next);
        events.push(TraceEvent::Alloc {
            id: next,
            size,
            tag: "allocated before recording began".into(),
            stream,
        });
        next += 1;
    }
    let preexisting = before.len();
    let mut segments = Vec::new();
    let mut expandable = false;
    let mut reserved: i64 = 0;
    let mut oom = None;
    let mut unmatched_frees = 0;
    for (action, addr, size, stream, e) in parsed {
        match action.as_str() {
            "alloc" => {
                if ids.contains_key(&addr) {
                    return Err(invalid(format!(
                        "{name}: device {device} allocates address {addr:#x} twice without freeing it"
                    )));
                }
                ids.insert(addr, next);
                events.push(TraceEvent::Alloc {
                    id: next,
                    size,
                    tag: frame_of(e),
                    stream,
                });
                next += 1;
            }
            "free_completed" => match ids.remove(&addr) {
                Some(id) => events.push(TraceEvent::Free { id }),
                None => unmatched_frees += 1,
            },
            "segment_alloc" | "segment_map" => {
                expandable |= action == "segment_map";
                reserved += size as i64;
                segments.push((events.len(), size as i64));
            }
            "segment_free" | "segment_unmap" => {
                reserved -= size as i64;
                segments.push((events.len(), -(size as i64)));
            }
            "oom" => {
                let device_free = get(e, "device_free").and_then(as_u64).unwrap_or(0);
                let frame = frame_of(e);
                if oom.is_none() {
                    oom = Some(SnapshotOom {
                        requested: size,
                        device_free,
                        reserved: reserved.max(0) as u64,
                        frame: frame.clone(),
                    });
                }
                events.push(TraceEvent::Alloc {
                    id: next,
                    size,
                    tag: format!("the request that ran out of memory ({frame})"),
                    stream,
                });
                events.push(TraceEvent::Free { id: next });
                next += 1;
            }
            // free_requested precedes free_completed; snapshot and annotate mark the trace.
            _ => {}
        }
    }
    let trace = Trace {
        name: format!("{name} device {device}"),
        capacity: oom.as_ref().map(SnapshotOom::capacity),
        events,
    };
    trace.validate()?;
    Ok(DeviceHistory {
        device,
        trace,
        segments,
        expandable,
        oom,
        preexisting,
        unmatched_frees,
    })
}

/// An address space that records the segments (and mapped pages) an allocator asks for.
struct Recording {
    inner: SimulatedSpace,
    log: Arc<Mutex<Vec<(u64, i64, bool)>>>,
}

impl AddressSpace for Recording {
    fn kind(&self) -> &'static str {
        self.inner.kind()
    }
    fn capacity(&self) -> u64 {
        self.inner.capacity()
    }
    fn used(&self) -> u64 {
        self.inner.used()
    }
    fn granularity(&self) -> u64 {
        self.inner.granularity()
    }
    fn calls(&self) -> DriverCalls {
        self.inner.calls()
    }
    fn alloc_segment(&mut self, size: u64) -> SpaceResult<u64> {
        let r = self.inner.alloc_segment(size);
        if let Ok(addr) = r {
            self.log
                .lock()
                .expect("log")
                .push((addr, size as i64, false));
        }
        r
    }
    fn free_segment(&mut self, addr: u64, size: u64) -> SpaceResult<()> {
        self.log
            .lock()
            .expect("log")
            .push((addr, -(size as i64), false));
        self.inner.free_segment(addr, size)
    }
    fn reserve(&mut self, size: u64) -> SpaceResult<u64> {
        self.inner.reserve(size)
    }
    fn map(&mut self, addr: u64, size: u64) -> SpaceResult<()> {
        let r = self.inner.map(addr, size);
        if r.is_ok() {
            self.log
                .lock()
                .expect("log")
                .push((addr, size as i64, true));
        }
        r
    }
    fn unmap(&mut self, addr: u64, size: u64) -> SpaceResult<()> {
        self.log
            .lock()
            .expect("log")
            .push((addr, -(size as i64), true));
        self.inner.unmap(addr, size)
    }
    fn unreserve(&mut self, addr: u64, size: u64) -> SpaceResult<()> {
        self.inner.unreserve(addr, size)
    }
    fn pool_alloc(&mut self, size: u64, stream: u32) -> SpaceResult<u64> {
        self.inner.pool_alloc(size, stream)
    }
    fn pool_free(&mut self, addr: u64, stream: u32) -> SpaceResult<()> {
        self.inner.pool_free(addr, stream)
    }
    fn pool_trim(&mut self) -> SpaceResult<()> {
        self.inner.pool_trim()
    }
    fn pool_reserved(&self) -> SpaceResult<u64> {
        self.inner.pool_reserved()
    }
}

/// How closely a replay through the allocator the snapshot was recorded under reproduces
/// the snapshot's own segments.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Fidelity {
    pub allocator: String,
    /// Segment actions (allocations and frees, or page maps and unmaps) in the snapshot.
    pub snapshot_segments: usize,
    /// Of those, how many the replay performed at the same position with the same size.
    pub matched: usize,
    pub replay_segments: usize,
    /// The largest difference between the snapshot's reserved bytes and the replay's, at
    /// any event, relative to the snapshot's peak reserved.
    pub reserved_error: f64,
    pub snapshot_peak_reserved: u64,
}

impl Fidelity {
    pub fn matched_fraction(&self) -> f64 {
        let n = self.snapshot_segments.max(self.replay_segments);
        if n == 0 {
            1.0
        } else {
            self.matched as f64 / n as f64
        }
    }
}

/// The allocator a snapshot was recorded under: expandable segments where it mapped pages,
/// else the caching allocator with its recorded max split size.
pub fn recorded_spec(snapshot: &Snapshot, history: &DeviceHistory) -> AllocatorSpec {
    let options = CachingOptions {
        max_split: snapshot.max_split,
        ..Default::default()
    };
    if history.expandable {
        AllocatorSpec::Expandable(options)
    } else {
        AllocatorSpec::Caching(options)
    }
}

/// Replays the device's trace through `spec` on a device of `capacity` bytes, comparing
/// its segments and reserved bytes with the snapshot's, event by event.
pub fn fidelity(history: &DeviceHistory, spec: AllocatorSpec, capacity: u64) -> Result<Fidelity> {
    let log = Arc::new(Mutex::new(Vec::new()));
    let space = Recording {
        inner: SimulatedSpace::new(capacity),
        log: log.clone(),
    };
    let mut alloc = spec.build(Box::new(space));
    // The snapshot's reserved bytes once every segment action recorded before event k has
    // happened, for k = 0 ..= events.
    let n = history.trace.events.len();
    let mut snap_at = vec![0i64; n + 2];
    let mut reserved: i64 = 0;
    let mut snap_peak: i64 = 0;
    let mut actions = history.segments.iter().peekable();
    for (k, slot) in snap_at.iter_mut().enumerate() {
        while let Some(&&(at, delta)) = actions.peek() {
            if at > k {
                break;
            }
            reserved += delta;
            snap_peak = snap_peak.max(reserved);
            actions.next();
        }
        *slot = reserved;
    }
    // A segment action recorded between events i and i+1 belongs to one of them (PyTorch
    // records a malloc's segment actions before its `alloc`, and a release's after the free
    // that caused it): after event i the replay may agree with either.
    let mut worst: i64 = 0;
    let mut live = HashMap::new();
    for (i, e) in history.trace.events.iter().enumerate() {
        match e {
            TraceEvent::Alloc {
                id, size, stream, ..
            } => match alloc.allocate(*size, *stream) {
                Ok(b) => {
                    live.insert(*id, b);
                }
                Err(Error::OutOfMemory(_)) => break,
                Err(e) => return Err(e),
            },
            TraceEvent::Free { id } => {
                if let Some(b) = live.remove(id) {
                    alloc.free(b)?;
                }
            }
        }
        let r = alloc.stats().reserved as i64;
        let diff = (r - snap_at[i]).abs().min((r - snap_at[i + 1]).abs());
        worst = worst.max(diff);
    }
    let replayed: Vec<i64> = log.lock().expect("log").iter().map(|e| e.1).collect();
    let wanted: Vec<i64> = history.segments.iter().map(|s| s.1).collect();
    let matched = replayed.iter().zip(&wanted).filter(|(a, b)| a == b).count();
    Ok(Fidelity {
        allocator: spec.to_string(),
        snapshot_segments: wanted.len(),
        matched,
        replay_segments: replayed.len(),
        reserved_error: if snap_peak > 0 {
            worst as f64 / snap_peak as f64
        } else {
            0.0
        },
        snapshot_peak_reserved: snap_peak.max(0) as u64,
    })
}

/// The allocators a replay compares: every one of the shootout's, and the caching
/// allocator's max split size swept from 32 MiB to 1 GiB.
pub fn candidates() -> Vec<AllocatorSpec> {
    let mut out = vec![
        AllocatorSpec::Direct,
        AllocatorSpec::Caching(CachingOptions::default()),
    ];
    for mib in [32u64, 64, 128, 256, 512, 1024] {
        out.push(AllocatorSpec::Caching(CachingOptions::max_split(mib << 20)));
    }
    out.push(AllocatorSpec::Pool);
    out.push(AllocatorSpec::Expandable(CachingOptions::default()));
    out
}

/// The `PYTORCH_CUDA_ALLOC_CONF` value that selects `spec`, or None where PyTorch has no
/// such setting (direct allocation, the driver's pool through PyTorch's own allocator).
pub fn alloc_conf(spec: &AllocatorSpec) -> Option<String> {
    let caching = |o: &CachingOptions, head: Option<&str>| {
        let mut parts: Vec<String> = head.map(String::from).into_iter().collect();
        if let Some(b) = o.max_split {
            parts.push(format!("max_split_size_mb:{}", b >> 20));
        }
        if let Some(d) = o.roundup_power2_divisions {
            parts.push(format!("roundup_power2_divisions:{d}"));
        }
        if let Some(g) = o.garbage_collection_threshold {
            parts.push(format!("garbage_collection_threshold:{g}"));
        }
        parts.join(",")
    };
    match spec {
        AllocatorSpec::Caching(o) => Some(caching(o, None)),
        AllocatorSpec::Expandable(o) => Some(caching(o, Some("expandable_segments:True"))),
        AllocatorSpec::Pool => Some("backend:cudaMallocAsync".into()),
        AllocatorSpec::Direct => None,
    }
}

/// The capacity of a replay with no OOM in the snapshot and no `--capacity`.
pub const UNBOUNDED: u64 = 1 << 50;

/// Allocated and reserved bytes of one allocator over a replay, at most [`SERIES_POINTS`]
/// points: each the largest values over its window of events, so no peak is lost.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Series {
    /// (last event of the window, allocated, reserved).
    pub points: Vec<(usize, u64, u64)>,
}

pub const SERIES_POINTS: usize = 1500;

/// One device's replay through every candidate.
#[derive(Debug, Clone, PartialEq)]
pub struct ReplayResult {
    pub device: usize,
    pub capacity: u64,
    pub rows: Vec<(AllocatorSpec, AllocatorMetrics)>,
    /// Each row's allocated and reserved bytes over the replay.
    pub series: Vec<Series>,
    pub fidelity: Fidelity,
    /// The candidate with PyTorch setting and the lowest peak reserved that never ran out of
    /// memory, if one did not.
    pub recommendation: Option<AllocatorSpec>,
}

/// Replays every device of `snapshot` on a device of `capacity` bytes (default: what the
/// snapshot's OOM shows the device had, else unbounded).
pub fn replay_snapshot(snapshot: &Snapshot, capacity: Option<u64>) -> Result<Vec<ReplayResult>> {
    replay_snapshot_with(snapshot, capacity, &mut |_, _| {})
}

/// [`replay_snapshot`], calling `progress(events done, events in all)` as it goes.
pub fn replay_snapshot_with(
    snapshot: &Snapshot,
    capacity: Option<u64>,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<Vec<ReplayResult>> {
    let specs = candidates();
    let total: u64 = snapshot
        .devices
        .iter()
        .map(|h| (h.trace.events.len() * specs.len()) as u64)
        .sum();
    let mut done = 0u64;
    let mut out = Vec::new();
    for h in &snapshot.devices {
        let capacity = capacity.or(h.trace.capacity).unwrap_or(UNBOUNDED);
        let n = h.trace.events.len();
        let window = n.div_ceil(SERIES_POINTS).max(1);
        let mut rows = Vec::new();
        let mut series = Vec::new();
        for spec in &specs {
            let mut a = spec.build(Box::new(SimulatedSpace::new(capacity)));
            let mut s = Series::default();
            let (mut hi_alloc, mut hi_res) = (0u64, 0u64);
            let m = replay_observed(&h.trace, a.as_mut(), None, &mut |i, st| {
                hi_alloc = hi_alloc.max(st.allocated);
                hi_res = hi_res.max(st.reserved);
                if (i + 1) % window == 0 || i + 1 == n {
                    s.points.push((i, hi_alloc, hi_res));
                    (hi_alloc, hi_res) = (0, 0);
                }
                if i % 65536 == 0 {
                    progress(done + i as u64, total);
                }
            })?;
            if hi_alloc > 0 || hi_res > 0 {
                // The window an out-of-memory cut short.
                s.points
                    .push((m.events_replayed.saturating_sub(1), hi_alloc, hi_res));
            }
            done += n as u64;
            progress(done, total);
            rows.push((*spec, m));
            series.push(s);
        }
        let recommendation = rows
            .iter()
            .filter(|(s, m)| m.oom.is_none() && alloc_conf(s).is_some())
            .min_by_key(|(_, m)| m.peak_reserved)
            .map(|(s, _)| *s);
        let fidelity = fidelity(h, recorded_spec(snapshot, h), capacity)?;
        out.push(ReplayResult {
            device: h.device,
            capacity,
            rows,
            series,
            fidelity,
            recommendation,
        });
    }
    Ok(out)
}

/// The replay as a report (family `alloc`, one case per allocator and device), so that
/// `compare` and the Markdown and SVG writers read it like the shootout's.
pub fn to_report(results: &[ReplayResult], name: &str) -> crate::report::Report {
    use crate::report::{CaseRecord, MemoryRecord, Report, Status};
    use crate::techniques::CaseInfo;
    let mut facts = crate::device::DeviceFacts::cpu(None);
    facts.backend = "replay".into();
    facts.name = format!("replay {name}");
    let mut report = Report::new("replay", facts, None, 0);
    for r in results {
        for (spec, m) in &r.rows {
            let mut info = CaseInfo::new(
                "alloc",
                &spec.id(),
                crate::dtype::DType::F32,
                format!("snapshot-{name}-dev{}", r.device),
            );
            info.predicted_peak_bytes = m.peak_requested;
            info.tolerance = 0.0;
            let status = match &m.oom {
                Some(o) => Status::Oom(o.message.clone()),
                None => Status::Ok,
            };
            let mut record = CaseRecord::new(&info, status);
            record.memory = Some(MemoryRecord {
                peak_allocated: m.peak_allocated,
                peak_reserved: m.peak_reserved,
                predicted: m.peak_requested,
                driver: None,
                device: None,
            });
            record.allocator = Some(m.clone());
            report.cases.push(record);
        }
    }
    report
}

/// A file-name-safe stem of a snapshot's path.
pub fn stem(path: &Path) -> String {
    path.file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "snapshot".into())
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '.' {
                c
            } else {
                '-'
            }
        })
        .collect()
}

fn entry(action: &str, addr: u64, size: u64, stream: u32, frame: Option<(&str, &str)>) -> Value {
    let mut d = BTreeMap::new();
    d.insert(key("action"), Value::String(action.into()));
    d.insert(key("addr"), Value::I64(addr as i64));
    d.insert(key("size"), Value::I64(size as i64));
    d.insert(key("stream"), Value::I64(stream as i64));
    let frames = match frame {
        Some((file, name)) => {
            let mut f = BTreeMap::new();
            f.insert(key("filename"), Value::String(file.into()));
            f.insert(key("line"), Value::I64(0));
            f.insert(key("name"), Value::String(name.into()));
            vec![Value::Dict(f)]
        }
        None => Vec::new(),
    };
    d.insert(key("frames"), Value::List(frames));
    Value::Dict(d)
}

/// `trace` run through `spec` on a device of `capacity` bytes, written as the snapshot
/// PyTorch would have dumped: each allocation with its segment actions before it, each free
/// as `free_requested` then `free_completed`, and an `oom` (with the device's free bytes)
/// where the allocator refuses, which ends the trace. A tag `category: name` becomes the
/// frame (file `category`, function `name`), so PyTorch's viewer shows headroom's buffers
/// where it would show Python stack frames.
pub fn record(trace: &Trace, spec: AllocatorSpec, capacity: u64) -> Result<Value> {
    let log = Arc::new(Mutex::new(Vec::new()));
    let space = Recording {
        inner: SimulatedSpace::new(capacity),
        log: log.clone(),
    };
    let mut alloc = spec.build(Box::new(space));
    let mut entries = Vec::new();
    let mut live: HashMap<u64, (super::Block, String)> = HashMap::new();
    let mut seen = 0;
    let segment_entries = |entries: &mut Vec<Value>, seen: &mut usize| {
        let log = log.lock().expect("log");
        for &(addr, size, map) in &log[*seen..] {
            let action = match (size > 0, map) {
                (true, false) => "segment_alloc",
                (false, false) => "segment_free",
                (true, true) => "segment_map",
                (false, true) => "segment_unmap",
            };
            entries.push(entry(action, addr, size.unsigned_abs(), 0, None));
        }
        *seen = log.len();
    };
    for e in &trace.events {
        match e {
            TraceEvent::Alloc {
                id,
                size,
                tag,
                stream,
            } => match alloc.allocate(*size, *stream) {
                Ok(b) => {
                    segment_entries(&mut entries, &mut seen);
                    let (file, name) = tag.split_once(": ").unwrap_or(("headroom", tag));
                    entries.push(entry("alloc", b.addr, *size, *stream, Some((file, name))));
                    live.insert(*id, (b, tag.clone()));
                }
                Err(Error::OutOfMemory(_)) => {
                    segment_entries(&mut entries, &mut seen);
                    let (file, name) = tag.split_once(": ").unwrap_or(("headroom", tag));
                    let mut oom = entry("oom", 0, *size, *stream, Some((file, name)));
                    if let Value::Dict(d) = &mut oom {
                        let free = capacity.saturating_sub(alloc.space().used());
                        d.insert(key("device_free"), Value::I64(free as i64));
                    }
                    entries.push(oom);
                    break;
                }
                Err(e) => return Err(e),
            },
            TraceEvent::Free { id } => {
                let (b, _) = live.remove(id).ok_or_else(|| {
                    invalid(format!(
                        "trace '{}' frees {id}, which is not live",
                        trace.name
                    ))
                })?;
                entries.push(entry("free_requested", b.addr, b.requested, b.stream, None));
                alloc.free(b)?;
                entries.push(entry("free_completed", b.addr, b.requested, b.stream, None));
                segment_entries(&mut entries, &mut seen);
            }
        }
    }
    let mut top = BTreeMap::new();
    top.insert(key("segments"), Value::List(Vec::new()));
    top.insert(
        key("device_traces"),
        Value::List(vec![Value::List(entries)]),
    );
    let mut settings = BTreeMap::new();
    let max_split = match spec {
        AllocatorSpec::Caching(o) | AllocatorSpec::Expandable(o) => o.max_split,
        _ => None,
    };
    settings.insert(
        key("max_split_size"),
        Value::I64(max_split.map_or(i64::MAX, |b| b as i64)),
    );
    settings.insert(
        key("expandable_segments"),
        Value::Bool(matches!(spec, AllocatorSpec::Expandable(_))),
    );
    top.insert(key("allocator_settings"), Value::Dict(settings));
    Ok(Value::Dict(top))
}

/// Writes `snapshot` as a pickle PyTorch's viewer (and `headroom replay`) reads.
pub fn write(path: &Path, snapshot: &Value) -> Result<()> {
    let bytes = serde_pickle::value_to_vec(snapshot, serde_pickle::SerOptions::new())
        .map_err(|e| invalid(format!("could not encode the snapshot: {e}")))?;
    crate::report::write_atomic(path, &bytes)
}
