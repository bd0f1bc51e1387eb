//! The transformer itself on the GPU: one forward over `batch` rows of `seq` tokens, dense or under the plan set,
//! launched directly (prefill) or into the graph being captured (the decode step).

use cudarc::driver::sys::CUdeviceptr;

use crate::config::Family;
use crate::launch::GEMV_SMEM;

use crate::cuda::gpu::{Args, GpuError, GpuResult};
use crate::cuda::gather::In;
use crate::cuda::sparse::{sparse_mlp, PredIn};
use crate::cuda::launcher::{Epi, NormIn, GEMV_MAX_ROWS};

use super::{Class, Engine, MAX_SPLITS};

impl Engine {
    /// Attention key splits for `rows` queries reaching `len` positions: enough (token, head, split) blocks to
    /// fill the GPU at decode, but at least `attn_keys` keys per split; 1 (no combine pass) for prefill and short
    /// contexts.
    pub(super) fn splits(&self, rows: usize, len: usize) -> usize {
        if rows > GEMV_MAX_ROWS {
            return 1;
        }
        let blocks = rows * self.ctx.cfg.heads;
        let occ = (2 * self.ctx.gpu.sms as usize).div_ceil(blocks);
        occ.min(len.div_ceil(self.attn_keys)).clamp(1, MAX_SPLITS)
    }

    /// Whether layer `l`'s attention output stays in f32 for the out-projection: a one-row step with every head
    /// (`f32_acts`; the out-projection stages it, so it must fit the staging memory).
    fn f32_att(&self, l: usize, rows: usize) -> bool {
        let k = self.ctx.cfg.heads * self.ctx.cfg.head_dim;
        self.f32_acts && rows == 1 && self.heads_at(l).is_none() && self.ctx.stage && k * 4 <= GEMV_SMEM && self.ctx.cfg.head_dim % 4 == 0
    }

    /// Whether the out-projection of a decode step over `rows` rows with `splits` key splits merges them itself.
    fn folds_combine(&self, rows: usize, splits: usize) -> bool {
        let k = self.ctx.cfg.heads * self.ctx.cfg.head_dim;
        self.comb_fold && splits > 1 && rows == 1 && self.ctx.stage && k * 4 <= GEMV_SMEM && self.ctx.cfg.head_dim % 4 == 0
    }

