//! The dry backend: every allocation goes through the tracked allocator and every operation
//! checks its shapes, but nothing is stored or computed. It gives a schedule's exact memory
//! behaviour (peak, timeline, allocation trace) at full size in milliseconds: the allocator
//! shootout replays training steps recorded on it, and tests hold the memory models to it at
//! sizes the CPU backend could not compute.

use crate::backend::cpu::{
    check_adamw, check_attention, check_cast, check_column_sum, check_elementwise, check_heads,
    check_layernorm, check_loss, check_scores,
};
use crate::backend::cpu::{
    check_embedding_backward, check_embedding_forward, check_rmsnorm, check_swiglu,
};
use crate::backend::{
    AdamW, AttentionGrads, AttentionShape, Backend, BackendKind, Epi, LayerNorm, Matmul,
    MatmulKernel, RowStats, Storage, Tensor,
};
use crate::device::DeviceFacts;
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::memory::MemoryTracker;

pub struct DryBackend {
    facts: DeviceFacts,
    tracker: MemoryTracker,
}

impl DryBackend {
    pub fn new(budget: Option<u64>) -> Self {
        let mut facts = DeviceFacts::cpu(Some("dry run: allocations only".into()));
        facts.backend = "dry".into();
        DryBackend {
            facts,
            tracker: MemoryTracker::new(budget),
        }
    }
}

fn same_len(what: &str, a: &Tensor, b: &Tensor) -> Result<()> {
    check_elementwise(what, &[a, b])
}

