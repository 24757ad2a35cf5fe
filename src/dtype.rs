//! Storage element types and the rounding each one implies.

use half::bf16;
use serde::{Deserialize, Serialize};

/// The element type a tensor is stored in. Math is always fp32 (or f64 in references).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DType {
    F32,
    Bf16,
    /// Token ids and targets: integers, never computed with as floats. Written and read as
    /// f32 values, exact below 2^24 (every vocabulary in use is far smaller).
    I32,
}

impl DType {
    pub fn size(self) -> usize {
        match self {
            DType::F32 | DType::I32 => 4,
            DType::Bf16 => 2,
        }
    }

    /// The name used in case ids and reports.
    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::Bf16 => "bf16",
            DType::I32 => "i32",
        }
    }

    /// Round an f32 to what this dtype can store (round to nearest even for bf16).
    pub fn round(self, x: f32) -> f32 {
        match self {
            DType::F32 => x,
            DType::Bf16 => bf16::from_f32(x).to_f32(),
            DType::I32 => x.round(),
        }
    }

    /// Unit roundoff of the storage type: the relative error of one rounding.
    pub fn epsilon(self) -> f64 {
        match self {
            DType::F32 | DType::I32 => f32::EPSILON as f64 / 2.0,
            DType::Bf16 => 1.0 / 256.0,
        }
    }

    pub fn parse(s: &str) -> Option<DType> {
        match s {
            "f32" | "fp32" => Some(DType::F32),
            "bf16" => Some(DType::Bf16),
            _ => None,
        }
    }
}

impl std::fmt::Display for DType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}
