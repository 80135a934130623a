//! PNG plots of benchmark summaries (plotters, bitmap backend).

use std::path::Path;

use anyhow::{Context, Result, anyhow};
use plotters::prelude::*;
use plotters::style::FontStyle;

use crate::bench::{Mode, State, Summary};

const FONT: &str = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf";

fn register_font() -> Result<()> {
    let bytes = std::fs::read(FONT).with_context(|| {
        format!("{FONT} (package fonts-dejavu-core; cargo xtask setup installs it)")
    })?;
    let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
    plotters::style::register_font("sans-serif", FontStyle::Normal, bytes)
        .map_err(|_| anyhow!("{FONT} is not a usable font"))
}

/// A number with as many decimals as its size needs (axes and tables).
pub fn label(v: f64) -> String {
    if v >= 10.0 {
        format!("{v:.0}")
    } else if v >= 1.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.3}")
    }
}

fn color(m: Mode) -> RGBColor {
    match m {
        Mode::Direct => BLACK,
        Mode::Skiff => RGBColor(0, 114, 178),
        Mode::Iptables => RGBColor(213, 94, 0),
        Mode::Nftables => RGBColor(0, 158, 115),
    }
}

/// One line with points per mode, and the legend.
fn draw_modes<'a, DB, X, Y>(
    chart: &mut ChartContext<'a, DB, Cartesian2d<X, Y>>,
    series: &[(Mode, Vec<(f64, f64)>)],
    legend: SeriesLabelPosition,
) -> Result<()>
where
    DB: DrawingBackend + 'a,
    X: Ranged<ValueType = f64>,
    Y: Ranged<ValueType = f64>,
{
    let named: Vec<Series<'_>> = series
        .iter()
        .filter(|(_, pts)| !pts.is_empty())
        .map(|(mode, pts)| (mode.name(), color(*mode), pts.clone()))
        .collect();
    draw_named(chart, &named, legend)
}

/// Left: fresh-state connection rate against the number of services.
/// Right: time to program all services from cold.
pub fn proxy(summary: &[Summary], path: &Path) -> Result<()> {
    register_font()?;
    let fresh: Vec<&Summary> = summary.iter().filter(|s| s.state == State::Fresh).collect();
    let max_n = fresh.iter().map(|s| s.services).max().unwrap_or(1).max(10) as f64;
    let max_rate = fresh.iter().map(|s| s.rate).fold(1.0, f64::max) * 1.1;
    let prog: Vec<&&Summary> = fresh.iter().filter(|s| s.program_ms.is_some()).collect();
    let max_prog = prog.iter().filter_map(|s| s.program_ms).fold(1.0, f64::max) * 2.0;
    let min_prog = prog
        .iter()
        .filter_map(|s| s.program_ms)
        .fold(f64::INFINITY, f64::min)
        .clamp(0.001, 1.0)
        / 2.0;

    let root = BitMapBackend::new(path, (1400, 560)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| anyhow!("{e}"))?;
    let (left, right) = root.split_horizontally(700);

    let mut chart = ChartBuilder::on(&left)
        .caption(
            "TCP connect + request/response (fresh state)",
            ("sans-serif", 20),
        )
        .margin(15)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d((0.5f64..max_n * 2.0).log_scale(), 0f64..max_rate)
        .map_err(|e| anyhow!("{e}"))?;
    chart
        .configure_mesh()
        .x_desc("services (2 endpoints each)")
        .y_desc("connections / s")
        .light_line_style(WHITE)
        .x_label_formatter(&|v| label(*v))
        .y_label_formatter(&|v| label(*v))
        .draw()
        .map_err(|e| anyhow!("{e}"))?;
    let series: Vec<(Mode, Vec<(f64, f64)>)> = Mode::ALL
        .into_iter()
        .map(|mode| {
            let pts = fresh
                .iter()
                .filter(|s| s.mode == mode)
                .map(|s| (s.services as f64, s.rate))
                .collect();
            (mode, pts)
        })
        .collect();
    draw_modes(&mut chart, &series, SeriesLabelPosition::LowerLeft)?;

    let mut chart = ChartBuilder::on(&right)
        .caption("programming all services from cold", ("sans-serif", 20))
        .margin(15)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d(
            (0.5f64..max_n * 2.0).log_scale(),
            (min_prog..max_prog).log_scale(),
        )
        .map_err(|e| anyhow!("{e}"))?;
    chart
        .configure_mesh()
        .x_desc("services")
        .y_desc("milliseconds")
        .light_line_style(WHITE)
        .x_label_formatter(&|v| label(*v))
        .y_label_formatter(&|v| label(*v))
        .draw()
        .map_err(|e| anyhow!("{e}"))?;
    let series: Vec<(Mode, Vec<(f64, f64)>)> = [Mode::Skiff, Mode::Iptables, Mode::Nftables]
        .into_iter()
        .map(|mode| {
            let pts = prog
                .iter()
                .filter(|s| s.mode == mode)
                .filter_map(|s| s.program_ms.map(|p| (s.services as f64, p)))
                .collect();
            (mode, pts)
        })
        .collect();
    draw_modes(&mut chart, &series, SeriesLabelPosition::UpperLeft)?;
    root.present().map_err(|e| anyhow!("{e}"))?;
    Ok(())
}

