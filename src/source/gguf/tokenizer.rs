//! A `tokenizers::Tokenizer` built from a GGUF file's own byte-level BPE vocabulary, with the pre-tokenizer
//! llama.cpp uses for the file's `tokenizer.ggml.pre`.

use std::str::FromStr;

use serde_json::{json, Value as Json};

use super::GgufFile;
use crate::error::{Error, Result};

impl GgufFile {
    /// A `tokenizers::Tokenizer` built from the file's own vocabulary (`tokenizer.ggml.model == "gpt2"`).
    pub fn tokenizer(&self) -> Result<tokenizers::Tokenizer> {
        let tok_err = |detail: String| Error::format(&self.path, format!("tokenizer: {detail}"));
        let model = self
            .meta_str("tokenizer.ggml.model")?
            .ok_or_else(|| self.meta_err("tokenizer.ggml.model", "missing"))?;
        if model != "gpt2" {
            return Err(self.meta_err(
                "tokenizer.ggml.model",
                format!("tokenizer model '{model}' is not supported; only 'gpt2' (byte-level BPE) is"),
            ));
        }
        let tokens = self
            .meta_str_array("tokenizer.ggml.tokens")?
            .ok_or_else(|| self.meta_err("tokenizer.ggml.tokens", "missing"))?;
        let merges = self
            .meta_str_array("tokenizer.ggml.merges")?
            .ok_or_else(|| self.meta_err("tokenizer.ggml.merges", "missing"))?;
        let types = self.meta_int_array("tokenizer.ggml.token_type")?;
        if let Some(types) = types {
            if types.len() != tokens.len() {
                return Err(self.meta_err(
                    "tokenizer.ggml.token_type",
                    format!("{} entries for {} tokens", types.len(), tokens.len()),
                ));
            }
        }
        let pre = self.meta_str("tokenizer.ggml.pre")?.unwrap_or("default");
        let regexes = pre_tokenizer_regexes(pre)
            .ok_or_else(|| self.meta_err("tokenizer.ggml.pre", format!("pre-tokenizer '{pre}' is not supported")))?;

        // Vocabulary. Like llama.cpp's token-to-id map, a repeated string maps to its last id.
        let mut vocab = serde_json::Map::with_capacity(tokens.len());
        for (id, tok) in tokens.iter().enumerate() {
            vocab.insert(tok.clone(), json!(id));
        }
        // Merges "a b": split at the first space after the first character (as llama.cpp does).
        let mut merge_pairs = Vec::with_capacity(merges.len());
        for (i, m) in merges.iter().enumerate() {
            let split = m.char_indices().skip(1).find(|&(_, ch)| ch == ' ').map(|(at, _)| at);
            let Some(at) = split else {
                return Err(self.meta_err("tokenizer.ggml.merges", format!("entry #{i} {m:?} has no space")));
            };
            merge_pairs.push(json!([&m[..at], &m[at + 1..]]));
        }
        // Control (3) tokens are special added tokens; user-defined (4) ones are added tokens matched whole.
        let mut added = Vec::new();
        if let Some(types) = types {
            for (id, (&ty, tok)) in types.iter().zip(tokens.iter()).enumerate() {
                if (ty == 3 || ty == 4) && !tok.is_empty() {
                    added.push(json!({
                        "id": id, "content": tok, "single_word": false, "lstrip": false, "rstrip": false,
                        "normalized": false, "special": ty == 3,
                    }));
                }
            }
        }

        let mut pretoks: Vec<Json> = regexes
            .iter()
            .map(|r| json!({"type": "Split", "pattern": {"Regex": r}, "behavior": "Isolated", "invert": false}))
            .collect();
        pretoks
            .push(json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": false, "use_regex": false}));

        // BOS/EOS insertion when encoding with special tokens.
        let add_bos = self.meta_bool_opt("tokenizer.ggml.add_bos_token")?.unwrap_or(false);
        let add_eos = self.meta_bool_opt("tokenizer.ggml.add_eos_token")?.unwrap_or(false);
        let special_id = |key: &str| -> Result<(u64, String)> {
            let id = self.meta_uint_opt(key)?.ok_or_else(|| self.meta_err(key, "missing"))?;
            let tok = usize::try_from(id)
                .ok()
                .and_then(|i| tokens.get(i))
                .ok_or_else(|| self.meta_err(key, format!("id {id} is outside the vocabulary")))?;
            Ok((id, tok.clone()))
        };
        let post_processor = if add_bos || add_eos {
            let mut single = Vec::new();
            let mut pair = Vec::new();
            let mut specials = serde_json::Map::new();
            let bos = if add_bos {
                Some(special_id("tokenizer.ggml.bos_token_id")?)
            } else {
                None
            };
            let eos = if add_eos {
                Some(special_id("tokenizer.ggml.eos_token_id")?)
            } else {
                None
            };
            for (seq, type_id) in [("A", 0), ("B", 1)] {
                let out = if seq == "A" { &mut single } else { &mut pair };
                if let Some((_, t)) = &bos {
                    out.push(json!({"SpecialToken": {"id": t, "type_id": type_id}}));
                }
                out.push(json!({"Sequence": {"id": seq, "type_id": type_id}}));
                if let Some((_, t)) = &eos {
                    out.push(json!({"SpecialToken": {"id": t, "type_id": type_id}}));
                }
            }
            let pair = single.iter().cloned().chain(pair).collect::<Vec<_>>();
            for (id, t) in bos.iter().chain(eos.iter()) {
                specials.insert(t.clone(), json!({"id": t, "ids": [id], "tokens": [t]}));
            }
            json!({"type": "TemplateProcessing", "single": single, "pair": pair, "special_tokens": specials})
        } else {
            Json::Null
        };

        let spec = json!({
            "version": "1.0",
            "truncation": null,
            "padding": null,
            "added_tokens": added,
            "normalizer": null,
            "pre_tokenizer": {"type": "Sequence", "pretokenizers": pretoks},
            "post_processor": post_processor,
            "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
            "model": {
                "type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
                "vocab": vocab, "merges": merge_pairs,
            },
        });
        tokenizers::Tokenizer::from_str(&spec.to_string()).map_err(|e| tok_err(e.to_string()))
    }
}

// Pre-tokenizer regexes, as llama.cpp's llama-vocab.cpp defines them for each `tokenizer.ggml.pre`.

const GPT2_SPLIT: &str = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)";

/// The split regexes (applied in sequence, matches and gaps both kept) for a `tokenizer.ggml.pre` name.
fn pre_tokenizer_regexes(pre: &str) -> Option<Vec<&'static str>> {
    Some(match pre {
        // LLAMA_VOCAB_PRE_TYPE_DEFAULT
        "default" => vec![r"[\p{P}\$\+<=>\^~\|]+", GPT2_SPLIT, r"\p{N}+", "[0-9][0-9][0-9]"],
        // LLAMA_VOCAB_PRE_TYPE_GPT2 and the types llama.cpp gives the same regex
        "gpt-2" | "gpt2" | "phi-2" | "jina-es" | "jina-de" | "gigachat" | "jina-v2-es" | "jina-v2-de"
        | "jina-v1-en" | "jina-v2-code" | "roberta-bpe" | "mpt" | "olmo" | "jais" => vec![GPT2_SPLIT],
        // LLAMA_VOCAB_PRE_TYPE_SMOLLM and the types sharing its regexes: single digits, then GPT-2
        "smollm" | "starcoder" | "refact" | "command-r" | "codeshell" | "exaone" | "minerva-7b" => {
            vec![r"\p{N}", GPT2_SPLIT]
        }
        _ => return None,
    })
}
