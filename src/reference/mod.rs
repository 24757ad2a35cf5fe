//! f64 CPU references, kept apart from the backends they validate.
//!
//! Each reference computes single output elements (or rows), so that a large case is checked
//! on a random sample of its outputs at a cost linear in the sample, and a small case on all
//! of them. Inputs are the values actually stored (already rounded to the case's dtype).

use crate::shapes::{AttentionShape, Epilogue, Matmul};

pub mod layers;
pub mod loss;

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
    /// Added after the bias and GELU (C's layout and batch stride).
    pub residual: Option<&'a [f32]>,
    /// C before the call, when the call accumulates into it.
    pub c_old: Option<&'a [f32]>,
}

/// Element (batch, i, j) of `epilogue(alpha * op(A) . op(B)) (+ residual) (+ c_old)`.
pub fn matmul_element(
    mm: &Matmul,
    x: &MatmulOperands<'_>,
    batch: usize,
    i: usize,
    j: usize,
) -> f64 {
    let (a, b, bias, residual, c_old) = (x.a, x.b, x.bias, x.residual, x.c_old);
    let at_c = batch * mm.stride_c + i * mm.n + j;
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
    if let Some(r) = residual {
        x += r[at_c] as f64;
    }
    if mm.accumulate {
        if let Some(c) = c_old {
            x += c[at_c] as f64;
        }
    }
    x
}

/// One attention head's inputs: rows of length d. Under grouped-query attention `k` and `v`
/// are the kv head the query head reads (kv head h / G of `[B, Hkv, N, d]`), and a kv head's
/// dK and dV are the sums of [`Head::dk_dv_row`] (or [`HeadOutputs::dk`], `dv`) over the G
/// query heads of its group, as `techniques::attention` sums them.
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

    /// dS_ij for the visible keys of row i, with `delta` for delta_i if given (the kernels'
    /// delta is dO_i · O_i over the O they stored, which differs from the exact one by the
    /// storage dtype's rounding), else the exact one.
    fn dscores(&self, s: &AttentionShape, d_o: &[f32], delta: Option<f64>, i: usize) -> Vec<f64> {
        let p = self.probs(s, i);
        let delta = delta.unwrap_or_else(|| self.delta(s, d_o, i));
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

    /// dQ row i = scale * sum_j dS_ij K_j (delta_i as in [`Head::dscores`]).
    pub fn dq(&self, s: &AttentionShape, d_o: &[f32], delta: Option<f64>, i: usize) -> Vec<f64> {
        let mut out = vec![0f64; self.d];
        for (j, ds) in self.dscores(s, d_o, delta, i).into_iter().enumerate() {
            for (x, kv) in out.iter_mut().zip(self.row(self.k, j)) {
                *x += s.scale as f64 * ds * *kv as f64;
            }
        }
        out
    }

    /// logsumexp and delta of every query row, in O(N²·d), spread over the available cores:
    /// what [`Head::dk_dv_row`] needs of each row. delta_i is `delta[i]` if given (see
    /// [`Head::dscores`]), else dO_i · O_i with the reference O.
    pub fn row_stats(&self, s: &AttentionShape, d_o: &[f32], delta: Option<&[f64]>) -> RowStats {
        let rows: Vec<(f64, f64)> = par_map(self.n, |i| {
            let sc = self.scores(s, i);
            let max = sc.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let lse = max + sc.iter().map(|x| (x - max).exp()).sum::<f64>().ln();
            if let Some(given) = delta {
                return (lse, given[i]);
            }
            let mut o = vec![0f64; self.d];
            for (j, x) in sc.iter().enumerate() {
                let p = (x - lse).exp();
                for (oc, v) in o.iter_mut().zip(self.row(self.v, j)) {
                    *oc += p * *v as f64;
                }
            }
            let delta = o
                .iter()
                .zip(self.row(d_o, i))
                .map(|(o, g)| o * *g as f64)
                .sum();
            (lse, delta)
        });
        RowStats {
            lse: rows.iter().map(|r| r.0).collect(),
            delta: rows.iter().map(|r| r.1).collect(),
        }
    }

    /// Key row j of dK and dV (FlashAttention-2, Algorithm 2): dV_j = sum_i P_ij dO_i and
    /// dK_j = scale · sum_i dS_ij Q_i over every query row i that sees key j, with
    /// P_ij = exp(s_ij - lse_i) and dS_ij = P_ij (dO_i · V_j - delta_i), in O(N·d) given
    /// every row's statistics ([`Head::row_stats`]).
    pub fn dk_dv_row(
        &self,
        s: &AttentionShape,
        d_o: &[f32],
        stats: &RowStats,
        j: usize,
    ) -> (Vec<f64>, Vec<f64>) {
        let (kj, vj) = (self.row(self.k, j), self.row(self.v, j));
        let mut dk = vec![0f64; self.d];
        let mut dv = vec![0f64; self.d];
        let first = if s.causal { j } else { 0 };
        for i in first..self.n {
            let (qi, doi) = (self.row(self.q, i), self.row(d_o, i));
            let sij = s.scale as f64 * dot(qi, kj);
            let p = (sij - stats.lse[i]).exp();
            let ds = p * (dot(doi, vj) - stats.delta[i]);
            for c in 0..self.d {
                dv[c] += p * doi[c] as f64;
                dk[c] += s.scale as f64 * ds * qi[c] as f64;
            }
        }
        (dk, dv)
    }

    /// Every output of one head at once, in O(N^2 d): O, logsumexp, dQ, dK, dV
    /// (row-major `[N, d]`, logsumexp `[N]`), with `delta` for every row's delta_i if given
    /// (see [`Head::dscores`]). For the sizes `check` uses.
    pub fn full(&self, s: &AttentionShape, d_o: &[f32], delta: Option<&[f64]>) -> HeadOutputs {
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
            let delta: f64 = match delta {
                Some(given) => given[i],
                None => (0..d).map(|c| out.o[i * d + c] * doi[c] as f64).sum(),
            };
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

/// Per-query-row statistics of one head, in f64.
pub struct RowStats {
    pub lse: Vec<f64>,
    pub delta: Vec<f64>,
}

fn dot(a: &[f32], b: &[f32]) -> f64 {
    a.iter().zip(b).map(|(x, y)| *x as f64 * *y as f64).sum()
}

/// `f(0..n)` computed on the available cores, in order.
fn par_map<T: Send, F: Fn(usize) -> T + Sync>(n: usize, f: F) -> Vec<T> {
    let threads = std::thread::available_parallelism()
        .map(|t| t.get())
        .unwrap_or(1)
        .min(n.max(1));
    if threads <= 1 {
        return (0..n).map(f).collect();
    }
    let per = n.div_ceil(threads);
    std::thread::scope(|scope| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let f = &f;
                scope.spawn(move || (t * per..((t + 1) * per).min(n)).map(f).collect::<Vec<T>>())
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().expect("a reference thread panicked"))
            .collect()
    })
}
