//! The operations the suite needs, once for CUDA and once for the CPU, behind one interface.
//!
//! Schedules (the techniques' code) allocate every buffer through [`Backend::alloc`], which
//! registers it with the backend's [`MemoryTracker`]; the operations themselves never
//! allocate. So a schedule's peak allocated bytes are the same on every backend.

use std::sync::Arc;

use half::bf16;

use crate::device::{DeviceFacts, DriverMemoryView};
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::memory::MemoryTracker;
pub use crate::shapes::{
    AdamW, AttentionShape, Epilogue, FlashBackward, FlashForward, LayerNorm, Matmul, MatmulKernel,
};

pub mod cpu;
#[cfg(headroom_cuda)]
pub mod cuda;
pub mod dry;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackendKind {
    Cuda,
    Cpu,
    /// Allocates and checks shapes but computes nothing: a schedule's memory at any size.
    Dry,
}

impl BackendKind {
    pub fn name(self) -> &'static str {
        match self {
            BackendKind::Cuda => "cuda",
            BackendKind::Cpu => "cpu",
            BackendKind::Dry => "dry",
        }
    }
}

/// Where a tensor's bytes live.
pub(crate) enum Storage {
    /// Host memory; `u64` words keep every element type aligned.
    Host(Vec<u64>),
    /// No memory at all (the dry backend).
    Dry,
    /// A device allocation, freed on `stream` when dropped.
    #[cfg(headroom_cuda)]
    Device {
        ptr: cudarc::driver::sys::CUdeviceptr,
        stream: Arc<cudarc::driver::CudaStream>,
    },
}

/// A dense buffer of `len` elements of `dtype`, registered with a tracker for its lifetime.
pub struct Tensor {
    dtype: DType,
    len: usize,
    /// The tracker's id of this allocation.
    id: u64,
    tag: String,
    pub(crate) storage: Storage,
    tracker: MemoryTracker,
}

impl Tensor {
    pub(crate) fn new(
        dtype: DType,
        len: usize,
        id: u64,
        tag: &str,
        storage: Storage,
        tracker: MemoryTracker,
    ) -> Self {
        Tensor {
            dtype,
            len,
            id,
            tag: tag.to_string(),
            storage,
            tracker,
        }
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }
    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    pub fn bytes(&self) -> u64 {
        (self.len * self.dtype.size()) as u64
    }
    pub fn tag(&self) -> &str {
        &self.tag
    }

    fn host_bytes(&self) -> &[u8] {
        match &self.storage {
            Storage::Host(words) => &bytemuck::cast_slice(words)[..self.len * self.dtype.size()],
            _ => panic!(
                "bug: host view of a tensor without host memory ({})",
                self.tag
            ),
        }
    }

    fn host_bytes_mut(&mut self) -> &mut [u8] {
        let n = self.len * self.dtype.size();
        match &mut self.storage {
            Storage::Host(words) => &mut bytemuck::cast_slice_mut(words)[..n],
            _ => panic!(
                "bug: host view of a tensor without host memory ({})",
                self.tag
            ),
        }
    }

    /// The elements of a host f32 tensor.
    pub(crate) fn host_f32(&self) -> &[f32] {
        debug_assert_eq!(self.dtype, DType::F32);
        bytemuck::cast_slice(self.host_bytes())
    }
    pub(crate) fn host_f32_mut(&mut self) -> &mut [f32] {
        debug_assert_eq!(self.dtype, DType::F32);
        bytemuck::cast_slice_mut(self.host_bytes_mut())
    }
    pub(crate) fn host_bf16(&self) -> &[bf16] {
        debug_assert_eq!(self.dtype, DType::Bf16);
        bytemuck::cast_slice(self.host_bytes())
    }
    pub(crate) fn host_bf16_mut(&mut self) -> &mut [bf16] {
        debug_assert_eq!(self.dtype, DType::Bf16);
        bytemuck::cast_slice_mut(self.host_bytes_mut())
    }

