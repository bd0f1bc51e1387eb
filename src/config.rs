//! Model configuration: serde mirrors of the Hugging Face `config.json` of each family, converted into one
//! runtime [`ModelConfig`] that the forward reads.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// The model families dejavu runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Family {
    /// OPT: learned positions (offset 2), LayerNorm, ReLU MLP, biases everywhere. Deja Vu's home.
    Opt,
    /// Llama: RoPE, RMSNorm, grouped-query attention, SwiGLU MLP. CATS' home.
    Llama,
}

/// Mirror of an OPT `config.json` (only the fields the forward needs; the rest is ignored).
#[derive(Debug, Clone, Deserialize)]
pub struct OptConfigJson {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub ffn_dim: usize,
    pub num_attention_heads: usize,
    pub max_position_embeddings: usize,
    #[serde(default = "yes")]
    pub do_layer_norm_before: bool,
    /// OPT-350m projects 512-wide embeddings into a 1024-wide model; `None` means equal to `hidden_size`.
    pub word_embed_proj_dim: Option<usize>,
    #[serde(default = "relu")]
    pub activation_function: String,
    #[serde(default = "yes")]
    pub enable_bias: bool,
    #[serde(default = "yes")]
    pub layer_norm_elementwise_affine: bool,
    #[serde(default, rename = "_remove_final_layer_norm")]
    pub remove_final_layer_norm: bool,
    #[serde(default = "yes")]
    pub tie_word_embeddings: bool,
    pub bos_token_id: Option<u32>,
    pub eos_token_id: Option<u32>,
}

/// Mirror of a Llama `config.json`.
#[derive(Debug, Clone, Deserialize)]
pub struct LlamaConfigJson {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: Option<usize>,
    pub head_dim: Option<usize>,
    #[serde(default = "default_rms_eps")]
    pub rms_norm_eps: f64,
    #[serde(default = "default_rope_theta")]
    pub rope_theta: f64,
    pub rope_scaling: Option<serde_json::Value>,
    #[serde(default = "default_max_pos")]
    pub max_position_embeddings: usize,
    #[serde(default)]
    pub tie_word_embeddings: bool,
    #[serde(default)]
    pub attention_bias: bool,
    #[serde(default)]
    pub mlp_bias: bool,
    #[serde(default = "silu")]
    pub hidden_act: String,
    pub bos_token_id: Option<u32>,
    pub eos_token_id: Option<serde_json::Value>,
}

fn yes() -> bool {
    true
}
fn relu() -> String {
    "relu".into()
}
fn silu() -> String {
    "silu".into()
}
fn default_rms_eps() -> f64 {
    1e-6
}
fn default_rope_theta() -> f64 {
    10000.0
}
fn default_max_pos() -> usize {
    2048
}

/// The runtime configuration, one struct for both families. Fields a family lacks take neutral values.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelConfig {
    pub family: Family,
    pub vocab_size: usize,
    /// Residual stream width `d`.
    pub hidden: usize,
    /// MLP hidden width (number of neurons a sparsity plan chooses from).
    pub ffn: usize,
    pub layers: usize,
    pub heads: usize,
    /// Key/value heads; `heads` for multi-head attention, fewer for grouped-query attention.
    pub kv_heads: usize,
    pub head_dim: usize,
    pub max_positions: usize,
    pub norm_eps: f64,
    /// Llama only: RoPE base.
    pub rope_theta: f64,
    /// OPT only: width of the token embedding when it differs from `hidden` (project_in / project_out).
    pub embed_dim: usize,
    /// OPT only: pre-LayerNorm (true for all OPT but 350m).
    pub norm_before: bool,
    /// OPT only: a final LayerNorm after the last layer.
    pub final_norm: bool,
    /// Linear layers carry biases (OPT: q/k/v/out, fc1/fc2; Llama: `attention_bias` on q/k/v/o).
    pub attn_bias: bool,
    pub mlp_bias: bool,
    pub tie_embeddings: bool,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
}

impl ModelConfig {
    /// The hard limit on positions a forward can reach: OPT's learned position table; `None` for RoPE models,
    /// which can run past `max_position_embeddings` (with degraded quality).
    pub fn position_limit(&self) -> Option<usize> {
        (self.family == Family::Opt).then_some(self.max_positions)
    }

