//! The headroom command line: info, check, cases, report, compare.
//!
//! Every failure is one sentence on stderr and a non-zero exit; no backtraces.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};

use headroom::backend;
use headroom::harness::{matches_filters, nothing_matches, summary_line, Session, Settings};
use headroom::kernels;
use headroom::memory::format_bytes;
use headroom::model::ModelShape;
use headroom::report::{self, compare, Report, Status};
use headroom::techniques::{check_cases, registry};
use headroom::Error;

#[derive(Parser)]
#[command(
    name = "headroom",
    version,
    about = "What each memory-saving technique against CUDA out-of-memory errors costs in time and buys in peak device memory."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

// Parsed once per run: the size of the largest variant (plan's flags) costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
enum Command {
    /// The backend, the device's facts, the toolkit and driver, and the kernels built.
    Info,
    /// Validate every kernel and technique against the f64 references on fresh random inputs.
    Check {
        /// Only cases whose id contains one of these.
        filters: Vec<String>,
    },
    /// The cases of the current profile and backend (HEADROOM_PROFILE, HEADROOM_BACKEND).
    Cases {
        #[arg(long, value_enum, default_value_t = ListFormat::Text)]
        format: ListFormat,
    },
    /// Rebuild the Markdown summary and plots of the last `cargo bench` run (or of FILE).
    Report { file: Option<PathBuf> },
    /// Every training configuration that fits a model in a budget, fastest first.
    Plan {
        /// A published model (gpt2-small, llama2-7b, llama3-8b, mistral-7b, qwen2.5-7b); the
        /// size and architecture flags below override its values.
        #[arg(long)]
        model: Option<String>,
        #[arg(long)]
        layers: Option<usize>,
        #[arg(long)]
        hidden: Option<usize>,
        #[arg(long)]
        heads: Option<usize>,
        #[command(flatten)]
        arch: ArchArgs,
        /// Sequence length.
        #[arg(long)]
        seq: usize,
        /// Global batch (sequences per optimizer step).
        #[arg(long)]
        batch: usize,
        /// e.g. 24GiB, 80GB.
        #[arg(long)]
        budget: String,
        /// A report measured on the card to plan for (default: the latest in target/headroom).
        #[arg(long)]
        report: Option<PathBuf>,
        #[arg(long, value_enum, default_value_t = ListFormat::Text)]
        format: ListFormat,
        #[command(flatten)]
        shard: PlanShardArgs,
    },
    /// A PyTorch memory snapshot (`torch.cuda.memory._dump_snapshot`) replayed through
    /// every allocator, with the PYTORCH_CUDA_ALLOC_CONF setting that would have avoided its
    /// out-of-memory error.
    Replay {
        snapshot: PathBuf,
        /// The device's memory (default: what the snapshot's OOM shows the device had, else
        /// unbounded), e.g. 80GiB.
        #[arg(long)]
        capacity: Option<String>,
        /// Write the results as a report (JSON, Markdown, plots) into this folder.
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// One optimizer step of a training case, as the PyTorch memory snapshot its
    /// allocations would make (for PyTorch's memory viewer, or `headroom replay`).
    Snapshot {
        /// A training case id, as `headroom cases` lists them.
        case: String,
        /// Where the pickle goes.
        #[arg(long, short)]
        out: PathBuf,
        /// The allocator that serves the step (default: PyTorch's caching allocator).
        #[arg(long, default_value = "caching")]
        allocator: String,
    },
    /// The same cases side by side across reports (cards, versions, backends).
    Compare {
        #[arg(required = true, num_args = 2..)]
        reports: Vec<PathBuf>,
        #[arg(long, value_enum, default_value_t = compare::Format::Table)]
        format: compare::Format,
    },
}

/// `plan`'s data-parallel options: the budget is then per GPU, `--batch` the global batch.
#[derive(clap::Args)]
struct PlanShardArgs {
    /// Plan data-parallel training over this many GPUs: every sharding strategy, per rank.
    #[arg(long)]
    gpus: Option<usize>,
    /// ddp, zero1, zero2, fsdp (or zero3), fsdp-noreshard, or all.
    #[arg(long, default_value = "all")]
    strategy: String,
    /// Bytes rank 0 keeps besides the step (metrics, logging), e.g. 2GiB.
    #[arg(long)]
    rank0_extra: Option<String>,
    /// DDP's gradient bucket cap (PyTorch's bucket_cap_mb; default 25MiB).
    #[arg(long)]
    bucket: Option<String>,
    /// Bus bandwidth communication is modeled at, e.g. 450GB/s (default: the report's
    /// measured all-reduce busBW, else 400 GB/s for NVLink within one box).
    #[arg(long)]
    bus_bw: Option<String>,
}

#[derive(Clone, Copy, ValueEnum)]
enum ListFormat {
    Text,
    Json,
}

fn main() -> ExitCode {
    // Rust ignores SIGPIPE and then panics when printing into a closed pipe
    // (`headroom info | head`); restore the default so the process just ends.
    // SAFETY: called before any other thread exists; SIG_DFL is a valid handler.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Info => info(),
        Command::Check { filters } => check(&filters),
        Command::Cases { format } => cases(format),
        Command::Report { file } => rebuild_report(file),
        Command::Compare { reports, format } => compare_reports(&reports, format),
        Command::Replay {
            snapshot,
            capacity,
            out,
        } => replay(&snapshot, capacity.as_deref(), out),
        Command::Snapshot {
            case,
            out,
            allocator,
        } => export_snapshot(&case, &out, &allocator),
        Command::Plan {
            model,
            layers,
            hidden,
            heads,
            arch,
            seq,
            batch,
            budget,
            report,
            format,
            shard,
        } => match plan_shape(model.as_deref(), [layers, hidden, heads], &arch, seq, batch) {
            Ok(shape) => plan(shape, &budget, report, format, &shard),
            Err(e) => usage(e),
        },
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("headroom: {e}");
            ExitCode::FAILURE
        }
    }
}

