//! SVG line charts (plotters, SVG backend, no system fonts). Log axes are drawn by plotting
//! log10 of the values on a linear axis and labelling ticks with the original values.

use crate::common::{stamp_svg, BResult, BenchError, Provenance};
use plotters::coord::ranged1d::{DefaultFormatting, KeyPointHint, KeyPointWeight};
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
    /// Legend in the upper-left corner (else lower-left).
    pub legend_upper: bool,
    /// Tick positions on x in data units (else 1-2-5 steps).
    pub x_ticks: Option<Vec<f64>>,
}

/// Curve colours: tab10, then 10 further hues distinct from it (darker / lighter variants).
const COLORS: [RGBColor; 20] = [
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
    RGBColor(0, 0, 128),
    RGBColor(128, 0, 0),
    RGBColor(0, 100, 0),
    RGBColor(255, 215, 0),
    RGBColor(75, 0, 130),
    RGBColor(0, 128, 128),
    RGBColor(255, 99, 71),
    RGBColor(107, 142, 35),
    RGBColor(199, 21, 133),
    RGBColor(30, 30, 30),
];

/// Marker outlines in pixel offsets: circle (octagon), triangle, square, diamond, inverted
/// triangle.
const MARKERS: [&[(i32, i32)]; 5] = [
    &[(-1, -3), (1, -3), (3, -1), (3, 1), (1, 3), (-1, 3), (-3, 1), (-3, -1)],
    &[(0, -4), (4, 3), (-4, 3)],
    &[(-3, -3), (3, -3), (3, 3), (-3, 3)],
    &[(0, -4), (4, 0), (0, 4), (-4, 0)],
    &[(0, 4), (4, -3), (-4, -3)],
];

/// Colour and marker of curve `i`: the first 20 curves differ in colour (each also gets its own
/// marker cycle), and a curve that reuses a colour (i ≥ 20) gets a different marker than the
/// curve it shares the colour with, so every (colour, marker) pair is distinct for i < 100.
pub(crate) fn curve_style(i: usize) -> (RGBColor, &'static [(i32, i32)]) {
    let color = COLORS[i % COLORS.len()];
    let marker = MARKERS[(i + i / COLORS.len()) % MARKERS.len()];
    (color, marker)
}

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

/// A linear f64 axis with explicit bold (labelled) and light tick positions.
struct TickAxis {
    lo: f64,
    hi: f64,
    bold: Vec<f64>,
    light: Vec<f64>,
}

impl Ranged for TickAxis {
    type FormatOption = DefaultFormatting;
    type ValueType = f64;
    fn map(&self, v: &f64, limit: (i32, i32)) -> i32 {
        let r = (v - self.lo) / (self.hi - self.lo);
        (limit.0 as f64 + r * (limit.1 - limit.0) as f64).round() as i32
    }
    fn key_points<H: KeyPointHint>(&self, hint: H) -> Vec<f64> {
        match hint.weight() {
            KeyPointWeight::Bold => self.bold.clone(),
            KeyPointWeight::Any => self.bold.iter().chain(&self.light).copied().collect(),
        }
    }
    fn range(&self) -> std::ops::Range<f64> {
        self.lo..self.hi
    }
}

/// Tick values (transformed space) for an axis spanning `[lo, hi]` (transformed space).
fn ticks(log: bool, lo: f64, hi: f64, fixed: Option<&[f64]>) -> (Vec<f64>, Vec<f64>) {
    if let Some(f) = fixed {
        let t: Vec<f64> = f.iter().filter(|v| !log || **v > 0.0).map(|&v| tf(log, v)).filter(|v| *v >= lo && *v <= hi).collect();
        return (t, Vec::new());
    }
    if log {
        let (mut bold, mut light) = (Vec::new(), Vec::new());
        for k in (lo.floor() as i32 - 1)..=(hi.ceil() as i32) {
            for (m, is_bold) in [(1.0, true), (2.0, true), (5.0, true), (3.0, false), (4.0, false), (6.0, false), (7.0, false), (8.0, false), (9.0, false)] {
                let v = (m * 10f64.powi(k)).log10();
                if v >= lo && v <= hi {
                    if is_bold {
                        bold.push(v)
                    } else {
                        light.push(v)
                    }
                }
            }
        }
        // Too many labels on a wide range: keep the decades only.
        if bold.len() > 10 {
            bold.retain(|v| (v - v.round()).abs() < 1e-9);
        }
        bold.sort_by(f64::total_cmp);
        return (bold, light);
    }
    let span = (hi - lo).max(1e-12);
    let raw = span / 6.0;
    let mag = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 2.5, 5.0, 10.0].iter().map(|m| m * mag).find(|s| span / s <= 8.0).unwrap_or(10.0 * mag);
    let first = (lo / step).ceil() as i64;
    let last = (hi / step).floor() as i64;
    let bold = (first..=last).map(|i| i as f64 * step).collect();
    let light = ((lo / step * 5.0).ceil() as i64..=(hi / step * 5.0).floor() as i64).map(|i| i as f64 * step / 5.0).collect();
    (bold, light)
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
    let xt = ticks(p.log_x, x0, x1, p.x_ticks.as_deref());
    let yt = ticks(p.log_y, y0, y1, None);
    let mut chart = ChartBuilder::on(area)
        .caption(&p.title, ("sans-serif", 16))
        .margin(12)
        .x_label_area_size(42)
        .y_label_area_size(62)
        .build_cartesian_2d(TickAxis { lo: x0, hi: x1, bold: xt.0, light: xt.1 }, TickAxis { lo: y0, hi: y1, bold: yt.0, light: yt.1 })
        .map_err(err(path))?;
    let (lx, ly) = (p.log_x, p.log_y);
    let xf = move |v: &f64| fmt_tick(lx, *v);
    let yf = move |v: &f64| fmt_tick(ly, *v);
    chart
        .configure_mesh()
        .x_desc(p.x_label.as_str())
        .y_desc(p.y_label.as_str())
        .x_label_formatter(&xf)
        .y_label_formatter(&yf)
        .light_line_style(RGBColor(235, 235, 235))
        .draw()
        .map_err(err(path))?;
    for (i, s) in p.series.iter().enumerate() {
        let (color, marker) = curve_style(i);
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
            .legend(move |(x, y)| {
                EmptyElement::at((x, y))
                    + PathElement::new(vec![(0, 0), (18, 0)], color.stroke_width(2))
                    + Polygon::new(marker.iter().map(|&(dx, dy)| (dx + 9, dy)).collect::<Vec<_>>(), color.filled())
            });
        chart
            .draw_series(pts.iter().map(|&q| EmptyElement::at(q) + Polygon::new(marker.to_vec(), color.filled())))
            .map_err(err(path))?;
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
            .position(if p.legend_upper { SeriesLabelPosition::UpperLeft } else { SeriesLabelPosition::LowerLeft })
            .background_style(WHITE.mix(0.85))
            .border_style(RGBColor(160, 160, 160))
            .label_font(("sans-serif", 12))
            .draw()
            .map_err(err(path))?;
    }
    Ok(())
}
