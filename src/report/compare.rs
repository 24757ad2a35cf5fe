//! `headroom compare`: the same cases side by side across reports (cards, versions,
//! backends), each report's time as a ratio to the first's.
//!
//! Peak allocated bytes are a property of the case, not of the card (the tracked allocator
//! counts what the case asks for), so any difference between reports is a finding: a changed
//! schedule, model or allocator. A time difference inside the measured spread (the p10..p90
//! intervals overlap) is called noise rather than a speedup.

use std::fmt::Write as _;

use clap::ValueEnum;
use serde::Serialize;

use crate::memory::format_bytes;
use crate::report::markdown::{self, format_ms};
use crate::report::{CaseRecord, Report, Status};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Format {
    Table,
    Md,
    Csv,
    Json,
}

pub fn render(reports: &[(String, Report)], format: Format) -> String {
    if reports.is_empty() {
        return "no reports to compare\n".into();
    }
    let c = Comparison::build(reports);
    match format {
        Format::Table => c.table(),
        Format::Md => c.markdown(),
        Format::Csv => c.csv(),
        Format::Json => {
            let mut s = serde_json::to_string_pretty(&c).expect("a comparison always serializes");
            s.push('\n');
            s
        }
    }
}

#[derive(Debug, Serialize)]
struct Comparison {
    reports: Vec<Header>,
    /// The cases every report has, in the order of their first appearance.
    cases: Vec<Row>,
    missing: Vec<Missing>,
    families: Vec<FamilyRatio>,
    findings: Vec<String>,
    /// Every case with a cell per report that has it, for the CSV.
    #[serde(skip)]
    all: Vec<PartialRow>,
}

#[derive(Debug, Serialize)]
struct Header {
    label: String,
    device: String,
    backend: String,
    suite_version: String,
    commit: String,
    profile: String,
    budget_bytes: Option<u64>,
}

#[derive(Debug, Serialize)]
struct Row {
    id: String,
    family: String,
    /// One per report, in the order given.
    cells: Vec<Cell>,
}

#[derive(Debug)]
struct PartialRow {
    id: String,
    family: String,
    cells: Vec<Option<Cell>>,
}

