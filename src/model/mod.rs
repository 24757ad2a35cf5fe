//! A stack of GPT-style pre-norm transformer blocks, trained one step under a memory policy.
//!
//! One block: x_mid = x + proj(attention(LN1(x))); x_out = x_mid + fc2(GELU(fc1(LN2(x_mid)))),
//! a loss L = ½·Σy²/numel on the last output, the full backward, and AdamW with fp32 master
//! weights and moments. Every allocation goes through the backend's tracked allocator with a
//! category prefix in its tag (`weights:`, `grads:`, `optimizer:`, `inputs:`, `activations:`,
//! `workspace:`), so a memory timeline can be drawn by category, and [`memory::model`]
//! predicts the peak of every policy to the byte.
//!
//! Deterministic: the same inputs give bitwise the same gradients, and every checkpointing
//! policy recomputes with the same kernels in the same order, so its gradients are bitwise
//! those of `none`.

use crate::backend::{
    AdamW, AttentionGrads, AttentionShape, Backend, Epi, Epilogue, LayerNorm, Matmul, MatmulKernel,
    RowStats, Tensor,
};
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::rng::Rng;
use crate::techniques::attention::Variant;

pub mod head;
pub mod memory;

/// The model's size. `batch` is the global batch (sequences per optimizer step).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ModelShape {
    pub layers: usize,
    pub hidden: usize,
    pub heads: usize,
    pub seq: usize,
    pub batch: usize,
}

impl ModelShape {
    pub fn head_dim(&self) -> usize {
        self.hidden / self.heads
    }
    /// Parameters of one block: 12·C² + 13·C.
    pub fn params_per_layer(&self) -> usize {
        let c = self.hidden;
        12 * c * c + 13 * c
    }
    pub fn params(&self) -> usize {
        self.layers * self.params_per_layer()
    }
    /// Weights that matmuls read (the four matrices of a block).
    pub fn matrix_params(&self) -> usize {
        self.layers * 12 * self.hidden * self.hidden
    }
    pub fn name(&self) -> String {
        format!(
            "L{}-h{}-heads{}-n{}-b{}",
            self.layers, self.hidden, self.heads, self.seq, self.batch
        )
    }
    pub fn check(&self) -> Result<()> {
        let ok = self.layers > 0
            && self.heads > 0
            && self.hidden % self.heads == 0
            && matches!(self.head_dim(), 64 | 128)
            && self.seq > 0
            && self.batch > 0;
        if ok {
            Ok(())
        } else {
            Err(Error::Invalid(format!(
                "model {}: needs layers, seq and batch >= 1 and hidden / heads = 64 or 128",
                self.name()
            )))
        }
    }
}

/// What is kept from forward for backward.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Checkpoint {
    /// Keep every activation.
    None,
    /// Keep only each block's input; recompute the block in backward.
    Full,
    /// Keep the input of every k-th block; recompute each k-block segment in backward
    /// (k = round(√L) is Chen et al. 2016's sublinear-memory choice).
    EveryK(usize),
    /// Keep everything but the attention core (its output and softmax statistics or
    /// probabilities), recomputed in backward (Korthikanti et al. 2022, sec. 4.2).
    Selective,
}

impl Checkpoint {
    pub fn name(&self) -> String {
        match self {
            Checkpoint::None => "none".into(),
            Checkpoint::Full => "full".into(),
            Checkpoint::EveryK(k) => format!("every{k}"),
            Checkpoint::Selective => "selective".into(),
        }
    }
    /// The sublinear default for `layers` blocks.
    pub fn sqrt_default(layers: usize) -> Checkpoint {
        Checkpoint::EveryK(((layers as f64).sqrt().round() as usize).max(1))
    }
    /// Segment length in blocks (1 for `full`, L for `none`/`selective`).
    pub fn segment(&self, layers: usize) -> usize {
        match self {
            Checkpoint::Full => 1,
            Checkpoint::EveryK(k) => (*k).clamp(1, layers),
            Checkpoint::None | Checkpoint::Selective => layers,
        }
    }
    pub fn recomputes(&self) -> bool {
        !matches!(self, Checkpoint::None | Checkpoint::Selective)
    }
}

/// A training case's model and policy from its id, `train/<checkpoint>-<attention>-mb<k>/
/// <dtype>/L<layers>-h<hidden>-heads<heads>-n<seq>-b<batch>`, or a sentence saying what was
/// expected.
pub fn parse_train_id(id: &str) -> Result<(ModelShape, Policy)> {
    let bad = || {
        Error::Invalid(format!(
            "'{id}' is not a training case id: expected train/<checkpoint>-<attention>-mb<k>/<dtype>/L<layers>-h<hidden>-heads<heads>-n<seq>-b<batch>, as `headroom cases` lists them"
        ))
    };
    let parts: Vec<&str> = id.split('/').collect();
    let [family, technique, dtype, shape] = parts[..] else {
        return Err(bad());
    };
    if family != "train" {
        return Err(bad());
    }
    let dtype = match dtype {
        "f32" => DType::F32,
        "bf16" => DType::Bf16,
        _ => return Err(bad()),
    };
    let t: Vec<&str> = technique.split('-').collect();
    let [checkpoint, attention, mb] = t[..] else {
        return Err(bad());
    };
    let checkpoint = match checkpoint {
        "none" => Checkpoint::None,
        "full" => Checkpoint::Full,
        "selective" => Checkpoint::Selective,
        k => Checkpoint::EveryK(
            k.strip_prefix("every")
                .and_then(|n| n.parse().ok())
                .filter(|&n: &usize| n > 0)
                .ok_or_else(bad)?,
        ),
    };
    let attention = match attention {
        "flash" => Variant::Flash,
        "naive" => Variant::Naive,
        _ => return Err(bad()),
    };
    let micro_batches = mb
        .strip_prefix("mb")
        .and_then(|n| n.parse().ok())
        .ok_or_else(bad)?;
    let mut sh = ModelShape {
        layers: 0,
        hidden: 0,
        heads: 0,
        seq: 0,
        batch: 0,
    };
    for part in shape.split('-') {
        let at = part.find(|c: char| c.is_ascii_digit()).ok_or_else(bad)?;
        let (k, v) = part.split_at(at);
        let v: usize = v.parse().map_err(|_| bad())?;
        match k {
            "L" => sh.layers = v,
            "h" => sh.hidden = v,
            "heads" => sh.heads = v,
            "n" => sh.seq = v,
            "b" => sh.batch = v,
            _ => return Err(bad()),
        }
    }
    sh.check()?;
    let policy = Policy {
        checkpoint,
        attention,
        dtype,
        micro_batches,
    };
    if micro_batches == 0 || sh.batch % micro_batches != 0 {
        return Err(bad());
    }
    Ok((sh, policy))
}

