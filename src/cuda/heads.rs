//! Head-sparse attention on the GPU (predicted heads): per layer, the look-ahead predictor scores the heads from the
//! previous layer's block input (layer 0: its own), each token keeps its top k, and for each chunk of up to 16
//! tokens the union of their heads is what is read: the q rows of those heads and the k/v rows (`--head-kv all`:
//! every one, so the cache stays what dense decoding writes; `kept`: those of the union's key/value heads, each
//! token marking present in the cache only its own), attention for each token's own heads only (a dropped head's
//! output is 0; under `kept`, absent earlier entries are skipped), and the kept heads' columns of the
//! out-projection from its transposed copy. The CPU reference computes the same function (`src/model/mod.rs`).
//!
//! Look-ahead (default): layer l + 1's whole selection (scores, top k, head and row lists) runs on the side stream
//! during layer l's MLP, from a copy of layer l's block input (made by layer l's norm), into the other of two sets
//! of selection buffers (by layer parity), and is joined back at layer l + 1's start. It so overlaps the MLP's
//! predictor and single-block top-k, which leave most multiprocessors idle (forked at layer l's start, beside the
//! q/k/v projection, it waited for the projection's blocks, which fill every multiprocessor, and lay on the critical
//! path). `DEJAVU_LOOKAHEAD=0`: in line at layer l + 1, from the same copy. Under the MLP look-ahead (block-input
//! neuron predictors, [`super::sparse::MlpAhead`]) the MLP's selection has left the main stream too; forking the
//! head selection at the layer's start instead, behind it on the side stream, measured the same (fourteenth
//! session, H100, OPT-13B 4.07-4.09 against 4.05-4.07 ms), so it stays at the MLP.

use cudarc::driver::sys::CUdeviceptr;

use super::launcher::Launcher;
use super::gpu::{Args, DBuf, Event, GpuError, GpuResult};
use super::predict::GpuPredictor;
use super::select::{topk_compact, topk_mark, Scores};
use super::gather::{chunks, down_t, gather_store, transpose, In, Kept, CHUNK, MAX_CHUNKS};

/// The head-sparse state of a plan: per layer the kept count (None: dense attention), its predictor and the
/// transposed out-projection; the previous block input; per chunk the kept heads and their row lists.
pub struct SparseHeads {
    pub k: Vec<Option<usize>>,
    /// `--head-kv kept`: a token computes (and marks present in the cache) only the key/value heads of its kept
    /// heads; attention skips absent entries.
    pub kv_kept: bool,
    pred: Vec<Option<GpuPredictor>>,
    o_t: Vec<Option<DBuf>>,
    /// Layer l + 1's selection runs at layer l on the side stream (module docs); `DEJAVU_LOOKAHEAD=0`: in line.
    lookahead: bool,
    fork_ev: Event,
    join_ev: Event,
    /// The look-ahead selection forked and not yet joined.
    pending: std::cell::Cell<bool>,
    /// f32 `[MAX_CHUNKS * CHUNK, d]`: a copy of a layer's block input (look-ahead: for the selection forked at its
    /// MLP; in line: for the next layer's selection).
    prev: DBuf,
    /// f32 `[MAX_CHUNKS * CHUNK, H]` scores, predictor scratch.
    scores: DBuf,
    tmp: DBuf,
    /// The selection's outputs, one set per layer parity under look-ahead (else one): u8 `[MAX_CHUNKS * CHUNK, H]`
    /// each token's own heads (1 kept, read by the attention kernel); per chunk the kept head ids `[H]`, q/k/v rows
    /// `[(H + 2 KV) hd]`, out-projection rows `[H hd]` and their three counts.
    keep: DBuf,
    heads: DBuf,
    qkv_rows: DBuf,
    o_rows: DBuf,
    counts: DBuf,
}

