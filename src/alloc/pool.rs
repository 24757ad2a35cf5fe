//! `pool`: the driver's stream-ordered pool (`cuMemAllocAsync` / `cuMemFreeAsync`), the
//! allocator cudarc and `PYTORCH_CUDA_ALLOC_CONF=backend:cudaMallocAsync` use. Every allocation
//! and free is a driver call; the driver caches underneath (see `space::PoolModel` for the
//! model the simulation uses, and `driver::DriverSpace` for the real pool). Reserved is the
//! pool's `CU_MEMPOOL_ATTR_RESERVED_MEM_CURRENT`.

use std::collections::HashMap;

use super::{
    driver_error, oom, AddressSpace, Allocator, AllocatorStats, Block, Counters, SpaceError,
};
use crate::error::{Error, Result};

pub struct Pool {
    space: Box<dyn AddressSpace>,
    counters: Counters,
    live: HashMap<u64, Block>,
}

impl Pool {
    pub fn new(space: Box<dyn AddressSpace>) -> Self {
        Pool {
            space,
            counters: Counters::default(),
            live: HashMap::new(),
        }
    }

    fn reserved(&self) -> u64 {
        // A failed attribute query reads as nothing reserved; the query cannot fail on a
        // pool that allocated.
        self.space.pool_reserved().unwrap_or(0)
    }
}

impl Allocator for Pool {
    fn name(&self) -> String {
        "pool".into()
    }

    fn allocate(&mut self, size: u64, stream: u32) -> Result<Block> {
        // cuMemAllocAsync of 0 bytes returns a null pointer and allocates nothing.
        if size == 0 {
            return Ok(Block::empty(stream));
        }
        let addr = match self.space.pool_alloc(size, stream) {
            Ok(a) => a,
            Err(e @ SpaceError::OutOfMemory { .. }) => {
                self.counters.ooms += 1;
                let s = self.stats();
                return Err(oom(
                    size,
                    &s,
                    self.space.capacity(),
                    format!("stream-ordered pool: {e}"),
                ));
            }
            Err(e) => return Err(driver_error("pool allocation", e)),
        };
        let reserved = self.reserved();
        self.counters.on_alloc(size, size, reserved);
        let b = Block {
            addr,
            size,
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
                "pool: freeing {:#x}, which is not live",
                block.addr
            )));
        };
        self.space
            .pool_free(b.addr, b.stream)
            .map_err(|e| driver_error("pool free", e))?;
        self.counters.on_free(b.requested, b.size);
        Ok(())
    }

    fn empty_cache(&mut self) -> Result<()> {
        self.space
            .pool_trim()
            .map_err(|e| driver_error("trimming the pool", e))
    }

    fn stats(&self) -> AllocatorStats {
        self.counters.stats(self.reserved(), self.space.as_ref())
    }

    fn reset_peaks(&mut self) {
        let r = self.reserved();
        self.counters.reset_peaks(r);
    }

    fn live_blocks(&self) -> Vec<Block> {
        self.live.values().copied().collect()
    }

    fn space(&self) -> &dyn AddressSpace {
        self.space.as_ref()
    }
}
