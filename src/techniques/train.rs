//! A training step of a transformer-block stack under every memory policy: checkpointing
//! (none, full, every k, selective), attention (naive, flash), precision (fp32, bf16 with
//! fp32 master weights) and micro-batching. See `src/model` for the schedule and its memory
//! model.
//!
//! FLOPs are the model's (6·params·tokens for the matmuls plus FlashAttention's count for
//! the causal attention), not the hardware's: recomputation shows as a lower rate, the way
//! model-FLOPs utilization is reported.

use crate::backend::cpu::CpuBackend;
use crate::backend::{AttentionShape, Backend, BackendKind, Tensor};
use crate::dtype::DType;
use crate::error::Result;
use crate::model::memory;
use crate::model::{
    unit_specs, Arch, Bias, Checkpoint, HeadLoss, InitialValues, Mlp, ModelShape, Norm, Policy,
    TrainState,
};
use crate::report::Timeline;
use crate::rng::Rng;
use crate::techniques::attention::{self, Pass, Variant};
use crate::techniques::{
    Case, CaseInfo, Instance, Profile, Readback, Tamper, TensorCheck, Validation,
};

/// Up to this many (parameters × tokens), validation also compares every gradient with the
/// CPU backend's fp32 reference step (GPT-2 small at its benchmark size is 85M × 8192, far
/// beyond what a host runs in seconds).
pub const REFERENCE_LIMIT: usize = 400_000_000;

/// Tolerances of the gradients against the fp32 full-batch reference without checkpointing,
/// relative to each tensor's largest gradient:
/// - exact (0) on the CPU backend with fp32 and one micro-batch: checkpointing recomputes
///   with the same code in the same order, so any difference is a bug;
/// - 1e-4 for fp32 otherwise: micro-batches (or the GPU's kernels) sum the same terms in
///   another order, and the relative rounding of a sum of n terms grows like n·2^-24 at worst
///   (measured on the CPU with two micro-batches: under 5e-7);
/// - 5e-2 for bf16 activations: each stored activation is rounded to 8 significant bits
///   (2^-9 relative), and a gradient passes through about ten such roundings per block
///   (measured on the CPU over three seeds: at most 1.9e-2).
pub(crate) fn grad_tolerance(be: BackendKind, policy: &Policy) -> f64 {
    match policy.dtype {
        DType::Bf16 => 5e-2,
        DType::F32 | DType::I32 if be == BackendKind::Cpu && policy.micro_batches == 1 => 0.0,
        DType::F32 | DType::I32 => 1e-4,
    }
}

/// The element-wise part of the reference comparison, |got - want| <= atol + rtol·|want|
/// with atol a fraction of the RMS of the element's row, or of its tensor where that is
/// larger (floored like its scale; the tensor's figure is the one reported): zero where the
/// comparison is exact; fp32 1e-4·rms + 1e-4·|want| (measured on the CPU with two
/// micro-batches: under 6e-7·rms); bf16 0.2·rms + 1.6e-2·|want| (torch.testing's bf16 rtol;
/// the measured need at that rtol was 5.7e-2·rms: a bf16 gradient is off by a few percent of
/// its tensor's typical value wherever the stored activations round against it).
fn grad_elementwise(tolerance: f64, dtype: DType) -> (f64, f64) {
    if tolerance == 0.0 {
        return (0.0, 0.0);
    }
    match dtype {
        DType::F32 | DType::I32 => (1e-4, 1e-4),
        DType::Bf16 => (0.2, 1.6e-2),
    }
}

