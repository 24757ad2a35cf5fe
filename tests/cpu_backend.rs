//! The CPU backend runs every case and pins each case's measured peak to its analytic model,
//! to the byte.

use std::sync::Arc;

use headroom::backend::cpu::CpuBackend;
use headroom::backend::{AttentionShape, Backend, BackendKind};
use headroom::dtype::DType;
use headroom::harness::{Session, Settings};
use headroom::report::Status;
use headroom::techniques::attention::{model_peak_bytes, AttentionCase, Pass, Variant};
use headroom::techniques::{check_cases, registry, Case, Profile};

fn session(budget: Option<u64>) -> Session {
    let be: Arc<dyn Backend> = Arc::new(CpuBackend::new(budget, None));
    let settings = Settings {
        profile: Profile::Quick,
        budget,
        seed: 7,
    };
    Session::new(be, &settings, "test")
}

#[test]
fn every_check_case_passes_and_peak_equals_model() {
    let mut s = session(None);
    let mut ran = 0;
    for case in check_cases(BackendKind::Cpu) {
        let p = s.prepare(case.as_ref());
        let r = &p.record;
        match &r.status {
            Status::Skipped(why) => {
                // Only the GPU-only kernels may be skipped on the CPU, and they say why.
                assert!(
                    [
                        "cublas",
                        "wgmma",
                        "wgmma-banded",
                        "wgmma-wide",
                        "wgmma-cluster",
                        "wgmma-tma-store"
                    ]
                    .contains(&r.technique.as_str())
                        || headroom::backend::FlashForward::ALTERNATIVES
                            .iter()
                            .any(|k| k.technique() == r.technique)
                        || headroom::backend::FlashBackward::ALTERNATIVES
                            .iter()
                            .any(|k| k.technique() == r.technique),
                    "{} skipped: {why}",
                    r.id
                );
                continue;
            }
            Status::Ok => {}
            other => panic!("{}: {other:?}", r.id),
        }
        let m = r.memory.as_ref().expect("memory measured");
        assert_eq!(
            m.peak_allocated, m.predicted,
            "{}: measured peak vs model",
            r.id
        );
        assert_eq!(
            m.peak_reserved, m.predicted,
            "{}: direct allocation reserves what it allocates",
            r.id
        );
        ran += 1;
    }
    assert!(ran > 50, "only {ran} cases ran");
}

#[test]
fn every_benchmark_case_peak_equals_model() {
    let mut s = session(None);
    for profile in [Profile::Quick, Profile::Full] {
        for case in registry(profile, BackendKind::Cpu) {
            let p = s.prepare(case.as_ref());
            let r = &p.record;
            if let Status::Skipped(_) = r.status {
                continue;
            }
            assert_eq!(r.status, Status::Ok, "{}", r.id);
            let m = r.memory.as_ref().unwrap();
            assert_eq!(m.peak_allocated, m.predicted, "{}", r.id);
        }
    }
}

#[test]
fn budget_turns_naive_attention_into_oom_exactly_at_its_model() {
    let shape = AttentionShape::new(1, 2, 96, 64, false);
    let naive = AttentionCase::new(Variant::Naive, Pass::ForwardBackward, DType::Bf16, shape);
    let flash = AttentionCase::new(Variant::Flash, Pass::ForwardBackward, DType::Bf16, shape);
    let need = model_peak_bytes(Variant::Naive, Pass::ForwardBackward, &shape, DType::Bf16);

    // Exactly the model fits...
    let r = session(Some(need)).prepare(&naive).record;
    assert_eq!(r.status, Status::Ok, "{:?}", r.status);
    // ...one byte less does not, while flash goes on.
    let mut tight = session(Some(need - 1));
    let r = tight.prepare(&naive).record;
    match &r.status {
        Status::Oom(msg) => {
            assert!(
                msg.starts_with("out of memory: tried to allocate "),
                "{msg}"
            );
            assert!(
                msg.contains("allocated;") && msg.contains("reserved; budget "),
                "{msg}"
            );
        }
        other => panic!("expected oom, got {other:?}"),
    }
    let r = tight.prepare(&flash).record;
    assert_eq!(r.status, Status::Ok, "{:?}", r.status);
    // Nothing leaked from the failed case: the tracker is back at zero.
    assert_eq!(tight.backend.memory().stats().allocated, 0);
}

