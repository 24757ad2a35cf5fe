//! `expandable`: PyTorch's caching allocator with `expandable_segments:True` (Note [Expandable
//! Segments] and `ExpandableSegment` in c10/cuda/CUDACachingAllocator.cpp, PyTorch 2.5 to 2.9).
//!
//! Instead of one driver segment per large request, a stream's pool (small or large) takes a
//! reservation of virtual address space, about 1.125 x the device's memory ("1 1/8 the total
//! memory on the GPU", `find_expandable_block`), and maps physical pages into it on demand:
//! 2 MiB pages in the small pool, 20 MiB pages in the large pool (`kSmallBuffer`,
//! `kLargeBuffer`). Blocks tile each segment's whole address range and are free, in use, or
//! unmapped. The rules, function by function:
//! - `get_free_block`: the best fit among mapped free blocks, where a block followed by an
//!   unmapped range counts as the size it could grow to when choosing between candidates;
//!   the max split size rules of `caching` apply;
//! - `should_split`: a block is split whenever 512 bytes or more remain (freed neighbours merge
//!   back into one range, so nothing is stranded);
//! - `find_expandable_block`: the lowest unmapped range of the stream's pool, together with the
//!   free block just before it, whose free and unmapped successors hold the request; else a new
//!   segment (a new reservation);
//! - `map_block`: pages are mapped at the start of that unmapped range, as many as the request
//!   still needs, and merged with the free blocks beside them;
//! - `unmap_block` and `release_cached_blocks`: at `empty_cache` and at the out-of-memory
//!   retry, every free block of every stream and pool gives back the whole pages inside it,
//!   holes in the middle included, and a segment left with nothing mapped is freed;
//! - `release_available_cached_blocks` never frees expandable blocks; garbage collection
//!   (`garbage_collect_cached_blocks`) skips them too, so `gc_threshold` changes nothing here;
//!   a memory fraction caps the mapped bytes.
//!
//! What it buys: after a step frees its activations, the segment's free space is one range
//! again, so a next step with slightly larger tensors tiles into it; and when a request does
//! not fit, the free holes between live tensors are unmapped and their pages mapped where the
//! request goes.
//!
//! Not modelled: handles are mapped per granule of the space (2 MiB), not one per 20 MiB page,
//! so the driver-call counts are those of 2 MiB handles; a failed mapping in the middle of a
//! request unmaps what that one call mapped (PyTorch keeps earlier calls' pages mapped, as here);
//! peer access and IPC of expandable segments.

use std::collections::{BTreeMap, BTreeSet};

use super::arena::PoolKind;
use super::caching::{max_split_allows, pool_of};
use super::{
    driver_error, oom, round_size_with, segment_size, AddressSpace, Allocator, AllocatorStats,
    Block, CachingOptions, Counters, SpaceError, LARGE_BUFFER, MIN_BLOCK_SIZE, SMALL_BUFFER,
};
use crate::error::{Error, Result};
use crate::memory::format_bytes;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Free,
    Live { requested: u64 },
    Unmapped,
}

#[derive(Debug, Clone, Copy)]
struct Blk {
    size: u64,
    /// The start of the segment it lies in.
    segment: u64,
    state: State,
}

#[derive(Debug, Clone, Copy)]
struct Segment {
    stream: u32,
    pool: PoolKind,
    /// Bytes of address space reserved.
    va: u64,
    page: u64,
    mapped: u64,
}

pub struct Expandable {
    space: Box<dyn AddressSpace>,
    options: CachingOptions,
    counters: Counters,
    /// Every block of every segment, by address; they tile each segment's reservation.
    blocks: BTreeMap<u64, Blk>,
    /// Mapped free blocks in PyTorch's size order: (stream, pool, size, address).
    free: BTreeSet<(u32, PoolKind, u64, u64)>,
    /// Unmapped ranges in PyTorch's address order per pool: (pool, stream, address).
    unmapped: BTreeSet<(PoolKind, u32, u64)>,
    segments: BTreeMap<u64, Segment>,
}

