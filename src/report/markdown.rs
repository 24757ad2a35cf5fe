//! The Markdown summary beside the JSON: what a person reads first. One header with the
//! machine and the run, then one table per family with every case's time, rate, memory,
//! validation, and what it saves or costs against the family's baseline.

use std::fmt::Write as _;

use crate::memory::format_bytes;
use crate::report::{CaseRecord, Report, Status};

pub fn render(report: &Report) -> String {
    let mut out = String::new();
    let d = &report.device;
    let opt = |v: Option<String>| v.unwrap_or_else(|| "-".into());
    let _ = writeln!(out, "# headroom report: {}\n", d.name);
    let _ = writeln!(out, "| | |\n| --- | --- |");
    let mut fact = |k: &str, v: String| {
        let _ = writeln!(out, "| {k} | {} |", cell(&v));
    };
    fact("device", format!("{} ({} backend)", d.name, d.backend));
    if let Some(reason) = &d.fallback_reason {
        fact("not on a GPU", reason.clone());
    }
    fact("compute capability", opt(d.compute_capability.clone()));
    fact("SMs", opt(d.sm_count.map(|x| x.to_string())));
    fact("memory", opt(d.memory_bytes.map(format_bytes)));
    fact("L2", opt(d.l2_bytes.map(format_bytes)));
    if d.sm_clock_mhz.is_some() || d.memory_clock_mhz.is_some() || d.memory_bus_bits.is_some() {
        fact(
            "clocks",
            format!(
                "SM {} MHz, memory {} MHz, bus {} bits",
                opt(d.sm_clock_mhz.map(|x| x.to_string())),
                opt(d.memory_clock_mhz.map(|x| x.to_string())),
                opt(d.memory_bus_bits.map(|x| x.to_string()))
            ),
        );
    }
    fact("driver CUDA", opt(d.driver_cuda_version.clone()));
    fact("nvcc", opt(d.nvcc_version.clone()));
    fact(
        "suite",
        format!("headroom {} at {}", report.suite_version, report.commit),
    );
    fact("schema", report.schema.clone());
    fact(
        "created",
        format!(
            "{} (Unix {})",
            utc_date(report.created_unix),
            report.created_unix
        ),
    );
    fact("profile", report.profile.clone());
    fact(
        "budget",
        report
            .budget_bytes
            .map(format_bytes)
            .unwrap_or_else(|| "none (the device's memory)".into()),
    );
    if let Some(a) = &report.allocator {
        fact(
            "allocator",
            format!("{a} (reserved figures simulated on each case's requests)"),
        );
    }
    fact(
        "seed",
        format!("{} (HEADROOM_SEED replays it)", report.seed),
    );

    if !report.warnings.is_empty() {
        let _ = writeln!(out, "\n## Warnings\n");
        for w in &report.warnings {
            let _ = writeln!(out, "- {w}");
        }
    }

    let c = &report.ceilings;
    let not_measured = || "not measured".to_string();
    let _ = writeln!(out, "\n## Measured ceilings\n");
    let _ = writeln!(
        out,
        "- copy bandwidth: {}",
        c.copy_bytes_per_s
            .map(|r| format!("{:.1} GB/s", r / 1e9))
            .unwrap_or_else(not_measured)
    );
    let _ = writeln!(
        out,
        "- cuBLAS fp32 matmul: {}",
        c.cublas_f32_flops_per_s
            .map(|r| format!("{:.2} TFLOP/s", r / 1e12))
            .unwrap_or_else(not_measured)
    );
    let _ = writeln!(
        out,
        "- cuBLAS bf16 matmul: {}",
        c.cublas_bf16_flops_per_s
            .map(|r| format!("{:.2} TFLOP/s", r / 1e12))
            .unwrap_or_else(not_measured)
    );

    if !report.headline.is_empty() {
        let _ = writeln!(out, "\n## Longest sequence under a budget\n");
        let _ = writeln!(
            out,
            "Attention forward+backward, batch 1: the longest N whose memory model fits the budget, \
             then real runs at N and N + 1 under that budget.\n"
        );
        let _ = writeln!(out, "| budget | variant | dtype | heads × d | longest N | model at N | model at N + 1 | run at N | run at N + 1 |");
        let _ = writeln!(
            out,
            "| --- | --- | --- | --- | ---: | ---: | ---: | --- | --- |"
        );
        for h in &report.headline {
            let _ = writeln!(
                out,
                "| {} | {} | {} | {} × {} | {} | {} bytes | {} bytes | {} | {} |",
                format_bytes(h.budget_bytes),
                h.variant,
                h.dtype.name(),
                h.heads,
                h.head_dim,
                h.longest_seq,
                h.model_bytes_at_longest,
                h.model_bytes_one_more,
                cell(&h.run_at_longest),
                cell(&h.run_one_more)
            );
        }
    }

    let shootout: Vec<&crate::alloc::AllocatorMetrics> = report
        .cases
        .iter()
        .filter_map(|c| c.allocator.as_ref())
        .collect();
    if !shootout.is_empty() {
        let _ = writeln!(out, "\n## Allocators: reserved against allocated\n");
        let _ = writeln!(
            out,
            "Each allocator replays the same allocation trace on a simulated device of the stated \
             capacity. \"Out of memory despite free memory\" means the capacity minus the live \
             requests would have held the request: fragmentation, not size.\n"
        );
        let _ = writeln!(
            out,
            "Peaks in the words of `torch.cuda.memory_stats`: requested is the bytes the trace \
             asked for; allocated the blocks handed out (rounded, with unsplit slack: \
             `max_memory_allocated`); active the blocks in use or awaiting a stream (equal to \
             allocated: the traces have no cross-stream uses); reserved what the allocator holds \
             from the device (`max_memory_reserved`). The `pool` row is a model of the driver's \
             stream-ordered pool, whose policy NVIDIA does not document: its assumptions are in \
             the README.\n"
        );
        let _ = writeln!(out, "| trace | allocator | capacity | peak requested | peak allocated | peak active | peak reserved | reserved / allocated | driver calls | alloc p50 / p99 (ns) | out of memory |");
        let _ = writeln!(
            out,
            "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"
        );
        for m in shootout {
            let oom = match &m.oom {
                None => "no".to_string(),
                Some(_) if m.oom_despite_free_memory => format!(
                    "yes, despite free memory (event {} of {})",
                    m.events_replayed, m.events
                ),
                Some(_) => format!("yes (event {} of {})", m.events_replayed, m.events),
            };
            let _ = writeln!(
                out,
                "| {} | {} | {} | {} | {} | {} | {} | {:.2} | {} | {:.0} / {:.0} | {} |",
                cell(&m.trace),
                cell(&m.allocator),
                format_bytes(m.capacity),
                format_bytes(m.peak_requested),
                format_bytes(m.peak_allocated),
                format_bytes(m.peak_active),
                format_bytes(m.peak_reserved),
                m.reserved_over_allocated,
                m.driver_calls,
                m.alloc_latency_median_ns,
                m.alloc_latency_p99_ns,
                cell(&oom)
            );
        }
    }

    for family in families(&report.cases) {
        let cases: Vec<&CaseRecord> = report.cases.iter().filter(|c| c.family == family).collect();
        let _ = writeln!(out, "\n## {family}\n");
        if let Some(base) = baseline_technique(&family) {
            let _ = writeln!(
                out,
                "Baseline: `{base}` on the same dtype and shape; \"less memory\" is its peak \
                 allocated over the case's, \"speed\" its median time over the case's \
                 (above 1: faster than the baseline).\n"
            );
        }
        let header = [
            "case",
            "status",
            "median ms (p10–p90)",
            "rate",
            "of ceiling",
            "peak allocated",
            "predicted",
            "peak reserved",
            "error / tolerance",
            "vs baseline",
        ];
        let rows: Vec<Vec<String>> = cases.iter().map(|c| case_row(c, &report.cases)).collect();
        out.push_str(&table(&header, &rows));
    }
    shard_section(&mut out, report);
    out
}

