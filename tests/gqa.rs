//! Grouped-query attention (Ainslie et al. 2023): K and V with fewer heads than Q, query head
//! h reading kv head h / (H / Hkv). Its check cases pass on the CPU with peak == model; flash
//! and naive (K/V repeated, dK/dV reduced) agree; kv_heads == heads is the multi-head path
//! bit for bit; a corrupted dK or dV of a GQA case fails validation naming it; `repeat_kv`
//! and `reduce_kv` do what they say.

use headroom::backend::cpu::CpuBackend;
use headroom::backend::dry::DryBackend;
use headroom::backend::{AttentionGrads, AttentionShape, Backend, BackendKind, Epi, Matmul};
use headroom::backend::{MatmulKernel, Tensor};
use headroom::dtype::DType;
use headroom::rng::Rng;
use headroom::techniques::attention::{
    cases, gqa_check_cases, model_peak_bytes, AttentionCase, Pass, Variant,
};
use headroom::techniques::mutation::Mutation;
use headroom::techniques::{random_tensor, untouched, Case, Profile};

mod common;
use common::validate;

/// Values of scale `range` from `rng`, rounded to `dt`, in a new tensor.
fn random(
    be: &dyn Backend,
    rng: &mut Rng,
    dt: DType,
    len: usize,
    range: f32,
) -> (Tensor, Vec<f32>) {
    random_tensor(be, rng, dt, len, range, "input").expect("alloc")
}

#[test]
fn gqa_check_cases_pass_on_the_cpu_with_peak_equal_to_the_model() {
    let be = CpuBackend::new(None, None);
    let mut rng = Rng::new(5);
    let all = gqa_check_cases(BackendKind::Cpu);
    // Groups of 2 and 4 and multi-query attention, both variants, both dtypes, causal and not.
    assert_eq!(all.len(), 3 * 2 * 2 * 2);
    for case in &all {
        let id = &case.info().id;
        assert!(id.contains("-kv"), "{id} names no kv heads");
        be.memory().reset_peak();
        let base = be.memory().stats().allocated;
        let mut inst = case.setup(&be, &mut rng).expect("setup");
        let v = inst
            .validate(&be, &mut rng, &mut untouched)
            .expect("validation runs");
        assert!(v.passed(), "{id}: {}", v.detail);
        let peak = be.memory().stats().peak_allocated - base;
        assert_eq!(peak, case.info().predicted_peak_bytes, "{id}");
    }
}

/// At GPU sizes on the dry backend (shapes checked, nothing computed): every GQA case, check
/// and benchmark, allocates exactly its model.
#[test]
fn gqa_cases_allocate_their_model_at_gpu_sizes() {
    let be = DryBackend::new(None);
    let mut rng = Rng::new(6);
    let bench: Vec<Box<dyn Case>> = cases(Profile::Full, BackendKind::Dry)
        .into_iter()
        .filter(|c| c.info().id.contains("-kv"))
        .collect();
    assert_eq!(bench.len(), 3, "the GPU benchmark's GQA cases");
    for case in bench.iter().chain(&gqa_check_cases(BackendKind::Dry)) {
        let id = &case.info().id;
        be.memory().reset_peak();
        let base = be.memory().stats().allocated;
        let mut inst = case.setup(&be, &mut rng).expect("setup");
        inst.run(&be).expect("run");
        let peak = be.memory().stats().peak_allocated - base;
        assert_eq!(peak, case.info().predicted_peak_bytes, "{id}");
    }
}

/// The naive path pays for the repeated K/V (and per-head dK/dV) that flash does not.
#[test]
fn the_memory_model_counts_kv_heads_and_the_naive_copies() {
    let mha = AttentionShape::new(2, 8, 256, 64, false);
    let gqa = mha.with_kv_heads(2);
    let (l, lkv) = (mha.qkv_len() as u64 * 2, gqa.kv_len() as u64 * 2);
    assert_eq!(gqa.kv_len() * 4, gqa.qkv_len());
    let flash = |s: &AttentionShape| {
        model_peak_bytes(Variant::Flash, Pass::ForwardBackward, s, DType::Bf16)
    };
    let naive = |s: &AttentionShape| {
        model_peak_bytes(Variant::Naive, Pass::ForwardBackward, s, DType::Bf16)
    };
    // K, V, dK, dV shrink from query size to kv size.
    assert_eq!(flash(&mha) - flash(&gqa), 4 * (l - lkv));
    // Naive keeps the smaller K, V, dK, dV but adds four query-sized copies.
    assert_eq!(naive(&gqa), naive(&mha) - 4 * (l - lkv) + 4 * l);
}

