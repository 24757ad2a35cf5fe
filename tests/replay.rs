//! `headroom replay`: PyTorch memory snapshots written by the tests themselves in PyTorch's
//! format (from headroom's own allocators, and by hand for the actions those never take),
//! read back, replayed through every allocator, with the fidelity figure, the
//! recommendation, the export of a training case, and bad input.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use headroom::alloc::pickle;
use headroom::alloc::snapshot::{self, alloc_conf, parse, record, replay_snapshot};
use headroom::alloc::trace::{
    fragmenting_trace, replay_simulated, steady_trace, walkthrough_trace, Trace,
    FRAGMENTING_CAPACITY,
};
use headroom::alloc::{AllocatorSpec, CachingOptions};
use serde_pickle::{HashableValue, SerOptions, Value};

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("headroom-replay-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn pickle(v: &Value) -> Vec<u8> {
    serde_pickle::value_to_vec(v, SerOptions::new()).unwrap()
}

fn headroom(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_headroom"))
        .args(args)
        .output()
        .expect("headroom runs");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn actions(v: &Value) -> Vec<String> {
    let Value::Dict(top) = v else { panic!() };
    let Some(Value::List(traces)) = top.get(&HashableValue::String("device_traces".into())) else {
        panic!()
    };
    let Value::List(entries) = &traces[0] else {
        panic!()
    };
    entries
        .iter()
        .map(|e| match e {
            Value::Dict(d) => match d.get(&HashableValue::String("action".into())) {
                Some(Value::String(a)) => a.clone(),
                _ => panic!(),
            },
            _ => panic!(),
        })
        .collect()
}

/// Traces and the allocator each is recorded under: the caching allocator plain and with a
/// max split size, and expandable segments.
fn own_allocator_traces() -> Vec<(Trace, AllocatorSpec)> {
    vec![
        (
            steady_trace(),
            AllocatorSpec::Caching(CachingOptions::default()),
        ),
        (
            walkthrough_trace(),
            AllocatorSpec::Caching(CachingOptions::max_split(128 << 20)),
        ),
        (
            walkthrough_trace(),
            AllocatorSpec::Expandable(CachingOptions::default()),
        ),
    ]
}

#[test]
fn fidelity_is_complete_on_snapshots_of_headrooms_own_allocators() {
    for (trace, spec) in own_allocator_traces() {
        let capacity = trace.capacity.unwrap();
        let v = record(&trace, spec, capacity).unwrap();
        let snap = parse(&pickle(&v), &trace.name).unwrap();
        let results = replay_snapshot(&snap, Some(capacity)).unwrap();
        let f = &results[0].fidelity;
        assert_eq!(f.allocator, spec.to_string(), "{}", trace.name);
        assert!(f.snapshot_segments > 0);
        assert_eq!(f.matched_fraction(), 1.0, "{} {spec}: {f:?}", trace.name);
        assert_eq!(f.reserved_error, 0.0, "{} {spec}: {f:?}", trace.name);
        // The replay through the recorded allocator has the trace's own peaks.
        let direct = replay_simulated(&trace, spec, capacity, None).unwrap();
        // The timeline of every row keeps its peaks.
        for ((_, m), series) in results[0].rows.iter().zip(&results[0].series) {
            let top = series.points.iter().map(|p| p.2).max().unwrap();
            assert_eq!(top, m.peak_reserved, "{}", trace.name);
            assert!(series.points.len() <= snapshot::SERIES_POINTS + 1);
        }
        let row = &results[0].rows.iter().find(|(s, _)| *s == spec).unwrap().1;
        assert_eq!(row.peak_reserved, direct.peak_reserved);
        assert_eq!(row.peak_allocated, direct.peak_allocated);
    }
}

fn field<'a>(d: &'a BTreeMap<HashableValue, Value>, k: &str) -> &'a Value {
    d.get(&HashableValue::String(k.into()))
        .unwrap_or_else(|| panic!("no '{k}'"))
}
fn int(d: &BTreeMap<HashableValue, Value>, k: &str) -> u64 {
    match field(d, k) {
        Value::I64(x) => *x as u64,
        other => panic!("'{k}' is {other:?}"),
    }
}
fn text<'a>(d: &'a BTreeMap<HashableValue, Value>, k: &str) -> &'a str {
    match field(d, k) {
        Value::String(x) => x,
        other => panic!("'{k}' is {other:?}"),
    }
}
fn dicts(v: &Value) -> Vec<&BTreeMap<HashableValue, Value>> {
    let Value::List(l) = v else { panic!("{v:?}") };
    l.iter()
        .map(|x| match x {
            Value::Dict(d) => d,
            other => panic!("{other:?}"),
        })
        .collect()
}