type Outcome = Result<ExitCode, Error>;

fn info() -> Outcome {
    let be = backend::select(None)?;
    let f = be.facts();
    println!("backend: {}", be.kind().name());
    if let Some(reason) = &f.fallback_reason {
        println!("  not on a GPU: {reason}");
    }
    println!("device: {}", f.name);
    let opt = |v: Option<String>| v.unwrap_or_else(|| "-".into());
    if be.kind() == backend::BackendKind::Cuda {
        println!(
            "  compute capability: {}",
            opt(f.compute_capability.clone())
        );
        println!("  SMs: {}", opt(f.sm_count.map(|x| x.to_string())));
        println!("  memory: {}", opt(f.memory_bytes.map(format_bytes)));
        println!("  L2: {}", opt(f.l2_bytes.map(format_bytes)));
        println!(
            "  clocks: SM {} MHz, memory {} MHz, bus {} bits",
            opt(f.sm_clock_mhz.map(|x| x.to_string())),
            opt(f.memory_clock_mhz.map(|x| x.to_string())),
            opt(f.memory_bus_bits.map(|x| x.to_string()))
        );
        println!(
            "  driver supports CUDA {}",
            opt(f.driver_cuda_version.clone())
        );
        let usable = |k: backend::MatmulKernel| match be.matmul_available(k, headroom::DType::Bf16)
        {
            Ok(()) => "yes".to_string(),
            Err(why) => format!("no ({why})"),
        };
        println!("  wgmma matmul: {}", usable(backend::MatmulKernel::Wgmma));
        println!(
            "  wgmma matmul in bands of {} tile rows: {}",
            headroom::shapes::WGMMA_BAND_ROWS,
            usable(backend::MatmulKernel::WgmmaBanded)
        );
        println!(
            "  wgmma matmul on 128x256 tiles: {}",
            usable(backend::MatmulKernel::WgmmaWide)
        );
        println!(
            "  wgmma matmul on 128x256 tiles in 2x1 clusters: {}",
            usable(backend::MatmulKernel::WgmmaCluster)
        );
        println!(
            "  wgmma matmul on 128x256 tiles, C by TMA stores: {}",
            usable(backend::MatmulKernel::WgmmaTmaStore)
        );
        for kernel in backend::FlashForward::ALTERNATIVES {
            println!(
                "  flash forward {}: {}",
                kernel.technique(),
                match be.flash_forward_available(kernel) {
                    Ok(()) => "yes".to_string(),
                    Err(why) => format!("no ({why})"),
                }
            );
        }
        for kernel in backend::FlashBackward::ALTERNATIVES {
            println!(
                "  flash backward {}: {}",
                kernel.technique(),
                match be.flash_backward_available(kernel) {
                    Ok(()) => "yes".to_string(),
                    Err(why) => format!("no ({why})"),
                }
            );
        }
        println!(
            "  cuBLAS baseline: {}",
            usable(backend::MatmulKernel::Cublas)
        );
        // Which copies of the libraries were loaded (cuBLAS was loaded just above).
        for lib in ["libcuda.so", "libcublas.so", "libcublasLt.so"] {
            println!(
                "  {lib}: {}",
                loaded_library(lib).unwrap_or_else(|| "not loaded".into())
            );
        }
    }
    if kernels::built() {
        println!(
            "kernels: built by nvcc {} for {} (+ PTX compute_{})",
            kernels::NVCC_VERSION,
            kernels::CUDA_ARCHS
                .iter()
                .map(|a| format!("sm_{a}"))
                .collect::<Vec<_>>()
                .join(", "),
            kernels::PTX_ARCH
        );
        println!(
            "  {:<8} {:<48} {:>10} {:>5} {:>12} {:>6} {:>7}",
            "arch", "kernel", "file", "regs", "static smem", "stack", "spills"
        );
        for k in kernels::KERNEL_RESOURCES {
            println!(
                "  {:<8} {:<48} {:>10} {:>5} {:>12} {:>6} {:>7}",
                k.arch,
                k.kernel,
                k.file.trim_end_matches(".cu"),
                k.registers,
                k.shared_bytes,
                k.stack_bytes,
                k.spill_stores + k.spill_loads
            );
        }
    } else {
        println!("kernels: none (built without nvcc: CPU backend only)");
    }
    Ok(ExitCode::SUCCESS)
}

