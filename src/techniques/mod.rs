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
pub mod collective;
pub mod copy;
pub mod layers;
pub mod loss;
pub mod matmul;
pub mod shard;
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
    /// The arithmetic the kernels actually perform where it differs from the convention
    /// (flash attention's backward recomputes the scores twice), else 0.
    #[serde(default)]
    pub work_flops: f64,
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
            work_flops: 0.0,
            bytes_moved: 0.0,
            predicted_peak_bytes: 0,
            tolerance: tolerance(dtype),
        }
    }
}

/// The headline relative bound of a case of `dtype` (its outputs' [`Bounds::of`]`.relative`).
pub fn tolerance(dtype: DType) -> f64 {
    Bounds::of(dtype).relative
}

/// How one output tensor is held to its reference: its largest error relative to its own
/// scale (max |ref| of that tensor), and element by element in the manner of
/// `torch.testing.assert_close`: |out - ref| <= atol + rtol·|ref|.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Bounds {
    /// Bound on max |out - ref| / max |ref| over the tensor.
    pub relative: f64,
    /// atol as a fraction of the tensor's reference RMS (so it scales with the tensor).
    pub atol_of_rms: f64,
    pub rtol: f64,
}

/// The comparison of one output tensor with its reference.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TensorCheck {
    /// The tensor's name ("O", "dK", "layer 2 qkv_weight" ...).
    pub name: String,
    /// Elements compared with the reference.
    pub compared: usize,
    /// max |out - ref| / max |ref| over the compared elements (infinite if any is not finite).
    pub error: f64,
    /// The bound on `error`.
    pub tolerance: f64,
    /// max |ref| of the compared elements.
    pub scale: f64,
    /// The element-wise bound's absolute part (in the tensor's units) and relative part.
    pub atol: f64,
    pub rtol: f64,
    /// Elements outside atol + rtol·|ref| (non-finite ones included).
    pub violations: usize,
    /// The worst element: where it is, its value and the reference's.
    pub worst: String,
}

impl TensorCheck {
    pub fn passed(&self) -> bool {
        self.error.is_finite() && self.error <= self.tolerance && self.violations == 0
    }
}

/// The outcome of comparing a case's outputs with its reference, tensor by tensor.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Validation {
    /// The worst tensor's `error` (relative to its own scale); infinite if any output is not
    /// finite.
    pub error: f64,
    /// The worst tensor's tolerance.
    pub tolerance: f64,
    /// Elements compared with the reference, over every tensor.
    pub compared: usize,
    /// What was checked, and the worst tensor and element.
    pub detail: String,
    /// Every tensor's own comparison (absent in reports older than schema 2).
    #[serde(default)]
    pub tensors: Vec<TensorCheck>,
}

impl Validation {
    pub fn passed(&self) -> bool {
        self.error.is_finite()
            && self.error <= self.tolerance
            && self.tensors.iter().all(TensorCheck::passed)
    }

    /// A validation from its tensors' checks: fails when any one fails, and names the worst
    /// (a failing tensor before a passing one, then the largest error over tolerance).
    pub fn from_checks(tensors: Vec<TensorCheck>) -> Validation {
        let badness = |t: &TensorCheck| -> (bool, f64) {
            let ratio = if t.tolerance > 0.0 {
                t.error / t.tolerance
            } else if t.error > 0.0 {
                f64::INFINITY
            } else {
                0.0
            };
            (
                !t.passed(),
                if ratio.is_nan() { f64::INFINITY } else { ratio },
            )
        };
        let worst = tensors
            .iter()
            .max_by(|a, b| badness(a).partial_cmp(&badness(b)).expect("no NaN ratio"));
        let compared = tensors.iter().map(|t| t.compared).sum();
        match worst {
            None => Validation {
                error: f64::INFINITY,
                tolerance: 0.0,
                compared: 0,
                detail: "nothing was compared".into(),
                tensors,
            },
            Some(w) => Validation {
                error: w.error,
                tolerance: w.tolerance,
                compared,
                detail: format!(
                    "worst tensor {} ({} of {} elements outside {:.1e} + {:.1e}·|ref|): {}",
                    w.name, w.violations, w.compared, w.atol, w.rtol, w.worst
                ),
                tensors,
            },
        }
    }
}

