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
//! released at once if it succeeds; blocks allocated before recording began are allocated
//! first: those the dump's `segments` show active that the trace never allocated (a model's
//! weights, when recording starts after it is built; in address order), then those the trace
//! frees without allocating them, in the order they are freed. The reserve recording began
//! with (the dump's segments less what the trace's segment actions added) counts toward the
//! device's capacity at the OOM and starts the fidelity comparison.
//!
//! A file is read twice, streaming ([`super::pickle`]): the first pass finds the blocks
//! allocated before recording, the first OOM (the device's capacity) and the recorded
//! settings; the second hands each event to every allocator as it is read. Memory follows
//! the live blocks, not the length of the history.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::io::BufRead;
use std::path::Path;
use std::sync::{Arc, Mutex};

use serde_pickle::{HashableValue, Value};

use super::pickle::{self, Entry, Obj, PickleError};
use super::space::{DriverCalls, SpaceResult};
use super::trace::{AllocatorMetrics, Replayer, Trace, TraceEvent};
use super::{AddressSpace, Allocator, AllocatorSpec, CachingOptions, SimulatedSpace};
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
    /// Blocks allocated before recording began (allocated first in the trace): those the
    /// trace frees, and those still active in the dump's segments that the trace never
    /// allocated.
    pub preexisting: usize,
    /// Bytes the allocator had reserved before recording began: the dump's segments less
    /// what the trace's segment actions added (0 where the dump lists no segments).
    pub reserved_before: u64,
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

/// What the first pass learns of one trace list.
#[derive(Debug, Default)]
struct Scan {
    entries: u64,
    /// Addresses allocated in the trace and not yet freed, with their sizes.
    live: HashMap<u64, u64>,
    /// Frees of blocks allocated before recording began: (addr, size, stream).
    before: Vec<(u64, u64, u64)>,
    expandable: bool,
    reserved: i64,
    oom: Option<SnapshotOom>,
}

impl Scan {
    fn entry(&mut self, e: &Entry) {
        self.entries += 1;
        let (addr, size) = (e.int("addr"), e.int("size"));
        match e.action().as_str() {
            "alloc" => {
                self.live.insert(addr, size);
            }
            "free_completed" if self.live.remove(&addr).is_none() && size > 0 => {
                self.before.push((addr, size, e.int("stream")));
            }
            "segment_alloc" => self.reserved += size as i64,
            "segment_map" => {
                self.expandable = true;
                self.reserved += size as i64;
            }
            "segment_free" | "segment_unmap" => self.reserved -= size as i64,
            "oom" if self.oom.is_none() => {
                self.oom = Some(SnapshotOom {
                    requested: size,
                    device_free: e.int("device_free"),
                    reserved: self.reserved.max(0) as u64,
                    frame: e.frame(),
                })
            }
            _ => {}
        }
    }
}

/// What the first pass learns of a device, all the second needs before its first event.
#[derive(Debug, Clone)]
struct Plan {
    device: usize,
    list: u32,
    entries: u64,
    preexisting: Vec<(u64, u64, u64)>,
    /// Bytes the allocator had reserved before recording began.
    reserved_before: u64,
    expandable: bool,
    oom: Option<SnapshotOom>,
}

/// The first pass: the snapshot's devices and recorded max split size.
struct Survey {
    plans: Vec<Plan>,
    max_split: Option<u64>,
}

fn pickle_error(name: &str, e: PickleError, sunk: &mut Option<Error>) -> Error {
    match e {
        PickleError::Malformed(m) => invalid(format!(
            "{name} could not be read as a pickle ({m}); it may be truncated or not a snapshot: expected the file torch.cuda.memory._dump_snapshot writes ({HOW_TO_RECORD})"
        )),
        PickleError::NotPlain(op) => invalid(format!(
            "{name} is a pickle, but not of a memory snapshot: it holds Python objects (opcode {op}) where a snapshot has only dicts, lists, strings and numbers ({HOW_TO_RECORD})"
        )),
        PickleError::Io(m) => Error::Io(format!("could not read {name}: {m}")),
        PickleError::Sink(m) => sunk.take().unwrap_or_else(|| invalid(m)),
    }
}

/// Opens the snapshot for one pass.
type Open<'a> = dyn FnMut() -> Result<Box<dyn BufRead + 'a>> + 'a;

