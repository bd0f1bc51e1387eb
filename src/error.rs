//! The library's one error type. Every message is one line that starts with the file at fault and names the field
//! or tensor, so a user can act on it without a backtrace; a bad option value names the option's field (never a
//! CLI flag: the CLI maps fields to flags, a recipe to its keys).

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Reading or writing `path` failed.
    #[error("{}: {err}", path.display())]
    Io { path: PathBuf, err: std::io::Error },
    #[error("{}: invalid JSON: {err}", path.display())]
    Json { path: PathBuf, err: serde_json::Error },
    /// A bad field or key in a file: `config.json`, GGUF metadata, a manifest, a task line.
    #[error("{}: field `{field}`: {msg}", path.display())]
    Field { path: PathBuf, field: String, msg: String },
    /// A tensor of a checkpoint, GGUF file, shard or predictors file that is missing or malformed.
    #[error("{}: tensor `{tensor}`: {msg}", path.display())]
    Tensor { path: PathBuf, tensor: String, msg: String },
    /// Not the file expected: wrong magic or format, another version, truncated, not text, not a run directory.
    #[error("{}: {msg}", path.display())]
    Format { path: PathBuf, msg: String },
    /// An artifact made for another model (the message names the file and both models).
    #[error("{0}")]
    OtherModel(String),
    /// A value handed to a library entry point is invalid; see [`OptionError`].
    #[error(transparent)]
    Option(#[from] OptionError),
    /// Input a decoder refused (token ids outside the vocabulary, sequences too long, …).
    #[error(transparent)]
    Decode(#[from] DecodeError),
    /// The tokenizer refused a text.
    #[error("tokenization failed: {0}")]
    Tokenize(String),
    /// The Hugging Face Hub could not supply a file.
    #[error("{0}")]
    Hub(String),
    /// A worker thread died or an invariant broke: a bug, not bad input.
    #[error("{0}")]
    Internal(String),
    /// An environment variable holds a value dejavu does not accept (the message names it).
    #[error("{0}")]
    Env(String),
}

impl Error {
    pub fn io(path: impl Into<PathBuf>, err: std::io::Error) -> Self {
        Error::Io { path: path.into(), err }
    }
    pub fn json(path: impl Into<PathBuf>, err: serde_json::Error) -> Self {
        Error::Json { path: path.into(), err }
    }
    pub fn field(path: impl Into<PathBuf>, field: impl Into<String>, msg: impl Into<String>) -> Self {
        Error::Field { path: path.into(), field: field.into(), msg: msg.into() }
    }
    pub fn tensor(path: impl Into<PathBuf>, tensor: impl Into<String>, msg: impl Into<String>) -> Self {
        Error::Tensor { path: path.into(), tensor: tensor.into(), msg: msg.into() }
    }
    pub fn format(path: impl Into<PathBuf>, msg: impl Into<String>) -> Self {
        Error::Format { path: path.into(), msg: msg.into() }
    }
    /// A bad value for the option `field` (its name in the options struct).
    pub fn option(field: &'static str, msg: impl Into<String>) -> Self {
        Error::Option(OptionError::new(field, msg))
    }
    pub fn internal(msg: impl Into<String>) -> Self {
        Error::Internal(msg.into())
    }
    /// The option error inside, if this is one.
    pub fn as_option(&self) -> Option<&OptionError> {
        match self {
            Error::Option(o) => Some(o),
            _ => None,
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

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

/// Why a decoder refused a request. Each message is one line a user can act on.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum DecodeError {
    #[error("token id {id} is outside the model's vocabulary of {vocab} ids")]
    TokenOutOfVocab { id: u32, vocab: usize },
    #[error("{len} positions exceed the model's max_position_embeddings {max}")]
    TooLong { len: usize, max: usize },
    #[error("a forward needs at least one token in every row")]
    Empty,
    #[error("rows of one forward must have equal lengths (got {0:?})")]
    RaggedRows(Vec<usize>),
    #[error("{0}")]
    Usage(String),
    #[error("{0}")]
    Engine(String),
}
