//! The training step on the CPU backend: every checkpointing policy gives bitwise the
//! gradients of `none`, micro-batching gives the full-batch gradients within summation-order
//! rounding, and the measured peak equals the memory model for every policy combination.

use headroom::backend::cpu::CpuBackend;
use headroom::backend::Backend;
use headroom::dtype::DType;
use headroom::model::memory::{korthikanti_per_layer, model, saved_activations_per_layer};
use headroom::model::{Checkpoint, InitialValues, ModelShape, Policy, TrainState};
use headroom::rng::Rng;
use headroom::techniques::attention::Variant;

const SHAPE: ModelShape = ModelShape {
    layers: 4,
    hidden: 128,
    heads: 2,
    seq: 24,
    batch: 4,
    arch: headroom::model::Arch::GPT,
};

const CHECKPOINTS: [Checkpoint; 5] = [
    Checkpoint::None,
    Checkpoint::Full,
    Checkpoint::EveryK(2),
    Checkpoint::EveryK(3),
    Checkpoint::Selective,
];

fn init() -> InitialValues {
    InitialValues::random(&SHAPE, &mut Rng::new(42))
}

/// Runs forward+backward under `policy`; returns the gradients, the loss and the measured
/// peak (allocated bytes, from an empty tracker).
fn run(policy: Policy, init: &InitialValues) -> (Vec<Vec<Vec<f32>>>, f32, u64) {
    let be = CpuBackend::new(None, None);
    let mut st = TrainState::new(&be, SHAPE, policy, init).expect("fits");
    st.forward_backward(&be).expect("runs");
    let loss = st.loss(&be).unwrap();
    let grads = st.read_grads(&be).unwrap();
    let peak = be.memory().stats().peak_allocated;
    (grads, loss, peak)
}

fn policy(
    checkpoint: Checkpoint,
    attention: Variant,
    dtype: DType,
    micro_batches: usize,
) -> Policy {
    Policy {
        checkpoint,
        attention,
        dtype,
        micro_batches,
        head: headroom::model::HeadLoss::Materialized,
    }
}

#[test]
fn checkpointing_gives_bitwise_the_gradients_of_none() {
    let init = init();
    for attention in [Variant::Flash, Variant::Naive] {
        for dtype in [DType::F32, DType::Bf16] {
            let (want, want_loss, _) = run(policy(Checkpoint::None, attention, dtype, 1), &init);
            for cp in &CHECKPOINTS[1..] {
                let (got, loss, _) = run(policy(*cp, attention, dtype, 1), &init);
                assert_eq!(
                    loss.to_bits(),
                    want_loss.to_bits(),
                    "{cp:?} {attention:?} {dtype}"
                );
                for (l, (g, w)) in got.iter().zip(&want).enumerate() {
                    for (i, (a, b)) in g.iter().zip(w).enumerate() {
                        let same = a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits());
                        assert!(
                            same,
                            "{cp:?} {attention:?} {dtype}: layer {l} param {i} differs"
                        );
                    }
                }
            }
        }
    }
}

#[test]
fn micro_batches_add_up_to_the_full_batch() {
    let init = init();
    let (want, want_loss, _) = run(
        policy(Checkpoint::None, Variant::Flash, DType::F32, 1),
        &init,
    );
    for k in [2, 4] {
        let (got, loss, _) = run(
            policy(Checkpoint::None, Variant::Flash, DType::F32, k),
            &init,
        );
        // Summation order only: the loss and each gradient differ by f32 rounding of sums
        // of at most B·N terms, far below 1e-4 of the tensor's largest value.
        assert!(
            ((loss - want_loss) / want_loss).abs() < 1e-5,
            "loss {loss} vs {want_loss}"
        );
        let global = want
            .iter()
            .flatten()
            .flatten()
            .fold(0f32, |m, x| m.max(x.abs()));
        for (g, w) in got.iter().flatten().zip(want.iter().flatten()) {
            let scale = w.iter().fold(1e-3 * global, |m, x| m.max(x.abs()));
            let err = g.iter().zip(w).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
            assert!(
                err / scale < 1e-4,
                "micro-batches {k}: relative error {}",
                err / scale
            );
        }
    }
}

