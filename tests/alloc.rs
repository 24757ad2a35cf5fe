//! The allocator shootout on the simulated address space: PyTorch's caching rules (rounding,
//! pools, best fit, splitting, merging, max split size, free-and-retry), expandable segments
//! growing and shrinking, the fragmenting trace, parsing, and traces.

use std::sync::Arc;

use headroom::alloc::trace::{
    fragmenting_trace, replay, replay_simulated, steady_trace, FRAGMENTING_CAPACITY,
};
use headroom::alloc::{
    round_size, segment_size, Allocator, AllocatorSpec, SimulatedSpace, Trace, TraceEvent,
    TraceRecorder,
};
use headroom::backend::cpu::CpuBackend;
use headroom::backend::Backend;
use headroom::error::Error;
use headroom::harness::{Session, Settings};
use headroom::memory::MemoryTracker;
use headroom::report::Status;
use headroom::techniques::{alloc as alloc_cases, Profile};

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;

fn build(spec: &str, capacity: u64) -> Box<dyn Allocator> {
    AllocatorSpec::parse(spec)
        .unwrap()
        .build(Box::new(SimulatedSpace::new(capacity)))
}

fn calls(a: &dyn Allocator) -> u64 {
    a.stats().driver_calls.total()
}

#[test]
fn sizes_round_like_pytorch() {
    assert_eq!(round_size(0), 512);
    assert_eq!(round_size(1), 512);
    assert_eq!(round_size(512), 512);
    assert_eq!(round_size(513), 1024);
    assert_eq!(segment_size(round_size(1000)), 2 * MIB);
    assert_eq!(segment_size(MIB), 2 * MIB);
    assert_eq!(segment_size(MIB + 512), 20 * MIB);
    assert_eq!(segment_size(10 * MIB - 512), 20 * MIB);
    assert_eq!(segment_size(10 * MIB), 10 * MIB);
    assert_eq!(segment_size(11 * MIB + 1), 12 * MIB);
}

#[test]
fn caching_splits_and_packs() {
    let mut a = build("caching", 1 << 30);
    // Small requests share one 2 MiB segment, 512-byte aligned.
    let s1 = a.allocate(1000, 0).unwrap();
    let s2 = a.allocate(1000, 0).unwrap();
    assert_eq!(s2.addr, s1.addr + 1024);
    assert_eq!(s1.size, 1024);
    // A mid-size request gets a 20 MiB segment, split; the next one takes the remainder.
    let m1 = a.allocate(3 * MIB, 0).unwrap();
    let m2 = a.allocate(3 * MIB, 0).unwrap();
    assert_eq!(m2.addr, m1.addr + 3 * MIB);
    assert_eq!(m1.size, 3 * MIB);
    let s = a.stats();
    assert_eq!(s.reserved, 22 * MIB);
    assert_eq!(s.allocated, 2000 + 6 * MIB);
    assert_eq!(calls(a.as_ref()), 2, "one small and one large segment");
    // A large-pool remainder of 1 MiB or less is not worth a block: the whole block goes.
    let mut b = build("caching", 1 << 30);
    let x = b.allocate(19 * MIB + 512 * KIB, 0).unwrap();
    assert_eq!(x.size, 20 * MIB);
    assert_eq!(x.requested, 19 * MIB + 512 * KIB);
    assert!(a.check().is_ok() && b.check().is_ok());
}

#[test]
fn caching_picks_the_best_fit_and_merges_on_free() {
    let mut a = build("caching", 1 << 30);
    let x = a.allocate(6 * MIB, 0).unwrap();
    let sep = a.allocate(2 * MIB, 0).unwrap();
    let y = a.allocate(4 * MIB, 0).unwrap();
    let sep2 = a.allocate(8 * MIB, 0).unwrap();
    a.free(x).unwrap();
    a.free(y).unwrap();
    // Free blocks of 6 and 4 MiB: a 3.5 MiB request takes the 4 MiB one.
    let z = a.allocate(3 * MIB + 512 * KIB, 0).unwrap();
    assert_eq!(z.addr, y.addr);
    a.free(z).unwrap();
    a.free(sep).unwrap();
    a.free(sep2).unwrap();
    // Everything merged back into one free block, the whole segment: empty_cache returns it.
    assert!(a.check().is_ok());
    assert_eq!(a.stats().reserved, 20 * MIB);
    a.empty_cache().unwrap();
    assert_eq!(a.stats().reserved, 0);
    assert_eq!(a.space().used(), 0);
    // Another stream never reuses this stream's blocks.
    let p = a.allocate(3 * MIB, 0).unwrap();
    a.free(p).unwrap();
    let q = a.allocate(3 * MIB, 1).unwrap();
    assert_ne!(q.addr, p.addr);
    assert_eq!(a.stats().reserved, 40 * MIB);
}

