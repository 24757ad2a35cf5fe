//! The transformer-block layer ops validated one by one against f64 references, so that a
//! wrong kernel is named by `headroom check` directly rather than only through the training
//! step's gradients. Check cases only (their time is in the training cases).
//!
//! Each case's memory model is the sum of its buffers. Ops that update buffers in place
//! (accumulated gradients, AdamW's state) start from known values before validation.
//!
//! The norm, MLP and embedding ops of the Llama-style models (RMSNorm, SwiGLU, the token
//! embedding with optional learned positions) are held to the f64 references of
//! `reference::layers`.

use crate::backend::{AdamW, AttentionShape, Backend, LayerNorm, RowStats, Tensor};
use crate::dtype::DType;
use crate::error::Result;
use crate::reference::gelu_tanh;
use crate::reference::layers as rl;
use crate::rng::Rng;
use crate::techniques::{
    random_tensor, Bounds, Case, CaseInfo, Comparison, Instance, Readback, Tamper, Validation,
};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    LayerNormForward,
    LayerNormBackward,
    Gelu,
    Heads,
    ColumnSum,
    Loss,
    AdamW,
    RmsNormForward,
    RmsNormBackward,
    SwiGlu,
    Embedding,
}

impl Op {
    pub fn name(self) -> &'static str {
        match self {
            Op::LayerNormForward => "layernorm-forward",
            Op::LayerNormBackward => "layernorm-backward",
            Op::Gelu => "gelu-forward-backward",
            Op::Heads => "heads-permute",
            Op::ColumnSum => "column-sum",
            Op::Loss => "loss",
            Op::AdamW => "adamw",
            Op::RmsNormForward => "rmsnorm-forward",
            Op::RmsNormBackward => "rmsnorm-backward",
            Op::SwiGlu => "swiglu-forward-backward",
            Op::Embedding => "embedding-forward-backward",
        }
    }

    /// The buffers of the op, in the order `run` uses them: (name, f32?, elements scale,
    /// random input?, updated in place?). Lengths: "tc" = t·c, "c", "t", "1", "heads",
    /// "vc" = vocabulary·c, "sc" = seq·c. The embedding's "ids" are i32 (4 bytes, hence
    /// "f32?" for their size) drawn inside the vocabulary; its last two buffers (positions)
    /// exist only in cases with learned positions.
    fn buffers(self) -> &'static [(&'static str, bool, &'static str, bool, bool)] {
        match self {
            Op::LayerNormForward => &[
                ("x", false, "tc", true, false),
                ("weight", true, "c", true, false),
                ("bias", true, "c", true, false),
                ("out", false, "tc", false, false),
                ("mean", true, "t", false, false),
                ("rstd", true, "t", false, false),
            ],
            Op::LayerNormBackward => &[
                ("x", false, "tc", true, false),
                ("weight", true, "c", true, false),
                ("bias", true, "c", true, false),
                ("out", false, "tc", false, false),
                ("mean", true, "t", false, false),
                ("rstd", true, "t", false, false),
                ("d_out", false, "tc", true, false),
                ("dx", false, "tc", true, true),
                ("d_weight", true, "c", true, true),
                ("d_bias", true, "c", true, true),
            ],
            Op::Gelu => &[
                ("x", false, "tc", true, false),
                ("d_out", false, "tc", true, false),
                ("gelu", false, "tc", false, false),
                ("dx", false, "tc", false, false),
            ],
            Op::Heads => &[
                ("tokens", false, "heads", true, false),
                ("heads", false, "heads", false, false),
                ("tokens again", false, "heads", false, false),
            ],
            Op::ColumnSum => &[
                ("x", false, "tc", true, false),
                ("sums", true, "c", true, true),
            ],
            Op::Loss => &[
                ("y", false, "tc", true, false),
                ("dy", false, "tc", false, false),
                ("loss", true, "1", false, false),
            ],
            Op::AdamW => &[
                ("param", true, "tc", true, true),
                ("grad", true, "tc", true, false),
                ("m", true, "tc", true, true),
                ("v", true, "tc", true, true),
                ("param (bf16)", false, "tc", false, false),
            ],
            Op::RmsNormForward => &[
                ("x", false, "tc", true, false),
                ("weight", true, "c", true, false),
                ("out", false, "tc", false, false),
                ("rstd", true, "t", false, false),
            ],
            Op::RmsNormBackward => &[
                ("x", false, "tc", true, false),
                ("weight", true, "c", true, false),
                ("out", false, "tc", false, false),
                ("rstd", true, "t", false, false),
                ("d_out", false, "tc", true, false),
                ("dx", false, "tc", true, true),
                ("d_weight", true, "c", true, true),
            ],
            Op::SwiGlu => &[
                ("gate", false, "tc", true, false),
                ("up", false, "tc", true, false),
                ("d_out", false, "tc", true, false),
                ("out", false, "tc", false, false),
                ("d_gate", false, "tc", false, false),
                ("d_up", false, "tc", false, false),
            ],
            Op::Embedding => &[
                ("ids", true, "t", true, false),
                ("table", false, "vc", true, false),
                ("d_out", false, "tc", true, false),
                ("out", false, "tc", false, false),
                ("d_table", true, "vc", true, true),
                ("positions", false, "sc", true, false),
                ("d_positions", true, "sc", true, true),
            ],
        }
    }
}