    /// The elements of a host i32 tensor (token ids).
    pub(crate) fn host_i32(&self) -> &[i32] {
        debug_assert_eq!(self.dtype, DType::I32);
        bytemuck::cast_slice(self.host_bytes())
    }
    pub(crate) fn host_i32_mut(&mut self) -> &mut [i32] {
        debug_assert_eq!(self.dtype, DType::I32);
        bytemuck::cast_slice_mut(self.host_bytes_mut())
    }

    /// A host tensor's elements widened to f32.
    pub(crate) fn host_values(&self) -> Vec<f32> {
        match self.dtype {
            DType::F32 => self.host_f32().to_vec(),
            DType::Bf16 => self.host_bf16().iter().map(|x| x.to_f32()).collect(),
            DType::I32 => self.host_i32().iter().map(|&x| x as f32).collect(),
        }
    }

    /// Store f32 values into a host tensor, rounding to its dtype.
    pub(crate) fn set_host_values(&mut self, values: &[f32]) {
        match self.dtype {
            DType::F32 => self.host_f32_mut().copy_from_slice(values),
            DType::Bf16 => {
                for (d, s) in self.host_bf16_mut().iter_mut().zip(values) {
                    *d = bf16::from_f32(*s);
                }
            }
            DType::I32 => {
                for (d, s) in self.host_i32_mut().iter_mut().zip(values) {
                    *d = s.round() as i32;
                }
            }
        }
    }

    pub(crate) fn poison_host(&mut self) {
        self.host_bytes_mut().fill(0xFF);
    }

    pub(crate) fn zero_host(&mut self) {
        self.host_bytes_mut().fill(0);
    }

    #[cfg(headroom_cuda)]
    pub(crate) fn device_ptr(&self) -> u64 {
        match &self.storage {
            Storage::Device { ptr, .. } => *ptr,
            _ => panic!(
                "bug: device pointer of a tensor without device memory ({})",
                self.tag
            ),
        }
    }
}

impl Drop for Tensor {
    fn drop(&mut self) {
        #[cfg(headroom_cuda)]
        if let Storage::Device { ptr, stream } = &self.storage {
            if *ptr != 0 {
                // SAFETY: ptr came from cuMemAllocAsync/cuMemAlloc on this stream's context and
                // is freed once; work queued on the stream that uses it completes first.
                let r = unsafe {
                    stream.context().bind_to_thread().ok();
                    cudarc::driver::result::free_async(*ptr, stream.cu_stream())
                };
                if let Err(e) = r {
                    eprintln!("warning: freeing {} failed: {e}", self.tag);
                }
            }
        }
        self.tracker.release(self.id, self.bytes(), &self.tag);
    }
}

/// The extra inputs of a matmul's fused epilogue.
#[derive(Clone, Copy, Default)]
pub struct Epi<'a> {
    /// f32 `[n]`, added to every row (needs `Epilogue::Bias` or `BiasGelu`).
    pub bias: Option<&'a Tensor>,
    /// `[m, n]` in C's dtype, added after the activation (the residual stream).
    pub residual: Option<&'a Tensor>,
}

impl<'a> Epi<'a> {
    pub fn none() -> Self {
        Epi::default()
    }
    pub fn bias(bias: &'a Tensor) -> Self {
        Epi {
            bias: Some(bias),
            residual: None,
        }
    }
}

/// Per-row statistics a layernorm keeps for backward: f32 mean and 1/std, `[tokens]` each.
pub struct RowStats {
    pub mean: Tensor,
    pub rstd: Tensor,
}

/// Checks a [`Backend::copy_range`] stays inside both tensors.
pub(crate) fn check_copy_range(
    dst: &Tensor,
    dst_at: usize,
    src: &Tensor,
    src_at: usize,
    len: usize,
) -> Result<()> {
    if dst.dtype() != src.dtype()
        || dst_at.checked_add(len).is_none_or(|e| e > dst.len())
        || src_at.checked_add(len).is_none_or(|e| e > src.len())
    {
        return Err(Error::Invalid(format!(
            "copy of {len} elements from {}[{src_at}..] ({} {}) to {}[{dst_at}..] ({} {}) is out of bounds or changes dtype",
            src.tag(),
            src.len(),
            src.dtype().name(),
            dst.tag(),
            dst.len(),
            dst.dtype().name()
        )));
    }
    Ok(())
}