/// The file a shared library was loaded from, read from the process's memory map.
fn loaded_library(name: &str) -> Option<String> {
    let maps = std::fs::read_to_string("/proc/self/maps").ok()?;
    maps.lines()
        .filter_map(|l| l.split_whitespace().nth(5))
        .find(|path| {
            path.rsplit('/')
                .next()
                .is_some_and(|file| file.starts_with(name))
        })
        .map(str::to_string)
}

fn check(filters: &[String]) -> Outcome {
    let settings = Settings::from_env()?;
    let be = backend::select(settings.budget)?;
    let cases: Vec<_> = check_cases(be.kind())
        .into_iter()
        .filter(|c| matches_filters(&c.info().id, filters))
        .collect();
    if cases.is_empty() {
        return Err(nothing_matches(filters));
    }
    println!(
        "checking on the {} backend ({}), seed {} (HEADROOM_SEED replays it)",
        be.kind().name(),
        be.facts().name,
        settings.seed
    );
    let mut session = Session::new(be.clone(), &settings, "check");
    session.strict_memory(true);
    let (mut passed, mut failed, mut skipped) = (0, 0, 0);
    for case in cases {
        let prepared = session.prepare(case.as_ref());
        let record = session.push(prepared.record, None)?;
        match record.status {
            Status::Ok => passed += 1,
            Status::Skipped(_) => skipped += 1,
            _ => failed += 1,
        }
        let verdict = match record.status {
            Status::Ok => "PASS",
            Status::Skipped(_) => "SKIP",
            _ => "FAIL",
        };
        let memory_ok = record
            .memory
            .as_ref()
            .is_none_or(|m| m.peak_allocated == m.predicted || record.status != Status::Ok);
        println!("{verdict} {}", summary_line(record));
        if !memory_ok {
            let m = record.memory.as_ref().expect("checked");
            println!(
                "FAIL {}: peak {} bytes differs from the model's {} bytes",
                record.id, m.peak_allocated, m.predicted
            );
            failed += 1;
        }
    }
    println!("check: {passed} passed, {failed} failed, {skipped} skipped");
    Ok(if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn cases(format: ListFormat) -> Outcome {
    let settings = Settings::from_env()?;
    let kind = match std::env::var("HEADROOM_BACKEND").as_deref() {
        Ok("cpu") => backend::BackendKind::Cpu,
        Ok("cuda") => backend::BackendKind::Cuda,
        _ => backend::select(None)?.kind(),
    };
    let infos: Vec<_> = registry(settings.profile, kind)
        .iter()
        .map(|c| c.info().clone())
        .collect();
    match format {
        ListFormat::Json => println!(
            "{}",
            serde_json::to_string_pretty(&infos).expect("serializable")
        ),
        ListFormat::Text => {
            for i in &infos {
                println!("{}  model {}", i.id, format_bytes(i.predicted_peak_bytes));
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn rebuild_report(file: Option<PathBuf>) -> Outcome {
    let path = match file {
        Some(p) => p,
        None => latest_report(&report::report_dir())?,
    };
    let mut r = Report::read(&path)?;
    r.finalize();
    let dir = path
        .parent()
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("."));
    let json = report::write_all(&r, &dir)?;
    println!("report: {}", json.display());
    Ok(ExitCode::SUCCESS)
}

fn latest_report(dir: &std::path::Path) -> Result<PathBuf, Error> {
    let entries = std::fs::read_dir(dir).map_err(|_| {
        Error::Invalid(format!(
            "no report in {}: run `cargo bench` first, or name a report file",
            dir.display()
        ))
    })?;
    entries
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .max_by_key(|p| p.metadata().and_then(|m| m.modified()).ok())
        .ok_or_else(|| {
            Error::Invalid(format!(
                "no report in {}: run `cargo bench` first, or name a report file",
                dir.display()
            ))
        })
}

fn plan(
    shape: ModelShape,
    budget: &str,
    report: Option<PathBuf>,
    format: ListFormat,
    shard: &PlanShardArgs,
) -> Outcome {
    shape.check()?;
    let budget = headroom::memory::parse_bytes(budget)
        .map_err(|e| Error::Invalid(format!("--budget: {e}")))?;
    let path = match report {
        Some(p) => Some(p),
        None => latest_report(&report::report_dir()).ok(),
    };
    let loaded = path.as_ref().map(|p| Report::read(p)).transpose()?;
    if shard.gpus.is_some() {
        return plan_gpus(shape, budget, path, loaded, format, shard);
    }
    let without = [
        ("--strategy", shard.strategy != "all"),
        ("--rank0-extra", shard.rank0_extra.is_some()),
        ("--bucket", shard.bucket.is_some()),
        ("--bus-bw", shard.bus_bw.is_some()),
    ];
    if let Some((flag, _)) = without.iter().find(|(_, given)| *given) {
        return usage(Error::Invalid(format!(
            "{flag} applies to data-parallel plans only; add --gpus N"
        )));
    }
    let rows = report::plan::plan(&shape, budget, loaded.as_ref());
    match format {
        ListFormat::Json => println!(
            "{}",
            serde_json::to_string_pretty(&rows).expect("serializable")
        ),
        ListFormat::Text => {
            let label = path
                .as_ref()
                .zip(loaded.as_ref())
                .map(|(p, r)| format!("{} ({})", p.display(), r.device.name));
            print!(
                "{}",
                report::plan::render(&shape, budget, label.as_deref(), &rows)
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// The architecture flags of `plan`.
#[derive(clap::Args, Debug)]
struct ArchArgs {
    /// K/V heads (grouped-query attention); default: as many as heads.
    #[arg(long)]
    kv_heads: Option<usize>,
    /// The MLP's intermediate size; default 4 x hidden.
    #[arg(long)]
    ffn: Option<usize>,
    /// Vocabulary size: adds the embedding, final norm, LM head and cross-entropy.
    #[arg(long)]
    vocab: Option<usize>,
    /// gelu or swiglu.
    #[arg(long)]
    mlp: Option<String>,
    /// layernorm or rmsnorm.
    #[arg(long)]
    norm: Option<String>,
    /// Which linear layers carry a bias: all, qkv or none.
    #[arg(long)]
    bias: Option<String>,
    /// The LM head is the embedding's table.
    #[arg(long)]
    tied: bool,
    /// Rows of a learned position table.
    #[arg(long)]
    positions: Option<usize>,
}

/// The model `plan` is asked about: a preset (or none) with the flags given by hand on top.
fn plan_shape(
    preset: Option<&str>,
    [layers, hidden, heads]: [Option<usize>; 3],
    a: &ArchArgs,
    seq: usize,
    batch: usize,
) -> Result<ModelShape, Error> {
    use headroom::model::{Bias, Mlp, Norm, Preset};
    // A preset as published (its count checked), unless flags change it: then as changed.
    let changed = layers.is_some()
        || hidden.is_some()
        || heads.is_some()
        || a.kv_heads.is_some()
        || a.ffn.is_some()
        || a.vocab.is_some()
        || a.mlp.is_some()
        || a.norm.is_some()
        || a.bias.is_some()
        || a.tied
        || a.positions.is_some();
    let mut shape = match preset {
        Some(name) if changed => Preset::find(name)?.unchecked_shape(seq, batch),
        Some(name) => Preset::find(name)?.shape(seq, batch)?,
        None => ModelShape::gpt(0, 0, 0, seq, batch),
    };
    let missing: Vec<&str> = [
        ("--layers", layers),
        ("--hidden", hidden),
        ("--heads", heads),
    ]
    .iter()
    .filter(|(_, v)| preset.is_none() && v.is_none())
    .map(|(f, _)| *f)
    .collect();
    if !missing.is_empty() {
        return Err(Error::Invalid(format!(
            "plan needs --model NAME or the model's size ({} missing)",
            missing.join(", ")
        )));
    }
    shape.layers = layers.unwrap_or(shape.layers);
    shape.hidden = hidden.unwrap_or(shape.hidden);
    shape.heads = heads.unwrap_or(shape.heads);
    let arch = &mut shape.arch;
    arch.kv_heads = a.kv_heads.unwrap_or(arch.kv_heads);
    arch.ffn = a.ffn.unwrap_or(arch.ffn);
    arch.vocab = a.vocab.unwrap_or(arch.vocab);
    arch.positions = a.positions.unwrap_or(arch.positions);
    arch.tied |= a.tied;
    let choice = |flag: &str, text: &str, names: &[&str]| -> Result<usize, Error> {
        names
            .iter()
            .position(|n| n.eq_ignore_ascii_case(text.trim()))
            .ok_or_else(|| {
                Error::Invalid(format!(
                    "{flag} {text}: expected one of {}",
                    names.join(", ")
                ))
            })
    };
    if let Some(m) = &a.mlp {
        arch.mlp = [Mlp::Gelu, Mlp::SwiGlu][choice("--mlp", m, &["gelu", "swiglu"])?];
    }
    if let Some(n) = &a.norm {
        arch.norm =
            [Norm::LayerNorm, Norm::RmsNorm][choice("--norm", n, &["layernorm", "rmsnorm"])?];
    }
    if let Some(b) = &a.bias {
        arch.bias =
            [Bias::All, Bias::Qkv, Bias::None][choice("--bias", b, &["all", "qkv", "none"])?];
    }
    shape.check()?;
    Ok(shape)
}

/// One sentence on stderr and exit status 2, as clap reports a bad argument.
fn usage(e: Error) -> Outcome {
    eprintln!("headroom: {e}");
    Ok(ExitCode::from(2))
}

/// `plan --gpus N`: every strategy × policy per rank, fastest first.
fn plan_gpus(
    shape: ModelShape,
    budget: u64,
    path: Option<PathBuf>,
    loaded: Option<Report>,
    format: ListFormat,
    args: &PlanShardArgs,
) -> Outcome {
    use headroom::report::plan::{parse_rate, plan_sharded, render_sharded, ShardOptions};
    use headroom::shard::Strategy;
    let mut opts = ShardOptions::new(args.gpus.unwrap_or(1));
    if !args.strategy.trim().eq_ignore_ascii_case("all") {
        match Strategy::parse(&args.strategy) {
            Ok(s) => opts.strategies = vec![s],
            Err(e) => return usage(Error::Invalid(format!("--strategy: {e}, or all"))),
        }
    }
    let size = |flag: &str, text: &Option<String>| -> Result<Option<u64>, Error> {
        text.as_deref()
            .map(|t| {
                if t.trim().parse::<f64>() == Ok(0.0) {
                    return Ok(0);
                }
                headroom::memory::parse_bytes(t).map_err(|e| Error::Invalid(format!("{flag}: {e}")))
            })
            .transpose()
    };
    match size("--bucket", &args.bucket) {
        Ok(Some(b)) => opts.bucket_bytes = b,
        Ok(None) => {}
        Err(e) => return usage(e),
    }
    match size("--rank0-extra", &args.rank0_extra) {
        Ok(Some(b)) => opts.rank0_extra = b,
        Ok(None) => {}
        Err(e) => return usage(e),
    }
    // A CPU run's "collectives" are host copies between threads: no interconnect's rate.
    let measured = loaded
        .as_ref()
        .filter(|r| r.device.backend != "cpu")
        .and_then(|r| r.ceilings.bus_bytes_per_s);
    match (&args.bus_bw, measured) {
        (Some(text), _) => match parse_rate(text) {
            Ok(rate) => {
                opts.bus_bytes_per_s = rate;
                opts.bus_source = "given with --bus-bw".into();
            }
            Err(e) => return usage(Error::Invalid(format!("--bus-bw: {e}"))),
        },
        (None, Some(rate)) if rate > 0.0 => {
            opts.bus_bytes_per_s = rate;
            opts.bus_source =
                "the report's measured all-reduce busBW; override with --bus-bw".into();
        }
        _ => {}
    }
    let plan = match plan_sharded(&shape, budget, loaded.as_ref(), &opts) {
        Ok(p) => p,
        Err(e) => return usage(e),
    };
    match format {
        ListFormat::Json => println!(
            "{}",
            serde_json::to_string_pretty(&plan).expect("serializable")
        ),
        ListFormat::Text => {
            let label = path
                .as_ref()
                .zip(loaded.as_ref())
                .map(|(p, r)| format!("{} ({})", p.display(), r.device.name));
            print!("{}", render_sharded(&plan, label.as_deref()));
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn compare_reports(paths: &[PathBuf], format: compare::Format) -> Outcome {
    let reports = paths
        .iter()
        .map(|p| Report::read(p).map(|r| (p.display().to_string(), r)))
        .collect::<Result<Vec<_>, _>>()?;
    print!("{}", compare::render(&reports, format));
    Ok(ExitCode::SUCCESS)
}

fn replay(path: &std::path::Path, capacity: Option<&str>, out: Option<PathBuf>) -> Outcome {
    use headroom::alloc::snapshot;
    let capacity = capacity.map(headroom::memory::parse_bytes).transpose()?;
    // A bar on a terminal for traces long enough to wait for; nothing otherwise.
    let bar = indicatif::ProgressBar::hidden();
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "replaying {bar:40} {pos}/{len} trace entries {eta}",
        )
        .map_err(|e| Error::Invalid(format!("progress bar: {e}")))?,
    );
    let results = snapshot::replay_file(path, capacity, &mut |done, all| {
        if all >= 100_000 && bar.is_hidden() {
            bar.set_draw_target(indicatif::ProgressDrawTarget::stderr());
        }
        bar.set_length(all);
        bar.set_position(done);
    })?;
    bar.finish_and_clear();
    for r in &results {
        println!(
            "{} device {}: {} events{}{}; replayed on {} ({})",
            path.display(),
            r.device,
            r.events,
            match r.preexisting {
                0 => String::new(),
                n => format!(", {n} blocks allocated before recording began (allocated first)"),
            },
            match r.unmatched_frees {
                0 => String::new(),
                n => format!(", {n} frees of unknown blocks skipped"),
            },
            if r.capacity >= snapshot::UNBOUNDED {
                "an unbounded device".to_string()
            } else {
                format!("a device of {}", format_bytes(r.capacity))
            },
            match (capacity, &r.oom) {
                (Some(_), _) => "--capacity".to_string(),
                (None, Some(o)) => format!(
                    "the snapshot's OOM: {} reserved + {} free",
                    format_bytes(o.reserved),
                    format_bytes(o.device_free)
                ),
                (None, None) => {
                    "no OOM in the snapshot and no --capacity, so nothing can run out".into()
                }
            }
        );
        if let Some(o) = &r.oom {
            println!(
                "the recorded run ran out of memory asking for {} at {}",
                format_bytes(o.requested),
                o.frame
            );
        }
        println!(
            "\n{:<34} {:>12} {:>12} {:>9} {:>8}  first out of memory",
            "allocator", "allocated", "reserved", "res/alloc", "driver"
        );
        for (spec, m) in &r.rows {
            let oom = match &m.oom {
                None => "none".to_string(),
                Some(o) => format!(
                    "event {} ({}){}",
                    o.event,
                    format_bytes(o.requested),
                    if o.despite_free_memory() {
                        ", despite enough free memory"
                    } else {
                        ""
                    }
                ),
            };
            println!(
                "{:<34} {:>12} {:>12} {:>9.3} {:>8}  {oom}",
                spec.to_string(),
                format_bytes(m.peak_allocated),
                format_bytes(m.peak_reserved),
                m.reserved_over_allocated,
                m.driver_calls
            );
        }
        let f = &r.fidelity;
        if f.snapshot_segments == 0 {
            println!(
                "\nfidelity: not measured: the snapshot records no segment actions to compare with (the replay through {} made {})",
                f.allocator, f.replay_segments
            );
        } else {
            println!(
                "\nfidelity: replayed through {} (the allocator the snapshot was recorded under), {} of {} segment actions match the snapshot's ({:.1}%), reserved bytes within {:.2}% of its peak ({}) at every event",
                f.allocator,
                f.matched,
                f.snapshot_segments.max(f.replay_segments),
                100.0 * f.matched_fraction(),
                100.0 * f.reserved_error,
                format_bytes(f.snapshot_peak_reserved)
            );
        }
        match r.recommendation.as_ref().and_then(|s| {
            snapshot::alloc_conf(s).map(|c| (s, c))
        }) {
            Some((s, conf)) if conf.is_empty() => println!(
                "recommendation: PyTorch's defaults ({s}) never run out of memory here and reserve the least"
            ),
            Some((s, conf)) => println!(
                "recommendation ({s}, the lowest peak reserved that never runs out of memory):\nPYTORCH_CUDA_ALLOC_CONF={conf}"
            ),
            None => println!(
                "recommendation: none: every allocator PyTorch can be set to runs out of memory on this trace at {}",
                format_bytes(r.capacity)
            ),
        }
        println!();
    }
    if let Some(dir) = out {
        std::fs::create_dir_all(&dir)
            .map_err(|e| Error::Io(format!("could not create {}: {e}", dir.display())))?;
        let mut report = snapshot::to_report(&results, &snapshot::stem(path));
        report.finalize();
        let json = report::write_all(&report, &dir)?;
        let slug = report.device.slug();
        let plots = report::svg::write_replay(&results, &dir, &slug)?;
        // The report's Markdown links the replay's timelines.
        let md = dir.join(format!("{slug}.md"));
        let mut text = std::fs::read_to_string(&md)
            .map_err(|e| Error::Io(format!("could not read {}: {e}", md.display())))?;
        text.push_str("\n## Replay timelines\n\n");
        for p in &plots {
            let name = p
                .file_name()
                .map(|n| n.to_string_lossy())
                .unwrap_or_default();
            text.push_str(&format!("![{name}]({name})\n\n"));
        }
        report::write_atomic(&md, text.as_bytes())?;
        println!("report: {} (timelines: {})", json.display(), plots.len());
    }
    Ok(ExitCode::SUCCESS)
}

fn export_snapshot(case: &str, out: &std::path::Path, allocator: &str) -> Outcome {
    use headroom::alloc::{snapshot, AllocatorSpec};
    let spec = AllocatorSpec::parse(allocator)?;
    let (shape, policy) = headroom::model::parse_train_id(case)?;
    let trace = headroom::techniques::alloc::training_trace(case, shape, policy, 1)?;
    let capacity = trace.capacity.unwrap_or(u64::MAX / 4);
    let value = snapshot::record(&trace, spec, capacity)?;
    snapshot::write(out, &value)?;
    println!(
        "{}: one step of {case} ({} events, peak of live bytes {}) through {spec} on a {} device",
        out.display(),
        trace.events.len(),
        format_bytes(trace.peak_live_bytes()),
        format_bytes(capacity)
    );
    Ok(ExitCode::SUCCESS)
}
