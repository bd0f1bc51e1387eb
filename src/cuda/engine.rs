//! The dense forward on the GPU: our kernels for everything at decode sizes (fused q/k/v, fused SwiGLU, residual
//! adds inside the projections' epilogues), cuBLAS for the projections of a prefill, and the decode step captured
//! into a CUDA graph per batch size and replayed.
//!
//! State that changes between steps (the token ids, the number of cached positions) lives in device buffers that
//! the kernels read, so one captured graph serves every step; the host writes them before each replay.
//!
//! This file holds the engine's state and its decode interface (prefill, step, logits, scores, the cache); the
//! forward itself is in `forward`. Every launch goes through the [`Launcher`] it holds (weights, kernels, settings).

mod forward;

use std::collections::HashMap;

use cudarc::driver::sys::CUdeviceptr;

use crate::config::ModelConfig;
use crate::predictor::FoldedPredictor;
use crate::sparse::plan::{HeadKv, HeadRule, MlpRule, Plan};
use crate::sparse::quant::QScoreCopies;

use super::gpu::{Args, DBuf, Gpu, GpuError, GpuResult, Graph};
use super::heads::SparseHeads;
use super::kernels::Kernels;
use super::launcher::{Epi, Launcher, GEMV_MAX_ROWS};
use super::predict::GpuPredictor;
use super::select::QCopy;
use super::sparse::{GpuMlp, SparseMlp, SparseParts};
use super::weights::Weights;

/// What a sparse plan on the GPU reads besides the model: the `qscore` score copies, and the trained MLP
/// predictors (one per layer, folded) of the `dejavu` rule.
#[derive(Default, Clone, Copy)]
pub struct GpuArtifacts<'a> {
    pub qscore: Option<&'a QScoreCopies>,
    pub mlp_predictors: Option<&'a [FoldedPredictor]>,
    /// The look-ahead head predictors (one per layer, folded) of a predicted head rule.
    pub head_predictors: Option<&'a [FoldedPredictor]>,
    /// What the MLP predictors read (`train-predictors --neuron-input`): from a block input (`block`, `prev`) the
    /// engine selects the layer's neurons on the side stream ahead of its MLP ([`super::sparse::MlpAhead`]).
    pub mlp_input: crate::predictor::NeuronInput,
}

/// Attention key splits at most, for decode.
const MAX_SPLITS: usize = 32;

/// Kernel classes, for the per-class time breakdown of `bench`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Class {
    Embed,
    Norm,
    Qkv,
    Attention,
    OutProj,
    Mlp,
    Head,
}

impl Class {
    pub fn name(self) -> &'static str {
        match self {
            Class::Embed => "embed",
            Class::Norm => "norm",
            Class::Qkv => "qkv",
            Class::Attention => "attention",
            Class::OutProj => "out_proj",
            Class::Mlp => "mlp",
            Class::Head => "lm_head",
        }
    }
}

/// Per-forward scratch, sized for `rows` tokens.
struct Scratch {
    rows: usize,
    /// f32 residual stream `[rows, d]`
    x: DBuf,
    /// 16-bit normed input of a projection `[rows, max(d, E)]`
    h: DBuf,
    /// f32 fused q/k/v `[rows, (H + 2 KV) hd]`
    qkv: DBuf,
    /// 16-bit attention output `[rows, H hd]`
    att: DBuf,
    /// attention partials `[rows * H * splits, hd + 2]`
    part: DBuf,
    /// f32 GEMM output `[rows, max(2F, E, d)]`
    y: DBuf,
    /// 16-bit MLP hidden `[rows, F]`
    act: DBuf,
    /// f32 MLP hidden `[F]` and attention output `[H hd]` of a one-row dense decode step (`f32_acts`)
    act32: DBuf,
    att32: DBuf,
    /// 16-bit final hidden `[rows, E]` (after the final norm and project_out): the head's input
    fin: DBuf,
}

/// The KV cache: per layer, K and V `[rows, KV, cap, hd]` in the 16-bit type.
struct Cache {
    rows: usize,
    cap: usize,
    k: Vec<DBuf>,
    v: Vec<DBuf>,
    /// Per layer, u8 `[rows, kv_heads, cap]`: 1 where the key/value head was computed at that position, 0 where a
    /// head-sparse token (`--head-kv kept`) skipped it. Written by every forward; read when a plan may skip.
    present: Vec<DBuf>,
}

/// What the last forward left behind.
#[derive(Debug, Clone, PartialEq)]
pub struct Last {
    pub rows: usize,
    pub seq: usize,
    /// Real tokens per row.
    pub lens: Vec<usize>,
    /// The logits of every row's single position are already in `logits` (a captured step ran).
    pub step_logits: bool,
}

