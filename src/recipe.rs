//! Recipes: one TOML file with the model, the run directory and the settings of each stage (collect,
//! train-predictors, calibrate, eval). A stage's table uses the stage's own flag names (`seq_len` or `seq-len` for
//! `--seq-len`), so recipes and the command line share one schema: the CLI turns each table into the stage's
//! arguments and parses them with the stage's own parser, so an omitted key gets the flag's default and an unknown
//! key is refused. This module knows nothing of the parser: it reads the file, applies overrides and produces the
//! argument lists.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// The stages a recipe runs, in order, with the table that configures each.
pub const STAGES: [&str; 4] = ["collect", "train-predictors", "calibrate", "eval"];

/// Keys of the top of a recipe (the stage tables aside).
const TOP_KEYS: [&str; 5] = ["model", "device", "run", "stages", "full"];

/// Stage keys that the recipe sets itself from its top (model, run directory). `device` may be set per stage
/// (e.g. eval of sparse modes on the CPU while collection runs on a GPU); the top's is the default.
const RESERVED: [&str; 3] = ["model", "out", "run"];

/// A recipe read from its file, overrides applied.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Recipe {
    pub path: PathBuf,
    pub model: String,
    pub device: Option<String>,
    /// The run directory.
    pub run: PathBuf,
    /// The stages to run, in [`STAGES`] order.
    pub stages: Vec<String>,
    /// Each stage's table, as written (after overrides).
    pub tables: BTreeMap<String, toml::Table>,
    /// The data directory given with `--data` (else `${DEJAVU_SHARED}/data`).
    pub data: Option<PathBuf>,
}

/// The shared directory recipes refer to as `${DEJAVU_SHARED}`: the variable, else `../shared`.
pub fn shared_dir() -> PathBuf {
    std::env::var_os("DEJAVU_SHARED").map_or_else(|| PathBuf::from("../shared"), PathBuf::from)
}

/// `s` with `${DEJAVU_SHARED}` and `${DEJAVU_DATA}` (the data directory: `--data`, else `${DEJAVU_SHARED}/data`)
/// replaced.
fn expand(s: &str, data: &Path) -> String {
    let shared = shared_dir();
    let shared = shared.to_string_lossy();
    let data = data.to_string_lossy();
    s.replace("${DEJAVU_DATA}", &data).replace("$DEJAVU_DATA", &data).replace("${DEJAVU_SHARED}", &shared).replace("$DEJAVU_SHARED", &shared)
}

/// Every string of `v`, expanded.
fn expand_all(v: &mut toml::Value, data: &Path) {
    match v {
        toml::Value::String(s) => *s = expand(s, data),
        toml::Value::Array(items) => items.iter_mut().for_each(|x| expand_all(x, data)),
        toml::Value::Table(t) => t.iter_mut().for_each(|(_, x)| expand_all(x, data)),
        _ => {}
    }
}

