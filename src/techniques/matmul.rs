//! Matmul: FP32 on the SIMT cores and BF16 on the tensor cores (mma.sync; wgmma on Hopper),
//! side by side with cuBLAS on the same inputs. Precision is the first memory-saving
//! technique users reach for: bf16 halves every operand's bytes.
//!
//! FLOPs = 2·M·N·K per matrix. Memory model: A + B + C (+ the f32 bias when an epilogue is
//! fused, + a residual the size of C in C's dtype when one is added), plus for cuBLAS the workspace it is handed from the tracked allocator for each
//! call ([`crate::shapes::CUBLAS_WORKSPACE_BYTES`]), so the library holds nothing the figure
//! does not count.

use crate::backend::{Backend, BackendKind, Epi, Epilogue, Matmul, MatmulKernel, Tensor};
use crate::dtype::DType;
use crate::error::Result;
use crate::reference;
use crate::rng::Rng;
use crate::techniques::{
    random_tensor, sample_indices, Bounds, Case, CaseInfo, Comparison, Instance, Profile, Readback,
    Tamper, Validation,
};

/// Output elements compared with the f64 reference in a large case.
const SAMPLES: usize = 4096;

/// Up to this many multiply-adds (m·n·k per batch), every element of C is compared; above
/// it, [`SAMPLES`] of them (always including the first and the last, so the first and last
/// rows of C are always looked at).
const FULL_CHECK_MACS: usize = 1 << 26;

pub struct MatmulCase {
    info: CaseInfo,
    kernel: MatmulKernel,
    mm: Matmul,
    in_dtype: DType,
    out_dtype: DType,
    /// A residual (C's shape and dtype) is added by the epilogue.
    residual: bool,
}

/// The shape part of a matmul case id: `m4096-n4096-k4096`, plus the form and extras.
fn shape_name(mm: &Matmul, out_dtype: DType, in_dtype: DType) -> String {
    let mut s = format!("m{}-n{}-k{}", mm.m, mm.n, mm.k);
    match (mm.trans_a, mm.trans_b) {
        (false, false) => {}
        (false, true) => s.push_str("-nt"),
        (true, false) => s.push_str("-tn"),
        (true, true) => s.push_str("-tt"),
    }
    if mm.batch > 1 {
        s.push_str(&format!("-batch{}", mm.batch));
        if mm.stride_b == 0 {
            s.push_str("-bcast");
        }
    }
    match mm.epilogue {
        Epilogue::None => {}
        Epilogue::Bias => s.push_str("-bias"),
        Epilogue::BiasGelu => s.push_str("-bias-gelu"),
    }
    if mm.alpha != 1.0 {
        s.push_str(&format!("-alpha{}", mm.alpha));
    }
    if mm.accumulate {
        s.push_str("-acc");
    }
    if out_dtype != in_dtype {
        s.push_str(&format!("-out{}", out_dtype.name()));
    }
    s
}

impl MatmulCase {
    pub fn new(kernel: MatmulKernel, in_dtype: DType, out_dtype: DType, mm: Matmul) -> Self {
        let mut info = CaseInfo::new(
            "matmul",
            kernel.name(),
            in_dtype,
            shape_name(&mm, out_dtype, in_dtype),
        );
        let (m, n, k, b) = (mm.m as u64, mm.n as u64, mm.k as u64, mm.batch as u64);
        info.flops = 2.0 * (b * m * n * k) as f64;
        let (a_len, b_len, c_len) = lens(&mm);
        let s_in = in_dtype.size() as u64;
        let s_out = out_dtype.size() as u64;
        let bias = if mm.epilogue == Epilogue::None {
            0
        } else {
            4 * n
        };
        // cuBLAS is handed its workspace from the tracked allocator for each call.
        let workspace = if kernel == MatmulKernel::Cublas {
            crate::shapes::CUBLAS_WORKSPACE_BYTES
        } else {
            0
        };
        info.predicted_peak_bytes =
            (a_len + b_len) as u64 * s_in + c_len as u64 * s_out + bias + workspace;
        let c_traffic = if mm.accumulate { 2 } else { 1 };
        info.bytes_moved =
            ((a_len + b_len) as u64 * s_in + c_traffic * c_len as u64 * s_out + bias) as f64;
        info.tolerance = Bounds::of(bounds_dtype(in_dtype, out_dtype)).relative;
        MatmulCase {
            info,
            kernel,
            mm,
            in_dtype,
            out_dtype,
            residual: false,
        }
    }