/// One model on one GPU, with its cache and graphs.
pub struct Engine {
    /// The weights, kernels and launch settings every launch goes through.
    pub ctx: Launcher,
    scratch: Option<Scratch>,
    cache: Option<Cache>,
    /// `[0]`: positions cached before the running forward.
    state: DBuf,
    /// token ids of the running forward `[rows]`; a captured step writes its argmax back here.
    tok: DBuf,
    tok_cap: usize,
    /// f32 logits `[rows, V]`
    logits: Option<DBuf>,
    logits_rows: usize,
    /// `score`'s targets, log-probs and argmaxes (4 bytes a row each), kept between calls.
    score_bufs: Option<[DBuf; 3]>,
    score_rows: usize,
    /// int per row: argmax / gathered row index.
    small: DBuf,
    /// Captured forwards by (rows, tokens a row: 0 for the decode step with its head and argmax, attention key
    /// splits, sparse plan active).
    graphs: HashMap<(usize, usize, usize, bool), Graph>,
    /// Short prefills (at most `GEMV_MAX_ROWS` tokens in all: Sirius' verification forwards, short prompts) run
    /// from captured graphs too (`DEJAVU_PREFILL_GRAPH=0`: launched one by one). Measured on an H100 (SmolLM2,
    /// `exactdown@0.5` corrected at K = 4): a dense check 1.54 -> 0.91 ms; same greedy results with and without.
    prefill_graphs: bool,
    /// Positions in the cache.
    pub len: usize,
    pub last: Option<Last>,
    /// Set by `bench --breakdown`: per-class events recorded around each launch.
    pub profile: Option<Vec<(Class, super::gpu::Event, super::gpu::Event)>>,
    cur_class: Class,
    /// Normalise inside the GEMV projections (default); `DEJAVU_FUSE_NORM=0` runs the norm kernel instead, for
    /// side-by-side timing.
    fuse_norm: bool,
    /// Keys per attention split at least (`DEJAVU_ATTN_KEYS`, default 128: with the values loaded beside the keys,
    /// measured side by side on an H100, prompt 128 + 128 tokens, 128 was faster than 64 and 32 at Llama-2-7B/13B,
    /// OPT-6.7B and SmolLM2; `kernels/NOTES.md`).
    attn_keys: usize,
    /// Fold RoPE and the cache write into the attention kernel at decode: one launch a layer fewer. Default on
    /// below width 2048, where launches dominate (`DEJAVU_ROPE_FUSE=0/1` overrides): measured side by side on an
    /// H100, SmolLM2 0.597 -> 0.569 ms, Llama-2-7B unchanged (5.159), Llama-2-13B 9.737 -> 9.811, OPT-6.7B 5.242
    /// -> 5.269 (`kernels/NOTES.md`); bit for bit the same output, cache and flags (`engine-check`).
    rope_fuse: bool,
    /// At batch-1 decode with dense heads, the out-projection merges the attention's key splits itself
    /// (`gemv_comb_*`) instead of a separate `attn_combine` launch. Default on below width 2048, as `rope_fuse`
    /// (`DEJAVU_COMB_FOLD=0/1` overrides): measured side by side on an H200, SmolLM2 0.640 -> 0.621 ms, Llama-2-7B
    /// 4.103 -> 4.168, Llama-2-13B 7.687 -> 7.833, OPT-6.7B 4.182 -> 4.255 (`kernels/NOTES.md`); `engine-check`
    /// compares it bit for bit with attn_combine + the GEMV.
    comb_fold: bool,
    /// A one-row dense decode step keeps the MLP hidden and the attention output in f32 between the kernels
    /// (`DEJAVU_F32_ACTS=0` turns it off). Alone it moved as many continuations one way as the other (one H100,
    /// eighteenth session); with the short prefills on the GEMV ([`super::launcher::SMALL_PREFILL_GEMV`])
    /// tiny-llama went from 43 to 45 of 50 and no model fell below 45 (one H100, twentieth); decode time unchanged
    /// (kernels/NOTES.md).
    f32_acts: bool,
    /// The sparse MLP of the plan set by [`Engine::set_plan`] (None: dense; present, possibly with every MLP
    /// dense, whenever the plan is sparse: it keeps the statistics).
    sparse: Option<SparseMlp>,
    /// The head-sparse attention of the plan (None: dense attention).
    heads: Option<SparseHeads>,
    /// Run dense even with a sparse plan set (the correction passes of Sirius).
    dense_now: bool,
    /// Kept-neuron statistics of the sparse forwards since the last take.
    pub stats: crate::sparse::SparsityStats,
}

