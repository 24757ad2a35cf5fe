//! The CUDA backend: device buffers from the stream-ordered pool, the hand-written kernels
//! through the launchers of `kernels/headroom.h`, cuBLAS as the matmul baseline, and device
//! events for timing. Every launch and driver call is checked.

use std::ffi::c_void;
use std::sync::{Arc, OnceLock};

use cudarc::cublas::{result as blas, sys as blas_sys, CudaBlas};
use cudarc::driver::{result as drv, sys};

use crate::backend::cpu::{
    check_adamw, check_attention, check_cast, check_column_sum, check_elementwise, check_heads,
    check_layernorm, check_loss, check_same_dtype, check_scores,
};
use crate::backend::cpu::{
    check_embedding_backward, check_embedding_forward, check_rmsnorm, check_swiglu,
};
use crate::backend::{
    AdamW, AttentionGrads, AttentionShape, Backend, BackendKind, Epi, Epilogue, FlashBackward,
    FlashForward, LayerNorm, Matmul, MatmulKernel, RowStats, Storage, Tensor,
};
use crate::device::{check_launch, CudaDevice, DeviceFacts, DriverMemoryView};
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::kernels::bindings as k;
use crate::memory::MemoryTracker;
use crate::shapes::CUBLAS_WORKSPACE_BYTES;

pub struct CudaBackend {
    dev: CudaDevice,
    tracker: MemoryTracker,
    /// Buffers that belong to no case (the L2 flush buffer): no budget, in no figure.
    untracked: MemoryTracker,
    blas: OnceLock<std::result::Result<CudaBlas, String>>,
    /// One pair of timing events, made on first use and reused for every sample: creating
    /// events per sample would put driver calls on the timing loop's path.
    events: std::sync::Mutex<Option<(cudarc::driver::CudaEvent, cudarc::driver::CudaEvent)>>,
    /// The embedding kernels' id check ([`IdCheck`]), made before the first measured region.
    id_check: std::sync::Mutex<Option<IdCheck>>,
}

/// One 8-byte device word that every embedding launch folds its first token with an id
/// outside the vocabulary into (an atomic minimum of `token << 32 | id`; all ones when
/// clear), read back only at synchronization points ([`Backend::synchronize`],
/// [`Backend::time`] after its events, [`Backend::read`]) and only when an embedding ran since
/// the last look: an embedding call never synchronizes the stream inside a timed step.
struct IdCheck {
    word: Tensor,
    /// An embedding has run since the word was last read.
    pending: bool,
    /// The vocabulary of the latest embedding call, for the message.
    vocab: usize,
}

/// The status of an alternative kernel's launch: from a Hopper kernel (`hopper`), 801 (not
/// supported) is the sentence `available` gives for why it cannot run here (or that it
/// refused the shape), anything else the launch's own status.
fn alternative_status(
    what: &str,
    code: i32,
    hopper: bool,
    technique: &str,
    available: impl FnOnce() -> std::result::Result<(), String>,
) -> Result<()> {
    if hopper && code == 801 {
        return Err(Error::Unsupported(
            available()
                .err()
                .unwrap_or_else(|| format!("{technique} refused the shape")),
        ));
    }
    check_launch(what, code)
}

/// What the id-check word says: nothing when clear (all ones), else the sentence the CPU
/// backend's check gives for the token and id the kernels recorded (`token << 32 | id as u32`).
fn id_word_error(word: u64, vocab: usize) -> Option<String> {
    if word == u64::MAX {
        return None;
    }
    let (token, id) = (word >> 32, word as u32 as i32);
    Some(format!(
        "token {token} has id {id}, outside the vocabulary of {vocab} ids (0 to {})",
        vocab.saturating_sub(1)
    ))
}

