//! The LM head and its cross-entropy: every variant against the f64 reference, the variants
//! against each other, the memory model against the measured peak (to the byte), and the
//! validation against corrupted outputs.

use headroom::backend::cpu::CpuBackend;
use headroom::backend::{Backend, Tensor};
use headroom::dtype::DType;
use headroom::model::head::{self, HeadLoss, HeadShape, IGNORE_INDEX};
use headroom::rng::Rng;
use headroom::techniques::loss::{self as family, LossCase};
use headroom::techniques::mutation::Mutation;
use headroom::techniques::{untouched, Case};

mod common;
use common::validate;

fn shape(tokens: usize, hidden: usize, vocab: usize) -> HeadShape {
    HeadShape {
        tokens,
        hidden,
        vocab,
    }
}

#[test]
fn every_check_case_passes_on_the_cpu() {
    let cases = family::check_cases();
    assert_eq!(cases.len(), 12);
    // Six seeds, as the bounds were measured.
    for (case, seed) in cases.iter().flat_map(|c| (1..=6).map(move |s| (c, s))) {
        let be = CpuBackend::new(None, None);
        let mut rng = Rng::new(seed);
        let mut inst = case.setup(&be, &mut rng).expect("setup");
        let v = inst
            .validate(&be, &mut rng, &mut untouched)
            .expect("validation runs");
        assert!(v.passed(), "{} seed {seed}: {}", case.info().id, v.detail);
        let names: Vec<&str> = v.tensors.iter().map(|t| t.name.as_str()).collect();
        assert_eq!(
            names,
            ["loss", "lse", "d_hidden", "d_weight"],
            "{}",
            case.info().id
        );
        // Every element of every output compared (small cases are checked whole).
        let s = case.info();
        let (t, c, vv) = (67usize, 96usize, 1031usize);
        if s.shape == format!("t{t}-c{c}-v{vv}") {
            assert_eq!(v.compared, 1 + t + t * c + vv * c, "{}", s.id);
        }
    }
}

#[test]
fn the_ids_name_the_variant() {
    let ids: Vec<String> = family::check_cases()
        .iter()
        .map(|c| c.info().id.clone())
        .collect();
    assert!(ids.contains(&"loss/materialized/bf16/t67-c96-v1031".to_string()));
    assert!(ids.contains(&"loss/chunked/f32/t33-c72-v515".to_string()));
    assert!(ids.contains(&"loss/fused/bf16/t67-c96-v1031".to_string()));
    assert_eq!(HeadLoss::parse("fused").unwrap(), HeadLoss::Fused);
    assert_eq!(
        HeadLoss::parse("chunked-7").unwrap(),
        HeadLoss::Chunked { rows: 7 }
    );
    assert_eq!(
        HeadLoss::parse("chunked").unwrap(),
        HeadLoss::Chunked {
            rows: HeadLoss::DEFAULT_CHUNK_ROWS
        }
    );
    assert!(HeadLoss::parse("chunked-0").is_err());
    assert!(HeadLoss::parse("eager").is_err());
}

/// The head's inputs and outputs on one backend.
struct Run {
    loss: f32,
    lse: Vec<f32>,
    d_hidden: Vec<f32>,
    d_weight: Vec<f32>,
    /// Peak allocated bytes above the inputs and outputs.
    head_peak: u64,
}