#[derive(Debug, Clone, Serialize)]
struct Cell {
    status: String,
    message: Option<String>,
    median_s: Option<f64>,
    p10_s: Option<f64>,
    p90_s: Option<f64>,
    /// This report's median time over the first report's (above 1: slower).
    ratio_to_first: Option<f64>,
    verdict: Option<Verdict>,
    peak_allocated: Option<u64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
#[serde(rename_all = "lowercase")]
enum Verdict {
    Faster,
    Slower,
    /// The p10..p90 intervals overlap: the difference is within what repeated runs vary by.
    Noise,
}

#[derive(Debug, Serialize)]
struct Missing {
    id: String,
    present_in: Vec<String>,
    missing_from: Vec<String>,
}

#[derive(Debug, Serialize)]
struct FamilyRatio {
    family: String,
    /// Per report: the geometric mean of its time ratios to the first report over the
    /// cases both timed (1 for the first report itself).
    geomean_ratio: Vec<Option<f64>>,
    /// Per report: how many cases that mean is over.
    cases: Vec<usize>,
}

fn intervals_overlap(a: &crate::report::TimeStats, b: &crate::report::TimeStats) -> bool {
    a.p10_s <= b.p90_s && b.p10_s <= a.p90_s
}

fn timed(c: &CaseRecord) -> Option<&crate::report::TimeStats> {
    c.time.as_ref().filter(|_| c.status == Status::Ok)
}

impl Comparison {
    fn build(reports: &[(String, Report)]) -> Comparison {
        let n = reports.len();
        let headers: Vec<Header> = reports
            .iter()
            .map(|(label, r)| Header {
                label: label.clone(),
                device: r.device.name.clone(),
                backend: r.device.backend.clone(),
                suite_version: r.suite_version.clone(),
                commit: r.commit.clone(),
                profile: r.profile.clone(),
                budget_bytes: r.budget_bytes,
            })
            .collect();

        let mut ids: Vec<(String, String)> = Vec::new();
        for (_, r) in reports {
            for c in &r.cases {
                if !ids.iter().any(|(id, _)| *id == c.id) {
                    ids.push((c.id.clone(), c.family.clone()));
                }
            }
        }

        let mut all = Vec::new();
        let mut missing = Vec::new();
        let mut findings = Vec::new();
        // PyTorch's figures come from its caching allocator and autograd's saved tensors, so
        // they are compared with each other, and headroom's with headroom's.
        let torch: Vec<bool> = reports
            .iter()
            .map(|(_, r)| r.device.backend == "torch")
            .collect();
        if torch.iter().any(|t| *t) && torch.iter().any(|t| !*t) {
            findings.push(
                "memory of the torch reports is PyTorch's (caching allocator, autograd's saved tensors): \
                 it is expected to differ from headroom's and is not compared with it (peers/torch/README.md)"
                    .to_string(),
            );
        }
        for (id, family) in &ids {
            let records: Vec<Option<&CaseRecord>> = reports
                .iter()
                .map(|(_, r)| r.cases.iter().find(|c| c.id == *id))
                .collect();
            let first = records[0].and_then(timed);
            let cells: Vec<Option<Cell>> = records
                .iter()
                .enumerate()
                .map(|(i, rec)| rec.map(|c| cell(c, if i == 0 { None } else { first })))
                .collect();
            if records.iter().any(Option::is_none) {
                let (present_in, missing_from) =
                    (0..n).partition::<Vec<usize>, _>(|&i| records[i].is_some());
                missing.push(Missing {
                    id: id.clone(),
                    present_in: present_in.iter().map(|&i| reports[i].0.clone()).collect(),
                    missing_from: missing_from.iter().map(|&i| reports[i].0.clone()).collect(),
                });
            }
            findings.extend(case_findings(id, &records, &torch));
            all.push(PartialRow {
                id: id.clone(),
                family: family.clone(),
                cells,
            });
        }

        let budgets: Vec<Option<u64>> = reports.iter().map(|(_, r)| r.budget_bytes).collect();
        if budgets.iter().any(|b| *b != budgets[0]) {
            let list: Vec<String> = budgets
                .iter()
                .enumerate()
                .map(|(i, b)| {
                    format!(
                        "{} on [{}]",
                        b.map(format_bytes).unwrap_or("none".into()),
                        i + 1
                    )
                })
                .collect();
            findings.insert(
                0,
                format!(
                    "the reports ran under different budgets ({}): out-of-memory outcomes are not comparable",
                    list.join(", ")
                ),
            );
        }

        let cases: Vec<Row> = all
            .iter()
            .filter(|r| r.cells.iter().all(Option::is_some))
            .map(|r| Row {
                id: r.id.clone(),
                family: r.family.clone(),
                cells: r.cells.iter().flatten().cloned().collect(),
            })
            .collect();

        let mut family_names: Vec<String> = Vec::new();
        for r in &cases {
            if !family_names.contains(&r.family) {
                family_names.push(r.family.clone());
            }
        }
        let families = family_names
            .into_iter()
            .map(|family| {
                let rows: Vec<&Row> = cases.iter().filter(|r| r.family == family).collect();
                let mut geomean_ratio = Vec::new();
                let mut counts = Vec::new();
                for j in 0..n {
                    let logs: Vec<f64> = rows
                        .iter()
                        .filter_map(|r| {
                            r.cells[j]
                                .ratio_to_first
                                .or((j == 0 && r.cells[0].median_s.is_some()).then_some(1.0))
                        })
                        .map(f64::ln)
                        .collect();
                    counts.push(logs.len());
                    geomean_ratio.push(
                        (!logs.is_empty())
                            .then(|| (logs.iter().sum::<f64>() / logs.len() as f64).exp()),
                    );
                }
                FamilyRatio {
                    family,
                    geomean_ratio,
                    cases: counts,
                }
            })
            .collect();

        Comparison {
            reports: headers,
            cases,
            missing,
            families,
            findings,
            all,
        }
    }

    fn header_lines(&self) -> String {
        let mut out = String::new();
        for (i, h) in self.reports.iter().enumerate() {
            let _ = writeln!(
                out,
                "[{}] {}: {} ({}), headroom {} at {}, profile {}",
                i + 1,
                h.label,
                h.device,
                h.backend,
                h.suite_version,
                h.commit,
                h.profile
            );
        }
        out
    }

    fn column_names(&self) -> Vec<String> {
        let mut names = vec!["case".to_string()];
        for i in 1..=self.reports.len() {
            names.push(format!("[{i}] median ms"));
            if i > 1 {
                names.push(format!("[{i}] vs [1]"));
            }
            names.push(format!("[{i}] peak allocated"));
        }
        names
    }

    fn case_rows(&self) -> Vec<Vec<String>> {
        self.cases
            .iter()
            .map(|r| {
                let mut row = vec![r.id.clone()];
                for (i, c) in r.cells.iter().enumerate() {
                    row.push(match c.median_s {
                        Some(t) => format_ms(t),
                        None => c.status.clone(),
                    });
                    if i > 0 {
                        row.push(versus(c));
                    }
                    row.push(c.peak_allocated.map(format_bytes).unwrap_or("-".into()));
                }
                row
            })
            .collect()
    }

