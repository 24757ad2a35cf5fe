//! SVG plots: per family, median time against peak allocated bytes, one point per measured
//! case, so the trade each technique makes is one glance: down is faster, left is smaller.
//!
//! plotters' SVG backend writes text as `<text>` elements and leaves the font to the
//! viewer, so no font files or font features are needed.

use std::path::{Path, PathBuf};

use plotters::coord::ranged1d::{Ranged, ValueFormatter};
use plotters::coord::types::RangedCoordf64;
use plotters::prelude::*;

use crate::error::{Error, Result};
use crate::memory::format_bytes;
use crate::report::markdown::families;
use crate::report::{write_atomic, CaseRecord, Report, Status};

const SIZE: (u32, u32) = (960, 640);

/// One plotted case: peak allocated bytes (x), median time in ms (y), its series.
#[derive(Debug, Clone)]
struct Point {
    bytes: f64,
    ms: f64,
    series: String,
}

/// Writes `<slug>-<family>.svg` for each family with a timed case; removes the plot of a
/// family that has none, so a stale picture never sits beside a new report.
pub fn write_plots(report: &Report, dir: &Path, slug: &str) -> Result<()> {
    let mut plotted: Vec<String> = Vec::new();
    for family in families(&report.cases) {
        let path = dir.join(format!("{slug}-{family}.svg"));
        let points = points(report.cases.iter().filter(|c| c.family == family));
        if points.is_empty() {
            remove_stale(&path)?;
            continue;
        }
        let svg = render(&family, slug, &points, report.budget_bytes)
            .map_err(|e| Error::Io(format!("could not draw {}: {e}", path.display())))?;
        write_atomic(&path, svg.as_bytes())?;
        plotted.push(family);
    }
    write_world_plot(report, dir, slug)?;
    // A run filtered to some families (`cargo bench -- attention`) rewrites the report
    // without the others; their old plots would describe a run the report no longer holds.
    for path in family_plots(dir, slug)? {
        let family = family_of(&path, slug).unwrap_or_default();
        if !plotted.contains(&family) {
            remove_stale(&path)?;
        }
    }
    Ok(())
}

fn points<'a>(cases: impl Iterator<Item = &'a CaseRecord>) -> Vec<Point> {
    cases
        .filter(|c| c.status == Status::Ok)
        .filter_map(|c| {
            let t = c.time.as_ref()?;
            let m = c.memory.as_ref()?;
            // Log axes cannot show zero; a case that allocates nothing is not a memory trade.
            (m.peak_allocated > 0 && t.median_s > 0.0).then(|| Point {
                bytes: m.peak_allocated as f64,
                ms: t.median_s * 1e3,
                series: format!("{} {}", c.technique, c.dtype.name()),
            })
        })
        .collect()
}

/// The Pareto front: indices of the points no other point beats in both time and memory
/// (at least as good in both, better in one), in order of memory.
fn pareto_front(points: &[(f64, f64)]) -> Vec<usize> {
    let mut front: Vec<usize> = (0..points.len())
        .filter(|&i| {
            let (x, y) = points[i];
            !points
                .iter()
                .any(|&(qx, qy)| qx <= x && qy <= y && (qx < x || qy < y))
        })
        .collect();
    front.sort_by(|&a, &b| {
        points[a]
            .0
            .total_cmp(&points[b].0)
            .then(points[a].1.total_cmp(&points[b].1))
    });
    front
}

/// A base-2 log axis padded on each side, and how many labels to ask for. plotters puts
/// evenly spaced "light" labels between the powers when asked for more labels than there
/// are powers in the range, and those crowd into each other at the top of every octave;
/// asking for at most one per power keeps to the powers (bytes read best in powers of two).
fn log_axis(lo: f64, hi: f64) -> (LogCoord<f64>, usize) {
    let (lo, hi) = (lo / 1.6, hi * 1.6);
    let powers = (hi / lo).log2().floor().max(1.0) as usize;
    (
        LogCoord::from((lo..hi).log_scale().base(2.0)),
        powers.min(12),
    )
}

