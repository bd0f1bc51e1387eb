//! The run directory and what is stored in it: where each stage's artifacts live (`RUN/acts`, `RUN/predictors`,
//! `RUN/thresholds.json`, `RUN/eval`), the header every artifact carries and the check each stage makes on what
//! it reads ([`ArtifactHeader::check`]), and atomic writes (temp file, fsync, rename) for everything written.

mod atomic;
mod header;

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

pub use atomic::{
    commit_tmp, free_bytes, human_bytes, remove_stale_tmp, tmp_path, write_atomic, write_csv, write_json, write_safetensors,
    FREE_BYTES_ENV,
};
pub use header::{
    now_rfc3339, read_artifact, ArtifactHeader, ACTS_FORMAT, ACTS_VERSION, EVAL_FORMAT, EVAL_VERSION, PREDICTORS_FORMAT,
    PREDICTORS_VERSION, QSCORE_FORMAT, QSCORE_VERSION, RULES_FORMAT, RULES_VERSION, THRESHOLDS_FORMAT, THRESHOLDS_VERSION,
};

/// The crate version written into every artifact header.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
/// The build written beside it: git commit and cargo features (`unknown` commit when built outside git).
pub const BUILD: &str = concat!("commit ", env!("DEJAVU_GIT_COMMIT"), "; features: ", env!("DEJAVU_FEATURES"));


/// One run directory: `acts/` (collect), `predictors/` (train-predictors), `thresholds.json` (calibrate) and
/// `eval/` (eval). The path helpers do not touch the disk; [`RunDir::create`] and [`RunDir::open`] do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunDir {
    root: PathBuf,
}

impl RunDir {
    /// The run directory at `root`, unchecked (for paths only).
    pub fn at(root: impl Into<PathBuf>) -> Self {
        RunDir { root: root.into() }
    }

    /// Create `root` (and its parents) when missing; an existing file there is an error.
    pub fn create(root: &Path) -> Result<Self> {
        if root.exists() && !root.is_dir() {
            return Err(Error::format(root, "exists and is not a directory, so it cannot be a run directory"));
        }
        std::fs::create_dir_all(root).map_err(|e| Error::io(root, e))?;
        Ok(RunDir::at(root))
    }

    /// An existing run directory.
    pub fn open(root: &Path) -> Result<Self> {
        if !root.is_dir() {
            return Err(Error::format(root, "no such run directory (collect activations into it first)"));
        }
        Ok(RunDir::at(root))
    }

    pub fn root(&self) -> &Path {
        &self.root
    }
    /// `RUN/acts`: activation shards and their manifest.
    pub fn acts(&self) -> PathBuf {
        self.root.join("acts")
    }
    pub fn acts_manifest(&self) -> PathBuf {
        self.acts().join("manifest.json")
    }
    /// `RUN/predictors`: trained predictors, their manifest, metrics and plot.
    pub fn predictors(&self) -> PathBuf {
        self.root.join("predictors")
    }
    pub fn predictors_manifest(&self) -> PathBuf {
        self.predictors().join("manifest.json")
    }
    /// `RUN/thresholds.json`: CATS thresholds.
    pub fn thresholds(&self) -> PathBuf {
        self.root.join("thresholds.json")
    }
    /// `RUN/rules.json`: TEAL thresholds and per-layer budgets (`calibrate --rule R`).
    pub fn rules(&self) -> PathBuf {
        self.root.join("rules.json")
    }
    /// `RUN/qscore.safetensors`: low-bit score copies of gate/up (`calibrate --rule qscore`).
    pub fn qscore(&self) -> PathBuf {
        self.root.join("qscore.safetensors")
    }
    /// `RUN/eval`: evaluation results.
    pub fn eval(&self) -> PathBuf {
        self.root.join("eval")
    }
}

/// Write eval's results into `dir` (created when missing), each file atomically: `results.json` holds `header`
/// under the key `header` followed by the fields of `results` (a JSON object; anything else goes under
/// `results`), and each `(file name, bytes)` of `tables` (CSV built in memory) is written as it is.
pub fn write_eval_results(dir: &Path, header: &ArtifactHeader, results: &serde_json::Value, tables: &[(&str, &[u8])]) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let mut doc = serde_json::Map::new();
    let path = dir.join("results.json");
    doc.insert("header".into(), serde_json::to_value(header).map_err(|e| Error::format(&path, e.to_string()))?);
    match results {
        serde_json::Value::Object(fields) => doc.extend(fields.iter().map(|(k, v)| (k.clone(), v.clone()))),
        other => {
            doc.insert("results".into(), other.clone());
        }
    }
    write_json(&path, &doc)?;
    for (name, bytes) in tables {
        write_atomic(&dir.join(name), bytes)?;
    }
    Ok(())
}