fn survey(open: &mut Open<'_>, name: &str) -> Result<Survey> {
    let mut scans: HashMap<u32, Scan> = HashMap::new();
    let (top, _) = pickle::decode(open()?, &mut |list, e| {
        scans.entry(list).or_default().entry(&e);
        Ok(())
    })
    .map_err(|e| pickle_error(name, e, &mut None))?;
    let Obj::Dict(top) = top else {
        return Err(invalid(format!(
            "{name} is a pickle, but not of a memory snapshot: it holds {}, where a snapshot is a dict with 'segments' and 'device_traces' ({HOW_TO_RECORD})",
            top.kind()
        )));
    };
    let top = top.borrow();
    let Some(Obj::List(traces)) = top.get("device_traces") else {
        return Err(invalid(format!(
            "{name} is a pickle, but not of a memory snapshot: it has no 'device_traces' list ({HOW_TO_RECORD})"
        )));
    };
    let max_split = match top.get("allocator_settings") {
        Some(Obj::Dict(s)) => s
            .borrow()
            .get("max_split_size")
            .and_then(Obj::as_u64)
            .filter(|&b| b > 0 && b < u64::MAX / 2),
        _ => None,
    };
    let mut plans = Vec::new();
    for (device, list) in traces.borrow().items.iter().enumerate() {
        let Obj::List(list) = list else {
            return Err(invalid(format!(
                "{name}: device_traces[{device}] is {}, not a list of trace entries",
                list.kind()
            )));
        };
        let list = list.borrow();
        // Entries left in the list are what the decoder did not take for trace entries.
        if let Some(other) = list.items.first() {
            return Err(invalid(format!(
                "{name}: device {device}'s trace holds {} where a trace entry (a dict with an 'action') belongs",
                other.kind()
            )));
        }
        let Some(mut scan) = scans.remove(&list.id) else {
            continue;
        };
        // The dump's state: blocks active at the dump that the trace never allocated were
        // allocated before recording (a model's weights, when recording starts after it is
        // built) and are still live: they come first, then those the trace frees. The
        // reserve recording began with offsets the trace's own segment actions.
        let (dump_reserved, dump_active) = dump_state(name, &top, device)?;
        let mut preexisting: Vec<BlockAt> = dump_active
            .into_iter()
            .filter(|(addr, size, _)| *size > 0 && !scan.live.contains_key(addr))
            .collect();
        preexisting.append(&mut scan.before);
        let reserved_before = (dump_reserved as i64 - scan.reserved).max(0) as u64;
        let oom = scan.oom.map(|o| SnapshotOom {
            reserved: o.reserved + reserved_before,
            ..o
        });
        plans.push(Plan {
            device,
            list: list.id,
            entries: scan.entries,
            preexisting,
            reserved_before,
            expandable: scan.expandable,
            oom,
        });
    }
    if plans.is_empty() {
        return Err(invalid(format!(
            "{name} records no allocation history (its device_traces are empty): it was dumped without recording; {HOW_TO_RECORD}"
        )));
    }
    Ok(Survey { plans, max_split })
}

/// A block of the trace or the dump: (address, requested size, stream).
type BlockAt = (u64, u64, u64);

/// The dump's segments of `device` (a segment without a `device` is device 0): their total
/// size, and their active blocks (`active_allocated`, or freed and awaiting their stream), in
/// address order.
fn dump_state(name: &str, top: &pickle::Dict, device: usize) -> Result<(u64, Vec<BlockAt>)> {
    let bad = |what: String| {
        invalid(format!(
            "{name}: the snapshot's segments are not what torch.cuda.memory._snapshot() writes: {what}"
        ))
    };
    let segments = match top.get("segments") {
        None => return Ok((0, Vec::new())),
        Some(Obj::List(l)) => l.clone(),
        Some(other) => return Err(bad(format!("'segments' is {}, not a list", other.kind()))),
    };
    let (mut total, mut active) = (0u64, Vec::new());
    for seg in segments.borrow().items.iter() {
        let Obj::Dict(seg) = seg else {
            return Err(bad(format!("a segment is {}, not a dict", seg.kind())));
        };
        let seg = seg.borrow();
        if seg.get("device").and_then(Obj::as_u64).unwrap_or(0) != device as u64 {
            continue;
        }
        let int = |d: &pickle::Dict, k: &str| d.get(k).and_then(Obj::as_u64);
        total +=
            int(&seg, "total_size").ok_or_else(|| bad("a segment has no 'total_size'".into()))?;
        let stream = int(&seg, "stream").unwrap_or(0);
        let blocks = match seg.get("blocks") {
            Some(Obj::List(l)) => l.clone(),
            _ => return Err(bad("a segment has no 'blocks' list".into())),
        };
        for b in blocks.borrow().items.iter() {
            let Obj::Dict(b) = b else {
                return Err(bad(format!("a block is {}, not a dict", b.kind())));
            };
            let b = b.borrow();
            let state = b.get("state").and_then(Obj::as_str).unwrap_or("");
            if !state.starts_with("active_") {
                continue;
            }
            let addr = int(&b, "address").ok_or_else(|| bad("a block has no 'address'".into()))?;
            let size = int(&b, "requested_size")
                .or_else(|| int(&b, "size"))
                .ok_or_else(|| bad("a block has no 'size'".into()))?;
            active.push((addr, size, stream));
        }
    }
    active.sort_unstable();
    Ok((total, active))
}