    /// The transformer over `batch` rows of `seq` tokens already in `tok`, after `state[0]` cached positions:
    /// appends to the cache and leaves the final hidden states (16-bit, `[rows, E]`) in `fin`.
    pub(super) fn forward(&mut self, batch: usize, seq: usize) -> GpuResult<()> {
        let rows = batch * seq;
        self.ctx.one_seq = batch == 1;
        let cfg = self.ctx.cfg.clone();
        let (d, e, f, hd) = (cfg.hidden, cfg.embed_dim, cfg.ffn, cfg.head_dim);
        let (h_, kv) = (cfg.heads, cfg.kv_heads);
        let qkv_n = (h_ + 2 * kv) * hd;
        let opt = cfg.family == Family::Opt;
        let pre = !opt || cfg.norm_before;
        let s = self.scratch.as_ref().ok_or_else(|| GpuError::new("internal: no scratch"))?;
        let (x, h, qkv, att, part, y, act, fin) = (s.x.ptr, s.h.ptr, s.qkv.ptr, s.att.ptr, s.part.ptr, s.y.ptr, s.act.ptr, s.fin.ptr);
        let (act32, att32) = (s.act32.ptr, s.att32.ptr);
        let cache = self.cache.as_ref().ok_or_else(|| GpuError::new("internal: no cache"))?;
        let cap = cache.cap;
        let kc: Vec<CUdeviceptr> = cache.k.iter().map(|b| b.ptr).collect();
        let vc: Vec<CUdeviceptr> = cache.v.iter().map(|b| b.ptr).collect();
        let pc: Vec<CUdeviceptr> = cache.present.iter().map(|b| b.ptr).collect();
        // Attention reads the presence flags only while a plan that skips key/value heads is set (dense passes of
        // such a plan too: an absent entry stays absent).
        let skips = self.heads.as_ref().is_some_and(|h| h.kv_kept);
        let (tok, state) = (self.tok.ptr, self.state.ptr);
        let emb_threads = (e.max(d).div_ceil(32) * 32).clamp(32, 1024) as u32;

        self.class(Class::Embed)?;
        let w = &self.ctx.w;
        if let Some(pin) = &w.project_in {
            let args = Args::new().ptr(tok).ptr(w.embed.ptr).ptr(0).ptr(0).ptr(h).ptr(state).i32(seq as i32).i32(e as i32).i32(2);
            self.ctx.launch(&self.ctx.kname("embed"), (rows as u32, 1, 1), emb_threads, args)?;
            self.ctx.linear(pin.ptr, None, h, x, rows, d, e, Epi::Store, y)?;
            if let Some(p) = &w.positions {
                let args = Args::new().ptr(x).ptr(p.ptr).ptr(state).i32(seq as i32).i32(d as i32).i32(2);
                self.ctx.launch(&self.ctx.kname("add_positions"), (rows as u32, 1, 1), emb_threads, args)?;
            }
        } else {
            let pos = w.positions.as_ref().map_or(0, |p| p.ptr);
            let args = Args::new().ptr(tok).ptr(w.embed.ptr).ptr(pos).ptr(x).ptr(0).ptr(state).i32(seq as i32).i32(d as i32).i32(2);
            self.ctx.launch(&self.ctx.kname("embed"), (rows as u32, 1, 1), emb_threads, args)?;
        }
        if let Some(sp) = self.sparse_active() {
            sp.zero(&self.ctx, rows)?;
        }
        let splits = self.splits(rows, self.len + seq);
        let scale = 1.0 / (hd as f32).sqrt();
        for l in 0..cfg.layers {
            if let Some(hs) = self.heads_on() {
                hs.join(&self.ctx)?;
            }
            // The look-ahead MLP selection forked before the norm, reading x itself (`MlpAhead::early`).
            let early_sel = match self.sparse_active() {
                Some(sp) if sp.forks_early(l, rows) => sp.fork_ahead(&self.ctx, l, x, rows)?,
                _ => false,
            };
            let lw = &self.ctx.w.layers[l];
            // Pre-norm layers normalise inside the projection; post-LN layers project x itself.
            let fused = pre && (self.fuse_norm || rows > GEMV_MAX_ROWS);
            let attn_in = fused.then(|| NormIn { x, g: lw.attn_norm.ptr, gb: lw.attn_norm_b.as_ref().map_or(0, |b| b.ptr), tmp: h });
            // The block input's copy, where the head look-ahead forks at this layer or the MLP predictor reads it
            // (then the heads' copy serves both); the norm writes it as it reads x.
            let mlp_block = self.sparse_active().filter(|sp| sp.reads_block(l)).and_then(|sp| sp.ahead.as_ref()).map(|a| a.snap[0].ptr);
            let heads_snap = self.heads_on().and_then(|hs| hs.snapshot(l));
            // Under `prev` predictors, the copy of x the next layer's MLP selection reads.
            let prev_own = self.sparse_active().and_then(|sp| sp.prev_copy(l, rows, heads_snap.is_some()));
            let snap = heads_snap.or(mlp_block).or(prev_own);
            let copied = pre && !fused;
            if !pre {
                self.class(Class::Norm)?;
                self.ctx.to_half(x, h, rows * d)?;
            } else if !fused {
                self.class(Class::Norm)?;
                let lw = &self.ctx.w.layers[l];
                self.ctx.norm_copy(&lw.attn_norm, lw.attn_norm_b.as_ref(), x, h, 0, snap.unwrap_or(0), rows)?;
            }
            self.class(Class::Qkv)?;
            if let Some(hs) = self.heads_on() {
                hs.select(&self.ctx, l, x, rows, copied)?;
            }
            // The MLP's own copy, where the norm did not write it (a `block` predictor reads the heads' copy instead
            // where there is one).
            let own = mlp_block.filter(|_| heads_snap.is_none()).or(prev_own);
            if let Some(own) = own.filter(|&own| !(copied && snap == Some(own))) {
                self.ctx.gpu.copy(own, x, rows * d * 4)?;
            }
            // The look-ahead MLP selection from the block input, on the side stream beside the attention.
            let pred_in = match (self.sparse_active(), mlp_block.and(snap)) {
                _ if early_sel => PredIn { x, selected: true },
                (Some(sp), Some(src)) => PredIn { x: src, selected: sp.fork_ahead(&self.ctx, l, src, rows)? },
                // `prev` predictors: the next layer's selection forked from this layer's copy.
                (Some(sp), None) => PredIn { x: sp.prev_src(l).unwrap_or(x), selected: sp.fork_prev(&self.ctx, l, heads_snap.or(prev_own), rows)? },
                _ => PredIn { x, selected: false },
            };
            if let Some(hs) = self.heads_at(l) {
                let input = |r0: usize| match attn_in {
                    Some(m) => In::Norm(NormIn { x: m.x + (r0 * d * 4) as u64, ..m }),
                    None => In::Half(h + (r0 * d * 2) as u64),
                };
                hs.qkv(&self.ctx, l, rows, input, qkv)?;
            } else {
                let lw = &self.ctx.w.layers[l];
                self.ctx.linear_in(lw.qkv.ptr, lw.qkv_b.as_ref().map(|b| b.ptr), h, attn_in, qkv, rows, qkv_n, d, Epi::Store, y)?;
            }
            self.class(Class::Attention)?;
            let rope = i32::from(cfg.family == Family::Llama);
            let rope_hkeep = self.heads_at(l).filter(|hs| hs.kv_kept).map_or(0, |hs| hs.keep_of(&self.ctx, l));
            // Decode (one token a row): RoPE and the cache write inside the attention kernel (`rope_fuse`).
            let fold = self.rope_fuse && seq == 1 && rows <= GEMV_MAX_ROWS;
            let a32 = self.f32_att(l, rows);
            if !fold {
                let args = Args::new()
                    .ptr(qkv)
                    .ptr(kc[l])
                    .ptr(vc[l])
                    .ptr(state)
                    .i32(seq as i32)
                    .i32(h_ as i32)
                    .i32(kv as i32)
                    .i32(hd as i32)
                    .i32(cap as i32)
                    .f32(cfg.rope_theta as f32)
                    .i32(rope)
                    .ptr(rope_hkeep)
                    .ptr(pc[l]);
                let rope_threads = ((hd / 2).div_ceil(32) * 32).clamp(32, 128) as u32;
                self.ctx.launch(&self.ctx.kname("rope_kv"), (rows as u32, (h_ + kv) as u32, 1), rope_threads, args)?;
            }
            let args = Args::new()
                .ptr(qkv)
                .ptr(kc[l])
                .ptr(vc[l])
                .ptr(part)
                .ptr(state)
                .i32(seq as i32)
                .i32(h_ as i32)
                .i32(kv as i32)
                .i32(hd as i32)
                .i32(cap as i32)
                .i32(splits as i32)
                .f32(scale)
                .ptr(if splits == 1 && !a32 { att } else { 0 })
                .ptr(self.heads_at(l).map_or(0, |hs| hs.keep_of(&self.ctx, l)))
                .ptr(if skips { pc[l] } else { 0 });
            // The out-projection after the attention writes x: an early predictor must have read it.
            if let Some(sp) = self.sparse_active() {
                sp.wait_read(&self.ctx)?;
            }
            if fold {
                let args = args.f32(cfg.rope_theta as f32).i32(rope).ptr(rope_hkeep).ptr(pc[l]);
                self.ctx.launch(&format!("attn_split_rope_{}_h{hd}", self.ctx.dt().name()), ((rows * h_) as u32, splits as u32, 1), 128, args)?;
            } else {
                self.ctx.launch(&format!("attn_split_{}_h{hd}", self.ctx.dt().name()), ((rows * h_) as u32, splits as u32, 1), 128, args)?;
            }
            // With the output kept in f32 and one split, the partial goes straight to the out-projection, which
            // normalises it as it stages it.
            let fold_comb = self.heads_at(l).is_none() && (self.folds_combine(rows, splits) || (a32 && splits == 1));
            if splits > 1 && !fold_comb {
                let args = Args::new().ptr(part).ptr(if a32 { att32 } else { att }).i32(hd as i32).i32(splits as i32).i32(i32::from(a32));
                self.ctx.launch(&self.ctx.kname("attn_combine"), ((rows * h_) as u32, 1, 1), hd as u32, args)?;
            }
            self.class(Class::OutProj)?;
            if let Some(hs) = self.heads_at(l) {
                hs.out_proj(&self.ctx, l, rows, att, x)?;
            } else if fold_comb {
                let lw = &self.ctx.w.layers[l];
                self.ctx.gemv_comb(lw.o.ptr, lw.o_b.as_ref().map(|b| b.ptr), part, x, d, h_ * hd, splits, hd, !a32)?;
            } else if a32 {
                let lw = &self.ctx.w.layers[l];
                self.ctx.linear_in(lw.o.ptr, lw.o_b.as_ref().map(|b| b.ptr), 0, Some(NormIn::raw(att32)), x, rows, d, h_ * hd, Epi::Acc, y)?;
            } else {
                let lw = &self.ctx.w.layers[l];
                self.ctx.linear(lw.o.ptr, lw.o_b.as_ref().map(|b| b.ptr), att, x, rows, d, h_ * hd, Epi::Acc, y)?;
            }
            let lw = &self.ctx.w.layers[l];
            let mlp_in = fused.then(|| NormIn { x, g: lw.mlp_norm.ptr, gb: lw.mlp_norm_b.as_ref().map_or(0, |b| b.ptr), tmp: h });
            if pre && !fused {
                self.class(Class::Norm)?;
                let lw = &self.ctx.w.layers[l];
                self.ctx.norm(&lw.mlp_norm, lw.mlp_norm_b.as_ref(), x, h, 0, rows)?;
            }
            if !pre {
                // Post-LN: x = LN(x + attn), and the MLP reads it.
                self.class(Class::Norm)?;
                let lw = &self.ctx.w.layers[l];
                self.ctx.norm(&lw.attn_norm, lw.attn_norm_b.as_ref(), x, h, x, rows)?;
            }
            self.class(Class::Mlp)?;
            // The MLP waits for its look-ahead selection only (a mark of the side stream's work up to it), so the
            // head look-ahead forked next is not waited for here.
            if let Some(sp) = self.sparse_active() {
                sp.join_ahead(&self.ctx, l)?;
            }
            if let Some(hs) = self.heads_on() {
                hs.fork_next(&self.ctx, l, rows)?;
            }
            if let Some((sp, rule)) = self.sparse_active().and_then(|sp| sp.rules[l].map(|r| (sp, r))) {
                let input = |r0: usize| match mlp_in {
                    Some(m) => In::Norm(NormIn { x: m.x + (r0 * d * 4) as u64, ..m }),
                    None => In::Half(h + (r0 * d * 2) as u64),
                };
                sparse_mlp(&self.ctx, sp, l, rule, rows, input, x, pred_in, y, act)?;
            } else {
                let lw = &self.ctx.w.layers[l];
                if rows == 1 && mlp_in.is_none() && !self.ctx.down_t.is_empty() {
                    // One row, one launch: each neuron's activation goes straight into its down row's products.
                    let glu = !opt;
                    self.ctx.mlp_fused(lw.up.ptr, lw.up_b.as_ref().map(|b| b.ptr), self.ctx.down_t[l].ptr, lw.down_b.as_ref().map(|b| b.ptr), h, x, f, d, d, glu, self.ctx.mlpf_warps)?;
                } else if self.f32_acts && rows == 1 {
                    // One row: the hidden stays in f32 between the two products.
                    let epi = if opt { Epi::Relu32 } else { Epi::Glu32 };
                    self.ctx.linear_in(lw.up.ptr, lw.up_b.as_ref().map(|b| b.ptr), h, mlp_in, act32, rows, f, d, epi, y)?;
                    self.ctx.linear_in(lw.down.ptr, lw.down_b.as_ref().map(|b| b.ptr), 0, Some(NormIn::raw(act32)), x, rows, d, f, Epi::Acc, y)?;
                } else {
                    let epi = if opt { Epi::Relu } else { Epi::Glu };
                    self.ctx.linear_in(lw.up.ptr, lw.up_b.as_ref().map(|b| b.ptr), h, mlp_in, act, rows, f, d, epi, y)?;
                    self.ctx.linear(lw.down.ptr, lw.down_b.as_ref().map(|b| b.ptr), act, x, rows, d, f, Epi::Acc, y)?;
                }
            }
            if !pre {
                self.class(Class::Norm)?;
                let lw = &self.ctx.w.layers[l];
                self.ctx.norm(&lw.mlp_norm, lw.mlp_norm_b.as_ref(), x, h, x, rows)?;
            }
        }
        if let Some(hs) = self.heads_on() {
            hs.join(&self.ctx)?; // nothing is pending after the last layer; kept for the capture's sake
        }
        self.class(Class::Norm)?;
        let w = &self.ctx.w;
        let hidden = match &w.final_norm {
            Some(fw) => {
                self.ctx.norm(fw, w.final_norm_b.as_ref(), x, h, 0, rows)?;
                h
            }
            None if pre => {
                self.ctx.to_half(x, h, rows * d)?;
                h
            }
            // Post-LN without a final norm: h already holds the last layer's normed output.
            None => h,
        };
        match &w.project_out {
            Some(po) => {
                self.ctx.linear(po.ptr, None, hidden, y, rows, e, d, Epi::Store, 0)?;
                self.ctx.to_half(y, fin, rows * e)?;
            }
            None => self.ctx.gpu.copy(fin, hidden, rows * e * 2)?,
        }
        Ok(())
    }
}
