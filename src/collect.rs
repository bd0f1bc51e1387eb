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

use std::collections::HashMap;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use burn::tensor::{backend::Backend, DType, FloatDType, Tensor, TensorData};
use safetensors::{tensor::TensorView, Dtype, SafeTensors};
use tokenizers::Tokenizer;

use crate::config::{Family, ModelConfig};
use crate::manifest::{self, human_bytes};
use crate::model::{LayerTaps, Model, TapSet};
use crate::source::ModelIdentity;

/// Manifest format tag of `RUN/acts/manifest.json`.
pub const ACTS_FORMAT: &str = "dejavu-acts/1";
/// Bytes of text read (at most) per tokenizer call.
pub const DEFAULT_CHUNK_BYTES: usize = 256 * 1024;
/// Environment variable (tests only): sleep this many milliseconds after each forward, so a test can kill a run
/// in the middle.
pub const SLOW_ENV: &str = "DEJAVU_TEST_FORWARD_DELAY_MS";

#[derive(Debug, thiserror::Error)]
pub enum CollectError {
    #[error("{}: {err}", path.display())]
    Io { path: PathBuf, err: std::io::Error },
    /// Bad calibration text.
    #[error("{}: {msg}", path.display())]
    Text { path: PathBuf, msg: String },
    /// A run directory or manifest that does not fit what was asked.
    #[error("{}: {msg}", path.display())]
    Run { path: PathBuf, msg: String },
    #[error("{}: {msg}", path.display())]
    Shard { path: PathBuf, msg: String },
    #[error("{0}")]
    Invalid(String),
}

impl CollectError {
    fn io(path: impl Into<PathBuf>, err: std::io::Error) -> Self {
        CollectError::Io { path: path.into(), err }
    }
    fn text(path: impl Into<PathBuf>, msg: impl Into<String>) -> Self {
        CollectError::Text { path: path.into(), msg: msg.into() }
    }
    fn run(path: impl Into<PathBuf>, msg: impl Into<String>) -> Self {
        CollectError::Run { path: path.into(), msg: msg.into() }
    }
}

pub type Result<T, E = CollectError> = std::result::Result<T, E>;

/// One recorded value per layer and token.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Tap {
    BlockInput,
    MlpInput,
    MlpAct,
    GateAct,
    HeadNorm,
}

impl Tap {
    pub fn name(self) -> &'static str {
        match self {
            Tap::BlockInput => "block_input",
            Tap::MlpInput => "mlp_input",
            Tap::MlpAct => "mlp_act",
            Tap::GateAct => "gate_act",
            Tap::HeadNorm => "head_norm",
        }
    }
    /// The taps recorded for a model family, in shard order.
    pub fn for_family(family: Family) -> Vec<Tap> {
        match family {
            Family::Opt => vec![Tap::BlockInput, Tap::MlpInput, Tap::MlpAct, Tap::HeadNorm],
            Family::Llama => vec![Tap::BlockInput, Tap::MlpInput, Tap::MlpAct, Tap::GateAct, Tap::HeadNorm],
        }
    }
    pub fn width(self, cfg: &ModelConfig) -> usize {
        match self {
            Tap::BlockInput | Tap::MlpInput => cfg.hidden,
            Tap::MlpAct | Tap::GateAct => cfg.ffn,
            Tap::HeadNorm => cfg.heads,
        }
    }
    fn describe(self, family: Family) -> &'static str {
        match (self, family) {
            (Tap::BlockInput, _) => "residual stream entering the layer (attention input, before its norm)",
            (Tap::MlpInput, _) => "residual stream entering the MLP sub-block (before its norm)",
            (Tap::MlpAct, Family::Opt) => "post-ReLU fc1 output",
            (Tap::MlpAct, Family::Llama) => "|SiLU(gate)·up| (magnitude of the MLP hidden value)",
            (Tap::GateAct, _) => "|SiLU(gate)|",
            (Tap::HeadNorm, _) => "L2 norm of each attention head's output (before the output projection)",
        }
    }
    /// Move the tap out of `lt`: a tensor with a single owner reads back to the host without a copy through an
    /// element iterator (NdArray).
    fn take<B: Backend>(self, lt: &mut LayerTaps<B>) -> Option<Tensor<B, 3>> {
        match self {
            Tap::BlockInput => lt.block_input.take(),
            Tap::MlpInput => lt.mlp_input.take(),
            Tap::MlpAct => lt.mlp_act.take(),
            Tap::GateAct => lt.gate_act.take(),
            Tap::HeadNorm => lt.head_norm.take(),
        }
    }
}

/// Tensor name of a tap in a shard.
pub fn tensor_name(layer: usize, tap: Tap) -> String {
    format!("layer.{layer}.{}", tap.name())
}

/// A place in the concatenated calibration text where the token stream can restart: the chunk of file `source`
/// that starts at byte `offset`, after its first `skip` tokens.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct TextPos {
    pub source: usize,
    pub offset: u64,
    pub skip: usize,
}

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
    pub format: String,
    pub dejavu_version: String,
    pub model: ModelIdentity,
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
}

/// Bytes one recorded token takes on disk (f16 taps over all layers, plus its id and position).
pub fn bytes_per_token(cfg: &ModelConfig) -> u64 {
    let per_layer: usize = Tap::for_family(cfg.family).iter().map(|t| t.width(cfg)).sum();
    (2 * cfg.layers * per_layer + 8) as u64
}

