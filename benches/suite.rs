//! The criterion entry: iterates the registered cases of the profile on the best backend
//! present, validates and measures each, lets criterion time the valid ones with device
//! events, and writes the report.
//!
//! `cargo bench` runs everything; `cargo bench -- attention` only the cases whose id contains
//! `attention` (criterion's options work beside it: `cargo bench -- --sample-size 20 matmul`);
//! a filter that matches nothing is an error. Settings: HEADROOM_PROFILE, HEADROOM_BUDGET,
//! HEADROOM_BACKEND, HEADROOM_SEED.

use std::time::Duration;

use criterion::{BenchmarkFilter, Criterion, SamplingMode};

use headroom::backend::{self, BackendKind};
use headroom::dtype::DType;
use headroom::harness::{summary_line, BenchSelection, Session, Settings};
use headroom::memory::format_bytes;
use headroom::report;
use headroom::rng::Rng;
use headroom::techniques::attention::headline;
use headroom::techniques::Profile;

fn main() {
    if let Err(e) = run() {
        eprintln!("headroom: {e}");
        std::process::exit(1);
    }
}

/// Unwinds out of criterion's measurement loop when a timed run fails, so that criterion
/// records no estimate for the case (`resume_unwind` runs no panic hook: nothing is printed).
struct TimingFailed;

fn run() -> headroom::Result<()> {
    let settings = Settings::from_env()?;
    let args: Vec<String> = std::env::args().skip(1).collect();
    let selection = BenchSelection::from_args(&args)?;
    let be = backend::select(settings.budget)?;
    let headline_wanted = selection.wants_headline();
    let cases = selection.cases(settings.profile, be.kind())?;
    let (warm_up, measure) = match settings.profile {
        Profile::Quick => (Duration::from_millis(200), Duration::from_secs(1)),
        Profile::Full => (Duration::from_secs(1), Duration::from_secs(3)),
    };
    // Criterion reads its options from the command line; its filter is replaced by
    // headroom's selection above, so it times exactly the cases handed to it.
    let mut c = Criterion::default()
        .sample_size(10)
        .warm_up_time(warm_up)
        .measurement_time(measure)
        .configure_from_args()
        .with_benchmark_filter(BenchmarkFilter::AcceptAll);
    println!(
        "headroom: {} profile on the {} backend ({}){}; seed {}",
        settings.profile.name(),
        be.kind().name(),
        be.facts().name,
        be.facts()
            .fallback_reason
            .as_ref()
            .map(|r| format!(", because {r}"))
            .unwrap_or_default(),
        settings.seed
    );
    let dir = report::report_dir();
    let mut session = Session::new(be.clone(), &settings, settings.profile.name());
    session.write_to(dir.clone());
    let mut group = c.benchmark_group("headroom");
    group.sampling_mode(SamplingMode::Flat);
    for case in cases {
        let id = case.info().id.clone();
        let prepared = session.prepare(case.as_ref());
        let host_only = prepared.host_only;
        let timer = prepared.instance.map(|inst| {
            let mut timer = session.timer(inst, host_only);
            if timer.error.is_none() {
                let timed = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    group.bench_function(&id, |b| {
                        b.iter_custom(|iters| match timer.run(iters) {
                            Ok(seconds) => Duration::from_secs_f64(seconds),
                            Err(_) => std::panic::resume_unwind(Box::new(TimingFailed)),
                        })
                    });
                }));
                if let Err(payload) = timed {
                    if !payload.is::<TimingFailed>() {
                        std::panic::resume_unwind(payload);
                    }
                }
            }
            timer
        });
        let record = session.push(prepared.record, timer)?;
        println!("{}", summary_line(record));
    }
    group.finish();
    if headline_wanted && session.fault().is_none() {
        // The longest sequence each attention variant trains under the run's budget (or a
        // default that keeps the flash run to seconds), confirmed at N and N + 1.
        let (budget, heads, head_dim) = match be.kind() {
            BackendKind::Cuda | BackendKind::Dry => (settings.budget.unwrap_or(4 << 30), 16, 128),
            BackendKind::Cpu => (settings.budget.unwrap_or(2 << 20), 1, 64),
        };
        let mut rng = Rng::new(settings.seed ^ 0x4eed);
        session.report.headline =
            headline(be.as_ref(), budget, DType::Bf16, heads, head_dim, &mut rng);
        for h in &session.report.headline {
            println!(
                "headline: under {} the longest {} bf16 forward+backward sequence is {} (run at N: {}; at N + 1: {})",
                format_bytes(h.budget_bytes),
                h.variant,
                h.longest_seq,
                h.run_at_longest,
                h.run_one_more
            );
        }
    }
    let json = report::write_all(&session.report, &dir)?;
    println!("headroom: report written to {}", json.display());
    Ok(())
}
