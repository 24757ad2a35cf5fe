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

pub mod arch;
pub mod head;
pub mod memory;

pub use arch::{Arch, Bias, Mlp, Norm, Preset, PRESETS};
pub use head::{HeadLoss, IGNORE_INDEX};

/// The model's size. `batch` is the global batch (sequences per optimizer step).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ModelShape {
    pub layers: usize,
    pub hidden: usize,
    pub heads: usize,
    pub seq: usize,
    pub batch: usize,
    pub arch: Arch,
}

/// One parameter tensor of a block (or of the root: embedding, final norm, head).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ParamSpec {
    pub name: &'static str,
    pub len: usize,
    /// Elements per row: a matrix `[in, out]` has rows of `out`, the `[V, C]` tables rows of
    /// `C`; a vector is one row.
    pub row: usize,
    /// Read by matmuls (or the embedding): gets a bf16 copy under a bf16 policy.
    pub matrix: bool,
}

/// Where each parameter of a block sits in its list, for the architecture: the attention
/// half's parameters first (`..attention_end`), then the MLP half's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    pub params: Vec<ParamSpec>,
    pub attention_end: usize,
    pub ln1_w: usize,
    pub ln1_b: Option<usize>,
    /// q, k, v weights and biases.
    pub qkv_w: [usize; 3],
    pub qkv_b: [Option<usize>; 3],
    pub proj_w: usize,
    pub proj_b: Option<usize>,
    pub ln2_w: usize,
    pub ln2_b: Option<usize>,
    /// GELU: fc; SwiGLU: gate.
    pub fc_w: usize,
    pub fc_b: Option<usize>,
    /// SwiGLU's up projection.
    pub up_w: Option<usize>,
    pub up_b: Option<usize>,
    /// GELU: fc2; SwiGLU: down.
    pub fc2_w: usize,
    pub fc2_b: Option<usize>,
}

impl Layout {
    /// The indices of the matrices, in order.
    pub fn matrices(&self) -> Vec<usize> {
        (0..self.params.len())
            .filter(|&i| self.params[i].matrix)
            .collect()
    }
    /// The slot of parameter `i` among the matrices, if it is one.
    pub fn matrix_slot(&self, i: usize) -> Option<usize> {
        self.params[i]
            .matrix
            .then(|| self.params[..i].iter().filter(|p| p.matrix).count())
    }
    pub fn lens(&self) -> Vec<usize> {
        self.params.iter().map(|p| p.len).collect()
    }
}

/// The parameters outside the blocks, in their list's order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RootLayout {
    pub params: Vec<ParamSpec>,
    pub embedding: usize,
    pub positions: Option<usize>,
    pub norm_w: usize,
    pub norm_b: Option<usize>,
    /// The untied head; a tied head is the embedding.
    pub head: Option<usize>,
}

impl RootLayout {
    /// The head's weight `[V, C]`: its own, or the embedding's when tied.
    pub fn head_weight(&self) -> usize {
        self.head.unwrap_or(self.embedding)
    }
}

fn push(
    params: &mut Vec<ParamSpec>,
    name: &'static str,
    len: usize,
    row: usize,
    matrix: bool,
) -> usize {
    params.push(ParamSpec {
        name,
        len,
        row,
        matrix,
    });
    params.len() - 1
}

impl ModelShape {
    /// The block stack headroom started with (see [`Arch::GPT`]).
    pub const fn gpt(layers: usize, hidden: usize, heads: usize, seq: usize, batch: usize) -> Self {
        ModelShape {
            layers,
            hidden,
            heads,
            seq,
            batch,
            arch: Arch::GPT,
        }
    }
    pub fn head_dim(&self) -> usize {
        self.hidden / self.heads
    }
    pub fn kv_heads(&self) -> usize {
        match self.arch.kv_heads {
            0 => self.heads,
            k => k,
        }
    }
    /// Width of the k and v projections' outputs.
    pub fn kv_dim(&self) -> usize {
        self.kv_heads() * self.head_dim()
    }
    /// The MLP's intermediate size.
    pub fn ffn(&self) -> usize {
        match self.arch.ffn {
            0 => 4 * self.hidden,
            f => f,
        }
    }
    pub fn vocab(&self) -> usize {
        self.arch.vocab
    }

    /// A block's parameters, in the order their tensors are kept.
    pub fn layout(&self) -> Layout {
        let (c, kv, f) = (self.hidden, self.kv_dim(), self.ffn());
        let a = self.arch;
        let norm_bias = a.norm == Norm::LayerNorm;
        let qkv_bias = a.bias != Bias::None;
        let all_bias = a.bias == Bias::All;
        let mut p = Vec::new();
        let ln1_w = push(&mut p, "ln1.weight", c, c, false);
        let ln1_b = norm_bias.then(|| push(&mut p, "ln1.bias", c, c, false));
        let mut qkv_w = [0; 3];
        let mut qkv_b = [None; 3];
        for (i, (w, b, out)) in [
            ("q.weight", "q.bias", c),
            ("k.weight", "k.bias", kv),
            ("v.weight", "v.bias", kv),
        ]
        .into_iter()
        .enumerate()
        {
            qkv_w[i] = push(&mut p, w, c * out, out, true);
            qkv_b[i] = qkv_bias.then(|| push(&mut p, b, out, out, false));
        }
        let proj_w = push(&mut p, "proj.weight", c * c, c, true);
        let proj_b = all_bias.then(|| push(&mut p, "proj.bias", c, c, false));
        let attention_end = p.len();
        let ln2_w = push(&mut p, "ln2.weight", c, c, false);
        let ln2_b = norm_bias.then(|| push(&mut p, "ln2.bias", c, c, false));
        let swiglu = a.mlp == Mlp::SwiGlu;
        let (fc, fc_bias, fc2, fc2_bias) = if swiglu {
            ("gate.weight", "gate.bias", "down.weight", "down.bias")
        } else {
            ("fc.weight", "fc.bias", "fc2.weight", "fc2.bias")
        };
        let fc_w = push(&mut p, fc, c * f, f, true);
        let fc_b = all_bias.then(|| push(&mut p, fc_bias, f, f, false));
        let up_w = swiglu.then(|| push(&mut p, "up.weight", c * f, f, true));
        let up_b = (swiglu && all_bias).then(|| push(&mut p, "up.bias", f, f, false));
        let fc2_w = push(&mut p, fc2, f * c, c, true);
        let fc2_b = all_bias.then(|| push(&mut p, fc2_bias, c, c, false));
        Layout {
            params: p,
            attention_end,
            ln1_w,
            ln1_b,
            qkv_w,
            qkv_b,
            proj_w,
            proj_b,
            ln2_w,
            ln2_b,
            fc_w,
            fc_b,
            up_w,
            up_b,
            fc2_w,
            fc2_b,
        }
    }

    /// The parameters outside the blocks; `None` without a vocabulary.
    pub fn root_layout(&self) -> Option<RootLayout> {
        let (c, v) = (self.hidden, self.arch.vocab);
        if v == 0 {
            return None;
        }
        let mut p = Vec::new();
        let embedding = push(&mut p, "embedding.weight", v * c, c, true);
        let positions = (self.arch.positions > 0)
            .then(|| push(&mut p, "positions.weight", self.arch.positions * c, c, true));
        let norm_w = push(&mut p, "norm.weight", c, c, false);
        let norm_b =
            (self.arch.norm == Norm::LayerNorm).then(|| push(&mut p, "norm.bias", c, c, false));
        let head = (!self.arch.tied).then(|| push(&mut p, "head.weight", v * c, c, true));
        Some(RootLayout {
            params: p,
            embedding,
            positions,
            norm_w,
            norm_b,
            head,
        })
    }