impl Matmul {
    /// Checks the buffers hold what the shape says, so no kernel reads out of bounds.
    pub fn check(&self, a: &Tensor, b: &Tensor, c: &Tensor, epi: Epi<'_>) -> Result<()> {
        let need = |stride: usize, one: usize| (self.batch - 1) * stride + one;
        let (m, n, k) = (self.m, self.n, self.k);
        if m == 0 || n == 0 || k == 0 || self.batch == 0 {
            return Err(Error::Invalid(format!(
                "matmul sizes must be positive (m={m}, n={n}, k={k}, batch={})",
                self.batch
            )));
        }
        if self.batch > 1 && self.stride_c == 0 {
            // Broadcasting A or B is a shared input; a shared C would be a write race.
            return Err(Error::Invalid(format!(
                "matmul batch {} with stride_c 0 would write every product into one C",
                self.batch
            )));
        }
        for (name, t, want) in [
            ("A", a, need(self.stride_a, m * k)),
            ("B", b, need(self.stride_b, k * n)),
            ("C", c, need(self.stride_c, m * n)),
        ] {
            if t.len() < want {
                return Err(Error::Invalid(format!(
                    "matmul {name} holds {} elements but m={m}, n={n}, k={k}, batch={} needs {want}",
                    t.len(),
                    self.batch
                )));
            }
        }
        if self.epilogue != Epilogue::None {
            match epi.bias {
                Some(t) if t.len() >= n && t.dtype() == DType::F32 => {}
                _ => {
                    return Err(Error::Invalid(format!(
                        "matmul epilogue needs an f32 bias of {n} elements"
                    )))
                }
            }
        }
        if let Some(r) = epi.residual {
            if r.dtype() != c.dtype() || r.len() < need(self.stride_c, m * n) {
                return Err(Error::Invalid(format!(
                    "matmul residual {} must match C's dtype and shape",
                    r.tag()
                )));
            }
        }
        Ok(())
    }
}

/// The tensors of a flash-attention backward pass.
pub struct AttentionGrads<'a> {
    pub delta: &'a mut Tensor,
    pub dq: &'a mut Tensor,
    pub dk: &'a mut Tensor,
    pub dv: &'a mut Tensor,
}

/// The operations, once per backend. Outputs are `&mut`, inputs `&`.
pub trait Backend: Send + Sync {
    fn kind(&self) -> BackendKind;
    fn facts(&self) -> &DeviceFacts;
    fn memory(&self) -> &MemoryTracker;

    /// A tracked buffer of `len` elements (contents unspecified).
    fn alloc(&self, dtype: DType, len: usize, tag: &str) -> Result<Tensor>;
    /// Store values, rounded to the tensor's dtype.
    fn write(&self, t: &mut Tensor, values: &[f32]) -> Result<()>;
    /// The tensor's elements, widened to f32.
    fn read(&self, t: &Tensor) -> Result<Vec<f32>>;
    /// Every byte 0xFF: NaN in both f32 and bf16, so an element a kernel forgets stays NaN.
    fn poison(&self, t: &mut Tensor) -> Result<()>;
    fn copy(&self, dst: &mut Tensor, src: &Tensor) -> Result<()>;
    /// `dst[dst_at .. dst_at + len] = src[src_at .. src_at + len]` (same dtype).
    fn copy_range(
        &self,
        dst: &mut Tensor,
        dst_at: usize,
        src: &Tensor,
        src_at: usize,
        len: usize,
    ) -> Result<()>;

    fn matmul(
        &self,
        kernel: MatmulKernel,
        mm: &Matmul,
        a: &Tensor,
        b: &Tensor,
        epi: Epi<'_>,
        c: &mut Tensor,
    ) -> Result<()>;
    /// Whether `kernel` can run here, or why not.
    fn matmul_available(
        &self,
        kernel: MatmulKernel,
        dtype: DType,
    ) -> std::result::Result<(), String>;