const ADAMW: AdamW = AdamW {
    lr: 1e-2,
    beta1: 0.9,
    beta2: 0.999,
    eps: 1e-8,
    weight_decay: 0.1,
};
const ADAMW_STEP: u32 = 3;
const EPS: f32 = 1e-5;
/// The embedding cases' vocabulary: a prime, no multiple of any block or pack.
pub const VOCAB: usize = 1031;

/// The buffers of `op` as a case with (or without) learned positions has them.
fn buffers_of(
    op: Op,
    positions: bool,
) -> &'static [(&'static str, bool, &'static str, bool, bool)] {
    let all = op.buffers();
    if op == Op::Embedding && !positions {
        &all[..all.len() - 2]
    } else {
        all
    }
}

pub struct LayerCase {
    info: CaseInfo,
    op: Op,
    t: usize,
    c: usize,
    heads: AttentionShape,
    /// The embedding's vocabulary and sequence length (position rows), and whether it has
    /// learned positions.
    vocab: usize,
    seq: usize,
    positions: bool,
}

impl LayerCase {
    /// `t` tokens of `c` channels (for the head permutation: one sequence of `t` tokens with
    /// `c / 64` heads of 64).
    /// The embedding op here has a vocabulary of [`VOCAB`] and learned positions over
    /// sequences of (t + 1) / 2 tokens (see [`LayerCase::embedding`]).
    pub fn new(op: Op, dtype: DType, t: usize, c: usize) -> Self {
        Self::with_vocab(op, dtype, t, c, VOCAB, t.div_ceil(2), true)
    }

    /// An embedding case: `t` tokens of `c` channels, ids below `vocab` (repeated ones
    /// included), learned positions over sequences of `seq` tokens when `positions`.
    pub fn embedding(
        dtype: DType,
        t: usize,
        c: usize,
        vocab: usize,
        seq: usize,
        positions: bool,
    ) -> Self {
        Self::with_vocab(Op::Embedding, dtype, t, c, vocab, seq, positions)
    }

    fn with_vocab(
        op: Op,
        dtype: DType,
        t: usize,
        c: usize,
        vocab: usize,
        seq: usize,
        positions: bool,
    ) -> Self {
        let dtype = if op == Op::AdamW { DType::Bf16 } else { dtype };
        let heads = AttentionShape::new(1, (c / 64).max(1), t, 64, false);
        let shape = match (op, positions) {
            (Op::Embedding, true) => format!("t{t}-c{c}-v{vocab}-pos{seq}"),
            (Op::Embedding, false) => format!("t{t}-c{c}-v{vocab}"),
            _ => format!("t{t}-c{c}"),
        };
        let mut info = CaseInfo::new("layers", op.name(), dtype, shape);
        let case = LayerCase {
            info: info.clone(),
            op,
            t,
            c,
            heads,
            vocab: vocab.max(1),
            seq: seq.max(1),
            positions,
        };
        info.predicted_peak_bytes = buffers_of(op, positions)
            .iter()
            .map(|&(_, f32_, len, _, _)| {
                (case.len(len) * if f32_ { 4 } else { dtype.size() }) as u64
            })
            .sum();
        if op == Op::Heads {
            info.tolerance = Bounds::EXACT.relative;
        } else if op == Op::AdamW {
            // fp32 state; the bf16 copy is held to bf16's bounds beside it.
            info.tolerance = Bounds::of(DType::F32).relative;
        }
        LayerCase { info, ..case }
    }