    /// The same product with a residual (C's shape and dtype) added by the epilogue after
    /// the bias and GELU, before C's old values (id suffix `-res`).
    pub fn with_residual(mut self) -> Self {
        let c_bytes = lens(&self.mm).2 as u64 * self.out_dtype.size() as u64;
        self.residual = true;
        self.info.id.push_str("-res");
        self.info.predicted_peak_bytes += c_bytes;
        self.info.bytes_moved += c_bytes as f64;
        self
    }
}

/// The dtype whose [`Bounds`] C is held to. bf16 operands are exact in the reference (it reads
/// the stored values), so a bf16 product into fp32 differs only by its accumulation; but
/// tensor-core accumulation is not IEEE fp32 (Hopper's FP8 products keep about 14 bits,
/// DeepSeek-V3 report sec. 3.3.2, and NVIDIA documents no bound for bf16), so every product
/// with bf16 operands or a bf16 C is held to bf16 bounds.
fn bounds_dtype(in_dtype: DType, out_dtype: DType) -> DType {
    if in_dtype == DType::Bf16 || out_dtype == DType::Bf16 {
        DType::Bf16
    } else {
        DType::F32
    }
}

/// Elements of A, B and C, with the batch strides (a stride of 0 broadcasts one matrix).
fn lens(mm: &Matmul) -> (usize, usize, usize) {
    let span = |stride: usize, one: usize| (mm.batch - 1) * stride + one;
    (
        span(mm.stride_a, mm.m * mm.k),
        span(mm.stride_b, mm.k * mm.n),
        span(mm.stride_c, mm.m * mm.n),
    )
}

struct MatmulInstance {
    kernel: MatmulKernel,
    mm: Matmul,
    a: Tensor,
    b: Tensor,
    bias: Option<Tensor>,
    residual: Option<Tensor>,
    c: Tensor,
    a_v: Vec<f32>,
    b_v: Vec<f32>,
    bias_v: Option<Vec<f32>>,
    residual_v: Option<Vec<f32>>,
    in_dtype: DType,
    out_dtype: DType,
}

impl Case for MatmulCase {
    fn info(&self) -> &CaseInfo {
        &self.info
    }

    fn skip_reason(&self, be: &dyn Backend) -> Option<String> {
        be.matmul_available(self.kernel, self.in_dtype).err()
    }

    fn setup(&self, be: &dyn Backend, rng: &mut Rng) -> Result<Box<dyn Instance>> {
        let (a_len, b_len, c_len) = lens(&self.mm);
        let (a, a_v) = random_tensor(be, rng, self.in_dtype, a_len, 1.0, "A")?;
        let (b, b_v) = random_tensor(be, rng, self.in_dtype, b_len, 1.0, "B")?;
        let (bias, bias_v) = if self.mm.epilogue == Epilogue::None {
            (None, None)
        } else {
            let (t, v) = random_tensor(be, rng, DType::F32, self.mm.n, 1.0, "bias")?;
            (Some(t), Some(v))
        };
        let (residual, residual_v) = if self.residual {
            let (t, v) = random_tensor(be, rng, self.out_dtype, c_len, 1.0, "residual")?;
            (Some(t), Some(v))
        } else {
            (None, None)
        };
        let c = be.alloc(self.out_dtype, c_len, "C")?;
        Ok(Box::new(MatmulInstance {
            kernel: self.kernel,
            mm: self.mm,
            a,
            b,
            bias,
            residual,
            c,
            a_v,
            b_v,
            bias_v,
            residual_v,
            in_dtype: self.in_dtype,
            out_dtype: self.out_dtype,
        }))
    }
}

impl Instance for MatmulInstance {
    fn run(&mut self, be: &dyn Backend) -> Result<()> {
        be.matmul(
            self.kernel,
            &self.mm,
            &self.a,
            &self.b,
            Epi {
                bias: self.bias.as_ref(),
                residual: self.residual.as_ref(),
            },
            &mut self.c,
        )
    }

