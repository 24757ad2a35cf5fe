//! f64 reference of the LM head and its cross-entropy loss.
//!
//! Inputs are the stored values (already rounded to the case's dtype); the logits, their
//! log-sum-exp, the softmax and every sum are f64, so the reference never inherits a
//! kernel's rounding.

/// What the head's forward and backward produce, in f64.
pub struct HeadReference {
    /// scale·Σ_t (lse[t] − z[t, y[t]]) over rows whose target is not ignored.
    pub loss: f64,
    /// `[T]`: logsumexp of each row's logits, 0 for ignored rows.
    pub lse: Vec<f64>,
    /// `[T, C]`: Σ_v dz[t, v]·W[v] with dz = scale·(softmax(z[t]) − onehot(y[t])).
    pub d_hidden: Vec<f64>,
    /// `[V, C]`: Σ_t dz[t, v]·hidden[t] (without what d_weight held before).
    pub d_weight: Vec<f64>,
    /// The same sums of absolute values, Σ_v |dz[t, v]|·|W[v]| and Σ_t |dz[t, v]|·|hidden[t]|:
    /// what a relative rounding of every dz moves each element by, at most.
    pub d_hidden_abs: Vec<f64>,
    pub d_weight_abs: Vec<f64>,
}

/// hidden `[T, C]`, weight `[V, C]`, targets `[T]` (`ignore_index` rows add nothing);
/// logits z = hidden·weightᵀ. Targets outside [0, V) other than `ignore_index` are treated as
/// ignored here (the backends refuse them before any reference is needed).
pub fn head_cross_entropy(
    hidden: &[f32],
    weight: &[f32],
    targets: &[i32],
    ignore_index: i32,
    scale: f64,
    channels: usize,
) -> HeadReference {
    let c = channels;
    let t_n = targets.len();
    let v_n = weight.len() / c;
    let mut out = HeadReference {
        loss: 0.0,
        lse: vec![0.0; t_n],
        d_hidden: vec![0.0; t_n * c],
        d_weight: vec![0.0; v_n * c],
        d_hidden_abs: vec![0.0; t_n * c],
        d_weight_abs: vec![0.0; v_n * c],
    };
    let mut z = vec![0f64; v_n];
    for (t, &y) in targets.iter().enumerate() {
        if y == ignore_index || y < 0 || y as usize >= v_n {
            continue;
        }
        let h = &hidden[t * c..(t + 1) * c];
        for (v, zv) in z.iter_mut().enumerate() {
            let w = &weight[v * c..(v + 1) * c];
            *zv = h.iter().zip(w).map(|(&a, &b)| a as f64 * b as f64).sum();
        }
        let m = z.iter().fold(f64::NEG_INFINITY, |a, &b| a.max(b));
        let lse = m + z.iter().map(|&x| (x - m).exp()).sum::<f64>().ln();
        out.lse[t] = lse;
        out.loss += scale * (lse - z[y as usize]);
        for (v, &zv) in z.iter().enumerate() {
            let onehot = if v == y as usize { 1.0 } else { 0.0 };
            let g = scale * ((zv - lse).exp() - onehot);
            let w = &weight[v * c..(v + 1) * c];
            let dh = &mut out.d_hidden[t * c..(t + 1) * c];
            for (o, &wj) in dh.iter_mut().zip(w) {
                *o += g * wj as f64;
            }
            let dh_abs = &mut out.d_hidden_abs[t * c..(t + 1) * c];
            for (o, &wj) in dh_abs.iter_mut().zip(w) {
                *o += (g * wj as f64).abs();
            }
            let dw = &mut out.d_weight[v * c..(v + 1) * c];
            for (o, &hj) in dw.iter_mut().zip(h) {
                *o += g * hj as f64;
            }
            let dw_abs = &mut out.d_weight_abs[v * c..(v + 1) * c];
            for (o, &hj) in dw_abs.iter_mut().zip(h) {
                *o += (g * hj as f64).abs();
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two classes with logits 0 and ln 3: softmax (1/4, 3/4), lse = ln 4.
    #[test]
    fn two_classes_by_hand() {
        let l3 = 3f64.ln() as f32;
        let r = head_cross_entropy(&[1.0], &[0.0, l3], &[0, -100], -100, 1.0, 1);
        let want = 4f64.ln();
        assert!((r.lse[0] - want).abs() < 1e-6);
        assert_eq!(r.lse[1], 0.0);
        assert!((r.loss - want).abs() < 1e-6);
        // dz = (1/4 − 1, 3/4); d_hidden = Σ dz·w = 3/4·ln 3; d_weight = dz·h.
        assert!((r.d_hidden[0] - 0.75 * l3 as f64).abs() < 1e-6);
        assert!((r.d_weight[0] + 0.75).abs() < 1e-6 && (r.d_weight[1] - 0.75).abs() < 1e-6);
    }
}
