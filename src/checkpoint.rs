//! Checkpoint readers behind one trait: Hugging Face safetensors (single file or sharded index) and GGUF.
//! Both hand out [`HostTensor`]s in f32 with Hugging Face names and shapes, so the model code is written once.

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use memmap2::Mmap;
use safetensors::{Dtype, SafeTensors};

use crate::error::{LoadError, Result};
use crate::gguf::GgufFile;
use crate::weights::HostTensor;

/// A source of named tensors.
pub trait Checkpoint {
    /// The tensor `name` (Hugging Face key) in f32.
    fn get(&self, name: &str) -> Result<HostTensor>;
    fn contains(&self, name: &str) -> bool;
    /// The file that holds `name` (or the checkpoint's main file), for error messages.
    fn file_of(&self, name: &str) -> PathBuf;
    /// Every file the checkpoint reads (for fingerprints).
    fn files(&self) -> Vec<PathBuf>;

    /// `get` plus a check that the shape is what `config.json` implies.
    fn get_shaped(&self, name: &str, shape: &[usize]) -> Result<HostTensor> {
        let t = self.get(name)?;
        if t.shape != shape {
            return Err(LoadError::tensor(
                self.file_of(name),
                name,
                format!("shape {:?} does not match the model config (expected {:?})", t.shape, shape),
            ));
        }
        Ok(t)
    }
}

/// Memory-mapped safetensors files: one `model.safetensors`, or the shards of a `model.safetensors.index.json`.
pub struct SafetensorsCheckpoint {
    shards: Vec<(PathBuf, Mmap)>,
    /// tensor name -> index into `shards`
    index: BTreeMap<String, usize>,
}

impl SafetensorsCheckpoint {
    pub fn open_file(path: &Path) -> Result<Self> {
        let mut ck = SafetensorsCheckpoint { shards: Vec::new(), index: BTreeMap::new() };
        ck.add_shard(path, None)?;
        Ok(ck)
    }

    /// Open the shards listed in a `model.safetensors.index.json`.
    pub fn open_index(index_path: &Path) -> Result<Self> {
        #[derive(serde::Deserialize)]
        struct Index {
            weight_map: BTreeMap<String, String>,
        }
        let text = std::fs::read_to_string(index_path).map_err(|e| LoadError::io(index_path, e))?;
        let idx: Index =
            serde_json::from_str(&text).map_err(|e| LoadError::Json { path: index_path.into(), err: e })?;
        let dir = index_path.parent().unwrap_or(Path::new("."));
        let mut files: Vec<&String> = idx.weight_map.values().collect();
        files.sort();
        files.dedup();
        let mut ck = SafetensorsCheckpoint { shards: Vec::new(), index: BTreeMap::new() };
        for f in files {
            if f.contains('/') || f.contains('\\') || f.starts_with("..") {
                return Err(LoadError::field(index_path, "weight_map", format!("shard name {f:?} is not a plain file name")));
            }
            let expected: Vec<&str> =
                idx.weight_map.iter().filter(|(_, v)| *v == f).map(|(k, _)| k.as_str()).collect();
            ck.add_shard(&dir.join(f), Some((&expected, index_path)))?;
        }
        Ok(ck)
    }

    fn add_shard(&mut self, path: &Path, expected: Option<(&[&str], &Path)>) -> Result<()> {
        let file = File::open(path).map_err(|e| LoadError::io(path, e))?;
        // SAFETY: the file is opened read-only and we never hand out references that outlive `self`;
        // a checkpoint changed underneath a running process is outside what any loader can defend against.
        let mmap = unsafe { Mmap::map(&file) }.map_err(|e| LoadError::io(path, e))?;
        check_not_truncated(path, &mmap)?;
        let names: Vec<String> = {
            let st = SafeTensors::deserialize(&mmap)
                .map_err(|e| LoadError::format(path, format!("not a valid safetensors file: {e}")))?;
            st.names().into_iter().map(|s| s.to_string()).collect()
        };
        if let Some((expected, index_path)) = expected {
            for name in expected {
                if !names.iter().any(|n| n == name) {
                    return Err(LoadError::tensor(
                        path,
                        *name,
                        format!("listed in {} but missing from this shard", index_path.display()),
                    ));
                }
            }
        }
        let shard = self.shards.len();
        for n in names {
            self.index.insert(n, shard);
        }
        self.shards.push((path.to_path_buf(), mmap));
        Ok(())
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.index.keys().map(|s| s.as_str())
    }
}

/// Name the tensor a truncated file cuts off, which the safetensors crate only reports as "incomplete".
fn check_not_truncated(path: &Path, bytes: &[u8]) -> Result<()> {
    let Some(len_bytes) = bytes.get(..8) else {
        return Err(LoadError::format(path, format!("not a safetensors file: {} bytes, shorter than the 8-byte header length", bytes.len())));
    };
    let mut arr = [0u8; 8];
    arr.copy_from_slice(len_bytes);
    let header_len = u64::from_le_bytes(arr) as usize;
    let Some(header) = bytes.get(8..8usize.saturating_add(header_len)) else {
        return Err(LoadError::format(
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
                return Err(LoadError::tensor(
                    path,
                    name,
                    format!("file is truncated: data ends at byte {end} of the data section, which has only {data_len} bytes"),
                ));
            }
        }
    }
    Ok(())
}

impl Checkpoint for SafetensorsCheckpoint {
    fn get(&self, name: &str) -> Result<HostTensor> {
        let Some(&shard) = self.index.get(name) else {
            return Err(LoadError::tensor(self.file_of(name), name, "missing from the checkpoint"));
        };
        let (path, mmap) = &self.shards[shard];
        let st = SafeTensors::deserialize(mmap)
            .map_err(|e| LoadError::format(path, format!("not a valid safetensors file: {e}")))?;
        let view = st.tensor(name).map_err(|e| LoadError::tensor(path, name, e.to_string()))?;
        let bytes = view.data();
        let data: Vec<f32> = match view.dtype() {
            Dtype::F32 => bytes.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect(),
            Dtype::F16 => {
                bytes.chunks_exact(2).map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32()).collect()
            }
            Dtype::BF16 => {
                bytes.chunks_exact(2).map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32()).collect()
            }
            other => {
                return Err(LoadError::tensor(
                    path,
                    name,
                    format!("dtype {other:?} is not supported (expected F32, F16 or BF16)"),
                ))
            }
        };
        let shape = view.shape().to_vec();
        if shape.iter().product::<usize>() != data.len() {
            return Err(LoadError::tensor(path, name, "byte length does not match its shape"));
        }
        Ok(HostTensor { shape, data })
    }

    fn contains(&self, name: &str) -> bool {
        self.index.contains_key(name)
    }

    fn files(&self) -> Vec<PathBuf> {
        self.shards.iter().map(|s| s.0.clone()).collect()
    }

    fn file_of(&self, name: &str) -> PathBuf {
        match self.index.get(name) {
            Some(&i) => self.shards[i].0.clone(),
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
    fn get(&self, name: &str) -> Result<HostTensor> {
        Ok(self.file.hf_tensor(name)?)
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