impl Expandable {
    pub fn new(space: Box<dyn AddressSpace>, options: CachingOptions) -> Self {
        Expandable {
            space,
            options,
            counters: Counters::default(),
            blocks: BTreeMap::new(),
            free: BTreeSet::new(),
            unmapped: BTreeSet::new(),
            segments: BTreeMap::new(),
        }
    }

    fn mapped(&self) -> u64 {
        self.segments.values().map(|s| s.mapped).sum()
    }

    fn seg(&self, b: &Blk) -> &Segment {
        &self.segments[&b.segment]
    }

    /// Puts a block in place and into the index its state calls for.
    fn insert(&mut self, addr: u64, b: Blk) {
        let s = *self.seg(&b);
        match b.state {
            State::Free => {
                self.free.insert((s.stream, s.pool, b.size, addr));
            }
            State::Unmapped => {
                self.unmapped.insert((s.pool, s.stream, addr));
            }
            State::Live { .. } => {}
        }
        self.blocks.insert(addr, b);
    }

    /// Takes a block out of place and out of its index.
    fn remove(&mut self, addr: u64) -> Blk {
        let b = self.blocks.remove(&addr).expect("bug: no block there");
        let s = *self.seg(&b);
        match b.state {
            State::Free => {
                self.free.remove(&(s.stream, s.pool, b.size, addr));
            }
            State::Unmapped => {
                self.unmapped.remove(&(s.pool, s.stream, addr));
            }
            State::Live { .. } => {}
        }
        b
    }

    /// The block after the one at `addr` in the same segment.
    fn next_of(&self, addr: u64) -> Option<(u64, Blk)> {
        let b = self.blocks[&addr];
        let at = addr + b.size;
        self.blocks
            .get(&at)
            .filter(|n| n.segment == b.segment)
            .map(|n| (at, *n))
    }

    /// The block before the one at `addr` in the same segment.
    fn prev_of(&self, addr: u64) -> Option<(u64, Blk)> {
        let seg = self.blocks[&addr].segment;
        self.blocks
            .range(..addr)
            .next_back()
            .filter(|(_, p)| p.segment == seg)
            .map(|(a, p)| (*a, *p))
    }

    /// PyTorch's `try_merge_blocks` on both sides: a free or unmapped block absorbs neighbours
    /// in the same state. Returns the merged block's address.
    fn merge(&mut self, addr: u64) -> u64 {
        let mut b = self.remove(addr);
        let mut start = addr;
        if let Some((n, nb)) = self.next_of_removed(addr, &b) {
            if nb.state == b.state {
                self.remove(n);
                b.size += nb.size;
            }
        }
        if let Some((p, pb)) = self
            .blocks
            .range(..addr)
            .next_back()
            .filter(|(_, p)| p.segment == b.segment)
            .map(|(a, p)| (*a, *p))
        {
            if pb.state == b.state {
                self.remove(p);
                b.size += pb.size;
                start = p;
            }
        }
        self.insert(start, b);
        start
    }

    fn next_of_removed(&self, addr: u64, b: &Blk) -> Option<(u64, Blk)> {
        let at = addr + b.size;
        self.blocks
            .get(&at)
            .filter(|n| n.segment == b.segment)
            .map(|n| (at, *n))
    }

    /// PyTorch's `get_free_block` with expandable segments.
    fn free_block(&self, stream: u32, pool: PoolKind, size: u64) -> Option<u64> {
        let mut it = self
            .free
            .range((stream, pool, size, 0)..)
            .take_while(|(s, p, _, _)| *s == stream && *p == pool)
            .map(|k| k.3);
        let mut best = it.next()?;
        // "for the purposes of best fit we consider its size to be the size it can expand
        // to": walk on while the next candidate could grow to less.
        let expandable = |a: u64| {
            self.blocks[&a].size
                + self
                    .next_of(a)
                    .filter(|(_, n)| n.state == State::Unmapped)
                    .map_or(0, |(_, n)| n.size)
        };
        for next in it {
            if expandable(next) < expandable(best) {
                best = next;
            } else {
                break;
            }
        }
        max_split_allows(self.options.max_split, size, self.blocks[&best].size).then_some(best)
    }