/// Measured after setup (every buffer of the call is allocated there), at lengths where the
/// N² term dominates: naive grows ~4x per doubling of N, flash 2x.
#[test]
fn naive_peak_grows_quadratically_and_flash_linearly() {
    let be = CpuBackend::new(None, None);
    let measure = |variant, n| {
        let shape = AttentionShape::new(1, 1, n, 64, false);
        let case = AttentionCase::new(variant, Pass::ForwardBackward, DType::Bf16, shape);
        be.memory().reset_peak();
        let mut rng = headroom::rng::Rng::new(3);
        let inst = case.setup(&be, &mut rng).expect("fits");
        let peak = be.memory().stats().peak_allocated;
        assert_eq!(peak, case.info().predicted_peak_bytes);
        drop(inst);
        peak as f64
    };
    let naive = measure(Variant::Naive, 4096) / measure(Variant::Naive, 2048);
    let flash = measure(Variant::Flash, 4096) / measure(Variant::Flash, 2048);
    assert!((3.5..4.0).contains(&naive), "naive grew {naive}x");
    assert!((flash - 2.0).abs() < 1e-9, "flash grew {flash}x");
}

#[test]
fn case_ids_are_stable_and_unique() {
    for kind in [BackendKind::Cpu, BackendKind::Cuda] {
        for profile in [Profile::Quick, Profile::Full] {
            let ids: Vec<String> = registry(profile, kind)
                .iter()
                .map(|c| c.info().id.clone())
                .collect();
            let mut sorted = ids.clone();
            sorted.sort();
            sorted.dedup();
            assert_eq!(
                sorted.len(),
                ids.len(),
                "duplicate ids in {profile:?}/{kind:?}"
            );
        }
        let ids: Vec<String> = check_cases(kind)
            .iter()
            .map(|c| c.info().id.clone())
            .collect();
        let mut sorted = ids.clone();
        sorted.sort();
        sorted.dedup();
        assert_eq!(sorted.len(), ids.len(), "duplicate check ids on {kind:?}");
    }
    // Ids other reports are compared by: changing one of these breaks comparisons across
    // versions, so it must be deliberate.
    let gpu: Vec<String> = registry(Profile::Full, BackendKind::Cuda)
        .iter()
        .map(|c| c.info().id.clone())
        .collect();
    for id in [
        "copy/vec16/f32/n268435456",
        "matmul/mma/bf16/m4096-n4096-k4096",
        "matmul/cublas/f32/m8192-n8192-k8192",
        "matmul/wgmma/bf16/m8192-n16384-k4096",
        "attention/flash/bf16/fwd/b2-h16-n8192-d128",
        "attention/flash/bf16/fwd+bwd/b2-h16-n8192-d128-causal",
        "attention/naive/bf16/fwd+bwd/b1-h16-n32768-d128",
    ] {
        assert!(gpu.iter().any(|g| g == id), "{id} is no longer registered");
    }
}