/// The exported snapshot's `segments` are the allocator's state at the end, as the trace
/// itself implies it: the segments allocated (or pages mapped) and not released, tiled by
/// their blocks in address order, the active ones exactly the allocations still live, with
/// their sizes, so that PyTorch's viewer can walk the trace back from them.
#[test]
fn exported_segments_are_the_state_the_trace_ends_in() {
    let mut traces = own_allocator_traces();
    traces.push((
        fragmenting_trace(),
        AllocatorSpec::Caching(CachingOptions::default()),
    ));
    for (trace, spec) in traces {
        let capacity = trace.capacity.unwrap_or(FRAGMENTING_CAPACITY);
        let v = record(&trace, spec, capacity).unwrap();
        let Value::Dict(top) = &v else { panic!() };
        let Value::List(traces) = field(top, "device_traces") else {
            panic!()
        };
        // What the trace leaves: live allocations (address -> size) and reserved bytes.
        let mut live: BTreeMap<u64, u64> = BTreeMap::new();
        let mut reserved: i64 = 0;
        for e in dicts(&traces[0]) {
            let (addr, size) = (int(e, "addr"), int(e, "size") as i64);
            match text(e, "action") {
                "alloc" => assert!(live.insert(addr, size as u64).is_none()),
                "free_completed" => assert!(live.remove(&addr).is_some()),
                "segment_alloc" | "segment_map" => reserved += size,
                "segment_free" | "segment_unmap" => reserved -= size,
                _ => {}
            }
        }
        let segments = dicts(field(top, "segments"));
        assert!(!segments.is_empty(), "{}: no segments", trace.name);
        let total: u64 = segments.iter().map(|s| int(s, "total_size")).sum();
        assert_eq!(total as i64, reserved, "{} {spec}", trace.name);
        let mut active: BTreeMap<u64, u64> = BTreeMap::new();
        for seg in &segments {
            let (addr, size) = (int(seg, "address"), int(seg, "total_size"));
            let mut at = addr;
            let mut allocated = 0;
            for b in dicts(field(seg, "blocks")) {
                assert_eq!(int(b, "address"), at, "{}: a hole or overlap", trace.name);
                at += int(b, "size");
                match text(b, "state") {
                    "active_allocated" => {
                        assert!(int(b, "requested_size") <= int(b, "size"));
                        allocated += int(b, "size");
                        active.insert(int(b, "address"), int(b, "requested_size"));
                    }
                    "inactive" => {}
                    other => panic!("state {other}"),
                }
            }
            assert_eq!(
                at,
                addr + size,
                "{}: blocks do not end the segment",
                trace.name
            );
            assert_eq!(int(seg, "allocated_size"), allocated);
        }
        // Zero-byte allocations take no space and appear in no segment.
        live.retain(|_, size| *size > 0);
        assert_eq!(active, live, "{} {spec}", trace.name);
        // And the file still reads back as before.
        parse(&pickle(&v), &trace.name).unwrap();
    }
}

