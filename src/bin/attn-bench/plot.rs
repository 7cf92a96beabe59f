//! SVG line charts (plotters, SVG backend, no system fonts). Log axes are drawn by plotting
//! log10 of the values on a linear axis and labelling ticks with the original values.

use crate::common::{stamp_svg, BResult, BenchError, Provenance};
use plotters::prelude::*;
use std::path::Path;

/// One curve: points (x, y) in data units and an optional label per point.
#[derive(Clone, Debug)]
pub struct Series {
    pub name: String,
    pub points: Vec<(f64, f64)>,
    pub labels: Vec<String>,
    /// Dashed-looking thin line (reference curves).
    pub thin: bool,
}

#[derive(Clone, Debug)]
pub struct Panel {
    pub title: String,
    pub x_label: String,
    pub y_label: String,
    pub log_x: bool,
    pub log_y: bool,
    /// Fixed ranges in data units (else from the data, padded).
    pub x_range: Option<(f64, f64)>,
    pub y_range: Option<(f64, f64)>,
    pub series: Vec<Series>,
    pub legend_upper: bool,
}

const COLORS: [RGBColor; 10] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
    RGBColor(188, 189, 34),
    RGBColor(23, 190, 207),
];

fn tf(log: bool, v: f64) -> f64 {
    if log {
        v.log10()
    } else {
        v
    }
}

fn fmt_tick(log: bool, v: f64) -> String {
    let x = if log { 10f64.powf(v) } else { v };
    let a = x.abs();
    if a == 0.0 {
        "0".into()
    } else if !(1e-3..1e5).contains(&a) {
        format!("{x:.1e}")
    } else if a >= 100.0 {
        format!("{x:.0}")
    } else if a >= 10.0 {
        format!("{:.1}", x).trim_end_matches('0').trim_end_matches('.').to_string()
    } else {
        let s = format!("{x:.3}");
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    }
}

fn range(log: bool, fixed: Option<(f64, f64)>, values: impl Iterator<Item = f64>) -> (f64, f64) {
    if let Some((a, b)) = fixed {
        return (tf(log, a), tf(log, b));
    }
    let vals: Vec<f64> = values.filter(|v| v.is_finite() && (!log || *v > 0.0)).map(|v| tf(log, v)).collect();
    let (lo, hi) = vals.iter().fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), &v| (a.min(v), b.max(v)));
    if !lo.is_finite() {
        return (0.0, 1.0);
    }
    let span = if hi > lo { hi - lo } else if log { 1.0 } else { lo.abs().max(1.0) };
    (lo - 0.06 * span, hi + 0.06 * span)
}

fn err<E: std::fmt::Debug>(path: &Path) -> impl Fn(E) -> BenchError + '_ {
    move |e| BenchError::runtime(format!("drawing `{}`: {e:?}", path.display()))
}

/// Draws `panels` side by side (`cols` per row) under `title` into an SVG file and stamps the
/// provenance into it.
pub fn draw(path: &Path, title: &str, subtitle: &str, panels: &[Panel], cols: usize, prov: &Provenance) -> BResult<()> {
    let cols = cols.max(1).min(panels.len().max(1));
    let rows = panels.len().div_ceil(cols).max(1);
    let size = (560 * cols as u32, 440 * rows as u32 + 60);
    {
        let root = SVGBackend::new(path, size).into_drawing_area();
        root.fill(&WHITE).map_err(err(path))?;
        let (top, body) = root.split_vertically(60);
        top.draw(&Text::new(title.to_string(), (12, 8), ("sans-serif", 20).into_font().color(&BLACK))).map_err(err(path))?;
        top.draw(&Text::new(subtitle.to_string(), (12, 36), ("sans-serif", 13).into_font().color(&RGBColor(90, 90, 90)))).map_err(err(path))?;
        let areas = body.split_evenly((rows, cols));
        for (panel, area) in panels.iter().zip(areas.iter()) {
            draw_panel(path, area, panel)?;
        }
        root.present().map_err(err(path))?;
    }
    stamp_svg(path, prov)
}

fn draw_panel<DB: DrawingBackend>(path: &Path, area: &DrawingArea<DB, plotters::coord::Shift>, p: &Panel) -> BResult<()>
where
    DB::ErrorType: 'static,
{
    let (x0, x1) = range(p.log_x, p.x_range, p.series.iter().flat_map(|s| s.points.iter().map(|q| q.0)));
    let (y0, y1) = range(p.log_y, p.y_range, p.series.iter().flat_map(|s| s.points.iter().map(|q| q.1)));
    let mut chart = ChartBuilder::on(area)
        .caption(&p.title, ("sans-serif", 16))
        .margin(12)
        .x_label_area_size(42)
        .y_label_area_size(62)
        .build_cartesian_2d(x0..x1, y0..y1)
        .map_err(err(path))?;
    let (lx, ly) = (p.log_x, p.log_y);
    let xf = move |v: &f64| fmt_tick(lx, *v);
    let yf = move |v: &f64| fmt_tick(ly, *v);
    chart
        .configure_mesh()
        .x_desc(p.x_label.as_str())
        .y_desc(p.y_label.as_str())
        .x_labels(8)
        .y_labels(8)
        .x_label_formatter(&xf)
        .y_label_formatter(&yf)
        .light_line_style(RGBColor(235, 235, 235))
        .draw()
        .map_err(err(path))?;
    for (i, s) in p.series.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        let pts: Vec<(f64, f64)> = s
            .points
            .iter()
            .filter(|(x, y)| x.is_finite() && y.is_finite() && (!lx || *x > 0.0) && (!ly || *y > 0.0))
            .map(|&(x, y)| (tf(lx, x), tf(ly, y)))
            .collect();
        if pts.is_empty() {
            continue;
        }
        let width = if s.thin { 1 } else { 2 };
        chart
            .draw_series(LineSeries::new(pts.clone(), color.stroke_width(width)))
            .map_err(err(path))?
            .label(s.name.clone())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(2)));
        chart.draw_series(pts.iter().map(|&q| Circle::new(q, 3, color.filled()))).map_err(err(path))?;
        let labelled: Vec<((f64, f64), String)> = s
            .points
            .iter()
            .zip(s.labels.iter())
            .filter(|((x, y), _)| x.is_finite() && y.is_finite() && (!lx || *x > 0.0) && (!ly || *y > 0.0))
            .map(|(&(x, y), l)| ((tf(lx, x), tf(ly, y)), l.clone()))
            .collect();
        chart
            .draw_series(labelled.into_iter().map(|(q, l)| Text::new(l, q, ("sans-serif", 10).into_font().color(&color))))
            .map_err(err(path))?;
    }
    if p.series.iter().any(|s| !s.points.is_empty()) {
        chart
            .configure_series_labels()
            .position(if p.legend_upper { SeriesLabelPosition::UpperLeft } else { SeriesLabelPosition::LowerRight })
            .background_style(WHITE.mix(0.85))
            .border_style(RGBColor(160, 160, 160))
            .label_font(("sans-serif", 12))
            .draw()
            .map_err(err(path))?;
    }
    Ok(())
}
