//! The driver underneath an allocator: whole segments (`cuMemAlloc`), reserved virtual address
//! space with physical pages mapped into it (`cuMemAddressReserve` / `cuMemCreate` /
//! `cuMemMap`), and the driver's stream-ordered pool (`cuMemAllocAsync`).
//!
//! [`SimulatedSpace`] is a CPU model with a capacity (the card's memory, or a budget standing in
//! for a smaller card): it hands out fake device addresses, refuses physical memory beyond its
//! capacity, and counts the driver calls each operation would make, so every allocator is tested
//! and compared without a GPU. [`DriverSpace`](super::driver::DriverSpace) is the same
//! interface on the real driver.

use std::collections::{BTreeMap, HashMap};

use serde::{Deserialize, Serialize};

use super::arena::{Arena, PoolKind};
use super::{round_size, SMALL_SIZE};

/// What a driver operation can report.
#[derive(Debug, Clone, PartialEq)]
pub enum SpaceError {
    /// Not enough physical memory: the capacity (or the device) refused `requested` bytes.
    OutOfMemory {
        requested: u64,
        used: u64,
        capacity: u64,
    },
    /// Any other driver failure, or a misuse of the space (a bug in an allocator).
    Driver(String),
}

impl std::fmt::Display for SpaceError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        use crate::memory::format_bytes as b;
        match self {
            SpaceError::OutOfMemory {
                requested,
                used,
                capacity,
            } => write!(
                f,
                "the device refused {} ({} of {} in use)",
                b(*requested),
                b(*used),
                b(*capacity)
            ),
            SpaceError::Driver(m) => f.write_str(m),
        }
    }
}

pub type SpaceResult<T> = std::result::Result<T, SpaceError>;

/// Driver API calls made so far, by kind. A refused call counts: it costs the time of a call.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DriverCalls {
    /// `cuMemAlloc` and `cuMemFree`.
    pub segment: u64,
    /// `cuMemAddressReserve`, `cuMemCreate`, `cuMemMap`, `cuMemSetAccess`, `cuMemUnmap`,
    /// `cuMemRelease`, `cuMemAddressFree`.
    pub virtual_memory: u64,
    /// `cuMemAllocAsync`, `cuMemFreeAsync`, `cuMemPoolTrimTo`.
    pub pool: u64,
}

impl DriverCalls {
    pub fn total(&self) -> u64 {
        self.segment + self.virtual_memory + self.pool
    }
}

/// The driver operations an allocator needs. Addresses are device addresses (fake ones in the
/// simulation); sizes of `map`/`unmap` are multiples of [`AddressSpace::granularity`].
pub trait AddressSpace: Send {
    /// `simulated` or `cuda`.
    fn kind(&self) -> &'static str;
    /// Physical bytes this space may hand out (the card's memory, or the budget).
    fn capacity(&self) -> u64;
    /// Physical bytes held now: segments, mapped pages, and what the pool holds.
    fn used(&self) -> u64;
    /// The physical page size of `map` (2 MiB on current GPUs).
    fn granularity(&self) -> u64;
    fn calls(&self) -> DriverCalls;

    /// A whole segment of `size` bytes (`cuMemAlloc`).
    fn alloc_segment(&mut self, size: u64) -> SpaceResult<u64>;
    fn free_segment(&mut self, addr: u64, size: u64) -> SpaceResult<()>;

    /// Virtual address space only; holds no physical memory (`cuMemAddressReserve`).
    fn reserve(&mut self, size: u64) -> SpaceResult<u64>;
    /// Back `[addr, addr + size)` of a reservation with physical pages, one per granule
    /// (`cuMemCreate` + `cuMemMap` each, then one `cuMemSetAccess`). One handle per page, as
    /// PyTorch's ExpandableSegment does, because a mapping can only be unmapped whole.
    fn map(&mut self, addr: u64, size: u64) -> SpaceResult<()>;
    /// Give the pages of `[addr, addr + size)` back (`cuMemUnmap` + `cuMemRelease` each).
    fn unmap(&mut self, addr: u64, size: u64) -> SpaceResult<()>;
    /// Return a reservation with nothing mapped in it (`cuMemAddressFree`).
    fn unreserve(&mut self, addr: u64, size: u64) -> SpaceResult<()>;