fn run_head(be: &CpuBackend, dt: DType, variant: HeadLoss, s: HeadShape, seed: u64) -> Run {
    let mut rng = Rng::new(seed);
    let (t, c, v) = (s.tokens, s.hidden, s.vocab);
    let mut tensor = |dt: DType, len: usize, range: f32, tag: &str| -> Tensor {
        let (x, _) =
            headroom::techniques::random_tensor(be, &mut rng, dt, len, range, tag).expect("alloc");
        x
    };
    let hidden = tensor(dt, t * c, 2.0, "hidden");
    let weight = tensor(dt, v * c, 6.0 / (c as f32).sqrt(), "weight");
    let mut d_weight = tensor(DType::F32, v * c, 1e-3, "d_weight");
    let ys: Vec<f32> = (0..t)
        .map(|i| {
            if i % 7 == 3 {
                IGNORE_INDEX as f32
            } else {
                ((i * 7919) % v) as f32
            }
        })
        .collect();
    let mut targets = be.alloc(DType::I32, t, "targets").unwrap();
    be.write(&mut targets, &ys).unwrap();
    let mut loss = be.alloc(DType::F32, 1, "loss").unwrap();
    be.write(&mut loss, &[0.0]).unwrap();
    let mut d_hidden = be.alloc(dt, t * c, "d_hidden").unwrap();
    be.poison(&mut d_hidden).unwrap();
    let base = be.memory().stats().allocated;
    be.memory().reset_peak();
    let scale = 1.0 / t as f32;
    let saved = head::head_forward(
        be, dt, variant, s, &hidden, &weight, &targets, scale, &mut loss,
    )
    .expect("forward");
    let lse = be.read(saved.lse()).unwrap();
    head::head_backward(
        be,
        dt,
        variant,
        s,
        &hidden,
        &weight,
        &targets,
        scale,
        saved,
        &mut d_hidden,
        &mut d_weight,
    )
    .expect("backward");
    let stats = be.memory().stats();
    assert_eq!(stats.allocated, base, "the head frees everything it made");
    Run {
        loss: be.read(&loss).unwrap()[0],
        lse,
        d_hidden: be.read(&d_hidden).unwrap(),
        d_weight: be.read(&d_weight).unwrap(),
        head_peak: stats.peak_allocated - base,
    }
}

/// max |a − b| over max |b|.
fn rel(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len());
    let scale = b.iter().fold(0f64, |m, &x| m.max((x as f64).abs()));
    let err = a
        .iter()
        .zip(b)
        .fold(0f64, |m, (&x, &y)| m.max((x as f64 - y as f64).abs()));
    assert!(err.is_finite() && scale > 0.0);
    err / scale
}

/// The three variants compute the same loss and gradients: bitwise-near in fp32; in bf16
/// within the rounding of dlogits to bf16 (materialized and chunked store them, fused keeps
/// them in f32), 2^-8 of an element, well inside 1%.
#[test]
fn the_variants_agree() {
    let be = CpuBackend::new(None, None);
    for (dt, bound) in [(DType::F32, 2e-5), (DType::Bf16, 1e-2)] {
        let s = shape(45, 40, 777);
        let m = run_head(&be, dt, HeadLoss::Materialized, s, 9);
        for variant in [
            HeadLoss::Chunked { rows: 8 },
            HeadLoss::Chunked { rows: 64 },
            HeadLoss::Fused,
        ] {
            let o = run_head(&be, dt, variant, s, 9);
            let what = format!("{} {dt}", variant.name());
            assert!(
                ((o.loss - m.loss) / m.loss).abs() < 1e-5,
                "{what}: loss {} vs {}",
                o.loss,
                m.loss
            );
            assert!(rel(&o.lse, &m.lse) < 1e-6, "{what}: lse");
            assert!(
                rel(&o.d_hidden, &m.d_hidden) < bound,
                "{what}: d_hidden {}",
                rel(&o.d_hidden, &m.d_hidden)
            );
            assert!(
                rel(&o.d_weight, &m.d_weight) < bound,
                "{what}: d_weight {}",
                rel(&o.d_weight, &m.d_weight)
            );
            // Ignored rows: log-sum-exp 0 and no gradient.
            assert_eq!(o.lse[3], 0.0, "{what}");
            assert!(
                o.d_hidden[3 * 40..4 * 40].iter().all(|&x| x == 0.0),
                "{what}"
            );
        }
    }
}

/// The head's measured peak equals its ledger to the byte, for every variant, dtype and a
/// chunk that does or does not divide the tokens; and each case's measured peak over setup
/// and validation equals its model.
#[test]
fn peak_is_the_ledger_to_the_byte() {
    let be = CpuBackend::new(None, None);
    for dt in [DType::F32, DType::Bf16] {
        for variant in [
            HeadLoss::Materialized,
            HeadLoss::Chunked { rows: 10 },
            HeadLoss::Chunked { rows: 12 },
            HeadLoss::Chunked { rows: 100 },
            HeadLoss::Fused,
        ] {
            let s = shape(60, 24, 301);
            let r = run_head(&be, dt, variant, s, 3);
            assert_eq!(
                r.head_peak,
                head::peak_bytes(dt, variant, s),
                "{variant:?} {dt}"
            );
        }
    }
    for case in family::check_cases() {
        let be = CpuBackend::new(None, None);
        be.memory().reset_peak();
        let mut rng = Rng::new(1);
        let mut inst = case.setup(&be, &mut rng).unwrap();
        inst.validate(&be, &mut rng, &mut untouched).unwrap();
        inst.run(&be).unwrap();
        assert_eq!(
            be.memory().stats().peak_allocated,
            case.info().predicted_peak_bytes,
            "{}",
            case.info().id
        );
    }
}

