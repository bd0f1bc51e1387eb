//! Checkpoint readers behind one trait: Hugging Face safetensors (single file or sharded index) and GGUF.
//! Both hand out tensors under Hugging Face names and shapes, as raw bytes with their dtype
//! ([`Checkpoint::raw`], borrowed from the memory map where possible) or converted to f32 ([`Checkpoint::get`]).

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use memmap2::Mmap;
use safetensors::{Dtype, SafeTensors};

use crate::error::{Error, Result};
use crate::source::gguf::GgufFile;
use crate::source::weights::{DType, HostTensor, RawTensor, TensorMeta};

/// A source of named tensors.
pub trait Checkpoint {
    /// The tensor `name` (Hugging Face key) as stored: bytes and dtype, borrowed from the file where its layout
    /// needs no rewrite.
    fn raw(&self, name: &str) -> Result<RawTensor<'_>>;
    /// Dtype, shape and size of `name` without reading its data.
    fn meta(&self, name: &str) -> Result<TensorMeta>;
    /// Every tensor name, in file order.
    fn names(&self) -> Vec<String>;
    fn contains(&self, name: &str) -> bool;
    /// The file that holds `name` (or the checkpoint's main file), for error messages.
    fn file_of(&self, name: &str) -> PathBuf;
    /// Every file the checkpoint reads (for fingerprints).
    fn files(&self) -> Vec<PathBuf>;

    /// A hint that the caller is done with `name`'s bytes, so the pages it faulted in may leave memory (an
    /// uploader streaming a checkpoint larger than RAM calls it after each tensor). No-op by default.
    fn release(&self, _name: &str) {}

    /// The tensor `name` in f32 (for the burn reference).
    fn get(&self, name: &str) -> Result<HostTensor> {
        Ok(self.raw(name)?.to_host())
    }

    /// `get` plus a check that the shape is what `config.json` implies.
    fn get_shaped(&self, name: &str, shape: &[usize]) -> Result<HostTensor> {
        let t = self.get(name)?;
        if t.shape != shape {
            return Err(Error::tensor(
                self.file_of(name),
                name,
                format!("shape {:?} does not match the model config (expected {:?})", t.shape, shape),
            ));
        }
        Ok(t)
    }
}

/// Where one safetensors tensor lies.
struct Entry {
    shard: usize,
    dtype: Dtype,
    shape: Vec<usize>,
    /// Absolute byte range in the shard file.
    start: usize,
    end: usize,
}

/// Memory-mapped safetensors files: one `model.safetensors`, or the shards of a `model.safetensors.index.json`.
pub struct SafetensorsCheckpoint {
    shards: Vec<(PathBuf, Mmap)>,
    index: BTreeMap<String, Entry>,
    /// Names in file order (shard by shard, by data offset).
    order: Vec<String>,
}

impl SafetensorsCheckpoint {
    pub fn open_file(path: &Path) -> Result<Self> {
        let mut ck = SafetensorsCheckpoint { shards: Vec::new(), index: BTreeMap::new(), order: Vec::new() };
        ck.add_shard(path, None)?;
        Ok(ck)
    }

    /// Open the shards listed in a `model.safetensors.index.json`.
    pub fn open_index(index_path: &Path) -> Result<Self> {
        #[derive(serde::Deserialize)]
        struct Index {
            weight_map: BTreeMap<String, String>,
        }
        let text = std::fs::read_to_string(index_path).map_err(|e| Error::io(index_path, e))?;
        let idx: Index =
            serde_json::from_str(&text).map_err(|e| Error::json(index_path, e))?;
        let dir = index_path.parent().unwrap_or(Path::new("."));
        let mut files: Vec<&String> = idx.weight_map.values().collect();
        files.sort();
        files.dedup();
        let mut ck = SafetensorsCheckpoint { shards: Vec::new(), index: BTreeMap::new(), order: Vec::new() };
        for f in files {
            if f.contains('/') || f.contains('\\') || f.starts_with("..") {
                return Err(Error::field(index_path, "weight_map", format!("shard name {f:?} is not a plain file name")));
            }
            let expected: Vec<&str> =
                idx.weight_map.iter().filter(|(_, v)| *v == f).map(|(k, _)| k.as_str()).collect();
            ck.add_shard(&dir.join(f), Some((&expected, index_path)))?;
        }
        Ok(ck)
    }

    fn add_shard(&mut self, path: &Path, expected: Option<(&[&str], &Path)>) -> Result<()> {
        let file = File::open(path).map_err(|e| Error::io(path, e))?;
        // SAFETY: the file is opened read-only and we never hand out references that outlive `self`;
        // a checkpoint changed underneath a running process is outside what any loader can defend against.
        let mmap = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
        check_not_truncated(path, &mmap)?;
        let (header_len, meta) = SafeTensors::read_metadata(&mmap)
            .map_err(|e| Error::format(path, format!("not a valid safetensors file: {e}")))?;
        let data_start = 8 + header_len;
        let names = meta.offset_keys();
        if let Some((expected, index_path)) = expected {
            for name in expected {
                if !names.iter().any(|n| n == name) {
                    return Err(Error::tensor(
                        path,
                        *name,
                        format!("listed in {} but missing from this shard", index_path.display()),
                    ));
                }
            }
        }
        let shard = self.shards.len();
        for n in names {
            let Some(info) = meta.info(&n) else { continue };
            let (a, b) = info.data_offsets;
            let entry = Entry { shard, dtype: info.dtype, shape: info.shape.clone(), start: data_start + a, end: data_start + b };
            self.index.insert(n.clone(), entry);
            self.order.push(n);
        }
        self.shards.push((path.to_path_buf(), mmap));
        Ok(())
    }

