//! The report's writers and readers on reports the CPU backend really measured: JSON round
//! trip, the Markdown summary, the SVG plots, `compare` in every format, and the files a
//! reader must refuse.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};

use headroom::backend::cpu::CpuBackend;
use headroom::backend::{Backend, BackendKind};
use headroom::harness::{Session, Settings};
use headroom::memory::format_bytes;
use headroom::report::{self, compare, markdown, svg, Report, Status, TimeStats};
use headroom::techniques::{registry, Profile};

/// A fresh directory under the system temp dir, unique to this process and call.
fn temp_dir(tag: &str) -> PathBuf {
    static N: AtomicUsize = AtomicUsize::new(0);
    let dir = std::env::temp_dir().join(format!(
        "headroom-report-test-{}-{}-{tag}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Runs the registered CPU cases whose id contains one of `wanted`: validated, then timed
/// five times, as `cargo bench` does.
fn run_cases(budget: Option<u64>, wanted: &[&str]) -> Report {
    let be: Arc<dyn Backend> = Arc::new(CpuBackend::new(budget, None));
    let settings = Settings {
        profile: Profile::Quick,
        budget,
        seed: 1,
    };
    let mut session = Session::new(be, &settings, "quick");
    let mut ran = 0;
    for case in registry(Profile::Quick, BackendKind::Cpu) {
        let id = case.info().id.clone();
        if !wanted.iter().any(|w| id.contains(w)) {
            continue;
        }
        let prepared = session.prepare(case.as_ref());
        let host_only = prepared.host_only;
        let timer = prepared.instance.map(|inst| {
            let mut t = session.timer(inst, host_only);
            t.run(5).expect("timed");
            t
        });
        session.push(prepared.record, timer).unwrap();
        ran += 1;
    }
    assert!(ran > 0, "no registered CPU case matches {wanted:?}");
    session.report.clone()
}

/// copy, the 256³ matmuls (simt and mma run; cuBLAS and wgmma are skipped on the CPU) and
/// the n=64 attention cases of both variants and dtypes.
fn measured() -> &'static Report {
    static R: OnceLock<Report> = OnceLock::new();
    R.get_or_init(|| run_cases(None, &["copy/", "m256-n256-k256", "-n64-"]))
}

/// Attention at n=128 under a budget that the fp32 naive case (769 KiB) does not fit and
/// the flash one (514 KiB) does.
fn over_budget() -> &'static Report {
    static R: OnceLock<Report> = OnceLock::new();
    R.get_or_init(|| run_cases(Some(600 << 10), &["fwd+bwd/b1-h2-n128-d64"]))
}

fn case<'a>(r: &'a Report, id_part: &str) -> &'a report::CaseRecord {
    r.cases
        .iter()
        .find(|c| c.id.contains(id_part))
        .unwrap_or_else(|| panic!("no case {id_part} in the report"))
}

/// A tight, fixed spread around `ms`, so ratios and noise calls do not depend on how busy
/// the test machine is.
fn fixed_time(ms: f64, spread: f64) -> TimeStats {
    let s = ms / 1e3;
    TimeStats {
        median_s: s,
        min_s: s * (1.0 - spread),
        max_s: s * (1.0 + spread),
        p10_s: s * (1.0 - spread),
        p90_s: s * (1.0 + spread),
        samples: 5,
    }
}

#[test]
fn the_measured_reports_hold_what_the_tests_rely_on() {
    let r = measured();
    assert_eq!(case(r, "copy/").status, Status::Ok);
    assert_eq!(case(r, "matmul/simt/f32/m256").status, Status::Ok);
    assert!(matches!(
        case(r, "matmul/cublas/f32/m256").status,
        Status::Skipped(_)
    ));
    for id in ["attention/naive/f32", "attention/flash/bf16"] {
        let c = case(r, id);
        assert_eq!(c.status, Status::Ok, "{id}");
        assert_eq!(c.time.as_ref().unwrap().samples, 5, "{id}");
    }
    let b = over_budget();
    assert!(matches!(
        case(b, "attention/naive/f32").status,
        Status::Oom(_)
    ));
    assert_eq!(case(b, "attention/flash/f32").status, Status::Ok);
}