/// The directional-derivative check: for each half of each layer (see [`PROBE_GROUPS`]), a
/// direction v over all of that half's parameters, and ⟨g, v⟩ against the central difference (L(w+εv) - L(w-εv)) / 2ε of the
/// loss computed by forward passes only.
///
/// The direction: v_i = a_T·s_i·r_i for element i of parameter tensor T, with a_T the RMS of
/// T's weights (so ε is a relative step: every weight moves by 0.5ε to 1.5ε of its tensor's
/// typical size), r_i uniform in [0.5, 1.5) from the case's random stream, and s_i the sign
/// of the gradient under test (random where it is zero). Aligning the signs makes ⟨g, v⟩ a
/// sum of positive terms, about ‖g‖₁, rather than a random ±‖g‖₂ that is near zero by chance
/// one time in a few dozen; it cannot help a wrong gradient, because the bound below is set
/// by the measured difference alone: a probe's gradient zeroed gives ⟨g, v⟩ = 0 and an error
/// of exactly 1, negated 2, scaled by 1.05 about 0.05; one tensor of the probe negated or
/// permuted (a sign or layout slip) shows as an error of about (twice) its share of ⟨g, v⟩.
/// What it does not see is one tensor zeroed inside a probe: that tensor's signs are then
/// random, so it drops out of both sides. A missing gradient is a schedule bug, and the
/// schedule is the same code at every size: the reference step at the check sizes finds it.
///
/// The loss is the fp32 forward of the fp32 master weights, summed in f64 on the host, also
/// under a bf16 policy: a step of ε = 1e-3 of a weight is below bf16's resolution (2^-9 of
/// the weight), so the bf16 copies would round most perturbations away, and the bf16
/// forward's own loss moves by about 2^-9/√n of itself with every re-rounding of its outputs,
/// which at the check sizes is as large as the signal. The gradient of a bf16 step
/// approximates the derivative of exactly this fp32 loss (the master weights are what the
/// optimizer updates), so the difference between the two is the bf16 gradient's precision,
/// bounded separately.
///
/// The bound, relative to the measured difference D = (L(w+εv) - L(w-εv)) / 2ε:
///   |⟨g, v⟩ - D| / |D| <= K·ε² + η·|L| / (ε·|D|) + β, and never looser than 1/2, where
/// - K·ε² bounds the central difference's truncation, ε²/6 · φ‴(0)/φ′(0) with
///   φ(t) = L(w + t·v): measured on the CPU, ε²·0.7 for the 3-block check model and ε²·7.2
///   for 12 blocks of hidden 256 (it grows with depth); K = 100 leaves a factor 14;
/// - η·|L|/ε bounds the rounding: the computed loss is L·(1 + δ) with |δ| about c·u/√n for
///   n output elements, each rounded through c operations of unit roundoff u = 2^-24 with
///   independent signs (the f64 sum adds nothing); c = 200 gives η = 1.3e-7 at the check
///   size, 50 times the 2.5e-9 measured there (at ε = 1e-4, where rounding dominates);
/// - β is the gradient's own precision against the exact derivative of the fp32 loss: fp32
///   1e-5 (summation order; 0 on the CPU against its own loss), bf16 5e-3 (measured on the
///   CPU: at most 4.8e-4 over the check policies, in an attention probe, and 3.3e-4 for
///   whole layers of a 12-block model of hidden 256: a factor 10).
///
/// ε = 1e-3 roughly balances the first two terms at the check size ((η/2K)^(1/3) = 9e-4 for
/// |D| ≈ |L|; measured, D/L is about 1.0 for an MLP probe and 0.18 for an attention probe);
/// the fp32 bound is then 2e-4 (MLP) to 9e-4 (attention) and the bf16 one 5e-3 to 6e-3,
/// against the 4.8% error of a gradient scaled by 1.05. The cap at 1/2 makes a zeroed
/// gradient (error exactly 1) fail even where the loss barely moves.
const PROBE_STEP: f64 = 1e-3;
/// The probes of each block, by index in its [`crate::model::Layout`]: one over the
/// attention half (ln1, q, k, v, proj) and one over the MLP half (ln2, fc (gate, up), fc2);
/// with a vocabulary, one more over the root (embedding, positions, final norm, head). One probe over the whole layer
/// would be dominated by the MLP's matrices (84% of ⟨g, v⟩ on the check model, q and k 0.25%
/// each), so a sign or layout slip in q's or k's gradient would hide under a bf16 bound;
/// split, q and k weigh about 2% of their probe each, above every bound (v and proj 45%,
/// fc and fc2 48%). Four forward passes per layer: 48 for GPT-2 small.
fn probe_groups(shape: &ModelShape, unit: usize) -> Vec<(&'static str, std::ops::Range<usize>)> {
    if unit < shape.layers {
        let layout = shape.layout();
        vec![
            ("attention", 0..layout.attention_end),
            ("MLP", layout.attention_end..layout.params.len()),
        ]
    } else {
        let root = shape.root_layout().map_or(0, |r| r.params.len());
        vec![("embedding, final norm and head", 0..root)]
    }
}
const PROBE_TRUNCATION: f64 = 100.0;
const PROBE_ROUNDING_OPS: f64 = 200.0;
const PROBE_LOOSEST: f64 = 0.5;

fn probe_gradient_precision(dtype: DType) -> f64 {
    match dtype {
        DType::F32 | DType::I32 => 1e-5,
        DType::Bf16 => 5e-3,
    }
}

pub struct TrainCase {
    info: CaseInfo,
    shape: ModelShape,
    policy: Policy,
    reference_limit: usize,
}

impl TrainCase {
    pub fn new(shape: ModelShape, policy: Policy) -> Self {
        TrainCase::with_reference_limit(shape, policy, REFERENCE_LIMIT)
    }

    /// A case whose validation compares with the CPU reference step only up to
    /// `reference_limit` (parameters × tokens): tests set 0 to validate a small model the
    /// way the benchmark's large ones are, by directional derivatives and bitwise equality.
    pub fn with_reference_limit(shape: ModelShape, policy: Policy, reference_limit: usize) -> Self {
        let mut info = CaseInfo::new("train", &policy.name(), policy.dtype, shape.name());
        let tokens = (shape.batch * shape.seq) as f64;
        let att = AttentionShape::new(shape.batch, shape.heads, shape.seq, shape.head_dim(), true);
        info.flops = 6.0 * shape.flop_params() as f64 * tokens
            + shape.layers as f64 * attention::flops(Pass::ForwardBackward, &att);
        let model = memory::model(&shape, &policy);
        info.predicted_peak_bytes = model.peak;
        info.bytes_moved = model.peak as f64;
        info.tolerance = grad_tolerance(BackendKind::Cuda, &policy);
        TrainCase {
            info,
            shape,
            policy,
            reference_limit,
        }
    }

