//! The allocator shootout: the allocators an ML framework can put between its tensors and the
//! driver, run on the same allocation traces, so that what each costs (allocation latency,
//! driver calls) and buys (reserved vs allocated peak, out-of-memory despite free memory) can
//! be measured side by side.
//!
//! - [`space`]: the driver underneath ([`AddressSpace`]); [`SimulatedSpace`] models a device on
//!   the CPU, `DriverSpace` (CUDA builds) is the real driver;
//! - the allocators behind [`Allocator`]: [`direct::Direct`], [`caching::Caching`] (PyTorch's
//!   native allocator, optionally with `max_split_size`), [`pool::Pool`] (the driver's
//!   stream-ordered pool), [`expandable::Expandable`] (PyTorch's `expandable_segments:True`);
//! - [`trace`]: allocation traces, their replay and metrics, and a synthetic training loop of
//!   changing batch and sequence sizes that fragments the caching allocator.
//!
//! The figures are PyTorch's (`torch.cuda.memory_stats`): "requested" is the bytes the caller
//! asked for (the suite's "bytes the case asked for", [`crate::memory`]'s allocated);
//! "allocated" the bytes of the blocks handed out (rounded, with unsplit slack); "reserved"
//! what the allocator holds from the driver.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::error::{invalid, Error, Result};
use crate::memory::{format_bytes, parse_bytes, OutOfMemory};

pub mod arena;
pub mod caching;
pub mod direct;
#[cfg(headroom_cuda)]
pub mod driver;
pub mod expandable;
pub mod pickle;
pub mod pool;
pub mod snapshot;
pub mod space;
pub mod trace;

pub use space::{AddressSpace, DriverCalls, SimulatedSpace, SpaceError};
pub use trace::{replay, AllocatorMetrics, OomEvent, Trace, TraceEvent, TraceRecorder};

// The size classes of PyTorch's native caching allocator, c10/cuda/CUDACachingAllocator.cpp
// (constants kMinBlockSize, kSmallSize, kSmallBuffer, kMinLargeAlloc, kRoundLarge, and
// kLargeBuffer in c10/core/AllocatorConfig.h), PyTorch 2.5 to 2.9.

/// Every size is rounded up to a multiple of 512 bytes.
pub const MIN_BLOCK_SIZE: u64 = 512;
/// The largest "small" request: 1 MiB.
pub const SMALL_SIZE: u64 = 1 << 20;
/// Small requests are packed into 2 MiB segments (and 2 MiB pages of an expandable segment).
pub const SMALL_BUFFER: u64 = 2 << 20;
/// Requests below 10 MiB are served from 20 MiB segments.
pub const MIN_LARGE_ALLOC: u64 = 10 << 20;
/// The segment mid-size requests share, the page of a large-pool expandable segment, and the
/// tolerance by which a request at or above the max split size may take a larger cached block.
pub const LARGE_BUFFER: u64 = 20 << 20;
/// Larger requests get a segment of their own, rounded up to 2 MiB.
pub const ROUND_LARGE: u64 = 2 << 20;

/// PyTorch's `round_size` without `roundup_power2_divisions`: at least 512 bytes, a multiple
/// of 512.
pub fn round_size(size: u64) -> u64 {
    round_size_with(size, None)
}

/// PyTorch's `round_size`: below 512 bytes, 512; with `divisions` > 1 (a power of two) and a
/// size above 512 · divisions, up to the next of `divisions` equal steps between the powers
/// of two around it (`roundup_power2_next_division`); else up to a multiple of 512.
pub fn round_size_with(size: u64, divisions: Option<u64>) -> u64 {
    if size < MIN_BLOCK_SIZE {
        return MIN_BLOCK_SIZE;
    }
    let d = divisions.unwrap_or(1);
    if d > 1 && size > MIN_BLOCK_SIZE * d {
        if size.is_power_of_two() {
            return size;
        }
        let floor = 1u64 << (63 - size.leading_zeros());
        // floor >> log2(d): PyTorch takes floor(log2(divisions)).
        let step = floor >> (63 - d.leading_zeros());
        if step == 0 {
            return floor << 1;
        }
        let down = size & !(step - 1);
        return if down == size { size } else { down + step };
    }
    size.div_ceil(MIN_BLOCK_SIZE) * MIN_BLOCK_SIZE
}

