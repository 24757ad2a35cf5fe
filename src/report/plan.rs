//! `headroom plan`: for a model shape and a memory budget, every training policy that fits,
//! fastest first, and why each other one does not.
//!
//! Memory comes from the training step's analytic model (`model::memory`), which tests pin
//! to the measured peak. Time comes from a report measured on the card to plan for: the
//! training case of the same policy (or, failing that, of the same checkpointing, attention
//! and precision), scaled by model FLOPs from its shape to the planned one. That scaling
//! ignores how efficiency changes with size (smaller micro-batches run less efficiently), so
//! predictions say which case they come from.
//!
//! With `--gpus N` the same is done per rank for every sharding strategy (`shard::memory`'s
//! per-rank model, also pinned to the measured peaks): each rank's compute is predicted as
//! above for its own batch (global / N), and its collectives' time is *modeled* from their
//! bytes at a bus bandwidth, with the ring formulas nccl-tests defines busBW by.

use serde::{Deserialize, Serialize};

use crate::dtype::DType;
use crate::error::{invalid, Result};
use crate::memory::format_bytes;
use crate::model::memory::{model, Breakdown};
use crate::model::{Checkpoint, HeadLoss, ModelShape, Policy};
use crate::report::{CaseRecord, Report, Status};
use crate::shapes::AttentionShape;
use crate::shard::memory::{headroom_tensors, model_states, peak_rank, RankBreakdown};
use crate::shard::{buckets, ShardSpec, Strategy, Traffic, DEFAULT_BUCKET_BYTES};
use crate::techniques::attention::{self, Pass, Variant};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PlanRow {
    /// `checkpoint-attention-mbK`, as in training case ids.
    pub policy: String,
    pub dtype: DType,
    pub memory: Breakdown,
    pub fits: bool,
    /// Budget minus peak (negative when it does not fit).
    pub margin_bytes: i64,
    /// Why it does not fit, when it does not.
    pub reason: Option<String>,
    pub predicted_step_s: Option<f64>,
    /// Which measured case the time is scaled from, or why there is none.
    pub time_source: String,
}

/// Model FLOPs of one training step (the convention of the training cases).
pub fn step_flops(shape: &ModelShape) -> f64 {
    let att = AttentionShape::new(shape.batch, shape.heads, shape.seq, shape.head_dim(), true);
    6.0 * shape.flop_params() as f64 * (shape.batch * shape.seq) as f64
        + shape.layers as f64 * attention::flops(Pass::ForwardBackward, &att)
}

/// Every policy combination for `shape`: checkpointing none, full, every √L, selective;
/// naive and flash attention; fp32 and bf16; micro-batches dividing the global batch; and
/// with a vocabulary, the head and loss materialized, chunked or fused.
pub fn policies(shape: &ModelShape) -> Vec<Policy> {
    let mut checkpoints = vec![Checkpoint::None, Checkpoint::Full];
    if let Checkpoint::EveryK(k) = Checkpoint::sqrt_default(shape.layers) {
        if k > 1 && k < shape.layers {
            checkpoints.push(Checkpoint::EveryK(k));
        }
    }
    checkpoints.push(Checkpoint::Selective);
    let micro: Vec<usize> = (1..=shape.batch).filter(|k| shape.batch % k == 0).collect();
    let mut out = Vec::new();
    for &checkpoint in &checkpoints {
        for attention in [Variant::Flash, Variant::Naive] {
            for dtype in [DType::Bf16, DType::F32] {
                for &micro_batches in &micro {
                    for &head in heads(shape) {
                        out.push(Policy {
                            checkpoint,
                            attention,
                            dtype,
                            micro_batches,
                            head,
                        });
                    }
                }
            }
        }
    }
    out
}

