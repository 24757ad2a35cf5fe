//! The CPU backend: the same operations on host memory, in f32 arithmetic with the storage
//! rounding of each dtype emulated (bf16 through `half`), through the same accounting.
//!
//! It exists so that every schedule runs, and every memory model is pinned, on a machine with
//! no GPU; its timings measure the host, not a card.

use std::time::Instant;

use crate::backend::{
    AdamW, AttentionGrads, AttentionShape, Backend, BackendKind, Epi, Epilogue, LayerNorm, Matmul,
    MatmulKernel, RowStats, Storage, Tensor,
};
use crate::device::DeviceFacts;
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::memory::MemoryTracker;

pub struct CpuBackend {
    facts: DeviceFacts,
    tracker: MemoryTracker,
}

impl CpuBackend {
    pub fn new(budget: Option<u64>, reason: Option<String>) -> Self {
        CpuBackend {
            facts: DeviceFacts::cpu(reason),
            tracker: MemoryTracker::new(budget),
        }
    }
}

/// GELU, tanh form: the same f32 expression as `kernels/common.cuh`.
pub fn gelu_tanh(x: f32) -> f32 {
    const K0: f32 = 0.797_884_6; // sqrt(2/pi)
    const K1: f32 = 0.044715;
    0.5 * x * (1.0 + (K0 * (x + K1 * x * x * x)).tanh())
}

/// Element (r, c) of op(X) where X is stored `[rows, cols]` or, transposed, `[cols, rows]`.
#[inline]
fn at(x: &[f32], trans: bool, r: usize, c: usize, rows: usize, cols: usize) -> f32 {
    if trans {
        x[c * rows + r]
    } else {
        x[r * cols + c]
    }
}

pub(crate) fn check_same_dtype(what: &str, dtype: DType, ts: &[&Tensor]) -> Result<()> {
    for t in ts {
        if t.dtype() != dtype {
            return Err(Error::Invalid(format!(
                "{what}: {} is {} but the operation is {dtype}",
                t.tag(),
                t.dtype()
            )));
        }
    }
    Ok(())
}

/// Runs `f(row_begin, row_end, out_chunk)` over row blocks on the available cores.
fn parallel_rows<F>(out: &mut [f32], row_len: usize, f: F)
where
    F: Fn(usize, &mut [f32]) + Sync,
{
    let rows = out.len() / row_len.max(1);
    let threads = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
        .min(rows.max(1));
    if threads <= 1 || out.len() < 1 << 14 {
        f(0, out);
        return;
    }
    let per = rows.div_ceil(threads);
    std::thread::scope(|s| {
        for (i, chunk) in out.chunks_mut(per * row_len).enumerate() {
            let f = &f;
            s.spawn(move || f(i * per, chunk));
        }
    });
}

impl Backend for CpuBackend {
    fn kind(&self) -> BackendKind {
        BackendKind::Cpu
    }
    fn facts(&self) -> &DeviceFacts {
        &self.facts
    }
    fn memory(&self) -> &MemoryTracker {
        &self.tracker
    }

    fn alloc(&self, dtype: DType, len: usize, tag: &str) -> Result<Tensor> {
        let bytes = (len * dtype.size()) as u64;
        let id = self.tracker.admit(bytes, tag)?;
        let words = (bytes as usize).div_ceil(8);
        let mut storage = Vec::new();
        if storage.try_reserve_exact(words).is_err() {
            let oom = self
                .tracker
                .device_oom(bytes, tag, "host allocation failed");
            self.tracker.release(id, bytes, tag);
            return Err(oom.into());
        }
        storage.resize(words, 0u64);
        Ok(Tensor::new(
            dtype,
            len,
            id,
            tag,
            Storage::Host(storage),
            self.tracker.clone(),
        ))
    }

    fn write(&self, t: &mut Tensor, values: &[f32]) -> Result<()> {
        if values.len() != t.len() {
            return Err(Error::Invalid(format!(
                "writing {} values into {} ({} elements)",
                values.len(),
                t.tag(),
                t.len()
            )));
        }
        t.set_host_values(values);
        Ok(())
    }

    fn read(&self, t: &Tensor) -> Result<Vec<f32>> {
        Ok(t.host_values())
    }

    fn poison(&self, t: &mut Tensor) -> Result<()> {
        t.poison_host();
        Ok(())
    }

    fn copy(&self, dst: &mut Tensor, src: &Tensor) -> Result<()> {
        if dst.bytes() != src.bytes() || dst.dtype() != src.dtype() {
            return Err(Error::Invalid(format!(
                "copy from {} to {}: sizes or dtypes differ",
                src.tag(),
                dst.tag()
            )));
        }
        let v = src.host_values();
        dst.set_host_values(&v);
        Ok(())
    }

    fn copy_range(
        &self,
        dst: &mut Tensor,
        dst_at: usize,
        src: &Tensor,
        src_at: usize,
        len: usize,
    ) -> Result<()> {
        crate::backend::check_copy_range(dst, dst_at, src, src_at, len)?;
        let size = src.dtype().size();
        let from = src.host_bytes()[src_at * size..(src_at + len) * size].to_vec();
        dst.host_bytes_mut()[dst_at * size..(dst_at + len) * size].copy_from_slice(&from);
        Ok(())
    }

    fn peer(&self, _rank: usize) -> Result<std::sync::Arc<dyn Backend>> {
        Ok(std::sync::Arc::new(CpuBackend::new(
            self.memory().budget(),
            self.facts().fallback_reason.clone(),
        )))
    }

    fn matmul_available(
        &self,
        kernel: MatmulKernel,
        _dtype: DType,
    ) -> std::result::Result<(), String> {
        match kernel {
            MatmulKernel::Cublas => Err("cuBLAS needs a GPU".into()),
            k if k.is_wgmma() => Err("wgmma is a Hopper instruction; the CPU backend stands in for the simt and mma kernels only".into()),
            _ => Ok(()),
        }
    }

    fn matmul(
        &self,
        kernel: MatmulKernel,
        mm: &Matmul,
        a: &Tensor,
        b: &Tensor,
        epi: Epi<'_>,
        c: &mut Tensor,
    ) -> Result<()> {
        self.matmul_available(kernel, a.dtype())
            .map_err(Error::Unsupported)?;
        let in_dtype = match kernel {
            MatmulKernel::Simt => DType::F32,
            MatmulKernel::Cublas => a.dtype(),
            _ => DType::Bf16,
        };
        check_same_dtype("matmul", in_dtype, &[a, b])?;
        if kernel == MatmulKernel::Simt && c.dtype() != DType::F32 {
            return Err(Error::Invalid(
                "the fp32 SIMT matmul writes f32 only".into(),
            ));
        }
        mm.check(a, b, c, epi)?;
        let (m, n, k) = (mm.m, mm.n, mm.k);
        let av = a.host_values();
        let bv = b.host_values();
        let bias_v = epi
            .bias
            .filter(|_| mm.epilogue != Epilogue::None)
            .map(|t| t.host_f32().to_vec());
        let res_v = epi.residual.map(|t| t.host_values());
        let mut cv = c.host_values();
        let c_dtype = c.dtype();
        for batch in 0..mm.batch {
            let a0 = &av[batch * mm.stride_a..];
            let b0 = &bv[batch * mm.stride_b..];
            // op(B) laid out [k, n] contiguously so the inner loop streams it.
            let mut bt = vec![0f32; k * n];
            for kk in 0..k {
                for j in 0..n {
                    bt[kk * n + j] = at(b0, mm.trans_b, kk, j, k, n);
                }
            }
            let c0 = &mut cv[batch * mm.stride_c..batch * mm.stride_c + m * n];
            let r0 = res_v
                .as_ref()
                .map(|r| &r[batch * mm.stride_c..batch * mm.stride_c + m * n]);
            parallel_rows(c0, n, |row0, rows| {
                let mut acc = vec![0f32; n];
                for (r, out) in rows.chunks_mut(n).enumerate() {
                    let i = row0 + r;
                    acc.iter_mut().for_each(|x| *x = 0.0);
                    for kk in 0..k {
                        let aik = at(a0, mm.trans_a, i, kk, m, k);
                        let brow = &bt[kk * n..(kk + 1) * n];
                        for (x, bj) in acc.iter_mut().zip(brow) {
                            *x += aik * bj;
                        }
                    }
                    for j in 0..n {
                        let mut x = mm.alpha * acc[j];
                        if let Some(bias) = &bias_v {
                            x += bias[j];
                        }
                        if mm.epilogue == Epilogue::BiasGelu {
                            x = gelu_tanh(x);
                        }
                        if let Some(r) = r0 {
                            x += r[i * n + j];
                        }
                        if mm.accumulate {
                            x += out[j];
                        }
                        out[j] = c_dtype.round(x);
                    }
                }
            });
        }
        c.set_host_values(&cv);
        Ok(())
    }

