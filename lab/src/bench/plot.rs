//! PNG plots of benchmark summaries (plotters, bitmap backend).

use std::path::Path;

use anyhow::{Context, Result, anyhow};
use plotters::coord::ranged1d::{AsRangedCoord, ValueFormatter};
use plotters::prelude::*;
use plotters::style::FontStyle;

const FONT: &str = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf";

pub(super) fn register_font() -> Result<()> {
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

/// A named, coloured line of points.
pub(super) type Panel<'a, DB, X, Y> = ChartContext<'a, DB, Cartesian2d<X, Y>>;

/// One chart on `area`: a caption, f64 axes (linear or log) with their
/// descriptions, and the mesh drawn the same way for every plot.
pub(super) fn panel<'a, DB, XR, YR>(
    area: &'a DrawingArea<DB, plotters::coord::Shift>,
    caption: &str,
    (x, x_desc): (XR, &str),
    (y, y_desc): (YR, &str),
) -> Result<Panel<'a, DB, XR::CoordDescType, YR::CoordDescType>>
where
    DB: DrawingBackend + 'a,
    XR: AsRangedCoord<Value = f64>,
    YR: AsRangedCoord<Value = f64>,
    XR::CoordDescType: Ranged<ValueType = f64> + ValueFormatter<f64>,
    YR::CoordDescType: Ranged<ValueType = f64> + ValueFormatter<f64>,
{
    let mut chart = ChartBuilder::on(area)
        .caption(caption, ("sans-serif", 20))
        .margin(15)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d(x, y)
        .map_err(|e| anyhow!("{e}"))?;
    chart
        .configure_mesh()
        .x_desc(x_desc)
        .y_desc(y_desc)
        .light_line_style(WHITE)
        .x_label_formatter(&|v| label(*v))
        .y_label_formatter(&|v| label(*v))
        .draw()
        .map_err(|e| anyhow!("{e}"))?;
    Ok(chart)
}

pub(super) type Series<'a> = (&'a str, RGBColor, Vec<(f64, f64)>);

/// Lines with points and a legend, one colour per named series.
pub(super) fn draw_named<'a, DB, X, Y>(
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

/// The numbers of a JSON array (others skipped).
fn nums(v: &serde_json::Value) -> Vec<f64> {
    v.as_array()
        .into_iter()
        .flatten()
        .filter_map(serde_json::Value::as_f64)
        .collect()
}

/// Sorted samples as a percentile curve: (percentile, value).
fn percentiles(sorted: Vec<f64>) -> Vec<(f64, f64)> {
    let n = sorted.len().max(2) as f64 - 1.0;
    sorted
        .into_iter()
        .enumerate()
        .map(|(i, v)| (i as f64 * 100.0 / n, v))
        .collect()
}