#[test]
fn bf16_stays_close_to_fp32() {
    let init = init();
    let (want, _, _) = run(
        policy(Checkpoint::None, Variant::Flash, DType::F32, 1),
        &init,
    );
    let (got, _, _) = run(
        policy(Checkpoint::None, Variant::Flash, DType::Bf16, 1),
        &init,
    );
    let global = want
        .iter()
        .flatten()
        .flatten()
        .fold(0f32, |m, x| m.max(x.abs()));
    let mut worst = 0f32;
    for (g, w) in got.iter().flatten().zip(want.iter().flatten()) {
        let scale = w.iter().fold(1e-3 * global, |m, x| m.max(x.abs()));
        let err = g.iter().zip(w).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
        worst = worst.max(err / scale);
    }
    // bf16 keeps 8 significant bits; see techniques::train for the 5e-2 tolerance.
    assert!(worst < 5e-2, "bf16 gradients off by {worst}");
    assert!(
        worst > 0.0,
        "bf16 cannot be exact: the bf16 path did not run"
    );
}

#[test]
fn peak_equals_the_model_for_every_policy() {
    let init = init();
    for cp in CHECKPOINTS {
        for attention in [Variant::Flash, Variant::Naive] {
            for dtype in [DType::F32, DType::Bf16] {
                for mb in [1, 2, 4] {
                    let p = policy(cp, attention, dtype, mb);
                    let (_, _, peak) = run(p, &init);
                    assert_eq!(peak, model(&SHAPE, &p).peak, "{}/{dtype}", p.name());
                }
            }
        }
    }
}

#[test]
fn checkpointing_saves_what_the_model_says() {
    let p = |cp| policy(cp, Variant::Flash, DType::Bf16, 1);
    let none = model(&SHAPE, &p(Checkpoint::None));
    let full = model(&SHAPE, &p(Checkpoint::Full));
    let sel = model(&SHAPE, &p(Checkpoint::Selective));
    assert!(full.peak < sel.peak && sel.peak < none.peak);
    // The fixed state does not change with the policy.
    assert_eq!(
        (none.weights, none.grads, none.optimizer),
        (full.weights, full.grads, full.optimizer)
    );
    // Naive attention's probabilities are what selective recomputation removes.
    let naive = |cp| model(&SHAPE, &policy(cp, Variant::Naive, DType::Bf16, 1)).peak;
    let per_layer_scores = (SHAPE.batch * SHAPE.heads * SHAPE.seq * SHAPE.seq * 2) as u64;
    assert!(
        naive(Checkpoint::None) - naive(Checkpoint::Selective)
            >= (SHAPE.layers as u64 - 1) * per_layer_scores
    );
}

#[test]
fn activations_per_layer_beside_korthikanti() {
    // GPT-2 small, one sequence of 1024 in bf16 with flash attention: 32·s·b·h bytes plus
    // 16·s·b of layernorm statistics and 4·a·s·b of logsumexp, against 34·s·b·h + 5·a·s²·b.
    let shape = ModelShape {
        layers: 12,
        hidden: 768,
        heads: 12,
        seq: 1024,
        batch: 1,
        arch: headroom::model::Arch::GPT,
    };
    let p = policy(Checkpoint::None, Variant::Flash, DType::Bf16, 1);
    let ours = saved_activations_per_layer(&shape, &p);
    let (s, h, a) = (1024u64, 768u64, 12u64);
    assert_eq!(ours, 32 * s * h + 16 * s + 4 * a * s);
    assert_eq!(
        korthikanti_per_layer(&shape, &p),
        34 * s * h + 5 * a * s * s
    );
    let naive = saved_activations_per_layer(
        &shape,
        &policy(Checkpoint::None, Variant::Naive, DType::Bf16, 1),
    );
    assert_eq!(naive, 32 * s * h + 16 * s + 2 * a * s * s);
}

