//! f64 CPU references, kept apart from the backends they validate.
//!
//! Each reference computes single output elements (or rows), so that a large case is checked
//! on a random sample of its outputs at a cost linear in the sample, and a small case on all
//! of them. Inputs are the values actually stored (already rounded to the case's dtype).

use crate::backend::{AttentionShape, Epilogue, Matmul};

/// GELU (tanh form) in f64.
pub fn gelu_tanh(x: f64) -> f64 {
    let k0 = (2.0 / std::f64::consts::PI).sqrt();
    0.5 * x * (1.0 + (k0 * (x + 0.044715 * x * x * x)).tanh())
}

/// The stored values a matmul reads.
pub struct MatmulOperands<'a> {
    pub a: &'a [f32],
    pub b: &'a [f32],
    pub bias: Option<&'a [f32]>,
    /// C before the call, when the call accumulates into it.
    pub c_old: Option<&'a [f32]>,
}

/// Element (batch, i, j) of `epilogue(alpha * op(A) . op(B)) (+ c_old)`.
pub fn matmul_element(
    mm: &Matmul,
    x: &MatmulOperands<'_>,
    batch: usize,
    i: usize,
    j: usize,
) -> f64 {
    let (a, b, bias, c_old) = (x.a, x.b, x.bias, x.c_old);
    let a0 = batch * mm.stride_a;
    let b0 = batch * mm.stride_b;
    let mut acc = 0f64;
    for kk in 0..mm.k {
        let av = if mm.trans_a {
            a[a0 + kk * mm.m + i]
        } else {
            a[a0 + i * mm.k + kk]
        };
        let bv = if mm.trans_b {
            b[b0 + j * mm.k + kk]
        } else {
            b[b0 + kk * mm.n + j]
        };
        acc += av as f64 * bv as f64;
    }
    let mut x = mm.alpha as f64 * acc;
    if let Some(bias) = bias {
        x += bias[j] as f64;
    }
    if mm.epilogue == Epilogue::BiasGelu {
        x = gelu_tanh(x);
    }
    if mm.accumulate {
        if let Some(c) = c_old {
            x += c[batch * mm.stride_c + i * mm.n + j] as f64;
        }
    }
    x
}

/// One attention head's inputs: rows of length d.
pub struct Head<'a> {
    pub q: &'a [f32],
    pub k: &'a [f32],
    pub v: &'a [f32],
    pub d: usize,
    pub n: usize,
}

