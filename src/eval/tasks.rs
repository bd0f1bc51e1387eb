//! Zero-shot task files (JSON lines, as in `../shared/data/SOURCES.md`) turned into scoring requests.
//!
//! A task is found by name in a tasks directory: one of the eight built-in tasks (their exact harness scoring:
//! file, kind, delimiter), or any `NAME.jsonl` whose kind is told by its fields, optionally described by a small
//! TOML definition `NAME.toml` beside it (kind, delimiter, file, generation length). A name may also be a path to
//! a `.jsonl` file or to a `.toml` definition.

use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::error::{Error, OptionError, Result};

/// How a task is scored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TaskKind {
    /// Log-likelihood of `delimiter + choice` after `query`; acc and acc_norm (per choice byte).
    MultipleChoice,
    /// The same continuation after each context option (winogrande); acc.
    Schema,
    /// Greedy decoding must reproduce every continuation token, scored in one teacher-forced pass (lambada); acc.
    LanguageModel,
    /// Greedy generation after `context + delimiter`, judged by exact match of the target text: the generated
    /// text, leading whitespace removed, must start with the trimmed `continuation` followed by a word boundary;
    /// acc.
    Generation,
}

impl TaskKind {
    pub fn name(self) -> &'static str {
        match self {
            TaskKind::MultipleChoice => "multiple_choice",
            TaskKind::Schema => "schema",
            TaskKind::LanguageModel => "language_model",
            TaskKind::Generation => "generation",
        }
    }
}

/// A built-in task: name, file, kind and the delimiter between context and continuation.
#[derive(Debug, Clone, Copy)]
pub struct BuiltIn {
    pub name: &'static str,
    pub file: &'static str,
    pub kind: TaskKind,
    pub delimiter: &'static str,
}

pub const TASKS: &[BuiltIn] = &[
    BuiltIn { name: "arc_easy", file: "arc_easy.jsonl", kind: TaskKind::MultipleChoice, delimiter: "\nAnswer: " },
    BuiltIn { name: "boolq", file: "boolq.jsonl", kind: TaskKind::MultipleChoice, delimiter: "\nAnswer: " },
    BuiltIn { name: "copa", file: "copa.jsonl", kind: TaskKind::MultipleChoice, delimiter: " " },
    BuiltIn { name: "hellaswag", file: "hellaswag.jsonl", kind: TaskKind::MultipleChoice, delimiter: " " },
    BuiltIn { name: "lambada_openai", file: "lambada_openai.jsonl", kind: TaskKind::LanguageModel, delimiter: " " },
    BuiltIn { name: "openbook_qa", file: "openbook_qa.jsonl", kind: TaskKind::MultipleChoice, delimiter: " " },
    BuiltIn { name: "piqa", file: "piqa.jsonl", kind: TaskKind::MultipleChoice, delimiter: "\nAnswer: " },
    BuiltIn { name: "winogrande", file: "winogrande.jsonl", kind: TaskKind::Schema, delimiter: " " },
];

/// Built-in tasks that are not in the default set: LAMBADA scored by greedy generation (exact match of the target
/// word) rather than by one teacher-forced pass, so decoding strategies (sparse, corrected) can be compared on it.
pub const EXTRA_TASKS: &[BuiltIn] =
    &[BuiltIn { name: "lambada_openai_gen", file: "lambada_openai.jsonl", kind: TaskKind::Generation, delimiter: " " }];

/// The delimiter of a task with no definition and no `--delimiter` (lm-evaluation-harness's default).
pub const DEFAULT_DELIMITER: &str = " ";

fn builtin(name: &str) -> Option<&'static BuiltIn> {
    let canonical = match name {
        "lambada" => "lambada_openai",
        "lambada_gen" => "lambada_openai_gen",
        "openbookqa" => "openbook_qa",
        "arc-easy" | "arc_e" => "arc_easy",
        other => other,
    };
    TASKS.iter().chain(EXTRA_TASKS).find(|t| t.name == canonical)
}

/// A small TOML task definition (`NAME.toml` beside `NAME.jsonl`, or given as `--tasks PATH.toml`). Every key is
/// optional; an unknown key is an error naming it.
#[derive(Debug, Clone, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TaskDef {
    /// The task's name in results (default: the file's stem).
    pub name: Option<String>,
    /// The JSONL file, relative to the definition's directory (default: `NAME.jsonl` beside it).
    pub file: Option<PathBuf>,
    /// multiple_choice, schema, language_model or generation (default: told by the first example's fields;
    /// generation must be asked for).
    pub kind: Option<TaskKind>,
    /// Text between context and continuation (default: `--delimiter`, else a space).
    pub delimiter: Option<String>,
    /// Generation tasks: tokens generated per example (default: the target's own token count).
    pub max_tokens: Option<usize>,
}