    /// The entry of `name` and the path of its shard.
    fn entry(&self, name: &str) -> Result<(&Entry, &Path)> {
        match self.index.get(name) {
            Some(e) => Ok((e, &self.shards[e.shard].0)),
            None => Err(Error::tensor(self.file_of(name), name, "missing from the checkpoint")),
        }
    }
}

/// Name the tensor a truncated file cuts off, which the safetensors crate only reports as "incomplete".
fn check_not_truncated(path: &Path, bytes: &[u8]) -> Result<()> {
    let Some(len_bytes) = bytes.get(..8) else {
        return Err(Error::format(path, format!("not a safetensors file: {} bytes, shorter than the 8-byte header length", bytes.len())));
    };
    let mut arr = [0u8; 8];
    arr.copy_from_slice(len_bytes);
    let header_len = u64::from_le_bytes(arr) as usize;
    let Some(header) = bytes.get(8..8usize.saturating_add(header_len)) else {
        return Err(Error::format(
            path,
            format!("truncated or not safetensors: header claims {header_len} bytes but the file has {}", bytes.len()),
        ));
    };
    // Malformed headers are left to the safetensors crate, which names the offending field.
    let Ok(serde_json::Value::Object(map)) = serde_json::from_slice::<serde_json::Value>(header) else {
        return Ok(());
    };
    let data_len = bytes.len() - 8 - header_len;
    for (name, info) in &map {
        let end = info.get("data_offsets").and_then(|o| o.get(1)).and_then(|e| e.as_u64());
        if let Some(end) = end {
            if end as usize > data_len {
                return Err(Error::tensor(
                    path,
                    name,
                    format!("file is truncated: data ends at byte {end} of the data section, which has only {data_len} bytes"),
                ));
            }
        }
    }
    Ok(())
}

fn dtype_of(dtype: Dtype, path: &Path, name: &str) -> Result<DType> {
    match dtype {
        Dtype::F32 => Ok(DType::F32),
        Dtype::F16 => Ok(DType::F16),
        Dtype::BF16 => Ok(DType::BF16),
        other => Err(Error::tensor(path, name, format!("dtype {other:?} is not supported (expected F32, F16 or BF16)"))),
    }
}

impl Checkpoint for SafetensorsCheckpoint {
    fn raw(&self, name: &str) -> Result<RawTensor<'_>> {
        let (e, path) = self.entry(name)?;
        let dtype = dtype_of(e.dtype, path, name)?;
        let mmap = &self.shards[e.shard].1;
        let bytes = mmap.get(e.start..e.end).ok_or_else(|| Error::tensor(path, name, "data lies beyond the end of the file"))?;
        if e.shape.iter().product::<usize>() * dtype.size() != bytes.len() {
            return Err(Error::tensor(path, name, "byte length does not match its shape"));
        }
        Ok(RawTensor { dtype, shape: e.shape.clone(), bytes: Cow::Borrowed(bytes) })
    }

    fn meta(&self, name: &str) -> Result<TensorMeta> {
        let (e, path) = self.entry(name)?;
        let dtype = dtype_of(e.dtype, path, name)?;
        Ok(TensorMeta { stored: dtype.name().to_string(), dtype, shape: e.shape.clone(), bytes: e.end - e.start })
    }

    fn names(&self) -> Vec<String> {
        self.order.clone()
    }

    fn release(&self, name: &str) {
        let Some(e) = self.index.get(name) else { return };
        let mmap = &self.shards[e.shard].1;
        // Whole pages inside the tensor only, so a neighbour's pages stay.
        let page = 4096;
        let (start, end) = (e.start.div_ceil(page) * page, e.end / page * page);
        if end > start {
            // SAFETY: the map is a read-only private file mapping: MADV_DONTNEED only drops the process's copy of
            // the pages, and any later access (including through a RawTensor still borrowed) reads them back
            // from the file. Failure is harmless (the pages stay resident).
            let _ = unsafe { mmap.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, start, end - start) };
        }
    }

    fn contains(&self, name: &str) -> bool {
        self.index.contains_key(name)
    }

    fn files(&self) -> Vec<PathBuf> {
        self.shards.iter().map(|s| s.0.clone()).collect()
    }

    fn file_of(&self, name: &str) -> PathBuf {
        match self.index.get(name) {
            Some(e) => self.shards[e.shard].0.clone(),
            None => self.shards.first().map(|s| s.0.clone()).unwrap_or_default(),
        }
    }
}

/// A GGUF file read as a Llama checkpoint with Hugging Face names (q/k un-permuted by the reader).
pub struct GgufCheckpoint {
    pub file: GgufFile,
    path: PathBuf,
    names: Vec<String>,
}

impl GgufCheckpoint {
    pub fn open(path: &Path) -> Result<Self> {
        let file = GgufFile::open(path)?;
        let names = file.hf_tensor_names();
        Ok(GgufCheckpoint { file, path: path.to_path_buf(), names })
    }
}

impl Checkpoint for GgufCheckpoint {
    fn raw(&self, name: &str) -> Result<RawTensor<'_>> {
        self.file.hf_raw(name)
    }
    fn meta(&self, name: &str) -> Result<TensorMeta> {
        self.file.hf_meta(name)
    }
    fn names(&self) -> Vec<String> {
        self.names.clone()
    }
    /// Exact f32 dequantization (not through `raw`'s f16), so quantized models keep their numbers.
    fn get(&self, name: &str) -> Result<HostTensor> {
        self.file.hf_tensor(name)
    }
    fn contains(&self, name: &str) -> bool {
        self.names.iter().any(|n| n == name)
    }
    fn file_of(&self, _name: &str) -> PathBuf {
        self.path.clone()
    }
    fn files(&self) -> Vec<PathBuf> {
        vec![self.path.clone()]
    }
}
