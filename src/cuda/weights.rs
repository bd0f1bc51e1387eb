//! The model's weights on the GPU in one 16-bit type, laid out for the engine's kernels: q/k/v fused into one
//! matrix per layer, SwiGLU's gate and up rows stacked into one. Uploaded from the checkpoint's raw bytes (the
//! mmap itself when the file already holds the engine's type), or filled with random values at a named shape for
//! latency measurements.

use half::{bf16, f16};

use crate::config::{Family, ModelConfig};
use crate::source::checkpoint::Checkpoint;
use crate::source::names::{Names, Part, Role, Table};
use crate::source::weights::{DType, Half, RawTensor};

use super::gpu::{Args, DBuf, Gpu, GpuError, GpuResult};
use super::kernels::Kernels;

/// One layer's tensors. Biases and norm biases are `None` where the family has none.
pub struct LayerW {
    pub attn_norm: DBuf,
    pub attn_norm_b: Option<DBuf>,
    /// `[(H + 2 KV) * hd, d]`: q rows, then k, then v.
    pub qkv: DBuf,
    pub qkv_b: Option<DBuf>,
    /// `[d, H * hd]`
    pub o: DBuf,
    pub o_b: Option<DBuf>,
    pub mlp_norm: DBuf,
    pub mlp_norm_b: Option<DBuf>,
    /// Llama: `[2F, d]`, gate rows then up rows; OPT: fc1 `[F, d]`.
    pub up: DBuf,
    pub up_b: Option<DBuf>,
    /// `[d, F]`
    pub down: DBuf,
    pub down_b: Option<DBuf>,
}

/// Every weight of a model on the GPU.
pub struct Weights {
    pub dt: Half,
    /// `[vocab, embed_dim]`
    pub embed: DBuf,
    /// OPT: `[max_positions + 2, d]`
    pub positions: Option<DBuf>,
    /// OPT-350m: `[d, embed_dim]` and `[embed_dim, d]`
    pub project_in: Option<DBuf>,
    pub project_out: Option<DBuf>,
    pub layers: Vec<LayerW>,
    pub final_norm: Option<DBuf>,
    pub final_norm_b: Option<DBuf>,
    /// `None`: tied to `embed`.
    pub lm_head: Option<DBuf>,
}

/// Sizes (in elements) of each buffer, in one place for both ways of filling them.
struct Shapes {
    qkv: usize,
    up_rows: usize,
}

fn shapes(cfg: &ModelConfig) -> Shapes {
    let qkv = (cfg.heads + 2 * cfg.kv_heads) * cfg.head_dim;
    let up_rows = if cfg.family == Family::Llama { 2 * cfg.ffn } else { cfg.ffn };
    Shapes { qkv, up_rows }
}

/// Bytes of weights a decode step reads for one token (every layer's matrices and norms, the head, one
/// embedding row and one position row): the numerator of the weight-read floor.
pub fn step_weight_bytes(cfg: &ModelConfig, elem: usize) -> usize {
    let table = Table::standard(cfg);
    let mut n = 0usize;
    for t in &table.tensors {
        n += match t.role {
            Role::Embed | Role::Positions => t.shape.get(1).copied().unwrap_or(0),
            _ => t.numel(),
        };
    }
    if cfg.tie_embeddings {
        n += cfg.vocab_size * cfg.embed_dim; // the tied head reads the whole embedding
    }
    n * elem
}

/// Bytes all the weights occupy on the GPU.
pub fn total_weight_bytes(cfg: &ModelConfig, elem: usize) -> usize {
    Table::standard(cfg).params() * elem
}

fn half_bytes(raw: &RawTensor<'_>, dt: Half) -> Vec<u16> {
    match (raw.dtype, dt) {
        (DType::F32, Half::F16) => raw.to_f32().into_iter().map(|v| f16::from_f32(v).to_bits()).collect(),
        (DType::F32, Half::Bf16) => raw.to_f32().into_iter().map(|v| bf16::from_f32(v).to_bits()).collect(),
        (DType::F16, Half::Bf16) => raw.to_f32().into_iter().map(|v| bf16::from_f32(v).to_bits()).collect(),
        (DType::BF16, Half::F16) => raw.to_f32().into_iter().map(|v| f16::from_f32(v).to_bits()).collect(),
        // Same type: callers upload the bytes directly; this arm is only reached for odd-length byte slices.
        _ => raw.bytes.chunks_exact(2).map(|c| u16::from_le_bytes([c[0], c[1]])).collect(),
    }
}

/// Reads checkpoint tensors into device buffers.
struct Uploader<'a> {
    gpu: &'a Gpu,
    ck: &'a dyn Checkpoint,
    table: Table,
    dt: Half,
}

