//! Opening the GPU through cudarc, its facts, and event timing.
//!
//! cudarc loads libcuda at run time and panics when it cannot, so presence is checked first;
//! every reason the GPU cannot be used becomes one sentence, and the suite falls back to the
//! CPU backend.

use std::sync::Arc;

use cudarc::driver::{sys, CudaContext, CudaEvent, CudaStream};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::kernels;

/// What the report and `headroom info` say about the machine a run measured.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeviceFacts {
    /// `cuda` or `cpu`.
    pub backend: String,
    pub name: String,
    /// `9.0` for an H100.
    pub compute_capability: Option<String>,
    pub sm_count: Option<u32>,
    pub memory_bytes: Option<u64>,
    pub l2_bytes: Option<u64>,
    pub sm_clock_mhz: Option<u32>,
    pub memory_clock_mhz: Option<u32>,
    pub memory_bus_bits: Option<u32>,
    /// The driver's CUDA version, `13.0`.
    pub driver_cuda_version: Option<String>,
    /// The toolkit the kernels were compiled with.
    pub nvcc_version: Option<String>,
    /// Why the run is not on a GPU, when it is not.
    pub fallback_reason: Option<String>,
}

impl DeviceFacts {
    /// The facts of the host when the CPU backend runs.
    pub fn cpu(reason: Option<String>) -> Self {
        let cores = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1);
        DeviceFacts {
            backend: "cpu".into(),
            name: format!("{} ({} threads)", cpu_model(), cores),
            compute_capability: None,
            sm_count: None,
            memory_bytes: None,
            l2_bytes: None,
            sm_clock_mhz: None,
            memory_clock_mhz: None,
            memory_bus_bits: None,
            driver_cuda_version: None,
            nvcc_version: (!kernels::NVCC_VERSION.is_empty())
                .then(|| kernels::NVCC_VERSION.to_string()),
            fallback_reason: reason,
        }
    }

    /// A file-name-safe name: `nvidia-h100-80gb-hbm3`, `cpu`; a PyTorch peer's report gets
    /// `-torch` so it never overwrites headroom's own for the same card.
    pub fn slug(&self) -> String {
        if self.backend == "cpu" {
            return "cpu".into();
        }
        if self.backend == "torch" {
            let base = DeviceFacts {
                backend: "cuda".into(),
                ..self.clone()
            }
            .slug();
            let base = if self.name == "cpu" {
                "cpu".to_string()
            } else {
                base
            };
            return format!("{base}-torch");
        }
        let mut s = String::new();
        for c in self.name.to_lowercase().chars() {
            if c.is_ascii_alphanumeric() {
                s.push(c);
            } else if !s.ends_with('-') {
                s.push('-');
            }
        }
        s.trim_matches('-').to_string()
    }
}

fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|s| s.trim().to_string())
        })
        .unwrap_or_else(|| std::env::consts::ARCH.to_string())
}

/// An open GPU: its context, the stream every operation runs on, and its facts.
pub struct CudaDevice {
    pub ctx: Arc<CudaContext>,
    pub stream: Arc<CudaStream>,
    pub facts: DeviceFacts,
    /// The device's default stream-ordered memory pool (null when pools are unsupported).
    pub pool: sys::CUmemoryPool,
    /// The device's minimum physical allocation granularity (`cuMemGetAllocationGranularity`,
    /// 2 MiB on current GPUs): the unit in which the driver maps memory into its pools.
    pub granularity: u64,
}

// SAFETY: the pool handle is a driver object valid for the process's lifetime; the driver
// API is thread-safe.
unsafe impl Send for CudaDevice {}
unsafe impl Sync for CudaDevice {}

/// Why the GPU cannot be used, as one sentence, or the open device: GPU `HEADROOM_DEVICE`
/// (default 0).
pub fn open() -> std::result::Result<CudaDevice, String> {
    let ordinal = std::env::var("HEADROOM_DEVICE")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0usize);
    open_ordinal(ordinal)
}

