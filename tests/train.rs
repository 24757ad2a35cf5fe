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
        },
        ModelShape {
            layers: 24,
            hidden: 2048,
            heads: 16,
            seq: 2048,
            batch: 4,
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