/// A training configuration a user can set.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Policy {
    pub checkpoint: Checkpoint,
    pub attention: Variant,
    /// f32, or bf16 activations and matmuls (fp32 master weights and gradients either way).
    pub dtype: DType,
    /// The global batch is run as this many micro-batches, gradients accumulated.
    pub micro_batches: usize,
}

impl Policy {
    pub fn name(&self) -> String {
        format!(
            "{}-{}-mb{}",
            self.checkpoint.name(),
            self.attention.name(),
            self.micro_batches
        )
    }
}

/// Parameter tensors of one block, in a fixed order. The attention input projection is
/// three matrices (q, k, v) rather than one fused `[C, 3C]`, so that each output is a whole
/// tensor the attention kernels take as it is; the arithmetic is the same.
pub const PARAM_NAMES: [&str; 16] = [
    "ln1.weight",
    "ln1.bias",
    "q.weight",
    "q.bias",
    "k.weight",
    "k.bias",
    "v.weight",
    "v.bias",
    "proj.weight",
    "proj.bias",
    "ln2.weight",
    "ln2.bias",
    "fc.weight",
    "fc.bias",
    "fc2.weight",
    "fc2.bias",
];

/// Element counts of the parameters in [`PARAM_NAMES`] order (matrices are `[in, out]`).
pub fn param_lens(c: usize) -> [usize; 16] {
    [
        c,
        c,
        c * c,
        c,
        c * c,
        c,
        c * c,
        c,
        c * c,
        c,
        c,
        c,
        c * 4 * c,
        4 * c,
        4 * c * c,
        c,
    ]
}

/// Elements per row of each parameter in [`PARAM_NAMES`] order: a matrix `[in, out]` has
/// rows of `out`; a vector is one row.
pub fn param_rows(c: usize) -> [usize; 16] {
    let lens = param_lens(c);
    std::array::from_fn(|i| match i {
        FC_W => 4 * c,
        _ if MATRICES.contains(&i) => c,
        _ => lens[i],
    })
}

/// The matrices (what matmuls read, and what gets a bf16 copy under a bf16 policy).
pub const MATRICES: [usize; 6] = [Q_W, K_W, V_W, PROJ_W, FC_W, FC2_W];
const LN1_W: usize = 0;
const LN1_B: usize = 1;
const Q_W: usize = 2;
const K_W: usize = 4;
const V_W: usize = 6;
const PROJ_W: usize = 8;
const PROJ_B: usize = 9;
const LN2_W: usize = 10;
const LN2_B: usize = 11;
const FC_W: usize = 12;
const FC_B: usize = 13;
const FC2_W: usize = 14;
const FC2_B: usize = 15;

/// Weights, gradients, optimizer state and inputs: everything that lives across the step.
pub struct TrainState {
    pub shape: ModelShape,
    pub policy: Policy,
    pub params: Params,
    /// fp32 gradients, `[layer][param]`.
    pub grads: Vec<Vec<Tensor>>,
    /// AdamW moments, `[layer][param]`.
    pub m: Vec<Vec<Tensor>>,
    pub v: Vec<Vec<Tensor>>,
    /// One `[T_micro, C]` input per micro-batch (the embeddings' output).
    pub inputs: Vec<Tensor>,
    /// One f32 loss per micro-batch, written on the device and read only when asked for, so
    /// a timed step never waits on the host.
    pub losses: Vec<Tensor>,
    pub step: u32,
    pub adamw: AdamW,
}

/// fp32 master weights and, under a bf16 policy, bf16 copies of the matrices.
pub struct Params {
    /// `[layer][param]`
    pub master: Vec<Vec<Tensor>>,
    /// `[layer][slot in MATRICES]`
    pub bf16: Vec<Vec<Tensor>>,
}

impl Params {
    /// Block `layer`'s parameters as its forward and backward read them.
    pub fn layer(&self, layer: usize) -> LayerView<'_> {
        LayerView {
            base: &self.master[layer],
            bf16: self.bf16.get(layer).map(Vec::as_slice),
        }
    }
}

/// One block's parameters as the compute reads them: `base` in [`PARAM_NAMES`] order, and
/// the bf16 copies of the matrices where there are separate ones.
#[derive(Clone, Copy)]
pub struct LayerView<'a> {
    /// Every parameter (vectors in fp32; matrices in the compute dtype unless `bf16` is set).
    pub base: &'a [Tensor],
    /// The matrices' bf16 copies, in [`MATRICES`] order.
    pub bf16: Option<&'a [Tensor]>,
}

impl<'a> LayerView<'a> {
    /// The matrix a matmul reads: the bf16 copy when there is one, else `base`'s.
    fn matrix(&self, param: usize) -> &'a Tensor {
        match self.bf16 {
            Some(copies) => &copies[MATRICES.iter().position(|&p| p == param).expect("a matrix")],
            None => &self.base[param],
        }
    }
}