impl CudaBackend {
    /// The id-check word, made (and cleared) on first use.
    fn id_check_word(&self) -> Result<std::sync::MutexGuard<'_, Option<IdCheck>>> {
        let mut slot = self.id_check.lock().unwrap_or_else(|p| p.into_inner());
        if slot.is_none() {
            let word = self.alloc_with(&self.untracked, DType::I32, 2, "embedding id check")?;
            // SAFETY: writes exactly the word's 8 bytes.
            unsafe {
                drv::memset_d8_async(word.device_ptr(), 0xFF, 8, self.dev.stream.cu_stream())?
            };
            *slot = Some(IdCheck {
                word,
                pending: false,
                vocab: 0,
            });
        }
        Ok(slot)
    }

    /// The word's device address for an embedding launch over a vocabulary of `vocab`, marked
    /// to be read at the next synchronization point.
    fn id_check_for_launch(&self, vocab: usize) -> Result<*mut u64> {
        let mut slot = self.id_check_word()?;
        let check = slot.as_mut().expect("made above");
        check.pending = true;
        check.vocab = vocab;
        Ok(check.word.device_ptr() as *mut u64)
    }

    /// At a synchronization point: if an embedding ran since the last look, reads the word
    /// (clearing it again) and turns a recorded token into the error the CPU backend gives.
    fn take_id_error(&self) -> Result<()> {
        let mut slot = self.id_check.lock().unwrap_or_else(|p| p.into_inner());
        let Some(check) = slot.as_mut().filter(|c| c.pending) else {
            return Ok(());
        };
        check.pending = false;
        let mut word = [0u64; 1];
        let s = self.dev.stream.cu_stream();
        // SAFETY: the word is 8 device bytes; we synchronize before reading the host copy.
        unsafe { drv::memcpy_dtoh_async(&mut word, check.word.device_ptr(), s)? };
        self.dev.stream.synchronize()?;
        let Some(why) = id_word_error(word[0], check.vocab) else {
            return Ok(());
        };
        // SAFETY: as above; cleared for the next launch.
        unsafe { drv::memset_d8_async(check.word.device_ptr(), 0xFF, 8, s)? };
        Err(Error::Invalid(why))
    }

    /// The launch parameters of a flash forward, its shapes checked and the device bound.
    fn forward_params(
        &self,
        s: &AttentionShape,
        q: &Tensor,
        kk: &Tensor,
        v: &Tensor,
        o: &mut Tensor,
        lse: &mut Tensor,
    ) -> Result<k::hr_attention_params> {
        check_attention(s, &[q, o], &[kk, v], &[lse])?;
        self.bind()?;
        let mut p = attention_params(s);
        p.q = ptr(q);
        p.k = ptr(kk);
        p.v = ptr(v);
        p.o = ptr_mut(o);
        p.lse = ptr_mut(lse) as *mut f32;
        Ok(p)
    }

    /// Whether the sm_90a flash `pass` (forward or backward) runs here, by `usable` (its
    /// file's image test), or why not.
    fn hopper_attention(
        &self,
        pass: &str,
        usable: unsafe extern "C" fn() -> std::os::raw::c_int,
    ) -> std::result::Result<(), String> {
        self.bind().map_err(|e| e.to_string())?;
        // SAFETY: a query of the current device.
        if unsafe { usable() } == 1 {
            Ok(())
        } else if self.sm_major() != 9 {
            Err(format!(
                "the wgmma flash {pass} needs a Hopper GPU (compute capability 9.0)"
            ))
        } else {
            Err("this build has no sm_90a code (add 90a to HEADROOM_CUDA_ARCHS)".into())
        }
    }

    /// The launch parameters of a flash backward, its dtypes and shapes checked and the device
    /// bound.
    #[allow(clippy::too_many_arguments)]
    fn backward_params(
        &self,
        what: &str,
        s: &AttentionShape,
        q: &Tensor,
        kk: &Tensor,
        v: &Tensor,
        o: &Tensor,
        d_o: &Tensor,
        lse: &Tensor,
        g: AttentionGrads<'_>,
    ) -> Result<k::hr_attention_params> {
        check_same_dtype(what, q.dtype(), &[kk, v, o, d_o, g.dq, g.dk, g.dv])?;
        check_attention(s, &[q, o, d_o, g.dq], &[kk, v, g.dk, g.dv], &[lse, g.delta])?;
        self.bind()?;
        let mut p = attention_params(s);
        p.q = ptr(q);
        p.k = ptr(kk);
        p.v = ptr(v);
        p.o = ptr(o) as *mut c_void;
        p.lse = ptr(lse) as *mut f32;
        p.d_o = ptr(d_o);
        p.delta = ptr_mut(g.delta) as *mut f32;
        p.dq = ptr_mut(g.dq);
        p.dk = ptr_mut(g.dk);
        p.dv = ptr_mut(g.dv);
        Ok(p)
    }

    pub fn new(dev: CudaDevice, budget: Option<u64>) -> Self {
        CudaBackend {
            dev,
            tracker: MemoryTracker::new(budget),
            untracked: MemoryTracker::new(None),
            blas: OnceLock::new(),
            events: std::sync::Mutex::new(None),
            id_check: std::sync::Mutex::new(None),
        }
    }

    fn stream(&self) -> k::hr_stream_t {
        self.dev.stream.cu_stream() as k::hr_stream_t
    }

    /// The GPU this backend runs on (its CUDA device ordinal).
    pub fn ordinal(&self) -> usize {
        self.dev.ctx.ordinal()
    }

    /// The stream every kernel, copy and allocation of this backend is ordered on, for work
    /// that must be ordered with them (NCCL's collectives).
    pub fn cu_stream(&self) -> sys::CUstream {
        self.dev.stream.cu_stream()
    }

    /// Makes this backend's GPU (its primary context) current on the calling thread.
    pub fn bind_context(&self) -> Result<()> {
        self.bind()
    }

    /// The device's free and total memory (`cuMemGetInfo`): device-wide, so it counts other
    /// processes and libraries too.
    pub fn device_free_total(&self) -> Result<(u64, u64)> {
        let (free, total) = self.dev.ctx.mem_get_info()?;
        Ok((free as u64, total as u64))
    }

    fn bind(&self) -> Result<()> {
        Ok(self.dev.ctx.bind_to_thread()?)
    }

    fn blas(&self) -> Result<&CudaBlas> {
        self.blas
            .get_or_init(|| {
                // SAFETY: only tries to dlopen libcublas (cudarc panics if it is missing).
                if !unsafe { blas_sys::is_culib_present() } {
                    return Err("libcublas could not be loaded (add the CUDA toolkit's lib64 or PyTorch's nvidia/cublas/lib to LD_LIBRARY_PATH)".into());
                }
                CudaBlas::new(self.dev.stream.clone()).map_err(|e| format!("cuBLAS did not start: {e}"))
            })
            .as_ref()
            .map_err(|e| Error::Unsupported(e.clone()))
    }

    /// A device buffer registered with `tracker`: the case's tracker, or the untracked one
    /// of buffers that belong to no case.
    fn alloc_with(
        &self,
        tracker: &MemoryTracker,
        dtype: DType,
        len: usize,
        tag: &str,
    ) -> Result<Tensor> {
        let bytes = (len * dtype.size()) as u64;
        let id = tracker.admit(bytes, tag)?;
        let ptr = if bytes == 0 {
            0
        } else {
            self.bind()?;
            // SAFETY: a plain allocation on our stream; freed by Tensor::drop.
            let r = unsafe {
                if self.dev.pool.is_null() {
                    drv::malloc_sync(bytes as usize)
                } else {
                    drv::malloc_async(self.dev.stream.cu_stream(), bytes as usize)
                }
            };
            match r {
                Ok(p) => p,
                Err(e) => {
                    tracker.release(id, bytes, tag);
                    if e.0 == sys::cudaError_enum::CUDA_ERROR_OUT_OF_MEMORY {
                        return Err(tracker
                            .device_oom(bytes, tag, &format!("the GPU refused: {e}"))
                            .into());
                    }
                    return Err(e.into());
                }
            }
        };
        let storage = Storage::Device {
            ptr,
            stream: self.dev.stream.clone(),
        };
        Ok(Tensor::new(dtype, len, id, tag, storage, tracker.clone()))
    }

    fn sm_major(&self) -> u32 {
        self.dev
            .facts
            .compute_capability
            .as_deref()
            .and_then(|c| c.split('.').next())
            .and_then(|m| m.parse().ok())
            .unwrap_or(0)
    }
}

fn ptr(t: &Tensor) -> *const c_void {
    t.device_ptr() as *const c_void
}
fn ptr_mut(t: &mut Tensor) -> *mut c_void {
    t.device_ptr() as *mut c_void
}

/// A cross-entropy launch's parameters with the sizes and the shared buffers set, every other
/// pointer null (each op sets the ones it uses). lse is written by the forward and only read
/// by the backward; the kernels take it as one pointer.
fn ce_params(
    d: crate::backend::cpu::CeDims,
    targets: &Tensor,
    ignore_index: i32,
    scale: f32,
    lse: &Tensor,
) -> k::hr_cross_entropy_params {
    k::hr_cross_entropy_params {
        logits: std::ptr::null(),
        hidden: std::ptr::null(),
        weight: std::ptr::null(),
        targets: ptr(targets) as *const i32,
        lse: lse.device_ptr() as *mut f32,
        loss: std::ptr::null_mut(),
        dlogits: std::ptr::null_mut(),
        d_hidden: std::ptr::null_mut(),
        d_weight: std::ptr::null_mut(),
        // The checks bound T, C and V by i32::MAX.
        tokens: d.tokens as i32,
        channels: d.channels as i32,
        vocab: d.vocab as i32,
        ignore_index,
        accumulate: 0,
        scale,
    }
}

/// The error for token ids (i32) handed to an op that computes in floating point.
fn not_float(what: &str) -> Error {
    Error::Invalid(format!(
        "{what}: an i32 tensor (token ids) where floating-point values are needed"
    ))
}

fn dtype_code(d: DType) -> i32 {
    match d {
        DType::F32 => k::hr_dtype::HR_F32 as i32,
        DType::Bf16 => k::hr_dtype::HR_BF16 as i32,
        DType::I32 => k::hr_dtype::HR_I32 as i32,
    }
}

impl Backend for CudaBackend {
    fn kind(&self) -> BackendKind {
        BackendKind::Cuda
    }
    fn facts(&self) -> &DeviceFacts {
        &self.dev.facts
    }
    fn memory(&self) -> &MemoryTracker {
        &self.tracker
    }