/// Every rank of every sharded case, measured beside the per-rank model, and the model's
/// per-rank peak against world size.
fn shard_section(out: &mut String, report: &Report) {
    let sharded: Vec<&CaseRecord> = report.cases.iter().filter(|c| c.shard.is_some()).collect();
    if sharded.is_empty() {
        return;
    }
    let _ = writeln!(out, "\n## Sharded steps: every rank\n");
    let _ = writeln!(
        out,
        "Each rank's peak allocated, measured on its own allocator, beside the per-rank \
         analytic model's peak and what the model holds at that moment (\"model − measured\" \
         in bytes: 0 is exact).\n"
    );
    let header = [
        "case",
        "strategy",
        "world",
        "rank",
        "measured peak",
        "model peak",
        "model − measured",
        "weights",
        "gradients",
        "optimizer",
        "inputs",
        "activations",
        "workspace",
        "comm",
        "extra",
    ];
    let mut rows = Vec::new();
    for c in sharded {
        let s = c.shard.as_ref().expect("filtered");
        let name =
            c.id.strip_prefix(&format!("{}/", c.family))
                .unwrap_or(&c.id)
                .to_string();
        for r in &s.ranks {
            let mut row = vec![
                name.clone(),
                s.strategy.clone(),
                s.world.to_string(),
                r.rank.to_string(),
                format_bytes(r.peak_allocated),
            ];
            match &r.model {
                Some(m) => row.extend([
                    format_bytes(m.peak),
                    (m.peak as i128 - r.peak_allocated as i128).to_string(),
                    format_bytes(m.weights),
                    format_bytes(m.grads),
                    format_bytes(m.optimizer),
                    format_bytes(m.inputs),
                    format_bytes(m.activations),
                    format_bytes(m.workspace),
                    format_bytes(m.comm),
                    format_bytes(m.extra),
                ]),
                None => row.extend(std::iter::repeat_n("-".to_string(), 10)),
            }
            rows.push(row);
        }
    }
    out.push_str(&table(&header, &rows));
    if let Some(sweep) = crate::report::svg::WorldSweep::of(report) {
        let file = crate::report::svg::world_plot_name(&report.device.slug());
        let b = sweep.batch_per_rank;
        let budget = match (report.budget_bytes, report.device.memory_bytes) {
            (Some(x), _) => format!("the run's budget, {}", format_bytes(x)),
            (None, Some(x)) => format!("the device's memory, {}", format_bytes(x)),
            (None, None) => "none: the run had no budget and the device reports no memory".into(),
        };
        let _ = writeln!(
            out,
            "\n![per-rank peak against world size]({file})\n\n\
             The model's peak on the rank that peaks, for every strategy, at 1 to {} ranks: \
             `{} {}` on the shape of `{}` with {b} sequence(s) per rank, so the global batch is \
             {b} × the number of ranks. Budget line: {budget}.",
            crate::report::svg::SWEEP_WORLDS[crate::report::svg::SWEEP_WORLDS.len() - 1],
            sweep.policy.name(),
            sweep.policy.dtype.name(),
            sweep.case_id,
        );
    }
}