/// `got` against `want` element by element: bitwise (`exact`) or within `rel` of the
/// tensor's largest reference magnitude (floored at `floor`); NaN never passes. `want` is
/// f32 (another run's output) or f64 (a reference).
pub(crate) fn tensor_check<W: Copy + Into<f64> + std::fmt::Display>(
    name: String,
    got: &[f32],
    want: &[W],
    exact: bool,
    rel: f64,
    floor: f64,
) -> TensorCheck {
    let scale = want.iter().fold(floor, |m, &x| m.max(x.into().abs()));
    let atol = rel * scale;
    let (mut max_err, mut violations, mut worst_at) = (0f64, 0usize, None::<usize>);
    for (j, (&g, &w)) in got.iter().zip(want).enumerate() {
        let (g64, w64): (f64, f64) = (g.into(), w.into());
        // f32 to f64 is exact and one to one, so equal bits here are equal bits there.
        let bad = if exact {
            g64.to_bits() != w64.to_bits()
        } else {
            !g.is_finite() || (g64 - w64).abs() > atol
        };
        let e = if g.is_finite() {
            (g64 - w64).abs()
        } else {
            f64::INFINITY
        };
        if bad {
            violations += 1;
        }
        if e > max_err || (bad && worst_at.is_none()) {
            max_err = max_err.max(e);
            worst_at = Some(j);
        }
    }
    if got.len() != want.len() {
        violations += 1;
    }
    let error = if scale > 0.0 {
        max_err / scale
    } else {
        max_err
    };
    TensorCheck {
        worst: match worst_at {
            Some(j) => format!("{name}[{j}]: {} vs {}", got[j], want[j]),
            None => "exact".into(),
        },
        name,
        compared: got.len(),
        error: if violations > 0 && error == 0.0 {
            f64::INFINITY
        } else {
            error
        },
        tolerance: if exact { 0.0 } else { rel },
        scale,
        atol: if exact { 0.0 } else { atol },
        rtol: 0.0,
        violations,
    }
}

impl Bounds {
    /// Exact equality, element by element (copies and permutations).
    pub const EXACT: Bounds = Bounds {
        relative: 0.0,
        atol_of_rms: 0.0,
        rtol: 0.0,
    };

    /// The bounds an output of `dtype` is held to, from the errors `headroom check` measures
    /// on the CPU backend (six seeds, every check case; the README has the table).
    ///
    /// fp32: 1e-4 of the tensor's scale, element-wise 1e-4·rms + 2e-4·|ref|. The worst fp32
    /// tensor comes to 0.07 of the first and 0.29 of the second (attention's dQ: scores of
    /// tens, each rounded to 2^-24 of itself, move exp by that much times the score, and
    /// dS = P (dP - delta) cancels). The GPU kernels' exp2 approximations (2 ulp, CUDA C
    /// Programming Guide, "Mathematical Functions") and other summation orders add errors
    /// of the same order, inside the remaining 3.5x.
    ///
    /// bf16: 1.5e-2 of the scale, element-wise 1e-2·rms + 1.6e-2·|ref| (torch.testing's bf16
    /// rtol). One bf16 store is off by up to 2^-9 of a value (2^-8 just above a power of
    /// two), which alone is 0.13 to 0.25 of the relative bound; the worst bf16 tensor comes
    /// to 0.25 of the first and 0.39 of the second (flash attention's O, whose probabilities
    /// pass through bf16 before P·V). A GPU rounds P and dS to bf16 before every product,
    /// as the CPU stand-in does not in the backward: the margin of 2.5x is for that.
    /// atol + rtol = 0.026 of the RMS stays half of 0.05: an element off by 5% of itself
    /// (or of the RMS, if smaller) fails, which the mutation tests hold to.
    pub fn of(dtype: DType) -> Bounds {
        match dtype {
            DType::F32 | DType::I32 => Bounds {
                relative: 1e-4,
                atol_of_rms: 1e-4,
                rtol: 2e-4,
            },
            DType::Bf16 => Bounds {
                relative: 1.5e-2,
                atol_of_rms: 1e-2,
                rtol: 1.6e-2,
            },
        }
    }

    /// An fp32 statistic (logsumexp, attention's delta, layernorm's mean and rstd): fp32 in
    /// every case, so held to fp32 bounds in bf16 cases too, its reference computed from the
    /// stored values it was computed from.
    pub fn statistic() -> Bounds {
        Bounds::of(DType::F32)
    }
}

