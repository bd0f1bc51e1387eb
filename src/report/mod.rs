//! `dejavu report RUN`: one self-contained HTML page (`RUN/report/index.html`, charts inline), the same charts as
//! SVG files and a markdown summary, built only from the files the stages wrote into the run directory
//! ([`data::load`]): accuracy and perplexity against realised sparsity per mode, per-layer sparsity and predictor
//! recall, bytes read per mode when the eval recorded them, and decode latency against the weight-read floor when
//! `bench` ran. Every number shown is a value of those files, or a mean / difference of them stated as such.

pub mod data;
pub mod svg;

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
pub use data::{load, RunData};
use svg::{esc, Series};

/// The rendered report: the page, the charts (file name, SVG) and the markdown summary.
#[derive(Debug, Clone)]
pub struct Report {
    pub html: String,
    pub charts: Vec<(String, String)>,
    pub markdown: String,
}

/// Per-mode summary numbers (means over the mode's task rows).
#[derive(Debug, Clone, PartialEq)]
pub struct ModeSummary {
    pub mode: String,
    pub tasks: usize,
    pub mean_acc: Option<f64>,
    /// Standard error of the mean accuracy: sqrt(sum of the tasks' stderr^2) / tasks.
    pub mean_acc_stderr: Option<f64>,
    pub ppl: Option<f64>,
    pub mlp_sparsity: Option<f64>,
    pub head_sparsity: Option<f64>,
    pub bytes_frac: Option<f64>,
}

fn mean(v: impl Iterator<Item = f64>) -> Option<f64> {
    let (s, n) = v.fold((0.0, 0usize), |(s, n), x| (s + x, n + 1));
    (n > 0).then(|| s / n as f64)
}

/// The summary of every mode, in results.csv order.
pub fn summarize(d: &RunData) -> Vec<ModeSummary> {
    d.modes()
        .into_iter()
        .map(|m| {
            let tasks: Vec<_> = d.tasks_of(&m).collect();
            let ppl = d.ppl_of(&m);
            let se = if tasks.iter().all(|t| t.acc_stderr.is_some()) && !tasks.is_empty() {
                Some(tasks.iter().map(|t| t.acc_stderr.unwrap_or(0.0).powi(2)).sum::<f64>().sqrt() / tasks.len() as f64)
            } else {
                None
            };
            let sparsity = |f: fn(&data::ResultRow) -> Option<f64>| mean(tasks.iter().filter_map(|t| f(t))).or_else(|| ppl.and_then(f));
            ModeSummary {
                tasks: tasks.len(),
                mean_acc: mean(tasks.iter().filter_map(|t| t.acc)),
                mean_acc_stderr: se,
                ppl: ppl.and_then(|p| p.ppl),
                mlp_sparsity: sparsity(|r| r.mlp_sparsity),
                head_sparsity: sparsity(|r| r.head_sparsity),
                bytes_frac: sparsity(|r| r.bytes_frac),
                mode: m,
            }
        })
        .collect()
}

/// The mode others are compared with: `dense` when present, else the first.
fn baseline(s: &[ModeSummary]) -> Option<&ModeSummary> {
    s.iter().find(|m| m.mode == "dense").or_else(|| s.first())
}

fn family(mode: &str) -> &str {
    mode.split('@').next().unwrap_or(mode)
}

fn opt(v: Option<f64>, digits: usize) -> String {
    v.map_or("—".into(), |x| format!("{x:.digits$}"))
}

