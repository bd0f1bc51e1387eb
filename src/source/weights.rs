//! Host-side tensors as read from a checkpoint: [`RawTensor`] (bytes and dtype, borrowed from the mmap where
//! the file's layout is already the one wanted) and [`HostTensor`] (f32, for the burn reference).

use std::borrow::Cow;

use half::{bf16, f16};

/// Element type of a [`RawTensor`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
pub enum DType {
    F32,
    F16,
    BF16,
}

impl DType {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::F16 | DType::BF16 => 2,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "F32",
            DType::F16 => "F16",
            DType::BF16 => "BF16",
        }
    }
}

/// A tensor's bytes as stored (little-endian, row-major over `shape`), with its dtype.
///
/// `bytes` borrows the checkpoint's memory map when the file already holds the tensor in this layout; it is
/// owned only where the reader had to rewrite it (GGUF q/k un-permute, quant blocks decoded to f16).
#[derive(Debug, Clone, PartialEq)]
pub struct RawTensor<'a> {
    pub dtype: DType,
    pub shape: Vec<usize>,
    pub bytes: Cow<'a, [u8]>,
}

impl RawTensor<'_> {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// True when the bytes are the file's own (no copy was made).
    pub fn is_borrowed(&self) -> bool {
        matches!(self.bytes, Cow::Borrowed(_))
    }

    /// The values in f32 (exact for every dtype here).
    pub fn to_f32(&self) -> Vec<f32> {
        let b = &self.bytes;
        match self.dtype {
            DType::F32 => b.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect(),
            DType::F16 => b.chunks_exact(2).map(|c| f16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
            DType::BF16 => b.chunks_exact(2).map(|c| bf16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
        }
    }

    pub fn to_host(&self) -> HostTensor {
        HostTensor { shape: self.shape.clone(), data: self.to_f32() }
    }
}

/// A tensor read from a checkpoint and converted to f32.
///
/// `data` is row-major over `shape`, and `shape` follows the Hugging Face checkpoint convention
/// (a `Linear` weight is `[out_features, in_features]`, an embedding `[vocab, hidden]`).
#[derive(Debug, Clone, PartialEq)]
pub struct HostTensor {
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

impl HostTensor {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

/// What a checkpoint says about a tensor without reading its data.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct TensorMeta {
    /// The type as stored in the file (`F16`, `Q4_1`, ...).
    pub stored: String,
    /// The dtype [`crate::source::checkpoint::Checkpoint::raw`] hands out.
    pub dtype: DType,
    pub shape: Vec<usize>,
    /// Bytes the tensor occupies in the file.
    pub bytes: usize,
}

/// The engine's storage type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, clap::ValueEnum, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Half {
    F16,
    Bf16,
}

impl Half {
    /// Kernel name suffix.
    pub fn name(self) -> &'static str {
        match self {
            Half::F16 => "f16",
            Half::Bf16 => "bf16",
        }
    }

    /// `v` rounded to this type, as raw 16-bit words.
    pub fn encode(self, v: &[f32]) -> Vec<u16> {
        match self {
            Half::F16 => v.iter().map(|&x| f16::from_f32(x).to_bits()).collect(),
            Half::Bf16 => v.iter().map(|&x| bf16::from_f32(x).to_bits()).collect(),
        }
    }

    /// The type a checkpoint's weights run in by default: bf16 stays bf16 (it may not fit f16's range); f32 and
    /// f16 run in f16.
    pub fn for_checkpoint(d: DType) -> Half {
        if d == DType::BF16 { Half::Bf16 } else { Half::F16 }
    }

    pub fn dtype(self) -> DType {
        match self {
            Half::F16 => DType::F16,
            Half::Bf16 => DType::BF16,
        }
    }
}