    /// An allocation from the driver's stream-ordered pool (`cuMemAllocAsync`).
    fn pool_alloc(&mut self, size: u64, stream: u32) -> SpaceResult<u64>;
    fn pool_free(&mut self, addr: u64, stream: u32) -> SpaceResult<()>;
    /// Release what the pool holds but does not use (`cuMemPoolTrimTo(pool, 0)`).
    fn pool_trim(&mut self) -> SpaceResult<()>;
    /// Bytes the pool holds from the device (`CU_MEMPOOL_ATTR_RESERVED_MEM_CURRENT`).
    fn pool_reserved(&self) -> SpaceResult<u64>;
}

/// Where fake device addresses start: far from 0 so that a zero address is never valid.
const SIM_BASE: u64 = 1 << 40;
/// Fake virtual addresses are 2 MiB aligned, like the driver's large allocations.
const SIM_ALIGN: u64 = 2 << 20;

/// A CPU model of a device's memory. Physical memory is one counter against the capacity: the
/// driver's own physical placement never fragments here, so every refusal is the allocator's
/// doing (on a real card, `cuMemAlloc` can also fail for the driver's own reasons).
#[derive(Debug)]
pub struct SimulatedSpace {
    capacity: u64,
    granularity: u64,
    used: u64,
    peak_used: u64,
    next_va: u64,
    calls: DriverCalls,
    segments: HashMap<u64, u64>,
    reservations: BTreeMap<u64, u64>,
    /// Mapped page -> its reservation.
    pages: BTreeMap<u64, u64>,
    pool: PoolModel,
}

impl SimulatedSpace {
    /// A device of `capacity` bytes with 2 MiB pages (the granularity of current GPUs).
    pub fn new(capacity: u64) -> Self {
        Self::with_granularity(capacity, 2 << 20)
    }

    pub fn with_granularity(capacity: u64, granularity: u64) -> Self {
        assert!(
            granularity.is_power_of_two(),
            "bug: granularity {granularity}"
        );
        SimulatedSpace {
            capacity,
            granularity,
            used: 0,
            peak_used: 0,
            next_va: SIM_BASE,
            calls: DriverCalls::default(),
            segments: HashMap::new(),
            reservations: BTreeMap::new(),
            pages: BTreeMap::new(),
            pool: PoolModel::new(granularity),
        }
    }

    /// The most physical memory held at once.
    pub fn peak_used(&self) -> u64 {
        self.peak_used
    }

    fn take_va(&mut self, size: u64) -> u64 {
        let addr = self.next_va;
        self.next_va += size.max(1).div_ceil(SIM_ALIGN) * SIM_ALIGN;
        addr
    }

    fn take_physical(&mut self, bytes: u64) -> SpaceResult<()> {
        if self.used + bytes > self.capacity {
            return Err(SpaceError::OutOfMemory {
                requested: bytes,
                used: self.used,
                capacity: self.capacity,
            });
        }
        self.used += bytes;
        self.peak_used = self.peak_used.max(self.used);
        Ok(())
    }

    fn give_physical(&mut self, bytes: u64) {
        debug_assert!(self.used >= bytes, "bug: gave back more than taken");
        self.used -= bytes;
    }

    fn misuse(what: String) -> SpaceError {
        SpaceError::Driver(format!("bug in an allocator: {what}"))
    }
}