    fn family_rows(&self) -> (Vec<String>, Vec<Vec<String>>) {
        let mut names = vec!["family".to_string()];
        for i in 2..=self.reports.len() {
            names.push(format!("[{i}] vs [1] (geomean time ratio)"));
        }
        let rows = self
            .families
            .iter()
            .map(|f| {
                let mut row = vec![f.family.clone()];
                for j in 1..self.reports.len() {
                    row.push(match f.geomean_ratio[j] {
                        Some(g) => format!(
                            "{g:.3}x over {} case{}",
                            f.cases[j],
                            if f.cases[j] == 1 { "" } else { "s" }
                        ),
                        None => "no case timed in both".into(),
                    });
                }
                row
            })
            .collect();
        (names, rows)
    }

    fn missing_lines(&self) -> Vec<String> {
        let index = |label: &String| {
            self.reports
                .iter()
                .position(|h| h.label == *label)
                .map(|i| format!("[{}]", i + 1))
                .unwrap_or_else(|| label.clone())
        };
        self.missing
            .iter()
            .map(|m| {
                format!(
                    "{}: missing from {} (present in {})",
                    m.id,
                    m.missing_from
                        .iter()
                        .map(index)
                        .collect::<Vec<_>>()
                        .join(", "),
                    m.present_in
                        .iter()
                        .map(index)
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            })
            .collect()
    }

    fn table(&self) -> String {
        let mut out = self.header_lines();
        out.push('\n');
        out.push_str(&aligned(&self.column_names(), &self.case_rows()));
        if !self.missing.is_empty() {
            let _ = writeln!(out, "\ncases not in every report:");
            for l in self.missing_lines() {
                let _ = writeln!(out, "  {l}");
            }
        }
        if self.reports.len() > 1 && !self.families.is_empty() {
            let (names, rows) = self.family_rows();
            out.push('\n');
            out.push_str(&aligned(&names, &rows));
        }
        let _ = writeln!(out, "\nfindings:");
        if self.findings.is_empty() {
            let _ = writeln!(
                out,
                "  none: peak allocated bytes agree on every common case"
            );
        }
        for f in &self.findings {
            let _ = writeln!(out, "  {f}");
        }
        out
    }

    fn markdown(&self) -> String {
        let mut out = String::from("# headroom compare\n\n");
        for l in self.header_lines().lines() {
            let _ = writeln!(out, "- {}", markdown::cell(l));
        }
        let _ = writeln!(out, "\n## Cases in every report\n");
        out.push_str(&markdown::table(&self.column_names(), &self.case_rows()));
        if !self.missing.is_empty() {
            let _ = writeln!(out, "\n## Cases not in every report\n");
            for l in self.missing_lines() {
                let _ = writeln!(out, "- {}", markdown::cell(&l));
            }
        }
        if self.reports.len() > 1 && !self.families.is_empty() {
            let _ = writeln!(out, "\n## Families\n");
            let (names, rows) = self.family_rows();
            out.push_str(&markdown::table(&names, &rows));
        }
        let _ = writeln!(out, "\n## Findings\n");
        if self.findings.is_empty() {
            let _ = writeln!(
                out,
                "None: peak allocated bytes agree on every common case."
            );
        }
        for f in &self.findings {
            let _ = writeln!(out, "- {}", markdown::cell(f));
        }
        out
    }

    fn csv(&self) -> String {
        let mut out = String::from(
            "case,family,in_all_reports,report,label,device,status,median_ms,p10_ms,p90_ms,ratio_to_first,verdict,peak_allocated_bytes,message\n",
        );
        let num = |v: Option<f64>| v.map(|x| format!("{x}")).unwrap_or_default();
        for r in &self.all {
            let in_all = r.cells.iter().all(Option::is_some);
            for (i, c) in r.cells.iter().enumerate() {
                let Some(c) = c else { continue };
                let h = &self.reports[i];
                let fields = [
                    r.id.clone(),
                    r.family.clone(),
                    in_all.to_string(),
                    (i + 1).to_string(),
                    h.label.clone(),
                    h.device.clone(),
                    c.status.clone(),
                    num(c.median_s.map(|s| s * 1e3)),
                    num(c.p10_s.map(|s| s * 1e3)),
                    num(c.p90_s.map(|s| s * 1e3)),
                    num(c.ratio_to_first),
                    c.verdict
                        .map(|v| match v {
                            Verdict::Faster => "faster",
                            Verdict::Slower => "slower",
                            Verdict::Noise => "noise",
                        })
                        .unwrap_or_default()
                        .to_string(),
                    c.peak_allocated.map(|b| b.to_string()).unwrap_or_default(),
                    c.message.clone().unwrap_or_default(),
                ];
                let line: Vec<String> = fields.iter().map(|f| csv_field(f)).collect();
                let _ = writeln!(out, "{}", line.join(","));
            }
        }
        out
    }
}

fn cell(c: &CaseRecord, first: Option<&crate::report::TimeStats>) -> Cell {
    let t = timed(c);
    let (ratio_to_first, verdict) = match (t, first) {
        (Some(t), Some(f)) => {
            let ratio = t.median_s / f.median_s;
            let verdict = if intervals_overlap(t, f) {
                Verdict::Noise
            } else if ratio < 1.0 {
                Verdict::Faster
            } else {
                Verdict::Slower
            };
            (Some(ratio), Some(verdict))
        }
        _ => (None, None),
    };
    Cell {
        status: c.status.name().into(),
        message: c.status.message().map(str::to_string),
        median_s: t.map(|t| t.median_s),
        p10_s: t.map(|t| t.p10_s),
        p90_s: t.map(|t| t.p90_s),
        ratio_to_first,
        verdict,
        peak_allocated: c.memory.as_ref().map(|m| m.peak_allocated),
    }
}

fn versus(c: &Cell) -> String {
    match (c.ratio_to_first, c.verdict) {
        (Some(r), Some(Verdict::Noise)) => format!("~ noise ({r:.2}x)"),
        (Some(r), Some(Verdict::Faster)) => format!("{r:.2}x (faster)"),
        (Some(r), _) => format!("{r:.2}x (slower)"),
        _ => "-".into(),
    }
}

/// What differs for one case across reports that should not: its peak allocated bytes
/// (among the reports where it ran to completion) and its outcome.
fn case_findings(id: &str, records: &[Option<&CaseRecord>], torch: &[bool]) -> Vec<String> {
    let mut out = Vec::new();
    let completed: Vec<(usize, u64)> = records
        .iter()
        .enumerate()
        .filter_map(|(i, r)| {
            let r = r.filter(|r| r.status == Status::Ok)?;
            Some((i, r.memory.as_ref()?.peak_allocated))
        })
        .collect();
    for group in [false, true] {
        let same: Vec<&(usize, u64)> = completed
            .iter()
            .filter(|(i, _)| torch.get(*i).copied().unwrap_or(false) == group)
            .collect();
        let Some(&&(i0, b0)) = same.first() else {
            continue;
        };
        for &&(i, b) in &same[1..] {
            if b != b0 {
                out.push(format!(
                    "{id}: peak allocated differs: {} ({b0} bytes) on [{}] vs {} ({b} bytes) on [{}]",
                    format_bytes(b0),
                    i0 + 1,
                    format_bytes(b),
                    i + 1
                ));
            }
        }
    }
    let present: Vec<(usize, &CaseRecord)> = records
        .iter()
        .enumerate()
        .filter_map(|(i, r)| r.map(|r| (i, r)))
        .collect();
    if present
        .iter()
        .any(|(_, r)| r.status.name() != present[0].1.status.name())
    {
        let outcomes: Vec<String> = present
            .iter()
            .map(|(i, r)| match r.status.message() {
                Some(m) => format!("{} on [{}] ({m})", r.status.name(), i + 1),
                None => format!("{} on [{}]", r.status.name(), i + 1),
            })
            .collect();
        out.push(format!("{id}: outcomes differ: {}", outcomes.join(", ")));
    }
    out
}

/// A terminal table: the first column left-aligned, the figures right-aligned.
fn aligned(header: &[String], rows: &[Vec<String>]) -> String {
    let width = |i: usize| {
        rows.iter()
            .filter_map(|r| r.get(i))
            .chain(std::iter::once(&header[i]))
            .map(|s| s.chars().count())
            .max()
            .unwrap_or(0)
    };
    let widths: Vec<usize> = (0..header.len()).map(width).collect();
    let line = |cells: &[String]| {
        let parts: Vec<String> = cells
            .iter()
            .enumerate()
            .map(|(i, c)| {
                if i == 0 {
                    format!("{c:<w$}", w = widths[i])
                } else {
                    format!("{c:>w$}", w = widths[i])
                }
            })
            .collect();
        format!("{}\n", parts.join("  ").trim_end())
    };
    let mut out = line(header);
    for r in rows {
        out.push_str(&line(r));
    }
    out
}

/// RFC 4180 quoting: only where a field holds a comma, a quote or a line break.
fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}
