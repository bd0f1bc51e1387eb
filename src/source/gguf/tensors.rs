//! GGUF tensors under their Hugging Face names: llama.cpp's names mapped onto [`crate::source::names`]
//! roles, llama.cpp's q/k row permutation undone, and raw bytes (borrowed from the mmap where the layout
//! allows, quant blocks decoded to f16).

use std::borrow::Cow;

use half::f16;

use super::dequant::dequantize;
use super::parse::{ggml_type_name, TensorInfo};
use super::GgufFile;
use crate::error::{Error, Result};
use crate::config::Family;
use crate::source::names::{Names, Part, Role};
use crate::source::weights::{DType, HostTensor, RawTensor, TensorMeta};

/// llama.cpp's stem of each role a GGUF Llama holds: per-layer ones (under `blk.N.`) in the order HF lists
/// them, then the global ones.
const LAYER_STEMS: [(Role, &str); 9] = [
    (Role::Q, "attn_q"),
    (Role::K, "attn_k"),
    (Role::V, "attn_v"),
    (Role::O, "attn_output"),
    (Role::Gate, "ffn_gate"),
    (Role::Up, "ffn_up"),
    (Role::Down, "ffn_down"),
    (Role::AttnNorm, "attn_norm"),
    (Role::MlpNorm, "ffn_norm"),
];
/// (role, stem, sort section) of the global tensors.
const GLOBAL_STEMS: [(Role, &str, u8); 3] = [(Role::Embed, "token_embd", 0), (Role::FinalNorm, "output_norm", 2), (Role::LmHead, "output", 3)];

/// A GGUF tensor's place in the HF table: (sort key, role, HF name).
pub(super) struct HfName {
    key: (u8, usize, u8),
    pub role: Role,
    pub hf: String,
}

/// GGUF name -> its HF name (through the names table) and role.
pub(super) fn gguf_to_hf(gguf: &str) -> Option<HfName> {
    let names = Names::standard(Family::Llama);
    let stem = gguf.strip_suffix(".weight")?;
    if let Some((role, _, section)) = GLOBAL_STEMS.iter().find(|(_, s, _)| *s == stem) {
        return Some(HfName { key: (*section, 0, 0), role: *role, hf: names.name(*role, Part::Weight, None) });
    }
    let rest = stem.strip_prefix("blk.")?;
    let (layer, part) = rest.split_once('.')?;
    if layer.is_empty() || !layer.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let layer: usize = layer.parse().ok()?;
    let (k, (role, _)) = LAYER_STEMS.iter().enumerate().find(|(_, (_, g))| *g == part)?;
    Some(HfName { key: (1, layer, k as u8), role: *role, hf: names.name(*role, Part::Weight, Some(layer)) })
}

impl GgufFile {
    /// HF tensor names this file provides (embedding, per layer in order, final norm, lm_head if untied).
    pub fn hf_tensor_names(&self) -> Vec<String> {
        let mut named: Vec<HfName> = self.tensors.iter().filter_map(|t| gguf_to_hf(&t.name)).collect();
        named.sort_by_key(|n| n.key);
        named.into_iter().map(|n| n.hf).collect()
    }

    /// The GGUF tensor behind an HF name, and its role.
    fn hf_lookup(&self, hf_name: &str) -> Result<(&TensorInfo, Role)> {
        let found = self.tensors.iter().find_map(|t| gguf_to_hf(&t.name).filter(|n| n.hf == hf_name).map(|n| (t, n.role)));
        found.ok_or_else(|| Error::tensor(&self.path, hf_name, "no such tensor in the file"))
    }

    /// Heads of a q/k projection whose rows llama.cpp permuted; `None` for every other role.
    fn permuted_heads(&self, role: Role) -> Result<Option<usize>> {
        if !matches!(role, Role::Q | Role::K) {
            return Ok(None);
        }
        self.require_llama()?;
        let heads = self.meta_usize("llama.attention.head_count")?;
        Ok(Some(match role {
            Role::K => self.meta_usize_opt("llama.attention.head_count_kv")?.unwrap_or(heads),
            _ => heads,
        }))
    }

