//! Seeded tiny random models with Hugging Face key names, config.json and a byte-level BPE tokenizer.json built
//! here, so tests (and CI's smoke runs) exercise the real loaders end to end without downloading anything.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::path::Path;

use safetensors::{tensor::View, Dtype};
use serde_json::json;

use crate::config::{Family, ModelConfig};
use crate::decode::SplitMix64;
use crate::source::names::{Part, Role, Table, TensorSpec};

/// One fixture model: its name (directory name), `config.json` contents and RNG seed.
#[derive(Debug, Clone)]
pub struct FixtureSpec {
    pub name: &'static str,
    pub config: serde_json::Value,
    pub seed: u64,
}

pub const VOCAB: usize = 320;

/// An OPT fixture: what the fixtures vary is the LayerNorm placement and the embedding width.
fn opt(name: &'static str, seed: u64, norm_before: bool, embed_dim: usize) -> FixtureSpec {
    FixtureSpec {
        name,
        seed,
        config: json!({
            "model_type": "opt", "architectures": ["OPTForCausalLM"], "vocab_size": VOCAB, "hidden_size": 32,
            "num_hidden_layers": 2, "ffn_dim": 64, "num_attention_heads": 4, "max_position_embeddings": 64,
            "do_layer_norm_before": norm_before, "word_embed_proj_dim": embed_dim, "activation_function": "relu",
            "enable_bias": true, "layer_norm_elementwise_affine": true, "dropout": 0.0, "attention_dropout": 0.0,
            "bos_token_id": 2, "eos_token_id": 2, "pad_token_id": 1, "tie_word_embeddings": true, "torch_dtype": "float32"
        }),
    }
}

/// The shape knobs of a Llama fixture.
struct LlamaShape {
    vocab: usize,
    hidden: usize,
    ffn: usize,
    layers: usize,
    heads: usize,
    kv_heads: usize,
    max_positions: usize,
    eps: f64,
    rope_theta: f64,
    tie: bool,
    torch_dtype: &'static str,
}

fn llama(name: &'static str, seed: u64, s: LlamaShape) -> FixtureSpec {
    FixtureSpec {
        name,
        seed,
        config: json!({
            "model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": s.vocab, "hidden_size": s.hidden,
            "intermediate_size": s.ffn, "num_hidden_layers": s.layers, "num_attention_heads": s.heads,
            "num_key_value_heads": s.kv_heads, "max_position_embeddings": s.max_positions, "rms_norm_eps": s.eps,
            "rope_theta": s.rope_theta, "hidden_act": "silu", "tie_word_embeddings": s.tie, "attention_bias": false,
            "mlp_bias": false, "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": s.torch_dtype
        }),
    }
}

/// OPT with pre-LayerNorm and `word_embed_proj_dim == hidden` (OPT-125m's layout, scaled down).
pub fn tiny_opt() -> FixtureSpec {
    opt("tiny-opt", 1, true, 32)
}

/// OPT-350m's layout: post-LayerNorm, no final norm, 16-wide embeddings projected into a 32-wide model.
pub fn tiny_opt_proj() -> FixtureSpec {
    opt("tiny-opt-proj", 2, false, 16)
}

/// Llama with grouped-query attention (4 query heads, 2 kv heads) and an untied lm_head.
pub fn tiny_llama() -> FixtureSpec {
    let (eps, rope_theta, tie, torch_dtype) = (1e-5, 10000.0, false, "float32");
    let shape = LlamaShape { vocab: VOCAB, hidden: 32, ffn: 48, layers: 2, heads: 4, kv_heads: 2, max_positions: 128, eps, rope_theta, tie, torch_dtype };
    llama("tiny-llama", 3, shape)
}

/// Llama with tied embeddings, plain multi-head attention and a non-default RoPE base.
pub fn tiny_llama_tied() -> FixtureSpec {
    let (eps, rope_theta, tie, torch_dtype) = (1e-6, 500000.0, true, "float32");
    let shape = LlamaShape { vocab: VOCAB, hidden: 32, ffn: 40, layers: 3, heads: 2, kv_heads: 2, max_positions: 128, eps, rope_theta, tie, torch_dtype };
    llama("tiny-llama-tied", 4, shape)
}

/// A Llama of about 594M parameters at 9 layers (1.19 GB in f16): d=2048, ffn 5632, 16 heads, vocab 32000,
/// untied head. For measuring how checkpoints of real size stream (`scripts/raw_rss.sh`), not for tests.
pub fn synthetic_llama(layers: usize) -> FixtureSpec {
    let (eps, rope_theta, tie, torch_dtype) = (1e-5, 10000.0, false, "float16");
    let shape = LlamaShape { vocab: 32000, hidden: 2048, ffn: 5632, layers, heads: 16, kv_heads: 16, max_positions: 2048, eps, rope_theta, tie, torch_dtype };
    llama("synthetic-llama", 5, shape)
}

