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
use crate::model::{Checkpoint, InitialValues, ModelShape, Policy, TrainState};
use crate::rng::Rng;
use crate::techniques::attention::{self, Pass, Variant};
use crate::techniques::{Case, CaseInfo, Instance, Profile, Validation};

/// Up to this many (parameters × tokens), validation compares the gradients with the CPU
/// backend's fp32 reference step; beyond it, with a second run of the same step (bitwise).
const REFERENCE_LIMIT: usize = 400_000_000;

/// Tolerances of the gradients against the fp32 full-batch reference without checkpointing,
/// relative to each tensor's largest gradient:
/// - exact (0) on the CPU backend with fp32 and one micro-batch: checkpointing recomputes
///   with the same code in the same order, so any difference is a bug;
/// - 1e-4 for fp32 otherwise: micro-batches (or the GPU's kernels) sum the same terms in
///   another order, and the relative rounding of a sum of n terms grows like n·2^-24 at worst;
/// - 5e-2 for bf16 activations: each stored activation is rounded to 8 significant bits
///   (2^-9 relative), and a gradient passes through about ten such roundings per block.
fn grad_tolerance(be: BackendKind, policy: &Policy) -> f64 {
    match policy.dtype {
        DType::Bf16 => 5e-2,
        DType::F32 if be == BackendKind::Cpu && policy.micro_batches == 1 => 0.0,
        DType::F32 => 1e-4,
    }
}

pub struct TrainCase {
    info: CaseInfo,
    shape: ModelShape,
    policy: Policy,
}