impl Uploader<'_> {
    /// Copy `role`/`part` (of `layer`) into `dst` at element offset `off`.
    fn put(&self, dst: &DBuf, off: usize, role: Role, part: Part, layer: Option<usize>) -> GpuResult<()> {
        let spec = self
            .table
            .get(role, part, layer)
            .ok_or_else(|| GpuError(format!("internal: no {role:?} {part:?} in this model's tensor table")))?;
        let raw = self.ck.raw(&spec.name).map_err(|e| GpuError(e.to_string()))?;
        if raw.shape != spec.shape {
            return Err(GpuError(format!(
                "{}: tensor `{}` has shape {:?}, the model config implies {:?}",
                self.ck.file_of(&spec.name).display(),
                spec.name,
                raw.shape,
                spec.shape
            )));
        }
        if raw.dtype == self.dt.dtype() {
            self.gpu.upload(dst, off * 2, &raw.bytes[..])?;
        } else {
            self.gpu.upload(dst, off * 2, &half_bytes(&raw, self.dt))?;
        }
        // The upload is staged before it returns, so the pages can go.
        self.ck.release(&spec.name);
        Ok(())
    }

    fn one(&self, role: Role, part: Part, layer: Option<usize>) -> GpuResult<DBuf> {
        let n = self.table.get(role, part, layer).map(|s| s.numel()).unwrap_or(0);
        let b = self.gpu.alloc(n * 2)?;
        self.put(&b, 0, role, part, layer)?;
        Ok(b)
    }

    fn opt(&self, role: Role, part: Part, layer: Option<usize>) -> GpuResult<Option<DBuf>> {
        if self.table.get(role, part, layer).is_some() { self.one(role, part, layer).map(Some) } else { Ok(None) }
    }
}

impl Weights {
    /// Upload `ck` (whose tensors must match `cfg`) in `dt`. `on_layer` is called after each layer.
    pub fn upload(gpu: &Gpu, cfg: &ModelConfig, ck: &dyn Checkpoint, dt: Half, mut on_layer: impl FnMut(usize)) -> GpuResult<Self> {
        let names = Names::detect(cfg.family, |n| ck.contains(n));
        let up = Uploader { gpu, ck, table: Table::new(cfg, names), dt };
        let sh = shapes(cfg);
        let (d, hd) = (cfg.hidden, cfg.head_dim);
        let (qo, kvo) = (cfg.heads * hd, cfg.kv_heads * hd);
        let mut layers = Vec::with_capacity(cfg.layers);
        for l in 0..cfg.layers {
            let li = Some(l);
            let qkv = gpu.alloc(sh.qkv * d * 2)?;
            up.put(&qkv, 0, Role::Q, Part::Weight, li)?;
            up.put(&qkv, qo * d, Role::K, Part::Weight, li)?;
            up.put(&qkv, (qo + kvo) * d, Role::V, Part::Weight, li)?;
            let qkv_b = if cfg.attn_bias {
                let b = gpu.alloc(sh.qkv * 2)?;
                up.put(&b, 0, Role::Q, Part::Bias, li)?;
                up.put(&b, qo, Role::K, Part::Bias, li)?;
                up.put(&b, qo + kvo, Role::V, Part::Bias, li)?;
                Some(b)
            } else {
                None
            };
            let (upw, up_b) = if cfg.family == Family::Llama {
                let f = cfg.ffn;
                let w = gpu.alloc(2 * f * d * 2)?;
                up.put(&w, 0, Role::Gate, Part::Weight, li)?;
                up.put(&w, f * d, Role::Up, Part::Weight, li)?;
                let b = if cfg.mlp_bias {
                    let b = gpu.alloc(2 * f * 2)?;
                    up.put(&b, 0, Role::Gate, Part::Bias, li)?;
                    up.put(&b, f, Role::Up, Part::Bias, li)?;
                    Some(b)
                } else {
                    None
                };
                (w, b)
            } else {
                (up.one(Role::Up, Part::Weight, li)?, up.opt(Role::Up, Part::Bias, li)?)
            };
            layers.push(LayerW {
                attn_norm: up.one(Role::AttnNorm, Part::Weight, li)?,
                attn_norm_b: up.opt(Role::AttnNorm, Part::Bias, li)?,
                qkv,
                qkv_b,
                o: up.one(Role::O, Part::Weight, li)?,
                o_b: up.opt(Role::O, Part::Bias, li)?,
                mlp_norm: up.one(Role::MlpNorm, Part::Weight, li)?,
                mlp_norm_b: up.opt(Role::MlpNorm, Part::Bias, li)?,
                up: upw,
                up_b,
                down: up.one(Role::Down, Part::Weight, li)?,
                down_b: up.opt(Role::Down, Part::Bias, li)?,
            });
            on_layer(l);
        }
        let w = Weights {
            dt,
            embed: up.one(Role::Embed, Part::Weight, None)?,
            positions: up.opt(Role::Positions, Part::Weight, None)?,
            project_in: up.opt(Role::ProjectIn, Part::Weight, None)?,
            project_out: up.opt(Role::ProjectOut, Part::Weight, None)?,
            layers,
            final_norm: up.opt(Role::FinalNorm, Part::Weight, None)?,
            final_norm_b: up.opt(Role::FinalNorm, Part::Bias, None)?,
            lm_head: up.opt(Role::LmHead, Part::Weight, None)?,
        };
        gpu.sync()?;
        Ok(w)
    }