/// At the benchmark's own sizes, where the CPU could not compute a step: the dry backend runs
/// the same schedule's allocations, and its peak must equal the model for every policy.
#[test]
fn peak_equals_the_model_at_full_size_on_the_dry_backend() {
    use headroom::backend::dry::DryBackend;
    let shapes = [
        ModelShape {
            layers: 12,
            hidden: 768,
            heads: 12,
            seq: 1024,
            batch: 8,
            arch: headroom::model::Arch::GPT,
        },
        ModelShape {
            layers: 24,
            hidden: 2048,
            heads: 16,
            seq: 2048,
            batch: 4,
            arch: headroom::model::Arch::GPT,
        },
    ];
    for shape in shapes {
        let init = InitialValues::unset();
        for cp in [
            Checkpoint::None,
            Checkpoint::Full,
            Checkpoint::sqrt_default(shape.layers),
            Checkpoint::Selective,
        ] {
            for attention in [Variant::Flash, Variant::Naive] {
                for dtype in [DType::F32, DType::Bf16] {
                    for mb in [1, 2, 4] {
                        let p = policy(cp, attention, dtype, mb);
                        let be = DryBackend::new(None);
                        let mut st = TrainState::new(&be, shape, p, &init).unwrap();
                        st.step(&be).unwrap();
                        drop(st);
                        let peak = be.memory().stats().peak_allocated;
                        assert_eq!(
                            peak,
                            model(&shape, &p).peak,
                            "{}/{dtype}/{}",
                            p.name(),
                            shape.name()
                        );
                        assert_eq!(be.memory().stats().allocated, 0, "everything is freed");
                    }
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// Validation of a training step: what it checks, and that it cannot pass a wrong gradient.

use headroom::backend::dry::DryBackend;
use headroom::techniques::mutation::{self, Mutation};
use headroom::techniques::train::{self as train_cases, grad_name, TrainCase};
use headroom::techniques::{untouched, Case, Instance, Readback, Validation};

/// The shape of `headroom check train`.
const CHECK: ModelShape = ModelShape {
    layers: 3,
    hidden: 128,
    heads: 2,
    seq: 33,
    batch: 2,
    arch: headroom::model::Arch::GPT,
};

/// Sets `case` up on a fresh CPU backend and validates it with `tamper`.
fn validate_with(
    case: &dyn Case,
    seed: u64,
    tamper: &mut dyn FnMut(Readback<'_>),
) -> (Validation, CpuBackend, Box<dyn Instance>) {
    let be = CpuBackend::new(None, None);
    let mut rng = Rng::new(seed);
    let mut inst = case.setup(&be, &mut rng).expect("sets up");
    let v = inst.validate(&be, &mut rng, tamper).expect("validates");
    (v, be, inst)
}

fn check<'a>(v: &'a Validation, name: &str) -> &'a headroom::techniques::TensorCheck {
    v.tensors
        .iter()
        .find(|t| t.name == name)
        .unwrap_or_else(|| panic!("no check named {name} in {:?}", names(v)))
}

fn names(v: &Validation) -> Vec<&str> {
    v.tensors.iter().map(|t| t.name.as_str()).collect()
}

#[test]
fn every_check_case_records_what_it_checked_and_passes() {
    // (error / bound, what) per dtype: fp32 first, then bf16.
    let mut worst = [(0f64, String::new()), (0f64, String::new())];
    for case in train_cases::check_cases() {
        let id = case.info().id.clone();
        let (v, _, _) = validate_with(case.as_ref(), 11, &mut untouched);
        assert!(v.passed(), "{id}: {}", v.detail);
        assert!(
            v.detail
                .contains("every gradient against the fp32 full-batch step")
                && v.detail.contains("directional derivative")
                && v.detail.contains("bitwise"),
            "{id}: the record must say what was checked: {}",
            v.detail
        );
        let (shape, _) = headroom::model::parse_train_id(&id).expect("a training id");
        for l in 0..shape.layers {
            for half in ["attention", "MLP"] {
                let d = check(&v, &format!("layer {l} {half} directional derivative"));
                assert!(d.tolerance <= 0.5 && d.tolerance > 0.0, "{id}: {d:?}");
                let ratio = d.error / d.tolerance;
                let w = &mut worst[usize::from(case.info().dtype == DType::Bf16)];
                if ratio > w.0 {
                    let what = format!("{id} layer {l} {half}: error {:.2e}", d.error);
                    *w = (ratio, format!("{what}: {}", d.worst));
                }
            }
            for p in 0..shape.layout().params.len() {
                check(&v, &grad_name(&shape, l, p));
            }
            assert!(
                v.tensors.iter().any(|t| t
                    .name
                    .starts_with(&format!("layer {l} gradients, bitwise vs"))),
                "{id}: {:?}",
                names(&v)
            );
        }
    }
    for (dtype, (ratio, what)) in ["fp32", "bf16"].iter().zip(&worst) {
        println!("{dtype}: largest directional error over its bound {ratio:.3} ({what})");
        assert!(*ratio < 0.5, "no margin left: {what}");
    }
}

fn policy_of(checkpoint: Checkpoint, attention: Variant, dtype: DType, mb: usize) -> Policy {
    policy(checkpoint, attention, dtype, mb)
}

/// Policies the mutation tests run under: the exact CPU comparison (fp32, one micro-batch),
/// and the bf16 and micro-batched ones whose reference tolerance is loose.
fn mutation_policies() -> [Policy; 3] {
    [
        policy_of(Checkpoint::None, Variant::Flash, DType::F32, 1),
        policy_of(Checkpoint::Full, Variant::Flash, DType::Bf16, 2),
        policy_of(Checkpoint::Selective, Variant::Naive, DType::Bf16, 1),
    ]
}

#[test]
fn every_mutation_of_one_gradient_fails_the_case_and_names_it() {
    for p in mutation_policies() {
        for reference_limit in [train_cases::REFERENCE_LIMIT, 0] {
            let case = TrainCase::with_reference_limit(CHECK, p, reference_limit);
            for m in Mutation::ALL {
                let target = grad_name(&CHECK, 1, 12); // layer 1 fc.weight.grad
                let mut changed = false;
                let (v, _, _) = validate_with(&case, 5, &mut |mut r: Readback<'_>| {
                    if r.name == target {
                        changed |= mutation::apply(m, &mut r);
                    }
                });
                assert!(changed, "{}: {m:?} changed nothing", case.info().id);
                assert!(
                    !v.passed(),
                    "{} (reference limit {reference_limit}): a gradient {} passed: {}",
                    case.info().id,
                    m.name(),
                    v.detail
                );
                assert!(
                    v.detail.contains("layer 1 fc.weight.grad"),
                    "{} {m:?}: the record must name the tensor: {}",
                    case.info().id,
                    v.detail
                );
            }
        }
    }
}

/// The directional check on its own, at a size where no reference step is run: a layer's
/// gradient zeroed or scaled by 1.05 fails that layer's probe and no other.
#[test]
fn the_directional_check_alone_catches_a_zeroed_or_scaled_layer() {
    for p in mutation_policies() {
        let case = TrainCase::with_reference_limit(CHECK, p, 0);
        type Corrupt = fn(&mut [f32]);
        let corruptions: [(&str, Corrupt); 3] = [
            ("zeroed", |g| g.iter_mut().for_each(|x| *x = 0.0)),
            ("scaled by 1.05", |g| g.iter_mut().for_each(|x| *x *= 1.05)),
            ("scaled by 0.95", |g| g.iter_mut().for_each(|x| *x *= 0.95)),
        ];
        for (what, corrupt) in corruptions {
            let (v, _, _) = validate_with(&case, 9, &mut |r: Readback<'_>| {
                if r.name.starts_with("layer 2 ") {
                    corrupt(r.values);
                }
            });
            assert!(
                !v.tensors.iter().any(|t| t.name.ends_with(".grad")),
                "limit 0 runs no reference comparison"
            );
            for half in ["attention", "MLP"] {
                let probe = check(&v, &format!("layer 2 {half} directional derivative"));
                assert!(
                    !probe.passed(),
                    "{}: a layer gradient {what} passed the directional check: {probe:?}",
                    case.info().id
                );
                for l in [0, 1] {
                    let name = format!("layer {l} {half} directional derivative");
                    let other = check(&v, &name);
                    assert!(other.passed(), "{}: {other:?}", case.info().id);
                }
            }
            assert!(!v.passed());
        }
    }
}

/// The split into an attention and an MLP probe resolves one small tensor: the q or k
/// weight gradient of one layer negated or transposed (a sign or layout slip in that one
/// tensor, about 2% of the attention probe's ⟨g, v⟩) fails the attention probe, with no
/// reference step and under bf16's bound. (What one probe cannot see is a single tensor
/// zeroed inside its half: the direction takes its signs from the gradient under test, so
/// the missing part drops out of both sides; the reference step and the attention family's
/// own checks cover that, see `techniques::train`.)
#[test]
fn the_attention_probe_alone_catches_a_negated_or_transposed_query_or_key_gradient() {
    let c = CHECK.hidden;
    type Corrupt = fn(&mut [f32], usize);
    let corruptions: [(&str, Corrupt); 2] = [
        ("negated", |g, _| g.iter_mut().for_each(|x| *x = -*x)),
        ("transposed", |g, c| {
            let t: Vec<f32> = (0..c * c).map(|i| g[(i % c) * c + i / c]).collect();
            g.copy_from_slice(&t);
        }),
    ];
    for p in mutation_policies() {
        let case = TrainCase::with_reference_limit(CHECK, p, 0);
        for param in [2, 4] {
            for (what, corrupt) in corruptions {
                let target = grad_name(&CHECK, 0, param);
                let (v, _, _) = validate_with(&case, 21, &mut |r: Readback<'_>| {
                    if r.name == target {
                        corrupt(r.values, c);
                    }
                });
                let probe = check(&v, "layer 0 attention directional derivative");
                let id = &case.info().id;
                assert!(!probe.passed(), "{id} {target} {what}: {probe:?}");
                assert!(check(&v, "layer 0 MLP directional derivative").passed());
            }
        }
    }
}

/// A check that passes a wrong gradient must be impossible: a zeroed layer gives
/// ⟨g, v⟩ = 0, an error of exactly 1 against the measured difference, and no probe's bound
/// is ever looser than 1/2, whatever the loss does.
#[test]
fn a_zeroed_gradient_can_never_pass_the_directional_check() {
    for p in mutation_policies() {
        let case = TrainCase::with_reference_limit(CHECK, p, 0);
        for seed in [1, 2, 3] {
            let (v, _, _) = validate_with(&case, seed, &mut |r: Readback<'_>| {
                r.values.iter_mut().for_each(|x| *x = 0.0)
            });
            for l in 0..CHECK.layers {
                for half in ["attention", "MLP"] {
                    let probe = check(&v, &format!("layer {l} {half} directional derivative"));
                    assert_eq!(probe.error, 1.0, "{probe:?}");
                    assert!(probe.tolerance <= 0.5, "{probe:?}");
                    assert!(!probe.passed());
                }
            }
        }
    }
}