    /// Parameters of one block (12·C² + 13·C for [`Arch::GPT`]).
    pub fn params_per_layer(&self) -> usize {
        self.layout().params.iter().map(|p| p.len).sum()
    }
    /// Parameters outside the blocks (embedding, positions, final norm, untied head).
    pub fn root_params(&self) -> usize {
        self.root_layout()
            .map_or(0, |r| r.params.iter().map(|p| p.len).sum())
    }
    pub fn params(&self) -> usize {
        self.layers * self.params_per_layer() + self.root_params()
    }
    /// Weights that matmuls (and the embedding) read: what gets a bf16 copy.
    pub fn matrix_params(&self) -> usize {
        let of =
            |ps: &[ParamSpec]| -> usize { ps.iter().filter(|p| p.matrix).map(|p| p.len).sum() };
        self.layers * of(&self.layout().params) + self.root_layout().map_or(0, |r| of(&r.params))
    }
    /// Matmul FLOPs per token of the forward, ×3 for a training step: 2 per weight a token
    /// multiplies (the embedding and positions are looked up, not multiplied; a tied head
    /// is multiplied once).
    pub fn flop_params(&self) -> usize {
        let root = self.root_layout().map_or(0, |r| {
            r.params
                .iter()
                .filter(|p| p.matrix)
                .map(|p| p.len)
                .sum::<usize>()
                - r.params[r.embedding].len
                - r.positions.map_or(0, |i| r.params[i].len)
                + r.params[r.head_weight()].len
        });
        self.layers * self.params_per_layer() + root
    }
    pub fn name(&self) -> String {
        format!(
            "L{}-h{}-heads{}-n{}-b{}{}",
            self.layers,
            self.hidden,
            self.heads,
            self.seq,
            self.batch,
            self.arch.suffix()
        )
    }
    pub fn check(&self) -> Result<()> {
        let ok = self.layers > 0
            && self.heads > 0
            && self.hidden % self.heads == 0
            && matches!(self.head_dim(), 64 | 128)
            && self.seq > 0
            && self.batch > 0;
        if !ok {
            return Err(Error::Invalid(format!(
                "model {}: needs layers, seq and batch >= 1 and hidden / heads = 64 or 128",
                self.name()
            )));
        }
        if self.heads % self.kv_heads() != 0 {
            return Err(Error::Invalid(format!(
                "model {}: {} heads cannot be grouped over {} K/V heads (it must divide them)",
                self.name(),
                self.heads,
                self.kv_heads()
            )));
        }
        if self.arch.positions > 0 && self.seq > self.arch.positions {
            return Err(Error::Invalid(format!(
                "model {}: a sequence of {} is longer than its learned position table of {}",
                self.name(),
                self.seq,
                self.arch.positions
            )));
        }
        if self.arch.vocab == 0 && (self.arch.tied || self.arch.positions > 0) {
            return Err(Error::Invalid(format!(
                "model {}: a tied head or learned positions need a vocabulary (-v<size>)",
                self.name()
            )));
        }
        Ok(())
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

/// A training case's model and policy from its id, `train/<checkpoint>-<attention>-mb<k>
/// [-<head>]/<dtype>/L<layers>-h<hidden>-heads<heads>-n<seq>-b<batch>[<architecture>]`
/// (see [`Arch::suffix`]), or a sentence saying what was expected.
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
    let (checkpoint, attention, mb, head) = match t[..] {
        [c, a, mb] => (c, a, mb, HeadLoss::Materialized),
        [c, a, mb, h] => (c, a, mb, HeadLoss::parse_id(h).ok_or_else(bad)?),
        _ => return Err(bad()),
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
    let mut sh = ModelShape::gpt(0, 0, 0, 0, 0);
    for part in shape.split('-') {
        if arch::parse_arch_token(&mut sh.arch, part) {
            continue;
        }
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
        head,
    };
    if micro_batches == 0 || sh.batch % micro_batches != 0 {
        return Err(bad());
    }
    policy.check_for(&sh)?;
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
    /// How the LM head and loss run (a model with a vocabulary; `Materialized` otherwise).
    pub head: HeadLoss,
}

impl Policy {
    pub fn name(&self) -> String {
        let head = match self.head {
            HeadLoss::Materialized => String::new(),
            h => format!("-{}", h.id()),
        };
        format!(
            "{}-{}-mb{}{head}",
            self.checkpoint.name(),
            self.attention.name(),
            self.micro_batches
        )
    }

    /// Whether this policy applies to `shape`, or a sentence saying why not.
    pub fn check_for(&self, shape: &ModelShape) -> Result<()> {
        if self.micro_batches == 0 || shape.batch % self.micro_batches != 0 {
            return Err(Error::Invalid(format!(
                "a global batch of {} cannot be split into {} equal micro-batches",
                shape.batch, self.micro_batches
            )));
        }
        if shape.vocab() == 0 && self.head != HeadLoss::Materialized {
            return Err(Error::Invalid(format!(
                "the {} head and loss need a model with a vocabulary (-v<size>)",
                self.head.id()
            )));
        }
        Ok(())
    }
}

/// Weights, gradients, optimizer state and inputs: everything that lives across the step.
///
/// Per-unit lists (`[unit][param]`): units `0..layers` are the blocks (in [`Layout`]
/// order), and a model with a vocabulary has one more, the root (in [`RootLayout`] order).
pub struct TrainState {
    pub shape: ModelShape,
    pub policy: Policy,
    pub params: Params,
    /// fp32 gradients, `[unit][param]`.
    pub grads: Vec<Vec<Tensor>>,
    /// AdamW moments, `[unit][param]`.
    pub m: Vec<Vec<Tensor>>,
    pub v: Vec<Vec<Tensor>>,
    /// One input per micro-batch: `[T_micro, C]` hidden states without a vocabulary (the
    /// embeddings' output), `[T_micro]` token ids (i32) with one.
    pub inputs: Vec<Tensor>,
    /// With a vocabulary, one `[T_micro]` i32 target per micro-batch (-100: ignored).
    pub targets: Vec<Tensor>,
    /// What each micro-batch's loss is multiplied by: 1/(B·N·C) for ½·Σy², 1/(targets not
    /// ignored in the global batch) for cross-entropy.
    pub loss_scale: f32,
    /// One f32 loss per micro-batch, written on the device and read only when asked for, so
    /// a timed step never waits on the host.
    pub losses: Vec<Tensor>,
    pub step: u32,
    pub adamw: AdamW,
}

/// fp32 master weights and, under a bf16 policy, bf16 copies of the matrices.
pub struct Params {
    /// `[unit][param]`
    pub master: Vec<Vec<Tensor>>,
    /// `[unit][slot among the unit's matrices]`
    pub bf16: Vec<Vec<Tensor>>,
    /// The blocks' parameters, and the root's.
    pub block: Vec<ParamSpec>,
    pub root: Vec<ParamSpec>,
}

impl Params {
    /// Unit `unit`'s parameters as its forward and backward read them (`layers`: the root).
    pub fn layer(&self, unit: usize) -> LayerView<'_> {
        LayerView {
            base: &self.master[unit],
            bf16: self.bf16.get(unit).map(Vec::as_slice),
            specs: if unit < self.block_units() {
                &self.block
            } else {
                &self.root
            },
        }
    }
    fn block_units(&self) -> usize {
        self.master.len() - usize::from(!self.root.is_empty())
    }
}

/// One unit's parameters as the compute reads them: `base` in its layout's order, and the
/// bf16 copies of the matrices where there are separate ones.
#[derive(Clone, Copy)]
pub struct LayerView<'a> {
    /// Every parameter (vectors in fp32; matrices in the compute dtype unless `bf16` is set).
    pub base: &'a [Tensor],
    /// The matrices' bf16 copies, in the order of the matrices in `specs`.
    pub bf16: Option<&'a [Tensor]>,
    pub specs: &'a [ParamSpec],
}