    pub fn shape(&self) -> &ModelShape {
        &self.shape
    }
    pub fn policy(&self) -> &Policy {
        &self.policy
    }
}

struct TrainInstance {
    state: TrainState,
    init: InitialValues,
    kind: BackendKind,
    reference_limit: usize,
}

impl Case for TrainCase {
    fn info(&self) -> &CaseInfo {
        &self.info
    }

    fn skip_reason(&self, be: &dyn Backend) -> Option<String> {
        // The directional check runs fp32 forwards (the SIMT kernel) under every policy.
        if let Err(e) = be.matmul_available(crate::backend::MatmulKernel::Simt, DType::F32) {
            return Some(e);
        }
        // Every matmul of a bf16 policy takes mma.sync where wgmma does not apply.
        if self.policy.dtype == DType::Bf16 {
            return be
                .matmul_available(crate::backend::MatmulKernel::Mma, DType::Bf16)
                .err();
        }
        None
    }

    fn setup(&self, be: &dyn Backend, rng: &mut Rng) -> Result<Box<dyn Instance>> {
        let init = InitialValues::random(&self.shape, rng);
        let state = TrainState::new(be, self.shape, self.policy, &init)?;
        Ok(Box::new(TrainInstance {
            state,
            init,
            kind: be.kind(),
            reference_limit: self.reference_limit,
        }))
    }
}

/// The name of a gradient as validation reads it back and records it: `layer 2 q.weight.grad`,
/// or `head.weight.grad` outside the blocks.
pub fn grad_name(shape: &ModelShape, unit: usize, param: usize) -> String {
    let specs = unit_specs(shape);
    let name = specs[unit][param].name;
    if unit < shape.layers {
        format!("layer {unit} {name}.grad")
    } else {
        format!("{name}.grad")
    }
}

fn finite_or_inf(x: f64) -> f64 {
    if x.is_finite() {
        x
    } else {
        f64::INFINITY
    }
}

pub(crate) fn loss_check(loss: f32) -> TensorCheck {
    TensorCheck {
        name: "loss".into(),
        compared: 1,
        error: if loss.is_finite() { 0.0 } else { f64::INFINITY },
        tolerance: 0.0,
        scale: loss.abs() as f64,
        atol: 0.0,
        rtol: 0.0,
        violations: usize::from(!loss.is_finite()),
        worst: format!("the loss is {loss}"),
    }
}

/// Every gradient tensor against the reference's: its largest error relative to the larger
/// of its own largest reference magnitude and a thousandth of the model's largest gradient,
/// and element by element (see [`grad_elementwise`]). The floor matters for the key bias:
/// its gradient is zero in exact arithmetic (adding q·b_k to a whole score row leaves the
/// softmax unchanged), so its reference is rounding noise that no relative error could match.
pub(crate) fn reference_checks(
    shape: &ModelShape,
    got: &[Vec<Vec<f32>>],
    want: &[Vec<Vec<f32>>],
    tolerance: f64,
    dtype: DType,
) -> Vec<TensorCheck> {
    let global = want
        .iter()
        .flatten()
        .flatten()
        .fold(0f64, |m, x| m.max(x.abs() as f64));
    let floor = 1e-3 * global;
    let (atol_of_rms, rtol) = grad_elementwise(tolerance, dtype);
    let specs = unit_specs(shape);
    let mut checks = Vec::new();
    for (l, (g_layer, w_layer)) in got.iter().zip(want).enumerate() {
        for (i, (g, w)) in g_layer.iter().zip(w_layer).enumerate() {
            let name = grad_name(shape, l, i);
            let scale = w.iter().fold(floor, |m, x| m.max(x.abs() as f64));
            // The RMS over the elements the reference makes nonzero: the typical size of a
            // gradient where it has one. A dense tensor's is its RMS; the embedding table's
            // gradient is nonzero only in the rows of the ids a batch holds (66 of 4099 in
            // the check cases), and an RMS over all its rows would be a fraction of any of
            // its values.
            let nonzero = w.iter().filter(|&&x| x != 0.0).count().max(1);
            let rms = (w.iter().map(|&x| x as f64 * x as f64).sum::<f64>() / nonzero as f64)
                .sqrt()
                .max(floor);
            let atol = atol_of_rms * rms;
            // A row's own RMS where it is larger: a weight gradient's rows (an input unit's,
            // or a vocabulary entry's) differ in size by orders of magnitude, and an element's
            // rounding error follows the size of the terms it sums, which its row shares. The
            // head's gradient is the case in point: the rows of the tokens a batch holds
            // are tens of times its RMS, which the other 4000 rows pull down.
            let row = specs[l][i].row.clamp(1, g.len().max(1));
            let row_atol: Vec<f64> = w
                .chunks(row)
                .map(|r| {
                    let ms = r.iter().map(|&x| x as f64 * x as f64).sum::<f64>() / r.len() as f64;
                    atol_of_rms * ms.sqrt().max(rms)
                })
                .collect();
            let (mut max_err, mut violations) = (0f64, 0usize);
            let (mut worst_at, mut worst_excess) = (None, f64::NEG_INFINITY);
            let mut non_finite = None;
            for (j, (&a, &b)) in g.iter().zip(w).enumerate() {
                if !a.is_finite() {
                    violations += 1;
                    non_finite.get_or_insert(j);
                    continue;
                }
                let e = (a as f64 - b as f64).abs();
                max_err = max_err.max(e);
                let excess = e - rtol * (b as f64).abs() - row_atol[j / row];
                if excess > 0.0 {
                    violations += 1;
                }
                if excess > worst_excess {
                    worst_excess = excess;
                    worst_at = Some(j);
                }
            }
            let (error, worst) = match (non_finite, worst_at) {
                (Some(j), _) => (f64::INFINITY, format!("{name}[{j}] is {}", g[j])),
                (None, Some(j)) if max_err > 0.0 => (
                    max_err / scale,
                    format!("{name}[{j}]: {} vs {}", g[j], w[j]),
                ),
                _ => (0.0, "exact".into()),
            };
            checks.push(TensorCheck {
                name,
                compared: g.len(),
                error,
                tolerance,
                scale,
                atol,
                rtol,
                violations,
                worst,
            });
        }
    }
    checks
}