/// What `dejavu collect` was asked to do.
#[derive(Debug, Clone)]
pub struct CollectOptions {
    pub texts: Vec<PathBuf>,
    pub tokens: usize,
    pub seq_len: usize,
    pub shard_bytes: u64,
    /// Full-length sequences per forward.
    pub batch: usize,
    pub chunk_bytes: usize,
    /// Pack the taps into one f16 tensor on the device before reading them back (GPUs: halves the transfer and
    /// makes it one). CPU backends read each tap back as is and convert on the host, which is cheaper there.
    pub pack_on_device: bool,
}

/// Outcome of a collection run (this invocation only for the timings).
#[derive(Debug, Clone, serde::Serialize)]
pub struct CollectReport {
    pub tokens: usize,
    pub tokens_requested: usize,
    /// Tokens already on disk when this invocation started (resumed run).
    pub resumed_tokens: usize,
    pub recorded_now: usize,
    /// Tokens run through the forward now (recorded tokens plus BOS positions).
    pub forward_tokens_now: usize,
    pub shards: usize,
    pub text_exhausted: bool,
    pub bytes: u64,
    pub seconds: f64,
    /// Time running the forwards and reading their taps back to the host.
    pub forward_seconds: f64,
    /// Time the recorder thread spent converting and packing taps into shard buffers (it overlaps the next
    /// forward).
    pub record_seconds: f64,
    /// Time the recorder waited for the previous shard write to finish.
    pub write_wait_seconds: f64,
    /// Time the forward loop waited for the recorder to take a forward's taps (> 0 when recording, not the
    /// forward, is the bottleneck).
    pub handoff_wait_seconds: f64,
    /// The first forward alone (on GPU backends it carries the one-off kernel compilation and autotuning): its
    /// tokens and the seconds from the start until its taps were recorded.
    pub first_forward_tokens: usize,
    pub first_forward_seconds: f64,
}

impl CollectReport {
    /// Forward tokens per second after the first forward (the steady rate; NaN with a single forward).
    pub fn steady_tokens_per_s(&self) -> f64 {
        (self.forward_tokens_now - self.first_forward_tokens) as f64 / (self.seconds - self.first_forward_seconds)
    }
}

/// An opened (new or resumed) collection in `RUN/acts`: manifest checked against the model and options, text
/// sniffed, disk checked. [`Collector::run`] does the work.
pub struct Collector {
    dir: PathBuf,
    manifest: ActsManifest,
    opts: CollectOptions,
}

impl Collector {
    /// Validate the text files, create or resume `out/acts`, and check the disk has room for what is left.
    pub fn open(out: &Path, cfg: &ModelConfig, identity: ModelIdentity, opts: CollectOptions) -> Result<Self> {
        if opts.tokens == 0 {
            return Err(CollectError::Invalid("--tokens must be at least 1".into()));
        }
        if opts.batch == 0 {
            return Err(CollectError::Invalid("--batch must be at least 1".into()));
        }
        let bos = cfg.bos_token_id;
        let min_len = if bos.is_some() { 2 } else { 1 };
        if opts.seq_len < min_len {
            return Err(CollectError::Invalid(format!("--seq-len must be at least {min_len} (got {})", opts.seq_len)));
        }
        if cfg.family == Family::Opt && opts.seq_len > cfg.max_positions {
            return Err(CollectError::Invalid(format!(
                "--seq-len {} exceeds the model's max_position_embeddings {}",
                opts.seq_len, cfg.max_positions
            )));
        }
        if opts.texts.is_empty() {
            return Err(CollectError::Invalid("give at least one --text file".into()));
        }
        let mut sources = Vec::new();
        for p in &opts.texts {
            sources.push(TextSource { path: p.clone(), bytes: sniff_text(p)? });
        }
        let dir = out.join("acts");
        let mpath = dir.join("manifest.json");
        let taps: Vec<TapInfo> = Tap::for_family(cfg.family)
            .into_iter()
            .map(|t| TapInfo { tap: t, width: t.width(cfg), dtype: "F16".into(), what: t.describe(cfg.family).into() })
            .collect();
        let manifest = if mpath.exists() {
            let m = read_acts_manifest(&mpath)?;
            identity.ensure_same(&m.model, &mpath).map_err(CollectError::Invalid)?;
            let differs = |what: &str, was: String, now: String| {
                CollectError::run(
                    &mpath,
                    format!("this run was started with {what} {was}, not {now}; rerun with the same arguments or use a new --out"),
                )
            };
            if m.seq_len != opts.seq_len {
                return Err(differs("--seq-len", m.seq_len.to_string(), opts.seq_len.to_string()));
            }
            if m.tokens_requested != opts.tokens {
                return Err(differs("--tokens", m.tokens_requested.to_string(), opts.tokens.to_string()));
            }
            let show = |s: &[TextSource]| s.iter().map(|t| format!("{} ({} bytes)", t.path.display(), t.bytes)).collect::<Vec<_>>().join(", ");
            if m.sources != sources {
                return Err(differs("--text", show(&m.sources), show(&sources)));
            }
            if m.chunk_bytes != opts.chunk_bytes {
                return Err(differs("chunk size", m.chunk_bytes.to_string(), opts.chunk_bytes.to_string()));
            }
            m
        } else {
            ActsManifest {
                format: ACTS_FORMAT.into(),
                dejavu_version: manifest::VERSION.into(),
                model: identity,
                layers: cfg.layers,
                taps,
                seq_len: opts.seq_len,
                bos_token_id: bos,
                chunk_bytes: opts.chunk_bytes,
                sources,
                tokens_requested: opts.tokens,
                tokens: 0,
                bytes_per_token: bytes_per_token(cfg),
                shard_bytes_max: opts.shard_bytes,
                complete: false,
                text_exhausted: false,
                shards: Vec::new(),
            }
        };
        if !manifest.complete {
            let left = (opts.tokens - manifest.tokens.min(opts.tokens)) as u64;
            let need = left * manifest.bytes_per_token + (1 << 20);
            let free = manifest::free_bytes(out).map_err(|e| CollectError::io(out, e))?;
            if need > free {
                return Err(CollectError::run(
                    out,
                    format!(
                        "not enough disk: {left} tokens × {} per token needs {}, but only {} is free",
                        human_bytes(manifest.bytes_per_token),
                        human_bytes(need),
                        human_bytes(free)
                    ),
                ));
            }
        }
        std::fs::create_dir_all(&dir).map_err(|e| CollectError::io(&dir, e))?;
        // Leftovers of a killed write; the shard they held is recomputed.
        if let Ok(rd) = std::fs::read_dir(&dir) {
            for e in rd.flatten() {
                if e.file_name().to_string_lossy().ends_with(".tmp") {
                    let _ = std::fs::remove_file(e.path());
                }
            }
        }
        Ok(Collector { dir, manifest, opts })
    }

