//! Sharded training on simulated ranks (the CPU backend, one thread per rank, in-process
//! collectives): every strategy gives the same updated weights as one rank running the
//! global batch; every rank's measured peak equals the per-rank model to the byte; the
//! model reproduces the ZeRO paper's figures; and the dry backend holds the model at worlds
//! of up to 1024 ranks.

use headroom::backend::cpu::CpuBackend;
use headroom::backend::dry::DryBackend;
use headroom::backend::Backend;
use headroom::model::{Checkpoint, InitialValues, ModelShape, Policy, TrainState};
use headroom::rng::Rng;
use headroom::shard::memory::{model, model_states, StateWidths};
use headroom::shard::step::{RankState, World};
use headroom::shard::{ShardSpec, Solo, Strategy, Traffic};
use headroom::techniques::attention::Variant;
use headroom::DType;

fn shape(batch: usize) -> ModelShape {
    ModelShape {
        layers: 3,
        hidden: 64,
        heads: 1,
        seq: 16,
        batch,
        arch: headroom::model::Arch::GPT,
    }
}

fn policy(checkpoint: Checkpoint, attention: Variant, dtype: DType, micro: usize) -> Policy {
    Policy {
        checkpoint,
        attention,
        dtype,
        micro_batches: micro,
        head: headroom::model::HeadLoss::Materialized,
    }
}

/// A world of `spec.world` CPU ranks after one step, with every rank's measured peak.
fn run_world(
    shape: ModelShape,
    policy: Policy,
    spec: ShardSpec,
    init: &InitialValues,
) -> (World, CpuBackend, Vec<u64>, Vec<Traffic>) {
    let be = CpuBackend::new(None, None);
    let mut world = World::new(&be, shape, policy, spec, init).expect("world");
    world.step(&be).expect("a sharded step");
    let peaks = world
        .backends(&be)
        .iter()
        .map(|b| b.memory().stats().peak_allocated)
        .collect();
    let traffic = world.take_traffic();
    (world, be, peaks, traffic)
}