impl Backend for DryBackend {
    fn kind(&self) -> BackendKind {
        BackendKind::Dry
    }
    fn facts(&self) -> &DeviceFacts {
        &self.facts
    }
    fn memory(&self) -> &MemoryTracker {
        &self.tracker
    }
    fn alloc(&self, dtype: DType, len: usize, tag: &str) -> Result<Tensor> {
        let id = self.tracker.admit((len * dtype.size()) as u64, tag)?;
        Ok(Tensor::new(
            dtype,
            len,
            id,
            tag,
            Storage::Dry,
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
        Ok(())
    }
    /// Zeros: nothing was computed.
    fn read(&self, t: &Tensor) -> Result<Vec<f32>> {
        Ok(vec![0.0; t.len()])
    }
    fn poison(&self, _t: &mut Tensor) -> Result<()> {
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
        crate::backend::check_copy_range(dst, dst_at, src, src_at, len)
    }
    fn peer(&self, _rank: usize) -> Result<std::sync::Arc<dyn Backend>> {
        Ok(std::sync::Arc::new(DryBackend::new(self.tracker.budget())))
    }
    fn copy(&self, dst: &mut Tensor, src: &Tensor) -> Result<()> {
        same_len("copy", dst, src)
    }
    fn matmul(
        &self,
        _kernel: MatmulKernel,
        mm: &Matmul,
        a: &Tensor,
        b: &Tensor,
        epi: Epi<'_>,
        c: &mut Tensor,
    ) -> Result<()> {
        mm.check(a, b, c, epi)
    }
    fn matmul_available(
        &self,
        kernel: MatmulKernel,
        _dtype: DType,
    ) -> std::result::Result<(), String> {
        match kernel {
            // The dry run stands in for a GPU without Hopper's instructions or cuBLAS.
            k if k.is_wgmma() || k == MatmulKernel::Cublas => Err("not on the dry backend".into()),
            _ => Ok(()),
        }
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
        check_attention(s, &[q, o], &[k, v], &[lse])
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
        check_attention(s, &[q, o, d_o, g.dq], &[k, v, g.dk, g.dv], &[lse, g.delta])
    }
    fn softmax_forward(&self, s: &AttentionShape, scores: &mut Tensor) -> Result<()> {
        check_scores(s, &[scores])
    }
    fn softmax_backward(
        &self,
        s: &AttentionShape,
        p: &Tensor,
        dp: &mut Tensor,
        _delta: &Tensor,
    ) -> Result<()> {
        check_scores(s, &[p, dp])
    }
    fn attention_delta(
        &self,
        s: &AttentionShape,
        o: &Tensor,
        d_o: &Tensor,
        delta: &mut Tensor,
    ) -> Result<()> {
        check_attention(s, &[o, d_o], &[], &[delta])
    }
    fn zero(&self, _t: &mut Tensor) -> Result<()> {
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
        check_layernorm(ln, &[x, out], &[w, b], stats)
    }
    fn layernorm_backward(
        &self,
        ln: &LayerNorm,
        d_out: &Tensor,
        x: &Tensor,
        w: &Tensor,
        stats: &RowStats,
        dx: &mut Tensor,
        _accumulate: bool,
    ) -> Result<()> {
        check_layernorm(ln, &[d_out, x, dx], &[w], stats)
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
        check_layernorm(ln, &[d_out, x], &[d_weight, d_bias], stats)
    }
    fn gelu_forward(&self, x: &Tensor, out: &mut Tensor) -> Result<()> {
        same_len("gelu forward", x, out)
    }
    fn gelu_backward(&self, x: &Tensor, d_out: &Tensor, dx: &mut Tensor) -> Result<()> {
        check_elementwise("gelu backward", &[x, d_out, dx])
    }
    fn cast_to_bf16(&self, x: &Tensor, out: &mut Tensor) -> Result<()> {
        check_cast(x, out)
    }
    fn tokens_to_heads(
        &self,
        s: &AttentionShape,
        parts: usize,
        src: &Tensor,
        dst: &mut Tensor,
    ) -> Result<()> {
        check_heads(s, parts, src, dst)
    }
    fn heads_to_tokens(
        &self,
        s: &AttentionShape,
        parts: usize,
        src: &Tensor,
        dst: &mut Tensor,
    ) -> Result<()> {
        check_heads(s, parts, src, dst)
    }
    fn column_sum(
        &self,
        x: &Tensor,
        rows: usize,
        cols: usize,
        out: &mut Tensor,
        _accumulate: bool,
    ) -> Result<()> {
        check_column_sum(x, rows, cols, out)
    }
    fn mse_loss(&self, y: &Tensor, _scale: f32, dy: &mut Tensor, loss: &mut Tensor) -> Result<()> {
        check_loss(y, dy, loss)
    }
    fn adamw(
        &self,
        _h: &AdamW,
        _step: u32,
        param: &mut Tensor,
        grad: &Tensor,
        m: &mut Tensor,
        v: &mut Tensor,
        param_bf16: Option<&mut Tensor>,
    ) -> Result<()> {
        check_adamw(param, grad, m, v, param_bf16.as_deref())
    }
    // -- loss ops (head + cross-entropy) --
    fn cross_entropy_forward(
        &self,
        logits: &Tensor,
        targets: &Tensor,
        _ignore_index: i32,
        _scale: f32,
        lse: &mut Tensor,
        loss: &mut Tensor,
    ) -> Result<()> {
        crate::backend::cpu::check_cross_entropy(
            "cross-entropy forward",
            logits,
            targets,
            lse,
            Some(loss),
            None,
        )
        .map(|_| ())
    }
    fn cross_entropy_backward(
        &self,
        logits: &Tensor,
        targets: &Tensor,
        _ignore_index: i32,
        _scale: f32,
        lse: &Tensor,
        dlogits: &mut Tensor,
    ) -> Result<()> {
        crate::backend::cpu::check_cross_entropy(
            "cross-entropy backward",
            logits,
            targets,
            lse,
            None,
            Some(dlogits),
        )
        .map(|_| ())
    }
    fn fused_cross_entropy_forward(
        &self,
        hidden: &Tensor,
        weight: &Tensor,
        targets: &Tensor,
        _ignore_index: i32,
        _scale: f32,
        lse: &mut Tensor,
        loss: &mut Tensor,
    ) -> Result<()> {
        crate::backend::cpu::check_fused_cross_entropy(
            "fused cross-entropy forward",
            hidden,
            weight,
            targets,
            lse,
            Some(loss),
            None,
        )
        .map(|_| ())
    }
    fn fused_cross_entropy_backward(
        &self,
        hidden: &Tensor,
        weight: &Tensor,
        targets: &Tensor,
        _ignore_index: i32,
        _scale: f32,
        lse: &Tensor,
        d_hidden: &mut Tensor,
        _accumulate: bool,
        d_weight: &mut Tensor,
    ) -> Result<()> {
        crate::backend::cpu::check_fused_cross_entropy(
            "fused cross-entropy backward",
            hidden,
            weight,
            targets,
            lse,
            None,
            Some((d_hidden, d_weight)),
        )
        .map(|_| ())
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
        check_rmsnorm("RMSNorm forward", ln, &[x, out], &[w], rstd)
    }
    fn rmsnorm_backward(
        &self,
        ln: &LayerNorm,
        d_out: &Tensor,
        x: &Tensor,
        w: &Tensor,
        rstd: &Tensor,
        dx: &mut Tensor,
        _accumulate: bool,
    ) -> Result<()> {
        check_rmsnorm("RMSNorm backward", ln, &[d_out, x, dx], &[w], rstd)
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
        )
    }
    fn swiglu_forward(&self, gate: &Tensor, up: &Tensor, out: &mut Tensor) -> Result<()> {
        check_swiglu("SwiGLU forward", &[gate, up, out])
    }
    fn swiglu_backward(
        &self,
        gate: &Tensor,
        up: &Tensor,
        d_out: &Tensor,
        d_gate: &mut Tensor,
        d_up: &mut Tensor,
    ) -> Result<()> {
        check_swiglu("SwiGLU backward", &[gate, up, d_out, d_gate, d_up])
    }
    /// Shapes only: the dry backend stores no ids to check.
    fn embedding_forward(
        &self,
        ids: &Tensor,
        table: &Tensor,
        positions: Option<&Tensor>,
        seq: usize,
        out: &mut Tensor,
    ) -> Result<()> {
        check_embedding_forward(ids, table, positions, seq, out).map(|_| ())
    }
    fn embedding_backward(
        &self,
        ids: &Tensor,
        d_out: &Tensor,
        seq: usize,
        d_table: &mut Tensor,
        d_positions: Option<&mut Tensor>,
    ) -> Result<()> {
        check_embedding_backward(ids, d_out, seq, d_table, d_positions.as_deref()).map(|_| ())
    }

    // -- grouped-query attention ops --

    fn repeat_kv(&self, s: &AttentionShape, src: &Tensor, dst: &mut Tensor) -> Result<()> {
        crate::backend::cpu::check_repeat_kv("repeat_kv", s, src, dst)
    }
    fn reduce_kv(&self, s: &AttentionShape, src: &Tensor, dst: &mut Tensor) -> Result<()> {
        crate::backend::cpu::check_repeat_kv("reduce_kv", s, dst, src)
    }

    fn synchronize(&self) -> Result<()> {
        Ok(())
    }
    fn time(&self, f: &mut dyn FnMut() -> Result<()>) -> Result<f64> {
        f()?;
        Ok(0.0)
    }
    fn flush_cache(&self, _scratch: &mut Tensor) -> Result<()> {
        Ok(())
    }
}