impl<'a> LayerView<'a> {
    /// The matrix a matmul reads: the bf16 copy when there is one, else `base`'s.
    fn matrix(&self, param: usize) -> &'a Tensor {
        match self.bf16 {
            Some(copies) => {
                debug_assert!(
                    self.specs[param].matrix,
                    "{} is not a matrix",
                    self.specs[param].name
                );
                &copies[self.specs[..param].iter().filter(|p| p.matrix).count()]
            }
            None => &self.base[param],
        }
    }
    /// An optional vector parameter.
    fn opt(&self, param: Option<usize>) -> Option<&'a Tensor> {
        param.map(|i| &self.base[i])
    }
}

/// Where a step's parameters and gradients live, and what happens around each block's
/// forward and backward. The single-rank step keeps everything resident ([`Resident`]); a
/// sharded step gathers parameters, reduces gradients and frees them here.
pub trait Units {
    /// Block `l` is about to run its forward (`recompute`: again, inside the backward).
    fn before_forward(&mut self, be: &dyn Backend, l: usize, recompute: bool) -> Result<()>;
    fn after_forward(&mut self, be: &dyn Backend, l: usize, recompute: bool) -> Result<()>;
    fn before_backward(&mut self, be: &dyn Backend, l: usize) -> Result<()>;
    /// Block `l`'s gradients of this micro-batch are complete (`last`: of the step).
    fn after_backward(&mut self, be: &dyn Backend, l: usize, last: bool) -> Result<()>;
    /// Unit `l`'s parameters, and the gradients its backward accumulates into (`l ==
    /// layers`: the root's, with a vocabulary).
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
    /// `[unit][param]`
    pub weights: Vec<Vec<Vec<f32>>>,
    /// Inputs of the whole global batch: `[B·N, C]` hidden states, or `[B·N]` token ids.
    pub input: Vec<f32>,
    /// With a vocabulary, `[B·N]` targets: the next token, [`IGNORE_INDEX`] at the end of
    /// each sequence and at a few random places.
    pub targets: Vec<f32>,
}

impl InitialValues {
    /// No values: weights and inputs are zeroed instead (for dry runs, where nothing is
    /// computed and full-size host copies would only cost memory).
    pub fn unset() -> Self {
        InitialValues {
            weights: Vec::new(),
            input: Vec::new(),
            targets: Vec::new(),
        }
    }

    /// GPT-2-like scales: matrices ~ U(-a, a) with a = √3·0.02 (std 0.02), biases small,
    /// norm weights near 1; hidden inputs ~ U(-1, 1); token ids uniform over the vocabulary.
    pub fn random(shape: &ModelShape, rng: &mut Rng) -> Self {
        let layout = shape.layout();
        let fill = |rng: &mut Rng, specs: &[ParamSpec], norms: &[usize]| -> Vec<Vec<f32>> {
            specs
                .iter()
                .enumerate()
                .map(|(i, p)| {
                    if norms.contains(&i) {
                        rng.fill(p.len, 0.1).into_iter().map(|x| 1.0 + x).collect()
                    } else if p.matrix {
                        rng.fill(p.len, 0.0346)
                    } else {
                        rng.fill(p.len, 0.02)
                    }
                })
                .collect()
        };
        let mut weights: Vec<Vec<Vec<f32>>> = (0..shape.layers)
            .map(|_| fill(rng, &layout.params, &[layout.ln1_w, layout.ln2_w]))
            .collect();
        let tokens = shape.batch * shape.seq;
        let (input, targets) = match shape.root_layout() {
            None => (rng.fill(tokens * shape.hidden, 1.0), Vec::new()),
            Some(root) => {
                weights.push(fill(rng, &root.params, &[root.norm_w]));
                let v = shape.vocab();
                let ids: Vec<f32> = (0..tokens)
                    .map(|_| (rng.next_u64() % v as u64) as f32)
                    .collect();
                let targets = (0..tokens)
                    .map(|t| {
                        let last = (t + 1) % shape.seq == 0;
                        if last || rng.next_u64() % 16 == 0 {
                            IGNORE_INDEX as f32
                        } else {
                            ids[t + 1]
                        }
                    })
                    .collect();
                (ids, targets)
            }
        };
        InitialValues {
            weights,
            input,
            targets,
        }
    }

    /// The loss's scale: 1/(B·N·C) without a vocabulary, else 1/(targets not ignored).
    pub fn loss_scale(&self, shape: &ModelShape) -> f32 {
        if shape.vocab() == 0 {
            return 1.0 / (shape.batch * shape.seq * shape.hidden) as f32;
        }
        let counted = match self.targets.len() {
            0 => shape.batch * shape.seq,
            _ => self
                .targets
                .iter()
                .filter(|&&t| t != IGNORE_INDEX as f32)
                .count(),
        };
        1.0 / counted.max(1) as f32
    }
}