/// The fused head holds O(T) bytes whatever V: its log-sum-exp; the materialized one O(T·V).
#[test]
fn fused_logits_bytes_do_not_grow_with_the_vocabulary() {
    for dt in [DType::F32, DType::Bf16] {
        let small = shape(8192, 4096, 32000);
        let large = shape(8192, 4096, 128256);
        assert_eq!(head::peak_bytes(dt, HeadLoss::Fused, small), 4 * 8192);
        assert_eq!(head::peak_bytes(dt, HeadLoss::Fused, large), 4 * 8192);
        // Materialized: lse, then the f32 logits and dlogits in the compute dtype together.
        let (t, v) = (8192u64, 128256u64);
        assert_eq!(
            head::peak_bytes(dt, HeadLoss::Materialized, large),
            4 * t + 4 * t * v + dt.size() as u64 * t * v
        );
        // Chunked: bounded by the chunk, not by T.
        let chunk = HeadLoss::Chunked { rows: 1024 };
        let p = head::peak_bytes(dt, chunk, large);
        assert!(p < 1024 * v * 8 + 4 * t + 1024 * 4096 * 8, "{p}");
    }
}

/// A target outside the vocabulary (and not the ignore index) is an error, not a read out of
/// bounds.
#[test]
fn a_target_outside_the_vocabulary_is_an_error() {
    let be = CpuBackend::new(None, None);
    let (t, c, v) = (3, 4, 5);
    let hidden = be.alloc(DType::F32, t * c, "hidden").unwrap();
    let weight = be.alloc(DType::F32, v * c, "weight").unwrap();
    let mut targets = be.alloc(DType::I32, t, "targets").unwrap();
    be.write(&mut targets, &[0.0, 5.0, 1.0]).unwrap();
    let mut lse = be.alloc(DType::F32, t, "lse").unwrap();
    let mut loss = be.alloc(DType::F32, 1, "loss").unwrap();
    let e = be
        .fused_cross_entropy_forward(
            &hidden,
            &weight,
            &targets,
            IGNORE_INDEX,
            1.0,
            &mut lse,
            &mut loss,
        )
        .unwrap_err();
    assert!(e.to_string().contains("outside the vocabulary"), "{e}");
    let logits = be.alloc(DType::F32, t * v, "logits").unwrap();
    assert!(be
        .cross_entropy_forward(&logits, &targets, IGNORE_INDEX, 1.0, &mut lse, &mut loss)
        .is_err());
    // Wrong shapes are refused with a sentence too.
    let short = be.alloc(DType::F32, t - 1, "short lse").unwrap();
    let mut dl = be.alloc(DType::F32, t * v, "dlogits").unwrap();
    assert!(be
        .cross_entropy_backward(&logits, &targets, IGNORE_INDEX, 1.0, &short, &mut dl)
        .is_err());
}

/// Each output corrupted each way fails validation and is named as the worst tensor.
#[test]
fn corrupted_outputs_are_caught_and_named() {
    for dt in [DType::F32, DType::Bf16] {
        for variant in [
            HeadLoss::Materialized,
            HeadLoss::Chunked { rows: 16 },
            HeadLoss::Fused,
        ] {
            let case = LossCase::new(variant, dt, shape(67, 96, 1031));
            let id = &case.info().id;
            let (control, _) = validate(&case, "", None);
            assert!(control.passed(), "{id}: {}", control.detail);
            for target in ["loss", "lse", "d_hidden", "d_weight"] {
                for m in Mutation::ALL {
                    let (v, changed) = validate(&case, target, Some(m));
                    if m == Mutation::SwapRows && target == "loss" {
                        assert!(!changed, "{id}: the loss has one element");
                        continue;
                    }
                    assert!(changed, "{id}: {} left {target} unchanged", m.name());
                    assert!(
                        !v.passed(),
                        "{id}: {target} {} passed: {}",
                        m.name(),
                        v.detail
                    );
                    assert!(
                        v.detail.starts_with(&format!("worst tensor {target} (")),
                        "{id}: {target} {} was blamed on another tensor: {}",
                        m.name(),
                        v.detail
                    );
                }
            }
        }
    }
}

