//! Loading trained predictors for inference ([`Predictors`]) and scoring tokens with them, also as the reference
//! forward's [`Scorer`](crate::model::Scorer).

use std::path::Path;

use burn::tensor::{backend::Backend, Tensor, TensorData};
use safetensors::{Dtype, SafeTensors};

use super::model::LowRankWeights;
use super::{PredictorsManifest, WEIGHTS_FILE};
use crate::error::{Error, Result};
use crate::source::ModelIdentity;
use crate::store::{self, PREDICTORS_FORMAT, PREDICTORS_VERSION};

/// Trained predictors of one model, loaded for inference.
pub struct Predictors<B: Backend> {
    pub manifest: PredictorsManifest,
    mlp: Vec<LowRankWeights<B>>,
    att: Vec<LowRankWeights<B>>,
}

impl<B: Backend> Predictors<B> {
    /// Load `dir` (a `RUN/predictors` directory), refusing predictors trained for a model other than `model`.
    pub fn load(dir: &Path, model: &ModelIdentity, device: &B::Device) -> Result<Self> {
        let mpath = dir.join("manifest.json");
        if !mpath.is_file() {
            return Err(Error::format(&mpath, "not found: not a predictors directory (run `dejavu train-predictors` first)"));
        }
        let manifest: PredictorsManifest = store::read_artifact(&mpath, PREDICTORS_FORMAT, PREDICTORS_VERSION, Some(model))?;
        let id = manifest.model();
        let have: Vec<usize> = manifest.layers.iter().map(|l| l.layer).collect();
        if have != (0..id.layers).collect::<Vec<_>>() {
            return Err(Error::format(&mpath, format!("holds predictors for layers {have:?}, not all {} layers", id.layers)));
        }
        let wpath = dir.join(WEIGHTS_FILE);
        let f = std::fs::File::open(&wpath).map_err(|e| Error::io(&wpath, e))?;
        // SAFETY: the file is only read, and not modified while loaded.
        let bytes = unsafe { memmap2::Mmap::map(&f) }.map_err(|e| Error::io(&wpath, e))?;
        let st = SafeTensors::deserialize(&bytes).map_err(|e| Error::format(&wpath, e.to_string()))?;
        let r = manifest.rank;
        let get = |name: &str, shape: &[usize]| -> Result<Vec<f32>> {
            let v = st.tensor(name).map_err(|e| Error::tensor(&wpath, name, e.to_string()))?;
            if v.dtype() != Dtype::F32 || v.shape() != shape {
                return Err(Error::tensor(
                    &wpath,
                    name,
                    format!("expected F32 {shape:?}, found {:?} {:?}", v.dtype(), v.shape()),
                ));
            }
            Ok(v.data().chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect())
        };
        let load = |l: usize, part: &str, n: usize| -> Result<LowRankWeights<B>> {
            let p = format!("layer.{l}.{part}");
            let d = id.hidden;
            let t1 = |v: Vec<f32>| Tensor::<B, 1>::from_data(TensorData::new(v.clone(), [v.len()]), device);
            Ok(LowRankWeights {
                in_mean: t1(get(&format!("{p}.in_mean"), &[d])?),
                in_inv_std: t1(get(&format!("{p}.in_inv_std"), &[d])?),
                w1: Tensor::from_data(TensorData::new(get(&format!("{p}.w1"), &[d, r])?, [d, r]), device),
                b1: t1(get(&format!("{p}.b1"), &[r])?),
                w2: Tensor::from_data(TensorData::new(get(&format!("{p}.w2"), &[r, n])?, [r, n]), device),
                b2: t1(get(&format!("{p}.b2"), &[n])?),
            })
        };
        let mut mlp = Vec::new();
        let mut att = Vec::new();
        for l in 0..id.layers {
            mlp.push(load(l, "mlp", id.ffn)?);
            att.push(load(l, "att", id.heads)?);
        }
        Ok(Predictors { manifest, mlp, att })
    }

    pub fn layers(&self) -> usize {
        self.mlp.len()
    }

    /// Neuron logits of `layer` from its MLP input (or a block input: [`Predictors::neuron_input`]):
    /// `[b, s, d] -> [b, s, ffn]`.
    pub fn neuron_scores(&self, layer: usize, input: Tensor<B, 3>) -> Tensor<B, 3> {
        self.mlp[layer].scores(input)
    }

    /// What the neuron predictors read (the manifest's `neuron_tap`).
    pub fn neuron_input(&self) -> super::NeuronInput {
        self.manifest.neuron_tap
    }

    /// Head logits of `layer` from the previous layer's block input (layer 0: its own): `[b, s, d] -> [b, s, heads]`.
    pub fn head_scores(&self, layer: usize, prev_block_input: Tensor<B, 3>) -> Tensor<B, 3> {
        self.att[layer].scores(prev_block_input)
    }

    /// Layer `layer`'s neuron predictor (`heads`: its head predictor) on the host, for engines that upload it.
    pub fn host(&self, layer: usize, heads: bool) -> super::model::LowRankHost {
        let w = if heads { &self.att[layer] } else { &self.mlp[layer] };
        let h = |t: &Tensor<B, 1>| crate::model::to_host(t.clone());
        super::model::LowRankHost {
            in_mean: h(&w.in_mean),
            in_inv_std: h(&w.in_inv_std),
            w1: crate::model::to_host(w.w1.clone()),
            b1: h(&w.b1),
            w2: crate::model::to_host(w.w2.clone()),
            b2: h(&w.b2),
        }
    }

    /// Neurons to keep per token in `layer` (reaches the target recall on held-out tokens).
    pub fn k_neurons(&self, layer: usize) -> usize {
        self.manifest.layers[layer].k_neurons
    }

    /// Heads to keep per token in `layer`.
    pub fn k_heads(&self, layer: usize) -> usize {
        self.manifest.layers[layer].k_heads
    }
}

/// Trained predictors drive the reference forward's `PredictedTopK` rules.
impl<B: Backend> crate::model::Scorer<B> for Predictors<B> {
    fn neuron_scores(&self, layer: usize, input: Tensor<B, 3>) -> Tensor<B, 3> {
        Predictors::neuron_scores(self, layer, input)
    }
    fn neuron_input(&self) -> super::NeuronInput {
        Predictors::neuron_input(self)
    }
    fn head_scores(&self, layer: usize, prev_block_input: Tensor<B, 3>) -> Tensor<B, 3> {
        Predictors::head_scores(self, layer, prev_block_input)
    }
}