/// The families in the order their first case appears (the registry's order).
pub(crate) fn families(cases: &[CaseRecord]) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for c in cases {
        if !out.contains(&c.family) {
            out.push(c.family.clone());
        }
    }
    out
}

/// The technique each family is measured against. cuBLAS is the speed a hand-written
/// matmul aims at; naive attention is what flash attention exists to save memory over.
pub(crate) fn baseline_technique(family: &str) -> Option<&'static str> {
    match family {
        "matmul" => Some("cublas"),
        "attention" => Some("naive"),
        "train" => Some("none-<attention>-mb1"),
        _ => None,
    }
}

/// The technique of a case's baseline: the family's, or for a training step the same
/// attention and precision without checkpointing, in one batch (`none-flash-mb1`).
fn baseline_of(case: &CaseRecord) -> Option<String> {
    match case.family.as_str() {
        "train" => case
            .technique
            .split_once('-')
            .and_then(|(_, rest)| rest.rsplit_once("-mb"))
            .map(|(attention, _)| format!("none-{attention}-mb1")),
        family => baseline_technique(family).map(str::to_string),
    }
}

/// The baseline record of a case: the family's baseline technique on the same dtype and
/// shape (an attention shape names its pass, so forward is held to forward).
pub(crate) fn baseline_for<'a>(
    case: &CaseRecord,
    cases: &'a [CaseRecord],
) -> Option<&'a CaseRecord> {
    let technique = baseline_of(case)?;
    if case.technique == technique {
        return None;
    }
    cases.iter().find(|b| {
        b.family == case.family
            && b.technique == technique
            && b.dtype == case.dtype
            && b.shape == case.shape
    })
}

