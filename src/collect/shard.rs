//! The shard format and its writers: which taps a shard holds ([`Tap`]), the in-memory shard the recorder fills,
//! and the writer threads that put full shards on disk and commit the manifest after them.

use std::collections::HashMap;
use std::path::Path;

use burn::tensor::{backend::Backend, DType, Tensor, TensorData};
use safetensors::{tensor::TensorView, Dtype};

use super::{ActsManifest, ShardInfo, TextPos};
use crate::error::{Error, Result};
use crate::config::{Family, ModelConfig};
use crate::store::{self, ACTS_FORMAT, ACTS_VERSION};
use crate::model::LayerTaps;

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
    pub(super) fn describe(self, family: Family) -> &'static str {
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
    pub(super) fn take<B: Backend>(self, lt: &mut LayerTaps<B>) -> Option<Tensor<B, 3>> {
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

/// Bytes one recorded token takes on disk (f16 taps over all layers, plus its id and position).
pub fn bytes_per_token(cfg: &ModelConfig) -> u64 {
    let per_layer: usize = Tap::for_family(cfg.family).iter().map(|t| t.width(cfg)).sum();
    (2 * cfg.layers * per_layer + 8) as u64
}

/// One forward's taps as the host received them: packed f16 bytes, or one f32 slice per (layer, tap).
pub(super) enum Packed<'a> {
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
pub(super) struct ShardBuf {
    pub(super) tokens: Vec<u32>,
    positions: Vec<u32>,
    data: Vec<Vec<u8>>,
    names: Vec<String>,
    shapes_w: Vec<usize>,
    /// f16 bytes per token in the packed forward output.
    row_bytes: usize,
    pub(super) sequences: usize,
    start: TextPos,
    pub(super) end: TextPos,
    /// Per (layer, tap): store magnitudes (Llama MLP taps) on the host path.
    abs: Vec<bool>,
    scratch: Vec<half::f16>,
}

impl ShardBuf {
    /// Empty buffers with room for `cap` tokens.
    pub(super) fn new(layers: usize, taps: &[Tap], widths: &[usize], family: Family, start: TextPos, cap: usize) -> Self {
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

    /// One forward's taps as read back (`datas`, for `b` rows of `s` tokens), checked against this shard's layout.
    pub(super) fn check_forward<'a>(&self, b: usize, s: usize, datas: &'a [TensorData]) -> Result<Packed<'a>> {
        let bad = |what: String| Error::Internal(format!("reading the taps back: {what}"));
        if let [d] = datas {
            if d.dtype != DType::F16 || d.as_bytes().len() != b * s * self.row_bytes {
                return Err(bad(format!("got {:?} with {} bytes, expected F16 with {}", d.dtype, d.as_bytes().len(), b * s * self.row_bytes)));
            }
            return Ok(Packed::F16(d.as_bytes()));
        }
        let slices = datas.iter().map(|d| d.as_slice::<f32>().map_err(|e| bad(format!("{e:?}")))).collect::<Result<Vec<_>>>()?;
        for (sl, &w) in slices.iter().zip(&self.shapes_w) {
            if sl.len() != b * s * w {
                return Err(bad(format!("a tap holds {} values, expected {}", sl.len(), b * s * w)));
            }
        }
        Ok(Packed::F32(slices))
    }

    /// Append token `index` (row-major over `[b, s]`) of one forward's taps.
    pub(super) fn push_token(&mut self, id: u32, pos: u32, packed: &Packed<'_>, index: usize) {
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
pub(super) struct Writers {
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
    pub(super) fn new() -> Self {
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
    pub(super) fn finish(&mut self) -> Result<()> {
        match self.last.take() {
            Some(h) => join(h),
            None => Ok(()),
        }
    }
}

fn join(h: std::thread::JoinHandle<Result<()>>) -> Result<()> {
    h.join().map_err(|_| Error::Internal("a shard writer thread panicked".into()))?
}

/// Hand the shard to a writer thread and go on in spare buffers; the writer updates the manifest once this shard
/// and every earlier one are on disk. A failed earlier write surfaces here.
pub(super) fn flush(dir: &Path, m: &mut ActsManifest, shard: &mut ShardBuf, writers: &mut Writers) -> Result<()> {
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
        store::write_json(&mpath, &snapshot)
    }));
    Ok(())
}

fn write_shard(path: &Path, buf: &ShardBuf) -> Result<()> {
    let t = buf.tokens.len();
    let tok_bytes: Vec<u8> = buf.tokens.iter().flat_map(|x| x.to_le_bytes()).collect();
    let pos_bytes: Vec<u8> = buf.positions.iter().flat_map(|x| x.to_le_bytes()).collect();
    let bad = |e: safetensors::SafeTensorError| Error::format(path, e.to_string());
    let mut views: Vec<(String, TensorView<'_>)> = vec![
        ("tokens".into(), TensorView::new(Dtype::U32, vec![t], &tok_bytes).map_err(bad)?),
        ("positions".into(), TensorView::new(Dtype::U32, vec![t], &pos_bytes).map_err(bad)?),
    ];
    for ((name, data), &w) in buf.names.iter().zip(&buf.data).zip(&buf.shapes_w) {
        views.push((name.clone(), TensorView::new(Dtype::F16, vec![t, w], data).map_err(bad)?));
    }
    let meta: HashMap<String, String> =
        [("format".to_string(), ACTS_FORMAT.to_string()), ("version".to_string(), ACTS_VERSION.to_string())].into_iter().collect();
    store::write_safetensors(path, views, meta)
}
