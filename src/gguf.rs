//! Read GGUF files (versions 2 and 3) as Llama models.
//!
//! [`GgufFile::open`] memory-maps a file and parses its header, metadata and tensor table, checking every
//! length and offset against the file size before anything is allocated, so a malformed or truncated file
//! gives a [`GgufError`] (whose message starts with the file path) rather than a panic or a huge allocation.
//!
//! On top of the raw reader it offers what the rest of the crate needs to run a GGUF Llama like a Hugging
//! Face checkpoint:
//! - [`GgufFile::read_tensor`] dequantizes F32, F16, BF16, Q8_0, Q4_0 and Q4_1 tensors to f32, in HF
//!   (row-major, slowest dimension first) shape order;
//! - [`GgufFile::hf_config`] writes a Hugging Face style `config.json` from the `llama.*` metadata;
//! - [`GgufFile::hf_tensor_names`] / [`GgufFile::hf_tensor`] expose the tensors under their HF names, with
//!   llama.cpp's q/k row permutation (for its interleaved rotary layout) undone, so they equal the HF weights;
//! - [`GgufFile::tokenizer`] builds a `tokenizers::Tokenizer` from the file's own byte-level BPE vocabulary,
//!   with the pre-tokenizer llama.cpp uses for the file's `tokenizer.ggml.pre`.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use half::{bf16, f16};
use memmap2::Mmap;
use serde_json::{json, Value as Json};

use crate::weights::HostTensor;

const MAGIC: [u8; 4] = *b"GGUF";
const DEFAULT_ALIGNMENT: u64 = 32;
/// ggml's GGML_MAX_DIMS.
const MAX_DIMS: u32 = 4;
/// Nesting limit for metadata arrays of arrays.
const MAX_ARRAY_DEPTH: u32 = 8;
/// Counts in the file only bound how much is reserved up front; longer lists grow as their bytes are parsed,
/// so memory stays proportional to the bytes actually present.
const PREALLOC_ITEMS: usize = 1 << 16;
const SUPPORTED_TYPES: &str = "F32, F16, BF16, Q8_0, Q4_0, Q4_1";

/// Everything that can go wrong reading a GGUF file. Every message starts with the file path and is one line.
#[derive(Debug, thiserror::Error)]
pub enum GgufError {
    #[error("{path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: not a GGUF file (magic bytes {found}, expected 47 47 55 46 \"GGUF\")")]
    BadMagic { path: String, found: String },
    #[error("{path}: unsupported GGUF version {version}; supported: 2, 3")]
    UnsupportedVersion { path: String, version: u32 },
    #[error("{path}: malformed header: {detail}")]
    Header { path: String, detail: String },
    #[error("{path}: metadata '{key}': {detail}")]
    Metadata { path: String, key: String, detail: String },
    #[error("{path}: tensor '{tensor}': {detail}")]
    Tensor {
        path: String,
        tensor: String,
        detail: String,
    },
    #[error("{path}: tensor '{tensor}': unsupported quant type {type_name} ({type_id}); supported: {SUPPORTED_TYPES}")]
    UnsupportedType {
        path: String,
        tensor: String,
        type_name: String,
        type_id: u32,
    },
    #[error("{path}: no tensor named '{tensor}'")]
    NoSuchTensor { path: String, tensor: String },
    #[error("{path}: tokenizer: {detail}")]
    Tokenizer { path: String, detail: String },
}

// ---------------------------------------------------------------------------------------------------------
// ggml tensor types
// ---------------------------------------------------------------------------------------------------------

/// (name, elements per block, bytes per block) of a ggml type id, for every type ggml has defined.
/// The sizes of types this module cannot dequantize are still used to check the tensor lies inside the file.
fn ggml_type_info(id: u32) -> Option<(&'static str, u64, u64)> {
    Some(match id {
        0 => ("F32", 1, 4),
        1 => ("F16", 1, 2),
        2 => ("Q4_0", 32, 18),
        3 => ("Q4_1", 32, 20),
        6 => ("Q5_0", 32, 22),
        7 => ("Q5_1", 32, 24),
        8 => ("Q8_0", 32, 34),
        9 => ("Q8_1", 32, 36),
        10 => ("Q2_K", 256, 84),
        11 => ("Q3_K", 256, 110),
        12 => ("Q4_K", 256, 144),
        13 => ("Q5_K", 256, 176),
        14 => ("Q6_K", 256, 210),
        15 => ("Q8_K", 256, 292),
        16 => ("IQ2_XXS", 256, 66),
        17 => ("IQ2_XS", 256, 74),
        18 => ("IQ3_XXS", 256, 98),
        19 => ("IQ1_S", 256, 50),
        20 => ("IQ4_NL", 32, 18),
        21 => ("IQ3_S", 256, 110),
        22 => ("IQ2_S", 256, 82),
        23 => ("IQ4_XS", 256, 136),
        24 => ("I8", 1, 1),
        25 => ("I16", 1, 2),
        26 => ("I32", 1, 4),
        27 => ("I64", 1, 8),
        28 => ("F64", 1, 8),
        29 => ("IQ1_M", 256, 56),
        30 => ("BF16", 1, 2),
        34 => ("TQ1_0", 256, 54),
        35 => ("TQ2_0", 256, 66),
        39 => ("MXFP4", 32, 17),
        _ => return None,
    })
}

fn ggml_type_name(id: u32) -> String {
    match ggml_type_info(id) {
        Some((name, _, _)) => name.to_string(),
        None => "unknown".to_string(),
    }
}

// ---------------------------------------------------------------------------------------------------------
// Metadata values
// ---------------------------------------------------------------------------------------------------------

/// A metadata value. Arrays of scalars are kept typed and compact (a vocabulary is tens of thousands long).
#[derive(Debug, Clone)]
#[allow(dead_code)] // array payloads that no accessor reads yet are still shown by `Debug` in error messages
enum MetaValue {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    Str(String),
    U64(u64),
    I64(i64),
    F64(f64),
    /// Array of integers (any integer or bool element type), with the element type id.
    IntArray(u32, Vec<i64>),
    FloatArray(u32, Vec<f64>),
    StrArray(Vec<String>),
    /// Array of arrays.
    NestedArray(Vec<MetaValue>),
}

impl MetaValue {
    fn type_name(&self) -> &'static str {
        match self {
            MetaValue::U8(_) => "u8",
            MetaValue::I8(_) => "i8",
            MetaValue::U16(_) => "u16",
            MetaValue::I16(_) => "i16",
            MetaValue::U32(_) => "u32",
            MetaValue::I32(_) => "i32",
            MetaValue::F32(_) => "f32",
            MetaValue::Bool(_) => "bool",
            MetaValue::Str(_) => "string",
            MetaValue::U64(_) => "u64",
            MetaValue::I64(_) => "i64",
            MetaValue::F64(_) => "f64",
            MetaValue::IntArray(..) => "integer array",
            MetaValue::FloatArray(..) => "float array",
            MetaValue::StrArray(_) => "string array",
            MetaValue::NestedArray(_) => "array of arrays",
        }
    }

    fn as_int(&self) -> Option<i128> {
        Some(match *self {
            MetaValue::U8(v) => v.into(),
            MetaValue::I8(v) => v.into(),
            MetaValue::U16(v) => v.into(),
            MetaValue::I16(v) => v.into(),
            MetaValue::U32(v) => v.into(),
            MetaValue::I32(v) => v.into(),
            MetaValue::U64(v) => v.into(),
            MetaValue::I64(v) => v.into(),
            _ => return None,
        })
    }

    /// A float, formatted the way the file's precision writes it (an f32 1e-5 gives 1e-5, not 9.99999974e-6).
    fn as_f64(&self) -> Option<f64> {
        match *self {
            MetaValue::F32(v) => f64::from_str(&v.to_string()).ok(),
            MetaValue::F64(v) => Some(v),
            _ => self.as_int().map(|v| v as f64),
        }
    }
}

// ---------------------------------------------------------------------------------------------------------
// Byte cursor
// ---------------------------------------------------------------------------------------------------------

/// A little-endian cursor over the file bytes; every read is bounds-checked and reports what it was reading.
struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn remaining(&self) -> usize {
        self.buf.len().saturating_sub(self.pos)
    }

    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8], String> {
        if n > self.remaining() {
            return Err(format!(
                "file truncated reading {what}: need {n} bytes at offset {}, file has {} bytes",
                self.pos,
                self.buf.len()
            ));
        }
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    fn array<const N: usize>(&mut self, what: &str) -> Result<[u8; N], String> {
        let s = self.take(N, what)?;
        let mut a = [0u8; N];
        a.copy_from_slice(s);
        Ok(a)
    }

    fn u8(&mut self, what: &str) -> Result<u8, String> {
        Ok(self.array::<1>(what)?[0])
    }
    fn u16(&mut self, what: &str) -> Result<u16, String> {
        Ok(u16::from_le_bytes(self.array(what)?))
    }
    fn u32(&mut self, what: &str) -> Result<u32, String> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }
    fn u64(&mut self, what: &str) -> Result<u64, String> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    /// A length that must fit in what is left of the file at `min_item` bytes per item.
    fn len(&mut self, min_item: usize, what: &str) -> Result<usize, String> {
        let at = self.pos;
        let n = self.u64(what)?;
        let fits = usize::try_from(n)
            .ok()
            .and_then(|n| n.checked_mul(min_item.max(1)))
            .is_some_and(|bytes| bytes <= self.remaining());
        if !fits {
            return Err(format!(
                "{what} at offset {at} claims {n} items of at least {} bytes, but only {} bytes remain in the file",
                min_item.max(1),
                self.remaining()
            ));
        }
        Ok(n as usize)
    }

    fn bytes_string(&mut self, what: &str) -> Result<&'a [u8], String> {
        let n = self.len(1, what)?;
        self.take(n, what)
    }

    fn string(&mut self, what: &str) -> Result<String, String> {
        let at = self.pos;
        let b = self.bytes_string(what)?;
        String::from_utf8(b.to_vec()).map_err(|_| format!("{what} at offset {at} is not valid UTF-8"))
    }

    /// Metadata string values: invalid UTF-8 is replaced rather than rejected (a vocabulary may hold odd bytes).
    fn lossy_string(&mut self, what: &str) -> Result<String, String> {
        let b = self.bytes_string(what)?;
        Ok(String::from_utf8_lossy(b).into_owned())
    }
}

