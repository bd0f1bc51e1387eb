//! Low-bit copies of the gate and up weights, used only to score neurons (the `qscore` and `cascade` rules):
//! per-row groups along the input dimension, each with an f16 scale (and, asymmetric, an f16 minimum). Made
//! by `calibrate --rule qscore` and stored in `RUN/qscore.safetensors` with the model's fingerprint.

use std::collections::HashMap;
use std::path::Path;

use safetensors::{tensor::TensorView, Dtype, SafeTensors};

use crate::error::{Error, Result};
use crate::source::ModelIdentity;
use crate::store::{self, ArtifactHeader, QSCORE_FORMAT, QSCORE_VERSION};

/// How weights are mapped to integers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum QScheme {
    /// `w ≈ q·s`, `q ∈ [−(2^(b−1)−1), 2^(b−1)−1]`, `s = max|w| / (2^(b−1)−1)` per group.
    Sym,
    /// `w ≈ m + q·s`, `q ∈ [0, 2^b−1]`, `m = min w`, `s = (max w − min w) / (2^b−1)` per group (GGUF Q4_1's map).
    Asym,
}

/// Bits, group size and scheme of a score copy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct QuantOptions {
    pub bits: u8,
    pub group: usize,
    pub scheme: QScheme,
}

impl QuantOptions {
    pub fn check(&self) -> std::result::Result<(), crate::error::OptionError> {
        let min_bits = if self.scheme == QScheme::Sym { 2 } else { 1 };
        if !(min_bits..=8).contains(&self.bits) {
            return Err(crate::error::OptionError::new("qbits", format!("{} is not in {min_bits}..=8 for {:?}", self.bits, self.scheme)));
        }
        if self.group == 0 {
            return Err(crate::error::OptionError::new("qgroup", "must be positive"));
        }
        Ok(())
    }

    /// Bits read per weight by a score pass: the codes plus the f16 scale (and minimum) shared by a group.
    pub fn bits_per_weight(&self) -> f64 {
        let per_group = match self.scheme {
            QScheme::Sym => 16.0,
            QScheme::Asym => 32.0,
        };
        self.bits as f64 + per_group / self.group as f64
    }
}

/// One quantized `[rows, cols]` matrix; groups of `group` consecutive entries of a row share a scale.
#[derive(Debug, Clone, PartialEq)]
pub struct QMatrix {
    pub rows: usize,
    pub cols: usize,
    pub opts: QuantOptions,
    /// `[rows, cols]` codes (sym: stored offset by 2^(b−1)−1 so they are unsigned).
    pub codes: Vec<u8>,
    /// `[rows, groups]` f16-representable scales.
    pub scale: Vec<f32>,
    /// `[rows, groups]` f16-representable minima (asym; empty for sym).
    pub min: Vec<f32>,
}

fn f16_round(x: f32) -> f32 {
    half::f16::from_f32(x).to_f32()
}

impl QMatrix {
    pub fn groups(&self) -> usize {
        self.cols.div_ceil(self.opts.group)
    }

    /// Quantize row-major `w: [rows, cols]`.
    pub fn quantize(w: &[f32], rows: usize, cols: usize, opts: QuantOptions) -> Self {
        debug_assert_eq!(w.len(), rows * cols);
        let g = opts.group;
        let groups = cols.div_ceil(g);
        let mut codes = vec![0u8; rows * cols];
        let mut scale = vec![0f32; rows * groups];
        let mut min = if opts.scheme == QScheme::Asym { vec![0f32; rows * groups] } else { Vec::new() };
        for r in 0..rows {
            for gi in 0..groups {
                let (c0, c1) = (gi * g, ((gi + 1) * g).min(cols));
                let vals = &w[r * cols + c0..r * cols + c1];
                let out = &mut codes[r * cols + c0..r * cols + c1];
                match opts.scheme {
                    QScheme::Sym => {
                        let qmax = ((1u32 << (opts.bits - 1)) - 1) as f32;
                        let amax = vals.iter().fold(0f32, |m, v| m.max(v.abs()));
                        let s = f16_round(amax / qmax);
                        scale[r * groups + gi] = s;
                        for (o, &v) in out.iter_mut().zip(vals) {
                            let q = if s > 0.0 { (v / s).round().clamp(-qmax, qmax) } else { 0.0 };
                            *o = (q + qmax) as u8;
                        }
                    }
                    QScheme::Asym => {
                        let qmax = ((1u32 << opts.bits) - 1) as f32;
                        let lo = vals.iter().fold(f32::INFINITY, |m, &v| m.min(v));
                        let hi = vals.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
                        let m = f16_round(lo);
                        let s = f16_round((hi - m) / qmax);
                        scale[r * groups + gi] = s;
                        min[r * groups + gi] = m;
                        for (o, &v) in out.iter_mut().zip(vals) {
                            let q = if s > 0.0 { ((v - m) / s).round().clamp(0.0, qmax) } else { 0.0 };
                            *o = q as u8;
                        }
                    }
                }
            }
        }
        QMatrix { rows, cols, opts, codes, scale, min }
    }