/// Where two JSON trees differ, if they do; floats may differ in the last bit.
fn json_difference(a: &serde_json::Value, b: &serde_json::Value, at: &str) -> Option<String> {
    use serde_json::Value;
    match (a, b) {
        (Value::Object(x), Value::Object(y)) => {
            if x.len() != y.len() {
                return Some(format!("{at}: fields {:?} vs {:?}", x.keys(), y.keys()));
            }
            x.iter().find_map(|(k, v)| match y.get(k) {
                Some(w) => json_difference(v, w, &format!("{at}.{k}")),
                None => Some(format!("{at}.{k}: missing after the round trip")),
            })
        }
        (Value::Array(x), Value::Array(y)) => {
            if x.len() != y.len() {
                return Some(format!("{at}: {} vs {} elements", x.len(), y.len()));
            }
            (x.iter().zip(y))
                .enumerate()
                .find_map(|(i, (v, w))| json_difference(v, w, &format!("{at}[{i}]")))
        }
        (Value::Number(x), Value::Number(y)) if x.is_f64() || y.is_f64() => {
            let (p, q) = (x.as_f64().unwrap(), y.as_f64().unwrap());
            let ulps = (p.to_bits() as i64 - q.to_bits() as i64).unsigned_abs();
            (ulps > 1).then(|| format!("{at}: {p:e} vs {q:e}"))
        }
        _ => (a != b).then(|| format!("{at}: {a} vs {b}")),
    }
}

