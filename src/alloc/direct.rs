//! `direct`: one driver allocation per request and one driver free per release
//! (`cudaMalloc`/`cudaFree` with no cache). Reserved equals allocated; every allocation pays a
//! driver call, which is what a caching allocator exists to avoid.

use std::collections::HashMap;

use super::{
    driver_error, oom, AddressSpace, Allocator, AllocatorStats, Block, Counters, SpaceError,
};
use crate::error::{Error, Result};

pub struct Direct {
    space: Box<dyn AddressSpace>,
    counters: Counters,
    reserved: u64,
    live: HashMap<u64, Block>,
}

impl Direct {
    pub fn new(space: Box<dyn AddressSpace>) -> Self {
        Direct {
            space,
            counters: Counters::default(),
            reserved: 0,
            live: HashMap::new(),
        }
    }
}

impl Allocator for Direct {
    fn name(&self) -> String {
        "direct".into()
    }

    fn allocate(&mut self, size: u64, stream: u32) -> Result<Block> {
        // cudaMalloc(0) returns a null pointer and allocates nothing.
        if size == 0 {
            return Ok(Block::empty(stream));
        }
        let bytes = size;
        let addr = match self.space.alloc_segment(bytes) {
            Ok(a) => a,
            Err(e @ SpaceError::OutOfMemory { .. }) => {
                self.counters.ooms += 1;
                return Err(oom(
                    size,
                    &self.stats(),
                    self.space.capacity(),
                    e.to_string(),
                ));
            }
            Err(e) => return Err(driver_error("direct allocation", e)),
        };
        self.reserved += bytes;
        self.counters.on_alloc(size, bytes, self.reserved);
        let b = Block {
            addr,
            size: bytes,
            requested: size,
            stream,
        };
        self.live.insert(addr, b);
        Ok(b)
    }

    fn free(&mut self, block: Block) -> Result<()> {
        if block.is_empty() {
            return Ok(());
        }
        let Some(b) = self.live.remove(&block.addr) else {
            return Err(Error::Invalid(format!(
                "direct: freeing {:#x}, which is not live",
                block.addr
            )));
        };
        self.space
            .free_segment(b.addr, b.size)
            .map_err(|e| driver_error("direct free", e))?;
        self.reserved -= b.size;
        self.counters.on_free(b.requested, b.size);
        Ok(())
    }

    fn empty_cache(&mut self) -> Result<()> {
        Ok(())
    }

    fn stats(&self) -> AllocatorStats {
        self.counters.stats(self.reserved, self.space.as_ref())
    }

    fn reset_peaks(&mut self) {
        self.counters.reset_peaks(self.reserved);
    }

    fn live_blocks(&self) -> Vec<Block> {
        self.live.values().copied().collect()
    }

    fn space(&self) -> &dyn AddressSpace {
        self.space.as_ref()
    }
}