    fn len(&self, what: &str) -> usize {
        match what {
            "tc" => self.t * self.c,
            "c" => self.c,
            "t" => self.t,
            "heads" => self.heads.qkv_len(),
            "vc" => self.vocab * self.c,
            "sc" => self.seq * self.c,
            _ => 1,
        }
    }

    /// Token ids inside the vocabulary: the last and the first id, then draws of which every
    /// fourth repeats an earlier token's id (so rows of d_table sum several tokens).
    fn ids(&self, rng: &mut Rng) -> Vec<f32> {
        let mut ids: Vec<usize> = Vec::with_capacity(self.t);
        for t in 0..self.t {
            ids.push(match t {
                0 => self.vocab - 1,
                1 => 0,
                _ if t % 4 == 3 => ids[t / 2],
                _ => rng.below(self.vocab),
            });
        }
        ids.into_iter().map(|i| i as f32).collect()
    }
}

struct LayerInstance {
    op: Op,
    dtype: DType,
    t: usize,
    c: usize,
    heads: AttentionShape,
    seq: usize,
    positions: bool,
    bufs: Vec<Tensor>,
    /// The initial (stored) values of every input, empty for outputs.
    init: Vec<Vec<f32>>,
}

impl Case for LayerCase {
    fn info(&self) -> &CaseInfo {
        &self.info
    }

    fn setup(&self, be: &dyn Backend, rng: &mut Rng) -> Result<Box<dyn Instance>> {
        let mut bufs = Vec::new();
        let mut init = Vec::new();
        for &(name, f32_, len, random, _) in buffers_of(self.op, self.positions) {
            let dtype = match (name, f32_) {
                ("ids", _) if self.op == Op::Embedding => DType::I32,
                (_, true) => DType::F32,
                _ => self.info.dtype,
            };
            let n = self.len(len);
            if dtype == DType::I32 {
                let v = self.ids(rng);
                let mut t = be.alloc(dtype, n, name)?;
                be.write(&mut t, &v)?;
                bufs.push(t);
                init.push(v);
            } else if random {
                // Gates over [-4, 4) reach both of SiLU's tails and its bend.
                let scale = match name {
                    "x" => 2.0,
                    "gate" => 4.0,
                    _ => 1.0,
                };
                let (mut t, mut v) = random_tensor(be, rng, dtype, n, scale, name)?;
                if name == "v" {
                    // AdamW's second moment is never negative.
                    v.iter_mut().for_each(|x| *x = x.abs() * 0.1);
                    be.write(&mut t, &v)?;
                }
                bufs.push(t);
                init.push(v);
            } else {
                bufs.push(be.alloc(dtype, n, name)?);
                init.push(Vec::new());
            }
        }
        Ok(Box::new(LayerInstance {
            op: self.op,
            dtype: self.info.dtype,
            t: self.t,
            c: self.c,
            heads: self.heads,
            seq: self.seq,
            positions: self.positions,
            bufs,
            init,
        }))
    }
}

/// Splits `v` into mutable references to each of its first N elements.
fn each_mut<const N: usize>(v: &mut [Tensor]) -> [&mut Tensor; N] {
    let mut it = v.iter_mut();
    std::array::from_fn(|_| it.next().expect("enough buffers"))
}

