//! Where models come from: a local Hugging Face directory, a Hub id through hf-hub's cache, or a GGUF file.
//! [`ModelFiles::resolve`] turns the one `--model` argument into a config, a checkpoint and a tokenizer.
//! Below it: [`checkpoint`] (the `Checkpoint` trait, raw bytes and f32), [`weights`] (host tensor types),
//! [`names`] (one table of tensor names and shapes per family), [`gguf`], [`hub`], [`inventory`].

pub mod checkpoint;
pub mod gguf;
pub mod hub;
pub mod inventory;
pub mod names;
pub mod weights;

use std::path::{Path, PathBuf};

use tokenizers::Tokenizer;

use crate::config::ModelConfig;
use crate::error::{Error, Result};
use checkpoint::{Checkpoint, GgufCheckpoint, SafetensorsCheckpoint};

/// The kind of source a `--model` argument named.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SourceKind {
    HfDir(PathBuf),
    Gguf(PathBuf),
    Hub { id: String, snapshot: PathBuf },
}

/// Everything needed to build a model: its config, its tensors, its tokenizer.
pub struct ModelFiles {
    pub kind: SourceKind,
    pub config: ModelConfig,
    pub checkpoint: Box<dyn Checkpoint>,
    pub tokenizer: Tokenizer,
    /// Human-readable identity (path or Hub id) for reports and manifests.
    pub identity: String,
}

impl ModelFiles {
    /// Resolve a `--model` argument: an existing path (directory or `.gguf` file) wins; otherwise a string of
    /// the form `owner/name` is taken as a Hugging Face Hub id.
    pub fn resolve(spec: &str) -> Result<Self> {
        let path = Path::new(spec);
        if path.is_dir() {
            return Self::from_hf_dir(path, SourceKind::HfDir(path.to_path_buf()), spec.to_string());
        }
        if path.is_file() {
            return Self::from_gguf(path);
        }
        if looks_like_hub_id(spec) {
            return Self::from_hub(spec);
        }
        Err(Error::io(path, std::io::Error::new(std::io::ErrorKind::NotFound, "no such file or directory (and not a Hub id of the form owner/name)")))
    }

    fn from_hf_dir(dir: &Path, kind: SourceKind, identity: String) -> Result<Self> {
        let config = ModelConfig::from_file(&dir.join("config.json"))?;
        let index = dir.join("model.safetensors.index.json");
        let single = dir.join("model.safetensors");
        let checkpoint: Box<dyn Checkpoint> = if index.is_file() {
            Box::new(SafetensorsCheckpoint::open_index(&index)?)
        } else if single.exists() {
            Box::new(SafetensorsCheckpoint::open_file(&single)?)
        } else {
            return Err(Error::format(
                dir,
                "no model.safetensors or model.safetensors.index.json in this directory (pytorch .bin is not supported)",
            ));
        };
        let tokenizer = load_tokenizer_json(&dir.join("tokenizer.json"))?;
        Ok(ModelFiles { kind, config, checkpoint, tokenizer, identity })
    }

    fn from_gguf(path: &Path) -> Result<Self> {
        let ck = GgufCheckpoint::open(path)?;
        let config = ModelConfig::from_json(&ck.file.hf_config()?, path)?;
        let beside = path.with_file_name("tokenizer.json");
        let tokenizer = if beside.is_file() { load_tokenizer_json(&beside)? } else { ck.file.tokenizer()? };
        Ok(ModelFiles {
            kind: SourceKind::Gguf(path.to_path_buf()),
            config,
            checkpoint: Box::new(ck),
            tokenizer,
            identity: path.display().to_string(),
        })
    }

    fn from_hub(id: &str) -> Result<Self> {
        let snapshot = hub::fetch(id)?;
        Self::from_hf_dir(&snapshot, SourceKind::Hub { id: id.to_string(), snapshot: snapshot.clone() }, id.to_string())
    }
}