    fn flash_attention_forward(
        &self,
        shape: &AttentionShape,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        o: &mut Tensor,
        lse: &mut Tensor,
    ) -> Result<()>;
    /// Whether `kernel` can run a bf16 flash forward here, or why not. Every backend has its
    /// own [`FlashForward::Standard`]; the others are CUDA kernels.
    fn flash_forward_available(&self, kernel: FlashForward) -> std::result::Result<(), String> {
        match kernel {
            FlashForward::Standard => Ok(()),
            k => Err(format!(
                "{} is a CUDA kernel; this backend has none",
                k.technique()
            )),
        }
    }
    /// [`Backend::flash_attention_forward`] (bf16) by `kernel`.
    #[allow(clippy::too_many_arguments)]
    fn flash_attention_forward_by(
        &self,
        kernel: FlashForward,
        shape: &AttentionShape,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        o: &mut Tensor,
        lse: &mut Tensor,
    ) -> Result<()> {
        match kernel {
            FlashForward::Standard => self.flash_attention_forward(shape, q, k, v, o, lse),
            k => Err(Error::Unsupported(
                self.flash_forward_available(k)
                    .err()
                    .unwrap_or_else(|| format!("{} is not implemented here", k.technique())),
            )),
        }
    }
    #[allow(clippy::too_many_arguments)]
    fn flash_attention_backward(
        &self,
        shape: &AttentionShape,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        o: &Tensor,
        d_o: &Tensor,
        lse: &Tensor,
        grads: AttentionGrads<'_>,
    ) -> Result<()>;
    /// Whether `kernel` can run a bf16 flash backward here, or why not. Every backend has its
    /// own [`FlashBackward::Standard`]; the others are CUDA kernels.
    fn flash_backward_available(&self, kernel: FlashBackward) -> std::result::Result<(), String> {
        match kernel {
            FlashBackward::Standard => Ok(()),
            k => Err(format!(
                "{} is a CUDA kernel; this backend has none",
                k.technique()
            )),
        }
    }
    /// [`Backend::flash_attention_backward`] (bf16) by `kernel`.
    #[allow(clippy::too_many_arguments)]
    fn flash_attention_backward_by(
        &self,
        kernel: FlashBackward,
        shape: &AttentionShape,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        o: &Tensor,
        d_o: &Tensor,
        lse: &Tensor,
        grads: AttentionGrads<'_>,
    ) -> Result<()> {
        match kernel {
            FlashBackward::Standard => {
                self.flash_attention_backward(shape, q, k, v, o, d_o, lse, grads)
            }
            k => Err(Error::Unsupported(
                self.flash_backward_available(k)
                    .err()
                    .unwrap_or_else(|| format!("{} is not implemented here", k.technique())),
            )),
        }
    }
    /// In place over `[rows, seq, seq]`: scaled scores -> probabilities; causal entries 0.
    fn softmax_forward(&self, shape: &AttentionShape, scores: &mut Tensor) -> Result<()>;
    /// In place: dP -> dS = P * (dP - delta).
    fn softmax_backward(
        &self,
        shape: &AttentionShape,
        p: &Tensor,
        dp: &mut Tensor,
        delta: &Tensor,
    ) -> Result<()>;
    /// delta = rowsum(dO * O), f32 `[B, H, N]`.
    fn attention_delta(
        &self,
        shape: &AttentionShape,
        o: &Tensor,
        d_o: &Tensor,
        delta: &mut Tensor,
    ) -> Result<()>;

    /// Every byte 0.
    fn zero(&self, t: &mut Tensor) -> Result<()>;

