//! `caching`: PyTorch's native CUDA caching allocator, on any [`AddressSpace`].
//!
//! The rules, from c10/cuda/CUDACachingAllocator.cpp as of PyTorch 2.5 to 2.9
//! (`DeviceCachingAllocator::malloc`, `round_size`, `get_allocation_size`, `get_free_block`,
//! `should_split`, `garbage_collect_cached_blocks`, `release_available_cached_blocks`,
//! `release_cached_blocks`) and the "Memory management" section of PyTorch's CUDA notes
//! (docs/source/notes/cuda.rst):
//! - a 0-byte request allocates nothing (PyTorch returns a null pointer);
//! - a request is rounded up to a multiple of 512 bytes, or with `roundup_power2_divisions`
//!   to the next of that many equal steps between two powers of two;
//! - requests of at most 1 MiB use the small pool, larger ones the large pool; a cached block is
//!   only reused by requests of its own pool and stream;
//! - the cached block chosen is the best fit: the smallest free block of the pool that holds the
//!   request (lowest address among equals);
//! - without a fitting block, a new segment is allocated: 2 MiB for small requests, 20 MiB for
//!   requests under 10 MiB, else the request rounded up to 2 MiB;
//! - the block handed out is split when the remainder is worth keeping: in the small pool when
//!   it is at least 512 bytes, in the large pool when it is more than 1 MiB *and* the request is
//!   below the max split size; the remainder stays cached as a free block;
//! - freeing a block merges it with its free neighbours in the same segment;
//! - with a max split size (`max_split_size_mb`, which "prevents the native allocator from
//!   splitting blocks larger than this size", cuda.rst): a request below it never takes a cached
//!   block at or above it, and a request at or above it only takes a cached block less than
//!   20 MiB larger than itself. Such "oversize" blocks are never split, so they stay whole
//!   segments that can be returned to the driver;
//! - with a memory fraction, a segment that would take the reserved bytes past fraction x the
//!   device is refused like a driver refusal; with a garbage collection threshold too, before
//!   asking for a segment while more than threshold x that maximum is reserved, the cached
//!   unsplit large-pool segments that have waited at least the average number of free-block
//!   searches are returned, oldest first by that measure, until the excess is reclaimed;
//! - when the driver refuses a new segment: with a max split size, free cached oversize blocks
//!   (the smallest one big enough, else the largest ones until enough is freed) and retry; then
//!   free every cached segment that is entirely unused and retry once more; then report out of
//!   memory. Segments with any block in use cannot be returned: that is the fragmentation.
//!
//! Not modelled: per-size-range `roundup_power2_divisions` lists (one value for all sizes),
//! CUDA graph pools, cross-stream uses (`record_stream`, so "active" equals "allocated"),
//! `pinned_*` host options, and the free-memory callbacks.

use super::arena::{Arena, PoolKind};
use super::{
    driver_error, oom, round_size_with, segment_size, AddressSpace, Allocator, AllocatorStats,
    Block, CachingOptions, Counters, SpaceError, LARGE_BUFFER, MIN_BLOCK_SIZE, SMALL_SIZE,
};
use crate::error::{Error, Result};
use crate::memory::format_bytes;

pub struct Caching {
    space: Box<dyn AddressSpace>,
    arena: Arena,
    options: CachingOptions,
    counters: Counters,
}

/// The pool a rounded request belongs to.
pub(crate) fn pool_of(size: u64) -> PoolKind {
    if size <= SMALL_SIZE {
        PoolKind::Small
    } else {
        PoolKind::Large
    }
}

/// `get_free_block`'s two max-split rules: may a request of `size` take a cached block of
/// `block` bytes?
pub(crate) fn max_split_allows(max_split: Option<u64>, size: u64, block: u64) -> bool {
    let ms = max_split.unwrap_or(u64::MAX);
    // "Do not return an oversized block for a small request".
    if size < ms && block >= ms {
        return false;
    }
    // "Allow oversized block size to be rounded up but within a limit".
    !(size >= ms && block >= size.saturating_add(LARGE_BUFFER))
}

