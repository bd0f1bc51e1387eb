//! A Hugging Face style `config.json` written from a GGUF file's `llama.*` metadata.

use serde_json::{json, Value as Json};

use super::GgufFile;
use crate::error::Result;

impl GgufFile {
    pub(super) fn require_llama(&self) -> Result<()> {
        let arch = self.architecture()?;
        if arch != "llama" {
            return Err(self.meta_err(
                "general.architecture",
                format!("architecture '{arch}' is not supported; only 'llama' is"),
            ));
        }
        Ok(())
    }

    fn vocab_size(&self) -> Result<usize> {
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
    pub fn hf_config(&self) -> Result<Json> {
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

}