    // -- transformer-block layer ops (see kernels/headroom.h for the formulas) --
    fn layernorm_forward(
        &self,
        ln: &LayerNorm,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        out: &mut Tensor,
        stats: &mut RowStats,
    ) -> Result<()>;
    /// dx (+)= the layernorm's input gradient.
    #[allow(clippy::too_many_arguments)]
    fn layernorm_backward(
        &self,
        ln: &LayerNorm,
        d_out: &Tensor,
        x: &Tensor,
        w: &Tensor,
        stats: &RowStats,
        dx: &mut Tensor,
        accumulate: bool,
    ) -> Result<()>;
    /// d_weight += sum_t d_out·xhat; d_bias += sum_t d_out.
    fn layernorm_backward_params(
        &self,
        ln: &LayerNorm,
        d_out: &Tensor,
        x: &Tensor,
        stats: &RowStats,
        d_weight: &mut Tensor,
        d_bias: &mut Tensor,
    ) -> Result<()>;
    fn gelu_forward(&self, x: &Tensor, out: &mut Tensor) -> Result<()>;
    fn gelu_backward(&self, x: &Tensor, d_out: &Tensor, dx: &mut Tensor) -> Result<()>;
    fn cast_to_bf16(&self, x: &Tensor, out: &mut Tensor) -> Result<()>;
    /// `[T, parts·C]` -> `[parts, B, H, N, d]`.
    fn tokens_to_heads(
        &self,
        s: &AttentionShape,
        parts: usize,
        src: &Tensor,
        dst: &mut Tensor,
    ) -> Result<()>;
    /// `[parts, B, H, N, d]` -> `[T, parts·C]`.
    fn heads_to_tokens(
        &self,
        s: &AttentionShape,
        parts: usize,
        src: &Tensor,
        dst: &mut Tensor,
    ) -> Result<()>;
    /// out[c] (+)= sum_r x[r, c] (f32 out).
    fn column_sum(
        &self,
        x: &Tensor,
        rows: usize,
        cols: usize,
        out: &mut Tensor,
        accumulate: bool,
    ) -> Result<()>;
    /// loss = 0.5·scale·sum(y²); dy = scale·y.
    fn mse_loss(&self, y: &Tensor, scale: f32, dy: &mut Tensor, loss: &mut Tensor) -> Result<()>;
    #[allow(clippy::too_many_arguments)]
    fn adamw(
        &self,
        h: &AdamW,
        step: u32,
        param: &mut Tensor,
        grad: &Tensor,
        m: &mut Tensor,
        v: &mut Tensor,
        param_bf16: Option<&mut Tensor>,
    ) -> Result<()>;