/// What later stages record about the model they were fed, so a stage can refuse artifacts of another model.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ModelIdentity {
    /// The `--model` argument as given (path or Hub id); informational, not compared.
    pub source: String,
    /// Content fingerprint (see [`ModelFiles::fingerprint`]); this is what is compared.
    pub fingerprint: String,
    pub family: crate::config::Family,
    pub layers: usize,
    pub hidden: usize,
    pub ffn: usize,
    pub heads: usize,
    pub kv_heads: usize,
}

impl ModelIdentity {
    /// `Err` with a one-line reason when `other` (read from `artifact`) is not the same model.
    pub fn ensure_same(&self, other: &ModelIdentity, artifact: &Path) -> std::result::Result<(), String> {
        if self.fingerprint != other.fingerprint {
            return Err(format!(
                "{}: made for model `{}` (fingerprint {}), but the model given is `{}` (fingerprint {})",
                artifact.display(),
                other.source,
                other.fingerprint,
                self.source,
                self.fingerprint
            ));
        }
        Ok(())
    }
}

impl ModelFiles {
    /// A content fingerprint: FNV-1a (64-bit) over the runtime config and, for every checkpoint file, its size
    /// and its first and last MiB. Cheap on multi-GB checkpoints and changes when weights are swapped.
    pub fn fingerprint(&self) -> Result<String> {
        use std::io::{Read, Seek, SeekFrom};
        let mut h = Fnv64::new();
        h.update(serde_json::to_string(&self.config).unwrap_or_default().as_bytes());
        for path in self.checkpoint.files() {
            let mut f = std::fs::File::open(&path).map_err(|e| Error::io(&path, e))?;
            let len = f.metadata().map_err(|e| Error::io(&path, e))?.len();
            h.update(&len.to_le_bytes());
            let mut buf = vec![0u8; (1 << 20).min(len as usize)];
            f.read_exact(&mut buf).map_err(|e| Error::io(&path, e))?;
            h.update(&buf);
            f.seek(SeekFrom::Start(len - buf.len() as u64)).map_err(|e| Error::io(&path, e))?;
            f.read_exact(&mut buf).map_err(|e| Error::io(&path, e))?;
            h.update(&buf);
        }
        Ok(format!("{:016x}", h.0))
    }

    pub fn identity(&self) -> Result<ModelIdentity> {
        let c = &self.config;
        Ok(ModelIdentity {
            source: self.identity.clone(),
            fingerprint: self.fingerprint()?,
            family: c.family,
            layers: c.layers,
            hidden: c.hidden,
            ffn: c.ffn,
            heads: c.heads,
            kv_heads: c.kv_heads,
        })
    }
}

struct Fnv64(u64);

impl Fnv64 {
    fn new() -> Self {
        Fnv64(0xcbf2_9ce4_8422_2325)
    }
    fn update(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 ^= b as u64;
            self.0 = self.0.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
}

pub fn load_tokenizer_json(path: &Path) -> Result<Tokenizer> {
    if !path.is_file() {
        return Err(Error::io(path, std::io::Error::new(std::io::ErrorKind::NotFound, "tokenizer file not found")));
    }
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    // The tokenizers crate panics on some malformed JSON (found by scripts/fuzz.sh: a trailing comma or a non-string
    // key inside `decoder`), so the syntax is checked here first and any panic left is turned into an error.
    serde_json::from_slice::<serde_json::Value>(&bytes).map_err(|e| Error::format(path, format!("not a valid tokenizer.json: {e}")))?;
    let text = std::str::from_utf8(&bytes).map_err(|e| Error::format(path, format!("not a valid tokenizer.json: {e}")))?;
    let parsed = std::panic::catch_unwind(|| text.parse::<Tokenizer>())
        .map_err(|_| Error::format(path, "not a valid tokenizer.json: the tokenizers library could not read it (it panicked)"))?;
    parsed.map_err(|e| Error::format(path, format!("not a valid tokenizer.json: {e}")))
}

fn looks_like_hub_id(spec: &str) -> bool {
    let parts: Vec<&str> = spec.split('/').collect();
    parts.len() == 2
        && parts.iter().all(|p| {
            !p.is_empty()
                && !p.starts_with('.')
                && p.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        })
}