/// Why GPU `ordinal` cannot be used, as one sentence, or the open device.
pub fn open_ordinal(ordinal: usize) -> std::result::Result<CudaDevice, String> {
    if !kernels::built() {
        return Err("this build has no CUDA kernels (nvcc was not found when it was built)".into());
    }
    // SAFETY: only tries to dlopen the library; nothing is called through it.
    if !unsafe { sys::is_culib_present() } {
        return Err(
            "no CUDA driver found (libcuda.so could not be loaded; is the NVIDIA driver installed?)"
                .into(),
        );
    }
    if let Err(e) = cudarc::driver::result::init() {
        return Err(format!("the CUDA driver did not initialize: {e}"));
    }
    match cudarc::driver::result::device::get_count() {
        Ok(0) => return Err("the CUDA driver found no GPU".into()),
        Err(e) => return Err(format!("the CUDA driver could not count GPUs: {e}")),
        Ok(n) if ordinal >= n as usize => {
            return Err(format!(
                "there is no GPU {ordinal}: the CUDA driver found {n} (numbered from 0)"
            ))
        }
        Ok(_) => {}
    }
    let ctx =
        CudaContext::new(ordinal).map_err(|e| format!("could not open GPU {ordinal}: {e}"))?;
    let stream = ctx
        .new_stream()
        .map_err(|e| format!("could not create a stream: {e}"))?;
    let facts = device_facts(&ctx).map_err(|e| format!("could not read the GPU's facts: {e}"))?;
    check_driver_version(
        facts.driver_cuda_version.as_deref().unwrap_or(""),
        kernels::NVCC_VERSION,
    )?;
    let pool = default_pool(&ctx).map_err(|e| format!("could not set up the memory pool: {e}"))?;
    let granularity = allocation_granularity(&ctx)
        .map_err(|e| format!("could not read the allocation granularity: {e}"))?;
    Ok(CudaDevice {
        ctx,
        stream,
        facts,
        pool,
        granularity,
    })
}

/// `13.0` from `13.0`, `V13.0.88` or `release 13.0, V13.0.88`: (major, minor).
fn cuda_version(text: &str) -> Option<(u32, u32)> {
    let start = text.find(|c: char| c.is_ascii_digit())?;
    let mut parts = text[start..]
        .split(|c: char| !c.is_ascii_digit())
        .filter(|p| !p.is_empty());
    let major = parts.next()?.parse().ok()?;
    let minor = parts.next().and_then(|p| p.parse().ok()).unwrap_or(0);
    Some((major, minor))
}

/// The kernels are linked against the toolkit's runtime, which refuses to start on a driver
/// older than itself (error 35, "driver version is insufficient") at the first launch; say so
/// before any case runs, naming both versions.
pub fn check_driver_version(driver: &str, toolkit: &str) -> std::result::Result<(), String> {
    match (cuda_version(driver), cuda_version(toolkit)) {
        (Some(d), Some(t)) if d < t => Err(format!(
            "the driver supports CUDA {}.{} but the kernels were built with CUDA {}.{}; \
             install a driver for CUDA {}.{} or newer, or build with an older toolkit",
            d.0, d.1, t.0, t.1, t.0, t.1
        )),
        _ => Ok(()),
    }
}

fn device_facts(ctx: &Arc<CudaContext>) -> Result<DeviceFacts> {
    use sys::CUdevice_attribute as A;
    let attr = |a: A| -> Result<i32> { Ok(ctx.attribute(a)?) };
    let (major, minor) = ctx.compute_capability()?;
    let mut driver = 0i32;
    // SAFETY: writes one int.
    unsafe { sys::cuDriverGetVersion(&mut driver) }.result()?;
    Ok(DeviceFacts {
        backend: "cuda".into(),
        name: ctx.name()?,
        compute_capability: Some(format!("{major}.{minor}")),
        sm_count: Some(attr(A::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)? as u32),
        memory_bytes: Some(ctx.total_mem()? as u64),
        l2_bytes: Some(attr(A::CU_DEVICE_ATTRIBUTE_L2_CACHE_SIZE)? as u64),
        sm_clock_mhz: Some((attr(A::CU_DEVICE_ATTRIBUTE_CLOCK_RATE)? / 1000) as u32),
        memory_clock_mhz: Some((attr(A::CU_DEVICE_ATTRIBUTE_MEMORY_CLOCK_RATE)? / 1000) as u32),
        memory_bus_bits: Some(attr(A::CU_DEVICE_ATTRIBUTE_GLOBAL_MEMORY_BUS_WIDTH)? as u32),
        driver_cuda_version: Some(format!("{}.{}", driver / 1000, (driver % 1000) / 10)),
        nvcc_version: Some(kernels::NVCC_VERSION.to_string()),
        fallback_reason: None,
    })
}

