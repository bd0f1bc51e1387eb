//! One table per family of tensor names and shapes, in Hugging Face naming and `[out, in]` shape convention.
//!
//! Every reader and writer of weights goes through it: `Model::load` (which tensor feeds which layer), the
//! fixture writer (what a seeded checkpoint holds, in which order), the GGUF mapper (llama.cpp names to HF
//! names) and, later, the GPU uploader. A name is spelled in exactly one place: [`Names::name`].

use std::collections::HashMap;

use crate::config::{Family, ModelConfig};

/// What a tensor is for, independent of how a family or a file format spells it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    /// Token embedding `[vocab, embed_dim]`.
    Embed,
    /// OPT learned positions `[max_positions + 2, hidden]` (fairseq offset of 2).
    Positions,
    /// OPT-350m: `[hidden, embed_dim]`, embeddings into the residual width.
    ProjectIn,
    /// OPT-350m: `[embed_dim, hidden]`, back out before the head.
    ProjectOut,
    /// Norm before attention (OPT `self_attn_layer_norm`, Llama `input_layernorm`).
    AttnNorm,
    /// `[heads * head_dim, hidden]`
    Q,
    /// `[kv_heads * head_dim, hidden]`
    K,
    /// `[kv_heads * head_dim, hidden]`
    V,
    /// `[hidden, heads * head_dim]` (OPT `out_proj`, Llama `o_proj`).
    O,
    /// Norm before the MLP (OPT `final_layer_norm` inside a layer, Llama `post_attention_layernorm`).
    MlpNorm,
    /// Llama `gate_proj` `[ffn, hidden]`.
    Gate,
    /// `[ffn, hidden]`: OPT `fc1`, Llama `up_proj`.
    Up,
    /// `[hidden, ffn]`: OPT `fc2`, Llama `down_proj`.
    Down,
    /// Norm after the last layer (OPT `final_layer_norm` of the decoder, Llama `norm`).
    FinalNorm,
    /// Untied output head `[vocab, embed_dim]`.
    LmHead,
}

impl Role {
    pub fn is_norm(self) -> bool {
        matches!(self, Role::AttnNorm | Role::MlpNorm | Role::FinalNorm)
    }
}

/// The `.weight` or `.bias` half of a parameter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Part {
    Weight,
    Bias,
}

/// One tensor a model of some config holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorSpec {
    /// Hugging Face key, e.g. `model.layers.3.self_attn.q_proj.weight`.
    pub name: String,
    /// Row-major, `[out, in]` for projections.
    pub shape: Vec<usize>,
    pub role: Role,
    pub part: Part,
    /// `Some(layer)` for per-layer tensors.
    pub layer: Option<usize>,
}

impl TensorSpec {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

/// How one family spells its tensors under a prefix (`model.decoder` or `decoder` for OPT, `model` for Llama).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Names {
    pub family: Family,
    pub prefix: String,
}

impl Names {
    pub fn new(family: Family, prefix: impl Into<String>) -> Self {
        Names { family, prefix: prefix.into() }
    }

    /// The prefix transformers writes today (`model.decoder` for OPT, `model` for Llama).
    pub fn standard(family: Family) -> Self {
        Names::new(family, Self::prefixes(family)[0])
    }

