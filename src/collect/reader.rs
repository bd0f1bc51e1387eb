//! Reading a finished collection back (`train-predictors`): one tap of one layer over the recorded tokens, as
//! f32, from the memory-mapped shards.

use std::path::{Path, PathBuf};

use safetensors::{Dtype, SafeTensors};

use super::{read_acts_manifest, tensor_name, ActsManifest, Tap};
use crate::error::{Error, Result};
use crate::source::ModelIdentity;
use crate::store::{RunDir, ACTS_FORMAT, ACTS_VERSION};

/// A finished collection, opened for reading (by `train-predictors`).
pub struct Activations {
    pub run: PathBuf,
    pub dir: PathBuf,
    pub manifest: ActsManifest,
}

impl Activations {
    /// Open `run/acts`; a missing run directory, a missing manifest or an unfinished collection is an error.
    pub fn open(run: &Path) -> Result<Self> {
        let rd = RunDir::open(run)?;
        let (dir, mpath) = (rd.acts(), rd.acts_manifest());
        if !mpath.is_file() {
            return Err(Error::format(&mpath, "not found: this is not a run directory with collected activations (run `dejavu collect` first)"));
        }
        let manifest = read_acts_manifest(&mpath, None)?;
        if !manifest.complete {
            return Err(Error::format(
                &mpath,
                format!(
                    "collection is not finished ({} of {} tokens); rerun `dejavu collect` with the same arguments to finish it",
                    manifest.tokens, manifest.tokens_requested
                ),
            ));
        }
        Ok(Activations { run: run.to_path_buf(), dir, manifest })
    }

    /// `RUN/acts/manifest.json`.
    pub fn manifest_path(&self) -> PathBuf {
        self.dir.join("manifest.json")
    }

    /// Refuse activations recorded from a model other than `model`.
    pub fn check_model(&self, model: &ModelIdentity) -> Result<()> {
        self.manifest.header.check(&self.manifest_path(), ACTS_FORMAT, ACTS_VERSION, model)
    }

    /// Tap `tap` of `layer` over the first `max_tokens` recorded tokens, as f32 `[T, width]` (row-major).
    pub fn read(&self, layer: usize, tap: Tap, max_tokens: usize) -> Result<(Vec<f32>, usize)> {
        let m = &self.manifest;
        let mpath = self.manifest_path();
        let width = m.width(tap).ok_or_else(|| Error::format(&mpath, format!("tap `{}` was not recorded", tap.name())))?;
        if layer >= m.layers {
            return Err(Error::format(&mpath, format!("layer {layer} out of range ({} layers)", m.layers)));
        }
        let name = tensor_name(layer, tap);
        let total = m.tokens.min(max_tokens);
        let mut out = Vec::with_capacity(total * width);
        for s in &m.shards {
            if out.len() >= total * width {
                break;
            }
            let path = self.dir.join(&s.file);
            let bytes = map_file(&path)?;
            let st = SafeTensors::deserialize(&bytes).map_err(|e| Error::format(&path, e.to_string()))?;
            let view = st.tensor(&name).map_err(|e| Error::tensor(&path, &name, e.to_string()))?;
            if view.dtype() != Dtype::F16 || view.shape() != [s.tokens, width] {
                return Err(Error::tensor(
                    &path,
                    &name,
                    format!("expected F16 [{}, {width}], found {:?} {:?}", s.tokens, view.dtype(), view.shape()),
                ));
            }
            let take = (total * width - out.len()).min(s.tokens * width);
            out.extend(view.data()[..2 * take].chunks_exact(2).map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32()));
        }
        Ok((out, total))
    }

    /// Token ids of the first `max_tokens` recorded tokens.
    pub fn tokens(&self, max_tokens: usize) -> Result<Vec<u32>> {
        let total = self.manifest.tokens.min(max_tokens);
        let mut out = Vec::with_capacity(total);
        for s in &self.manifest.shards {
            if out.len() >= total {
                break;
            }
            let path = self.dir.join(&s.file);
            let bytes = map_file(&path)?;
            let st = SafeTensors::deserialize(&bytes).map_err(|e| Error::format(&path, e.to_string()))?;
            let view = st.tensor("tokens").map_err(|e| Error::tensor(&path, "tokens", e.to_string()))?;
            let take = (total - out.len()).min(s.tokens);
            out.extend(view.data()[..4 * take].chunks_exact(4).map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]])));
        }
        Ok(out)
    }
}

fn map_file(path: &Path) -> Result<memmap2::Mmap> {
    let f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    // SAFETY: shards are written once (atomically) and not modified while a run reads them.
    unsafe { memmap2::Mmap::map(&f) }.map_err(|e| Error::io(path, e))
}