/// The head and loss variants a plan compares: the three with a vocabulary, the one
/// without.
pub fn heads(shape: &ModelShape) -> &'static [HeadLoss] {
    if shape.vocab() > 0 {
        &[HeadLoss::Materialized, HeadLoss::CHUNKED, HeadLoss::Fused]
    } else {
        &[HeadLoss::Materialized]
    }
}

/// A training case's shape parsed back from its id's last part (`L12-h768-heads12-n1024-b8`,
/// and any architecture tokens after it).
fn parse_shape(text: &str) -> Option<ModelShape> {
    let mut s = ModelShape::gpt(0, 0, 0, 0, 0);
    for part in text.split('-') {
        if crate::model::arch::parse_arch_token(&mut s.arch, part) {
            continue;
        }
        let (key, num) = part.split_at(part.find(|c: char| c.is_ascii_digit())?);
        let v: usize = num.parse().ok()?;
        match key {
            "L" => s.layers = v,
            "h" => s.hidden = v,
            "heads" => s.heads = v,
            "n" => s.seq = v,
            "b" => s.batch = v,
            _ => return None,
        }
    }
    s.check().ok().map(|_| s)
}

/// The measured time of `policy` scaled to `shape`, and where it comes from.
fn predict(report: &Report, shape: &ModelShape, policy: &Policy) -> (Option<f64>, String) {
    let wanted = policy.name();
    let family = |technique: &str| -> String {
        // `checkpoint-attention` without the micro-batch count.
        technique
            .rsplit_once("-mb")
            .map(|(a, _)| a.to_string())
            .unwrap_or_default()
    };
    let target = step_flops(shape);
    let measured = report
        .cases
        .iter()
        .filter(|c| c.family == "train" && c.status == Status::Ok && c.dtype == policy.dtype);
    let mut best: Option<(u8, f64, f64, String)> = None;
    for c in measured {
        let (Some(t), Some(s)) = (c.time.as_ref(), parse_shape(&c.shape)) else {
            continue;
        };
        let rank = if c.technique == wanted {
            0
        } else if family(&c.technique) == family(&wanted) {
            1
        } else {
            continue;
        };
        let distance = (step_flops(&s) / target).ln().abs();
        let better = match &best {
            None => true,
            Some((r, d, _, _)) => (rank, distance) < (*r, *d),
        };
        if better {
            best = Some((rank, distance, t.median_s / step_flops(&s), c.id.clone()));
        }
    }
    match best {
        Some((_, _, per_flop, id)) => (
            Some(per_flop * target),
            format!("scaled by model FLOPs from {id}"),
        ),
        None => (
            None,
            format!(
                "no measured training case of {wanted} in {} in the report",
                policy.dtype.name()
            ),
        ),
    }
}

/// Every policy with its modelled peak, fit, margin and predicted time; fitting ones first,
/// fastest first (unknown times after known ones, by peak), then the rest by peak.
pub fn plan(shape: &ModelShape, budget: u64, report: Option<&Report>) -> Vec<PlanRow> {
    let mut rows: Vec<PlanRow> = policies(shape)
        .into_iter()
        .map(|p| {
            let memory = model(shape, &p);
            let fits = memory.peak <= budget;
            let reason = (!fits).then(|| {
                format!(
                    "needs {}, {} over the budget: {} at the peak",
                    format_bytes(memory.peak),
                    format_bytes(memory.peak - budget),
                    breakdown(&memory)
                )
            });
            let (predicted_step_s, time_source) = match report {
                Some(r) => predict(r, shape, &p),
                None => (None, "no report given".into()),
            };
            PlanRow {
                policy: p.name(),
                dtype: p.dtype,
                memory,
                fits,
                margin_bytes: budget as i64 - memory.peak as i64,
                reason,
                predicted_step_s,
                time_source,
            }
        })
        .collect();
    rows.sort_by(|a, b| {
        fits_then_time((a.fits, a.predicted_step_s), (b.fits, b.predicted_step_s))
            .unwrap_or(std::cmp::Ordering::Equal)
            .then_with(|| a.memory.peak.cmp(&b.memory.peak))
    });
    rows
}