    /// The values the codes stand for, row-major `[rows, cols]`.
    pub fn dequantize(&self) -> Vec<f32> {
        let (g, groups) = (self.opts.group, self.groups());
        let off = match self.opts.scheme {
            QScheme::Sym => ((1u32 << (self.opts.bits - 1)) - 1) as f32,
            QScheme::Asym => 0.0,
        };
        let mut out = vec![0f32; self.rows * self.cols];
        for r in 0..self.rows {
            for c in 0..self.cols {
                let gi = r * groups + c / g;
                let q = self.codes[r * self.cols + c] as f32 - off;
                let base = if self.min.is_empty() { 0.0 } else { self.min[gi] };
                out[r * self.cols + c] = base + q * self.scale[gi];
            }
        }
        out
    }
}

/// Per layer: the gate and up copies, each `[ffn, hidden]` (one row per neuron).
#[derive(Debug, Clone)]
pub struct QScoreCopies {
    pub header: ArtifactHeader,
    pub opts: QuantOptions,
    pub layers: Vec<(QMatrix, QMatrix)>,
}

const META_HEADER: &str = "header";
const META_QUANT: &str = "quant";

impl QScoreCopies {
    /// Write atomically; the header and the options go into the safetensors metadata.
    pub fn save(&self, path: &Path) -> Result<()> {
        let bad = |e: String| Error::format(path, e);
        let mut bufs: Vec<(String, Vec<u8>, Vec<usize>, Dtype)> = Vec::new();
        for (l, (gate, up)) in self.layers.iter().enumerate() {
            for (name, m) in [("gate", gate), ("up", up)] {
                let p = format!("layers.{l}.{name}");
                bufs.push((format!("{p}.codes"), m.codes.clone(), vec![m.rows, m.cols], Dtype::U8));
                let f32s = |v: &[f32]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
                bufs.push((format!("{p}.scale"), f32s(&m.scale), vec![m.rows, m.groups()], Dtype::F32));
                if !m.min.is_empty() {
                    bufs.push((format!("{p}.min"), f32s(&m.min), vec![m.rows, m.groups()], Dtype::F32));
                }
            }
        }
        let mut views = Vec::new();
        for (name, bytes, shape, dt) in &bufs {
            views.push((name.clone(), TensorView::new(*dt, shape.clone(), bytes).map_err(|e| bad(e.to_string()))?));
        }
        let mut meta = HashMap::new();
        meta.insert(META_HEADER.to_string(), serde_json::to_string(&self.header).map_err(|e| bad(e.to_string()))?);
        meta.insert(META_QUANT.to_string(), serde_json::to_string(&self.opts).map_err(|e| bad(e.to_string()))?);
        store::write_safetensors(path, views, meta)
    }