fn render(
    family: &str,
    slug: &str,
    points: &[Point],
    budget: Option<u64>,
) -> std::result::Result<String, String> {
    let min = |f: fn(&Point) -> f64| points.iter().map(f).fold(f64::INFINITY, f64::min);
    let max = |f: fn(&Point) -> f64| points.iter().map(f).fold(0.0, f64::max);
    let (mut x_lo, mut x_hi) = (min(|p| p.bytes), max(|p| p.bytes));
    if let Some(b) = budget.filter(|&b| b > 0) {
        x_lo = x_lo.min(b as f64);
        x_hi = x_hi.max(b as f64);
    }
    let x = log_axis(x_lo, x_hi);
    let (y_lo, y_hi) = (min(|p| p.ms), max(|p| p.ms));
    // Past a tenfold spread a linear axis squeezes the fast cases onto the floor.
    if y_hi / y_lo > 10.0 {
        let (y, labels) = log_axis(y_lo, y_hi);
        draw(family, slug, points, budget, x, (y, labels), true)
    } else {
        let pad = ((y_hi - y_lo) * 0.1).max(y_hi * 0.05);
        let y = RangedCoordf64::from((y_lo - pad).max(0.0)..y_hi + pad);
        draw(family, slug, points, budget, x, (y, 10), false)
    }
}

/// A tick label with three significant digits and no trailing zeros.
fn tick(v: f64) -> String {
    if v == 0.0 || !v.is_finite() {
        return format!("{v}");
    }
    let digits = (2 - v.abs().log10().floor() as i32).clamp(0, 9) as usize;
    let s = format!("{v:.digits$}");
    if s.contains('.') {
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    } else {
        s
    }
}

fn draw<Y>(
    family: &str,
    slug: &str,
    points: &[Point],
    budget: Option<u64>,
    (x, x_labels): (LogCoord<f64>, usize),
    (y, y_labels): (Y, usize),
    log_y: bool,
) -> std::result::Result<String, String>
where
    Y: Ranged<ValueType = f64> + ValueFormatter<f64>,
{
    let err = |e: &dyn std::fmt::Display| e.to_string();
    let y_range = y.range();
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, SIZE).into_drawing_area();
        root.fill(&WHITE).map_err(|e| err(&e))?;
        let mut chart = ChartBuilder::on(&root)
            .caption(
                format!("{family} on {slug}: median time vs peak allocated"),
                ("sans-serif", 20),
            )
            .margin(16)
            .x_label_area_size(48)
            .y_label_area_size(72)
            .build_cartesian_2d(x, y)
            .map_err(|e| err(&e))?;
        let y_desc = if log_y {
            "median time (ms, log scale)"
        } else {
            "median time (ms)"
        };
        chart
            .configure_mesh()
            .x_desc("peak allocated (log scale)")
            .y_desc(y_desc)
            .x_labels(x_labels)
            .y_labels(y_labels)
            .x_label_formatter(&|v| format_bytes(v.round() as u64))
            .y_label_formatter(&|v| tick(*v))
            .draw()
            .map_err(|e| err(&e))?;

        let mut series: Vec<&str> = Vec::new();
        for p in points {
            if !series.contains(&p.series.as_str()) {
                series.push(&p.series);
            }
        }
        for (i, name) in series.iter().enumerate() {
            let color = Palette99::pick(i).to_rgba();
            let mine = points.iter().filter(|p| p.series == *name);
            chart
                .draw_series(mine.map(|p| Circle::new((p.bytes, p.ms), 5, color.filled())))
                .map_err(|e| err(&e))?
                .label(*name)
                .legend(move |(x, y)| Circle::new((x, y), 5, color.filled()));
        }

        let xy: Vec<(f64, f64)> = points.iter().map(|p| (p.bytes, p.ms)).collect();
        let front: Vec<(f64, f64)> = pareto_front(&xy).into_iter().map(|i| xy[i]).collect();
        chart
            .draw_series(LineSeries::new(front.clone(), BLACK.stroke_width(1)))
            .map_err(|e| err(&e))?
            .label("Pareto front")
            .legend(|(x, y)| PathElement::new(vec![(x - 8, y), (x + 8, y)], BLACK));
        chart
            .draw_series(
                front
                    .iter()
                    .map(|&(x, y)| Circle::new((x, y), 8, BLACK.stroke_width(1))),
            )
            .map_err(|e| err(&e))?;

        if let Some(b) = budget.filter(|&b| b > 0) {
            let red = RGBColor(200, 30, 30);
            chart
                .draw_series(DashedLineSeries::new(
                    vec![(b as f64, y_range.start), (b as f64, y_range.end)],
                    6,
                    4,
                    red.stroke_width(2),
                ))
                .map_err(|e| err(&e))?
                .label(format!("budget {}", format_bytes(b)))
                .legend(move |(x, y)| PathElement::new(vec![(x - 8, y), (x + 8, y)], red));
        }

        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperRight)
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .draw()
            .map_err(|e| err(&e))?;
        root.present().map_err(|e| err(&e))?;
    }
    Ok(svg)
}