/// Each alternative flash forward is its own technique, benchmarked beside the standard
/// forward on the very same shapes (same id but for the technique), checked at the same
/// tile edges as the others, and skipped on the CPU with a sentence naming it.
#[test]
fn every_alternative_flash_forward_stands_beside_the_standard_one() {
    use headroom::backend::FlashForward;
    let gpu: Vec<String> = registry(Profile::Quick, BackendKind::Cuda)
        .iter()
        .map(|c| c.info().id.clone())
        .collect();
    let checks: Vec<(String, String)> = check_cases(BackendKind::Cuda)
        .iter()
        .map(|c| (c.info().technique.clone(), c.info().id.clone()))
        .collect();
    let mut techniques = Vec::new();
    // The check cases of technique t, by shape (the id without its technique).
    let shapes_of = |t: &str| {
        let mut shapes: Vec<String> = checks
            .iter()
            .filter(|(tech, _)| tech == t)
            .map(|(_, id)| id.replacen(&format!("attention/{t}/"), "", 1))
            .collect();
        shapes.sort();
        shapes
    };
    let mut check_shapes: Option<Vec<String>> = None;
    for kernel in FlashForward::ALTERNATIVES {
        let t = kernel.technique();
        techniques.push(t);
        let prefix = format!("attention/{t}/bf16/fwd/");
        let alt: Vec<&String> = gpu.iter().filter(|id| id.starts_with(&prefix)).collect();
        assert!(alt.len() >= 12, "{t}: {} bench cases", alt.len());
        for id in alt {
            let twin = id.replacen(&format!("attention/{t}/"), "attention/flash/", 1);
            assert!(gpu.contains(&twin), "{id} has no standard twin {twin}");
        }
        let mine = shapes_of(t);
        assert!(
            mine.iter().any(|s| s.contains("-n1000-d128-causal-kv1")),
            "{t}: no MQA check"
        );
        // 2 x 32 heads x 8 query tiles = 512 > 3 x 148: the persistent grid's blocks each take
        // several tiles, and the last head (always validated) comes late in a block's walk.
        assert!(
            mine.iter().filter(|s| s.contains("b2-h32-n1000-")).count() >= 3,
            "{t}: no check with several query tiles per SM"
        );
        for n in [
            "-n1-", "-n127-", "-n128-", "-n129-", "-n255-", "-n257-", "-n1000-",
        ] {
            assert!(mine.iter().any(|s| s.contains(n)), "{t}: no {n} check");
        }
        match &check_shapes {
            None => check_shapes = Some(mine),
            Some(first) => assert_eq!(first, &mine, "{t} checks other shapes"),
        }
        let why = CpuBackend::new(None, None)
            .flash_forward_available(kernel)
            .expect_err("no alternative runs on the CPU");
        assert!(why.contains(t), "{why}");
    }
    techniques.sort();
    techniques.dedup();
    assert_eq!(techniques.len(), FlashForward::ALTERNATIVES.len());
    assert!(CpuBackend::new(None, None)
        .flash_forward_available(FlashForward::Standard)
        .is_ok());
}

/// Each alternative flash backward is its own technique: benchmarked beside the standard flash
/// forward+backward on the alternative forwards' shapes (same id but for the technique),
/// checked on the alternative forwards' check shapes (every gradient), and skipped on the CPU
/// with a sentence naming it.
#[test]
fn every_alternative_flash_backward_stands_beside_the_standard_one() {
    use headroom::backend::{FlashBackward, FlashForward};
    let gpu: Vec<String> = registry(Profile::Quick, BackendKind::Cuda)
        .iter()
        .map(|c| c.info().id.clone())
        .collect();
    let checks: Vec<(String, String)> = check_cases(BackendKind::Cuda)
        .iter()
        .map(|c| (c.info().technique.clone(), c.info().id.clone()))
        .collect();
    let shapes_of = |t: &str, pass: &str| {
        let mut shapes: Vec<String> = checks
            .iter()
            .filter(|(tech, id)| tech == t && id.contains(&format!("/{pass}/")))
            .map(|(_, id)| id.replacen(&format!("attention/{t}/bf16/{pass}/"), "", 1))
            .collect();
        shapes.sort();
        shapes
    };
    let forward_shapes = shapes_of(FlashForward::Wgmma.technique(), "fwd");
    assert!(!forward_shapes.is_empty());
    for kernel in FlashBackward::ALTERNATIVES {
        let t = kernel.technique();
        let prefix = format!("attention/{t}/bf16/fwd+bwd/");
        let alt: Vec<&String> = gpu.iter().filter(|id| id.starts_with(&prefix)).collect();
        assert!(alt.len() >= 12, "{t}: {} bench cases", alt.len());
        for id in alt {
            let twin = id.replacen(&format!("attention/{t}/"), "attention/flash/", 1);
            assert!(gpu.contains(&twin), "{id} has no standard twin {twin}");
        }
        assert_eq!(
            shapes_of(t, "fwd+bwd"),
            forward_shapes,
            "{t} checks other shapes"
        );
        let why = CpuBackend::new(None, None)
            .flash_backward_available(kernel)
            .expect_err("no alternative runs on the CPU");
        assert!(why.contains(t), "{why}");
        // On the CPU its cases exist and are skipped with that reason.
        let cpu: Vec<_> = check_cases(BackendKind::Cpu)
            .into_iter()
            .filter(|c| c.info().technique == t)
            .collect();
        assert!(!cpu.is_empty(), "{t}: no CPU check case");
        let be = CpuBackend::new(None, None);
        for c in &cpu {
            let skip = c.skip_reason(&be).expect("skipped on the CPU");
            assert!(skip.contains(t), "{}: {skip}", c.info().id);
        }
    }
    assert!(CpuBackend::new(None, None)
        .flash_backward_available(FlashBackward::Standard)
        .is_ok());
}