/// A breakdown's parts in words: `weights 15.0 GiB, gradients …, logits 4.0 GiB`.
pub fn breakdown(m: &Breakdown) -> String {
    let mut parts = vec![
        format!("weights {}", format_bytes(m.weights)),
        format!("gradients {}", format_bytes(m.grads)),
        format!("optimizer {}", format_bytes(m.optimizer)),
        format!("inputs {}", format_bytes(m.inputs)),
        format!("activations {}", format_bytes(m.activations)),
        format!("workspace {}", format_bytes(m.workspace)),
    ];
    if m.logits > 0 {
        parts.push(format!("logits {}", format_bytes(m.logits)));
    }
    parts.join(", ")
}

/// A parameter count as people write it: 124.4M, 8.03B.
pub fn params_text(n: usize) -> String {
    let n = n as f64;
    if n >= 1e9 {
        format!("{:.2}B", n / 1e9)
    } else if n >= 1e6 {
        format!("{:.1}M", n / 1e6)
    } else {
        format!("{n}")
    }
}

/// Plans' order: fitting rows first; among them, known times first, fastest first. None
/// where both fit and neither time is known (the caller breaks that tie its own way).
fn fits_then_time(
    (a_fits, a_time): (bool, Option<f64>),
    (b_fits, b_time): (bool, Option<f64>),
) -> Option<std::cmp::Ordering> {
    use std::cmp::Ordering::*;
    match b_fits.cmp(&a_fits) {
        Equal if a_fits => match (a_time, b_time) {
            (Some(x), Some(y)) => Some(x.total_cmp(&y)),
            (Some(_), None) => Some(Less),
            (None, Some(_)) => Some(Greater),
            (None, None) => None,
        },
        o => Some(o),
    }
}

/// The plan as a terminal table.
pub fn render(
    shape: &ModelShape,
    budget: u64,
    report_label: Option<&str>,
    rows: &[PlanRow],
) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "plan for {} ({} parameters, {}) under {}; memory from the analytic model; times from {}",
        shape.name(),
        params_text(shape.params()),
        shape.params(),
        format_bytes(budget),
        report_label.unwrap_or("no report (pass --report to predict times)")
    );
    if shape.vocab() > 0 {
        let _ = writeln!(
            out,
            "vocabulary {}: the logits of one micro-batch in fp32 take {} per sequence; the head and loss are one more axis (materialized, chunked, fused)",
            shape.vocab(),
            format_bytes(4 * (shape.seq * shape.vocab()) as u64)
        );
    }
    let fitting = rows.iter().filter(|r| r.fits).count();
    let _ = writeln!(out, "\n{fitting} of {} configurations fit:\n", rows.len());
    let _ = writeln!(
        out,
        "{:<40} {:<5} {:>10} {:>11} {:>11} {:>11} {:>11}  time from",
        "policy", "dtype", "step (ms)", "peak", "activations", "logits", "margin"
    );
    for r in rows.iter().filter(|r| r.fits) {
        let ms = r
            .predicted_step_s
            .map(|s| format!("{:.1}", s * 1e3))
            .unwrap_or_else(|| "-".into());
        let _ = writeln!(
            out,
            "{:<40} {:<5} {:>10} {:>11} {:>11} {:>11} {:>11}  {}",
            r.policy,
            r.dtype.name(),
            ms,
            format_bytes(r.memory.peak),
            format_bytes(r.memory.activations),
            format_bytes(r.memory.logits),
            format_bytes(r.margin_bytes as u64),
            r.time_source
        );
    }
    let _ = writeln!(out, "\ndo not fit:\n");
    for r in rows.iter().filter(|r| !r.fits) {
        let _ = writeln!(
            out,
            "{:<40} {:<5} {}",
            r.policy,
            r.dtype.name(),
            r.reason.as_deref().unwrap_or("")
        );
    }
    out
}