impl Caching {
    pub fn new(space: Box<dyn AddressSpace>, options: CachingOptions) -> Self {
        Caching {
            space,
            arena: Arena::new(),
            options,
            counters: Counters::default(),
        }
    }

    fn gc_on(&self) -> bool {
        self.options.garbage_collection_threshold.is_some()
            && self.options.memory_fraction.is_some()
    }

    /// PyTorch's `get_free_block`: the best fit, unless the max split size forbids it.
    fn free_block(&self, stream: u32, pool: PoolKind, size: u64) -> Option<(u64, u64)> {
        let (addr, block) = self.arena.best_fit(stream, pool, size)?;
        // Blocks are ordered by size, so if the best fit is forbidden every larger one is too.
        max_split_allows(self.options.max_split, size, block).then_some((addr, block))
    }

    /// PyTorch's `should_split`.
    fn should_split(&self, pool: PoolKind, block: u64, size: u64) -> bool {
        let remaining = block - size;
        match pool {
            PoolKind::Small => remaining >= MIN_BLOCK_SIZE,
            PoolKind::Large => {
                size < self.options.max_split.unwrap_or(u64::MAX) && remaining > SMALL_SIZE
            }
        }
    }

    /// A new segment from the driver, or the refusal (the memory fraction's or the driver's).
    fn alloc_segment(
        &mut self,
        bytes: u64,
        stream: u32,
        pool: PoolKind,
    ) -> Result<std::result::Result<u64, SpaceError>> {
        let held = self.arena.total_segment_bytes();
        if let Some(max) = self.options.allowed_maximum(self.space.capacity()) {
            if held + bytes > max {
                return Ok(Err(SpaceError::OutOfMemory {
                    requested: bytes,
                    used: held,
                    capacity: max,
                }));
            }
        }
        match self.space.alloc_segment(bytes) {
            Ok(addr) => {
                self.arena.add_segment(addr, bytes, stream, pool);
                self.counters.on_reserve(self.arena.total_segment_bytes());
                Ok(Ok(addr))
            }
            Err(e @ SpaceError::OutOfMemory { .. }) => Ok(Err(e)),
            Err(e) => Err(driver_error("caching: allocating a segment", e)),
        }
    }

    fn release_segment(&mut self, addr: u64) -> Result<()> {
        let seg = self.arena.remove_segment(addr);
        self.space
            .free_segment(addr, seg.size)
            .map_err(|e| driver_error("caching: freeing a segment", e))
    }

    /// PyTorch's `garbage_collect_cached_blocks`: above threshold x the allowed maximum,
    /// return unsplit cached large-pool segments of at least the average age, round after
    /// round, until the excess is reclaimed or nothing more can go.
    fn garbage_collect(&mut self) -> Result<()> {
        let (Some(t), Some(max)) = (
            self.options.garbage_collection_threshold,
            self.options.allowed_maximum(self.space.capacity()),
        ) else {
            return Ok(());
        };
        let threshold = (t * max as f64) as u64;
        let total = self.arena.total_segment_bytes();
        if total <= threshold {
            return Ok(());
        }
        let target = total - threshold;
        let freeable = |a: &Arena| -> Vec<(u64, u64, u64)> {
            a.free_blocks(PoolKind::Large)
                .into_iter()
                .filter(|(addr, _)| a.whole_free_segment(*addr).is_some())
                .map(|(addr, size)| (addr, size, a.gc_age(addr)))
                .collect()
        };
        let first = freeable(&self.arena);
        let mut total_age: u64 = first.iter().map(|b| b.2).sum();
        let mut count = first.len() as u64;
        let mut reclaimed = 0;
        let mut freed = true;
        while reclaimed < target && freed && count > 0 {
            let age_threshold = total_age as f64 / count as f64;
            freed = false;
            // PyTorch does not stop at the target inside a round, so that GC runs less often.
            for (addr, size, age) in freeable(&self.arena) {
                if age as f64 >= age_threshold {
                    self.release_segment(addr)?;
                    freed = true;
                    reclaimed += size;
                    total_age -= age;
                    count -= 1;
                }
            }
        }
        Ok(())
    }