    pub fn manifest(&self) -> &ActsManifest {
        &self.manifest
    }
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Record the remaining tokens. `on_tokens` is called with the number of tokens recorded after each forward.
    pub fn run<B: Backend>(mut self, model: &Model<B>, tok: &Tokenizer, mut on_tokens: impl FnMut(usize)) -> Result<CollectReport> {
        let t0 = Instant::now();
        let cfg = model.cfg.clone();
        let m = &mut self.manifest;
        let resumed = m.tokens;
        let mut report = CollectReport {
            tokens: m.tokens,
            tokens_requested: m.tokens_requested,
            resumed_tokens: resumed,
            recorded_now: 0,
            forward_tokens_now: 0,
            shards: m.shards.len(),
            text_exhausted: m.text_exhausted,
            bytes: m.shards.iter().map(|s| s.bytes).sum(),
            seconds: 0.0,
            forward_seconds: 0.0,
            record_seconds: 0.0,
            write_wait_seconds: 0.0,
            handoff_wait_seconds: 0.0,
            first_forward_tokens: 0,
            first_forward_seconds: 0.0,
        };
        if m.complete {
            return Ok(report);
        }
        let start = m.shards.last().map(|s| s.end).unwrap_or_default();
        let mut stream = TokenStream::new(tok, m.sources.iter().map(|s| s.path.clone()).collect(), m.chunk_bytes, start)?;
        let taps = m.tap_list();
        let widths: Vec<usize> = taps.iter().map(|t| t.width(&cfg)).collect();
        let bos = m.bos_token_id;
        let text_per_seq = m.seq_len - bos.is_some() as usize;
        let delay = std::env::var(SLOW_ENV).ok().and_then(|v| v.parse::<u64>().ok()).map(Duration::from_millis);
        // Buffers sized for a full shard up front and recycled from the writer, so the recorder never regrows
        // them or faults in fresh pages after the first two shards.
        let shard_tokens = ((self.opts.shard_bytes / m.bytes_per_token.max(1)) as usize).max(text_per_seq).min(m.tokens_requested.saturating_sub(m.tokens));
        let mut shard = ShardBuf::new(cfg.layers, &taps, &widths, cfg.family, start, shard_tokens);
        let mut writer = Writers::new();
        let mut left = m.tokens_requested - m.tokens;
        let mut exhausted = false;
        let first = bos.is_some() as usize;
        let (seq_len, bytes_per_token, batch) = (m.seq_len, m.bytes_per_token, self.opts.batch);
        let (dir, shard_bytes, pack) = (self.dir.clone(), self.opts.shard_bytes, self.opts.pack_on_device);

        // Two stages, overlapped: this thread runs each forward and reads its taps back; a recorder thread
        // repacks them into the shard buffers and hands full shards to the writer, while the next forward runs.
        let (tx, rx) = std::sync::mpsc::sync_channel::<Forwarded>(1);
        let (fwd_res, rec_res) = std::thread::scope(|sc| {
            let recorder = sc.spawn(|| -> Result<(f64, f64)> {
                let (mut record_s, mut wait_s) = (0.0, 0.0);
                for f in rx {
                    let tr = Instant::now();
                    let s = f.rows[0].ids.len();
                    let packed = shard.check_forward(&f)?;
                    for (ri, row) in f.rows.iter().enumerate() {
                        for p in first..s {
                            shard.push_token(row.ids[p], p as u32, &packed, ri * s + p);
                        }
                        shard.sequences += 1;
                        shard.end = row.end;
                        // A shard holds whole sequences: cut when the next full sequence would not fit.
                        let next = (shard.tokens.len() + text_per_seq) as u64 * bytes_per_token;
                        if next > shard_bytes {
                            let tw = Instant::now();
                            flush(&dir, m, &mut shard, &mut writer)?;
                            wait_s += tw.elapsed().as_secs_f64();
                        }
                    }
                    record_s += tr.elapsed().as_secs_f64();
                }
                Ok((record_s - wait_s, wait_s))
            });
            let fwd = (|| -> Result<()> {
                while left > 0 && !exhausted {
                    // Build up to `batch` rows; a short row (end of text or of N) runs alone.
                    let mut rows: Vec<Row> = Vec::new();
                    while rows.len() < batch && left > 0 {
                        let want = text_per_seq.min(left);
                        let mut ids = Vec::with_capacity(seq_len);
                        ids.extend(bos);
                        while ids.len() - first < want {
                            match stream.next_token()? {
                                Some(t) => ids.push(t),
                                None => {
                                    exhausted = true;
                                    break;
                                }
                            }
                        }
                        let n_text = ids.len() - first;
                        if n_text == 0 {
                            break;
                        }
                        if let Some(&bad) = ids.iter().find(|&&t| t as usize >= cfg.vocab_size) {
                            return Err(CollectError::Invalid(format!(
                                "the tokenizer produced id {bad}, outside the model's vocab_size {}",
                                cfg.vocab_size
                            )));
                        }
                        left -= n_text;
                        let full = n_text == text_per_seq;
                        rows.push(Row { ids, end: stream.pos() });
                        if !full || exhausted {
                            break;
                        }
                    }
                    if rows.is_empty() {
                        break;
                    }
                    // Rows in one forward must share a length: run the batch of full rows, then any short row alone.
                    let mut groups: Vec<Vec<Row>> = Vec::new();
                    for r in rows {
                        match groups.last_mut() {
                            Some(g) if g[0].ids.len() == r.ids.len() => g.push(r),
                            _ => groups.push(vec![r]),
                        }
                    }
                    for group in groups {
                        let tf = Instant::now();
                        let id_rows: Vec<Vec<u32>> = group.iter().map(|r| r.ids.clone()).collect();
                        let (b, s) = (id_rows.len(), id_rows[0].len());
                        // Reading back waits for the forward on lazy (GPU) backends.
                        let datas: Vec<TensorData> = match record_forward(model, &id_rows, &taps, pack) {
                            Recorded::Packed(t) => vec![t.into_data()],
                            Recorded::PerTap(ts) => ts.into_iter().map(|t| t.into_data()).collect(),
                        };
                        let th = Instant::now();
                        report.forward_seconds += (th - tf).as_secs_f64();
                        // Blocks while the recorder is still busy with the forward before the previous one.
                        if tx.send(Forwarded { rows: group, datas }).is_err() {
                            return Ok(()); // the recorder stopped on an error, which it returns
                        }
                        report.handoff_wait_seconds += th.elapsed().as_secs_f64();
                        report.forward_tokens_now += b * s;
                        let n = b * (s - first);
                        report.recorded_now += n;
                        on_tokens(n);
                        if report.first_forward_tokens == 0 {
                            report.first_forward_tokens = b * s;
                            report.first_forward_seconds = t0.elapsed().as_secs_f64();
                        }
                        if let Some(d) = delay {
                            std::thread::sleep(d);
                        }
                    }
                }
                Ok(())
            })();
            drop(tx);
            let rec = recorder.join().unwrap_or_else(|_| Err(CollectError::Invalid("the recorder thread panicked".into())));
            (fwd, rec)
        });
        let (record_s, wait_s) = rec_res?;
        fwd_res?;
        report.record_seconds += record_s;
        report.write_wait_seconds += wait_s;
        if exhausted || left == 0 {
            m.text_exhausted = exhausted && left > 0;
        }
        let tw = Instant::now();
        if !shard.tokens.is_empty() {
            flush(&self.dir, m, &mut shard, &mut writer)?;
        }
        writer.finish()?;
        m.complete = true;
        if m.tokens == 0 {
            let names = m.sources.iter().map(|s| s.path.display().to_string()).collect::<Vec<_>>().join(", ");
            return Err(CollectError::Invalid(format!("{names}: the text produced no tokens")));
        }
        let mpath = self.dir.join("manifest.json");
        manifest::write_json(&mpath, &*m).map_err(|e| CollectError::io(&mpath, e))?;
        report.write_wait_seconds += tw.elapsed().as_secs_f64();
        report.tokens = m.tokens;
        report.shards = m.shards.len();
        report.text_exhausted = m.text_exhausted;
        report.bytes = m.shards.iter().map(|s| s.bytes).sum();
        report.seconds = t0.elapsed().as_secs_f64();
        Ok(report)
    }
}

