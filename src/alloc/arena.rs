//! Blocks inside segments: best-fit search, splitting and merging. The bookkeeping of the
//! caching allocator and the simulated pool's small pages (expandable segments keep their own,
//! with unmapped ranges).
//!
//! A segment is a contiguous range from the driver; it is tiled by blocks, each free or in use.
//! Free blocks are indexed by (stream, pool, size, address), the order of PyTorch's
//! `BlockComparatorSize` (c10/cuda/CUDACachingAllocator.cpp), so the first free block at or
//! above a size is the best fit, and among equals the lowest address.

use std::collections::{BTreeMap, BTreeSet};

use super::Block;

/// PyTorch keeps requests of at most 1 MiB and larger ones in separate pools, so small
/// long-lived tensors do not pin large segments.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum PoolKind {
    Small,
    Large,
}

#[derive(Debug, Clone)]
struct Chunk {
    size: u64,
    /// The address of the segment the chunk belongs to.
    segment: u64,
    /// Bytes the caller asked for; 0 when free.
    requested: u64,
    free: bool,
    /// The pool's `get_free_block` count when the block became free: its age for
    /// `garbage_collection_threshold` is the count now minus this (PyTorch's `gc_count`).
    gc_base: u64,
}

#[derive(Debug, Clone)]
pub struct Segment {
    pub size: u64,
    pub stream: u32,
    pub pool: PoolKind,
}

#[derive(Debug, Default)]
pub struct Arena {
    chunks: BTreeMap<u64, Chunk>,
    free: BTreeSet<(u32, PoolKind, u64, u64)>,
    segments: BTreeMap<u64, Segment>,
    segment_bytes: u64,
    /// `get_free_block` calls per pool (small, large) while garbage collection is on
    /// (PyTorch's `get_free_blocks_call_count`): the clock cached blocks age by.
    free_block_calls: [u64; 2],
}

fn pool_index(p: PoolKind) -> usize {
    match p {
        PoolKind::Small => 0,
        PoolKind::Large => 1,
    }
}

impl Arena {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn segments(&self) -> impl Iterator<Item = (u64, &Segment)> {
        self.segments.iter().map(|(a, s)| (*a, s))
    }

    pub fn segment(&self, addr: u64) -> Option<&Segment> {
        self.segments.get(&addr)
    }

    /// Bytes of all segments (what the allocator holds from the driver).
    pub fn total_segment_bytes(&self) -> u64 {
        self.segment_bytes
    }

    fn key(&self, addr: u64, c: &Chunk) -> (u32, PoolKind, u64, u64) {
        let s = &self.segments[&c.segment];
        (s.stream, s.pool, c.size, addr)
    }

    fn insert_free(&mut self, addr: u64, size: u64, segment: u64) {
        let gc_base = self.free_block_calls[pool_index(self.segments[&segment].pool)];
        let c = Chunk {
            size,
            segment,
            requested: 0,
            free: true,
            gc_base,
        };
        let k = self.key(addr, &c);
        self.free.insert(k);
        self.chunks.insert(addr, c);
    }

    fn remove_free(&mut self, addr: u64) -> Chunk {
        let c = self.chunks.remove(&addr).expect("bug: no chunk there");
        debug_assert!(c.free, "bug: removing a live chunk from the free index");
        let k = self.key(addr, &c);
        let had = self.free.remove(&k);
        debug_assert!(had, "bug: free index out of step");
        c
    }

    /// A new segment, one free block.
    pub fn add_segment(&mut self, addr: u64, size: u64, stream: u32, pool: PoolKind) {
        self.segments.insert(addr, Segment { size, stream, pool });
        self.segment_bytes += size;
        self.insert_free(addr, size, addr);
    }

    /// Removes a segment that is one free block.
    pub fn remove_segment(&mut self, addr: u64) -> Segment {
        let c = self.remove_free(addr);
        let s = self.segments.remove(&addr).expect("bug: no such segment");
        debug_assert_eq!(c.size, s.size, "bug: removing a segment still split");
        self.segment_bytes -= s.size;
        s
    }

    /// The smallest free block of `stream` and `pool` holding at least `size`: (address, size).
    pub fn best_fit(&self, stream: u32, pool: PoolKind, size: u64) -> Option<(u64, u64)> {
        self.free
            .range((stream, pool, size, 0)..)
            .next()
            .filter(|(s, p, _, _)| *s == stream && *p == pool)
            .map(|(_, _, size, addr)| (*addr, *size))
    }

    /// Free blocks of a pool, every stream, in PyTorch's pool order (stream, size, address):
    /// (address, size).
    pub fn free_blocks(&self, pool: PoolKind) -> Vec<(u64, u64)> {
        self.free
            .iter()
            .filter(|(_, p, _, _)| *p == pool)
            .map(|(_, _, size, addr)| (*addr, *size))
            .collect()
    }