impl Engine {
    /// An engine over weights already on `gpu`.
    pub fn new(gpu: Gpu, k: Kernels, w: Weights, cfg: ModelConfig) -> GpuResult<Self> {
        if !cfg.head_dim.is_power_of_two() || !(8..=256).contains(&cfg.head_dim) {
            return Err(GpuError(format!("head_dim {} is not supported by the CUDA engine (powers of two from 8 to 256)", cfg.head_dim)));
        }
        if cfg.heads % cfg.kv_heads != 0 {
            return Err(GpuError(format!("{} heads are not a multiple of {} kv heads", cfg.heads, cfg.kv_heads)));
        }
        let small_model = cfg.hidden < 2048;
        let ctx = Launcher::new(gpu, k, w, cfg)?;
        let state = ctx.gpu.alloc(16)?;
        let small = ctx.gpu.alloc(4 * 1024)?;
        let tok = ctx.gpu.alloc(4 * 64)?;
        let e = Engine {
            ctx,
            scratch: None,
            cache: None,
            state,
            tok,
            tok_cap: 64,
            logits: None,
            logits_rows: 0,
            score_bufs: None,
            score_rows: 0,
            small,
            graphs: HashMap::new(),
            len: 0,
            last: None,
            profile: None,
            cur_class: Class::Embed,
            // Fusing the norm into each GEMV block pays at small widths (launches dominate) and costs at 4096
            // (every block re-reads the row): measured on the H200, SmolLM2 0.721 vs 0.757 ms, Llama-2-7B 4.75 vs 4.55.
            fuse_norm: std::env::var("DEJAVU_FUSE_NORM").map_or(small_model, |v| v != "0"),
            rope_fuse: std::env::var("DEJAVU_ROPE_FUSE").map_or(small_model, |v| v != "0"),
            prefill_graphs: std::env::var("DEJAVU_PREFILL_GRAPH").map_or(true, |v| v != "0"),
            comb_fold: std::env::var("DEJAVU_COMB_FOLD").map_or(small_model, |v| v != "0"),
            f32_acts: std::env::var("DEJAVU_F32_ACTS").map_or(true, |v| v != "0"),
            attn_keys: std::env::var("DEJAVU_ATTN_KEYS").ok().and_then(|v| v.parse().ok()).filter(|&k: &usize| k >= 16).unwrap_or(128),
            sparse: None,
            heads: None,
            dense_now: false,
            stats: Default::default(),
        };
        Ok(e)
    }

    /// Run `plan` from now on. The GPU runs, on the MLP (any layer may stay dense): CATS thresholds, the SwiGLU
    /// top-k rules `exactdown` and `qscore` (its int4 score copies from `art`), and the trained predictors' top-k
    /// (`art`'s folded MLP predictors); on attention, the predicted head rule with `--head-kv all` (`art`'s head
    /// predictors; see [`super::heads`]). Other rules are refused with their name. Sparse layers get transposed
    /// copies of their down projection and out-projection (made here, once).
    pub fn set_plan(&mut self, plan: &Plan, art: &GpuArtifacts<'_>) -> GpuResult<()> {
        if plan.layers.len() != self.ctx.cfg.layers {
            return Err(GpuError(format!("the plan has {} layers, the model {}", plan.layers.len(), self.ctx.cfg.layers)));
        }
        let mut rules = Vec::with_capacity(plan.layers.len());
        let mut heads_k = Vec::with_capacity(plan.layers.len());
        let mut kv_kept = false;
        for (l, lp) in plan.layers.iter().enumerate() {
            heads_k.push(match lp.heads {
                HeadRule::Dense => None,
                HeadRule::PredictedTopK { k, .. } if k >= self.ctx.cfg.heads => None,
                HeadRule::PredictedTopK { k, kv } => {
                    kv_kept |= kv == HeadKv::Kept;
                    Some(k)
                }
                r => return Err(GpuError(format!("layer {l}: head rule {r:?} does not run on the GPU yet (predicted heads do)"))),
            });
            rules.push(match lp.mlp {
                MlpRule::Dense => None,
                MlpRule::Threshold { t } => Some(GpuMlp::Cats(t)),
                MlpRule::ExactDownTopK { k } => Some(GpuMlp::ExactDown(k)),
                MlpRule::QScoreTopK { k } => Some(GpuMlp::QScore(k)),
                MlpRule::PredictedTopK { k } => Some(GpuMlp::Predicted(k)),
                r => return Err(GpuError(format!("layer {l}: MLP rule {r:?} does not run on the GPU yet (CATS, exactdown, qscore and dejavu do)"))),
            });
        }
        let mut parts = SparseParts::default();
        if let Some(c) = art.qscore.filter(|_| rules.iter().any(|r| matches!(r, Some(GpuMlp::QScore(_))))) {
            parts.q = QCopy::upload_all(&self.ctx, c)?.into_iter().map(Some).collect();
            parts.score_bits = c.opts.bits_per_weight();
        }
        let upload = |ps: Option<&[FoldedPredictor]>, want: &dyn Fn(usize) -> bool| -> GpuResult<Vec<Option<GpuPredictor>>> {
            (0..plan.layers.len())
                .map(|l| match ps.and_then(|ps| ps.get(l)).filter(|_| want(l)) {
                    Some(p) => GpuPredictor::upload(&self.ctx, p).map(Some),
                    None => Ok(None),
                })
                .collect()
        };
        parts.pred = upload(art.mlp_predictors, &|l| matches!(rules[l], Some(GpuMlp::Predicted(_))))?;
        parts.neuron_input = art.mlp_input;
        let head_pred = upload(art.head_predictors, &|l| heads_k[l].is_some())?;
        self.install(rules, heads_k, kv_kept, parts, head_pred)
    }