struct Row {
    ids: Vec<u32>,
    end: TextPos,
}

/// One forward's rows and their taps as read back, on their way to the recorder thread.
struct Forwarded {
    rows: Vec<Row>,
    datas: Vec<TensorData>,
}

/// The taps of one forward: on GPU backends with f16, packed on the device into one f16 tensor
/// `[b, s, layers × Σ widths]` (per token: layer 0's taps in `taps` order, then layer 1's, ...) so the host sees
/// one transfer; on CPU backends the f32 tap tensors as they are, `[b, s, width]` each in the same order,
/// converted on the host in one pass.
enum Recorded<B: Backend> {
    Packed(Tensor<B, 3>),
    PerTap(Vec<Tensor<B, 2>>),
}

fn record_forward<B: Backend>(model: &Model<B>, rows: &[Vec<u32>], taps: &[Tap], pack_on_device: bool) -> Recorded<B> {
    let mut cache = model.new_cache();
    let mut out = Vec::new();
    let _ = model.forward(model.tokens(rows), &mut cache, Some((&TapSet::all(), &mut out)));
    let mut parts: Vec<Tensor<B, 3>> = Vec::with_capacity(out.len() * taps.len());
    for lt in out.iter_mut() {
        parts.extend(taps.iter().filter_map(|&t| t.take(lt)));
    }
    drop(out);
    if !(pack_on_device && B::supports_dtype(model.device(), DType::F16)) {
        // As 2-D `[b·s, width]`: NdArray reads a `[1, s, w]` array (whose size-1 axis can carry stride 0) back
        // through a per-element iterator (~25 ns per value), which would dominate collection.
        return Recorded::PerTap(
            parts
                .into_iter()
                .map(|t| {
                    let [b, s, w] = t.dims();
                    t.reshape([b * s, w])
                })
                .collect(),
        );
    }
    let llama = model.cfg.family == Family::Llama;
    let parts: Vec<Tensor<B, 3>> = parts
        .into_iter()
        .enumerate()
        .map(|(i, x)| if llama && matches!(taps[i % taps.len()], Tap::MlpAct | Tap::GateAct) { x.abs() } else { x })
        .collect();
    Recorded::Packed(Tensor::cat(parts, 2).clamp(-65504.0, 65504.0).cast(FloatDType::F16))
}