/// One input per micro-batch of `shape.batch` sequences (the sequences of the global
/// batch's input in `init` from sequence `first` on; zeros where `init` has none), with a
/// vocabulary one target per micro-batch, and one f32 loss per micro-batch.
pub fn inputs_and_losses(
    be: &dyn Backend,
    shape: &ModelShape,
    policy: &Policy,
    first: usize,
    init: &InitialValues,
) -> Result<(Vec<Tensor>, Vec<Tensor>, Vec<Tensor>)> {
    let vocab = shape.vocab() > 0;
    let per_sequence = if vocab {
        shape.seq
    } else {
        shape.seq * shape.hidden
    };
    let micro = shape.batch / policy.micro_batches * per_sequence;
    let at = first * per_sequence;
    let dt = if vocab { DType::I32 } else { policy.dtype };
    let load = |t: &mut Tensor, values: &[f32], j: usize| -> Result<()> {
        match values.get(at + j * micro..at + (j + 1) * micro) {
            Some(values) => be.write(t, values),
            None => be.zero(t),
        }
    };
    let mut inputs = Vec::new();
    for j in 0..policy.micro_batches {
        let what = if vocab { "token ids" } else { "micro-batch" };
        let mut t = be.alloc(dt, micro, &format!("inputs: {what} {j}"))?;
        load(&mut t, &init.input, j)?;
        inputs.push(t);
    }
    let mut targets = Vec::new();
    if vocab {
        for j in 0..policy.micro_batches {
            let mut t = be.alloc(DType::I32, micro, &format!("inputs: targets {j}"))?;
            load(&mut t, &init.targets, j)?;
            targets.push(t);
        }
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
    Ok((inputs, targets, losses))
}

/// The tag of unit `unit`'s parameter: `weights: layer 3 q.weight`, `grads: head.weight`.
pub fn param_tag(shape: &ModelShape, category: &str, unit: usize, name: &str) -> String {
    if unit < shape.layers {
        format!("{category}: layer {unit} {name}")
    } else {
        format!("{category}: {name}")
    }
}

/// The parameter list of every unit: the blocks', then the root's where there is one.
pub fn unit_specs(shape: &ModelShape) -> Vec<Vec<ParamSpec>> {
    let block = shape.layout().params;
    let mut out = vec![block; shape.layers];
    if let Some(root) = shape.root_layout() {
        out.push(root.params);
    }
    out
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
        policy.check_for(&shape)?;
        let units = unit_specs(&shape);
        let per_unit = |category: &str, fill: bool| -> Result<Vec<Vec<Tensor>>> {
            units
                .iter()
                .enumerate()
                .map(|(u, specs)| {
                    specs
                        .iter()
                        .enumerate()
                        .map(|(i, p)| {
                            let tag = param_tag(&shape, category, u, p.name);
                            let mut t = be.alloc(DType::F32, p.len, &tag)?;
                            match init.weights.get(u).filter(|_| fill) {
                                Some(w) => be.write(&mut t, &w[i])?,
                                None => be.zero(&mut t)?,
                            }
                            Ok(t)
                        })
                        .collect()
                })
                .collect()
        };
        let master = per_unit("weights", true)?;
        let mut bf16 = Vec::new();
        if policy.dtype == DType::Bf16 {
            for (u, w) in master.iter().enumerate() {
                let mut copies = Vec::new();
                for (i, p) in units[u].iter().enumerate().filter(|(_, p)| p.matrix) {
                    let tag = param_tag(&shape, "weights", u, &format!("{} (bf16)", p.name));
                    let mut t = be.alloc(DType::Bf16, p.len, &tag)?;
                    be.cast_to_bf16(&w[i], &mut t)?;
                    copies.push(t);
                }
                bf16.push(copies);
            }
        }
        let grads = per_unit("grads", false)?;
        let m = per_unit("optimizer", false)?;
        let v = per_unit("optimizer", false)?;
        let (inputs, targets, losses) = inputs_and_losses(be, &shape, &policy, 0, init)?;
        Ok(TrainState {
            shape,
            policy,
            params: Params {
                master,
                bf16,
                block: shape.layout().params,
                root: shape.root_layout().map(|r| r.params).unwrap_or_default(),
            },
            grads,
            m,
            v,
            inputs,
            targets,
            loss_scale: init.loss_scale(&shape),
            losses,
            step: 0,
            adamw: AdamW::default(),
        })
    }

    /// Forward and backward over every micro-batch, gradients zeroed first and then
    /// accumulated. Nothing is read back: see [`TrainState::loss`].
    pub fn forward_backward(&mut self, be: &dyn Backend) -> Result<()> {
        for unit in &mut self.grads {
            for g in unit {
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
                loss_scale: self.loss_scale,
                micro: j,
            };
            let data = MicroBatch {
                input: &self.inputs[j],
                targets: self.targets.get(j),
            };
            micro_batch(be, &step, &mut units, data, &mut self.losses[j])?;
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
            .chain(&self.targets)
            .chain(&self.losses)
            .map(|t| (t.tag().to_string(), t.bytes()))
            .collect()
    }

    /// The loss of the global batch (½·Σy²/numel, summed in f64 on the host, or the mean
    /// cross-entropy) of a forward pass in fp32 from the fp32 master weights, with the
    /// policy's attention variant and micro-batches: the function whose directional
    /// derivatives validate the gradients. Without a vocabulary under a bf16 policy,
    /// `inputs` holds each micro-batch's input as stored (bf16-rounded), written into an
    /// fp32 copy; otherwise the stored inputs are used and `inputs` unread.
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
        let root = (sh.vocab() > 0).then(|| LayerView {
            bf16: None,
            ..self.params.layer(sh.layers)
        });
        let mut total = 0f64;
        for j in 0..self.policy.micro_batches {
            // Under an fp32 policy the stored input is already fp32; otherwise an fp32 copy
            // of the stored (bf16) values, freed once the first block no longer needs it.
            let mut copy = match (self.policy.dtype, sh.vocab()) {
                (DType::Bf16, 0) => {
                    let host = inputs.get(j).ok_or_else(|| {
                        Error::Invalid(format!(
                            "the probe of a bf16 step needs the host values of micro-batch {j}'s input"
                        ))
                    })?;
                    let mut t = ctx.work(DType::F32, host.len(), "probe input")?;
                    be.write(&mut t, host)?;
                    Some(t)
                }
                (_, 0) => None,
                _ => {
                    let root = root.expect("a root with a vocabulary");
                    Some(ctx.embed(root, &self.inputs[j], "workspace: probe embedding")?)
                }
            };
            let mut x: Option<Tensor> = None;
            for l in 0..sh.layers {
                let w = LayerView {
                    bf16: None,
                    ..self.params.layer(l)
                };
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
            let y = x.expect("at least one block");
            match self.targets.get(j) {
                None => {
                    let y = be.read(&y)?;
                    total += 0.5
                        * y.iter().map(|&v| v as f64 * v as f64).sum::<f64>()
                        * self.loss_scale as f64;
                }
                Some(targets) => {
                    let root = root.expect("a root with a vocabulary");
                    total += ctx.lean_head(root, y, targets, self.loss_scale)?;
                }
            }
        }
        Ok(total)
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
        let specs = unit_specs(&self.shape);
        let Params { master, bf16, .. } = &mut self.params;
        let units = master
            .iter_mut()
            .zip(&self.grads)
            .zip(self.m.iter_mut().zip(self.v.iter_mut()));
        for (u, ((w, g), (m, v))) in units.enumerate() {
            let mut slot = 0;
            for (i, (((w, g), m), v)) in w
                .iter_mut()
                .zip(g)
                .zip(m.iter_mut())
                .zip(v.iter_mut())
                .enumerate()
            {
                let copy = match (specs[u][i].matrix, bf16.get_mut(u)) {
                    (true, Some(copies)) => {
                        slot += 1;
                        Some(&mut copies[slot - 1])
                    }
                    _ => None,
                };
                be.adamw(&self.adamw, self.step, w, g, m, v, copy)?;
            }
        }
        Ok(())
    }

    /// Every gradient, `[unit][param]`, as host f32.
    pub fn read_grads(&self, be: &dyn Backend) -> Result<Vec<Vec<Vec<f32>>>> {
        self.grads
            .iter()
            .map(|unit| unit.iter().map(|g| be.read(g)).collect())
            .collect()
    }
}

/// One micro-batch's place in a step: `shape.batch` is the sequences this rank trains on
/// (the whole global batch on one rank); `loss_scale` makes the micro-batches' (and ranks')
/// losses add up to the global batch's mean.
pub struct Step {
    pub shape: ModelShape,
    pub policy: Policy,
    pub loss_scale: f32,
    /// Which micro-batch of the rank's this is.
    pub micro: usize,
}

/// A micro-batch's data: its input (hidden states, or token ids with a vocabulary) and, with
/// a vocabulary, its targets.
#[derive(Clone, Copy)]
pub struct MicroBatch<'a> {
    pub input: &'a Tensor,
    pub targets: Option<&'a Tensor>,
}