/// Build the report from what was read.
pub fn build(d: &RunData) -> Report {
    let summary = summarize(d);
    let base = baseline(&summary).cloned();
    let mut charts: Vec<(String, String, String)> = Vec::new(); // (file, caption, svg)

    // Accuracy and perplexity against realised MLP sparsity, one series per mode family.
    let mut fams: Vec<&str> = Vec::new();
    for m in &summary {
        if !fams.contains(&family(&m.mode)) {
            fams.push(family(&m.mode));
        }
    }
    let by_family = |f: fn(&ModeSummary) -> Option<f64>| -> Vec<Series> {
        fams.iter()
            .filter_map(|fam| {
                let mut pts: Vec<(f64, f64)> =
                    summary.iter().filter(|m| family(&m.mode) == *fam).filter_map(|m| Some((m.mlp_sparsity.unwrap_or(0.0), f(m)?))).collect();
                pts.sort_by(|a, b| a.0.total_cmp(&b.0));
                (!pts.is_empty()).then(|| Series { name: fam.to_string(), points: pts, dashed: false, markers_only: false })
            })
            .collect()
    };
    let acc = by_family(|m| m.mean_acc);
    if !acc.is_empty() {
        charts.push((
            "accuracy_vs_sparsity.svg".into(),
            "Mean accuracy over the tasks against realised MLP sparsity, per mode (eval/results.csv).".into(),
            svg::lines("Mean accuracy vs MLP sparsity", "realised MLP sparsity", "mean accuracy", &acc),
        ));
    }
    let ppl = by_family(|m| m.ppl);
    if !ppl.is_empty() {
        charts.push((
            "ppl_vs_sparsity.svg".into(),
            "Perplexity against realised MLP sparsity, per mode (eval/results.csv, `ppl` rows).".into(),
            svg::lines("Perplexity vs MLP sparsity", "realised MLP sparsity", "perplexity", &ppl),
        ));
    }

    // Per layer: realised sparsity of each mode, and the predictors' held-out recall and kept fraction.
    let mut layer_series: Vec<Series> = Vec::new();
    let mut layer_modes: Vec<&str> = Vec::new();
    for l in &d.layers {
        if !layer_modes.contains(&l.mode.as_str()) {
            layer_modes.push(&l.mode);
        }
    }
    for m in layer_modes {
        let pts: Vec<(f64, f64)> = d.layers.iter().filter(|l| l.mode == m).map(|l| (l.layer as f64, l.mlp_sparsity)).collect();
        if pts.iter().any(|p| p.1 > 0.0) {
            layer_series.push(Series { name: format!("{m} MLP sparsity"), points: pts, dashed: false, markers_only: false });
        }
    }
    if !d.predictors.is_empty() {
        let p = &d.predictors;
        layer_series.push(Series { name: "predictor recall".into(), points: p.iter().map(|r| (r.layer as f64, r.neuron_recall)).collect(), dashed: false, markers_only: false });
        layer_series.push(Series { name: "predictor density".into(), points: p.iter().map(|r| (r.layer as f64, r.neuron_density)).collect(), dashed: true, markers_only: false });
        if p.iter().all(|r| r.head_recall.is_some()) {
            layer_series.push(Series { name: "head recall".into(), points: p.iter().map(|r| (r.layer as f64, r.head_recall.unwrap_or(0.0))).collect(), dashed: false, markers_only: false });
        }
    }
    if !layer_series.is_empty() {
        charts.push((
            "layers.svg".into(),
            "Per layer: realised MLP sparsity of each sparse mode (eval/layers.csv) and the predictors' held-out neuron recall and kept fraction (predictors/metrics.csv).".into(),
            svg::lines("Per-layer sparsity and predictor recall", "layer", "fraction", &layer_series),
        ));
    }

    let with_bytes: Vec<&ModeSummary> = summary.iter().filter(|m| m.bytes_frac.is_some()).collect();
    if !with_bytes.is_empty() {
        let labels: Vec<String> = with_bytes.iter().map(|m| m.mode.clone()).collect();
        let vals: Vec<Vec<Option<f64>>> = with_bytes.iter().map(|m| vec![m.bytes_frac]).collect();
        charts.push((
            "bytes.svg".into(),
            "MLP weight bytes read per token as a fraction of the dense MLP, per mode (eval/results.csv, `mlp_read_fraction`).".into(),
            svg::bars("MLP bytes read per token (fraction of dense)", "fraction of dense", &labels, &["MLP bytes read"], &vals),
        ));
    }

    if !d.bench.is_empty() {
        let labels: Vec<String> = d.bench.iter().map(bench_label).collect();
        let vals: Vec<Vec<Option<f64>>> = d.bench.iter().map(|b| vec![Some(b.median_ms), Some(b.floor_ms)]).collect();
        charts.push((
            "latency.svg".into(),
            "Median decode ms/token against the weight-read floor (bytes read / measured copy bandwidth), from bench.json.".into(),
            svg::bars("Decode latency vs the weight-read floor", "ms per token", &labels, &["median ms", "floor ms"], &vals),
        ));
    }

    let markdown = markdown(d, &summary, base.as_ref());
    let html = html(d, &summary, base.as_ref(), &charts);
    Report { html, charts: charts.into_iter().map(|(f, _, s)| (f, s)).collect(), markdown }
}