    /// PyTorch's `release_available_cached_blocks`: free cached oversize blocks of this stream
    /// and pool, enough for `size`; false when there are not enough.
    fn release_available(&mut self, stream: u32, pool: PoolKind, size: u64) -> Result<bool> {
        let Some(ms) = self.options.max_split else {
            return Ok(false);
        };
        let key = size.max(ms);
        let oversize: Vec<(u64, u64)> = self
            .arena
            .free_blocks_desc(stream, pool)
            .into_iter()
            .filter(|(a, s)| *s >= ms && self.arena.whole_free_segment(*a).is_some())
            .collect();
        if let Some(&(addr, _)) = oversize.iter().rev().find(|(_, s)| *s >= key) {
            self.release_segment(addr)?;
            return Ok(true);
        }
        let mut released = 0;
        for (addr, s) in oversize {
            if released >= key {
                break;
            }
            self.release_segment(addr)?;
            released += s;
        }
        Ok(released >= key)
    }

    /// PyTorch's `release_cached_blocks`: every segment that is one free block.
    fn release_cached(&mut self) -> Result<()> {
        for addr in self.arena.whole_free_segments() {
            self.release_segment(addr)?;
        }
        Ok(())
    }
}

impl Allocator for Caching {
    fn name(&self) -> String {
        super::AllocatorSpec::Caching(self.options).to_string()
    }

    fn allocate(&mut self, requested: u64, stream: u32) -> Result<Block> {
        if requested == 0 {
            return Ok(Block::empty(stream));
        }
        let size = round_size_with(requested, self.options.roundup_power2_divisions);
        let pool = pool_of(size);
        if self.gc_on() {
            self.arena.count_free_block_call(pool);
        }
        let (addr, block) = match self.free_block(stream, pool, size) {
            Some(found) => found,
            None => {
                if self.gc_on() {
                    self.garbage_collect()?;
                }
                let bytes = segment_size(size);
                let mut got = self.alloc_segment(bytes, stream, pool)?;
                if got.is_err() && self.release_available(stream, pool, size)? {
                    got = self.alloc_segment(bytes, stream, pool)?;
                }
                if got.is_err() {
                    self.release_cached()?;
                    self.counters.retries += 1;
                    got = self.alloc_segment(bytes, stream, pool)?;
                }
                match got {
                    Ok(addr) => (addr, bytes),
                    Err(e) => {
                        self.counters.ooms += 1;
                        let s = self.stats();
                        return Err(oom(
                            bytes,
                            &s,
                            self.space.capacity(),
                            format!(
                                "caching allocator: a {} segment did not fit after freeing the cache: {e}; {} reserved but unallocated",
                                format_bytes(bytes),
                                format_bytes(s.reserved.saturating_sub(s.allocated))
                            ),
                        ));
                    }
                }
            }
        };
        let split = self.should_split(pool, block, size);
        let addr = self.arena.take(addr, size, requested, split);
        let (held, _) = self.arena.live(addr).expect("just taken");
        self.counters
            .on_alloc(requested, held, self.arena.total_segment_bytes());
        Ok(Block {
            addr,
            size: held,
            requested,
            stream,
        })
    }

    fn free(&mut self, block: Block) -> Result<()> {
        if block.is_empty() {
            return Ok(());
        }
        let Some((held, requested)) = self.arena.live(block.addr) else {
            return Err(Error::Invalid(format!(
                "caching: freeing {:#x}, which is not live",
                block.addr
            )));
        };
        self.arena.release(block.addr);
        self.counters.on_free(requested, held);
        Ok(())
    }

    fn empty_cache(&mut self) -> Result<()> {
        self.release_cached()
    }

    fn stats(&self) -> AllocatorStats {
        self.counters
            .stats(self.arena.total_segment_bytes(), self.space.as_ref())
    }

    fn reset_peaks(&mut self) {
        self.counters.reset_peaks(self.arena.total_segment_bytes());
    }

    fn live_blocks(&self) -> Vec<Block> {
        self.arena.live_blocks()
    }

    fn check(&self) -> std::result::Result<(), String> {
        self.arena.check()
    }

    fn space(&self) -> &dyn AddressSpace {
        self.space.as_ref()
    }
}
