//! `expandable`: PyTorch's `expandable_segments:True` (Note [Expandable Segments] in
//! c10/cuda/CUDACachingAllocator.cpp). Instead of one driver segment per large request, each
//! stream gets one segment (per pool, small and large, as PyTorch keeps them) that grows: a
//! reservation of virtual address space as large as the device, with physical pages mapped on
//! demand at its end. Blocks inside it follow the caching allocator's best fit, split and
//! merge, except that a block is split whenever 512 bytes or more remain (PyTorch's
//! `should_split` with expandable segments), because freed neighbours merge back into one
//! range instead of stranding remainders in separate segments.
//!
//! What it buys: after a step frees its activations, the segment's free space is one range
//! again, so a next step with slightly larger tensors tiles into it, where the caching
//! allocator would strand the ends of segments sized for the previous shapes.
//!
//! Simplifications: PyTorch maps 20 MiB pages for the large pool; here both pools map pages of
//! the space's granularity (2 MiB). On `empty_cache` (and when the device refuses pages) only
//! the free tail of each segment is unmapped; PyTorch also unmaps whole free pages inside a
//! segment and refills those holes first.

use std::collections::HashMap;

use super::arena::{Arena, PoolKind};
use super::{
    driver_error, oom, round_size, AddressSpace, Allocator, AllocatorStats, Block, Counters,
    SpaceError, SMALL_SIZE,
};
use crate::error::{Error, Result};
use crate::memory::format_bytes;

#[derive(Debug, Clone, Copy)]
struct Growing {
    /// Start of the reservation (and of the arena segment once anything is mapped).
    addr: u64,
    reserved_va: u64,
    mapped: u64,
}

pub struct Expandable {
    space: Box<dyn AddressSpace>,
    arena: Arena,
    counters: Counters,
    segments: HashMap<(u32, PoolKind), Growing>,
}

impl Expandable {
    pub fn new(space: Box<dyn AddressSpace>) -> Self {
        Expandable {
            space,
            arena: Arena::new(),
            counters: Counters::default(),
            segments: HashMap::new(),
        }
    }

    fn mapped(&self) -> u64 {
        self.segments.values().map(|g| g.mapped).sum()
    }

    fn page(&self) -> u64 {
        self.space.granularity()
    }

    /// Unmaps the page-aligned part of a segment's free tail; drops the segment (and its
    /// reservation) when nothing stays mapped.
    fn shrink(&mut self, key: (u32, PoolKind)) -> Result<()> {
        let g = self.segments[&key];
        if g.mapped == 0 {
            return Ok(());
        }
        let Some((tail, _)) = self.arena.free_tail(g.addr) else {
            return Ok(());
        };
        let page = self.page();
        let cut = g.addr + (tail - g.addr).div_ceil(page) * page;
        let bytes = g.addr + g.mapped - cut;
        if bytes == 0 {
            return Ok(());
        }
        self.space
            .unmap(cut, bytes)
            .map_err(|e| driver_error("expandable: unmapping pages", e))?;
        if bytes == g.mapped {
            self.arena.remove_segment(g.addr);
            self.space
                .unreserve(g.addr, g.reserved_va)
                .map_err(|e| driver_error("expandable: freeing address space", e))?;
            self.segments.remove(&key);
        } else {
            self.arena.shrink_segment(g.addr, bytes);
            self.segments.get_mut(&key).expect("present").mapped -= bytes;
        }
        Ok(())
    }

