//! The norm, MLP and embedding ops (RMSNorm, SwiGLU, token embedding): every check case passes
//! on the CPU backend, every corrupted output fails validation naming that output, bad token
//! ids are errors rather than panics or reads out of bounds, the embedding's backward is
//! bitwise repeatable, and the f64 references' gradients agree with finite differences of
//! their forwards.

use headroom::backend::cpu::CpuBackend;
use headroom::backend::dry::DryBackend;
use headroom::backend::{Backend, LayerNorm, Tensor};
use headroom::dtype::DType;
use headroom::error::Error;
use headroom::reference::layers as rl;
use headroom::rng::Rng;
use headroom::techniques::layers::{check_cases, LayerCase, Op, VOCAB};

mod common;
use common::assert_caught;
use common::validate;

const NEW_OPS: [&str; 4] = [
    "rmsnorm-forward",
    "rmsnorm-backward",
    "swiglu-forward-backward",
    "embedding-forward-backward",
];

#[test]
fn every_new_layer_case_passes_on_the_cpu() {
    let mut ran = Vec::new();
    for case in check_cases() {
        let info = case.info();
        if !NEW_OPS.contains(&info.technique.as_str()) {
            continue;
        }
        let (v, _) = validate(case.as_ref(), "", None);
        assert!(v.passed(), "{}: {}", info.id, v.detail);
        assert!(v.compared > 0, "{}: nothing compared", info.id);
        ran.push(info.id.clone());
    }
    // 3 ops x 2 dtypes x 2 sizes, and the embedding x 2 dtypes x 2 sizes x positions on/off.
    assert_eq!(ran.len(), 12 + 8, "{ran:?}");
    for op in NEW_OPS {
        for dtype in ["f32", "bf16"] {
            assert!(
                ran.iter().any(|id| id.contains(&format!("/{op}/{dtype}/"))),
                "no {op} case in {dtype}"
            );
        }
    }
    assert!(ran.iter().any(|id| id.ends_with("-pos32")));
    assert!(ran.iter().any(|id| id.ends_with(&format!("-v{VOCAB}"))));
}

#[test]
fn rmsnorm_mutations_are_caught() {
    for dtype in [DType::F32, DType::Bf16] {
        assert_caught(
            &LayerCase::new(Op::RmsNormForward, dtype, 77, 200),
            &["out", "rstd"],
            &[],
        );
        assert_caught(
            &LayerCase::new(Op::RmsNormBackward, dtype, 77, 200),
            &["out", "rstd", "dx", "d_weight"],
            &[],
        );
    }
}

#[test]
fn swiglu_mutations_are_caught() {
    for dtype in [DType::F32, DType::Bf16] {
        assert_caught(
            &LayerCase::new(Op::SwiGlu, dtype, 77, 200),
            &["out", "d_gate", "d_up"],
            &[],
        );
    }
}

#[test]
fn embedding_mutations_are_caught() {
    for dtype in [DType::F32, DType::Bf16] {
        assert_caught(
            &LayerCase::embedding(dtype, 77, 200, VOCAB, 32, true),
            &["out", "d_table", "d_positions"],
            &[],
        );
        assert_caught(
            &LayerCase::embedding(dtype, 33, 128, VOCAB, 16, false),
            &["out", "d_table"],
            &[],
        );
    }
}

fn tensor(be: &dyn Backend, dtype: DType, values: &[f32], tag: &str) -> Tensor {
    let mut t = be.alloc(dtype, values.len(), tag).expect("alloc");
    be.write(&mut t, values).expect("write");
    t
}

fn bits(be: &dyn Backend, t: &Tensor) -> Vec<u32> {
    be.read(t)
        .expect("read")
        .iter()
        .map(|x| x.to_bits())
        .collect()
}

#[test]
fn an_id_outside_the_vocabulary_is_an_error_that_names_it() {
    let be = CpuBackend::new(None, None);
    let (vocab, c, seq) = (5usize, 3usize, 2usize);
    let mut rng = Rng::new(3);
    let table = tensor(&be, DType::F32, &rng.fill(vocab * c, 1.0), "table");
    let positions = tensor(&be, DType::F32, &rng.fill(seq * c, 1.0), "positions");
    let d_out = tensor(&be, DType::F32, &rng.fill(4 * c, 1.0), "d_out");
    for bad in [vocab as f32, -1.0, 1e9] {
        let ids = tensor(&be, DType::I32, &[0.0, 4.0, bad, 1.0], "ids");
        let mut out = be.alloc(DType::F32, 4 * c, "out").unwrap();
        let err = be
            .embedding_forward(&ids, &table, Some(&positions), seq, &mut out)
            .expect_err("an id outside the vocabulary");
        let Error::Invalid(msg) = &err else {
            panic!("not an invalid-input error: {err:?}")
        };
        let id = bad as i32;
        assert!(
            msg.contains(&format!("token 2 has id {id}")) && msg.contains("vocabulary of 5"),
            "{msg}"
        );
        // The backward refuses before adding anything: d_table and d_positions untouched.
        let init_t = rng.fill(vocab * c, 1.0);
        let init_p = rng.fill(seq * c, 1.0);
        let mut d_table = tensor(&be, DType::F32, &init_t, "d_table");
        let mut d_pos = tensor(&be, DType::F32, &init_p, "d_positions");
        let err = be
            .embedding_backward(&ids, &d_out, seq, &mut d_table, Some(&mut d_pos))
            .expect_err("an id outside the vocabulary");
        assert!(matches!(err, Error::Invalid(ref m) if m.contains(&format!("id {id}"))));
        assert_eq!(be.read(&d_table).unwrap(), init_t);
        assert_eq!(be.read(&d_pos).unwrap(), init_p);
    }
}

