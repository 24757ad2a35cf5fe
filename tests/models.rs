//! The models people train: presets' parameter counts against the published figures, the
//! architectures' training step (grouped-query attention, SwiGLU, RMSNorm, no biases, a
//! vocabulary with its embedding, final norm, head and cross-entropy in three variants) with
//! its measured peak equal to the memory model, its gradients checked, and `plan --model`.

use headroom::backend::cpu::CpuBackend;
use headroom::backend::dry::DryBackend;
use headroom::backend::Backend;
use headroom::dtype::DType;
use headroom::model::memory::model;
use headroom::model::{
    parse_train_id, Arch, Bias, Checkpoint, HeadLoss, InitialValues, Mlp, ModelShape, Norm, Policy,
    Preset, TrainState, PRESETS,
};
use headroom::rng::Rng;
use headroom::techniques::attention::Variant;
use headroom::techniques::mutation::{apply, Mutation};
use headroom::techniques::train::{grad_name, TrainCase};
use headroom::techniques::{Case, Readback};

#[test]
fn every_preset_counts_its_published_parameters() {
    let published: [(&str, u64); 5] = [
        ("gpt2-small", 124_439_808),
        ("llama2-7b", 6_738_415_616),
        ("llama3-8b", 8_030_261_248),
        ("mistral-7b", 7_241_732_096),
        ("qwen2.5-7b", 7_615_616_512),
    ];
    for (name, want) in published {
        let p = Preset::find(name).expect("a preset");
        assert_eq!(p.published_params, want, "{name}");
        let shape = p.shape(128, 1).expect("the preset's shape is valid");
        let got = shape.params() as f64;
        assert!(
            (got - want as f64).abs() <= 1e-3 * want as f64,
            "{name}: counted {got}, published {want}"
        );
    }
    assert_eq!(PRESETS.len(), published.len());
    // Qwen2.5's model card also gives 6.53B without the embeddings (and its untied head).
    let qwen = Preset::find("qwen2.5-7b").unwrap().shape(128, 1).unwrap();
    let embeddings = 2 * qwen.vocab() * qwen.hidden;
    assert_eq!(((qwen.params() - embeddings) as f64 / 1e7).round(), 653.0);
    let e = Preset::find("llama-9b").unwrap_err().to_string();
    assert!(e.contains("llama3-8b"), "{e}");
    let e = Preset::find("gpt2-small")
        .unwrap()
        .shape(2048, 1)
        .unwrap_err()
        .to_string();
    assert!(e.contains("position table of 1024"), "{e}");
}

/// The architectures the step is checked under, at CPU sizes.
fn shapes() -> Vec<ModelShape> {
    let llama = Arch {
        kv_heads: 1,
        ffn: 160,
        vocab: 0,
        mlp: Mlp::SwiGlu,
        norm: Norm::RmsNorm,
        bias: Bias::None,
        tied: false,
        positions: 0,
    };
    vec![
        // Llama-style blocks without a vocabulary.
        ModelShape {
            arch: llama,
            ..ModelShape::gpt(3, 128, 2, 24, 4)
        },
        // Llama-style with a vocabulary (untied head), Qwen's q/k/v biases.
        ModelShape {
            arch: Arch {
                vocab: 257,
                bias: Bias::Qkv,
                ..llama
            },
            ..ModelShape::gpt(2, 128, 2, 24, 4)
        },
        // GPT-2-style: tied head, learned positions, LayerNorm, GELU, biases.
        ModelShape {
            arch: Arch {
                vocab: 301,
                tied: true,
                positions: 32,
                ..Arch::GPT
            },
            ..ModelShape::gpt(2, 128, 2, 24, 4)
        },
    ]
}

fn policies(shape: &ModelShape) -> Vec<Policy> {
    let heads: &[HeadLoss] = if shape.vocab() > 0 {
        &[
            HeadLoss::Materialized,
            HeadLoss::Chunked { rows: 40 },
            HeadLoss::Fused,
        ]
    } else {
        &[HeadLoss::Materialized]
    };
    let mut out = Vec::new();
    for checkpoint in [Checkpoint::None, Checkpoint::Full, Checkpoint::Selective] {
        for attention in [Variant::Flash, Variant::Naive] {
            for dtype in [DType::F32, DType::Bf16] {
                for micro_batches in [1, 2] {
                    for &head in heads {
                        out.push(Policy {
                            checkpoint,
                            attention,
                            dtype,
                            micro_batches,
                            head,
                        });
                    }
                }
            }
        }
    }
    out
}

#[test]
fn the_peak_equals_the_model_for_every_architecture_and_policy() {
    for shape in shapes() {
        let init = InitialValues::random(&shape, &mut Rng::new(7));
        for p in policies(&shape) {
            let be = CpuBackend::new(None, None);
            let mut st = TrainState::new(&be, shape, p, &init).expect("fits");
            st.step(&be).expect("runs");
            let loss = st.loss(&be).unwrap();
            assert!(
                loss.is_finite() && loss > 0.0,
                "{} {}: loss {loss}",
                shape.name(),
                p.name()
            );
            let measured = be.memory().stats().peak_allocated;
            let m = model(&shape, &p);
            assert_eq!(measured, m.peak, "{} {}", shape.name(), p.name());
        }
    }
}