/// The default stream-ordered pool, told to keep what it holds across synchronizations
/// (its default release threshold of 0 would return memory to the driver at every sync,
/// which makes repeated allocation in a timed loop pay the driver each time).
fn default_pool(ctx: &Arc<CudaContext>) -> Result<sys::CUmemoryPool> {
    if !ctx.has_async_alloc() {
        return Ok(std::ptr::null_mut());
    }
    let mut pool: sys::CUmemoryPool = std::ptr::null_mut();
    // SAFETY: a plain driver query on a valid device.
    unsafe { sys::cuDeviceGetDefaultMemPool(&mut pool, ctx.cu_device()) }.result()?;
    keep_freed_memory(pool)?;
    Ok(pool)
}

/// Raise a pool's release threshold so it keeps what is freed until it is trimmed, as
/// PyTorch's `cudaMallocAsync` backend does (the default of 0 returns memory to the driver at
/// every synchronization).
pub(crate) fn keep_freed_memory(pool: sys::CUmemoryPool) -> Result<()> {
    let mut threshold: u64 = u64::MAX;
    // SAFETY: a valid pool; the release threshold is a 64-bit attribute.
    unsafe {
        sys::cuMemPoolSetAttribute(
            pool,
            sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
            &mut threshold as *mut u64 as *mut _,
        )
    }
    .result()?;
    Ok(())
}

/// The properties of a plain physical allocation on device `ordinal`.
pub fn device_allocation_prop(ordinal: i32) -> sys::CUmemAllocationProp {
    // SAFETY: the property is plain data for which all-zero is a valid value (no handle types,
    // no flags); the fields that matter are set below.
    let mut prop: sys::CUmemAllocationProp = unsafe { std::mem::zeroed() };
    prop.type_ = sys::CUmemAllocationType::CU_MEM_ALLOCATION_TYPE_PINNED;
    prop.location.type_ = sys::CUmemLocationType::CU_MEM_LOCATION_TYPE_DEVICE;
    prop.location.id = ordinal;
    prop
}

/// The minimum granularity of physical device allocations on this device.
pub(crate) fn allocation_granularity(ctx: &Arc<CudaContext>) -> Result<u64> {
    let prop = device_allocation_prop(ctx.cu_device());
    let mut g: usize = 0;
    // SAFETY: writes one size_t.
    unsafe {
        sys::cuMemGetAllocationGranularity(
            &mut g,
            &prop,
            sys::CUmemAllocationGranularity_flags::CU_MEM_ALLOC_GRANULARITY_MINIMUM,
        )
    }
    .result()?;
    Ok(g as u64)
}

/// The driver's own view of the memory a measured region used: the pool's use and
/// reservation when the region started (after the pool was trimmed) and their high-water
/// marks over it, and the device's free memory, recorded beside the tracked figures.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DriverMemoryView {
    pub pool_used_high: u64,
    pub pool_reserved_high: u64,
    /// The pool's use and reservation at the region's start (absent before schema 2).
    #[serde(default)]
    pub pool_used_start: u64,
    #[serde(default)]
    pub pool_reserved_start: u64,
    /// The physical allocation granularity the pool maps memory in.
    #[serde(default)]
    pub granularity: u64,
    pub free_before: u64,
    pub free_after: u64,
}

impl DriverMemoryView {
    /// The region's peak of bytes in use, as the driver counts them.
    pub fn used_peak(&self) -> u64 {
        self.pool_used_high.saturating_sub(self.pool_used_start)
    }
    /// The region's peak of bytes the pool reserved from the device beyond its start.
    pub fn reserved_peak(&self) -> u64 {
        self.pool_reserved_high
            .saturating_sub(self.pool_reserved_start)
    }
}

impl CudaDevice {
    fn pool_attr(&self, attr: sys::CUmemPool_attribute) -> Result<u64> {
        let mut v: u64 = 0;
        // SAFETY: the attributes read here are 64-bit values.
        unsafe { sys::cuMemPoolGetAttribute(self.pool, attr, &mut v as *mut u64 as *mut _) }
            .result()?;
        Ok(v)
    }