#[test]
fn embedding_shapes_and_dtypes_are_checked_on_every_backend() {
    let cpu = CpuBackend::new(None, None);
    let dry = DryBackend::new(None);
    for be in [&cpu as &dyn Backend, &dry] {
        let ids = tensor(be, DType::I32, &[0.0, 1.0, 2.0], "ids");
        let table = tensor(be, DType::F32, &[0.5; 12], "table"); // V = 3, C = 4
        let mut out = be.alloc(DType::F32, 12, "out").unwrap();
        be.embedding_forward(&ids, &table, None, 1, &mut out)
            .expect("valid shapes");
        // Ids as floats, a table of partial rows, a bf16 output from an f32 table, positions
        // of the wrong length, and an f32 d_out with a bf16 d_table: each an error.
        let ids_f = tensor(be, DType::F32, &[0.0, 1.0, 2.0], "ids as f32");
        assert!(be
            .embedding_forward(&ids_f, &table, None, 1, &mut out)
            .is_err());
        let ragged = tensor(be, DType::F32, &[0.5; 10], "ragged table");
        assert!(be
            .embedding_forward(&ids, &ragged, None, 1, &mut out)
            .is_err());
        let mut out16 = be.alloc(DType::Bf16, 12, "out bf16").unwrap();
        assert!(be
            .embedding_forward(&ids, &table, None, 1, &mut out16)
            .is_err());
        let pos = tensor(be, DType::F32, &[0.5; 4], "positions");
        assert!(be
            .embedding_forward(&ids, &table, Some(&pos), 2, &mut out)
            .is_err());
        let mut dt16 = be.alloc(DType::Bf16, 12, "d_table bf16").unwrap();
        assert!(be
            .embedding_backward(&ids, &out, 1, &mut dt16, None)
            .is_err());
    }
}

#[test]
fn rmsnorm_and_swiglu_shapes_are_checked() {
    let be = CpuBackend::new(None, None);
    let ln = LayerNorm {
        tokens: 2,
        channels: 3,
        eps: 1e-5,
    };
    let x = tensor(&be, DType::F32, &[1.0; 6], "x");
    let w = tensor(&be, DType::F32, &[1.0; 3], "w");
    let mut out = be.alloc(DType::F32, 6, "out").unwrap();
    let mut rstd = be.alloc(DType::F32, 2, "rstd").unwrap();
    be.rmsnorm_forward(&ln, &x, &w, &mut out, &mut rstd)
        .expect("valid shapes");
    let mut short = be.alloc(DType::F32, 1, "short rstd").unwrap();
    assert!(be
        .rmsnorm_forward(&ln, &x, &w, &mut out, &mut short)
        .is_err());
    let mut out16 = be.alloc(DType::Bf16, 6, "out bf16").unwrap();
    assert!(be
        .rmsnorm_forward(&ln, &x, &w, &mut out16, &mut rstd)
        .is_err());
    let negative = LayerNorm { eps: -1.0, ..ln };
    assert!(be
        .rmsnorm_forward(&negative, &x, &w, &mut out, &mut rstd)
        .is_err());
    let up = tensor(&be, DType::F32, &[1.0; 5], "up");
    assert!(be.swiglu_forward(&x, &up, &mut out).is_err());
    let up16 = tensor(&be, DType::Bf16, &[1.0; 6], "up bf16");
    assert!(be.swiglu_forward(&x, &up16, &mut out).is_err());
}