#[test]
fn the_step_without_checkpointing_is_bitwise_the_step_with_it() {
    for shape in shapes() {
        let init = InitialValues::random(&shape, &mut Rng::new(11));
        let grads = |checkpoint, head| {
            let be = CpuBackend::new(None, None);
            let p = Policy {
                checkpoint,
                attention: Variant::Flash,
                dtype: DType::F32,
                micro_batches: 1,
                head,
            };
            let mut st = TrainState::new(&be, shape, p, &init).unwrap();
            st.forward_backward(&be).unwrap();
            st.read_grads(&be).unwrap()
        };
        let none = grads(Checkpoint::None, HeadLoss::Materialized);
        assert_eq!(
            none,
            grads(Checkpoint::Full, HeadLoss::Materialized),
            "{}",
            shape.name()
        );
        assert_eq!(
            none,
            grads(Checkpoint::Selective, HeadLoss::Materialized),
            "{}",
            shape.name()
        );
        if shape.vocab() > 0 {
            // The variants compute the same loss differently: close, not bitwise.
            for head in [HeadLoss::Chunked { rows: 40 }, HeadLoss::Fused] {
                let other = grads(Checkpoint::None, head);
                for (u, (a, b)) in none.iter().zip(&other).enumerate() {
                    for (i, (a, b)) in a.iter().zip(b).enumerate() {
                        let scale = a.iter().fold(1e-6f32, |m, x| m.max(x.abs()));
                        let err = a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs()));
                        assert!(
                            err <= 1e-4 * scale,
                            "{} {}: {} off by {err} of {scale}",
                            shape.name(),
                            head.id(),
                            grad_name(&shape, u, i)
                        );
                    }
                }
            }
        }
    }
}

#[test]
fn training_cases_of_every_architecture_validate_and_catch_a_corrupted_gradient() {
    for shape in shapes() {
        for p in [
            Policy {
                checkpoint: Checkpoint::Full,
                attention: Variant::Flash,
                dtype: DType::Bf16,
                micro_batches: 2,
                head: if shape.vocab() > 0 {
                    HeadLoss::Fused
                } else {
                    HeadLoss::Materialized
                },
            },
            Policy {
                checkpoint: Checkpoint::Selective,
                attention: Variant::Naive,
                dtype: DType::F32,
                micro_batches: 1,
                head: HeadLoss::Materialized,
            },
        ] {
            for limit in [headroom::techniques::train::REFERENCE_LIMIT, 0] {
                let case = TrainCase::with_reference_limit(shape, p, limit);
                let be = CpuBackend::new(None, None);
                let mut rng = Rng::new(3);
                let mut inst = case.setup(&be, &mut rng).unwrap();
                let v = inst.validate(&be, &mut rng, &mut |_| {}).unwrap();
                assert!(v.passed(), "{}: {:?}", case.info().id, v);
                // The root's gradients are checked (by the reference and by their own probe).
                if shape.vocab() > 0 {
                    let names: Vec<&str> = v.tensors.iter().map(|t| t.name.as_str()).collect();
                    let probe = "embedding, final norm and head directional derivative";
                    assert!(names.contains(&probe), "{names:?}");
                }
                // A corrupted gradient of the MLP's last matrix and of the head fails.
                let layout = shape.layout();
                let mut targets = vec![grad_name(&shape, 0, layout.fc2_w)];
                if let Some(root) = shape.root_layout() {
                    targets.push(grad_name(&shape, shape.layers, root.head_weight()));
                }
                // Without the reference (limit 0) the probes alone must see a zeroed one.
                let mutations: &[Mutation] = if limit == 0 {
                    &[Mutation::Zero]
                } else {
                    &Mutation::ALL
                };
                for target in targets {
                    for &m in mutations {
                        let mut inst = case.setup(&be, &mut Rng::new(3)).unwrap();
                        let mut hit = false;
                        let v = inst
                            .validate(&be, &mut Rng::new(3), &mut |mut r: Readback<'_>| {
                                if r.name == target {
                                    hit |= apply(m, &mut r);
                                }
                            })
                            .unwrap();
                        assert!(hit, "{target} was read back");
                        assert!(!v.passed(), "{}: {target} {m:?} passed", case.info().id);
                    }
                }
            }
        }
    }
}

#[test]
fn ids_of_architectures_round_trip() {
    for shape in shapes() {
        for p in policies(&shape) {
            let id = format!("train/{}/{}/{}", p.name(), p.dtype.name(), shape.name());
            assert_eq!(parse_train_id(&id).expect(&id), (shape, p), "{id}");
        }
    }
    let e = parse_train_id("train/none-flash-mb1-fused/f32/L2-h128-heads2-n24-b4").unwrap_err();
    assert!(e.to_string().contains("vocabulary"), "{e}");
    let e = parse_train_id("train/none-flash-mb1/f32/L2-h128-heads2-n24-b4-kv3").unwrap_err();
    assert!(e.to_string().contains("K/V heads"), "{e}");
}