/// PyTorch's `get_allocation_size`: the segment a request that found no cached block gets.
pub fn segment_size(rounded: u64) -> u64 {
    if rounded <= SMALL_SIZE {
        SMALL_BUFFER
    } else if rounded < MIN_LARGE_ALLOC {
        LARGE_BUFFER
    } else {
        rounded.div_ceil(ROUND_LARGE) * ROUND_LARGE
    }
}

/// A live allocation. A 0-byte request gets the empty block (address 0, size 0): PyTorch
/// hands out a null pointer for it and allocates nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Block {
    /// The device address (a fake one on a simulated space).
    pub addr: u64,
    /// Bytes the allocator set aside for it (rounded; a whole unsplit block when it was not
    /// split).
    pub size: u64,
    /// Bytes the caller asked for.
    pub requested: u64,
    pub stream: u32,
}

impl Block {
    /// What a 0-byte request gets.
    pub fn empty(stream: u32) -> Block {
        Block {
            addr: 0,
            size: 0,
            requested: 0,
            stream,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.addr == 0 && self.size == 0
    }
}

/// An allocator's counters, in the words of `torch.cuda.memory_stats` ("all" pools, bytes):
/// `requested_bytes`, `allocated_bytes`, `active_bytes` and `reserved_bytes`, each current and
/// peak, so that they can be held against a run's `torch.cuda.memory_summary()`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AllocatorStats {
    /// Bytes the live requests asked for, before rounding (`requested_bytes`): the suite's
    /// "bytes the case asked for".
    pub requested: u64,
    /// Bytes of the live blocks: rounded, plus the slack of blocks handed out unsplit
    /// (`allocated_bytes`, what `torch.cuda.memory_allocated` reports).
    pub allocated: u64,
    /// Live blocks plus freed ones a stream still uses (`active_bytes`). The traces have no
    /// cross-stream uses (`record_stream`), so here it always equals `allocated`.
    pub active: u64,
    /// Bytes held from the driver: segments, mapped pages, the pool's reservation
    /// (`reserved_bytes`, `torch.cuda.memory_reserved`).
    pub reserved: u64,
    pub peak_requested: u64,
    /// `torch.cuda.max_memory_allocated`.
    pub peak_allocated: u64,
    pub peak_active: u64,
    /// `torch.cuda.max_memory_reserved`.
    pub peak_reserved: u64,
    pub driver_calls: DriverCalls,
    /// Live allocations.
    pub live: u64,
    /// Times a failed driver allocation was retried after releasing cached memory
    /// (`num_alloc_retries`).
    pub retries: u64,
    /// Allocations refused (`num_ooms`).
    pub ooms: u64,
}

/// An allocator: hands out device memory from an [`AddressSpace`] it owns.
pub trait Allocator: Send {
    /// The allocator as `HEADROOM_ALLOCATOR` spells it, e.g. `caching:max_split=128MiB`.
    fn name(&self) -> String;
    /// `size` bytes for use on `stream`. Refusals are [`Error::OutOfMemory`]; any other driver
    /// failure is [`Error::Cuda`].
    fn allocate(&mut self, size: u64, stream: u32) -> Result<Block>;
    fn free(&mut self, block: Block) -> Result<()>;
    /// Return everything cached and unused to the driver (`torch.cuda.empty_cache`).
    fn empty_cache(&mut self) -> Result<()>;
    fn stats(&self) -> AllocatorStats;
    /// Clears the peaks to the current values (the start of a measured region).
    fn reset_peaks(&mut self);
    /// The live blocks, for invariant checks.
    fn live_blocks(&self) -> Vec<Block>;
    /// The allocator's internal invariants (tiling, merging), as a sentence when broken.
    fn check(&self) -> std::result::Result<(), String> {
        Ok(())
    }
    fn space(&self) -> &dyn AddressSpace;
}

