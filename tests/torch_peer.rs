//! The PyTorch peer (peers/torch/headroom_torch.py) on the CPU at tiny sizes: its report
//! must read back as a headroom report with the cases it was given and the statuses the
//! peer promises. Where PyTorch cannot be imported the test prints why and returns.
//!
//! `HEADROOM_PYTHON` names the interpreter (default `python3`); PYTHONPATH and the rest of
//! the environment pass through, so a PyTorch installed in a folder of its own works too.

use std::path::{Path, PathBuf};
use std::process::Command;

use headroom::report::{Report, Status};
use headroom::techniques::CaseInfo;

fn python() -> String {
    std::env::var("HEADROOM_PYTHON").unwrap_or_else(|_| "python3".into())
}

/// Why PyTorch cannot be used here, or None when `import torch` works.
fn torch_missing(py: &str) -> Option<String> {
    match Command::new(py).args(["-c", "import torch"]).output() {
        Err(e) => Some(format!("{py} could not be started: {e}")),
        Ok(o) if o.status.success() => None,
        Ok(o) => {
            let err = String::from_utf8_lossy(&o.stderr);
            let last = err
                .lines()
                .rev()
                .find(|l| !l.trim().is_empty())
                .unwrap_or("");
            Some(format!(
                "`{py} -c \"import torch\"` failed: {}",
                last.trim()
            ))
        }
    }
}

fn scratch_dir() -> PathBuf {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let dir = std::env::temp_dir().join(format!(
        "headroom-torch-peer-{}-{nanos}",
        std::process::id()
    ));
    std::fs::create_dir_all(&dir).expect("a scratch folder");
    dir
}

/// The CPU quick profile's case list, as headroom prints it.
fn cpu_cases(dir: &Path) -> (PathBuf, Vec<CaseInfo>) {
    let out = Command::new(env!("CARGO_BIN_EXE_headroom"))
        .args(["cases", "--format", "json"])
        .env("HEADROOM_BACKEND", "cpu")
        .env("HEADROOM_PROFILE", "quick")
        .output()
        .expect("headroom runs");
    assert!(
        out.status.success(),
        "headroom cases failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let path = dir.join("cases.json");
    std::fs::write(&path, &out.stdout).expect("cases.json written");
    let infos: Vec<CaseInfo> = serde_json::from_slice(&out.stdout).expect("a CaseInfo list");
    (path, infos)
}

fn first<'a>(infos: &'a [CaseInfo], what: &str, f: impl Fn(&CaseInfo) -> bool) -> &'a CaseInfo {
    infos
        .iter()
        .find(|c| f(c))
        .unwrap_or_else(|| panic!("the CPU quick profile has no {what} case"))
}