    fn alloc(&self, dtype: DType, len: usize, tag: &str) -> Result<Tensor> {
        self.alloc_with(&self.tracker, dtype, len, tag)
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
        self.bind()?;
        let dst = t.device_ptr();
        let s = self.dev.stream.cu_stream();
        // SAFETY: dst holds t.bytes() bytes; the host source lives until the synchronize
        // below, after which the copy has completed.
        match t.dtype() {
            DType::F32 => unsafe { drv::memcpy_htod_async(dst, values, s)? },
            DType::Bf16 => {
                let v: Vec<half::bf16> = values.iter().map(|x| half::bf16::from_f32(*x)).collect();
                unsafe { drv::memcpy_htod_async(dst, &v, s)? };
                self.dev.stream.synchronize()?;
                return Ok(());
            }
            DType::I32 => {
                let v: Vec<i32> = values.iter().map(|x| x.round() as i32).collect();
                unsafe { drv::memcpy_htod_async(dst, &v, s)? };
                self.dev.stream.synchronize()?;
                return Ok(());
            }
        }
        self.dev.stream.synchronize()?;
        Ok(())
    }

    fn read(&self, t: &Tensor) -> Result<Vec<f32>> {
        self.bind()?;
        self.take_id_error()?;
        let src = t.device_ptr();
        let s = self.dev.stream.cu_stream();
        // SAFETY: src holds t.bytes() bytes; we synchronize before reading the host buffer.
        unsafe {
            match t.dtype() {
                DType::F32 => {
                    let mut v = vec![0f32; t.len()];
                    drv::memcpy_dtoh_async(&mut v, src, s)?;
                    self.dev.stream.synchronize()?;
                    Ok(v)
                }
                DType::Bf16 => {
                    let mut v = vec![half::bf16::ZERO; t.len()];
                    drv::memcpy_dtoh_async(&mut v, src, s)?;
                    self.dev.stream.synchronize()?;
                    Ok(v.iter().map(|x| x.to_f32()).collect())
                }
                DType::I32 => {
                    let mut v = vec![0i32; t.len()];
                    drv::memcpy_dtoh_async(&mut v, src, s)?;
                    self.dev.stream.synchronize()?;
                    Ok(v.iter().map(|&x| x as f32).collect())
                }
            }
        }
    }

    fn poison(&self, t: &mut Tensor) -> Result<()> {
        self.bind()?;
        // SAFETY: writes exactly the tensor's bytes.
        unsafe {
            drv::memset_d8_async(
                t.device_ptr(),
                0xFF,
                t.bytes() as usize,
                self.dev.stream.cu_stream(),
            )?
        };
        Ok(())
    }

    fn copy(&self, dst: &mut Tensor, src: &Tensor) -> Result<()> {
        if dst.bytes() != src.bytes() {
            return Err(Error::Invalid(format!(
                "copy from {} to {}: sizes differ",
                src.tag(),
                dst.tag()
            )));
        }
        self.bind()?;
        let p = k::hr_copy_params {
            src: ptr(src),
            dst: ptr_mut(dst),
            bytes: src.bytes(),
        };
        // SAFETY: both buffers hold `bytes` bytes on this device.
        check_launch("copy", unsafe { k::hr_copy(&p, self.stream()) })
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
        if len == 0 {
            return Ok(());
        }
        self.bind()?;
        let size = src.dtype().size() as u64;
        let p = k::hr_copy_params {
            src: (ptr(src) as u64 + src_at as u64 * size) as _,
            dst: (ptr_mut(dst) as u64 + dst_at as u64 * size) as _,
            bytes: len as u64 * size,
        };
        // SAFETY: both ranges were checked to lie inside their buffers on this device.
        check_launch("copy", unsafe { k::hr_copy(&p, self.stream()) })
    }

