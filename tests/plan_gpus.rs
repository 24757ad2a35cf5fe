//! `headroom plan --gpus N`: every sharding strategy × policy per rank, from the per-rank
//! model; compute predicted from a measured report, communication modeled and marked so;
//! and the report's per-rank table and world-size plot.

use std::path::PathBuf;
use std::process::{Command, Output};
use std::sync::Arc;
use std::time::{Duration, Instant};

use headroom::backend::cpu::CpuBackend;
use headroom::backend::Backend;
use headroom::dtype::DType;
use headroom::harness::{Session, Settings};
use headroom::memory::format_bytes;
use headroom::model::{Checkpoint, ModelShape, Policy};
use headroom::report::plan::{parse_rate, plan, plan_sharded, ShardOptions};
use headroom::report::{self, markdown, svg, Report, Status};
use headroom::shard::memory::{headroom_tensors, model_states, peak_rank};
use headroom::shard::{buckets, ShardSpec, Strategy, DEFAULT_BUCKET_BYTES};
use headroom::techniques::attention::Variant;
use headroom::techniques::shard::ShardCase;
use headroom::techniques::train::TrainCase;
use headroom::techniques::{Case, Profile};

const GIB: u64 = 1 << 30;

/// The 6.4B-parameter model of the README's example (Llama-7B-like depth and width).
const BIG: [&str; 10] = [
    "--layers", "32", "--hidden", "4096", "--heads", "32", "--seq", "4096", "--batch", "8",
];
const BIG_SHAPE: ModelShape = ModelShape {
    layers: 32,
    hidden: 4096,
    heads: 32,
    seq: 4096,
    batch: 8,
    arch: headroom::model::Arch::GPT,
};

fn headroom(args: &[&str]) -> Output {
    // No report from earlier runs may leak in: point the default at an empty directory.
    let empty = std::env::temp_dir().join(format!("headroom-plan-gpus-{}", std::process::id()));
    std::fs::create_dir_all(&empty).unwrap();
    Command::new(env!("CARGO_BIN_EXE_headroom"))
        .env("HEADROOM_REPORT_DIR", &empty)
        .args(args)
        .output()
        .unwrap()
}

fn big(extra: &[&str]) -> Output {
    headroom(&[&["plan"][..], &BIG[..], extra].concat())
}

fn stdout(out: &Output) -> String {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).to_string()
}

/// The sentence the plan must give for DDP, computed from the model here: the leanest
/// model states over the policies (fp32: no separate master) plus the buckets.
fn ddp_states_sentence(budget: u64) -> String {
    let local = ModelShape {
        batch: 1,
        ..BIG_SHAPE
    };
    let (w, g, o) = headroom::report::plan::policies(&local)
        .iter()
        .map(|p| model_states(Strategy::Ddp, 8, &headroom_tensors(&BIG_SHAPE, p)))
        .min_by_key(|&(w, g, o)| w + g + o)
        .unwrap();
    let b: u64 = buckets(&BIG_SHAPE, DEFAULT_BUCKET_BYTES)
        .iter()
        .map(|b| 4 * b.len as u64)
        .sum();
    format!(
        "ddp: no policy fits: the model states alone take {} per rank (weights {}, gradients {}, optimizer {}, buckets {}) against {}",
        format_bytes(w + g + o + b),
        format_bytes(w),
        format_bytes(g),
        format_bytes(o),
        format_bytes(b),
        format_bytes(budget)
    )
}

#[test]
fn the_big_example_fits_fsdp_and_says_why_ddp_does_not_in_well_under_a_second() {
    let start = Instant::now();
    let out = big(&["--budget", "80GiB", "--gpus", "8"]);
    let took = start.elapsed();
    let text = stdout(&out);
    // The test profile is optimized (opt-level 2), so the binary is too; a generous bound.
    assert!(took < Duration::from_secs(2), "took {took:?}");
    assert!(text.contains("over 8 GPUs"), "{text}");
    assert!(text.contains("400 GB/s bus bandwidth"), "{text}");
    assert!(text.contains("override with --bus-bw"), "{text}");
    let fitting: Vec<&str> = text
        .lines()
        .skip_while(|l| !l.contains("configurations fit"))
        .skip(3)
        .take_while(|l| !l.is_empty())
        .collect();
    assert!(fitting.iter().any(|l| l.starts_with("fsdp ")), "{text}");
    assert!(fitting.iter().any(|l| l.starts_with("zero2 ")), "{text}");
    assert!(!fitting.iter().any(|l| l.starts_with("ddp ")), "{text}");
    // Every fitting row's communication is marked as modeled.
    assert!(fitting.iter().all(|l| l.contains(" modeled ")), "{text}");
    let sentence = ddp_states_sentence(80 * GIB);
    assert!(text.contains(&sentence), "want «{sentence}» in\n{text}");
    // Over 80 GiB: the model states of a full replica of 6.4B parameters (16+ bytes each).
    assert!(!text.contains("fsdp: no policy fits"), "{text}");
}