/// What a case saves or costs against its baseline, in one cell.
fn versus_baseline(case: &CaseRecord, cases: &[CaseRecord]) -> String {
    if baseline_of(case).as_deref() == Some(case.technique.as_str()) {
        return "baseline".into();
    }
    let Some(base) = baseline_for(case, cases) else {
        return "-".into();
    };
    if case.status != Status::Ok {
        return "-".into();
    }
    if base.status != Status::Ok {
        return format!("{} {}", base.technique, base.status.name());
    }
    let mut parts = Vec::new();
    if let (Some(m), Some(bm)) = (&case.memory, &base.memory) {
        if m.peak_allocated > 0 {
            let ratio = bm.peak_allocated as f64 / m.peak_allocated as f64;
            parts.push(if (ratio - 1.0).abs() < 0.005 {
                "same memory".to_string()
            } else if ratio > 1.0 {
                format!("{ratio:.2}x less memory")
            } else {
                format!("{:.2}x more memory", 1.0 / ratio)
            });
        }
    }
    if let (Some(t), Some(bt)) = (&case.time, &base.time) {
        parts.push(format!("{:.2}x speed", bt.median_s / t.median_s));
    }
    if parts.is_empty() {
        return "-".into();
    }
    format!("{} vs {}", parts.join(", "), base.technique)
}

fn case_row(c: &CaseRecord, all: &[CaseRecord]) -> Vec<String> {
    let name =
        c.id.strip_prefix(&format!("{}/", c.family))
            .unwrap_or(&c.id)
            .to_string();
    let status = match c.status.message() {
        Some(m) => format!("{}: {m}", c.status.name()),
        None => c.status.name().to_string(),
    };
    let time = c
        .time
        .as_ref()
        .map(|t| {
            format!(
                "{} ({}–{})",
                format_ms(t.median_s),
                format_ms(t.p10_s),
                format_ms(t.p90_s)
            )
        })
        .unwrap_or_else(|| "-".into());
    let flop_rate = |f: f64| {
        if f >= 1e12 {
            format!("{:.2} TFLOP/s", f / 1e12)
        } else {
            format!("{:.2} GFLOP/s", f / 1e9)
        }
    };
    let rate = match (c.flops_per_s, c.bytes_per_s) {
        // Where the kernels do more (or less) arithmetic than the convention counts, both.
        (Some(f), _) => match c.work_flops_per_s {
            Some(w) => format!("{} ({} done)", flop_rate(f), flop_rate(w)),
            None => flop_rate(f),
        },
        (None, Some(b)) => format!("{:.1} GB/s", b / 1e9),
        _ => "-".into(),
    };
    let fraction = c
        .fraction_of_ceiling
        .map(|f| format!("{:.1}%", f * 100.0))
        .unwrap_or_else(|| "-".into());
    // An out-of-memory case's figures stop at the failed allocation: what it held then, not
    // what it needs.
    let at_failure = if matches!(c.status, Status::Oom(_)) {
        " at the failure"
    } else {
        ""
    };
    let measured = |f: fn(&crate::report::MemoryRecord) -> u64| {
        c.memory
            .as_ref()
            .map(|m| format!("{}{at_failure}", format_bytes(f(m))))
            .unwrap_or_else(|| "-".into())
    };
    let predicted = c
        .memory
        .as_ref()
        .map(|m| format_bytes(m.predicted))
        .unwrap_or_else(|| "-".into());
    let validation = c
        .validation
        .as_ref()
        .map(|v| format!("{:.2e} / {:.1e}", v.error, v.tolerance))
        .unwrap_or_else(|| "-".into());
    // On a GPU the device's own used peak stands beside the tracked one.
    let allocated = match c.memory.as_ref().and_then(|m| m.device) {
        Some(d) => format!(
            "{} (device {})",
            measured(|m| m.peak_allocated),
            format_bytes(d.used)
        ),
        None => measured(|m| m.peak_allocated),
    };
    vec![
        name,
        status,
        time,
        rate,
        fraction,
        allocated,
        predicted,
        measured(|m| m.peak_reserved),
        validation,
        versus_baseline(c, all),
    ]
}

/// Milliseconds to about four significant digits: CPU runs take microseconds, GPU runs of
/// the full profile seconds.
pub(crate) fn format_ms(seconds: f64) -> String {
    let ms = seconds * 1e3;
    if ms >= 100.0 {
        format!("{ms:.1}")
    } else if ms >= 1.0 {
        format!("{ms:.3}")
    } else {
        format!("{ms:.4}")
    }
}

