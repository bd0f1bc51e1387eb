//! What a run directory holds for the report, read from the files the stages wrote: `eval/results.csv`,
//! `eval/layers.csv`, `eval/results.json` (the model's name), `predictors/metrics.csv` and `bench.json` (or
//! `bench/*.json`). Each file is optional; a file that is present but malformed is an error naming the file, the
//! line and the column.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::store::RunDir;

/// One row of `eval/results.csv`: a task scored in a mode, or the mode's perplexity (`task == "ppl"`).
#[derive(Debug, Clone, PartialEq)]
pub struct ResultRow {
    pub mode: String,
    pub task: String,
    pub n: u64,
    pub acc: Option<f64>,
    pub acc_stderr: Option<f64>,
    pub acc_norm: Option<f64>,
    pub ppl: Option<f64>,
    pub mlp_sparsity: Option<f64>,
    pub head_sparsity: Option<f64>,
    /// Weight bytes read per token as a fraction of dense, when the eval wrote it (`mlp_read_fraction`).
    pub bytes_frac: Option<f64>,
}

/// One row of `eval/layers.csv`: realised sparsity of one layer in one mode.
#[derive(Debug, Clone, PartialEq)]
pub struct LayerRow {
    pub mode: String,
    pub layer: usize,
    pub mlp_sparsity: f64,
    pub head_sparsity: f64,
}

/// One row of `predictors/metrics.csv` (held-out recall and kept fraction of the trained predictors).
#[derive(Debug, Clone, PartialEq)]
pub struct PredictorRow {
    pub layer: usize,
    pub neuron_recall: f64,
    pub neuron_density: f64,
    pub head_recall: Option<f64>,
    pub head_density: Option<f64>,
}

/// One measured configuration of `bench --json`.
#[derive(Debug, Clone, PartialEq)]
pub struct BenchRow {
    pub model: String,
    pub dtype: String,
    pub batch: u64,
    pub median_ms: f64,
    pub floor_ms: f64,
    pub ratio_to_floor: f64,
    pub tokens_per_s: f64,
    /// The sparse mode, when the bench ran one (absent: dense).
    pub mode: Option<String>,
}

/// Everything the report shows, with the files it came from.
#[derive(Debug, Clone, Default)]
pub struct RunData {
    pub run: PathBuf,
    pub model: Option<String>,
    pub results: Vec<ResultRow>,
    pub layers: Vec<LayerRow>,
    pub predictors: Vec<PredictorRow>,
    pub bench: Vec<BenchRow>,
    /// The files read, relative to the run directory.
    pub sources: Vec<String>,
}

impl RunData {
    /// Modes in the order they first appear in results.csv.
    pub fn modes(&self) -> Vec<String> {
        let mut out: Vec<String> = Vec::new();
        for r in &self.results {
            if !out.contains(&r.mode) {
                out.push(r.mode.clone());
            }
        }
        out
    }

    /// The task rows (not perplexity) of `mode`.
    pub fn tasks_of<'a>(&'a self, mode: &'a str) -> impl Iterator<Item = &'a ResultRow> + 'a {
        self.results.iter().filter(move |r| r.mode == mode && r.task != "ppl")
    }

    /// The perplexity row of `mode`, if any.
    pub fn ppl_of(&self, mode: &str) -> Option<&ResultRow> {
        self.results.iter().find(|r| r.mode == mode && r.task == "ppl")
    }
}

/// A CSV file read into header-indexed records, with errors that name the file, line and column.
struct Table {
    path: PathBuf,
    cols: HashMap<String, usize>,
    rows: Vec<(u64, csv::StringRecord)>,
}

impl Table {
    fn read(path: &Path) -> Result<Self> {
        let mut rd = csv::ReaderBuilder::new().flexible(false).from_path(path).map_err(|e| csv_error(path, e))?;
        let cols = rd
            .headers()
            .map_err(|e| csv_error(path, e))?
            .iter()
            .enumerate()
            .map(|(i, h)| (h.trim().to_string(), i))
            .collect();
        let mut rows = Vec::new();
        for rec in rd.records() {
            let rec = rec.map_err(|e| csv_error(path, e))?;
            let line = rec.position().map_or(0, |p| p.line());
            rows.push((line, rec));
        }
        Ok(Table { path: path.to_path_buf(), cols, rows })
    }

