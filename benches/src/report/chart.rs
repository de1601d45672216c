//! `latest.svg`: activity step rates against the database's commit rate, and latency
//! percentiles, grouped by workload with one bar per backend.

use std::path::Path;

use anyhow::{Result, anyhow};
use plotters::prelude::*;

use crate::metric::key;
use crate::results::Report;

/// One colour per backend, in report order.
const COLOURS: [RGBColor; 4] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
];

/// Bars of one backend: its name and a value per group (NaN: not measured).
type Bars = (String, Vec<f64>);

/// Draws the chart into `path`.
pub(crate) fn write(report: &Report, path: &Path) -> Result<()> {
    let root = SVGBackend::new(path, (1100, 900)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| anyhow!("{e}"))?;
    let panels = root.split_evenly((2, 1));

    let throughput = ["linear-1", "linear-3", "linear-9", "fanout-5"];
    let mut groups: Vec<String> = throughput.iter().map(|w| (*w).to_owned()).collect();
    groups.push("DB single-row commits".to_owned());
    let bars: Vec<Bars> = measured(report)
        .map(|backend| {
            let mut values: Vec<f64> = throughput
                .iter()
                .map(|w| value(report, &backend, w, key::STEPS_PER_S))
                .collect();
            let limit = report
                .backends
                .iter()
                .find(|b| b.name == backend)
                .and_then(|b| b.limits.as_ref())
                .and_then(|limits| limits.get(key::SINGLE_ROW_COMMITS_PER_S));
            values.push(limit.unwrap_or(f64::NAN));
            (backend, values)
        })
        .collect();
    grouped(
        &panels[0],
        "Activity steps/s (median)",
        "per second",
        &groups,
        &bars,
    )?;

    let latency = [
        ("latency p50", "latency", key::P50_MS),
        ("latency p95", "latency", key::P95_MS),
        ("latency p99", "latency", key::P99_MS),
        (
            "schedule-to-start p50",
            "latency",
            key::SCHEDULE_TO_START_P50_MS,
        ),
        ("signal p50", "signals", key::P50_MS),
        ("signal p99", "signals", key::P99_MS),
    ];
    let groups: Vec<String> = latency
        .iter()
        .map(|(label, ..)| (*label).to_owned())
        .collect();
    let bars: Vec<Bars> = measured(report)
        .map(|backend| {
            let values = latency
                .iter()
                .map(|(_, w, k)| value(report, &backend, w, k))
                .collect();
            (backend, values)
        })
        .collect();
    grouped(&panels[1], "Latency (median of runs)", "ms", &groups, &bars)?;
    root.present().map_err(|e| anyhow!("{e}"))?;
    Ok(())
}

/// The names of the backends that have figures.
fn measured(report: &Report) -> impl Iterator<Item = String> + '_ {
    report
        .backends
        .iter()
        .filter(|b| b.available)
        .map(|b| b.name.clone())
}

fn value(report: &Report, backend: &str, workload: &str, key: &str) -> f64 {
    report
        .series(backend, workload)
        .and_then(|series| series.get(key))
        .unwrap_or(f64::NAN)
}

/// A bar chart with a group of bars (one per backend) per entry of `groups`.
#[allow(
    clippy::cast_precision_loss,
    reason = "chart coordinates of small counts"
)]
fn grouped(
    area: &DrawingArea<SVGBackend<'_>, plotters::coord::Shift>,
    title: &str,
    unit: &str,
    groups: &[String],
    bars: &[Bars],
) -> Result<()> {
    let top = bars
        .iter()
        .flat_map(|(_, values)| values.iter().copied())
        .filter(|v| v.is_finite())
        .fold(0.0_f64, f64::max);
    let top = if top > 0.0 { top * 1.15 } else { 1.0 };
    let n = groups.len() as f64;
    let mut chart = ChartBuilder::on(area)
        .caption(title, ("sans-serif", 22))
        .margin(15)
        .x_label_area_size(35)
        .y_label_area_size(80)
        .build_cartesian_2d(-0.5..n - 0.5, 0.0..top)
        .map_err(|e| anyhow!("{e}"))?;
    let label = |x: &f64| {
        let index = x.round();
        if (x - index).abs() > 1e-6 || index < 0.0 {
            return String::new();
        }
        #[allow(
            clippy::cast_possible_truncation,
            clippy::cast_sign_loss,
            reason = "a small non-negative whole number"
        )]
        let index = index as usize;
        groups.get(index).cloned().unwrap_or_default()
    };
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(groups.len())
        .x_label_formatter(&label)
        .y_desc(unit)
        .draw()
        .map_err(|e| anyhow!("{e}"))?;
    let width = 0.8 / bars.len().max(1) as f64;
    for (i, (backend, values)) in bars.iter().enumerate() {
        let colour = COLOURS[i % COLOURS.len()];
        let left = (i as f64).mul_add(width, -0.4);
        let rects = values
            .iter()
            .enumerate()
            .filter(|(_, v)| v.is_finite())
            .map(|(g, v)| {
                let x = g as f64 + left;
                Rectangle::new([(x, 0.0), (x + width * 0.9, *v)], colour.filled())
            });
        chart
            .draw_series(rects)
            .map_err(|e| anyhow!("{e}"))?
            .label(backend.as_str())
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 12, y + 5)], colour.filled()));
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()
        .map_err(|e| anyhow!("{e}"))?;
    Ok(())
}