/// Where a step's block parameters and gradients live, and what happens around each
/// block's forward and backward. The single-rank step keeps everything resident
/// ([`Resident`]); a sharded step gathers parameters, reduces gradients and frees them here.
pub trait Units {
    /// Block `l` is about to run its forward (`recompute`: again, inside the backward).
    fn before_forward(&mut self, be: &dyn Backend, l: usize, recompute: bool) -> Result<()>;
    fn after_forward(&mut self, be: &dyn Backend, l: usize, recompute: bool) -> Result<()>;
    fn before_backward(&mut self, be: &dyn Backend, l: usize) -> Result<()>;
    /// Block `l`'s gradients of this micro-batch are complete (`last`: of the step).
    fn after_backward(&mut self, be: &dyn Backend, l: usize, last: bool) -> Result<()>;
    /// Block `l`'s parameters, and the gradients its backward accumulates into.
    fn unit(&mut self, l: usize) -> Result<(LayerView<'_>, &mut [Tensor])>;
}

/// Every parameter and gradient resident for the whole step: nothing to do around blocks.
pub struct Resident<'a> {
    pub params: &'a Params,
    pub grads: &'a mut [Vec<Tensor>],
}

impl Units for Resident<'_> {
    fn before_forward(&mut self, _: &dyn Backend, _: usize, _: bool) -> Result<()> {
        Ok(())
    }
    fn after_forward(&mut self, _: &dyn Backend, _: usize, _: bool) -> Result<()> {
        Ok(())
    }
    fn before_backward(&mut self, _: &dyn Backend, _: usize) -> Result<()> {
        Ok(())
    }
    fn after_backward(&mut self, _: &dyn Backend, _: usize, _: bool) -> Result<()> {
        Ok(())
    }
    fn unit(&mut self, l: usize) -> Result<(LayerView<'_>, &mut [Tensor])> {
        Ok((self.params.layer(l), &mut self.grads[l]))
    }
}

/// The host values a state was initialized with, so another backend can start identically.
#[derive(Clone)]
pub struct InitialValues {
    /// `[layer][param]`
    pub weights: Vec<Vec<Vec<f32>>>,
    /// Inputs of the whole global batch, `[B·N, C]`.
    pub input: Vec<f32>,
}

impl InitialValues {
    /// No values: weights and inputs are zeroed instead (for dry runs, where nothing is
    /// computed and full-size host copies would only cost memory).
    pub fn unset() -> Self {
        InitialValues {
            weights: Vec::new(),
            input: Vec::new(),
        }
    }

    /// GPT-2-like scales: matrices ~ U(-a, a) with a = √3·0.02 (std 0.02), biases small,
    /// layernorm weights near 1; inputs ~ U(-1, 1).
    pub fn random(shape: &ModelShape, rng: &mut Rng) -> Self {
        let c = shape.hidden;
        let weights = (0..shape.layers)
            .map(|_| {
                param_lens(c)
                    .iter()
                    .enumerate()
                    .map(|(i, &n)| match i {
                        LN1_W | LN2_W => rng.fill(n, 0.1).into_iter().map(|x| 1.0 + x).collect(),
                        _ if MATRICES.contains(&i) => rng.fill(n, 0.0346),
                        _ => rng.fill(n, 0.02),
                    })
                    .collect()
            })
            .collect();
        InitialValues {
            weights,
            input: rng.fill(shape.batch * shape.seq * c, 1.0),
        }
    }
}

/// One input per micro-batch of `shape.batch` sequences (the sequences of the global
/// batch's input in `init` from sequence `first` on; zeros where `init` has none), and one
/// f32 loss per micro-batch.
pub fn inputs_and_losses(
    be: &dyn Backend,
    shape: &ModelShape,
    policy: &Policy,
    first: usize,
    init: &InitialValues,
) -> Result<(Vec<Tensor>, Vec<Tensor>)> {
    let per_sequence = shape.seq * shape.hidden;
    let micro = shape.batch / policy.micro_batches * per_sequence;
    let at = first * per_sequence;
    let mut inputs = Vec::new();
    for j in 0..policy.micro_batches {
        let mut t = be.alloc(policy.dtype, micro, &format!("inputs: micro-batch {j}"))?;
        match init.input.get(at + j * micro..at + (j + 1) * micro) {
            Some(values) => be.write(&mut t, values)?,
            None => be.zero(&mut t)?,
        }
        inputs.push(t);
    }
    let mut losses = Vec::new();
    for j in 0..policy.micro_batches {
        let mut t = be.alloc(
            DType::F32,
            1,
            &format!("workspace: loss of micro-batch {j}"),
        )?;
        be.zero(&mut t)?;
        losses.push(t);
    }
    Ok((inputs, losses))
}

fn tagged(category: &str, layer: usize, name: &str) -> String {
    format!("{category}: layer {layer} {name}")
}

impl TrainState {
    /// Allocates and fills everything that lives across the step.
    pub fn new(
        be: &dyn Backend,
        shape: ModelShape,
        policy: Policy,
        init: &InitialValues,
    ) -> Result<Self> {
        shape.check()?;
        if policy.micro_batches == 0 || shape.batch % policy.micro_batches != 0 {
            return Err(Error::Invalid(format!(
                "a global batch of {} cannot be split into {} equal micro-batches",
                shape.batch, policy.micro_batches
            )));
        }
        let c = shape.hidden;
        let lens = param_lens(c);
        let per_layer = |category: &str, fill: bool| -> Result<Vec<Vec<Tensor>>> {
            (0..shape.layers)
                .map(|l| {
                    lens.iter()
                        .enumerate()
                        .map(|(i, &n)| {
                            let tag = tagged(category, l, PARAM_NAMES[i]);
                            let mut t = be.alloc(DType::F32, n, &tag)?;
                            match init.weights.get(l).filter(|_| fill) {
                                Some(w) => be.write(&mut t, &w[i])?,
                                None => be.zero(&mut t)?,
                            }
                            Ok(t)
                        })
                        .collect()
                })
                .collect()
        };
        let master = per_layer("weights", true)?;
        let mut bf16 = Vec::new();
        if policy.dtype == DType::Bf16 {
            for (l, w) in master.iter().enumerate() {
                let mut layer = Vec::new();
                for &i in &MATRICES {
                    let tag = tagged("weights", l, &format!("{} (bf16)", PARAM_NAMES[i]));
                    let mut t = be.alloc(DType::Bf16, lens[i], &tag)?;
                    be.cast_to_bf16(&w[i], &mut t)?;
                    layer.push(t);
                }
                bf16.push(layer);
            }
        }
        let grads = per_layer("grads", false)?;
        let m = per_layer("optimizer", false)?;
        let v = per_layer("optimizer", false)?;
        let (inputs, losses) = inputs_and_losses(be, &shape, &policy, 0, init)?;
        Ok(TrainState {
            shape,
            policy,
            params: Params { master, bf16 },
            grads,
            m,
            v,
            inputs,
            losses,
            step: 0,
            adamw: AdamW::default(),
        })
    }