/// One check per layer: every gradient of the layer bitwise equal to `want`'s (a run that
/// must give the same bits: another checkpointing policy, or the same step again).
fn bitwise_checks(
    shape: &ModelShape,
    got: &[Vec<Vec<f32>>],
    want: &[Vec<Vec<f32>>],
    against: &str,
) -> Vec<TensorCheck> {
    got.iter()
        .zip(want)
        .enumerate()
        .map(|(l, (g_layer, w_layer))| {
            let scale = w_layer
                .iter()
                .flatten()
                .fold(0f64, |m, x| m.max(x.abs() as f64));
            let (mut differ, mut max_err, mut first) = (0usize, 0f64, None);
            for (i, (g, w)) in g_layer.iter().zip(w_layer).enumerate() {
                for (j, (a, b)) in g.iter().zip(w).enumerate() {
                    if a.to_bits() != b.to_bits() {
                        differ += 1;
                        max_err = max_err.max(finite_or_inf((*a as f64 - *b as f64).abs()));
                        first.get_or_insert((i, j, *a, *b));
                    }
                }
            }
            let worst = match first {
                Some((i, j, a, b)) => format!(
                    "{}[{j}]: {a} vs {b} ({differ} elements of the layer differ)",
                    grad_name(shape, l, i)
                ),
                None => "bitwise equal".into(),
            };
            TensorCheck {
                name: match l < shape.layers {
                    true => format!("layer {l} gradients, bitwise vs {against}"),
                    false => {
                        format!("embedding, final norm and head gradients, bitwise vs {against}")
                    }
                },
                compared: g_layer.iter().map(Vec::len).sum(),
                error: if scale > 0.0 {
                    max_err / scale
                } else {
                    max_err
                },
                tolerance: 0.0,
                scale,
                atol: 0.0,
                rtol: 0.0,
                violations: differ,
                worst,
            }
        })
        .collect()
}

/// The sign a direction gives element i: the gradient's, or a random one where it is zero.
fn direction_sign(g: f32, rng: &mut Rng) -> f64 {
    let negative = if g == 0.0 || g.is_nan() {
        rng.uniform() < 0.0
    } else {
        g < 0.0
    };
    if negative {
        -1.0
    } else {
        1.0
    }
}

