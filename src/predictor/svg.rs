//! `recall_density.svg`: recall and kept fraction by layer, as a hand-written SVG line chart.

use super::metrics::LayerMetrics;
use super::PredictorsManifest;

/// Recall and density (k/n) by layer for neurons and heads, as a hand-written SVG line chart.
pub fn svg_plot(m: &PredictorsManifest) -> String {
    let (w, h, left, right, top, bottom) = (760.0, 380.0, 60.0, 190.0, 30.0, 50.0);
    let pw = w - left - right;
    let ph = h - top - bottom;
    let layers = m.model().layers.max(2) as f64;
    let x = |l: usize| left + pw * l as f64 / (layers - 1.0);
    let y = |v: f64| top + ph * (1.0 - v.clamp(0.0, 1.0));
    let mut s = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" font-family=\"sans-serif\" font-size=\"12\">\n\
         <rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n\
         <text x=\"{left}\" y=\"18\" font-size=\"14\">{} — predictor recall and kept fraction by layer (held-out)</text>\n",
        xml_escape(&m.model().source)
    );
    for i in 0..=10 {
        let v = i as f64 / 10.0;
        s += &format!(
            "<line x1=\"{left}\" x2=\"{}\" y1=\"{:.1}\" y2=\"{:.1}\" stroke=\"#ddd\"/><text x=\"{}\" y=\"{:.1}\" text-anchor=\"end\">{v:.1}</text>\n",
            left + pw,
            y(v),
            y(v),
            left - 6.0,
            y(v) + 4.0
        );
    }
    let step = ((layers as usize) / 15).max(1);
    for l in (0..m.model().layers).step_by(step) {
        s += &format!("<text x=\"{:.1}\" y=\"{}\" text-anchor=\"middle\">{l}</text>\n", x(l), top + ph + 16.0);
    }
    s += &format!("<text x=\"{:.1}\" y=\"{}\" text-anchor=\"middle\">layer</text>\n", left + pw / 2.0, h - 10.0);
    type Series = (&'static str, &'static str, &'static str, fn(&LayerMetrics) -> f64);
    let series: [Series; 4] = [
        ("neuron recall", "#1f77b4", "", |r| r.neuron_recall),
        ("neuron density k/ffn", "#1f77b4", "6,4", |r| r.neuron_density),
        ("head recall", "#d62728", "", |r| r.head_recall),
        ("heads kept k/heads", "#d62728", "6,4", |r| r.head_density),
    ];
    for (i, (name, color, dash, f)) in series.iter().enumerate() {
        let pts: Vec<String> = m.layers.iter().map(|r| format!("{:.1},{:.1}", x(r.layer), y(f(r)))).collect();
        s += &format!(
            "<polyline fill=\"none\" stroke=\"{color}\" stroke-width=\"2\" stroke-dasharray=\"{dash}\" points=\"{}\"/>\n",
            pts.join(" ")
        );
        for r in &m.layers {
            s += &format!("<circle cx=\"{:.1}\" cy=\"{:.1}\" r=\"2.5\" fill=\"{color}\"/>\n", x(r.layer), y(f(r)));
        }
        let ly = top + 20.0 * i as f64 + 10.0;
        let lx = left + pw + 15.0;
        s += &format!(
            "<line x1=\"{lx}\" x2=\"{}\" y1=\"{ly}\" y2=\"{ly}\" stroke=\"{color}\" stroke-width=\"2\" stroke-dasharray=\"{dash}\"/><text x=\"{}\" y=\"{}\">{name}</text>\n",
            lx + 25.0,
            lx + 30.0,
            ly + 4.0
        );
    }
    s += "</svg>\n";
    s
}

fn xml_escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}
