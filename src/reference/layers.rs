//! f64 references of the norm, MLP and embedding ops (RMSNorm, SwiGLU, token embedding).
//!
//! Inputs are the stored values (already rounded to the case's dtype); every intermediate is
//! f64, including the statistics, so a reference never inherits a kernel's rounding.

/// RMSNorm (Zhang & Sennrich 2019, "Root Mean Square Layer Normalization", eq. 4) over rows
/// of `c` channels: out = x·rstd·w with rstd = 1/sqrt(mean_c(x²) + eps). Returns (out, rstd).
pub fn rmsnorm_forward(x: &[f32], w: &[f32], c: usize, eps: f64) -> (Vec<f64>, Vec<f64>) {
    let t = x.len() / c;
    let mut out = vec![0.0; t * c];
    let mut rstd = vec![0.0; t];
    for r in 0..t {
        let row = &x[r * c..(r + 1) * c];
        let ms = row.iter().map(|&a| a as f64 * a as f64).sum::<f64>() / c as f64;
        rstd[r] = 1.0 / (ms + eps).sqrt();
        for j in 0..c {
            out[r * c + j] = row[j] as f64 * rstd[r] * w[j] as f64;
        }
    }
    (out, rstd)
}

/// RMSNorm's input gradient added to `dx` (its value before the call).
///
/// With g = w·dy and r = (mean(x²) + eps)^-1/2, y_j = x_j·r·w_j and ∂r/∂x_k = −r³·x_k/C, so
/// dx_k = Σ_j g_j (δ_jk·r + x_j·∂r/∂x_k) = r·(g_k − x_k·r²·mean_j(g_j·x_j)).
pub fn rmsnorm_backward(
    x: &[f32],
    w: &[f32],
    d_out: &[f32],
    rstd: &[f64],
    c: usize,
    dx: &mut [f64],
) {
    for (r, &rs) in rstd.iter().enumerate() {
        let g = |j: usize| d_out[r * c + j] as f64 * w[j] as f64;
        let xv = |j: usize| x[r * c + j] as f64;
        let mean_gx = (0..c).map(|j| g(j) * xv(j)).sum::<f64>() / c as f64;
        for j in 0..c {
            dx[r * c + j] += rs * (g(j) - xv(j) * rs * rs * mean_gx);
        }
    }
}

/// RMSNorm's weight gradient added to `dw`: dw_j += Σ_t dy[t, j]·x[t, j]·rstd[t].
pub fn rmsnorm_backward_params(x: &[f32], d_out: &[f32], rstd: &[f64], c: usize, dw: &mut [f64]) {
    for (r, &rs) in rstd.iter().enumerate() {
        for j in 0..c {
            dw[j] += d_out[r * c + j] as f64 * x[r * c + j] as f64 * rs;
        }
    }
}

/// The logistic sigmoid, stable at both ends.
pub fn sigmoid(g: f64) -> f64 {
    if g >= 0.0 {
        1.0 / (1.0 + (-g).exp())
    } else {
        let e = g.exp();
        e / (1.0 + e)
    }
}

/// SiLU (Swish-1; Elfwing et al. 2018, Ramachandran et al. 2017): g·σ(g).
pub fn silu(g: f64) -> f64 {
    g * sigmoid(g)
}

/// d/dg of SiLU: σ(g) + g·σ(g)(1 − σ(g)) = σ(g)·(1 + g·(1 − σ(g))).
pub fn silu_grad(g: f64) -> f64 {
    let s = sigmoid(g);
    s * (1.0 + g * (1.0 - s))
}

/// SwiGLU (Shazeer 2020, "GLU Variants Improve Transformer", eq. 5 without the projections):
/// out = silu(gate)·up; d_gate = d_out·up·silu'(gate); d_up = d_out·silu(gate).
/// Returns (out, d_gate, d_up).
pub fn swiglu(gate: &[f32], up: &[f32], d_out: &[f32]) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    let n = gate.len();
    let (mut out, mut dg, mut du) = (vec![0.0; n], vec![0.0; n], vec![0.0; n]);
    for i in 0..n {
        let (g, u, d) = (gate[i] as f64, up[i] as f64, d_out[i] as f64);
        out[i] = silu(g) * u;
        dg[i] = d * u * silu_grad(g);
        du[i] = d * silu(g);
    }
    (out, dg, du)
}

/// Token embedding: out[t] = table[ids[t]] (+ positions[t mod seq]), rows of `c` channels.
/// `ids` must lie in the table (the case draws them so).
pub fn embedding_forward(
    ids: &[f32],
    table: &[f32],
    positions: Option<&[f32]>,
    seq: usize,
    c: usize,
) -> Vec<f64> {
    let mut out = vec![0.0; ids.len() * c];
    for (t, &id) in ids.iter().enumerate() {
        let id = id as usize;
        for j in 0..c {
            let p = positions.map_or(0.0, |p| p[(t % seq) * c + j] as f64);
            out[t * c + j] = table[id * c + j] as f64 + p;
        }
    }
    out
}

/// The embedding's gradients added to `d_table` (row ids[t] += d_out[t]) and, when given,
/// to `d_positions` (row t mod seq += d_out[t]).
pub fn embedding_backward(
    ids: &[f32],
    d_out: &[f32],
    seq: usize,
    c: usize,
    d_table: &mut [f64],
    d_positions: Option<&mut [f64]>,
) {
    for (t, &id) in ids.iter().enumerate() {
        let id = id as usize;
        for j in 0..c {
            d_table[id * c + j] += d_out[t * c + j] as f64;
        }
    }
    if let Some(dp) = d_positions {
        for t in 0..ids.len() {
            for j in 0..c {
                dp[(t % seq) * c + j] += d_out[t * c + j] as f64;
            }
        }
    }
}
