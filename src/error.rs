//! Errors raised while reading models and data. Every message is one line that starts with the file at fault
//! and names the field or tensor, so a user can act on it without a backtrace.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("{}: {err}", path.display())]
    Io { path: PathBuf, err: std::io::Error },
    #[error("{}: invalid JSON: {err}", path.display())]
    Json { path: PathBuf, err: serde_json::Error },
    #[error("{}: field `{field}`: {msg}", path.display())]
    Field { path: PathBuf, field: String, msg: String },
    #[error("{}: tensor `{tensor}`: {msg}", path.display())]
    Tensor { path: PathBuf, tensor: String, msg: String },
    #[error("{}: {msg}", path.display())]
    Format { path: PathBuf, msg: String },
    #[error(transparent)]
    Gguf(#[from] crate::source::gguf::GgufError),
    #[error("{0}")]
    Hub(String),
}

impl LoadError {
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        LoadError::Io { path: path.into(), err: source }
    }
    pub fn field(path: impl Into<PathBuf>, field: impl Into<String>, msg: impl Into<String>) -> Self {
        LoadError::Field { path: path.into(), field: field.into(), msg: msg.into() }
    }
    pub fn tensor(path: impl Into<PathBuf>, tensor: impl Into<String>, msg: impl Into<String>) -> Self {
        LoadError::Tensor { path: path.into(), tensor: tensor.into(), msg: msg.into() }
    }
    pub fn format(path: impl Into<PathBuf>, msg: impl Into<String>) -> Self {
        LoadError::Format { path: path.into(), msg: msg.into() }
    }
}

pub type Result<T, E = LoadError> = std::result::Result<T, E>;

/// A value handed to a library entry point is invalid. `field` names the option (`mode`, `head_sparsity`, …); the
/// CLI maps it to its flag and a recipe to its key, so the library never names either.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{field}: {msg}")]
pub struct OptionError {
    pub field: &'static str,
    pub msg: String,
}

impl OptionError {
    pub fn new(field: &'static str, msg: impl Into<String>) -> Self {
        OptionError { field, msg: msg.into() }
    }
}
