//! The Rust side of `kernels/headroom.h` and what the build recorded about the kernels.

#[allow(unsafe_op_in_unsafe_fn)]
pub mod bindings;

/// One kernel on one architecture, as ptxas reported it at build time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KernelResource {
    /// The `.cu` file it comes from.
    pub file: &'static str,
    /// Demangled name.
    pub kernel: &'static str,
    /// `sm_80`, `sm_90a`, ...
    pub arch: &'static str,
    pub registers: u32,
    /// Static shared memory (dynamic shared memory is set at launch).
    pub shared_bytes: u64,
    pub stack_bytes: u64,
    pub spill_stores: u64,
    pub spill_loads: u64,
}

include!(concat!(env!("OUT_DIR"), "/kernel_table.rs"));

/// Whether this binary carries the CUDA kernels (nvcc was found at build time).
pub fn built() -> bool {
    KERNELS_BUILT
}