    fn validate(
        &mut self,
        be: &dyn Backend,
        rng: &mut Rng,
        tamper: &mut Tamper<'_>,
    ) -> Result<Validation> {
        // With accumulate, C must hold known values first; otherwise it is poisoned.
        let c_old = if self.mm.accumulate {
            let v: Vec<f32> = rng
                .fill(self.c.len(), 1.0)
                .into_iter()
                .map(|x| self.out_dtype.round(x))
                .collect();
            be.write(&mut self.c, &v)?;
            Some(v)
        } else {
            be.poison(&mut self.c)?;
            None
        };
        self.run(be)?;
        let mut out = be.read(&self.c)?;
        let mm = &self.mm;
        tamper(Readback {
            name: "C",
            values: &mut out,
            row: mm.n,
        });
        let mut cmp = Comparison::new(bounds_dtype(self.in_dtype, self.out_dtype));
        let operands = reference::MatmulOperands {
            a: &self.a_v,
            b: &self.b_v,
            bias: self.bias_v.as_deref(),
            residual: self.residual_v.as_deref(),
            c_old: c_old.as_deref(),
        };
        let full = mm.m * mm.n * mm.k <= FULL_CHECK_MACS;
        for batch in 0..mm.batch {
            let c0 = batch * mm.stride_c;
            cmp.all_finite("C", &out[c0..c0 + mm.m * mm.n]);
            let indices = if full {
                (0..mm.m * mm.n).collect()
            } else {
                sample_indices(rng, mm.m * mm.n, (SAMPLES / mm.batch.max(1)).max(64))
            };
            for idx in indices {
                let (i, j) = (idx / mm.n, idx % mm.n);
                let r = reference::matmul_element(mm, &operands, batch, i, j);
                cmp.add("C", &|| format!("C[{batch}][{i},{j}]"), out[c0 + idx], r);
            }
        }
        Ok(cmp.finish())
    }
}

fn kernels_for(dtype: DType) -> &'static [MatmulKernel] {
    match dtype {
        DType::F32 => &[MatmulKernel::Simt, MatmulKernel::Cublas],
        DType::I32 => &[],
        DType::Bf16 => &[
            MatmulKernel::Mma,
            MatmulKernel::Wgmma,
            MatmulKernel::WgmmaBanded,
            MatmulKernel::WgmmaWide,
            MatmulKernel::WgmmaCluster,
            MatmulKernel::WgmmaTmaStore,
            MatmulKernel::Cublas,
        ],
    }
}

/// Square sizes and transformer shapes (tokens x 4·hidden x hidden, the MLP's first product).
pub fn cases(profile: Profile, kind: BackendKind) -> Vec<Box<dyn Case>> {
    let shapes: Vec<(usize, usize, usize)> = match (kind, profile) {
        (BackendKind::Cpu, Profile::Quick) => vec![(256, 256, 256), (512, 1024, 256)],
        (BackendKind::Cpu, Profile::Full) => {
            vec![(256, 256, 256), (512, 512, 512), (512, 1024, 256)]
        }
        (BackendKind::Cuda | BackendKind::Dry, Profile::Quick) => {
            vec![(4096, 4096, 4096), (8192, 8192, 8192), (8192, 16384, 4096)]
        }
        (BackendKind::Cuda | BackendKind::Dry, Profile::Full) => vec![
            (1024, 1024, 1024),
            (2048, 2048, 2048),
            (4096, 4096, 4096),
            (8192, 8192, 8192),
            (8192, 4096, 1024),
            (8192, 16384, 4096),
        ],
    };
    let mut out: Vec<Box<dyn Case>> = Vec::new();
    for (m, n, k) in shapes {
        for dtype in [DType::F32, DType::Bf16] {
            for &kernel in kernels_for(dtype) {
                out.push(Box::new(MatmulCase::new(
                    kernel,
                    dtype,
                    dtype,
                    Matmul::new(m, n, k),
                )));
            }
        }
    }
    out
}