/// The worlds the per-rank plot sweeps: 1, 2, 4, … 1024 ranks.
pub const SWEEP_WORLDS: [usize; 11] = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024];

/// The per-rank plot's file name beside the report. Two words after the slug, so that it is
/// never taken for a family's plot (and removed as stale) by [`family_of`].
pub fn world_plot_name(slug: &str) -> String {
    format!("{slug}-shard-worlds.svg")
}

/// What the per-rank plot sweeps: the report's first sharded case with its shape, policy
/// and sharding read back, and the batch each of its ranks trains on.
pub struct WorldSweep {
    pub case_id: String,
    pub shape: crate::model::ModelShape,
    pub policy: crate::model::Policy,
    pub spec: crate::shard::ShardSpec,
    pub batch_per_rank: usize,
    /// The report's budget, else the device's memory.
    pub budget: Option<u64>,
}

impl WorldSweep {
    pub fn of(report: &Report) -> Option<WorldSweep> {
        let (case, (shape, policy, spec)) = report
            .cases
            .iter()
            .filter(|c| c.shard.is_some())
            .find_map(|c| crate::report::plan::shard_case_setup(c).map(|s| (c, s)))?;
        Some(WorldSweep {
            case_id: case.id.clone(),
            shape,
            policy,
            spec,
            batch_per_rank: shape.batch / spec.world,
            budget: report.budget_bytes.or(report.device.memory_bytes),
        })
    }

    /// The modeled peak of the rank that peaks, for each strategy, at each world of
    /// [`SWEEP_WORLDS`], the global batch growing with the world.
    pub fn curves(&self) -> Vec<(crate::shard::Strategy, Vec<(usize, u64)>)> {
        use crate::shard::{memory::peak_rank, ShardSpec, Strategy};
        Strategy::ALL
            .into_iter()
            .map(|strategy| {
                let points = SWEEP_WORLDS
                    .iter()
                    .map(|&world| {
                        let shape = crate::model::ModelShape {
                            batch: self.batch_per_rank * world,
                            ..self.shape
                        };
                        let spec = ShardSpec {
                            strategy,
                            world,
                            ..self.spec
                        };
                        (world, peak_rank(&shape, &self.policy, &spec).1.memory.peak)
                    })
                    .collect();
                (strategy, points)
            })
            .collect()
    }
}