    /// Forward and backward over every micro-batch, gradients zeroed first and then
    /// accumulated. Nothing is read back: see [`TrainState::loss`].
    pub fn forward_backward(&mut self, be: &dyn Backend) -> Result<()> {
        for layer in &mut self.grads {
            for g in layer {
                be.zero(g)?;
            }
        }
        let mut units = Resident {
            params: &self.params,
            grads: &mut self.grads,
        };
        for j in 0..self.policy.micro_batches {
            let step = Step {
                shape: self.shape,
                policy: self.policy,
                global_batch: self.shape.batch,
                micro: j,
            };
            micro_batch(be, &step, &mut units, &self.inputs[j], &mut self.losses[j])?;
        }
        Ok(())
    }

    /// [`TrainState::forward_backward`] under another checkpointing policy, on the same
    /// weights, inputs and buffers (the state's own policy is unchanged afterwards).
    pub fn forward_backward_with(
        &mut self,
        be: &dyn Backend,
        checkpoint: Checkpoint,
    ) -> Result<()> {
        let own = self.policy.checkpoint;
        self.policy.checkpoint = checkpoint;
        let r = self.forward_backward(be);
        self.policy.checkpoint = own;
        r
    }

    /// Every buffer that lives across the step, as (tag, bytes): what is live when a step
    /// starts.
    pub fn live_buffers(&self) -> Vec<(String, u64)> {
        let p = &self.params;
        p.master
            .iter()
            .chain(&p.bf16)
            .chain(&self.grads)
            .chain(&self.m)
            .chain(&self.v)
            .flatten()
            .chain(&self.inputs)
            .chain(&self.losses)
            .map(|t| (t.tag().to_string(), t.bytes()))
            .collect()
    }

    /// The loss of the global batch (½·Σy²/numel, summed in f64 on the host) of a forward
    /// pass in fp32 from the fp32 master weights, with the policy's attention variant and
    /// micro-batches: the function whose directional derivatives validate the gradients.
    /// Under a bf16 policy `inputs` holds each micro-batch's input as stored (bf16-rounded),
    /// written into an fp32 copy; under fp32 the stored inputs are used and `inputs` unread.
    ///
    /// Every activation is freed at its last use and nothing is kept for a backward, so its
    /// peak above the state (about 9 fp32 activations of a micro-batch, `[T, C]` each, or the
    /// attention probabilities in fp32 with naive attention) stays under the step's own:
    /// `tests/train.rs` pins that for every policy at the benchmark's sizes.
    pub fn probe_loss(&self, be: &dyn Backend, inputs: &[Vec<f32>]) -> Result<f64> {
        let sh = self.shape;
        let policy = Policy {
            dtype: DType::F32,
            ..self.policy
        };
        let ctx = Ctx::new(be, sh, policy);
        let mut total = 0f64;
        for j in 0..self.policy.micro_batches {
            // Under an fp32 policy the stored input is already fp32; otherwise an fp32 copy
            // of the stored (bf16) values, freed once the first block no longer needs it.
            let mut copy = match self.policy.dtype {
                DType::F32 | DType::I32 => None,
                DType::Bf16 => {
                    let host = inputs.get(j).ok_or_else(|| {
                        Error::Invalid(format!(
                            "the probe of a bf16 step needs the host values of micro-batch {j}'s input"
                        ))
                    })?;
                    let mut t = ctx.work(DType::F32, host.len(), "probe input")?;
                    be.write(&mut t, host)?;
                    Some(t)
                }
            };
            let mut x: Option<Tensor> = None;
            for l in 0..sh.layers {
                let w = &self.params.master[l];
                let x_mid = {
                    let x_in = match (&x, &copy) {
                        (Some(x), _) => x,
                        (None, Some(c)) => c,
                        (None, None) => &self.inputs[j],
                    };
                    ctx.lean_attention_half(w, x_in)?
                };
                // The block's input is not needed past the residual.
                drop(x.take());
                drop(copy.take());
                x = Some(ctx.lean_mlp_half(w, x_mid)?);
            }
            let y = be.read(x.as_ref().expect("at least one block"))?;
            total += y.iter().map(|&v| v as f64 * v as f64).sum::<f64>();
        }
        Ok(0.5 * total / (sh.batch * sh.seq * sh.hidden) as f64)
    }

    /// The loss of the global batch from the last forward (the micro-batches' sum).
    pub fn loss(&self, be: &dyn Backend) -> Result<f32> {
        let mut total = 0f32;
        for t in &self.losses {
            total += be.read(t)?[0];
        }
        Ok(total)
    }

