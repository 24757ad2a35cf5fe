//! One module per technique: its cases, its analytic memory model, and its validation
//! against the f64 references.
//!
//! A case is one measured configuration with a stable id built from its axes,
//! `family/technique/dtype/shape`. The registry lists the cases of a profile; `check` lists
//! the validation cases (odd sizes, every form).

use serde::{Deserialize, Serialize};

use crate::backend::{Backend, BackendKind, Tensor};
use crate::dtype::DType;
use crate::error::Result;
use crate::rng::Rng;

pub mod alloc;
pub mod attention;
pub mod copy;
pub mod layers;
pub mod matmul;
pub mod train;

/// What a case is, before anything runs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CaseInfo {
    pub id: String,
    pub family: String,
    pub technique: String,
    pub dtype: DType,
    pub shape: String,
    /// Floating-point operations of one run (the field's conventions; see each family).
    pub flops: f64,
    /// Bytes one run must move to and from device memory at least.
    pub bytes_moved: f64,
    /// The analytic peak of allocated bytes over setup and one run.
    pub predicted_peak_bytes: u64,
    /// The validation tolerance (relative to the largest reference magnitude).
    pub tolerance: f64,
}

impl CaseInfo {
    pub fn new(family: &str, technique: &str, dtype: DType, shape: String) -> Self {
        CaseInfo {
            id: format!("{family}/{technique}/{}/{shape}", dtype.name()),
            family: family.into(),
            technique: technique.into(),
            dtype,
            shape,
            flops: 0.0,
            bytes_moved: 0.0,
            predicted_peak_bytes: 0,
            tolerance: tolerance(dtype),
        }
    }
}

/// Tolerance by precision, relative to the largest reference magnitude: fp32 results are
/// held far under 1e-3; bf16 ones to about 1e-2 (bf16 keeps 8 significant bits, so one
/// rounding of the output alone is up to 2^-9 = 2e-3 of a value).
pub fn tolerance(dtype: DType) -> f64 {
    match dtype {
        DType::F32 => 1e-4,
        DType::Bf16 => 1.5e-2,
    }
}

/// The outcome of comparing a case's outputs with its reference.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Validation {
    /// max |out - ref| / max |ref| over the compared elements; infinite if any output is not finite.
    pub error: f64,
    pub tolerance: f64,
    /// Elements compared with the reference.
    pub compared: usize,
    /// Where the worst element is, or what was not finite.
    pub detail: String,
}

impl Validation {
    pub fn passed(&self) -> bool {
        self.error.is_finite() && self.error <= self.tolerance
    }
}

/// Accumulates (output, reference) pairs into a [`Validation`].
#[derive(Debug, Default)]
pub struct Comparison {
    max_abs_err: f64,
    max_abs_ref: f64,
    worst: String,
    compared: usize,
    non_finite: Option<String>,
}

impl Comparison {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn add(&mut self, what: &dyn Fn() -> String, out: f32, reference: f64) {
        self.compared += 1;
        if !out.is_finite() {
            if self.non_finite.is_none() {
                self.non_finite = Some(format!("{} is {out} (reference {reference:.6})", what()));
            }
            return;
        }
        let err = (out as f64 - reference).abs();
        if err > self.max_abs_err {
            self.max_abs_err = err;
            self.worst = format!("{}: {out} vs {reference:.6}", what());
        }
        self.max_abs_ref = self.max_abs_ref.max(reference.abs());
    }

    /// Every element of an output must be finite (poisoned outputs start as NaN, so a
    /// forgotten element is caught even where the reference sample does not look).
    pub fn all_finite(&mut self, name: &str, values: &[f32]) {
        if self.non_finite.is_none() {
            if let Some(i) = values.iter().position(|v| !v.is_finite()) {
                self.non_finite = Some(format!(
                    "{name}[{i}] is {} (poisoned or overflowed)",
                    values[i]
                ));
            }
        }
    }