#[test]
fn max_split_size_keeps_oversize_blocks_whole() {
    // Without a max split size a cached 100 MiB block serves a 30 MiB request, split.
    let mut a = build("caching", 1 << 30);
    let big = a.allocate(100 * MIB, 0).unwrap();
    a.free(big).unwrap();
    let small = a.allocate(30 * MIB, 0).unwrap();
    assert_eq!(small.addr, big.addr);
    assert_eq!(small.size, 30 * MIB);
    assert_eq!(calls(a.as_ref()), 1);

    let mut m = build("caching:max_split=64MiB", 1 << 30);
    let big = m.allocate(100 * MIB, 0).unwrap();
    m.free(big).unwrap();
    // Below the max split size: the oversize block is not taken; a new segment is.
    let small = m.allocate(30 * MIB, 0).unwrap();
    assert_ne!(small.addr, big.addr);
    assert_eq!(calls(m.as_ref()), 2);
    m.free(small).unwrap();
    // At or above it: taken whole (never split) when less than 20 MiB too large...
    let near = m.allocate(90 * MIB, 0).unwrap();
    assert_eq!((near.addr, near.size), (big.addr, 100 * MIB));
    m.free(near).unwrap();
    // ...and not when 20 MiB or more too large.
    let far = m.allocate(70 * MIB, 0).unwrap();
    assert_ne!(far.addr, big.addr);
    assert_eq!(far.size, 70 * MIB);
    assert!(m.check().is_ok());
}

#[test]
fn caching_frees_its_cache_and_retries_before_failing() {
    let mut a = build("caching", 100 * MIB);
    let x = a.allocate(60 * MIB, 0).unwrap();
    a.free(x).unwrap();
    assert_eq!(a.stats().reserved, 60 * MIB);
    // 70 MiB does not fit the cached 60 MiB block nor beside it: the cache goes, then it fits.
    let y = a.allocate(70 * MIB, 0).unwrap();
    let s = a.stats();
    assert_eq!((s.reserved, s.retries, s.ooms), (70 * MIB, 1, 0));
    // With live memory in the way, it fails with PyTorch's kind of message.
    let e = a.allocate(40 * MIB, 0).unwrap_err();
    let Error::OutOfMemory(oom) = &e else {
        panic!("{e}")
    };
    assert_eq!(oom.requested, 40 * MIB);
    assert_eq!(oom.allocated, 70 * MIB);
    assert!(e.to_string().contains("tried to allocate 40.00 MiB"), "{e}");
    assert!(
        e.to_string()
            .contains("did not fit after freeing the cache"),
        "{e}"
    );
    a.free(y).unwrap();

    // With a max split size, cached oversize blocks are released first (largest first until
    // enough is freed), without the free-everything retry.
    let mut m = build("caching:max_split=32MiB", 100 * MIB);
    let x = m.allocate(40 * MIB, 0).unwrap();
    let y = m.allocate(40 * MIB, 0).unwrap();
    m.free(x).unwrap();
    m.free(y).unwrap();
    m.allocate(50 * MIB, 0).unwrap();
    assert_eq!(m.stats().retries, 0);
    assert_eq!(m.stats().reserved, 50 * MIB);
}

#[test]
fn expandable_grows_at_the_end_and_shrinks_its_free_tail() {
    let mut a = build("expandable", 64 * MIB);
    let x = a.allocate(3 * MIB, 0).unwrap();
    assert_eq!(a.stats().reserved, 4 * MIB, "two 2 MiB pages");
    // The next request starts where the last ended; the free 1 MiB tail is extended by 4 MiB.
    let y = a.allocate(5 * MIB, 0).unwrap();
    assert_eq!(y.addr, x.addr + 3 * MIB);
    assert_eq!(a.stats().reserved, 8 * MIB);
    a.free(y).unwrap();
    a.empty_cache().unwrap();
    assert_eq!(
        a.stats().reserved,
        4 * MIB,
        "pages past the live block unmapped"
    );
    a.free(x).unwrap();
    // Freed memory tiles the next, larger request: only the difference is mapped.
    let z = a.allocate(6 * MIB, 0).unwrap();
    assert_eq!(z.addr, x.addr);
    assert_eq!(a.stats().reserved, 6 * MIB);
    a.free(z).unwrap();
    assert!(a.check().is_ok());
    a.empty_cache().unwrap();
    assert_eq!(a.stats().reserved, 0);
    assert_eq!(a.space().used(), 0);
    // Beyond the device: out of memory, nothing left half-mapped.
    let e = a.allocate(65 * MIB, 0).unwrap_err();
    assert!(matches!(e, Error::OutOfMemory(_)), "{e}");
    assert_eq!(a.space().used(), 0);
}