#[test]
fn validation_catches_a_wrong_result() {
    // A poisoned output that the run never overwrites must fail, not pass.
    use headroom::techniques::Comparison;
    let mut c = Comparison::new(DType::F32);
    c.all_finite("out", &[1.0, f32::NAN]);
    c.add("out", &|| "out[0]".into(), 1.0, 1.0);
    let v = c.finish();
    assert!(!v.passed());
    assert!(v.error.is_infinite());
    assert!(v.detail.starts_with("worst tensor out ("), "{}", v.detail);
    let mut c = Comparison::new(DType::F32);
    c.add("out", &|| "out[0]".into(), 1.01, 1.0);
    assert!(!c.finish().passed());
}

#[test]
fn headline_longest_sequence_fits_and_the_next_does_not() {
    use headroom::techniques::attention::headline;
    let be = CpuBackend::new(None, None);
    let budget = 1 << 20;
    let rows = headline(
        &be,
        budget,
        DType::Bf16,
        1,
        64,
        &mut headroom::rng::Rng::new(5),
    );
    assert_eq!(rows.len(), 2);
    for h in &rows {
        assert!(
            h.model_bytes_at_longest <= budget && h.model_bytes_one_more > budget,
            "{h:?}"
        );
        assert_eq!(h.run_at_longest, "ok", "{h:?}");
        assert!(
            h.run_one_more
                .starts_with("oom (out of memory: tried to allocate"),
            "{h:?}"
        );
    }
    let (naive, flash) = (&rows[0], &rows[1]);
    assert_eq!(
        (naive.variant.as_str(), flash.variant.as_str()),
        ("naive", "flash")
    );
    // Linear against quadratic: flash trains much longer sequences (the gap widens with the budget).
    assert!(
        flash.longest_seq > 2 * naive.longest_seq,
        "{flash:?} vs {naive:?}"
    );
    // The run restored the tracker's own (absent) budget.
    assert_eq!(be.memory().budget(), None);
}

/// HEADROOM_ALLOCATOR's allocator decides every case's reserved figure: PyTorch-style
/// caching packs small buffers into 2 MiB segments, while allocated stays the model's.
#[test]
fn a_caching_allocator_reserves_whole_segments() {
    use headroom::alloc::{AllocatorSpec, SimulatedSpace};
    let be: Arc<dyn Backend> = Arc::new(CpuBackend::new(None, None));
    let spec = AllocatorSpec::parse("caching").unwrap();
    be.memory()
        .set_allocator(spec.build(Box::new(SimulatedSpace::new(1 << 30))));
    let settings = Settings {
        profile: Profile::Quick,
        budget: None,
        seed: 9,
    };
    let mut s = Session::new(be.clone(), &settings, "test");
    assert_eq!(s.report.allocator.as_deref(), Some("caching"));
    let case = check_cases(BackendKind::Cpu)
        .into_iter()
        .find(|c| c.info().id == "matmul/simt/f32/m127-n257-k131")
        .unwrap();
    let r = s.prepare(case.as_ref()).record;
    assert_eq!(r.status, Status::Ok);
    let m = r.memory.unwrap();
    assert_eq!(m.peak_allocated, m.predicted);
    // A, B and C are each under 1 MiB: one 2 MiB segment holds them all.
    assert_eq!(m.peak_reserved, 2 << 20);
    assert_eq!(be.memory().stats().allocated, 0);
}