    /// The page of a pool's segments: 2 MiB small, 20 MiB large, at least the space's
    /// granularity.
    fn page(&self, pool: PoolKind) -> u64 {
        let p = match pool {
            PoolKind::Small => SMALL_BUFFER,
            PoolKind::Large => LARGE_BUFFER,
        };
        let g = self.space.granularity();
        p.div_ceil(g) * g
    }

    /// PyTorch's `find_expandable_block`: the start of a run of free and unmapped blocks that
    /// holds `size`, else a new segment's whole unmapped range.
    fn find_expandable_block(&mut self, stream: u32, pool: PoolKind, size: u64) -> Result<u64> {
        let candidates: Vec<u64> = self
            .unmapped
            .range((pool, stream, 0)..=(pool, stream, u64::MAX))
            .map(|k| k.2)
            .collect();
        for c in candidates {
            let start = match self.prev_of(c) {
                Some((p, pb)) if pb.state == State::Free => p,
                _ => c,
            };
            let (mut at, mut bytes) = (Some(start), 0);
            while bytes < size {
                let Some(a) = at else { break };
                let b = self.blocks[&a];
                if matches!(b.state, State::Live { .. }) {
                    break;
                }
                bytes += b.size;
                at = self.next_of(a).map(|(n, _)| n);
            }
            if bytes >= size {
                return Ok(start);
            }
        }
        let page = self.page(pool);
        let capacity = self.space.capacity();
        let va = (capacity + capacity / 8).max(size).div_ceil(page) * page;
        let addr = self
            .space
            .reserve(va)
            .map_err(|e| driver_error("expandable: reserving address space", e))?;
        self.segments.insert(
            addr,
            Segment {
                stream,
                pool,
                va,
                page,
                mapped: 0,
            },
        );
        self.insert(
            addr,
            Blk {
                size: va,
                segment: addr,
                state: State::Unmapped,
            },
        );
        Ok(addr)
    }

    /// PyTorch's `map_block`: maps whole pages for the first `size` bytes of the unmapped block
    /// at `addr` and merges them with their free neighbours; the merged free block's address,
    /// or None when the device refused.
    fn map_block(&mut self, addr: u64, size: u64) -> Result<Option<u64>> {
        let b = self.blocks[&addr];
        debug_assert_eq!(b.state, State::Unmapped, "bug: mapping a mapped block");
        let page = self.seg(&b).page;
        let bytes = size.div_ceil(page) * page;
        debug_assert!(bytes <= b.size, "bug: mapping past an unmapped range");
        match self.space.map(addr, bytes) {
            Ok(()) => {}
            Err(SpaceError::OutOfMemory { .. }) => return Ok(None),
            Err(e) => return Err(driver_error("expandable: mapping pages", e)),
        }
        self.remove(addr);
        if bytes < b.size {
            self.insert(
                addr + bytes,
                Blk {
                    size: b.size - bytes,
                    segment: b.segment,
                    state: State::Unmapped,
                },
            );
        }
        self.insert(
            addr,
            Blk {
                size: bytes,
                segment: b.segment,
                state: State::Free,
            },
        );
        self.segments.get_mut(&b.segment).expect("bug").mapped += bytes;
        self.counters.on_reserve(self.mapped());
        Ok(Some(self.merge(addr)))
    }

    /// PyTorch's `alloc_block` with expandable segments (`try_allocate_expandable_block`): a
    /// mapped free block of at least `size`, or None when the fraction or the device refused.
    fn alloc_block(&mut self, stream: u32, pool: PoolKind, size: u64) -> Result<Option<u64>> {
        if let Some(max) = self.options.allowed_maximum(self.space.capacity()) {
            if self.mapped() + segment_size(size) > max {
                return Ok(None);
            }
        }
        let mut at = self.find_expandable_block(stream, pool, size)?;
        let b = self.blocks[&at];
        if b.state == State::Unmapped {
            match self.map_block(at, size.min(b.size))? {
                Some(a) => at = a,
                None => return Ok(None),
            }
        }
        while self.blocks[&at].size < size {
            let have = self.blocks[&at].size;
            let Some((next, nb)) = self.next_of(at) else {
                return Err(Error::Invalid(
                    "bug in the expandable allocator: no address space after a free block".into(),
                ));
            };
            if nb.state != State::Unmapped {
                return Err(Error::Invalid(
                    "bug in the expandable allocator: a free block followed by a block that is not unmapped".into(),
                ));
            }
            match self.map_block(next, (size - have).min(nb.size))? {
                Some(a) => at = a,
                None => return Ok(None),
            }
        }
        Ok(Some(at))
    }