/// The directional-derivative checks, two per layer (see [`PROBE_STEP`] for the direction,
/// the step and the bound). The master weights are restored bitwise from host copies after
/// each probe, whether or not it succeeded; gradients, optimizer state and the bf16 copies
/// are never touched. Public for the tests that show the state is restored.
pub fn directional_checks(
    st: &mut TrainState,
    be: &dyn Backend,
    grads: &[Vec<Vec<f32>>],
    seed: u64,
) -> Result<Vec<TensorCheck>> {
    let sh = st.shape;
    let host_inputs = match (st.policy.dtype, sh.vocab()) {
        (DType::Bf16, 0) => st
            .inputs
            .iter()
            .map(|t| be.read(t))
            .collect::<Result<Vec<_>>>()?,
        _ => Vec::new(),
    };
    // The loss sums this many rounded terms: the last hidden state's elements, or the tokens'
    // cross-entropies.
    let outputs = match sh.vocab() {
        0 => sh.batch * sh.seq * sh.hidden,
        _ => sh.batch * sh.seq,
    } as f64;
    let unit_roundoff = f64::from(f32::EPSILON) / 2.0;
    let eta = PROBE_ROUNDING_OPS * unit_roundoff / outputs.sqrt();
    let beta = probe_gradient_precision(st.policy.dtype);
    let eps = PROBE_STEP;
    let truncation = PROBE_TRUNCATION * eps * eps;
    let mut rng = Rng::new(seed);
    let mut checks = Vec::with_capacity(sh.layers);
    for (l, g_layer) in grads.iter().enumerate() {
        for (group, range) in probe_groups(&sh, l) {
            let tensors = range.clone();
            let saved: Vec<Vec<f32>> = st.params.master[l][tensors.clone()]
                .iter()
                .map(|t| be.read(t))
                .collect::<Result<_>>()?;
            // w ± εv as stored (f32), and the step each weight actually took: the rounding of
            // w ± εv to f32 is then part of the direction rather than an error of it.
            let mut plus = Vec::with_capacity(saved.len());
            let mut minus = Vec::with_capacity(saved.len());
            let mut dot = 0f64;
            for (w, g) in saved.iter().zip(&g_layer[tensors.clone()]) {
                let rms =
                    (w.iter().map(|&x| x as f64 * x as f64).sum::<f64>() / w.len() as f64).sqrt();
                let a = if rms > 0.0 { rms } else { 1.0 };
                let (mut p, mut m) = (Vec::with_capacity(w.len()), Vec::with_capacity(w.len()));
                for (&wi, &gi) in w.iter().zip(g) {
                    let r = 1.0 + 0.5 * rng.uniform() as f64;
                    let step = eps * a * direction_sign(gi, &mut rng) * r;
                    let (up, down) = ((wi as f64 + step) as f32, (wi as f64 - step) as f32);
                    dot += gi as f64 * (up as f64 - down as f64);
                    p.push(up);
                    m.push(down);
                }
                plus.push(p);
                minus.push(m);
            }
            let dot = dot / (2.0 * eps);
            let mut probe = |values: &[Vec<f32>]| -> Result<f64> {
                for (t, v) in st.params.master[l][tensors.clone()].iter_mut().zip(values) {
                    be.write(t, v)?;
                }
                st.probe_loss(be, &host_inputs)
            };
            let losses = probe(&plus).and_then(|up| Ok((up, probe(&minus)?)));
            for (t, v) in st.params.master[l][tensors.clone()].iter_mut().zip(&saved) {
                be.write(t, v)?;
            }
            let (up, down) = losses?;
            let d = (up - down) / (2.0 * eps);
            let loss = 0.5 * (up + down);
            let rounding = eta * loss.abs() / (eps * d.abs());
            let tolerance = finite_or_inf(truncation + rounding + beta).min(PROBE_LOOSEST);
            let error = if d != 0.0 {
                finite_or_inf((dot - d).abs() / d.abs())
            } else {
                // The loss did not move: the probe saw nothing, which is no evidence.
                f64::INFINITY
            };
            let passed = error <= tolerance;
            checks.push(TensorCheck {
                name: match l < sh.layers {
                    true => format!("layer {l} {group} directional derivative"),
                    false => format!("{group} directional derivative"),
                },
                compared: g_layer[tensors].iter().map(Vec::len).sum(),
                error,
                tolerance,
                scale: d.abs(),
                atol: tolerance * d.abs(),
                rtol: 0.0,
                violations: usize::from(!passed),
                worst: format!(
                    "<g, v> = {dot:.6e} against (L(w+εv) - L(w-εv))/2ε = {d:.6e} (ε = {eps:.0e}, \
                     L = {loss:.6e}, direction seed {seed}); bound {truncation:.1e} truncation + \
                     {rounding:.1e} rounding + {beta:.1e} gradient precision"
                ),
            });
        }
    }
    Ok(checks)
}

impl Instance for TrainInstance {
    fn run(&mut self, be: &dyn Backend) -> Result<()> {
        self.state.step(be).map(|_| ())
    }