#[test]
fn ids_stay_stable_and_gqa_ids_name_the_kv_heads() {
    let mha = AttentionShape::new(1, 8, 300, 64, true);
    assert_eq!(mha.with_kv_heads(8), mha);
    let id = |s| {
        AttentionCase::new(Variant::Flash, Pass::ForwardBackward, DType::Bf16, s)
            .info()
            .id
            .clone()
    };
    assert_eq!(
        id(mha),
        "attention/flash/bf16/fwd+bwd/b1-h8-n300-d64-causal"
    );
    assert_eq!(id(mha.with_kv_heads(8)), id(mha));
    assert_eq!(
        id(mha.with_kv_heads(2)),
        "attention/flash/bf16/fwd+bwd/b1-h8-n300-d64-causal-kv2"
    );
}

#[test]
fn kv_heads_that_do_not_divide_the_heads_are_refused_with_a_sentence() {
    let be = CpuBackend::new(None, None);
    let s = AttentionShape::new(1, 6, 16, 64, false).with_kv_heads(4);
    let why = s.check_kv_heads().unwrap_err();
    assert!(
        why.contains("divide") && why.contains('6') && why.contains('4'),
        "{why}"
    );
    assert!(AttentionShape::new(1, 6, 16, 64, false)
        .with_kv_heads(0)
        .check_kv_heads()
        .is_err());
    let case = AttentionCase::new(Variant::Flash, Pass::Forward, DType::F32, s);
    let err = case.setup(&be, &mut Rng::new(1)).err().expect("refused");
    assert!(err.to_string().contains("divide"), "{err}");
    // The ops refuse it too, and K/V of the wrong size.
    let q = be.alloc(DType::F32, s.qkv_len(), "Q").unwrap();
    let mut kv = be.alloc(DType::F32, s.qkv_len() * 4 / 6, "K").unwrap();
    assert!(be.repeat_kv(&s, &kv, &mut q.clone_shape(&be)).is_err());
    let s2 = s.with_kv_heads(2);
    let wrong = be.alloc(DType::F32, s2.qkv_len(), "K").unwrap();
    let err = be.reduce_kv(&s2, &wrong, &mut kv).unwrap_err();
    assert!(err.to_string().contains("kv heads"), "{err}");
}

/// Helper: a fresh tensor the size of `t`.
trait CloneShape {
    fn clone_shape(&self, be: &dyn Backend) -> Tensor;
}
impl CloneShape for Tensor {
    fn clone_shape(&self, be: &dyn Backend) -> Tensor {
        be.alloc(self.dtype(), self.len(), "copy").expect("alloc")
    }
}

#[test]
fn repeat_kv_and_reduce_kv_round_trip() {
    let be = CpuBackend::new(None, None);
    let mut rng = Rng::new(2);
    for dt in [DType::F32, DType::Bf16] {
        for (heads, kv_heads) in [(4, 2), (8, 2), (4, 1), (3, 3)] {
            let s = AttentionShape::new(2, heads, 5, 64, false).with_kv_heads(kv_heads);
            let g = s.group();
            let (src, sv) = random(&be, &mut rng, dt, s.kv_len(), 1.0);
            let mut rep = be.alloc(dt, s.qkv_len(), "repeated").unwrap();
            be.repeat_kv(&s, &src, &mut rep).unwrap();
            let rv = be.read(&rep).unwrap();
            let per = s.seq * s.head_dim;
            for bh in 0..s.rows() {
                // Query head h of batch b reads kv head h / G of batch b.
                let (b, h) = (bh / heads, bh % heads);
                let kh = b * kv_heads + h / g;
                assert_eq!(
                    rv[bh * per..(bh + 1) * per],
                    sv[kh * per..(kh + 1) * per],
                    "{dt:?} h{heads} kv{kv_heads}: query head {bh}"
                );
            }
            // Summing G equal copies is G times the value: exact for G a power of two
            // (and for G = 3 in f32 at these magnitudes it is within one rounding).
            let mut back = be.alloc(dt, s.kv_len(), "reduced").unwrap();
            be.reduce_kv(&s, &rep, &mut back).unwrap();
            let bv = be.read(&back).unwrap();
            for (x, y) in bv.iter().zip(&sv) {
                assert_eq!(*x, dt.round(*y * g as f32), "{dt:?} h{heads} kv{kv_heads}");
            }
            // reduce_kv of distinct heads is their sum in head order.
            let (parts, pv) = random(&be, &mut rng, dt, s.qkv_len(), 1.0);
            be.reduce_kv(&s, &parts, &mut back).unwrap();
            let bv = be.read(&back).unwrap();
            for kh in 0..s.batch * kv_heads {
                for e in 0..per {
                    let mut acc = 0f32;
                    for bh in kh * g..(kh + 1) * g {
                        acc += pv[bh * per + e];
                    }
                    assert_eq!(bv[kh * per + e], dt.round(acc));
                }
            }
        }
    }
}