    /// One optimizer step: forward, backward, AdamW.
    pub fn step(&mut self, be: &dyn Backend) -> Result<()> {
        self.forward_backward(be)?;
        be.memory().mark_phase("optimizer");
        self.step += 1;
        let Params { master, bf16 } = &mut self.params;
        let layers = master
            .iter_mut()
            .zip(&self.grads)
            .zip(self.m.iter_mut().zip(self.v.iter_mut()));
        for (l, ((w, g), (m, v))) in layers.enumerate() {
            for (i, (((w, g), m), v)) in w
                .iter_mut()
                .zip(g)
                .zip(m.iter_mut())
                .zip(v.iter_mut())
                .enumerate()
            {
                let copy = match (MATRICES.iter().position(|&p| p == i), bf16.get_mut(l)) {
                    (Some(slot), Some(layer)) => Some(&mut layer[slot]),
                    _ => None,
                };
                be.adamw(&self.adamw, self.step, w, g, m, v, copy)?;
            }
        }
        Ok(())
    }

    /// Every gradient, `[layer][param]`, as host f32.
    pub fn read_grads(&self, be: &dyn Backend) -> Result<Vec<Vec<Vec<f32>>>> {
        self.grads
            .iter()
            .map(|layer| layer.iter().map(|g| be.read(g)).collect())
            .collect()
    }
}

/// One micro-batch's place in a step: `shape.batch` is the sequences this rank trains on
/// (the whole global batch on one rank), `global_batch` the step's over every rank, which
/// the loss is averaged over so that ranks' gradients add up to the global batch's.
pub struct Step {
    pub shape: ModelShape,
    pub policy: Policy,
    pub global_batch: usize,
    /// Which micro-batch of the rank's this is.
    pub micro: usize,
}

/// Forward and backward of one micro-batch under the policy, blocks' parameters and
/// gradients from `units`; the loss goes to `loss`.
pub fn micro_batch(
    be: &dyn Backend,
    step: &Step,
    units: &mut dyn Units,
    input: &Tensor,
    loss: &mut Tensor,
) -> Result<()> {
    let (sh, policy, j) = (step.shape, step.policy, step.micro);
    let ctx = Ctx::new(be, sh, policy);
    let seg = policy.checkpoint.segment(sh.layers);
    let recompute = policy.checkpoint.recomputes();
    let last_micro = j + 1 == policy.micro_batches;
    let phase = |name: &str| match policy.micro_batches {
        1 => name.to_string(),
        k => format!("{name} {}/{k}", j + 1),
    };
    be.memory().mark_phase(&phase("forward"));
    // kept[l]: block l's input for l > 0 (block 0's is the micro-batch), while needed.
    let mut kept: Vec<Option<Tensor>> = (0..sh.layers).map(|_| None).collect();
    let mut acts: Vec<Option<Acts>> = (0..sh.layers).map(|_| None).collect();
    let mut last: Option<Tensor> = None;
    for l in 0..sh.layers {
        let x_in = if l == 0 {
            input
        } else {
            kept[l].as_ref().expect("kept input")
        };
        let keep_core = policy.checkpoint != Checkpoint::Selective;
        units.before_forward(be, l, false)?;
        let (x_out, rest) = ctx.block_forward(units.unit(l)?.0, x_in, keep_core)?;
        units.after_forward(be, l, false)?;
        if recompute {
            // Only segment inputs survive the forward; the rest is recomputed.
            drop(rest);
            if l % seg != 0 {
                kept[l] = None;
            }
        } else {
            acts[l] = Some(rest);
        }
        if l + 1 < sh.layers {
            kept[l + 1] = Some(x_out);
        } else {
            last = Some(x_out);
        }
    }
    // L = ½·Σy²/numel over the global batch, so micro-batches (and ranks) add up to it.
    let last = last.expect("at least one block");
    be.memory().mark_phase(&phase("backward"));
    let mut d_res = ctx.work(ctx.dt, last.len(), "d residual")?;
    let scale = 1.0 / (step.global_batch * sh.seq * sh.hidden) as f32;
    be.mse_loss(&last, scale, &mut d_res, loss)?;
    drop(last);
    // Backward, segment by segment from the last.
    let mut start = ((sh.layers - 1) / seg) * seg;
    loop {
        let end = (start + seg).min(sh.layers);
        if recompute {
            for l in start..end {
                let x_in = if l == 0 {
                    input
                } else {
                    kept[l].as_ref().expect("segment input")
                };
                units.before_forward(be, l, true)?;
                let (x_out, rest) = ctx.block_forward(units.unit(l)?.0, x_in, true)?;
                units.after_forward(be, l, true)?;
                acts[l] = Some(rest);
                if l + 1 < end {
                    kept[l + 1] = Some(x_out);
                }
            }
        }
        for l in (start..end).rev() {
            let a = acts[l].take().expect("activations of the block");
            let x_in = if l == 0 {
                input
            } else {
                kept[l].as_ref().expect("block input")
            };
            units.before_backward(be, l)?;
            let (view, grads) = units.unit(l)?;
            ctx.block_backward(view, grads, x_in, a, &mut d_res)?;
            units.after_backward(be, l, last_micro)?;
            kept[l] = None;
        }
        if start == 0 {
            break;
        }
        start -= seg;
    }
    Ok(())
}

/// The training step's matmul in compute dtype `dt`: bf16 runs wgmma where the card has it
/// (mma.sync for shapes it does not take), else mma.sync; fp32 the SIMT kernel.
pub(crate) fn matmul_in(
    be: &dyn Backend,
    dt: DType,
    mm: &Matmul,
    a: &Tensor,
    b: &Tensor,
    epi: Epi<'_>,
    c: &mut Tensor,
) -> Result<()> {
    match dt {
        DType::F32 | DType::I32 => be.matmul(MatmulKernel::Simt, mm, a, b, epi, c),
        DType::Bf16 => {
            if be
                .matmul_available(MatmulKernel::Wgmma, DType::Bf16)
                .is_ok()
            {
                match be.matmul(MatmulKernel::Wgmma, mm, a, b, epi, c) {
                    Err(Error::Unsupported(_)) => {}
                    other => return other,
                }
            }
            be.matmul(MatmulKernel::Mma, mm, a, b, epi, c)
        }
    }
}