impl Head<'_> {
    fn row<'b>(&self, x: &'b [f32], i: usize) -> &'b [f32] {
        &x[i * self.d..(i + 1) * self.d]
    }

    fn visible(&self, s: &AttentionShape, i: usize) -> usize {
        if s.causal {
            i + 1
        } else {
            self.n
        }
    }

    /// Scaled scores of query row i against every visible key.
    pub fn scores(&self, s: &AttentionShape, i: usize) -> Vec<f64> {
        let qi = self.row(self.q, i);
        (0..self.visible(s, i))
            .map(|j| {
                let kj = self.row(self.k, j);
                s.scale as f64
                    * qi.iter()
                        .zip(kj)
                        .map(|(a, b)| *a as f64 * *b as f64)
                        .sum::<f64>()
            })
            .collect()
    }

    /// logsumexp of row i (natural log).
    pub fn lse(&self, s: &AttentionShape, i: usize) -> f64 {
        let sc = self.scores(s, i);
        let max = sc.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        max + sc.iter().map(|x| (x - max).exp()).sum::<f64>().ln()
    }

    /// Probabilities of row i (length = visible keys).
    pub fn probs(&self, s: &AttentionShape, i: usize) -> Vec<f64> {
        let lse = self.lse(s, i);
        self.scores(s, i)
            .into_iter()
            .map(|x| (x - lse).exp())
            .collect()
    }

    /// Output row i: sum_j P_ij V_j.
    pub fn output(&self, s: &AttentionShape, i: usize) -> Vec<f64> {
        let mut o = vec![0f64; self.d];
        for (j, p) in self.probs(s, i).into_iter().enumerate() {
            for (x, v) in o.iter_mut().zip(self.row(self.v, j)) {
                *x += p * *v as f64;
            }
        }
        o
    }

    /// delta_i = rowsum(dO_i * O_i) with the reference O.
    fn delta(&self, s: &AttentionShape, d_o: &[f32], i: usize) -> f64 {
        self.output(s, i)
            .iter()
            .zip(self.row(d_o, i))
            .map(|(o, g)| o * *g as f64)
            .sum()
    }

    /// dS_ij for the visible keys of row i.
    fn dscores(&self, s: &AttentionShape, d_o: &[f32], i: usize) -> Vec<f64> {
        let p = self.probs(s, i);
        let delta = self.delta(s, d_o, i);
        let doi = self.row(d_o, i);
        p.iter()
            .enumerate()
            .map(|(j, pij)| {
                let dp: f64 = doi
                    .iter()
                    .zip(self.row(self.v, j))
                    .map(|(a, b)| *a as f64 * *b as f64)
                    .sum();
                pij * (dp - delta)
            })
            .collect()
    }

    /// dQ row i = scale * sum_j dS_ij K_j.
    pub fn dq(&self, s: &AttentionShape, d_o: &[f32], i: usize) -> Vec<f64> {
        let mut out = vec![0f64; self.d];
        for (j, ds) in self.dscores(s, d_o, i).into_iter().enumerate() {
            for (x, kv) in out.iter_mut().zip(self.row(self.k, j)) {
                *x += s.scale as f64 * ds * *kv as f64;
            }
        }
        out
    }

    /// Every output of one head at once, in O(N^2 d): O, logsumexp, dQ, dK, dV
    /// (row-major `[N, d]`, logsumexp `[N]`). For the sizes `check` uses.
    pub fn full(&self, s: &AttentionShape, d_o: &[f32]) -> HeadOutputs {
        let (n, d) = (self.n, self.d);
        let mut out = HeadOutputs {
            o: vec![0.0; n * d],
            lse: vec![0.0; n],
            dq: vec![0.0; n * d],
            dk: vec![0.0; n * d],
            dv: vec![0.0; n * d],
        };
        for i in 0..n {
            let sc = self.scores(s, i);
            let max = sc.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let lse = max + sc.iter().map(|x| (x - max).exp()).sum::<f64>().ln();
            out.lse[i] = lse;
            let p: Vec<f64> = sc.iter().map(|x| (x - lse).exp()).collect();
            let doi = self.row(d_o, i);
            for (j, pij) in p.iter().enumerate() {
                for (c, vv) in self.row(self.v, j).iter().enumerate() {
                    out.o[i * d + c] += pij * *vv as f64;
                }
            }
            let delta: f64 = (0..d).map(|c| out.o[i * d + c] * doi[c] as f64).sum();
            for (j, pij) in p.iter().enumerate() {
                let vj = self.row(self.v, j);
                let dp: f64 = doi.iter().zip(vj).map(|(a, b)| *a as f64 * *b as f64).sum();
                let ds = pij * (dp - delta) * s.scale as f64;
                let (qi, kj) = (self.row(self.q, i), self.row(self.k, j));
                for c in 0..d {
                    out.dv[j * d + c] += pij * doi[c] as f64;
                    out.dq[i * d + c] += ds * kj[c] as f64;
                    out.dk[j * d + c] += ds * qi[c] as f64;
                }
            }
        }
        out
    }
}

/// The reference outputs of one attention head.
pub struct HeadOutputs {
    pub o: Vec<f64>,
    pub lse: Vec<f64>,
    pub dq: Vec<f64>,
    pub dk: Vec<f64>,
    pub dv: Vec<f64>,
}