#[test]
fn direct_and_pool_hold_what_is_asked() {
    let mut d = build("direct", 1 << 30);
    let x = d.allocate(3 * MIB + 7, 0).unwrap();
    let s = d.stats();
    assert_eq!((s.allocated, s.reserved), (3 * MIB + 7, 3 * MIB + 7));
    d.free(x).unwrap();
    assert_eq!(calls(d.as_ref()), 2);

    let mut p = build("pool", 1 << 30);
    let x = p.allocate(3 * MIB, 0).unwrap();
    let y = p.allocate(1000, 0).unwrap();
    assert_eq!(
        p.stats().reserved,
        6 * MIB,
        "two pages for the large block, one small page"
    );
    p.free(x).unwrap();
    p.free(y).unwrap();
    assert_eq!(p.stats().reserved, 6 * MIB, "the pool keeps what it held");
    p.empty_cache().unwrap();
    assert_eq!(p.stats().reserved, 0);
    assert_eq!(p.space().used(), 0);
}

#[test]
fn the_fragmenting_trace_runs_caching_out_of_memory_but_not_its_fixes() {
    let t = fragmenting_trace();
    assert_eq!(t.capacity, Some(FRAGMENTING_CAPACITY));
    let peak = t.peak_live_bytes();
    assert!(peak < FRAGMENTING_CAPACITY);
    let run = |spec: &str| {
        let m = replay_simulated(
            &t,
            AllocatorSpec::parse(spec).unwrap(),
            FRAGMENTING_CAPACITY,
            Some(16),
        )
        .unwrap();
        assert_eq!(m.invariant_violation, None, "{spec}");
        m
    };
    let caching = run("caching");
    let oom = caching
        .oom
        .as_ref()
        .expect("caching must run out of memory");
    assert!(oom.despite_free_memory(), "{oom:?}");
    assert!(caching.oom_despite_free_memory);
    assert!(oom.message.contains(&oom.tag), "{}", oom.message);
    assert!(caching.events_replayed < t.events.len());
    for spec in ["caching:max_split=128MiB", "expandable", "direct", "pool"] {
        let m = run(spec);
        assert_eq!(m.oom, None, "{spec}");
        assert_eq!(m.events_replayed, t.events.len());
        assert_eq!(m.peak_allocated, peak, "{spec}");
        assert!(m.peak_reserved >= m.peak_allocated);
        assert!(m.peak_reserved <= FRAGMENTING_CAPACITY);
    }
    // What each costs: caching makes far fewer driver calls than one per allocation.
    let allocs = t
        .events
        .iter()
        .filter(|e| matches!(e, TraceEvent::Alloc { .. }))
        .count() as u64;
    assert_eq!(run("direct").driver_calls, 2 * allocs);
    assert!(run("caching:max_split=128MiB").driver_calls < allocs / 2);
}

#[test]
fn every_allocator_keeps_its_invariants_on_the_steady_trace() {
    let t = steady_trace();
    for spec in AllocatorSpec::all() {
        let m = replay_simulated(&t, spec, 64 << 30, Some(8)).unwrap();
        assert_eq!(m.invariant_violation, None, "{spec}");
        assert_eq!(m.oom, None, "{spec}");
        assert!(m.alloc_latency_p99_ns >= m.alloc_latency_median_ns);
    }
    // A steady loop: after the first step the caching allocator serves everything from its
    // cache, so it makes fewer driver calls than one step has allocations.
    let m = replay_simulated(
        &t,
        AllocatorSpec::Caching { max_split: None },
        64 << 30,
        None,
    )
    .unwrap();
    let allocs = t
        .events
        .iter()
        .filter(|e| matches!(e, TraceEvent::Alloc { .. }))
        .count() as u64;
    assert!(m.driver_calls < allocs / 6, "{} calls", m.driver_calls);
}

#[test]
fn allocator_names_parse_or_say_why_not() {
    for (text, want) in [
        ("direct", AllocatorSpec::Direct),
        ("caching", AllocatorSpec::Caching { max_split: None }),
        (
            " caching:max_split=128MiB ",
            AllocatorSpec::Caching {
                max_split: Some(128 * MIB),
            },
        ),
        ("pool", AllocatorSpec::Pool),
        ("expandable", AllocatorSpec::Expandable),
    ] {
        let spec = AllocatorSpec::parse(text).unwrap();
        assert_eq!(spec, want);
        assert_eq!(AllocatorSpec::parse(&spec.to_string()).unwrap(), spec);
        let id = spec.id();
        assert!(
            id.chars().all(|c| c.is_ascii_alphanumeric() || c == '-'),
            "{id}"
        );
    }
    assert_eq!(
        AllocatorSpec::parse("caching:max_split=128MiB")
            .unwrap()
            .id(),
        "caching-max-split-128MiB"
    );
    for bad in [
        "",
        "cuda",
        "direct:max_split=1GiB",
        "caching:",
        "caching:max_split",
        "caching:split=128MiB",
        "caching:max_split=lots",
        "caching:max_split=16MiB",
    ] {
        let e = AllocatorSpec::parse(bad).unwrap_err().to_string();
        assert!(e.contains("is not an allocator"), "{bad}: {e}");
        assert!(e.contains("use direct, caching"), "{bad}: {e}");
        assert_eq!(e.lines().count(), 1, "{bad}: {e}");
    }
    assert!(AllocatorSpec::parse("caching:max_split=16MiB")
        .unwrap_err()
        .to_string()
        .contains("more than 20.00 MiB"));
}

