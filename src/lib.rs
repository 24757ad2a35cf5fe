//! headroom: what each memory-saving technique against CUDA out-of-memory errors costs in
//! time and buys in peak device memory, measured with hand-written CUDA kernels.
//!
//! The map (see the README for the commands):
//! - [`kernels`]: the Rust side of `kernels/headroom.h` and ptxas' resource table;
//! - [`device`]: opening the GPU, its facts, event timing;
//! - [`memory`]: the tracked allocator's bookkeeping, budgets, out-of-memory errors;
//! - [`shapes`]: the problems' shapes (matmul, attention, layernorm), with no buffers;
//! - [`backend`]: the operations the suite needs, once for CUDA and once for the CPU;
//! - [`reference`]: f64 CPU references used for validation;
//! - [`techniques`]: the cases of each technique with their analytic memory models;
//! - [`harness`]: validating, measuring and timing cases;
//! - [`report`]: the report schema and its writers.

pub mod alloc;
pub mod backend;
pub mod device;
pub mod dtype;
pub mod error;
pub mod harness;
pub mod kernels;
pub mod memory;
pub mod model;
pub mod reference;
pub mod report;
pub mod rng;
pub mod shapes;
pub mod shard;
pub mod techniques;

pub use dtype::DType;
pub use error::{Error, Result};
