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
//! "Allocated" is the bytes the caller asked for (not rounded), as in [`crate::memory`];
//! "reserved" is what the allocator holds from the driver.

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
pub mod pool;
pub mod space;
pub mod trace;

pub use space::{AddressSpace, DriverCalls, SimulatedSpace, SpaceError};
pub use trace::{replay, AllocatorMetrics, OomEvent, Trace, TraceEvent, TraceRecorder};

// The size classes of PyTorch's native caching allocator, c10/cuda/CUDACachingAllocator.cpp
// (constants kMinBlockSize, kSmallSize, kSmallBuffer, kMinLargeAlloc, kRoundLarge, and
// kLargeBuffer in c10/core/AllocatorConfig.h).

/// Every size is rounded up to a multiple of 512 bytes.
pub const MIN_BLOCK_SIZE: u64 = 512;
/// The largest "small" request: 1 MiB.
pub const SMALL_SIZE: u64 = 1 << 20;
/// Small requests are packed into 2 MiB segments.
pub const SMALL_BUFFER: u64 = 2 << 20;
/// Requests below 10 MiB are served from 20 MiB segments.
pub const MIN_LARGE_ALLOC: u64 = 10 << 20;
/// The segment mid-size requests share; also the tolerance by which a request at or above the
/// max split size may take a larger cached block.
pub const LARGE_BUFFER: u64 = 20 << 20;
/// Larger requests get a segment of their own, rounded up to 2 MiB.
pub const ROUND_LARGE: u64 = 2 << 20;

/// PyTorch's `round_size` (without `roundup_power2_divisions`): at least 512 bytes, a multiple
/// of 512.
pub fn round_size(size: u64) -> u64 {
    size.max(1).div_ceil(MIN_BLOCK_SIZE) * MIN_BLOCK_SIZE
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

/// A live allocation.
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

/// An allocator's counters, in the words of `torch.cuda.memory_stats`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AllocatorStats {
    /// Bytes of live requests.
    pub allocated: u64,
    /// Bytes held from the driver (segments, mapped pages, the pool's reservation).
    pub reserved: u64,
    pub peak_allocated: u64,
    pub peak_reserved: u64,
    pub driver_calls: DriverCalls,
    /// Live allocations.
    pub live: u64,
    /// Times a failed driver allocation was retried after releasing cached memory.
    pub retries: u64,
    /// Allocations refused.
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

/// Which allocator, as `HEADROOM_ALLOCATOR` names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum AllocatorSpec {
    /// One driver allocation and free per buffer.
    Direct,
    /// PyTorch's native caching allocator; `max_split` is `max_split_size_mb` in bytes.
    Caching { max_split: Option<u64> },
    /// The driver's stream-ordered pool.
    Pool,
    /// One growing segment per stream (PyTorch's `expandable_segments:True`).
    Expandable,
}

impl AllocatorSpec {
    /// The five allocators the shootout compares (with a 128 MiB max split size, a value
    /// commonly suggested for `max_split_size_mb`).
    pub fn all() -> Vec<AllocatorSpec> {
        vec![
            AllocatorSpec::Direct,
            AllocatorSpec::Caching { max_split: None },
            AllocatorSpec::Caching {
                max_split: Some(128 << 20),
            },
            AllocatorSpec::Pool,
            AllocatorSpec::Expandable,
        ]
    }