    /// Read `path`, refusing another format, version or model, and tensors that do not fit the model.
    pub fn load(path: &Path, model: &ModelIdentity) -> Result<Self> {
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        let (_, meta) = SafeTensors::read_metadata(&bytes).map_err(|e| Error::format(path, format!("not a safetensors file: {e}")))?;
        let meta = meta.metadata().clone().unwrap_or_default();
        let get_meta = |key: &str| {
            meta.get(key).ok_or_else(|| Error::field(path, format!("metadata.{key}"), "missing: not a qscore file (re-run `dejavu calibrate --rule qscore`)"))
        };
        let header: ArtifactHeader =
            serde_json::from_str(get_meta(META_HEADER)?).map_err(|e| Error::field(path, "metadata.header", e.to_string()))?;
        header.check(path, QSCORE_FORMAT, QSCORE_VERSION, model)?;
        let opts: QuantOptions = serde_json::from_str(get_meta(META_QUANT)?).map_err(|e| Error::field(path, "metadata.quant", e.to_string()))?;
        opts.check().map_err(|e| Error::field(path, "metadata.quant", e.to_string()))?;
        let st = SafeTensors::deserialize(&bytes).map_err(|e| Error::format(path, e.to_string()))?;
        let (rows, cols) = (model.ffn, model.hidden);
        let groups = cols.div_ceil(opts.group);
        let get = |name: &str, dt: Dtype, shape: &[usize]| -> Result<Vec<u8>> {
            let v = st.tensor(name).map_err(|e| Error::tensor(path, name, e.to_string()))?;
            if v.dtype() != dt || v.shape() != shape {
                return Err(Error::tensor(path, name, format!("expected {dt:?} {shape:?}, found {:?} {:?}", v.dtype(), v.shape())));
            }
            Ok(v.data().to_vec())
        };
        let f32s = |b: Vec<u8>| b.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect::<Vec<f32>>();
        let mut layers = Vec::with_capacity(model.layers);
        for l in 0..model.layers {
            let mut pair = Vec::with_capacity(2);
            for name in ["gate", "up"] {
                let p = format!("layers.{l}.{name}");
                let codes = get(&format!("{p}.codes"), Dtype::U8, &[rows, cols])?;
                let limit = match opts.scheme {
                    QScheme::Sym => (1u32 << opts.bits) - 2,
                    QScheme::Asym => (1u32 << opts.bits) - 1,
                };
                if codes.iter().any(|&c| c as u32 > limit) {
                    return Err(Error::tensor(path, format!("{p}.codes"), format!("holds codes above {limit} for {} bits", opts.bits)));
                }
                let scale = f32s(get(&format!("{p}.scale"), Dtype::F32, &[rows, groups])?);
                let min = match opts.scheme {
                    QScheme::Asym => f32s(get(&format!("{p}.min"), Dtype::F32, &[rows, groups])?),
                    QScheme::Sym => Vec::new(),
                };
                pair.push(QMatrix { rows, cols, opts, codes, scale, min });
            }
            let up = pair.pop();
            let gate = pair.pop();
            if let (Some(g), Some(u)) = (gate, up) {
                layers.push((g, u));
            }
        }
        Ok(QScoreCopies { header, opts, layers })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rand(n: usize, seed: u64) -> Vec<f32> {
        let mut x = seed;
        (0..n)
            .map(|_| {
                x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                ((x >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect()
    }

    #[test]
    fn error_is_within_half_a_step_per_group() {
        let (rows, cols) = (5, 70); // 70 = 2 full groups of 32 and a partial one
        let w = rand(rows * cols, 7);
        for scheme in [QScheme::Sym, QScheme::Asym] {
            for bits in [3u8, 4, 8] {
                let q = QMatrix::quantize(&w, rows, cols, QuantOptions { bits, group: 32, scheme });
                let d = q.dequantize();
                for r in 0..rows {
                    for c in 0..cols {
                        let s = q.scale[r * q.groups() + c / 32];
                        // Half a step, plus the f16 rounding of the scale and minimum (relative 2^-11).
                        let tol = 0.5 * s + 1e-3 * (1.0 + w[r * cols + c].abs());
                        assert!((d[r * cols + c] - w[r * cols + c]).abs() <= tol, "{scheme:?} {bits}: {r},{c}");
                    }
                }
            }
        }
    }

    #[test]
    fn values_on_the_grid_come_back_exactly() {
        // Multiples of 0.25 up to ±1.75 are exactly a 4-bit symmetric grid with scale 0.25 (absmax 1.75 = 7·0.25).
        let w: Vec<f32> = (0..32).map(|i| ((i % 15) as f32 - 7.0) * 0.25).collect();
        let q = QMatrix::quantize(&w, 1, 32, QuantOptions { bits: 4, group: 32, scheme: QScheme::Sym });
        assert_eq!(q.scale, vec![0.25]);
        assert_eq!(q.dequantize(), w);
    }

    #[test]
    fn bits_per_weight_counts_the_group_scales() {
        assert_eq!(QuantOptions { bits: 4, group: 32, scheme: QScheme::Sym }.bits_per_weight(), 4.5);
        assert_eq!(QuantOptions { bits: 3, group: 32, scheme: QScheme::Asym }.bits_per_weight(), 4.0);
    }
}