/// The caching allocator's settings that users set, as PyTorch reads them from
/// `PYTORCH_CUDA_ALLOC_CONF` (c10/cuda/CUDAAllocatorConfig.cpp) and
/// `torch.cuda.set_per_process_memory_fraction`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct CachingOptions {
    /// `max_split_size_mb`, in bytes.
    #[serde(default)]
    pub max_split: Option<u64>,
    /// `roundup_power2_divisions` (one value for every size; a power of two).
    #[serde(default)]
    pub roundup_power2_divisions: Option<u64>,
    /// `garbage_collection_threshold`, in (0, 1); acts only with a memory fraction.
    #[serde(default)]
    pub garbage_collection_threshold: Option<f64>,
    /// `set_per_process_memory_fraction`, in (0, 1]: the allocator may reserve at most this
    /// share of the device.
    #[serde(default)]
    pub memory_fraction: Option<f64>,
}

impl CachingOptions {
    /// With only a max split size.
    pub fn max_split(bytes: u64) -> Self {
        CachingOptions {
            max_split: Some(bytes),
            ..Default::default()
        }
    }

    /// The most the allocator may hold from a device of `capacity` bytes
    /// (`allowed_memory_maximum`), when a fraction is set.
    pub fn allowed_maximum(&self, capacity: u64) -> Option<u64> {
        self.memory_fraction
            .map(|f| (f * capacity as f64).floor() as u64)
    }

    /// The options in spec syntax, comma-separated, in a fixed order (empty when none).
    fn spec_text(&self) -> String {
        let mut parts = Vec::new();
        if let Some(b) = self.max_split {
            parts.push(format!("max_split={}", size_label(b)));
        }
        if let Some(d) = self.roundup_power2_divisions {
            parts.push(format!("roundup_power2={d}"));
        }
        if let Some(g) = self.garbage_collection_threshold {
            parts.push(format!("gc_threshold={g}"));
        }
        if let Some(f) = self.memory_fraction {
            parts.push(format!("fraction={f}"));
        }
        parts.join(",")
    }

    /// Parses `key=value[,key=value…]`; the error is the reason, for the caller's sentence.
    fn parse(text: &str) -> std::result::Result<CachingOptions, String> {
        let mut o = CachingOptions::default();
        for item in text.split(',') {
            let item = item.trim();
            let Some((key, value)) = item.split_once('=') else {
                return Err(format!("'{item}' is not key=value"));
            };
            let (key, value) = (key.trim(), value.trim());
            let fraction = |what: &str, lo_open: bool| -> std::result::Result<f64, String> {
                let v: f64 = value
                    .parse()
                    .map_err(|_| format!("{what} must be a number, not '{value}'"))?;
                let ok = if lo_open {
                    v > 0.0 && v < 1.0
                } else {
                    v > 0.0 && v <= 1.0
                };
                if !ok {
                    return Err(format!(
                        "{what} must be in (0, {}, not {value}",
                        if lo_open { "1)" } else { "1]" }
                    ));
                }
                Ok(v)
            };
            match key {
                "max_split" | "max_split_size" => {
                    let bytes = parse_bytes(value).map_err(|e| format!("max_split: {e}"))?;
                    // PyTorch refuses max_split_size_mb <= 20 (CUDAAllocatorConfig.cpp):
                    // smaller values would make the 20 MiB shared segments "oversize" yet split.
                    if bytes <= LARGE_BUFFER {
                        return Err(format!(
                            "max_split must be more than {}, as PyTorch requires",
                            format_bytes(LARGE_BUFFER)
                        ));
                    }
                    o.max_split = Some(bytes);
                }
                "roundup_power2" | "roundup_power2_divisions" => {
                    let d: u64 = value.parse().map_err(|_| {
                        format!("roundup_power2 must be a whole number, not '{value}'")
                    })?;
                    // CUDAAllocatorConfig.cpp: "For roundups, the divisions has to be power of 2".
                    if d == 0 || !d.is_power_of_two() {
                        return Err(format!(
                            "roundup_power2 must be a power of two, as PyTorch requires, not {d}"
                        ));
                    }
                    o.roundup_power2_divisions = Some(d);
                }
                "gc_threshold" | "garbage_collection_threshold" => {
                    o.garbage_collection_threshold = Some(fraction("gc_threshold", true)?);
                }
                "fraction" | "memory_fraction" => {
                    o.memory_fraction = Some(fraction("fraction", false)?);
                }
                _ => {
                    return Err(format!(
                        "the options are max_split, roundup_power2, gc_threshold and fraction, not '{key}'"
                    ))
                }
            }
        }
        // garbage_collect_cached_blocks runs only when a fraction is set (`set_fraction`).
        if o.garbage_collection_threshold.is_some() && o.memory_fraction.is_none() {
            return Err(
                "gc_threshold acts only with a memory fraction, as in PyTorch: add fraction=<0..1>"
                    .into(),
            );
        }
        Ok(o)
    }
}

