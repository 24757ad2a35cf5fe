//! The harness's promises that hold on every backend, shown on the CPU: `cargo bench`'s filter
//! selects exactly the cases it names, a filter that names nothing is an error, a timing
//! error makes the case `error` with no time, and a sticky device fault skips every later
//! case instead of failing them one by one.

use std::sync::Arc;

use headroom::backend::cpu::CpuBackend;
use headroom::backend::{Backend, BackendKind};
use headroom::harness::{BenchSelection, Session, Settings};
use headroom::report::{DevicePeak, Status};
use headroom::rng::Rng;
use headroom::techniques::{registry, Case, CaseInfo, Instance, Profile, Tamper, Validation};
use headroom::{DType, Error, Result};

fn args(a: &[&str]) -> Vec<String> {
    a.iter().map(|s| s.to_string()).collect()
}

fn ids(cases: &[Box<dyn Case>]) -> Vec<String> {
    cases.iter().map(|c| c.info().id.clone()).collect()
}

/// `cargo bench -- attention/flash`, `cargo bench -- fwd+bwd` and
/// `cargo bench -- --sample-size 20 matmul` each select exactly the cases whose id contains
/// the filter (criterion's `--bench` and option values are not filters; `+` is no regex).
#[test]
fn bench_filters_select_exactly_the_named_cases() {
    let all = ids(&registry(Profile::Quick, BackendKind::Cpu));
    for (argv, filter) in [
        (vec!["--bench", "attention/flash"], "attention/flash"),
        (vec!["--bench", "fwd+bwd"], "fwd+bwd"),
        (vec!["--bench", "--sample-size", "20", "matmul"], "matmul"),
        (vec!["--sample-size=20", "--bench", "matmul"], "matmul"),
        (vec!["--bench", "-b", "old", "--noplot", "matmul"], "matmul"),
    ] {
        let sel = BenchSelection::from_args(&args(&argv)).unwrap();
        assert_eq!(sel.filter.as_deref(), Some(filter), "{argv:?}");
        let got = ids(&sel.cases(Profile::Quick, BackendKind::Cpu).unwrap());
        let want: Vec<String> = all
            .iter()
            .filter(|id| id.contains(filter))
            .cloned()
            .collect();
        assert!(!want.is_empty(), "{filter} names some case");
        assert_eq!(got, want, "{argv:?}");
    }
    // No filter: every case, and the headline.
    let sel = BenchSelection::from_args(&args(&["--bench"])).unwrap();
    assert_eq!(
        ids(&sel.cases(Profile::Quick, BackendKind::Cpu).unwrap()),
        all
    );
    assert!(sel.wants_headline());
    // --exact takes one whole id.
    let one = &all[0];
    let sel = BenchSelection::from_args(&args(&["--bench", "--exact", one])).unwrap();
    assert_eq!(
        ids(&sel.cases(Profile::Quick, BackendKind::Cpu).unwrap()),
        vec![one.clone()]
    );
}

/// The selected cases run through the same harness as the bench: every one is measured.
#[test]
fn the_selected_cases_run() {
    let sel = BenchSelection::from_args(&args(&["--bench", "attention/flash/"])).unwrap();
    let be: Arc<dyn Backend> = Arc::new(CpuBackend::new(None, None));
    let settings = Settings {
        profile: Profile::Quick,
        budget: None,
        seed: 3,
    };
    let mut session = Session::new(be, &settings, "quick");
    for case in sel.cases(Profile::Quick, BackendKind::Cpu).unwrap() {
        let prepared = session.prepare(case.as_ref());
        assert_eq!(prepared.record.status, Status::Ok, "{}", prepared.record.id);
        let mut timer = session.timer(prepared.instance.expect("valid"), prepared.host_only);
        timer.run(2).unwrap();
        let r = session.push(prepared.record, Some(timer)).unwrap();
        assert!(r.time.as_ref().is_some_and(|t| t.samples == 2), "{}", r.id);
    }
}

#[test]
fn a_bench_filter_that_matches_nothing_is_one_sentence() {
    let sel = BenchSelection::from_args(&args(&["--bench", "NOSUCH"])).unwrap();
    let e = sel
        .cases(Profile::Quick, BackendKind::Cpu)
        .err()
        .expect("nothing matches");
    let msg = e.to_string();
    assert!(msg.contains("'NOSUCH'") && !msg.contains('\n'), "{msg}");
    // Two filters are refused with one sentence, as criterion takes only one.
    let e = BenchSelection::from_args(&args(&["matmul", "attention"])).unwrap_err();
    assert!(e.to_string().contains("one filter"), "{e}");
}