/// The activations one block keeps for its backward.
pub struct Acts {
    ln1: Tensor,
    st1: RowStats,
    /// q, k, v, each `[B, H, N, d]`.
    qkv: [Tensor; 3],
    /// The attention core; None under selective recomputation.
    core: Option<Core>,
    x_mid: Tensor,
    ln2: Tensor,
    st2: RowStats,
    /// fc output before GELU, `[T, 4C]`.
    h: Tensor,
    /// GELU output, `[T, 4C]`.
    g: Tensor,
}

/// The attention output `[B, H, N, d]` and what its backward needs besides q, k, v:
/// the logsumexp (flash) or the probabilities (naive).
struct Core {
    o: Tensor,
    stats: Tensor,
}

/// The per-micro-batch constants of the schedule.
struct Ctx<'a> {
    be: &'a dyn Backend,
    dt: DType,
    t: usize,
    c: usize,
    att: AttentionShape,
    ln: LayerNorm,
    variant: Variant,
}

impl<'a> Ctx<'a> {
    fn new(be: &'a dyn Backend, sh: ModelShape, p: Policy) -> Self {
        let b = sh.batch / p.micro_batches;
        let t = b * sh.seq;
        Ctx {
            be,
            dt: p.dtype,
            t,
            c: sh.hidden,
            att: AttentionShape::new(b, sh.heads, sh.seq, sh.head_dim(), true),
            ln: LayerNorm {
                tokens: t,
                channels: sh.hidden,
                eps: 1e-5,
            },
            variant: p.attention,
        }
    }

    fn act(&self, dtype: DType, len: usize, what: &str) -> Result<Tensor> {
        self.be.alloc(dtype, len, &format!("activations: {what}"))
    }

    fn work(&self, dtype: DType, len: usize, what: &str) -> Result<Tensor> {
        self.be.alloc(dtype, len, &format!("workspace: {what}"))
    }

    fn stats(&self, what: &str) -> Result<RowStats> {
        Ok(RowStats {
            mean: self.act(DType::F32, self.t, &format!("{what} mean"))?,
            rstd: self.act(DType::F32, self.t, &format!("{what} rstd"))?,
        })
    }

    fn matmul(
        &self,
        mm: &Matmul,
        a: &Tensor,
        b: &Tensor,
        epi: Epi<'_>,
        c: &mut Tensor,
    ) -> Result<()> {
        matmul_in(self.be, self.dt, mm, a, b, epi, c)
    }

    /// y[T, n] = x[T, k] · W[k, n] + bias (+ residual).
    fn linear(
        &self,
        x: &Tensor,
        w: &Tensor,
        bias: &Tensor,
        residual: Option<&Tensor>,
        y: &mut Tensor,
    ) -> Result<()> {
        let (k, n) = (x.len() / self.t, bias.len());
        let mut mm = Matmul::new(self.t, n, k);
        mm.epilogue = Epilogue::Bias;
        self.matmul(
            &mm,
            x,
            w,
            Epi {
                bias: Some(bias),
                residual,
            },
            y,
        )
    }

    /// The backward of `linear`: dx (+)= dy · Wᵀ, dW += xᵀ · dy, db += Σ_t dy.
    fn linear_backward(
        &self,
        x: &Tensor,
        w: &Tensor,
        dy: &Tensor,
        dx: (&mut Tensor, bool),
        grads: (&mut Tensor, &mut Tensor),
    ) -> Result<()> {
        let (k, n) = (x.len() / self.t, dy.len() / self.t);
        let (dx, accumulate) = dx;
        let mut mm = Matmul::new(self.t, k, n).transposed(false, true);
        mm.accumulate = accumulate;
        self.matmul(&mm, dy, w, Epi::none(), dx)?;
        let mut mm = Matmul::new(k, n, self.t).transposed(true, false);
        mm.accumulate = true;
        self.matmul(&mm, x, dy, Epi::none(), grads.0)?;
        self.be.column_sum(dy, self.t, n, grads.1, true)
    }

    fn attention_forward(&self, qkv: &[Tensor; 3]) -> Result<Core> {
        let [q, k, v] = qkv;
        let s = &self.att;
        let mut o = self.act(self.dt, s.qkv_len(), "attention output")?;
        match self.variant {
            Variant::Flash => {
                let mut lse = self.act(DType::F32, s.stats_len(), "attention logsumexp")?;
                self.be
                    .flash_attention_forward(s, q, k, v, &mut o, &mut lse)?;
                Ok(Core { o, stats: lse })
            }
            Variant::Naive => {
                let (n, d) = (s.seq, s.head_dim);
                let mut p = self.act(self.dt, s.scores_len(), "attention probabilities")?;
                let mut mm = Matmul::new(n, n, d)
                    .transposed(false, true)
                    .batched(s.rows());
                mm.alpha = s.scale;
                self.matmul(&mm, q, k, Epi::none(), &mut p)?;
                self.be.softmax_forward(s, &mut p)?;
                self.matmul(
                    &Matmul::new(n, d, n).batched(s.rows()),
                    &p,
                    v,
                    Epi::none(),
                    &mut o,
                )?;
                Ok(Core { o, stats: p })
            }
        }
    }