    /// Free blocks of a stream and pool, largest first: (address, size).
    pub fn free_blocks_desc(&self, stream: u32, pool: PoolKind) -> Vec<(u64, u64)> {
        self.free
            .range((stream, pool, 0, 0)..=(stream, pool, u64::MAX, u64::MAX))
            .rev()
            .map(|(_, _, size, addr)| (*addr, *size))
            .collect()
    }

    /// Hands out the free block at `addr` for `size` bytes (`requested` asked for); the rest
    /// stays a free block of its own when `split`, else the whole block is handed out.
    /// Returns the address (always `addr`).
    pub fn take(&mut self, addr: u64, size: u64, requested: u64, split: bool) -> u64 {
        let c = self.remove_free(addr);
        debug_assert!(c.size >= size, "bug: block too small");
        let size = if split && c.size > size {
            self.insert_free(addr + size, c.size - size, c.segment);
            size
        } else {
            c.size
        };
        self.chunks.insert(
            addr,
            Chunk {
                size,
                segment: c.segment,
                requested,
                free: false,
                gc_base: 0,
            },
        );
        addr
    }

    /// Counts a `get_free_block` call of `pool` (only while garbage collection is on, as in
    /// PyTorch).
    pub fn count_free_block_call(&mut self, pool: PoolKind) {
        self.free_block_calls[pool_index(pool)] += 1;
    }

    /// PyTorch's `gc_count` of the free block at `addr`: searches since it was freed.
    pub fn gc_age(&self, addr: u64) -> u64 {
        let c = &self.chunks[&addr];
        self.free_block_calls[pool_index(self.segments[&c.segment].pool)] - c.gc_base
    }

    pub fn is_live(&self, addr: u64) -> bool {
        self.chunks.get(&addr).is_some_and(|c| !c.free)
    }

    /// (size held, requested) of a live block.
    pub fn live(&self, addr: u64) -> Option<(u64, u64)> {
        self.chunks
            .get(&addr)
            .filter(|c| !c.free)
            .map(|c| (c.size, c.requested))
    }

    /// Frees a live block and merges it with free neighbours of the same segment; returns the
    /// address of the merged free block.
    pub fn release(&mut self, addr: u64) -> u64 {
        let c = self.chunks.remove(&addr).expect("bug: freeing no block");
        assert!(!c.free, "bug: double free at {addr:#x}");
        let (mut start, mut size) = (addr, c.size);
        let next = addr + c.size;
        if self
            .chunks
            .get(&next)
            .is_some_and(|n| n.free && n.segment == c.segment)
        {
            size += self.remove_free(next).size;
        }
        let prev = self
            .chunks
            .range(..addr)
            .next_back()
            .filter(|(_, p)| p.free && p.segment == c.segment)
            .map(|(a, _)| *a);
        if let Some(p) = prev {
            size += self.remove_free(p).size;
            start = p;
        }
        self.insert_free(start, size, c.segment);
        start
    }

    /// The segment of the free block at `addr` if that block is the whole segment.
    pub fn whole_free_segment(&self, addr: u64) -> Option<u64> {
        let c = self.chunks.get(&addr)?;
        (c.free && c.segment == addr && self.segments[&addr].size == c.size).then_some(addr)
    }

    /// Segments that are one free block (what `empty_cache` can return to the driver).
    pub fn whole_free_segments(&self) -> Vec<u64> {
        self.segments
            .keys()
            .copied()
            .filter(|a| self.whole_free_segment(*a).is_some())
            .collect()
    }

    /// Live blocks.
    pub fn live_blocks(&self) -> Vec<Block> {
        self.chunks
            .iter()
            .filter(|(_, c)| !c.free)
            .map(|(a, c)| Block {
                addr: *a,
                size: c.size,
                requested: c.requested,
                stream: self.segments[&c.segment].stream,
            })
            .collect()
    }

    /// Every segment tiled exactly by its blocks, no two free neighbours left unmerged, the
    /// free index in step: the arena's own invariants.
    pub fn check(&self) -> Result<(), String> {
        let mut free_count = 0;
        for (&seg, s) in &self.segments {
            let mut at = seg;
            let mut prev_free = false;
            for (&a, c) in self.chunks.range(seg..seg + s.size) {
                if a != at || c.segment != seg {
                    return Err(format!(
                        "segment {seg:#x} has a gap or stray block at {a:#x}"
                    ));
                }
                if c.free && prev_free {
                    return Err(format!("free neighbours left unmerged at {a:#x}"));
                }
                if c.free {
                    free_count += 1;
                    if !self.free.contains(&(s.stream, s.pool, c.size, a)) {
                        return Err(format!("free block {a:#x} missing from the index"));
                    }
                } else if c.requested > c.size {
                    return Err(format!("block {a:#x} holds less than was asked"));
                }
                prev_free = c.free;
                at = a + c.size;
            }
            if at != seg + s.size {
                return Err(format!("segment {seg:#x} not tiled to its end"));
            }
        }
        if free_count != self.free.len() {
            return Err("the free index holds blocks that do not exist".into());
        }
        Ok(())
    }
}