    /// Maps pages at the end of the stream's segment until its free tail holds `size`;
    /// returns the address of that tail block, or the device's refusal.
    fn grow(
        &mut self,
        stream: u32,
        pool: PoolKind,
        size: u64,
    ) -> Result<std::result::Result<u64, String>> {
        let key = (stream, pool);
        let page = self.page();
        if !self.segments.contains_key(&key) {
            // As much address space as the device has memory (PyTorch reserves about the
            // whole device per segment; address space is plentiful at 2^48 bytes).
            let va = self.space.capacity().max(size).div_ceil(page) * page;
            let addr = self
                .space
                .reserve(va)
                .map_err(|e| driver_error("expandable: reserving address space", e))?;
            self.segments.insert(
                key,
                Growing {
                    addr,
                    reserved_va: va,
                    mapped: 0,
                },
            );
        }
        let g = self.segments[&key];
        let tail = if g.mapped > 0 {
            self.arena.free_tail(g.addr)
        } else {
            None
        };
        let have = tail.map_or(0, |(_, s)| s);
        let need = (size - have).div_ceil(page) * page;
        if g.mapped + need > g.reserved_va {
            return Ok(Err(format!(
                "the segment's {} of address space is full",
                format_bytes(g.reserved_va)
            )));
        }
        let at = g.addr + g.mapped;
        let mut mapped = self.space.map(at, need);
        if let Err(SpaceError::OutOfMemory { .. }) = mapped {
            // The device is full: give back the free tails of the other segments, retry once.
            self.counters.retries += 1;
            let others: Vec<_> = self
                .segments
                .keys()
                .copied()
                .filter(|k| *k != key)
                .collect();
            for k in others {
                self.shrink(k)?;
            }
            mapped = self.space.map(at, need);
        }
        match mapped {
            Ok(()) => {}
            Err(e @ SpaceError::OutOfMemory { .. }) => return Ok(Err(e.to_string())),
            Err(e) => return Err(driver_error("expandable: mapping pages", e)),
        }
        if g.mapped == 0 {
            self.arena.add_segment(g.addr, need, stream, pool);
        } else {
            self.arena.grow_segment(g.addr, need);
        }
        self.segments.get_mut(&key).expect("present").mapped += need;
        self.counters.on_reserve(self.mapped());
        Ok(Ok(self.arena.free_tail(g.addr).expect("just grown").0))
    }
}

impl Allocator for Expandable {
    fn name(&self) -> String {
        "expandable".into()
    }

    fn allocate(&mut self, requested: u64, stream: u32) -> Result<Block> {
        let size = round_size(requested);
        let pool = if size <= SMALL_SIZE {
            PoolKind::Small
        } else {
            PoolKind::Large
        };
        let addr = match self.arena.best_fit(stream, pool, size) {
            Some((addr, _)) => addr,
            None => match self.grow(stream, pool, size)? {
                Ok(addr) => addr,
                Err(why) => {
                    self.counters.ooms += 1;
                    return Err(oom(
                        requested,
                        &self.stats(),
                        self.space.capacity(),
                        format!("expandable segments: {why}"),
                    ));
                }
            },
        };
        let addr = self.arena.take(addr, size, requested, true);
        self.counters.on_alloc(requested, self.mapped());
        Ok(Block {
            addr,
            size,
            requested,
            stream,
        })
    }

    fn free(&mut self, block: Block) -> Result<()> {
        let Some((_, requested)) = self.arena.live(block.addr) else {
            return Err(Error::Invalid(format!(
                "expandable: freeing {:#x}, which is not live",
                block.addr
            )));
        };
        self.arena.release(block.addr);
        self.counters.on_free(requested);
        Ok(())
    }

    fn empty_cache(&mut self) -> Result<()> {
        let keys: Vec<_> = self.segments.keys().copied().collect();
        for k in keys {
            self.shrink(k)?;
        }
        Ok(())
    }

    fn stats(&self) -> AllocatorStats {
        self.counters.stats(self.mapped(), self.space.as_ref())
    }

    fn reset_peaks(&mut self) {
        self.counters.reset_peaks(self.mapped());
    }

    fn live_blocks(&self) -> Vec<Block> {
        self.arena.live_blocks()
    }

    fn check(&self) -> std::result::Result<(), String> {
        self.arena.check()?;
        if self.arena.total_segment_bytes() != self.mapped() {
            return Err("expandable: mapped bytes and segment sizes disagree".into());
        }
        Ok(())
    }

    fn space(&self) -> &dyn AddressSpace {
        self.space.as_ref()
    }
}