/// One tensor's running comparison.
#[derive(Debug)]
struct Running {
    name: String,
    bounds: Bounds,
    /// The least scale the tensor is measured against (see [`Comparison::floor`]).
    floor: f64,
    compared: usize,
    max_abs_err: f64,
    max_abs_ref: f64,
    sum_sq_ref: f64,
    /// (|out - ref|, |ref|) of every finite element, for the element-wise count at the end.
    pairs: Vec<(f32, f32)>,
    /// The worst excess |out - ref| - rtol·|ref| so far and where it is.
    worst_excess: f64,
    worst: String,
    non_finite: usize,
    first_non_finite: Option<String>,
}

impl Running {
    fn finish(self) -> TensorCheck {
        let n = self.pairs.len();
        let rms = if n > 0 {
            (self.sum_sq_ref / n as f64).sqrt()
        } else {
            0.0
        }
        .max(self.floor);
        let scale = self.max_abs_ref.max(self.floor);
        let atol = self.bounds.atol_of_rms * rms;
        let rtol = self.bounds.rtol;
        let mut outside = 0;
        // The largest |out - ref| / (atol + rtol·|ref|): how near the closest element came to
        // its bound (0 when every element is exact).
        let mut closest = 0f64;
        for &(e, r) in &self.pairs {
            let (e, bound) = (e as f64, atol + rtol * r as f64);
            if e > bound {
                outside += 1;
            }
            let ratio = if bound > 0.0 {
                e / bound
            } else if e > 0.0 {
                f64::INFINITY
            } else {
                0.0
            };
            closest = closest.max(ratio);
        }
        let (error, worst) = match self.first_non_finite {
            Some(w) => (f64::INFINITY, w),
            None => (
                if scale > 0.0 {
                    self.max_abs_err / scale
                } else {
                    self.max_abs_err
                },
                if self.worst.is_empty() {
                    "exact".into()
                } else {
                    format!(
                        "{} (the closest element is at {closest:.2} of its bound)",
                        self.worst
                    )
                },
            ),
        };
        TensorCheck {
            name: self.name,
            compared: self.compared,
            error,
            tolerance: self.bounds.relative,
            scale,
            atol,
            rtol,
            violations: outside + self.non_finite,
            worst,
        }
    }
}

/// Accumulates (output, reference) pairs, tensor by tensor, into a [`Validation`]: each
/// tensor is held to its own scale and to the element-wise bound (see [`Bounds`]).
#[derive(Debug)]
pub struct Comparison {
    default: Bounds,
    /// In order of first appearance.
    tensors: Vec<Running>,
}

impl Comparison {
    /// Every tensor held to `dtype`'s default bounds unless [`Comparison::bounds`] says otherwise.
    pub fn new(dtype: DType) -> Self {
        Comparison {
            default: Bounds::of(dtype),
            tensors: Vec::new(),
        }
    }

    fn running(&mut self, tensor: &str) -> &mut Running {
        let i = match self.tensors.iter().position(|t| t.name == tensor) {
            Some(i) => i,
            None => {
                self.tensors.push(Running {
                    name: tensor.to_string(),
                    bounds: self.default,
                    floor: 0.0,
                    compared: 0,
                    max_abs_err: 0.0,
                    max_abs_ref: 0.0,
                    sum_sq_ref: 0.0,
                    pairs: Vec::new(),
                    worst_excess: f64::NEG_INFINITY,
                    worst: String::new(),
                    non_finite: 0,
                    first_non_finite: None,
                });
                self.tensors.len() - 1
            }
        };
        &mut self.tensors[i]
    }

    /// Hold `tensor` to other bounds than the default (an fp32 statistic in a bf16 case).
    pub fn bounds(&mut self, tensor: &str, bounds: Bounds) {
        self.running(tensor).bounds = bounds;
    }

    /// Measure `tensor` against at least `floor`, both its scale (max |ref|) and the RMS its
    /// atol is a fraction of: for a tensor whose reference can vanish in exact arithmetic
    /// (attention's dQ and dK when each row sees one key), where the output is rounding noise
    /// that no bound relative to zero could admit.
    pub fn floor(&mut self, tensor: &str, floor: f64) {
        self.running(tensor).floor = floor;
    }