    fn matmul_available(
        &self,
        kernel: MatmulKernel,
        dtype: DType,
    ) -> std::result::Result<(), String> {
        match kernel {
            k if k.is_wgmma() => {
                // SAFETY: a query with no arguments.
                if unsafe { k::hr_matmul_wgmma_compiled() } == 0 {
                    Err("this build has no sm_90a code (add 90a to HEADROOM_CUDA_ARCHS)".into())
                } else if self.sm_major() != 9 {
                    Err("wgmma needs a Hopper GPU (compute capability 9.0)".into())
                } else {
                    Ok(())
                }
            }
            MatmulKernel::Cublas => self.blas().map(|_| ()).map_err(|e| e.to_string()),
            MatmulKernel::Mma if self.sm_major() < 8 => {
                Err("mma.sync bf16 needs sm_80 or newer".into())
            }
            MatmulKernel::Simt if dtype != DType::F32 => Err("the SIMT kernel is fp32 only".into()),
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
        mm.check(a, b, c, epi)?;
        self.bind()?;
        let in_dtype = match kernel {
            MatmulKernel::Simt => DType::F32,
            MatmulKernel::Cublas => a.dtype(),
            _ => DType::Bf16,
        };
        check_same_dtype("matmul", in_dtype, &[a, b])?;
        if kernel == MatmulKernel::Cublas {
            return self.cublas_matmul(mm, a, b, epi, c);
        }
        let p = k::hr_matmul_params {
            a: ptr(a),
            b: ptr(b),
            c: ptr_mut(c),
            bias: epi.bias.map_or(std::ptr::null(), |t| ptr(t) as *const f32),
            residual: epi.residual.map_or(std::ptr::null(), ptr),
            m: mm.m as i32,
            n: mm.n as i32,
            k: mm.k as i32,
            batch: mm.batch as i32,
            stride_a: mm.stride_a as i64,
            stride_b: mm.stride_b as i64,
            stride_c: mm.stride_c as i64,
            trans_a: mm.trans_a as i32,
            trans_b: mm.trans_b as i32,
            epilogue: match mm.epilogue {
                Epilogue::None => k::hr_epilogue::HR_EPI_NONE as i32,
                Epilogue::Bias => k::hr_epilogue::HR_EPI_BIAS as i32,
                Epilogue::BiasGelu => k::hr_epilogue::HR_EPI_BIAS_GELU as i32,
            },
            c_dtype: dtype_code(c.dtype()),
            accumulate: mm.accumulate as i32,
            alpha: mm.alpha,
            raster_group: if matches!(
                kernel,
                MatmulKernel::WgmmaBanded
                    | MatmulKernel::WgmmaWide
                    | MatmulKernel::WgmmaCluster
                    | MatmulKernel::WgmmaTmaStore
            ) {
                crate::shapes::WGMMA_BAND_ROWS
            } else {
                1
            },
        };
        let s = self.stream();
        // SAFETY: Matmul::check verified every buffer holds what the shape reads and writes.
        let code = unsafe {
            match kernel {
                MatmulKernel::Simt => k::hr_matmul_f32_simt(&p, s),
                MatmulKernel::Mma => k::hr_matmul_bf16_mma(&p, s),
                MatmulKernel::Wgmma | MatmulKernel::WgmmaBanded => k::hr_matmul_bf16_wgmma(&p, s),
                MatmulKernel::WgmmaWide => k::hr_matmul_bf16_wgmma_wide(&p, s),
                MatmulKernel::WgmmaCluster => k::hr_matmul_bf16_wgmma_cluster(&p, s),
                MatmulKernel::WgmmaTmaStore => k::hr_matmul_bf16_wgmma_tma_store(&p, s),
                MatmulKernel::Cublas => unreachable!("handled above"),
            }
        };
        if kernel.is_wgmma() && code == 801 {
            return Err(Error::Unsupported(format!(
                "the wgmma kernel does not take this shape or layout (m={}, n={}, k={}, trans {}/{})",
                mm.m, mm.n, mm.k, mm.trans_a, mm.trans_b
            )));
        }
        check_launch(&format!("matmul ({})", kernel.name()), code)
    }

    fn flash_attention_forward(
        &self,
        s: &AttentionShape,
        q: &Tensor,
        kk: &Tensor,
        v: &Tensor,
        o: &mut Tensor,
        lse: &mut Tensor,
    ) -> Result<()> {
        let dt = q.dtype();
        check_same_dtype("flash attention forward", dt, &[kk, v, o])?;
        let p = self.forward_params(s, q, kk, v, o, lse)?;
        // SAFETY: shapes checked by forward_params.
        let code = unsafe {
            match dt {
                DType::F32 => k::hr_flash_attention_forward_f32(&p, self.stream()),
                DType::Bf16 => k::hr_flash_attention_forward_bf16(&p, self.stream()),
                DType::I32 => return Err(not_float("flash attention forward")),
            }
        };
        check_launch("flash attention forward", code)
    }

    fn flash_forward_available(&self, kernel: FlashForward) -> std::result::Result<(), String> {
        match kernel {
            FlashForward::Standard => Ok(()),
            FlashForward::Mma128 if self.sm_major() < 8 => {
                Err("the 128-row mma.sync forward needs sm_80 or newer".into())
            }
            FlashForward::Mma128 => Ok(()),
            FlashForward::Wgmma | FlashForward::WgmmaPingPong | FlashForward::WgmmaPersistent => {
                self.hopper_attention("forward", k::hr_flash_attention_wgmma_usable)
            }
        }
    }

    fn flash_attention_forward_by(
        &self,
        kernel: FlashForward,
        s: &AttentionShape,
        q: &Tensor,
        kk: &Tensor,
        v: &Tensor,
        o: &mut Tensor,
        lse: &mut Tensor,
    ) -> Result<()> {
        if kernel == FlashForward::Standard {
            return self.flash_attention_forward(s, q, kk, v, o, lse);
        }
        let what = format!("flash attention forward ({})", kernel.technique());
        check_same_dtype(&what, DType::Bf16, &[q, kk, v, o])?;
        let p = self.forward_params(s, q, kk, v, o, lse)?;
        let st = self.stream();
        // SAFETY: shapes checked by forward_params.
        let code = unsafe {
            match kernel {
                FlashForward::Mma128 => k::hr_flash_attention_forward_bf16_m128(&p, st),
                FlashForward::Wgmma => k::hr_flash_attention_forward_bf16_wgmma(&p, st),
                FlashForward::WgmmaPingPong => {
                    k::hr_flash_attention_forward_bf16_wgmma_pingpong(&p, st)
                }
                FlashForward::WgmmaPersistent => {
                    k::hr_flash_attention_forward_bf16_wgmma_persistent(&p, st)
                }
                FlashForward::Standard => unreachable!("handled above"),
            }
        };
        let why = || self.flash_forward_available(kernel);
        alternative_status(&what, code, kernel.is_wgmma(), kernel.technique(), why)
    }

    fn flash_attention_backward(
        &self,
        s: &AttentionShape,
        q: &Tensor,
        kk: &Tensor,
        v: &Tensor,
        o: &Tensor,
        d_o: &Tensor,
        lse: &Tensor,
        g: AttentionGrads<'_>,
    ) -> Result<()> {
        let what = "flash attention backward";
        let dt = q.dtype();
        let p = self.backward_params(what, s, q, kk, v, o, d_o, lse, g)?;
        // SAFETY: shapes checked by backward_params; o and lse are only read.
        let code = unsafe {
            match dt {
                DType::F32 => k::hr_flash_attention_backward_f32(&p, self.stream()),
                DType::Bf16 => k::hr_flash_attention_backward_bf16(&p, self.stream()),
                DType::I32 => return Err(not_float(what)),
            }
        };
        check_launch(what, code)
    }

    fn flash_backward_available(&self, kernel: FlashBackward) -> std::result::Result<(), String> {
        match kernel {
            FlashBackward::Standard => Ok(()),
            FlashBackward::Wgmma => {
                self.hopper_attention("backward", k::hr_flash_attention_backward_wgmma_usable)
            }
        }
    }

    fn flash_attention_backward_by(
        &self,
        kernel: FlashBackward,
        s: &AttentionShape,
        q: &Tensor,
        kk: &Tensor,
        v: &Tensor,
        o: &Tensor,
        d_o: &Tensor,
        lse: &Tensor,
        g: AttentionGrads<'_>,
    ) -> Result<()> {
        if kernel == FlashBackward::Standard {
            return self.flash_attention_backward(s, q, kk, v, o, d_o, lse, g);
        }
        let what = format!("flash attention backward ({})", kernel.technique());
        check_same_dtype(&what, DType::Bf16, &[q])?;
        let p = self.backward_params(&what, s, q, kk, v, o, d_o, lse, g)?;
        // SAFETY: shapes checked by backward_params; o and lse are only read.
        let code = unsafe {
            match kernel {
                FlashBackward::Wgmma => {
                    k::hr_flash_attention_backward_bf16_wgmma(&p, self.stream())
                }
                FlashBackward::Standard => unreachable!("handled above"),
            }
        };
        let why = || self.flash_backward_available(kernel);
        alternative_status(&what, code, true, kernel.technique(), why)
    }

    fn softmax_forward(&self, s: &AttentionShape, scores: &mut Tensor) -> Result<()> {
        check_scores(s, &[scores])?;
        self.bind()?;
        let mut p = softmax_params(s);
        p.scores = ptr_mut(scores);
        // SAFETY: shapes checked above.
        let code = unsafe {
            match scores.dtype() {
                DType::F32 => k::hr_softmax_forward_f32(&p, self.stream()),
                DType::Bf16 => k::hr_softmax_forward_bf16(&p, self.stream()),
                DType::I32 => return Err(not_float("softmax forward")),
            }
        };
        check_launch("softmax forward", code)
    }

    fn softmax_backward(
        &self,
        s: &AttentionShape,
        pr: &Tensor,
        dp: &mut Tensor,
        delta: &Tensor,
    ) -> Result<()> {
        check_scores(s, &[pr, dp])?;
        check_same_dtype("softmax backward", pr.dtype(), &[dp])?;
        self.bind()?;
        let mut p = softmax_params(s);
        p.scores = ptr(pr) as *mut c_void;
        p.dp = ptr(dp);
        p.ds = ptr_mut(dp);
        p.delta = ptr(delta) as *const f32;
        // SAFETY: shapes checked above; ds aliases dp, which the contract allows.
        let code = unsafe {
            match pr.dtype() {
                DType::F32 => k::hr_softmax_backward_f32(&p, self.stream()),
                DType::Bf16 => k::hr_softmax_backward_bf16(&p, self.stream()),
                DType::I32 => return Err(not_float("softmax backward")),
            }
        };
        check_launch("softmax backward", code)
    }

    fn attention_delta(
        &self,
        s: &AttentionShape,
        o: &Tensor,
        d_o: &Tensor,
        delta: &mut Tensor,
    ) -> Result<()> {
        check_attention(s, &[o, d_o], &[], &[delta])?;
        check_same_dtype("attention delta", o.dtype(), &[d_o])?;
        self.bind()?;
        let mut p = attention_params(s);
        p.o = ptr(o) as *mut c_void;
        p.d_o = ptr(d_o);
        p.delta = ptr_mut(delta) as *mut f32;
        // SAFETY: shapes checked above.
        let code = unsafe {
            match o.dtype() {
                DType::F32 => k::hr_attention_delta_f32(&p, self.stream()),
                DType::Bf16 => k::hr_attention_delta_bf16(&p, self.stream()),
                DType::I32 => return Err(not_float("attention delta")),
            }
        };
        check_launch("attention delta", code)
    }

    fn zero(&self, t: &mut Tensor) -> Result<()> {
        self.bind()?;
        // SAFETY: writes exactly the tensor's bytes.
        unsafe {
            drv::memset_d8_async(
                t.device_ptr(),
                0,
                t.bytes() as usize,
                self.dev.stream.cu_stream(),
            )?
        };
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
        check_same_dtype("layernorm", x.dtype(), &[out])?;
        let mut p = layernorm_params(ln);
        p.x = ptr(x);
        p.weight = ptr(w) as *const f32;
        p.bias = ptr(b) as *const f32;
        p.out = ptr_mut(out);
        p.mean = ptr_mut(&mut stats.mean) as *mut f32;
        p.rstd = ptr_mut(&mut stats.rstd) as *mut f32;
        self.launch_typed(
            "layernorm forward",
            x.dtype(),
            &p,
            k::hr_layernorm_forward_f32,
            k::hr_layernorm_forward_bf16,
        )
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
        check_same_dtype("layernorm backward", x.dtype(), &[d_out, dx])?;
        let mut p = layernorm_params(ln);
        p.x = ptr(x);
        p.weight = ptr(w) as *const f32;
        p.mean = ptr(&stats.mean) as *mut f32;
        p.rstd = ptr(&stats.rstd) as *mut f32;
        p.d_out = ptr(d_out);
        p.dx = ptr_mut(dx);
        p.accumulate = accumulate as i32;
        self.launch_typed(
            "layernorm backward",
            x.dtype(),
            &p,
            k::hr_layernorm_backward_f32,
            k::hr_layernorm_backward_bf16,
        )
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
        check_same_dtype("layernorm backward", x.dtype(), &[d_out])?;
        let mut p = layernorm_params(ln);
        p.x = ptr(x);
        p.mean = ptr(&stats.mean) as *mut f32;
        p.rstd = ptr(&stats.rstd) as *mut f32;
        p.d_out = ptr(d_out);
        p.d_weight = ptr_mut(d_weight) as *mut f32;
        p.d_bias = ptr_mut(d_bias) as *mut f32;
        self.launch_typed(
            "layernorm parameter gradients",
            x.dtype(),
            &p,
            k::hr_layernorm_backward_params_f32,
            k::hr_layernorm_backward_params_bf16,
        )
    }

    fn gelu_forward(&self, x: &Tensor, out: &mut Tensor) -> Result<()> {
        check_elementwise("gelu forward", &[x, out])?;
        check_same_dtype("gelu forward", x.dtype(), &[out])?;
        let p = k::hr_elementwise_params {
            x: ptr(x),
            d_out: std::ptr::null(),
            out: ptr_mut(out),
            n: x.len() as i64,
        };
        self.launch_typed(
            "gelu forward",
            x.dtype(),
            &p,
            k::hr_gelu_forward_f32,
            k::hr_gelu_forward_bf16,
        )
    }

    fn gelu_backward(&self, x: &Tensor, d_out: &Tensor, dx: &mut Tensor) -> Result<()> {
        check_elementwise("gelu backward", &[x, d_out, dx])?;
        check_same_dtype("gelu backward", x.dtype(), &[d_out, dx])?;
        let p = k::hr_elementwise_params {
            x: ptr(x),
            d_out: ptr(d_out),
            out: ptr_mut(dx),
            n: x.len() as i64,
        };
        self.launch_typed(
            "gelu backward",
            x.dtype(),
            &p,
            k::hr_gelu_backward_f32,
            k::hr_gelu_backward_bf16,
        )
    }

    fn cast_to_bf16(&self, x: &Tensor, out: &mut Tensor) -> Result<()> {
        check_cast(x, out)?;
        self.bind()?;
        let p = k::hr_elementwise_params {
            x: ptr(x),
            d_out: std::ptr::null(),
            out: ptr_mut(out),
            n: x.len() as i64,
        };
        // SAFETY: both buffers hold n elements of their types.
        check_launch("cast to bf16", unsafe {
            k::hr_cast_f32_to_bf16(&p, self.stream())
        })
    }

    fn tokens_to_heads(
        &self,
        s: &AttentionShape,
        parts: usize,
        src: &Tensor,
        dst: &mut Tensor,
    ) -> Result<()> {
        check_heads(s, parts, src, dst)?;
        let p = heads_params(s, parts, src, dst);
        self.launch_typed(
            "tokens to heads",
            src.dtype(),
            &p,
            k::hr_tokens_to_heads_f32,
            k::hr_tokens_to_heads_bf16,
        )
    }

    fn heads_to_tokens(
        &self,
        s: &AttentionShape,
        parts: usize,
        src: &Tensor,
        dst: &mut Tensor,
    ) -> Result<()> {
        check_heads(s, parts, src, dst)?;
        let p = heads_params(s, parts, src, dst);
        self.launch_typed(
            "heads to tokens",
            src.dtype(),
            &p,
            k::hr_heads_to_tokens_f32,
            k::hr_heads_to_tokens_bf16,
        )
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
        let p = k::hr_column_sum_params {
            x: ptr(x),
            out: ptr_mut(out) as *mut f32,
            rows: rows as i32,
            cols: cols as i32,
            accumulate: accumulate as i32,
        };
        self.launch_typed(
            "column sum",
            x.dtype(),
            &p,
            k::hr_column_sum_f32,
            k::hr_column_sum_bf16,
        )
    }

    fn mse_loss(&self, y: &Tensor, scale: f32, dy: &mut Tensor, loss: &mut Tensor) -> Result<()> {
        check_loss(y, dy, loss)?;
        let p = k::hr_loss_params {
            y: ptr(y),
            dy: ptr_mut(dy),
            loss: ptr_mut(loss) as *mut f32,
            n: y.len() as i64,
            scale,
        };
        self.launch_typed(
            "loss",
            y.dtype(),
            &p,
            k::hr_mse_loss_f32,
            k::hr_mse_loss_bf16,
        )
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
        self.bind()?;
        let p = k::hr_adamw_params {
            param: ptr_mut(param) as *mut f32,
            grad: ptr(grad) as *const f32,
            m: ptr_mut(m) as *mut f32,
            v: ptr_mut(v) as *mut f32,
            param_bf16: param_bf16.map_or(std::ptr::null_mut(), ptr_mut),
            n: param.len() as i64,
            lr: h.lr,
            beta1: h.beta1,
            beta2: h.beta2,
            eps: h.eps,
            weight_decay: h.weight_decay,
            step: step as i32,
        };
        // SAFETY: every buffer holds n elements, checked above.
        check_launch("adamw", unsafe { k::hr_adamw(&p, self.stream()) })
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
        let d = crate::backend::cpu::check_cross_entropy(
            "cross-entropy forward",
            logits,
            targets,
            lse,
            Some(loss),
            None,
        )?;
        let mut p = ce_params(d, targets, ignore_index, scale, lse);
        p.logits = ptr(logits) as *const f32;
        p.loss = ptr_mut(loss) as *mut f32;
        self.bind()?;
        // SAFETY: every buffer holds what the checks above say the kernels index.
        check_launch("cross-entropy forward", unsafe {
            k::hr_cross_entropy_forward(&p, self.stream())
        })
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
        let d = crate::backend::cpu::check_cross_entropy(
            "cross-entropy backward",
            logits,
            targets,
            lse,
            None,
            Some(dlogits),
        )?;
        let mut p = ce_params(d, targets, ignore_index, scale, lse);
        p.logits = ptr(logits) as *const f32;
        p.dlogits = ptr_mut(dlogits);
        self.launch_typed(
            "cross-entropy backward",
            dlogits.dtype(),
            &p,
            k::hr_cross_entropy_backward_f32,
            k::hr_cross_entropy_backward_bf16,
        )
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
        let d = crate::backend::cpu::check_fused_cross_entropy(
            "fused cross-entropy forward",
            hidden,
            weight,
            targets,
            lse,
            Some(loss),
            None,
        )?;
        let mut p = ce_params(d, targets, ignore_index, scale, lse);
        p.hidden = ptr(hidden);
        p.weight = ptr(weight);
        p.loss = ptr_mut(loss) as *mut f32;
        self.launch_typed(
            "fused cross-entropy forward",
            hidden.dtype(),
            &p,
            k::hr_fused_cross_entropy_forward_f32,
            k::hr_fused_cross_entropy_forward_bf16,
        )
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
        let d = crate::backend::cpu::check_fused_cross_entropy(
            "fused cross-entropy backward",
            hidden,
            weight,
            targets,
            lse,
            None,
            Some((d_hidden, d_weight)),
        )?;
        let mut p = ce_params(d, targets, ignore_index, scale, lse);
        p.hidden = ptr(hidden);
        p.weight = ptr(weight);
        p.d_hidden = ptr_mut(d_hidden);
        p.d_weight = ptr_mut(d_weight) as *mut f32;
        p.accumulate = accumulate as i32;
        self.launch_typed(
            "fused cross-entropy backward",
            hidden.dtype(),
            &p,
            k::hr_fused_cross_entropy_backward_f32,
            k::hr_fused_cross_entropy_backward_bf16,
        )
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
        let p = k::hr_rmsnorm_params {
            x: ptr(x),
            weight: ptr(w) as *const f32,
            out: ptr_mut(out),
            rstd: ptr_mut(rstd) as *mut f32,
            d_out: std::ptr::null(),
            dx: std::ptr::null_mut(),
            d_weight: std::ptr::null_mut(),
            tokens: ln.tokens as i32,
            channels: ln.channels as i32,
            accumulate: 0,
            eps: ln.eps,
        };
        self.launch_typed(
            "RMSNorm forward",
            x.dtype(),
            &p,
            k::hr_rmsnorm_forward_f32,
            k::hr_rmsnorm_forward_bf16,
        )
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
        let p = k::hr_rmsnorm_params {
            x: ptr(x),
            weight: ptr(w) as *const f32,
            out: std::ptr::null_mut(),
            rstd: ptr(rstd) as *mut f32,
            d_out: ptr(d_out),
            dx: ptr_mut(dx),
            d_weight: std::ptr::null_mut(),
            tokens: ln.tokens as i32,
            channels: ln.channels as i32,
            accumulate: accumulate as i32,
            eps: ln.eps,
        };
        self.launch_typed(
            "RMSNorm backward",
            x.dtype(),
            &p,
            k::hr_rmsnorm_backward_f32,
            k::hr_rmsnorm_backward_bf16,
        )
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
        let p = k::hr_rmsnorm_params {
            x: ptr(x),
            weight: std::ptr::null(),
            out: std::ptr::null_mut(),
            rstd: ptr(rstd) as *mut f32,
            d_out: ptr(d_out),
            dx: std::ptr::null_mut(),
            d_weight: ptr_mut(d_weight) as *mut f32,
            tokens: ln.tokens as i32,
            channels: ln.channels as i32,
            accumulate: 0,
            eps: ln.eps,
        };
        self.launch_typed(
            "RMSNorm weight gradient",
            x.dtype(),
            &p,
            k::hr_rmsnorm_backward_params_f32,
            k::hr_rmsnorm_backward_params_bf16,
        )
    }

    fn swiglu_forward(&self, gate: &Tensor, up: &Tensor, out: &mut Tensor) -> Result<()> {
        check_swiglu("SwiGLU forward", &[gate, up, out])?;
        let p = k::hr_swiglu_params {
            gate: ptr(gate),
            up: ptr(up),
            d_out: std::ptr::null(),
            out: ptr_mut(out),
            d_gate: std::ptr::null_mut(),
            d_up: std::ptr::null_mut(),
            n: gate.len() as i64,
        };
        self.launch_typed(
            "SwiGLU forward",
            gate.dtype(),
            &p,
            k::hr_swiglu_forward_f32,
            k::hr_swiglu_forward_bf16,
        )
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
        let p = k::hr_swiglu_params {
            gate: ptr(gate),
            up: ptr(up),
            d_out: ptr(d_out),
            out: std::ptr::null_mut(),
            d_gate: ptr_mut(d_gate),
            d_up: ptr_mut(d_up),
            n: gate.len() as i64,
        };
        self.launch_typed(
            "SwiGLU backward",
            gate.dtype(),
            &p,
            k::hr_swiglu_backward_f32,
            k::hr_swiglu_backward_bf16,
        )
    }

    /// The kernel clamps an id outside the vocabulary (no read out of bounds) and records the
    /// first such token in the id-check word ([`IdCheck`]), which the next synchronization
    /// point reads: the error names the token and its id without a copy back per call.
    fn embedding_forward(
        &self,
        ids: &Tensor,
        table: &Tensor,
        positions: Option<&Tensor>,
        seq: usize,
        out: &mut Tensor,
    ) -> Result<()> {
        let e = check_embedding_forward(ids, table, positions, seq, out)?;
        let bad_token = self.id_check_for_launch(e.vocab)?;
        let p = k::hr_embedding_params {
            ids: ptr(ids) as *const i32,
            table: ptr(table),
            positions: positions.map_or(std::ptr::null(), ptr),
            out: ptr_mut(out),
            d_out: std::ptr::null(),
            d_table: std::ptr::null_mut(),
            d_positions: std::ptr::null_mut(),
            bad_token,
            tokens: ids.len() as i32,
            channels: e.channels as i32,
            vocab: e.vocab as i32,
            seq: seq as i32,
        };
        self.launch_typed(
            "embedding forward",
            table.dtype(),
            &p,
            k::hr_embedding_forward_f32,
            k::hr_embedding_forward_bf16,
        )
    }

    /// A token with an id outside the vocabulary is skipped (never written out of bounds)
    /// and reported as in the forward; the other tokens' gradients are added.
    fn embedding_backward(
        &self,
        ids: &Tensor,
        d_out: &Tensor,
        seq: usize,
        d_table: &mut Tensor,
        d_positions: Option<&mut Tensor>,
    ) -> Result<()> {
        let e = check_embedding_backward(ids, d_out, seq, d_table, d_positions.as_deref())?;
        let bad_token = self.id_check_for_launch(e.vocab)?;
        let p = k::hr_embedding_params {
            ids: ptr(ids) as *const i32,
            table: std::ptr::null(),
            positions: std::ptr::null(),
            out: std::ptr::null_mut(),
            d_out: ptr(d_out),
            d_table: ptr_mut(d_table) as *mut f32,
            d_positions: d_positions.map_or(std::ptr::null_mut(), |t| ptr_mut(t) as *mut f32),
            bad_token,
            tokens: ids.len() as i32,
            channels: e.channels as i32,
            vocab: e.vocab as i32,
            seq: seq as i32,
        };
        self.launch_typed(
            "embedding backward",
            d_out.dtype(),
            &p,
            k::hr_embedding_backward_f32,
            k::hr_embedding_backward_bf16,
        )
    }

    // -- grouped-query attention ops --

    fn repeat_kv(&self, s: &AttentionShape, src: &Tensor, dst: &mut Tensor) -> Result<()> {
        crate::backend::cpu::check_repeat_kv("repeat_kv", s, src, dst)?;
        self.bind()?;
        let p = k::hr_repeat_kv_params {
            src: ptr(src),
            dst: ptr_mut(dst),
            batch: s.batch as i32,
            heads: s.heads as i32,
            kv_heads: s.kv_heads as i32,
            seq: s.seq as i32,
            head_dim: s.head_dim as i32,
        };
        // SAFETY: sizes and dtypes checked above (src [B, Hkv, N, d], dst [B, H, N, d]).
        let code = unsafe {
            match src.dtype() {
                DType::F32 => k::hr_repeat_kv_f32(&p, self.stream()),
                DType::Bf16 => k::hr_repeat_kv_bf16(&p, self.stream()),
                DType::I32 => return Err(not_float("repeat_kv")),
            }
        };
        check_launch("repeat_kv", code)
    }

    fn reduce_kv(&self, s: &AttentionShape, src: &Tensor, dst: &mut Tensor) -> Result<()> {
        crate::backend::cpu::check_repeat_kv("reduce_kv", s, dst, src)?;
        self.bind()?;
        let p = k::hr_repeat_kv_params {
            src: ptr(src),
            dst: ptr_mut(dst),
            batch: s.batch as i32,
            heads: s.heads as i32,
            kv_heads: s.kv_heads as i32,
            seq: s.seq as i32,
            head_dim: s.head_dim as i32,
        };
        // SAFETY: sizes and dtypes checked above (src [B, H, N, d], dst [B, Hkv, N, d]).
        let code = unsafe {
            match src.dtype() {
                DType::F32 => k::hr_reduce_kv_f32(&p, self.stream()),
                DType::Bf16 => k::hr_reduce_kv_bf16(&p, self.stream()),
                DType::I32 => return Err(not_float("reduce_kv")),
            }
        };
        check_launch("reduce_kv", code)
    }

    fn synchronize(&self) -> Result<()> {
        self.dev.stream.synchronize()?;
        self.take_id_error()
    }

    fn time(&self, f: &mut dyn FnMut() -> Result<()>) -> Result<f64> {
        let mut slot = self.events.lock().unwrap_or_else(|p| p.into_inner());
        if slot.is_none() {
            *slot = Some(self.dev.timer()?);
        }
        let (start, end) = slot.as_ref().expect("made above");
        start.record(&self.dev.stream)?;
        f()?;
        end.record(&self.dev.stream)?;
        // elapsed_ms synchronizes on both events, so the pair is free for the next sample.
        let seconds = start.elapsed_ms(end)? as f64 / 1e3;
        self.take_id_error()?;
        Ok(seconds)
    }

    fn flush_cache(&self, scratch: &mut Tensor) -> Result<()> {
        self.bind()?;
        // SAFETY: writes exactly the scratch tensor's bytes.
        unsafe {
            drv::memset_d8_async(
                scratch.device_ptr(),
                0x5A,
                scratch.bytes() as usize,
                self.dev.stream.cu_stream(),
            )?
        };
        Ok(())
    }

    fn sticky_fault(&self) -> Option<String> {
        use sys::cudaError_enum as E;
        self.bind().ok()?;
        // These leave the context unusable: every later call returns the same error until
        // the process ends (CUDA driver API, "Error Handling").
        match self.dev.stream.synchronize() {
            Err(e)
                if matches!(
                    e.0,
                    E::CUDA_ERROR_ILLEGAL_ADDRESS
                        | E::CUDA_ERROR_LAUNCH_FAILED
                        | E::CUDA_ERROR_LAUNCH_TIMEOUT
                        | E::CUDA_ERROR_ASSERT
                        | E::CUDA_ERROR_HARDWARE_STACK_ERROR
                        | E::CUDA_ERROR_ILLEGAL_INSTRUCTION
                        | E::CUDA_ERROR_MISALIGNED_ADDRESS
                        | E::CUDA_ERROR_INVALID_ADDRESS_SPACE
                        | E::CUDA_ERROR_INVALID_PC
                        | E::CUDA_ERROR_ECC_UNCORRECTABLE
                        | E::CUDA_ERROR_UNKNOWN
                ) =>
            {
                Some(e.to_string())
            }
            _ => None,
        }
    }

    fn driver_space(&self, capacity: u64) -> Result<Option<Box<dyn crate::alloc::AddressSpace>>> {
        let space =
            crate::alloc::driver::DriverSpace::new(self.dev.stream.clone(), Some(capacity))?;
        Ok(Some(Box::new(space)))
    }

    fn driver_view_begin(&self) -> Result<Option<DriverMemoryView>> {
        self.bind()?;
        // The id-check word exists before any measured region, so no case's figures hold it.
        drop(self.id_check_word()?);
        Ok(Some(self.dev.reset_driver_view()?))
    }

    fn driver_view_end(&self, start: DriverMemoryView) -> Result<DriverMemoryView> {
        self.dev.driver_view(start)
    }

    fn flush_buffer(&self) -> Result<Option<Tensor>> {
        // Twice the L2 evicts everything the last run left there.
        let l2 = self.dev.facts.l2_bytes.unwrap_or(0);
        if l2 == 0 {
            return Ok(None);
        }
        let len = (2 * l2 as usize).div_ceil(4);
        self.alloc_with(&self.untracked, DType::F32, len, "L2 flush")
            .map(Some)
    }

    fn peer(&self, rank: usize) -> Result<Arc<dyn Backend>> {
        // Rank r runs on the r-th GPU counted from this one, so HEADROOM_DEVICE=k puts rank 0
        // on GPU k and rank 1 on GPU k+1: NCCL needs one GPU per rank.
        let ordinal = self.ordinal() + rank;
        let dev = crate::device::open_ordinal(ordinal).map_err(|why| {
            Error::Unsupported(format!(
                "rank {rank} of a sharded step runs on GPU {ordinal}, but {why}"
            ))
        })?;
        Ok(Arc::new(CudaBackend::new(dev, self.tracker.budget())))
    }

    fn as_cuda(&self) -> Option<&CudaBackend> {
        Some(self)
    }
}

type Launcher<P> = unsafe extern "C" fn(*const P, k::hr_stream_t) -> i32;

impl CudaBackend {
    /// Launch the f32 or bf16 instance of an operation. Callers have checked every buffer's
    /// size against the parameters.
    fn launch_typed<P>(
        &self,
        what: &str,
        dtype: DType,
        p: &P,
        f32_op: Launcher<P>,
        bf16_op: Launcher<P>,
    ) -> Result<()> {
        self.bind()?;
        let op = match dtype {
            DType::F32 => f32_op,
            DType::Bf16 => bf16_op,
            DType::I32 => return Err(not_float(what)),
        };
        // SAFETY: the launcher reads a parameter struct of the type it declares; buffer sizes
        // were checked by the caller.
        check_launch(what, unsafe { op(p, self.stream()) })
    }