    fn has(&self, col: &str) -> bool {
        self.cols.contains_key(col)
    }

    fn need(&self, col: &str) -> Result<()> {
        if self.has(col) {
            Ok(())
        } else {
            Err(Error::format(&self.path, format!("no `{col}` column in the header")))
        }
    }

    fn text<'a>(&self, rec: &'a csv::StringRecord, col: &str) -> &'a str {
        self.cols.get(col).and_then(|&i| rec.get(i)).map_or("", str::trim)
    }

    /// The number in `col`; empty or missing column is `None`; anything else that is not a finite number is an error.
    fn num(&self, line: u64, rec: &csv::StringRecord, col: &str) -> Result<Option<f64>> {
        let t = self.text(rec, col);
        if t.is_empty() {
            return Ok(None);
        }
        match t.parse::<f64>() {
            Ok(v) if v.is_finite() => Ok(Some(v)),
            _ => Err(Error::format(&self.path, format!("line {line}, column `{col}`: `{t}` is not a finite number"))),
        }
    }

    fn req(&self, line: u64, rec: &csv::StringRecord, col: &str) -> Result<f64> {
        self.num(line, rec, col)?
            .ok_or_else(|| Error::format(&self.path, format!("line {line}, column `{col}` is empty")))
    }

    fn count(&self, line: u64, rec: &csv::StringRecord, col: &str) -> Result<u64> {
        let t = self.text(rec, col);
        t.parse::<u64>()
            .map_err(|_| Error::format(&self.path, format!("line {line}, column `{col}`: `{t}` is not a whole number")))
    }
}

fn csv_error(path: &Path, e: csv::Error) -> Error {
    match e.into_kind() {
        csv::ErrorKind::Io(io) => Error::io(path, io),
        other => Error::format(path, format!("{other:?}")),
    }
}

fn rel(run: &Path, p: &Path) -> String {
    p.strip_prefix(run).unwrap_or(p).display().to_string()
}