/// Which allocator, as `HEADROOM_ALLOCATOR` names it.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum AllocatorSpec {
    /// One driver allocation and free per buffer.
    Direct,
    /// PyTorch's native caching allocator with its settings.
    Caching(CachingOptions),
    /// The driver's stream-ordered pool.
    Pool,
    /// PyTorch's caching allocator with `expandable_segments:True`.
    Expandable(CachingOptions),
}

const SPEC_HELP: &str = "use direct, caching, caching:max_split=<size> (e.g. caching:max_split=128MiB, with roundup_power2=<n>, gc_threshold=<0..1> and fraction=<0..1> after commas), pool, expandable or expandable:<the same options>";

impl AllocatorSpec {
    /// The five allocators the shootout compares (with a 128 MiB max split size, a value
    /// commonly suggested for `max_split_size_mb`).
    pub fn all() -> Vec<AllocatorSpec> {
        vec![
            AllocatorSpec::Direct,
            AllocatorSpec::Caching(CachingOptions::default()),
            AllocatorSpec::Caching(CachingOptions::max_split(128 << 20)),
            AllocatorSpec::Pool,
            AllocatorSpec::Expandable(CachingOptions::default()),
        ]
    }

    /// Parses `direct`, `pool`, `caching[:options]` or `expandable[:options]`, where options
    /// are `max_split=<size>`, `roundup_power2=<n>`, `gc_threshold=<x>`, `fraction=<x>`,
    /// comma-separated (PyTorch's long names are accepted too).
    pub fn parse(text: &str) -> Result<AllocatorSpec> {
        let t = text.trim();
        let bad = |why: String| invalid(format!("'{text}' is not an allocator{why}: {SPEC_HELP}"));
        let (head, option) = match t.split_once(':') {
            Some((h, o)) => (h.trim(), Some(o.trim())),
            None => (t, None),
        };
        let options = |o: Option<&str>| match o {
            None => Ok(CachingOptions::default()),
            Some(o) => CachingOptions::parse(o).map_err(|why| bad(format!(" ({why})"))),
        };
        match (head, option) {
            ("direct", None) => Ok(AllocatorSpec::Direct),
            ("pool", None) => Ok(AllocatorSpec::Pool),
            ("expandable", o) => Ok(AllocatorSpec::Expandable(options(o)?)),
            ("caching", o) => Ok(AllocatorSpec::Caching(options(o)?)),
            _ => Err(bad(String::new())),
        }
    }

    /// `HEADROOM_ALLOCATOR`, parsed; unset or empty means None (the backend's own allocator).
    pub fn from_env() -> Result<Option<AllocatorSpec>> {
        match std::env::var("HEADROOM_ALLOCATOR") {
            Ok(v) if !v.trim().is_empty() => AllocatorSpec::parse(&v)
                .map(Some)
                .map_err(|e| invalid(format!("HEADROOM_ALLOCATOR: {e}"))),
            _ => Ok(None),
        }
    }

    /// A piece of a case id: letters, digits, '-' and '.' only (`caching-max-split-128MiB`).
    pub fn id(&self) -> String {
        self.to_string()
            .chars()
            .map(|c| match c {
                ':' | ',' | '=' | '_' => '-',
                c => c,
            })
            .collect()
    }