/// Flash and naive forward+backward over the backend's ops on one GQA problem.
struct Outs {
    o: Vec<f32>,
    lse: Option<Vec<f32>>,
    dq: Vec<f32>,
    dk: Vec<f32>,
    dv: Vec<f32>,
}

struct Inputs {
    q: Tensor,
    k: Tensor,
    v: Tensor,
    d_o: Tensor,
}

fn inputs(be: &dyn Backend, s: &AttentionShape, dt: DType, seed: u64) -> Inputs {
    let mut rng = Rng::new(seed);
    Inputs {
        q: random(be, &mut rng, dt, s.qkv_len(), 2.0).0,
        k: random(be, &mut rng, dt, s.kv_len(), 2.0).0,
        v: random(be, &mut rng, dt, s.kv_len(), 1.0).0,
        d_o: random(be, &mut rng, dt, s.qkv_len(), 1.0).0,
    }
}

fn flash(be: &dyn Backend, s: &AttentionShape, x: &Inputs) -> Outs {
    let dt = x.q.dtype();
    let mut o = be.alloc(dt, s.qkv_len(), "O").unwrap();
    let mut lse = be.alloc(DType::F32, s.stats_len(), "lse").unwrap();
    let mut delta = be.alloc(DType::F32, s.stats_len(), "delta").unwrap();
    let mut dq = be.alloc(dt, s.qkv_len(), "dQ").unwrap();
    let mut dk = be.alloc(dt, s.kv_len(), "dK").unwrap();
    let mut dv = be.alloc(dt, s.kv_len(), "dV").unwrap();
    be.flash_attention_forward(s, &x.q, &x.k, &x.v, &mut o, &mut lse)
        .unwrap();
    let g = AttentionGrads {
        delta: &mut delta,
        dq: &mut dq,
        dk: &mut dk,
        dv: &mut dv,
    };
    be.flash_attention_backward(s, &x.q, &x.k, &x.v, &o, &x.d_o, &lse, g)
        .unwrap();
    Outs {
        o: be.read(&o).unwrap(),
        lse: Some(be.read(&lse).unwrap()),
        dq: be.read(&dq).unwrap(),
        dk: be.read(&dk).unwrap(),
        dv: be.read(&dv).unwrap(),
    }
}

/// Eager attention: K/V repeated, the N x N products materialized, dK/dV reduced per group.
fn naive(be: &dyn Backend, s: &AttentionShape, x: &Inputs) -> Outs {
    let dt = x.q.dtype();
    let (n, d) = (s.seq, s.head_dim);
    let kern = match dt {
        DType::Bf16 => MatmulKernel::Mma,
        _ => MatmulKernel::Simt,
    };
    let bmm = |m, nn, k, ta, tb, alpha| {
        let mut mm = Matmul::new(m, nn, k).transposed(ta, tb).batched(s.rows());
        mm.alpha = alpha;
        mm
    };
    let mut kr = be.alloc(dt, s.qkv_len(), "K repeated").unwrap();
    let mut vr = be.alloc(dt, s.qkv_len(), "V repeated").unwrap();
    be.repeat_kv(s, &x.k, &mut kr).unwrap();
    be.repeat_kv(s, &x.v, &mut vr).unwrap();
    let mut p = be.alloc(dt, s.scores_len(), "P").unwrap();
    let mut o = be.alloc(dt, s.qkv_len(), "O").unwrap();
    be.matmul(
        kern,
        &bmm(n, n, d, false, true, s.scale),
        &x.q,
        &kr,
        Epi::none(),
        &mut p,
    )
    .unwrap();
    be.softmax_forward(s, &mut p).unwrap();
    be.matmul(
        kern,
        &bmm(n, d, n, false, false, 1.0),
        &p,
        &vr,
        Epi::none(),
        &mut o,
    )
    .unwrap();
    let mut dp = be.alloc(dt, s.scores_len(), "dP").unwrap();
    let mut delta = be.alloc(DType::F32, s.stats_len(), "delta").unwrap();
    let mut dq = be.alloc(dt, s.qkv_len(), "dQ").unwrap();
    let mut dkr = be.alloc(dt, s.qkv_len(), "dK per head").unwrap();
    let mut dvr = be.alloc(dt, s.qkv_len(), "dV per head").unwrap();
    be.matmul(
        kern,
        &bmm(n, d, n, true, false, 1.0),
        &p,
        &x.d_o,
        Epi::none(),
        &mut dvr,
    )
    .unwrap();
    be.matmul(
        kern,
        &bmm(n, n, d, false, true, 1.0),
        &x.d_o,
        &vr,
        Epi::none(),
        &mut dp,
    )
    .unwrap();
    be.attention_delta(s, &o, &x.d_o, &mut delta).unwrap();
    be.softmax_backward(s, &p, &mut dp, &delta).unwrap();
    be.matmul(
        kern,
        &bmm(n, d, n, false, false, s.scale),
        &dp,
        &kr,
        Epi::none(),
        &mut dq,
    )
    .unwrap();
    be.matmul(
        kern,
        &bmm(n, d, n, true, false, s.scale),
        &dp,
        &x.q,
        Epi::none(),
        &mut dkr,
    )
    .unwrap();
    let mut dk = be.alloc(dt, s.kv_len(), "dK").unwrap();
    let mut dv = be.alloc(dt, s.kv_len(), "dV").unwrap();
    be.reduce_kv(s, &dkr, &mut dk).unwrap();
    be.reduce_kv(s, &dvr, &mut dv).unwrap();
    Outs {
        o: be.read(&o).unwrap(),
        lse: None,
        dq: be.read(&dq).unwrap(),
        dk: be.read(&dk).unwrap(),
        dv: be.read(&dv).unwrap(),
    }
}