/// Where a device's history goes as the second pass reads it.
trait HistorySink {
    fn event(&mut self, e: TraceEvent) -> Result<()>;
    /// A segment action of the snapshot's own allocator (+ allocated or mapped bytes,
    /// − freed or unmapped), recorded before the next event.
    fn segment(&mut self, delta: i64) -> Result<()>;
}

/// Turns a device's entries into trace events (see the module's documentation).
struct Translator {
    name: String,
    device: usize,
    ids: HashMap<u64, u64>,
    streams: HashMap<u64, u32>,
    next: u64,
    unmatched_frees: usize,
}

impl Translator {
    /// Starts a device's history with the blocks allocated before recording began.
    fn new(name: &str, plan: &Plan, out: &mut dyn HistorySink) -> Result<Translator> {
        let mut t = Translator {
            name: name.into(),
            device: plan.device,
            ids: HashMap::new(),
            streams: HashMap::new(),
            next: 0,
            unmatched_frees: 0,
        };
        for &(addr, size, stream) in &plan.preexisting {
            let stream = t.stream(stream);
            t.ids.insert(addr, t.next);
            out.event(TraceEvent::Alloc {
                id: t.next,
                size,
                tag: "allocated before recording began".into(),
                stream,
            })?;
            t.next += 1;
        }
        Ok(t)
    }

    fn stream(&mut self, s: u64) -> u32 {
        let n = self.streams.len() as u32;
        *self.streams.entry(s).or_insert(n)
    }

    fn entry(&mut self, e: &Entry, out: &mut dyn HistorySink) -> Result<()> {
        let (addr, size) = (e.int("addr"), e.int("size"));
        match e.action().as_str() {
            "alloc" => {
                if self.ids.contains_key(&addr) {
                    return Err(invalid(format!(
                        "{}: device {} allocates address {addr:#x} twice without freeing it",
                        self.name, self.device
                    )));
                }
                let stream = self.stream(e.int("stream"));
                self.ids.insert(addr, self.next);
                out.event(TraceEvent::Alloc {
                    id: self.next,
                    size,
                    tag: e.frame(),
                    stream,
                })?;
                self.next += 1;
            }
            "free_completed" => match self.ids.remove(&addr) {
                Some(id) => out.event(TraceEvent::Free { id })?,
                None => self.unmatched_frees += 1,
            },
            "segment_alloc" | "segment_map" => out.segment(size as i64)?,
            "segment_free" | "segment_unmap" => out.segment(-(size as i64))?,
            "oom" => {
                let stream = self.stream(e.int("stream"));
                out.event(TraceEvent::Alloc {
                    id: self.next,
                    size,
                    tag: format!("the request that ran out of memory ({})", e.frame()),
                    stream,
                })?;
                out.event(TraceEvent::Free { id: self.next })?;
                self.next += 1;
            }
            // free_requested precedes free_completed; snapshot and annotate mark the trace.
            _ => {}
        }
        Ok(())
    }
}

/// The second pass: every device's entries through its translator into its sink.
fn second_pass(
    open: &mut Open<'_>,
    name: &str,
    survey: &Survey,
    sinks: &mut [&mut dyn HistorySink],
    progress: &mut dyn FnMut(u64),
) -> Result<Vec<Translator>> {
    let mut translators = Vec::new();
    for (plan, sink) in survey.plans.iter().zip(sinks.iter_mut()) {
        translators.push(Translator::new(name, plan, &mut **sink)?);
    }
    let device_of: HashMap<u32, usize> = survey
        .plans
        .iter()
        .enumerate()
        .map(|(k, p)| (p.list, k))
        .collect();
    let mut failed: Option<Error> = None;
    let mut entries = 0u64;
    let decoded = pickle::decode(open()?, &mut |list, e| {
        entries += 1;
        if entries % 65536 == 0 {
            progress(entries);
        }
        let Some(&k) = device_of.get(&list) else {
            return Ok(());
        };
        translators[k].entry(&e, &mut *sinks[k]).map_err(|err| {
            let m = err.to_string();
            failed = Some(err);
            m
        })
    });
    if let Err(e) = decoded {
        return Err(pickle_error(name, e, &mut failed));
    }
    Ok(translators)
}