/// The probes leave the state as they found it: master weights, bf16 copies, gradients and
/// optimizer moments bitwise as before; and they do move the loss through the masters.
#[test]
fn the_probes_restore_the_weights_exactly() {
    for dtype in [DType::F32, DType::Bf16] {
        let p = policy_of(Checkpoint::None, Variant::Flash, dtype, 1);
        let be = CpuBackend::new(None, None);
        let init = InitialValues::random(&CHECK, &mut Rng::new(3));
        let mut st = TrainState::new(&be, CHECK, p, &init).unwrap();
        st.forward_backward(&be).unwrap();
        let read_all = |st: &TrainState| -> Vec<Vec<f32>> {
            st.params
                .master
                .iter()
                .chain(&st.params.bf16)
                .chain(&st.grads)
                .chain(&st.m)
                .chain(&st.v)
                .flatten()
                .map(|t| be.read(t).unwrap())
                .collect()
        };
        let before = read_all(&st);
        let grads = st.read_grads(&be).unwrap();
        let checks = train_cases::directional_checks(&mut st, &be, &grads, 17).unwrap();
        assert_eq!(checks.len(), 2 * CHECK.layers);
        assert!(checks.iter().all(|c| c.passed()), "{checks:?}");
        assert!(
            read_all(&st) == before,
            "{dtype}: the probes changed the state"
        );
        // The probe's loss follows the master weights, and is the step's loss in f64.
        let host: Vec<Vec<f32>> = st.inputs.iter().map(|t| be.read(t).unwrap()).collect();
        let l0 = st.probe_loss(&be, &host).unwrap();
        let saved = be.read(&st.params.master[1][12]).unwrap();
        let moved: Vec<f32> = saved.iter().map(|x| x * 1.01).collect();
        be.write(&mut st.params.master[1][12], &moved).unwrap();
        assert_ne!(
            st.probe_loss(&be, &host).unwrap(),
            l0,
            "the probe reads the masters"
        );
        be.write(&mut st.params.master[1][12], &saved).unwrap();
        assert_eq!(st.probe_loss(&be, &host).unwrap().to_bits(), l0.to_bits());
        let step_loss = st.loss(&be).unwrap() as f64;
        assert!((l0 - step_loss).abs() / l0 < 1e-3, "{l0} vs {step_loss}");
    }
}