/// max |a - b| over the RMS of b.
fn rel_err(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len());
    let rms = (b.iter().map(|x| (*x as f64).powi(2)).sum::<f64>() / b.len() as f64).sqrt();
    let max = a
        .iter()
        .zip(b)
        .map(|(x, y)| (*x as f64 - *y as f64).abs())
        .fold(0f64, f64::max);
    max / rms
}

#[test]
fn flash_and_naive_agree_on_gqa() {
    let be = CpuBackend::new(None, None);
    for (heads, kv_heads) in [(4, 2), (8, 2), (4, 1)] {
        for causal in [false, true] {
            let s = AttentionShape::new(1, heads, 65, 64, causal).with_kv_heads(kv_heads);
            let x = inputs(&be, &s, DType::F32, 7);
            let (f, nv) = (flash(&be, &s, &x), naive(&be, &s, &x));
            for (name, a, b) in [
                ("O", &f.o, &nv.o),
                ("dQ", &f.dq, &nv.dq),
                ("dK", &f.dk, &nv.dk),
                ("dV", &f.dv, &nv.dv),
            ] {
                let e = rel_err(a, b);
                assert!(
                    e < 1e-4,
                    "h{heads} kv{kv_heads} causal {causal}: {name} off by {e:.2e}"
                );
            }
        }
    }
}