impl SparseHeads {
    /// State for `k` (one entry per layer) with the layers' head predictors `preds` (needed where `k` is Some).
    /// The transposed out-projections are made here, once.
    pub fn new(e: &Launcher, k: Vec<Option<usize>>, kv_kept: bool, mut preds: Vec<Option<GpuPredictor>>) -> GpuResult<Self> {
        let c = &e.cfg;
        let (d, h, hd) = (c.hidden, c.heads, c.head_dim);
        let qkv_n = (h + 2 * c.kv_heads) * hd;
        if h > 256 {
            return Err(GpuError(format!("head-sparse attention handles at most 256 heads a layer, the model has {h}")));
        }
        let mut pred = Vec::with_capacity(k.len());
        let mut o_t = Vec::with_capacity(k.len());
        let mut scratch = 4;
        for (l, kl) in k.iter().enumerate() {
            match kl {
                Some(_) => {
                    let p = preds.get_mut(l).and_then(Option::take).ok_or_else(|| GpuError(format!("layer {l}: head sparsity needs the head predictors (--predictors)")))?;
                    if p.n != h {
                        return Err(GpuError(format!("layer {l}: a head predictor of {} outputs, the model has {h} heads", p.n)));
                    }
                    scratch = scratch.max(p.scratch_bytes(CHUNK));
                    pred.push(Some(p));
                    let t = e.gpu.alloc(d * h * hd * 2)?;
                    transpose(e, e.w.layers[l].o.ptr, t.ptr, d, h * hd)?;
                    o_t.push(Some(t));
                }
                None => {
                    pred.push(None);
                    o_t.push(None);
                }
            }
        }
        let rows = MAX_CHUNKS * CHUNK;
        let lookahead = std::env::var("DEJAVU_LOOKAHEAD").map_or(true, |v| v != "0");
        let sets = if lookahead { 2 } else { 1 };
        let s = SparseHeads {
            k,
            kv_kept,
            pred,
            o_t,
            lookahead,
            fork_ev: e.gpu.sync_event()?,
            join_ev: e.gpu.sync_event()?,
            pending: std::cell::Cell::new(false),
            prev: e.gpu.alloc(rows * d * 4)?,
            scores: e.gpu.alloc(rows * h * 4)?,
            tmp: e.gpu.alloc(scratch)?,
            keep: e.gpu.alloc(sets * rows * h)?,
            heads: e.gpu.alloc(sets * MAX_CHUNKS * h * 4)?,
            qkv_rows: e.gpu.alloc(sets * MAX_CHUNKS * qkv_n * 4)?,
            o_rows: e.gpu.alloc(sets * MAX_CHUNKS * h * hd * 4)?,
            counts: e.gpu.alloc(sets * MAX_CHUNKS * 3 * 4)?,
        };
        e.gpu.sync()?;
        Ok(s)
    }

    /// The selection buffer set layer `l` uses.
    fn set_of(&self, l: usize) -> usize {
        if self.lookahead {
            l % 2
        } else {
            0
        }
    }

    /// Layer `l`'s per-token head flags, u8 `[rows, H]` (1 kept): read by the attention kernels.
    pub fn keep_of(&self, e: &Launcher, l: usize) -> CUdeviceptr {
        self.keep.ptr + (self.set_of(l) * MAX_CHUNKS * CHUNK * e.cfg.heads) as u64
    }

    /// Layer `l`'s lists of chunk `c`: kept head ids, q/k/v rows, out-projection rows (`early` where they were made
    /// at the layer before).
    fn lists(&self, e: &Launcher, c: usize, l: usize) -> (Kept, Kept, Kept) {
        let (h, hd) = (e.cfg.heads, e.cfg.head_dim);
        let qkv_n = (h + 2 * e.cfg.kv_heads) * hd;
        let c = self.set_of(l) * MAX_CHUNKS + c;
        // Under look-ahead, layer l > 0's lists were made during layer l - 1's MLP and joined at layer l's start.
        let early = self.lookahead && l > 0;
        let cnt = |i: usize| self.counts.ptr + ((c * 3 + i) * 4) as u64;
        (
            Kept { idx: self.heads.ptr + (c * h * 4) as u64, cnt: cnt(0), cap: h, early },
            Kept { idx: self.qkv_rows.ptr + (c * qkv_n * 4) as u64, cnt: cnt(1), cap: qkv_n, early },
            Kept { idx: self.o_rows.ptr + (c * h * hd * 4) as u64, cnt: cnt(2), cap: h * hd, early },
        )
    }

    /// Whether layer `l` forks the look-ahead selection of layer `l + 1` (and so must [`SparseHeads::join`]).
    fn forks(&self, l: usize) -> bool {
        self.lookahead && self.k.get(l + 1).is_some_and(Option::is_some)
    }

    /// Layer `l`'s whole selection from the block input `src` (f32 `[rows, d]`) into its buffer set: the head
    /// predictor's scores, each token's top k into the flags, and per chunk the union's head ids and row lists.
    fn select_from(&self, e: &Launcher, l: usize, src: CUdeviceptr, rows: usize) -> GpuResult<()> {
        let (Some(k), Some(p)) = (self.k[l], self.pred[l].as_ref()) else {
            return Ok(());
        };
        let (d, h, hd, kv) = (e.cfg.hidden, e.cfg.heads, e.cfg.head_dim, e.cfg.kv_heads);
        let f = e.k.get("expand_heads")?;
        for (c, r0, nb) in chunks(rows, "head-sparse attention")? {
            let scores = self.scores.ptr + (r0 * h * 4) as u64;
            p.scores(e, src + (r0 * d * 4) as u64, nb, self.tmp.ptr, scores)?;
            let keep = self.keep_of(e, l) + (r0 * h) as u64;
            let (heads, qkv, o) = self.lists(e, c, l);
            if nb == 1 {
                // One token: the mark kernel writes the kept head ids itself.
                topk_mark(e, Scores::F32(scores), nb, h, k, keep, Some((heads, None)))?;
            } else {
                topk_mark(e, Scores::F32(scores), nb, h, k, keep, None)?;
                topk_compact(e, keep, nb, h, heads, None, None)?;
            }
            let mut args = Args::new()
                .ptr(heads.idx)
                .ptr(heads.cnt)
                .i32(h as i32)
                .i32(kv as i32)
                .i32(hd as i32)
                .i32(i32::from(self.kv_kept))
                .ptr(qkv.idx)
                .ptr(qkv.cnt)
                .ptr(o.idx)
                .ptr(o.cnt);
            e.gpu.launch(f, (1, 1, 1), 256, 0, &mut args)?;
        }
        Ok(())
    }