impl Recipe {
    /// Read `path`, then (with `full`) apply the recipe's `[full]` table, then `overrides` (`KEY=VALUE` for a top
    /// key, `STAGE.KEY=VALUE` for a stage's; the value is read as a TOML value, else taken as a string). `[full]`
    /// holds the same `"STAGE.KEY" = value` overrides, so a recipe sized for a quick run carries its full-size run
    /// one flag away. Errors name the file and the key.
    /// `data` replaces `${DEJAVU_SHARED}/data` as the value of `${DEJAVU_DATA}`, and eval reads its tasks from
    /// `data/tasks` unless the recipe's `[eval]` names a `tasks_dir`.
    pub fn load(path: &Path, overrides: &[String], full: bool, data: Option<&Path>) -> Result<Recipe> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let mut doc: toml::Table = toml::from_str(&text).map_err(|e| crate::eval::tasks::toml_error(path, &text, &e))?;
        let full_table = match doc.remove("full") {
            None => None,
            Some(toml::Value::Table(t)) => Some(t),
            Some(_) => return Err(Error::field(path, "full", "must be a table of \"STAGE.KEY\" = value overrides")),
        };
        if full {
            let t = full_table.ok_or_else(|| Error::field(path, "full", "--full given, but the recipe has no [full] table"))?;
            for (key, value) in t {
                set_value(&mut doc, &key, value).map_err(|msg| Error::field(path, format!("full.{key}"), msg))?;
            }
        }
        for o in overrides {
            apply_override(&mut doc, o).map_err(|msg| Error::format(path, format!("--set {o}: {msg}")))?;
        }
        let data_dir = data.map_or_else(|| shared_dir().join("data"), Path::to_path_buf);
        doc.iter_mut().for_each(|(_, v)| expand_all(v, &data_dir));
        let mut r = Recipe::from_table(path, doc)?;
        r.data = data.map(Path::to_path_buf);
        Ok(r)
    }

    fn from_table(path: &Path, doc: toml::Table) -> Result<Recipe> {
        let mut tables = BTreeMap::new();
        let (mut model, mut device, mut run, mut stages) = (None, None, None, None);
        for (k, v) in doc {
            let key = k.replace('_', "-");
            if let Some(stage) = STAGES.iter().find(|s| **s == key) {
                let toml::Value::Table(t) = v else {
                    return Err(Error::field(path, k, "a stage's settings are a table ([stage])"));
                };
                for sk in t.keys() {
                    if RESERVED.contains(&sk.as_str()) {
                        return Err(Error::field(
                            path,
                            format!("{k}.{sk}"),
                            "set by the recipe itself: put the model at the top of the recipe, and the run directory in `run`",
                        ));
                    }
                }
                tables.insert(stage.to_string(), t);
                continue;
            }
            let as_str = |v: &toml::Value| v.as_str().map(str::to_string).ok_or_else(|| Error::field(path, k.as_str(), "must be a string"));
            match k.as_str() {
                "model" => model = Some(as_str(&v)?),
                "device" => device = Some(as_str(&v)?),
                "run" => run = Some(PathBuf::from(as_str(&v)?)),
                "stages" => {
                    let list = v.as_array().ok_or_else(|| Error::field(path, "stages", "must be a list of stage names"))?;
                    let mut names = Vec::new();
                    for s in list {
                        let name = s.as_str().map(|s| s.replace('_', "-")).filter(|s| STAGES.contains(&s.as_str()));
                        names.push(name.ok_or_else(|| Error::field(path, "stages", format!("{s} is not one of {}", STAGES.join(", "))))?);
                    }
                    stages = Some(names);
                }
                _ => {
                    return Err(Error::field(
                        path,
                        k.as_str(),
                        format!("unknown key; a recipe has {} and the tables [{}]", TOP_KEYS.join(", "), STAGES.join("], [")),
                    ))
                }
            }
        }
        let model = model.ok_or_else(|| Error::field(path, "model", "missing (or give --model)"))?;
        let run = run.unwrap_or_else(|| PathBuf::from("runs").join(path.file_stem().unwrap_or_default()));
        let wanted = stages.unwrap_or_else(|| STAGES.iter().map(|s| s.to_string()).collect());
        let stages = STAGES.iter().filter(|s| wanted.iter().any(|w| w == *s)).map(|s| s.to_string()).collect();
        Ok(Recipe { path: path.to_path_buf(), model, device, run, stages, tables, data: None })
    }

    /// The arguments of `stage` (after the subcommand name): its table's keys as flags, then the model, device and
    /// run-directory flags the recipe supplies. Errors name the file and the key.
    pub fn stage_args(&self, stage: &str) -> Result<Vec<String>> {
        let mut args = Vec::new();
        if let Some(t) = self.tables.get(stage) {
            for (k, v) in t {
                let flag = format!("--{}", k.replace('_', "-"));
                let at = format!("{stage}.{k}");
                match v {
                    toml::Value::Array(items) => {
                        for item in items {
                            args.push(flag.clone());
                            args.push(scalar(item).ok_or_else(|| Error::field(&self.path, at.as_str(), "list entries must be strings or numbers"))?);
                        }
                    }
                    toml::Value::Boolean(true) => args.push(flag),
                    toml::Value::Boolean(false) => {}
                    other => {
                        args.push(flag);
                        args.push(scalar(other).ok_or_else(|| Error::field(&self.path, at.as_str(), "must be a string, number, boolean or list"))?);
                    }
                }
            }
        }
        let run = self.run.to_string_lossy().into_owned();
        match stage {
            "collect" => args.extend(["--out".to_string(), run]),
            "train-predictors" => args.extend(["--run".to_string(), run]),
            "calibrate" => args.extend(["--out".to_string(), self.run.join("thresholds.json").to_string_lossy().into_owned()]),
            _ => args.extend(["--run".to_string(), run]),
        }
        args.extend(["--model".to_string(), self.model.clone()]);
        let own = |key: &str| self.tables.get(stage).is_some_and(|t| t.contains_key(key) || t.contains_key(&key.replace('_', "-")));
        if let (Some(d), "eval", false) = (&self.data, stage, own("tasks_dir")) {
            args.extend(["--tasks-dir".to_string(), d.join("tasks").to_string_lossy().into_owned()]);
        }
        let own_device = self.tables.get(stage).is_some_and(|t| t.contains_key("device"));
        if let (Some(d), false) = (&self.device, own_device) {
            args.extend(["--device".to_string(), d.clone()]);
        }
        Ok(args)
    }
}

fn scalar(v: &toml::Value) -> Option<String> {
    match v {
        toml::Value::String(s) => Some(s.clone()),
        toml::Value::Integer(i) => Some(i.to_string()),
        toml::Value::Float(f) => Some(f.to_string()),
        toml::Value::Boolean(b) => Some(b.to_string()),
        _ => None,
    }
}

fn apply_override(doc: &mut toml::Table, o: &str) -> std::result::Result<(), String> {
    let (key, value) = o.split_once('=').ok_or("expected KEY=VALUE or STAGE.KEY=VALUE")?;
    let value: toml::Value = toml::from_str::<toml::Table>(&format!("v = {value}"))
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| toml::Value::String(value.to_string()));
    set_value(doc, key, value)
}

/// Set a top key (`KEY`) or a stage's (`STAGE.KEY`) in the recipe document.
fn set_value(doc: &mut toml::Table, key: &str, value: toml::Value) -> std::result::Result<(), String> {
    match key.split_once('.') {
        Some((stage, k)) => {
            let entry = doc.entry(stage.to_string()).or_insert_with(|| toml::Value::Table(toml::Table::new()));
            let t = entry.as_table_mut().ok_or_else(|| format!("`{stage}` is not a table"))?;
            t.insert(k.to_string(), value);
        }
        None => {
            doc.insert(key.to_string(), value);
        }
    }
    Ok(())
}