    fn flash_attention_forward(
        &self,
        s: &AttentionShape,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        o: &mut Tensor,
        lse: &mut Tensor,
    ) -> Result<()> {
        let dt = q.dtype();
        check_same_dtype("flash attention forward", dt, &[k, v, o])?;
        check_attention(s, &[q, o], &[k, v], &[lse])?;
        let (qv, kv, vv) = (q.host_values(), k.host_values(), v.host_values());
        let (n, d) = (s.seq, s.head_dim);
        let mut ov = vec![0f32; s.qkv_len()];
        let lse_v = lse.host_f32_mut();
        let mut p = vec![0f32; n];
        for bh in 0..s.rows() {
            // Query head bh reads its group's kv head (GQA; the same head when Hkv = H).
            let (base, kbase) = (bh * n * d, s.kv_head_of(bh) * n * d);
            for i in 0..n {
                let visible = if s.causal { i + 1 } else { n };
                let qi = &qv[base + i * d..base + (i + 1) * d];
                let mut max = f32::NEG_INFINITY;
                for (j, pj) in p.iter_mut().enumerate().take(visible) {
                    let kj = &kv[kbase + j * d..kbase + (j + 1) * d];
                    *pj = s.scale * qi.iter().zip(kj).map(|(a, b)| a * b).sum::<f32>();
                    max = max.max(*pj);
                }
                let mut sum = 0f32;
                for pj in p.iter_mut().take(visible) {
                    *pj = (*pj - max).exp();
                    sum += *pj;
                }
                let oi = &mut ov[base + i * d..base + (i + 1) * d];
                for (j, pj) in p.iter().enumerate().take(visible) {
                    // The GPU kernels feed P to the second product in the storage dtype.
                    let w = dt.round(*pj);
                    let vj = &vv[kbase + j * d..kbase + (j + 1) * d];
                    for (x, y) in oi.iter_mut().zip(vj) {
                        *x += w * y;
                    }
                }
                oi.iter_mut().for_each(|x| *x = dt.round(*x / sum));
                lse_v[bh * n + i] = max + sum.ln();
            }
        }
        o.set_host_values(&ov);
        Ok(())
    }

    fn flash_attention_backward(
        &self,
        s: &AttentionShape,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        o: &Tensor,
        d_o: &Tensor,
        lse: &Tensor,
        g: AttentionGrads<'_>,
    ) -> Result<()> {
        let dt = q.dtype();
        check_same_dtype(
            "flash attention backward",
            dt,
            &[k, v, o, d_o, g.dq, g.dk, g.dv],
        )?;
        check_attention(s, &[q, o, d_o, g.dq], &[k, v, g.dk, g.dv], &[lse, g.delta])?;
        self.attention_delta(s, o, d_o, g.delta)?;
        let (n, d) = (s.seq, s.head_dim);
        let (qv, kv, vv, dov) = (
            q.host_values(),
            k.host_values(),
            v.host_values(),
            d_o.host_values(),
        );
        let lse_v = lse.host_f32();
        let delta = g.delta.host_f32();
        let mut dq = vec![0f32; s.qkv_len()];
        let mut dk = vec![0f32; s.kv_len()];
        let mut dv = vec![0f32; s.kv_len()];
        // Query heads in order, so a kv head's dK and dV sum its group's query heads in head
        // order (deterministic; with Hkv = H each kv head has one query head).
        for bh in 0..s.rows() {
            let (base, kbase) = (bh * n * d, s.kv_head_of(bh) * n * d);
            let row =
                |x: &[f32], i: usize| -> Vec<f32> { x[base + i * d..base + (i + 1) * d].to_vec() };
            for i in 0..n {
                let visible = if s.causal { i + 1 } else { n };
                let qi = row(&qv, i);
                let doi = row(&dov, i);
                for j in 0..visible {
                    let kj = &kv[kbase + j * d..kbase + (j + 1) * d];
                    let vj = &vv[kbase + j * d..kbase + (j + 1) * d];
                    let sij = s.scale * qi.iter().zip(kj).map(|(a, b)| a * b).sum::<f32>();
                    let pij = (sij - lse_v[bh * n + i]).exp();
                    let dpij: f32 = doi.iter().zip(vj).map(|(a, b)| a * b).sum();
                    let dsij = pij * (dpij - delta[bh * n + i]);
                    for c in 0..d {
                        dv[kbase + j * d + c] += pij * doi[c];
                        dq[base + i * d + c] += s.scale * dsij * kj[c];
                        dk[kbase + j * d + c] += s.scale * dsij * qi[c];
                    }
                }
            }
        }
        g.dq.set_host_values(&dq);
        g.dk.set_host_values(&dk);
        g.dv.set_host_values(&dv);
        Ok(())
    }

    fn softmax_forward(&self, s: &AttentionShape, scores: &mut Tensor) -> Result<()> {
        check_scores(s, &[scores])?;
        let n = s.seq;
        let dt = scores.dtype();
        let mut x = scores.host_values();
        for (r, row) in x.chunks_mut(n).enumerate() {
            let i = r % n;
            let visible = if s.causal { i + 1 } else { n };
            let max = row[..visible]
                .iter()
                .cloned()
                .fold(f32::NEG_INFINITY, f32::max);
            let mut sum = 0f32;
            for v in row[..visible].iter_mut() {
                *v = (*v - max).exp();
                sum += *v;
            }
            for v in row[..visible].iter_mut() {
                *v = dt.round(*v / sum);
            }
            row[visible..].iter_mut().for_each(|v| *v = 0.0);
        }
        scores.set_host_values(&x);
        Ok(())
    }

    fn softmax_backward(
        &self,
        s: &AttentionShape,
        p: &Tensor,
        dp: &mut Tensor,
        delta: &Tensor,
    ) -> Result<()> {
        check_scores(s, &[p, dp])?;
        let n = s.seq;
        let dt = dp.dtype();
        let pv = p.host_values();
        let mut x = dp.host_values();
        let delta = delta.host_f32();
        for (r, row) in x.chunks_mut(n).enumerate() {
            let i = r % n;
            let visible = if s.causal { i + 1 } else { n };
            for j in 0..n {
                row[j] = if j < visible {
                    dt.round(pv[r * n + j] * (row[j] - delta[r]))
                } else {
                    0.0
                };
            }
        }
        dp.set_host_values(&x);
        Ok(())
    }