    /// Prefixes a checkpoint of this family may use, preferred first (old OPT exports drop `model.`).
    pub fn prefixes(family: Family) -> &'static [&'static str] {
        match family {
            Family::Opt => &["model.decoder", "decoder"],
            Family::Llama => &["model"],
        }
    }

    /// The names a checkpoint uses: the first prefix whose token embedding it holds, else the standard one.
    pub fn detect(family: Family, contains: impl Fn(&str) -> bool) -> Self {
        Self::prefixes(family)
            .iter()
            .map(|p| Names::new(family, *p))
            .find(|n| contains(&n.name(Role::Embed, Part::Weight, None)))
            .unwrap_or_else(|| Names::standard(family))
    }

    /// The family's stem for a role; `None` where the family has no such tensor.
    fn stem(&self, role: Role) -> Option<&'static str> {
        Some(match (self.family, role) {
            (_, Role::Embed) => "embed_tokens",
            (_, Role::Q) => "self_attn.q_proj",
            (_, Role::K) => "self_attn.k_proj",
            (_, Role::V) => "self_attn.v_proj",
            (_, Role::LmHead) => "lm_head",
            (Family::Opt, Role::Positions) => "embed_positions",
            (Family::Opt, Role::ProjectIn) => "project_in",
            (Family::Opt, Role::ProjectOut) => "project_out",
            (Family::Opt, Role::AttnNorm) => "self_attn_layer_norm",
            (Family::Opt, Role::O) => "self_attn.out_proj",
            (Family::Opt, Role::MlpNorm | Role::FinalNorm) => "final_layer_norm",
            (Family::Opt, Role::Up) => "fc1",
            (Family::Opt, Role::Down) => "fc2",
            (Family::Opt, Role::Gate) => return None,
            (Family::Llama, Role::AttnNorm) => "input_layernorm",
            (Family::Llama, Role::O) => "self_attn.o_proj",
            (Family::Llama, Role::MlpNorm) => "post_attention_layernorm",
            (Family::Llama, Role::Gate) => "mlp.gate_proj",
            (Family::Llama, Role::Up) => "mlp.up_proj",
            (Family::Llama, Role::Down) => "mlp.down_proj",
            (Family::Llama, Role::FinalNorm) => "norm",
            (Family::Llama, Role::Positions | Role::ProjectIn | Role::ProjectOut) => return None,
        })
    }

    /// The Hugging Face key of `role`'s `part` (in `layer` for per-layer roles). A role the family lacks gets
    /// a name no checkpoint holds, so a lookup fails naming it.
    pub fn name(&self, role: Role, part: Part, layer: Option<usize>) -> String {
        let stem = self.stem(role).unwrap_or("unknown");
        let part = match part {
            Part::Weight => "weight",
            Part::Bias => "bias",
        };
        let p = &self.prefix;
        match (role, layer) {
            (Role::LmHead, _) => format!("{stem}.{part}"),
            (_, Some(i)) => format!("{p}.layers.{i}.{stem}.{part}"),
            (_, None) => format!("{p}.{stem}.{part}"),
        }
    }
}

/// Every tensor of a model with this config, in the order transformers lists them (the fixture writer's
/// order, which fixes its random stream).
#[derive(Debug, Clone)]
pub struct Table {
    pub names: Names,
    pub tensors: Vec<TensorSpec>,
    index: HashMap<(Role, Part, Option<usize>), usize>,
}

