//! `Model::load`: weights from a checkpoint onto a burn device, tensor by tensor as the names table lists
//! them (which tensors exist, their names and shapes are decided there, not here).

use burn::tensor::{backend::Backend, Tensor, TensorData};

use super::layers::{Linear, Norm};
use super::{Layer, Mlp, Model};
use crate::config::{Family, ModelConfig};
use crate::error::{Error, Result};
use crate::source::checkpoint::Checkpoint;
use crate::source::names::{Names, Part, Role, Table, TensorSpec};

/// A checkpoint read through the table of its config, onto one device.
struct Loader<'a, B: Backend> {
    ck: &'a dyn Checkpoint,
    table: Table,
    eps: f64,
    dev: &'a B::Device,
    /// Round every weight through this 16-bit type (`DEJAVU_REFERENCE_ROUND=f16|bf16`): the reference then
    /// computes, in f32, the function of the weights the CUDA engine holds, so a comparison isolates the engine's
    /// arithmetic from its weight rounding.
    round: Option<crate::source::weights::Half>,
}

impl<B: Backend> Loader<'_, B> {
    fn spec(&self, role: Role, part: Part, layer: Option<usize>) -> Result<&TensorSpec> {
        self.table.get(role, part, layer).ok_or_else(|| {
            let name = self.table.names.name(role, part, layer);
            Error::tensor(self.ck.file_of(&name), name, "a model of this config has no such tensor")
        })
    }

    /// The tensor as stored, shape checked against the table.
    fn tensor<const D: usize>(&self, spec: &TensorSpec) -> Result<Tensor<B, D>> {
        let mut t = self.ck.get_shaped(&spec.name, &spec.shape)?;
        match self.round {
            Some(crate::source::weights::Half::F16) => t.data.iter_mut().for_each(|v| *v = half::f16::from_f32(*v).to_f32()),
            Some(crate::source::weights::Half::Bf16) => t.data.iter_mut().for_each(|v| *v = half::bf16::from_f32(*v).to_f32()),
            None => {}
        }
        Ok(Tensor::from_data(TensorData::new(t.data, t.shape), self.dev))
    }

    /// A `[rows, cols]` matrix transposed to `[cols, rows]`, materialised once so every later matmul reads
    /// contiguous memory.
    fn transposed(&self, m: Tensor<B, 2>) -> Tensor<B, 2> {
        Tensor::from_data(m.transpose().into_data(), self.dev)
    }

    /// A projection: weight `[out, in]` in the checkpoint, stored `[in, out]`; its bias if the table has one.
    fn linear(&self, role: Role, layer: Option<usize>) -> Result<Linear<B>> {
        let w = self.tensor::<2>(self.spec(role, Part::Weight, layer)?)?;
        let b = match self.table.get(role, Part::Bias, layer) {
            Some(spec) => Some(self.tensor::<1>(spec)?),
            None => None,
        };
        Ok(Linear { w: self.transposed(w), b })
    }

    /// LayerNorm (OPT, weight and bias) or RMSNorm (Llama, weight only).
    fn norm(&self, role: Role, layer: Option<usize>) -> Result<Norm<B>> {
        let w = self.tensor::<1>(self.spec(role, Part::Weight, layer)?)?;
        Ok(match self.table.names.family {
            Family::Opt => Norm::Layer { w, b: self.tensor::<1>(self.spec(role, Part::Bias, layer)?)?, eps: self.eps },
            Family::Llama => Norm::Rms { w, eps: self.eps },
        })
    }

    fn layer(&self, i: usize) -> Result<Layer<B>> {
        let l = Some(i);
        let mlp = match self.table.names.family {
            Family::Opt => Mlp::Relu { fc1: self.linear(Role::Up, l)?, fc2: self.linear(Role::Down, l)? },
            Family::Llama => Mlp::SwiGlu {
                gate: self.linear(Role::Gate, l)?,
                up: self.linear(Role::Up, l)?,
                down: self.linear(Role::Down, l)?,
            },
        };
        Ok(Layer {
            attn_norm: self.norm(Role::AttnNorm, l)?,
            q: self.linear(Role::Q, l)?,
            k: self.linear(Role::K, l)?,
            v: self.linear(Role::V, l)?,
            o: self.linear(Role::O, l)?,
            mlp_norm: self.norm(Role::MlpNorm, l)?,
            mlp,
        })
    }
}

impl<B: Backend> Model<B> {
    /// Load weights following the checkpoint's Hugging Face key names; `on_layer` is called after each layer
    /// (for a progress bar).
    pub fn load(cfg: &ModelConfig, ck: &dyn Checkpoint, dev: &B::Device, mut on_layer: impl FnMut(usize)) -> Result<Self> {
        let names = Names::detect(cfg.family, |n| ck.contains(n));
        let round = match std::env::var("DEJAVU_REFERENCE_ROUND").ok().as_deref() {
            None | Some("") | Some("none") => None,
            Some("f16") => Some(crate::source::weights::Half::F16),
            Some("bf16") => Some(crate::source::weights::Half::Bf16),
            Some(v) => return Err(Error::Env(format!("DEJAVU_REFERENCE_ROUND={v}: expected f16, bf16 or none"))),
        };
        let ld = Loader::<B> { ck, table: Table::new(cfg, names), eps: cfg.norm_eps, dev, round };
        let embed = ld.tensor::<2>(ld.spec(Role::Embed, Part::Weight, None)?)?; // [vocab, embed_dim]
        let pos_embed = match ld.table.get(Role::Positions, Part::Weight, None) {
            Some(spec) => Some(ld.tensor::<2>(spec)?), // [max_positions + 2, hidden]
            None => None,
        };
        let (project_in, project_out) = if ld.table.get(Role::ProjectIn, Part::Weight, None).is_some() {
            (Some(ld.linear(Role::ProjectIn, None)?), Some(ld.linear(Role::ProjectOut, None)?))
        } else {
            (None, None)
        };
        let mut layers = Vec::with_capacity(cfg.layers);
        for i in 0..cfg.layers {
            layers.push(ld.layer(i)?);
            on_layer(i);
        }
        let final_norm = match ld.table.get(Role::FinalNorm, Part::Weight, None) {
            Some(_) => Some(ld.norm(Role::FinalNorm, None)?),
            None => None,
        };
        // OPT checkpoints often leave out a tied lm_head even when the config says untied.
        let lm_head = match ld.table.get(Role::LmHead, Part::Weight, None) {
            Some(spec) if cfg.family == Family::Llama || ck.contains(&spec.name) => ld.tensor::<2>(spec)?,
            _ => embed.clone(),
        };
        let lm_head = ld.transposed(lm_head); // [embed_dim, vocab]
        Ok(Model {
            cfg: cfg.clone(),
            embed,
            pos_embed,
            project_in,
            project_out,
            layers,
            final_norm,
            lm_head,
            device: dev.clone(),
            host: std::sync::OnceLock::new(),
        })
    }
}