/// One forward's taps as the host received them: packed f16 bytes, or one f32 slice per (layer, tap).
enum Packed<'a> {
    F16(&'a [u8]),
    F32(Vec<&'a [f32]>),
}

/// Append `src` as little-endian f16, saturating at ±65504 (as the device path clamps) and dropping the sign
/// when `abs`.
fn push_f16(buf: &mut Vec<u8>, src: &[f32], abs: bool, scratch: &mut Vec<half::f16>) {
    use half::slice::HalfFloatSliceExt;
    scratch.resize(src.len(), half::f16::ZERO);
    scratch.convert_from_f32_slice(src);
    buf.reserve(2 * src.len());
    for x in scratch.iter() {
        let mut bits = x.to_bits();
        if abs {
            bits &= 0x7fff;
        }
        if bits & 0x7fff == 0x7c00 {
            bits = (bits & 0x8000) | 0x7bff;
        }
        buf.extend_from_slice(&bits.to_le_bytes());
    }
}

/// Token ids, positions and per-(layer, tap) f16 byte buffers with room for `cap` tokens.
fn empty_buffers(shapes_w: &[usize], cap: usize) -> (Vec<u32>, Vec<u32>, Vec<Vec<u8>>) {
    (Vec::with_capacity(cap), Vec::with_capacity(cap), shapes_w.iter().map(|&w| Vec::with_capacity(2 * w * cap)).collect())
}

/// In-memory shard: per (layer, tap) a little-endian f16 byte buffer `[T, width]`.
struct ShardBuf {
    tokens: Vec<u32>,
    positions: Vec<u32>,
    data: Vec<Vec<u8>>,
    names: Vec<String>,
    shapes_w: Vec<usize>,
    /// f16 bytes per token in the packed forward output.
    row_bytes: usize,
    sequences: usize,
    start: TextPos,
    end: TextPos,
    /// Per (layer, tap): store magnitudes (Llama MLP taps) on the host path.
    abs: Vec<bool>,
    scratch: Vec<half::f16>,
}

impl ShardBuf {
    /// Empty buffers with room for `cap` tokens.
    fn new(layers: usize, taps: &[Tap], widths: &[usize], family: Family, start: TextPos, cap: usize) -> Self {
        let abs: Vec<bool> = (0..layers)
            .flat_map(|_| taps.iter().map(move |t| family == Family::Llama && matches!(t, Tap::MlpAct | Tap::GateAct)))
            .collect();
        let mut names = Vec::new();
        for l in 0..layers {
            for &t in taps {
                names.push(tensor_name(l, t));
            }
        }
        let shapes_w: Vec<usize> = (0..layers).flat_map(|_| widths.iter().cloned()).collect();
        let row_bytes = 2 * shapes_w.iter().sum::<usize>();
        let (tokens, positions, data) = empty_buffers(&shapes_w, cap);
        ShardBuf {
            tokens,
            positions,
            data,
            names,
            shapes_w,
            row_bytes,
            sequences: 0,
            start,
            end: start,
            abs,
            scratch: Vec::new(),
        }
    }

    /// One forward's taps as read back, checked against this shard's layout.
    fn check_forward<'a>(&self, f: &'a Forwarded) -> Result<Packed<'a>> {
        let (b, s) = (f.rows.len(), f.rows[0].ids.len());
        let bad = |what: String| CollectError::Invalid(format!("reading the taps back: {what}"));
        if let [d] = f.datas.as_slice() {
            if d.dtype != DType::F16 || d.as_bytes().len() != b * s * self.row_bytes {
                return Err(bad(format!("got {:?} with {} bytes, expected F16 with {}", d.dtype, d.as_bytes().len(), b * s * self.row_bytes)));
            }
            return Ok(Packed::F16(d.as_bytes()));
        }
        let slices = f.datas.iter().map(|d| d.as_slice::<f32>().map_err(|e| bad(format!("{e:?}")))).collect::<Result<Vec<_>>>()?;
        for (sl, &w) in slices.iter().zip(&self.shapes_w) {
            if sl.len() != b * s * w {
                return Err(bad(format!("a tap holds {} values, expected {}", sl.len(), b * s * w)));
            }
        }
        Ok(Packed::F32(slices))
    }

    /// Append token `index` (row-major over `[b, s]`) of one forward's taps.
    fn push_token(&mut self, id: u32, pos: u32, packed: &Packed<'_>, index: usize) {
        self.tokens.push(id);
        self.positions.push(pos);
        match packed {
            Packed::F16(bytes) => {
                let mut o = index * self.row_bytes;
                for (buf, &w) in self.data.iter_mut().zip(&self.shapes_w) {
                    buf.extend_from_slice(&bytes[o..o + 2 * w]);
                    o += 2 * w;
                }
            }
            Packed::F32(slices) => {
                for (j, ((buf, &w), src)) in self.data.iter_mut().zip(&self.shapes_w).zip(slices).enumerate() {
                    let abs = self.abs[j];
                    push_f16(buf, &src[index * w..(index + 1) * w], abs, &mut self.scratch);
                }
            }
        }
    }

    /// Hand over the filled shard and continue in `spare`'s buffers (emptied; their capacity kept), or in fresh
    /// ones of this shard's capacity.
    fn take(&mut self, spare: Option<ShardBuf>) -> ShardBuf {
        let cap = self.tokens.capacity();
        let (mut tokens, mut positions, mut data) = match spare {
            Some(s) => (s.tokens, s.positions, s.data),
            None => empty_buffers(&self.shapes_w, cap),
        };
        tokens.clear();
        positions.clear();
        data.iter_mut().for_each(Vec::clear);
        let next = ShardBuf {
            tokens,
            positions,
            data,
            names: self.names.clone(),
            shapes_w: self.shapes_w.clone(),
            row_bytes: self.row_bytes,
            sequences: 0,
            start: self.end,
            end: self.end,
            abs: self.abs.clone(),
            scratch: Vec::new(),
        };
        std::mem::replace(self, next)
    }
}

