//! Mutation tests: a check is only worth the wrong results it catches. For every family, one
//! output of a real run on the CPU backend is corrupted between read-back and comparison
//! (all zeros; 1% of its elements off by 5%; two rows swapped; one NaN), and validation must
//! fail and name that tensor as the worst. The untouched run is the control: it must pass.

use headroom::backend::{AttentionShape, BackendKind, Matmul, MatmulKernel};
use headroom::dtype::DType;
use headroom::techniques::attention::{AttentionCase, Pass, Variant};
use headroom::techniques::copy::CopyCase;
use headroom::techniques::layers::{LayerCase, Op};
use headroom::techniques::matmul::MatmulCase;
use headroom::techniques::mutation::{apply, Mutation};
use headroom::techniques::{Bounds, Case, Readback};

mod common;
use common::assert_caught;
use common::validate;

#[test]
fn matmul_c_mutations_are_caught() {
    for (kernel, dtype) in [
        (MatmulKernel::Simt, DType::F32),
        (MatmulKernel::Mma, DType::Bf16),
    ] {
        for (ta, tb) in [(false, false), (true, true)] {
            let mm = Matmul::new(127, 257, 131).transposed(ta, tb);
            assert_caught(&MatmulCase::new(kernel, dtype, dtype, mm), &["C"], &[]);
        }
    }
    // The residual check cases themselves (after GELU, with C's old values, per batch entry),
    // for the kernels that run on the CPU.
    let residual: Vec<_> = headroom::techniques::matmul::check_cases(BackendKind::Cpu)
        .into_iter()
        .filter(|c| c.info().id.ends_with("-res"))
        .filter(|c| ["simt", "mma"].contains(&c.info().technique.as_str()))
        .collect();
    assert_eq!(residual.len(), 6, "three residual cases per CPU kernel");
    for case in &residual {
        assert_caught(case.as_ref(), &["C"], &[]);
    }
}

#[test]
fn attention_mutations_are_caught() {
    for variant in [Variant::Flash, Variant::Naive] {
        for dtype in [DType::F32, DType::Bf16] {
            for causal in [false, true] {
                // 65 rows: one whole 64-row tile and a ragged one.
                let shape = AttentionShape::new(1, 2, 65, 64, causal);
                let case = AttentionCase::new(variant, Pass::ForwardBackward, dtype, shape);
                let mut targets = vec!["O", "dQ", "dK", "dV", "delta"];
                if variant == Variant::Flash {
                    targets.push("logsumexp");
                }
                assert_caught(&case, &targets, &[]);
            }
        }
    }
}

/// Above 1024 rows validation samples query rows (O, logsumexp, delta, dQ) and key rows (dK,
/// dV); the first and last of each are always sampled, and the corruptions touch them.
#[test]
fn attention_mutations_are_caught_where_validation_samples() {
    for variant in [Variant::Flash, Variant::Naive] {
        let shape = AttentionShape::new(1, 1, 1100, 64, true);
        let case = AttentionCase::new(variant, Pass::ForwardBackward, DType::Bf16, shape);
        let mut targets = vec!["O", "dQ", "dK", "dV"];
        if variant == Variant::Flash {
            targets.push("logsumexp");
        }
        assert_caught(&case, &targets, &[]);
    }
}

#[test]
fn copy_mutations_are_caught() {
    assert_caught(&CopyCase::new(1000), &["dst"], &[]);
}

#[test]
fn layer_mutations_are_caught() {
    let ops: [(Op, &[&str]); 7] = [
        (Op::LayerNormForward, &["out", "mean", "rstd"]),
        (
            Op::LayerNormBackward,
            &["out", "mean", "rstd", "dx", "d_weight", "d_bias"],
        ),
        (Op::Gelu, &["gelu", "dx"]),
        (Op::Heads, &["heads", "tokens again"]),
        (Op::ColumnSum, &["sums"]),
        (Op::Loss, &["dy", "loss"]),
        (Op::AdamW, &["param", "m", "v", "param (bf16)"]),
    ];
    for (op, targets) in ops {
        for dtype in [DType::F32, DType::Bf16] {
            let c = if op == Op::Heads { 128 } else { 200 };
            // The loss is one number: there are no two rows to swap.
            assert_caught(&LayerCase::new(op, dtype, 77, c), targets, &["loss"]);
        }
    }
}

