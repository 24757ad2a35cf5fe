//! The tracked allocator's bookkeeping: current and peak allocated bytes, reserved bytes,
//! a budget, and out-of-memory errors that read like PyTorch's.
//!
//! Every buffer the suite allocates, on the GPU or on the host, is registered here before it
//! exists and released when it is dropped, so that a schedule's peak is the same number on
//! every backend. "Allocated" is the bytes the case asked for (not rounded); "reserved" is
//! what the allocator holds from the driver (equal to allocated for the direct allocator).

use std::fmt;
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};

use crate::error::{invalid, Result};

const KIB: f64 = 1024.0;

/// `1536` -> `1.50 KiB`; the unit PyTorch's messages use.
pub fn format_bytes(bytes: u64) -> String {
    let b = bytes as f64;
    if b < KIB {
        format!("{bytes} bytes")
    } else if b < KIB * KIB {
        format!("{:.2} KiB", b / KIB)
    } else if b < KIB * KIB * KIB {
        format!("{:.2} MiB", b / (KIB * KIB))
    } else {
        format!("{:.2} GiB", b / (KIB * KIB * KIB))
    }
}

/// Parse a budget such as `24GiB`, `512MiB`, `1.5GB`, `4096` (bytes). Binary (KiB, MiB, GiB,
/// TiB) and decimal (KB, MB, GB, TB) units are accepted, case-insensitively.
pub fn parse_bytes(text: &str) -> Result<u64> {
    let t = text.trim();
    let bad = || {
        invalid(format!(
            "'{text}' is not a memory size: write a number with an optional unit, e.g. 24GiB, 512MiB, 1.5GB or 1048576"
        ))
    };
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    if num.is_empty() {
        return Err(bad());
    }
    let value: f64 = num.parse().map_err(|_| bad())?;
    let scale: f64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "k" | "kib" => KIB,
        "m" | "mib" => KIB * KIB,
        "g" | "gib" => KIB * KIB * KIB,
        "t" | "tib" => KIB * KIB * KIB * KIB,
        "kb" => 1e3,
        "mb" => 1e6,
        "gb" => 1e9,
        "tb" => 1e12,
        _ => return Err(bad()),
    };
    let bytes = value * scale;
    if !bytes.is_finite() || bytes < 1.0 || bytes > u64::MAX as f64 {
        return Err(bad());
    }
    Ok(bytes.round() as u64)
}

/// An allocation that did not fit: the budget, or the device itself.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OutOfMemory {
    pub requested: u64,
    pub allocated: u64,
    pub reserved: u64,
    pub budget: Option<u64>,
    /// What refused: `"budget"` or the device's own error.
    pub source: String,
    pub tag: String,
}

impl fmt::Display for OutOfMemory {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "out of memory: tried to allocate {} for {}; {} allocated; {} reserved",
            format_bytes(self.requested),
            self.tag,
            format_bytes(self.allocated),
            format_bytes(self.reserved)
        )?;
        if let Some(b) = self.budget {
            write!(f, "; budget {}", format_bytes(b))?;
        }
        if self.source != "budget" {
            write!(f, " ({})", self.source)?;
        }
        Ok(())
    }
}

/// One allocation or release, for memory timelines.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MemoryEvent {
    /// The allocation's id, unique within a tracker (a release names the allocation it frees).
    #[serde(default)]
    pub id: u64,
    pub tag: String,
    /// Positive for an allocation, negative for a release.
    pub delta: i64,
    /// Allocated bytes after the event.
    pub allocated: u64,
}

#[derive(Default)]
struct State {
    allocated: u64,
    reserved: u64,
    peak_allocated: u64,
    peak_reserved: u64,
    budget: Option<u64>,
    allocations: u64,
    /// Buffers alive now, and the most alive at once since the region started.
    live: u64,
    peak_live: u64,
    next_id: u64,
    timeline: Option<Vec<MemoryEvent>>,
    /// Phase marks of the recording: (events recorded before the phase began, its label).
    phases: Vec<(usize, String)>,
    /// The allocator `HEADROOM_ALLOCATOR` chose, simulated on the requests' sizes: it
    /// decides "reserved" and refuses what its space cannot hold. None: direct allocation,
    /// reserved = allocated.
    allocator: Option<Box<dyn crate::alloc::Allocator>>,
    blocks: std::collections::HashMap<u64, crate::alloc::Block>,
}

impl std::fmt::Debug for State {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("State")
            .field("allocated", &self.allocated)
            .field("reserved", &self.reserved)
            .field("allocator", &self.allocator.as_ref().map(|a| a.name()))
            .finish()
    }
}

/// A snapshot of the tracker's counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryStats {
    pub allocated: u64,
    pub reserved: u64,
    pub peak_allocated: u64,
    pub peak_reserved: u64,
    pub allocations: u64,
    /// The most buffers alive at once since the region started.
    pub peak_live: u64,
}