#[test]
fn json_round_trips_through_a_file() {
    let dir = temp_dir("roundtrip");
    for r in [measured(), over_budget()] {
        let path = dir.join("r.json");
        r.write(&path).unwrap();
        let back = Report::read(&path).unwrap();
        // serde_json without its `float_roundtrip` feature parses some floats one bit
        // off; everything else must come back exactly.
        let (a, b) = (
            serde_json::to_value(r).unwrap(),
            serde_json::to_value(&back).unwrap(),
        );
        if let Some(d) = json_difference(&a, &b, "report") {
            panic!(
                "the report changed on its way through {}: {d}",
                path.display()
            );
        }
        assert_eq!(back.cases.len(), r.cases.len());
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn write_leaves_no_temporary_file_behind() {
    let dir = temp_dir("atomic");
    let path = dir.join("cpu.json");
    measured().write(&path).unwrap();
    // A second write replaces the first through the same temporary name.
    measured().write(&path).unwrap();
    let names: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names, vec!["cpu.json".to_string()]);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn write_all_writes_the_json_the_summary_and_a_plot_per_family() {
    let dir = temp_dir("write-all");
    let r = measured();
    let json = report::write_all(r, &dir).unwrap();
    assert_eq!(json, dir.join("cpu.json"));
    let mut names: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(
        names,
        [
            "cpu-attention.svg",
            "cpu-copy.svg",
            "cpu-matmul.svg",
            "cpu.json",
            "cpu.md"
        ]
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn markdown_has_the_device_the_run_and_a_table_per_family() {
    let r = measured();
    let md = markdown::render(r);
    assert!(md.starts_with(&format!("# headroom report: {}", r.device.name)));
    for needle in [
        "| seed | 1 (HEADROOM_SEED replays it) |",
        "| profile | quick |",
        "## Measured ceilings",
        "## copy",
        "## matmul",
        "## attention",
    ] {
        assert!(md.contains(needle), "missing {needle:?} in\n{md}");
    }
    assert!(md.contains(&r.commit));
    // One header row per family table, and one row per case, each with every column.
    let header_rows = md.lines().filter(|l| l.starts_with("| case |")).count();
    assert_eq!(header_rows, 3);
    for c in &r.cases {
        let name = c.id.strip_prefix(&format!("{}/", c.family)).unwrap();
        let row = md
            .lines()
            .find(|l| l.starts_with(&format!("| {name} |")))
            .unwrap_or_else(|| panic!("no row for {}", c.id));
        assert_eq!(row.matches(" | ").count(), 9, "{row}");
        if let Some(m) = &c.memory {
            if c.status == Status::Ok {
                assert!(row.contains(&format_bytes(m.peak_allocated)), "{row}");
            }
        }
    }
    let cublas = md
        .lines()
        .find(|l| l.starts_with("| cublas/f32/m256-n256-k256 |"))
        .unwrap();
    assert!(cublas.contains("skipped: cuBLAS needs a GPU"), "{cublas}");
    let simt = md
        .lines()
        .find(|l| l.starts_with("| simt/f32/m256-n256-k256 |"))
        .unwrap();
    assert!(simt.contains("cublas skipped"), "{simt}");
    assert!(simt.contains("FLOP/s"), "{simt}");
    let copy = md.lines().find(|l| l.starts_with("| vec16/")).unwrap();
    assert!(copy.contains("GB/s") && copy.contains("100.0%"), "{copy}");
}

#[test]
fn markdown_holds_flash_to_naive_and_shows_why_a_case_did_not_run() {
    let r = measured();
    let md = markdown::render(r);
    let flash = case(r, "attention/flash/f32");
    let naive = case(r, "attention/naive/f32");
    let saved = naive.memory.as_ref().unwrap().peak_allocated as f64
        / flash.memory.as_ref().unwrap().peak_allocated as f64;
    assert!(saved > 1.0);
    let row = md.lines().find(|l| l.starts_with("| flash/f32/")).unwrap();
    assert!(
        row.contains(&format!("{saved:.2}x less memory")) && row.contains("vs naive"),
        "{row}"
    );

    let b = over_budget();
    let md = markdown::render(b);
    assert!(md.contains(&format!("| budget | {} |", format_bytes(600 << 10))));
    let Status::Oom(msg) = &case(b, "attention/naive/f32").status else {
        unreachable!()
    };
    let naive_row = md.lines().find(|l| l.starts_with("| naive/f32/")).unwrap();
    assert!(naive_row.contains(&format!("oom: {msg}")), "{naive_row}");
    let flash_row = md.lines().find(|l| l.starts_with("| flash/f32/")).unwrap();
    assert!(flash_row.contains("naive oom"), "{flash_row}");
}

#[test]
fn plots_mark_every_timed_case_the_front_and_the_budget() {
    let dir = temp_dir("svg");
    let r = measured();
    svg::write_plots(r, &dir, "cpu").unwrap();
    for family in ["copy", "matmul", "attention"] {
        let text = std::fs::read_to_string(dir.join(format!("cpu-{family}.svg"))).unwrap();
        assert!(
            text.starts_with("<svg") || text.starts_with("<?xml"),
            "{family}"
        );
        assert!(text.trim_end().ends_with("</svg>"), "{family}");
        let timed = r
            .cases
            .iter()
            .filter(|c| c.family == family && c.status == Status::Ok && c.time.is_some())
            .count();
        // One filled marker per case, one per legend entry of each series; the front adds
        // rings, which are not filled.
        let filled = text.matches("<circle").count();
        assert!(
            filled >= timed,
            "{family}: {filled} markers for {timed} cases"
        );
        assert!(text.contains("Pareto front"), "{family}");
        assert!(text.contains("<text"), "{family}: no text");
        assert!(!text.contains("budget"), "{family}: no budget was set");
    }
    let attention = std::fs::read_to_string(dir.join("cpu-attention.svg")).unwrap();
    for series in ["naive f32", "flash f32", "naive bf16", "flash bf16"] {
        assert!(attention.contains(series), "no legend entry {series}");
    }

    let b = over_budget();
    svg::write_plots(b, &dir, "budgeted").unwrap();
    let text = std::fs::read_to_string(dir.join("budgeted-attention.svg")).unwrap();
    assert!(text.contains(&format!("budget {}", format_bytes(600 << 10))));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn plots_of_families_with_nothing_timed_are_removed() {
    let dir = temp_dir("stale");
    let mut r = measured().clone();
    svg::write_plots(&r, &dir, "cpu").unwrap();
    assert!(dir.join("cpu-copy.svg").exists());
    // Another card's plot and an unrelated file must survive.
    std::fs::write(dir.join("cpu-80gb-copy.svg"), "<svg/>").unwrap();
    std::fs::write(dir.join("cpu.md"), "keep").unwrap();

    for c in r.cases.iter_mut().filter(|c| c.family == "copy") {
        c.status = Status::Oom("tried to allocate 16.00 MiB".into());
        c.time = None;
    }
    r.cases.retain(|c| c.family != "matmul");
    svg::write_plots(&r, &dir, "cpu").unwrap();
    assert!(!dir.join("cpu-copy.svg").exists(), "copy has no timed case");
    assert!(
        !dir.join("cpu-matmul.svg").exists(),
        "matmul left the report"
    );
    assert!(dir.join("cpu-attention.svg").exists());
    assert!(dir.join("cpu-80gb-copy.svg").exists());
    assert!(dir.join("cpu.md").exists());
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn plots_into_an_unwritable_place_are_an_error_naming_it() {
    let dir = temp_dir("blocked");
    // A file where the directory should be: nothing can be created under it.
    let blocked = dir.join("not-a-dir");
    std::fs::write(&blocked, "").unwrap();
    let e = svg::write_plots(measured(), &blocked, "cpu").unwrap_err();
    assert!(matches!(e, headroom::Error::Io(_)), "{e:?}");
    assert!(e.to_string().contains("not-a-dir"), "{e}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Two reports of the same run: B lost one case, runs the simt matmul twice as slowly,
/// the naive f32 attention within noise, and allocates more for the flash f32 attention.
fn altered_pair() -> (Vec<(String, Report)>, String) {
    let mut a = measured().clone();
    case_mut(&mut a, "matmul/simt/f32").time = Some(fixed_time(10.0, 0.02));
    case_mut(&mut a, "attention/naive/f32").time = Some(fixed_time(4.0, 0.05));
    let mut b = a.clone();
    b.device.name = "Other Card".into();
    let removed = case(&a, "attention/flash/bf16").id.clone();
    b.cases.retain(|c| c.id != removed);
    case_mut(&mut b, "matmul/simt/f32").time = Some(fixed_time(20.0, 0.02));
    case_mut(&mut b, "attention/naive/f32").time = Some(fixed_time(4.2, 0.05));
    case_mut(&mut b, "attention/flash/f32")
        .memory
        .as_mut()
        .unwrap()
        .peak_allocated += 4096;
    (vec![("a.json".into(), a), ("b.json".into(), b)], removed)
}

fn case_mut<'a>(r: &'a mut Report, id_part: &str) -> &'a mut report::CaseRecord {
    r.cases.iter_mut().find(|c| c.id.contains(id_part)).unwrap()
}

#[test]
fn compare_table_shows_ratios_noise_missing_cases_and_memory_findings() {
    let (reports, removed) = altered_pair();
    let out = compare::render(&reports, compare::Format::Table);
    assert!(out.contains("[1] a.json: "), "{out}");
    assert!(out.contains("[2] b.json: Other Card (cpu)"), "{out}");
    let simt = out
        .lines()
        .find(|l| l.starts_with("matmul/simt/f32/m256"))
        .unwrap();
    assert!(simt.contains("2.00x (slower)"), "{simt}");
    let naive = out
        .lines()
        .find(|l| l.starts_with("attention/naive/f32"))
        .unwrap();
    assert!(naive.contains("~ noise (1.05x)"), "{naive}");
    let cublas = out
        .lines()
        .find(|l| l.starts_with("matmul/cublas/f32"))
        .unwrap();
    assert!(cublas.contains("skipped"), "{cublas}");
    assert!(
        out.contains(&format!("{removed}: missing from [2] (present in [1])")),
        "{out}"
    );
    // The removed case appears only in the missing list, not as a row.
    assert_eq!(out.matches(removed.as_str()).count(), 1, "{out}");
    let flash = case(&reports[0].1, "attention/flash/f32");
    let finding = out
        .lines()
        .find(|l| l.contains("peak allocated differs"))
        .unwrap_or_else(|| panic!("no memory finding in\n{out}"));
    assert!(finding.contains(&flash.id), "{finding}");
    let peak = flash.memory.as_ref().unwrap().peak_allocated;
    assert!(
        finding.contains(&format!("({peak} bytes) on [1]")),
        "{finding}"
    );
    assert!(
        finding.contains(&format!("({} bytes) on [2]", peak + 4096)),
        "{finding}"
    );
    assert_eq!(out.matches("peak allocated differs").count(), 1, "{out}");
}

#[test]
fn compare_json_has_the_same_content() {
    let (reports, removed) = altered_pair();
    let v: serde_json::Value =
        serde_json::from_str(&compare::render(&reports, compare::Format::Json)).unwrap();
    assert_eq!(v["reports"][1]["label"], "b.json");
    assert_eq!(v["reports"][1]["device"], "Other Card");
    let cases = v["cases"].as_array().unwrap();
    assert_eq!(cases.len(), reports[0].1.cases.len() - 1);
    let simt = cases
        .iter()
        .find(|c| c["id"].as_str().unwrap().starts_with("matmul/simt/f32"))
        .unwrap();
    let ratio = simt["cells"][1]["ratio_to_first"].as_f64().unwrap();
    assert!((ratio - 2.0).abs() < 1e-9, "{ratio}");
    assert_eq!(simt["cells"][1]["verdict"], "slower");
    let naive = cases
        .iter()
        .find(|c| c["id"].as_str().unwrap().starts_with("attention/naive/f32"))
        .unwrap();
    assert_eq!(naive["cells"][1]["verdict"], "noise");
    let cublas = cases
        .iter()
        .find(|c| c["id"].as_str().unwrap().starts_with("matmul/cublas/f32"))
        .unwrap();
    assert_eq!(cublas["cells"][0]["status"], "skipped");
    assert!(cublas["cells"][0]["median_s"].is_null());
    assert_eq!(v["missing"][0]["id"], removed.as_str());
    assert_eq!(v["missing"][0]["missing_from"][0], "b.json");
    // matmul: only simt and mma are timed; simt doubled, mma equal.
    let matmul = v["families"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["family"] == "matmul")
        .unwrap();
    let g = matmul["geomean_ratio"][1].as_f64().unwrap();
    assert!((g - 2f64.sqrt()).abs() < 1e-9, "{g}");
    assert_eq!(matmul["cases"][1], 2);
    assert_eq!(v["findings"].as_array().unwrap().len(), 1);
}

/// RFC 4180 fields of one line (quotes doubled inside quoted fields).
fn csv_fields(line: &str) -> Vec<String> {
    let mut fields = vec![String::new()];
    let mut quoted = false;
    let mut chars = line.chars().peekable();
    while let Some(c) = chars.next() {
        match (c, quoted) {
            ('"', true) if chars.peek() == Some(&'"') => {
                chars.next();
                fields.last_mut().unwrap().push('"');
            }
            ('"', _) => quoted = !quoted,
            (',', false) => fields.push(String::new()),
            (c, _) => fields.last_mut().unwrap().push(c),
        }
    }
    fields
}

#[test]
fn compare_csv_has_one_row_per_case_and_report() {
    let (reports, removed) = altered_pair();
    let out = compare::render(&reports, compare::Format::Csv);
    let mut lines = out.lines();
    let header = csv_fields(lines.next().unwrap());
    let col = |name: &str| header.iter().position(|h| h == name).unwrap();
    let rows: Vec<Vec<String>> = lines.map(csv_fields).collect();
    let n = reports[0].1.cases.len();
    assert_eq!(rows.len(), n + (n - 1));
    for r in &rows {
        assert_eq!(r.len(), header.len(), "{r:?}");
    }
    let removed_rows: Vec<&Vec<String>> =
        rows.iter().filter(|r| r[col("case")] == removed).collect();
    assert_eq!(removed_rows.len(), 1);
    assert_eq!(removed_rows[0][col("in_all_reports")], "false");
    let simt_b = rows
        .iter()
        .find(|r| r[col("case")].starts_with("matmul/simt/f32") && r[col("report")] == "2")
        .unwrap();
    assert_eq!(simt_b[col("median_ms")].parse::<f64>().unwrap(), 20.0);
    assert_eq!(simt_b[col("ratio_to_first")].parse::<f64>().unwrap(), 2.0);
    assert_eq!(simt_b[col("verdict")], "slower");
    let cublas = rows
        .iter()
        .find(|r| r[col("case")].starts_with("matmul/cublas/f32"))
        .unwrap();
    assert_eq!(cublas[col("status")], "skipped");
    assert_eq!(cublas[col("median_ms")], "");
    assert_eq!(cublas[col("message")], "cuBLAS needs a GPU");
}

#[test]
fn compare_markdown_has_the_tables_and_sections() {
    let (reports, removed) = altered_pair();
    let out = compare::render(&reports, compare::Format::Md);
    assert!(out.contains("| case | [1] median ms | [1] peak allocated | [2] median ms | [2] vs [1] | [2] peak allocated |"), "{out}");
    for id in reports[1].1.cases.iter().map(|c| &c.id) {
        assert!(
            out.lines().any(|l| l.starts_with(&format!("| {id} |"))),
            "no row for {id}"
        );
    }
    assert!(out.contains("## Cases not in every report"));
    assert!(out.contains(&format!("- {removed}: missing from [2]")));
    assert!(out.contains("## Families"));
    assert!(
        out.lines()
            .any(|l| l.starts_with("| matmul | 1.414x over 2 cases |")),
        "{out}"
    );
    assert!(out.contains("## Findings\n\n- attention/flash/f32/"));
}

#[test]
fn compare_of_identical_reports_finds_nothing_and_calls_every_time_noise() {
    let a = measured().clone();
    let reports = vec![("a".to_string(), a.clone()), ("b".to_string(), a)];
    let v: serde_json::Value =
        serde_json::from_str(&compare::render(&reports, compare::Format::Json)).unwrap();
    assert!(v["findings"].as_array().unwrap().is_empty());
    assert!(v["missing"].as_array().unwrap().is_empty());
    for c in v["cases"].as_array().unwrap() {
        if c["cells"][0]["status"] == "ok" {
            assert_eq!(c["cells"][1]["verdict"], "noise", "{c}");
            assert_eq!(c["cells"][1]["ratio_to_first"], 1.0);
        }
    }
    let table = compare::render(&reports, compare::Format::Table);
    assert!(table.contains("findings:\n  none"), "{table}");
}

#[test]
fn compare_flags_a_case_that_ran_on_one_card_and_not_the_other() {
    let a = over_budget().clone();
    let mut b = a.clone();
    b.budget_bytes = None;
    let naive = case_mut(&mut b, "attention/naive/f32");
    naive.status = Status::Ok;
    naive.time = Some(fixed_time(1.0, 0.01));
    let out = compare::render(&[("a".into(), a), ("b".into(), b)], compare::Format::Table);
    assert!(out.contains("different budgets"), "{out}");
    let line = out
        .lines()
        .find(|l| l.contains("outcomes differ"))
        .unwrap_or_else(|| panic!("no outcome finding in\n{out}"));
    assert!(
        line.contains("oom on [1] (") && line.contains("ok on [2]"),
        "{line}"
    );
    let row = out
        .lines()
        .find(|l| l.starts_with("attention/naive/f32"))
        .unwrap();
    assert!(row.contains("oom"), "{row}");
}

fn write_text(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

/// One sentence: no line break, and it names the file.
fn assert_one_sentence_naming(e: &headroom::Error, path: &Path) {
    let msg = e.to_string();
    assert!(!msg.contains('\n'), "{msg}");
    assert!(msg.contains(&path.display().to_string()), "{msg}");
}

#[test]
fn reading_refuses_files_that_are_not_reports() {
    let dir = temp_dir("refuse");
    let corrupt = write_text(&dir, "corrupt.json", "{\"schema\": \"headroom-report/1\", ");
    let e = Report::read(&corrupt).unwrap_err();
    assert_one_sentence_naming(&e, &corrupt);
    assert!(e.to_string().contains("not valid JSON"), "{e}");

    let empty = write_text(&dir, "empty.json", "");
    let e = Report::read(&empty).unwrap_err();
    assert_one_sentence_naming(&e, &empty);

    let no_schema = write_text(&dir, "noschema.json", "{\"cases\": []}");
    let e = Report::read(&no_schema).unwrap_err();
    assert_one_sentence_naming(&e, &no_schema);
    assert!(e.to_string().contains("\"schema\""), "{e}");

    let mut v: serde_json::Value = serde_json::from_str(&measured().to_json()).unwrap();
    v["schema"] = "headroom-report/3".into();
    let newer = write_text(&dir, "newer.json", &v.to_string());
    let e = Report::read(&newer).unwrap_err();
    assert_one_sentence_naming(&e, &newer);
    let msg = e.to_string();
    assert!(
        msg.contains("headroom-report/3") && msg.contains("headroom-report/2"),
        "{msg}"
    );

    v["schema"] = "headroom-report/2".into();
    v["cases"][0]["id"] = 7.into();
    let damaged = write_text(&dir, "damaged.json", &v.to_string());
    let e = Report::read(&damaged).unwrap_err();
    assert_one_sentence_naming(&e, &damaged);

    let absent = dir.join("absent.json");
    let e = Report::read(&absent).unwrap_err();
    assert!(matches!(e, headroom::Error::Io(_)), "{e:?}");
    assert_one_sentence_naming(&e, &absent);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn reading_ignores_fields_it_does_not_know() {
    let dir = temp_dir("extra");
    let mut v: serde_json::Value = serde_json::from_str(&measured().to_json()).unwrap();
    v["from_a_later_minor_version"] = serde_json::json!({"x": 1});
    let p = write_text(&dir, "extra.json", &v.to_string());
    let back = serde_json::to_value(Report::read(&p).unwrap()).unwrap();
    let want = serde_json::to_value(measured()).unwrap();
    assert_eq!(json_difference(&want, &back, "report"), None);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A report written before schema 2 (no per-tensor validation, no device peaks, no
/// warnings) still reads, with those parts empty.
#[test]
fn reading_accepts_schema_1() {
    let dir = temp_dir("schema1");
    let mut v: serde_json::Value = serde_json::from_str(&measured().to_json()).unwrap();
    v["schema"] = "headroom-report/1".into();
    v.as_object_mut().unwrap().remove("warnings");
    for case in v["cases"].as_array_mut().unwrap() {
        if let Some(val) = case.get_mut("validation").and_then(|x| x.as_object_mut()) {
            val.remove("tensors");
        }
        if let Some(mem) = case.get_mut("memory").and_then(|x| x.as_object_mut()) {
            mem.remove("device");
        }
    }
    let p = write_text(&dir, "v1.json", &v.to_string());
    let r = Report::read(&p).unwrap();
    assert_eq!(r.schema, "headroom-report/1");
    assert_eq!(r.cases.len(), measured().cases.len());
    assert!(r
        .cases
        .iter()
        .filter_map(|c| c.validation.as_ref())
        .all(|v| v.tensors.is_empty()));
    assert!(r.warnings.is_empty());
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn flash_backward_reports_the_work_it_does_beside_the_convention() {
    let r = measured();
    // The n=64 cases, forward and backward, flash and naive, as the registry names them.
    let mut seen = 0;
    for c in r.cases.iter().filter(|c| c.family == "attention") {
        let per_product = if c.shape.starts_with("fwd+bwd") {
            c.flops / 7.0 // the convention: 2 forward + 5 backward products
        } else {
            c.flops / 2.0
        };
        let expected = match (c.technique.as_str(), c.shape.starts_with("fwd+bwd")) {
            ("flash", true) => 9.0 * per_product,
            ("naive", true) => 6.0 * per_product,
            _ => 0.0, // the forward is what the convention counts
        };
        assert!(
            (c.work_flops - expected).abs() <= 1e-9 * expected.max(1.0),
            "{}: {} work FLOPs, expected {expected}",
            c.id,
            c.work_flops
        );
        if let (Some(t), Status::Ok) = (&c.time, &c.status) {
            let want = (expected > 0.0).then(|| expected / t.median_s);
            assert_eq!(c.work_flops_per_s, want, "{}", c.id);
        }
        seen += 1;
    }
    assert!(seen >= 4, "{seen} attention cases");
    // The summary shows both rates where they differ.
    let md = markdown::render(r);
    let flash = case(r, "attention/flash/f32/fwd+bwd");
    let row = md
        .lines()
        .find(|l| l.contains(&flash.shape) && l.contains("flash") && l.contains("done)"))
        .unwrap_or_else(|| panic!("no row with both rates for {}:\n{md}", flash.id));
    assert!(row.contains("FLOP/s ("), "{row}");
}