impl TaskDef {
    /// Parse a definition; errors name the file, the line and the key.
    pub fn parse(path: &Path, text: &str) -> Result<TaskDef> {
        let def: TaskDef = toml::from_str(text).map_err(|e| toml_error(path, text, &e))?;
        if def.max_tokens == Some(0) {
            return Err(Error::field(path, "max_tokens", "must be at least 1"));
        }
        if def.max_tokens.is_some() && def.kind.is_some_and(|k| k != TaskKind::Generation) {
            return Err(Error::field(path, "max_tokens", "only a generation task generates tokens"));
        }
        Ok(def)
    }

    pub fn read(path: &Path) -> Result<TaskDef> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        TaskDef::parse(path, &text)
    }
}

/// A TOML parse error as one line: `FILE:LINE: message`.
pub fn toml_error(path: &Path, text: &str, e: &toml::de::Error) -> Error {
    let at = match e.span() {
        Some(span) => format!("{}:{}", path.display(), 1 + text.as_bytes().iter().take(span.start).filter(|&&b| b == b'\n').count()),
        None => path.display().to_string(),
    };
    Error::format(at, e.message().trim().replace('\n', " "))
}

/// Where a task's scoring rules come from.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Origin {
    /// One of the built-in tasks.
    BuiltIn,
    /// A TOML definition (its path).
    Definition(PathBuf),
    /// Only the JSONL file: the kind is told by its fields.
    File,
}

/// A task found but not yet read: its file and what is known of its scoring.
#[derive(Debug, Clone)]
pub struct TaskSpec {
    pub name: String,
    pub file: PathBuf,
    /// `None`: told by the fields of the first example.
    pub kind: Option<TaskKind>,
    /// `None`: `--delimiter`, else [`DEFAULT_DELIMITER`].
    pub delimiter: Option<String>,
    pub max_tokens: Option<usize>,
    pub origin: Origin,
}

impl TaskSpec {
    fn from_builtin(b: &BuiltIn, dir: &Path) -> TaskSpec {
        TaskSpec {
            name: b.name.to_string(),
            file: dir.join(b.file),
            kind: Some(b.kind),
            delimiter: Some(b.delimiter.to_string()),
            max_tokens: None,
            origin: Origin::BuiltIn,
        }
    }

    /// `base` (a built-in, or a bare file) with the definition at `def_path` laid over it.
    fn with_def(mut self, def: TaskDef, def_path: &Path) -> TaskSpec {
        let dir = def_path.parent().unwrap_or(Path::new("."));
        if let Some(n) = def.name {
            self.name = n;
        }
        if let Some(f) = def.file {
            self.file = dir.join(f);
        }
        self.kind = def.kind.or(self.kind);
        self.delimiter = def.delimiter.or(self.delimiter);
        self.max_tokens = def.max_tokens;
        self.origin = Origin::Definition(def_path.to_path_buf());
        self
    }

    fn bare(name: &str, file: PathBuf) -> TaskSpec {
        TaskSpec { name: name.to_string(), file, kind: None, delimiter: None, max_tokens: None, origin: Origin::File }
    }
}

fn stem(p: &Path) -> String {
    p.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| p.display().to_string())
}

fn known_names() -> String {
    TASKS.iter().chain(EXTRA_TASKS).map(|t| t.name).collect::<Vec<_>>().join(", ")
}

/// Find the task `name` in `dir`: a definition `dir/NAME.toml` (laid over the built-in task of that name, if any),
/// else a built-in task, else `dir/NAME.jsonl`. A name ending in `.toml` or `.jsonl`, or holding a path
/// separator, is a path (a `.jsonl` file picks up the definition beside it). Nothing is read but definitions;
/// a missing JSONL file is found by [`read`].
pub fn find(name: &str, dir: &Path) -> Result<TaskSpec> {
    let is_path = name.ends_with(".toml") || name.ends_with(".jsonl") || name.contains('/') || name.contains(std::path::MAIN_SEPARATOR);
    if is_path {
        let p = PathBuf::from(name);
        if name.ends_with(".toml") {
            let def = TaskDef::read(&p)?;
            let base = TaskSpec::bare(&stem(&p), p.with_extension("jsonl"));
            return Ok(base.with_def(def, &p));
        }
        let def_path = p.with_extension("toml");
        let base = TaskSpec::bare(&stem(&p), p.clone());
        return Ok(if def_path.is_file() { base.with_def(TaskDef::read(&def_path)?, &def_path) } else { base });
    }
    let def_path = dir.join(format!("{name}.toml"));
    let base = builtin(name).map(|b| TaskSpec::from_builtin(b, dir));
    if def_path.is_file() {
        let def = TaskDef::read(&def_path)?;
        let base = base.unwrap_or_else(|| TaskSpec::bare(name, dir.join(format!("{name}.jsonl"))));
        return Ok(base.with_def(def, &def_path));
    }
    if let Some(b) = base {
        return Ok(b);
    }
    let file = dir.join(format!("{name}.jsonl"));
    if file.is_file() {
        return Ok(TaskSpec::bare(name, file));
    }
    Err(OptionError::new(
        "tasks",
        format!(
            "unknown task `{name}`: not built in and no {name}.jsonl or {name}.toml in {} (built-in tasks: {}; a task file of your own goes in the tasks directory, or pass its path)",
            dir.display(),
            known_names()
        ),
    )
    .into())
}

