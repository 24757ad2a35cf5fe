//! The PyTorch peer (peers/torch/headroom_torch.py) on the CPU at tiny sizes: its report
//! must read back as a headroom report with the cases it was given and the statuses the
//! peer promises, and its shard cases must run over two ranks under torchrun with gloo. And
//! the snapshots `headroom snapshot` exports must pass PyTorch's own summary of them.
//! Where PyTorch cannot be imported the test prints why and returns.
//!
//! `HEADROOM_PYTHON` names the interpreter (default `python3`); PYTHONPATH and the rest of
//! the environment pass through, so a PyTorch installed in a folder of its own works too.

use std::path::{Path, PathBuf};
use std::process::Command;

use headroom::report::{Report, Status};
use headroom::shard::ShardRecord;
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
    // Grouped-query attention: repeated K/V in the naive program, SDPA's enable_gqa in flash.
    let gqa_naive = first(&infos, "grouped-query naive attention", |c| {
        c.family == "attention" && c.technique == "naive" && c.shape.contains("-kv")
    });
    let gqa_flash = first(&infos, "grouped-query flash attention", |c| {
        c.family == "attention" && c.technique == "flash" && c.shape.contains("-kv")
    });
    let train_f32 = first(&infos, "f32 training step", |c| {
        c.family == "train" && c.dtype.name() == "f32"
    });
    let train_full = first(&infos, "fully checkpointed training step", |c| {
        c.family == "train" && c.technique.starts_with("full-")
    });
    // A model with a vocabulary (embedding, GQA, SwiGLU, RMSNorm, LM head and cross-entropy),
    // with each head-loss variant: materialized and chunked run, fused is skipped (PyTorch
    // has none of its own).
    let is_model = |c: &CaseInfo| c.family == "train" && c.shape.contains("-v");
    let train_model = first(&infos, "training step with a vocabulary", |c| {
        is_model(c) && !c.technique.contains("-chunked") && !c.technique.ends_with("-fused")
    });
    let train_chunked = first(&infos, "chunked cross-entropy", |c| {
        is_model(c) && c.technique.contains("-chunked")
    });
    let train_fused = first(&infos, "fused cross-entropy", |c| {
        is_model(c) && c.technique.ends_with("-fused")
    });
    let alloc = infos.iter().find(|c| c.family == "alloc");
    let mut wanted = vec![
        cublas,
        simt,
        naive,
        flash,
        gqa_naive,
        gqa_flash,
        train_f32,
        train_full,
        train_model,
        train_chunked,
        train_fused,
    ];
    wanted.extend(alloc);

    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("peers/torch/headroom_torch.py");
    let out_dir = dir.join("out");
    let mut cmd = Command::new(&py);
    peer_args(&mut cmd, &script, &cases_json, &out_dir, 7)
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
    for info in [cublas, naive, gqa_naive] {
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
    // PyTorch's CPU flash kernel exists since 2.2 (enable_gqa since 2.5); an older one
    // says why it skips.
    for info in [flash, gqa_flash] {
        match &rec(&info.id).status {
            Status::Ok => assert!(rec(&info.id).validation.as_ref().unwrap().passed()),
            Status::Skipped(why) => assert!(!why.is_empty()),
            other => panic!("{}: {other:?}", info.id),
        }
    }
    for info in [train_f32, train_full, train_model, train_chunked] {
        ok(info);
    }
    match &rec(&train_fused.id).status {
        Status::Skipped(why) => assert!(why.contains("fused"), "{why}"),
        other => panic!("{}: {other:?}", train_fused.id),
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

/// A hand-written shard case in the form `headroom cases --format json` lists it.
fn shard_case(technique: &str, dtype: &str, shape: &str) -> serde_json::Value {
    serde_json::json!({
        "id": format!("shard/{technique}/{dtype}/{shape}"),
        "family": "shard",
        "technique": technique,
        "dtype": dtype,
        "shape": shape,
        "flops": 1.0e6,
        "bytes_moved": 0.0,
        "predicted_peak_bytes": 0,
        "tolerance": 1e-4,
    })
}

/// Why `torch.distributed` cannot be used here, or None when it can.
fn distributed_missing(py: &str) -> Option<String> {
    let probe = "import torch.distributed as d, sys; sys.exit(0 if d.is_available() else 3)";
    match Command::new(py).args(["-c", probe]).output() {
        Err(e) => Some(format!("{py} could not be started: {e}")),
        Ok(o) if o.status.success() => None,
        Ok(o) => Some(format!(
            "this PyTorch was built without torch.distributed ({})",
            String::from_utf8_lossy(&o.stderr).trim()
        )),
    }
}

#[test]
fn torch_peer_runs_shard_cases_under_torchrun() {
    let py = python();
    if let Some(why) = torch_missing(&py) {
        eprintln!("skipped: PyTorch is not installed ({why})");
        return;
    }
    if let Some(why) = distributed_missing(&py) {
        eprintln!("skipped: {why}");
        return;
    }
    let dir = scratch_dir();
    // Every strategy over two ranks in fp32, the bucket and rank 0's extra bytes given on
    // some, one bf16 case, and two cases for other worlds, which this launch skips.
    let shape = "L2-h64-heads2-n16-b4";
    let cases = vec![
        shard_case("ddp-none-naive-mb2", "f32", &format!("{shape}-w2-bk8192")),
        shard_case("zero1-full-flash-mb1", "f32", &format!("{shape}-w2")),
        shard_case("zero2-selective-naive-mb1", "f32", &format!("{shape}-w2")),
        shard_case(
            "fsdp-every1-naive-mb2",
            "f32",
            &format!("{shape}-w2-x65536"),
        ),
        shard_case(
            "fsdp-noreshard-none-flash-mb1",
            "f32",
            &format!("{shape}-w2"),
        ),
        shard_case("fsdp-none-naive-mb1", "bf16", &format!("{shape}-w2")),
        shard_case("ddp-none-naive-mb1", "f32", &format!("{shape}-w4")),
        shard_case("ddp-none-naive-mb1", "f32", &format!("{shape}-w1")),
    ];
    let cases_json = dir.join("cases.json");
    std::fs::write(&cases_json, serde_json::to_vec(&cases).expect("json")).expect("written");

    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("peers/torch/headroom_torch.py");
    let out_dir = dir.join("out");
    // `python -m torch.distributed.run` is torchrun; --standalone picks a free port.
    let mut cmd = Command::new(&py);
    cmd.args([
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
    ]);
    let run = peer_args(&mut cmd, &script, &cases_json, &out_dir, 11)
        .args(["--dist-timeout", "120"])
        .output()
        .expect("torchrun starts");
    let stdout = String::from_utf8_lossy(&run.stdout);
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(
        run.status.success(),
        "torchrun failed ({}):\n{stdout}\n{stderr}",
        run.status
    );

    // Only rank 0 writes, under a name that carries the world size.
    let path = out_dir.join("cpu-torch-w2.json");
    assert!(
        !out_dir.join("cpu-torch.json").exists(),
        "a torchrun launch writes only its -w<W> report"
    );
    let report = Report::read(&path).unwrap_or_else(|e| panic!("{e}\npeer output:\n{stdout}"));
    assert_eq!(report.schema, "headroom-report/1");
    assert_eq!(report.device.backend, "torch");
    assert_eq!(report.seed, 11);
    let ids: Vec<String> = report.cases.iter().map(|c| c.id.clone()).collect();
    let want: Vec<String> = cases
        .iter()
        .map(|c| c["id"].as_str().unwrap_or_default().to_string())
        .collect();
    assert_eq!(ids, want, "every case of the file, in order");

    // The `shard` objects, read as headroom reads them.
    let raw: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).expect("readable")).expect("json");
    let shard_of = |i: usize| -> ShardRecord {
        serde_json::from_value(raw["cases"][i]["shard"].clone())
            .unwrap_or_else(|e| panic!("{}: no shard object headroom reads: {e}", ids[i]))
    };
    let strategies = ["ddp", "zero1", "zero2", "fsdp", "fsdp-noreshard", "fsdp"];
    for (i, strategy) in strategies.iter().enumerate() {
        let r = &report.cases[i];
        match &r.status {
            Status::Ok => {}
            // A strategy this PyTorch lacks is skipped with the reason.
            Status::Skipped(why) => {
                assert!(!why.is_empty(), "{}", r.id);
                continue;
            }
            other => panic!("{}: {other:?}\n{stdout}\n{stderr}", r.id),
        }
        let t = r.time.as_ref().expect("an ok case is timed");
        assert!(t.samples >= 1 && t.median_s > 0.0, "{}: {t:?}", r.id);
        let v = r
            .validation
            .as_ref()
            .expect("compared with the reference step");
        assert!(v.passed() && v.compared > 0, "{}: {v:?}", r.id);
        assert_eq!(r.memory, None, "{}: no memory statistics on the CPU", r.id);
        let s = shard_of(i);
        assert_eq!(
            (s.strategy.as_str(), s.world),
            (*strategy, 2),
            "{}: {s:?}",
            r.id
        );
        assert!(
            s.comm.starts_with("torch.distributed/gloo "),
            "{}: {}",
            r.id,
            s.comm
        );
        assert!(
            s.ranks.is_empty(),
            "{}: no per-rank memory on the CPU",
            r.id
        );
    }
    assert_eq!(
        (shard_of(0).bucket_bytes, shard_of(0).rank0_extra),
        (8192, 0)
    );
    assert_eq!(
        (shard_of(3).bucket_bytes, shard_of(3).rank0_extra),
        (25 << 20, 65536)
    );
    assert_eq!(
        report.cases[6].status,
        Status::Skipped("needs 4 ranks; run under torchrun --nproc_per_node 4".into())
    );
    assert!(
        matches!(&report.cases[7].status, Status::Skipped(why) if why.starts_with("needs 1 rank;")),
        "{:?}",
        report.cases[7].status
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// The peer's script and its common arguments: the case list, the output folder, the CPU,
/// two timed runs and no warm-up, 20 s a case, and `seed`.
fn peer_args<'a>(
    cmd: &'a mut Command,
    script: &Path,
    cases: &Path,
    out: &Path,
    seed: u64,
) -> &'a mut Command {
    cmd.arg(script)
        .arg("--cases")
        .arg(cases)
        .arg("--out")
        .arg(out)
        .args([
            "--device",
            "cpu",
            "--iters",
            "2",
            "--warmup",
            "0",
            "--max-seconds",
            "20",
        ])
        .arg("--seed")
        .arg(seed.to_string())
}