    /// cuBLAS on row-major data: C = op(A).op(B) is, column-major, C^T = op(B)^T.op(A)^T,
    /// so B is passed first and the roles of m and n swap.
    fn cublas_matmul(
        &self,
        mm: &Matmul,
        a: &Tensor,
        b: &Tensor,
        epi: Epi<'_>,
        c: &mut Tensor,
    ) -> Result<()> {
        if mm.epilogue != Epilogue::None || epi.bias.is_some() || epi.residual.is_some() {
            return Err(Error::Unsupported(
                "the cuBLAS baseline runs without a fused epilogue".into(),
            ));
        }
        let blas = self.blas()?;
        let h = *blas.handle();
        // cuBLAS' workspace comes from the tracked allocator for the call, so it is counted in
        // the case's figures like any other buffer; it is freed in stream order after the call.
        let workspace = self.alloc(
            DType::F32,
            CUBLAS_WORKSPACE_BYTES as usize / 4,
            "workspace: cuBLAS",
        )?;
        // SAFETY: the workspace holds CUBLAS_WORKSPACE_BYTES bytes on this device and outlives
        // every use cuBLAS makes of it (it is freed on the same stream after the GEMM).
        unsafe {
            blas_sys::cublasSetWorkspace_v2(
                h,
                workspace.device_ptr() as *mut c_void,
                CUBLAS_WORKSPACE_BYTES as usize,
            )
        }
        .result()
        .map_err(|e| Error::Cuda(format!("cublasSetWorkspace: {e:?}")))?;
        let op = |t: bool| {
            if t {
                blas_sys::cublasOperation_t::CUBLAS_OP_T
            } else {
                blas_sys::cublasOperation_t::CUBLAS_OP_N
            }
        };
        let (m, n, kk) = (mm.m as i32, mm.n as i32, mm.k as i32);
        let lda_b = if mm.trans_b { kk } else { n };
        let ldb_a = if mm.trans_a { m } else { kk };
        let alpha = mm.alpha;
        let beta: f32 = if mm.accumulate { 1.0 } else { 0.0 };
        // SAFETY: Matmul::check verified the buffers; alpha/beta are host scalars.
        let r = unsafe {
            match (a.dtype(), c.dtype()) {
                (DType::F32, DType::F32) => blas::sgemm_strided_batched(
                    h,
                    op(mm.trans_b),
                    op(mm.trans_a),
                    n,
                    m,
                    kk,
                    &alpha,
                    ptr(b) as *const f32,
                    lda_b,
                    mm.stride_b as i64,
                    ptr(a) as *const f32,
                    ldb_a,
                    mm.stride_a as i64,
                    &beta,
                    ptr_mut(c) as *mut f32,
                    n,
                    mm.stride_c as i64,
                    mm.batch as i32,
                ),
                (DType::Bf16, cd) => blas::gemm_strided_batched_ex(
                    h,
                    op(mm.trans_b),
                    op(mm.trans_a),
                    n,
                    m,
                    kk,
                    &alpha as *const f32 as *const c_void,
                    ptr(b),
                    blas_sys::cudaDataType::CUDA_R_16BF,
                    lda_b,
                    mm.stride_b as i64,
                    ptr(a),
                    blas_sys::cudaDataType::CUDA_R_16BF,
                    ldb_a,
                    mm.stride_a as i64,
                    &beta as *const f32 as *const c_void,
                    ptr_mut(c),
                    if cd == DType::F32 {
                        blas_sys::cudaDataType::CUDA_R_32F
                    } else {
                        blas_sys::cudaDataType::CUDA_R_16BF
                    },
                    n,
                    mm.stride_c as i64,
                    mm.batch as i32,
                    blas_sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                    blas_sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
                ),
                (ad, cd) => {
                    return Err(Error::Invalid(format!(
                        "cuBLAS matmul of {ad} into {cd} is not offered"
                    )))
                }
            }
        };
        r.map_err(|e| Error::Cuda(format!("cuBLAS gemm failed: {e:?}")))
    }
}

fn attention_params(s: &AttentionShape) -> k::hr_attention_params {
    k::hr_attention_params {
        q: std::ptr::null(),
        k: std::ptr::null(),
        v: std::ptr::null(),
        o: std::ptr::null_mut(),
        lse: std::ptr::null_mut(),
        d_o: std::ptr::null(),
        delta: std::ptr::null_mut(),
        dq: std::ptr::null_mut(),
        dk: std::ptr::null_mut(),
        dv: std::ptr::null_mut(),
        batch: s.batch as i32,
        heads: s.heads as i32,
        seq: s.seq as i32,
        head_dim: s.head_dim as i32,
        kv_heads: s.kv_heads as i32,
        causal: s.causal as i32,
        scale: s.scale,
    }
}

fn layernorm_params(ln: &LayerNorm) -> k::hr_layernorm_params {
    k::hr_layernorm_params {
        x: std::ptr::null(),
        weight: std::ptr::null(),
        bias: std::ptr::null(),
        out: std::ptr::null_mut(),
        mean: std::ptr::null_mut(),
        rstd: std::ptr::null_mut(),
        d_out: std::ptr::null(),
        dx: std::ptr::null_mut(),
        d_weight: std::ptr::null_mut(),
        d_bias: std::ptr::null_mut(),
        tokens: ln.tokens as i32,
        channels: ln.channels as i32,
        accumulate: 0,
        eps: ln.eps,
    }
}

fn heads_params(
    s: &AttentionShape,
    parts: usize,
    src: &Tensor,
    dst: &mut Tensor,
) -> k::hr_heads_params {
    k::hr_heads_params {
        src: ptr(src),
        dst: ptr_mut(dst),
        batch: s.batch as i32,
        heads: s.heads as i32,
        seq: s.seq as i32,
        head_dim: s.head_dim as i32,
        parts: parts as i32,
    }
}

fn softmax_params(s: &AttentionShape) -> k::hr_softmax_params {
    k::hr_softmax_params {
        scores: std::ptr::null_mut(),
        lse: std::ptr::null_mut(),
        dp: std::ptr::null(),
        ds: std::ptr::null_mut(),
        delta: std::ptr::null(),
        rows: s.rows() as i32,
        seq: s.seq as i32,
        causal: s.causal as i32,
    }
}

#[cfg(test)]
mod tests {
    use super::id_word_error;

    /// The word as the embedding kernels write it: the minimum of `token << 32 | id as u32`
    /// over every bad token of every launch since it was cleared.
    fn folded(bad: &[(u64, i32)]) -> u64 {
        bad.iter()
            .map(|&(t, id)| (t << 32) | u64::from(id as u32))
            .fold(u64::MAX, u64::min)
    }

    #[test]
    fn the_id_word_names_the_first_bad_token_and_its_id() {
        assert_eq!(id_word_error(folded(&[]), 1031), None);
        let e = id_word_error(folded(&[(70, 5000), (3, -2), (9, 1031)]), 1031).unwrap();
        assert_eq!(
            e,
            "token 3 has id -2, outside the vocabulary of 1031 ids (0 to 1030)"
        );
        let e = id_word_error(folded(&[(0, 1031)]), 1031).unwrap();
        assert!(e.starts_with("token 0 has id 1031,"), "{e}");
        // The largest token a launch can have (i32 tokens) with id -1 is not the clear word.
        assert!(id_word_error(folded(&[(i32::MAX as u64, -1)]), 8).is_some());
    }
}