    /// Run these per-layer rules from now on (see [`Engine::set_plan`]): the MLP rules with what they read
    /// (`parts`), the heads kept per layer (None: dense attention) with their predictors, and whether a token skips
    /// the key/value heads none of its kept heads reads (`--head-kv kept`).
    pub fn install(&mut self, rules: Vec<Option<GpuMlp>>, heads_k: Vec<Option<usize>>, kv_kept: bool, parts: SparseParts, head_pred: Vec<Option<GpuPredictor>>) -> GpuResult<()> {
        self.graphs.clear();
        self.sparse = None;
        self.heads = None;
        if heads_k.iter().any(Option::is_some) {
            self.heads = Some(SparseHeads::new(&self.ctx, heads_k.clone(), kv_kept, head_pred)?);
        }
        if rules.iter().any(Option::is_some) || self.heads.is_some() {
            let mut sp = SparseMlp::new(&self.ctx, rules, parts)?;
            sp.heads_k = heads_k;
            self.sparse = Some(sp);
        }
        Ok(())
    }

    /// The sparse MLP the next forward runs (None: dense).
    fn sparse_active(&self) -> Option<&SparseMlp> {
        self.sparse.as_ref().filter(|_| !self.dense_now)
    }

    /// Layer `l`'s head-sparse attention in the next forward (None: dense attention there).
    fn heads_at(&self, l: usize) -> Option<&SparseHeads> {
        self.heads_on().filter(|h| h.k[l].is_some())
    }

    /// The head-sparse state while the plan runs (None without head sparsity or while running dense).
    fn heads_on(&self) -> Option<&SparseHeads> {
        self.heads.as_ref().filter(|_| !self.dense_now)
    }

    /// Run dense (`true`) or the plan set (`false`) from the next forward on.
    pub fn set_dense(&mut self, dense: bool) {
        self.dense_now = dense;
    }

    /// Add the last forward's kept counts to [`Engine::stats`] (nothing when it ran dense).
    fn add_stats(&mut self, batch: usize, seq: usize, lens: &[usize]) -> GpuResult<()> {
        let mut st = std::mem::take(&mut self.stats);
        let r = match self.sparse_active() {
            Some(sp) => sp.add_stats(&self.ctx, batch, seq, lens, &mut st),
            None => Ok(()),
        };
        self.stats = st;
        r
    }

    fn class(&mut self, c: Class) -> GpuResult<()> {
        if let Some(p) = &mut self.profile {
            let (s, e) = (self.ctx.gpu.event()?, self.ctx.gpu.event()?);
            self.ctx.gpu.record(&s)?;
            if let Some(last) = p.last() {
                self.ctx.gpu.record(&last.2)?;
            }
            p.push((c, s, e));
        }
        self.cur_class = c;
        Ok(())
    }

    fn end_profile(&mut self) -> GpuResult<()> {
        if let Some(p) = &self.profile {
            if let Some(last) = p.last() {
                self.ctx.gpu.record(&last.2)?;
            }
        }
        Ok(())
    }