    /// One forward and backward, its gradients read back (each through `tamper`), then:
    /// - at sizes the host can reference, every gradient tensor against the fp32 full-batch
    ///   step without checkpointing on the CPU backend;
    /// - at every size, two directional-derivative probes per layer, one over its attention
    ///   half and one over its MLP half (fp32 forwards only);
    /// - at every size, every gradient bitwise against the same step under full
    ///   checkpointing (the policy with the smallest peak, so the comparison fits wherever
    ///   the case does), or, for full checkpointing itself, against a second identical step.
    ///
    /// The probes run before the bitwise step, so that step also shows the weights were
    /// restored exactly.
    fn validate(
        &mut self,
        be: &dyn Backend,
        rng: &mut Rng,
        tamper: &mut Tamper<'_>,
    ) -> Result<Validation> {
        let shape = self.state.shape;
        let policy = self.state.policy;
        self.state.forward_backward(be)?;
        let loss = self.state.loss(be)?;
        let mut grads = self.state.read_grads(be)?;
        let specs = unit_specs(&shape);
        for (l, layer) in grads.iter_mut().enumerate() {
            for (i, g) in layer.iter_mut().enumerate() {
                tamper(Readback {
                    name: &grad_name(&shape, l, i),
                    values: g,
                    row: specs[l][i].row,
                });
            }
        }
        let mut checks = vec![loss_check(loss)];
        let mut what = Vec::new();
        let tokens = shape.batch * shape.seq;
        if shape.params() * tokens <= self.reference_limit {
            // The fp32, full-batch step without checkpointing on the CPU backend, from the
            // same weights and inputs; its memory is its own tracker's, not this case's.
            let cpu = CpuBackend::new(None, None);
            // The same head and loss variant: the variants agree only within rounding, which
            // their own tests bound (tests/models.rs, tests/loss.rs).
            let reference = Policy {
                checkpoint: Checkpoint::None,
                attention: policy.attention,
                dtype: DType::F32,
                micro_batches: 1,
                head: policy.head,
            };
            let mut r = TrainState::new(&cpu, shape, reference, &self.init)?;
            r.forward_backward(&cpu)?;
            let want = r.read_grads(&cpu)?;
            let tolerance = grad_tolerance(self.kind, &policy);
            checks.extend(reference_checks(
                &shape,
                &grads,
                &want,
                tolerance,
                policy.dtype,
            ));
            what.push(format!(
                "every gradient against the fp32 full-batch step without checkpointing \
                 (tolerance {tolerance:.0e})"
            ));
        }
        let seed = rng.next_u64();
        checks.extend(directional_checks(&mut self.state, be, &grads, seed)?);
        what.push(format!(
            "two directional derivatives per layer (attention, MLP) against fp32 central differences \
             (ε = {PROBE_STEP:.0e})"
        ));
        let full = Policy {
            checkpoint: Checkpoint::Full,
            ..policy
        };
        let against = if policy.checkpoint != Checkpoint::Full
            && memory::model(&shape, &full).peak <= memory::model(&shape, &policy).peak
        {
            self.state.forward_backward_with(be, Checkpoint::Full)?;
            "full checkpointing"
        } else {
            self.state.forward_backward(be)?;
            "a second identical step"
        };
        let again = self.state.read_grads(be)?;
        checks.extend(bitwise_checks(&shape, &grads, &again, against));
        what.push(format!("every gradient bitwise against {against}"));
        let mut v = Validation::from_checks(checks);
        v.detail = format!("checked {}; {}", what.join("; "), v.detail);
        Ok(v)
    }

    /// One optimizer step (forward, backward, AdamW) recorded allocation by allocation,
    /// starting from what lives across steps (weights, gradients, optimizer state, inputs),
    /// with the phases marked.
    fn timeline(&mut self, be: &dyn Backend) -> Result<Option<Timeline>> {
        Ok(Some(step_timeline(&mut self.state, be)?))
    }
}

/// The memory timeline of one optimizer step of `state`: the first point is what is live
/// when the step starts (the state's own buffers, by category), then one point per
/// allocation and release, with the phases (forward, backward per micro-batch, optimizer)
/// marked where they begin.
pub fn step_timeline(state: &mut TrainState, be: &dyn Backend) -> Result<Timeline> {
    let start = state.live_buffers();
    let tracker = be.memory();
    tracker.start_timeline();
    let stepped = state.step(be);
    let events = tracker.take_timeline();
    let phases = tracker.take_phases();
    stepped?;
    Ok(Timeline::recorded(&start, &events, &phases))
}

/// The tensors of a state, for tests that look inside.
pub fn grads_of(state: &TrainState) -> &[Vec<Tensor>] {
    &state.grads
}

fn policies(layers: usize, variants: &[(Checkpoint, Variant, DType, usize)]) -> Vec<Policy> {
    let _ = layers;
    variants
        .iter()
        .map(|&(checkpoint, attention, dtype, micro_batches)| Policy {
            checkpoint,
            attention,
            dtype,
            micro_batches,
            head: crate::model::HeadLoss::Materialized,
        })
        .collect()
}

/// The sweep of a shape: every checkpointing policy with flash bf16, and against `none`,
/// naive attention, fp32, and micro-batching.
fn sweep(shape: ModelShape) -> Vec<Box<dyn Case>> {
    let k = Checkpoint::sqrt_default(shape.layers);
    let (f, n) = (Variant::Flash, Variant::Naive);
    let (b, s) = (DType::Bf16, DType::F32);
    let mb = if shape.batch % 4 == 0 { 4 } else { shape.batch };
    policies(
        shape.layers,
        &[
            (Checkpoint::None, f, b, 1),
            (Checkpoint::Full, f, b, 1),
            (k, f, b, 1),
            (Checkpoint::Selective, f, b, 1),
            (Checkpoint::None, n, b, 1),
            (Checkpoint::Selective, n, b, 1),
            (Checkpoint::None, f, s, 1),
            (Checkpoint::None, f, b, mb),
        ],
    )
    .into_iter()
    .map(|p| Box::new(TrainCase::new(shape, p)) as Box<dyn Case>)
    .collect()
}