/// A training step exported by `headroom snapshot` (caching allocator, and expandable
/// segments) passes `torch.cuda._memory_viz.segsum`, which asserts that each segment's blocks
/// add up to it and all segments to the reserved total, and `trace`, which walks the history.
#[test]
fn exported_snapshots_pass_pytorchs_segment_summary() {
    let py = python();
    if let Some(why) = torch_missing(&py) {
        eprintln!("skipped: PyTorch is not installed ({why})");
        return;
    }
    let dir = scratch_dir();
    let case = "train/full-flash-mb1/bf16/L2-h128-heads2-n32-b4-kv1-ffn352-swiglu-rms-nobias-v4099";
    for allocator in ["caching", "expandable"] {
        let path = dir.join(format!("{allocator}.pickle"));
        let export = Command::new(env!("CARGO_BIN_EXE_headroom"))
            .args(["snapshot", case, "--allocator", allocator, "--out"])
            .arg(&path)
            .output()
            .expect("headroom runs");
        assert!(
            export.status.success(),
            "{}",
            String::from_utf8_lossy(&export.stderr)
        );
        let check = Command::new(&py)
            .arg("-c")
            .arg(
                "import pickle, sys\n\
                 import torch.cuda._memory_viz as mv\n\
                 d = pickle.load(open(sys.argv[1], 'rb'))\n\
                 assert d['segments'], 'no segments'\n\
                 mv.trace(d)\n\
                 print(mv.segsum(d))\n",
            )
            .arg(&path)
            .output()
            .expect("python runs");
        let out = String::from_utf8_lossy(&check.stdout);
        assert!(
            check.status.success(),
            "{allocator}: {out}\n{}",
            String::from_utf8_lossy(&check.stderr)
        );
        assert!(out.contains("total_reserved"), "{allocator}: {out}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}