fn bench_label(b: &data::BenchRow) -> String {
    let mut s = format!("{} {}", b.model, b.dtype);
    if b.batch != 1 {
        let _ = write!(s, " b{}", b.batch);
    }
    if let Some(m) = &b.mode {
        let _ = write!(s, " {m}");
    }
    s
}

/// Δ of `m` against `base` in accuracy points, with its standard error (independent errors assumed).
fn delta_acc(m: &ModeSummary, base: Option<&ModeSummary>) -> String {
    match (m.mean_acc, base.and_then(|b| b.mean_acc)) {
        (Some(a), Some(b)) => {
            let d = 100.0 * (a - b);
            match (m.mean_acc_stderr, base.and_then(|b| b.mean_acc_stderr)) {
                (Some(x), Some(y)) => format!("{d:+.2} ± {:.2}", 100.0 * (x * x + y * y).sqrt()),
                _ => format!("{d:+.2}"),
            }
        }
        _ => "—".into(),
    }
}

fn delta_ppl(m: &ModeSummary, base: Option<&ModeSummary>) -> String {
    match (m.ppl, base.and_then(|b| b.ppl)) {
        (Some(a), Some(b)) if b > 0.0 => format!("{:+.2}%", 100.0 * (a / b - 1.0)),
        _ => "—".into(),
    }
}

/// Rows of the summary table: mode, tasks, mean acc ± se, Δ acc, ppl, Δ ppl, MLP sparsity, head sparsity, bytes.
fn summary_rows(s: &[ModeSummary], base: Option<&ModeSummary>) -> Vec<[String; 9]> {
    s.iter()
        .map(|m| {
            [
                m.mode.clone(),
                m.tasks.to_string(),
                match (m.mean_acc, m.mean_acc_stderr) {
                    (Some(a), Some(e)) => format!("{a:.4} ± {e:.4}"),
                    (a, _) => opt(a, 4),
                },
                delta_acc(m, base),
                opt(m.ppl, 4),
                delta_ppl(m, base),
                opt(m.mlp_sparsity, 3),
                opt(m.head_sparsity, 3),
                opt(m.bytes_frac, 3),
            ]
        })
        .collect()
}

const SUMMARY_HEAD: [&str; 9] = ["mode", "tasks", "mean acc", "Δ acc (points)", "ppl", "Δ ppl", "MLP sparsity", "head sparsity", "MLP bytes read (× dense)"];
const TASK_HEAD: [&str; 8] = ["mode", "task", "n", "acc", "acc stderr", "acc_norm", "MLP sparsity", "head sparsity"];
const BENCH_HEAD: [&str; 8] = ["model", "dtype", "batch", "mode", "median ms/token", "floor ms", "× floor", "tokens/s"];

fn task_rows(d: &RunData) -> Vec<[String; 8]> {
    d.results
        .iter()
        .filter(|r| r.task != "ppl")
        .map(|r| {
            [
                r.mode.clone(),
                r.task.clone(),
                r.n.to_string(),
                opt(r.acc, 4),
                opt(r.acc_stderr, 4),
                opt(r.acc_norm, 4),
                opt(r.mlp_sparsity, 3),
                opt(r.head_sparsity, 3),
            ]
        })
        .collect()
}

fn bench_rows(d: &RunData) -> Vec<[String; 8]> {
    d.bench
        .iter()
        .map(|b| {
            [
                b.model.clone(),
                b.dtype.clone(),
                b.batch.to_string(),
                b.mode.clone().unwrap_or_else(|| "dense".into()),
                format!("{:.3}", b.median_ms),
                format!("{:.3}", b.floor_ms),
                format!("{:.2}", b.ratio_to_floor),
                format!("{:.1}", b.tokens_per_s),
            ]
        })
        .collect()
}

fn md_table<const N: usize>(out: &mut String, head: [&str; N], rows: &[[String; N]]) {
    let _ = writeln!(out, "| {} |", head.join(" | "));
    let _ = writeln!(out, "|{}", "---|".repeat(N));
    for r in rows {
        let _ = writeln!(out, "| {} |", r.join(" | "));
    }
}

fn html_table<const N: usize>(out: &mut String, id: &str, head: [&str; N], rows: &[[String; N]]) {
    let _ = write!(out, "<table id=\"{id}\"><thead><tr>");
    for h in head {
        let _ = write!(out, "<th>{}</th>", esc(h));
    }
    out.push_str("</tr></thead><tbody>\n");
    for r in rows {
        out.push_str("<tr>");
        for c in r {
            let _ = write!(out, "<td>{}</td>", esc(c));
        }
        out.push_str("</tr>\n");
    }
    out.push_str("</tbody></table>\n");
}