/// A case that sets up and validates, and then fails when timed (as a kernel would with a
/// sticky fault after its first runs).
struct FailsWhenTimed {
    info: CaseInfo,
}

struct FailingRun {
    runs: u32,
    fail_after: u32,
}

impl Case for FailsWhenTimed {
    fn info(&self) -> &CaseInfo {
        &self.info
    }
    fn setup(&self, _be: &dyn Backend, _rng: &mut Rng) -> Result<Box<dyn Instance>> {
        Ok(Box::new(FailingRun {
            runs: 0,
            fail_after: 4,
        }))
    }
}

impl Instance for FailingRun {
    fn run(&mut self, _be: &dyn Backend) -> Result<()> {
        self.runs += 1;
        if self.runs > self.fail_after {
            return Err(Error::Cuda(
                "an illegal memory access was encountered".into(),
            ));
        }
        Ok(())
    }
    fn validate(
        &mut self,
        _be: &dyn Backend,
        _rng: &mut Rng,
        _tamper: &mut Tamper<'_>,
    ) -> Result<Validation> {
        Ok(Validation::from_checks(vec![
            headroom::techniques::TensorCheck {
                name: "out".into(),
                compared: 1,
                error: 0.0,
                tolerance: 0.0,
                scale: 1.0,
                atol: 0.0,
                rtol: 0.0,
                violations: 0,
                worst: "exact".into(),
            },
        ]))
    }
}

fn session() -> Session {
    let be: Arc<dyn Backend> = Arc::new(CpuBackend::new(None, None));
    let settings = Settings {
        profile: Profile::Quick,
        budget: None,
        seed: 1,
    };
    Session::new(be, &settings, "quick")
}

#[test]
fn a_timing_error_makes_the_case_an_error_without_a_time() {
    let mut s = session();
    let case = FailsWhenTimed {
        info: CaseInfo::new("test", "fails-when-timed", DType::F32, "x".into()),
    };
    let prepared = s.prepare(&case);
    assert_eq!(prepared.record.status, Status::Ok);
    // Three warm-up runs pass; the second timed run fails and every later call returns the
    // error at once without adding samples.
    let mut timer = s.timer(prepared.instance.unwrap(), prepared.host_only);
    assert!(timer.run(1).is_ok());
    assert!(timer.run(5).is_err());
    assert!(timer.run(5).is_err());
    let r = s.push(prepared.record, Some(timer)).unwrap();
    match &r.status {
        Status::Error(m) => assert!(m.contains("while timing") && m.contains("illegal"), "{m}"),
        other => panic!("{other:?}"),
    }
    assert!(r.time.is_none(), "an errored case has no time");
}

#[test]
fn a_sticky_fault_skips_every_later_case_naming_the_culprit() {
    let mut s = session();
    s.note_fault(
        "attention/flash/bf16/fwd/b1-h1-n64-d64",
        Some("an illegal memory access was encountered".into()),
    );
    // The first fault is the one named.
    s.note_fault("matmul/simt/f32/m1-n1-k1", Some("later".into()));
    for case in registry(Profile::Quick, BackendKind::Cpu).iter().take(3) {
        let p = s.prepare(case.as_ref());
        assert!(p.instance.is_none());
        match &p.record.status {
            Status::Skipped(why) => assert!(
                why.starts_with("device fault in attention/flash/bf16/fwd/b1-h1-n64-d64"),
                "{why}"
            ),
            other => panic!("{other:?}"),
        }
    }
    // No fault, nothing noted.
    let mut fresh = session();
    fresh.note_fault("x", None);
    assert!(fresh.fault().is_none());
}

/// The device's own peak must lie between the tracked peak and one granule more for each
/// buffer alive at once; anything else is a disagreement that `check` fails on.
#[test]
fn device_peak_agreement_is_bounded_by_the_granularity() {
    let mib = 1u64 << 20;
    let d = |used| DevicePeak {
        used,
        reserved: 0,
        granularity: 2 * mib,
        live_buffers: 3,
    };
    let tracked = 10 * mib + 5;
    assert!(d(tracked).disagreement(tracked).is_none());
    assert!(d(tracked + 6 * mib).disagreement(tracked).is_none());
    assert!(d(tracked + 6 * mib + 1).disagreement(tracked).is_some());
    // Less than the case asked for is impossible, so it is a disagreement too.
    let why = d(tracked - 1).disagreement(tracked).unwrap();
    assert!(
        why.contains("outside") && why.contains("3 live buffers"),
        "{why}"
    );
}
