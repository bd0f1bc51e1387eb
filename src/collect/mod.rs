//! Activation collection for Deja Vu's predictors: run the dense model over calibration text and record, per layer
//! and token, the block input, the MLP input, the MLP activation target and each head's output norm, as f16
//! safetensors shards under `RUN/acts` with a manifest.
//!
//! Text is streamed: each file is read in bounded chunks cut at line (else whitespace, else character)
//! boundaries, each chunk is tokenized on its own, and the tokens are packed into sequences of `seq_len` (a BOS
//! token first when the model has one; BOS positions are run but not recorded). A shard holds whole sequences, so
//! a shard's end is a place the text stream can restart from: the manifest records it as (file, chunk offset,
//! tokens to skip), which makes a killed run resumable with no token lost or duplicated.
//!
//! Shard layout (`RUN/acts/shard-NNNNN.safetensors`, `T` recorded tokens):
//! - `tokens` `[T]` U32, `positions` `[T]` U32 (position in its sequence, BOS = 0);
//! - `layer.{i}.block_input` `[T, hidden]` F16: residual entering layer i (before its norm);
//! - `layer.{i}.mlp_input` `[T, hidden]` F16: residual entering layer i's MLP (before its norm);
//! - `layer.{i}.mlp_act` `[T, ffn]` F16: OPT post-ReLU fc1; Llama |SiLU(gate)·up|;
//! - `layer.{i}.gate_act` `[T, ffn]` F16 (Llama only): |SiLU(gate)|;
//! - `layer.{i}.head_norm` `[T, heads]` F16: L2 norm of each head's attention output.
//!
//! Values beyond the f16 range are clamped to ±65504.

mod pipeline;
mod reader;
mod shard;
mod text;

use std::path::{Path, PathBuf};

use crate::source::ModelIdentity;
use crate::error::Result;
use crate::store::{self, ArtifactHeader, ACTS_FORMAT, ACTS_VERSION};

pub use pipeline::{CollectOptions, CollectReport, Collector, SLOW_ENV};
pub use reader::Activations;
pub use shard::{bytes_per_token, tensor_name, Tap};
pub use text::{TextPos, TokenStream, DEFAULT_CHUNK_BYTES};


#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct TextSource {
    pub path: PathBuf,
    pub bytes: u64,
}

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct TapInfo {
    pub tap: Tap,
    /// Columns per token (`[T, width]` per layer).
    pub width: usize,
    pub dtype: String,
    pub what: String,
}

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct ShardInfo {
    pub file: String,
    pub tokens: usize,
    pub sequences: usize,
    pub bytes: u64,
    /// Where this shard's first sequence starts in the text.
    pub start: TextPos,
    /// Where the next shard's first sequence starts.
    pub end: TextPos,
}

/// `RUN/acts/manifest.json`.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct ActsManifest {
    /// Format `dejavu.acts`, the model, and the [`CollectOptions`] the collection was started with.
    pub header: ArtifactHeader,
    pub layers: usize,
    pub taps: Vec<TapInfo>,
    /// Sequence length including the BOS token (when there is one).
    pub seq_len: usize,
    /// Prepended to every sequence and not recorded.
    pub bos_token_id: Option<u32>,
    pub chunk_bytes: usize,
    pub sources: Vec<TextSource>,
    pub tokens_requested: usize,
    /// Tokens recorded in the shards listed (sum of their `tokens`).
    pub tokens: usize,
    pub bytes_per_token: u64,
    pub shard_bytes_max: u64,
    /// All requested tokens are recorded, or the text ran out (`text_exhausted`).
    pub complete: bool,
    pub text_exhausted: bool,
    pub shards: Vec<ShardInfo>,
}

impl ActsManifest {
    pub fn tap_list(&self) -> Vec<Tap> {
        self.taps.iter().map(|t| t.tap).collect()
    }
    pub fn width(&self, tap: Tap) -> Option<usize> {
        self.taps.iter().find(|t| t.tap == tap).map(|t| t.width)
    }
    /// The model the activations were recorded from.
    pub fn model(&self) -> &ModelIdentity {
        &self.header.model
    }
}

/// Read an activations manifest, refusing another format or version and, when `model` is given, another model.
pub fn read_acts_manifest(path: &Path, model: Option<&ModelIdentity>) -> Result<ActsManifest> {
    store::read_artifact(path, ACTS_FORMAT, ACTS_VERSION, model)
}