/// Read what `run` holds. A run directory with none of the files is an error that says what is looked for.
pub fn load(run: &Path) -> Result<RunData> {
    if !run.is_dir() {
        return Err(Error::format(run, "no such run directory"));
    }
    let dir = RunDir::at(run);
    let mut data = RunData { run: run.to_path_buf(), ..Default::default() };

    let results_csv = dir.eval().join("results.csv");
    if results_csv.is_file() {
        let t = Table::read(&results_csv)?;
        for c in ["mode", "task", "n"] {
            t.need(c)?;
        }
        for (line, rec) in &t.rows {
            let line = *line;
            let task = t.text(rec, "task").to_string();
            let row = ResultRow {
                mode: t.text(rec, "mode").to_string(),
                n: t.count(line, rec, "n")?,
                acc: t.num(line, rec, "acc")?,
                acc_stderr: t.num(line, rec, "acc_stderr")?,
                acc_norm: t.num(line, rec, "acc_norm")?,
                ppl: t.num(line, rec, "ppl")?,
                mlp_sparsity: t.num(line, rec, "mlp_sparsity")?,
                head_sparsity: t.num(line, rec, "head_sparsity")?,
                bytes_frac: t.num(line, rec, "mlp_read_fraction")?,
                task,
            };
            if row.mode.is_empty() {
                return Err(Error::format(&results_csv, format!("line {line}, column `mode` is empty")));
            }
            if row.task == "ppl" && row.ppl.is_none() {
                return Err(Error::format(&results_csv, format!("line {line}: a `ppl` row with an empty `ppl` column")));
            }
            if row.task != "ppl" && row.acc.is_none() {
                return Err(Error::format(&results_csv, format!("line {line}, column `acc` is empty")));
            }
            data.results.push(row);
        }
        data.sources.push(rel(run, &results_csv));
    }

    let results_json = dir.eval().join("results.json");
    if results_json.is_file() {
        let text = std::fs::read_to_string(&results_json).map_err(|e| Error::io(&results_json, e))?;
        let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| Error::json(&results_json, e))?;
        data.model = v.get("model").and_then(|m| m.as_str()).map(str::to_string);
        data.sources.push(rel(run, &results_json));
    }

    let layers_csv = dir.eval().join("layers.csv");
    if layers_csv.is_file() {
        let t = Table::read(&layers_csv)?;
        for c in ["mode", "layer", "mlp_sparsity"] {
            t.need(c)?;
        }
        for (line, rec) in &t.rows {
            let line = *line;
            data.layers.push(LayerRow {
                mode: t.text(rec, "mode").to_string(),
                layer: t.count(line, rec, "layer")? as usize,
                mlp_sparsity: t.req(line, rec, "mlp_sparsity")?,
                head_sparsity: t.num(line, rec, "head_sparsity")?.unwrap_or(0.0),
            });
        }
        data.sources.push(rel(run, &layers_csv));
    }

    let metrics_csv = dir.predictors().join("metrics.csv");
    if metrics_csv.is_file() {
        let t = Table::read(&metrics_csv)?;
        for c in ["layer", "neuron_recall", "neuron_density"] {
            t.need(c)?;
        }
        for (line, rec) in &t.rows {
            let line = *line;
            data.predictors.push(PredictorRow {
                layer: t.count(line, rec, "layer")? as usize,
                neuron_recall: t.req(line, rec, "neuron_recall")?,
                neuron_density: t.req(line, rec, "neuron_density")?,
                head_recall: t.num(line, rec, "head_recall")?,
                head_density: t.num(line, rec, "head_density")?,
            });
        }
        data.sources.push(rel(run, &metrics_csv));
    }

    let mut bench_files = Vec::new();
    let single = run.join("bench.json");
    if single.is_file() {
        bench_files.push(single);
    }
    let bench_dir = run.join("bench");
    if bench_dir.is_dir() {
        let mut more: Vec<PathBuf> = std::fs::read_dir(&bench_dir)
            .map_err(|e| Error::io(&bench_dir, e))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "json"))
            .collect();
        more.sort();
        bench_files.extend(more);
    }
    for f in bench_files {
        data.bench.extend(read_bench(&f)?);
        data.sources.push(rel(run, &f));
    }

    if data.sources.is_empty() {
        return Err(Error::format(
            run,
            "nothing to report: none of eval/results.csv, eval/layers.csv, predictors/metrics.csv, bench.json, bench/*.json is there",
        ));
    }
    Ok(data)
}

/// The rows of one `bench --json` file (an array of results).
fn read_bench(path: &Path) -> Result<Vec<BenchRow>> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| Error::json(path, e))?;
    let items = v.as_array().ok_or_else(|| Error::format(path, "expected a JSON array of bench results"))?;
    let mut out = Vec::new();
    for (i, it) in items.iter().enumerate() {
        let s = |k: &str| -> Result<String> {
            it.get(k)
                .and_then(|x| x.as_str())
                .map(str::to_string)
                .ok_or_else(|| Error::format(path, format!("result {i}: field `{k}` missing or not a string")))
        };
        let f = |k: &str| -> Result<f64> {
            it.get(k)
                .and_then(|x| x.as_f64())
                .filter(|x| x.is_finite())
                .ok_or_else(|| Error::format(path, format!("result {i}: field `{k}` missing or not a finite number")))
        };
        let batch = it
            .get("batch")
            .and_then(|x| x.as_u64())
            .ok_or_else(|| Error::format(path, format!("result {i}: field `batch` missing or not a whole number")))?;
        out.push(BenchRow {
            model: s("model")?,
            dtype: s("dtype")?,
            batch,
            median_ms: f("median_ms")?,
            floor_ms: f("floor_ms")?,
            ratio_to_floor: f("ratio_to_floor")?,
            tokens_per_s: f("tokens_per_s")?,
            mode: it.get("mode").and_then(|x| x.as_str()).map(str::to_string),
        });
    }
    Ok(out)
}