/// Shared bookkeeping of one backend's allocations. Cloning shares the counters.
#[derive(Debug, Clone, Default)]
pub struct MemoryTracker {
    state: Arc<Mutex<State>>,
}

impl MemoryTracker {
    pub fn new(budget: Option<u64>) -> Self {
        let t = MemoryTracker::default();
        t.set_budget(budget);
        t
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A poisoned lock only means another thread panicked mid-update of plain counters.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn set_budget(&self, budget: Option<u64>) {
        self.lock().budget = budget;
    }

    pub fn budget(&self) -> Option<u64> {
        self.lock().budget
    }

    /// Route every later allocation through `allocator` (simulated on the requests' sizes):
    /// it decides the reserved figure and what no longer fits. Call before allocating.
    pub fn set_allocator(&self, allocator: Box<dyn crate::alloc::Allocator>) {
        let mut s = self.lock();
        debug_assert_eq!(s.allocated, 0, "set the allocator before allocating");
        s.allocator = Some(allocator);
    }

    /// The allocator's name (`HEADROOM_ALLOCATOR`'s spelling), or None for direct allocation.
    pub fn allocator_name(&self) -> Option<String> {
        self.lock().allocator.as_ref().map(|a| a.name())
    }

    /// Reserve `bytes` for a buffer tagged `tag`, or refuse with the budget's message.
    /// On success returns the allocation's id; the caller must eventually call
    /// [`MemoryTracker::release`] with it and the same size (buffers do so when dropped).
    pub fn admit(&self, bytes: u64, tag: &str) -> std::result::Result<u64, OutOfMemory> {
        let mut s = self.lock();
        let id = s.next_id + 1;
        if let Some(a) = s.allocator.as_mut() {
            // The simulated allocator's space has the budget as its capacity, so it refuses
            // where the card it stands for would, fragmentation included.
            match a.allocate(bytes, 0) {
                Ok(block) => {
                    s.blocks.insert(id, block);
                }
                Err(e) => {
                    let name = a.name();
                    let reserved = a.stats().reserved;
                    return Err(OutOfMemory {
                        requested: bytes,
                        allocated: s.allocated,
                        reserved,
                        budget: s.budget,
                        source: format!("the {name} allocator: {e}"),
                        tag: tag.into(),
                    });
                }
            }
        } else if let Some(budget) = s.budget {
            if s.reserved + bytes > budget {
                return Err(OutOfMemory {
                    requested: bytes,
                    allocated: s.allocated,
                    reserved: s.reserved,
                    budget: Some(budget),
                    source: "budget".into(),
                    tag: tag.into(),
                });
            }
        }
        s.allocated += bytes;
        s.reserved = match s.allocator.as_ref() {
            Some(a) => a.stats().reserved,
            None => s.reserved + bytes,
        };
        s.allocations += 1;
        s.live += 1;
        s.peak_live = s.peak_live.max(s.live);
        s.peak_allocated = s.peak_allocated.max(s.allocated);
        s.peak_reserved = s.peak_reserved.max(s.reserved);
        s.next_id = id;
        let allocated = s.allocated;
        if let Some(tl) = s.timeline.as_mut() {
            tl.push(MemoryEvent {
                id,
                tag: tag.into(),
                delta: bytes as i64,
                allocated,
            });
        }
        Ok(id)
    }

    /// The out-of-memory error for a refusal by the device rather than the budget.
    pub fn device_oom(&self, bytes: u64, tag: &str, source: &str) -> OutOfMemory {
        let s = self.lock();
        OutOfMemory {
            requested: bytes,
            allocated: s.allocated,
            reserved: s.reserved,
            budget: s.budget,
            source: source.into(),
            tag: tag.into(),
        }
    }

    pub fn release(&self, id: u64, bytes: u64, tag: &str) {
        let mut s = self.lock();
        debug_assert!(s.allocated >= bytes, "released more than allocated");
        s.allocated = s.allocated.saturating_sub(bytes);
        s.live = s.live.saturating_sub(1);
        let block = s.blocks.remove(&id);
        s.reserved = match (s.allocator.as_mut(), block) {
            (Some(a), Some(b)) => {
                if let Err(e) = a.free(b) {
                    eprintln!(
                        "warning: the {} allocator could not free {tag}: {e}",
                        a.name()
                    );
                }
                a.stats().reserved
            }
            _ => s.reserved.saturating_sub(bytes),
        };
        let allocated = s.allocated;
        if let Some(tl) = s.timeline.as_mut() {
            tl.push(MemoryEvent {
                id,
                tag: tag.into(),
                delta: -(bytes as i64),
                allocated,
            });
        }
    }

    /// Start a measured region: the peaks restart from the current values.
    pub fn reset_peak(&self) {
        let mut s = self.lock();
        s.peak_allocated = s.allocated;
        s.peak_reserved = s.reserved;
        s.allocations = 0;
        s.peak_live = s.live;
    }

    pub fn stats(&self) -> MemoryStats {
        let s = self.lock();
        MemoryStats {
            allocated: s.allocated,
            reserved: s.reserved,
            peak_allocated: s.peak_allocated,
            peak_reserved: s.peak_reserved,
            allocations: s.allocations,
            peak_live: s.peak_live,
        }
    }

    /// Record every allocation and release from now on (replacing any earlier record).
    pub fn start_timeline(&self) {
        let mut s = self.lock();
        s.timeline = Some(Vec::new());
        s.phases.clear();
    }

    /// Mark the start of a phase (forward, backward, optimizer ...) in the recording; does
    /// nothing when nothing is being recorded, so schedules can mark their phases always.
    pub fn mark_phase(&self, label: &str) {
        let mut s = self.lock();
        if let Some(at) = s.timeline.as_ref().map(Vec::len) {
            s.phases.push((at, label.to_string()));
        }
    }

    /// The phase marks of the last recording, in order: (events before the phase, label).
    pub fn take_phases(&self) -> Vec<(usize, String)> {
        std::mem::take(&mut self.lock().phases)
    }

    pub fn take_timeline(&self) -> Vec<MemoryEvent> {
        self.lock().timeline.take().unwrap_or_default()
    }
}

/// `HEADROOM_BUDGET`, parsed; unset or empty means no budget.
pub fn budget_from_env() -> Result<Option<u64>> {
    match std::env::var("HEADROOM_BUDGET") {
        Ok(v) if !v.trim().is_empty() => parse_bytes(&v)
            .map(Some)
            .map_err(|e| invalid(format!("HEADROOM_BUDGET: {e}"))),
        _ => Ok(None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_units() {
        assert_eq!(parse_bytes("24GiB").unwrap(), 24 << 30);
        assert_eq!(parse_bytes("512MiB").unwrap(), 512 << 20);
        assert_eq!(parse_bytes("512 mib").unwrap(), 512 << 20);
        assert_eq!(parse_bytes("1.5GB").unwrap(), 1_500_000_000);
        assert_eq!(parse_bytes("4096").unwrap(), 4096);
        assert_eq!(parse_bytes("2k").unwrap(), 2048);
    }

    #[test]
    fn rejects_garbage_with_a_sentence() {
        for bad in ["", "GiB", "-1GiB", "12 parsecs", "1.2.3MiB", "0", "0.1"] {
            let e = parse_bytes(bad).unwrap_err().to_string();
            assert!(e.contains("is not a memory size"), "{bad}: {e}");
        }
    }

    #[test]
    fn formats_like_pytorch() {
        assert_eq!(format_bytes(512 << 20), "512.00 MiB");
        assert_eq!(
            format_bytes((21.5 * (1u64 << 30) as f64) as u64),
            "21.50 GiB"
        );
        assert_eq!(format_bytes(100), "100 bytes");
    }

    #[test]
    fn budget_refusal_message() {
        let t = MemoryTracker::new(Some(24 << 30));
        t.admit((21.5 * (1u64 << 30) as f64) as u64, "weights")
            .unwrap();
        let e = t.admit(3 << 30, "scores").unwrap_err();
        assert_eq!(
            e.to_string(),
            "out of memory: tried to allocate 3.00 GiB for scores; 21.50 GiB allocated; 21.50 GiB reserved; budget 24.00 GiB"
        );
        // The refused allocation left no trace.
        assert_eq!(t.stats().allocated, (21.5 * (1u64 << 30) as f64) as u64);
    }

    #[test]
    fn peak_tracks_and_resets() {
        let t = MemoryTracker::new(None);
        let a = t.admit(100, "a").unwrap();
        t.admit(50, "b").unwrap();
        t.release(a, 100, "a");
        assert_eq!(t.stats().peak_allocated, 150);
        assert_eq!(t.stats().allocated, 50);
        t.reset_peak();
        assert_eq!(t.stats().peak_allocated, 50);
        t.admit(10, "c").unwrap();
        assert_eq!(t.stats().peak_allocated, 60);
        assert_eq!(t.stats().allocations, 1);
    }

    #[test]
    fn timeline_records_events() {
        let t = MemoryTracker::new(None);
        t.start_timeline();
        let id = t.admit(8, "x").unwrap();
        t.release(id, 8, "x");
        let tl = t.take_timeline();
        assert_eq!(tl.len(), 2);
        assert_eq!((tl[0].id, tl[1].id), (id, id));
        assert_eq!(tl[0].delta, 8);
        assert_eq!(tl[1].allocated, 0);
    }
}