pub fn all() -> Vec<FixtureSpec> {
    vec![tiny_opt(), tiny_opt_proj(), tiny_llama(), tiny_llama_tied()]
}

/// Hugging Face tensor names and shapes of a model with this config (the names table, standard prefix).
pub fn tensor_layout(cfg: &ModelConfig) -> Vec<(String, Vec<usize>)> {
    Table::standard(cfg).tensors.into_iter().map(|t| (t.name, t.shape)).collect()
}

/// Element type the weights are written in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FixtureDtype {
    F32,
    F16,
    BF16,
}

/// Draws of [`SplitMix64`] per value ([`gaussian`] takes two uniforms).
const DRAWS_PER_VALUE: u64 = 2;
/// SplitMix64's state increment: the state after `n` draws is `seed + n * GAMMA`, so any tensor's stream can
/// start without drawing the ones before it.
const SPLITMIX_GAMMA: u64 = 0x9E37_79B9_7F4A_7C15;

/// One tensor of a fixture, generated only when the safetensors writer asks for its bytes, so a multi-GB
/// synthetic checkpoint is written holding one tensor at a time.
struct Seeded {
    spec: TensorSpec,
    dtype: Dtype,
    /// RNG state at this tensor's first value (values are drawn in table order, whatever order the writer
    /// takes tensors in).
    state: u64,
}

/// What kind of values a tensor holds, which sets how it is drawn.
#[derive(Clone, Copy)]
enum Init {
    /// Gaussian with this standard deviation.
    Normal(f32),
    /// 1 + Gaussian noise (norm weights).
    NearOne,
}

impl Seeded {
    fn init(&self) -> Init {
        match (self.spec.role, self.spec.part) {
            (_, Part::Bias) => Init::Normal(0.05),
            (r, Part::Weight) if r.is_norm() => Init::NearOne,
            (Role::Embed, _) => Init::Normal(0.5),
            _ => Init::Normal(0.2),
        }
    }
}

impl View for &Seeded {
    fn dtype(&self) -> Dtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.spec.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        let mut rng = SplitMix64(self.state);
        let init = self.init();
        let mut draw = || match init {
            Init::Normal(sd) => sd * gaussian(&mut rng),
            Init::NearOne => 1.0 + 0.1 * gaussian(&mut rng),
        };
        let mut out = Vec::with_capacity(self.data_len());
        for _ in 0..self.spec.numel() {
            let x = draw();
            match self.dtype {
                Dtype::F16 => out.extend_from_slice(&half::f16::from_f32(x).to_le_bytes()),
                Dtype::BF16 => out.extend_from_slice(&half::bf16::from_f32(x).to_le_bytes()),
                _ => out.extend_from_slice(&x.to_le_bytes()),
            }
        }
        Cow::Owned(out)
    }
    fn data_len(&self) -> usize {
        self.spec.numel() * self.dtype.bitsize() / 8
    }
}

/// Write `config.json`, `model.safetensors` and `tokenizer.json` of `spec` into `dir` (created if needed).
/// Tensors are generated one at a time as they are written, so memory stays at the largest tensor.
pub fn write(spec: &FixtureSpec, dir: &Path, dtype: FixtureDtype) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let cfg = ModelConfig::from_json(&spec.config, &dir.join("config.json"))
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e.to_string()))?;
    std::fs::write(dir.join("config.json"), serde_json::to_string_pretty(&spec.config)? + "\n")?;
    let st_dtype = match dtype {
        FixtureDtype::F32 => Dtype::F32,
        FixtureDtype::F16 => Dtype::F16,
        FixtureDtype::BF16 => Dtype::BF16,
    };
    let mut drawn = 0u64;
    let tensors: Vec<Seeded> = Table::standard(&cfg)
        .tensors
        .into_iter()
        .map(|t| {
            let state = spec.seed.wrapping_add(drawn.wrapping_mul(DRAWS_PER_VALUE).wrapping_mul(SPLITMIX_GAMMA));
            drawn += t.numel() as u64;
            Seeded { spec: t, dtype: st_dtype, state }
        })
        .collect();
    let views = tensors.iter().map(|t| (t.spec.name.clone(), t));
    let meta: Option<std::collections::HashMap<String, String>> =
        Some([("format".to_string(), "pt".to_string())].into_iter().collect());
    safetensors::serialize_to_file(views, meta, &dir.join("model.safetensors"))
        .map_err(|e| std::io::Error::other(e.to_string()))?;
    let bos = if cfg.family == Family::Opt { "</s>" } else { "<s>" };
    std::fs::write(dir.join("tokenizer.json"), serde_json::to_string_pretty(&tokenizer_json(cfg.vocab_size, bos))?)?;
    Ok(())
}

