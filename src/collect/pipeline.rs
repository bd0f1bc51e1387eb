//! The collection pipeline: open (or resume) `RUN/acts`, then run the forwards on this thread while a recorder
//! thread packs their taps into shards and writer threads put them on disk.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use burn::tensor::{backend::Backend, DType, FloatDType, Tensor, TensorData};
use tokenizers::Tokenizer;

use super::shard::{bytes_per_token, flush, ShardBuf, Tap, Writers};
use super::text::{sniff_text, TextPos, TokenStream};
use super::{read_acts_manifest, ActsManifest, TapInfo, TextSource};
use crate::error::{Error, Result};
use crate::config::{Family, ModelConfig};
use crate::decode::DecodeError;
use crate::model::{Model, TapSet};
use crate::source::ModelIdentity;
use crate::store::{self, human_bytes, ArtifactHeader, RunDir, ACTS_FORMAT, ACTS_VERSION};

/// Environment variable (tests only): sleep this many milliseconds after each forward, so a test can kill a run
/// in the middle.
pub const SLOW_ENV: &str = "DEJAVU_TEST_FORWARD_DELAY_MS";

/// What `dejavu collect` was asked to do; recorded, resolved, in the manifest's header.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
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
            return Err(Error::option("tokens", "must be at least 1"));
        }
        if opts.batch == 0 {
            return Err(Error::option("batch", "must be at least 1"));
        }
        let bos = cfg.bos_token_id;
        let min_len = if bos.is_some() { 2 } else { 1 };
        if opts.seq_len < min_len {
            return Err(Error::option("seq_len", format!("must be at least {min_len} (got {})", opts.seq_len)));
        }
        if let Some(max) = cfg.position_limit().filter(|&max| opts.seq_len > max) {
            return Err(Error::option("seq_len", format!("{} exceeds the model's max_position_embeddings {max}", opts.seq_len)));
        }
        if opts.texts.is_empty() {
            return Err(Error::option("texts", "give at least one text file"));
        }
        let mut sources = Vec::new();
        for p in &opts.texts {
            sources.push(TextSource { path: p.clone(), bytes: sniff_text(p)? });
        }
        let run = RunDir::at(out);
        let (dir, mpath) = (run.acts(), run.acts_manifest());
        let taps: Vec<TapInfo> = Tap::for_family(cfg.family)
            .into_iter()
            .map(|t| TapInfo { tap: t, width: t.width(cfg), dtype: "F16".into(), what: t.describe(cfg.family).into() })
            .collect();
        let manifest = if mpath.exists() {
            let m = read_acts_manifest(&mpath, Some(&identity))?;
            let differs = |what: &str, was: String, now: String| {
                Error::format(
                    &mpath,
                    format!("this run was started with {what} {was}, not {now}; rerun with the same options or use another run directory"),
                )
            };
            if m.seq_len != opts.seq_len {
                return Err(differs("seq_len", m.seq_len.to_string(), opts.seq_len.to_string()));
            }
            if m.tokens_requested != opts.tokens {
                return Err(differs("tokens", m.tokens_requested.to_string(), opts.tokens.to_string()));
            }
            let show = |s: &[TextSource]| s.iter().map(|t| format!("{} ({} bytes)", t.path.display(), t.bytes)).collect::<Vec<_>>().join(", ");
            if m.sources != sources {
                return Err(differs("texts", show(&m.sources), show(&sources)));
            }
            if m.chunk_bytes != opts.chunk_bytes {
                return Err(differs("chunk_bytes", m.chunk_bytes.to_string(), opts.chunk_bytes.to_string()));
            }
            m
        } else {
            ActsManifest {
                header: ArtifactHeader::new(ACTS_FORMAT, ACTS_VERSION, identity, &opts),
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
            let free = store::free_bytes(out).map_err(|e| Error::io(out, e))?;
            if need > free {
                return Err(Error::format(
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
        RunDir::create(out)?;
        std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
        // Leftovers of a killed write; the shard they held is recomputed.
        store::remove_stale_tmp(&dir);
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
                    let packed = shard.check_forward(f.rows.len(), f.rows[0].ids.len(), &f.datas)?;
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
                            return Err(DecodeError::TokenOutOfVocab { id: bad, vocab: cfg.vocab_size }.into());
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
            let rec = recorder.join().unwrap_or_else(|_| Err(Error::Internal("the recorder thread panicked".into())));
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
            return Err(Error::format(names, "the text produced no tokens"));
        }
        let mpath = self.dir.join("manifest.json");
        store::write_json(&mpath, &*m)?;
        report.write_wait_seconds += tw.elapsed().as_secs_f64();
        report.tokens = m.tokens;
        report.shards = m.shards.len();
        report.text_exhausted = m.text_exhausted;
        report.bytes = m.shards.iter().map(|s| s.bytes).sum();
        report.seconds = t0.elapsed().as_secs_f64();
        Ok(report)
    }
}

pub(super) struct Row {
    pub(super) ids: Vec<u32>,
    pub(super) end: TextPos,
}

/// One forward's rows and their taps as read back, on their way to the recorder thread.
pub(super) struct Forwarded {
    pub(super) rows: Vec<Row>,
    pub(super) datas: Vec<TensorData>,
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