    /// Read and validate a `config.json`.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let value: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| Error::json(path, e))?;
        Self::from_json(&value, path)
    }

    /// Build from an already parsed `config.json` value; `path` is only used in error messages.
    pub fn from_json(value: &serde_json::Value, path: &Path) -> Result<Self> {
        let model_type = value
            .get("model_type")
            .and_then(|v| v.as_str())
            .ok_or_else(|| Error::field(path, "model_type", "missing; expected \"opt\" or \"llama\""))?;
        let json_err = |e: serde_json::Error| Error::json(path, e);
        let cfg = match model_type {
            "opt" => {
                let c: OptConfigJson = serde_json::from_value(value.clone()).map_err(json_err)?;
                if c.activation_function != "relu" {
                    return Err(Error::field(
                        path,
                        "activation_function",
                        format!("\"{}\" is not supported; OPT models use \"relu\"", c.activation_function),
                    ));
                }
                if !c.layer_norm_elementwise_affine {
                    return Err(Error::field(path, "layer_norm_elementwise_affine", "false is not supported"));
                }
                ModelConfig {
                    family: Family::Opt,
                    vocab_size: c.vocab_size,
                    hidden: c.hidden_size,
                    ffn: c.ffn_dim,
                    layers: c.num_hidden_layers,
                    heads: c.num_attention_heads,
                    kv_heads: c.num_attention_heads,
                    head_dim: c.hidden_size.checked_div(c.num_attention_heads).unwrap_or(0),
                    max_positions: c.max_position_embeddings,
                    norm_eps: 1e-5,
                    rope_theta: 0.0,
                    embed_dim: c.word_embed_proj_dim.unwrap_or(c.hidden_size),
                    norm_before: c.do_layer_norm_before,
                    final_norm: c.do_layer_norm_before && !c.remove_final_layer_norm,
                    attn_bias: c.enable_bias,
                    mlp_bias: c.enable_bias,
                    tie_embeddings: c.tie_word_embeddings,
                    bos_token_id: c.bos_token_id,
                    eos_token_ids: c.eos_token_id.into_iter().collect(),
                }
            }
            "llama" => {
                let c: LlamaConfigJson = serde_json::from_value(value.clone()).map_err(json_err)?;
                if let Some(s) = &c.rope_scaling {
                    if !s.is_null() {
                        return Err(Error::field(
                            path,
                            "rope_scaling",
                            format!("{s} is not supported yet; only plain RoPE (rope_scaling: null)"),
                        ));
                    }
                }
                if c.hidden_act != "silu" {
                    return Err(Error::field(
                        path,
                        "hidden_act",
                        format!("\"{}\" is not supported; Llama models use \"silu\"", c.hidden_act),
                    ));
                }
                let heads = c.num_attention_heads;
                let eos_token_ids = match &c.eos_token_id {
                    None | Some(serde_json::Value::Null) => vec![],
                    Some(v) => serde_json::from_value::<EosIds>(v.clone())
                        .map_err(|_| Error::field(path, "eos_token_id", "expected an integer or a list of integers"))?
                        .into_vec(),
                };
                ModelConfig {
                    family: Family::Llama,
                    vocab_size: c.vocab_size,
                    hidden: c.hidden_size,
                    ffn: c.intermediate_size,
                    layers: c.num_hidden_layers,
                    heads,
                    kv_heads: c.num_key_value_heads.unwrap_or(heads),
                    head_dim: c.head_dim.unwrap_or(c.hidden_size.checked_div(heads).unwrap_or(0)),
                    max_positions: c.max_position_embeddings,
                    norm_eps: c.rms_norm_eps,
                    rope_theta: c.rope_theta,
                    embed_dim: c.hidden_size,
                    norm_before: true,
                    final_norm: true,
                    attn_bias: c.attention_bias,
                    mlp_bias: c.mlp_bias,
                    tie_embeddings: c.tie_word_embeddings,
                    bos_token_id: c.bos_token_id,
                    eos_token_ids,
                }
            }
            other => {
                return Err(Error::field(
                    path,
                    "model_type",
                    format!("\"{other}\" is not supported; expected \"opt\" or \"llama\""),
                ))
            }
        };
        cfg.validate(path)?;
        Ok(cfg)
    }

    fn validate(&self, path: &Path) -> Result<()> {
        let positive = [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden),
            ("num_hidden_layers", self.layers),
            ("num_attention_heads", self.heads),
            ("num_key_value_heads", self.kv_heads),
            ("head_dim", self.head_dim),
            (if self.family == Family::Opt { "ffn_dim" } else { "intermediate_size" }, self.ffn),
        ];
        for (field, v) in positive {
            if v == 0 {
                return Err(Error::field(path, field, "must be positive"));
            }
        }
        if self.family == Family::Opt && self.heads * self.head_dim != self.hidden {
            return Err(Error::field(
                path,
                "num_attention_heads",
                format!("{} does not divide hidden_size {}", self.heads, self.hidden),
            ));
        }
        if self.heads % self.kv_heads != 0 {
            return Err(Error::field(
                path,
                "num_key_value_heads",
                format!("{} does not divide num_attention_heads {}", self.kv_heads, self.heads),
            ));
        }
        if self.family == Family::Llama && self.head_dim % 2 != 0 {
            return Err(Error::field(path, "head_dim", "must be even for RoPE"));
        }
        Ok(())
    }

    /// Number of weights (for reports); embeddings counted once when tied.
    pub fn param_count(&self) -> usize {
        let (d, f, l) = (self.hidden, self.ffn, self.layers);
        let attn = d * self.heads * self.head_dim * 2 + d * self.kv_heads * self.head_dim * 2;
        let mlp = if self.family == Family::Llama { 3 * d * f } else { 2 * d * f };
        let emb = self.vocab_size * self.embed_dim * if self.tie_embeddings { 1 } else { 2 };
        l * (attn + mlp) + emb
    }
}

#[derive(Deserialize)]
#[serde(untagged)]
enum EosIds {
    One(u32),
    Many(Vec<u32>),
}

impl EosIds {
    fn into_vec(self) -> Vec<u32> {
        match self {
            EosIds::One(x) => vec![x],
            EosIds::Many(v) => v,
        }
    }
}