#[test]
fn embedding_backward_is_bitwise_repeatable() {
    let be = CpuBackend::new(None, None);
    let (t, c, vocab, seq) = (97usize, 40usize, 13usize, 10usize);
    let mut rng = Rng::new(5);
    // Many repeats: 97 tokens over 13 ids, 10 positions.
    let ids: Vec<f32> = (0..t).map(|_| rng.below(vocab) as f32).collect();
    let ids = tensor(&be, DType::I32, &ids, "ids");
    for dtype in [DType::F32, DType::Bf16] {
        // Values of very different magnitudes, where a change of summation order shows.
        let g: Vec<f32> = rng
            .fill(t * c, 1.0)
            .iter()
            .enumerate()
            .map(|(i, x)| x * 10f32.powi((i % 7) as i32 - 3))
            .collect();
        let d_out = tensor(&be, dtype, &g, "d_out");
        let init_t = rng.fill(vocab * c, 1.0);
        let init_p = rng.fill(seq * c, 1.0);
        let mut runs = Vec::new();
        for _ in 0..3 {
            let mut d_table = tensor(&be, DType::F32, &init_t, "d_table");
            let mut d_pos = tensor(&be, DType::F32, &init_p, "d_positions");
            be.embedding_backward(&ids, &d_out, seq, &mut d_table, Some(&mut d_pos))
                .expect("backward");
            runs.push((bits(&be, &d_table), bits(&be, &d_pos)));
        }
        assert!(runs.windows(2).all(|w| w[0] == w[1]), "{dtype:?}");
        // And the sums are the token-order ones, element by element.
        let stored = be.read(&d_out).unwrap();
        let idv = be.read(&ids).unwrap();
        let mut want = init_t.clone();
        for tok in 0..t {
            for j in 0..c {
                want[idv[tok] as usize * c + j] += stored[tok * c + j];
            }
        }
        let want: Vec<u32> = want.iter().map(|x| x.to_bits()).collect();
        assert_eq!(
            runs[0].0, want,
            "{dtype:?}: d_table is not the token-order sum"
        );
    }
}

/// The references' gradients against central differences of their forwards: the
/// derivation of RMSNorm's backward (reference/layers.rs) and SiLU's derivative.
#[test]
fn reference_gradients_match_finite_differences() {
    let mut rng = Rng::new(9);
    let (t, c, eps) = (3usize, 7usize, 1e-5);
    let x: Vec<f32> = rng.fill(t * c, 2.0);
    let w: Vec<f32> = rng.fill(c, 1.0);
    let dy: Vec<f32> = rng.fill(t * c, 1.0);
    // L = sum(dy * out): dL/dx is the backward of dy, dL/dw its parameter gradient.
    let loss = |x: &[f32], w: &[f32]| -> f64 {
        let (out, _) = rl::rmsnorm_forward(x, w, c, eps);
        out.iter().zip(&dy).map(|(o, d)| o * *d as f64).sum()
    };
    let (_, rstd) = rl::rmsnorm_forward(&x, &w, c, eps);
    let mut dx = vec![0.0; t * c];
    rl::rmsnorm_backward(&x, &w, &dy, &rstd, c, &mut dx);
    let mut dw = vec![0.0; c];
    rl::rmsnorm_backward_params(&x, &dy, &rstd, c, &mut dw);
    let h = 1e-3f32;
    for i in 0..t * c {
        let (mut xp, mut xm) = (x.clone(), x.clone());
        xp[i] += h;
        xm[i] -= h;
        let fd = (loss(&xp, &w) - loss(&xm, &w)) / (xp[i] as f64 - xm[i] as f64);
        assert!(
            (fd - dx[i]).abs() < 1e-4 * (1.0 + dx[i].abs()),
            "dx[{i}]: {fd} vs {}",
            dx[i]
        );
    }
    for j in 0..c {
        let (mut wp, mut wm) = (w.clone(), w.clone());
        wp[j] += h;
        wm[j] -= h;
        let fd = (loss(&x, &wp) - loss(&x, &wm)) / (wp[j] as f64 - wm[j] as f64);
        assert!(
            (fd - dw[j]).abs() < 1e-4 * (1.0 + dw[j].abs()),
            "dw[{j}]: {fd} vs {}",
            dw[j]
        );
    }
    for g in [-30.0, -4.0, -1.0, -0.1, 0.0, 0.3, 2.0, 8.0] {
        let h = 1e-5;
        let fd = (rl::silu(g + h) - rl::silu(g - h)) / (2.0 * h);
        assert!((fd - rl::silu_grad(g)).abs() < 1e-8, "silu'({g})");
    }
    // The CPU backend's f32 SiLU has no NaN in either tail.
    for g in [-200.0f32, -90.0, 90.0, 200.0] {
        let (s, ds) = headroom::backend::cpu::silu_and_grad(g);
        assert!(
            s.is_finite() && ds.is_finite(),
            "silu({g}) = {s}, silu' = {ds}"
        );
        assert!(headroom::backend::cpu::silu(g).is_finite());
    }
}

/// Through the harness, as `headroom check` runs them: each new case's measured peak is its
/// analytic model (the sum of its buffers), to the byte.
#[test]
fn new_layer_cases_peak_equals_model() {
    let be: std::sync::Arc<dyn Backend> = std::sync::Arc::new(CpuBackend::new(None, None));
    let settings = headroom::harness::Settings {
        profile: headroom::techniques::Profile::Quick,
        budget: None,
        seed: 7,
    };
    let mut s = headroom::harness::Session::new(be, &settings, "test");
    for case in check_cases() {
        if !NEW_OPS.contains(&case.info().technique.as_str()) {
            continue;
        }
        let p = s.prepare(case.as_ref());
        let r = &p.record;
        assert_eq!(r.status, headroom::report::Status::Ok, "{}", r.id);
        let m = r.memory.as_ref().expect("memory measured");
        assert_eq!(m.peak_allocated, m.predicted, "{}", r.id);
    }
}