    /// Parses `direct`, `caching`, `caching:max_split=128MiB`, `pool` or `expandable`.
    pub fn parse(text: &str) -> Result<AllocatorSpec> {
        let t = text.trim();
        let bad = |why: String| {
            invalid(format!(
                "'{text}' is not an allocator{why}: use direct, caching, caching:max_split=<size> (e.g. caching:max_split=128MiB), pool or expandable"
            ))
        };
        let (head, option) = match t.split_once(':') {
            Some((h, o)) => (h.trim(), Some(o.trim())),
            None => (t, None),
        };
        match (head, option) {
            ("direct", None) => Ok(AllocatorSpec::Direct),
            ("pool", None) => Ok(AllocatorSpec::Pool),
            ("expandable", None) => Ok(AllocatorSpec::Expandable),
            ("caching", None) => Ok(AllocatorSpec::Caching { max_split: None }),
            ("caching", Some(opt)) => {
                let Some(value) = opt.strip_prefix("max_split=") else {
                    return Err(bad(format!(
                        " (caching's only option is max_split, not '{opt}')"
                    )));
                };
                let bytes = parse_bytes(value).map_err(|e| bad(format!(" (max_split: {e})")))?;
                // PyTorch refuses max_split_size_mb <= 20 (CUDAAllocatorConfig.cpp): smaller
                // values would make the 20 MiB shared segments "oversize" yet split.
                if bytes <= LARGE_BUFFER {
                    return Err(bad(format!(
                        " (max_split must be more than {}, as PyTorch requires)",
                        format_bytes(LARGE_BUFFER)
                    )));
                }
                Ok(AllocatorSpec::Caching {
                    max_split: Some(bytes),
                })
            }
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

    /// A piece of a case id: no ':' or '=' (`caching-max-split-128MiB`).
    pub fn id(&self) -> String {
        match self {
            AllocatorSpec::Caching { max_split: Some(b) } => {
                format!("caching-max-split-{}", size_label(*b))
            }
            other => other.to_string(),
        }
    }

    /// The allocator on `space`.
    pub fn build(&self, space: Box<dyn AddressSpace>) -> Box<dyn Allocator> {
        match *self {
            AllocatorSpec::Direct => Box::new(direct::Direct::new(space)),
            AllocatorSpec::Caching { max_split } => {
                Box::new(caching::Caching::new(space, max_split))
            }
            AllocatorSpec::Pool => Box::new(pool::Pool::new(space)),
            AllocatorSpec::Expandable => Box::new(expandable::Expandable::new(space)),
        }
    }
}

impl fmt::Display for AllocatorSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AllocatorSpec::Direct => f.write_str("direct"),
            AllocatorSpec::Caching { max_split: None } => f.write_str("caching"),
            AllocatorSpec::Caching { max_split: Some(b) } => {
                write!(f, "caching:max_split={}", size_label(*b))
            }
            AllocatorSpec::Pool => f.write_str("pool"),
            AllocatorSpec::Expandable => f.write_str("expandable"),
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

/// The out-of-memory error of an allocator whose driver refused.
pub(crate) fn oom(requested: u64, stats: &AllocatorStats, capacity: u64, source: String) -> Error {
    Error::OutOfMemory(OutOfMemory {
        requested,
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

/// Counters shared by the allocators: allocated and reserved with their peaks.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct Counters {
    pub allocated: u64,
    pub peak_allocated: u64,
    pub peak_reserved: u64,
    pub live: u64,
    pub retries: u64,
    pub ooms: u64,
}

impl Counters {
    pub fn on_alloc(&mut self, requested: u64, reserved: u64) {
        self.allocated += requested;
        self.live += 1;
        self.peak_allocated = self.peak_allocated.max(self.allocated);
        self.peak_reserved = self.peak_reserved.max(reserved);
    }
    pub fn on_free(&mut self, requested: u64) {
        debug_assert!(self.allocated >= requested && self.live > 0);
        self.allocated -= requested;
        self.live -= 1;
    }
    pub fn on_reserve(&mut self, reserved: u64) {
        self.peak_reserved = self.peak_reserved.max(reserved);
    }
    pub fn reset_peaks(&mut self, reserved: u64) {
        self.peak_allocated = self.allocated;
        self.peak_reserved = reserved;
    }
    pub fn stats(&self, reserved: u64, space: &dyn AddressSpace) -> AllocatorStats {
        AllocatorStats {
            allocated: self.allocated,
            reserved,
            peak_allocated: self.peak_allocated,
            peak_reserved: self.peak_reserved,
            driver_calls: space.calls(),
            live: self.live,
            retries: self.retries,
            ooms: self.ooms,
        }
    }
}