/// A named, coloured line of points.
type Series<'a> = (&'a str, RGBColor, Vec<(f64, f64)>);

/// Lines with points and a legend, one colour per named series.
fn draw_named<'a, DB, X, Y>(
    chart: &mut ChartContext<'a, DB, Cartesian2d<X, Y>>,
    series: &[Series<'_>],
    legend: SeriesLabelPosition,
) -> Result<()>
where
    DB: DrawingBackend + 'a,
    X: Ranged<ValueType = f64>,
    Y: Ranged<ValueType = f64>,
{
    for (name, c, pts) in series {
        let c = *c;
        chart
            .draw_series(LineSeries::new(pts.clone(), c.stroke_width(2)))
            .map_err(|e| anyhow!("{e}"))?
            .label(*name)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], c.stroke_width(2)));
        chart
            .draw_series(pts.iter().map(|p| Circle::new(*p, 4, c.filled())))
            .map_err(|e| anyhow!("{e}"))?;
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .position(legend)
        .draw()
        .map_err(|e| anyhow!("{e}"))?;
    Ok(())
}

/// Left: scheduler throughput against the number of nodes. Right: p50
/// latencies against the number of pods, beside etcd's.
pub fn control(doc: &serde_json::Value, path: &Path) -> Result<()> {
    register_font()?;
    let get = |v: &serde_json::Value, p: &str| {
        v.pointer(p)
            .and_then(serde_json::Value::as_f64)
            .unwrap_or(0.0)
    };
    let sched: Vec<(f64, f64)> = doc["scheduler"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|s| (get(s, "/nodes"), get(s, "/pods_per_s")))
        .collect();
    let lat = doc["latency"].as_array().cloned().unwrap_or_default();
    let root = BitMapBackend::new(path, (1400, 560)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| anyhow!("{e}"))?;
    let (left, right) = root.split_horizontally(700);

    let max_nodes = sched.iter().map(|p| p.0).fold(10.0, f64::max) * 2.0;
    let max_rate = sched.iter().map(|p| p.1).fold(1.0, f64::max) * 1.2;
    let mut chart = ChartBuilder::on(&left)
        .caption("scheduler throughput", ("sans-serif", 20))
        .margin(15)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d((50f64..max_nodes).log_scale(), 0f64..max_rate)
        .map_err(|e| anyhow!("{e}"))?;
    chart
        .configure_mesh()
        .x_desc("nodes")
        .y_desc("pods bound / s")
        .light_line_style(WHITE)
        .x_label_formatter(&|v| label(*v))
        .y_label_formatter(&|v| label(*v))
        .draw()
        .map_err(|e| anyhow!("{e}"))?;
    draw_named(
        &mut chart,
        &[("skiff-control", RGBColor(0, 114, 178), sched)],
        SeriesLabelPosition::UpperLeft,
    )?;

    let pts = |field: &str| -> Vec<(f64, f64)> {
        lat.iter()
            .map(|l| {
                (
                    get(l, "/pods"),
                    get(l, &format!("/{field}/p50_ms")).max(0.01),
                )
            })
            .collect()
    };
    let series = [
        ("create", RGBColor(0, 114, 178), pts("create")),
        ("watch event", RGBColor(0, 158, 115), pts("watch")),
        ("list all", RGBColor(213, 94, 0), pts("list")),
        ("etcd put (limit)", BLACK, pts("etcd_put")),
        (
            "etcd range (limit)",
            RGBColor(120, 120, 120),
            pts("etcd_range"),
        ),
    ];
    let max_pods = lat.iter().map(|l| get(l, "/pods")).fold(10.0, f64::max) * 2.0;
    let max_ms = series
        .iter()
        .flat_map(|s| s.2.iter().map(|p| p.1))
        .fold(1.0, f64::max)
        * 3.0;
    let mut chart = ChartBuilder::on(&right)
        .caption("API latency (p50)", ("sans-serif", 20))
        .margin(15)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d(
            (100f64..max_pods).log_scale(),
            (0.01f64..max_ms).log_scale(),
        )
        .map_err(|e| anyhow!("{e}"))?;
    chart
        .configure_mesh()
        .x_desc("pods stored")
        .y_desc("milliseconds")
        .light_line_style(WHITE)
        .x_label_formatter(&|v| label(*v))
        .y_label_formatter(&|v| label(*v))
        .draw()
        .map_err(|e| anyhow!("{e}"))?;
    draw_named(&mut chart, &series, SeriesLabelPosition::UpperLeft)?;
    root.present().map_err(|e| anyhow!("{e}"))?;
    Ok(())
}
