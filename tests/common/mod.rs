//! What the mutation tests of every family share: one validation on the CPU backend with one
//! output corrupted as it is read back, and the assertion that each corruption is caught and
//! blamed on the corrupted tensor.

// Each test file uses what it needs of this module.
#![allow(dead_code)]

use headroom::backend::cpu::CpuBackend;
use headroom::rng::Rng;
use headroom::techniques::mutation::{apply, Mutation};
use headroom::techniques::{untouched, Case, Readback, Validation};

/// Runs and validates `case` once, corrupting the output named `target` with `m` (or nothing
/// when `m` is None). Returns the validation and whether the corruption changed any value.
pub fn validate(case: &dyn Case, target: &str, m: Option<Mutation>) -> (Validation, bool) {
    let be = CpuBackend::new(None, None);
    let mut rng = Rng::new(11);
    let mut inst = case.setup(&be, &mut rng).expect("setup");
    let mut changed = false;
    let mut seen = false;
    let v = match m {
        None => inst.validate(&be, &mut rng, &mut untouched),
        Some(m) => {
            let mut tamper = |mut r: Readback<'_>| {
                if r.name == target {
                    seen = true;
                    changed |= apply(m, &mut r);
                }
            };
            inst.validate(&be, &mut rng, &mut tamper)
        }
    }
    .expect("validation runs");
    if m.is_some() {
        assert!(
            seen,
            "{}: no output named {target} was read back",
            case.info().id
        );
    }
    (v, changed)
}

/// The control passes, and each mutation of each target fails naming the target (or, for
/// attention's dV at sampled sizes, its column sums). `single_row` lists targets of one row
/// (one element), which no swap can change.
pub fn assert_caught(case: &dyn Case, targets: &[&str], single_row: &[&str]) {
    let id = &case.info().id;
    let (control, _) = validate(case, "", None);
    assert!(
        control.passed(),
        "{id}: the untouched run fails: {}",
        control.detail
    );
    for &target in targets {
        for m in Mutation::ALL {
            let (v, changed) = validate(case, target, Some(m));
            if m == Mutation::SwapRows && single_row.contains(&target) {
                assert!(
                    !changed,
                    "{id}: {target} has one row, yet a swap changed it"
                );
                continue;
            }
            assert!(changed, "{id}: {} left {target} unchanged", m.name());
            assert!(
                !v.passed(),
                "{id}: {target} {} passed validation: {}",
                m.name(),
                v.detail
            );
            // At sampled sizes dV is also checked whole through its column sums, which may
            // come out as bad as dV itself: either names dV.
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