    /// Make room for a forward of `rows` tokens in `batch` rows reaching `need` cached positions. Reallocation
    /// drops the captured graphs (they hold the old addresses).
    fn reserve(&mut self, batch: usize, rows: usize, need: usize) -> GpuResult<()> {
        let c = &self.ctx.cfg;
        let (d, e, f, hd) = (c.hidden, c.embed_dim, c.ffn, c.head_dim);
        let qkv = (c.heads + 2 * c.kv_heads) * hd;
        if self.scratch.as_ref().is_none_or(|s| s.rows < rows) {
            let r = rows.max(GEMV_MAX_ROWS);
            let g = &self.ctx.gpu;
            let splits = if r <= GEMV_MAX_ROWS { MAX_SPLITS } else { 1 };
            self.graphs.clear();
            self.scratch = None;
            self.scratch = Some(Scratch {
                rows: r,
                x: g.alloc(r * d * 4)?,
                h: g.alloc(r * d.max(e) * 2)?,
                qkv: g.alloc(r * qkv * 4)?,
                att: g.alloc(r * c.heads * hd * 2)?,
                part: g.alloc((r * c.heads * splits).max(GEMV_MAX_ROWS * c.heads * MAX_SPLITS) * (hd + 2) * 4)?,
                y: g.alloc(r * (2 * f).max(e).max(d) * 4)?,
                act: g.alloc(r * f * 2)?,
                act32: g.alloc(f * 4)?,
                att32: g.alloc(c.heads * hd * 4)?,
                fin: g.alloc(r * e.max(d) * 2)?,
            });
        }
        if rows > self.tok_cap {
            self.graphs.clear();
            self.tok_cap = rows.next_power_of_two();
            self.tok = self.ctx.gpu.alloc(self.tok_cap * 4)?;
        }
        let limit = c.position_limit().unwrap_or(usize::MAX);
        let grow = match &self.cache {
            None => true,
            Some(k) => k.rows < batch || k.cap < need,
        };
        if grow {
            let (old_rows, old_cap) = self.cache.as_ref().map_or((0, 0), |k| (k.rows, k.cap));
            let rows_new = batch.max(old_rows);
            let cap = need.max(256).max(old_cap.saturating_mul(2)).min(limit.max(need));
            let bytes = rows_new * c.kv_heads * cap * hd * 2;
            let mut k = Vec::with_capacity(c.layers);
            let mut v = Vec::with_capacity(c.layers);
            let mut present = Vec::with_capacity(c.layers);
            for l in 0..c.layers {
                let (kb, vb) = (self.ctx.gpu.alloc(bytes)?, self.ctx.gpu.alloc(bytes)?);
                let pb = self.ctx.gpu.alloc(rows_new * c.kv_heads * cap)?;
                if let Some(old) = &self.cache {
                    // Keep the cached positions: copy each (row, kv head) run of `len` positions.
                    let run = self.len * hd * 2;
                    for r in 0..old.rows {
                        for j in 0..c.kv_heads {
                            let src = ((r * c.kv_heads + j) * old.cap * hd * 2) as u64;
                            let dst = ((r * c.kv_heads + j) * cap * hd * 2) as u64;
                            self.ctx.gpu.copy(kb.ptr + dst, old.k[l].ptr + src, run)?;
                            self.ctx.gpu.copy(vb.ptr + dst, old.v[l].ptr + src, run)?;
                            let (ps, pd) = (((r * c.kv_heads + j) * old.cap) as u64, ((r * c.kv_heads + j) * cap) as u64);
                            self.ctx.gpu.copy(pb.ptr + pd, old.present[l].ptr + ps, self.len)?;
                        }
                    }
                }
                k.push(kb);
                v.push(vb);
                present.push(pb);
            }
            self.ctx.gpu.sync()?;
            self.graphs.clear();
            self.cache = Some(Cache { rows: rows_new, cap, k, v, present });
        }
        Ok(())
    }

    /// Bytes the cache and scratch would take for `batch` rows of `ctx` positions and `rows` tokens per forward.
    pub fn working_bytes(cfg: &ModelConfig, batch: usize, ctx: usize, rows: usize) -> usize {
        let (d, e, f, hd) = (cfg.hidden, cfg.embed_dim, cfg.ffn, cfg.head_dim);
        let cache = 2 * cfg.layers * batch * cfg.kv_heads * ctx.max(256) * hd * 2;
        let r = rows.max(GEMV_MAX_ROWS);
        let qkv = (cfg.heads + 2 * cfg.kv_heads) * hd;
        let scratch = r * (d * 4 + d.max(e) * 2 + qkv * 4 + cfg.heads * hd * 2 + (2 * f).max(e).max(d) * 4 + f * 2 + e.max(d) * 2)
            + (f + cfg.heads * hd) * 4
            + (r * cfg.heads).max(GEMV_MAX_ROWS * cfg.heads * MAX_SPLITS) * (hd + 2) * 4;
        cache + scratch + r * cfg.vocab_size * 4
    }