#[test]
fn the_logits_dominate_a_llama3_step_unless_fused() {
    let shape = Preset::find("llama3-8b").unwrap().shape(8192, 1).unwrap();
    let at = |head| {
        model(
            &shape,
            &Policy {
                checkpoint: Checkpoint::Full,
                attention: Variant::Flash,
                dtype: DType::Bf16,
                micro_batches: 1,
                head,
            },
        )
    };
    let (mat, chunk, fused) = (
        at(HeadLoss::Materialized),
        at(HeadLoss::CHUNKED),
        at(HeadLoss::Fused),
    );
    // fp32 logits of 8192 tokens over 128,256 entries: 3.9 GiB, and their gradient beside.
    let logits = 4 * 8192 * 128_256u64;
    assert!(mat.logits >= logits, "{mat:?}");
    assert!(chunk.logits < logits / 4, "{chunk:?}");
    assert!(fused.logits < 1 << 20, "{fused:?}");
    assert!(
        mat.peak > chunk.peak && chunk.peak >= fused.peak,
        "{mat:?} {chunk:?} {fused:?}"
    );
    // The dry backend allocates the same schedule at full size: the model is the schedule.
    let small = ModelShape {
        seq: 512,
        ..Preset::find("llama2-7b").unwrap().shape(512, 1).unwrap()
    };
    for head in [HeadLoss::Materialized, HeadLoss::CHUNKED, HeadLoss::Fused] {
        let p = Policy {
            checkpoint: Checkpoint::Full,
            attention: Variant::Flash,
            dtype: DType::Bf16,
            micro_batches: 1,
            head,
        };
        let be = DryBackend::new(None);
        let mut st = TrainState::new(&be, small, p, &InitialValues::unset()).unwrap();
        st.step(&be).unwrap();
        assert_eq!(
            be.memory().stats().peak_allocated,
            model(&small, &p).peak,
            "{}",
            p.name()
        );
    }
}

#[test]
fn plan_answers_for_a_preset_with_the_logits_in_its_breakdown() {
    let plan = |args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_headroom"))
            .arg("plan")
            .args(args)
            .env("HEADROOM_REPORT_DIR", "/nonexistent-headroom-reports")
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "{text} {}",
            String::from_utf8_lossy(&out.stderr)
        );
        text
    };
    let text = plan(&[
        "--model",
        "llama3-8b",
        "--seq",
        "8192",
        "--batch",
        "1",
        "--budget",
        "80GiB",
    ]);
    assert!(text.contains("8.03B parameters"), "{text}");
    assert!(text.contains("logits"), "{text}");
    assert!(text.contains("-fused"), "{text}");
    // A preset changed by hand: GPT-2 with a position table long enough for 4096 tokens.
    let text = plan(&[
        "--model",
        "gpt2-small",
        "--positions",
        "4096",
        "--seq",
        "4096",
        "--batch",
        "1",
        "--budget",
        "80GiB",
    ]);
    assert!(text.contains("-pos4096"), "{text}");
    // A preset name that is not one, and a plan without a size, are one sentence each.
    for args in [
        vec![
            "plan", "--model", "llama-9b", "--seq", "8", "--batch", "1", "--budget", "1GiB",
        ],
        vec!["plan", "--seq", "8", "--batch", "1", "--budget", "1GiB"],
        vec![
            "plan",
            "--model",
            "llama3-8b",
            "--mlp",
            "relu",
            "--seq",
            "8",
            "--batch",
            "1",
            "--budget",
            "1GiB",
        ],
    ] {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_headroom"))
            .args(&args)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?}");
        assert_eq!(err.lines().count(), 1, "{args:?}: {err}");
        assert!(!err.contains("panicked"), "{err}");
    }
}

/// The validation of a case with a vocabulary (its probes' fp32 forwards through the same
/// head variant) allocates no more than the case's step, at the benchmark's sizes.
#[test]
fn the_validation_of_models_with_a_vocabulary_fits_under_their_step() {
    let gpt2 = Preset::find("gpt2-small").unwrap().shape(1024, 8).unwrap();
    let llama = ModelShape {
        layers: 2,
        ..Preset::find("llama3-8b").unwrap().shape(4096, 1).unwrap()
    };
    for shape in [gpt2, llama] {
        for checkpoint in [Checkpoint::None, Checkpoint::Full, Checkpoint::Selective] {
            for dtype in [DType::F32, DType::Bf16] {
                for head in [HeadLoss::Materialized, HeadLoss::CHUNKED, HeadLoss::Fused] {
                    let p = Policy {
                        checkpoint,
                        attention: Variant::Flash,
                        dtype,
                        micro_batches: 1,
                        head,
                    };
                    let be = DryBackend::new(None);
                    let st = TrainState::new(&be, shape, p, &InitialValues::unset()).unwrap();
                    st.probe_loss(&be, &[]).unwrap();
                    let peak = be.memory().stats().peak_allocated;
                    let step = model(&shape, &p).peak;
                    assert!(
                        peak <= step,
                        "{} {}/{dtype}: the probe peaks at {peak}, the step at {step}",
                        shape.name(),
                        p.name()
                    );
                }
            }
        }
    }
}