/// A model with a vocabulary: its head and loss materialized, chunked (`chunk` tokens at a
/// time) and fused, under bf16 flash attention with full checkpointing (where the logits'
/// share of the peak is largest).
fn head_sweep(shape: ModelShape, chunk: usize) -> Vec<Box<dyn Case>> {
    [
        HeadLoss::Materialized,
        HeadLoss::Chunked { rows: chunk },
        HeadLoss::Fused,
    ]
    .into_iter()
    .map(|head| {
        let p = Policy {
            checkpoint: Checkpoint::Full,
            attention: Variant::Flash,
            dtype: DType::Bf16,
            micro_batches: 1,
            head,
        };
        Box::new(TrainCase::new(shape, p)) as Box<dyn Case>
    })
    .collect()
}

/// A Llama-style model at CPU sizes: grouped-query attention, SwiGLU, RMSNorm, no biases,
/// an untied head over an odd vocabulary.
pub const SMALL_LLAMA: ModelShape = ModelShape {
    layers: 2,
    hidden: 128,
    heads: 2,
    seq: 32,
    batch: 4,
    arch: Arch {
        kv_heads: 1,
        ffn: 352,
        vocab: 4099,
        mlp: Mlp::SwiGlu,
        norm: Norm::RmsNorm,
        bias: Bias::None,
        tied: false,
        positions: 0,
    },
};

/// The models with a vocabulary each profile trains.
fn vocab_cases(profile: Profile, kind: BackendKind) -> Vec<Box<dyn Case>> {
    let preset = |name: &str, seq: usize, batch: usize| {
        crate::model::Preset::find(name)
            .and_then(|p| p.shape(seq, batch))
            .expect("the presets are valid")
    };
    match (kind, profile) {
        (BackendKind::Cpu, _) => head_sweep(SMALL_LLAMA, 32),
        (BackendKind::Cuda | BackendKind::Dry, Profile::Quick) => {
            head_sweep(preset("gpt2-small", 1024, 8), 1024)
        }
        (BackendKind::Cuda | BackendKind::Dry, Profile::Full) => {
            let mut out = head_sweep(preset("gpt2-small", 1024, 8), 1024);
            // Llama-3-8B's vocabulary and blocks, two of them: the head is half the model.
            let llama = ModelShape {
                layers: 2,
                ..preset("llama3-8b", 4096, 1)
            };
            out.extend(head_sweep(llama, 1024));
            out
        }
    }
}

pub fn cases(profile: Profile, kind: BackendKind) -> Vec<Box<dyn Case>> {
    let shapes: Vec<ModelShape> = match (kind, profile) {
        (BackendKind::Cpu, Profile::Quick) => vec![ModelShape {
            layers: 4,
            hidden: 128,
            heads: 2,
            seq: 32,
            batch: 4,
            arch: crate::model::Arch::GPT,
        }],
        (BackendKind::Cpu, Profile::Full) => vec![
            ModelShape {
                layers: 4,
                hidden: 128,
                heads: 2,
                seq: 32,
                batch: 4,
                arch: crate::model::Arch::GPT,
            },
            ModelShape {
                layers: 9,
                hidden: 128,
                heads: 2,
                seq: 64,
                batch: 4,
                arch: crate::model::Arch::GPT,
            },
        ],
        // GPT-2 small (124M without embeddings: 85M in its blocks).
        (BackendKind::Cuda | BackendKind::Dry, Profile::Quick) => vec![ModelShape {
            layers: 12,
            hidden: 768,
            heads: 12,
            seq: 1024,
            batch: 8,
            arch: crate::model::Arch::GPT,
        }],
        (BackendKind::Cuda | BackendKind::Dry, Profile::Full) => vec![
            ModelShape {
                layers: 12,
                hidden: 768,
                heads: 12,
                seq: 1024,
                batch: 8,
                arch: crate::model::Arch::GPT,
            },
            // About 1.2B parameters in 24 blocks of hidden 2048.
            ModelShape {
                layers: 24,
                hidden: 2048,
                heads: 16,
                seq: 2048,
                batch: 4,
                arch: crate::model::Arch::GPT,
            },
        ],
    };
    let mut out: Vec<Box<dyn Case>> = shapes.into_iter().flat_map(sweep).collect();
    out.extend(vocab_cases(profile, kind));
    out
}