// ---------------------------------------------------------------------------------------------
// Across GPUs: `plan --gpus N`, every sharding strategy × policy, per rank.

/// The bus bandwidth communication is modeled at when neither `--bus-bw` nor the report
/// gives one: NVLink within one box.
pub const DEFAULT_BUS_BYTES_PER_S: f64 = 400e9;
/// Where [`DEFAULT_BUS_BYTES_PER_S`] comes from, printed beside it.
pub const DEFAULT_BUS_NOTE: &str = "NVLink within one box; nccl-tests all_reduce busbw on 8×H100 SXM is about 450 GB/s; override with --bus-bw";

/// What is asked of a plan across GPUs besides the model and the budget.
#[derive(Debug, Clone, PartialEq)]
pub struct ShardOptions {
    pub strategies: Vec<Strategy>,
    pub world: usize,
    pub bucket_bytes: u64,
    pub rank0_extra: u64,
    pub bus_bytes_per_s: f64,
    /// Where the bus bandwidth comes from (`--bus-bw`, the report's measurement, the default).
    pub bus_source: String,
}

impl ShardOptions {
    /// Every strategy over `world` ranks, PyTorch's bucket, no extra bytes on rank 0, the
    /// default bus bandwidth.
    pub fn new(world: usize) -> ShardOptions {
        ShardOptions {
            strategies: Strategy::ALL.to_vec(),
            world,
            bucket_bytes: DEFAULT_BUCKET_BYTES,
            rank0_extra: 0,
            bus_bytes_per_s: DEFAULT_BUS_BYTES_PER_S,
            bus_source: DEFAULT_BUS_NOTE.into(),
        }
    }

    fn spec(&self, strategy: Strategy) -> ShardSpec {
        ShardSpec {
            bucket_bytes: self.bucket_bytes,
            rank0_extra: self.rank0_extra,
            ..ShardSpec::new(strategy, self.world)
        }
    }
}

/// One strategy × policy on the rank that peaks.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ShardPlanRow {
    pub strategy: String,
    pub world: usize,
    /// `checkpoint-attention-mbK` over the rank's own batch (global batch / world).
    pub policy: String,
    pub dtype: DType,
    /// The rank with the largest peak (rank 0 when it keeps extra bytes).
    pub rank: usize,
    /// That rank's peak and what it is made of at that moment.
    pub memory: RankBreakdown,
    pub fits: bool,
    /// Budget minus peak (negative when it does not fit).
    pub margin_bytes: i64,
    /// The rank's compute, scaled from a measured training case of its own batch.
    pub predicted_compute_s: Option<f64>,
    /// The rank's collectives at the bus bandwidth: modeled, never measured.
    pub modeled_comm_s: f64,
    /// Compute plus modeled communication, where the compute is known.
    pub predicted_step_s: Option<f64>,
    /// Which measured case the compute is scaled from (or why there is none), and that the
    /// communication is modeled.
    pub time_source: String,
    /// Bytes the rank hands to collectives in one step.
    pub traffic: Traffic,
}

/// Why a strategy has no fitting policy.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NoFit {
    pub strategy: String,
    pub reason: String,
}

/// A plan across GPUs: every row (fitting first, fastest first), and a sentence for each
/// strategy none of whose policies fits.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ShardPlan {
    pub shape: String,
    pub params: usize,
    pub world: usize,
    /// Sequences each rank trains on per step (global batch / world).
    pub batch_per_rank: usize,
    pub budget_bytes: u64,
    pub bus_bytes_per_s: f64,
    pub bus_source: String,
    pub rows: Vec<ShardPlanRow>,
    pub no_fit: Vec<NoFit>,
}

