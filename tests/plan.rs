//! `headroom plan`: fits come from the memory model, times from a measured report.

use std::sync::Arc;

use headroom::backend::cpu::CpuBackend;
use headroom::backend::Backend;
use headroom::dtype::DType;
use headroom::harness::{Session, Settings};
use headroom::model::memory::model;
use headroom::model::{Checkpoint, ModelShape, Policy};
use headroom::report::plan::{plan, policies};
use headroom::report::Report;
use headroom::techniques::attention::Variant;
use headroom::techniques::train::TrainCase;
use headroom::techniques::{Case, Profile};

const MEASURED: ModelShape = ModelShape {
    layers: 2,
    hidden: 128,
    heads: 2,
    seq: 16,
    batch: 2,
    arch: headroom::model::Arch::GPT,
};
const PLANNED: ModelShape = ModelShape {
    layers: 4,
    hidden: 128,
    heads: 2,
    seq: 32,
    batch: 4,
    arch: headroom::model::Arch::GPT,
};

fn measured_report() -> Report {
    let be: Arc<dyn Backend> = Arc::new(CpuBackend::new(None, None));
    let settings = Settings {
        profile: Profile::Quick,
        budget: None,
        seed: 3,
    };
    let mut s = Session::new(be, &settings, "test");
    for checkpoint in [Checkpoint::None, Checkpoint::Full] {
        let p = Policy {
            checkpoint,
            attention: Variant::Flash,
            dtype: DType::Bf16,
            micro_batches: 1,
            head: headroom::model::HeadLoss::Materialized,
        };
        let case = TrainCase::new(MEASURED, p);
        let prepared = s.prepare(&case);
        assert_eq!(
            prepared.record.status,
            headroom::report::Status::Ok,
            "{}",
            case.info().id
        );
        let mut timer = s.timer(prepared.instance.expect("valid"), prepared.host_only);
        timer.run(2).expect("timed");
        s.push(prepared.record, Some(timer)).unwrap();
    }
    s.report.clone()
}

#[test]
fn fits_follow_the_model_and_the_fitting_come_first() {
    let budget = model(
        &PLANNED,
        &Policy {
            checkpoint: Checkpoint::Full,
            attention: Variant::Flash,
            dtype: DType::Bf16,
            micro_batches: 1,
            head: headroom::model::HeadLoss::Materialized,
        },
    )
    .peak;
    let rows = plan(&PLANNED, budget, None);
    assert_eq!(rows.len(), policies(&PLANNED).len());
    let first_misfit = rows.iter().position(|r| !r.fits).expect("some do not fit");
    assert!(
        rows[first_misfit..].iter().all(|r| !r.fits),
        "fitting rows come first"
    );
    for r in &rows {
        assert_eq!(r.fits, r.memory.peak <= budget, "{}", r.policy);
        assert_eq!(r.margin_bytes, budget as i64 - r.memory.peak as i64);
        assert_eq!(r.reason.is_some(), !r.fits);
        assert!(r.predicted_step_s.is_none());
    }
    assert!(rows
        .iter()
        .any(|r| r.fits && r.policy == "full-flash-mb1" && r.dtype == DType::Bf16));
    assert!(rows.iter().any(|r| !r.fits && r.policy == "none-flash-mb1"));
}

#[test]
fn times_are_scaled_from_the_measured_policy_and_sorted() {
    let report = measured_report();
    let rows = plan(&PLANNED, u64::MAX, Some(&report));
    let none = rows
        .iter()
        .find(|r| r.policy == "none-flash-mb1" && r.dtype == DType::Bf16)
        .unwrap();
    assert!(
        none.time_source
            .contains("train/none-flash-mb1/bf16/L2-h128-heads2-n16-b2"),
        "{}",
        none.time_source
    );
    let full = rows
        .iter()
        .find(|r| r.policy == "full-flash-mb1" && r.dtype == DType::Bf16)
        .unwrap();
    assert!(
        full.time_source.contains("train/full-flash-mb1/bf16/"),
        "{}",
        full.time_source
    );
    // A micro-batched policy borrows the time of its checkpointing/attention/precision.
    let mb = rows
        .iter()
        .find(|r| r.policy == "none-flash-mb2" && r.dtype == DType::Bf16)
        .unwrap();
    assert!(mb.predicted_step_s.is_some() && mb.time_source.contains("none-flash-mb1"));
    // fp32 was not measured: no time, and the reason says so.
    let f32_row = rows.iter().find(|r| r.dtype == DType::F32).unwrap();
    assert!(
        f32_row.predicted_step_s.is_none()
            && f32_row.time_source.contains("no measured training case")
    );
    // Known times are sorted ascending and come before unknown ones.
    let times: Vec<Option<f64>> = rows.iter().map(|r| r.predicted_step_s).collect();
    let known = times.iter().take_while(|t| t.is_some()).count();
    assert!(times[known..].iter().all(|t| t.is_none()));
    assert!(times[..known].windows(2).all(|w| w[0] <= w[1]));
}

#[test]
fn the_command_line_refuses_bad_input_in_one_sentence() {
    let run = |args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_headroom"))
            .args(args)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr).to_string();
        assert!(!out.status.success() && !err.contains("panicked"), "{err}");
        err
    };
    let base = [
        "plan", "--layers", "4", "--hidden", "128", "--heads", "2", "--seq", "32", "--batch", "4",
    ];
    let err = run(&[&base[..], &["--budget", "lots"]].concat());
    assert!(
        err.contains("--budget: 'lots' is not a memory size"),
        "{err}"
    );
    let err = run(&[
        "plan", "--layers", "4", "--hidden", "100", "--heads", "2", "--seq", "32", "--batch", "4",
        "--budget", "1GiB",
    ]);
    assert!(err.contains("hidden / heads = 64 or 128"), "{err}");
    let err = run(&[
        &base[..],
        &["--budget", "1GiB", "--report", "/nonexistent.json"],
    ]
    .concat());
    assert!(err.contains("could not read /nonexistent.json"), "{err}");
}