/// Forward and backward of one micro-batch under the policy, units' parameters and
/// gradients from `units`; the loss goes to `loss`.
pub fn micro_batch(
    be: &dyn Backend,
    step: &Step,
    units: &mut dyn Units,
    data: MicroBatch<'_>,
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
    // With a vocabulary, block 0's input is the embedding's output, kept for the step.
    let embedded = match data.targets {
        Some(_) => Some(ctx.embed(
            units.unit(sh.layers)?.0,
            data.input,
            "activations: embedding",
        )?),
        None => None,
    };
    let input = embedded.as_ref().unwrap_or(data.input);
    // kept[l]: block l's input for l > 0 (block 0's is `input`), while needed.
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
    let last = last.expect("at least one block");
    let mut d_res = match data.targets {
        // L = ½·Σy²·scale over the global batch, so micro-batches (and ranks) add up to it.
        None => {
            be.memory().mark_phase(&phase("backward"));
            let mut d_res = ctx.work(ctx.dt, last.len(), "d residual")?;
            be.mse_loss(&last, step.loss_scale, &mut d_res, loss)?;
            drop(last);
            d_res
        }
        // Final norm, LM head, cross-entropy; then back to the last block's output.
        Some(targets) => {
            let (root, grads) = units.unit(sh.layers)?;
            let head = ctx.head_forward(root, last, targets, step.loss_scale, loss)?;
            be.memory().mark_phase(&phase("backward"));
            ctx.head_backward(root, grads, head, targets, step.loss_scale)?
        }
    };
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
    if embedded.is_some() {
        drop(embedded);
        let (root, grads) = units.unit(sh.layers)?;
        ctx.embed_backward(root, grads, data.input, &d_res)?;
    }
    drop(d_res);
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

/// A norm's per-token statistics: LayerNorm's mean and rstd, RMSNorm's rstd.
pub enum NormStats {
    Layer(RowStats),
    Rms(Tensor),
}

/// The activations one block keeps for its backward.
pub struct Acts {
    ln1: Tensor,
    st1: NormStats,
    /// q `[B, H, N, d]`, k and v `[B, Hkv, N, d]`.
    qkv: [Tensor; 3],
    /// The attention core; None under selective recomputation.
    core: Option<Core>,
    x_mid: Tensor,
    ln2: Tensor,
    st2: NormStats,
    /// GELU: the fc output before GELU; SwiGLU: the gate projection. `[T, F]`.
    h: Tensor,
    /// SwiGLU's up projection `[T, F]`.
    up: Option<Tensor>,
    /// The MLP's activation (GELU(h), or silu(gate)·up), `[T, F]`.
    g: Tensor,
}

/// The attention output `[B, H, N, d]` and what its backward needs besides q, k, v:
/// the logsumexp (flash) or the probabilities (naive).
struct Core {
    o: Tensor,
    stats: Tensor,
}

/// What the final norm and the head keep for the backward.
struct HeadActs {
    /// The last block's output (the final norm's input).
    y: Tensor,
    normed: Tensor,
    stats: NormStats,
    saved: head::HeadSaved,
}

/// The per-micro-batch constants of the schedule.
struct Ctx<'a> {
    be: &'a dyn Backend,
    sh: ModelShape,
    dt: DType,
    t: usize,
    c: usize,
    layout: Layout,
    root: Option<RootLayout>,
    /// q's (and the core's) heads; `att.kv_heads` K/V heads.
    att: AttentionShape,
    /// The K/V heads as a layout of their own, for the permutations.
    kv: AttentionShape,
    ln: LayerNorm,
    variant: Variant,
    head: HeadLoss,
}

impl<'a> Ctx<'a> {
    fn new(be: &'a dyn Backend, sh: ModelShape, p: Policy) -> Self {
        let b = sh.batch / p.micro_batches;
        let t = b * sh.seq;
        let att = AttentionShape::new(b, sh.heads, sh.seq, sh.head_dim(), true)
            .with_kv_heads(sh.kv_heads());
        Ctx {
            be,
            sh,
            dt: p.dtype,
            t,
            c: sh.hidden,
            layout: sh.layout(),
            root: sh.root_layout(),
            att,
            kv: AttentionShape::new(b, sh.kv_heads(), sh.seq, sh.head_dim(), true),
            ln: LayerNorm {
                tokens: t,
                channels: sh.hidden,
                eps: 1e-5,
            },
            variant: p.attention,
            head: p.head,
        }
    }

    fn act(&self, dtype: DType, len: usize, what: &str) -> Result<Tensor> {
        self.be.alloc(dtype, len, &format!("activations: {what}"))
    }