/// Writes the per-rank peak against world size for the report's first sharded case, or
/// removes a stale one when the report has none.
fn write_world_plot(report: &Report, dir: &Path, slug: &str) -> Result<()> {
    let path = dir.join(world_plot_name(slug));
    let Some(sweep) = WorldSweep::of(report) else {
        return remove_stale(&path);
    };
    let svg = render_worlds(&sweep)
        .map_err(|e| Error::Io(format!("could not draw {}: {e}", path.display())))?;
    write_atomic(&path, svg.as_bytes())
}

fn render_worlds(sweep: &WorldSweep) -> std::result::Result<String, String> {
    let err = |e: &dyn std::fmt::Display| e.to_string();
    let curves = sweep.curves();
    let peaks = curves
        .iter()
        .flat_map(|(_, p)| p.iter().map(|&(_, b)| b as f64));
    let (mut lo, mut hi) = peaks.fold((f64::INFINITY, 0.0f64), |(lo, hi), b| {
        (lo.min(b), hi.max(b))
    });
    if let Some(b) = sweep.budget.filter(|&b| b > 0) {
        lo = lo.min(b as f64);
        hi = hi.max(b as f64);
    }
    if !(lo > 0.0 && hi >= lo) {
        return Err("no positive peak to plot".into());
    }
    let (y, y_labels) = log_axis(lo, hi);
    let x_max = *SWEEP_WORLDS.last().expect("not empty") as f64;
    let x = LogCoord::from((0.7..x_max * 1.4).log_scale().base(2.0));
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, SIZE).into_drawing_area();
        root.fill(&WHITE).map_err(|e| err(&e))?;
        let caption = format!(
            "per-rank peak vs world size (model): {} {} on {}, {} sequence(s) per rank",
            sweep.policy.name(),
            sweep.policy.dtype.name(),
            crate::model::ModelShape {
                batch: sweep.batch_per_rank,
                ..sweep.shape
            }
            .name(),
            sweep.batch_per_rank
        );
        let mut chart = ChartBuilder::on(&root)
            .caption(caption, ("sans-serif", 18))
            .margin(16)
            .x_label_area_size(48)
            .y_label_area_size(72)
            .build_cartesian_2d(x, y)
            .map_err(|e| err(&e))?;
        chart
            .configure_mesh()
            .x_desc(format!(
                "ranks (log scale; global batch = {} × ranks)",
                sweep.batch_per_rank
            ))
            .y_desc("peak allocated on the rank that peaks (log scale)")
            .x_labels(SWEEP_WORLDS.len())
            .y_labels(y_labels)
            .x_label_formatter(&|v| format!("{}", v.round() as u64))
            .y_label_formatter(&|v| format_bytes(v.round() as u64))
            .draw()
            .map_err(|e| err(&e))?;
        for (i, (strategy, points)) in curves.iter().enumerate() {
            let color = Palette99::pick(i).to_rgba();
            let xy: Vec<(f64, f64)> = points.iter().map(|&(w, b)| (w as f64, b as f64)).collect();
            chart
                .draw_series(LineSeries::new(xy.clone(), color.stroke_width(2)))
                .map_err(|e| err(&e))?
                .label(strategy.name())
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x - 8, y), (x + 8, y)], color.stroke_width(2))
                });
            chart
                .draw_series(xy.iter().map(|&p| Circle::new(p, 4, color.filled())))
                .map_err(|e| err(&e))?;
        }
        if let Some(b) = sweep.budget.filter(|&b| b > 0) {
            let red = RGBColor(200, 30, 30);
            chart
                .draw_series(DashedLineSeries::new(
                    vec![(0.7, b as f64), (x_max * 1.4, b as f64)],
                    6,
                    4,
                    red.stroke_width(2),
                ))
                .map_err(|e| err(&e))?
                .label(format!("budget {}", format_bytes(b)))
                .legend(move |(x, y)| PathElement::new(vec![(x - 8, y), (x + 8, y)], red));
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperRight)
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .draw()
            .map_err(|e| err(&e))?;
        root.present().map_err(|e| err(&e))?;
    }
    Ok(svg)
}