    fn uneven(&self, t: &TensorInfo, rows: usize, n_head: usize) -> Error {
        Error::tensor(&self.path, &t.name, format!("{rows} rows cannot be split into {n_head} heads of even size"))
    }

    /// Read a tensor by its HF name in f32 (exact dequantization), with llama.cpp's q/k row permutation undone.
    pub fn hf_tensor(&self, hf_name: &str) -> Result<HostTensor> {
        let (t, role) = self.hf_lookup(hf_name)?;
        let mut h = self.read_tensor(&t.name)?;
        if let Some(n_head) = self.permuted_heads(role)? {
            let rows = h.shape.first().copied().unwrap_or(0);
            let cols = h.data.len().checked_div(rows).unwrap_or(0);
            h.data = unpermute_rows(&h.data, rows, cols, n_head).ok_or_else(|| self.uneven(t, rows, n_head))?;
        }
        Ok(h)
    }

    /// Read a tensor by its HF name as raw bytes: F32/F16/BF16 borrowed from the mmap unless q/k need their
    /// rows un-permuted; quantized types decoded to f16 (owned).
    pub fn hf_raw(&self, hf_name: &str) -> Result<RawTensor<'_>> {
        let (t, role) = self.hf_lookup(hf_name)?;
        let shape = self.hf_shape(t)?;
        let stored = self.tensor_bytes(t)?;
        let (dtype, bytes) = match t.type_id {
            0 => (DType::F32, Cow::Borrowed(stored)),
            1 => (DType::F16, Cow::Borrowed(stored)),
            30 => (DType::BF16, Cow::Borrowed(stored)),
            id => {
                let vals = dequantize(id, stored).ok_or_else(|| self.unsupported(t))?;
                (DType::F16, Cow::Owned(vals.iter().flat_map(|&x| f16::from_f32(x).to_le_bytes()).collect()))
            }
        };
        let bytes = match self.permuted_heads(role)? {
            None => bytes,
            Some(n_head) => {
                let rows = shape.first().copied().unwrap_or(0);
                let row_bytes = bytes.len().checked_div(rows).unwrap_or(0);
                Cow::Owned(unpermute_rows(&bytes, rows, row_bytes, n_head).ok_or_else(|| self.uneven(t, rows, n_head))?)
            }
        };
        Ok(RawTensor { dtype, shape, bytes })
    }

    /// Stored type, HF shape and file size of a tensor by its HF name, reading no data.
    pub fn hf_meta(&self, hf_name: &str) -> Result<TensorMeta> {
        let (t, _) = self.hf_lookup(hf_name)?;
        let dtype = match t.type_id {
            0 => DType::F32,
            30 => DType::BF16,
            _ => DType::F16,
        };
        Ok(TensorMeta { stored: ggml_type_name(t.type_id), dtype, shape: self.hf_shape(t)?, bytes: t.len })
    }
}

/// Undo llama.cpp's `permute` of q/k weights: the converter did, for `w` of shape `[n_head*head_dim, cols]`,
/// `w.reshape(n_head, 2, head_dim/2, cols).swapaxes(1, 2).reshape(w.shape)`, i.e. GGUF row
/// `h*hd + 2*i + j` holds HF row `h*hd + j*hd/2 + i`. Returns `None` if the rows do not split evenly.
pub(super) fn unpermute_rows<T: Copy + Default>(data: &[T], rows: usize, cols: usize, n_head: usize) -> Option<Vec<T>> {
    let (hd, half) = head_split(data, rows, cols, n_head)?;
    let mut out = vec![T::default(); data.len()];
    for h in 0..n_head {
        for j in 0..2 {
            for i in 0..half {
                let hf_row = h * hd + j * half + i;
                let gguf_row = h * hd + 2 * i + j;
                out[hf_row * cols..(hf_row + 1) * cols].copy_from_slice(&data[gguf_row * cols..(gguf_row + 1) * cols]);
            }
        }
    }
    Some(out)
}

fn head_split<T>(data: &[T], rows: usize, cols: usize, n_head: usize) -> Option<(usize, usize)> {
    if n_head == 0 || rows % n_head != 0 || (rows / n_head) % 2 != 0 || rows.checked_mul(cols)? != data.len() {
        return None;
    }
    let hd = rows / n_head;
    Some((hd, hd / 2))
}