    /// The largest reference magnitude of `tensor` so far (0 if none was added).
    pub fn scale_of(&self, tensor: &str) -> f64 {
        self.tensors
            .iter()
            .find(|t| t.name == tensor)
            .map_or(0.0, |t| t.max_abs_ref)
    }

    /// One element of `tensor`: `at` says where it is (called only when it is the worst so far).
    pub fn add(&mut self, tensor: &str, at: &dyn Fn() -> String, out: f32, reference: f64) {
        self.add_allowing(tensor, at, out, reference, 0.0);
    }

    /// One element whose inputs are known to be rounded before the sum that makes it: its
    /// error beyond `allowance` (the forward error bound of that rounding, u·Σ|terms|, which
    /// for an element whose terms nearly cancel is far more than its bound relative to the
    /// tensor) is what the bounds hold.
    pub fn add_allowing(
        &mut self,
        tensor: &str,
        at: &dyn Fn() -> String,
        out: f32,
        reference: f64,
        allowance: f64,
    ) {
        let t = self.running(tensor);
        t.compared += 1;
        if !out.is_finite() {
            t.non_finite += 1;
            if t.first_non_finite.is_none() {
                t.first_non_finite = Some(format!("{} is {out} (reference {reference:.6})", at()));
            }
            return;
        }
        let err = ((out as f64 - reference).abs() - allowance).max(0.0);
        t.max_abs_err = t.max_abs_err.max(err);
        t.max_abs_ref = t.max_abs_ref.max(reference.abs());
        t.sum_sq_ref += reference * reference;
        t.pairs.push((err as f32, reference.abs() as f32));
        let excess = err - t.bounds.rtol * reference.abs();
        if excess > t.worst_excess {
            t.worst_excess = excess;
            t.worst = format!("{}: {out} vs {reference:.6}", at());
        }
    }

    /// Every element of an output must be finite (poisoned outputs start as NaN, so a
    /// forgotten element is caught even where the reference sample does not look).
    pub fn all_finite(&mut self, tensor: &str, values: &[f32]) {
        let bad = values.iter().filter(|v| !v.is_finite()).count();
        if bad > 0 {
            let i = values.iter().position(|v| !v.is_finite()).expect("counted");
            let t = self.running(tensor);
            t.non_finite += bad;
            if t.first_non_finite.is_none() {
                t.first_non_finite = Some(format!(
                    "{tensor}[{i}] is {} ({bad} non-finite elements: poisoned or overflowed)",
                    values[i]
                ));
            }
        }
    }

    pub fn finish(self) -> Validation {
        Validation::from_checks(self.tensors.into_iter().map(Running::finish).collect())
    }
}

/// A case: its facts, whether it can run here, and how to set it up.
pub trait Case: Send + Sync {
    fn info(&self) -> &CaseInfo;
    /// Whether a run does no device work (an allocator replay on the host), so that it is
    /// timed by the host clock rather than device events.
    fn host_only(&self) -> bool {
        false
    }
    /// Why the case cannot run on this backend, if it cannot.
    fn skip_reason(&self, _be: &dyn Backend) -> Option<String> {
        None
    }
    /// Allocate the case's buffers (through the tracked allocator) and fill its inputs with
    /// fresh random values.
    fn setup(&self, be: &dyn Backend, rng: &mut Rng) -> Result<Box<dyn Instance>>;
}

/// A set-up case, ready to run repeatedly.
pub trait Instance {
    /// One run: what is timed.
    fn run(&mut self, be: &dyn Backend) -> Result<()>;
    /// Poison the outputs, run once, read every output back, hand each to `tamper` (which
    /// leaves it alone outside the mutation tests), and compare with the f64 reference.
    fn validate(
        &mut self,
        be: &dyn Backend,
        rng: &mut Rng,
        tamper: &mut Tamper<'_>,
    ) -> Result<Validation>;
    /// The memory timeline of one run, by category, for cases that draw one (after a
    /// validation that passed; outside the measured memory region).
    fn timeline(&mut self, _be: &dyn Backend) -> Result<Option<crate::report::Timeline>> {
        Ok(None)
    }
    /// A sharded case's per-rank figures, given rank 0's measured peak (the suite's
    /// backend's); other ranks' come from their own backends.
    fn shard_record(&self, _rank0_peak: u64) -> Option<crate::shard::ShardRecord> {
        None
    }
}

