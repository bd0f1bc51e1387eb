//! Read GGUF files (versions 2 and 3) as Llama models.
//!
//! [`GgufFile::open`] memory-maps a file and parses its header, metadata and tensor table, checking every
//! length and offset against the file size before anything is allocated, so a malformed or truncated file
//! gives an [`Error`] (whose message starts with the file path) rather than a panic or a huge allocation.
//!
//! On top of the raw reader it offers what the rest of the crate needs to run a GGUF Llama like a Hugging
//! Face checkpoint:
//! - [`GgufFile::read_tensor`] dequantizes F32, F16, BF16, Q8_0, Q4_0 and Q4_1 tensors to f32, in HF
//!   (row-major, slowest dimension first) shape order;
//! - [`GgufFile::hf_config`] writes a Hugging Face style `config.json` from the `llama.*` metadata;
//! - [`GgufFile::hf_tensor_names`] / [`GgufFile::hf_tensor`] expose the tensors under their HF names, with
//!   llama.cpp's q/k row permutation (for its interleaved rotary layout) undone, so they equal the HF weights;
//!   [`GgufFile::hf_raw`] hands out the same tensors as raw bytes (quant blocks decoded to f16);
//! - [`GgufFile::tokenizer`] builds a `tokenizers::Tokenizer` from the file's own byte-level BPE vocabulary,
//!   with the pre-tokenizer llama.cpp uses for the file's `tokenizer.ggml.pre`.
//!
//! Split by concern: [`parse`] (container, metadata, tensor table), [`dequant`] (quant block decoding),
//! [`config`] (`hf_config`), [`tensors`] (HF names through [`crate::source::names`], q/k un-permute, raw bytes)
//! and [`tokenizer`].

mod config;
mod dequant;
mod parse;
mod tensors;
mod tokenizer;

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use memmap2::Mmap;

use crate::error::{Error, Result};
use crate::source::weights::HostTensor;
use parse::{ggml_type_name, MetaValue, TensorInfo};

const SUPPORTED_TYPES: &str = "F32, F16, BF16, Q8_0, Q4_0, Q4_1";

/// A memory-mapped GGUF file.
pub struct GgufFile {
    path: PathBuf,
    mmap: Mmap,
    version: u32,
    metadata: Vec<(String, MetaValue)>,
    meta_index: HashMap<String, usize>,
    tensors: Vec<TensorInfo>,
    tensor_index: HashMap<String, usize>,
}

impl std::fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GgufFile")
            .field("path", &self.path)
            .field("version", &self.version)
            .field("metadata", &self.metadata.len())
            .field("tensors", &self.tensors.len())
            .finish()
    }
}

impl GgufFile {
    /// Memory-map and parse `path`: header, metadata, tensor table. Checks alignment, data offsets and sizes
    /// against the file length.
    pub fn open(path: &Path) -> Result<Self> {
        let io = |e| Error::io(path, e);
        let file = File::open(path).map_err(io)?;
        // SAFETY: the map is read-only; like every reader of memory-mapped model files we assume the file is
        // not truncated or rewritten by another process while it is open.
        let mmap = unsafe { Mmap::map(&file) }.map_err(io)?;
        let h = parse::parse(&mmap, path)?;
        Ok(Self {
            path: path.to_path_buf(),
            mmap,
            version: h.version,
            metadata: h.metadata,
            meta_index: h.meta_index,
            tensors: h.tensors,
            tensor_index: h.tensor_index,
        })
    }

    /// The GGUF format version (2 or 3).
    pub fn version(&self) -> u32 {
        self.version
    }

    fn meta(&self, key: &str) -> Option<&MetaValue> {
        self.meta_index.get(key).map(|&i| &self.metadata[i].1)
    }

    fn meta_err(&self, key: &str, detail: impl Into<String>) -> Error {
        Error::field(&self.path, key, detail)
    }

    fn meta_str(&self, key: &str) -> Result<Option<&str>> {
        match self.meta(key) {
            None => Ok(None),
            Some(MetaValue::Str(s)) => Ok(Some(s)),
            Some(v) => Err(self.meta_err(key, format!("expected a string, found {}", v.type_name()))),
        }
    }

    fn meta_uint_opt(&self, key: &str) -> Result<Option<u64>> {
        match self.meta(key) {
            None => Ok(None),
            Some(v) => match v.as_int() {
                Some(i) if i >= 0 && i <= u64::MAX as i128 => Ok(Some(i as u64)),
                _ => Err(self.meta_err(
                    key,
                    format!("expected a non-negative integer, found {} {v:?}", v.type_name()),
                )),
            },
        }
    }

