//! The allocator shootout on the simulated address space: PyTorch's caching rules (rounding,
//! pools, best fit, splitting, merging, max split size, garbage collection, free-and-retry),
//! expandable segments as PyTorch maps and unmaps them, PyTorch's walk-through and the
//! fragmenting trace, the four figures of `memory_stats`, parsing, and traces.

use std::sync::Arc;

use headroom::alloc::trace::{
    fragmenting_trace, replay, replay_simulated, steady_trace, FRAGMENTING_CAPACITY,
};
use headroom::alloc::{
    round_size, segment_size, Allocator, AllocatorSpec, CachingOptions, SimulatedSpace, Trace,
    TraceEvent, TraceRecorder,
};
use headroom::backend::cpu::CpuBackend;
use headroom::backend::{Backend, BackendKind};
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
    assert_eq!(s.requested, 2000 + 6 * MIB);
    assert_eq!(
        s.allocated,
        2048 + 6 * MIB,
        "allocated counts the rounded blocks"
    );
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
fn map_block_and_unmap_block_use_pytorchs_pages_and_only_whole_free_ones() {
    // map_block: the large pool maps 20 MiB pages, the small pool 2 MiB pages.
    let mut a = build("expandable", 1 << 30);
    let x = a.allocate(3 * MIB, 0).unwrap();
    assert_eq!(a.stats().reserved, 20 * MIB, "one 20 MiB page");
    let s = a.allocate(1000, 0).unwrap();
    assert_eq!(a.stats().reserved, 22 * MIB, "plus one 2 MiB small page");
    // should_split: the rest of the page stays a free block; the next request takes it.
    let y = a.allocate(5 * MIB, 0).unwrap();
    assert_eq!(y.addr, x.addr + 3 * MIB);
    assert_eq!(a.stats().reserved, 22 * MIB);
    // A request past the mapped end extends the free tail with new pages.
    let z = a.allocate(30 * MIB, 0).unwrap();
    assert_eq!(z.addr, y.addr + 5 * MIB);
    assert_eq!(
        a.stats().reserved,
        42 * MIB,
        "38 MiB needed: two more pages"
    );
    assert!(a.check().is_ok());
    // unmap_block: only whole free pages go. With x and y free, [0, 8 MiB) holds no whole
    // page; freeing z too makes [0, 40 MiB) free: both pages of the large pool go.
    a.free(x).unwrap();
    a.free(y).unwrap();
    a.empty_cache().unwrap();
    assert_eq!(a.stats().reserved, 42 * MIB, "no whole page is free");
    a.free(z).unwrap();
    a.empty_cache().unwrap();
    assert_eq!(a.stats().reserved, 2 * MIB, "the large segment is gone");
    a.free(s).unwrap();
    a.empty_cache().unwrap();
    assert_eq!(a.stats().reserved, 0);
    assert_eq!(a.space().used(), 0);
    // Beyond the device: out of memory, nothing left mapped.
    let e = a.allocate(1025 * MIB, 0).unwrap_err();
    assert!(matches!(e, Error::OutOfMemory(_)), "{e}");
    assert_eq!(a.space().used(), 0);
    assert!(a.check().is_ok());
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
        assert_eq!(m.peak_requested, peak, "{spec}");
        assert!(m.peak_allocated >= m.peak_requested, "{spec}");
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
        AllocatorSpec::Caching(CachingOptions::default()),
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
        ("caching", AllocatorSpec::Caching(CachingOptions::default())),
        (
            " caching:max_split=128MiB ",
            AllocatorSpec::Caching(CachingOptions::max_split(128 * MIB)),
        ),
        ("pool", AllocatorSpec::Pool),
        (
            "expandable",
            AllocatorSpec::Expandable(CachingOptions::default()),
        ),
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
    assert_eq!(m.peak_requested, 160);
    assert_eq!(m.peak_allocated, 3 * 512, "three blocks of 512 bytes");
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
    let cases = alloc_cases::check_cases(BackendKind::Cpu);
    assert_eq!(
        cases.len(),
        25,
        "5 allocators x (3 synthetic + 2 training traces)"
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
    let w = alloc_cases::metrics("alloc/caching/sim/expandable-walkthrough").unwrap();
    assert!(w.oom_despite_free_memory);
    let e = alloc_cases::metrics("alloc/expandable/sim/expandable-walkthrough").unwrap();
    assert_eq!((e.oom.is_none(), e.peak_reserved), (true, 6160 << 20));
    assert!(alloc_cases::metrics("alloc/expandable/sim/varying-shapes")
        .unwrap()
        .oom
        .is_none());
    assert!(alloc_cases::metrics("copy/vec16/f32/n1").is_none());
}

// issue 17: the allocators give PyTorch's answer.

const GIB: u64 = 1 << 30;

#[test]
fn the_walkthrough_gives_pytorchs_answer_for_every_allocator() {
    let t = headroom::alloc::trace::walkthrough_trace();
    assert_eq!(t.capacity, Some(7 * GIB));
    let run = |spec: &str| {
        let m =
            replay_simulated(&t, AllocatorSpec::parse(spec).unwrap(), 7 * GIB, Some(1)).unwrap();
        assert_eq!(m.invariant_violation, None, "{spec}");
        m
    };
    // caching: the 60 MiB tensors split the cached 1 GiB segments, so every segment keeps a
    // live tensor and none can be returned: out of memory with 4 GiB free.
    let c = run("caching");
    let oom = c.oom.as_ref().expect("caching runs out of memory");
    assert_eq!(oom.tag, "two-gib");
    assert!(
        oom.despite_free_memory() && oom.free_bytes > 4 * GIB,
        "{oom:?}"
    );
    assert_eq!(c.peak_reserved, 6144 * MIB);
    // The message gives PyTorch's sizes: the allocation size, allocated and reserved bytes.
    assert!(
        oom.message.contains("tried to allocate 2.00 GiB"),
        "{}",
        oom.message
    );
    assert!(
        oom.message.contains("2.99 GiB allocated"),
        "{}",
        oom.message
    );
    assert!(oom.message.contains("6.00 GiB reserved"), "{}", oom.message);
    // max_split: the 1 GiB segments are never split; they are released when the 60 MiB
    // segments need room, and at the 2 GiB request the free 60 MiB segments go.
    let m = run("caching:max_split=128MiB");
    assert_eq!(m.oom, None);
    assert_eq!(m.peak_reserved, 7164 * MIB);
    // expandable: 1 GiB tensors map 20 MiB pages (6144 MiB -> 308 pages); at the 2 GiB request
    // the 51 free 60 MiB holes are unmapped and their pages mapped again for it.
    let e = run("expandable");
    assert_eq!(e.oom, None);
    assert_eq!(e.peak_reserved, 6160 * MIB);
    assert_eq!(e.retries, 1, "one release-and-retry");
    // direct and pool hold what is live (whole 2 MiB pages for the pool).
    for spec in ["direct", "pool"] {
        let d = run(spec);
        assert_eq!(d.oom, None, "{spec}");
        assert_eq!(d.peak_reserved, 6144 * MIB, "{spec}");
    }
    // The four figures of memory_stats: requested <= allocated = active <= reserved.
    for m in [&c, &m, &e] {
        assert_eq!(m.peak_requested, 6144 * MIB);
        assert_eq!(m.peak_allocated, 6144 * MIB);
        assert_eq!(m.peak_active, m.peak_allocated);
    }
}

#[test]
fn round_size_follows_roundup_power2_divisions() {
    use headroom::alloc::round_size_with;
    // Without divisions: multiples of 512 bytes.
    assert_eq!(round_size_with(1200 * MIB + 1, None), 1200 * MIB + 512);
    // With 4 divisions, 1200 MiB lies between 1024 and 2048: steps of 256 MiB -> 1280 MiB.
    assert_eq!(round_size_with(1200 * MIB, Some(4)), 1280 * MIB);
    assert_eq!(round_size_with(1280 * MIB, Some(4)), 1280 * MIB);
    assert_eq!(
        round_size_with(1024 * MIB, Some(4)),
        1024 * MIB,
        "a power of two stays"
    );
    // Sizes at or below 512 x divisions round to 512 bytes as without.
    assert_eq!(round_size_with(1500, Some(4)), 1536);
    assert_eq!(round_size_with(100, Some(4)), 512);
    // Through the allocator: a 1200 MiB request holds a 1280 MiB block.
    let mut a = build("caching:roundup_power2=4", 4 * GIB);
    let b = a.allocate(1200 * MIB, 0).unwrap();
    assert_eq!(b.size, 1280 * MIB);
    assert_eq!(a.stats().requested, 1200 * MIB);
    assert_eq!(a.stats().allocated, 1280 * MIB);
}

#[test]
fn zero_byte_requests_allocate_nothing() {
    for spec in ["direct", "caching", "pool", "expandable"] {
        let mut a = build(spec, GIB);
        let b = a.allocate(0, 0).unwrap();
        assert!(b.is_empty(), "{spec}");
        let s = a.stats();
        assert_eq!(
            (s.reserved, s.allocated, s.live, calls(a.as_ref())),
            (0, 0, 0, 0),
            "{spec}"
        );
        a.free(b).unwrap();
        assert_eq!(a.space().used(), 0, "{spec}");
    }
}

#[test]
fn out_of_memory_reports_get_allocation_size_as_pytorch_does() {
    // get_allocation_size: a 1.5 MiB request that finds no room asks for a 20 MiB segment,
    // and PyTorch's message says "Tried to allocate 20.00 MiB".
    let mut a = build("caching", 10 * MIB);
    let e = a.allocate(3 * MIB / 2, 0).unwrap_err();
    let Error::OutOfMemory(o) = &e else {
        panic!("{e}")
    };
    assert_eq!(o.requested, 20 * MIB);
}

#[test]
fn get_free_block_prefers_the_block_that_grows_least_in_an_expandable_segment() {
    // A free 7 MiB block inside the mapped pages, and a free 5 MiB tail at the mapped end that
    // could grow into the unmapped range after it. A 5 MiB request fits the tail exactly, but
    // PyTorch counts the tail as the size it can expand to and takes the 7 MiB block.
    let mut a = build("expandable", GIB);
    let x = a.allocate(7 * MIB, 0).unwrap();
    let keep = a.allocate(8 * MIB, 0).unwrap();
    a.free(x).unwrap();
    let y = a.allocate(5 * MIB, 0).unwrap();
    assert_eq!(y.addr, x.addr, "not the tail at {:#x}", keep.addr + 8 * MIB);
    // Plain caching takes the exact fit.
    let mut c = build("caching", GIB);
    let x = c.allocate(7 * MIB, 0).unwrap();
    let keep = c.allocate(8 * MIB, 0).unwrap();
    c.free(x).unwrap();
    let y = c.allocate(5 * MIB, 0).unwrap();
    assert_eq!(y.addr, keep.addr + 8 * MIB);
    assert!(a.check().is_ok() && c.check().is_ok());
}

#[test]
fn should_split_follows_the_pool_and_the_max_split_size() {
    // Small pool: any remainder of 512 bytes or more is split off.
    let mut a = build("caching", GIB);
    let s = a.allocate(MIB, 0).unwrap();
    assert_eq!(s.size, MIB);
    // Large pool: a remainder of 1 MiB or less is not.
    let l = a.allocate(19 * MIB, 0).unwrap();
    assert_eq!(l.size, 20 * MIB);
    // At or above the max split size, never split.
    let mut m = build("caching:max_split=64MiB", GIB);
    let big = m.allocate(100 * MIB, 0).unwrap();
    m.free(big).unwrap();
    let near = m.allocate(90 * MIB, 0).unwrap();
    assert_eq!(near.size, 100 * MIB);
    assert_eq!(m.stats().allocated, 100 * MIB);
    assert_eq!(m.stats().requested, 90 * MIB);
    // Expandable segments split whenever 512 bytes or more remain, in both pools.
    let mut e = build("expandable", GIB);
    let l = e.allocate(19 * MIB, 0).unwrap();
    assert_eq!(l.size, 19 * MIB);
}

#[test]
fn release_available_cached_blocks_frees_oversize_blocks_of_the_stream_only() {
    let mut m = build("caching:max_split=32MiB", 100 * MIB);
    let x = m.allocate(40 * MIB, 1).unwrap();
    m.free(x).unwrap();
    // Another stream's request: release_available_cached_blocks looks at stream 0 only, so
    // it is release_cached_blocks (a retry) that frees stream 1's segment.
    m.allocate(70 * MIB, 0).unwrap();
    assert_eq!(m.stats().retries, 1);
    assert_eq!(m.stats().reserved, 70 * MIB);
}

#[test]
fn garbage_collect_cached_blocks_returns_old_segments_above_the_threshold() {
    // Fraction 0.5 of 1 GiB: at most 512 MiB; threshold 0.5 of that: 256 MiB.
    let spec = "caching:gc_threshold=0.5,fraction=0.5";
    let mut a = build(spec, GIB);
    let x = a.allocate(200 * MIB, 0).unwrap();
    a.free(x).unwrap();
    // 200 MiB cached, under the threshold: nothing collected before the next segment.
    let y = a.allocate(300 * MIB, 0).unwrap();
    assert_eq!(a.stats().reserved, 500 * MIB);
    a.free(y).unwrap();
    // 500 MiB reserved, 244 MiB over the threshold: before asking for a new segment, the
    // cached segments at or above the average age (searches since they were freed: 2 and 1)
    // go, the older first (200 MiB, not enough), then the other.
    let z = a.allocate(400 * MIB, 0).unwrap();
    assert_eq!(
        a.stats().reserved,
        400 * MIB,
        "both cached segments collected"
    );
    assert_eq!(
        a.stats().retries,
        0,
        "collected before the driver was asked"
    );
    a.free(z).unwrap();
    // The fraction caps what may be reserved: 600 MiB is refused though the device has 1 GiB.
    let e = a.allocate(600 * MIB, 0).unwrap_err();
    assert!(matches!(e, Error::OutOfMemory(_)), "{e}");
    // Without a fraction, gc_threshold does nothing in PyTorch: the spec says so.
    let bad = AllocatorSpec::parse("caching:gc_threshold=0.5")
        .unwrap_err()
        .to_string();
    assert!(bad.contains("acts only with a memory fraction"), "{bad}");
}

#[test]
fn release_cached_blocks_unmaps_interior_holes_of_expandable_segments() {
    // Three 20 MiB tensors; free the middle one: one whole page inside the segment.
    let mut a = build("expandable", GIB);
    let x = a.allocate(20 * MIB, 0).unwrap();
    let y = a.allocate(20 * MIB, 0).unwrap();
    let z = a.allocate(20 * MIB, 0).unwrap();
    assert_eq!(a.stats().reserved, 60 * MIB);
    a.free(y).unwrap();
    a.empty_cache().unwrap();
    assert_eq!(a.stats().reserved, 40 * MIB, "the hole is unmapped");
    assert!(a.check().is_ok());
    // find_expandable_block reuses the hole before mapping at the end.
    let w = a.allocate(20 * MIB, 0).unwrap();
    assert_eq!(w.addr, y.addr);
    assert_eq!(a.stats().reserved, 60 * MIB);
    for b in [x, z, w] {
        a.free(b).unwrap();
    }
    a.empty_cache().unwrap();
    assert_eq!((a.stats().reserved, a.space().used()), (0, 0));
}

#[test]
fn find_expandable_block_opens_a_new_segment_when_address_space_runs_out() {
    // 1.125 x 200 MiB of address space per segment: twelve 20 MiB pages (240 MiB). Tensors of
    // 20, 60, 20, 60 and 20 MiB, the 60 MiB ones freed and unmapped: the segment's runs of
    // room are 60, 60 and 60 MiB (the end), so an 80 MiB request opens a second segment,
    // though 140 MiB of the device is free.
    let mut a = build("expandable", 200 * MIB);
    let sizes = [20, 60, 20, 60, 20];
    let blocks: Vec<_> = sizes
        .iter()
        .map(|s| a.allocate(s * MIB, 0).unwrap())
        .collect();
    a.free(blocks[1]).unwrap();
    a.free(blocks[3]).unwrap();
    a.empty_cache().unwrap();
    assert_eq!(a.stats().reserved, 60 * MIB);
    let z = a.allocate(80 * MIB, 0).unwrap();
    assert!(z.addr >= blocks[0].addr + 240 * MIB, "a new segment");
    assert_eq!(a.stats().reserved, 140 * MIB);
    assert!(a.check().is_ok());
    for b in [blocks[0], blocks[2], blocks[4], z] {
        a.free(b).unwrap();
    }
    a.empty_cache().unwrap();
    assert_eq!(a.space().used(), 0);
}

#[test]
fn allocator_options_parse_and_print_back() {
    for text in [
        "caching:max_split=128MiB,roundup_power2=4",
        "caching:gc_threshold=0.8,fraction=0.9",
        "expandable:max_split=256MiB",
        "caching:roundup_power2_divisions=8,memory_fraction=0.5",
    ] {
        let spec = AllocatorSpec::parse(text).unwrap();
        assert_eq!(
            AllocatorSpec::parse(&spec.to_string()).unwrap(),
            spec,
            "{text}"
        );
        assert!(!spec.id().contains([':', '=', ',']), "{}", spec.id());
    }
    for bad in [
        "caching:roundup_power2=3",
        "caching:fraction=1.5",
        "caching:gc_threshold=1,fraction=0.5",
        "expandable:split=1",
    ] {
        let e = AllocatorSpec::parse(bad).unwrap_err().to_string();
        assert!(e.contains("is not an allocator"), "{bad}: {e}");
    }
}

/// An allocator that misreports one figure, to show the replay's invariant check catches it.
struct Misreporting {
    inner: Box<dyn Allocator>,
    what: &'static str,
}

impl Allocator for Misreporting {
    fn name(&self) -> String {
        self.inner.name()
    }
    fn allocate(
        &mut self,
        size: u64,
        stream: u32,
    ) -> headroom::error::Result<headroom::alloc::Block> {
        self.inner.allocate(size, stream)
    }
    fn free(&mut self, block: headroom::alloc::Block) -> headroom::error::Result<()> {
        self.inner.free(block)
    }
    fn empty_cache(&mut self) -> headroom::error::Result<()> {
        self.inner.empty_cache()
    }
    fn stats(&self) -> headroom::alloc::AllocatorStats {
        let mut s = self.inner.stats();
        match self.what {
            "requested" => s.requested += 1,
            "allocated" => s.allocated += 512,
            "active" => s.active = s.allocated.saturating_sub(1),
            _ => s.reserved = s.allocated.saturating_sub(1),
        }
        s
    }
    fn reset_peaks(&mut self) {
        self.inner.reset_peaks()
    }
    fn live_blocks(&self) -> Vec<headroom::alloc::Block> {
        self.inner.live_blocks()
    }
    fn space(&self) -> &dyn headroom::alloc::AddressSpace {
        self.inner.space()
    }
}

#[test]
fn the_replay_catches_an_allocator_that_misreports_a_figure() {
    let t = headroom::alloc::trace::walkthrough_trace();
    for what in ["requested", "allocated", "active", "reserved"] {
        let mut a = Misreporting {
            inner: build("expandable", 7 * GIB),
            what,
        };
        let m = replay(&t, &mut a, Some(1)).unwrap();
        let v = m.invariant_violation.unwrap_or_default();
        assert!(!v.is_empty(), "{what} misreported and not caught");
    }
}

/// On a GPU the driver's own pool replays every trace beside the `pool` model; on the CPU
/// those cases are not registered, and where one is run without a GPU it is skipped with the
/// reason (never silently).
#[test]
fn driver_pool_replays_exist_on_a_gpu_and_say_why_not_elsewhere() {
    let on_gpu = alloc_cases::cases(Profile::Quick, BackendKind::Cuda);
    let device: Vec<_> = on_gpu
        .iter()
        .filter(|c| c.info().id.contains("/device/"))
        .collect();
    assert_eq!(device.len(), 5, "one per trace");
    assert!(device
        .iter()
        .all(|c| c.info().id.starts_with("alloc/pool/device/")));
    assert!(alloc_cases::cases(Profile::Quick, BackendKind::Cpu)
        .iter()
        .all(|c| !c.info().id.contains("/device/")));
    let be: Arc<dyn Backend> = Arc::new(CpuBackend::new(None, None));
    let settings = Settings {
        profile: Profile::Quick,
        budget: None,
        seed: 1,
    };
    let mut s = Session::new(be, &settings, "test");
    let p = s.prepare(device[0].as_ref());
    match &p.record.status {
        Status::Skipped(why) => assert!(why.contains("needs a GPU"), "{why}"),
        other => panic!("{other:?}"),
    }
}