/// The registry's cases are well formed: CPU cases small enough to run here, GPU cases
/// whose model says what their logits cost.
#[test]
fn registry_cases() {
    use headroom::backend::BackendKind;
    use headroom::techniques::Profile;
    let cpu = family::cases(Profile::Quick, BackendKind::Cpu);
    assert_eq!(cpu.len(), 3);
    let gpu = family::cases(Profile::Quick, BackendKind::Cuda);
    let peak = |name: &str| {
        gpu.iter()
            .find(|c| c.info().id == format!("loss/{name}/bf16/t8192-c4096-v128256"))
            .map(|c| c.info().predicted_peak_bytes)
            .expect("case")
    };
    // On an 80 GB card all three fit; the materialized one needs 6.3 GB more than fused.
    assert!(peak("materialized") < 80_000_000_000);
    assert!(peak("materialized") - peak("fused") > 6_000_000_000);
    assert!(peak("chunked") < peak("materialized"));
    for c in gpu.iter().chain(&cpu) {
        let i = c.info();
        assert!(i.flops > 0.0 && i.bytes_moved > 0.0, "{}", i.id);
    }
}

/// The CPU's benchmark cases validate and their measured peak is their model.
#[test]
fn cpu_benchmark_cases_pass_at_their_model() {
    use headroom::backend::BackendKind;
    use headroom::techniques::Profile;
    for case in family::cases(Profile::Full, BackendKind::Cpu) {
        let be = CpuBackend::new(None, None);
        be.memory().reset_peak();
        let mut rng = Rng::new(2);
        let mut inst = case.setup(&be, &mut rng).unwrap();
        let v = inst.validate(&be, &mut rng, &mut untouched).unwrap();
        assert!(v.passed(), "{}: {}", case.info().id, v.detail);
        assert_eq!(
            be.memory().stats().peak_allocated,
            case.info().predicted_peak_bytes,
            "{}",
            case.info().id
        );
    }
}

/// At the GPU cases' size, on the dry backend (allocations only): each variant's peak is its
/// ledger to the byte, with 8192 tokens in 1024-row chunks and in chunks that do not divide
/// them.
#[test]
fn dry_peak_is_the_ledger_at_gpu_sizes() {
    use headroom::backend::dry::DryBackend;
    let s = shape(8192, 4096, 128256);
    for dt in [DType::Bf16, DType::F32] {
        for variant in [
            HeadLoss::Materialized,
            HeadLoss::Chunked { rows: 1024 },
            HeadLoss::Chunked { rows: 1000 },
            HeadLoss::Fused,
        ] {
            let be = DryBackend::new(None);
            let (t, c, v) = (s.tokens, s.hidden, s.vocab);
            let hidden = be.alloc(dt, t * c, "hidden").unwrap();
            let weight = be.alloc(dt, v * c, "weight").unwrap();
            let targets = be.alloc(DType::I32, t, "targets").unwrap();
            let mut loss = be.alloc(DType::F32, 1, "loss").unwrap();
            let mut dh = be.alloc(dt, t * c, "d_hidden").unwrap();
            let mut dw = be.alloc(DType::F32, v * c, "d_weight").unwrap();
            let base = be.memory().stats().allocated;
            be.memory().reset_peak();
            let saved = head::head_forward(
                &be, dt, variant, s, &hidden, &weight, &targets, 1.0, &mut loss,
            )
            .unwrap();
            head::head_backward(
                &be, dt, variant, s, &hidden, &weight, &targets, 1.0, saved, &mut dh, &mut dw,
            )
            .unwrap();
            let peak = be.memory().stats().peak_allocated - base;
            assert_eq!(peak, head::peak_bytes(dt, variant, s), "{variant:?} {dt}");
            assert_eq!(be.memory().stats().allocated, base);
        }
    }
}