    // -- loss ops (head + cross-entropy) --
    /// Over materialized f32 logits `[T, V]` (T = targets' length): per row t with
    /// targets[t] != ignore_index, lse[t] = logsumexp(logits[t]) and
    /// loss[0] += scale·(lse[t] − logits[t, targets[t]]); ignored rows: lse[t] = 0, nothing
    /// added. targets i32 `[T]`, lse f32 `[T]`, loss f32 `[1]` (accumulated). A target
    /// outside [0, V) that is not ignore_index is an error (CPU), or NaN in its lse and the
    /// loss (CUDA: no read or write out of bounds).
    fn cross_entropy_forward(
        &self,
        logits: &Tensor,
        targets: &Tensor,
        ignore_index: i32,
        scale: f32,
        lse: &mut Tensor,
        loss: &mut Tensor,
    ) -> Result<()>;
    /// dlogits[t] = scale·(softmax(logits[t]) − onehot(targets[t])) (0 for ignored rows),
    /// written in dlogits' dtype (f32 or bf16), from the forward's lse.
    fn cross_entropy_backward(
        &self,
        logits: &Tensor,
        targets: &Tensor,
        ignore_index: i32,
        scale: f32,
        lse: &Tensor,
        dlogits: &mut Tensor,
    ) -> Result<()>;
    /// Fused: hidden `[T, C]` and weight `[V, C]` in the compute dtype; the same lse and loss
    /// as [`Backend::cross_entropy_forward`] over logits = hidden·weightᵀ, never writing the
    /// logits to memory (online log-sum-exp over vocabulary blocks, Milakov & Gimelshein
    /// 2018).
    #[allow(clippy::too_many_arguments)]
    fn fused_cross_entropy_forward(
        &self,
        hidden: &Tensor,
        weight: &Tensor,
        targets: &Tensor,
        ignore_index: i32,
        scale: f32,
        lse: &mut Tensor,
        loss: &mut Tensor,
    ) -> Result<()>;
    /// Fused backward: recomputes the logits block by block; d_hidden `[T, C]` (compute
    /// dtype) (+)= dlogits·weight (`accumulate`), d_weight f32 `[V, C]` += dlogitsᵀ·hidden.
    /// Deterministic (no float atomics).
    #[allow(clippy::too_many_arguments)]
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
    ) -> Result<()>;

    // -- norm, MLP and embedding ops (RMSNorm, SwiGLU, token embedding) --
    /// out = x·rstd·w per row, rstd[t] = 1/sqrt(mean_c(x²) + eps) (f32 `[T]`); w f32 `[C]`;
    /// x and out `[T, C]` in one dtype (Zhang & Sennrich 2019).
    fn rmsnorm_forward(
        &self,
        ln: &LayerNorm,
        x: &Tensor,
        w: &Tensor,
        out: &mut Tensor,
        rstd: &mut Tensor,
    ) -> Result<()>;
    /// dx (+)= the RMSNorm's input gradient, rstd·(g − x·rstd²·mean_c(g·x)) with g = w·d_out,
    /// from the forward's rstd.
    #[allow(clippy::too_many_arguments)]
    fn rmsnorm_backward(
        &self,
        ln: &LayerNorm,
        d_out: &Tensor,
        x: &Tensor,
        w: &Tensor,
        rstd: &Tensor,
        dx: &mut Tensor,
        accumulate: bool,
    ) -> Result<()>;
    /// d_weight (f32 `[C]`) += Σ_t d_out·x·rstd, each column summed in a fixed order (bitwise
    /// repeatable).
    fn rmsnorm_backward_params(
        &self,
        ln: &LayerNorm,
        d_out: &Tensor,
        x: &Tensor,
        rstd: &Tensor,
        d_weight: &mut Tensor,
    ) -> Result<()>;
    /// out = silu(gate)·up element-wise (silu(g) = g/(1+e^-g)); gate, up, out same dtype and
    /// length (Shazeer 2020).
    fn swiglu_forward(&self, gate: &Tensor, up: &Tensor, out: &mut Tensor) -> Result<()>;
    /// d_gate = d_out·up·silu'(gate); d_up = d_out·silu(gate).
    fn swiglu_backward(
        &self,
        gate: &Tensor,
        up: &Tensor,
        d_out: &Tensor,
        d_gate: &mut Tensor,
        d_up: &mut Tensor,
    ) -> Result<()>;
    /// out[t] = table[ids[t]] (+ positions[t mod seq]): ids i32 `[T]`; table `[V, C]`,
    /// positions `[seq, C]` and out `[T, C]` in one dtype (f32 or bf16), the sum in f32. An id
    /// outside [0, V) is an error, never a read out of bounds.
    fn embedding_forward(
        &self,
        ids: &Tensor,
        table: &Tensor,
        positions: Option<&Tensor>,
        seq: usize,
        out: &mut Tensor,
    ) -> Result<()>;
    /// d_table f32 `[V, C]` += rows of d_out by id; d_positions f32 `[seq, C]` += d_out[t] at
    /// t mod seq. Deterministic: each element sums its tokens in token order (bitwise
    /// repeatable).
    fn embedding_backward(
        &self,
        ids: &Tensor,
        d_out: &Tensor,
        seq: usize,
        d_table: &mut Tensor,
        d_positions: Option<&mut Tensor>,
    ) -> Result<()>;

    // -- grouped-query attention ops --

    /// `[B, Hkv, N, d]` -> `[B, H, N, d]`: each kv head repeated H/Hkv times, as eager
    /// attention does before its matmuls (src and dst in one float dtype).
    fn repeat_kv(&self, s: &AttentionShape, src: &Tensor, dst: &mut Tensor) -> Result<()>;
    /// The backward of [`Backend::repeat_kv`]: dst `[B, Hkv, N, d]` = the sum over each group
    /// of src `[B, H, N, d]`, in head order (f32 accumulation, one rounding to dst's dtype).
    fn reduce_kv(&self, s: &AttentionShape, src: &Tensor, dst: &mut Tensor) -> Result<()>;

    fn synchronize(&self) -> Result<()>;
    /// Seconds `f` takes: device events around it on the GPU, the wall clock on the CPU.
    fn time(&self, f: &mut dyn FnMut() -> Result<()>) -> Result<f64>;
    /// Evict the L2 cache by writing `scratch` (a buffer from [`Backend::flush_buffer`]).
    fn flush_cache(&self, scratch: &mut Tensor) -> Result<()>;
    /// The buffer that evicts the cache between timed runs: allocated once per run, outside
    /// the tracked allocator (it is in no case's figures and under no budget). `Ok(None)`
    /// where no flush is needed (the host).
    fn flush_buffer(&self) -> Result<Option<Tensor>> {
        Ok(None)
    }
    /// After an error: the sticky fault the device is left in (an illegal address, a failed
    /// launch), which no later call in this process can clear, if it is in one.
    fn sticky_fault(&self) -> Option<String> {
        None
    }
    /// The real driver as an allocator's address space of `capacity` bytes (its own
    /// stream-ordered pool, segments and virtual memory), where there is a GPU.
    fn driver_space(&self, _capacity: u64) -> Result<Option<Box<dyn crate::alloc::AddressSpace>>> {
        Ok(None)
    }
    /// A backend of the same kind for rank `rank` of a sharded step, with its own tracked
    /// allocator (the same budget): the host again on the CPU, GPU `rank` on CUDA.
    fn peer(&self, rank: usize) -> Result<Arc<dyn Backend>> {
        Err(Error::Unsupported(format!(
            "the {} backend has no rank {rank}",
            self.kind().name()
        )))
    }
    /// The CUDA backend itself, for what works beside the kernels on its GPU and stream
    /// (NCCL's collectives); `None` on every other backend.
    #[cfg(headroom_cuda)]
    fn as_cuda(&self) -> Option<&cuda::CudaBackend> {
        None
    }
    /// Start the driver's view of a measured region, where the backend has one.
    fn driver_view_begin(&self) -> Result<Option<DriverMemoryView>> {
        Ok(None)
    }
    /// The driver's view of the region `start` began.
    fn driver_view_end(&self, start: DriverMemoryView) -> Result<DriverMemoryView> {
        Ok(start)
    }
}

