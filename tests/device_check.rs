//! scripts/device-check.sh on the CPU: its filters name real CUDA cases, and a step that hangs
//! costs that step alone, inside the budget.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use headroom::backend::BackendKind;
use headroom::techniques::{check_cases, registry, Profile};

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/device-check.sh")
}

/// `device-check.sh --list-steps`: (name, kind, arguments) per step.
fn steps() -> Vec<(String, String, Vec<String>)> {
    let out = Command::new("bash")
        .arg(script())
        .arg("--list-steps")
        .output()
        .expect("bash runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| {
            let f: Vec<&str> = l.split('\t').collect();
            assert_eq!(f.len(), 5, "name, share, min, kind, arguments: {l}");
            let args = f[4].split_whitespace().map(String::from).collect();
            (f[0].to_string(), f[3].to_string(), args)
        })
        .collect()
}

/// A stale filter would make a step check nothing (with several filters, silently): every one
/// must name a case the CUDA backend has, and the check steps together must cover them all.
#[test]
fn every_filter_names_real_cuda_cases() {
    let check_ids: Vec<String> = check_cases(BackendKind::Cuda)
        .iter()
        .map(|c| c.info().id.clone())
        .collect();
    let bench_ids: Vec<String> = registry(Profile::Quick, BackendKind::Cuda)
        .iter()
        .map(|c| c.info().id.clone())
        .collect();
    let steps = steps();
    let mut check_filters = Vec::new();
    let mut kinds = Vec::new();
    for (name, kind, args) in &steps {
        kinds.push(kind.clone());
        let filters: &[String] = match kind.as_str() {
            "check" => args,
            "sanitize" => {
                assert!(
                    ["memcheck", "racecheck", "synccheck"].contains(&args[0].as_str()),
                    "{name}: {args:?}"
                );
                &args[1..]
            }
            "bench" => {
                assert_eq!(args.len(), 1, "{name}: the bench takes one filter");
                if args[0] != "headline" {
                    assert!(
                        bench_ids.iter().any(|id| id.contains(&args[0])),
                        "{name}: no quick-profile CUDA case contains '{}'",
                        args[0]
                    );
                }
                continue;
            }
            _ => continue,
        };
        assert!(!filters.is_empty(), "{name} has no filter");
        for f in filters {
            assert!(
                check_ids.iter().any(|id| id.contains(f.as_str())),
                "{name}: no CUDA check case contains '{f}'"
            );
        }
        if kind == "check" {
            check_filters.extend(filters.iter().cloned());
        }
    }
    let missed: Vec<&String> = check_ids
        .iter()
        .filter(|id| !check_filters.iter().any(|f| id.contains(f.as_str())))
        .collect();
    assert!(
        missed.is_empty(),
        "no check step runs {missed:?}: add a step to scripts/device-check.sh"
    );
    for kind in ["info", "check", "sanitize", "bench", "torch", "compare"] {
        assert!(kinds.iter().any(|k| k == kind), "no {kind} step");
    }
}

/// The summary row of one step: its status cell.
fn status_of(summary: &str, step: &str) -> String {
    summary
        .lines()
        .find(|l| l.starts_with("| ") && l.split('|').nth(2).map(str::trim) == Some(step))
        .and_then(|l| l.split('|').nth(3))
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|| panic!("no row for {step} in:\n{summary}"))
}

/// One step made to hang (it sleeps far beyond any limit) must cost that step's limit and no
/// more: the run ends inside its budget, the steps before and after it run, and the summary
/// names the hung step. If the script ignored the hang, the step would read `ok`; if it waited
/// for it, the run would overrun the budget.
#[test]
fn a_hung_step_costs_one_step_and_the_run_keeps_its_budget() {
    let tmp = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("device-check-hang");
    let _ = std::fs::remove_dir_all(&tmp);
    let bindir = tmp.join("bin");
    std::fs::create_dir_all(&bindir).expect("temporary folder");
    // Only `headroom`: the bench binary is not built for integration tests, and its absence
    // must fail the profile steps, not the run.
    std::os::unix::fs::symlink(env!("CARGO_BIN_EXE_headroom"), bindir.join("headroom"))
        .expect("symlink");
    let out = tmp.join("out");
    // Enough for every check step before the profile steps to run or hit its limit, so that
    // bench-copy still starts (it needs 10 s) on a loaded two-core machine.
    let budget = 50u64;
    let hung = "check-matmul-simt";
    let started = Instant::now();
    let run = Command::new("bash")
        .arg(script())
        .arg(&out)
        .args(["--dry-run", "--seconds", &budget.to_string(), "--bindir"])
        .arg(&bindir)
        .env("HEADROOM_DEVICE_CHECK_HANG", hung)
        .env("HEADROOM_PYTHON", "no-such-python-for-this-test")
        .env_remove("HEADROOM_BACKEND")
        .env_remove("HEADROOM_BUDGET")
        .env_remove("HEADROOM_PROFILE")
        .env_remove("HEADROOM_ALLOCATOR")
        .output()
        .expect("bash runs");
    let elapsed = started.elapsed();
    let summary = std::fs::read_to_string(out.join("summary.md")).unwrap_or_else(|e| {
        panic!(
            "no summary.md ({e}); stdout:\n{}\nstderr:\n{}",
            String::from_utf8_lossy(&run.stdout),
            String::from_utf8_lossy(&run.stderr)
        )
    });
    // The budget, plus the seconds timeout's KILL may wait and the shell's own start.
    assert!(
        elapsed < Duration::from_secs(budget + 8),
        "took {elapsed:?} on a {budget} s budget:\n{summary}"
    );
    let status = status_of(&summary, hung);
    assert!(
        status.starts_with("hung (timeout after "),
        "{hung}: {status}\n{summary}"
    );
    // It really waited out the limit (5 s at this budget) before moving on.
    assert!(elapsed >= Duration::from_secs(5), "took only {elapsed:?}");
    for ran in ["info", "check-copy", "check-matmul-mma", "check-layers"] {
        let s = status_of(&summary, ran);
        assert!(
            s == "ok" || s.starts_with("failed ("),
            "{ran} did not run: {s}\n{summary}"
        );
    }
    assert_eq!(
        status_of(&summary, "bench-copy"),
        "failed: no headroom-bench in --bindir"
    );
    assert!(status_of(&summary, "torch-peer").starts_with("not run ("));
    assert!(summary.contains("DRY RUN on the CPU backend"), "{summary}");
    assert!(summary.contains("- finished in "), "{summary}");
    assert!(!run.status.success(), "a hung step must fail the run");
    let log = std::fs::read_dir(out.join("logs"))
        .expect("logs/")
        .filter_map(|e| e.ok())
        .find(|e| {
            e.file_name()
                .to_string_lossy()
                .ends_with(&format!("-{hung}.log"))
        })
        .expect("the hung step's log");
    let text = std::fs::read_to_string(log.path()).expect("readable log");
    assert!(text.contains("no result within"), "{text}");
}

/// Bad arguments are one sentence and exit 2, before anything runs.
#[test]
fn bad_arguments_are_refused() {
    for args in [
        vec!["--minutes", "soon", "/tmp/x"],
        vec!["--frobnicate", "/tmp/x"],
        vec!["--seconds", "3", "/tmp/x"],
    ] {
        let out = Command::new("bash")
            .arg(script())
            .args(&args)
            .output()
            .expect("bash runs");
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("device-check.sh: "), "{args:?}: {err}");
    }
}