/// Smallest encoded size of one value of a metadata type, used to bound array lengths before allocating.
fn meta_min_size(ty: u32) -> Option<usize> {
    Some(match ty {
        0 | 1 | 7 => 1,
        2 | 3 => 2,
        4..=6 => 4,
        8 => 8,     // string: u64 length
        9 => 4 + 8, // array: element type + u64 count
        10..=12 => 8,
        _ => return None,
    })
}

fn read_meta_value(c: &mut Cursor<'_>, ty: u32, depth: u32, what: &str) -> Result<MetaValue, String> {
    Ok(match ty {
        0 => MetaValue::U8(c.u8(what)?),
        1 => MetaValue::I8(c.u8(what)? as i8),
        2 => MetaValue::U16(c.u16(what)?),
        3 => MetaValue::I16(c.u16(what)? as i16),
        4 => MetaValue::U32(c.u32(what)?),
        5 => MetaValue::I32(c.u32(what)? as i32),
        6 => MetaValue::F32(f32::from_bits(c.u32(what)?)),
        7 => {
            let b = c.u8(what)?;
            match b {
                0 => MetaValue::Bool(false),
                1 => MetaValue::Bool(true),
                _ => return Err(format!("{what}: bool byte is {b}, expected 0 or 1")),
            }
        }
        8 => MetaValue::Str(c.lossy_string(what)?),
        9 => {
            if depth >= MAX_ARRAY_DEPTH {
                return Err(format!("{what}: arrays nested deeper than {MAX_ARRAY_DEPTH}"));
            }
            let elem_ty = c.u32(what)?;
            let min = meta_min_size(elem_ty).ok_or_else(|| format!("{what}: unknown array element type {elem_ty}"))?;
            let n = c.len(min, what)?;
            match elem_ty {
                8 => {
                    let mut v = Vec::with_capacity(n.min(PREALLOC_ITEMS));
                    for _ in 0..n {
                        v.push(c.lossy_string(what)?);
                    }
                    MetaValue::StrArray(v)
                }
                6 | 12 => {
                    let mut v = Vec::with_capacity(n.min(PREALLOC_ITEMS));
                    for _ in 0..n {
                        v.push(match elem_ty {
                            6 => f32::from_bits(c.u32(what)?) as f64,
                            _ => f64::from_bits(c.u64(what)?),
                        });
                    }
                    MetaValue::FloatArray(elem_ty, v)
                }
                9 => {
                    let mut v = Vec::with_capacity(n.min(PREALLOC_ITEMS));
                    for _ in 0..n {
                        v.push(read_meta_value(c, 9, depth + 1, what)?);
                    }
                    MetaValue::NestedArray(v)
                }
                _ => {
                    let mut v = Vec::with_capacity(n.min(PREALLOC_ITEMS));
                    for _ in 0..n {
                        let x = read_meta_value(c, elem_ty, depth + 1, what)?;
                        let i = match x {
                            MetaValue::Bool(b) => i64::from(b),
                            other => other
                                .as_int()
                                .and_then(|i| i64::try_from(i).ok())
                                .ok_or_else(|| format!("{what}: array element {other:?} out of range"))?,
                        };
                        v.push(i);
                    }
                    MetaValue::IntArray(elem_ty, v)
                }
            }
        }
        10 => MetaValue::U64(c.u64(what)?),
        11 => MetaValue::I64(c.u64(what)? as i64),
        12 => MetaValue::F64(f64::from_bits(c.u64(what)?)),
        _ => return Err(format!("{what}: unknown metadata value type {ty}")),
    })
}

// ---------------------------------------------------------------------------------------------------------
// The file
// ---------------------------------------------------------------------------------------------------------

#[derive(Debug, Clone)]
struct TensorInfo {
    name: String,
    /// GGUF order: fastest-varying dimension first.
    dims: Vec<u64>,
    type_id: u32,
    /// Absolute byte range in the file (validated at open).
    start: usize,
    len: usize,
}

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

fn round_up(x: u64, align: u64) -> Option<u64> {
    x.checked_add(align - 1).map(|v| v / align * align)
}

impl GgufFile {
    /// Memory-map and parse `path`: header, metadata, tensor table. Checks alignment, data offsets and sizes
    /// against the file length.
    pub fn open(path: &Path) -> Result<Self, GgufError> {
        let p = path.display().to_string();
        let io = |source| GgufError::Io {
            path: p.clone(),
            source,
        };
        let file = File::open(path).map_err(io)?;
        // SAFETY: the map is read-only; like every reader of memory-mapped model files we assume the file is
        // not truncated or rewritten by another process while it is open.
        let mmap = unsafe { Mmap::map(&file) }.map_err(io)?;
        let header = |detail: String| GgufError::Header {
            path: p.clone(),
            detail,
        };

        let buf: &[u8] = &mmap;
        let mut c = Cursor { buf, pos: 0 };
        if buf.len() < 4 {
            return Err(header(format!(
                "file truncated: {} bytes, too short for the GGUF magic",
                buf.len()
            )));
        }
        let magic = c.array::<4>("magic").map_err(header)?;
        if magic != MAGIC {
            return Err(GgufError::BadMagic {
                path: p.clone(),
                found: magic.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(" "),
            });
        }
        let version = c.u32("version").map_err(header)?;
        if version != 2 && version != 3 {
            return Err(GgufError::UnsupportedVersion {
                path: p.clone(),
                version,
            });
        }
        // Minimal encoded sizes: a tensor info is name len (8) + n_dims (4) + type (4) + offset (8) + >=1 dim (8);
        // a metadata entry is key len (8) + type (4) + >=1 byte of value.
        let n_tensors = c.len(32, "tensor count").map_err(header)?;
        let n_kv = c.len(13, "metadata count").map_err(header)?;

        let mut metadata = Vec::with_capacity(n_kv.min(PREALLOC_ITEMS));
        let mut meta_index = HashMap::with_capacity(n_kv.min(PREALLOC_ITEMS));
        for i in 0..n_kv {
            let key = c.string(&format!("metadata key #{i}")).map_err(header)?;
            let what = format!("metadata '{key}'");
            let ty = c.u32(&what).map_err(header)?;
            let value = read_meta_value(&mut c, ty, 0, &what).map_err(header)?;
            if meta_index.insert(key.clone(), metadata.len()).is_some() {
                return Err(GgufError::Metadata {
                    path: p.clone(),
                    key,
                    detail: "duplicate key".into(),
                });
            }
            metadata.push((key, value));
        }

        let alignment = match meta_index.get("general.alignment").map(|&i| &metadata[i].1) {
            None => DEFAULT_ALIGNMENT,
            Some(MetaValue::U32(a)) if *a > 0 && a.is_power_of_two() => u64::from(*a),
            Some(v) => {
                return Err(GgufError::Metadata {
                    path: p.clone(),
                    key: "general.alignment".into(),
                    detail: format!("must be a u32 power of two, got {} {v:?}", v.type_name()),
                })
            }
        };

        struct RawInfo {
            name: String,
            dims: Vec<u64>,
            type_id: u32,
            offset: u64,
        }
        let mut raw = Vec::with_capacity(n_tensors.min(PREALLOC_ITEMS));
        let mut tensor_index = HashMap::with_capacity(n_tensors.min(PREALLOC_ITEMS));
        for i in 0..n_tensors {
            let name = c.string(&format!("tensor info #{i} name")).map_err(header)?;
            let tensor_err = |detail: String| GgufError::Tensor {
                path: p.clone(),
                tensor: name.clone(),
                detail,
            };
            let n_dims = c.u32("tensor info").map_err(&tensor_err)?;
            if n_dims == 0 || n_dims > MAX_DIMS {
                return Err(tensor_err(format!("{n_dims} dimensions; expected 1 to {MAX_DIMS}")));
            }
            let mut dims = Vec::with_capacity(n_dims as usize);
            for _ in 0..n_dims {
                dims.push(c.u64("tensor dims").map_err(&tensor_err)?);
            }
            let type_id = c.u32("tensor type").map_err(&tensor_err)?;
            let offset = c.u64("tensor offset").map_err(&tensor_err)?;
            if tensor_index.insert(name.clone(), i).is_some() {
                return Err(tensor_err("duplicate tensor name".into()));
            }
            raw.push(RawInfo {
                name,
                dims,
                type_id,
                offset,
            });
        }

        let file_len = buf.len() as u64;
        let data_start = round_up(c.pos as u64, alignment)
            .filter(|&d| d <= file_len)
            .ok_or_else(|| {
                header(format!(
                    "file truncated: tensor data would start at offset {} (aligned to {alignment}), past the end of the {file_len}-byte file",
                    c.pos
                ))
            })?;

        let mut tensors = Vec::with_capacity(raw.len());
        for r in raw {
            let tensor_err = |detail: String| GgufError::Tensor {
                path: p.clone(),
                tensor: r.name.clone(),
                detail,
            };
            let (type_name, block, block_bytes) =
                ggml_type_info(r.type_id).ok_or_else(|| tensor_err(format!("unknown ggml type id {}", r.type_id)))?;
            let numel = r
                .dims
                .iter()
                .try_fold(1u64, |acc, &d| acc.checked_mul(d))
                .ok_or_else(|| tensor_err(format!("dimensions {:?} overflow", r.dims)))?;
            if numel % block != 0 {
                return Err(tensor_err(format!(
                    "{numel} elements is not a multiple of the {type_name} block size {block}"
                )));
            }
            if r.dims[0] % block != 0 {
                return Err(tensor_err(format!(
                    "row length {} is not a multiple of the {type_name} block size {block}",
                    r.dims[0]
                )));
            }
            if r.offset % alignment != 0 {
                return Err(tensor_err(format!(
                    "data offset {} is not a multiple of the alignment {alignment}",
                    r.offset
                )));
            }
            let nbytes = (numel / block)
                .checked_mul(block_bytes)
                .ok_or_else(|| tensor_err("size overflows".into()))?;
            let start = data_start.checked_add(r.offset);
            let end = start.and_then(|s| s.checked_add(nbytes));
            let (start, end) = match (start, end) {
                (Some(s), Some(e)) if e <= file_len => (s, e),
                _ => {
                    return Err(tensor_err(format!(
                        "data [{} + {}, {nbytes} bytes) lies beyond the end of the file ({file_len} bytes)",
                        data_start, r.offset
                    )))
                }
            };
            tensors.push(TensorInfo {
                name: r.name,
                dims: r.dims,
                type_id: r.type_id,
                start: start as usize,
                len: (end - start) as usize,
            });
        }

        Ok(Self {
            path: path.to_path_buf(),
            mmap,
            version,
            metadata,
            meta_index,
            tensors,
            tensor_index,
        })
    }