    /// PyTorch's `unmap_block`: gives back the whole pages inside the free block at `addr`;
    /// frees the segment when nothing of it stays mapped.
    fn unmap_block(&mut self, addr: u64) -> Result<()> {
        let b = self.blocks[&addr];
        let s = *self.seg(&b);
        let base = b.segment;
        let begin = base + (addr - base).div_ceil(s.page) * s.page;
        let end = base + (addr + b.size - base) / s.page * s.page;
        if begin >= end {
            return Ok(());
        }
        self.space
            .unmap(begin, end - begin)
            .map_err(|e| driver_error("expandable: unmapping pages", e))?;
        self.remove(addr);
        if begin > addr {
            self.insert(
                addr,
                Blk {
                    size: begin - addr,
                    segment: base,
                    state: State::Free,
                },
            );
        }
        if addr + b.size > end {
            self.insert(
                end,
                Blk {
                    size: addr + b.size - end,
                    segment: base,
                    state: State::Free,
                },
            );
        }
        self.insert(
            begin,
            Blk {
                size: end - begin,
                segment: base,
                state: State::Unmapped,
            },
        );
        self.segments.get_mut(&base).expect("bug").mapped -= end - begin;
        let merged = self.merge(begin);
        // `release_expandable_segment`: nothing mapped, nothing in use.
        if merged == base && self.blocks[&merged].size == s.va {
            self.remove(base);
            self.segments.remove(&base);
            self.space
                .unreserve(base, s.va)
                .map_err(|e| driver_error("expandable: freeing address space", e))?;
        }
        Ok(())
    }

    /// PyTorch's `release_cached_blocks` with expandable segments: `unmap_block` on every
    /// free block, large pool first.
    fn release_cached(&mut self) -> Result<()> {
        for pool in [PoolKind::Large, PoolKind::Small] {
            let blocks: Vec<u64> = self
                .free
                .iter()
                .filter(|k| k.1 == pool)
                .map(|k| k.3)
                .collect();
            for addr in blocks {
                self.unmap_block(addr)?;
            }
        }
        Ok(())
    }
}

impl Allocator for Expandable {
    fn name(&self) -> String {
        super::AllocatorSpec::Expandable(self.options).to_string()
    }

    fn allocate(&mut self, requested: u64, stream: u32) -> Result<Block> {
        if requested == 0 {
            return Ok(Block::empty(stream));
        }
        let size = round_size_with(requested, self.options.roundup_power2_divisions);
        let pool = pool_of(size);
        let addr = match self.free_block(stream, pool, size) {
            Some(a) => a,
            None => {
                let mut got = self.alloc_block(stream, pool, size)?;
                if got.is_none() {
                    self.release_cached()?;
                    self.counters.retries += 1;
                    got = self.alloc_block(stream, pool, size)?;
                }
                match got {
                    Some(a) => a,
                    None => {
                        self.counters.ooms += 1;
                        let s = self.stats();
                        return Err(oom(
                            segment_size(size),
                            &s,
                            self.space.capacity(),
                            format!(
                                "expandable segments: {} of pages did not fit after unmapping every free page; {} reserved but unallocated",
                                format_bytes(size.div_ceil(self.page(pool)) * self.page(pool)),
                                format_bytes(s.reserved.saturating_sub(s.allocated))
                            ),
                        ));
                    }
                }
            }
        };
        let b = self.remove(addr);
        if b.size - size >= MIN_BLOCK_SIZE {
            self.insert(
                addr + size,
                Blk {
                    size: b.size - size,
                    segment: b.segment,
                    state: State::Free,
                },
            );
        }
        let held = if b.size - size >= MIN_BLOCK_SIZE {
            size
        } else {
            b.size
        };
        self.insert(
            addr,
            Blk {
                size: held,
                segment: b.segment,
                state: State::Live { requested },
            },
        );
        self.counters.on_alloc(requested, held, self.mapped());
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
        let Some(Blk {
            size,
            state: State::Live { requested },
            ..
        }) = self.blocks.get(&block.addr).copied()
        else {
            return Err(Error::Invalid(format!(
                "expandable: freeing {:#x}, which is not live",
                block.addr
            )));
        };
        let mut b = self.remove(block.addr);
        b.state = State::Free;
        self.insert(block.addr, b);
        self.merge(block.addr);
        self.counters.on_free(requested, size);
        Ok(())
    }