#[test]
fn json_rows_carry_the_rank_breakdown_fit_margin_and_both_times() {
    let budget = 80 * GIB;
    let out = big(&["--budget", "80GiB", "--gpus", "8", "--format", "json"]);
    let v: serde_json::Value = serde_json::from_str(&stdout(&out)).expect("JSON");
    assert_eq!(v["world"], 8);
    assert_eq!(v["batch_per_rank"], 1);
    assert_eq!(v["bus_bytes_per_s"].as_f64(), Some(400e9));
    let rows = v["rows"].as_array().expect("rows");
    let local = ModelShape {
        batch: 1,
        ..BIG_SHAPE
    };
    let per_strategy = headroom::report::plan::policies(&local).len();
    assert_eq!(rows.len(), Strategy::ALL.len() * per_strategy);
    let mut seen_fit = false;
    for r in rows {
        let strategy = Strategy::parse(r["strategy"].as_str().unwrap()).unwrap();
        assert_eq!(r["world"], 8);
        let peak = r["memory"]["peak"].as_u64().unwrap();
        for key in [
            "weights",
            "grads",
            "optimizer",
            "activations",
            "comm",
            "extra",
        ] {
            assert!(r["memory"][key].is_u64(), "{key} in {r}");
        }
        let fits = r["fits"].as_bool().unwrap();
        assert_eq!(fits, peak <= budget);
        // Fitting rows come first.
        if !fits {
            seen_fit = true;
        } else {
            assert!(!seen_fit, "a fitting row after a misfit: {r}");
        }
        assert_eq!(
            r["margin_bytes"].as_i64().unwrap(),
            budget as i64 - peak as i64
        );
        assert!(r["predicted_compute_s"].is_null(), "no report was given");
        assert!(r["modeled_comm_s"].as_f64().unwrap() > 0.0);
        let source = r["time_source"].as_str().unwrap();
        assert!(
            source.contains("communication: modeled at 400 GB/s"),
            "{source}"
        );
        assert!(source.contains("compute: no report given"), "{source}");
        // The row is the model's, on the rank that peaks.
        let policy = headroom::report::plan::policies(&local)
            .into_iter()
            .find(|p| {
                p.name() == r["policy"].as_str().unwrap()
                    && p.dtype.name() == r["dtype"].as_str().unwrap()
            })
            .expect("a planned policy");
        let (rank, m) = peak_rank(&BIG_SHAPE, &policy, &ShardSpec::new(strategy, 8));
        assert_eq!(r["rank"].as_u64().unwrap() as usize, rank);
        assert_eq!(peak, m.memory.peak);
        assert_eq!(
            r["modeled_comm_s"].as_f64().unwrap(),
            m.traffic.modeled_seconds(8, 400e9)
        );
    }
    let no_fit = v["no_fit"].as_array().unwrap();
    assert_eq!(no_fit.len(), 1, "{no_fit:?}");
    assert_eq!(no_fit[0]["strategy"], "ddp");
    assert_eq!(no_fit[0]["reason"], ddp_states_sentence(budget).as_str());
}