    /// Start a measured region in the driver's view. The pool is first trimmed to what is in
    /// use (its release threshold keeps freed memory otherwise, so an earlier, larger case
    /// would set every later case's reservation), then the high-water marks are reset, which
    /// per the driver API sets them to the current values, not to zero; those current values
    /// are kept as the region's start.
    pub fn reset_driver_view(&self) -> Result<DriverMemoryView> {
        use sys::CUmemPool_attribute as P;
        self.stream.synchronize()?;
        let mut view = DriverMemoryView {
            granularity: self.granularity,
            ..DriverMemoryView::default()
        };
        if !self.pool.is_null() {
            // SAFETY: a valid pool; memory in use is never released by a trim.
            unsafe { sys::cuMemPoolTrimTo(self.pool, 0) }.result()?;
            for attr in [
                P::CU_MEMPOOL_ATTR_USED_MEM_HIGH,
                P::CU_MEMPOOL_ATTR_RESERVED_MEM_HIGH,
            ] {
                let mut zero: u64 = 0;
                // SAFETY: as above.
                unsafe {
                    sys::cuMemPoolSetAttribute(self.pool, attr, &mut zero as *mut u64 as *mut _)
                }
                .result()?;
            }
            view.pool_used_start = self.pool_attr(P::CU_MEMPOOL_ATTR_USED_MEM_CURRENT)?;
            view.pool_reserved_start = self.pool_attr(P::CU_MEMPOOL_ATTR_RESERVED_MEM_CURRENT)?;
        }
        view.free_before = self.ctx.mem_get_info()?.0 as u64;
        Ok(view)
    }

    /// The region since `reset_driver_view` returned `start`.
    pub fn driver_view(&self, start: DriverMemoryView) -> Result<DriverMemoryView> {
        use sys::CUmemPool_attribute as P;
        self.stream.synchronize()?;
        let mut view = start;
        if !self.pool.is_null() {
            view.pool_used_high = self.pool_attr(P::CU_MEMPOOL_ATTR_USED_MEM_HIGH)?;
            view.pool_reserved_high = self.pool_attr(P::CU_MEMPOOL_ATTR_RESERVED_MEM_HIGH)?;
        }
        view.free_after = self.ctx.mem_get_info()?.0 as u64;
        Ok(view)
    }

    /// A pair of timing events (timing enabled: cudarc's default disables it).
    pub fn timer(&self) -> Result<(CudaEvent, CudaEvent)> {
        let flags = Some(sys::CUevent_flags::CU_EVENT_DEFAULT);
        Ok((self.ctx.new_event(flags)?, self.ctx.new_event(flags)?))
    }

    /// Turn a launcher's return code into a result naming the operation.
    pub fn check_launch(&self, what: &str, code: i32) -> Result<()> {
        check_launch(what, code)
    }
}

/// Turn a launcher's return code into a result naming the operation.
pub fn check_launch(what: &str, code: i32) -> Result<()> {
    if code == 0 {
        return Ok(());
    }
    Err(Error::Cuda(format!(
        "{what} failed: {} (code {code})",
        error_string(code)
    )))
}

#[cfg(headroom_cuda)]
fn error_string(code: i32) -> String {
    // SAFETY: returns a pointer to a static string for any code.
    unsafe {
        let p = kernels::bindings::hr_error_string(code);
        if p.is_null() {
            return "unknown error".into();
        }
        std::ffi::CStr::from_ptr(p).to_string_lossy().into_owned()
    }
}

#[cfg(not(headroom_cuda))]
fn error_string(_code: i32) -> String {
    "unknown error (built without CUDA)".into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_older_driver_is_named_with_both_versions() {
        let e = check_driver_version("12.4", "release 13.0, V13.0.88").unwrap_err();
        assert!(e.contains("CUDA 12.4") && e.contains("CUDA 13.0"), "{e}");
        assert!(check_driver_version("13.0", "13.0").is_ok());
        assert!(check_driver_version("13.1", "13.0").is_ok());
        assert!(check_driver_version("12.9", "V13.0.88").is_err());
        // Unknown versions are not a reason to refuse the GPU.
        assert!(check_driver_version("", "13.0").is_ok());
        assert!(check_driver_version("13.0", "").is_ok());
    }
}