    fn attention_delta(
        &self,
        s: &AttentionShape,
        o: &Tensor,
        d_o: &Tensor,
        delta: &mut Tensor,
    ) -> Result<()> {
        check_attention(s, &[o, d_o], &[], &[delta])?;
        let (ov, dov) = (o.host_values(), d_o.host_values());
        let d = s.head_dim;
        for (r, out) in delta.host_f32_mut().iter_mut().enumerate() {
            *out = ov[r * d..(r + 1) * d]
                .iter()
                .zip(&dov[r * d..(r + 1) * d])
                .map(|(a, b)| a * b)
                .sum();
        }
        Ok(())
    }

    fn zero(&self, t: &mut Tensor) -> Result<()> {
        t.zero_host();
        Ok(())
    }

    fn layernorm_forward(
        &self,
        ln: &LayerNorm,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        out: &mut Tensor,
        stats: &mut RowStats,
    ) -> Result<()> {
        check_layernorm(ln, &[x, out], &[w, b], stats)?;
        let (t, c) = (ln.tokens, ln.channels);
        let xv = x.host_values();
        let (wv, bv) = (w.host_f32(), b.host_f32());
        let mut ov = vec![0f32; t * c];
        for r in 0..t {
            let row = &xv[r * c..(r + 1) * c];
            let mean = row.iter().sum::<f32>() / c as f32;
            let var = row.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / c as f32;
            let rstd = 1.0 / (var + ln.eps).sqrt();
            for j in 0..c {
                ov[r * c + j] = (row[j] - mean) * rstd * wv[j] + bv[j];
            }
            stats.mean.host_f32_mut()[r] = mean;
            stats.rstd.host_f32_mut()[r] = rstd;
        }
        out.set_host_values(&ov);
        Ok(())
    }

    fn layernorm_backward(
        &self,
        ln: &LayerNorm,
        d_out: &Tensor,
        x: &Tensor,
        w: &Tensor,
        stats: &RowStats,
        dx: &mut Tensor,
        accumulate: bool,
    ) -> Result<()> {
        check_layernorm(ln, &[d_out, x, dx], &[w], stats)?;
        let (t, c) = (ln.tokens, ln.channels);
        let (xv, gv) = (x.host_values(), d_out.host_values());
        let wv = w.host_f32();
        let (mean, rstd) = (stats.mean.host_f32(), stats.rstd.host_f32());
        let mut dxv = if accumulate {
            dx.host_values()
        } else {
            vec![0f32; t * c]
        };
        for r in 0..t {
            let xhat = |j: usize| (xv[r * c + j] - mean[r]) * rstd[r];
            let g = |j: usize| gv[r * c + j] * wv[j];
            let mean_g = (0..c).map(g).sum::<f32>() / c as f32;
            let mean_gx = (0..c).map(|j| g(j) * xhat(j)).sum::<f32>() / c as f32;
            for j in 0..c {
                dxv[r * c + j] += rstd[r] * (g(j) - mean_g - xhat(j) * mean_gx);
            }
        }
        dx.set_host_values(&dxv);
        Ok(())
    }

    fn layernorm_backward_params(
        &self,
        ln: &LayerNorm,
        d_out: &Tensor,
        x: &Tensor,
        stats: &RowStats,
        d_weight: &mut Tensor,
        d_bias: &mut Tensor,
    ) -> Result<()> {
        check_layernorm(ln, &[d_out, x], &[d_weight, d_bias], stats)?;
        let (t, c) = (ln.tokens, ln.channels);
        let (xv, gv) = (x.host_values(), d_out.host_values());
        let (mean, rstd) = (
            stats.mean.host_f32().to_vec(),
            stats.rstd.host_f32().to_vec(),
        );
        let dw = d_weight.host_f32_mut();
        for j in 0..c {
            dw[j] += (0..t)
                .map(|r| gv[r * c + j] * (xv[r * c + j] - mean[r]) * rstd[r])
                .sum::<f32>();
        }
        let db = d_bias.host_f32_mut();
        for j in 0..c {
            db[j] += (0..t).map(|r| gv[r * c + j]).sum::<f32>();
        }
        Ok(())
    }

    fn gelu_forward(&self, x: &Tensor, out: &mut Tensor) -> Result<()> {
        check_elementwise("gelu forward", &[x, out])?;
        let v: Vec<f32> = x.host_values().into_iter().map(gelu_tanh).collect();
        out.set_host_values(&v);
        Ok(())
    }

    fn gelu_backward(&self, x: &Tensor, d_out: &Tensor, dx: &mut Tensor) -> Result<()> {
        check_elementwise("gelu backward", &[x, d_out, dx])?;
        let g = d_out.host_values();
        let v: Vec<f32> = x
            .host_values()
            .into_iter()
            .zip(g)
            .map(|(x, g)| g * gelu_tanh_grad(x))
            .collect();
        dx.set_host_values(&v);
        Ok(())
    }

    fn cast_to_bf16(&self, x: &Tensor, out: &mut Tensor) -> Result<()> {
        check_cast(x, out)?;
        let v = x.host_values();
        out.set_host_values(&v);
        Ok(())
    }

    fn tokens_to_heads(
        &self,
        s: &AttentionShape,
        parts: usize,
        src: &Tensor,
        dst: &mut Tensor,
    ) -> Result<()> {
        check_heads(s, parts, src, dst)?;
        let v = src.host_values();
        let mut out = vec![0f32; v.len()];
        for_each_head_index(s, parts, |tok, head| out[head] = v[tok]);
        dst.set_host_values(&out);
        Ok(())
    }

    fn heads_to_tokens(
        &self,
        s: &AttentionShape,
        parts: usize,
        src: &Tensor,
        dst: &mut Tensor,
    ) -> Result<()> {
        check_heads(s, parts, src, dst)?;
        let v = src.host_values();
        let mut out = vec![0f32; v.len()];
        for_each_head_index(s, parts, |tok, head| out[tok] = v[head]);
        dst.set_host_values(&out);
        Ok(())
    }

    fn column_sum(
        &self,
        x: &Tensor,
        rows: usize,
        cols: usize,
        out: &mut Tensor,
        accumulate: bool,
    ) -> Result<()> {
        check_column_sum(x, rows, cols, out)?;
        let xv = x.host_values();
        let o = out.host_f32_mut();
        for j in 0..cols {
            let sum = (0..rows).map(|r| xv[r * cols + j]).sum::<f32>();
            o[j] = if accumulate { o[j] + sum } else { sum };
        }
        Ok(())
    }

    fn mse_loss(&self, y: &Tensor, scale: f32, dy: &mut Tensor, loss: &mut Tensor) -> Result<()> {
        check_loss(y, dy, loss)?;
        let v = y.host_values();
        loss.host_f32_mut()[0] = 0.5 * scale * v.iter().map(|x| x * x).sum::<f32>();
        let g: Vec<f32> = v.iter().map(|x| scale * x).collect();
        dy.set_host_values(&g);
        Ok(())
    }

