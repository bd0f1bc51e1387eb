//! Hand-written SVG charts for the report: lines with markers over numeric axes, and grouped bars. No fonts or
//! scripts are referenced, so each file renders on its own and inline in the HTML page.

/// One named series of (x, y) points, drawn in order.
#[derive(Debug, Clone)]
pub struct Series {
    pub name: String,
    pub points: Vec<(f64, f64)>,
    /// Dashed line (e.g. a density beside its recall).
    pub dashed: bool,
    /// Markers only, no connecting line.
    pub markers_only: bool,
}

const COLORS: [&str; 10] = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf"];

/// The color of the i-th series (cycled).
pub fn color(i: usize) -> &'static str {
    COLORS[i % COLORS.len()]
}

pub fn esc(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

/// A "nice" axis over [lo, hi]: rounded bounds and ~5 ticks.
fn axis(lo: f64, hi: f64) -> (f64, f64, Vec<f64>) {
    let (mut lo, mut hi) = if lo.is_finite() && hi.is_finite() { (lo, hi) } else { (0.0, 1.0) };
    if hi - lo < 1e-12 {
        let pad = if lo.abs() > 1e-12 { lo.abs() * 0.1 } else { 0.5 };
        lo -= pad;
        hi += pad;
    }
    let raw = (hi - lo) / 5.0;
    let mag = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 2.5, 5.0, 10.0].iter().map(|m| m * mag).find(|s| *s >= raw).unwrap_or(10.0 * mag);
    let a = (lo / step).floor() * step;
    let b = (hi / step).ceil() * step;
    let n = ((b - a) / step).round() as usize;
    let ticks = (0..=n).map(|i| a + step * i as f64).collect();
    (a, b, ticks)
}

fn fmt_tick(v: f64) -> String {
    if v == 0.0 {
        return "0".into();
    }
    let a = v.abs();
    if a >= 1000.0 {
        format!("{v:.0}")
    } else if a >= 10.0 {
        format!("{v:.1}").trim_end_matches(".0").to_string()
    } else {
        let s = format!("{v:.3}");
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    }
}

const W: f64 = 760.0;
const H: f64 = 400.0;
const LEFT: f64 = 70.0;
const RIGHT: f64 = 200.0;
const TOP: f64 = 36.0;
const BOTTOM: f64 = 52.0;

fn frame(title: &str, xlabel: &str, ylabel: &str) -> String {
    format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{W}\" height=\"{H}\" viewBox=\"0 0 {W} {H}\" font-family=\"sans-serif\" font-size=\"12\">\n\
         <rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n\
         <text x=\"{LEFT}\" y=\"20\" font-size=\"14\">{}</text>\n\
         <text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{}</text>\n\
         <text transform=\"translate(16,{:.1}) rotate(-90)\" text-anchor=\"middle\">{}</text>\n",
        esc(title),
        LEFT + (W - LEFT - RIGHT) / 2.0,
        H - 10.0,
        esc(xlabel),
        TOP + (H - TOP - BOTTOM) / 2.0,
        esc(ylabel)
    )
}

/// Horizontal grid lines with their tick labels at `ticks`, `y` mapping a value to its pixel row.
fn y_grid(s: &mut String, ticks: &[f64], y: impl Fn(f64) -> f64) {
    let pw = W - LEFT - RIGHT;
    for &t in ticks {
        s.push_str(&format!(
            "<line x1=\"{LEFT}\" x2=\"{:.1}\" y1=\"{:.1}\" y2=\"{:.1}\" stroke=\"#ddd\"/><text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\">{}</text>\n",
            LEFT + pw,
            y(t),
            y(t),
            LEFT - 6.0,
            y(t) + 4.0,
            fmt_tick(t)
        ));
    }
}

