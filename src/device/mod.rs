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
}

// SAFETY: the pool handle is a driver object valid for the process's lifetime; the driver
// API is thread-safe.
unsafe impl Send for CudaDevice {}
unsafe impl Sync for CudaDevice {}

/// Why the GPU cannot be used, as one sentence, or the open device.
pub fn open() -> std::result::Result<CudaDevice, String> {
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
        Ok(_) => {}
    }
    let ordinal = std::env::var("HEADROOM_DEVICE")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0usize);
    let ctx =
        CudaContext::new(ordinal).map_err(|e| format!("could not open GPU {ordinal}: {e}"))?;
    let stream = ctx
        .new_stream()
        .map_err(|e| format!("could not create a stream: {e}"))?;
    let facts = device_facts(&ctx).map_err(|e| format!("could not read the GPU's facts: {e}"))?;
    let pool = default_pool(&ctx).map_err(|e| format!("could not set up the memory pool: {e}"))?;
    Ok(CudaDevice {
        ctx,
        stream,
        facts,
        pool,
    })
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
    // SAFETY: plain driver queries on a valid device.
    unsafe {
        sys::cuDeviceGetDefaultMemPool(&mut pool, ctx.cu_device()).result()?;
        let mut threshold: u64 = u64::MAX;
        sys::cuMemPoolSetAttribute(
            pool,
            sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
            &mut threshold as *mut u64 as *mut _,
        )
        .result()?;
    }
    Ok(pool)
}

/// The driver's own view of the memory a measured region used: the pool's high-water marks
/// and the device's free memory, recorded beside the tracked figures as a cross-check.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DriverMemoryView {
    pub pool_used_high: u64,
    pub pool_reserved_high: u64,
    pub free_before: u64,
    pub free_after: u64,
}

impl CudaDevice {
    fn pool_attr(&self, attr: sys::CUmemPool_attribute) -> Result<u64> {
        let mut v: u64 = 0;
        // SAFETY: the attributes read here are 64-bit values.
        unsafe { sys::cuMemPoolGetAttribute(self.pool, attr, &mut v as *mut u64 as *mut _) }
            .result()?;
        Ok(v)
    }

    /// Start a measured region in the driver's view: the high-water marks restart from the
    /// current use (setting them to 0 resets them to the current value, per the driver API).
    pub fn reset_driver_view(&self) -> Result<u64> {
        if !self.pool.is_null() {
            for attr in [
                sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH,
                sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RESERVED_MEM_HIGH,
            ] {
                let mut zero: u64 = 0;
                // SAFETY: as above.
                unsafe {
                    sys::cuMemPoolSetAttribute(self.pool, attr, &mut zero as *mut u64 as *mut _)
                }
                .result()?;
            }
        }
        Ok(self.ctx.mem_get_info()?.0 as u64)
    }

    pub fn driver_view(&self, free_before: u64) -> Result<DriverMemoryView> {
        self.stream.synchronize()?;
        let (used, reserved) = if self.pool.is_null() {
            (0, 0)
        } else {
            (
                self.pool_attr(sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH)?,
                self.pool_attr(sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RESERVED_MEM_HIGH)?,
            )
        };
        Ok(DriverMemoryView {
            pool_used_high: used,
            pool_reserved_high: reserved,
            free_before,
            free_after: self.ctx.mem_get_info()?.0 as u64,
        })
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