/// The largest value any series reaches (at least 1).
fn max_y(series: &[Series<'_>]) -> f64 {
    series
        .iter()
        .flat_map(|s| s.2.iter().map(|p| p.1))
        .fold(1.0, f64::max)
}

/// Latency by percentile: one line per series, milliseconds from zero.
fn percentile_panel<DB: DrawingBackend>(
    area: &DrawingArea<DB, plotters::coord::Shift>,
    title: &str,
    series: &[Series<'_>],
) -> Result<()> {
    let mut chart = panel(
        area,
        title,
        (0f64..100f64, "percentile"),
        (0f64..max_y(series) * 1.2, "milliseconds"),
    )?;
    draw_named(&mut chart, series, SeriesLabelPosition::UpperLeft)
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
    let mut chart = panel(
        &left,
        "scheduler throughput",
        ((50f64..max_nodes).log_scale(), "nodes"),
        (0f64..max_rate, "pods bound / s"),
    )?;
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
    let max_ms = max_y(&series) * 3.0;
    let mut chart = panel(
        &right,
        "API latency (p50)",
        ((100f64..max_pods).log_scale(), "pods stored"),
        ((0.01f64..max_ms).log_scale(), "milliseconds"),
    )?;
    draw_named(&mut chart, &series, SeriesLabelPosition::UpperLeft)?;
    root.present().map_err(|e| anyhow!("{e}"))?;
    Ok(())
}

/// Left: throughput per round for each path. Middle: CNI ADD latency by
/// percentile, ours and the reference plugins'. Right: time until a node
/// routes to every lease, against the number of leases.
pub fn net(doc: &serde_json::Value, path: &Path) -> Result<()> {
    register_font()?;
    let root = BitMapBackend::new(path, (1500, 500)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| anyhow!("{e}"))?;
    let panels = root.split_evenly((1, 3));
    let blue = RGBColor(0, 114, 178);
    let orange = RGBColor(213, 94, 0);
    let green = RGBColor(0, 158, 115);
    let samples = &doc["throughput"]["samples"];
    let per_round = |k: &str| -> Vec<(f64, f64)> {
        nums(&samples[k])
            .into_iter()
            .enumerate()
            .map(|(i, g)| ((i + 1) as f64, g))
            .collect()
    };
    let tp = [
        ("node ↔ node (limit)", BLACK, per_round("node")),
        ("pod ↔ pod host-gw", green, per_round("host-gw")),
        (
            "pod ↔ pod host-gw, kernel only",
            RED,
            per_round("host-gw-kernel"),
        ),
        ("pod ↔ pod vxlan", blue, per_round("vxlan")),
        (
            "pod ↔ pod vxlan, kernel only",
            orange,
            per_round("vxlan-kernel"),
        ),
    ];
    let rounds = tp.iter().map(|s| s.2.len()).max().unwrap_or(1) as f64;
    let max_g = max_y(&tp) * 1.3;
    let mut chart = panel(
        &panels[0],
        "TCP throughput (iperf3)",
        (0.5f64..rounds + 0.5, "round"),
        (0f64..max_g, "Gbit/s"),
    )?;
    draw_named(&mut chart, &tp, SeriesLabelPosition::LowerRight)?;

    let cdf = |k: &str| percentiles(nums(&doc["cni"][k]["add_samples"]));
    let lat = [
        ("skiff-cni ADD", blue, cdf("skiff-cni")),
        (
            "bridge + host-local ADD",
            orange,
            cdf("bridge + host-local"),
        ),
    ];
    percentile_panel(&panels[1], "CNI ADD latency", &lat)?;

    let conv = doc["convergence"].as_array().cloned().unwrap_or_default();
    let pts = |p: &str| -> Vec<(f64, f64)> {
        conv.iter()
            .map(|c| {
                (
                    c["leases"].as_f64().unwrap_or(1.0),
                    c.pointer(p)
                        .and_then(serde_json::Value::as_f64)
                        .unwrap_or(0.0)
                        .max(0.1),
                )
            })
            .collect()
    };
    let series = [
        (
            "all routes, from the first write",
            blue,
            pts("/total_ms/p50"),
        ),
        ("etcd writes alone", BLACK, pts("/write_ms/p50")),
        (
            "after the last write",
            green,
            pts("/after_last_write_ms/p50"),
        ),
    ];
    let max_n = conv
        .iter()
        .filter_map(|c| c["leases"].as_f64())
        .fold(10.0, f64::max)
        * 2.0;
    let max_ms = max_y(&series) * 3.0;
    let mut chart = panel(
        &panels[2],
        "lease convergence (one node)",
        ((50f64..max_n).log_scale(), "leases"),
        ((0.1f64..max_ms).log_scale(), "milliseconds"),
    )?;
    draw_named(&mut chart, &series, SeriesLabelPosition::UpperLeft)?;
    root.present().map_err(|e| anyhow!("{e}"))?;
    Ok(())
}

/// Left: single pod start, per percentile. Middle: the same for pods in
/// batches. Right: container exit to containerd's event and to the API.
pub fn kubelet(doc: &serde_json::Value, path: &Path) -> Result<()> {
    register_font()?;
    let root = BitMapBackend::new(path, (1500, 500)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| anyhow!("{e}"))?;
    let panels = root.split_evenly((1, 3));
    let palette = [
        (RGBColor(0, 114, 178), RGBColor(86, 180, 233)),
        (RGBColor(213, 94, 0), RGBColor(230, 159, 0)),
    ];
    let curve = |v: &serde_json::Value| percentiles(nums(v));
    let runtimes: Vec<String> = doc["args"]["runtimes"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|r| r.as_str().map(String::from))
        .collect();
    let names: Vec<(String, String)> = runtimes
        .iter()
        .map(|rt| (format!("kubelet Ready, {rt}"), format!("ctr run, {rt}")))
        .collect();
    for (i, (case, title)) in [
        ("single", "pod start, one at a time"),
        ("batch", "pod start, in a batch"),
    ]
    .into_iter()
    .enumerate()
    {
        let mut series: Vec<Series<'_>> = Vec::new();
        for (j, rt) in runtimes.iter().enumerate() {
            let (dark, light) = palette[j % palette.len()];
            let s = &doc["start"][rt][case]["samples"];
            series.push((&names[j].0, dark, curve(&s["skiff_ready"])));
            series.push((&names[j].1, light, curve(&s["ctr"])));
        }
        percentile_panel(&panels[i], title, &series)?;
    }
    let exit_names: Vec<(String, String)> = runtimes
        .iter()
        .map(|rt| {
            (
                format!("pod status in the API, {rt}"),
                format!("containerd event, {rt}"),
            )
        })
        .collect();
    let mut series: Vec<Series<'_>> = Vec::new();
    for (j, rt) in runtimes.iter().enumerate() {
        let (dark, light) = palette[j % palette.len()];
        let s = &doc["exit"][rt]["samples"];
        series.push((&exit_names[j].0, dark, curve(&s["api"])));
        series.push((&exit_names[j].1, light, curve(&s["containerd_event"])));
    }
    percentile_panel(&panels[2], "container exit → status", &series)?;
    root.present().map_err(|e| anyhow!("{e}"))?;
    Ok(())
}

/// `bench dns`: queries per second by mix, the dns role beside unbound.
pub fn dns(doc: &serde_json::Value, path: &Path) -> Result<()> {
    let rows: Vec<&serde_json::Value> = doc["summary"].as_array().into_iter().flatten().collect();
    let qps = |k: &str| -> Vec<f64> { rows.iter().map(|r| r[k].as_f64().unwrap_or(0.0)).collect() };
    let mixes: Vec<String> = rows
        .iter()
        .enumerate()
        .map(|(i, r)| format!("{i}: {}", r["mix"].as_str().unwrap_or("?")))
        .collect();
    paired_bars(
        path,
        "DNS queries per second (dnsperf), same zone",
        &format!("mix ({})", mixes.join(", ")),
        "queries/s",
        [
            ("skiff dns role", qps("skiff_qps")),
            ("unbound", qps("unbound_qps")),
        ],
    )
}

/// One chart of two bars per group (Skiff's, then the baseline's), the
/// groups numbered from 0 as `x_desc` explains.
pub fn paired_bars(
    path: &Path,
    caption: &str,
    x_desc: &str,
    y_desc: &str,
    series: [(&str, Vec<f64>); 2],
) -> Result<()> {
    register_font()?;
    let root = BitMapBackend::new(path, (900, 500)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| anyhow!("{e}"))?;
    let groups = series[0].1.len().max(series[1].1.len());
    let top = series
        .iter()
        .flat_map(|(_, v)| v.iter().copied())
        .fold(1.0, f64::max)
        * 1.25;
    let mut chart = panel(
        &root,
        caption,
        (0f64..groups.max(1) as f64, x_desc),
        (0f64..top, y_desc),
    )?;
    let blue = RGBColor(0, 114, 178);
    let orange = RGBColor(213, 94, 0);
    for ((name, values), (color, from, to)) in
        series.iter().zip([(blue, 0.1, 0.45), (orange, 0.55, 0.9)])
    {
        chart
            .draw_series(values.iter().enumerate().map(|(i, v)| {
                let x = i as f64;
                Rectangle::new([(x + from, 0.0), (x + to, *v)], color.filled())
            }))
            .map_err(|e| anyhow!("{e}"))?
            .label(*name)
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 15, y + 5)], color.filled()));
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .position(SeriesLabelPosition::UpperRight)
        .draw()
        .map_err(|e| anyhow!("{e}"))?;
    root.present().map_err(|e| anyhow!("{e}"))?;
    Ok(())
}