/// The single-rank step on the same global batch, as `world · k` micro-batches.
fn reference(shape: ModelShape, policy: Policy, world: usize, init: &InitialValues) -> TrainState {
    let be = CpuBackend::new(None, None);
    let p = Policy {
        micro_batches: policy.micro_batches * world,
        ..policy
    };
    let mut st = TrainState::new(&be, shape, p, init).expect("reference state");
    st.step(&be).expect("reference step");
    // The state's tensors are host memory: they outlive the backend value.
    st
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

/// Every rank's master weights after the step, element by element, against the
/// reference's: bitwise where `exact`, else within `rel` of the tensor's largest weight.
fn compare_weights(
    (world, be0): (&World, &CpuBackend),
    reference: &TrainState,
    exact: bool,
    rel: f64,
    what: &str,
) {
    let be = CpuBackend::new(None, None);
    let backends = world.backends(be0);
    for (r, rank) in world.ranks.iter().enumerate() {
        let rb = backends[r];
        for (l, layer) in reference.params.master.iter().enumerate() {
            for (i, want) in layer.iter().enumerate() {
                let want = be.read(want).unwrap();
                let got = rank.units.read_master(rb, l, i).unwrap();
                let scale = want.iter().fold(0f64, |m, x| m.max(x.abs() as f64));
                for (j, (g, w)) in got.iter().zip(&want).enumerate() {
                    if g.is_nan() {
                        continue; // another rank owns this element
                    }
                    if exact {
                        assert_eq!(
                            g.to_bits(),
                            w.to_bits(),
                            "{what}: rank {r} layer {l} param {i}[{j}]: {g} vs {w}"
                        );
                    } else {
                        assert!(
                            ((g - w).abs() as f64) <= rel * scale,
                            "{what}: rank {r} layer {l} param {i}[{j}]: {g} vs {w}"
                        );
                    }
                }
                if let Some(full) = rank.units.read_full(rb, l, i).unwrap() {
                    // A replicated compute copy is the same bits on every rank.
                    let first = world.ranks[0].units.read_full(backends[0], l, i);
                    assert_eq!(
                        bits(&full),
                        bits(&first.unwrap().unwrap()),
                        "{what}: rank {r}'s replica of layer {l} param {i} differs from rank 0's"
                    );
                }
            }
        }
        // Every element of every master is owned by some rank.
        let _ = rank;
    }
}

#[test]
fn every_strategy_updates_weights_as_one_rank_does() {
    let mut rng = Rng::new(11);
    let sh = shape(12);
    let init = InitialValues::random(&sh, &mut rng);
    let cases = [
        policy(Checkpoint::None, Variant::Flash, DType::F32, 1),
        policy(Checkpoint::Full, Variant::Naive, DType::F32, 1),
        policy(Checkpoint::Selective, Variant::Flash, DType::Bf16, 1),
    ];
    for strategy in Strategy::ALL {
        for world in [1, 2, 3, 4] {
            for p in cases {
                let mut spec = ShardSpec::new(strategy, world);
                spec.bucket_bytes = 64 << 10; // several buckets at this size
                let (w, be, _, _) = run_world(sh, p, spec, &init);
                let want = reference(sh, p, world, &init);
                let what = format!("{} w{world} {}", strategy.name(), p.name());
                compare_weights((&w, &be), &want, true, 0.0, &what);
            }
        }
    }
}

#[test]
fn micro_batches_on_ranks_agree_within_summation_order() {
    // With k micro-batches per rank the reference adds the same terms in another order
    // (rank-major micro-batches summed one after another, against per-rank sums then the
    // reduction), so only rounding may differ: AdamW's first step moves a weight by about
    // lr·sign(g), so a weight differs by at most lr where a gradient's rounding flips a
    // near-zero sign, and by far less elsewhere.
    let mut rng = Rng::new(12);
    let sh = shape(12);
    let init = InitialValues::random(&sh, &mut rng);
    let p = policy(Checkpoint::None, Variant::Flash, DType::F32, 2);
    for strategy in Strategy::ALL {
        for world in [2, 3] {
            let (w, be, _, _) = run_world(sh, p, ShardSpec::new(strategy, world), &init);
            let want = reference(sh, p, world, &init);
            let what = format!("{} w{world} {}", strategy.name(), p.name());
            compare_weights((&w, &be), &want, false, 2e-3, &what);
        }
    }
}

#[test]
fn every_rank_peaks_at_its_model_to_the_byte() {
    let mut rng = Rng::new(13);
    let sh = shape(12);
    let init = InitialValues::random(&sh, &mut rng);
    let policies = [
        policy(Checkpoint::None, Variant::Flash, DType::F32, 1),
        policy(Checkpoint::Full, Variant::Flash, DType::Bf16, 1),
        policy(Checkpoint::EveryK(2), Variant::Naive, DType::F32, 2),
        policy(Checkpoint::Selective, Variant::Naive, DType::Bf16, 3),
    ];
    for strategy in Strategy::ALL {
        for world in [1, 2, 3, 4] {
            for p in policies {
                if (sh.batch / world) % p.micro_batches != 0 {
                    continue;
                }
                let mut spec = ShardSpec::new(strategy, world);
                spec.bucket_bytes = 40 << 10;
                spec.rank0_extra = 1001;
                let (_, _, peaks, traffic) = run_world(sh, p, spec, &init);
                for (r, (&peak, t)) in peaks.iter().zip(&traffic).enumerate() {
                    let m = model(&sh, &p, &spec, r);
                    assert_eq!(
                        peak,
                        m.memory.peak,
                        "{} w{world} {} rank {r}: measured {peak}, model {:?}",
                        strategy.name(),
                        p.name(),
                        m.memory
                    );
                    assert_eq!(
                        *t,
                        m.traffic,
                        "{} w{world} {} rank {r}: traffic",
                        strategy.name(),
                        p.name()
                    );
                }
            }
        }
    }
}

#[test]
fn the_model_reproduces_the_zero_papers_model_states() {
    // Ψ parameters in tensors whose sizes divide by every N here.
    let tensors: Vec<(usize, StateWidths)> = [4096usize * 64, 4096, 64 * 64 * 64]
        .iter()
        .map(|&n| (n, StateWidths::ZERO_PAPER))
        .collect();
    let psi: u64 = tensors.iter().map(|t| t.0 as u64).sum();
    for n in [1u64, 2, 4, 8, 64, 1024] {
        let total = |s| {
            let (w, g, o) = model_states(s, n as usize, &tensors);
            w + g + o
        };
        assert_eq!(total(Strategy::Ddp), 16 * psi, "DDP at N = {n}");
        assert_eq!(total(Strategy::Zero1), 4 * psi + 12 * psi / n, "stage 1");
        assert_eq!(total(Strategy::Zero2), 2 * psi + 14 * psi / n, "stage 2");
        assert_eq!(total(Strategy::Fsdp), 16 * psi / n, "stage 3");
    }
}

#[test]
fn the_dry_backend_holds_the_model_at_a_thousand_ranks() {
    // One rank's schedule at full size with the others absent: its peak is exact at any
    // world size, which is how `plan` can speak of 1024 GPUs.
    let sh = ModelShape {
        layers: 4,
        hidden: 1024,
        heads: 8,
        seq: 512,
        batch: 1024,
        arch: headroom::model::Arch::GPT,
    };
    let init = InitialValues::unset();
    for strategy in Strategy::ALL {
        for world in [8usize, 1024] {
            for p in [
                policy(Checkpoint::Selective, Variant::Flash, DType::Bf16, 1),
                policy(Checkpoint::Full, Variant::Naive, DType::F32, 1),
            ] {
                for rank in [0, world - 1] {
                    let mut spec = ShardSpec::new(strategy, world);
                    spec.rank0_extra = 3 << 20;
                    let be = DryBackend::new(None);
                    let comm = Box::new(Solo::new(rank, world).unwrap());
                    let mut st = RankState::new(&be, sh, p, spec, comm, &init).unwrap();
                    st.step(&be).unwrap();
                    let m = model(&sh, &p, &spec, rank);
                    assert_eq!(
                        be.memory().stats().peak_allocated,
                        m.memory.peak,
                        "{} w{world} rank {rank} {}",
                        strategy.name(),
                        p.name()
                    );
                    assert_eq!(st.take_traffic(), m.traffic);
                }
            }
        }
    }
}

#[test]
fn bad_worlds_and_buckets_are_refused_with_a_sentence() {
    let sh = shape(12);
    let p = policy(Checkpoint::None, Variant::Flash, DType::F32, 1);
    let be = CpuBackend::new(None, None);
    let init = InitialValues::unset();
    let err = |spec: ShardSpec| {
        let comm = Box::new(Solo::new(0, spec.world.max(1)).unwrap());
        match RankState::new(&be, sh, p, spec, comm, &init) {
            Err(e) => e.to_string(),
            Ok(_) => panic!("accepted {spec:?}"),
        }
    };
    assert!(err(ShardSpec::new(Strategy::Ddp, 0)).contains("world size of 0"));
    assert!(err(ShardSpec::new(Strategy::Ddp, 5)).contains("cannot be split evenly over 5"));
    let mut spec = ShardSpec::new(Strategy::Ddp, 2);
    spec.bucket_bytes = 0;
    assert!(err(spec).contains("bucket size of 0"));
    let e = Strategy::parse("zero4").unwrap_err().to_string();
    assert!(e.contains("'zero4' is not a sharding strategy"), "{e}");
    assert_eq!(Strategy::parse("zero3").unwrap(), Strategy::Fsdp);
    assert!(Solo::new(4, 4).is_err());
}

mod validation {
    use super::*;
    use headroom::techniques::mutation::{self, Mutation};
    use headroom::techniques::shard::{self as shard_cases, weight_name, ShardCase};
    use headroom::techniques::train::grad_name;
    use headroom::techniques::{untouched, Case, Readback, Validation};

    fn validate(case: &dyn Case, tamper: &mut dyn FnMut(Readback<'_>)) -> Validation {
        let be = CpuBackend::new(None, None);
        let mut rng = Rng::new(5);
        let mut inst = case.setup(&be, &mut rng).expect("sets up");
        let v = inst.validate(&be, &mut rng, tamper).expect("validates");
        let record = inst
            .shard_record(be.memory().stats().peak_allocated)
            .expect("a sharded case has a per-rank record");
        assert_eq!(record.ranks.len(), case_world(case));
        for r in &record.ranks {
            let m = r.model.expect("every rank has its model");
            assert_eq!(
                r.peak_allocated,
                m.peak,
                "{} rank {}: measured against model",
                case.info().id,
                r.rank
            );
        }
        v
    }

    fn case_world(case: &dyn Case) -> usize {
        let shape = &case.info().shape;
        let w = shape.split('-').find_map(|p| p.strip_prefix('w')).unwrap();
        w.parse().unwrap()
    }

    #[test]
    fn every_check_case_passes_and_says_what_it_compared() {
        for case in shard_cases::check_cases(headroom::backend::BackendKind::Cpu) {
            let id = case.info().id.clone();
            let v = validate(case.as_ref(), &mut untouched);
            assert!(v.passed(), "{id}: {}", v.detail);
            let exact = id.contains("-mb1/");
            assert!(
                v.detail.contains(if exact {
                    "bitwise against one rank's step"
                } else {
                    "AdamW's first step"
                }),
                "{id}: {}",
                v.detail
            );
        }
    }

    #[test]
    fn every_mutation_of_a_gradient_or_a_weight_fails_and_names_it() {
        let sh = ModelShape {
            layers: 2,
            hidden: 64,
            heads: 1,
            seq: 16,
            batch: 8,
            arch: headroom::model::Arch::GPT,
        };
        for strategy in [
            Strategy::Ddp,
            Strategy::Zero1,
            Strategy::Zero2,
            Strategy::Fsdp,
        ] {
            for p in [
                policy(Checkpoint::None, Variant::Flash, DType::F32, 1),
                policy(Checkpoint::Selective, Variant::Naive, DType::Bf16, 2),
            ] {
                let case = ShardCase::new(sh, p, ShardSpec::new(strategy, 2));
                let mut targets = vec![
                    grad_name(&sh, 1, 12),
                    weight_name(&sh, 0, 2),
                    grad_name(&sh, 0, 1),
                ];
                if !strategy.shards_params() {
                    // Rank 1's replicated compute copy, held bitwise to rank 0's.
                    targets.push(format!("rank 1 replica of {}", weight_name(&sh, 1, 14)));
                }
                for target in targets {
                    for m in Mutation::ALL {
                        let mut changed = false;
                        let v = validate(&case, &mut |mut r: Readback<'_>| {
                            if r.name == target {
                                changed |= mutation::apply(m, &mut r);
                            }
                        });
                        let id = &case.info().id;
                        if m == Mutation::SwapRows && target.ends_with("bias.grad") {
                            // A bias is one row: no swap can change it.
                            assert!(!changed, "{id}");
                            continue;
                        }
                        assert!(changed, "{id}: {m:?} changed nothing in {target}");
                        assert!(
                            !v.passed(),
                            "{id}: {target} {} passed: {}",
                            m.name(),
                            v.detail
                        );
                        assert!(
                            v.detail.starts_with("checked")
                                && v.detail.contains(&format!("worst tensor {target} (")),
                            "{id}: {target} {} was blamed on another tensor: {}",
                            m.name(),
                            v.detail
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn rank_zeros_timeline_is_one_step_and_peaks_at_its_model() {
        let sh = ModelShape {
            layers: 2,
            hidden: 64,
            heads: 1,
            seq: 16,
            batch: 8,
            arch: headroom::model::Arch::GPT,
        };
        for strategy in Strategy::ALL {
            let p = policy(Checkpoint::Full, Variant::Flash, DType::Bf16, 2);
            let mut spec = ShardSpec::new(strategy, 2);
            spec.rank0_extra = 12345;
            let case = ShardCase::new(sh, p, spec);
            let be = CpuBackend::new(None, None);
            let mut rng = Rng::new(3);
            let mut inst = case.setup(&be, &mut rng).unwrap();
            assert!(inst
                .validate(&be, &mut rng, &mut untouched)
                .unwrap()
                .passed());
            let t = inst.timeline(&be).unwrap().expect("a timeline");
            let peak = t
                .points
                .iter()
                .map(|p| p.iter().sum::<u64>())
                .max()
                .unwrap();
            assert_eq!(
                peak,
                model(&sh, &p, &spec, 0).memory.peak,
                "{}",
                case.info().id
            );
            for cat in ["weights", "grads", "optimizer", "extra"] {
                assert!(t.categories.iter().any(|c| c == cat), "{:?}", t.categories);
            }
            let phases: Vec<&str> = t.phases.iter().map(|p| p.1.as_str()).collect();
            assert_eq!(
                phases,
                [
                    "forward 1/2",
                    "backward 1/2",
                    "forward 2/2",
                    "backward 2/2",
                    "optimizer"
                ]
            );
        }
    }
}

#[test]
fn a_rank_out_of_memory_stops_the_world_without_a_hang() {
    // Rank 0 keeps extra bytes that put it over the budget in the backward; rank 1 fits,
    // waits for rank 0 at its next collective, and is released by rank 0's failure.
    let sh = shape(8);
    let p = policy(Checkpoint::None, Variant::Flash, DType::F32, 1);
    for strategy in Strategy::ALL {
        let mut spec = ShardSpec::new(strategy, 2);
        spec.rank0_extra = 1 << 20;
        let others = model(&sh, &p, &spec, 1).memory.peak;
        let zero = model(&sh, &p, &spec, 0).memory.peak;
        assert!(zero > others + (1 << 19));
        let be = CpuBackend::new(Some(others + (1 << 19)), None);
        let mut rng = Rng::new(1);
        let init = InitialValues::random(&sh, &mut rng);
        let mut world = World::new(&be, sh, p, spec, &init).expect("the state fits");
        match world.step(&be) {
            Err(headroom::Error::OutOfMemory(oom)) => {
                assert!(oom.to_string().contains("out of memory"), "{oom}")
            }
            other => panic!("{}: {:?}", strategy.name(), other.err()),
        }
    }
}

#[test]
fn every_mutation_of_an_all_reduce_fails_and_names_the_rank() {
    use headroom::techniques::collective::AllReduceCase;
    use headroom::techniques::mutation::{self, Mutation};
    use headroom::techniques::{untouched, Case, Readback};
    let case = AllReduceCase::new(1001, 3);
    let run = |tamper: &mut dyn FnMut(Readback<'_>)| {
        let be = CpuBackend::new(None, None);
        let mut rng = Rng::new(2);
        let mut inst = case.setup(&be, &mut rng).unwrap();
        inst.validate(&be, &mut rng, tamper).unwrap()
    };
    let control = run(&mut untouched);
    assert!(control.passed(), "{}", control.detail);
    assert_eq!(control.tensors.len(), 3, "one check per rank");
    for m in Mutation::ALL {
        let v = run(&mut |mut r: Readback<'_>| {
            if r.name == "rank 2 sum" {
                mutation::apply(m, &mut r);
            }
        });
        assert!(!v.passed(), "{m:?} passed: {}", v.detail);
        assert!(
            v.detail.starts_with("worst tensor rank 2 sum ("),
            "{}",
            v.detail
        );
    }
}