/// Lines (or markers) over numeric x and y axes, with a legend on the right.
pub fn lines(title: &str, xlabel: &str, ylabel: &str, series: &[Series]) -> String {
    let pw = W - LEFT - RIGHT;
    let ph = H - TOP - BOTTOM;
    let pts = series.iter().flat_map(|s| s.points.iter());
    let (xl, xh) = pts.clone().fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), p| (a.min(p.0), b.max(p.0)));
    let (yl, yh) = pts.fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), p| (a.min(p.1), b.max(p.1)));
    let (x0, x1, xt) = axis(xl, xh);
    let (y0, y1, yt) = axis(yl, yh);
    let x = |v: f64| LEFT + pw * (v - x0) / (x1 - x0);
    let y = |v: f64| TOP + ph * (1.0 - (v - y0) / (y1 - y0));
    let mut s = frame(title, xlabel, ylabel);
    y_grid(&mut s, &yt, y);
    for &t in &xt {
        s += &format!(
            "<line x1=\"{:.1}\" x2=\"{:.1}\" y1=\"{TOP}\" y2=\"{:.1}\" stroke=\"#f0f0f0\"/><text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{}</text>\n",
            x(t),
            x(t),
            TOP + ph,
            x(t),
            TOP + ph + 16.0,
            fmt_tick(t)
        );
    }
    s += &format!("<rect x=\"{LEFT}\" y=\"{TOP}\" width=\"{pw}\" height=\"{ph}\" fill=\"none\" stroke=\"#888\"/>\n");
    for (i, se) in series.iter().enumerate() {
        let c = color(i);
        if !se.markers_only && se.points.len() > 1 {
            let path: Vec<String> = se.points.iter().map(|p| format!("{:.1},{:.1}", x(p.0), y(p.1))).collect();
            let dash = if se.dashed { " stroke-dasharray=\"6,4\"" } else { "" };
            s += &format!("<polyline points=\"{}\" fill=\"none\" stroke=\"{c}\" stroke-width=\"2\"{dash}/>\n", path.join(" "));
        }
        for p in &se.points {
            s += &format!("<circle cx=\"{:.1}\" cy=\"{:.1}\" r=\"3.5\" fill=\"{c}\"/>\n", x(p.0), y(p.1));
        }
        let ly = TOP + 10.0 + 18.0 * i as f64;
        let dash = if se.dashed { " stroke-dasharray=\"6,4\"" } else { "" };
        s += &format!(
            "<line x1=\"{:.1}\" x2=\"{:.1}\" y1=\"{ly:.1}\" y2=\"{ly:.1}\" stroke=\"{c}\" stroke-width=\"2\"{dash}/><text x=\"{:.1}\" y=\"{:.1}\">{}</text>\n",
            W - RIGHT + 14.0,
            W - RIGHT + 38.0,
            W - RIGHT + 44.0,
            ly + 4.0,
            esc(&se.name)
        );
    }
    s += "</svg>\n";
    s
}

/// Grouped bars: one group per label, one bar per series value (`None` leaves a gap), values above the bars.
pub fn bars(title: &str, ylabel: &str, labels: &[String], series_names: &[&str], values: &[Vec<Option<f64>>]) -> String {
    let pw = W - LEFT - RIGHT;
    let ph = H - TOP - BOTTOM;
    let hi = values.iter().flatten().flatten().fold(0.0f64, |a, &b| a.max(b));
    let (_, y1, yt) = axis(0.0, hi.max(1e-9));
    let y = |v: f64| TOP + ph * (1.0 - v / y1);
    let mut s = frame(title, "", ylabel);
    y_grid(&mut s, &yt, y);
    let groups = labels.len().max(1) as f64;
    let gw = pw / groups;
    let nb = series_names.len().max(1) as f64;
    let bw = (gw * 0.8 / nb).min(40.0);
    for (g, label) in labels.iter().enumerate() {
        let gx = LEFT + gw * g as f64 + (gw - bw * nb) / 2.0;
        for (k, _) in series_names.iter().enumerate() {
            if let Some(Some(v)) = values.get(g).and_then(|r| r.get(k)) {
                let bx = gx + bw * k as f64;
                s += &format!(
                    "<rect x=\"{bx:.1}\" y=\"{:.1}\" width=\"{:.1}\" height=\"{:.1}\" fill=\"{}\"/><text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\" font-size=\"10\">{}</text>\n",
                    y(*v),
                    bw - 2.0,
                    (TOP + ph - y(*v)).max(0.0),
                    color(k),
                    bx + bw / 2.0,
                    y(*v) - 3.0,
                    fmt_tick(*v)
                );
            }
        }
        s += &format!(
            "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{}</text>\n",
            LEFT + gw * (g as f64 + 0.5),
            TOP + ph + 16.0,
            esc(label)
        );
    }
    s += &format!("<rect x=\"{LEFT}\" y=\"{TOP}\" width=\"{pw}\" height=\"{ph}\" fill=\"none\" stroke=\"#888\"/>\n");
    for (i, n) in series_names.iter().enumerate() {
        let ly = TOP + 10.0 + 18.0 * i as f64;
        s += &format!(
            "<rect x=\"{:.1}\" y=\"{:.1}\" width=\"14\" height=\"10\" fill=\"{}\"/><text x=\"{:.1}\" y=\"{:.1}\">{}</text>\n",
            W - RIGHT + 14.0,
            ly - 5.0,
            color(i),
            W - RIGHT + 34.0,
            ly + 4.0,
            esc(n)
        );
    }
    s += "</svg>\n";
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn axis_covers_the_data_with_round_ticks() {
        let (a, b, t) = axis(0.13, 0.87);
        assert!(a <= 0.13 && b >= 0.87, "{a} {b}");
        assert!(t.len() >= 3 && t.len() <= 8, "{t:?}");
        assert_eq!(t.first().copied(), Some(a));
        // One value: a non-empty range around it.
        let (a, b, _) = axis(28.8, 28.8);
        assert!(a < 28.8 && b > 28.8);
    }

    #[test]
    fn labels_are_escaped() {
        let s = lines("a<b & \"c\"", "x", "y", &[Series { name: "m<1>".into(), points: vec![(0.0, 1.0)], dashed: false, markers_only: true }]);
        assert!(s.contains("a&lt;b &amp; &quot;c&quot;") && s.contains("m&lt;1&gt;"));
        assert!(!s.contains("m<1>"));
    }
}