/// Look a built-in task up by name (a few common aliases accepted).
pub fn spec(name: &str) -> std::result::Result<&'static BuiltIn, OptionError> {
    builtin(name).ok_or_else(|| OptionError::new("tasks", format!("unknown task `{name}`; known tasks: {}", known_names())))
}

/// One example: several (context, continuation) requests and the index of the right one.
#[derive(Debug, Clone)]
pub struct Example {
    pub requests: Vec<(String, String)>,
    pub gold: usize,
    /// Byte length of each choice text, for acc_norm (multiple choice only).
    pub choice_bytes: Vec<usize>,
}

/// A task read from its file, its scoring settled.
pub struct Task {
    pub spec: TaskSpec,
    pub kind: TaskKind,
    pub delimiter: String,
    pub path: PathBuf,
    pub examples: Vec<Example>,
}

/// The kind the fields of one example tell, if they tell one.
fn kind_of(v: &Value) -> Option<TaskKind> {
    let has = |f: &str| v.get(f).is_some();
    if has("choices") {
        Some(TaskKind::MultipleChoice)
    } else if has("context_options") {
        Some(TaskKind::Schema)
    } else if has("context") && has("continuation") {
        Some(TaskKind::LanguageModel)
    } else {
        None
    }
}

/// Read the first `limit` examples of the built-in task `builtin` from its file in `dir` (its own scoring rules).
pub fn load(dir: &Path, builtin: &BuiltIn, limit: Option<usize>) -> Result<Task> {
    read(&TaskSpec::from_builtin(builtin, dir), None, limit)
}

/// Read the first `limit` examples of the task `spec` finds. The delimiter is the task's own (built in or from its
/// definition), else `delimiter`, else [`DEFAULT_DELIMITER`]. Errors name the file, line and field.
pub fn read(spec: &TaskSpec, delimiter: Option<&str>, limit: Option<usize>) -> Result<Task> {
    let path = spec.file.clone();
    let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
    let delim = spec.delimiter.clone().or_else(|| delimiter.map(str::to_string)).unwrap_or_else(|| DEFAULT_DELIMITER.to_string());
    let mut kind = spec.kind;
    let mut examples = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if limit.is_some_and(|l| examples.len() >= l) {
            break;
        }
        if line.trim().is_empty() {
            continue;
        }
        let at = format!("{}:{}", path.display(), i + 1);
        let v: Value = serde_json::from_str(line).map_err(|e| Error::json(&at, e))?;
        if !v.is_object() {
            return Err(Error::format(&at, "each line must be a JSON object"));
        }
        let k = match kind {
            Some(k) => k,
            None => {
                let k = kind_of(&v).ok_or_else(|| {
                    let fields: Vec<&str> = v.as_object().map(|o| o.keys().map(String::as_str).collect()).unwrap_or_default();
                    Error::format(
                        &at,
                        format!(
                            "cannot tell the task kind from the fields [{}]: expected query/choices/gold (multiple choice), context_options/continuation/gold (schema) or context/continuation (language modelling); or set `kind` in a {}.toml beside the file",
                            fields.join(", "),
                            stem(&path)
                        ),
                    )
                })?;
                kind = Some(k);
                k
            }
        };
        examples.push(parse(&v, k, &delim, &at)?);
    }
    let (Some(kind), false) = (kind, examples.is_empty()) else {
        return Err(Error::format(&path, "no examples"));
    };
    Ok(Task { spec: spec.clone(), kind, delimiter: delim, path, examples })
}

fn field_str<'a>(v: &'a Value, f: &str, at: &str) -> Result<&'a str> {
    v.get(f).and_then(|x| x.as_str()).ok_or_else(|| Error::field(at, f, "missing or not a string"))
}