/// At the benchmark's sizes the probes' forward passes and the full-checkpointing step the
/// validation compares against allocate no more than the case's own step: the case's
/// measured peak (setup and validation) stays the model's.
#[test]
fn the_validation_fits_under_the_step_at_full_size_on_the_dry_backend() {
    let shapes = [
        ModelShape {
            layers: 12,
            hidden: 768,
            heads: 12,
            seq: 1024,
            batch: 8,
            arch: headroom::model::Arch::GPT,
        },
        ModelShape {
            layers: 24,
            hidden: 2048,
            heads: 16,
            seq: 2048,
            batch: 4,
            arch: headroom::model::Arch::GPT,
        },
        CHECK,
    ];
    for shape in shapes {
        for cp in [
            Checkpoint::None,
            Checkpoint::Full,
            Checkpoint::sqrt_default(shape.layers),
            Checkpoint::EveryK(2),
            Checkpoint::Selective,
        ] {
            for attention in [Variant::Flash, Variant::Naive] {
                for dtype in [DType::F32, DType::Bf16] {
                    for mb in [1, 2, 4] {
                        if shape.batch % mb != 0 {
                            continue;
                        }
                        let p = policy(cp, attention, dtype, mb);
                        let be = DryBackend::new(None);
                        let mut st =
                            TrainState::new(&be, shape, p, &InitialValues::unset()).unwrap();
                        let micro = shape.batch / mb * shape.seq * shape.hidden;
                        let host = vec![vec![0f32; micro]; mb];
                        st.probe_loss(&be, &host).unwrap();
                        let full = policy(Checkpoint::Full, attention, dtype, mb);
                        if model(&shape, &full).peak <= model(&shape, &p).peak {
                            st.forward_backward_with(&be, Checkpoint::Full).unwrap();
                        }
                        let peak = be.memory().stats().peak_allocated;
                        assert!(
                            peak <= model(&shape, &p).peak,
                            "{}/{dtype}/{}: validation peaks at {peak}, the step at {}",
                            p.name(),
                            shape.name(),
                            model(&shape, &p).peak
                        );
                    }
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// The memory timeline of one step.

#[test]
fn the_timeline_is_one_step_from_the_live_state_with_its_phases() {
    for p in [
        policy_of(Checkpoint::None, Variant::Flash, DType::Bf16, 1),
        policy_of(Checkpoint::Full, Variant::Naive, DType::F32, 2),
        policy_of(Checkpoint::EveryK(2), Variant::Flash, DType::Bf16, 1),
    ] {
        let case = TrainCase::new(CHECK, p);
        let (v, be, mut inst) = validate_with(&case, 4, &mut untouched);
        assert!(v.passed(), "{}", v.detail);
        let live = be.memory().stats().allocated;
        let tl = inst
            .timeline(&be)
            .unwrap()
            .expect("a training case draws one");
        let id = &case.info().id;
        assert_eq!(tl.peak(), case.info().predicted_peak_bytes, "{id}");
        let first: u64 = tl.points[0].iter().sum();
        assert_eq!(first, live, "{id}: the first point is what was live");
        let last: u64 = tl.points.last().unwrap().iter().sum();
        assert_eq!(last, live, "{id}: the step frees what it allocates");
        for cat in [
            "weights",
            "grads",
            "optimizer",
            "inputs",
            "activations",
            "workspace",
        ] {
            assert!(tl.categories.iter().any(|c| c == cat), "{id}: {cat}");
        }
        let labels: Vec<&str> = tl.phases.iter().map(|(_, l)| l.as_str()).collect();
        let want: Vec<String> = if p.micro_batches == 1 {
            vec!["forward".into(), "backward".into(), "optimizer".into()]
        } else {
            (1..=p.micro_batches)
                .flat_map(|j| {
                    [
                        format!("forward {j}/{}", p.micro_batches),
                        format!("backward {j}/{}", p.micro_batches),
                    ]
                })
                .chain(["optimizer".to_string()])
                .collect()
        };
        assert_eq!(labels, want, "{id}");
        let at: Vec<usize> = tl.phases.iter().map(|(i, _)| *i).collect();
        assert!(at.windows(2).all(|w| w[0] < w[1]), "{id}: {at:?}");
        assert_eq!(at[0], 0, "{id}: the step starts with the forward");
        assert!(*at.last().unwrap() < tl.points.len(), "{id}");
        // The optimizer allocates nothing: the last phase adds no point.
        assert_eq!(*at.last().unwrap(), tl.points.len() - 1, "{id}");
        // It survives the report's JSON, and an old record without phases still reads.
        let json = serde_json::to_string(&tl).unwrap();
        let back: headroom::report::Timeline = serde_json::from_str(&json).unwrap();
        assert_eq!(back, tl);
        let old = r#"{"categories":["weights"],"points":[[4]]}"#;
        let old: headroom::report::Timeline = serde_json::from_str(old).unwrap();
        assert!(old.phases.is_empty());
    }
}
