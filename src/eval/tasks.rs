//! Zero-shot task files (JSON lines, as in `../shared/data/SOURCES.md`) turned into scoring requests.

use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::error::{Error, OptionError, Result};

/// How a task is scored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum TaskKind {
    /// Log-likelihood of `delimiter + choice` after `query`; acc and acc_norm (per choice byte).
    MultipleChoice,
    /// The same continuation after each context option (winogrande); acc.
    Schema,
    /// Greedy decoding must reproduce every continuation token (lambada); acc.
    LanguageModel,
}

/// A task dejavu knows: name, file, kind and the delimiter between context and continuation.
#[derive(Debug, Clone, Copy)]
pub struct TaskSpec {
    pub name: &'static str,
    pub file: &'static str,
    pub kind: TaskKind,
    pub delimiter: &'static str,
}

pub const TASKS: &[TaskSpec] = &[
    TaskSpec { name: "arc_easy", file: "arc_easy.jsonl", kind: TaskKind::MultipleChoice, delimiter: "\nAnswer: " },
    TaskSpec { name: "boolq", file: "boolq.jsonl", kind: TaskKind::MultipleChoice, delimiter: "\nAnswer: " },
    TaskSpec { name: "copa", file: "copa.jsonl", kind: TaskKind::MultipleChoice, delimiter: " " },
    TaskSpec { name: "hellaswag", file: "hellaswag.jsonl", kind: TaskKind::MultipleChoice, delimiter: " " },
    TaskSpec { name: "lambada_openai", file: "lambada_openai.jsonl", kind: TaskKind::LanguageModel, delimiter: " " },
    TaskSpec { name: "openbook_qa", file: "openbook_qa.jsonl", kind: TaskKind::MultipleChoice, delimiter: " " },
    TaskSpec { name: "piqa", file: "piqa.jsonl", kind: TaskKind::MultipleChoice, delimiter: "\nAnswer: " },
    TaskSpec { name: "winogrande", file: "winogrande.jsonl", kind: TaskKind::Schema, delimiter: " " },
];

/// Look a task up by name (a few common aliases accepted).
pub fn spec(name: &str) -> Result<&'static TaskSpec, OptionError> {
    let canonical = match name {
        "lambada" => "lambada_openai",
        "openbookqa" => "openbook_qa",
        "arc-easy" | "arc_e" => "arc_easy",
        other => other,
    };
    TASKS.iter().find(|t| t.name == canonical).ok_or_else(|| {
        OptionError::new(
            "tasks",
            format!("unknown task `{name}`; known tasks: {}", TASKS.iter().map(|t| t.name).collect::<Vec<_>>().join(", ")),
        )
    })
}

/// One example: several (context, continuation) requests and the index of the right one.
#[derive(Debug, Clone)]
pub struct Example {
    pub requests: Vec<(String, String)>,
    pub gold: usize,
    /// Byte length of each choice text, for acc_norm (multiple choice only).
    pub choice_bytes: Vec<usize>,
}

pub struct Task {
    pub spec: &'static TaskSpec,
    pub path: PathBuf,
    pub examples: Vec<Example>,
}

/// Read the first `limit` examples of a task file. Errors name the file, line and field.
pub fn load(dir: &Path, spec: &'static TaskSpec, limit: Option<usize>) -> Result<Task> {
    let path = dir.join(spec.file);
    let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
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
        examples.push(parse(&v, spec, &at)?);
    }
    if examples.is_empty() {
        return Err(Error::format(&path, "no examples"));
    }
    Ok(Task { spec, path, examples })
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
    if g as usize >= n {
        return Err(Error::field(at, "gold", format!("{g} is out of range for {n} choices")));
    }
    Ok(g as usize)
}

fn parse(v: &Value, spec: &TaskSpec, at: &str) -> Result<Example> {
    let d = spec.delimiter;
    Ok(match spec.kind {
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
    })
}