    fn set_inputs(&mut self, tokens: &[i32], past: usize) -> GpuResult<()> {
        self.ctx.gpu.upload(&self.tok, 0, tokens)?;
        self.ctx.gpu.upload(&self.state, 0, &[past as i32])
    }

    fn ensure_logits(&mut self, rows: usize) -> GpuResult<CUdeviceptr> {
        if self.logits.is_none() || self.logits_rows < rows {
            self.graphs.clear();
            self.logits = None;
            let r = rows.max(GEMV_MAX_ROWS);
            self.logits = Some(self.ctx.gpu.alloc(r * self.ctx.cfg.vocab_size * 4)?);
            self.logits_rows = r;
        }
        Ok(self.logits.as_ref().map_or(0, |b| b.ptr))
    }

    fn head_ptr(&self) -> CUdeviceptr {
        self.ctx.w.lm_head.as_ref().map_or(self.ctx.w.embed.ptr, |b| b.ptr)
    }

    /// Logits f32 `[rows, V]` of `rows` 16-bit hidden rows at `src`.
    fn head(&mut self, src: CUdeviceptr, rows: usize) -> GpuResult<CUdeviceptr> {
        let out = self.ensure_logits(rows)?;
        self.class(Class::Head)?;
        let (v, e) = (self.ctx.cfg.vocab_size, self.ctx.cfg.embed_dim);
        let y = self.scratch.as_ref().map_or(0, |s| s.y.ptr);
        self.ctx.linear(self.head_ptr(), None, src, out, rows, v, e, Epi::Store, y)?;
        Ok(out)
    }

    fn argmax_rows(&self, logits: CUdeviceptr, rows: usize, targets: CUdeviceptr, lp: CUdeviceptr, am: CUdeviceptr) -> GpuResult<()> {
        let args = Args::new().ptr(logits).i32(self.ctx.cfg.vocab_size as i32).ptr(targets).ptr(lp).ptr(am);
        self.ctx.launch("row_argmax_logprob", (rows as u32, 1, 1), 1024, args)
    }

    /// Run `batch` rows of `seq` tokens (row-major ids) after the cached positions.
    pub fn prefill(&mut self, ids: &[i32], batch: usize, seq: usize, lens: Vec<usize>) -> GpuResult<()> {
        self.ctx.gpu.bind()?;
        let rows = batch * seq;
        self.reserve(batch, rows, self.len + seq)?;
        if let Some(c) = &self.cache {
            if c.rows < batch {
                return Err(GpuError::new("internal: cache rows"));
            }
        }
        self.set_inputs(ids, self.len)?;
        if self.prefill_graphs && rows <= GEMV_MAX_ROWS && self.profile.is_none() {
            // The forward reads its positions from `state`, so one graph serves every prefill of this shape.
            let key = (batch, seq, self.splits(rows, self.len + seq), self.sparse_active().is_some());
            self.replay_or_capture(key, |e| e.forward(batch, seq))?;
        } else {
            self.forward(batch, seq)?;
            self.end_profile()?;
        }
        self.len += seq;
        self.add_stats(batch, seq, &lens)?;
        self.last = Some(Last { rows: batch, seq, lens, step_logits: false });
        Ok(())
    }

    /// One token per row through the captured graph of this batch size (captured on first use): forward, head
    /// and argmax, which lands in `tok` for the next step.
    pub fn step(&mut self, ids: Option<&[i32]>, batch: usize) -> GpuResult<()> {
        self.ctx.gpu.bind()?;
        self.reserve(batch, batch, self.len + 1)?;
        self.ensure_logits(batch)?;
        if let Some(ids) = ids {
            self.ctx.gpu.upload(&self.tok, 0, ids)?;
        }
        self.ctx.gpu.upload(&self.state, 0, &[self.len as i32])?;
        if self.profile.is_some() {
            self.step_body(batch)?;
            self.end_profile()?;
        } else {
            // One graph per batch size and attention split count (which follows the context length).
            let key = (batch, 0, self.splits(batch, self.len + 1), self.sparse_active().is_some());
            self.replay_or_capture(key, |e| e.step_body(batch))?;
        }
        self.len += 1;
        self.add_stats(batch, 1, &vec![1; batch])?;
        self.last = Some(Last { rows: batch, seq: 1, lens: vec![1; batch], step_logits: true });
        Ok(())
    }