/// Odd sizes (no multiple of any tile), every transpose form, the epilogues, accumulation,
/// batching with broadcast, and bf16 into f32.
pub fn check_cases(kind: BackendKind) -> Vec<Box<dyn Case>> {
    let mut out: Vec<Box<dyn Case>> = Vec::new();
    let sizes: &[(usize, usize, usize)] = match kind {
        BackendKind::Cpu => &[(127, 257, 131), (1, 1, 1), (64, 72, 520)],
        // wgmma loads an m- or n-contiguous operand (A with trans_a, B without trans_b) as
        // two 64-wide TMA boxes per 128-wide tile, and skips the second when it lies wholly
        // past the edge (`a_hi`/`b_hi` in kernels/matmul.cu): when the last tile holds 64
        // rows or fewer, m mod 128 (or n mod 128) in 1..=64. n = 1064 (8·128 + 40) reaches B's
        // skipped box in the nn and tn forms, m = 1064 reaches A's in tn and tt; both are
        // multiples of 8, as TMA's 16-byte strides require of the leading dimension.
        // 2056 x 2056 is 17 x 17 tiles of 128 (17 x 9 of 128 x 256): more tiles than an
        // H100 or H200 has SMs (the persistent grid takes a second and third tile), two full
        // bands of 8 tile rows and a last band of one. wgmma-wide loads an n-major B as four
        // 64-wide boxes per 256-wide tile and skips those wholly past the edge: the last tile
        // holds n mod 256 = 40 (n = 1064: one box), 104 (n = 1128: two), 160 (n = 1184:
        // three) or 232 (n = 1000: four, the last partial) columns. wgmma-cluster pairs
        // vertically adjacent tiles: m = 127, 1 (one tile row: every pair's second block
        // computes rows past m and stores nothing), 1064, 4099, 2056 and 264 (an odd count of
        // tile rows: the last pair's second tile lies wholly past m) against 1000 and 129
        // (even), and the small sizes leave clusters with no tile at all. wgmma-tma-store
        // stores C by TMA where its rows are multiples of 16 bytes (n = 1064, 1000, 2056,
        // 1128, 1184 and the extras' 200, in bf16 and, for the bf16-into-f32 extra, fp32: the
        // last 64- or 32-column chunk partial or wholly past n, and for m = 4099 and 1064 a
        // warpgroup's rows wholly past m) and from registers elsewhere (n = 257, 33, 1).
        BackendKind::Cuda | BackendKind::Dry => &[
            (127, 257, 131),
            (1, 1, 1),
            (1000, 1064, 520),
            (1064, 1000, 520),
            (4099, 33, 1029),
            (2056, 2056, 136),
            (264, 1128, 72),
            (264, 1184, 72),
        ],
    };
    for dtype in [DType::F32, DType::Bf16] {
        for &kernel in kernels_for(dtype) {
            for &(m, n, k) in sizes {
                for (ta, tb) in [(false, false), (false, true), (true, false), (true, true)] {
                    let mm = Matmul::new(m, n, k).transposed(ta, tb);
                    out.push(Box::new(MatmulCase::new(kernel, dtype, dtype, mm)));
                }
            }
            // Extras on one odd size: fused epilogues, alpha, accumulation, batching.
            let base = Matmul::new(129, 200, 72);
            let extras = [
                Matmul {
                    epilogue: Epilogue::Bias,
                    ..base
                },
                Matmul {
                    epilogue: Epilogue::BiasGelu,
                    ..base
                },
                Matmul {
                    alpha: 0.125,
                    accumulate: true,
                    ..base
                },
                Matmul {
                    stride_b: 0,
                    ..base.batched(3)
                },
            ];
            for mm in extras {
                if kernel == MatmulKernel::Cublas && mm.epilogue != Epilogue::None {
                    continue; // the baseline has no fused epilogue
                }
                out.push(Box::new(MatmulCase::new(kernel, dtype, dtype, mm)));
            }
            // A residual after the bias and GELU, before C's old values, and per batch entry
            // (the baseline has no fused epilogue).
            if kernel != MatmulKernel::Cublas {
                for mm in [extras[1], extras[2], extras[3]] {
                    out.push(Box::new(
                        MatmulCase::new(kernel, dtype, dtype, mm).with_residual(),
                    ));
                }
            }
            if dtype == DType::Bf16 {
                out.push(Box::new(MatmulCase::new(
                    kernel,
                    dtype,
                    DType::F32,
                    base.transposed(true, false),
                )));
            }
        }
    }
    out
}