    fn p(&self) -> String {
        self.path.display().to_string()
    }

    /// The GGUF format version (2 or 3).
    pub fn version(&self) -> u32 {
        self.version
    }

    fn meta(&self, key: &str) -> Option<&MetaValue> {
        self.meta_index.get(key).map(|&i| &self.metadata[i].1)
    }

    fn meta_err(&self, key: &str, detail: impl Into<String>) -> GgufError {
        GgufError::Metadata {
            path: self.p(),
            key: key.to_string(),
            detail: detail.into(),
        }
    }

    fn meta_str(&self, key: &str) -> Result<Option<&str>, GgufError> {
        match self.meta(key) {
            None => Ok(None),
            Some(MetaValue::Str(s)) => Ok(Some(s)),
            Some(v) => Err(self.meta_err(key, format!("expected a string, found {}", v.type_name()))),
        }
    }

    fn meta_uint_opt(&self, key: &str) -> Result<Option<u64>, GgufError> {
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

    fn meta_usize(&self, key: &str) -> Result<usize, GgufError> {
        let v = self.meta_uint_opt(key)?.ok_or_else(|| self.meta_err(key, "missing"))?;
        usize::try_from(v).map_err(|_| self.meta_err(key, format!("{v} is too large")))
    }

    fn meta_usize_opt(&self, key: &str) -> Result<Option<usize>, GgufError> {
        match self.meta_uint_opt(key)? {
            None => Ok(None),
            Some(v) => usize::try_from(v)
                .map(Some)
                .map_err(|_| self.meta_err(key, format!("{v} is too large"))),
        }
    }

    fn meta_f64_opt(&self, key: &str) -> Result<Option<f64>, GgufError> {
        match self.meta(key) {
            None => Ok(None),
            Some(v) => v
                .as_f64()
                .map(Some)
                .ok_or_else(|| self.meta_err(key, format!("expected a number, found {}", v.type_name()))),
        }
    }

    fn meta_bool_opt(&self, key: &str) -> Result<Option<bool>, GgufError> {
        match self.meta(key) {
            None => Ok(None),
            Some(MetaValue::Bool(b)) => Ok(Some(*b)),
            Some(v) => Err(self.meta_err(key, format!("expected a bool, found {}", v.type_name()))),
        }
    }

    fn meta_str_array(&self, key: &str) -> Result<Option<&[String]>, GgufError> {
        match self.meta(key) {
            None => Ok(None),
            Some(MetaValue::StrArray(v)) => Ok(Some(v)),
            // An empty array of any element type reads as an empty string array.
            Some(MetaValue::IntArray(_, v)) if v.is_empty() => Ok(Some(&[])),
            Some(v) => Err(self.meta_err(key, format!("expected a string array, found {}", v.type_name()))),
        }
    }

    fn meta_int_array(&self, key: &str) -> Result<Option<&[i64]>, GgufError> {
        match self.meta(key) {
            None => Ok(None),
            Some(MetaValue::IntArray(_, v)) => Ok(Some(v)),
            Some(MetaValue::StrArray(v)) if v.is_empty() => Ok(Some(&[])),
            Some(v) => Err(self.meta_err(key, format!("expected an integer array, found {}", v.type_name()))),
        }
    }

    /// `general.architecture`.
    pub fn architecture(&self) -> Result<&str, GgufError> {
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

    fn tensor_info(&self, gguf_name: &str) -> Result<&TensorInfo, GgufError> {
        self.tensor_index
            .get(gguf_name)
            .map(|&i| &self.tensors[i])
            .ok_or_else(|| GgufError::NoSuchTensor {
                path: self.p(),
                tensor: gguf_name.to_string(),
            })
    }

    /// Read a tensor by its GGUF name, dequantized to f32. The shape is row-major in HF order (GGUF lists
    /// dimensions fastest first, so they are reversed): `token_embd.weight` of GGUF dims `[576, 49152]` reads
    /// as `[49152, 576]`.
    pub fn read_tensor(&self, gguf_name: &str) -> Result<HostTensor, GgufError> {
        let t = self.tensor_info(gguf_name)?;
        let shape = t
            .dims
            .iter()
            .rev()
            .map(|&d| usize::try_from(d))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|_| GgufError::Tensor {
                path: self.p(),
                tensor: t.name.clone(),
                detail: "dimension does not fit in usize".into(),
            })?;
        let bytes = self
            .mmap
            .get(t.start..t.start + t.len)
            .ok_or_else(|| GgufError::Tensor {
                path: self.p(),
                tensor: t.name.clone(),
                detail: "data out of bounds".into(),
            })?;
        let data = dequantize(t.type_id, bytes).ok_or_else(|| GgufError::UnsupportedType {
            path: self.p(),
            tensor: t.name.clone(),
            type_name: ggml_type_name(t.type_id),
            type_id: t.type_id,
        })?;
        Ok(HostTensor { shape, data })
    }

    fn require_llama(&self) -> Result<(), GgufError> {
        let arch = self.architecture()?;
        if arch != "llama" {
            return Err(self.meta_err(
                "general.architecture",
                format!("architecture '{arch}' is not supported; only 'llama' is"),
            ));
        }
        Ok(())
    }

    fn vocab_size(&self) -> Result<usize, GgufError> {
        if let Some(tokens) = self.meta_str_array("tokenizer.ggml.tokens")? {
            return Ok(tokens.len());
        }
        if let Some(&i) = self.tensor_index.get("token_embd.weight") {
            if let Some(&rows) = self.tensors[i].dims.get(1) {
                return usize::try_from(rows).map_err(|_| self.meta_err("token_embd.weight", "too many rows"));
            }
        }
        self.meta_usize("llama.vocab_size")
    }

    /// A Hugging Face style `config.json` for this model (Llama only).
    pub fn hf_config(&self) -> Result<Json, GgufError> {
        self.require_llama()?;
        let hidden = self.meta_usize("llama.embedding_length")?;
        let heads = self.meta_usize("llama.attention.head_count")?;
        if heads == 0 {
            return Err(self.meta_err("llama.attention.head_count", "is 0"));
        }
        let kv_heads = self.meta_usize_opt("llama.attention.head_count_kv")?.unwrap_or(heads);
        let head_dim = match self.meta_usize_opt("llama.attention.key_length")? {
            Some(d) => d,
            None => hidden / heads,
        };
        let eps = self
            .meta_f64_opt("llama.attention.layer_norm_rms_epsilon")?
            .ok_or_else(|| self.meta_err("llama.attention.layer_norm_rms_epsilon", "missing"))?;
        let mut cfg = json!({
            "model_type": "llama",
            "architectures": ["LlamaForCausalLM"],
            "hidden_act": "silu",
            "hidden_size": hidden,
            "intermediate_size": self.meta_usize("llama.feed_forward_length")?,
            "num_hidden_layers": self.meta_usize("llama.block_count")?,
            "num_attention_heads": heads,
            "num_key_value_heads": kv_heads,
            "rms_norm_eps": eps,
            "rope_theta": self.meta_f64_opt("llama.rope.freq_base")?.unwrap_or(10000.0),
            "max_position_embeddings": self.meta_usize("llama.context_length")?,
            "vocab_size": self.vocab_size()?,
            "tie_word_embeddings": !self.tensor_index.contains_key("output.weight"),
            "bos_token_id": self.meta_uint_opt("tokenizer.ggml.bos_token_id")?,
            "eos_token_id": self.meta_uint_opt("tokenizer.ggml.eos_token_id")?,
            "head_dim": head_dim,
            "attention_bias": false,
            "mlp_bias": false,
        });
        match self.meta_str("llama.rope.scaling.type")? {
            None | Some("none") => {}
            Some("linear") => {
                let factor = self
                    .meta_f64_opt("llama.rope.scaling.factor")?
                    .ok_or_else(|| self.meta_err("llama.rope.scaling.factor", "missing for linear rope scaling"))?;
                cfg["rope_scaling"] = json!({"rope_type": "linear", "type": "linear", "factor": factor});
            }
            Some(other) => {
                return Err(self.meta_err(
                    "llama.rope.scaling.type",
                    format!("rope scaling '{other}' is not supported"),
                ))
            }
        }
        Ok(cfg)
    }

    /// HF tensor names this file provides (embedding, per layer in order, final norm, lm_head if untied).
    pub fn hf_tensor_names(&self) -> Vec<String> {
        let mut named: Vec<((u8, usize, u8), String)> =
            self.tensors.iter().filter_map(|t| gguf_to_hf(&t.name)).collect();
        named.sort();
        named.into_iter().map(|(_, n)| n).collect()
    }

    /// Read a tensor by its HF name, with llama.cpp's q/k row permutation undone.
    pub fn hf_tensor(&self, hf_name: &str) -> Result<HostTensor, GgufError> {
        let not_found = || GgufError::NoSuchTensor {
            path: self.p(),
            tensor: hf_name.to_string(),
        };
        let (gguf_name, permuted) = hf_to_gguf(hf_name).ok_or_else(not_found)?;
        if !self.tensor_index.contains_key(&gguf_name) {
            return Err(GgufError::NoSuchTensor {
                path: self.p(),
                tensor: format!("{hf_name} (GGUF '{gguf_name}')"),
            });
        }
        let mut t = self.read_tensor(&gguf_name)?;
        if let Some(kind) = permuted {
            self.require_llama()?;
            let heads = self.meta_usize("llama.attention.head_count")?;
            let n_head = match kind {
                QK::Q => heads,
                QK::K => self.meta_usize_opt("llama.attention.head_count_kv")?.unwrap_or(heads),
            };
            let rows = t.shape.first().copied().unwrap_or(0);
            let cols = t.data.len().checked_div(rows).unwrap_or(0);
            t.data = unpermute_rows(&t.data, rows, cols, n_head).ok_or_else(|| GgufError::Tensor {
                path: self.p(),
                tensor: gguf_name.clone(),
                detail: format!("{rows} rows cannot be split into {n_head} heads of even size"),
            })?;
        }
        Ok(t)
    }

    /// A `tokenizers::Tokenizer` built from the file's own vocabulary (`tokenizer.ggml.model == "gpt2"`).
    pub fn tokenizer(&self) -> Result<tokenizers::Tokenizer, GgufError> {
        let tok_err = |detail: String| GgufError::Tokenizer { path: self.p(), detail };
        let model = self
            .meta_str("tokenizer.ggml.model")?
            .ok_or_else(|| self.meta_err("tokenizer.ggml.model", "missing"))?;
        if model != "gpt2" {
            return Err(self.meta_err(
                "tokenizer.ggml.model",
                format!("tokenizer model '{model}' is not supported; only 'gpt2' (byte-level BPE) is"),
            ));
        }
        let tokens = self
            .meta_str_array("tokenizer.ggml.tokens")?
            .ok_or_else(|| self.meta_err("tokenizer.ggml.tokens", "missing"))?;
        let merges = self
            .meta_str_array("tokenizer.ggml.merges")?
            .ok_or_else(|| self.meta_err("tokenizer.ggml.merges", "missing"))?;
        let types = self.meta_int_array("tokenizer.ggml.token_type")?;
        if let Some(types) = types {
            if types.len() != tokens.len() {
                return Err(self.meta_err(
                    "tokenizer.ggml.token_type",
                    format!("{} entries for {} tokens", types.len(), tokens.len()),
                ));
            }
        }
        let pre = self.meta_str("tokenizer.ggml.pre")?.unwrap_or("default");
        let regexes = pre_tokenizer_regexes(pre)
            .ok_or_else(|| self.meta_err("tokenizer.ggml.pre", format!("pre-tokenizer '{pre}' is not supported")))?;

        // Vocabulary. Like llama.cpp's token-to-id map, a repeated string maps to its last id.
        let mut vocab = serde_json::Map::with_capacity(tokens.len());
        for (id, tok) in tokens.iter().enumerate() {
            vocab.insert(tok.clone(), json!(id));
        }
        // Merges "a b": split at the first space after the first character (as llama.cpp does).
        let mut merge_pairs = Vec::with_capacity(merges.len());
        for (i, m) in merges.iter().enumerate() {
            let split = m.char_indices().skip(1).find(|&(_, ch)| ch == ' ').map(|(at, _)| at);
            let Some(at) = split else {
                return Err(self.meta_err("tokenizer.ggml.merges", format!("entry #{i} {m:?} has no space")));
            };
            merge_pairs.push(json!([&m[..at], &m[at + 1..]]));
        }
        // Control (3) tokens are special added tokens; user-defined (4) ones are added tokens matched whole.
        let mut added = Vec::new();
        if let Some(types) = types {
            for (id, (&ty, tok)) in types.iter().zip(tokens.iter()).enumerate() {
                if (ty == 3 || ty == 4) && !tok.is_empty() {
                    added.push(json!({
                        "id": id, "content": tok, "single_word": false, "lstrip": false, "rstrip": false,
                        "normalized": false, "special": ty == 3,
                    }));
                }
            }
        }

        let mut pretoks: Vec<Json> = regexes
            .iter()
            .map(|r| json!({"type": "Split", "pattern": {"Regex": r}, "behavior": "Isolated", "invert": false}))
            .collect();
        pretoks
            .push(json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": false, "use_regex": false}));

        // BOS/EOS insertion when encoding with special tokens.
        let add_bos = self.meta_bool_opt("tokenizer.ggml.add_bos_token")?.unwrap_or(false);
        let add_eos = self.meta_bool_opt("tokenizer.ggml.add_eos_token")?.unwrap_or(false);
        let special_id = |key: &str| -> Result<(u64, String), GgufError> {
            let id = self.meta_uint_opt(key)?.ok_or_else(|| self.meta_err(key, "missing"))?;
            let tok = usize::try_from(id)
                .ok()
                .and_then(|i| tokens.get(i))
                .ok_or_else(|| self.meta_err(key, format!("id {id} is outside the vocabulary")))?;
            Ok((id, tok.clone()))
        };
        let post_processor = if add_bos || add_eos {
            let mut single = Vec::new();
            let mut pair = Vec::new();
            let mut specials = serde_json::Map::new();
            let bos = if add_bos {
                Some(special_id("tokenizer.ggml.bos_token_id")?)
            } else {
                None
            };
            let eos = if add_eos {
                Some(special_id("tokenizer.ggml.eos_token_id")?)
            } else {
                None
            };
            for (seq, type_id) in [("A", 0), ("B", 1)] {
                let out = if seq == "A" { &mut single } else { &mut pair };
                if let Some((_, t)) = &bos {
                    out.push(json!({"SpecialToken": {"id": t, "type_id": type_id}}));
                }
                out.push(json!({"Sequence": {"id": seq, "type_id": type_id}}));
                if let Some((_, t)) = &eos {
                    out.push(json!({"SpecialToken": {"id": t, "type_id": type_id}}));
                }
            }
            let pair = single.iter().cloned().chain(pair).collect::<Vec<_>>();
            for (id, t) in bos.iter().chain(eos.iter()) {
                specials.insert(t.clone(), json!({"id": t, "ids": [id], "tokens": [t]}));
            }
            json!({"type": "TemplateProcessing", "single": single, "pair": pair, "special_tokens": specials})
        } else {
            Json::Null
        };

        let spec = json!({
            "version": "1.0",
            "truncation": null,
            "padding": null,
            "added_tokens": added,
            "normalizer": null,
            "pre_tokenizer": {"type": "Sequence", "pretokenizers": pretoks},
            "post_processor": post_processor,
            "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
            "model": {
                "type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
                "vocab": vocab, "merges": merge_pairs,
            },
        });
        tokenizers::Tokenizer::from_str(&spec.to_string()).map_err(|e| tok_err(e.to_string()))
    }
}

// ---------------------------------------------------------------------------------------------------------
// Pre-tokenizer regexes, as llama.cpp's llama-vocab.cpp defines them for each `tokenizer.ggml.pre`
// ---------------------------------------------------------------------------------------------------------

const GPT2_SPLIT: &str = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)";

/// The split regexes (applied in sequence, matches and gaps both kept) for a `tokenizer.ggml.pre` name.
fn pre_tokenizer_regexes(pre: &str) -> Option<Vec<&'static str>> {
    Some(match pre {
        // LLAMA_VOCAB_PRE_TYPE_DEFAULT
        "default" => vec![r"[\p{P}\$\+<=>\^~\|]+", GPT2_SPLIT, r"\p{N}+", "[0-9][0-9][0-9]"],
        // LLAMA_VOCAB_PRE_TYPE_GPT2 and the types llama.cpp gives the same regex
        "gpt-2" | "gpt2" | "phi-2" | "jina-es" | "jina-de" | "gigachat" | "jina-v2-es" | "jina-v2-de"
        | "jina-v1-en" | "jina-v2-code" | "roberta-bpe" | "mpt" | "olmo" | "jais" => vec![GPT2_SPLIT],
        // LLAMA_VOCAB_PRE_TYPE_SMOLLM and the types sharing its regexes: single digits, then GPT-2
        "smollm" | "starcoder" | "refact" | "command-r" | "codeshell" | "exaone" | "minerva-7b" => {
            vec![r"\p{N}", GPT2_SPLIT]
        }
        _ => return None,
    })
}