    pub fn finish(self, tolerance: f64) -> Validation {
        if let Some(detail) = self.non_finite {
            return Validation {
                error: f64::INFINITY,
                tolerance,
                compared: self.compared,
                detail,
            };
        }
        let error = if self.max_abs_ref > 0.0 {
            self.max_abs_err / self.max_abs_ref
        } else {
            self.max_abs_err
        };
        Validation {
            error,
            tolerance,
            compared: self.compared,
            detail: if self.worst.is_empty() {
                "exact".into()
            } else {
                format!("worst {}", self.worst)
            },
        }
    }
}

/// A case: its facts, whether it can run here, and how to set it up.
pub trait Case: Send + Sync {
    fn info(&self) -> &CaseInfo;
    /// Why the case cannot run on this backend, if it cannot.
    fn skip_reason(&self, _be: &dyn Backend) -> Option<String> {
        None
    }
    /// Whether the harness should record the memory timeline of the measured region.
    fn record_timeline(&self) -> bool {
        false
    }
    /// Allocate the case's buffers (through the tracked allocator) and fill its inputs with
    /// fresh random values.
    fn setup(&self, be: &dyn Backend, rng: &mut Rng) -> Result<Box<dyn Instance>>;
}

/// A set-up case, ready to run repeatedly.
pub trait Instance {
    /// One run: what is timed.
    fn run(&mut self, be: &dyn Backend) -> Result<()>;
    /// Poison the outputs, run once, and compare with the f64 reference.
    fn validate(&mut self, be: &dyn Backend, rng: &mut Rng) -> Result<Validation>;
}

/// A tensor filled with uniform values in [-scale, scale), rounded to its dtype; returns the
/// stored values (what a reference must use).
pub fn random_tensor(
    be: &dyn Backend,
    rng: &mut Rng,
    dtype: DType,
    len: usize,
    scale: f32,
    tag: &str,
) -> Result<(Tensor, Vec<f32>)> {
    let mut t = be.alloc(dtype, len, tag)?;
    let values: Vec<f32> = rng
        .fill(len, scale)
        .into_iter()
        .map(|x| dtype.round(x))
        .collect();
    be.write(&mut t, &values)?;
    Ok((t, values))
}

/// Up to `count` distinct indices below `n` (all of them when `n <= count`), sorted.
pub fn sample_indices(rng: &mut Rng, n: usize, count: usize) -> Vec<usize> {
    if n <= count {
        return (0..n).collect();
    }
    let mut v: Vec<usize> = (0..count).map(|_| rng.below(n)).collect();
    // Always include the last index: edges are where tiling goes wrong.
    v.push(n - 1);
    v.push(0);
    v.sort_unstable();
    v.dedup();
    v
}

/// Which sweep to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Profile {
    Quick,
    Full,
}

impl Profile {
    pub fn from_env() -> Result<Profile> {
        match std::env::var("HEADROOM_PROFILE").unwrap_or_default().trim() {
            "" | "quick" => Ok(Profile::Quick),
            "full" => Ok(Profile::Full),
            other => Err(crate::error::invalid(format!(
                "HEADROOM_PROFILE='{other}' is not a profile; use quick or full"
            ))),
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            Profile::Quick => "quick",
            Profile::Full => "full",
        }
    }
}

/// The benchmark cases of a profile on a backend: GPU sizes on the GPU, small ones on the CPU.
pub fn registry(profile: Profile, kind: BackendKind) -> Vec<Box<dyn Case>> {
    let mut cases: Vec<Box<dyn Case>> = Vec::new();
    cases.extend(copy::cases(profile, kind));
    cases.extend(matmul::cases(profile, kind));
    cases.extend(attention::cases(profile, kind));
    cases.extend(train::cases(profile, kind));
    cases.extend(alloc::cases(profile, kind));
    cases
}

/// The validation cases of `headroom check`: odd sizes and every form of every kernel.
pub fn check_cases(kind: BackendKind) -> Vec<Box<dyn Case>> {
    let mut cases: Vec<Box<dyn Case>> = Vec::new();
    cases.extend(copy::check_cases());
    cases.extend(matmul::check_cases(kind));
    cases.extend(attention::check_cases(kind));
    cases.extend(layers::check_cases());
    cases.extend(train::check_cases());
    cases.extend(alloc::check_cases());
    cases
}