impl Table {
    /// The table of `cfg` spelled with `names` (whose family must be `cfg.family`).
    pub fn new(cfg: &ModelConfig, names: Names) -> Self {
        let (d, f) = (cfg.hidden, cfg.ffn);
        let (qo, kvo) = (cfg.heads * cfg.head_dim, cfg.kv_heads * cfg.head_dim);
        let mut tensors = Vec::new();
        let mut push = |role: Role, layer: Option<usize>, shape: Vec<usize>, bias: bool| {
            let rows = shape[0];
            tensors.push(TensorSpec { name: names.name(role, Part::Weight, layer), shape, role, part: Part::Weight, layer });
            if bias {
                tensors.push(TensorSpec { name: names.name(role, Part::Bias, layer), shape: vec![rows], role, part: Part::Bias, layer });
            }
        };
        let (ab, mb) = (cfg.attn_bias, cfg.mlp_bias);
        let opt = cfg.family == Family::Opt;
        // (role, shape, has a bias); OPT norms are LayerNorms (weight and bias), Llama's RMSNorms (weight only).
        type Row = (Role, Vec<usize>, bool);
        let mut head: Vec<Row> = vec![(Role::Embed, vec![cfg.vocab_size, cfg.embed_dim], false)];
        if opt {
            head.push((Role::Positions, vec![cfg.max_positions + OPT_POS_OFFSET, d], false));
            if cfg.embed_dim != d {
                head.push((Role::ProjectIn, vec![d, cfg.embed_dim], false));
                head.push((Role::ProjectOut, vec![cfg.embed_dim, d], false));
            }
        }
        // transformers' Llama puts `attention_bias` on o_proj too; the checkpoints we read have none.
        let attn: [Row; 4] =
            [(Role::Q, vec![qo, d], ab), (Role::K, vec![kvo, d], ab), (Role::V, vec![kvo, d], ab), (Role::O, vec![d, qo], opt && ab)];
        let norms: [Row; 2] = [(Role::AttnNorm, vec![d], opt), (Role::MlpNorm, vec![d], opt)];
        let (up, down): (Row, Row) = ((Role::Up, vec![f, d], mb), (Role::Down, vec![d, f], mb));
        let layer: Vec<Row> = if opt {
            attn.into_iter().chain(norms).chain([up, down]).collect()
        } else {
            attn.into_iter().chain([(Role::Gate, vec![f, d], mb), up, down]).chain(norms).collect()
        };
        let mut tail: Vec<Row> = Vec::new();
        if !opt || cfg.final_norm {
            tail.push((Role::FinalNorm, vec![d], opt));
        }
        if !cfg.tie_embeddings {
            tail.push((Role::LmHead, vec![cfg.vocab_size, cfg.embed_dim], false));
        }
        let layers = (0..cfg.layers).flat_map(|i| layer.iter().map(move |r| (r, Some(i))));
        for ((role, shape, bias), l) in head.iter().map(|r| (r, None)).chain(layers).chain(tail.iter().map(|r| (r, None))) {
            push(*role, l, shape.clone(), *bias);
        }
        let index = tensors.iter().enumerate().map(|(i, t)| ((t.role, t.part, t.layer), i)).collect();
        Table { names, tensors, index }
    }

    /// The table under the standard prefix.
    pub fn standard(cfg: &ModelConfig) -> Self {
        Table::new(cfg, Names::standard(cfg.family))
    }

    /// The spec of `role`'s `part` (in `layer`), or `None` when a model of this config has no such tensor.
    pub fn get(&self, role: Role, part: Part, layer: Option<usize>) -> Option<&TensorSpec> {
        self.index.get(&(role, part, layer)).map(|&i| &self.tensors[i])
    }

    /// Total element count.
    pub fn params(&self) -> usize {
        self.tensors.iter().map(TensorSpec::numel).sum()
    }
}

/// OPT position offset (fairseq legacy: positions 0 and 1 are reserved).
pub const OPT_POS_OFFSET: usize = 2;

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(spec: crate::fixture::FixtureSpec) -> ModelConfig {
        ModelConfig::from_json(&spec.config, std::path::Path::new("config.json")).unwrap()
    }

    #[test]
    fn names_and_shapes() {
        let t = Table::standard(&cfg(crate::fixture::tiny_llama()));
        let q = t.get(Role::Q, Part::Weight, Some(1)).unwrap();
        assert_eq!(q.name, "model.layers.1.self_attn.q_proj.weight");
        assert_eq!(q.shape, vec![32, 32]);
        assert_eq!(t.get(Role::K, Part::Weight, Some(0)).unwrap().shape, vec![16, 32]);
        assert_eq!(t.get(Role::LmHead, Part::Weight, None).unwrap().name, "lm_head.weight");
        assert!(t.get(Role::Q, Part::Bias, Some(0)).is_none());
        assert_eq!(t.tensors.len(), 1 + 2 * 9 + 1 + 1);

        let o = Table::new(&cfg(crate::fixture::tiny_opt_proj()), Names::new(Family::Opt, "decoder"));
        assert_eq!(o.get(Role::Up, Part::Bias, Some(0)).unwrap().name, "decoder.layers.0.fc1.bias");
        assert_eq!(o.get(Role::ProjectIn, Part::Weight, None).unwrap().shape, vec![32, 16]);
        assert!(o.get(Role::FinalNorm, Part::Weight, None).is_none());
        let names: std::collections::HashSet<&str> = o.tensors.iter().map(|t| t.name.as_str()).collect();
        assert_eq!(names.len(), o.tensors.len(), "names are unique");
    }
}