fn gaussian(rng: &mut SplitMix64) -> f32 {
    // Box-Muller; 1 - u keeps the log argument in (0, 1].
    let u1 = 1.0 - rng.next_f64();
    let u2 = rng.next_f64();
    ((-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()) as f32
}

/// GPT-2's reversible map from bytes to printable characters (byte-level BPE symbols).
pub fn byte_to_char() -> Vec<char> {
    let mut printable: Vec<u32> = (33..=126).chain(161..=172).chain(174..=255).collect();
    let mut chars: Vec<u32> = printable.clone();
    let mut n = 0;
    for b in 0..=255u32 {
        if !printable.contains(&b) {
            printable.push(b);
            chars.push(256 + n);
            n += 1;
        }
    }
    let mut map = vec![' '; 256];
    for (b, c) in printable.iter().zip(chars.iter()) {
        map[*b as usize] = char::from_u32(*c).unwrap_or('?');
    }
    map
}

/// Text the fixture tokenizer learns its merges from (written for this project).
const MERGE_CORPUS: &str = "the cat sat on the mat. the dog ran to the park and the cat ran after the dog. \
once upon a time there was a little model that wanted to be sparse. it kept only the neurons it needed, \
and the answer was the same as the dense answer. then the model ran fast on the card.";

/// A byte-level BPE tokenizer.json with 4 special tokens, the 256 byte symbols and merges learned greedily from
/// [`MERGE_CORPUS`] up to `vocab` entries. `bos` is prepended by the post-processor (OPT: `</s>`, Llama: `<s>`).
pub fn tokenizer_json(vocab: usize, bos: &str) -> serde_json::Value {
    let specials = ["<s>", "<pad>", "</s>", "<unk>"];
    let b2c = byte_to_char();
    let mut vocab_map: BTreeMap<String, usize> = BTreeMap::new();
    let mut order: Vec<String> = Vec::new();
    for s in specials {
        vocab_map.insert(s.to_string(), order.len());
        order.push(s.to_string());
    }
    for c in &b2c {
        let s = c.to_string();
        vocab_map.insert(s.clone(), order.len());
        order.push(s);
    }
    // Words as GPT-2 pre-tokenizes them (a leading space joins the word), mapped to byte symbols.
    let mut words: Vec<Vec<String>> = Vec::new();
    for (i, w) in MERGE_CORPUS.split(' ').enumerate() {
        let text = if i == 0 { w.to_string() } else { format!(" {w}") };
        words.push(text.bytes().map(|b| b2c[b as usize].to_string()).collect());
    }
    let mut merges: Vec<(String, String)> = Vec::new();
    while order.len() < vocab {
        let mut counts: BTreeMap<(String, String), usize> = BTreeMap::new();
        for w in &words {
            for p in w.windows(2) {
                *counts.entry((p[0].clone(), p[1].clone())).or_default() += 1;
            }
        }
        // Most frequent pair; ties broken by the pair's text so the result is deterministic.
        let Some((pair, _)) = counts.into_iter().filter(|(p, _)| !vocab_map.contains_key(&format!("{}{}", p.0, p.1))).max_by(|a, b| a.1.cmp(&b.1).then(b.0.cmp(&a.0))) else {
            break;
        };
        let joined = format!("{}{}", pair.0, pair.1);
        for w in &mut words {
            let mut i = 0;
            while i + 1 < w.len() {
                if w[i] == pair.0 && w[i + 1] == pair.1 {
                    w[i] = joined.clone();
                    w.remove(i + 1);
                }
                i += 1;
            }
        }
        vocab_map.insert(joined.clone(), order.len());
        order.push(joined);
        merges.push(pair);
    }
    // Pad with unused symbols if the corpus ran out of pairs, so ids cover exactly `vocab`.
    while order.len() < vocab {
        let s = format!("<extra_{}>", order.len());
        vocab_map.insert(s.clone(), order.len());
        order.push(s);
    }
    let bos_id = specials.iter().position(|s| *s == bos).unwrap_or(0);
    json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": specials.iter().enumerate().map(|(i, s)| json!({
            "id": i, "content": s, "single_word": false, "lstrip": false, "rstrip": false,
            "normalized": false, "special": true
        })).collect::<Vec<_>>(),
        "normalizer": null,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true},
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                     {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {bos: {"id": bos, "ids": [bos_id], "tokens": [bos]}}
        },
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {
            "type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
            "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
            "vocab": vocab_map,
            "merges": merges.iter().map(|(a, b)| json!([a, b])).collect::<Vec<_>>()
        }
    })
}
