//! [`DriverSpace`]: the [`AddressSpace`] on the real CUDA driver, so the same allocators run on
//! a GPU. Segments are `cuMemAlloc`/`cuMemFree`; expandable segments use the virtual memory
//! API with one physical handle per granule (as PyTorch's ExpandableSegment does, because a
//! mapping can only be unmapped whole); the pool is a stream-ordered pool of its own
//! (`cuMemPoolCreate`), so its reservation counts the replay's allocations alone and not the
//! suite's other buffers, with the release threshold PyTorch's `cudaMallocAsync` backend sets
//! (keep everything until a trim), the behaviour the `pool` model assumes.
//!
//! A capacity below the device's memory (a budget) is enforced here, before the driver is
//! asked, so a large card can stand in for a smaller one. Everything still held when the space
//! is dropped is returned to the driver.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use cudarc::driver::{sys, CudaStream, DriverError};

use super::space::{AddressSpace, DriverCalls, SpaceError, SpaceResult};

pub struct DriverSpace {
    stream: Arc<CudaStream>,
    ordinal: i32,
    capacity: u64,
    granularity: u64,
    used: u64,
    calls: DriverCalls,
    segments: HashMap<u64, u64>,
    reservations: HashMap<u64, u64>,
    /// Mapped granule -> its physical handle.
    pages: BTreeMap<u64, sys::CUmemGenericAllocationHandle>,
    /// Live pool allocations -> bytes.
    pool_live: HashMap<u64, u64>,
    pool: sys::CUmemoryPool,
}

fn checked(what: &str, r: sys::CUresult, requested: u64, used: u64, cap: u64) -> SpaceResult<()> {
    match r.result() {
        Ok(()) => Ok(()),
        Err(DriverError(sys::cudaError_enum::CUDA_ERROR_OUT_OF_MEMORY)) => {
            Err(SpaceError::OutOfMemory {
                requested,
                used,
                capacity: cap,
            })
        }
        Err(e) => Err(SpaceError::Driver(format!("{what}: {e}"))),
    }
}

impl DriverSpace {
    /// A space on `stream`'s device holding at most `budget` bytes (the device's memory when
    /// None).
    pub fn new(stream: Arc<CudaStream>, budget: Option<u64>) -> crate::error::Result<Self> {
        let ctx = stream.context().clone();
        ctx.bind_to_thread()?;
        let total = ctx.total_mem()? as u64;
        let ordinal = ctx.ordinal() as i32;
        let granularity = crate::device::allocation_granularity(&ctx)?;
        let pool = private_pool(ordinal)?;
        Ok(DriverSpace {
            stream,
            ordinal,
            capacity: budget.map_or(total, |b| b.min(total)),
            granularity: granularity.max(1),
            used: 0,
            calls: DriverCalls::default(),
            segments: HashMap::new(),
            reservations: HashMap::new(),
            pages: BTreeMap::new(),
            pool_live: HashMap::new(),
            pool,
        })
    }

    fn bind(&self) -> SpaceResult<()> {
        self.stream
            .context()
            .bind_to_thread()
            .map_err(|e| SpaceError::Driver(format!("binding the context: {e}")))
    }

    /// The budget's refusal, before the driver is asked.
    fn admit(&self, bytes: u64) -> SpaceResult<()> {
        if self.used + bytes > self.capacity {
            return Err(SpaceError::OutOfMemory {
                requested: bytes,
                used: self.used,
                capacity: self.capacity,
            });
        }
        Ok(())
    }

    fn check(&self, what: &str, r: sys::CUresult, requested: u64) -> SpaceResult<()> {
        checked(what, r, requested, self.used, self.capacity)
    }

    /// Unmaps and releases one granule.
    fn unmap_page(&mut self, addr: u64) -> SpaceResult<()> {
        let Some(handle) = self.pages.remove(&addr) else {
            return Err(SpaceError::Driver(format!(
                "bug in an allocator: unmapping {addr:#x}, which is not mapped"
            )));
        };
        self.calls.virtual_memory += 2;
        // SAFETY: [addr, addr + granularity) was mapped to `handle` by map(); no live block
        // uses it (the allocator unmaps only whole pages of free blocks), and the handle is
        // released once.
        unsafe {
            self.check(
                "cuMemUnmap",
                sys::cuMemUnmap(addr, self.granularity as usize),
                0,
            )?;
            self.check("cuMemRelease", sys::cuMemRelease(handle), 0)?;
        }
        self.used -= self.granularity;
        Ok(())
    }
}