// ---------------------------------------------------------------------------------------------------------
// Name mapping and the q/k permutation
// ---------------------------------------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum QK {
    Q,
    K,
}

/// Per-layer (GGUF suffix, HF suffix, permuted) pairs, in the order HF lists them.
const LAYER_MAP: [(&str, &str, Option<QK>); 9] = [
    ("attn_q", "self_attn.q_proj", Some(QK::Q)),
    ("attn_k", "self_attn.k_proj", Some(QK::K)),
    ("attn_v", "self_attn.v_proj", None),
    ("attn_output", "self_attn.o_proj", None),
    ("ffn_gate", "mlp.gate_proj", None),
    ("ffn_up", "mlp.up_proj", None),
    ("ffn_down", "mlp.down_proj", None),
    ("attn_norm", "input_layernorm", None),
    ("ffn_norm", "post_attention_layernorm", None),
];

/// GGUF name -> (sort key, HF name).
fn gguf_to_hf(gguf: &str) -> Option<((u8, usize, u8), String)> {
    let stem = gguf.strip_suffix(".weight")?;
    match stem {
        "token_embd" => return Some(((0, 0, 0), "model.embed_tokens.weight".into())),
        "output_norm" => return Some(((2, 0, 0), "model.norm.weight".into())),
        "output" => return Some(((3, 0, 0), "lm_head.weight".into())),
        _ => {}
    }
    let rest = stem.strip_prefix("blk.")?;
    let (layer, part) = rest.split_once('.')?;
    if layer.is_empty() || !layer.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let layer: usize = layer.parse().ok()?;
    let (k, (_, hf, _)) = LAYER_MAP.iter().enumerate().find(|(_, (g, _, _))| *g == part)?;
    Some(((1, layer, k as u8), format!("model.layers.{layer}.{hf}.weight")))
}