/// A bandwidth such as `450GB/s`, `400GiB/s` or `450000000000` (bytes per second).
pub fn parse_rate(text: &str) -> Result<f64> {
    let t = text.trim();
    let lower = t.to_ascii_lowercase();
    let size = lower
        .strip_suffix("/s")
        .or_else(|| lower.strip_suffix("ps"))
        .unwrap_or(&lower);
    crate::memory::parse_bytes(size)
        .map(|b| b as f64)
        .map_err(|_| {
            invalid(format!(
                "'{text}' is not a bandwidth: write bytes per second with an optional unit, e.g. 450GB/s, 400GiB/s or 450000000000"
            ))
        })
}

/// A bandwidth as people quote interconnects: decimal GB/s.
pub fn format_rate(bytes_per_s: f64) -> String {
    format!("{:.0} GB/s", bytes_per_s / 1e9)
}

/// Every strategy of `opts` × every policy whose micro-batches divide the rank's batch, on
/// the rank that peaks. `shape.batch` is the global batch.
pub fn plan_sharded(
    shape: &ModelShape,
    budget: u64,
    report: Option<&Report>,
    opts: &ShardOptions,
) -> Result<ShardPlan> {
    shape.check()?;
    if opts.strategies.is_empty() {
        return Err(invalid("no sharding strategy to plan for"));
    }
    for &s in &opts.strategies {
        opts.spec(s).check(shape)?;
    }
    if !(opts.bus_bytes_per_s.is_finite() && opts.bus_bytes_per_s > 0.0) {
        return Err(invalid(format!(
            "a bus bandwidth of {} bytes/s moves nothing; use a positive rate such as 400GB/s",
            opts.bus_bytes_per_s
        )));
    }
    let world = opts.world;
    let local = ModelShape {
        batch: shape.batch / world,
        ..*shape
    };
    let candidates = policies(&local);
    // The compute prediction depends on the policy only, not on the strategy.
    let compute: Vec<(Option<f64>, String)> = candidates
        .iter()
        .map(|p| match report {
            Some(r) => predict(r, &local, p),
            None => (None, "no report given".into()),
        })
        .collect();
    let mut rows = Vec::new();
    let mut no_fit = Vec::new();
    for &strategy in &opts.strategies {
        let spec = opts.spec(strategy);
        let first = rows.len();
        for (p, (compute_s, source)) in candidates.iter().zip(&compute) {
            let (rank, m) = peak_rank(shape, p, &spec);
            let modeled_comm_s = m.traffic.modeled_seconds(world, opts.bus_bytes_per_s);
            rows.push(ShardPlanRow {
                strategy: strategy.name().into(),
                world,
                policy: p.name(),
                dtype: p.dtype,
                rank,
                memory: m.memory,
                fits: m.memory.peak <= budget,
                margin_bytes: budget as i64 - m.memory.peak as i64,
                predicted_compute_s: *compute_s,
                modeled_comm_s,
                predicted_step_s: compute_s.map(|c| c + modeled_comm_s),
                time_source: format!(
                    "compute: {source}; communication: modeled at {}",
                    format_rate(opts.bus_bytes_per_s)
                ),
                traffic: m.traffic,
            });
        }
        if !rows[first..].iter().any(|r| r.fits) {
            no_fit.push(NoFit {
                strategy: strategy.name().into(),
                reason: why_none_fits(shape, &candidates, &spec, &rows[first..], budget),
            });
        }
    }
    rows.sort_by(|a, b| {
        fits_then_time((a.fits, a.predicted_step_s), (b.fits, b.predicted_step_s))
            .unwrap_or_else(|| a.modeled_comm_s.total_cmp(&b.modeled_comm_s))
            .then_with(|| a.memory.peak.cmp(&b.memory.peak))
    });
    Ok(ShardPlan {
        shape: shape.name(),
        params: shape.params(),
        world,
        batch_per_rank: local.batch,
        budget_bytes: budget,
        bus_bytes_per_s: opts.bus_bytes_per_s,
        bus_source: opts.bus_source.clone(),
        rows,
        no_fit,
    })
}