#[test]
fn one_strategy_rank0_extra_bucket_and_bus_bandwidth_are_honoured() {
    let json = |extra: &[&str]| -> serde_json::Value {
        let args = [
            &["--budget", "80GiB", "--gpus", "8", "--format", "json"][..],
            extra,
        ]
        .concat();
        serde_json::from_str(&stdout(&big(&args))).unwrap()
    };
    let base = json(&["--strategy", "zero3"]);
    let rows = base["rows"].as_array().unwrap();
    assert!(rows.iter().all(|r| r["strategy"] == "fsdp"));
    // Half the bandwidth, twice the modeled time.
    let slow = json(&["--strategy", "fsdp", "--bus-bw", "200GB/s"]);
    assert_eq!(slow["bus_bytes_per_s"].as_f64(), Some(200e9));
    for (a, b) in rows.iter().zip(slow["rows"].as_array().unwrap()) {
        let (x, y) = (
            a["modeled_comm_s"].as_f64().unwrap(),
            b["modeled_comm_s"].as_f64().unwrap(),
        );
        assert!((y / x - 2.0).abs() < 1e-9, "{x} {y}");
    }
    // Rank 0's extra bytes make it the rank that peaks, with the extra in its breakdown.
    let extra = json(&["--strategy", "fsdp", "--rank0-extra", "2GiB"]);
    for r in extra["rows"].as_array().unwrap() {
        assert_eq!(r["rank"], 0);
        assert_eq!(r["memory"]["extra"].as_u64(), Some(2 * GIB));
    }
    // DDP's bucket cap sets its bucket bytes (and so its states sentence).
    let small = json(&["--strategy", "ddp", "--bucket", "1MiB"]);
    let reason = small["no_fit"][0]["reason"].as_str().unwrap();
    let b: u64 = buckets(&BIG_SHAPE, 1 << 20)
        .iter()
        .map(|b| 4 * b.len as u64)
        .sum();
    assert!(
        reason.contains(&format!("buckets {}", format_bytes(b))),
        "{reason}"
    );
    assert_eq!(parse_rate("450GB/s").unwrap(), 450e9);
    assert_eq!(parse_rate("400GiB/s").unwrap(), 400.0 * GIB as f64);
    assert_eq!(parse_rate("1000").unwrap(), 1000.0);
    assert!(parse_rate("fast").is_err());
}

#[test]
fn one_gpu_plans_every_strategy_with_no_communication_time() {
    let out = headroom(&[
        "plan", "--layers", "2", "--hidden", "128", "--heads", "2", "--seq", "32", "--batch", "4",
        "--budget", "1GiB", "--gpus", "1", "--format", "json",
    ]);
    let v: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    let rows = v["rows"].as_array().unwrap();
    assert!(!rows.is_empty() && rows.iter().all(|r| r["fits"] == true));
    assert!(rows
        .iter()
        .all(|r| r["modeled_comm_s"].as_f64() == Some(0.0) && r["rank"] == 0));
    for s in Strategy::ALL {
        assert!(
            rows.iter().any(|r| r["strategy"] == s.name()),
            "{}",
            s.name()
        );
    }
    // Without --gpus the output is the single-device plan, as before.
    let plain = stdout(&headroom(&[
        "plan", "--layers", "2", "--hidden", "128", "--heads", "2", "--seq", "32", "--batch", "4",
        "--budget", "1GiB",
    ]));
    assert!(
        plain.starts_with("plan for L2-h128-heads2-n32-b4"),
        "{plain}"
    );
    assert!(!plain.contains("GPUs"), "{plain}");
}