    fn adamw(
        &self,
        h: &AdamW,
        step: u32,
        param: &mut Tensor,
        grad: &Tensor,
        m: &mut Tensor,
        v: &mut Tensor,
        param_bf16: Option<&mut Tensor>,
    ) -> Result<()> {
        check_adamw(param, grad, m, v, param_bf16.as_deref())?;
        let g = grad.host_f32().to_vec();
        // Bias corrections in f64, rounded once, as layers.cu computes them on the host.
        let bc = |beta: f32| (1.0 - (beta as f64).powi(step as i32)) as f32;
        let (c1, c2) = (bc(h.beta1), bc(h.beta2));
        let mut mv = m.host_f32().to_vec();
        let mut vv = v.host_f32().to_vec();
        let p = param.host_f32_mut();
        for i in 0..p.len() {
            mv[i] = h.beta1 * mv[i] + (1.0 - h.beta1) * g[i];
            vv[i] = h.beta2 * vv[i] + (1.0 - h.beta2) * g[i] * g[i];
            let (mhat, vhat) = (mv[i] / c1, vv[i] / c2);
            p[i] -= h.lr * (mhat / (vhat.sqrt() + h.eps) + h.weight_decay * p[i]);
        }
        m.host_f32_mut().copy_from_slice(&mv);
        v.host_f32_mut().copy_from_slice(&vv);
        if let Some(out) = param_bf16 {
            let pv = param.host_f32().to_vec();
            out.set_host_values(&pv);
        }
        Ok(())
    }

    // -- loss ops (head + cross-entropy) --
    fn cross_entropy_forward(
        &self,
        logits: &Tensor,
        targets: &Tensor,
        ignore_index: i32,
        scale: f32,
        lse: &mut Tensor,
        loss: &mut Tensor,
    ) -> Result<()> {
        let d = check_cross_entropy(
            "cross-entropy forward",
            logits,
            targets,
            lse,
            Some(loss),
            None,
        )?;
        check_targets(targets.host_i32(), d.vocab, ignore_index)?;
        let (l, total) =
            ce_forward_rows(logits.host_f32(), targets.host_i32(), d.vocab, ignore_index);
        lse.host_f32_mut().copy_from_slice(&l);
        loss.host_f32_mut()[0] += scale * total as f32;
        Ok(())
    }

    fn cross_entropy_backward(
        &self,
        logits: &Tensor,
        targets: &Tensor,
        ignore_index: i32,
        scale: f32,
        lse: &Tensor,
        dlogits: &mut Tensor,
    ) -> Result<()> {
        let d = check_cross_entropy(
            "cross-entropy backward",
            logits,
            targets,
            lse,
            None,
            Some(dlogits),
        )?;
        check_targets(targets.host_i32(), d.vocab, ignore_index)?;
        let g = ce_backward_rows(
            logits.host_f32(),
            targets.host_i32(),
            d.vocab,
            ignore_index,
            scale,
            lse.host_f32(),
        );
        dlogits.set_host_values(&g);
        Ok(())
    }

    fn fused_cross_entropy_forward(
        &self,
        hidden: &Tensor,
        weight: &Tensor,
        targets: &Tensor,
        ignore_index: i32,
        scale: f32,
        lse: &mut Tensor,
        loss: &mut Tensor,
    ) -> Result<()> {
        let d = check_fused_cross_entropy(
            "fused cross-entropy forward",
            hidden,
            weight,
            targets,
            lse,
            Some(loss),
            None,
        )?;
        check_targets(targets.host_i32(), d.vocab, ignore_index)?;
        let z = fused_logits(&hidden.host_values(), &weight.host_values(), d);
        let (l, total) = ce_forward_rows(&z, targets.host_i32(), d.vocab, ignore_index);
        lse.host_f32_mut().copy_from_slice(&l);
        loss.host_f32_mut()[0] += scale * total as f32;
        Ok(())
    }

    fn fused_cross_entropy_backward(
        &self,
        hidden: &Tensor,
        weight: &Tensor,
        targets: &Tensor,
        ignore_index: i32,
        scale: f32,
        lse: &Tensor,
        d_hidden: &mut Tensor,
        accumulate: bool,
        d_weight: &mut Tensor,
    ) -> Result<()> {
        let d = check_fused_cross_entropy(
            "fused cross-entropy backward",
            hidden,
            weight,
            targets,
            lse,
            None,
            Some((d_hidden, d_weight)),
        )?;
        check_targets(targets.host_i32(), d.vocab, ignore_index)?;
        let (h, w) = (hidden.host_values(), weight.host_values());
        let z = fused_logits(&h, &w, d);
        // dlogits stay f32, as in the kernels' registers.
        let g = ce_backward_rows(
            &z,
            targets.host_i32(),
            d.vocab,
            ignore_index,
            scale,
            lse.host_f32(),
        );
        let (c, v) = (d.channels, d.vocab);
        // d_hidden[t] = Σ_v g[t, v]·W[v], in vocabulary order.
        let mut dh = vec![0f32; d.tokens * c];
        parallel_rows(&mut dh, c, |row0, rows| {
            for (r, out) in rows.chunks_mut(c).enumerate() {
                let gr = &g[(row0 + r) * v..(row0 + r + 1) * v];
                for (j, &gj) in gr.iter().enumerate() {
                    if gj != 0.0 {
                        for (o, &wj) in out.iter_mut().zip(&w[j * c..(j + 1) * c]) {
                            *o += gj * wj;
                        }
                    }
                }
            }
        });
        if accumulate {
            for (x, old) in dh.iter_mut().zip(d_hidden.host_values()) {
                *x += old;
            }
        }
        d_hidden.set_host_values(&dh);
        // d_weight[v] += Σ_t g[t, v]·hidden[t], each element summed in token order, then added.
        let mut dw = vec![0f32; v * c];
        parallel_rows(&mut dw, c, |row0, rows| {
            for (r, out) in rows.chunks_mut(c).enumerate() {
                let j = row0 + r;
                for t in 0..d.tokens {
                    let gj = g[t * v + j];
                    if gj != 0.0 {
                        for (o, &ht) in out.iter_mut().zip(&h[t * c..(t + 1) * c]) {
                            *o += gj * ht;
                        }
                    }
                }
            }
        });
        for (o, x) in d_weight.host_f32_mut().iter_mut().zip(dw) {
            *o += x;
        }
        Ok(())
    }

    // -- norm, MLP and embedding ops (RMSNorm, SwiGLU, token embedding) --

    fn rmsnorm_forward(
        &self,
        ln: &LayerNorm,
        x: &Tensor,
        w: &Tensor,
        out: &mut Tensor,
        rstd: &mut Tensor,
    ) -> Result<()> {
        check_rmsnorm("RMSNorm forward", ln, &[x, out], &[w], rstd)?;
        let (t, c) = (ln.tokens, ln.channels);
        let xv = x.host_values();
        let wv = w.host_f32();
        let mut ov = vec![0f32; t * c];
        let rs = rstd.host_f32_mut();
        for r in 0..t {
            let row = &xv[r * c..(r + 1) * c];
            let ms = row.iter().map(|v| v * v).sum::<f32>() / c as f32;
            // 1/sqrt, not a reciprocal square root approximation: what layers.cu computes.
            rs[r] = 1.0 / (ms + ln.eps).sqrt();
            for j in 0..c {
                ov[r * c + j] = row[j] * rs[r] * wv[j];
            }
        }
        out.set_host_values(&ov);
        Ok(())
    }