/// A zeroed output can never pass. Zeroed, a tensor whose reference is not all zero has an
/// error of exactly 1 relative to its own scale, and every bound is far below 1; and its
/// largest reference element misses atol + rtol·|ref| because atol_of_rms + rtol < 1 (its
/// |ref| is at least the RMS). Shown here on O, dQ, dK, dV, C and a layer output in bf16,
/// the loosest dtype, with inputs that make each tensor large or small.
#[test]
fn a_zeroed_output_cannot_pass() {
    for b in [
        Bounds::of(DType::F32),
        Bounds::of(DType::Bf16),
        Bounds::statistic(),
    ] {
        assert!(b.relative < 0.1 && b.atol_of_rms + b.rtol < 0.1, "{b:?}");
    }
    let zeroed = |case: &dyn Case, target: &str| {
        let (v, changed) = validate(case, target, Some(Mutation::Zero));
        assert!(changed);
        assert!(!v.passed(), "{}: zeroed {target} passed", case.info().id);
        let t = v
            .tensors
            .iter()
            .find(|t| t.name == target)
            .expect("compared");
        assert_eq!(t.error, 1.0, "{}: zeroed {target}", case.info().id);
        assert!(t.violations > 0);
    };
    for variant in [Variant::Flash, Variant::Naive] {
        let shape = AttentionShape::new(1, 2, 129, 128, false);
        let case = AttentionCase::new(variant, Pass::ForwardBackward, DType::Bf16, shape);
        for target in ["O", "dQ", "dK", "dV"] {
            zeroed(&case, target);
        }
    }
    let mm = Matmul::new(127, 257, 131);
    zeroed(
        &MatmulCase::new(MatmulKernel::Mma, DType::Bf16, DType::Bf16, mm),
        "C",
    );
    zeroed(
        &LayerCase::new(Op::LayerNormForward, DType::Bf16, 77, 200),
        "out",
    );
}

/// The corruptions themselves: deterministic, and each changes what it claims to.
#[test]
fn mutations_do_what_they_say() {
    let base: Vec<f32> = (0..300).map(|i| (i as f32 * 0.37).sin()).collect();
    let run = |m: Mutation| {
        let mut v = base.clone();
        let changed = apply(
            m,
            &mut Readback {
                name: "x",
                values: &mut v,
                row: 10,
            },
        );
        (v, changed)
    };
    for m in Mutation::ALL {
        assert_eq!(run(m).0.iter().map(|x| x.to_bits()).collect::<Vec<_>>(), {
            run(m).0.iter().map(|x| x.to_bits()).collect::<Vec<_>>()
        });
        assert!(run(m).1, "{m:?}");
    }
    assert!(run(Mutation::Zero).0.iter().all(|x| *x == 0.0));
    let (p, _) = run(Mutation::Perturb);
    let diff: Vec<usize> = (0..300).filter(|&i| p[i] != base[i]).collect();
    // 1% of 300 = 3 elements: the first, the middle and the last.
    assert_eq!(diff, vec![0, 149, 299]);
    let rms = (base.iter().map(|x| x * x).sum::<f32>() / 300.0).sqrt();
    for i in diff {
        let off = (p[i] - base[i]).abs();
        assert!((off - 0.05 * base[i].abs().max(rms)).abs() < 1e-6, "{i}");
    }
    let (s, _) = run(Mutation::SwapRows);
    assert_eq!(&s[..10], &base[290..]);
    assert_eq!(&s[290..], &base[..10]);
    assert_eq!(&s[10..290], &base[10..290]);
    let (n, _) = run(Mutation::Nan);
    assert_eq!(n.iter().filter(|x| x.is_nan()).count(), 1);
}