impl Instance for LayerInstance {
    fn run(&mut self, be: &dyn Backend) -> Result<()> {
        let ln = LayerNorm {
            tokens: self.t,
            channels: self.c,
            eps: EPS,
        };
        match self.op {
            Op::LayerNormForward | Op::LayerNormBackward => {
                // The statistics travel as one RowStats: lift them out of the buffer list for
                // the call and put them back after, whatever its outcome.
                let rstd = self.bufs.remove(5);
                let mean = self.bufs.remove(4);
                let mut stats = RowStats { mean, rstd };
                let (head, tail) = self.bufs.split_at_mut(4);
                let [x, w, bias, out] = each_mut::<4>(head);
                // Backward takes its statistics from the forward, as in training.
                let r = be
                    .layernorm_forward(&ln, x, w, bias, out, &mut stats)
                    .and_then(|_| {
                        if self.op == Op::LayerNormBackward {
                            let [d_out, dx, dw, db] = each_mut::<4>(tail);
                            be.layernorm_backward(&ln, d_out, x, w, &stats, dx, true)?;
                            be.layernorm_backward_params(&ln, d_out, x, &stats, dw, db)?;
                        }
                        Ok(())
                    });
                self.bufs.insert(4, stats.mean);
                self.bufs.insert(5, stats.rstd);
                r
            }
            Op::Gelu => {
                let [x, d_out, g, dx] = each_mut::<4>(&mut self.bufs);
                be.gelu_forward(x, g)?;
                be.gelu_backward(x, d_out, dx)
            }
            Op::Heads => {
                let [tok, heads, back] = each_mut::<3>(&mut self.bufs);
                be.tokens_to_heads(&self.heads, 1, tok, heads)?;
                be.heads_to_tokens(&self.heads, 1, heads, back)
            }
            Op::ColumnSum => {
                let [x, sums] = each_mut::<2>(&mut self.bufs);
                be.column_sum(x, self.t, self.c, sums, true)
            }
            Op::Loss => {
                let [y, dy, loss] = each_mut::<3>(&mut self.bufs);
                be.mse_loss(y, 1.0 / (self.t * self.c) as f32, dy, loss)
            }
            Op::AdamW => {
                let [p, g, m, v, p16] = each_mut::<5>(&mut self.bufs);
                be.adamw(&ADAMW, ADAMW_STEP, p, g, m, v, Some(p16))
            }
            Op::RmsNormForward => {
                let [x, w, out, rstd] = each_mut::<4>(&mut self.bufs);
                be.rmsnorm_forward(&ln, x, w, out, rstd)
            }
            Op::RmsNormBackward => {
                // Backward takes rstd from the forward, as in training.
                let [x, w, out, rstd, d_out, dx, dw] = each_mut::<7>(&mut self.bufs);
                be.rmsnorm_forward(&ln, x, w, out, rstd)?;
                be.rmsnorm_backward(&ln, d_out, x, w, rstd, dx, true)?;
                be.rmsnorm_backward_params(&ln, d_out, x, rstd, dw)
            }
            Op::SwiGlu => {
                let [gate, up, d_out, out, d_gate, d_up] = each_mut::<6>(&mut self.bufs);
                be.swiglu_forward(gate, up, out)?;
                be.swiglu_backward(gate, up, d_out, d_gate, d_up)
            }
            Op::Embedding => {
                let (head, tail) = self.bufs.split_at_mut(5);
                let [ids, table, d_out, out, d_table] = each_mut::<5>(head);
                let (positions, d_positions) = match tail {
                    [p, dp] => (Some(&*p), Some(dp)),
                    _ => (None, None),
                };
                be.embedding_forward(ids, table, positions, self.seq, out)?;
                be.embedding_backward(ids, d_out, self.seq, d_table, d_positions)
            }
        }
    }

    fn validate(
        &mut self,
        be: &dyn Backend,
        _rng: &mut Rng,
        tamper: &mut Tamper<'_>,
    ) -> Result<Validation> {
        // In-place buffers back to their initial values; outputs poisoned.
        for (i, &(_, _, _, random, in_place)) in
            buffers_of(self.op, self.positions).iter().enumerate()
        {
            if in_place {
                be.write(&mut self.bufs[i], &self.init[i])?;
            } else if !random {
                be.poison(&mut self.bufs[i])?;
            }
        }
        self.run(be)?;
        let want = self.reference();
        let mut cmp = Comparison::new(match self.op {
            // AdamW's state is fp32 whatever the model's dtype.
            Op::AdamW => DType::F32,
            _ => self.dtype,
        });
        for (i, &(name, _, len, _, _)) in buffers_of(self.op, self.positions).iter().enumerate() {
            let Some(w) = &want[i] else { continue };
            let mut got = be.read(&self.bufs[i])?;
            // A row is one token's channels, one head's 64 elements, or one element of a
            // per-channel or per-token vector.
            let row = match len {
                "tc" | "vc" | "sc" => self.c,
                "heads" => self.heads.head_dim,
                _ => 1,
            };
            tamper(Readback {
                name,
                values: &mut got,
                row,
            });
            match (self.op, name) {
                (Op::Heads, _) => cmp.bounds(name, Bounds::EXACT),
                (_, "mean" | "rstd") => cmp.bounds(name, Bounds::statistic()),
                (Op::AdamW, "param (bf16)") => cmp.bounds(name, Bounds::of(DType::Bf16)),
                // fp32 sums of the stored d_out, in token order on every backend.
                (Op::Embedding, "d_table" | "d_positions") => cmp.bounds(name, Bounds::statistic()),
                _ => {}
            }
            cmp.all_finite(name, &got);
            for (j, (g, r)) in got.iter().zip(w).enumerate() {
                cmp.add(name, &|| format!("{name}[{j}]"), *g, *r);
            }
        }
        Ok(cmp.finish())
    }
}