/// HF name -> (GGUF name, which q/k permutation to undo).
fn hf_to_gguf(hf: &str) -> Option<(String, Option<QK>)> {
    match hf {
        "model.embed_tokens.weight" => return Some(("token_embd.weight".into(), None)),
        "model.norm.weight" => return Some(("output_norm.weight".into(), None)),
        "lm_head.weight" => return Some(("output.weight".into(), None)),
        _ => {}
    }
    let rest = hf.strip_prefix("model.layers.")?.strip_suffix(".weight")?;
    let (layer, part) = rest.split_once('.')?;
    if layer.is_empty() || !layer.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let layer: usize = layer.parse().ok()?;
    let (g, _, qk) = LAYER_MAP.iter().find(|(_, h, _)| *h == part)?;
    Some((format!("blk.{layer}.{g}.weight"), *qk))
}

/// Undo llama.cpp's `permute` of q/k weights: the converter did, for `w` of shape `[n_head*head_dim, cols]`,
/// `w.reshape(n_head, 2, head_dim/2, cols).swapaxes(1, 2).reshape(w.shape)`, i.e. GGUF row
/// `h*hd + 2*i + j` holds HF row `h*hd + j*hd/2 + i`. Returns `None` if the rows do not split evenly.
fn unpermute_rows(data: &[f32], rows: usize, cols: usize, n_head: usize) -> Option<Vec<f32>> {
    let (hd, half) = head_split(data, rows, cols, n_head)?;
    let mut out = vec![0.0f32; data.len()];
    for h in 0..n_head {
        for j in 0..2 {
            for i in 0..half {
                let hf_row = h * hd + j * half + i;
                let gguf_row = h * hd + 2 * i + j;
                out[hf_row * cols..(hf_row + 1) * cols].copy_from_slice(&data[gguf_row * cols..(gguf_row + 1) * cols]);
            }
        }
    }
    Some(out)
}

fn head_split(data: &[f32], rows: usize, cols: usize, n_head: usize) -> Option<(usize, usize)> {
    if n_head == 0 || rows % n_head != 0 || (rows / n_head) % 2 != 0 || rows.checked_mul(cols)? != data.len() {
        return None;
    }
    let hd = rows / n_head;
    Some((hd, hd / 2))
}

// ---------------------------------------------------------------------------------------------------------
// Dequantization
// ---------------------------------------------------------------------------------------------------------

fn f16_at(b: &[u8], at: usize) -> f32 {
    f16::from_le_bytes([b[at], b[at + 1]]).to_f32()
}