    fn rmsnorm_backward(
        &self,
        ln: &LayerNorm,
        d_out: &Tensor,
        x: &Tensor,
        w: &Tensor,
        rstd: &Tensor,
        dx: &mut Tensor,
        accumulate: bool,
    ) -> Result<()> {
        check_rmsnorm("RMSNorm backward", ln, &[d_out, x, dx], &[w], rstd)?;
        let (t, c) = (ln.tokens, ln.channels);
        let (xv, gv) = (x.host_values(), d_out.host_values());
        let wv = w.host_f32();
        let rs = rstd.host_f32();
        let mut dxv = if accumulate {
            dx.host_values()
        } else {
            vec![0f32; t * c]
        };
        for r in 0..t {
            let g = |j: usize| gv[r * c + j] * wv[j];
            let mean_gx = (0..c).map(|j| g(j) * xv[r * c + j]).sum::<f32>() / c as f32;
            let k = rs[r] * rs[r] * mean_gx;
            for j in 0..c {
                dxv[r * c + j] += rs[r] * (g(j) - xv[r * c + j] * k);
            }
        }
        dx.set_host_values(&dxv);
        Ok(())
    }

    fn rmsnorm_backward_params(
        &self,
        ln: &LayerNorm,
        d_out: &Tensor,
        x: &Tensor,
        rstd: &Tensor,
        d_weight: &mut Tensor,
    ) -> Result<()> {
        check_rmsnorm(
            "RMSNorm weight gradient",
            ln,
            &[d_out, x],
            &[d_weight],
            rstd,
        )?;
        let (t, c) = (ln.tokens, ln.channels);
        let (xv, gv) = (x.host_values(), d_out.host_values());
        let rs = rstd.host_f32().to_vec();
        let dw = d_weight.host_f32_mut();
        for j in 0..c {
            dw[j] += (0..t)
                .map(|r| gv[r * c + j] * xv[r * c + j] * rs[r])
                .sum::<f32>();
        }
        Ok(())
    }

    fn swiglu_forward(&self, gate: &Tensor, up: &Tensor, out: &mut Tensor) -> Result<()> {
        check_swiglu("SwiGLU forward", &[gate, up, out])?;
        let u = up.host_values();
        let v: Vec<f32> = gate
            .host_values()
            .into_iter()
            .zip(u)
            .map(|(g, u)| silu(g) * u)
            .collect();
        out.set_host_values(&v);
        Ok(())
    }

    fn swiglu_backward(
        &self,
        gate: &Tensor,
        up: &Tensor,
        d_out: &Tensor,
        d_gate: &mut Tensor,
        d_up: &mut Tensor,
    ) -> Result<()> {
        check_swiglu("SwiGLU backward", &[gate, up, d_out, d_gate, d_up])?;
        let (gv, uv, dv) = (gate.host_values(), up.host_values(), d_out.host_values());
        let mut dg = vec![0f32; gv.len()];
        let mut du = vec![0f32; gv.len()];
        for i in 0..gv.len() {
            let (s, ds) = silu_and_grad(gv[i]);
            dg[i] = dv[i] * uv[i] * ds;
            du[i] = dv[i] * s;
        }
        d_gate.set_host_values(&dg);
        d_up.set_host_values(&du);
        Ok(())
    }

    fn embedding_forward(
        &self,
        ids: &Tensor,
        table: &Tensor,
        positions: Option<&Tensor>,
        seq: usize,
        out: &mut Tensor,
    ) -> Result<()> {
        let e = check_embedding_forward(ids, table, positions, seq, out)?;
        let idv = ids.host_i32();
        check_ids(idv, e.vocab)?;
        let c = e.channels;
        let tv = table.host_values();
        let pv = positions.map(|p| p.host_values());
        let mut ov = vec![0f32; idv.len() * c];
        for (t, &id) in idv.iter().enumerate() {
            let row = &tv[id as usize * c..(id as usize + 1) * c];
            let o = &mut ov[t * c..(t + 1) * c];
            o.copy_from_slice(row);
            if let Some(p) = &pv {
                let p = &p[(t % seq) * c..(t % seq + 1) * c];
                o.iter_mut().zip(p).for_each(|(a, b)| *a += b);
            }
        }
        out.set_host_values(&ov);
        Ok(())
    }

    fn embedding_backward(
        &self,
        ids: &Tensor,
        d_out: &Tensor,
        seq: usize,
        d_table: &mut Tensor,
        d_positions: Option<&mut Tensor>,
    ) -> Result<()> {
        let e = check_embedding_backward(ids, d_out, seq, d_table, d_positions.as_deref())?;
        let idv = ids.host_i32();
        // Every id is checked before anything is added, so a bad id leaves d_table untouched.
        check_ids(idv, e.vocab)?;
        let c = e.channels;
        let gv = d_out.host_values();
        // Token order within every element, as the GPU kernel sums: bitwise the same totals.
        let dt = d_table.host_f32_mut();
        for (t, &id) in idv.iter().enumerate() {
            let row = &mut dt[id as usize * c..(id as usize + 1) * c];
            row.iter_mut()
                .zip(&gv[t * c..(t + 1) * c])
                .for_each(|(a, b)| *a += b);
        }
        if let Some(dp) = d_positions {
            let dp = dp.host_f32_mut();
            for t in 0..idv.len() {
                let row = &mut dp[(t % seq) * c..(t % seq + 1) * c];
                row.iter_mut()
                    .zip(&gv[t * c..(t + 1) * c])
                    .for_each(|(a, b)| *a += b);
            }
        }
        Ok(())
    }

    // -- grouped-query attention ops --

    fn repeat_kv(&self, s: &AttentionShape, src: &Tensor, dst: &mut Tensor) -> Result<()> {
        check_repeat_kv("repeat_kv", s, src, dst)?;
        let row = s.seq * s.head_dim;
        let sv = src.host_values();
        let mut out = vec![0f32; s.qkv_len()];
        for (bh, head) in out.chunks_mut(row).enumerate() {
            let kh = s.kv_head_of(bh);
            head.copy_from_slice(&sv[kh * row..(kh + 1) * row]);
        }
        dst.set_host_values(&out);
        Ok(())
    }

    fn reduce_kv(&self, s: &AttentionShape, src: &Tensor, dst: &mut Tensor) -> Result<()> {
        check_repeat_kv("reduce_kv", s, dst, src)?;
        let row = s.seq * s.head_dim;
        let sv = src.host_values();
        let mut acc = vec![0f32; s.kv_len()];
        // In head order: each element sums its group's query heads first to last in f32,
        // rounded once to the storage dtype (what the CUDA kernel does).
        for (bh, head) in sv.chunks(row).enumerate() {
            let kh = s.kv_head_of(bh);
            for (a, x) in acc[kh * row..(kh + 1) * row].iter_mut().zip(head) {
                *a += x;
            }
        }
        let dt = dst.dtype();
        acc.iter_mut().for_each(|x| *x = dt.round(*x));
        dst.set_host_values(&acc);
        Ok(())
    }

    fn synchronize(&self) -> Result<()> {
        Ok(())
    }

    fn time(&self, f: &mut dyn FnMut() -> Result<()>) -> Result<f64> {
        let t = Instant::now();
        f()?;
        Ok(t.elapsed().as_secs_f64())
    }

    fn flush_cache(&self, _scratch: &mut Tensor) -> Result<()> {
        Ok(())
    }
}

/// d/dx of the tanh-form GELU, in f32 (the same expression as layers.cu).
pub fn gelu_tanh_grad(x: f32) -> f32 {
    const K0: f32 = 0.797_884_6;
    const K1: f32 = 0.044715;
    let t = (K0 * (x + K1 * x * x * x)).tanh();
    0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * K0 * (1.0 + 3.0 * K1 * x * x)
}