/// Every checkpointing policy, both attention variants, both precisions and micro-batching,
/// on a small model with an odd sequence length.
pub fn check_cases() -> Vec<Box<dyn Case>> {
    let shape = ModelShape {
        layers: 3,
        hidden: 128,
        heads: 2,
        seq: 33,
        batch: 2,
        arch: crate::model::Arch::GPT,
    };
    let mut out: Vec<Box<dyn Case>> = Vec::new();
    for attention in [Variant::Flash, Variant::Naive] {
        for dtype in [DType::F32, DType::Bf16] {
            for checkpoint in [
                Checkpoint::None,
                Checkpoint::Full,
                Checkpoint::EveryK(2),
                Checkpoint::Selective,
            ] {
                for micro_batches in [1, 2] {
                    if micro_batches == 2
                        && checkpoint != Checkpoint::None
                        && checkpoint != Checkpoint::Full
                    {
                        continue;
                    }
                    let p = Policy {
                        checkpoint,
                        attention,
                        dtype,
                        micro_batches,
                        head: crate::model::HeadLoss::Materialized,
                    };
                    out.push(Box::new(TrainCase::new(shape, p)));
                }
            }
        }
    }
    // The architectures: Llama-style blocks and vocabulary with each head variant, and
    // GPT-2-style with a tied head and learned positions, at an odd sequence length.
    let llama = ModelShape {
        seq: 33,
        batch: 2,
        ..SMALL_LLAMA
    };
    let gpt2 = ModelShape {
        arch: Arch {
            vocab: 1031,
            tied: true,
            positions: 64,
            ..Arch::GPT
        },
        ..shape
    };
    for (sh, dtype, checkpoint, head) in [
        (llama, DType::F32, Checkpoint::None, HeadLoss::Materialized),
        (
            llama,
            DType::Bf16,
            Checkpoint::Full,
            HeadLoss::Chunked { rows: 16 },
        ),
        (llama, DType::Bf16, Checkpoint::Selective, HeadLoss::Fused),
        (gpt2, DType::Bf16, Checkpoint::Full, HeadLoss::Fused),
        (
            gpt2,
            DType::F32,
            Checkpoint::None,
            HeadLoss::Chunked { rows: 16 },
        ),
    ] {
        for attention in [Variant::Flash, Variant::Naive] {
            let p = Policy {
                checkpoint,
                attention,
                dtype,
                micro_batches: 1,
                head,
            };
            out.push(Box::new(TrainCase::new(sh, p)));
        }
    }
    out
}

#[cfg(test)]
mod elementwise_tests {
    use super::*;

    /// Reference gradients of the check case's model: every tensor small noise, and a few
    /// rows of the head's gradient (the tokens a batch holds) forty times larger.
    fn reference(shape: &ModelShape, rng: &mut Rng) -> (Vec<Vec<Vec<f32>>>, usize, usize) {
        let specs = unit_specs(shape);
        let mut head = None;
        let want: Vec<Vec<Vec<f32>>> = specs
            .iter()
            .enumerate()
            .map(|(u, unit)| {
                unit.iter()
                    .enumerate()
                    .map(|(i, p)| {
                        let mut v: Vec<f32> =
                            (0..p.len).map(|_| 1e-3 * (rng.uniform() - 0.5)).collect();
                        if p.name == "head.weight" {
                            head = Some((u, i));
                            for r in [7usize, 100, 2000] {
                                for x in &mut v[r * p.row..(r + 1) * p.row] {
                                    *x *= 40.0;
                                }
                            }
                        }
                        v
                    })
                    .collect()
            })
            .collect();
        let (u, i) = head.expect("the model has an untied head");
        (want, u, i)
    }

    #[test]
    fn a_big_rows_rounding_passes_and_a_wrong_row_does_not() {
        let (shape, _) = crate::model::parse_train_id(
            "train/full-naive-mb1-chunked16/bf16/L2-h128-heads2-n33-b2-kv1-ffn352-swiglu-rms-nobias-v4099",
        )
        .unwrap();
        let mut rng = Rng::new(9);
        let (want, u, i) = reference(&shape, &mut rng);
        let row = unit_specs(&shape)[u][i].row;
        let failed = |got: &[Vec<Vec<f32>>]| {
            reference_checks(&shape, got, &want, 5e-2, DType::Bf16)
                .iter()
                .filter(|c| c.violations > 0)
                .map(|c| c.name.clone())
                .collect::<Vec<_>>()
        };
        assert!(failed(&want).is_empty());
        // bf16's rounding in a big row: 0.3 of the tensor's RMS (the 0.2·RMS bound alone
        // refuses it), a few percent of its own row's.
        let rms = {
            let w = &want[u][i];
            (w.iter().map(|&x| (x * x) as f64).sum::<f64>() / w.len() as f64).sqrt()
        };
        let mut got = want.clone();
        got[u][i][100 * row + 5] += (0.3 * rms) as f32;
        assert!(failed(&got).is_empty(), "{:?}", failed(&got));
        // The same error in a small row, a big row 30% off, and a big row zeroed: each fails
        // and names the head.
        for corrupt in 0..3 {
            let mut got = want.clone();
            let g = &mut got[u][i];
            match corrupt {
                0 => g[50 * row + 5] += (0.3 * rms) as f32,
                1 => g[7 * row..8 * row].iter_mut().for_each(|x| *x *= 1.3),
                _ => g[2000 * row..2001 * row].iter_mut().for_each(|x| *x = 0.0),
            }
            assert_eq!(
                failed(&got),
                vec!["head.weight.grad".to_string()],
                "{corrupt}"
            );
        }
    }
}