/// One output as read back for validation, before it is compared.
pub struct Readback<'a> {
    /// The tensor's name, as the validation names it ("O", "dK", "C", ...).
    pub name: &'a str,
    pub values: &'a mut [f32],
    /// Elements per row (the innermost dimension), so a mutation can swap rows.
    pub row: usize,
}

/// What validation does to each output between reading it back and comparing it: nothing,
/// except in the mutation tests, which corrupt one output to show that the check fails.
pub type Tamper<'a> = dyn FnMut(Readback<'_>) + 'a;

/// The tamper of a real validation: every output as it was read.
pub fn untouched(_: Readback<'_>) {}

/// Deterministic corruptions of one read-back output, for the mutation tests: each must make
/// the validation fail and name the corrupted tensor (a check that a mutation cannot fail is
/// worth nothing).
pub mod mutation {
    use super::Readback;

    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub enum Mutation {
        /// Every element zero (a kernel that wrote nothing, or wrote into the wrong buffer).
        Zero,
        /// 1% of the elements (at least one), spread evenly from the first to the last, off
        /// by 5%: of the element, or of the tensor's RMS where the element is smaller than
        /// that (5% of a value near zero would be no error at all).
        Perturb,
        /// The first row swapped with the last row that differs from it (an indexing slip).
        SwapRows,
        /// The middle element NaN.
        Nan,
    }

    impl Mutation {
        pub const ALL: [Mutation; 4] = [
            Mutation::Zero,
            Mutation::Perturb,
            Mutation::SwapRows,
            Mutation::Nan,
        ];

        pub fn name(self) -> &'static str {
            match self {
                Mutation::Zero => "zeroed",
                Mutation::Perturb => "1% of elements off by 5%",
                Mutation::SwapRows => "two rows swapped",
                Mutation::Nan => "one NaN",
            }
        }
    }

    /// Applies `m` to `out` in place; returns whether any value changed (false when the tensor
    /// is already all zeros, or has no two different rows to swap).
    pub fn apply(m: Mutation, out: &mut Readback<'_>) -> bool {
        let v = &mut *out.values;
        if v.is_empty() {
            return false;
        }
        match m {
            Mutation::Zero => {
                let changed = v.iter().any(|x| x.to_bits() != 0);
                v.iter_mut().for_each(|x| *x = 0.0);
                changed
            }
            Mutation::Perturb => {
                let finite: Vec<f64> = v
                    .iter()
                    .filter(|x| x.is_finite())
                    .map(|&x| x as f64)
                    .collect();
                let rms = if finite.is_empty() {
                    0.0
                } else {
                    (finite.iter().map(|x| x * x).sum::<f64>() / finite.len() as f64).sqrt()
                };
                let count = (v.len() / 100).max(1);
                let mut changed = false;
                for k in 0..count {
                    // Evenly spread, the first and the last element included.
                    let i = if count == 1 {
                        v.len() / 2
                    } else {
                        k * (v.len() - 1) / (count - 1)
                    };
                    let x = v[i] as f64;
                    let delta = 0.05 * x.abs().max(rms);
                    let y = (if x < 0.0 { x - delta } else { x + delta }) as f32;
                    changed |= y != v[i];
                    v[i] = y;
                }
                changed
            }
            Mutation::SwapRows => {
                let row = out.row.max(1);
                let rows = v.len() / row;
                if rows < 2 {
                    return false;
                }
                let first = v[..row].to_vec();
                let Some(r) = (1..rows)
                    .rev()
                    .find(|&r| v[r * row..(r + 1) * row] != first[..])
                else {
                    return false;
                };
                let (head, tail) = v.split_at_mut(r * row);
                head[..row].swap_with_slice(&mut tail[..row]);
                true
            }
            Mutation::Nan => {
                let i = v.len() / 2;
                v[i] = f32::NAN;
                true
            }
        }
    }
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
    cases.extend(loss::cases(profile, kind));
    cases.extend(train::cases(profile, kind));
    cases.extend(shard::cases(profile, kind));
    cases.extend(collective::cases(profile, kind));
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
    cases.extend(loss::check_cases());
    cases.extend(train::check_cases());
    cases.extend(shard::check_cases(kind));
    cases.extend(collective::check_cases());
    cases.extend(alloc::check_cases(kind));
    cases
}