/// A cell's text with the characters that would break a Markdown table row made harmless.
pub(crate) fn cell(text: &str) -> String {
    text.replace('|', "\\|").replace(['\n', '\r'], " ")
}

/// A Markdown table; every cell is escaped.
pub(crate) fn table(header: &[impl AsRef<str>], rows: &[Vec<String>]) -> String {
    let mut out = String::new();
    let line = |cells: &mut dyn Iterator<Item = String>| {
        let v: Vec<String> = cells.collect();
        format!("| {} |\n", v.join(" | "))
    };
    out.push_str(&line(&mut header.iter().map(|h| cell(h.as_ref()))));
    out.push_str(&line(&mut header.iter().map(|_| "---".to_string())));
    for r in rows {
        out.push_str(&line(&mut r.iter().map(|c| cell(c))));
    }
    out
}

/// `YYYY-MM-DD HH:MM UTC` from Unix seconds (Hinnant's civil-from-days), so the summary
/// needs no date crate.
fn utc_date(unix: u64) -> String {
    let days = (unix / 86_400) as i64;
    let secs = unix % 86_400;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02} UTC",
        secs / 3600,
        (secs % 3600) / 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dtype::DType;
    use crate::report::{MemoryRecord, TimeStats};
    use crate::techniques::CaseInfo;

    fn case(
        family: &str,
        technique: &str,
        dtype: DType,
        shape: &str,
        peak: u64,
        ms: f64,
    ) -> CaseRecord {
        let mut r = CaseRecord::new(
            &CaseInfo::new(family, technique, dtype, shape.into()),
            Status::Ok,
        );
        r.memory = Some(MemoryRecord {
            peak_allocated: peak,
            peak_reserved: peak,
            predicted: peak,
            driver: None,
            device: None,
        });
        r.time = TimeStats::from_samples(&[ms / 1e3]);
        r
    }

    #[test]
    fn flash_is_held_to_naive_on_the_same_dtype_and_pass() {
        let cases = vec![
            case(
                "attention",
                "naive",
                DType::Bf16,
                "fwd/b1-h2-n64-d64",
                400,
                2.0,
            ),
            case(
                "attention",
                "naive",
                DType::Bf16,
                "fwd+bwd/b1-h2-n64-d64",
                1000,
                4.0,
            ),
            case(
                "attention",
                "naive",
                DType::F32,
                "fwd+bwd/b1-h2-n64-d64",
                2000,
                8.0,
            ),
            case(
                "attention",
                "flash",
                DType::Bf16,
                "fwd+bwd/b1-h2-n64-d64",
                250,
                5.0,
            ),
        ];
        let base = baseline_for(&cases[3], &cases).expect("a naive baseline");
        assert_eq!(base.id, cases[1].id);
        assert_eq!(
            versus_baseline(&cases[3], &cases),
            "4.00x less memory, 0.80x speed vs naive"
        );
        assert_eq!(versus_baseline(&cases[1], &cases), "baseline");
    }

    #[test]
    fn a_baseline_that_did_not_fit_is_named_with_its_status() {
        let mut naive = case("attention", "naive", DType::F32, "fwd/s", 10, 1.0);
        naive.status = Status::Oom("tried to allocate 1.00 GiB".into());
        let flash = case("attention", "flash", DType::F32, "fwd/s", 5, 1.0);
        let cases = vec![naive, flash];
        assert_eq!(versus_baseline(&cases[1], &cases), "naive oom");
    }

    #[test]
    fn families_without_a_baseline_say_so() {
        let cases = vec![case("copy", "vec16", DType::F32, "n4", 32, 1.0)];
        assert_eq!(versus_baseline(&cases[0], &cases), "-");
    }

    #[test]
    fn dates_are_civil_utc() {
        assert_eq!(utc_date(0), "1970-01-01 00:00 UTC");
        assert_eq!(utc_date(951_782_400), "2000-02-29 00:00 UTC");
        assert_eq!(utc_date(1_700_000_000), "2023-11-14 22:13 UTC");
    }

    #[test]
    fn pipes_in_messages_do_not_split_cells() {
        let t = table(&["a"], &[vec!["x | y\nz".into()]]);
        assert_eq!(t, "| a |\n| --- |\n| x \\| y z |\n");
    }
}