    /// The block input `l`'s norm copies `x` to (f32 `[rows, d]`), where layer `l` forks the look-ahead selection
    /// ([`SparseHeads::fork_next`] reads it); None where it does not (then [`SparseHeads::select`] copies it).
    pub fn snapshot(&self, l: usize) -> Option<CUdeviceptr> {
        (self.lookahead && self.forks(l)).then_some(self.prev.ptr)
    }

    /// The head selection at the start of layer `l` for `rows` tokens; `x` is the f32 residual entering the layer,
    /// `[rows, d]`, already copied to [`SparseHeads::snapshot`] where `copied`. Look-ahead: layer 0 selects in line
    /// from `x`; where the layer forks, `x` is kept (copied here unless `copied`) for [`SparseHeads::fork_next`]. In
    /// line: layer `l` selects from the previous layer's input (layer 0: `x`), and `x` is copied for the next layer.
    pub fn select(&self, e: &Launcher, l: usize, x: CUdeviceptr, rows: usize, copied: bool) -> GpuResult<()> {
        if self.lookahead {
            if l == 0 {
                self.select_from(e, 0, x, rows)?;
            }
            if self.forks(l) && !copied {
                e.gpu.copy(self.prev.ptr, x, rows * e.cfg.hidden * 4)?;
            }
            return Ok(());
        }
        self.select_from(e, l, if l == 0 { x } else { self.prev.ptr }, rows)?;
        e.gpu.copy(self.prev.ptr, x, rows * e.cfg.hidden * 4)
    }

    /// Look-ahead, at the start of layer `l`'s MLP: layer `l + 1`'s selection from layer `l`'s block input (the
    /// snapshot) forked onto the side stream, where it runs beside the MLP (whose single-block top-k leaves the
    /// multiprocessors idle); [`SparseHeads::join`]ed at the start of layer `l + 1`.
    pub fn fork_next(&self, e: &Launcher, l: usize, rows: usize) -> GpuResult<()> {
        if !(self.lookahead && self.forks(l)) {
            return Ok(());
        }
        e.gpu.fork(&self.fork_ev)?;
        self.pending.set(true);
        e.gpu.on_side(|| self.select_from(e, l + 1, self.prev.ptr, rows))
    }

    /// At the start of a layer (before its norm writes the snapshot and its q/k/v projection reads the lists): the
    /// main stream waits for the look-ahead selection forked at the layer before (nothing where none is pending).
    pub fn join(&self, e: &Launcher) -> GpuResult<()> {
        if self.pending.replace(false) {
            e.gpu.join(&self.join_ev)?;
        }
        Ok(())
    }

    /// The q/k/v projection of the kept heads' q rows and every k/v row, written at their own columns of `qkv`
    /// (f32 `[rows, (H + 2 KV) hd]`; the dropped heads' q columns are left as they were). `input(r0)` is the
    /// attention input of the chunk starting at row `r0`.
    pub fn qkv(&self, e: &Launcher, l: usize, rows: usize, input: impl Fn(usize) -> In, qkv: CUdeviceptr) -> GpuResult<()> {
        let (d, h, hd, kv) = (e.cfg.hidden, e.cfg.heads, e.cfg.head_dim, e.cfg.kv_heads);
        let qkv_n = (h + 2 * kv) * hd;
        let lw = &e.w.layers[l];
        for (c, r0, nb) in chunks(rows, "head-sparse attention")? {
            let (_, rows_c, _) = self.lists(e, c, l);
            gather_store(e, lw.qkv.ptr, lw.qkv_b.as_ref().map(|b| b.ptr), input(r0), rows_c, qkv + (r0 * qkv_n * 4) as u64, nb, d)?;
        }
        Ok(())
    }

    /// The out-projection over the kept heads' columns, accumulated into the residual `x` (f32 `[rows, d]`):
    /// `att` 16-bit `[rows, H hd]` (dropped heads' outputs are 0 for their own tokens).
    pub fn out_proj(&self, e: &Launcher, l: usize, rows: usize, att: CUdeviceptr, x: CUdeviceptr) -> GpuResult<()> {
        let (d, h, hd) = (e.cfg.hidden, e.cfg.heads, e.cfg.head_dim);
        let ot = self.o_t[l].as_ref().ok_or_else(|| GpuError::new("internal: no transposed out-projection for a head-sparse layer"))?;
        let ob = e.w.layers[l].o_b.as_ref().map(|b| b.ptr);
        for (c, r0, nb) in chunks(rows, "head-sparse attention")? {
            let (_, _, o) = self.lists(e, c, l);
            down_t(e, ot.ptr, ob, att + (r0 * h * hd * 2) as u64, h * hd, Some(o), h * hd, x + (r0 * d * 4) as u64, nb, d, true)?;
        }
        Ok(())
    }
}

