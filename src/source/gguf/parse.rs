//! The GGUF container: ggml type sizes, the metadata value types, and a bounds-checked parse of the header,
//! metadata and tensor table (no tensor data is touched here).

use std::collections::HashMap;
use std::path::Path;
use std::str::FromStr;

use crate::error::{Error, Result};

pub(super) const MAGIC: [u8; 4] = *b"GGUF";
pub(super) const DEFAULT_ALIGNMENT: u64 = 32;
/// ggml's GGML_MAX_DIMS.
pub(super) const MAX_DIMS: u32 = 4;
/// Nesting limit for metadata arrays of arrays.
pub(super) const MAX_ARRAY_DEPTH: u32 = 8;
/// Counts in the file only bound how much is reserved up front; longer lists grow as their bytes are parsed,
/// so memory stays proportional to the bytes actually present.
pub(super) const PREALLOC_ITEMS: usize = 1 << 16;

/// (name, elements per block, bytes per block) of a ggml type id, for every type ggml has defined.
/// The sizes of types this module cannot dequantize are still used to check the tensor lies inside the file.
pub(super) fn ggml_type_info(id: u32) -> Option<(&'static str, u64, u64)> {
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

pub(super) fn ggml_type_name(id: u32) -> String {
    match ggml_type_info(id) {
        Some((name, _, _)) => name.to_string(),
        None => "unknown".to_string(),
    }
}

/// A metadata value. Arrays of scalars are kept typed and compact (a vocabulary is tens of thousands long).
#[derive(Debug, Clone)]
#[allow(dead_code)] // array payloads that no accessor reads yet are still shown by `Debug` in error messages
pub(super) enum MetaValue {
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
    pub(super) fn type_name(&self) -> &'static str {
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

    pub(super) fn as_int(&self) -> Option<i128> {
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
    pub(super) fn as_f64(&self) -> Option<f64> {
        match *self {
            MetaValue::F32(v) => f64::from_str(&v.to_string()).ok(),
            MetaValue::F64(v) => Some(v),
            _ => self.as_int().map(|v| v as f64),
        }
    }
}

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

#[derive(Debug, Clone)]
pub(super) struct TensorInfo {
    pub name: String,
    /// GGUF order: fastest-varying dimension first.
    pub dims: Vec<u64>,
    pub type_id: u32,
    /// Absolute byte range in the file (validated at open).
    pub start: usize,
    pub len: usize,
}

/// What [`parse`] reads from the front of a file.
pub(super) struct Header {
    pub version: u32,
    pub metadata: Vec<(String, MetaValue)>,
    pub meta_index: HashMap<String, usize>,
    pub tensors: Vec<TensorInfo>,
    pub tensor_index: HashMap<String, usize>,
}

fn round_up(x: u64, align: u64) -> Option<u64> {
    x.checked_add(align - 1).map(|v| v / align * align)
}

/// Parse the header, metadata and tensor table of `buf` (the whole file; `p` is its path for messages).
/// Checks alignment, data offsets and sizes against the file length.
pub(super) fn parse(buf: &[u8], p: &Path) -> Result<Header> {
    let header = |detail: String| Error::format(p, format!("malformed header: {detail}"));
    let mut c = Cursor { buf, pos: 0 };
    if buf.len() < 4 {
        return Err(header(format!(
            "file truncated: {} bytes, too short for the GGUF magic",
            buf.len()
        )));
    }
    let magic = c.array::<4>("magic").map_err(header)?;
    if magic != MAGIC {
        let found = magic.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(" ");
        return Err(Error::format(p, format!("not a GGUF file (magic bytes {found}, expected 47 47 55 46 \"GGUF\")")));
    }
    let version = c.u32("version").map_err(header)?;
    if version != 2 && version != 3 {
        return Err(Error::format(p, format!("unsupported GGUF version {version}; supported: 2, 3")));
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
            return Err(Error::field(p, key, "duplicate key"));
        }
        metadata.push((key, value));
    }

    let alignment = match meta_index.get("general.alignment").map(|&i| &metadata[i].1) {
        None => DEFAULT_ALIGNMENT,
        Some(MetaValue::U32(a)) if *a > 0 && a.is_power_of_two() => u64::from(*a),
        Some(v) => {
            return Err(Error::field(p, "general.alignment", format!("must be a u32 power of two, got {} {v:?}", v.type_name())))
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
        let tensor_err = |detail: String| Error::tensor(p, &name, detail);
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
        let tensor_err = |detail: String| Error::tensor(p, &r.name, detail);
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

    Ok(Header { version, metadata, meta_index, tensors, tensor_index })
}