#[test]
fn bad_input_is_one_sentence_and_a_nonzero_exit() {
    let cases: [(&[&str], &str); 9] = [
        (&["--gpus", "0"], "a world size of 0"),
        (
            &["--gpus", "8", "--strategy", "zero4"],
            "'zero4' is not a sharding strategy",
        ),
        (
            &["--gpus", "8", "--bucket", "0"],
            "a bucket size of 0 bytes",
        ),
        (
            &["--gpus", "8", "--bucket", "big"],
            "--bucket: 'big' is not a memory size",
        ),
        (&["--gpus", "2097152"], "beyond the 1048576"),
        (&["--gpus", "3"], "cannot be split evenly over 3 ranks"),
        (
            &["--gpus", "8", "--bus-bw", "fast"],
            "--bus-bw: 'fast' is not a bandwidth",
        ),
        (
            &["--gpus", "8", "--rank0-extra", "x"],
            "--rank0-extra: 'x' is not a memory size",
        ),
        (&["--strategy", "fsdp"], "add --gpus N"),
    ];
    for (extra, want) in cases {
        let out = big(&[&["--budget", "80GiB"][..], extra].concat());
        let err = String::from_utf8_lossy(&out.stderr).to_string();
        assert!(!out.status.success(), "{extra:?} succeeded");
        assert!(err.contains(want), "{extra:?}: {err}");
        assert!(
            !err.contains("panicked") && !err.contains("backtrace"),
            "{err}"
        );
        assert_eq!(err.trim_end().lines().count(), 1, "{extra:?}: {err}");
        assert!(out.stdout.is_empty(), "{extra:?}");
    }
    let out = big(&["--budget", "lots", "--gpus", "8"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("--budget: 'lots' is not a memory size"));
    // A batch that does not split over the GPUs is a usage error, as clap's are.
    assert_eq!(
        big(&["--budget", "80GiB", "--gpus", "3"]).status.code(),
        Some(2)
    );
}

const MEASURED: ModelShape = ModelShape {
    layers: 2,
    hidden: 128,
    heads: 2,
    seq: 16,
    batch: 2,
    arch: headroom::model::Arch::GPT,
};

fn cpu_session(budget: Option<u64>) -> Session {
    let be: Arc<dyn Backend> = Arc::new(CpuBackend::new(budget, None));
    let settings = Settings {
        profile: Profile::Quick,
        budget,
        seed: 5,
    };
    Session::new(be, &settings, "test")
}

#[test]
fn compute_is_predicted_for_the_rank_batch_and_communication_added_as_modeled() {
    let mut s = cpu_session(None);
    let policy = Policy {
        checkpoint: Checkpoint::None,
        attention: Variant::Flash,
        dtype: DType::Bf16,
        micro_batches: 1,
        head: headroom::model::HeadLoss::Materialized,
    };
    let case = TrainCase::new(MEASURED, policy);
    let prepared = s.prepare(&case);
    assert_eq!(prepared.record.status, Status::Ok, "{}", case.info().id);
    let mut timer = s.timer(prepared.instance.expect("valid"), prepared.host_only);
    timer.run(2).expect("timed");
    s.push(prepared.record, Some(timer)).unwrap();
    let report = s.report.clone();

    let global = ModelShape {
        layers: 4,
        hidden: 128,
        heads: 2,
        seq: 32,
        batch: 8,
        arch: headroom::model::Arch::GPT,
    };
    let mut opts = ShardOptions::new(4);
    opts.bus_bytes_per_s = 10e9;
    let planned = plan_sharded(&global, u64::MAX, Some(&report), &opts).unwrap();
    let local = ModelShape { batch: 2, ..global };
    let single = plan(&local, u64::MAX, Some(&report));
    let row = planned
        .rows
        .iter()
        .find(|r| r.strategy == "zero2" && r.policy == "none-flash-mb1" && r.dtype == DType::Bf16)
        .unwrap();
    let one = single
        .iter()
        .find(|r| r.policy == "none-flash-mb1" && r.dtype == DType::Bf16)
        .unwrap();
    assert_eq!(row.predicted_compute_s, one.predicted_step_s);
    let compute = row.predicted_compute_s.expect("measured");
    assert!(row.modeled_comm_s > 0.0);
    assert_eq!(row.predicted_step_s, Some(compute + row.modeled_comm_s));
    assert!(
        row.time_source.contains("train/none-flash-mb1/bf16/")
            && row
                .time_source
                .contains("communication: modeled at 10 GB/s"),
        "{}",
        row.time_source
    );
    // A GPU box's report with a measured all-reduce busBW is preferred to the default, and
    // --bus-bw to both; a CPU run's in-process rate is not an interconnect's.
    let dir = temp_dir("bus");
    let bus = |backend: &str, extra: &[&str]| -> serde_json::Value {
        let mut r = report.clone();
        r.device.backend = backend.into();
        r.ceilings.bus_bytes_per_s = Some(123e9);
        let path = dir.join(format!("{backend}.json"));
        r.write(&path).unwrap();
        let args = [
            &[
                "plan",
                "--layers",
                "4",
                "--hidden",
                "128",
                "--heads",
                "2",
                "--seq",
                "32",
                "--batch",
                "8",
                "--budget",
                "1GiB",
                "--gpus",
                "4",
                "--format",
                "json",
                "--report",
                path.to_str().unwrap(),
            ][..],
            extra,
        ]
        .concat();
        serde_json::from_str(&stdout(&headroom(&args))).unwrap()
    };
    let measured = bus("cuda", &[]);
    assert_eq!(measured["bus_bytes_per_s"].as_f64(), Some(123e9));
    assert!(measured["bus_source"]
        .as_str()
        .unwrap()
        .contains("the report's measured all-reduce busBW"));
    assert!(measured["rows"][0]["time_source"]
        .as_str()
        .unwrap()
        .contains("communication: modeled at 123 GB/s"));
    let given = bus("cuda", &["--bus-bw", "200GB/s"]);
    assert_eq!(given["bus_bytes_per_s"].as_f64(), Some(200e9));
    assert_eq!(bus("cpu", &[])["bus_bytes_per_s"].as_f64(), Some(400e9));

    // Known totals first, ascending.
    let fitting: Vec<Option<f64>> = planned.rows.iter().map(|r| r.predicted_step_s).collect();
    let known = fitting.iter().take_while(|t| t.is_some()).count();
    assert!(known > 0 && fitting[known..].iter().all(|t| t.is_none()));
    assert!(fitting[..known].windows(2).all(|w| w[0] <= w[1]));
}

fn temp_dir(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("headroom-plan-gpus-{}-{tag}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[test]
fn the_markdown_has_every_ranks_peak_and_links_the_world_size_plot() {
    let budget = 256 << 20;
    let mut s = cpu_session(Some(budget));
    let shape = ModelShape {
        layers: 2,
        hidden: 128,
        heads: 2,
        seq: 32,
        batch: 4,
        arch: headroom::model::Arch::GPT,
    };
    let policy = Policy {
        checkpoint: Checkpoint::Selective,
        attention: Variant::Flash,
        dtype: DType::Bf16,
        micro_batches: 1,
        head: headroom::model::HeadLoss::Materialized,
    };
    for strategy in [Strategy::Fsdp, Strategy::Ddp] {
        let case = ShardCase::new(shape, policy, ShardSpec::new(strategy, 2));
        let prepared = s.prepare(&case);
        assert_eq!(prepared.record.status, Status::Ok, "{}", case.info().id);
        s.push(prepared.record, None).unwrap();
    }
    let report: Report = s.report.clone();
    let md = markdown::render(&report);
    assert!(md.contains("## Sharded steps: every rank"), "{md}");
    assert!(md.contains("| case | strategy | world | rank | measured peak | model peak |"));
    for c in &report.cases {
        let rec = c.shard.as_ref().expect("a shard record");
        assert_eq!(rec.ranks.len(), 2);
        for r in &rec.ranks {
            let m = r.model.expect("modeled");
            let name = c.id.strip_prefix("shard/").unwrap();
            let line = format!(
                "| {name} | {} | 2 | {} | {} | {} | {} |",
                rec.strategy,
                r.rank,
                format_bytes(r.peak_allocated),
                format_bytes(m.peak),
                m.peak as i128 - r.peak_allocated as i128
            );
            assert!(md.contains(&line), "want {line} in\n{md}");
        }
    }
    let file = svg::world_plot_name(&report.device.slug());
    assert!(md.contains(&format!("]({file})")), "{md}");
    assert!(md.contains("2 sequence(s) per rank, so the global batch is 2 × the number of ranks"));
    assert!(md.contains(&format!(
        "Budget line: the run's budget, {}",
        format_bytes(budget)
    )));
    // The existing sections stay: the family's own table is still there.
    assert!(md.contains("\n## shard\n"), "{md}");

    let dir = temp_dir("md");
    report::write_all(&report, &dir).unwrap();
    let plot = std::fs::read_to_string(dir.join(&file)).expect("the plot beside the report");
    for s in Strategy::ALL {
        assert!(
            plot.contains(&format!("\n{}\n", s.name())),
            "{} missing",
            s.name()
        );
    }
    assert!(plot.contains("budget 256.00 MiB"));
    assert!(plot.contains("\n1024\n"));
    // The sweep is the model's, at a fixed per-rank batch.
    let sweep = svg::WorldSweep::of(&report).expect("a sharded case");
    assert_eq!(sweep.batch_per_rank, 2);
    let curves = sweep.curves();
    let fsdp = &curves.iter().find(|(s, _)| *s == Strategy::Fsdp).unwrap().1;
    let at = |w: usize| fsdp.iter().find(|(x, _)| *x == w).unwrap().1;
    let spec = ShardSpec::new(Strategy::Fsdp, 64);
    let expect = peak_rank(
        &ModelShape {
            batch: 128,
            ..shape
        },
        &policy,
        &spec,
    )
    .1
    .memory
    .peak;
    assert_eq!(at(64), expect);
    assert!(
        at(1024) < at(1),
        "FSDP's per-rank peak falls with the world"
    );
    // A report without sharded cases has neither the section nor the plot.
    let mut plain = report.clone();
    plain.cases.clear();
    assert!(!markdown::render(&plain).contains("Sharded steps"));
    report::write_all(&plain, &dir).unwrap();
    assert!(!dir.join(&file).exists(), "a stale plot is removed");
}