/// A device's history kept whole (for tests and small snapshots).
#[derive(Default)]
struct Collect {
    events: Vec<TraceEvent>,
    segments: Vec<(usize, i64)>,
}

impl HistorySink for Collect {
    fn event(&mut self, e: TraceEvent) -> Result<()> {
        self.events.push(e);
        Ok(())
    }
    fn segment(&mut self, delta: i64) -> Result<()> {
        self.segments.push((self.events.len(), delta));
        Ok(())
    }
}

fn materialize(open: &mut Open<'_>, name: &str) -> Result<Snapshot> {
    let survey = survey(open, name)?;
    let mut collects: Vec<Collect> = survey.plans.iter().map(|_| Collect::default()).collect();
    let translators = {
        let mut sinks: Vec<&mut dyn HistorySink> = collects
            .iter_mut()
            .map(|c| c as &mut dyn HistorySink)
            .collect();
        second_pass(open, name, &survey, &mut sinks, &mut |_| {})?
    };
    let mut devices = Vec::new();
    for ((plan, c), t) in survey.plans.iter().zip(collects).zip(translators) {
        let trace = Trace {
            name: format!("{name} device {}", plan.device),
            capacity: plan.oom.as_ref().map(SnapshotOom::capacity),
            events: c.events,
        };
        trace.validate()?;
        devices.push(DeviceHistory {
            device: plan.device,
            trace,
            segments: c.segments,
            expandable: plan.expandable,
            oom: plan.oom.clone(),
            preexisting: plan.preexisting.len(),
            reserved_before: plan.reserved_before,
            unmatched_frees: t.unmatched_frees,
        });
    }
    Ok(Snapshot {
        devices,
        max_split: survey.max_split,
    })
}

fn open_file(path: &Path) -> Result<Box<dyn BufRead>> {
    let f = std::fs::File::open(path)
        .map_err(|e| Error::Io(format!("could not read {}: {e}", path.display())))?;
    Ok(Box::new(std::io::BufReader::with_capacity(1 << 16, f)))
}

/// Reads the snapshot at `path`, whole.
pub fn read(path: &Path) -> Result<Snapshot> {
    materialize(&mut || open_file(path), &path.display().to_string())
}