fn field_strs(v: &Value, f: &str, at: &str) -> Result<Vec<String>> {
    let arr = v.get(f).and_then(|x| x.as_array()).ok_or_else(|| Error::field(at, f, "missing or not a list"))?;
    let out: Option<Vec<String>> = arr.iter().map(|x| x.as_str().map(str::to_string)).collect();
    let out = out.ok_or_else(|| Error::field(at, f, "every entry must be a string"))?;
    if out.len() < 2 {
        return Err(Error::field(at, f, format!("needs at least 2 entries, has {}", out.len())));
    }
    Ok(out)
}

fn field_gold(v: &Value, n: usize, at: &str) -> Result<usize> {
    let g = v.get("gold").and_then(|x| x.as_u64()).ok_or_else(|| Error::field(at, "gold", "missing or not a non-negative integer"))?;
    if g >= n as u64 {
        return Err(Error::field(at, "gold", format!("{g} is out of range for {n} choices")));
    }
    Ok(g as usize)
}

fn parse(v: &Value, kind: TaskKind, d: &str, at: &str) -> Result<Example> {
    Ok(match kind {
        TaskKind::MultipleChoice => {
            let query = field_str(v, "query", at)?;
            let choices = field_strs(v, "choices", at)?;
            let gold = field_gold(v, choices.len(), at)?;
            Example {
                requests: choices.iter().map(|c| (query.to_string(), format!("{d}{c}"))).collect(),
                gold,
                choice_bytes: choices.iter().map(|c| c.len()).collect(),
            }
        }
        TaskKind::Schema => {
            let options = field_strs(v, "context_options", at)?;
            let cont = field_str(v, "continuation", at)?;
            let gold = field_gold(v, options.len(), at)?;
            Example {
                requests: options.iter().map(|o| (o.clone(), format!("{d}{cont}"))).collect(),
                gold,
                choice_bytes: vec![cont.len(); options.len()],
            }
        }
        TaskKind::LanguageModel => {
            let ctx = field_str(v, "context", at)?;
            let cont = field_str(v, "continuation", at)?;
            Example { requests: vec![(ctx.to_string(), format!("{d}{cont}"))], gold: 0, choice_bytes: vec![cont.len()] }
        }
        TaskKind::Generation => {
            // The prompt ends with the delimiter (its trailing spaces move to the target, as in pair encoding).
            let ctx = field_str(v, "context", at)?;
            let cont = field_str(v, "continuation", at)?;
            if cont.trim().is_empty() {
                return Err(Error::field(at, "continuation", "empty: a generation target needs text to match"));
            }
            Example { requests: vec![(format!("{ctx}{d}"), cont.to_string())], gold: 0, choice_bytes: vec![cont.len()] }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn definition_errors_name_file_line_and_key() {
        let p = Path::new("t/arc.toml");
        let e = TaskDef::parse(p, "kind = \"multiple_choice\"\ndelimter = \" \"\n").unwrap_err().to_string();
        assert!(e.starts_with("t/arc.toml:2:") && e.contains("delimter"), "{e}");
        assert!(!e.contains('\n'), "{e}");
        let e = TaskDef::parse(p, "kind = \"essay\"\n").unwrap_err().to_string();
        assert!(e.starts_with("t/arc.toml:1:") && e.contains("essay"), "{e}");
        let e = TaskDef::parse(p, "kind = \"schema\"\nmax_tokens = 3\n").unwrap_err().to_string();
        assert!(e.contains("max_tokens"), "{e}");
        let d = TaskDef::parse(p, "kind = \"generation\"\ndelimiter = \"\\nAnswer: \"\nmax_tokens = 4\n").unwrap();
        assert_eq!((d.kind, d.delimiter.as_deref(), d.max_tokens), (Some(TaskKind::Generation), Some("\nAnswer: "), Some(4)));
    }

    #[test]
    fn kinds_told_by_fields() {
        let v = |s: &str| serde_json::from_str::<Value>(s).unwrap();
        assert_eq!(kind_of(&v(r#"{"query": "q", "choices": ["a", "b"], "gold": 0}"#)), Some(TaskKind::MultipleChoice));
        assert_eq!(kind_of(&v(r#"{"context_options": ["a", "b"], "continuation": "c", "gold": 0}"#)), Some(TaskKind::Schema));
        assert_eq!(kind_of(&v(r#"{"context": "a", "continuation": "b"}"#)), Some(TaskKind::LanguageModel));
        assert_eq!(kind_of(&v(r#"{"question": "a", "answer": "b"}"#)), None);
    }
}