    fn meta_usize(&self, key: &str) -> Result<usize> {
        let v = self.meta_uint_opt(key)?.ok_or_else(|| self.meta_err(key, "missing"))?;
        usize::try_from(v).map_err(|_| self.meta_err(key, format!("{v} is too large")))
    }

    fn meta_usize_opt(&self, key: &str) -> Result<Option<usize>> {
        match self.meta_uint_opt(key)? {
            None => Ok(None),
            Some(v) => usize::try_from(v)
                .map(Some)
                .map_err(|_| self.meta_err(key, format!("{v} is too large"))),
        }
    }

    fn meta_f64_opt(&self, key: &str) -> Result<Option<f64>> {
        match self.meta(key) {
            None => Ok(None),
            Some(v) => v
                .as_f64()
                .map(Some)
                .ok_or_else(|| self.meta_err(key, format!("expected a number, found {}", v.type_name()))),
        }
    }

    fn meta_bool_opt(&self, key: &str) -> Result<Option<bool>> {
        match self.meta(key) {
            None => Ok(None),
            Some(MetaValue::Bool(b)) => Ok(Some(*b)),
            Some(v) => Err(self.meta_err(key, format!("expected a bool, found {}", v.type_name()))),
        }
    }

    fn meta_str_array(&self, key: &str) -> Result<Option<&[String]>> {
        match self.meta(key) {
            None => Ok(None),
            Some(MetaValue::StrArray(v)) => Ok(Some(v)),
            // An empty array of any element type reads as an empty string array.
            Some(MetaValue::IntArray(_, v)) if v.is_empty() => Ok(Some(&[])),
            Some(v) => Err(self.meta_err(key, format!("expected a string array, found {}", v.type_name()))),
        }
    }

    fn meta_int_array(&self, key: &str) -> Result<Option<&[i64]>> {
        match self.meta(key) {
            None => Ok(None),
            Some(MetaValue::IntArray(_, v)) => Ok(Some(v)),
            Some(MetaValue::StrArray(v)) if v.is_empty() => Ok(Some(&[])),
            Some(v) => Err(self.meta_err(key, format!("expected an integer array, found {}", v.type_name()))),
        }
    }

    /// `general.architecture`.
    pub fn architecture(&self) -> Result<&str> {
        self.meta_str("general.architecture")?
            .ok_or_else(|| self.meta_err("general.architecture", "missing"))
    }

    /// Metadata keys, in file order.
    pub fn metadata_keys(&self) -> Vec<&str> {
        self.metadata.iter().map(|(k, _)| k.as_str()).collect()
    }

    /// Tensor names as stored in the file (GGUF names), in file order.
    pub fn tensor_names(&self) -> Vec<&str> {
        self.tensors.iter().map(|t| t.name.as_str()).collect()
    }

    fn tensor_info(&self, gguf_name: &str) -> Result<&TensorInfo> {
        self.tensor_index
            .get(gguf_name)
            .map(|&i| &self.tensors[i])
            .ok_or_else(|| Error::tensor(&self.path, gguf_name, "no such tensor in the file"))
    }

    /// HF (row-major, slowest first) shape of a tensor: GGUF lists dimensions fastest first.
    fn hf_shape(&self, t: &TensorInfo) -> Result<Vec<usize>> {
        t.dims.iter().rev().map(|&d| usize::try_from(d)).collect::<Result<Vec<_>, _>>().map_err(|_| Error::tensor(&self.path, &t.name, "dimension does not fit in usize"))
    }

    /// The stored bytes of a tensor, borrowed from the map.
    fn tensor_bytes(&self, t: &TensorInfo) -> Result<&[u8]> {
        self.mmap.get(t.start..t.start + t.len).ok_or_else(|| Error::tensor(&self.path, &t.name, "data out of bounds"))
    }

    fn unsupported(&self, t: &TensorInfo) -> Error {
        let msg = format!("unsupported quant type {} ({}); supported: {SUPPORTED_TYPES}", ggml_type_name(t.type_id), t.type_id);
        Error::tensor(&self.path, &t.name, msg)
    }

    /// Read a tensor by its GGUF name, dequantized to f32. The shape is row-major in HF order (GGUF lists
    /// dimensions fastest first, so they are reversed): `token_embd.weight` of GGUF dims `[576, 49152]` reads
    /// as `[49152, 576]`.
    pub fn read_tensor(&self, gguf_name: &str) -> Result<HostTensor> {
        let t = self.tensor_info(gguf_name)?;
        let shape = self.hf_shape(t)?;
        let data = dequant::dequantize(t.type_id, self.tensor_bytes(t)?).ok_or_else(|| self.unsupported(t))?;
        Ok(HostTensor { shape, data })
    }
}

#[cfg(test)]
mod tests;