    /// The allocator on `space`.
    pub fn build(&self, space: Box<dyn AddressSpace>) -> Box<dyn Allocator> {
        match *self {
            AllocatorSpec::Direct => Box::new(direct::Direct::new(space)),
            AllocatorSpec::Caching(o) => Box::new(caching::Caching::new(space, o)),
            AllocatorSpec::Pool => Box::new(pool::Pool::new(space)),
            AllocatorSpec::Expandable(o) => Box::new(expandable::Expandable::new(space, o)),
        }
    }
}

impl fmt::Display for AllocatorSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let with = |f: &mut fmt::Formatter<'_>, head: &str, o: &CachingOptions| {
            let opts = o.spec_text();
            if opts.is_empty() {
                f.write_str(head)
            } else {
                write!(f, "{head}:{opts}")
            }
        };
        match self {
            AllocatorSpec::Direct => f.write_str("direct"),
            AllocatorSpec::Caching(o) => with(f, "caching", o),
            AllocatorSpec::Pool => f.write_str("pool"),
            AllocatorSpec::Expandable(o) => with(f, "expandable", o),
        }
    }
}

/// `128MiB`, `1GiB`, `1536KiB`, or bytes: the largest binary unit that divides exactly, so a
/// label parses back to the same size.
pub fn size_label(bytes: u64) -> String {
    for (shift, unit) in [(40, "TiB"), (30, "GiB"), (20, "MiB"), (10, "KiB")] {
        if bytes >= 1 << shift && bytes % (1 << shift) == 0 {
            return format!("{}{unit}", bytes >> shift);
        }
    }
    bytes.to_string()
}

/// The out-of-memory error of an allocator whose driver refused, with the sizes PyTorch's
/// message gives: "Tried to allocate" the allocation size (`get_allocation_size` of the
/// rounded request: a 1.5 MiB tensor reads "Tried to allocate 20.00 MiB"), the allocated
/// bytes (block sizes) and the reserved bytes.
pub(crate) fn oom(alloc_size: u64, stats: &AllocatorStats, capacity: u64, source: String) -> Error {
    Error::OutOfMemory(OutOfMemory {
        requested: alloc_size,
        allocated: stats.allocated,
        reserved: stats.reserved,
        budget: Some(capacity),
        source,
        tag: "a request".into(),
    })
}

/// A driver failure that is not a refusal.
pub(crate) fn driver_error(what: &str, e: SpaceError) -> Error {
    Error::Cuda(format!("{what}: {e}"))
}

/// Counters shared by the allocators: requested, allocated (= active) and reserved with their
/// peaks.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct Counters {
    pub requested: u64,
    pub allocated: u64,
    pub peak_requested: u64,
    pub peak_allocated: u64,
    pub peak_reserved: u64,
    pub live: u64,
    pub retries: u64,
    pub ooms: u64,
}

impl Counters {
    /// A block of `size` bytes handed out for a request of `requested`.
    pub fn on_alloc(&mut self, requested: u64, size: u64, reserved: u64) {
        self.requested += requested;
        self.allocated += size;
        self.live += 1;
        self.peak_requested = self.peak_requested.max(self.requested);
        self.peak_allocated = self.peak_allocated.max(self.allocated);
        self.peak_reserved = self.peak_reserved.max(reserved);
    }
    pub fn on_free(&mut self, requested: u64, size: u64) {
        debug_assert!(self.requested >= requested && self.allocated >= size && self.live > 0);
        self.requested -= requested;
        self.allocated -= size;
        self.live -= 1;
    }
    pub fn on_reserve(&mut self, reserved: u64) {
        self.peak_reserved = self.peak_reserved.max(reserved);
    }
    pub fn reset_peaks(&mut self, reserved: u64) {
        self.peak_requested = self.requested;
        self.peak_allocated = self.allocated;
        self.peak_reserved = reserved;
    }
    pub fn stats(&self, reserved: u64, space: &dyn AddressSpace) -> AllocatorStats {
        AllocatorStats {
            requested: self.requested,
            allocated: self.allocated,
            active: self.allocated,
            reserved,
            peak_requested: self.peak_requested,
            peak_allocated: self.peak_allocated,
            peak_active: self.peak_allocated,
            peak_reserved: self.peak_reserved,
            driver_calls: space.calls(),
            live: self.live,
            retries: self.retries,
            ooms: self.ooms,
        }
    }
}