#[test]
fn torch_peer_reports_the_cases_it_is_given() {
    let py = python();
    if let Some(why) = torch_missing(&py) {
        eprintln!("skipped: PyTorch is not installed ({why})");
        return;
    }
    let dir = scratch_dir();
    let (cases_json, infos) = cpu_cases(&dir);

    // A few small cases of every kind the peer knows, picked from the registry so that the
    // test follows its sizes.
    let cublas = first(&infos, "cuBLAS f32 matmul", |c| {
        c.family == "matmul" && c.technique == "cublas" && c.dtype.name() == "f32"
    });
    let simt = first(&infos, "SIMT matmul of the same shape", |c| {
        c.family == "matmul" && c.technique == "simt" && c.shape == cublas.shape
    });
    let naive = first(&infos, "naive f32 attention", |c| {
        c.family == "attention" && c.technique == "naive" && c.dtype.name() == "f32"
    });
    let flash = first(&infos, "flash attention", |c| {
        c.family == "attention" && c.technique == "flash"
    });
    let train_f32 = first(&infos, "f32 training step", |c| {
        c.family == "train" && c.dtype.name() == "f32"
    });
    let train_full = first(&infos, "fully checkpointed training step", |c| {
        c.family == "train" && c.technique.starts_with("full-")
    });
    let alloc = infos.iter().find(|c| c.family == "alloc");
    let mut wanted = vec![cublas, simt, naive, flash, train_f32, train_full];
    wanted.extend(alloc);

    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("peers/torch/headroom_torch.py");
    let out_dir = dir.join("out");
    let mut cmd = Command::new(&py);
    cmd.arg(&script)
        .arg("--cases")
        .arg(&cases_json)
        .arg("--out")
        .arg(&out_dir)
        .args([
            "--device",
            "cpu",
            "--iters",
            "2",
            "--warmup",
            "0",
            "--max-seconds",
            "20",
            "--seed",
            "7",
        ])
        .arg("--filter")
        .args(wanted.iter().map(|c| c.id.as_str()));
    let run = cmd.output().expect("the peer starts");
    let stdout = String::from_utf8_lossy(&run.stdout);
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(
        run.status.success(),
        "the peer failed ({}):\n{stdout}\n{stderr}",
        run.status
    );

    let path = out_dir.join("cpu-torch.json");
    let report = Report::read(&path).unwrap_or_else(|e| panic!("{e}\npeer output:\n{stdout}"));
    assert_eq!(report.schema, "headroom-report/1");
    assert_eq!(report.device.backend, "torch");
    assert_eq!(report.device.name, "cpu");
    assert_eq!(report.seed, 7);
    let ids: Vec<&str> = report.cases.iter().map(|c| c.id.as_str()).collect();
    // --filter keeps the ids containing any of its words, in the case list's order.
    let want: Vec<&str> = infos
        .iter()
        .filter(|c| wanted.iter().any(|w| c.id.contains(w.id.as_str())))
        .map(|c| c.id.as_str())
        .collect();
    assert_eq!(
        ids, want,
        "the peer reports exactly the filtered cases, in order"
    );

    let rec = |id: &str| report.cases.iter().find(|c| c.id == id).expect("present");
    for info in &wanted {
        let r = rec(&info.id);
        assert_eq!(
            (r.flops, r.bytes_moved),
            (info.flops, info.bytes_moved),
            "{}: the work is copied from the case list",
            info.id
        );
        assert_eq!(
            r.memory, None,
            "{}: no memory statistics on the CPU",
            info.id
        );
    }
    let ok = |info: &CaseInfo| {
        let r = rec(&info.id);
        assert_eq!(r.status, Status::Ok, "{}: {stdout}", info.id);
        let t = r.time.as_ref().expect("an ok case is timed");
        assert!(t.samples >= 1 && t.median_s > 0.0, "{}: {t:?}", info.id);
        r
    };
    for info in [cublas, naive] {
        let v = ok(info).validation.clone().expect("validated");
        assert!(v.passed(), "{}: {v:?}", info.id);
        assert!(v.compared > 0);
    }
    assert_eq!(rec(&cublas.id).speed_vs_baseline, Some(1.0));
    assert!(report.ceilings.cublas_f32_flops_per_s.is_some());
    assert_eq!(
        rec(&simt.id).status,
        Status::Skipped("same as the cublas row".into())
    );
    // PyTorch's CPU flash kernel exists since 2.2; an older one says why it skips.
    match &rec(&flash.id).status {
        Status::Ok => assert!(rec(&flash.id).validation.as_ref().unwrap().passed()),
        Status::Skipped(why) => assert!(!why.is_empty()),
        other => panic!("{}: {other:?}", flash.id),
    }
    for info in [train_f32, train_full] {
        ok(info);
    }
    if let Some(a) = alloc {
        assert!(matches!(rec(&a.id).status, Status::Skipped(_)));
    }

    // `headroom compare` takes the peer's report.
    let cmp = Command::new(env!("CARGO_BIN_EXE_headroom"))
        .arg("compare")
        .arg(&path)
        .arg(&path)
        .output()
        .expect("headroom runs");
    assert!(
        cmp.status.success(),
        "compare failed: {}",
        String::from_utf8_lossy(&cmp.stderr)
    );
    assert!(String::from_utf8_lossy(&cmp.stdout).contains(&cublas.id));
    let _ = std::fs::remove_dir_all(&dir);
}