    /// `n` random 16-bit values of type `dt`, uniform in [-scale, scale], filled on the GPU (for latency only).
    pub fn random_half(gpu: &Gpu, k: &Kernels, dt: Half, n: usize, seed: u64, scale: f32) -> GpuResult<DBuf> {
        let fill = k.get(&format!("fill_random_{}", dt.name()))?;
        let b = gpu.alloc(n * 2)?;
        let blocks = n.div_ceil(256).clamp(1, 65_535) as u32;
        gpu.launch(fill, (blocks, 1, 1), 256, 0, &mut Args::new().ptr(b.ptr).i64(n as i64).u64(seed).f32(scale))?;
        Ok(b)
    }

    /// Random weights at `cfg`'s shapes, filled on the GPU (nothing crosses the bus): uniform with variance 1/in
    /// for projections, norms at 1, small biases. For latency only.
    pub fn random(gpu: &Gpu, k: &Kernels, cfg: &ModelConfig, dt: Half, seed: u64) -> GpuResult<Self> {
        let sh = shapes(cfg);
        let (d, f, e) = (cfg.hidden, cfg.ffn, cfg.embed_dim);
        let mut counter = seed;
        let mut rand = |n: usize, fan_in: usize| -> GpuResult<DBuf> {
            counter = counter.wrapping_add(0x9E37_79B9);
            Self::random_half(gpu, k, dt, n, counter, (3.0 / fan_in.max(1) as f64).sqrt() as f32)
        };
        let ones = |n: usize| -> GpuResult<DBuf> {
            let b = gpu.alloc(n * 2)?;
            let one = match dt {
                Half::F16 => f16::ONE.to_bits(),
                Half::Bf16 => bf16::ONE.to_bits(),
            };
            gpu.upload(&b, 0, &vec![one; n])?;
            Ok(b)
        };
        let opt = cfg.family == Family::Opt;
        let mut layers = Vec::with_capacity(cfg.layers);
        for _ in 0..cfg.layers {
            layers.push(LayerW {
                attn_norm: ones(d)?,
                attn_norm_b: if opt { Some(rand(d, 1_000_000)?) } else { None },
                qkv: rand(sh.qkv * d, d)?,
                qkv_b: if cfg.attn_bias { Some(rand(sh.qkv, 1_000_000)?) } else { None },
                o: rand(d * cfg.heads * cfg.head_dim, cfg.heads * cfg.head_dim)?,
                o_b: if opt && cfg.attn_bias { Some(rand(d, 1_000_000)?) } else { None },
                mlp_norm: ones(d)?,
                mlp_norm_b: if opt { Some(rand(d, 1_000_000)?) } else { None },
                up: rand(sh.up_rows * d, d)?,
                up_b: if cfg.mlp_bias { Some(rand(sh.up_rows, 1_000_000)?) } else { None },
                down: rand(d * f, f)?,
                down_b: if cfg.mlp_bias { Some(rand(d, 1_000_000)?) } else { None },
            });
        }
        let final_norm = if !opt || cfg.final_norm { Some(ones(d)?) } else { None };
        let w = Weights {
            dt,
            embed: rand(cfg.vocab_size * e, 3)?,
            positions: if opt { Some(rand((cfg.max_positions + 2) * d, 3)?) } else { None },
            project_in: if opt && e != d { Some(rand(d * e, e)?) } else { None },
            project_out: if opt && e != d { Some(rand(e * d, d)?) } else { None },
            layers,
            final_norm_b: if opt && final_norm.is_some() { Some(rand(d, 1_000_000)?) } else { None },
            final_norm,
            lm_head: if cfg.tie_embeddings { None } else { Some(rand(cfg.vocab_size * e, e)?) },
        };
        gpu.sync()?;
        Ok(w)
    }
}