/// Dequantize `bytes` (a whole number of blocks, checked at open) of ggml type `type_id`; `None` if the type
/// is not supported.
fn dequantize(type_id: u32, bytes: &[u8]) -> Option<Vec<f32>> {
    Some(match type_id {
        0 => bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
        1 => bytes
            .chunks_exact(2)
            .map(|c| f16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        30 => bytes
            .chunks_exact(2)
            .map(|c| bf16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        2 => {
            let mut out = Vec::with_capacity(bytes.len() / 18 * 32);
            for blk in bytes.chunks_exact(18) {
                let d = f16_at(blk, 0);
                let qs = &blk[2..18];
                out.extend(qs.iter().map(|&q| ((q & 0x0f) as i32 - 8) as f32 * d));
                out.extend(qs.iter().map(|&q| ((q >> 4) as i32 - 8) as f32 * d));
            }
            out
        }
        3 => {
            let mut out = Vec::with_capacity(bytes.len() / 20 * 32);
            for blk in bytes.chunks_exact(20) {
                let d = f16_at(blk, 0);
                let m = f16_at(blk, 2);
                let qs = &blk[4..20];
                out.extend(qs.iter().map(|&q| (q & 0x0f) as f32 * d + m));
                out.extend(qs.iter().map(|&q| (q >> 4) as f32 * d + m));
            }
            out
        }
        8 => {
            let mut out = Vec::with_capacity(bytes.len() / 34 * 32);
            for blk in bytes.chunks_exact(34) {
                let d = f16_at(blk, 0);
                out.extend(blk[2..34].iter().map(|&q| (q as i8) as f32 * d));
            }
            out
        }
        _ => return None,
    })
}

// ---------------------------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------------------------

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::sync::atomic::{AtomicUsize, Ordering};

    // ---- a tiny GGUF writer -------------------------------------------------------------------------------

    enum W {
        U32(u32),
        F32(f32),
        Bool(bool),
        Str(&'static str),
        StrArr(Vec<String>),
        I32Arr(Vec<i32>),
    }

    struct TensorSpec {
        name: String,
        dims: Vec<u64>, // GGUF order
        ty: u32,
        data: Vec<u8>,
        offset_override: Option<u64>,
    }

    fn put_str(b: &mut Vec<u8>, s: &str) {
        b.extend((s.len() as u64).to_le_bytes());
        b.extend(s.as_bytes());
    }

    fn write_gguf(version: u32, kv: &[(&str, W)], tensors: &[TensorSpec]) -> Vec<u8> {
        let mut b = Vec::new();
        b.extend(b"GGUF");
        b.extend(version.to_le_bytes());
        b.extend((tensors.len() as u64).to_le_bytes());
        b.extend((kv.len() as u64).to_le_bytes());
        for (k, v) in kv {
            put_str(&mut b, k);
            match v {
                W::U32(x) => {
                    b.extend(4u32.to_le_bytes());
                    b.extend(x.to_le_bytes());
                }
                W::F32(x) => {
                    b.extend(6u32.to_le_bytes());
                    b.extend(x.to_le_bytes());
                }
                W::Bool(x) => {
                    b.extend(7u32.to_le_bytes());
                    b.push(*x as u8);
                }
                W::Str(s) => {
                    b.extend(8u32.to_le_bytes());
                    put_str(&mut b, s);
                }
                W::StrArr(a) => {
                    b.extend(9u32.to_le_bytes());
                    b.extend(8u32.to_le_bytes());
                    b.extend((a.len() as u64).to_le_bytes());
                    for s in a {
                        put_str(&mut b, s);
                    }
                }
                W::I32Arr(a) => {
                    b.extend(9u32.to_le_bytes());
                    b.extend(5u32.to_le_bytes());
                    b.extend((a.len() as u64).to_le_bytes());
                    for x in a {
                        b.extend(x.to_le_bytes());
                    }
                }
            }
        }
        let mut offsets = Vec::new();
        let mut off = 0u64;
        for t in tensors {
            offsets.push(t.offset_override.unwrap_or(off));
            off += (t.data.len() as u64).div_ceil(32) * 32;
        }
        for (t, o) in tensors.iter().zip(&offsets) {
            put_str(&mut b, &t.name);
            b.extend((t.dims.len() as u32).to_le_bytes());
            for d in &t.dims {
                b.extend(d.to_le_bytes());
            }
            b.extend(t.ty.to_le_bytes());
            b.extend(o.to_le_bytes());
        }
        while b.len() % 32 != 0 {
            b.push(0);
        }
        for t in tensors {
            b.extend(&t.data);
            while b.len() % 32 != 0 {
                b.push(0);
            }
        }
        b
    }

    static COUNTER: AtomicUsize = AtomicUsize::new(0);

    struct TempFile(PathBuf);
    impl Drop for TempFile {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }

    fn temp(bytes: &[u8]) -> TempFile {
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        let path = std::env::temp_dir().join(format!("dejavu-gguf-test-{}-{n}.gguf", std::process::id()));
        let mut f = File::create(&path).unwrap();
        f.write_all(bytes).unwrap();
        TempFile(path)
    }

    fn tensor(name: &str, dims: &[u64], ty: u32, data: Vec<u8>) -> TensorSpec {
        TensorSpec {
            name: name.into(),
            dims: dims.to_vec(),
            ty,
            data,
            offset_override: None,
        }
    }

    fn f16b(x: f32) -> [u8; 2] {
        f16::from_f32(x).to_le_bytes()
    }

    // ---- reference quantizers, written from the ggml block layouts ---------------------------------------

    /// Q8_0 block from a scale and 32 signed codes; returns bytes and the expected values.
    fn q8_0_block(d: f32, q: &[i8; 32]) -> (Vec<u8>, Vec<f32>) {
        let mut b = f16b(d).to_vec();
        b.extend(q.iter().map(|&x| x as u8));
        let dd = f16::from_f32(d).to_f32();
        (b, q.iter().map(|&x| x as f32 * dd).collect())
    }

    /// Q4_0 block: codes 0..16; byte k holds element k (low nibble) and element k+16 (high nibble).
    fn q4_0_block(d: f32, q: &[u8; 32]) -> (Vec<u8>, Vec<f32>) {
        let mut b = f16b(d).to_vec();
        for k in 0..16 {
            b.push(q[k] | (q[k + 16] << 4));
        }
        let dd = f16::from_f32(d).to_f32();
        (b, q.iter().map(|&x| (x as f32 - 8.0) * dd).collect())
    }

    fn q4_1_block(d: f32, m: f32, q: &[u8; 32]) -> (Vec<u8>, Vec<f32>) {
        let mut b = f16b(d).to_vec();
        b.extend(f16b(m));
        for k in 0..16 {
            b.push(q[k] | (q[k + 16] << 4));
        }
        let dd = f16::from_f32(d).to_f32();
        let mm = f16::from_f32(m).to_f32();
        (b, q.iter().map(|&x| x as f32 * dd + mm).collect())
    }

    fn codes4(seed: u8) -> [u8; 32] {
        let mut q = [0u8; 32];
        for (i, x) in q.iter_mut().enumerate() {
            *x = ((i as u8).wrapping_mul(7).wrapping_add(seed)) % 16;
        }
        q
    }

    fn codes8(seed: i32) -> [i8; 32] {
        let mut q = [0i8; 32];
        for (i, x) in q.iter_mut().enumerate() {
            *x = (((i as i32) * 37 + seed) % 256 - 128) as i8;
        }
        q
    }

    fn assert_close(a: &[f32], b: &[f32]) {
        assert_eq!(a.len(), b.len());
        for (i, (x, y)) in a.iter().zip(b).enumerate() {
            assert!((x - y).abs() <= 1e-6 * (1.0 + y.abs()), "element {i}: {x} vs {y}");
        }
    }

    #[test]
    fn quant_types_round_trip() {
        // Two rows of 64 elements = 4 blocks for the block types; GGUF dims [64, 2] -> HF shape [2, 64].
        let mut q8 = (Vec::new(), Vec::new());
        let mut q40 = (Vec::new(), Vec::new());
        let mut q41 = (Vec::new(), Vec::new());
        for blk in 0..4 {
            let (b, v) = q8_0_block(0.01 * (blk + 1) as f32, &codes8(blk * 11));
            q8.0.extend(b);
            q8.1.extend(v);
            let (b, v) = q4_0_block(0.5 / (blk + 1) as f32, &codes4(blk as u8));
            q40.0.extend(b);
            q40.1.extend(v);
            let (b, v) = q4_1_block(0.25, -1.5 + blk as f32, &codes4(3 * blk as u8 + 1));
            q41.0.extend(b);
            q41.1.extend(v);
        }
        // Hand-checked values: Q4_0 with d = 0.5 and code 0 gives -4.0; Q4_1 with d=0.25, m=-1.5, code 15: 2.25.
        assert_eq!(q40.1[0], (codes4(0)[0] as f32 - 8.0) * 0.5);
        assert_eq!(codes4(0)[0], 0);
        assert_eq!(q40.1[0], -4.0);
        let vals: Vec<f32> = (0..128).map(|i| (i as f32 - 64.0) * 0.37).collect();
        let f32b: Vec<u8> = vals.iter().flat_map(|x| x.to_le_bytes()).collect();
        let f16v: Vec<f32> = vals.iter().map(|&x| f16::from_f32(x).to_f32()).collect();
        let f16bytes: Vec<u8> = vals.iter().flat_map(|&x| f16b(x)).collect();
        let bf16v: Vec<f32> = vals.iter().map(|&x| bf16::from_f32(x).to_f32()).collect();
        let bf16bytes: Vec<u8> = vals.iter().flat_map(|&x| bf16::from_f32(x).to_le_bytes()).collect();

        let file = write_gguf(
            3,
            &[("general.architecture", W::Str("llama"))],
            &[
                tensor("f32", &[64, 2], 0, f32b),
                tensor("f16", &[64, 2], 1, f16bytes),
                tensor("bf16", &[64, 2], 30, bf16bytes),
                tensor("q8_0", &[64, 2], 8, q8.0),
                tensor("q4_0", &[64, 2], 2, q40.0),
                tensor("q4_1", &[64, 2], 3, q41.0),
            ],
        );
        let tmp = temp(&file);
        let g = GgufFile::open(&tmp.0).unwrap();
        assert_eq!(g.version(), 3);
        assert_eq!(g.tensor_names(), vec!["f32", "f16", "bf16", "q8_0", "q4_0", "q4_1"]);
        for (name, want) in [
            ("f32", &vals),
            ("f16", &f16v),
            ("bf16", &bf16v),
            ("q8_0", &q8.1),
            ("q4_0", &q40.1),
            ("q4_1", &q41.1),
        ] {
            let t = g.read_tensor(name).unwrap();
            assert_eq!(t.shape, vec![2, 64], "{name}");
            assert_close(&t.data, want);
        }
        // Spot-check a nibble layout by hand: block 0 of q4_1 uses codes4(1): element 0 = 1, element 16 = (16*7+1)%16 = 1.
        let t = g.read_tensor("q4_1").unwrap();
        assert_eq!(t.data[0], 1.0 * 0.25 - 1.5);
        assert_eq!(t.data[1], 8.0 * 0.25 - 1.5); // code (1*7 + 1) % 16 = 8
        assert_eq!(t.data[17], ((17 * 7 + 1) % 16) as f32 * 0.25 - 1.5);
    }

    #[test]
    fn v2_and_v3_headers() {
        for v in [2u32, 3] {
            let file = write_gguf(
                v,
                &[
                    ("general.architecture", W::Str("llama")),
                    ("general.alignment", W::U32(32)),
                ],
                &[tensor("a", &[4], 0, vec![0; 16])],
            );
            let tmp = temp(&file);
            let g = GgufFile::open(&tmp.0).unwrap();
            assert_eq!(g.version(), v);
            assert_eq!(g.architecture().unwrap(), "llama");
            assert_eq!(g.metadata_keys(), vec!["general.architecture", "general.alignment"]);
            assert_eq!(g.read_tensor("a").unwrap().shape, vec![4]);
        }
        let file = write_gguf(1, &[], &[]);
        let tmp = temp(&file);
        let e = GgufFile::open(&tmp.0).unwrap_err().to_string();
        assert!(e.contains("unsupported GGUF version 1"), "{e}");
        assert!(e.starts_with(&tmp.0.display().to_string()), "{e}");
    }

    #[test]
    fn bad_magic() {
        let mut file = write_gguf(3, &[], &[]);
        file[0] = b'X';
        let tmp = temp(&file);
        let e = GgufFile::open(&tmp.0).unwrap_err().to_string();
        assert!(e.starts_with(&tmp.0.display().to_string()), "{e}");
        assert!(e.contains("not a GGUF file"), "{e}");
    }

    #[test]
    fn truncated_files() {
        let file = write_gguf(
            3,
            &[
                ("general.architecture", W::Str("llama")),
                ("tokenizer.ggml.tokens", W::StrArr(vec!["a".into(); 10])),
            ],
            &[tensor("w", &[8], 0, vec![0; 32])],
        );
        // Every prefix must fail cleanly (no panic); prefixes cutting the tensor data name the tensor.
        for cut in 0..file.len() {
            let tmp = temp(&file[..cut]);
            let r = GgufFile::open(&tmp.0);
            let e = match r {
                Ok(_) => panic!("prefix of {cut} bytes opened"),
                Err(e) => e.to_string(),
            };
            assert!(e.starts_with(&tmp.0.display().to_string()), "{e}");
            assert!(!e.contains('\n'), "{e}");
        }
        let header_end = file.len() - 32;
        let tmp = temp(&file[..header_end + 16]);
        let e = GgufFile::open(&tmp.0).unwrap_err().to_string();
        assert!(e.contains("tensor 'w'") && e.contains("beyond the end"), "{e}");
    }

    #[test]
    fn giant_lengths_are_errors_not_allocations() {
        // A string array claiming 2^60 entries.
        let mut b = Vec::new();
        b.extend(b"GGUF");
        b.extend(3u32.to_le_bytes());
        b.extend(0u64.to_le_bytes());
        b.extend(1u64.to_le_bytes());
        put_str(&mut b, "tokenizer.ggml.tokens");
        b.extend(9u32.to_le_bytes());
        b.extend(8u32.to_le_bytes());
        b.extend((1u64 << 60).to_le_bytes());
        let tmp = temp(&b);
        let e = GgufFile::open(&tmp.0).unwrap_err().to_string();
        assert!(e.contains("only") && e.contains("remain"), "{e}");
        // A tensor count of u64::MAX.
        let mut b = Vec::new();
        b.extend(b"GGUF");
        b.extend(3u32.to_le_bytes());
        b.extend(u64::MAX.to_le_bytes());
        b.extend(0u64.to_le_bytes());
        let tmp = temp(&b);
        assert!(GgufFile::open(&tmp.0).is_err());
        // A tensor whose dims overflow.
        let file = write_gguf(3, &[], &[tensor("huge", &[u64::MAX, 3], 0, vec![0; 32])]);
        let tmp = temp(&file);
        let e = GgufFile::open(&tmp.0).unwrap_err().to_string();
        assert!(e.contains("tensor 'huge'"), "{e}");
    }

    #[test]
    fn tensor_offset_beyond_eof() {
        let mut t = tensor("blk.0.attn_q.weight", &[8], 0, vec![0; 32]);
        t.offset_override = Some(1 << 20);
        let file = write_gguf(3, &[], &[t]);
        let tmp = temp(&file);
        let e = GgufFile::open(&tmp.0).unwrap_err().to_string();
        assert!(
            e.contains("tensor 'blk.0.attn_q.weight'") && e.contains("beyond the end of the file"),
            "{e}"
        );
        // Misaligned offset.
        let mut t = tensor("x", &[8], 0, vec![0; 32]);
        t.offset_override = Some(4);
        let file = write_gguf(3, &[], &[t]);
        let tmp = temp(&file);
        let e = GgufFile::open(&tmp.0).unwrap_err().to_string();
        assert!(e.contains("tensor 'x'") && e.contains("alignment"), "{e}");
        // Element count not a multiple of the block size.
        let file = write_gguf(3, &[], &[tensor("odd", &[48], 8, vec![0; 68])]);
        let tmp = temp(&file);
        let e = GgufFile::open(&tmp.0).unwrap_err().to_string();
        assert!(e.contains("tensor 'odd'") && e.contains("block size 32"), "{e}");
    }

    #[test]
    fn unsupported_type_names_tensor() {
        let file = write_gguf(3, &[], &[tensor("blk.0.attn_q.weight", &[256], 12, vec![0; 144])]);
        let tmp = temp(&file);
        let g = GgufFile::open(&tmp.0).unwrap();
        let e = g.read_tensor("blk.0.attn_q.weight").unwrap_err().to_string();
        let want = format!(
            "{}: tensor 'blk.0.attn_q.weight': unsupported quant type Q4_K (12); supported: F32, F16, BF16, Q8_0, Q4_0, Q4_1",
            tmp.0.display()
        );
        assert_eq!(e, want);
        let e = g.read_tensor("nope").unwrap_err().to_string();
        assert!(e.contains("'nope'"), "{e}");
        // An unknown type id fails at open, naming the tensor.
        let file = write_gguf(3, &[], &[tensor("weird", &[4], 77, vec![0; 16])]);
        let tmp = temp(&file);
        let e = GgufFile::open(&tmp.0).unwrap_err().to_string();
        assert!(e.contains("tensor 'weird'") && e.contains("77"), "{e}");
    }

    /// llama.cpp's `permute`, written directly from the numpy reshape/swapaxes.
    fn permute_rows(data: &[f32], rows: usize, cols: usize, n_head: usize) -> Vec<f32> {
        let hd = rows / n_head;
        let half = hd / 2;
        // w.reshape(n_head, 2, half, cols): element [h, j, i, c] at ((h*2 + j)*half + i)*cols + c.
        // swapaxes(1, 2) -> [h, i, j, c], laid out contiguously as the output.
        let mut out = Vec::with_capacity(data.len());
        for h in 0..n_head {
            for i in 0..half {
                for j in 0..2 {
                    let src = ((h * 2 + j) * half + i) * cols;
                    out.extend_from_slice(&data[src..src + cols]);
                }
            }
        }
        out
    }

    #[test]
    fn qk_unpermute() {
        // Hand-worked: 1 head, head_dim 4, 1 column. HF rows [a0 a1 b0 b1] (first half a, second half b)
        // are interleaved by the converter into [a0 b0 a1 b1].
        let hf = [10.0, 11.0, 20.0, 21.0];
        assert_eq!(permute_rows(&hf, 4, 1, 1), vec![10.0, 20.0, 11.0, 21.0]);
        assert_eq!(unpermute_rows(&[10.0, 20.0, 11.0, 21.0], 4, 1, 1).unwrap(), hf.to_vec());
        // 2 heads of dim 4, 2 columns.
        let gguf: Vec<f32> = (0..16).map(|x| x as f32).collect();
        let want = vec![
            0.0, 1.0, 4.0, 5.0, 2.0, 3.0, 6.0, 7.0, // head 0: gguf rows 0,2,1,3
            8.0, 9.0, 12.0, 13.0, 10.0, 11.0, 14.0, 15.0, // head 1: gguf rows 4,6,5,7
        ];
        assert_eq!(unpermute_rows(&gguf, 8, 2, 2).unwrap(), want);
        // inverse(forward(x)) == x and forward(inverse(x)) == x for several shapes.
        for (rows, cols, n_head) in [(8, 3, 2), (64, 5, 4), (24, 7, 3), (12, 1, 1)] {
            let x: Vec<f32> = (0..rows * cols).map(|v| v as f32 * 0.5 - 3.0).collect();
            assert_eq!(
                unpermute_rows(&permute_rows(&x, rows, cols, n_head), rows, cols, n_head).unwrap(),
                x
            );
            assert_eq!(
                permute_rows(&unpermute_rows(&x, rows, cols, n_head).unwrap(), rows, cols, n_head),
                x
            );
        }
        assert!(unpermute_rows(&[0.0; 6], 6, 1, 4).is_none());
    }

    fn tiny_llama(extra_kv: Vec<(&'static str, W)>) -> Vec<u8> {
        let (hidden, heads, kv_heads, ffn, vocab) = (8u64, 2u64, 1u64, 32u64, 6u64);
        let hd = hidden / heads;
        let f32s = |n: u64, base: f32| -> Vec<u8> { (0..n).flat_map(|i| (base + i as f32).to_le_bytes()).collect() };
        let mut kv = vec![
            ("general.architecture", W::Str("llama")),
            ("llama.embedding_length", W::U32(hidden as u32)),
            ("llama.feed_forward_length", W::U32(ffn as u32)),
            ("llama.block_count", W::U32(1)),
            ("llama.attention.head_count", W::U32(heads as u32)),
            ("llama.attention.head_count_kv", W::U32(kv_heads as u32)),
            ("llama.attention.layer_norm_rms_epsilon", W::F32(1e-5)),
            ("llama.context_length", W::U32(128)),
            ("tokenizer.ggml.bos_token_id", W::U32(1)),
            ("tokenizer.ggml.eos_token_id", W::U32(2)),
        ];
        kv.extend(extra_kv);
        let t = vec![
            tensor("token_embd.weight", &[hidden, vocab], 0, f32s(hidden * vocab, 0.0)),
            tensor("blk.0.attn_norm.weight", &[hidden], 0, f32s(hidden, 1.0)),
            tensor("blk.0.attn_q.weight", &[hidden, hidden], 0, f32s(hidden * hidden, 0.0)),
            tensor(
                "blk.0.attn_k.weight",
                &[hidden, kv_heads * hd],
                0,
                f32s(hidden * kv_heads * hd, 0.0),
            ),
            tensor(
                "blk.0.attn_v.weight",
                &[hidden, kv_heads * hd],
                0,
                f32s(hidden * kv_heads * hd, 0.0),
            ),
            tensor(
                "blk.0.attn_output.weight",
                &[hidden, hidden],
                0,
                f32s(hidden * hidden, 0.0),
            ),
            tensor("blk.0.ffn_gate.weight", &[hidden, ffn], 0, f32s(hidden * ffn, 0.0)),
            tensor("blk.0.ffn_up.weight", &[hidden, ffn], 0, f32s(hidden * ffn, 0.0)),
            tensor("blk.0.ffn_down.weight", &[ffn, hidden], 0, f32s(hidden * ffn, 0.0)),
            tensor("blk.0.ffn_norm.weight", &[hidden], 0, f32s(hidden, 1.0)),
            tensor("output_norm.weight", &[hidden], 0, f32s(hidden, 1.0)),
        ];
        write_gguf(3, &kv, &t)
    }

    #[test]
    fn synthetic_llama_config_and_names() {
        let tmp = temp(&tiny_llama(vec![]));
        let g = GgufFile::open(&tmp.0).unwrap();
        let c = g.hf_config().unwrap();
        assert_eq!(c["model_type"], "llama");
        assert_eq!(c["hidden_size"], 8);
        assert_eq!(c["intermediate_size"], 32);
        assert_eq!(c["num_key_value_heads"], 1);
        assert_eq!(c["head_dim"], 4);
        assert_eq!(c["rope_theta"], 10000.0);
        assert_eq!(c["rms_norm_eps"], 1e-5);
        assert_eq!(c["vocab_size"], 6); // from token_embd rows: no tokenizer.ggml.tokens here
        assert_eq!(c["tie_word_embeddings"], true);
        assert_eq!(c["bos_token_id"], 1);
        let names = g.hf_tensor_names();
        assert_eq!(names.first().map(String::as_str), Some("model.embed_tokens.weight"));
        assert_eq!(names.last().map(String::as_str), Some("model.norm.weight"));
        assert_eq!(names.len(), 11);
        assert!(!names.iter().any(|n| n == "lm_head.weight"));
        let k = g.hf_tensor("model.layers.0.self_attn.k_proj.weight").unwrap();
        assert_eq!(k.shape, vec![4, 8]);
        // 1 kv head, head_dim 4: HF row r comes from GGUF row [0, 2, 1, 3][r]; GGUF row g holds 8g..8g+8.
        for (r, g_row) in [0usize, 2, 1, 3].iter().enumerate() {
            assert_eq!(k.data[r * 8], (*g_row * 8) as f32);
        }
        let q = g.hf_tensor("model.layers.0.self_attn.q_proj.weight").unwrap();
        assert_eq!(q.shape, vec![8, 8]);
        for (r, g_row) in [0usize, 2, 1, 3, 4, 6, 5, 7].iter().enumerate() {
            assert_eq!(q.data[r * 8], (*g_row * 8) as f32);
        }
        let down = g.hf_tensor("model.layers.0.mlp.down_proj.weight").unwrap();
        assert_eq!(down.shape, vec![8, 32]);
        let e = g.hf_tensor("lm_head.weight").unwrap_err().to_string();
        assert!(
            e.contains("lm_head.weight") && e.starts_with(&tmp.0.display().to_string()),
            "{e}"
        );
        let e = g.hf_tensor("model.layers.0.foo.weight").unwrap_err().to_string();
        assert!(e.contains("model.layers.0.foo.weight"), "{e}");
        // A missing required key is named.
        let e = g.tokenizer().unwrap_err().to_string();
        assert!(e.contains("tokenizer.ggml.model"), "{e}");
    }

    #[test]
    fn non_llama_and_spm_are_errors() {
        let file = write_gguf(
            3,
            &[
                ("general.architecture", W::Str("phi3")),
                ("tokenizer.ggml.model", W::Str("llama")),
            ],
            &[],
        );
        let tmp = temp(&file);
        let g = GgufFile::open(&tmp.0).unwrap();
        let e = g.hf_config().unwrap_err().to_string();
        assert!(e.contains("general.architecture") && e.contains("phi3"), "{e}");
        let e = g.tokenizer().unwrap_err().to_string();
        assert!(e.contains("tokenizer.ggml.model") && e.contains("'llama'"), "{e}");
    }

    #[test]
    fn synthetic_bpe_tokenizer() {
        // Byte-level BPE over a tiny vocabulary: every byte of "ab 12<|x|>" plus a few merges.
        let mut tokens: Vec<String> = vec![
            "<|x|>".into(),
            "a".into(),
            "b".into(),
            "Ġ".into(),
            "1".into(),
            "2".into(),
        ];
        tokens.extend(["ab", "Ġa", "Ġab", "12"].map(String::from));
        // Ranks: "Ġ a" before "a b", so " ab" becomes "Ġa" + "b" -> "Ġab" rather than "Ġ" + "ab".
        let merges = vec!["Ġ a".to_string(), "Ġa b".into(), "a b".into(), "1 2".into()];
        let mut types = vec![1; tokens.len()];
        types[0] = 3;
        let file = write_gguf(
            3,
            &[
                ("general.architecture", W::Str("llama")),
                ("tokenizer.ggml.model", W::Str("gpt2")),
                ("tokenizer.ggml.pre", W::Str("smollm")),
                ("tokenizer.ggml.tokens", W::StrArr(tokens)),
                ("tokenizer.ggml.merges", W::StrArr(merges)),
                ("tokenizer.ggml.token_type", W::I32Arr(types)),
                ("tokenizer.ggml.bos_token_id", W::U32(0)),
                ("tokenizer.ggml.add_bos_token", W::Bool(true)),
            ],
            &[],
        );
        let tmp = temp(&file);
        let g = GgufFile::open(&tmp.0).unwrap();
        let tok = g.tokenizer().unwrap();
        let enc = tok.encode("ab ab12<|x|>", false).unwrap();
        // "12" is split into single digits by the smollm pre-tokenizer, so the "1 2" merge never applies.
        assert_eq!(enc.get_ids(), &[6, 8, 4, 5, 0]);
        let enc = tok.encode("ab", true).unwrap();
        assert_eq!(enc.get_ids(), &[0, 6]);
        assert_eq!(tok.decode(&[6, 8, 0], true).unwrap(), "ab ab");
        assert_eq!(tok.decode(&[6, 8, 0], false).unwrap(), "ab ab<|x|>");
    }

    #[test]
    fn corrupted_bytes_never_panic() {
        let file = tiny_llama(vec![
            ("tokenizer.ggml.model", W::Str("gpt2")),
            (
                "tokenizer.ggml.tokens",
                W::StrArr(vec!["a".into(), "b".into(), "ab".into()]),
            ),
            ("tokenizer.ggml.merges", W::StrArr(vec!["a b".into()])),
            ("tokenizer.ggml.token_type", W::I32Arr(vec![1, 1, 1])),
        ]);
        // Deterministic pseudo-random corruption of 1 to 4 bytes in the header region, 400 times.
        let header_len = file.len().min(2048);
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        for _ in 0..400 {
            let mut f = file.clone();
            for _ in 0..(next() % 4 + 1) {
                let at = (next() % header_len as u64) as usize;
                f[at] = match next() % 3 {
                    0 => 0xff,
                    1 => 0,
                    _ => next() as u8,
                };
            }
            let tmp = temp(&f);
            if let Ok(g) = GgufFile::open(&tmp.0) {
                for name in g.tensor_names() {
                    let _ = g.read_tensor(name);
                }
                for name in g.hf_tensor_names() {
                    let _ = g.hf_tensor(&name);
                }
                let _ = g.hf_config();
                let _ = g.tokenizer();
            }
        }
    }

    // ---- the real SmolLM2 file ----------------------------------------------------------------------------

    fn smollm2_path() -> Option<PathBuf> {
        let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("models/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf");
        if p.exists() {
            Some(p)
        } else {
            eprintln!("skipping: {} is absent (run scripts/fetch_smollm2.sh)", p.display());
            None
        }
    }

    #[test]
    fn smollm2_real_file() {
        let Some(path) = smollm2_path() else { return };
        let g = GgufFile::open(&path).unwrap();
        assert_eq!(g.version(), 3);
        assert_eq!(g.architecture().unwrap(), "llama");
        let c = g.hf_config().unwrap();
        assert_eq!(c["hidden_size"], 576);
        assert_eq!(c["intermediate_size"], 1536);
        assert_eq!(c["num_hidden_layers"], 30);
        assert_eq!(c["num_attention_heads"], 9);
        assert_eq!(c["num_key_value_heads"], 3);
        assert_eq!(c["vocab_size"], 49152);
        assert_eq!(c["head_dim"], 64);
        assert_eq!(c["tie_word_embeddings"], true);
        assert_eq!(c["rope_theta"], 100000.0);
        assert_eq!(c["rms_norm_eps"], 1e-5);
        let names = g.hf_tensor_names();
        assert_eq!(names.len(), 1 + 30 * 9 + 1);
        for name in &names {
            let t = g.hf_tensor(name).unwrap();
            let want: Vec<usize> = if name == "model.embed_tokens.weight" {
                vec![49152, 576]
            } else if name == "model.norm.weight" || name.ends_with("layernorm.weight") {
                vec![576]
            } else if name.ends_with("q_proj.weight") || name.ends_with("o_proj.weight") {
                vec![576, 576]
            } else if name.ends_with("k_proj.weight") || name.ends_with("v_proj.weight") {
                vec![192, 576]
            } else if name.ends_with("gate_proj.weight") || name.ends_with("up_proj.weight") {
                vec![1536, 576]
            } else if name.ends_with("down_proj.weight") {
                vec![576, 1536]
            } else {
                panic!("unexpected {name}")
            };
            assert_eq!(t.shape, want, "{name}");
            assert_eq!(t.data.len(), t.numel(), "{name}");
            assert!(t.data.iter().all(|x| x.is_finite()), "{name}");
        }
        let tok = g.tokenizer().unwrap();
        let enc = tok.encode("The capital of France is", false).unwrap();
        eprintln!("'The capital of France is' -> {:?}", enc.get_ids());
        assert_eq!(enc.get_ids(), &[504, 3575, 282, 4649, 314]);
        let ids = tok.encode("Hello world! 123", false).unwrap();
        assert_eq!(ids.get_ids(), &[19556, 905, 17, 216, 33, 34, 35]);
        assert_eq!(tok.decode(&[1, 504, 3575, 2], true).unwrap(), "The capital");
    }

    /// Compare the GGUF tokenizer with a reference tokenization: `DEJAVU_TOKENIZER_REF` names a JSONL file of
    /// {"file","line","field","text","ids"} lines written by scripts/check_gguf_tokenizer.py.
    #[test]
    fn smollm2_tokenizer_matches_reference() {
        let Some(path) = smollm2_path() else { return };
        let Some(ref_path) = std::env::var_os("DEJAVU_TOKENIZER_REF")
            .map(PathBuf::from)
            .filter(|p| p.exists())
        else {
            eprintln!("skipping: set DEJAVU_TOKENIZER_REF to an ids file from scripts/check_gguf_tokenizer.py");
            return;
        };
        let tok = GgufFile::open(&path).unwrap().tokenizer().unwrap();
        let text = std::fs::read_to_string(&ref_path).unwrap();
        let (mut compared, mut mismatches) = (0usize, 0usize);
        let mut first: Option<String> = None;
        for (n, line) in text.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            let rec: Json =
                serde_json::from_str(line).unwrap_or_else(|e| panic!("{}:{}: {e}", ref_path.display(), n + 1));
            let s = rec["text"].as_str().unwrap();
            let want: Vec<u32> = rec["ids"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_u64().unwrap() as u32)
                .collect();
            let got = tok.encode(s, false).unwrap();
            compared += 1;
            if got.get_ids() != want.as_slice() {
                mismatches += 1;
                if first.is_none() {
                    first = Some(format!(
                        "{} line {} field {}: text {:?}\n  reference {:?}\n  gguf      {:?}",
                        rec["file"],
                        rec["line"],
                        rec["field"],
                        s,
                        want,
                        got.get_ids()
                    ));
                }
            }
        }
        eprintln!("tokenizer check: {compared} strings compared, {mismatches} mismatches");
        assert!(compared > 0, "no strings in {}", ref_path.display());
        assert_eq!(mismatches, 0, "first mismatch: {}", first.unwrap_or_default());
    }
}