// -- loss ops: f32 math and shape checks (shared with dry and CUDA) --

/// The sizes a cross-entropy call implies: T from the targets, C from the hidden states (0
/// for the ops over materialized logits), V from the logits or the head's weight.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct CeDims {
    pub tokens: usize,
    pub channels: usize,
    pub vocab: usize,
}

fn ce_invalid(what: &str, why: String) -> Error {
    Error::Invalid(format!("{what}: {why}"))
}

/// targets i32 `[T]` (T > 0), lse f32 `[T]`, loss f32 `[1]` where present.
fn check_ce_common(
    what: &str,
    targets: &Tensor,
    lse: &Tensor,
    loss: Option<&Tensor>,
) -> Result<usize> {
    let tokens = targets.len();
    if targets.dtype() != DType::I32 || tokens == 0 {
        return Err(ce_invalid(
            what,
            format!(
                "the targets {} must be a non-empty i32 tensor (it is {} with {tokens} elements)",
                targets.tag(),
                targets.dtype()
            ),
        ));
    }
    if tokens > i32::MAX as usize {
        return Err(ce_invalid(
            what,
            format!("{tokens} rows are more than the kernels index"),
        ));
    }
    if lse.dtype() != DType::F32 || lse.len() != tokens {
        return Err(ce_invalid(
            what,
            format!(
                "the log-sum-exp {} must be f32 with one element per target ({tokens}), not {} {}",
                lse.tag(),
                lse.dtype(),
                lse.len()
            ),
        ));
    }
    if let Some(l) = loss {
        if l.dtype() != DType::F32 || l.len() != 1 {
            return Err(ce_invalid(
                what,
                format!("the loss {} must be one f32 element", l.tag()),
            ));
        }
    }
    Ok(tokens)
}

/// Over materialized logits: f32 `[T, V]`, and dlogits (backward) `[T, V]` in f32 or bf16.
pub(crate) fn check_cross_entropy(
    what: &str,
    logits: &Tensor,
    targets: &Tensor,
    lse: &Tensor,
    loss: Option<&Tensor>,
    dlogits: Option<&Tensor>,
) -> Result<CeDims> {
    let tokens = check_ce_common(what, targets, lse, loss)?;
    if logits.dtype() != DType::F32 || logits.is_empty() || logits.len() % tokens != 0 {
        return Err(ce_invalid(
            what,
            format!(
                "the logits {} must be f32 whole rows of the {tokens} targets (they are {} with {} elements)",
                logits.tag(),
                logits.dtype(),
                logits.len()
            ),
        ));
    }
    let vocab = logits.len() / tokens;
    if vocab > i32::MAX as usize {
        return Err(ce_invalid(
            what,
            format!("a vocabulary of {vocab} is more than i32 targets can name"),
        ));
    }
    if let Some(d) = dlogits {
        if d.dtype() == DType::I32 || d.len() != logits.len() {
            return Err(ce_invalid(
                what,
                format!(
                    "the logits' gradient {} must be f32 or bf16 of the logits' {} elements (it is {} with {})",
                    d.tag(),
                    logits.len(),
                    d.dtype(),
                    d.len()
                ),
            ));
        }
    }
    Ok(CeDims {
        tokens,
        channels: 0,
        vocab,
    })
}

/// Fused: hidden `[T, C]` and weight `[V, C]` in one float dtype; d_hidden `[T, C]` in it,
/// d_weight f32 `[V, C]` (backward).
pub(crate) fn check_fused_cross_entropy(
    what: &str,
    hidden: &Tensor,
    weight: &Tensor,
    targets: &Tensor,
    lse: &Tensor,
    loss: Option<&Tensor>,
    grads: Option<(&Tensor, &Tensor)>,
) -> Result<CeDims> {
    let tokens = check_ce_common(what, targets, lse, loss)?;
    check_float(what, &[hidden, weight])?;
    check_same_dtype(what, hidden.dtype(), &[weight])?;
    if hidden.is_empty() || hidden.len() % tokens != 0 {
        return Err(ce_invalid(
            what,
            format!(
                "the hidden states {} hold {} elements, not whole rows of the {tokens} targets",
                hidden.tag(),
                hidden.len()
            ),
        ));
    }
    let channels = hidden.len() / tokens;
    if weight.is_empty() || weight.len() % channels != 0 {
        return Err(ce_invalid(
            what,
            format!(
                "the head's weight {} holds {} elements, not whole [V, {channels}] rows",
                weight.tag(),
                weight.len()
            ),
        ));
    }
    let vocab = weight.len() / channels;
    if vocab > i32::MAX as usize || channels > i32::MAX as usize {
        return Err(ce_invalid(
            what,
            format!(
                "a vocabulary of {vocab} by {channels} channels is more than the kernels index"
            ),
        ));
    }
    if let Some((dh, dw)) = grads {
        if dh.dtype() != hidden.dtype() || dh.len() != hidden.len() {
            return Err(ce_invalid(
                what,
                format!(
                    "the hidden states' gradient {} must be {} [{tokens}, {channels}] like the hidden states",
                    dh.tag(),
                    hidden.dtype()
                ),
            ));
        }
        if dw.dtype() != DType::F32 || dw.len() != weight.len() {
            return Err(ce_invalid(
                what,
                format!(
                    "the weight's gradient {} must be f32 [{vocab}, {channels}]",
                    dw.tag()
                ),
            ));
        }
    }
    Ok(CeDims {
        tokens,
        channels,
        vocab,
    })
}

/// Every target is in [0, V) or the ignore index.
pub(crate) fn check_targets(targets: &[i32], vocab: usize, ignore_index: i32) -> Result<()> {
    match targets
        .iter()
        .position(|&t| t != ignore_index && (t < 0 || t as usize >= vocab))
    {
        Some(i) => Err(Error::Invalid(format!(
            "cross-entropy target {} at row {i} is outside the vocabulary [0, {vocab}) and is not the ignore index {ignore_index}",
            targets[i]
        ))),
        None => Ok(()),
    }
}

/// logsumexp of one row in f32: the max, then Σ exp(x − max) with exp in f32 and the sum in
/// f64 (closer to the kernels' tree reduction than a sequential f32 sum), the log in f32.
pub(crate) fn row_logsumexp(row: &[f32]) -> f32 {
    let m = row.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
    let s: f64 = row.iter().map(|&x| (x - m).exp() as f64).sum();
    m + (s as f32).ln()
}

/// Per row: lse (0 when ignored) and the loss term lse − z[target] (0 when ignored), from
/// f32 logits `[T, V]`; returns (lse, Σ terms in f64).
pub(crate) fn ce_forward_rows(
    logits: &[f32],
    targets: &[i32],
    vocab: usize,
    ignore_index: i32,
) -> (Vec<f32>, f64) {
    let mut lse = vec![0f32; targets.len()];
    let mut total = 0f64;
    for (t, &y) in targets.iter().enumerate() {
        if y == ignore_index {
            continue;
        }
        let row = &logits[t * vocab..(t + 1) * vocab];
        lse[t] = row_logsumexp(row);
        total += (lse[t] - row[y as usize]) as f64;
    }
    (lse, total)
}