/// One sentence on why no policy of a strategy fits: the model states (and DDP's buckets)
/// alone, where they exceed the budget whatever the policy; otherwise the leanest policy's
/// peak and what it is made of.
fn why_none_fits(
    shape: &ModelShape,
    candidates: &[Policy],
    spec: &ShardSpec,
    rows: &[ShardPlanRow],
    budget: u64,
) -> String {
    let name = spec.strategy.name();
    let bucket_bytes: u64 = if spec.strategy.uses_buckets() {
        buckets(shape, spec.bucket_bytes)
            .iter()
            .map(|b| 4 * b.len as u64)
            .sum()
    } else {
        0
    };
    // The leanest states over the policies (fp32 keeps no separate master copy).
    let states = candidates
        .iter()
        .map(|p| model_states(spec.strategy, spec.world, &headroom_tensors(shape, p)))
        .min_by_key(|&(w, g, o)| w + g + o);
    if let Some((weights, grads, optimizer)) = states {
        let extra = spec.rank0_extra;
        let total = weights + grads + optimizer + bucket_bytes + extra;
        if total > budget {
            let mut parts = vec![
                format!("weights {}", format_bytes(weights)),
                format!("gradients {}", format_bytes(grads)),
                format!("optimizer {}", format_bytes(optimizer)),
            ];
            if spec.strategy.uses_buckets() {
                parts.push(format!("buckets {}", format_bytes(bucket_bytes)));
            }
            if extra > 0 {
                parts.push(format!("rank 0's extra {}", format_bytes(extra)));
            }
            return format!(
                "{name}: no policy fits: the model states alone take {} per rank ({}) against {}",
                format_bytes(total),
                parts.join(", "),
                format_bytes(budget)
            );
        }
    }
    match rows.iter().min_by_key(|r| r.memory.peak) {
        Some(r) => {
            let m = &r.memory;
            format!(
                "{name}: no policy fits: the leanest, {} {}, peaks at {} on rank {} ({} over {}): weights {}, gradients {}, optimizer {}, activations {}, comm {}, extra {}",
                r.policy,
                r.dtype.name(),
                format_bytes(m.peak),
                r.rank,
                format_bytes(m.peak.saturating_sub(budget)),
                format_bytes(budget),
                format_bytes(m.weights),
                format_bytes(m.grads),
                format_bytes(m.optimizer),
                format_bytes(m.activations),
                format_bytes(m.comm),
                format_bytes(m.extra)
            )
        }
        None => format!("{name}: no policy to plan for"),
    }
}