impl LayerInstance {
    /// The f64 reference of every output buffer (None for pure inputs).
    fn reference(&self) -> Vec<Option<Vec<f64>>> {
        let (t, c) = (self.t, self.c);
        let v = |i: usize| -> Vec<f64> { self.init[i].iter().map(|x| *x as f64).collect() };
        let mut out: Vec<Option<Vec<f64>>> = vec![None; self.bufs.len()];
        match self.op {
            Op::LayerNormForward | Op::LayerNormBackward => {
                let (x, w, b) = (v(0), v(1), v(2));
                let mut y = vec![0.0; t * c];
                let (mut mean, mut rstd) = (vec![0.0; t], vec![0.0; t]);
                for r in 0..t {
                    let row = &x[r * c..(r + 1) * c];
                    let m = row.iter().sum::<f64>() / c as f64;
                    let var = row.iter().map(|a| (a - m) * (a - m)).sum::<f64>() / c as f64;
                    mean[r] = m;
                    rstd[r] = 1.0 / (var + EPS as f64).sqrt();
                    for j in 0..c {
                        y[r * c + j] = (row[j] - m) * rstd[r] * w[j] + b[j];
                    }
                }
                if self.op == Op::LayerNormBackward {
                    let (d_out, mut dx, mut dw, mut db) = (v(6), v(7), v(8), v(9));
                    for r in 0..t {
                        let xhat = |j: usize| (x[r * c + j] - mean[r]) * rstd[r];
                        let g = |j: usize| d_out[r * c + j] * w[j];
                        let mg = (0..c).map(g).sum::<f64>() / c as f64;
                        let mgx = (0..c).map(|j| g(j) * xhat(j)).sum::<f64>() / c as f64;
                        for j in 0..c {
                            dx[r * c + j] += rstd[r] * (g(j) - mg - xhat(j) * mgx);
                            dw[j] += d_out[r * c + j] * xhat(j);
                            db[j] += d_out[r * c + j];
                        }
                    }
                    out[7] = Some(dx);
                    out[8] = Some(dw);
                    out[9] = Some(db);
                }
                out[3] = Some(y);
                out[4] = Some(mean);
                out[5] = Some(rstd);
            }
            Op::Gelu => {
                let (x, d) = (v(0), v(1));
                let k0 = (2.0 / std::f64::consts::PI).sqrt();
                let grad = |a: f64| {
                    let th = (k0 * (a + 0.044715 * a * a * a)).tanh();
                    0.5 * (1.0 + th)
                        + 0.5 * a * (1.0 - th * th) * k0 * (1.0 + 3.0 * 0.044715 * a * a)
                };
                out[2] = Some(x.iter().map(|a| gelu_tanh(*a)).collect());
                out[3] = Some(x.iter().zip(&d).map(|(a, g)| g * grad(*a)).collect());
            }
            Op::Heads => {
                let src = v(0);
                let mut heads = vec![0.0; src.len()];
                crate::backend::cpu::for_each_head_index(&self.heads, 1, |tok, head| {
                    heads[head] = src[tok]
                });
                out[1] = Some(heads);
                out[2] = Some(src);
            }
            Op::ColumnSum => {
                let (x, mut s) = (v(0), v(1));
                for r in 0..t {
                    for j in 0..c {
                        s[j] += x[r * c + j];
                    }
                }
                out[1] = Some(s);
            }
            Op::Loss => {
                let y = v(0);
                let scale = (1.0 / (t * c) as f32) as f64;
                out[1] = Some(y.iter().map(|a| scale * a).collect());
                out[2] = Some(vec![0.5 * scale * y.iter().map(|a| a * a).sum::<f64>()]);
            }
            Op::AdamW => {
                let (mut p, g, mut m, mut vv) = (v(0), v(1), v(2), v(3));
                let h = ADAMW;
                let (b1, b2) = (h.beta1 as f64, h.beta2 as f64);
                let (c1, c2) = (
                    1.0 - b1.powi(ADAMW_STEP as i32),
                    1.0 - b2.powi(ADAMW_STEP as i32),
                );
                for i in 0..p.len() {
                    m[i] = b1 * m[i] + (1.0 - b1) * g[i];
                    vv[i] = b2 * vv[i] + (1.0 - b2) * g[i] * g[i];
                    p[i] -= h.lr as f64
                        * ((m[i] / c1) / ((vv[i] / c2).sqrt() + h.eps as f64)
                            + h.weight_decay as f64 * p[i]);
                }
                out[4] = Some(p.clone());
                out[0] = Some(p);
                out[2] = Some(m);
                out[3] = Some(vv);
            }
            Op::RmsNormForward | Op::RmsNormBackward => {
                let (x, w) = (&self.init[0], &self.init[1]);
                let (y, rstd) = rl::rmsnorm_forward(x, w, c, EPS as f64);
                if self.op == Op::RmsNormBackward {
                    let d_out = &self.init[4];
                    let (mut dx, mut dw) = (v(5), v(6));
                    rl::rmsnorm_backward(x, w, d_out, &rstd, c, &mut dx);
                    rl::rmsnorm_backward_params(x, d_out, &rstd, c, &mut dw);
                    out[5] = Some(dx);
                    out[6] = Some(dw);
                }
                out[2] = Some(y);
                out[3] = Some(rstd);
            }
            Op::SwiGlu => {
                let (y, dg, du) = rl::swiglu(&self.init[0], &self.init[1], &self.init[2]);
                out[3] = Some(y);
                out[4] = Some(dg);
                out[5] = Some(du);
            }
            Op::Embedding => {
                let (ids, table, d_out) = (&self.init[0], &self.init[1], &self.init[2]);
                let positions = self.positions.then(|| self.init[5].as_slice());
                out[3] = Some(rl::embedding_forward(ids, table, positions, self.seq, c));
                let mut d_table = v(4);
                let mut d_positions = self.positions.then(|| v(6));
                rl::embedding_backward(
                    ids,
                    d_out,
                    self.seq,
                    c,
                    &mut d_table,
                    d_positions.as_deref_mut(),
                );
                out[4] = Some(d_table);
                if let Some(dp) = d_positions {
                    out[6] = Some(dp);
                }
            }
        }
        let _ = self.dtype;
        out
    }
}