    /// dq, dk, dv (heads layout) from dO; the core and q, k, v are consumed.
    fn attention_backward(
        &self,
        qkv: [Tensor; 3],
        core: Core,
        d_o: &Tensor,
    ) -> Result<[Tensor; 3]> {
        let s = &self.att;
        let [q, k, v] = &qkv;
        let mut dq = self.work(self.dt, s.qkv_len(), "dq")?;
        let mut dk = self.work(self.dt, s.qkv_len(), "dk")?;
        let mut dv = self.work(self.dt, s.qkv_len(), "dv")?;
        let mut delta = self.work(DType::F32, s.stats_len(), "attention delta")?;
        match self.variant {
            Variant::Flash => {
                let grads = AttentionGrads {
                    delta: &mut delta,
                    dq: &mut dq,
                    dk: &mut dk,
                    dv: &mut dv,
                };
                self.be
                    .flash_attention_backward(s, q, k, v, &core.o, d_o, &core.stats, grads)?;
            }
            Variant::Naive => {
                let (n, d, rows) = (s.seq, s.head_dim, s.rows());
                let p = &core.stats;
                let mut dp = self.work(self.dt, s.scores_len(), "attention dP")?;
                self.matmul(
                    &Matmul::new(n, d, n).transposed(true, false).batched(rows),
                    p,
                    d_o,
                    Epi::none(),
                    &mut dv,
                )?;
                self.matmul(
                    &Matmul::new(n, n, d).transposed(false, true).batched(rows),
                    d_o,
                    v,
                    Epi::none(),
                    &mut dp,
                )?;
                self.be.attention_delta(s, &core.o, d_o, &mut delta)?;
                self.be.softmax_backward(s, p, &mut dp, &delta)?;
                let mut mm = Matmul::new(n, d, n).batched(rows);
                mm.alpha = s.scale;
                self.matmul(&mm, &dp, k, Epi::none(), &mut dq)?;
                let mut mm = Matmul::new(n, d, n).transposed(true, false).batched(rows);
                mm.alpha = s.scale;
                self.matmul(&mm, &dp, q, Epi::none(), &mut dk)?;
            }
        }
        Ok([dq, dk, dv])
    }

    /// The attention half of a block's forward that keeps nothing for a backward: returns
    /// x_mid, every intermediate freed at its last use (see [`TrainState::probe_loss`]).
    fn lean_attention_half(&self, w: &[Tensor], x_in: &Tensor) -> Result<Tensor> {
        let (t, c, be, dt) = (self.t, self.c, self.be, self.dt);
        let mut ln1 = self.work(dt, t * c, "probe ln1")?;
        {
            let mut st = RowStats {
                mean: self.work(DType::F32, t, "probe ln1 mean")?,
                rstd: self.work(DType::F32, t, "probe ln1 rstd")?,
            };
            be.layernorm_forward(&self.ln, x_in, &w[LN1_W], &w[LN1_B], &mut ln1, &mut st)?;
        }
        let mut heads = Vec::with_capacity(3);
        for (part, name) in [(Q_W, "q"), (K_W, "k"), (V_W, "v")] {
            let mut tok = self.work(dt, t * c, &format!("probe {name} (tokens)"))?;
            self.linear(&ln1, &w[part], &w[part + 1], None, &mut tok)?;
            let mut h = self.work(dt, t * c, &format!("probe {name}"))?;
            be.tokens_to_heads(&self.att, 1, &tok, &mut h)?;
            heads.push(h);
        }
        drop(ln1);
        let qkv: [Tensor; 3] = heads
            .try_into()
            .map_err(|_| Error::Invalid("q, k, v".into()))?;
        let Core { o, stats } = self.attention_forward(&qkv)?;
        drop((qkv, stats));
        let mut att = self.work(dt, t * c, "probe attention output (tokens)")?;
        be.heads_to_tokens(&self.att, 1, &o, &mut att)?;
        drop(o);
        let mut x_mid = self.work(dt, t * c, "probe residual after attention")?;
        self.linear(&att, &w[PROJ_W], &w[PROJ_B], Some(x_in), &mut x_mid)?;
        Ok(x_mid)
    }

    /// The MLP half of the same: x_out from x_mid.
    fn lean_mlp_half(&self, w: &[Tensor], x_mid: Tensor) -> Result<Tensor> {
        let (t, c, be, dt) = (self.t, self.c, self.be, self.dt);
        let mut h = self.work(dt, t * 4 * c, "probe fc (pre-GELU)")?;
        {
            let mut ln2 = self.work(dt, t * c, "probe ln2")?;
            let mut st = RowStats {
                mean: self.work(DType::F32, t, "probe ln2 mean")?,
                rstd: self.work(DType::F32, t, "probe ln2 rstd")?,
            };
            be.layernorm_forward(&self.ln, &x_mid, &w[LN2_W], &w[LN2_B], &mut ln2, &mut st)?;
            drop(st);
            self.linear(&ln2, &w[FC_W], &w[FC_B], None, &mut h)?;
        }
        let mut g = self.work(dt, t * 4 * c, "probe GELU")?;
        be.gelu_forward(&h, &mut g)?;
        drop(h);
        let mut x_out = self.work(dt, t * c, "probe block output")?;
        self.linear(&g, &w[FC2_W], &w[FC2_B], Some(&x_mid), &mut x_out)?;
        Ok(x_out)
    }