/// The files in `dir` named like this slug's family plots: `<slug>-<family>.svg` with a
/// one-word family, so another card's plots (`<slug>-80gb-…`) are never taken for ours.
fn family_plots(dir: &Path, slug: &str) -> Result<Vec<PathBuf>> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => {
            return Err(Error::Io(format!(
                "could not list {} for stale plots: {e}",
                dir.display()
            )))
        }
    };
    Ok(entries
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| family_of(p, slug).is_some())
        .collect())
}

fn family_of(path: &Path, slug: &str) -> Option<String> {
    let name = path.file_name()?.to_str()?;
    let family = name
        .strip_prefix(slug)?
        .strip_prefix('-')?
        .strip_suffix(".svg")?;
    let word = !family.is_empty()
        && family
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
    word.then(|| family.to_string())
}

fn remove_stale(path: &Path) -> Result<()> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(Error::Io(format!(
            "could not remove the stale plot {}: {e}",
            path.display()
        ))),
    }
}

/// One stacked-area SVG per case with a memory timeline: allocated bytes by category over
/// the events of one step, because people read memory as a picture.
pub fn write_timelines(report: &Report, dir: &Path, slug: &str) -> Result<()> {
    for c in &report.cases {
        let Some(tl) = c.timeline.as_ref().filter(|t| !t.points.is_empty()) else {
            continue;
        };
        let name: String =
            c.id.chars()
                .map(|ch| {
                    if ch.is_ascii_alphanumeric() || ch == '.' {
                        ch
                    } else {
                        '_'
                    }
                })
                .collect();
        let path = dir.join(format!("{slug}-timeline-{name}.svg"));
        let svg = render_timeline(&c.id, tl)
            .map_err(|e| Error::Io(format!("could not draw {}: {e}", path.display())))?;
        write_atomic(&path, svg.as_bytes())?;
    }
    Ok(())
}

fn render_timeline(
    title: &str,
    tl: &crate::report::Timeline,
) -> std::result::Result<String, String> {
    let mut out = String::new();
    {
        let root = SVGBackend::with_string(&mut out, (1000, 520)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| e.to_string())?;
        let (unit, unit_name) = if tl.peak() >= 1 << 30 {
            ((1u64 << 30) as f64, "GiB")
        } else {
            ((1u64 << 20) as f64, "MiB")
        };
        let peak = tl.peak() as f64 / unit;
        let n = tl.points.len();
        let top = (peak * 1.05).max(1e-9);
        let mut chart = ChartBuilder::on(&root)
            .caption(
                format!("{title}: allocated memory over one step"),
                ("sans-serif", 16),
            )
            .margin(12)
            .x_label_area_size(if tl.phases.is_empty() { 36 } else { 64 })
            .y_label_area_size(64)
            .build_cartesian_2d(0..n, 0f64..top)
            .map_err(|e| e.to_string())?;
        chart
            .configure_mesh()
            .x_desc(if tl.phases.is_empty() {
                "allocation event"
            } else {
                "allocation event (phases of the step marked below the axis)"
            })
            .y_desc(format!("{unit_name} allocated"))
            .y_label_formatter(&|v| format!("{v:.1}"))
            .draw()
            .map_err(|e| e.to_string())?;
        // Stacked: each category drawn as the area under the running sum up to it, largest
        // sum first so the lower layers stay visible.
        let palette = [&BLUE, &GREEN, &MAGENTA, &CYAN, &RED, &BLACK];
        for k in (0..tl.categories.len()).rev() {
            let color = palette[k % palette.len()];
            let series = tl
                .points
                .iter()
                .enumerate()
                .map(|(i, p)| (i, p[..=k].iter().sum::<u64>() as f64 / unit));
            chart
                .draw_series(AreaSeries::new(series, 0.0, color.mix(0.35)).border_style(*color))
                .map_err(|e| e.to_string())?
                .label(tl.categories[k].clone())
                .legend(move |(x, y)| {
                    Rectangle::new([(x, y - 5), (x + 10, y + 5)], color.mix(0.5).filled())
                });
        }
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .position(SeriesLabelPosition::UpperLeft)
            .draw()
            .map_err(|e| e.to_string())?;
        // Phase boundaries: a line across the plot where each phase begins, and its name
        // under the x-axis (below the tick labels, on two alternating rows so that short
        // phases do not overprint each other).
        for (k, (at, label)) in tl.phases.iter().enumerate() {
            let x = (*at).min(n.saturating_sub(1));
            chart
                .draw_series(std::iter::once(PathElement::new(
                    vec![(x, 0.0), (x, top)],
                    BLACK.mix(0.55).stroke_width(1),
                )))
                .map_err(|e| e.to_string())?;
            let (px, py) = chart.backend_coord(&(x, 0.0));
            let row = 24 + 14 * (k as i32 % 2);
            root.draw(&Text::new(
                format!("| {label}"),
                (px, py + row),
                ("sans-serif", 12).into_font(),
            ))
            .map_err(|e| e.to_string())?;
        }
        root.present().map_err(|e| e.to_string())?;
    }
    Ok(out)
}

