//! The criterion entry: iterates the registered cases of the profile on the best backend
//! present, validates and measures each, lets criterion time the valid ones with device
//! events, and writes the report.
//!
//! `cargo bench` runs everything; `cargo bench -- attention` only the cases whose id contains
//! `attention`. Settings: HEADROOM_PROFILE, HEADROOM_BUDGET, HEADROOM_BACKEND, HEADROOM_SEED.

use std::time::Duration;

use criterion::{Criterion, SamplingMode};

use headroom::backend::{self, BackendKind};
use headroom::dtype::DType;
use headroom::harness::{matches_filters, summary_line, Session, Settings};
use headroom::memory::format_bytes;
use headroom::report;
use headroom::rng::Rng;
use headroom::techniques::attention::headline;
use headroom::techniques::{registry, Profile};

fn main() {
    if let Err(e) = run() {
        eprintln!("headroom: {e}");
        std::process::exit(1);
    }
}

fn run() -> headroom::Result<()> {
    let settings = Settings::from_env()?;
    let be = backend::select(settings.budget)?;
    // Criterion's own arguments (`--bench`, options) start with '-'; the rest are filters.
    let filters: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    let (warm_up, measure) = match settings.profile {
        Profile::Quick => (Duration::from_millis(200), Duration::from_secs(1)),
        Profile::Full => (Duration::from_secs(1), Duration::from_secs(3)),
    };
    let mut c = Criterion::default()
        .sample_size(10)
        .warm_up_time(warm_up)
        .measurement_time(measure)
        .configure_from_args();
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
    for case in registry(settings.profile, be.kind()) {
        let id = case.info().id.clone();
        if !matches_filters(&id, &filters) {
            continue;
        }
        let prepared = session.prepare(case.as_ref());
        let timer = prepared.instance.map(|inst| {
            let mut timer = session.timer(inst);
            group.bench_function(&id, |b| {
                b.iter_custom(|iters| Duration::from_secs_f64(timer.run(iters)))
            });
            timer
        });
        let record = session.push(prepared.record, timer)?;
        println!("{}", summary_line(record));
    }
    group.finish();
    if filters.is_empty()
        || filters
            .iter()
            .any(|f| "attention/headline".contains(f.as_str()) || f.contains("headline"))
    {
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