#[test]
fn traces_round_trip_and_record() {
    let t = Trace::from_events(
        "tiny",
        [
            (1, 100, "a", true),
            (2, 3 * MIB, "b", true),
            (1, 0, "", false),
            (2, 0, "", false),
        ],
    )
    .unwrap();
    assert_eq!(t.peak_live_bytes(), 100 + 3 * MIB);
    let back = Trace::from_json(&t.to_json()).unwrap();
    assert_eq!(back, t);
    let big = fragmenting_trace();
    assert_eq!(Trace::from_json(&big.to_json()).unwrap(), big);
    // A free of a buffer that is not live is refused with a sentence.
    let e = Trace::from_events("bad", [(7, 0, "", false)]).unwrap_err();
    assert!(
        e.to_string().contains("frees buffer 7, which is not live"),
        "{e}"
    );

    // The recorder, and a trace from the tracked allocator's timeline.
    let mut r = TraceRecorder::new();
    let a = r.alloc(10, "x", 0);
    let b = r.alloc(20, "y", 0);
    r.free(a);
    r.free(b);
    let rec = r.finish("rec", Some(1 << 20));
    assert_eq!(rec.events.len(), 4);
    rec.validate().unwrap();

    let tracker = MemoryTracker::new(None);
    tracker.start_timeline();
    let w1 = tracker.admit(64, "w").unwrap();
    let w2 = tracker.admit(64, "w").unwrap();
    let g = tracker.admit(32, "g").unwrap();
    tracker.release(w1, 64, "w");
    tracker.release(g, 32, "g");
    tracker.release(w2, 64, "w");
    let tl = Trace::from_timeline("timeline", &tracker.take_timeline()).unwrap();
    assert_eq!(tl.peak_live_bytes(), 160);
    // Releases name their allocation: the first "w" freed is the first allocated.
    use headroom::alloc::TraceEvent;
    let first_free = tl.events.iter().find_map(|e| match e {
        TraceEvent::Free { id } => Some(*id),
        _ => None,
    });
    assert_eq!(first_free, Some(0));
    let mut alloc = build("caching", 1 << 30);
    let m = replay(&tl, alloc.as_mut(), Some(1)).unwrap();
    assert_eq!(m.peak_allocated, 160);
    assert_eq!(m.invariant_violation, None);
}

#[test]
fn allocator_cases_validate_on_the_cpu_and_report_metrics() {
    let be: Arc<dyn Backend> = Arc::new(CpuBackend::new(None, None));
    let settings = Settings {
        profile: Profile::Quick,
        budget: None,
        seed: 1,
    };
    let mut s = Session::new(be, &settings, "test");
    let cases = alloc_cases::check_cases();
    assert_eq!(
        cases.len(),
        20,
        "5 allocators x (2 synthetic + 2 training traces)"
    );
    for case in &cases {
        let id = case.info().id.clone();
        assert!(id.starts_with("alloc/") && id.contains("/sim/"), "{id}");
        let p = s.prepare(case.as_ref());
        assert_eq!(p.record.status, Status::Ok, "{id}");
        let mem = p.record.memory.as_ref().unwrap();
        assert_eq!((mem.peak_allocated, mem.predicted), (0, 0), "{id}");
        let m = alloc_cases::metrics(&id).expect("validated cases have metrics");
        assert_eq!(
            m.allocator,
            AllocatorSpec::all()
                .iter()
                .find(|a| id.contains(&format!("/{}/", a.id())))
                .unwrap()
                .to_string()
        );
    }
    let m = alloc_cases::metrics("alloc/caching/sim/varying-shapes").unwrap();
    assert!(m.oom_despite_free_memory);
    assert!(alloc_cases::metrics("alloc/expandable/sim/varying-shapes")
        .unwrap()
        .oom
        .is_none());
    assert!(alloc_cases::metrics("copy/vec16/f32/n1").is_none());
}