/// Writes `<slug>-replay-dev<d>.svg` for each device of a snapshot's replay: one panel per
/// allocator with its allocated and reserved bytes over the trace (the largest values of each
/// window of events, so no peak is lost) and the device's capacity where it is bounded.
/// Returns the files written.
pub fn write_replay(
    results: &[crate::alloc::snapshot::ReplayResult],
    dir: &Path,
    slug: &str,
) -> Result<Vec<PathBuf>> {
    let mut written = Vec::new();
    for r in results {
        let path = dir.join(format!("{slug}-replay-dev{}.svg", r.device));
        let svg = render_replay(r)
            .map_err(|e| Error::Io(format!("could not draw {}: {e}", path.display())))?;
        write_atomic(&path, svg.as_bytes())?;
        written.push(path);
    }
    Ok(written)
}

fn render_replay(r: &crate::alloc::snapshot::ReplayResult) -> std::result::Result<String, String> {
    let bounded = r.capacity < crate::alloc::snapshot::UNBOUNDED;
    let peak = r
        .series
        .iter()
        .flat_map(|s| s.points.iter().map(|p| p.2.max(p.1)))
        .max()
        .unwrap_or(0)
        .max(if bounded { r.capacity } else { 0 });
    let (unit, unit_name) = if peak >= 1 << 30 {
        ((1u64 << 30) as f64, "GiB")
    } else {
        ((1u64 << 20) as f64, "MiB")
    };
    let top = (peak as f64 / unit * 1.05).max(1e-9);
    let events = r.rows.first().map(|(_, m)| m.events).unwrap_or(1).max(1);
    let cols = 2usize;
    let rows = r.rows.len().div_ceil(cols).max(1);
    let mut out = String::new();
    {
        let root =
            SVGBackend::with_string(&mut out, (1100, 230 * rows as u32 + 40)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| e.to_string())?;
        let (title, body) = root.split_vertically(40);
        title
            .draw_text(
                &format!(
                    "device {}: allocated (blue) and reserved (red) over the replayed trace{}",
                    r.device,
                    if bounded {
                        format!(", capacity {} dashed", format_bytes(r.capacity))
                    } else {
                        String::new()
                    }
                ),
                &("sans-serif", 16).into_text_style(&title),
                (12, 12),
            )
            .map_err(|e| e.to_string())?;
        let panels = body.split_evenly((rows, cols));
        for (((spec, m), s), panel) in r.rows.iter().zip(&r.series).zip(panels) {
            let caption = match &m.oom {
                Some(o) => format!("{spec}: out of memory at event {}", o.event),
                None => format!("{spec}: peak reserved {}", format_bytes(m.peak_reserved)),
            };
            let mut chart = ChartBuilder::on(&panel)
                .caption(caption, ("sans-serif", 13))
                .margin(8)
                .x_label_area_size(24)
                .y_label_area_size(48)
                .build_cartesian_2d(0..events, 0f64..top)
                .map_err(|e| e.to_string())?;
            chart
                .configure_mesh()
                .y_desc(unit_name)
                .y_label_formatter(&|v| format!("{v:.1}"))
                .x_labels(5)
                .draw()
                .map_err(|e| e.to_string())?;
            let line = |pick: fn(&(usize, u64, u64)) -> u64| -> Vec<(usize, f64)> {
                s.points
                    .iter()
                    .map(|p| (p.0, pick(p) as f64 / unit))
                    .collect()
            };
            chart
                .draw_series(LineSeries::new(line(|p| p.2), RED.stroke_width(1)))
                .map_err(|e| e.to_string())?;
            chart
                .draw_series(LineSeries::new(line(|p| p.1), BLUE.stroke_width(1)))
                .map_err(|e| e.to_string())?;
            if bounded {
                let c = r.capacity as f64 / unit;
                chart
                    .draw_series(DashedLineSeries::new(
                        vec![(0, c), (events, c)],
                        4,
                        3,
                        BLACK.stroke_width(1),
                    ))
                    .map_err(|e| e.to_string())?;
            }
        }
        root.present().map_err(|e| e.to_string())?;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_front_keeps_only_cases_nothing_beats_in_both() {
        // (bytes, ms): 1 is beaten by 0 in both; 3 ties 2 in memory but is slower.
        let pts = [
            (100.0, 1.0),
            (200.0, 2.0),
            (50.0, 3.0),
            (50.0, 4.0),
            (400.0, 0.5),
        ];
        assert_eq!(pareto_front(&pts), vec![2, 0, 4]);
    }

    #[test]
    fn equal_points_are_both_on_the_front() {
        let pts = [(10.0, 1.0), (10.0, 1.0)];
        assert_eq!(pareto_front(&pts), vec![0, 1]);
    }

    #[test]
    fn ticks_keep_three_significant_digits() {
        assert_eq!(tick(0.125), "0.125");
        assert_eq!(tick(2.0), "2");
        assert_eq!(tick(1.9702), "1.97");
        assert_eq!(tick(1536.0), "1536");
        assert_eq!(tick(0.0), "0");
    }

    #[test]
    fn only_one_word_families_of_this_slug_are_ours() {
        let p = |s: &str| PathBuf::from(format!("/x/{s}"));
        assert_eq!(
            family_of(&p("nvidia-h100-matmul.svg"), "nvidia-h100"),
            Some("matmul".into())
        );
        assert_eq!(
            family_of(&p("nvidia-h100-80gb-hbm3-matmul.svg"), "nvidia-h100"),
            None
        );
        assert_eq!(family_of(&p("nvidia-h100.json"), "nvidia-h100"), None);
        assert_eq!(family_of(&p("cpu-.svg"), "cpu"), None);
    }

    #[test]
    fn a_timeline_marks_its_phases_on_the_x_axis() {
        let tl = crate::report::Timeline {
            categories: vec!["weights".into(), "activations".into()],
            points: vec![vec![4 << 20, 0], vec![4 << 20, 2 << 20], vec![4 << 20, 0]],
            phases: vec![
                (0, "forward".into()),
                (1, "backward".into()),
                (2, "optimizer".into()),
            ],
        };
        let svg = render_timeline("train/x", &tl).unwrap();
        for label in [
            "| forward",
            "| backward",
            "| optimizer",
            "phases of the step",
        ] {
            assert!(svg.contains(label), "{label} missing");
        }
        let plain = crate::report::Timeline {
            phases: Vec::new(),
            ..tl
        };
        assert!(!render_timeline("train/x", &plain)
            .unwrap()
            .contains("| forward"));
    }
}