    /// Replay the graph of `key`, capturing `body` into it first if there is none.
    fn replay_or_capture(&mut self, key: (usize, usize, usize, bool), body: impl FnOnce(&mut Self) -> GpuResult<()>) -> GpuResult<()> {
        if !self.graphs.contains_key(&key) {
            self.ctx.gpu.sync()?;
            self.ctx.gpu.begin_capture()?;
            let r = body(self);
            let graph = self.ctx.gpu.end_capture();
            r?;
            self.graphs.insert(key, graph?);
        }
        let g = self.graphs.get(&key).ok_or_else(|| GpuError::new("internal: graph"))?;
        self.ctx.gpu.replay(g)
    }

    /// The decode step of `batch` rows at the current position, captured into a graph of its own (not kept by the
    /// engine, and the position not advanced): `bench --kernels` times prefixes of it.
    pub(super) fn capture_step(&mut self, batch: usize) -> GpuResult<super::gpu::Graph> {
        self.ctx.gpu.bind()?;
        self.reserve(batch, batch, self.len + 1)?;
        self.ensure_logits(batch)?;
        self.ctx.gpu.upload(&self.state, 0, &[self.len as i32])?;
        self.ctx.gpu.sync()?;
        self.ctx.gpu.begin_capture()?;
        let body = self.step_body(batch);
        let graph = self.ctx.gpu.end_capture();
        body?;
        graph
    }

    fn step_body(&mut self, batch: usize) -> GpuResult<()> {
        self.forward(batch, 1)?;
        let fin = self.scratch.as_ref().map_or(0, |s| s.fin.ptr);
        let logits = self.head(fin, batch)?;
        self.argmax_rows(logits, batch, 0, 0, self.tok.ptr)
    }

    /// The argmax of each row's last real position (the captured step's own, or computed now).
    pub fn argmax(&mut self) -> GpuResult<Vec<u32>> {
        let last = self.last.clone().ok_or_else(|| GpuError::new("no forward has run since the last reset"))?;
        let mut out = vec![0i32; last.rows];
        if last.step_logits {
            self.ctx.gpu.download(self.tok.ptr, &mut out)?;
        } else {
            let logits = self.last_logits(&last)?;
            self.argmax_rows(logits, last.rows, 0, 0, self.small.ptr)?;
            self.ctx.gpu.download(self.small.ptr, &mut out)?;
        }
        Ok(out.into_iter().map(|v| v as u32).collect())
    }

    fn last_logits(&mut self, last: &Last) -> GpuResult<CUdeviceptr> {
        if last.step_logits {
            return Ok(self.logits.as_ref().map_or(0, |b| b.ptr));
        }
        let idx: Vec<i32> = last.lens.iter().enumerate().map(|(r, &n)| (r * last.seq + n.max(1) - 1) as i32).collect();
        self.ctx.gpu.upload(&self.small, 0, &idx)?;
        let fin = self.scratch.as_ref().map_or(0, |s| s.fin.ptr);
        let e = self.ctx.cfg.embed_dim;
        // Gather into the projection-input buffer (free after the forward), then the head.
        let tmp = self.scratch.as_ref().map_or(0, |s| s.h.ptr);
        let args = Args::new().ptr(fin).ptr(self.small.ptr).ptr(tmp).i32(e as i32);
        self.ctx.launch("gather_rows", (last.rows as u32, 1, 1), 256, args)?;
        self.head(tmp, last.rows)
    }

    /// Logits `[rows][V]` at each row's last real position.
    pub fn logits(&mut self) -> GpuResult<Vec<Vec<f32>>> {
        let last = self.last.clone().ok_or_else(|| GpuError::new("no forward has run since the last reset"))?;
        let p = self.last_logits(&last)?;
        let v = self.ctx.cfg.vocab_size;
        let mut flat = vec![0f32; last.rows * v];
        self.ctx.gpu.download(p, &mut flat)?;
        Ok(flat.chunks(v).map(|c| c.to_vec()).collect())
    }

    /// Logits `[positions][V]` of row 0 of the last forward.
    pub fn position_logits(&mut self) -> GpuResult<Vec<Vec<f32>>> {
        let last = self.last.clone().ok_or_else(|| GpuError::new("no forward has run since the last reset"))?;
        if last.step_logits {
            return Ok(self.logits()?.into_iter().take(1).collect());
        }
        let fin = self.scratch.as_ref().map_or(0, |s| s.fin.ptr);
        let p = self.head(fin, last.seq)?;
        let v = self.ctx.cfg.vocab_size;
        let mut flat = vec![0f32; last.seq * v];
        self.ctx.gpu.download(p, &mut flat)?;
        Ok(flat.chunks(v).map(<[f32]>::to_vec).collect())
    }