    fn work(&self, dtype: DType, len: usize, what: &str) -> Result<Tensor> {
        self.be.alloc(dtype, len, &format!("workspace: {what}"))
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

    fn root(&self) -> &RootLayout {
        self.root.as_ref().expect("a model with a vocabulary")
    }

    /// `out` = the norm of `x` (weight `w`, LayerNorm's bias `b`); statistics allocated
    /// with `alloc` (activations, or workspace in the probe).
    fn norm_forward(
        &self,
        w: &Tensor,
        b: Option<&Tensor>,
        x: &Tensor,
        out: &mut Tensor,
        stat: &dyn Fn(&str) -> Result<Tensor>,
        what: &str,
    ) -> Result<NormStats> {
        match (self.sh.arch.norm, b) {
            (Norm::LayerNorm, Some(b)) => {
                let mut st = RowStats {
                    mean: stat(&format!("{what} mean"))?,
                    rstd: stat(&format!("{what} rstd"))?,
                };
                self.be.layernorm_forward(&self.ln, x, w, b, out, &mut st)?;
                Ok(NormStats::Layer(st))
            }
            _ => {
                let mut rstd = stat(&format!("{what} rstd"))?;
                self.be.rmsnorm_forward(&self.ln, x, w, out, &mut rstd)?;
                Ok(NormStats::Rms(rstd))
            }
        }
    }

    /// The norm's backward: weight (and bias) gradients accumulated, dx (+)= its input
    /// gradient.
    #[allow(clippy::too_many_arguments)]
    fn norm_backward(
        &self,
        w: &Tensor,
        st: &NormStats,
        x: &Tensor,
        d_out: &Tensor,
        dw: &mut Tensor,
        db: Option<&mut Tensor>,
        dx: &mut Tensor,
        accumulate: bool,
    ) -> Result<()> {
        let be = self.be;
        match (st, db) {
            (NormStats::Layer(st), Some(db)) => {
                be.layernorm_backward_params(&self.ln, d_out, x, st, dw, db)?;
                be.layernorm_backward(&self.ln, d_out, x, w, st, dx, accumulate)
            }
            (NormStats::Rms(rstd), _) => {
                be.rmsnorm_backward_params(&self.ln, d_out, x, rstd, dw)?;
                be.rmsnorm_backward(&self.ln, d_out, x, w, rstd, dx, accumulate)
            }
            (NormStats::Layer(_), None) => Err(Error::Invalid(
                "a LayerNorm without its bias gradient".into(),
            )),
        }
    }

    /// y[T, n] = x[T, k] · W[k, n] (+ bias) (+ residual).
    fn linear(
        &self,
        x: &Tensor,
        w: &Tensor,
        bias: Option<&Tensor>,
        residual: Option<&Tensor>,
        y: &mut Tensor,
    ) -> Result<()> {
        let (k, n) = (x.len() / self.t, y.len() / self.t);
        let mut mm = Matmul::new(self.t, n, k);
        if bias.is_some() {
            mm.epilogue = Epilogue::Bias;
        }
        self.matmul(&mm, x, w, Epi { bias, residual }, y)
    }

    /// The backward of `linear`: dx (+)= dy · Wᵀ, dW += xᵀ · dy, db += Σ_t dy.
    fn linear_backward(
        &self,
        x: &Tensor,
        w: &Tensor,
        dy: &Tensor,
        dx: (&mut Tensor, bool),
        grads: (&mut Tensor, Option<&mut Tensor>),
    ) -> Result<()> {
        let (k, n) = (x.len() / self.t, dy.len() / self.t);
        let (dx, accumulate) = dx;
        let mut mm = Matmul::new(self.t, k, n).transposed(false, true);
        mm.accumulate = accumulate;
        self.matmul(&mm, dy, w, Epi::none(), dx)?;
        let mut mm = Matmul::new(k, n, self.t).transposed(true, false);
        mm.accumulate = true;
        self.matmul(&mm, x, dy, Epi::none(), grads.0)?;
        match grads.1 {
            Some(db) => self.be.column_sum(dy, self.t, n, db, true),
            None => Ok(()),
        }
    }

    /// K or V repeated over the query heads of its group, for naive attention (a copy that
    /// lives only while the products that read it run); `None` without grouping.
    fn repeated(&self, x: &Tensor, what: &str) -> Result<Option<Tensor>> {
        if self.att.kv_heads == self.att.heads {
            return Ok(None);
        }
        let mut r = self.work(self.dt, self.att.qkv_len(), &format!("{what} repeated"))?;
        self.be.repeat_kv(&self.att, x, &mut r)?;
        Ok(Some(r))
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
                {
                    let kr = self.repeated(k, "k")?;
                    self.matmul(&mm, q, kr.as_ref().unwrap_or(k), Epi::none(), &mut p)?;
                }
                self.be.softmax_forward(s, &mut p)?;
                let vr = self.repeated(v, "v")?;
                self.matmul(
                    &Matmul::new(n, d, n).batched(s.rows()),
                    &p,
                    vr.as_ref().unwrap_or(v),
                    Epi::none(),
                    &mut o,
                )?;
                Ok(Core { o, stats: p })
            }
        }
    }

    /// dq (heads layout), dk, dv (K/V heads) from dO; the core and q, k, v are consumed.
    fn attention_backward(
        &self,
        qkv: [Tensor; 3],
        core: Core,
        d_o: &Tensor,
    ) -> Result<[Tensor; 3]> {
        let s = &self.att;
        let [q, k, v] = &qkv;
        let mut dq = self.work(self.dt, s.qkv_len(), "dq")?;
        let mut dk = self.work(self.dt, s.kv_len(), "dk")?;
        let mut dv = self.work(self.dt, s.kv_len(), "dv")?;
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
                let grouped = s.kv_heads != s.heads;
                let p = &core.stats;
                let mut dp = self.work(self.dt, s.scores_len(), "attention dP")?;
                // dV (over every query head, then summed over each group).
                {
                    let mut dvr = match grouped {
                        true => Some(self.work(self.dt, s.qkv_len(), "dv repeated")?),
                        false => None,
                    };
                    self.matmul(
                        &Matmul::new(n, d, n).transposed(true, false).batched(rows),
                        p,
                        d_o,
                        Epi::none(),
                        dvr.as_mut().unwrap_or(&mut dv),
                    )?;
                    if let Some(dvr) = dvr {
                        self.be.reduce_kv(s, &dvr, &mut dv)?;
                    }
                }
                {
                    let vr = self.repeated(v, "v")?;
                    self.matmul(
                        &Matmul::new(n, n, d).transposed(false, true).batched(rows),
                        d_o,
                        vr.as_ref().unwrap_or(v),
                        Epi::none(),
                        &mut dp,
                    )?;
                }
                self.be.attention_delta(s, &core.o, d_o, &mut delta)?;
                self.be.softmax_backward(s, p, &mut dp, &delta)?;
                {
                    let kr = self.repeated(k, "k")?;
                    let mut mm = Matmul::new(n, d, n).batched(rows);
                    mm.alpha = s.scale;
                    self.matmul(&mm, &dp, kr.as_ref().unwrap_or(k), Epi::none(), &mut dq)?;
                }
                let mut dkr = match grouped {
                    true => Some(self.work(self.dt, s.qkv_len(), "dk repeated")?),
                    false => None,
                };
                let mut mm = Matmul::new(n, d, n).transposed(true, false).batched(rows);
                mm.alpha = s.scale;
                self.matmul(&mm, &dp, q, Epi::none(), dkr.as_mut().unwrap_or(&mut dk))?;
                if let Some(dkr) = dkr {
                    self.be.reduce_kv(s, &dkr, &mut dk)?;
                }
            }
        }
        Ok([dq, dk, dv])
    }

    /// q, k, v in heads layout from the normed input; `alloc` gives each permuted output
    /// its category (activations in the step, workspace in the probe).
    fn qkv(
        &self,
        params: LayerView<'_>,
        ln1: &Tensor,
        alloc: &dyn Fn(DType, usize, &str) -> Result<Tensor>,
        prefix: &str,
    ) -> Result<[Tensor; 3]> {
        let (t, c, be, dt) = (self.t, self.c, self.be, self.dt);
        let lay = &self.layout;
        let mut heads = Vec::with_capacity(3);
        for (i, name) in ["q", "k", "v"].into_iter().enumerate() {
            let (width, shape) = match i {
                0 => (c, &self.att),
                _ => (self.sh.kv_dim(), &self.kv),
            };
            let mut tok = self.work(dt, t * width, &format!("{prefix}{name} (tokens)"))?;
            self.linear(
                ln1,
                params.matrix(lay.qkv_w[i]),
                params.opt(lay.qkv_b[i]),
                None,
                &mut tok,
            )?;
            let mut h = alloc(dt, t * width, &format!("{prefix}{name}"))?;
            be.tokens_to_heads(shape, 1, &tok, &mut h)?;
            heads.push(h);
        }
        heads
            .try_into()
            .map_err(|_| Error::Invalid("q, k, v".into()))
    }

    /// The MLP's projections up and its activation from the normed input: (h, up, g).
    fn mlp_up(
        &self,
        params: LayerView<'_>,
        ln2: &Tensor,
        alloc: &dyn Fn(DType, usize, &str) -> Result<Tensor>,
        prefix: &str,
    ) -> Result<(Tensor, Option<Tensor>, Tensor)> {
        let (tf, be, dt, lay) = (self.t * self.sh.ffn(), self.be, self.dt, &self.layout);
        match lay.up_w {
            None => {
                let mut h = alloc(dt, tf, &format!("{prefix}fc (pre-GELU)"))?;
                self.linear(
                    ln2,
                    params.matrix(lay.fc_w),
                    params.opt(lay.fc_b),
                    None,
                    &mut h,
                )?;
                let mut g = alloc(dt, tf, &format!("{prefix}GELU"))?;
                be.gelu_forward(&h, &mut g)?;
                Ok((h, None, g))
            }
            Some(up_w) => {
                let mut gate = alloc(dt, tf, &format!("{prefix}gate"))?;
                self.linear(
                    ln2,
                    params.matrix(lay.fc_w),
                    params.opt(lay.fc_b),
                    None,
                    &mut gate,
                )?;
                let mut up = alloc(dt, tf, &format!("{prefix}up"))?;
                self.linear(
                    ln2,
                    params.matrix(up_w),
                    params.opt(lay.up_b),
                    None,
                    &mut up,
                )?;
                let mut g = alloc(dt, tf, &format!("{prefix}SwiGLU"))?;
                be.swiglu_forward(&gate, &up, &mut g)?;
                Ok((gate, Some(up), g))
            }
        }
    }

    /// The attention half of a block's forward that keeps nothing for a backward: returns
    /// x_mid, every intermediate freed at its last use (see [`TrainState::probe_loss`]).
    fn lean_attention_half(&self, w: LayerView<'_>, x_in: &Tensor) -> Result<Tensor> {
        let (t, c, be, dt, lay) = (self.t, self.c, self.be, self.dt, &self.layout);
        let work = |d: DType, n: usize, what: &str| self.work(d, n, what);
        let mut ln1 = self.work(dt, t * c, "probe ln1")?;
        let stat = |what: &str| self.work(DType::F32, t, what);
        drop(self.norm_forward(
            &w.base[lay.ln1_w],
            w.opt(lay.ln1_b),
            x_in,
            &mut ln1,
            &stat,
            "probe ln1",
        )?);
        let qkv = self.qkv(w, &ln1, &work, "probe ")?;
        drop(ln1);
        let Core { o, stats } = self.attention_forward(&qkv)?;
        drop((qkv, stats));
        let mut att = self.work(dt, t * c, "probe attention output (tokens)")?;
        be.heads_to_tokens(&self.att, 1, &o, &mut att)?;
        drop(o);
        let mut x_mid = self.work(dt, t * c, "probe residual after attention")?;
        self.linear(
            &att,
            w.matrix(lay.proj_w),
            w.opt(lay.proj_b),
            Some(x_in),
            &mut x_mid,
        )?;
        Ok(x_mid)
    }

    /// The MLP half of the same: x_out from x_mid.
    fn lean_mlp_half(&self, w: LayerView<'_>, x_mid: Tensor) -> Result<Tensor> {
        let (t, c, dt, lay) = (self.t, self.c, self.dt, &self.layout);
        let work = |d: DType, n: usize, what: &str| self.work(d, n, what);
        let g = {
            let mut ln2 = self.work(dt, t * c, "probe ln2")?;
            let stat = |what: &str| self.work(DType::F32, t, what);
            drop(self.norm_forward(
                &w.base[lay.ln2_w],
                w.opt(lay.ln2_b),
                &x_mid,
                &mut ln2,
                &stat,
                "probe ln2",
            )?);
            let (h, up, g) = self.mlp_up(w, &ln2, &work, "probe ")?;
            drop((h, up));
            g
        };
        let mut x_out = self.work(dt, t * c, "probe block output")?;
        self.linear(
            &g,
            w.matrix(lay.fc2_w),
            w.opt(lay.fc2_b),
            Some(&x_mid),
            &mut x_out,
        )?;
        Ok(x_out)
    }

    /// The token embedding (and learned positions) of `ids`, tagged `tag`.
    fn embed(&self, root: LayerView<'_>, ids: &Tensor, tag: &str) -> Result<Tensor> {
        let r = self.root();
        let mut x = self.be.alloc(self.dt, self.t * self.c, tag)?;
        let positions = r.positions.map(|i| root.matrix(i));
        self.be.embedding_forward(
            ids,
            root.matrix(r.embedding),
            positions,
            self.sh.seq,
            &mut x,
        )?;
        Ok(x)
    }

    /// The embedding's backward: the table's (and positions') gradients from dL/d(x0).
    fn embed_backward(
        &self,
        _root: LayerView<'_>,
        grads: &mut [Tensor],
        ids: &Tensor,
        d_x0: &Tensor,
    ) -> Result<()> {
        let r = self.root();
        let (lo, hi) = grads.split_at_mut(r.embedding + 1);
        let d_positions = r.positions.map(|i| &mut hi[i - r.embedding - 1]);
        self.be
            .embedding_backward(ids, d_x0, self.sh.seq, &mut lo[r.embedding], d_positions)
    }

    fn head_shape(&self) -> head::HeadShape {
        head::HeadShape {
            tokens: self.t,
            hidden: self.c,
            vocab: self.sh.vocab(),
        }
    }

    /// Final norm, LM head and cross-entropy of the last block's output `y`: the loss is
    /// accumulated into `loss`; what the backward needs is returned.
    fn head_forward(
        &self,
        root: LayerView<'_>,
        y: Tensor,
        targets: &Tensor,
        scale: f32,
        loss: &mut Tensor,
    ) -> Result<HeadActs> {
        let r = self.root();
        let mut normed = self.act(self.dt, self.t * self.c, "final norm")?;
        let stat = |what: &str| self.act(DType::F32, self.t, what);
        let stats = self.norm_forward(
            &root.base[r.norm_w],
            root.opt(r.norm_b),
            &y,
            &mut normed,
            &stat,
            "final norm",
        )?;
        let saved = head::head_forward(
            self.be,
            self.dt,
            self.head,
            self.head_shape(),
            &normed,
            root.matrix(r.head_weight()),
            targets,
            scale,
            loss,
        )?;
        Ok(HeadActs {
            y,
            normed,
            stats,
            saved,
        })
    }

    /// The backward of [`Ctx::head_forward`]: the head's and the final norm's gradients,
    /// and dL/dy, returned as the residual stream's gradient.
    fn head_backward(
        &self,
        root: LayerView<'_>,
        grads: &mut [Tensor],
        a: HeadActs,
        targets: &Tensor,
        scale: f32,
    ) -> Result<Tensor> {
        let r = self.root();
        let HeadActs {
            y,
            normed,
            stats,
            saved,
        } = a;
        let mut d_normed = self.work(self.dt, self.t * self.c, "d final norm")?;
        head::head_backward(
            self.be,
            self.dt,
            self.head,
            self.head_shape(),
            &normed,
            root.matrix(r.head_weight()),
            targets,
            scale,
            saved,
            &mut d_normed,
            &mut grads[r.head_weight()],
        )?;
        drop(normed);
        let mut d_res = self.work(self.dt, self.t * self.c, "d residual")?;
        let (dw, db) = split_pair(grads, r.norm_w, r.norm_b);
        self.norm_backward(
            &root.base[r.norm_w],
            &stats,
            &y,
            &d_normed,
            dw,
            db,
            &mut d_res,
            false,
        )?;
        Ok(d_res)
    }

    /// The probe's head: the fp32 loss of `y` under the policy's head variant, nothing kept.
    fn lean_head(
        &self,
        root: LayerView<'_>,
        y: Tensor,
        targets: &Tensor,
        scale: f32,
    ) -> Result<f64> {
        let r = self.root();
        let mut normed = self.work(self.dt, self.t * self.c, "probe final norm")?;
        let stat = |what: &str| self.work(DType::F32, self.t, what);
        drop(self.norm_forward(
            &root.base[r.norm_w],
            root.opt(r.norm_b),
            &y,
            &mut normed,
            &stat,
            "probe final norm",
        )?);
        drop(y);
        let mut loss = self.work(DType::F32, 1, "probe loss")?;
        self.be.zero(&mut loss)?;
        drop(head::head_forward(
            self.be,
            self.dt,
            self.head,
            self.head_shape(),
            &normed,
            root.matrix(r.head_weight()),
            targets,
            scale,
            &mut loss,
        )?);
        Ok(self.be.read(&loss)?[0] as f64)
    }

    /// One block's forward: returns its output and the activations its backward needs.
    fn block_forward(
        &self,
        params: LayerView<'_>,
        x_in: &Tensor,
        keep_core: bool,
    ) -> Result<(Tensor, Acts)> {
        let (t, c, be, dt, lay) = (self.t, self.c, self.be, self.dt, &self.layout);
        let w = params.base;
        let act = |d: DType, n: usize, what: &str| self.act(d, n, what);
        let stat = |what: &str| self.act(DType::F32, t, what);
        let mut ln1 = self.act(dt, t * c, "ln1")?;
        let st1 = self.norm_forward(
            &w[lay.ln1_w],
            params.opt(lay.ln1_b),
            x_in,
            &mut ln1,
            &stat,
            "ln1",
        )?;
        let qkv = self.qkv(params, &ln1, &act, "")?;
        let core = self.attention_forward(&qkv)?;
        let mut att = self.work(dt, t * c, "attention output (tokens)")?;
        be.heads_to_tokens(&self.att, 1, &core.o, &mut att)?;
        let mut x_mid = self.act(dt, t * c, "residual after attention")?;
        self.linear(
            &att,
            params.matrix(lay.proj_w),
            params.opt(lay.proj_b),
            Some(x_in),
            &mut x_mid,
        )?;
        drop(att);
        let core = keep_core.then_some(core);
        let mut ln2 = self.act(dt, t * c, "ln2")?;
        let st2 = self.norm_forward(
            &w[lay.ln2_w],
            params.opt(lay.ln2_b),
            &x_mid,
            &mut ln2,
            &stat,
            "ln2",
        )?;
        let (h, up, g) = self.mlp_up(params, &ln2, &act, "")?;
        let mut x_out = self.act(dt, t * c, "block output")?;
        self.linear(
            &g,
            params.matrix(lay.fc2_w),
            params.opt(lay.fc2_b),
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
            up,
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
        let (t, c, be, dt, lay) = (self.t, self.c, self.be, self.dt, &self.layout);
        let tf = t * self.sh.ffn();
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
            up,
            g,
        } = a;
        // MLP out: x_out = x_mid + g·W_fc2 (+ b).
        let mut dg = self.work(dt, tf, "d MLP activation")?;
        {
            let (dw, db) = split_pair(gr, lay.fc2_w, lay.fc2_b);
            self.linear_backward(
                &g,
                params.matrix(lay.fc2_w),
                d_res,
                (&mut dg, false),
                (dw, db),
            )?;
        }
        drop(g);
        // The order of the frees and allocations below is the memory model's (see
        // `memory::Sizes::block_backward`).
        // The gradient of the first projection (GELU's fc, SwiGLU's gate) and SwiGLU's up's.
        let (d_fc, d_up) = match (up, lay.up_w) {
            (Some(up), Some(up_w)) => {
                let mut dgate = self.work(dt, tf, "d gate")?;
                let mut dup = self.work(dt, tf, "d up")?;
                be.swiglu_backward(&h, &up, &dg, &mut dgate, &mut dup)?;
                drop(dg);
                drop((h, up));
                (dgate, Some((dup, up_w)))
            }
            _ => {
                let mut dh = self.work(dt, tf, "d fc")?;
                be.gelu_backward(&h, &dg, &mut dh)?;
                drop(dg);
                drop(h);
                (dh, None)
            }
        };
        let mut dln2 = self.work(dt, t * c, "d ln2")?;
        {
            let (dw, db) = split_pair(gr, lay.fc_w, lay.fc_b);
            self.linear_backward(
                &ln2,
                params.matrix(lay.fc_w),
                &d_fc,
                (&mut dln2, false),
                (dw, db),
            )?;
        }
        drop(d_fc);
        if let Some((dup, up_w)) = d_up {
            let (dw, db) = split_pair(gr, up_w, lay.up_b);
            self.linear_backward(&ln2, params.matrix(up_w), &dup, (&mut dln2, true), (dw, db))?;
        }
        drop(ln2);
        {
            let (dw, db) = split_pair(gr, lay.ln2_w, lay.ln2_b);
            self.norm_backward(&w[lay.ln2_w], &st2, &x_mid, &dln2, dw, db, d_res, true)?;
        }
        drop(dln2);
        drop(x_mid);
        drop(st2);
        // Attention out: x_mid = x_in + att·W_proj (+ b).
        let core = match core {
            Some(core) => core,
            None => self.attention_forward(&qkv)?,
        };
        let mut datt = self.work(dt, t * c, "d attention output (tokens)")?;
        let mut att = self.work(dt, t * c, "attention output (tokens)")?;
        be.heads_to_tokens(&self.att, 1, &core.o, &mut att)?;
        {
            let (dw, db) = split_pair(gr, lay.proj_w, lay.proj_b);
            self.linear_backward(
                &att,
                params.matrix(lay.proj_w),
                d_res,
                (&mut datt, false),
                (dw, db),
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
        for (i, dpart) in dqkv.into_iter().enumerate() {
            let shape = if i == 0 { &self.att } else { &self.kv };
            let mut tok = self.work(dt, dpart.len(), "d q/k/v (tokens)")?;
            be.heads_to_tokens(shape, 1, &dpart, &mut tok)?;
            drop(dpart);
            let (dw, db) = split_pair(gr, lay.qkv_w[i], lay.qkv_b[i]);
            self.linear_backward(
                &ln1,
                params.matrix(lay.qkv_w[i]),
                &tok,
                (&mut dln1, i > 0),
                (dw, db),
            )?;
        }
        drop(ln1);
        let (dw, db) = split_pair(gr, lay.ln1_w, lay.ln1_b);
        self.norm_backward(&w[lay.ln1_w], &st1, x_in, &dln1, dw, db, d_res, true)
    }
}

/// A weight's gradient and its (optional) bias's, borrowed together: the bias, when there
/// is one, comes right after the weight in every layout.
fn split_pair(
    grads: &mut [Tensor],
    w: usize,
    b: Option<usize>,
) -> (&mut Tensor, Option<&mut Tensor>) {
    let (lo, hi) = grads.split_at_mut(w + 1);
    match b {
        Some(b) => {
            debug_assert_eq!(b, w + 1, "a bias follows its weight");
            (&mut lo[w], Some(&mut hi[0]))
        }
        None => (&mut lo[w], None),
    }
}
