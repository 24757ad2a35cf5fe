//! `headroom plan`: for a model shape and a memory budget, every training policy that fits,
//! fastest first, and why each other one does not.
//!
//! Memory comes from the training step's analytic model (`model::memory`), which tests pin
//! to the measured peak. Time comes from a report measured on the card to plan for: the
//! training case of the same policy (or, failing that, of the same checkpointing, attention
//! and precision), scaled by model FLOPs from its shape to the planned one. That scaling
//! ignores how efficiency changes with size (smaller micro-batches run less efficiently), so
//! predictions say which case they come from.

use serde::{Deserialize, Serialize};

use crate::dtype::DType;
use crate::memory::format_bytes;
use crate::model::memory::{model, Breakdown};
use crate::model::{Checkpoint, ModelShape, Policy};
use crate::report::{Report, Status};
use crate::shapes::AttentionShape;
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
    6.0 * shape.params() as f64 * (shape.batch * shape.seq) as f64
        + shape.layers as f64 * attention::flops(Pass::ForwardBackward, &att)
}

/// Every policy combination for `shape`: checkpointing none, full, every √L, selective;
/// naive and flash attention; fp32 and bf16; micro-batches dividing the global batch.
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
                    out.push(Policy {
                        checkpoint,
                        attention,
                        dtype,
                        micro_batches,
                    });
                }
            }
        }
    }
    out
}

/// A training case's shape parsed back from its id's last part (`L12-h768-heads12-n1024-b8`).
fn parse_shape(text: &str) -> Option<ModelShape> {
    let mut s = ModelShape {
        layers: 0,
        hidden: 0,
        heads: 0,
        seq: 0,
        batch: 0,
    };
    for part in text.split('-') {
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
                    "needs {}, {} over the budget: weights {}, gradients {}, optimizer {}, inputs {}, activations {}, workspace {} at the peak",
                    format_bytes(memory.peak),
                    format_bytes(memory.peak - budget),
                    format_bytes(memory.weights),
                    format_bytes(memory.grads),
                    format_bytes(memory.optimizer),
                    format_bytes(memory.inputs),
                    format_bytes(memory.activations),
                    format_bytes(memory.workspace)
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
        b.fits
            .cmp(&a.fits)
            .then_with(|| match (a.predicted_step_s, b.predicted_step_s) {
                (Some(x), Some(y)) if a.fits => x.total_cmp(&y),
                (Some(_), None) if a.fits => std::cmp::Ordering::Less,
                (None, Some(_)) if a.fits => std::cmp::Ordering::Greater,
                _ => std::cmp::Ordering::Equal,
            })
            .then_with(|| a.memory.peak.cmp(&b.memory.peak))
    });
    rows
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
        "plan for {} ({} parameters) under {}; memory from the analytic model; times from {}",
        shape.name(),
        shape.params(),
        format_bytes(budget),
        report_label.unwrap_or("no report (pass --report to predict times)")
    );
    let fitting = rows.iter().filter(|r| r.fits).count();
    let _ = writeln!(out, "\n{fitting} of {} configurations fit:\n", rows.len());
    let _ = writeln!(
        out,
        "{:<28} {:<5} {:>12} {:>12} {:>12}  time from",
        "policy", "dtype", "step (ms)", "peak", "margin"
    );
    for r in rows.iter().filter(|r| r.fits) {
        let ms = r
            .predicted_step_s
            .map(|s| format!("{:.1}", s * 1e3))
            .unwrap_or_else(|| "-".into());
        let _ = writeln!(
            out,
            "{:<28} {:<5} {:>12} {:>12} {:>12}  {}",
            r.policy,
            r.dtype.name(),
            ms,
            format_bytes(r.memory.peak),
            format_bytes(r.margin_bytes as u64),
            r.time_source
        );
    }
    let _ = writeln!(out, "\ndo not fit:\n");
    for r in rows.iter().filter(|r| !r.fits) {
        let _ = writeln!(
            out,
            "{:<28} {:<5} {}",
            r.policy,
            r.dtype.name(),
            r.reason.as_deref().unwrap_or("")
        );
    }
    out
}