#[test]
fn a_fragmenting_oom_is_avoided_by_the_recommended_setting() {
    let trace = fragmenting_trace();
    let v = record(
        &trace,
        AllocatorSpec::Caching(CachingOptions::default()),
        FRAGMENTING_CAPACITY,
    )
    .unwrap();
    let acts = actions(&v);
    for a in [
        "alloc",
        "free_requested",
        "free_completed",
        "segment_alloc",
        "oom",
    ] {
        assert!(acts.iter().any(|x| x == a), "no {a} in the fixture");
    }
    let snap = parse(&pickle(&v), "fragmenting").unwrap();
    let h = &snap.devices[0];
    let oom = h.oom.as_ref().expect("the recorded run ran out of memory");
    // The device as PyTorch saw it: reserved + free = the card.
    assert_eq!(oom.capacity(), FRAGMENTING_CAPACITY);
    let r = &replay_snapshot(&snap, None).unwrap()[0];
    assert_eq!(r.capacity, FRAGMENTING_CAPACITY);
    let caching = &r.rows[1];
    assert_eq!(caching.0, AllocatorSpec::Caching(CachingOptions::default()));
    let o = caching.1.oom.as_ref().expect("caching runs out again");
    assert!(o.despite_free_memory(), "{o:?}");
    let best = r.recommendation.expect("some setting avoids it");
    let m = &r.rows.iter().find(|(s, _)| *s == best).unwrap().1;
    assert!(m.oom.is_none());
    for (s, other) in &r.rows {
        if other.oom.is_none() && alloc_conf(s).is_some() {
            assert!(m.peak_reserved <= other.peak_reserved, "{s} reserves less");
        }
    }
    // And the command says so, with the line to paste.
    let dir = scratch("fragmenting");
    let path = dir.join("fragmenting.pickle");
    std::fs::write(&path, pickle(&v)).unwrap();
    let (ok, out, err) = headroom(&[
        "replay",
        path.to_str().unwrap(),
        "--out",
        dir.to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    let conf = alloc_conf(&best).unwrap();
    assert!(
        out.contains(&format!("PYTORCH_CUDA_ALLOC_CONF={conf}")),
        "{out}"
    );
    assert!(out.contains("despite enough free memory"), "{out}");
    assert!(out.contains("fidelity: replayed through caching"), "{out}");
    let svg = std::fs::read_to_string(dir.join("replay-fragmenting-replay-dev0.svg")).unwrap();
    assert!(svg.matches("<polyline").count() >= 2 * snapshot::candidates().len());
    let md = std::fs::read_to_string(dir.join("replay-fragmenting.md")).unwrap();
    assert!(md.contains("](replay-fragmenting-replay-dev0.svg)"), "{md}");
    let report = headroom::report::Report::read(&dir.join("replay-fragmenting.json")).unwrap();
    assert_eq!(report.cases.len(), snapshot::candidates().len());
    assert!(report.cases.iter().all(|c| c.allocator.is_some()));
}

/// A snapshot written by hand: blocks allocated before recording began, a `snapshot` and
/// an `annotate` mark, segment unmaps, a free of a block never seen, two streams.
#[test]
fn hand_written_entries_of_every_action_are_read() {
    let e = |action: &str, addr: i64, size: i64, stream: i64| {
        let mut d = BTreeMap::new();
        d.insert(
            HashableValue::String("action".into()),
            Value::String(action.into()),
        );
        d.insert(HashableValue::String("addr".into()), Value::I64(addr));
        d.insert(HashableValue::String("size".into()), Value::I64(size));
        d.insert(HashableValue::String("stream".into()), Value::I64(stream));
        d.insert(HashableValue::String("frames".into()), Value::List(vec![]));
        Value::Dict(d)
    };
    let entries = vec![
        e("segment_map", 0x1000_0000, 2 << 20, 0),
        e("alloc", 0x1000_0000, 1 << 20, 0),
        e("snapshot", 0, 0, 0),
        e("free_requested", 0x2000_0000, 4096, 7),
        e("free_completed", 0x2000_0000, 4096, 7), // allocated before recording began
        e("annotate", 0x1000_0000, 0, 0),
        e("free_completed", 0x3000_0000, 0, 0), // unknown, no size
        e("free_requested", 0x1000_0000, 1 << 20, 0),
        e("free_completed", 0x1000_0000, 1 << 20, 0),
        e("segment_unmap", 0x1000_0000, 2 << 20, 0),
    ];
    let mut top = BTreeMap::new();
    top.insert(
        HashableValue::String("segments".into()),
        Value::List(vec![]),
    );
    top.insert(
        HashableValue::String("device_traces".into()),
        Value::List(vec![Value::List(vec![]), Value::List(entries)]),
    );
    let snap = parse(&pickle(&Value::Dict(top)), "hand").unwrap();
    assert_eq!(snap.devices.len(), 1, "the empty device is skipped");
    let h = &snap.devices[0];
    assert_eq!(h.device, 1);
    assert!(h.expandable);
    assert_eq!(h.preexisting, 1);
    assert_eq!(h.unmatched_frees, 1);
    assert_eq!(h.segments, vec![(1, 2 << 20), (4, -(2 << 20))]);
    assert_eq!(h.trace.events.len(), 4);
    assert_eq!(h.trace.peak_live_bytes(), (1 << 20) + 4096);
}

/// Recording that starts after the model is built (the usual way): blocks the dump's segments
/// show active that the trace never allocated are live from the start, and the reserve the
/// trace began with counts toward the device's capacity at the OOM.
#[test]
fn blocks_allocated_before_recording_and_never_freed_are_live_from_the_start() {
    let s = |k: &str| HashableValue::String(k.into());
    let e = |action: &str, addr: i64, size: i64| {
        let mut d = BTreeMap::new();
        d.insert(s("action"), Value::String(action.into()));
        d.insert(s("addr"), Value::I64(addr));
        d.insert(s("size"), Value::I64(size));
        d.insert(s("stream"), Value::I64(0));
        d.insert(s("frames"), Value::List(vec![]));
        if action == "oom" {
            d.insert(s("device_free"), Value::I64(10 << 20));
        }
        Value::Dict(d)
    };
    let block = |addr: i64, size: i64, state: &str| {
        let mut d = BTreeMap::new();
        d.insert(s("address"), Value::I64(addr));
        d.insert(s("size"), Value::I64(size));
        d.insert(s("requested_size"), Value::I64(size));
        d.insert(s("state"), Value::String(state.into()));
        d.insert(s("frames"), Value::List(vec![]));
        Value::Dict(d)
    };
    let segment = |device: i64, addr: i64, total: i64, blocks: Vec<Value>| {
        let mut d = BTreeMap::new();
        d.insert(s("device"), Value::I64(device));
        d.insert(s("address"), Value::I64(addr));
        d.insert(s("total_size"), Value::I64(total));
        d.insert(s("stream"), Value::I64(0));
        d.insert(s("segment_type"), Value::String("large".into()));
        d.insert(s("blocks"), Value::List(blocks));
        Value::Dict(d)
    };
    const MIB: i64 = 1 << 20;
    let (w, a, b) = (0x0800_0000i64, 0x1000_0000i64, 0x2000_0000i64);
    // Before recording: 12 MiB of weights in a segment of their own (W), and a cached 20 MiB
    // segment (A). The trace takes 4 MiB of A, then a 30 MiB segment B for a block it frees
    // again (B stays cached), then runs out of memory.
    let entries = vec![
        e("alloc", a, 4 * MIB),
        e("segment_alloc", b, 30 * MIB),
        e("alloc", b, 30 * MIB),
        e("free_requested", b, 30 * MIB),
        e("free_completed", b, 30 * MIB),
        e("oom", 0, 64 * MIB),
    ];
    let segments = vec![
        segment(0, w, 12 * MIB, vec![block(w, 12 * MIB, "active_allocated")]),
        segment(
            0,
            a,
            20 * MIB,
            vec![
                block(a, 4 * MIB, "active_allocated"),
                block(a + 4 * MIB, 16 * MIB, "inactive"),
            ],
        ),
        segment(0, b, 30 * MIB, vec![block(b, 30 * MIB, "inactive")]),
        // Another device's segment is not this device's.
        segment(
            1,
            0x3000_0000,
            2 * MIB,
            vec![block(0x3000_0000, MIB, "active_allocated")],
        ),
    ];
    let mut top = BTreeMap::new();
    top.insert(s("segments"), Value::List(segments));
    top.insert(s("device_traces"), Value::List(vec![Value::List(entries)]));
    let bytes = pickle(&Value::Dict(top));
    let snap = parse(&bytes, "mid-run").unwrap();
    let h = &snap.devices[0];
    assert_eq!(h.preexisting, 1, "the weights");
    assert_eq!(h.reserved_before, 32 << 20, "W and A");
    let oom = h.oom.as_ref().unwrap();
    assert_eq!(
        oom.reserved,
        62 << 20,
        "W and A before recording, B from the trace"
    );
    assert_eq!(oom.capacity(), 72 << 20);
    // The weights are live throughout: 12 + 4 MiB beside the refused 64 MiB (the trace asks
    // for an OOM's request again), the peak of live bytes; without them it would be 68 MiB.
    assert_eq!(h.trace.peak_live_bytes(), 80 << 20);
    let whole = replay_snapshot(&snap, None).unwrap();
    let streamed = snapshot::replay_bytes(&bytes, "mid-run", None).unwrap();
    for r in [&whole[0], &streamed[0]] {
        assert_eq!(r.capacity, 72 << 20);
        assert_eq!(r.preexisting, 1);
        // The snapshot's segment actions are B's allocation alone; the replay's own start
        // (the weights' segment) is not compared, its segment for the 4 MiB block (which A
        // served in the recorded run), for B, and B's release as it empties its cache before
        // refusing the 64 MiB are.
        assert_eq!(r.fidelity.snapshot_segments, 1);
        assert_eq!(r.fidelity.replay_segments, 3);
        assert_eq!(r.fidelity.snapshot_peak_reserved, 62 << 20);
        // The caching allocator holds the weights, the 4 MiB block and B at once, as the
        // recorded run did, and the 64 MiB request fails as it did.
        let caching = &r.rows[1].1;
        assert_eq!(caching.peak_allocated, 46 << 20, "{caching:?}");
        assert_eq!(caching.peak_reserved, 62 << 20, "{caching:?}");
        assert!(caching.oom.is_some());
    }
}

#[test]
fn pickles_python_writes_are_read() {
    // PyTorch dumps with Python's default protocol (4, or 5 from Python 3.14).
    let py = "import pickle,sys\nd={'segments':[],'device_traces':[[{'action':'segment_alloc','addr':1<<40,'size':2097152,'stream':0,'frames':[]},{'action':'alloc','addr':1<<40,'size':512,'stream':0,'frames':[{'filename':'train.py','line':7,'name':'forward'}]},{'action':'free_requested','addr':1<<40,'size':512,'stream':0},{'action':'free_completed','addr':1<<40,'size':512,'stream':0},{'action':'oom','size':1<<34,'stream':0,'device_free':123456789}]],'allocator_settings':{'max_split_size':(1<<64)-1,'expandable_segments':False}}\nfor p in (4,5):\n  open(sys.argv[1]+str(p),'wb').write(pickle.dumps(d,protocol=p))\n";
    let dir = scratch("python");
    let base = dir.join("snap.pickle");
    python(&["-c", py, base.to_str().unwrap()]);
    for p in [4, 5] {
        let path = PathBuf::from(format!("{}{p}", base.display()));
        let snap = snapshot::read(&path).unwrap();
        let h = &snap.devices[0];
        assert_eq!(snap.max_split, None, "SIZE_MAX means no max split");
        let oom = h.oom.as_ref().unwrap();
        assert_eq!(oom.requested, 1 << 34);
        assert_eq!(oom.capacity(), (2 << 20) + 123456789);
        match &h.trace.events[0] {
            headroom::alloc::trace::TraceEvent::Alloc { tag, .. } => {
                assert_eq!(tag, "train.py:7 forward")
            }
            other => panic!("{other:?}"),
        }
    }
}

#[test]
fn an_exported_training_step_round_trips_with_identical_peaks() {
    let dir = scratch("export");
    let path = dir.join("step.pickle");
    let id = "train/selective-flash-mb2/bf16/L2-h128-heads2-n64-b4";
    let (ok, out, err) = headroom(&["snapshot", id, "-o", path.to_str().unwrap()]);
    assert!(ok, "{err}");
    assert!(out.contains("one step of"), "{out}");
    let snap = snapshot::read(&path).unwrap();
    let (shape, policy) = headroom::model::parse_train_id(id).unwrap();
    let trace = headroom::techniques::alloc::training_trace(id, shape, policy, 1).unwrap();
    let capacity = trace.capacity.unwrap();
    let r = &replay_snapshot(&snap, Some(capacity)).unwrap()[0];
    for (spec, m) in &r.rows {
        let want = replay_simulated(&trace, *spec, capacity, None).unwrap();
        assert_eq!(m.peak_allocated, want.peak_allocated, "{spec}");
        assert_eq!(m.peak_reserved, want.peak_reserved, "{spec}");
        assert_eq!(m.peak_requested, trace.peak_live_bytes(), "{spec}");
    }
    assert_eq!(r.fidelity.matched_fraction(), 1.0);
    // The viewer sees headroom's categories where Python frames would be.
    let v =
        serde_pickle::value_from_slice(&std::fs::read(&path).unwrap(), Default::default()).unwrap();
    assert!(format!("{v:?}").contains("activations"));
}

fn one_line_error(args: &[&str], expect: &str) {
    let (ok, out, err) = headroom(args);
    assert!(!ok, "{args:?} succeeded: {out}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(err.contains(expect), "{args:?}: {err}");
    assert!(
        !err.contains("panicked") && !err.contains("RUST_BACKTRACE"),
        "{err}"
    );
}

#[test]
fn bad_snapshots_are_one_sentence_each() {
    let dir = scratch("bad");
    let write = |name: &str, bytes: &[u8]| -> String {
        let p = dir.join(name);
        std::fs::write(&p, bytes).unwrap();
        p.to_str().unwrap().to_string()
    };
    let text = write("notes.txt", b"this is not a pickle\n");
    one_line_error(&["replay", &text], "could not be read as a pickle");
    let list = write("list.pickle", &pickle(&Value::List(vec![Value::I64(1)])));
    one_line_error(&["replay", &list], "not of a memory snapshot");
    // A pickle of Python objects (here, an instance of a class) is no snapshot either.
    let object = write("object.pickle", b"\x80\x02c__main__\nModel\n)\x81.");
    one_line_error(&["replay", &object], "holds Python objects");
    let empty_file = write("empty.pickle", b"");
    one_line_error(&["replay", &empty_file], "the file is empty");
    // A trace list holding something other than entries.
    let mut odd = BTreeMap::new();
    odd.insert(
        HashableValue::String("device_traces".into()),
        Value::List(vec![Value::List(vec![Value::I64(3)])]),
    );
    let odd = write("odd.pickle", &pickle(&Value::Dict(odd)));
    one_line_error(&["replay", &odd], "where a trace entry");
    let good = record(&steady_trace(), AllocatorSpec::Pool, 8 << 30).unwrap();
    let bytes = pickle(&good);
    let cut = write("cut.pickle", &bytes[..bytes.len() / 2]);
    one_line_error(&["replay", &cut], "truncated");
    // Segments that are not what PyTorch writes.
    let with_segments = |segments: Value| {
        let Value::Dict(mut top) = good.clone() else {
            panic!()
        };
        top.insert(HashableValue::String("segments".into()), segments);
        pickle(&Value::Dict(top))
    };
    let text_segments = write(
        "text-segments.pickle",
        &with_segments(Value::String("x".into())),
    );
    one_line_error(&["replay", &text_segments], "'segments' is a string");
    let mut blockless = BTreeMap::new();
    blockless.insert(
        HashableValue::String("total_size".into()),
        Value::I64(1 << 21),
    );
    let blockless = write(
        "blockless.pickle",
        &with_segments(Value::List(vec![Value::Dict(blockless)])),
    );
    one_line_error(&["replay", &blockless], "no 'blocks' list");
    let mut empty = BTreeMap::new();
    empty.insert(
        HashableValue::String("segments".into()),
        Value::List(vec![]),
    );
    empty.insert(
        HashableValue::String("device_traces".into()),
        Value::List(vec![Value::List(vec![])]),
    );
    let none = write("none.pickle", &pickle(&Value::Dict(empty)));
    one_line_error(&["replay", &none], "_record_memory_history()");
    one_line_error(
        &[
            "replay",
            Path::new("/nonexistent/x.pickle").to_str().unwrap(),
        ],
        "could not read",
    );
    one_line_error(
        &["replay", &text, "--capacity", "lots"],
        "not a memory size",
    );
    one_line_error(
        &[
            "snapshot",
            "attention/flash/bf16/x",
            "-o",
            &dir.join("o").display().to_string(),
        ],
        "not a training case id",
    );
}

#[test]
fn the_fidelity_figure_drops_when_the_snapshot_disagrees_with_the_replay() {
    // The control: a snapshot of the caching allocator replays to 100% and 0.
    let trace = steady_trace();
    let capacity = trace.capacity.unwrap();
    let spec = AllocatorSpec::Caching(CachingOptions::default());
    let v = record(&trace, spec, capacity).unwrap();
    let f = |v: &Value| {
        let snap = parse(&pickle(v), "steady").unwrap();
        replay_snapshot(&snap, Some(capacity)).unwrap()[0]
            .fidelity
            .clone()
    };
    let control = f(&v);
    assert_eq!(
        (control.matched_fraction(), control.reserved_error),
        (1.0, 0.0)
    );
    // One segment_alloc twice as large as the allocator made it: that action no longer
    // matches, and the snapshot's reserved bytes are off from there on.
    let mut bad = v.clone();
    let Value::Dict(top) = &mut bad else { panic!() };
    let Some(Value::List(traces)) = top.get_mut(&HashableValue::String("device_traces".into()))
    else {
        panic!()
    };
    let Value::List(entries) = &mut traces[0] else {
        panic!()
    };
    let seg = entries
        .iter_mut()
        .find_map(|e| match e {
            Value::Dict(d)
                if d.get(&HashableValue::String("action".into()))
                    == Some(&Value::String("segment_alloc".into())) =>
            {
                Some(d)
            }
            _ => None,
        })
        .expect("a segment_alloc");
    let size = HashableValue::String("size".into());
    let Some(Value::I64(n)) = seg.get(&size).cloned() else {
        panic!()
    };
    seg.insert(size, Value::I64(2 * n));
    let off = f(&bad);
    assert!(off.matched_fraction() < 1.0, "{off:?}");
    assert_eq!(off.matched, control.matched - 1, "{off:?}");
    assert!(off.reserved_error > 0.0, "{off:?}");
}

/// The metrics with the host's allocation latencies (which differ from run to run) zeroed.
fn untimed(mut results: Vec<snapshot::ReplayResult>) -> Vec<snapshot::ReplayResult> {
    for r in &mut results {
        for (_, m) in &mut r.rows {
            m.alloc_latency_median_ns = 0.0;
            m.alloc_latency_p99_ns = 0.0;
        }
    }
    results
}

#[test]
fn streaming_replays_equal_whole_ones() {
    // The CLI replays as it reads; the whole snapshot in memory must give the same rows,
    // timelines, fidelity and recommendation, on every fixture kind.
    let mut cases: Vec<(String, Vec<u8>, Option<u64>)> = Vec::new();
    for (trace, spec) in [
        (
            steady_trace(),
            AllocatorSpec::Caching(CachingOptions::default()),
        ),
        (
            fragmenting_trace(),
            AllocatorSpec::Caching(CachingOptions::default()),
        ),
        (
            walkthrough_trace(),
            AllocatorSpec::Expandable(CachingOptions::default()),
        ),
    ] {
        let cap = trace.capacity.unwrap_or(FRAGMENTING_CAPACITY);
        let v = record(&trace, spec, cap).unwrap();
        cases.push((trace.name.clone(), pickle(&v), None));
        cases.push((format!("{} capped", trace.name), pickle(&v), Some(cap / 2)));
    }
    let dir = scratch("stream");
    let fake = dir.join("fake.pickle");
    fake_snapshot(&fake, &["--steps", "30", "--layers", "6", "--devices", "2"]);
    cases.push(("fake".into(), std::fs::read(&fake).unwrap(), None));
    for (name, bytes, cap) in &cases {
        let whole = untimed(replay_snapshot(&parse(bytes, name).unwrap(), *cap).unwrap());
        let streamed = untimed(snapshot::replay_bytes(bytes, name, *cap).unwrap());
        assert_eq!(whole, streamed, "{name}");
        assert!(
            !whole.is_empty() && whole.iter().all(|r| r.events > 0),
            "{name}"
        );
    }
    // The file route is the bytes route.
    let from_file = untimed(snapshot::replay_file(&fake, None, &mut |_, _| {}).unwrap());
    assert_eq!(
        from_file,
        untimed(
            snapshot::replay_bytes(
                &std::fs::read(&fake).unwrap(),
                &fake.display().to_string(),
                None
            )
            .unwrap()
        )
    );
    // Two devices, each with its weights half allocated before recording.
    assert_eq!(from_file.len(), 2);
    assert!(
        from_file.iter().all(|r| r.preexisting == 3),
        "{:?}",
        from_file[0].preexisting
    );
}

/// Runs python3 (which CI installs) with `args`; a test that needs it fails without it.
fn python(args: &[&str]) {
    let status = Command::new("python3").args(args).status();
    assert!(
        status.as_ref().is_ok_and(|s| s.success()),
        "python3 {args:?} failed: {status:?}"
    );
}

fn fake_snapshot(out: &Path, args: &[&str]) {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/fake-snapshot.py");
    let mut all = vec![script.to_str().unwrap(), out.to_str().unwrap()];
    all.extend_from_slice(args);
    python(&all);
}

#[test]
fn reading_holds_the_live_state_not_the_history() {
    // The same loop recorded for 8 times as many steps: the decoder's stack and memo must
    // not grow with it (Python's pickler appends in batches of 1000, and entries leave
    // the memo when handed on), and the replay sees every entry.
    let dir = scratch("bounded");
    let mut stats = Vec::new();
    for steps in [25u64, 200] {
        let path = dir.join(format!("fake{steps}.pickle"));
        fake_snapshot(&path, &["--steps", &steps.to_string(), "--layers", "12"]);
        let f = std::io::BufReader::new(std::fs::File::open(&path).unwrap());
        let mut n = 0u64;
        let (_, s) = pickle::decode(f, &mut |_, _| {
            n += 1;
            Ok(())
        })
        .unwrap();
        // Per step and layer: an activation's alloc and two frees, a temporary's three.
        let expected = steps * 12 * 6 + 6 + 2 * 12;
        assert_eq!((n, s.entries), (expected, expected));
        stats.push(s);
    }
    let (small, large) = (stats[0], stats[1]);
    assert!(large.bytes > 7 * small.bytes);
    assert_eq!(large.max_memo, small.max_memo, "{small:?} {large:?}");
    assert_eq!(large.memo_at_end, small.memo_at_end, "{small:?} {large:?}");
    // A batch of 1000 entries, each a dict of six items: the most the stack ever holds.
    assert!(large.max_stack <= 1000 + 12 + 8, "{large:?}");
}

/// The decoder's value as serde-pickle's (sets as lists, bytes and big integers as their
/// own markers, which the random values below do not hold).
fn as_value(o: &pickle::Obj) -> Value {
    use pickle::Obj;
    match o {
        Obj::None => Value::None,
        Obj::Bool(b) => Value::Bool(*b),
        Obj::Int(i) => Value::I64(*i),
        Obj::BigInt => Value::String("<bigint>".into()),
        Obj::Float(f) => Value::F64(*f),
        Obj::Str(s) => Value::String(s.to_string()),
        Obj::Bytes(n) => Value::String(format!("<{n} bytes>")),
        Obj::List(l) => Value::List(l.borrow().items.iter().map(as_value).collect()),
        Obj::Tuple(t) => Value::Tuple(t.iter().map(as_value).collect()),
        Obj::Dict(d) => Value::Dict(
            d.borrow()
                .items
                .iter()
                .map(|(k, v)| (as_value(k).into_hashable().unwrap(), as_value(v)))
                .collect(),
        ),
    }
}

fn random_value(rng: &mut headroom::rng::Rng, depth: usize) -> Value {
    let leaf = depth >= 4 || rng.below(3) == 0;
    match if leaf { rng.below(6) } else { 6 + rng.below(3) } {
        0 => Value::None,
        1 => Value::Bool(rng.below(2) == 1),
        2 => {
            // Every width: one byte, two, four, eight, and negative ones.
            let bits = [7u32, 15, 31, 40, 63][rng.below(5)];
            let v = (rng.next_u64() >> (64 - bits)) as i64;
            Value::I64(if rng.below(2) == 0 { v } else { -v - 1 })
        }
        3 => Value::F64(f64::from(rng.uniform()) * 1e6 - 5e5),
        4 => Value::String(
            [
                "",
                "alloc",
                "segment_map",
                "främe",
                "x".repeat(300).as_str(),
            ][rng.below(5)]
            .to_string(),
        ),
        5 => Value::Tuple(
            (0..rng.below(4))
                .map(|_| random_value(rng, depth + 1))
                .collect(),
        ),
        6 => Value::List(
            (0..rng.below(2500))
                .map(|_| random_value(rng, depth + 2))
                .collect(),
        ),
        _ => Value::Dict(
            (0..rng.below(1200))
                .map(|i| {
                    let k = if i % 2 == 0 {
                        HashableValue::String(format!("k{i}"))
                    } else {
                        HashableValue::I64(i as i64)
                    };
                    (k, random_value(rng, depth + 2))
                })
                .collect(),
        ),
    }
}

#[test]
fn the_reader_agrees_with_serde_pickle() {
    // Random values (lists and dicts past a batch of 1000, every integer width, strings
    // past 255 bytes) written by serde-pickle, read by both.
    let mut rng = headroom::rng::Rng::new(headroom::rng::Rng::fresh_seed());
    for _ in 0..40 {
        let v = random_value(&mut rng, 0);
        for options in [SerOptions::new(), SerOptions::new().proto_v2()] {
            let bytes = serde_pickle::value_to_vec(&v, options).unwrap();
            let (o, _) = pickle::decode(&bytes[..], &mut |_, _| Ok(())).unwrap();
            assert_eq!(as_value(&o), v);
        }
    }
    // What Python itself writes, in every protocol: memo references, sets, tuples of
    // every length, bytes, floats, non-ASCII text, large and negative integers.
    // (Before protocol 4, Python writes sets, and before 3 bytes, as calls to builtins.)
    let py = "import pickle,sys\nshared=[1,2]\nd={'a':[shared,shared,(),(1,),(1,2),(1,2,3),(1,2,3,4)],'b':{'x':1.5,'y':-2**40,'z':2**63-1,'w':-2**63},'c':['främe','back\\\\slash\\nline','\\u20ac'],'e':[None,True,False],'f':list(range(2500)),'g':{i:str(i) for i in range(1100)}}\nfor p in range(6):\n  if p>=4: d.update({'h':{3},'i':frozenset([4]),'j':b'xyz'})\n  open(sys.argv[1]+str(p),'wb').write(pickle.dumps(d,protocol=p))\n";
    let dir = scratch("protocols");
    let base = dir.join("v.pickle");
    python(&["-c", py, base.to_str().unwrap()]);
    for p in 0..6 {
        let bytes = std::fs::read(format!("{}{p}", base.display())).unwrap();
        let (o, _) = pickle::decode(&bytes[..], &mut |_, _| Ok(()))
            .unwrap_or_else(|e| panic!("protocol {p}: {e:?}"));
        let mut theirs = serde_pickle::value_from_slice(&bytes, Default::default()).unwrap();
        let mut ours = as_value(&o);
        // Sets, frozensets and bytes: serde-pickle's own types against the decoder's.
        for v in [&mut theirs, &mut ours] {
            let Value::Dict(d) = v else { panic!() };
            for k in ["h", "i", "j"] {
                d.remove(&HashableValue::String(k.into()));
            }
        }
        assert_eq!(ours, theirs, "protocol {p}");
        let Value::Dict(d) = as_value(&o) else {
            panic!()
        };
        if p >= 4 {
            assert_eq!(
                d.get(&HashableValue::String("j".into())),
                Some(&Value::String("<3 bytes>".into())),
                "protocol {p}"
            );
        }
        assert_eq!(
            d.get(&HashableValue::String("c".into())),
            Some(&Value::List(vec![
                Value::String("främe".into()),
                Value::String("back\\slash\nline".into()),
                Value::String("€".into())
            ])),
            "protocol {p}"
        );
    }
}