    /// (log-prob, argmax) of `targets[r][p]` at every position `p` of the last forward's row `r`.
    pub fn score(&mut self, targets: &[Vec<u32>]) -> GpuResult<Vec<Vec<(f32, u32)>>> {
        let last = self.last.clone().ok_or_else(|| GpuError::new("no forward has run since the last reset"))?;
        // A captured step's hidden rows are in `fin` too: scored like a prefill's.
        let rows = last.rows * last.seq;
        let fin = self.scratch.as_ref().map_or(0, |s| s.fin.ptr);
        let e = self.ctx.cfg.embed_dim;
        let mut tgt = vec![0i32; rows];
        for (r, t) in targets.iter().enumerate() {
            for (p, &id) in t.iter().enumerate() {
                tgt[r * last.seq + p] = id as i32;
            }
        }
        let mut lp = vec![0f32; rows];
        let mut am = vec![0i32; rows];
        // Chunks of rows whose logits fit a bounded buffer.
        let chunk = (256usize << 20) / (self.ctx.cfg.vocab_size * 4);
        let chunk = chunk.clamp(GEMV_MAX_ROWS, 4096);
        if self.score_bufs.is_none() || self.score_rows < rows {
            let n = rows.next_power_of_two().max(GEMV_MAX_ROWS);
            self.score_bufs = None;
            self.score_bufs = Some([self.ctx.gpu.alloc(n * 4)?, self.ctx.gpu.alloc(n * 4)?, self.ctx.gpu.alloc(n * 4)?]);
            self.score_rows = n;
        }
        let bufs = self.score_bufs.as_ref().ok_or_else(|| GpuError::new("internal: score buffers"))?;
        self.ctx.gpu.upload(&bufs[0], 0, &tgt)?;
        let [tbuf, lbuf, abuf] = [bufs[0].ptr, bufs[1].ptr, bufs[2].ptr];
        let mut r0 = 0;
        while r0 < rows {
            let n = (rows - r0).min(chunk);
            let logits = self.head(fin + (r0 * e * 2) as u64, n)?;
            self.argmax_rows(logits, n, tbuf + (r0 * 4) as u64, lbuf + (r0 * 4) as u64, abuf + (r0 * 4) as u64)?;
            r0 += n;
        }
        self.ctx.gpu.download(lbuf, &mut lp)?;
        self.ctx.gpu.download(abuf, &mut am)?;
        Ok(targets
            .iter()
            .enumerate()
            .map(|(r, t)| (0..t.len()).map(|p| (lp[r * last.seq + p], am[r * last.seq + p] as u32)).collect())
            .collect())
    }

    pub fn reset(&mut self) {
        self.len = 0;
        self.last = None;
    }

    pub fn truncate(&mut self, len: usize) -> GpuResult<()> {
        if len > self.len {
            return Err(GpuError(format!("cannot truncate a cache of {} positions to {len}", self.len)));
        }
        self.len = len;
        self.last = None;
        Ok(())
    }

    /// Repeat row 0 of the cache into rows 1..n.
    pub fn fork(&mut self, n: usize) -> GpuResult<()> {
        self.ctx.gpu.bind()?;
        self.reserve(n, GEMV_MAX_ROWS, self.len.max(1))?;
        let c = self.cache.as_ref().ok_or_else(|| GpuError::new("internal: no cache"))?;
        let row = self.ctx.cfg.kv_heads * c.cap * self.ctx.cfg.head_dim * 2;
        let prow = self.ctx.cfg.kv_heads * c.cap;
        for l in 0..self.ctx.cfg.layers {
            for r in 1..n {
                self.ctx.gpu.copy(c.k[l].ptr + (r * row) as u64, c.k[l].ptr, row)?;
                self.ctx.gpu.copy(c.v[l].ptr + (r * row) as u64, c.v[l].ptr, row)?;
                self.ctx.gpu.copy(c.present[l].ptr + (r * prow) as u64, c.present[l].ptr, prow)?;
            }
        }
        self.last = None;
        Ok(())
    }

    /// Upload random ids, for `bench`.
    pub fn put_tokens(&mut self, ids: &[i32]) -> GpuResult<()> {
        self.reserve(1, ids.len(), 1)?;
        self.ctx.gpu.upload(&self.tok, 0, ids)
    }
}