/// The backend `HEADROOM_BACKEND` asks for, or the best one present, with the reason when
/// it is not the GPU; its tracked allocator follows `HEADROOM_ALLOCATOR` when set.
pub fn select(budget: Option<u64>) -> Result<Arc<dyn Backend>> {
    let allocator = crate::alloc::AllocatorSpec::from_env()?;
    let be = select_backend(budget)?;
    if let Some(spec) = allocator {
        // The allocator's simulated space is the card: the budget, else the device's memory.
        let capacity = budget.or(be.facts().memory_bytes).unwrap_or(1 << 50);
        let space = crate::alloc::SimulatedSpace::new(capacity);
        be.memory().set_allocator(spec.build(Box::new(space)));
    }
    Ok(be)
}

fn select_backend(budget: Option<u64>) -> Result<Arc<dyn Backend>> {
    let wanted = std::env::var("HEADROOM_BACKEND").unwrap_or_default();
    match wanted.trim() {
        "" | "auto" => Ok(match open_cuda(budget) {
            Ok(b) => b,
            Err(reason) => Arc::new(cpu::CpuBackend::new(budget, Some(reason))),
        }),
        "cpu" => Ok(Arc::new(cpu::CpuBackend::new(
            budget,
            Some("HEADROOM_BACKEND=cpu".into()),
        ))),
        "cuda" => open_cuda(budget)
            .map_err(|reason| Error::Unsupported(format!("HEADROOM_BACKEND=cuda, but {reason}"))),
        other => Err(Error::Invalid(format!(
            "HEADROOM_BACKEND='{other}' is not a backend; use cuda, cpu or leave it unset"
        ))),
    }
}

#[cfg(headroom_cuda)]
fn open_cuda(budget: Option<u64>) -> std::result::Result<Arc<dyn Backend>, String> {
    let dev = crate::device::open()?;
    Ok(Arc::new(cuda::CudaBackend::new(dev, budget)))
}

#[cfg(not(headroom_cuda))]
fn open_cuda(_budget: Option<u64>) -> std::result::Result<Arc<dyn Backend>, String> {
    crate::device::open().map(|_| unreachable!("no kernels in this build"))
}