    fn empty_cache(&mut self) -> Result<()> {
        self.release_cached()
    }

    fn stats(&self) -> AllocatorStats {
        self.counters.stats(self.mapped(), self.space.as_ref())
    }

    fn reset_peaks(&mut self) {
        self.counters.reset_peaks(self.mapped());
    }

    fn live_blocks(&self) -> Vec<Block> {
        self.blocks
            .iter()
            .filter_map(|(a, b)| match b.state {
                State::Live { requested } => Some(Block {
                    addr: *a,
                    size: b.size,
                    requested,
                    stream: self.seg(b).stream,
                }),
                _ => None,
            })
            .collect()
    }

    /// Every segment tiled by its blocks, no two neighbours in the same free or unmapped state,
    /// unmapped ranges on page boundaries, the indexes and the mapped bytes in step.
    fn check(&self) -> std::result::Result<(), String> {
        let (mut free, mut unmapped) = (0, 0);
        for (&base, s) in &self.segments {
            let (mut at, mut prev, mut mapped) = (base, None, 0);
            for (&a, b) in self.blocks.range(base..base + s.va) {
                if a != at || b.segment != base {
                    return Err(format!(
                        "expandable: segment {base:#x} has a gap at {at:#x}"
                    ));
                }
                if matches!(b.state, State::Free | State::Unmapped) && prev == Some(b.state) {
                    return Err(format!("expandable: block {a:#x} left unmerged"));
                }
                match b.state {
                    State::Free => {
                        free += 1;
                        if !self.free.contains(&(s.stream, s.pool, b.size, a)) {
                            return Err(format!("expandable: free block {a:#x} not indexed"));
                        }
                    }
                    State::Unmapped => {
                        unmapped += 1;
                        if (a - base) % s.page != 0 || b.size % s.page != 0 {
                            return Err(format!(
                                "expandable: unmapped range {a:#x} is not whole pages"
                            ));
                        }
                        if !self.unmapped.contains(&(s.pool, s.stream, a)) {
                            return Err(format!("expandable: unmapped range {a:#x} not indexed"));
                        }
                    }
                    State::Live { requested } if requested > b.size => {
                        return Err(format!(
                            "expandable: block {a:#x} holds less than was asked"
                        ));
                    }
                    State::Live { .. } => {}
                }
                if b.state != State::Unmapped {
                    mapped += b.size;
                }
                prev = Some(b.state);
                at = a + b.size;
            }
            if at != base + s.va {
                return Err(format!(
                    "expandable: segment {base:#x} not tiled to its end"
                ));
            }
            if mapped != s.mapped {
                return Err(format!(
                    "expandable: segment {base:#x} counts {} mapped, its blocks {}",
                    s.mapped, mapped
                ));
            }
        }
        if free != self.free.len() || unmapped != self.unmapped.len() {
            return Err("expandable: an index holds blocks that do not exist".into());
        }
        if self.blocks.len() as u64
            != self
                .segments
                .keys()
                .map(|&b| self.blocks.range(b..b + self.segments[&b].va).count() as u64)
                .sum::<u64>()
        {
            return Err("expandable: a block lies outside every segment".into());
        }
        Ok(())
    }

    fn space(&self) -> &dyn AddressSpace {
        self.space.as_ref()
    }
}