/// dlogits = scale·(exp(z − lse) − onehot) in f32, rows of ignored targets 0.
pub(crate) fn ce_backward_rows(
    logits: &[f32],
    targets: &[i32],
    vocab: usize,
    ignore_index: i32,
    scale: f32,
    lse: &[f32],
) -> Vec<f32> {
    let mut d = vec![0f32; logits.len()];
    for (t, &y) in targets.iter().enumerate() {
        if y == ignore_index {
            continue;
        }
        let row = &logits[t * vocab..(t + 1) * vocab];
        let out = &mut d[t * vocab..(t + 1) * vocab];
        for (v, (o, &z)) in out.iter_mut().zip(row).enumerate() {
            let onehot = if v == y as usize { 1.0 } else { 0.0 };
            *o = scale * ((z - lse[t]).exp() - onehot);
        }
    }
    d
}

/// logits = hidden·weightᵀ in f32 (each dot product summed in channel order, as the fused
/// kernels do), `[T, V]`: the CPU stand-in's host scratch, not a tracked buffer.
fn fused_logits(hidden: &[f32], weight: &[f32], dims: CeDims) -> Vec<f32> {
    let (c, v) = (dims.channels, dims.vocab);
    let mut z = vec![0f32; dims.tokens * v];
    parallel_rows(&mut z, v, |row0, rows| {
        for (r, out) in rows.chunks_mut(v).enumerate() {
            let h = &hidden[(row0 + r) * c..(row0 + r + 1) * c];
            for (j, o) in out.iter_mut().enumerate() {
                let w = &weight[j * c..(j + 1) * c];
                *o = h.iter().zip(w).fold(0f32, |a, (x, y)| a + x * y);
            }
        }
    });
    z
}

// -- norm, MLP and embedding ops: f32 math and shape checks (shared with dry and CUDA) --

/// SiLU in f32, g/(1 + e^-g): the same expression as layers.cu. Large negative g gives
/// e^-g = inf and silu = -0, no NaN.
pub fn silu(g: f32) -> f32 {
    g / (1.0 + (-g).exp())
}

/// (silu(g), silu'(g)) in f32 with σ = 1/(1 + e^-g): silu' = σ·(1 + g·(1 − σ)), as layers.cu.
pub fn silu_and_grad(g: f32) -> (f32, f32) {
    let s = 1.0 / (1.0 + (-g).exp());
    (g * s, s * (1.0 + g * (1.0 - s)))
}

/// Checks an RMSNorm's activations (`[T, C]`, one float dtype), f32 parameters (`[C]`) and
/// f32 rstd (`[T]`).
pub(crate) fn check_rmsnorm(
    what: &str,
    ln: &LayerNorm,
    acts: &[&Tensor],
    params: &[&Tensor],
    rstd: &Tensor,
) -> Result<()> {
    let bad = acts.iter().any(|t| t.len() != ln.tokens * ln.channels)
        || params
            .iter()
            .any(|t| t.len() != ln.channels || t.dtype() != DType::F32)
        || rstd.len() != ln.tokens
        || rstd.dtype() != DType::F32;
    if bad || ln.tokens == 0 || ln.channels == 0 || ln.eps.is_nan() || ln.eps < 0.0 {
        return Err(Error::Invalid(format!(
            "{what} over {} x {} (eps {}): activations, f32 weight or f32 rstd have the wrong size, or eps is negative",
            ln.tokens, ln.channels, ln.eps
        )));
    }
    check_float(what, acts)?;
    check_same_dtype(what, acts[0].dtype(), acts)
}

/// Tensors of an element-wise op: one float dtype, one length, not empty.
pub(crate) fn check_swiglu(what: &str, ts: &[&Tensor]) -> Result<()> {
    check_elementwise(what, ts)?;
    if ts[0].is_empty() {
        return Err(Error::Invalid(format!("{what}: {} is empty", ts[0].tag())));
    }
    check_float(what, ts)?;
    check_same_dtype(what, ts[0].dtype(), ts)
}

fn check_float(what: &str, ts: &[&Tensor]) -> Result<()> {
    match ts.iter().find(|t| t.dtype() == DType::I32) {
        Some(t) => Err(Error::Invalid(format!(
            "{what}: {} is i32, but the operation takes f32 or bf16",
            t.tag()
        ))),
        None => Ok(()),
    }
}

/// The sizes an embedding call implies.
#[derive(Debug, Clone, Copy)]
pub(crate) struct EmbeddingDims {
    pub channels: usize,
    pub vocab: usize,
}

/// ids i32 `[T]`, out `[T, C]` (so C = out/T), table `[V, C]`, positions `[P, C]`, P >= seq.
fn embedding_dims(
    what: &str,
    ids: &Tensor,
    acts: &Tensor,
    table: &Tensor,
    positions: Option<&Tensor>,
    seq: usize,
) -> Result<EmbeddingDims> {
    let tokens = ids.len();
    if ids.dtype() != DType::I32 || tokens == 0 {
        return Err(Error::Invalid(format!(
            "{what}: the ids {} must be a non-empty i32 tensor (it is {} with {tokens} elements)",
            ids.tag(),
            ids.dtype()
        )));
    }
    if acts.is_empty() || acts.len() % tokens != 0 {
        return Err(Error::Invalid(format!(
            "{what}: {} holds {} elements, not a positive multiple of the {tokens} tokens",
            acts.tag(),
            acts.len()
        )));
    }
    let channels = acts.len() / tokens;
    if table.is_empty() || table.len() % channels != 0 {
        return Err(Error::Invalid(format!(
            "{what}: the table {} holds {} elements, not whole rows of {channels} channels",
            table.tag(),
            table.len()
        )));
    }
    let vocab = table.len() / channels;
    // Ids are i32 and the kernels' sizes int32 (their index math is 64-bit): the vocabulary,
    // the tokens and the channels must each fit one.
    if [vocab, tokens, channels]
        .iter()
        .any(|&n| n > i32::MAX as usize)
    {
        return Err(Error::Invalid(format!(
            "{what}: {tokens} tokens, {channels} channels or a vocabulary of {vocab} rows exceed what i32 sizes can name"
        )));
    }
    if let Some(p) = positions {
        // A learned table of P >= seq rows (GPT-2's 1024): rows 0..seq are the positions of a
        // sequence, the rest belong to longer ones.
        if seq == 0 || p.len() < seq * channels || p.len() % channels != 0 {
            return Err(Error::Invalid(format!(
                "{what}: positions {} hold {} elements, but a sequence of {seq} needs at least {seq} whole rows of {channels} (and seq > 0)",
                p.tag(),
                p.len()
            )));
        }
    }
    Ok(EmbeddingDims { channels, vocab })
}

pub(crate) fn check_embedding_forward(
    ids: &Tensor,
    table: &Tensor,
    positions: Option<&Tensor>,
    seq: usize,
    out: &Tensor,
) -> Result<EmbeddingDims> {
    const WHAT: &str = "embedding forward";
    let e = embedding_dims(WHAT, ids, out, table, positions, seq)?;
    let mut same = vec![table, out];
    same.extend(positions);
    check_float(WHAT, &same)?;
    check_same_dtype(WHAT, table.dtype(), &same)?;
    Ok(e)
}

pub(crate) fn check_embedding_backward(
    ids: &Tensor,
    d_out: &Tensor,
    seq: usize,
    d_table: &Tensor,
    d_positions: Option<&Tensor>,
) -> Result<EmbeddingDims> {
    const WHAT: &str = "embedding backward";
    let e = embedding_dims(WHAT, ids, d_out, d_table, d_positions, seq)?;
    check_float(WHAT, &[d_out])?;
    let mut grads = vec![d_table];
    grads.extend(d_positions);
    check_same_dtype(WHAT, DType::F32, &grads)?;
    Ok(e)
}