/// Shard writes in flight, at most [`WRITERS`] at once, so one shard's copy into the page cache overlaps another's
/// fsync and the disk stays busy. Writer N commits the manifest only after writer N-1 has committed its own, so
/// the manifest never names a shard that is not whole; each writer hands its buffers back for reuse as soon as
/// its shard is written.
struct Writers {
    /// The latest writer; joining it means every shard handed over so far is on disk and in the manifest.
    last: Option<std::thread::JoinHandle<Result<()>>>,
    pool_tx: std::sync::mpsc::Sender<ShardBuf>,
    pool_rx: std::sync::mpsc::Receiver<ShardBuf>,
    /// Shard buffers allocated besides the first.
    allocated: usize,
}

const WRITERS: usize = 2;

/// Returns a shard's buffers to the pool when dropped, also if the write failed or panicked, so the recorder
/// never waits for buffers that will not come back.
struct Recycle(Option<ShardBuf>, std::sync::mpsc::Sender<ShardBuf>);

impl Drop for Recycle {
    fn drop(&mut self) {
        if let Some(b) = self.0.take() {
            let _ = self.1.send(b);
        }
    }
}

impl Writers {
    fn new() -> Self {
        let (pool_tx, pool_rx) = std::sync::mpsc::channel();
        Writers { last: None, pool_tx, pool_rx, allocated: 0 }
    }

    /// Buffers to go on filling: recycled ones, fresh ones while fewer than [`WRITERS`] writes can be in flight,
    /// else the next to come back.
    fn spare(&mut self) -> Option<ShardBuf> {
        if let Ok(b) = self.pool_rx.try_recv() {
            return Some(b);
        }
        if self.allocated < WRITERS {
            self.allocated += 1;
            return None;
        }
        self.pool_rx.recv().ok()
    }

    /// Wait for every write handed over so far.
    fn finish(&mut self) -> Result<()> {
        match self.last.take() {
            Some(h) => join(h),
            None => Ok(()),
        }
    }
}

fn join(h: std::thread::JoinHandle<Result<()>>) -> Result<()> {
    h.join().map_err(|_| CollectError::Invalid("a shard writer thread panicked".into()))?
}

/// Hand the shard to a writer thread and go on in spare buffers; the writer updates the manifest once this shard
/// and every earlier one are on disk. A failed earlier write surfaces here.
fn flush(dir: &Path, m: &mut ActsManifest, shard: &mut ShardBuf, writers: &mut Writers) -> Result<()> {
    if writers.last.as_ref().is_some_and(|h| h.is_finished()) {
        writers.finish()?;
    }
    let spare = writers.spare();
    let buf = shard.take(spare);
    let idx = m.shards.len();
    let file = format!("shard-{idx:05}.safetensors");
    let tokens = buf.tokens.len();
    let bytes = tokens as u64 * m.bytes_per_token;
    m.shards.push(ShardInfo { file: file.clone(), tokens, sequences: buf.sequences, bytes, start: buf.start, end: buf.end });
    m.tokens += tokens;
    let snapshot = m.clone();
    let dir = dir.to_path_buf();
    let prev = writers.last.take();
    let recycle = Recycle(Some(buf), writers.pool_tx.clone());
    writers.last = Some(std::thread::spawn(move || {
        let path = dir.join(&file);
        let written = write_shard(&path, recycle.0.as_ref().expect("the shard being written"));
        drop(recycle);
        let before = prev.map(join).unwrap_or(Ok(()));
        written?;
        before?;
        let mpath = dir.join("manifest.json");
        manifest::write_json(&mpath, &snapshot).map_err(|e| CollectError::io(&mpath, e))
    }));
    Ok(())
}

fn write_shard(path: &Path, buf: &ShardBuf) -> Result<()> {
    let t = buf.tokens.len();
    let tok_bytes: Vec<u8> = buf.tokens.iter().flat_map(|x| x.to_le_bytes()).collect();
    let pos_bytes: Vec<u8> = buf.positions.iter().flat_map(|x| x.to_le_bytes()).collect();
    let bad = |e: safetensors::SafeTensorError| CollectError::Shard { path: path.to_path_buf(), msg: e.to_string() };
    let mut views: Vec<(String, TensorView<'_>)> = vec![
        ("tokens".into(), TensorView::new(Dtype::U32, vec![t], &tok_bytes).map_err(bad)?),
        ("positions".into(), TensorView::new(Dtype::U32, vec![t], &pos_bytes).map_err(bad)?),
    ];
    for ((name, data), &w) in buf.names.iter().zip(&buf.data).zip(&buf.shapes_w) {
        views.push((name.clone(), TensorView::new(Dtype::F16, vec![t, w], data).map_err(bad)?));
    }
    let meta: HashMap<String, String> = [("format".to_string(), ACTS_FORMAT.to_string())].into_iter().collect();
    let tmp = manifest::tmp_path(path);
    safetensors::serialize_to_file(views, Some(meta), &tmp).map_err(bad)?;
    manifest::commit_tmp(&tmp, path).map_err(|e| CollectError::io(path, e))
}