impl AddressSpace for SimulatedSpace {
    fn kind(&self) -> &'static str {
        "simulated"
    }
    fn capacity(&self) -> u64 {
        self.capacity
    }
    fn used(&self) -> u64 {
        self.used
    }
    fn granularity(&self) -> u64 {
        self.granularity
    }
    fn calls(&self) -> DriverCalls {
        self.calls
    }

    fn alloc_segment(&mut self, size: u64) -> SpaceResult<u64> {
        self.calls.segment += 1;
        if size == 0 {
            return Err(Self::misuse("a segment of 0 bytes".into()));
        }
        self.take_physical(size)?;
        let addr = self.take_va(size);
        self.segments.insert(addr, size);
        Ok(addr)
    }

    fn free_segment(&mut self, addr: u64, size: u64) -> SpaceResult<()> {
        self.calls.segment += 1;
        match self.segments.remove(&addr) {
            Some(s) if s == size => {
                self.give_physical(size);
                Ok(())
            }
            Some(s) => {
                self.segments.insert(addr, s);
                Err(Self::misuse(format!(
                    "freed the segment at {addr:#x} as {size} bytes; it has {s}"
                )))
            }
            None => Err(Self::misuse(format!(
                "freed {addr:#x}, which is no segment"
            ))),
        }
    }

    fn reserve(&mut self, size: u64) -> SpaceResult<u64> {
        self.calls.virtual_memory += 1;
        if size == 0 || size % self.granularity != 0 {
            return Err(Self::misuse(format!("reserved {size} bytes")));
        }
        let addr = self.take_va(size);
        self.reservations.insert(addr, size);
        Ok(addr)
    }

    fn map(&mut self, addr: u64, size: u64) -> SpaceResult<()> {
        let g = self.granularity;
        if size == 0 || size % g != 0 || addr % g != 0 {
            return Err(Self::misuse(format!("mapped {size} bytes at {addr:#x}")));
        }
        let Some((&base, &len)) = self.reservations.range(..=addr).next_back() else {
            return Err(Self::misuse(format!(
                "mapped {addr:#x} outside any reservation"
            )));
        };
        if addr + size > base + len {
            return Err(Self::misuse(format!(
                "mapped past the end of the reservation at {base:#x}"
            )));
        }
        if self.pages.range(addr..addr + size).next().is_some() {
            return Err(Self::misuse(format!("mapped {addr:#x} twice")));
        }
        // One cuMemCreate + cuMemMap per page; on a refusal, what was mapped of this call is
        // unmapped again (as the real space does), and the refused cuMemCreate still counts.
        for i in 0..size / g {
            self.calls.virtual_memory += 1;
            if let Err(e) = self.take_physical(g) {
                for j in 0..i {
                    self.pages.remove(&(addr + j * g));
                    self.give_physical(g);
                    self.calls.virtual_memory += 2;
                }
                return Err(e);
            }
            self.calls.virtual_memory += 1;
            self.pages.insert(addr + i * g, base);
        }
        self.calls.virtual_memory += 1; // cuMemSetAccess over the range
        Ok(())
    }

    fn unmap(&mut self, addr: u64, size: u64) -> SpaceResult<()> {
        let g = self.granularity;
        if size % g != 0 || addr % g != 0 {
            return Err(Self::misuse(format!("unmapped {size} bytes at {addr:#x}")));
        }
        if self.pages.range(addr..addr + size).count() as u64 != size / g {
            return Err(Self::misuse(format!(
                "unmapped {size} bytes at {addr:#x}, not all of them mapped"
            )));
        }
        for i in 0..size / g {
            self.pages.remove(&(addr + i * g));
            self.give_physical(g);
            self.calls.virtual_memory += 2;
        }
        Ok(())
    }

    fn unreserve(&mut self, addr: u64, size: u64) -> SpaceResult<()> {
        self.calls.virtual_memory += 1;
        if self.reservations.get(&addr) != Some(&size) {
            return Err(Self::misuse(format!(
                "unreserved {size} bytes at {addr:#x}"
            )));
        }
        if self.pages.range(addr..addr + size).next().is_some() {
            return Err(Self::misuse(format!(
                "unreserved {addr:#x} with pages still mapped"
            )));
        }
        self.reservations.remove(&addr);
        Ok(())
    }

    fn pool_alloc(&mut self, size: u64, stream: u32) -> SpaceResult<u64> {
        self.calls.pool += 1;
        // The model's physical memory lives in this space; split the borrow.
        let mut pool = std::mem::take(&mut self.pool);
        let r = pool.alloc(self, size, stream);
        self.pool = pool;
        r
    }

    fn pool_free(&mut self, addr: u64, stream: u32) -> SpaceResult<()> {
        self.calls.pool += 1;
        let mut pool = std::mem::take(&mut self.pool);
        let r = pool.free(addr, stream);
        self.pool = pool;
        r
    }

    fn pool_trim(&mut self) -> SpaceResult<()> {
        self.calls.pool += 1;
        let freed = self.pool.trim();
        self.give_physical(freed);
        Ok(())
    }

    fn pool_reserved(&self) -> SpaceResult<u64> {
        Ok(self.pool.reserved())
    }
}