/// Every id inside the vocabulary, or a sentence naming the first that is not.
pub(crate) fn check_ids(ids: &[i32], vocab: usize) -> Result<()> {
    match ids
        .iter()
        .enumerate()
        .find(|(_, &id)| id < 0 || id as usize >= vocab)
    {
        Some((t, id)) => Err(Error::Invalid(format!(
            "token {t} has id {id}, outside the vocabulary of {vocab} ids (0 to {})",
            vocab - 1
        ))),
        None => Ok(()),
    }
}

/// Calls `f(token_index, head_index)` for every element: tokens `[B, N, parts, H, d]`,
/// heads `[parts, B, H, N, d]`.
pub(crate) fn for_each_head_index(
    s: &AttentionShape,
    parts: usize,
    mut f: impl FnMut(usize, usize),
) {
    let (b, h, n, d) = (s.batch, s.heads, s.seq, s.head_dim);
    for bi in 0..b {
        for ni in 0..n {
            for p in 0..parts {
                for hi in 0..h {
                    for di in 0..d {
                        let tok = (((bi * n + ni) * parts + p) * h + hi) * d + di;
                        let head = (((p * b + bi) * h + hi) * n + ni) * d + di;
                        f(tok, head);
                    }
                }
            }
        }
    }
}

pub(crate) fn check_heads(
    s: &AttentionShape,
    parts: usize,
    src: &Tensor,
    dst: &Tensor,
) -> Result<()> {
    let want = parts * s.qkv_len();
    if src.len() != want || dst.len() != want || src.dtype() != dst.dtype() {
        return Err(Error::Invalid(format!(
            "head permutation of {} into {}: both need {want} elements of one dtype",
            src.tag(),
            dst.tag()
        )));
    }
    Ok(())
}

pub(crate) fn check_elementwise(what: &str, ts: &[&Tensor]) -> Result<()> {
    let n = ts[0].len();
    match ts.iter().find(|t| t.len() != n) {
        Some(t) => Err(Error::Invalid(format!(
            "{what}: {} has {} elements, {} has {n}",
            t.tag(),
            t.len(),
            ts[0].tag()
        ))),
        None => Ok(()),
    }
}

pub(crate) fn check_layernorm(
    ln: &LayerNorm,
    acts: &[&Tensor],
    params: &[&Tensor],
    stats: &RowStats,
) -> Result<()> {
    let bad = acts.iter().any(|t| t.len() != ln.tokens * ln.channels)
        || params
            .iter()
            .any(|t| t.len() != ln.channels || t.dtype() != DType::F32)
        || [&stats.mean, &stats.rstd]
            .iter()
            .any(|t| t.len() != ln.tokens || t.dtype() != DType::F32);
    if bad || ln.tokens == 0 || ln.channels == 0 {
        return Err(Error::Invalid(format!(
            "layernorm over {} x {}: activations, f32 parameters or statistics have the wrong size",
            ln.tokens, ln.channels
        )));
    }
    Ok(())
}

pub(crate) fn check_cast(x: &Tensor, out: &Tensor) -> Result<()> {
    if x.dtype() != DType::F32 || out.dtype() != DType::Bf16 || x.len() != out.len() {
        return Err(Error::Invalid(format!(
            "cast {} (f32) into {} (bf16) of the same length",
            x.tag(),
            out.tag()
        )));
    }
    Ok(())
}

pub(crate) fn check_column_sum(x: &Tensor, rows: usize, cols: usize, out: &Tensor) -> Result<()> {
    if x.len() != rows * cols || out.len() != cols || out.dtype() != DType::F32 {
        return Err(Error::Invalid(format!(
            "column sum of {} ({rows} x {cols}) into {} (f32, {cols})",
            x.tag(),
            out.tag()
        )));
    }
    Ok(())
}

pub(crate) fn check_loss(y: &Tensor, dy: &Tensor, loss: &Tensor) -> Result<()> {
    check_elementwise("loss", &[y, dy])?;
    if y.dtype() != dy.dtype() || loss.len() != 1 || loss.dtype() != DType::F32 {
        return Err(Error::Invalid(format!(
            "the loss of {} needs a gradient of its dtype and one f32 for the loss",
            y.tag()
        )));
    }
    Ok(())
}

pub(crate) fn check_adamw(
    param: &Tensor,
    grad: &Tensor,
    m: &Tensor,
    v: &Tensor,
    copy: Option<&Tensor>,
) -> Result<()> {
    check_elementwise("adamw", &[param, grad, m, v])?;
    if [param, grad, m, v].iter().any(|t| t.dtype() != DType::F32) {
        return Err(Error::Invalid(
            "AdamW keeps f32 weights, gradients and moments".into(),
        ));
    }
    if let Some(c) = copy {
        if c.len() != param.len() || c.dtype() != DType::Bf16 {
            return Err(Error::Invalid(format!(
                "{} must be a bf16 copy of {}",
                c.tag(),
                param.tag()
            )));
        }
    }
    Ok(())
}

/// Checks the attention tensors hold what the shape says: `full` are query-shaped
/// (`[B, H, N, d]`: Q, O, dO, dQ), `kv` key-shaped (`[B, Hkv, N, d]`: K, V, dK, dV), `stats`
/// f32 `[B, H, N]`.
pub(crate) fn check_attention(
    s: &AttentionShape,
    full: &[&Tensor],
    kv: &[&Tensor],
    stats: &[&Tensor],
) -> Result<()> {
    if s.batch == 0 || s.heads == 0 || s.seq == 0 || !(s.head_dim == 64 || s.head_dim == 128) {
        return Err(Error::Invalid(format!(
            "attention needs positive batch, heads and sequence length and head_dim 64 or 128 (got b={}, h={}, n={}, d={})",
            s.batch, s.heads, s.seq, s.head_dim
        )));
    }
    s.check_kv_heads().map_err(Error::Invalid)?;
    for (ts, len, what) in [
        (full, s.qkv_len(), "the attention shape needs"),
        (kv, s.kv_len(), "the attention shape's kv heads need"),
    ] {
        for t in ts {
            if t.len() != len {
                return Err(Error::Invalid(format!(
                    "{} holds {} elements, {what} {len}",
                    t.tag(),
                    t.len(),
                )));
            }
        }
    }
    for t in stats {
        if t.len() != s.stats_len() || t.dtype() != DType::F32 {
            return Err(Error::Invalid(format!(
                "{} must be f32 with {} elements",
                t.tag(),
                s.stats_len()
            )));
        }
    }
    Ok(())
}

/// Checks `repeat_kv` / `reduce_kv` operands: `kv` is `[B, Hkv, N, d]`, `full` `[B, H, N, d]`,
/// both in one float dtype.
pub(crate) fn check_repeat_kv(
    what: &str,
    s: &AttentionShape,
    kv: &Tensor,
    full: &Tensor,
) -> Result<()> {
    check_attention(s, &[full], &[kv], &[])?;
    check_float(what, &[kv, full])?;
    check_same_dtype(what, kv.dtype(), &[full])
}

pub(crate) fn check_scores(s: &AttentionShape, ts: &[&Tensor]) -> Result<()> {
    for t in ts {
        if t.len() != s.scores_len() {
            return Err(Error::Invalid(format!(
                "{} holds {} elements, the score matrices need {}",
                t.tag(),
                t.len(),
                s.scores_len()
            )));
        }
    }
    Ok(())
}