/// Pinned device memory on `ordinal`, no shareable handle.
/// A stream-ordered pool of device memory of its own, keeping what is freed until trimmed.
fn private_pool(ordinal: i32) -> crate::error::Result<sys::CUmemoryPool> {
    // SAFETY: all-zero pool properties are valid (no handle types, no size limit); the type
    // and location are set below.
    let mut props: sys::CUmemPoolProps = unsafe { std::mem::zeroed() };
    props.allocType = sys::CUmemAllocationType::CU_MEM_ALLOCATION_TYPE_PINNED;
    props.location.type_ = sys::CUmemLocationType::CU_MEM_LOCATION_TYPE_DEVICE;
    props.location.id = ordinal;
    let mut pool: sys::CUmemoryPool = std::ptr::null_mut();
    // SAFETY: writes one pool handle.
    unsafe { sys::cuMemPoolCreate(&mut pool, &props) }.result()?;
    crate::device::keep_freed_memory(pool)?;
    Ok(pool)
}

// SAFETY: the pool handle and device pointers are process-wide driver objects, usable from
// any thread; the driver API is thread-safe, and the tracker serializes access with a mutex.
unsafe impl Send for DriverSpace {}

impl AddressSpace for DriverSpace {
    fn kind(&self) -> &'static str {
        "cuda"
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
        self.admit(size)?;
        self.bind()?;
        self.calls.segment += 1;
        let mut ptr: sys::CUdeviceptr = 0;
        // SAFETY: writes one device pointer; freed by free_segment or Drop.
        let r = unsafe { sys::cuMemAlloc_v2(&mut ptr, size as usize) };
        self.check("cuMemAlloc", r, size)?;
        self.segments.insert(ptr, size);
        self.used += size;
        Ok(ptr)
    }

    fn free_segment(&mut self, addr: u64, size: u64) -> SpaceResult<()> {
        if self.segments.get(&addr) != Some(&size) {
            return Err(SpaceError::Driver(format!(
                "bug in an allocator: freeing {addr:#x} as a {size}-byte segment"
            )));
        }
        self.bind()?;
        self.calls.segment += 1;
        // SAFETY: addr came from cuMemAlloc here and is freed once; cuMemFree synchronizes
        // with work that may still use it.
        let r = unsafe { sys::cuMemFree_v2(addr) };
        self.check("cuMemFree", r, 0)?;
        self.segments.remove(&addr);
        self.used -= size;
        Ok(())
    }

    fn reserve(&mut self, size: u64) -> SpaceResult<u64> {
        self.bind()?;
        self.calls.virtual_memory += 1;
        let mut ptr: sys::CUdeviceptr = 0;
        // SAFETY: reserves address space only (alignment 0 = the granularity, no fixed
        // address); released by unreserve or Drop.
        let r = unsafe { sys::cuMemAddressReserve(&mut ptr, size as usize, 0, 0, 0) };
        self.check("cuMemAddressReserve", r, 0)?;
        self.reservations.insert(ptr, size);
        Ok(ptr)
    }

    fn map(&mut self, addr: u64, size: u64) -> SpaceResult<()> {
        let g = self.granularity;
        if size == 0 || size % g != 0 || addr % g != 0 {
            return Err(SpaceError::Driver(format!(
                "bug in an allocator: mapping {size} bytes at {addr:#x}"
            )));
        }
        if self.pages.range(addr..addr + size).next().is_some() {
            return Err(SpaceError::Driver(format!(
                "bug in an allocator: mapping {addr:#x}, part of which is mapped"
            )));
        }
        self.admit(size)?;
        self.bind()?;
        let prop = crate::device::device_allocation_prop(self.ordinal);
        for i in 0..size / g {
            let at = addr + i * g;
            let mut handle: sys::CUmemGenericAllocationHandle = 0;
            self.calls.virtual_memory += 1;
            // SAFETY: prop is initialized; writes one handle, released in unmap_page.
            let r = unsafe { sys::cuMemCreate(&mut handle, g as usize, &prop, 0) };
            let created = self.check("cuMemCreate", r, g);
            let mapped = created.and_then(|()| {
                self.calls.virtual_memory += 1;
                // SAFETY: [at, at + g) lies in a reservation of ours and is not mapped (checked
                // against `pages` above); handle holds exactly g bytes.
                let r = unsafe { sys::cuMemMap(at, g as usize, 0, handle, 0) };
                let m = self.check("cuMemMap", r, g);
                if m.is_err() {
                    // SAFETY: the handle was created above and is mapped nowhere.
                    let _ = unsafe { sys::cuMemRelease(handle) };
                }
                m
            });
            if let Err(e) = mapped {
                // Undo this call's pages, so a refusal leaves nothing half-mapped.
                for j in 0..i {
                    self.unmap_page(addr + j * g)?;
                }
                return Err(e);
            }
            self.pages.insert(at, handle);
            self.used += g;
        }
        let access = sys::CUmemAccessDesc {
            location: prop.location,
            flags: sys::CUmemAccess_flags::CU_MEM_ACCESS_FLAGS_PROT_READWRITE,
        };
        self.calls.virtual_memory += 1;
        // SAFETY: the range was just mapped in full; one access descriptor.
        let r = unsafe { sys::cuMemSetAccess(addr, size as usize, &access, 1) };
        self.check("cuMemSetAccess", r, 0)
    }

    fn unmap(&mut self, addr: u64, size: u64) -> SpaceResult<()> {
        let g = self.granularity;
        if size % g != 0 || addr % g != 0 {
            return Err(SpaceError::Driver(format!(
                "bug in an allocator: unmapping {size} bytes at {addr:#x}"
            )));
        }
        self.bind()?;
        for i in 0..size / g {
            self.unmap_page(addr + i * g)?;
        }
        Ok(())
    }

    fn unreserve(&mut self, addr: u64, size: u64) -> SpaceResult<()> {
        if self.reservations.get(&addr) != Some(&size)
            || self.pages.range(addr..addr + size).next().is_some()
        {
            return Err(SpaceError::Driver(format!(
                "bug in an allocator: freeing the address range {addr:#x} ({size} bytes)"
            )));
        }
        self.bind()?;
        self.calls.virtual_memory += 1;
        // SAFETY: a reservation of ours with nothing mapped in it, freed once.
        let r = unsafe { sys::cuMemAddressFree(addr, size as usize) };
        self.check("cuMemAddressFree", r, 0)?;
        self.reservations.remove(&addr);
        Ok(())
    }

    fn pool_alloc(&mut self, size: u64, _stream: u32) -> SpaceResult<u64> {
        // One stream carries every trace stream on the device: the suite has one.
        self.admit(size)?;
        self.bind()?;
        self.calls.pool += 1;
        let mut ptr: sys::CUdeviceptr = 0;
        // SAFETY: a stream-ordered allocation on our stream; freed by pool_free or Drop.
        let r = unsafe {
            sys::cuMemAllocFromPoolAsync(
                &mut ptr,
                size as usize,
                self.pool,
                self.stream.cu_stream(),
            )
        };
        self.check("cuMemAllocFromPoolAsync", r, size)?;
        self.pool_live.insert(ptr, size);
        self.used += size;
        Ok(ptr)
    }

    fn pool_free(&mut self, addr: u64, _stream: u32) -> SpaceResult<()> {
        let Some(size) = self.pool_live.remove(&addr) else {
            return Err(SpaceError::Driver(format!(
                "bug in an allocator: pool-freeing {addr:#x}, which it did not allocate"
            )));
        };
        self.bind()?;
        self.calls.pool += 1;
        // SAFETY: addr came from cuMemAllocAsync on this stream and is freed once, in order.
        let r = unsafe { sys::cuMemFreeAsync(addr, self.stream.cu_stream()) };
        self.check("cuMemFreeAsync", r, 0)?;
        self.used -= size;
        Ok(())
    }

    fn pool_trim(&mut self) -> SpaceResult<()> {
        self.bind()?;
        self.calls.pool += 1;
        // SAFETY: waits for the frees queued on our stream, then trims this space's pool.
        unsafe {
            self.check(
                "cuStreamSynchronize",
                sys::cuStreamSynchronize(self.stream.cu_stream()),
                0,
            )?;
            self.check("cuMemPoolTrimTo", sys::cuMemPoolTrimTo(self.pool, 0), 0)
        }
    }

    fn pool_reserved(&self) -> SpaceResult<u64> {
        let mut v: u64 = 0;
        // SAFETY: RESERVED_MEM_CURRENT is a 64-bit attribute of this space's own pool.
        let r = unsafe {
            sys::cuMemPoolGetAttribute(
                self.pool,
                sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RESERVED_MEM_CURRENT,
                &mut v as *mut u64 as *mut _,
            )
        };
        self.check("cuMemPoolGetAttribute", r, 0)?;
        Ok(v)
    }
}

impl Drop for DriverSpace {
    fn drop(&mut self) {
        if self.bind().is_err() {
            return;
        }
        let stream = self.stream.cu_stream();
        // SAFETY: everything freed here was allocated by this space and is freed once; the
        // allocator owning the space is gone, so nothing uses these addresses any more.
        unsafe {
            for (ptr, _) in self.pool_live.drain() {
                let _ = sys::cuMemFreeAsync(ptr, stream);
            }
            let _ = sys::cuStreamSynchronize(stream);
            for (ptr, _) in self.segments.drain() {
                let _ = sys::cuMemFree_v2(ptr);
            }
            let g = self.granularity as usize;
            for (addr, handle) in std::mem::take(&mut self.pages) {
                let _ = sys::cuMemUnmap(addr, g);
                let _ = sys::cuMemRelease(handle);
            }
            for (addr, size) in self.reservations.drain() {
                let _ = sys::cuMemAddressFree(addr, size as usize);
            }
            // Every allocation from the pool was freed and synchronized above.
            let _ = sys::cuMemPoolDestroy(self.pool);
        }
    }
}