/// Check a text file exists, is not empty, and starts as UTF-8 text (no NUL bytes); return its size.
fn sniff_text(path: &Path) -> Result<u64> {
    let meta = std::fs::metadata(path).map_err(|e| CollectError::io(path, e))?;
    if !meta.is_file() {
        return Err(CollectError::text(path, "not a regular file"));
    }
    if meta.len() == 0 {
        return Err(CollectError::text(path, "empty text file (0 bytes)"));
    }
    let mut f = std::fs::File::open(path).map_err(|e| CollectError::io(path, e))?;
    let mut buf = vec![0u8; 64 * 1024];
    let n = read_full(&mut f, &mut buf).map_err(|e| CollectError::io(path, e))?;
    check_text(path, &buf[..n], 0, n < buf.len())?;
    Ok(meta.len())
}

/// `bytes` (read from `offset`) must hold no NUL and be valid UTF-8, except for a character cut at the end when
/// the file goes on.
fn check_text(path: &Path, bytes: &[u8], offset: u64, at_eof: bool) -> Result<()> {
    if let Some(i) = bytes.iter().position(|&b| b == 0) {
        return Err(CollectError::text(path, format!("binary file, not text (NUL byte at offset {})", offset + i as u64)));
    }
    if let Err(e) = std::str::from_utf8(bytes) {
        let cut_char = e.error_len().is_none() && !at_eof;
        if !cut_char {
            return Err(CollectError::text(
                path,
                format!("not UTF-8 text (invalid byte at offset {})", offset + e.valid_up_to() as u64),
            ));
        }
    }
    Ok(())
}

fn read_full(f: &mut std::fs::File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        let k = f.read(&mut buf[n..])?;
        if k == 0 {
            break;
        }
        n += k;
    }
    Ok(n)
}

/// Tokens of the concatenated text files, read and tokenized a chunk at a time. Chunk boundaries depend only on
/// the file's bytes from the chunk's start, so restarting at a recorded [`TextPos`] yields the same tokens.
pub struct TokenStream<'a> {
    tok: &'a Tokenizer,
    sources: Vec<PathBuf>,
    chunk_bytes: usize,
    /// Start of the current chunk; `skip` is the index of the next token in `buf`.
    pos: TextPos,
    buf: Vec<u32>,
    next_offset: u64,
    loaded: bool,
}

impl<'a> TokenStream<'a> {
    pub fn new(tok: &'a Tokenizer, sources: Vec<PathBuf>, chunk_bytes: usize, start: TextPos) -> Result<Self> {
        Ok(TokenStream { tok, sources, chunk_bytes: chunk_bytes.max(16), pos: start, buf: Vec::new(), next_offset: 0, loaded: false })
    }

    /// Where the next token comes from.
    pub fn pos(&self) -> TextPos {
        self.pos
    }

    pub fn next_token(&mut self) -> Result<Option<u32>> {
        loop {
            if self.pos.source >= self.sources.len() {
                return Ok(None);
            }
            if !self.loaded {
                self.load_chunk()?;
            }
            if self.pos.skip < self.buf.len() {
                let t = self.buf[self.pos.skip];
                self.pos.skip += 1;
                return Ok(Some(t));
            }
            // Chunk used up: move to the next one (or the next file).
            let path = &self.sources[self.pos.source];
            let len = std::fs::metadata(path).map_err(|e| CollectError::io(path, e))?.len();
            if self.next_offset >= len {
                self.pos = TextPos { source: self.pos.source + 1, offset: 0, skip: 0 };
            } else {
                self.pos = TextPos { source: self.pos.source, offset: self.next_offset, skip: 0 };
            }
            self.loaded = false;
        }
    }

    fn load_chunk(&mut self) -> Result<()> {
        let path = self.sources[self.pos.source].clone();
        let mut f = std::fs::File::open(&path).map_err(|e| CollectError::io(&path, e))?;
        let len = f.metadata().map_err(|e| CollectError::io(&path, e))?.len();
        f.seek(SeekFrom::Start(self.pos.offset)).map_err(|e| CollectError::io(&path, e))?;
        let mut buf = vec![0u8; self.chunk_bytes];
        let n = read_full(&mut f, &mut buf).map_err(|e| CollectError::io(&path, e))?;
        buf.truncate(n);
        let at_eof = self.pos.offset + n as u64 >= len;
        check_text(&path, &buf, self.pos.offset, at_eof)?;
        let cut = if at_eof { n } else { cut_point(&buf) };
        let text = std::str::from_utf8(&buf[..cut]).map_err(|e| {
            CollectError::text(&path, format!("not UTF-8 text (invalid byte at offset {})", self.pos.offset + e.valid_up_to() as u64))
        })?;
        let enc = self
            .tok
            .encode(text, false)
            .map_err(|e| CollectError::text(&path, format!("tokenization failed at offset {}: {e}", self.pos.offset)))?;
        self.buf = enc.get_ids().to_vec();
        self.next_offset = self.pos.offset + cut as u64;
        self.loaded = true;
        Ok(())
    }
}

/// Where to cut a chunk that is not the end of the file: after its last newline, else after its last ASCII
/// whitespace, else at its last character boundary. Never 0 for a chunk of 16 bytes or more.
fn cut_point(buf: &[u8]) -> usize {
    if let Some(i) = buf.iter().rposition(|&b| b == b'\n') {
        if i > 0 {
            return i + 1;
        }
    }
    if let Some(i) = buf.iter().rposition(|b| b.is_ascii_whitespace()) {
        if i > 0 {
            return i + 1;
        }
    }
    match std::str::from_utf8(buf) {
        Ok(_) => buf.len(),
        Err(e) => e.valid_up_to().max(1),
    }
}