/// A plan across GPUs as a terminal table.
pub fn render_sharded(plan: &ShardPlan, report_label: Option<&str>) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "plan for {} ({} parameters) over {} GPUs, {} sequence(s) per rank, under {} per rank; memory from the per-rank analytic model; compute times from {}",
        plan.shape,
        plan.params,
        plan.world,
        plan.batch_per_rank,
        format_bytes(plan.budget_bytes),
        report_label.unwrap_or("no report (pass --report to predict times)")
    );
    let _ = writeln!(
        out,
        "communication modeled (ring all-reduce 2(N-1)/N, reduce-scatter and all-gather (N-1)/N of the bytes, no latency) at {} bus bandwidth ({})",
        format_rate(plan.bus_bytes_per_s),
        plan.bus_source
    );
    let fitting = plan.rows.iter().filter(|r| r.fits).count();
    let _ = writeln!(
        out,
        "\n{fitting} of {} configurations fit:\n",
        plan.rows.len()
    );
    let ms = |s: Option<f64>| {
        s.map(|s| format!("{:.1}", s * 1e3))
            .unwrap_or_else(|| "-".into())
    };
    let _ = writeln!(
        out,
        "{:<15} {:<24} {:<5} {:>10} {:>12} {:>17} {:>11} {:>5} {:>11} {:>11} {:>11} {:>11} {:>11} {:>11} {:>11}  compute time from",
        "strategy",
        "policy",
        "dtype",
        "step (ms)",
        "compute (ms)",
        "comm ms (modeled)",
        "peak",
        "rank",
        "margin",
        "weights",
        "gradients",
        "optimizer",
        "activations",
        "comm",
        "extra"
    );
    for r in plan.rows.iter().filter(|r| r.fits) {
        let m = &r.memory;
        let source = r
            .time_source
            .split_once("; communication")
            .map(|(c, _)| c.trim_start_matches("compute: "))
            .unwrap_or(&r.time_source);
        let _ = writeln!(
            out,
            "{:<15} {:<24} {:<5} {:>10} {:>12} {:>17} {:>11} {:>5} {:>11} {:>11} {:>11} {:>11} {:>11} {:>11} {:>11}  {}",
            r.strategy,
            r.policy,
            r.dtype.name(),
            ms(r.predicted_step_s),
            ms(r.predicted_compute_s),
            format!("{:.1} modeled", r.modeled_comm_s * 1e3),
            format_bytes(m.peak),
            r.rank,
            format_bytes(r.margin_bytes.max(0) as u64),
            format_bytes(m.weights),
            format_bytes(m.grads),
            format_bytes(m.optimizer),
            format_bytes(m.activations),
            format_bytes(m.comm),
            format_bytes(m.extra),
            source
        );
    }
    if !plan.no_fit.is_empty() {
        let _ = writeln!(out, "\nstrategies with no fitting policy:\n");
        for n in &plan.no_fit {
            let _ = writeln!(out, "{}", n.reason);
        }
    }
    out
}

/// The shape (with the global batch), policy and sharding of a recorded sharded case, read
/// back from its id's parts: `fsdp-selective-flash-mb1` and `L2-h128-heads2-n32-b4-w2`.
pub fn shard_case_setup(case: &CaseRecord) -> Option<(ModelShape, Policy, ShardSpec)> {
    let rec = case.shard.as_ref()?;
    let strategy = Strategy::parse(&rec.strategy).ok()?;
    let policy = parse_policy(
        case.technique.strip_prefix(&format!("{}-", rec.strategy))?,
        case.dtype,
    )?;
    // The shape's own parts end where the world's suffix (`-w4-bk…-x…`) begins.
    let end = case
        .shape
        .match_indices("-w")
        .find(|(i, _)| {
            case.shape[i + 2..]
                .chars()
                .next()
                .is_some_and(|c| c.is_ascii_digit())
        })
        .map(|(i, _)| i)
        .unwrap_or(case.shape.len());
    let shape = parse_shape(&case.shape[..end])?;
    let spec = ShardSpec {
        bucket_bytes: if rec.bucket_bytes > 0 {
            rec.bucket_bytes
        } else {
            DEFAULT_BUCKET_BYTES
        },
        rank0_extra: rec.rank0_extra,
        ..ShardSpec::new(strategy, rec.world)
    };
    spec.check(&shape).ok()?;
    Some((shape, policy, spec))
}

/// `selective-flash-mb1` (as [`Policy::name`] writes it) in `dtype`.
fn parse_policy(text: &str, dtype: DType) -> Option<Policy> {
    let (rest, micro) = text.rsplit_once("-mb")?;
    let (checkpoint, attention) = rest.rsplit_once('-')?;
    let checkpoint = match checkpoint {
        "none" => Checkpoint::None,
        "full" => Checkpoint::Full,
        "selective" => Checkpoint::Selective,
        other => Checkpoint::EveryK(other.strip_prefix("every")?.parse().ok()?),
    };
    let attention = [Variant::Flash, Variant::Naive]
        .into_iter()
        .find(|v| v.name() == attention)?;
    Some(Policy {
        checkpoint,
        attention,
        dtype,
        micro_batches: micro.parse().ok().filter(|&m| m > 0)?,
        head: crate::model::HeadLoss::Materialized,
    })
}