/// kv_heads == heads is the multi-head shape itself; and a GQA problem's forward and dQ are,
/// bit for bit, multi-head attention on K/V repeated by `repeat_kv` (so the kv-head indexing
/// adds nothing but the index), its dK/dV that problem's dK/dV summed per group.
#[test]
fn gqa_with_kv_equal_heads_is_bitwise_the_existing_path() {
    let be = CpuBackend::new(None, None);
    for dt in [DType::F32, DType::Bf16] {
        for causal in [false, true] {
            let mha = AttentionShape::new(1, 4, 65, 64, causal);
            // Group of one: repeat_kv and reduce_kv are copies, flash is unchanged.
            let x = inputs(&be, &mha, dt, 9);
            let mut copy = x.k.clone_shape(&be);
            be.repeat_kv(&mha, &x.k, &mut copy).unwrap();
            assert_eq!(be.read(&copy).unwrap(), be.read(&x.k).unwrap());
            be.reduce_kv(&mha, &x.v, &mut copy).unwrap();
            assert_eq!(be.read(&copy).unwrap(), be.read(&x.v).unwrap());
            let a = flash(&be, &mha.with_kv_heads(4), &x);
            let b = flash(&be, &mha, &x);
            for (name, p, q) in [
                ("O", &a.o, &b.o),
                ("dK", &a.dk, &b.dk),
                ("dV", &a.dv, &b.dv),
            ] {
                assert!(bitwise(p, q), "{dt:?}: {name} differs at kv_heads == heads");
            }

            let gqa = mha.with_kv_heads(2);
            let x = inputs(&be, &gqa, dt, 10);
            let mut kr = x.q.clone_shape(&be);
            let mut vr = x.q.clone_shape(&be);
            be.repeat_kv(&gqa, &x.k, &mut kr).unwrap();
            be.repeat_kv(&gqa, &x.v, &mut vr).unwrap();
            let xr = Inputs {
                q: copy_of(&be, &x.q),
                k: kr,
                v: vr,
                d_o: copy_of(&be, &x.d_o),
            };
            let g = flash(&be, &gqa, &x);
            let m = flash(&be, &mha, &xr);
            assert!(bitwise(&g.o, &m.o), "{dt:?} causal {causal}: O");
            assert!(
                bitwise(g.lse.as_ref().unwrap(), m.lse.as_ref().unwrap()),
                "lse"
            );
            assert!(bitwise(&g.dq, &m.dq), "{dt:?} causal {causal}: dQ");
            // dK/dV: GQA sums the group in one f32 accumulator, the multi-head path rounds
            // each head first, so they agree to G + 1 roundings of the parts, not bitwise.
            let (mut dk, mut dv) = (x.k.clone_shape(&be), x.v.clone_shape(&be));
            let mut t = xr.q.clone_shape(&be);
            be.write(&mut t, &m.dk).unwrap();
            be.reduce_kv(&gqa, &t, &mut dk).unwrap();
            be.write(&mut t, &m.dv).unwrap();
            be.reduce_kv(&gqa, &t, &mut dv).unwrap();
            let eps = if dt == DType::F32 {
                2f32.powi(-20)
            } else {
                2f32.powi(-8)
            };
            let per = gqa.seq * gqa.head_dim;
            for (name, got, want, parts) in [("dK", &g.dk, &dk, &m.dk), ("dV", &g.dv, &dv, &m.dv)] {
                let want = be.read(want).unwrap();
                for (e, (a, b)) in got.iter().zip(&want).enumerate() {
                    let (kh, r) = (e / per, e % per);
                    let mass: f32 = (0..2).map(|h| parts[(kh * 2 + h) * per + r].abs()).sum();
                    let bound = 3.0 * eps * mass + 1e-6;
                    assert!(
                        (a - b).abs() <= bound,
                        "{dt:?} causal {causal}: {name}[{e}] {a} vs {b} (bound {bound:.2e})"
                    );
                }
            }
        }
    }
}

fn bitwise(a: &[f32], b: &[f32]) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits())
}

fn copy_of(be: &dyn Backend, t: &Tensor) -> Tensor {
    let mut c = t.clone_shape(be);
    be.copy(&mut c, t).unwrap();
    c
}

/// dK and dV of a GQA case are kv-head sized: every mutation of them fails naming them.
fn assert_kv_grads_caught(case: &dyn Case) {
    let id = &case.info().id;
    let (control, _) = validate(case, "", None);
    assert!(
        control.passed(),
        "{id}: the untouched run fails: {}",
        control.detail
    );
    for target in ["dK", "dV"] {
        for m in Mutation::ALL {
            let (v, changed) = validate(case, target, Some(m));
            assert!(changed, "{id}: {} left {target} unchanged", m.name());
            assert!(
                !v.passed(),
                "{id}: {target} {} passed: {}",
                m.name(),
                v.detail
            );
            let blamed = |name: &str| v.detail.starts_with(&format!("worst tensor {name} ("));
            assert!(
                blamed(target) || blamed(&format!("{target} column sums")),
                "{id}: {target} {} was blamed on another tensor: {}",
                m.name(),
                v.detail
            );
        }
    }
}

#[test]
fn gqa_dk_and_dv_mutations_are_caught() {
    for variant in [Variant::Flash, Variant::Naive] {
        for dtype in [DType::F32, DType::Bf16] {
            let shape = AttentionShape::new(1, 4, 65, 64, true).with_kv_heads(2);
            assert_kv_grads_caught(&AttentionCase::new(
                variant,
                Pass::ForwardBackward,
                dtype,
                shape,
            ));
        }
    }
}

/// Above 1024 rows validation samples key rows of each sampled kv head (multi-query here:
/// one kv head read by both query heads).
#[test]
fn gqa_dk_and_dv_mutations_are_caught_where_validation_samples() {
    for variant in [Variant::Flash, Variant::Naive] {
        let shape = AttentionShape::new(1, 2, 1100, 64, true).with_kv_heads(1);
        assert_kv_grads_caught(&AttentionCase::new(
            variant,
            Pass::ForwardBackward,
            DType::Bf16,
            shape,
        ));
    }
}
