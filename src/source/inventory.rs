//! What a checkpoint holds (config summary, dtype mix, one row per tensor) and a streaming read of every
//! tensor's raw bytes, the way the GPU uploader will read them: borrow, use, release; no f32 copy.

use std::collections::BTreeMap;
use std::time::Instant;

use crate::config::{Family, ModelConfig};
use crate::error::Result;
use crate::source::checkpoint::Checkpoint;
use crate::source::weights::DType;

/// One tensor as the file stores it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct TensorRow {
    pub name: String,
    /// Type in the file (`F16`, `Q4_1`, ...).
    pub stored: String,
    /// Type [`Checkpoint::raw`] hands out.
    pub dtype: DType,
    pub shape: Vec<usize>,
    /// Bytes in the file.
    pub bytes: usize,
}

/// Count and bytes of the tensors of one stored type.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct DtypeShare {
    pub tensors: usize,
    pub bytes: usize,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct Inventory {
    pub family: Family,
    pub layers: usize,
    pub hidden: usize,
    pub ffn: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub vocab: usize,
    /// Elements over every tensor in the checkpoint.
    pub params: usize,
    /// Bytes over every tensor in the checkpoint.
    pub bytes: usize,
    /// Stored type -> share.
    pub dtypes: BTreeMap<String, DtypeShare>,
    pub tensors: Vec<TensorRow>,
}

impl Inventory {
    /// Read every tensor's metadata (no tensor data).
    pub fn new(cfg: &ModelConfig, ck: &dyn Checkpoint) -> Result<Self> {
        let mut tensors = Vec::new();
        let mut dtypes: BTreeMap<String, DtypeShare> = BTreeMap::new();
        for name in ck.names() {
            let m = ck.meta(&name)?;
            let share = dtypes.entry(m.stored.clone()).or_default();
            share.tensors += 1;
            share.bytes += m.bytes;
            tensors.push(TensorRow { name, stored: m.stored, dtype: m.dtype, shape: m.shape, bytes: m.bytes });
        }
        Ok(Inventory {
            family: cfg.family,
            layers: cfg.layers,
            hidden: cfg.hidden,
            ffn: cfg.ffn,
            heads: cfg.heads,
            kv_heads: cfg.kv_heads,
            vocab: cfg.vocab_size,
            params: tensors.iter().map(|t| t.shape.iter().product::<usize>()).sum(),
            bytes: tensors.iter().map(|t| t.bytes).sum(),
            dtypes,
            tensors,
        })
    }
}

/// The outcome of [`read_all`].
#[derive(Debug, Clone, serde::Serialize)]
pub struct ReadStats {
    pub tensors: usize,
    /// Bytes handed out by `raw` (f16 for decoded quant blocks, so it can exceed the file's bytes).
    pub bytes: usize,
    /// How many of them came straight from the file's memory map.
    pub borrowed_bytes: usize,
    pub seconds: f64,
    /// A wrapping sum over the bytes as little-endian u64 words (tail bytes one by one), to prove they were read.
    pub checksum: u64,
}

impl ReadStats {
    pub fn gb_per_s(&self) -> f64 {
        self.bytes as f64 / 1e9 / self.seconds.max(1e-9)
    }
}

/// Stream every tensor through [`Checkpoint::raw`]: checksum its bytes, drop them, [`Checkpoint::release`]
/// its pages. `on_tensor` is called after each tensor with the bytes read so far.
pub fn read_all(ck: &dyn Checkpoint, mut on_tensor: impl FnMut(usize)) -> Result<ReadStats> {
    let t0 = Instant::now();
    let mut st = ReadStats { tensors: 0, bytes: 0, borrowed_bytes: 0, seconds: 0.0, checksum: 0 };
    for name in ck.names() {
        let raw = ck.raw(&name)?;
        st.checksum = st.checksum.wrapping_add(checksum(&raw.bytes));
        st.bytes += raw.bytes.len();
        if raw.is_borrowed() {
            st.borrowed_bytes += raw.bytes.len();
        }
        st.tensors += 1;
        drop(raw);
        ck.release(&name);
        on_tensor(st.bytes);
    }
    st.seconds = t0.elapsed().as_secs_f64();
    Ok(st)
}

fn checksum(bytes: &[u8]) -> u64 {
    let words = bytes.chunks_exact(8);
    let tail: u64 = words.remainder().iter().map(|&b| b as u64).sum();
    words.fold(tail, |acc, w| {
        acc.wrapping_add(u64::from_le_bytes([w[0], w[1], w[2], w[3], w[4], w[5], w[6], w[7]]))
    })
}