    /// One block's forward: returns its output and the activations its backward needs.
    fn block_forward(
        &self,
        params: LayerView<'_>,
        x_in: &Tensor,
        keep_core: bool,
    ) -> Result<(Tensor, Acts)> {
        let (t, c, be, dt) = (self.t, self.c, self.be, self.dt);
        let w = params.base;
        let mut ln1 = self.act(dt, t * c, "ln1")?;
        let mut st1 = self.stats("ln1")?;
        be.layernorm_forward(&self.ln, x_in, &w[LN1_W], &w[LN1_B], &mut ln1, &mut st1)?;
        let mut heads = Vec::with_capacity(3);
        for (part, name) in [(Q_W, "q"), (K_W, "k"), (V_W, "v")] {
            let mut tok = self.work(dt, t * c, &format!("{name} (tokens)"))?;
            self.linear(&ln1, params.matrix(part), &w[part + 1], None, &mut tok)?;
            let mut h = self.act(dt, t * c, name)?;
            be.tokens_to_heads(&self.att, 1, &tok, &mut h)?;
            heads.push(h);
        }
        let qkv: [Tensor; 3] = heads
            .try_into()
            .map_err(|_| Error::Invalid("q, k, v".into()))?;
        let core = self.attention_forward(&qkv)?;
        let mut att = self.work(dt, t * c, "attention output (tokens)")?;
        be.heads_to_tokens(&self.att, 1, &core.o, &mut att)?;
        let mut x_mid = self.act(dt, t * c, "residual after attention")?;
        self.linear(
            &att,
            params.matrix(PROJ_W),
            &w[PROJ_B],
            Some(x_in),
            &mut x_mid,
        )?;
        drop(att);
        let core = keep_core.then_some(core);
        let mut ln2 = self.act(dt, t * c, "ln2")?;
        let mut st2 = self.stats("ln2")?;
        be.layernorm_forward(&self.ln, &x_mid, &w[LN2_W], &w[LN2_B], &mut ln2, &mut st2)?;
        let mut h = self.act(dt, t * 4 * c, "fc (pre-GELU)")?;
        self.linear(&ln2, params.matrix(FC_W), &w[FC_B], None, &mut h)?;
        let mut g = self.act(dt, t * 4 * c, "GELU")?;
        be.gelu_forward(&h, &mut g)?;
        let mut x_out = self.act(dt, t * c, "block output")?;
        self.linear(
            &g,
            params.matrix(FC2_W),
            &w[FC2_B],
            Some(&x_mid),
            &mut x_out,
        )?;
        let acts = Acts {
            ln1,
            st1,
            qkv,
            core,
            x_mid,
            ln2,
            st2,
            h,
            g,
        };
        Ok((x_out, acts))
    }

    /// One block's backward: consumes its activations (each freed after its last use) and
    /// turns `d_res` from dL/d(x_out) into dL/d(x_in). Gradients accumulate into `gr`.
    fn block_backward(
        &self,
        params: LayerView<'_>,
        gr: &mut [Tensor],
        x_in: &Tensor,
        a: Acts,
        d_res: &mut Tensor,
    ) -> Result<()> {
        let (t, c, be, dt) = (self.t, self.c, self.be, self.dt);
        let w = params.base;
        let Acts {
            ln1,
            st1,
            qkv,
            core,
            x_mid,
            ln2,
            st2,
            h,
            g,
        } = a;
        let (lo, hi) = gr.split_at_mut(FC2_W);
        let (dfc2, rest_hi) = hi.split_at_mut(1);
        // MLP out: x_out = x_mid + g·W_fc2 + b.
        let mut dg = self.work(dt, t * 4 * c, "d GELU")?;
        self.linear_backward(
            &g,
            params.matrix(FC2_W),
            d_res,
            (&mut dg, false),
            (&mut dfc2[0], &mut rest_hi[0]),
        )?;
        drop(g);
        let mut dh = self.work(dt, t * 4 * c, "d fc")?;
        be.gelu_backward(&h, &dg, &mut dh)?;
        drop(dg);
        drop(h);
        let mut dln2 = self.work(dt, t * c, "d ln2")?;
        {
            let (dw, db) = lo[FC_W..FC_B + 1].split_at_mut(1);
            self.linear_backward(
                &ln2,
                params.matrix(FC_W),
                &dh,
                (&mut dln2, false),
                (&mut dw[0], &mut db[0]),
            )?;
        }
        drop(dh);
        drop(ln2);
        {
            let (dw, db) = lo[LN2_W..LN2_B + 1].split_at_mut(1);
            be.layernorm_backward_params(&self.ln, &dln2, &x_mid, &st2, &mut dw[0], &mut db[0])?;
        }
        be.layernorm_backward(&self.ln, &dln2, &x_mid, &w[LN2_W], &st2, d_res, true)?;
        drop(dln2);
        drop(x_mid);
        drop(st2);
        // Attention out: x_mid = x_in + att·W_proj + b.
        let core = match core {
            Some(core) => core,
            None => self.attention_forward(&qkv)?,
        };
        let mut datt = self.work(dt, t * c, "d attention output (tokens)")?;
        let mut att = self.work(dt, t * c, "attention output (tokens)")?;
        be.heads_to_tokens(&self.att, 1, &core.o, &mut att)?;
        {
            let (dw, db) = lo[PROJ_W..PROJ_B + 1].split_at_mut(1);
            self.linear_backward(
                &att,
                params.matrix(PROJ_W),
                d_res,
                (&mut datt, false),
                (&mut dw[0], &mut db[0]),
            )?;
        }
        drop(att);
        let mut d_o = self.work(dt, t * c, "d attention output")?;
        be.tokens_to_heads(&self.att, 1, &datt, &mut d_o)?;
        drop(datt);
        let dqkv = self.attention_backward(qkv, core, &d_o)?;
        drop(d_o);
        // q, k, v projections: dln1 = Σ dpart · W_partᵀ.
        let mut dln1 = self.work(dt, t * c, "d ln1")?;
        for (i, (dpart, part)) in dqkv.into_iter().zip([Q_W, K_W, V_W]).enumerate() {
            let mut tok = self.work(dt, t * c, "d q/k/v (tokens)")?;
            be.heads_to_tokens(&self.att, 1, &dpart, &mut tok)?;
            drop(dpart);
            let (dw, db) = lo[part..part + 2].split_at_mut(1);
            self.linear_backward(
                &ln1,
                params.matrix(part),
                &tok,
                (&mut dln1, i > 0),
                (&mut dw[0], &mut db[0]),
            )?;
        }
        drop(ln1);
        {
            let (dw, db) = lo[LN1_W..LN1_B + 1].split_at_mut(1);
            be.layernorm_backward_params(&self.ln, &dln1, x_in, &st1, &mut dw[0], &mut db[0])?;
        }
        be.layernorm_backward(&self.ln, &dln1, x_in, &w[LN1_W], &st1, d_res, true)
    }
}