impl TrainCase {
    pub fn new(shape: ModelShape, policy: Policy) -> Self {
        let mut info = CaseInfo::new("train", &policy.name(), policy.dtype, shape.name());
        let tokens = (shape.batch * shape.seq) as f64;
        let att = AttentionShape::new(shape.batch, shape.heads, shape.seq, shape.head_dim(), true);
        info.flops = 6.0 * shape.params() as f64 * tokens
            + shape.layers as f64 * attention::flops(Pass::ForwardBackward, &att);
        let model = memory::model(&shape, &policy);
        info.predicted_peak_bytes = model.peak;
        info.bytes_moved = model.peak as f64;
        info.tolerance = grad_tolerance(BackendKind::Cuda, &policy);
        TrainCase {
            info,
            shape,
            policy,
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
}

impl Case for TrainCase {
    fn info(&self) -> &CaseInfo {
        &self.info
    }

    fn skip_reason(&self, be: &dyn Backend) -> Option<String> {
        if self.policy.attention == Variant::Naive || self.policy.dtype == DType::F32 {
            let kernel = match self.policy.dtype {
                DType::F32 => crate::backend::MatmulKernel::Simt,
                DType::Bf16 => crate::backend::MatmulKernel::Mma,
            };
            return be.matmul_available(kernel, self.policy.dtype).err();
        }
        None
    }

    fn record_timeline(&self) -> bool {
        true
    }

    fn setup(&self, be: &dyn Backend, rng: &mut Rng) -> Result<Box<dyn Instance>> {
        let init = InitialValues::random(&self.shape, rng);
        let state = TrainState::new(be, self.shape, self.policy, &init)?;
        Ok(Box::new(TrainInstance {
            state,
            init,
            kind: be.kind(),
        }))
    }
}

/// Compares gradients tensor by tensor, each relative to the larger of its own largest
/// reference magnitude and a thousandth of the model's largest gradient, and keeps the
/// worst. The floor matters for the key bias: its gradient is zero in exact arithmetic
/// (adding q·b_k to a whole score row leaves the softmax unchanged), so its reference is
/// rounding noise that no relative error could match.
fn compare_grads(got: &[Vec<Vec<f32>>], want: &[Vec<Vec<f32>>], tolerance: f64) -> Validation {
    let global = want
        .iter()
        .flatten()
        .flatten()
        .fold(0f64, |m, x| m.max(x.abs() as f64));
    let floor = 1e-3 * global;
    let mut worst: Option<Validation> = None;
    let mut compared = 0;
    for (l, (g_layer, w_layer)) in got.iter().zip(want).enumerate() {
        for (i, (g, w)) in g_layer.iter().zip(w_layer).enumerate() {
            let scale = w.iter().fold(floor, |m, x| m.max(x.abs() as f64));
            let name = crate::model::PARAM_NAMES[i];
            let mut max_err = 0f64;
            let mut at = 0;
            let mut bad = None;
            for (j, (a, b)) in g.iter().zip(w).enumerate() {
                if !a.is_finite() {
                    bad.get_or_insert(j);
                    continue;
                }
                let e = (*a as f64 - *b as f64).abs();
                if e > max_err {
                    max_err = e;
                    at = j;
                }
            }
            compared += g.len();
            let v = match bad {
                Some(j) => Validation {
                    error: f64::INFINITY,
                    tolerance,
                    compared: 0,
                    detail: format!("layer {l} {name}[{j}] is {}", g[j]),
                },
                None => Validation {
                    error: if scale > 0.0 {
                        max_err / scale
                    } else {
                        max_err
                    },
                    tolerance,
                    compared: 0,
                    detail: format!(
                        "worst layer {l} {name}[{at}]: {} vs {}",
                        g.get(at).copied().unwrap_or(0.0),
                        w.get(at).copied().unwrap_or(0.0)
                    ),
                },
            };
            if worst.as_ref().is_none_or(|w| v.error > w.error) {
                worst = Some(v);
            }
        }
    }
    let mut v = worst.expect("a model has parameters");
    v.compared = compared;
    v
}

impl Instance for TrainInstance {
    fn run(&mut self, be: &dyn Backend) -> Result<()> {
        self.state.step(be).map(|_| ())
    }

    fn validate(&mut self, be: &dyn Backend, _rng: &mut Rng) -> Result<Validation> {
        self.state.forward_backward(be)?;
        let loss = self.state.loss(be)?;
        let grads = self.state.read_grads(be)?;
        let shape = self.state.shape;
        let policy = self.state.policy;
        let tokens = shape.batch * shape.seq;
        let mut v = if shape.params() * tokens <= REFERENCE_LIMIT {
            // The fp32, full-batch step without checkpointing on the CPU backend, from the
            // same weights and inputs; its memory is its own tracker's, not this case's.
            let cpu = CpuBackend::new(None, None);
            let reference = Policy {
                checkpoint: Checkpoint::None,
                attention: policy.attention,
                dtype: DType::F32,
                micro_batches: 1,
            };
            let mut r = TrainState::new(&cpu, shape, reference, &self.init)?;
            r.forward_backward(&cpu)?;
            let want = r.read_grads(&cpu)?;
            let mut v = compare_grads(&grads, &want, grad_tolerance(self.kind, &policy));
            v.detail = format!(
                "gradients vs the fp32 full-batch step without checkpointing: {}",
                v.detail
            );
            v
        } else {
            // Too large for the CPU: the same step again must give bitwise the same gradients.
            self.state.forward_backward(be)?;
            let again = self.state.read_grads(be)?;
            let mut v = compare_grads(&again, &grads, 0.0);
            v.detail = format!(
                "gradients of two identical steps (determinism): {}",
                v.detail
            );
            v
        };
        if !loss.is_finite() {
            v.error = f64::INFINITY;
            v.detail = format!("the loss is {loss}");
        }
        Ok(v)
    }
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

pub fn cases(profile: Profile, kind: BackendKind) -> Vec<Box<dyn Case>> {
    let shapes: Vec<ModelShape> = match (kind, profile) {
        (BackendKind::Cpu, Profile::Quick) => vec![ModelShape {
            layers: 4,
            hidden: 128,
            heads: 2,
            seq: 32,
            batch: 4,
        }],
        (BackendKind::Cpu, Profile::Full) => vec![
            ModelShape {
                layers: 4,
                hidden: 128,
                heads: 2,
                seq: 32,
                batch: 4,
            },
            ModelShape {
                layers: 9,
                hidden: 128,
                heads: 2,
                seq: 64,
                batch: 4,
            },
        ],
        // GPT-2 small (124M without embeddings: 85M in its blocks).
        (BackendKind::Cuda | BackendKind::Dry, Profile::Quick) => vec![ModelShape {
            layers: 12,
            hidden: 768,
            heads: 12,
            seq: 1024,
            batch: 8,
        }],
        (BackendKind::Cuda | BackendKind::Dry, Profile::Full) => vec![
            ModelShape {
                layers: 12,
                hidden: 768,
                heads: 12,
                seq: 1024,
                batch: 8,
            },
            // About 1.2B parameters in 24 blocks of hidden 2048.
            ModelShape {
                layers: 24,
                hidden: 2048,
                heads: 16,
                seq: 2048,
                batch: 4,
            },
        ],
    };
    shapes.into_iter().flat_map(sweep).collect()
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
                    };
                    out.push(Box::new(TrainCase::new(shape, p)));
                }
            }
        }
    }
    out
}
