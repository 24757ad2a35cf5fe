//! The command line on bad input and on a machine without a GPU: one sentence, a non-zero
//! exit where something is wrong, never a panic or a backtrace.

use std::process::Command;

fn headroom(args: &[&str], env: &[(&str, &str)]) -> (bool, String, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_headroom"));
    cmd.args(args)
        .env_remove("HEADROOM_BACKEND")
        .env_remove("HEADROOM_BUDGET")
        .env_remove("HEADROOM_PROFILE")
        .env_remove("HEADROOM_ALLOCATOR");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().expect("runs");
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(!stderr.contains("panicked"), "panic: {stderr}");
    assert!(
        !stderr.contains("RUST_BACKTRACE"),
        "backtrace hint: {stderr}"
    );
    (out.status.success(), stdout, stderr)
}

#[test]
fn info_says_which_backend_and_why() {
    let (ok, out, _) = headroom(&["info"], &[]);
    assert!(ok);
    if out.contains("backend: cuda") {
        assert!(out.contains("compute capability"), "{out}");
    } else {
        assert!(out.contains("backend: cpu"), "{out}");
        assert!(out.contains("not on a GPU: "), "{out}");
    }
    assert!(out.contains("kernels: "), "{out}");
}

#[test]
fn forced_cpu_backend_is_named() {
    let (ok, out, _) = headroom(&["info"], &[("HEADROOM_BACKEND", "cpu")]);
    assert!(ok);
    assert!(
        out.contains("backend: cpu") && out.contains("HEADROOM_BACKEND=cpu"),
        "{out}"
    );
}

#[test]
fn bad_budget_is_one_sentence() {
    let (ok, _, err) = headroom(&["check"], &[("HEADROOM_BUDGET", "12 parsecs")]);
    assert!(!ok);
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(
        err.contains("HEADROOM_BUDGET") && err.contains("is not a memory size"),
        "{err}"
    );
}

#[test]
fn bad_backend_and_profile_are_one_sentence() {
    let (ok, _, err) = headroom(&["info"], &[("HEADROOM_BACKEND", "tpu")]);
    assert!(!ok && err.contains("is not a backend"), "{err}");
    let (ok, _, err) = headroom(&["cases"], &[("HEADROOM_PROFILE", "fastest")]);
    assert!(!ok && err.contains("is not a profile"), "{err}");
}

#[test]
fn cuda_demanded_without_a_gpu_fails_cleanly() {
    let (ok, out, err) = headroom(&["info"], &[("HEADROOM_BACKEND", "cuda")]);
    if ok {
        assert!(out.contains("backend: cuda"));
    } else {
        assert!(
            err.starts_with("headroom: HEADROOM_BACKEND=cuda, but "),
            "{err}"
        );
        assert_eq!(err.trim().lines().count(), 1);
    }
}

#[test]
fn compare_of_missing_files_is_one_sentence() {
    let (ok, _, err) = headroom(
        &["compare", "/nonexistent/a.json", "/nonexistent/b.json"],
        &[],
    );
    assert!(!ok);
    assert!(err.contains("could not read /nonexistent/a.json"), "{err}");
}

#[test]
fn check_filters_and_reports_counts() {
    let (ok, out, _) = headroom(&["check", "copy/"], &[("HEADROOM_BACKEND", "cpu")]);
    assert!(ok, "{out}");
    assert!(
        out.contains("PASS ok       copy/vec16/f32/n1000003"),
        "{out}"
    );
    assert!(
        out.trim_end()
            .ends_with("check: 2 passed, 0 failed, 0 skipped"),
        "{out}"
    );
}

#[test]
fn cases_lists_json_for_peers() {
    let (ok, out, _) = headroom(
        &["cases", "--format", "json"],
        &[("HEADROOM_BACKEND", "cuda"), ("HEADROOM_PROFILE", "quick")],
    );
    assert!(ok);
    let v: serde_json::Value = serde_json::from_str(&out).expect("json");
    let ids: Vec<&str> = v
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["id"].as_str().unwrap())
        .collect();
    assert!(
        ids.contains(&"matmul/cublas/bf16/m4096-n4096-k4096"),
        "{ids:?}"
    );
}

#[test]
fn bad_allocator_is_one_sentence() {
    let (ok, _, err) = headroom(&["check", "copy/"], &[("HEADROOM_ALLOCATOR", "jemalloc")]);
    assert!(!ok);
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(
        err.contains("HEADROOM_ALLOCATOR: 'jemalloc' is not an allocator"),
        "{err}"
    );
}

#[test]
fn a_check_filter_that_matches_nothing_is_one_sentence() {
    let (ok, out, err) = headroom(&["check", "NOSUCH"], &[("HEADROOM_BACKEND", "cpu")]);
    assert!(!ok, "{out}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(
        err.contains("'NOSUCH'") && err.contains("no case id"),
        "{err}"
    );
    assert!(!out.contains("PASS"), "{out}");
}