/// Reads a snapshot from its bytes, whole; `name` names it in messages and traces.
pub fn parse(bytes: &[u8], name: &str) -> Result<Snapshot> {
    materialize(&mut || Ok(Box::new(bytes) as Box<dyn BufRead>), name)
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
pub fn recorded_spec(max_split: Option<u64>, expandable: bool) -> AllocatorSpec {
    let options = CachingOptions {
        max_split,
        ..Default::default()
    };
    if expandable {
        AllocatorSpec::Expandable(options)
    } else {
        AllocatorSpec::Caching(options)
    }
}

/// A replay through the allocator the snapshot was recorded under, compared as it goes
/// with the snapshot's own segment actions and reserved bytes.
struct FidelityRun {
    spec: AllocatorSpec,
    alloc: Box<dyn Allocator>,
    replayer: Replayer,
    log: Arc<Mutex<Vec<(u64, i64, bool)>>>,
    logged: usize,
    /// The snapshot's reserved bytes so far, and their peak.
    reserved: i64,
    peak: i64,
    /// After the last event replayed: the replay's reserved bytes and the snapshot's
    /// before that event (compared with the snapshot's before the next one too).
    pending: Option<(i64, i64)>,
    worst: i64,
    /// Segment actions of one side not yet paired with the other's, position by position.
    wanted: VecDeque<i64>,
    replayed: VecDeque<i64>,
    matched: usize,
    snapshot_segments: usize,
    replay_segments: usize,
    /// Events left of the allocations made before recording.
    setup_events: usize,
}

impl FidelityRun {
    /// `before`: the blocks allocated before recording (the first events) and the bytes
    /// reserved then. The snapshot's reserved bytes start from the latter; the replay's
    /// segment actions for the former are its own start, which the snapshot does not show,
    /// so they are neither paired nor compared.
    fn new(spec: AllocatorSpec, capacity: u64, name: &str, before: (usize, u64)) -> FidelityRun {
        let log = Arc::new(Mutex::new(Vec::new()));
        let space = Recording {
            inner: SimulatedSpace::new(capacity),
            log: log.clone(),
        };
        let mut alloc = spec.build(Box::new(space));
        let replayer = Replayer::new(name, alloc.as_mut(), None);
        FidelityRun {
            spec,
            alloc,
            replayer,
            log,
            logged: 0,
            reserved: before.1 as i64,
            peak: before.1 as i64,
            setup_events: before.0,
            pending: None,
            worst: 0,
            wanted: VecDeque::new(),
            replayed: VecDeque::new(),
            matched: 0,
            snapshot_segments: 0,
            replay_segments: 0,
        }
    }

    fn pair(&mut self) {
        while let (Some(a), Some(b)) = (self.wanted.front(), self.replayed.front()) {
            self.matched += usize::from(a == b);
            self.wanted.pop_front();
            self.replayed.pop_front();
        }
    }

    /// The snapshot's reserved bytes before the next event are known: settle the last one.
    /// A segment action recorded between events i and i+1 belongs to one of them (PyTorch
    /// records a malloc's segment actions before its `alloc`, and a release's after the
    /// free that caused it): after event i the replay may agree with either.
    fn settle(&mut self) {
        if let Some((r, before)) = self.pending.take() {
            let diff = (r - before).abs().min((r - self.reserved).abs());
            self.worst = self.worst.max(diff);
        }
    }

    fn segment(&mut self, delta: i64) {
        self.reserved += delta;
        self.peak = self.peak.max(self.reserved);
        self.snapshot_segments += 1;
        self.wanted.push_back(delta);
        self.pair();
    }

    fn event(&mut self, e: &TraceEvent) -> Result<()> {
        if self.setup_events > 0 {
            self.setup_events -= 1;
            self.replayer.step(self.alloc.as_mut(), e)?;
            self.logged = self.log.lock().expect("log").len();
            return Ok(());
        }
        self.settle();
        if self.replayer.step(self.alloc.as_mut(), e)? {
            let r = self.alloc.stats().reserved as i64;
            self.pending = Some((r, self.reserved));
        }
        let log = self.log.lock().expect("log");
        for &(_, delta, _) in &log[self.logged..] {
            self.replayed.push_back(delta);
        }
        self.replay_segments += log.len() - self.logged;
        self.logged = log.len();
        drop(log);
        self.pair();
        Ok(())
    }

    fn finish(mut self) -> Fidelity {
        self.settle();
        Fidelity {
            allocator: self.spec.to_string(),
            snapshot_segments: self.snapshot_segments,
            matched: self.matched,
            replay_segments: self.replay_segments,
            reserved_error: if self.peak > 0 {
                self.worst as f64 / self.peak as f64
            } else {
                0.0
            },
            snapshot_peak_reserved: self.peak.max(0) as u64,
        }
    }
}

/// Replays the device's trace through `spec` on a device of `capacity` bytes, comparing
/// its segments and reserved bytes with the snapshot's, event by event.
pub fn fidelity(history: &DeviceHistory, spec: AllocatorSpec, capacity: u64) -> Result<Fidelity> {
    let mut run = FidelityRun::new(
        spec,
        capacity,
        &history.trace.name,
        (history.preexisting, history.reserved_before),
    );
    let mut actions = history.segments.iter().peekable();
    for (k, e) in history.trace.events.iter().enumerate() {
        while let Some(&(_, delta)) = actions.next_if(|a| a.0 <= k) {
            run.segment(delta);
        }
        run.event(e)?;
    }
    for &(_, delta) in actions {
        run.segment(delta);
    }
    Ok(run.finish())
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

/// A [`Series`] built without knowing the length of the history: windows start one event
/// wide and double (neighbouring points merged, each keeping the larger values) whenever
/// the points would exceed [`SERIES_POINTS`].
#[derive(Debug, Clone)]
struct SeriesBuilder {
    series: Series,
    window: usize,
    filled: usize,
    last: usize,
    hi: (u64, u64),
}

impl SeriesBuilder {
    fn new() -> SeriesBuilder {
        SeriesBuilder {
            series: Series::default(),
            window: 1,
            filled: 0,
            last: 0,
            hi: (0, 0),
        }
    }

    fn observe(&mut self, event: usize, allocated: u64, reserved: u64) {
        self.hi = (self.hi.0.max(allocated), self.hi.1.max(reserved));
        self.last = event;
        self.filled += 1;
        if self.filled < self.window {
            return;
        }
        self.series.points.push((event, self.hi.0, self.hi.1));
        (self.filled, self.hi) = (0, (0, 0));
        if self.series.points.len() > SERIES_POINTS {
            let merged = self
                .series
                .points
                .chunks(2)
                .map(|c| {
                    let last = c[c.len() - 1].0;
                    let a = c.iter().map(|p| p.1).max().unwrap_or(0);
                    let r = c.iter().map(|p| p.2).max().unwrap_or(0);
                    (last, a, r)
                })
                .collect();
            self.series.points = merged;
            self.window *= 2;
        }
    }

    fn finish(mut self) -> Series {
        if self.filled > 0 {
            self.series.points.push((self.last, self.hi.0, self.hi.1));
        }
        self.series
    }
}

/// One device's replay through every candidate.
#[derive(Debug, Clone, PartialEq)]
pub struct ReplayResult {
    pub device: usize,
    pub capacity: u64,
    /// Events in the device's trace (allocations, frees, and each OOM as both).
    pub events: usize,
    /// Blocks allocated before recording began (allocated first).
    pub preexisting: usize,
    /// Frees of addresses the trace never shows allocated and whose size is unknown.
    pub unmatched_frees: usize,
    /// The snapshot's first OOM.
    pub oom: Option<SnapshotOom>,
    pub rows: Vec<(AllocatorSpec, AllocatorMetrics)>,
    /// Each row's allocated and reserved bytes over the replay.
    pub series: Vec<Series>,
    pub fidelity: Fidelity,
    /// The candidate with PyTorch setting and the lowest peak reserved that never ran out of
    /// memory, if one did not.
    pub recommendation: Option<AllocatorSpec>,
}

/// One candidate's replay in progress.
struct Row {
    spec: AllocatorSpec,
    alloc: Box<dyn Allocator>,
    replayer: Replayer,
    series: SeriesBuilder,
}

/// A device's history replayed through every candidate and the fidelity run at once, an
/// event at a time.
struct DeviceReplay {
    device: usize,
    capacity: u64,
    rows: Vec<Row>,
    fidelity: FidelityRun,
    events: usize,
}

impl DeviceReplay {
    fn new(
        name: &str,
        device: usize,
        capacity: u64,
        recorded: AllocatorSpec,
        before: (usize, u64),
    ) -> DeviceReplay {
        let rows = candidates()
            .into_iter()
            .map(|spec| {
                let mut alloc = spec.build(Box::new(SimulatedSpace::new(capacity)));
                let replayer = Replayer::new(name, alloc.as_mut(), None);
                Row {
                    spec,
                    alloc,
                    replayer,
                    series: SeriesBuilder::new(),
                }
            })
            .collect();
        DeviceReplay {
            device,
            capacity,
            rows,
            fidelity: FidelityRun::new(recorded, capacity, name, before),
            events: 0,
        }
    }

    fn finish(
        self,
        preexisting: usize,
        unmatched_frees: usize,
        oom: Option<SnapshotOom>,
    ) -> Result<ReplayResult> {
        let mut rows = Vec::new();
        let mut series = Vec::new();
        for mut row in self.rows {
            let m = row.replayer.finish(row.alloc.as_mut())?;
            rows.push((row.spec, m));
            series.push(row.series.finish());
        }
        let recommendation = rows
            .iter()
            .filter(|(s, m)| m.oom.is_none() && alloc_conf(s).is_some())
            .min_by_key(|(_, m)| m.peak_reserved)
            .map(|(s, _)| *s);
        Ok(ReplayResult {
            device: self.device,
            capacity: self.capacity,
            events: self.events,
            preexisting,
            unmatched_frees,
            oom,
            rows,
            series,
            fidelity: self.fidelity.finish(),
            recommendation,
        })
    }
}

impl HistorySink for DeviceReplay {
    fn event(&mut self, e: TraceEvent) -> Result<()> {
        let i = self.events;
        self.events += 1;
        for row in &mut self.rows {
            if row.replayer.step(row.alloc.as_mut(), &e)? {
                let st = row.alloc.stats();
                row.series.observe(i, st.allocated, st.reserved);
            }
        }
        self.fidelity.event(&e)
    }

    fn segment(&mut self, delta: i64) -> Result<()> {
        self.fidelity.segment(delta);
        Ok(())
    }
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
    let total: u64 = snapshot
        .devices
        .iter()
        .map(|h| h.trace.events.len() as u64)
        .sum();
    let mut done = 0u64;
    let mut out = Vec::new();
    for h in &snapshot.devices {
        let capacity = capacity.or(h.trace.capacity).unwrap_or(UNBOUNDED);
        let mut r = DeviceReplay::new(
            &h.trace.name,
            h.device,
            capacity,
            recorded_spec(snapshot.max_split, h.expandable),
            (h.preexisting, h.reserved_before),
        );
        let mut actions = h.segments.iter().peekable();
        for (k, e) in h.trace.events.iter().enumerate() {
            while let Some(&(_, delta)) = actions.next_if(|a| a.0 <= k) {
                r.segment(delta)?;
            }
            r.event(e.clone())?;
            done += 1;
            if done % 65536 == 0 {
                progress(done, total);
            }
        }
        for &(_, delta) in actions {
            r.segment(delta)?;
        }
        out.push(r.finish(h.preexisting, h.unmatched_frees, h.oom.clone())?);
    }
    progress(total, total);
    Ok(out)
}

/// Replays the snapshot at `path` as it reads it (twice: see the module's documentation),
/// calling `progress(trace entries read, trace entries in all)` as it goes.
pub fn replay_file(
    path: &Path,
    capacity: Option<u64>,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<Vec<ReplayResult>> {
    replay_stream(
        &mut || open_file(path),
        &path.display().to_string(),
        capacity,
        progress,
    )
}

/// [`replay_file`] on a snapshot's bytes.
pub fn replay_bytes(bytes: &[u8], name: &str, capacity: Option<u64>) -> Result<Vec<ReplayResult>> {
    replay_stream(
        &mut || Ok(Box::new(bytes) as Box<dyn BufRead>),
        name,
        capacity,
        &mut |_, _| {},
    )
}

fn replay_stream(
    open: &mut Open<'_>,
    name: &str,
    capacity: Option<u64>,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<Vec<ReplayResult>> {
    let survey = survey(open, name)?;
    let total: u64 = survey.plans.iter().map(|p| p.entries).sum();
    let mut replays: Vec<DeviceReplay> = survey
        .plans
        .iter()
        .map(|p| {
            let cap = capacity
                .or(p.oom.as_ref().map(SnapshotOom::capacity))
                .unwrap_or(UNBOUNDED);
            DeviceReplay::new(
                &format!("{name} device {}", p.device),
                p.device,
                cap,
                recorded_spec(survey.max_split, p.expandable),
                (p.preexisting.len(), p.reserved_before),
            )
        })
        .collect();
    let translators = {
        let mut sinks: Vec<&mut dyn HistorySink> = replays
            .iter_mut()
            .map(|c| c as &mut dyn HistorySink)
            .collect();
        second_pass(open, name, &survey, &mut sinks, &mut |done| {
            progress(done, total)
        })?
    };
    let mut out = Vec::new();
    for ((plan, r), t) in survey.plans.iter().zip(replays).zip(translators) {
        out.push(r.finish(plan.preexisting.len(), t.unmatched_frees, plan.oom.clone())?);
    }
    progress(total, total);
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
    d.insert(key("frames"), frames_value(frame));
    Value::Dict(d)
}

/// A tag's frame (file `category`, function `name`, line 0) as a frame list, or none.
fn frames_value(frame: Option<(&str, &str)>) -> Value {
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
    Value::List(frames)
}

/// Half-open byte ranges, merged where they touch.
#[derive(Default)]
struct Ranges(BTreeMap<u64, u64>);

impl Ranges {
    fn add(&mut self, start: u64, end: u64) {
        let (mut start, mut end) = (start, end);
        let touching: Vec<(u64, u64)> = self
            .0
            .range(..=end)
            .filter(|(_, &e)| e >= start)
            .map(|(&s, &e)| (s, e))
            .collect();
        for (s, e) in touching {
            self.0.remove(&s);
            start = start.min(s);
            end = end.max(e);
        }
        self.0.insert(start, end);
    }
    fn remove(&mut self, start: u64, end: u64) {
        let overlapping: Vec<(u64, u64)> = self
            .0
            .range(..end)
            .filter(|(_, &e)| e > start)
            .map(|(&s, &e)| (s, e))
            .collect();
        for (s, e) in overlapping {
            self.0.remove(&s);
            if s < start {
                self.0.insert(s, start);
            }
            if e > end {
                self.0.insert(end, e);
            }
        }
    }
}

/// The allocator's segments when the snapshot is taken, as `torch.cuda.memory._snapshot()`
/// lists them: each segment the driver still holds (`segment_alloc` not yet freed; with
/// expandable segments, each run of mapped pages), with its blocks in address order: the
/// live allocations (`active_allocated`, their rounded size and requested size, their tag
/// as the frame) and the free space between them (`inactive`; the caching allocator merges
/// neighbouring free blocks, so each gap is one block). PyTorch's viewer starts its
/// allocator-state history from these and undoes the trace backwards from them, and
/// `torch.cuda._memory_viz.segsum` checks that the blocks tile each segment.
/// `segment_type` is `small` for segments of at most 2 MiB (the small pool's size), else
/// `large`.
fn final_segments(
    log: &[(u64, i64, bool)],
    live: &HashMap<u64, (super::Block, String)>,
    name: &str,
) -> Result<Vec<Value>> {
    let mut whole: BTreeMap<u64, u64> = BTreeMap::new();
    let mut mapped = Ranges::default();
    for &(addr, delta, map) in log {
        let size = delta.unsigned_abs();
        match (delta > 0, map) {
            (true, false) => {
                whole.insert(addr, size);
            }
            (false, false) => {
                whole.remove(&addr);
            }
            (true, true) => mapped.add(addr, addr + size),
            (false, true) => mapped.remove(addr, addr + size),
        }
    }
    let mut segments: Vec<(u64, u64, bool)> = whole
        .into_iter()
        .map(|(a, s)| (a, s, false))
        .chain(mapped.0.into_iter().map(|(a, e)| (a, e - a, true)))
        .collect();
    segments.sort_unstable();
    let mut blocks: Vec<&(super::Block, String)> =
        live.values().filter(|(b, _)| b.size > 0).collect();
    blocks.sort_unstable_by_key(|(b, _)| b.addr);
    let mut next = blocks.iter().peekable();
    let mut out = Vec::with_capacity(segments.len());
    for (addr, total, expandable) in segments {
        let end = addr + total;
        let mut list = Vec::new();
        let (mut at, mut allocated, mut requested) = (addr, 0u64, 0u64);
        let mut stream = None;
        while let Some((b, tag)) = next.next_if(|(b, _)| b.addr < end) {
            if b.addr < at || b.addr + b.size > end {
                return Err(invalid(format!(
                    "{name}: the live block at {:#x} ({} bytes) does not lie inside the segment at {addr:#x} ({total} bytes) after the blocks before it",
                    b.addr, b.size
                )));
            }
            if b.addr > at {
                list.push(block_value(at, b.addr - at, 0, "inactive", None));
            }
            let (file, func) = tag.split_once(": ").unwrap_or(("headroom", tag));
            list.push(block_value(
                b.addr,
                b.size,
                b.requested,
                "active_allocated",
                Some((file, func)),
            ));
            stream.get_or_insert(b.stream);
            allocated += b.size;
            requested += b.requested;
            at = b.addr + b.size;
        }
        if at < end {
            list.push(block_value(at, end - at, 0, "inactive", None));
        }
        let mut d = BTreeMap::new();
        d.insert(key("device"), Value::I64(0));
        d.insert(key("address"), Value::I64(addr as i64));
        d.insert(key("total_size"), Value::I64(total as i64));
        d.insert(key("allocated_size"), Value::I64(allocated as i64));
        d.insert(key("active_size"), Value::I64(allocated as i64));
        d.insert(key("requested_size"), Value::I64(requested as i64));
        d.insert(key("stream"), Value::I64(stream.unwrap_or(0) as i64));
        let kind = if total <= 2 << 20 { "small" } else { "large" };
        d.insert(key("segment_type"), Value::String(kind.into()));
        d.insert(
            key("segment_pool_id"),
            Value::Tuple(vec![Value::I64(0), Value::I64(0)]),
        );
        d.insert(key("is_expandable"), Value::Bool(expandable));
        d.insert(key("frames"), Value::List(Vec::new()));
        d.insert(key("blocks"), Value::List(list));
        out.push(Value::Dict(d));
    }
    if let Some((b, _)) = next.next() {
        return Err(invalid(format!(
            "{name}: the live block at {:#x} ({} bytes) lies in no segment the allocator holds",
            b.addr, b.size
        )));
    }
    Ok(out)
}

fn block_value(
    addr: u64,
    size: u64,
    requested: u64,
    state: &str,
    frame: Option<(&str, &str)>,
) -> Value {
    let mut d = BTreeMap::new();
    d.insert(key("address"), Value::I64(addr as i64));
    d.insert(key("size"), Value::I64(size as i64));
    d.insert(key("requested_size"), Value::I64(requested as i64));
    d.insert(key("state"), Value::String(state.into()));
    d.insert(key("frames"), frames_value(frame));
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
    let log = log.lock().expect("log").clone();
    let mut top = BTreeMap::new();
    top.insert(
        key("segments"),
        Value::List(final_segments(&log, &live, &trace.name)?),
    );
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