/// A model of the driver's stream-ordered pool, whose policy NVIDIA does not document. What the
/// model assumes, from the CUDA programming guide's "Stream Ordered Memory Allocator" chapter:
/// - the pool is built on the virtual memory API, so a large allocation can be backed by any
///   free physical pages the pool holds: large requests (> 1 MiB here) cost whole pages and
///   never fragment;
/// - small requests (<= 1 MiB, rounded to 512 bytes) are packed into 2 MiB pages, best fit;
/// - freed memory stays in the pool (headroom sets the release threshold to the maximum, see
///   `device::default_pool`) until a trim; when the pool cannot grow, the driver releases what
///   the pool holds unused and retries once before failing.
/// - reuse is per stream (cross-stream reuse needs event dependencies the traces do not have).
#[derive(Debug, Default)]
struct PoolModel {
    page: u64,
    /// Pages the pool holds that back nothing.
    free_pages: u64,
    /// Pages backing live large allocations.
    large_pages: u64,
    /// Small requests packed into 2 MiB pages; each arena segment is one page.
    small: Arena,
    /// Live allocations: address -> (pages if large, stream).
    live_large: HashMap<u64, u64>,
}

impl PoolModel {
    fn new(page: u64) -> Self {
        PoolModel {
            page,
            ..Default::default()
        }
    }

    fn reserved(&self) -> u64 {
        (self.free_pages + self.large_pages) * self.page + self.small.total_segment_bytes()
    }

    /// Physical pages for the pool: its free pages first, then the device. (The driver's
    /// trim-and-retry on failure changes nothing in this model: free pages are used first.)
    fn take_pages(&mut self, space: &mut SimulatedSpace, pages: u64) -> SpaceResult<()> {
        let from_pool = pages.min(self.free_pages);
        let extra = (pages - from_pool) * self.page;
        if extra > 0 {
            space.take_physical(extra)?;
        }
        self.free_pages -= from_pool;
        Ok(())
    }

    fn alloc(&mut self, space: &mut SimulatedSpace, size: u64, stream: u32) -> SpaceResult<u64> {
        let size = round_size(size);
        if size > SMALL_SIZE {
            let pages = size.div_ceil(self.page);
            self.take_pages(space, pages)?;
            self.large_pages += pages;
            let addr = space.take_va(pages * self.page);
            self.live_large.insert(addr, pages);
            return Ok(addr);
        }
        if let Some((addr, _)) = self.small.best_fit(stream, PoolKind::Small, size) {
            return Ok(self.small.take(addr, size, size, true));
        }
        self.take_pages(space, 1)?;
        let addr = space.take_va(self.page);
        self.small
            .add_segment(addr, self.page, stream, PoolKind::Small);
        Ok(self.small.take(addr, size, size, true))
    }

    fn free(&mut self, addr: u64, _stream: u32) -> SpaceResult<()> {
        if let Some(pages) = self.live_large.remove(&addr) {
            self.large_pages -= pages;
            self.free_pages += pages;
            return Ok(());
        }
        if self.small.is_live(addr) {
            let merged = self.small.release(addr);
            // A small page that holds nothing goes back to the pool's free pages.
            if let Some(seg) = self.small.whole_free_segment(merged) {
                self.small.remove_segment(seg);
                self.free_pages += 1;
            }
            return Ok(());
        }
        Err(SimulatedSpace::misuse(format!(
            "pool freed {addr:#x}, which it did not allocate"
        )))
    }

    /// Releases every unused page; returns the bytes given back to the device.
    fn trim(&mut self) -> u64 {
        let freed = self.free_pages * self.page;
        self.free_pages = 0;
        freed
    }
}