fn title(d: &RunData) -> String {
    format!("dejavu report: {}", d.model.clone().unwrap_or_else(|| d.run.display().to_string()))
}

fn markdown(d: &RunData, s: &[ModeSummary], base: Option<&ModeSummary>) -> String {
    let mut md = format!("# {}\n\nRun directory `{}`; dejavu {}.\n", title(d), d.run.display(), crate::store::VERSION);
    if !s.is_empty() {
        let _ = writeln!(md, "\n## Modes (Δ against `{}`)\n", base.map_or("—", |b| b.mode.as_str()));
        md_table(&mut md, SUMMARY_HEAD, &summary_rows(s, base));
    }
    let tasks = task_rows(d);
    if !tasks.is_empty() {
        md.push_str("\n## Tasks\n\n");
        md_table(&mut md, TASK_HEAD, &tasks);
    }
    if !d.bench.is_empty() {
        md.push_str("\n## Decode latency\n\n");
        md_table(&mut md, BENCH_HEAD, &bench_rows(d));
    }
    let _ = writeln!(md, "\nSources: {}.", d.sources.join(", "));
    md
}

fn html(d: &RunData, s: &[ModeSummary], base: Option<&ModeSummary>, charts: &[(String, String, String)]) -> String {
    let mut h = String::new();
    let _ = write!(
        h,
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{t}</title>\n<style>\n\
         body {{ font-family: sans-serif; margin: 24px auto; max-width: 1000px; color: #222; }}\n\
         table {{ border-collapse: collapse; margin: 8px 0 20px; font-size: 13px; }}\n\
         th, td {{ border: 1px solid #ccc; padding: 3px 8px; text-align: right; }}\n\
         th {{ background: #f3f3f3; }} td:first-child, th:first-child {{ text-align: left; }}\n\
         figure {{ margin: 12px 0 24px; }} figcaption {{ font-size: 13px; color: #555; }}\n\
         .meta {{ color: #555; font-size: 13px; }}\n</style></head><body>\n<h1>{t}</h1>\n\
         <p class=\"meta\">Run directory <code>{run}</code>; dejavu {v}. Every number on this page is read from the run's files: {src}.</p>\n",
        t = esc(&title(d)),
        run = esc(&d.run.display().to_string()),
        v = crate::store::VERSION,
        src = esc(&d.sources.join(", ")),
    );
    if !s.is_empty() {
        let _ = writeln!(
            h,
            "<h2>Modes</h2>\n<p class=\"meta\">Means over each mode's tasks; Δ against <code>{}</code>; the ± of the mean is sqrt(Σ stderr²)/tasks, of Δ both combined.</p>",
            esc(base.map_or("—", |b| b.mode.as_str()))
        );
        html_table(&mut h, "modes", SUMMARY_HEAD, &summary_rows(s, base));
    }
    for (file, caption, svg) in charts {
        let _ = writeln!(h, "<figure id=\"{}\">{}<figcaption>{} (<code>{}</code>)</figcaption></figure>", esc(file), svg, esc(caption), esc(file));
    }
    let tasks = task_rows(d);
    if !tasks.is_empty() {
        h.push_str("<h2>Tasks</h2>\n");
        html_table(&mut h, "tasks", TASK_HEAD, &tasks);
    }
    if !d.bench.is_empty() {
        h.push_str("<h2>Decode latency</h2>\n");
        html_table(&mut h, "bench", BENCH_HEAD, &bench_rows(d));
    }
    h.push_str("</body></html>\n");
    h
}

/// Write the report into `out` (`index.html`, the SVGs, `summary.md`), each file atomically. Returns the page.
pub fn write(out: &Path, r: &Report) -> Result<PathBuf> {
    if out.exists() && !out.is_dir() {
        return Err(Error::format(out, "exists and is not a directory"));
    }
    std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
    for (name, svg) in &r.charts {
        crate::store::write_atomic(&out.join(name), svg.as_bytes())?;
    }
    crate::store::write_atomic(&out.join("summary.md"), r.markdown.as_bytes())?;
    let page = out.join("index.html");
    crate::store::write_atomic(&page, r.html.as_bytes())?;
    Ok(page)
}