/// Every op in both dtypes at sizes that are no multiple of any vector width or tile.
pub fn check_cases() -> Vec<Box<dyn Case>> {
    let mut out: Vec<Box<dyn Case>> = Vec::new();
    for op in [
        Op::LayerNormForward,
        Op::LayerNormBackward,
        Op::Gelu,
        Op::Heads,
        Op::ColumnSum,
        Op::Loss,
        Op::RmsNormForward,
        Op::RmsNormBackward,
        Op::SwiGlu,
    ] {
        for dtype in [DType::F32, DType::Bf16] {
            for (t, c) in [(77, 200), (33, 128)] {
                let c = if op == Op::Heads { c / 64 * 64 } else { c };
                out.push(Box::new(LayerCase::new(op, dtype, t, c)));
            }
        }
    }
    out.push(Box::new(LayerCase::new(Op::AdamW, DType::F32, 77, 200)));
    // Sequences shorter than the batch, so position rows sum several tokens (77 = 2·32 + 13).
    for dtype in [DType::F32, DType::Bf16] {
        for (t, c, seq) in [(77, 200, 32), (33, 128, 16)] {
            for positions in [true, false] {
                out.push(Box::new(LayerCase::embedding(
                    dtype, t, c, VOCAB, seq, positions,
                )));
            }
        }
    }
    out
}