pub fn read_acts_manifest(path: &Path) -> Result<ActsManifest> {
    let text = std::fs::read_to_string(path).map_err(|e| CollectError::io(path, e))?;
    let m: ActsManifest = serde_json::from_str(&text).map_err(|e| CollectError::run(path, format!("invalid activations manifest: {e}")))?;
    if m.format != ACTS_FORMAT {
        return Err(CollectError::run(path, format!("field `format`: expected `{ACTS_FORMAT}`, found `{}`", m.format)));
    }
    Ok(m)
}

/// A finished collection, opened for reading (by `train-predictors`).
pub struct Activations {
    pub run: PathBuf,
    pub dir: PathBuf,
    pub manifest: ActsManifest,
}

impl Activations {
    /// Open `run/acts`; a missing run directory, a missing manifest or an unfinished collection is an error.
    pub fn open(run: &Path) -> Result<Self> {
        if !run.is_dir() {
            return Err(CollectError::run(run, "no such run directory (create it with `dejavu collect --out RUN`)"));
        }
        let dir = run.join("acts");
        let mpath = dir.join("manifest.json");
        if !mpath.is_file() {
            return Err(CollectError::run(&mpath, "not found: this is not a run directory with collected activations (run `dejavu collect --out RUN` first)"));
        }
        let manifest = read_acts_manifest(&mpath)?;
        if !manifest.complete {
            return Err(CollectError::run(
                &mpath,
                format!(
                    "collection is not finished ({} of {} tokens); rerun `dejavu collect` with the same arguments to finish it",
                    manifest.tokens, manifest.tokens_requested
                ),
            ));
        }
        Ok(Activations { run: run.to_path_buf(), dir, manifest })
    }

    /// Tap `tap` of `layer` over the first `max_tokens` recorded tokens, as f32 `[T, width]` (row-major).
    pub fn read(&self, layer: usize, tap: Tap, max_tokens: usize) -> Result<(Vec<f32>, usize)> {
        let m = &self.manifest;
        let mpath = self.dir.join("manifest.json");
        let width = m.width(tap).ok_or_else(|| CollectError::run(&mpath, format!("tap `{}` was not recorded", tap.name())))?;
        if layer >= m.layers {
            return Err(CollectError::run(&mpath, format!("layer {layer} out of range ({} layers)", m.layers)));
        }
        let name = tensor_name(layer, tap);
        let total = m.tokens.min(max_tokens);
        let mut out = Vec::with_capacity(total * width);
        for s in &m.shards {
            if out.len() >= total * width {
                break;
            }
            let path = self.dir.join(&s.file);
            let bytes = map_file(&path)?;
            let st = SafeTensors::deserialize(&bytes).map_err(|e| CollectError::Shard { path: path.clone(), msg: e.to_string() })?;
            let view = st.tensor(&name).map_err(|e| CollectError::Shard { path: path.clone(), msg: format!("tensor `{name}`: {e}") })?;
            if view.dtype() != Dtype::F16 || view.shape() != [s.tokens, width] {
                return Err(CollectError::Shard {
                    path,
                    msg: format!("tensor `{name}`: expected F16 [{}, {width}], found {:?} {:?}", s.tokens, view.dtype(), view.shape()),
                });
            }
            let take = (total * width - out.len()).min(s.tokens * width);
            out.extend(view.data()[..2 * take].chunks_exact(2).map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32()));
        }
        Ok((out, total))
    }

    /// Token ids of the first `max_tokens` recorded tokens.
    pub fn tokens(&self, max_tokens: usize) -> Result<Vec<u32>> {
        let total = self.manifest.tokens.min(max_tokens);
        let mut out = Vec::with_capacity(total);
        for s in &self.manifest.shards {
            if out.len() >= total {
                break;
            }
            let path = self.dir.join(&s.file);
            let bytes = map_file(&path)?;
            let st = SafeTensors::deserialize(&bytes).map_err(|e| CollectError::Shard { path: path.clone(), msg: e.to_string() })?;
            let view = st.tensor("tokens").map_err(|e| CollectError::Shard { path: path.clone(), msg: format!("tensor `tokens`: {e}") })?;
            let take = (total - out.len()).min(s.tokens);
            out.extend(view.data()[..4 * take].chunks_exact(4).map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]])));
        }
        Ok(out)
    }
}

fn map_file(path: &Path) -> Result<memmap2::Mmap> {
    let f = std::fs::File::open(path).map_err(|e| CollectError::io(path, e))?;
    // SAFETY: shards are written once (atomically) and not modified while a run reads them.
    unsafe { memmap2::Mmap::map(&f) }.map_err(|e| CollectError::io(path, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cut_prefers_newline_then_space() {
        assert_eq!(cut_point(b"ab\ncd ef"), 3);
        assert_eq!(cut_point(b"abcd ef"), 5);
        assert_eq!(cut_point("abé".as_bytes()), 4);
        assert_eq!(cut_point(&"abé".as_bytes()[..3]), 2);
    }

    #[test]
    fn binary_and_bad_utf8_are_refused() {
        let p = Path::new("x.txt");
        assert!(check_text(p, b"ab\0c", 0, true).unwrap_err().to_string().contains("NUL byte at offset 2"));
        assert!(check_text(p, b"ab\xffc", 10, true).unwrap_err().to_string().contains("offset 12"));
        // A character cut by the chunk end is fine when the file goes on.
        assert!(check_text(p, &"é".as_bytes()[..1], 0, false).is_ok());
    }
}
