//! The sparse MLP on the GPU: a plan's per-layer MLP rules ([`GpuMlp`]: CATS thresholds, the SwiGLU top-k rules,
//! the trained predictors' top-k), what they read ([`SparseParts`]), the state of the forward under them
//! ([`SparseMlp`]: kept sets, counters, the look-ahead selection of [`MlpAhead`]) and one layer's sparse MLP
//! ([`sparse_mlp`]): select the kept neurons, then read only their weights (the launches of [`super::gather`]).

use cudarc::driver::sys::CUdeviceptr;

use crate::config::Family;
use crate::predictor::NeuronInput;

use super::gather::{cats_select, chunks, down_t, gather_mul, gather_up, transpose, In, Kept, CHUNK, MAX_CHUNKS};
use super::gpu::{DBuf, Event, GpuError, GpuResult};
use super::launcher::{Epi, Launcher};
use super::predict::GpuPredictor;
use super::select::{qscore, topk_select, QCopy, Scores};

/// i32 tallies per (chunk, layer): 16 rows x 8 spread counters.
const TALLY: usize = CHUNK * 8;

/// A layer's MLP rule on the GPU.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum GpuMlp {
    /// CATS: the neurons with `|silu(gate)| >= t` (OPT: `relu(fc1) >= t`).
    Cats(f32),
    /// Dense gate/up, then the top `k` hidden values by magnitude through down (SwiGLU).
    ExactDown(usize),
    /// The top `k` of the int4 score copies' |silu(ĝ)·û|, then exact gate/up/down for those (SwiGLU).
    QScore(usize),
    /// The top `k` of the trained low-rank predictor's scores of the residual, then exact gate/up (fc1) and down
    /// (fc2) for those (Deja Vu; OPT and SwiGLU).
    Predicted(usize),
}

/// What the sparse layers read besides the model: per layer the `qscore` score copies (with the bits they read
/// per weight) and the predictors of the `Predicted` layers.
#[derive(Default)]
pub struct SparseParts {
    pub q: Vec<Option<QCopy>>,
    pub score_bits: f64,
    pub pred: Vec<Option<GpuPredictor>>,
    /// What the predictors read: the MLP input, or a block input ([`MlpAhead`]).
    pub neuron_input: crate::predictor::NeuronInput,
}

/// The engine's sparse MLP state for a plan: per layer its rule (None: dense), the transposed down copies of the
/// sparse layers, the score copies of the `qscore` layers, the kept ids, per (chunk, layer) the kept-set counter
/// and the per-row kept tallies (CATS, for the statistics), and the top-k rules' scratch.
pub struct SparseMlp {
    pub rules: Vec<Option<GpuMlp>>,
    /// Heads kept per token in each layer (None: every head), for the statistics.
    pub heads_k: Vec<Option<usize>>,
    /// Transposed down copies `[F, D]` of the sparse layers, made here unless the engine holds them already
    /// (the fused dense MLP's; see [`SparseMlp::wt`]).
    pub down_t: Vec<Option<DBuf>>,
    pub parts: SparseParts,
    pub idx: DBuf,
    pub counters: DBuf,
    pub tallies: DBuf,
    /// Top-k scratch over one chunk: scores f32 `[CHUNK, 2F]` (also the dense gate/up's scratch), keep flags u8,
    /// row flags f32 and hidden values 16-bit, `[CHUNK, F]`.
    topk: Option<[DBuf; 4]>,
    /// Neuron predictors that read the block input ([`MlpAhead`]); None where they read the MLP input.
    pub ahead: Option<MlpAhead>,
}

/// The look-ahead MLP selection (neuron predictors trained on the block input, `train-predictors --neuron-input
/// block`, Deja Vu's asynchronous predictor): layer l's kept set depends only on the residual entering layer l, so
/// for a chunk of up to [`CHUNK`] rows (decode) the predictor and the top-k run on the side stream from the start of
/// the layer (before its norm, see [`MlpAhead::early`]), beside its attention, and the main stream waits for them
/// just before the MLP's first gather. Longer forwards (prefill) select in line at the MLP from the norm's copy of
/// the block input (the same function). `DEJAVU_MLP_AHEAD=0` selects in line at every width (for side-by-side
/// timing).
pub struct MlpAhead {
    /// What the predictors read: the layer's own block input, or the previous layer's ([`NeuronInput::Prev`]:
    /// layer l + 1's selection is forked after layer l's norm, from its copy, a layer before its MLP needs it).
    input: NeuronInput,
    side: bool,
    /// Fork before the layer's norm (default), the predictor reading the residual `x` itself, so the side chain is
    /// on the multiprocessors before the q/k/v gather's blocks fill them; the main stream waits for the predictor's
    /// scores (the last read of `x`) before the attention, ahead of the out-projection that writes `x`. Measured on
    /// an H100 (fourteenth session, OPT-13B, side by side): 4.01 -> 3.83 ms at batch 1, 7.94 -> 7.04 at batch 4
    /// against the fork after the norm (`DEJAVU_MLP_FORK=norm`), which reads the norm's copy of `x`.
    pub early: bool,
    read_ev: Event,
    /// The early fork's read of `x` marked and not yet waited for.
    read_pending: std::cell::Cell<bool>,
    fork_ev: Event,
    /// Per layer: marked on the side stream after the layer's selection.
    join_ev: Vec<Event>,
    /// Per layer: the side selection forked and not yet joined.
    pending: Vec<std::cell::Cell<bool>>,
    /// f32 `[MAX_CHUNKS * CHUNK, d]` each: the block inputs an in-line selection reads (one: the current layer's,
    /// where the head look-ahead keeps no copy; two under `prev`: layer l's in `snap[l % 2]`).
    pub snap: Vec<DBuf>,
}

impl SparseMlp {
    /// Layer `l`'s transposed down projection: the engine's copy (the fused dense MLP's) or this plan's own.
    pub fn wt(&self, e: &Launcher, l: usize) -> GpuResult<CUdeviceptr> {
        match (e.down_t.get(l), self.down_t.get(l).and_then(|b| b.as_ref())) {
            (Some(b), _) | (None, Some(b)) => Ok(b.ptr),
            (None, None) => Err(GpuError::new("internal: no transposed down for a sparse layer")),
        }
    }

    /// State for `rules` (one entry per layer): the transposed down copies are made here, once. `parts` holds
    /// the score copies and predictors the rules read (one entry per layer).
    pub fn new(e: &Launcher, rules: Vec<Option<GpuMlp>>, mut parts: SparseParts) -> GpuResult<Self> {
        let (d, f) = (e.cfg.hidden, e.cfg.ffn);
        if d % 8 != 0 {
            return Err(GpuError(format!("the sparse MLP on the GPU needs a hidden size that is a multiple of 8 (got {d})")));
        }
        let topk = rules.iter().flatten().any(|r| !matches!(r, GpuMlp::Cats(_)));
        if rules.iter().flatten().any(|r| matches!(r, GpuMlp::ExactDown(_) | GpuMlp::QScore(_))) && e.cfg.family != Family::Llama {
            return Err(GpuError::new("the exactdown and qscore rules apply to SwiGLU MLPs (the Llama family)"));
        }
        parts.q.resize_with(rules.len(), || None);
        parts.pred.resize_with(rules.len(), || None);
        let mut down_t = Vec::with_capacity(rules.len());
        let mut pred_scratch = 0;
        for (l, r) in rules.iter().enumerate() {
            if matches!(r, Some(GpuMlp::QScore(_))) && parts.q[l].is_none() {
                return Err(GpuError(format!("layer {l}: the qscore rule needs the score copies (--qscore)")));
            }
            if matches!(r, Some(GpuMlp::Predicted(_))) {
                let p = parts.pred[l].as_ref().ok_or_else(|| GpuError(format!("layer {l}: the predicted rule needs the predictors (--predictors)")))?;
                if p.n != f {
                    return Err(GpuError(format!("layer {l}: a predictor of {} neurons, the MLP has {f}", p.n)));
                }
                pred_scratch = pred_scratch.max(p.scratch_bytes(CHUNK));
            }
            down_t.push(match r {
                // The fused dense MLP's copies serve (`SparseMlp::wt`).
                Some(_) if !e.down_t.is_empty() => None,
                Some(_) => {
                    let b = e.gpu.alloc(f * d * 2)?;
                    transpose(e, e.w.layers[l].down.ptr, b.ptr, d, f)?;
                    Some(b)
                }
                None => None,
            });
        }
        // Kept ids and row flags in two copies, by layer parity: under `prev` layer l + 1's selection is written on
        // the side stream while layer l's MLP reads its own.
        let idx = e.gpu.alloc(2 * f * 4)?;
        let counters = e.gpu.alloc(MAX_CHUNKS * rules.len() * 4)?;
        let tallies = e.gpu.alloc(MAX_CHUNKS * rules.len() * TALLY * 4)?;
        let topk = if topk {
            Some([e.gpu.alloc(CHUNK * 2 * f * 4)?, e.gpu.alloc(CHUNK * f)?, e.gpu.alloc(2 * CHUNK * f * 4)?, e.gpu.alloc((CHUNK * f * 2).max(pred_scratch))?])
        } else {
            None
        };
        e.gpu.sync()?;
        let heads_k = vec![None; rules.len()];
        let ahead = if parts.neuron_input != NeuronInput::Mlp && rules.iter().any(|r| matches!(r, Some(GpuMlp::Predicted(_)))) {
            let snaps = if parts.neuron_input == NeuronInput::Prev { 2 } else { 1 };
            Some(MlpAhead {
                input: parts.neuron_input,
                side: std::env::var("DEJAVU_MLP_AHEAD").map_or(true, |v| v != "0"),
                early: std::env::var("DEJAVU_MLP_FORK").map_or(true, |v| v != "norm"),
                read_ev: e.gpu.sync_event()?,
                read_pending: std::cell::Cell::new(false),
                fork_ev: e.gpu.sync_event()?,
                join_ev: (0..rules.len()).map(|_| e.gpu.sync_event()).collect::<GpuResult<_>>()?,
                pending: (0..rules.len()).map(|_| std::cell::Cell::new(false)).collect(),
                snap: (0..snaps).map(|_| e.gpu.alloc(MAX_CHUNKS * CHUNK * d * 4)).collect::<GpuResult<_>>()?,
            })
        } else {
            None
        };
        Ok(SparseMlp { rules, heads_k, down_t, parts, idx, counters, tallies, topk, ahead })
    }

    /// Whether layer `l`'s neuron predictor reads the layer's own block input (so its input must be kept before
    /// the attention changes the residual).
    pub fn reads_block(&self, l: usize) -> bool {
        self.ahead.as_ref().is_some_and(|a| a.input == NeuronInput::Block) && self.predicted(l)
    }

    fn predicted(&self, l: usize) -> bool {
        matches!(self.rules.get(l), Some(Some(GpuMlp::Predicted(_))))
    }

    /// Under `prev` predictors: whether a forward of `rows` rows selects ahead on the side stream (else in line at
    /// each MLP, from the copies [`SparseMlp::prev_copy`] names).
    fn prev_side(&self, rows: usize) -> Option<&MlpAhead> {
        self.ahead.as_ref().filter(|a| a.input == NeuronInput::Prev && a.side && rows <= CHUNK)
    }

    /// Under `prev` predictors, after layer `l`'s norm, with `copy` a copy of its block input (f32 `[rows, d]`) that
    /// stays unchanged until the side stream is next joined whole or layer l + 1's MLP: for one chunk, the
    /// selections that read it forked onto the side stream (layer l + 1's, and at layer 0 its own), each joined
    /// at its MLP ([`SparseMlp::join_ahead`]), so the main stream never waits for them before then. Returns
    /// whether layer `l`'s own set is (or was) selected ahead; false where the MLP selects in line from
    /// [`SparseMlp::prev_src`].
    pub fn fork_prev(&self, e: &Launcher, l: usize, copy: Option<CUdeviceptr>, rows: usize) -> GpuResult<bool> {
        let Some(a) = self.prev_side(rows) else {
            return Ok(false);
        };
        for t in [(l == 0).then_some(0), Some(l + 1)].into_iter().flatten() {
            let Some(Some(GpuMlp::Predicted(k))) = self.rules.get(t).copied() else { continue };
            let src = copy.ok_or_else(|| GpuError::new("internal: no copy of the block input for the look-ahead selection"))?;
            e.gpu.fork(&a.fork_ev)?;
            a.pending[t].set(true);
            e.gpu.on_side(|| self.pred_scores(e, t, rows, src))?;
            e.gpu.on_side(|| self.pred_select(e, t, k, 0, rows))?;
            e.gpu.mark_side(&a.join_ev[t])?;
        }
        Ok(self.predicted(l))
    }

    /// Under `prev` predictors: where layer `l`'s block input is to be copied for the next layer's MLP (and layer
    /// 0's own), by layer parity; none where `shared` (a look-ahead selection of one chunk reads the head
    /// look-ahead's copy, which the side stream's join at the next layer's start protects).
    pub fn prev_copy(&self, l: usize, rows: usize, shared: bool) -> Option<CUdeviceptr> {
        let a = self.ahead.as_ref().filter(|a| a.input == NeuronInput::Prev)?;
        let needed = self.predicted(l + 1) || (l == 0 && self.predicted(0));
        (needed && !(shared && self.prev_side(rows).is_some())).then(|| a.snap[l % 2].ptr)
    }

    /// Under `prev` predictors selecting in line: the block input layer `l`'s predictor reads (layer l - 1's copy;
    /// layer 0's own).
    pub fn prev_src(&self, l: usize) -> Option<CUdeviceptr> {
        let a = self.ahead.as_ref().filter(|a| a.input == NeuronInput::Prev)?;
        Some(a.snap[l.saturating_sub(1) % 2].ptr)
    }

    /// At layer `l`'s start, once `src` (f32 `[rows, d]`) holds the block input: for a forward of one chunk, the
    /// layer's predictor and top-k forked onto the side stream (returns true; [`SparseMlp::join_ahead`] before the
    /// MLP); otherwise nothing (the MLP selects in line from `src`).
    pub fn fork_ahead(&self, e: &Launcher, l: usize, src: CUdeviceptr, rows: usize) -> GpuResult<bool> {
        let (Some(a), Some(GpuMlp::Predicted(k))) = (self.ahead.as_ref().filter(|a| a.input == NeuronInput::Block), self.rules[l]) else {
            return Ok(false);
        };
        if !a.side || rows > CHUNK {
            return Ok(false);
        }
        e.gpu.fork(&a.fork_ev)?;
        a.pending[l].set(true);
        e.gpu.on_side(|| self.pred_scores(e, l, rows, src))?;
        if a.early {
            e.gpu.mark_side(&a.read_ev)?;
            a.read_pending.set(true);
        }
        e.gpu.on_side(|| self.pred_select(e, l, k, 0, rows))?;
        // Marked here, so the side stream may take further work (the head look-ahead) that the MLP does not wait for.
        e.gpu.mark_side(&a.join_ev[l])?;
        Ok(true)
    }

    /// Whether layer `l` forks its look-ahead selection before the norm ([`MlpAhead::early`]; one chunk).
    pub fn forks_early(&self, l: usize, rows: usize) -> bool {
        self.ahead.as_ref().is_some_and(|a| a.early && a.side) && rows <= CHUNK && self.reads_block(l)
    }

    /// Under the early fork, before the first kernel after which `x` may change: the main stream waits until the
    /// predictor has read it (nothing where no early read is pending).
    pub fn wait_read(&self, e: &Launcher) -> GpuResult<()> {
        match &self.ahead {
            Some(a) if a.read_pending.replace(false) => e.gpu.wait_mark(&a.read_ev),
            _ => Ok(()),
        }
    }

    /// Before layer `l`'s first MLP gather: the main stream waits for its side selection (nothing where none is
    /// pending).
    pub fn join_ahead(&self, e: &Launcher, l: usize) -> GpuResult<()> {
        match &self.ahead {
            Some(a) if a.pending[l].replace(false) => e.gpu.wait_mark(&a.join_ev[l]),
            _ => Ok(()),
        }
    }

    /// The predicted rule's selection for chunk `c` (rows `r0..r0 + nb`) of layer `l`: the predictor's scores of
    /// `src` (f32 `[nb, d]`, the chunk's own rows), each row's top `k`, and their union as the kept set.
    fn predict(&self, e: &Launcher, l: usize, k: usize, c: usize, nb: usize, src: CUdeviceptr) -> GpuResult<()> {
        self.pred_scores(e, l, nb, src)?;
        self.pred_select(e, l, k, c, nb)
    }

    /// The predictor's scores of `src` (f32 `[nb, d]`) into the top-k scratch (the only read of `src`).
    fn pred_scores(&self, e: &Launcher, l: usize, nb: usize, src: CUdeviceptr) -> GpuResult<()> {
        let [scores, _, _, hid] = self.topk.as_ref().ok_or_else(|| GpuError::new("internal: no top-k scratch"))?;
        let p = self.parts.pred[l].as_ref().ok_or_else(|| GpuError::new("internal: no predictor for a predicted layer"))?;
        p.scores(e, src, nb, hid.ptr, scores.ptr)
    }

    /// Each row's top `k` of the scores [`SparseMlp::pred_scores`] wrote, and their union as chunk `c`'s kept set.
    fn pred_select(&self, e: &Launcher, l: usize, k: usize, c: usize, nb: usize) -> GpuResult<()> {
        let f = e.cfg.ffn;
        let [scores, keep, _, _] = self.topk.as_ref().ok_or_else(|| GpuError::new("internal: no top-k scratch"))?;
        topk_select(e, Scores::F32(scores.ptr), nb, f, k, keep.ptr, self.kept(l, c, f), (nb > 1).then(|| self.flags(l)), None)
    }

    /// Zero the counters and tallies a forward over `rows` rows uses.
    pub fn zero(&self, e: &Launcher, rows: usize) -> GpuResult<()> {
        let n = rows.div_ceil(CHUNK) * self.rules.len();
        e.gpu.memset_bytes(self.counters.ptr, 0, n * 4)?;
        e.gpu.memset_bytes(self.tallies.ptr, 0, n * TALLY * 4)
    }

    fn tally(&self, l: usize, c: usize) -> CUdeviceptr {
        self.tallies.ptr + ((c * self.rules.len() + l) * TALLY * 4) as u64
    }

    /// Add the last forward's kept counts to `stats`: `batch` rows of `seq` positions, of which the first `lens[b]`
    /// of row b are real tokens. Per token and sparse layer: F neurons, F - kept dropped, and the weights read, as
    /// the CPU reference counts them (CATS: the whole gate / fc1, then the kept rows of up and down / of fc2;
    /// exactdown: gate and up, then the kept rows of down; qscore: the score copies, then the kept rows of all
    /// three).
    pub fn add_stats(&self, e: &Launcher, batch: usize, seq: usize, lens: &[usize], stats: &mut crate::sparse::SparsityStats) -> GpuResult<()> {
        let rows = batch * seq;
        let chunks = rows.div_ceil(CHUNK);
        let nl = self.rules.len();
        let mut t = vec![0i32; chunks * nl * TALLY];
        if self.rules.iter().flatten().any(|r| matches!(r, GpuMlp::Cats(_))) {
            e.gpu.download(self.tallies.ptr, &mut t)?;
        }
        let heads = e.cfg.heads as u64;
        if stats.layers.len() < nl {
            stats.layers.resize(nl, Default::default());
        }
        let (d, f) = (e.cfg.hidden as f64, e.cfg.ffn);
        let llama = e.cfg.family == Family::Llama;
        for (l, rule) in self.rules.iter().enumerate() {
            let heads_kept = self.heads_k.get(l).copied().flatten().map_or(heads, |k| (k as u64).min(heads));
            if rule.is_none() && heads_kept == heads {
                continue;
            }
            for r in 0..rows {
                let (b, pos) = (r / seq, r % seq);
                if pos >= lens.get(b).copied().unwrap_or(seq) {
                    continue;
                }
                let kept = match *rule {
                    None => f as u64,
                    Some(GpuMlp::Cats(_)) => {
                        let (c, i) = (r / CHUNK, r % CHUNK);
                        let base = (c * nl + l) * TALLY + i * 8;
                        t[base..base + 8].iter().map(|&v| v.max(0) as u64).sum::<u64>().min(f as u64)
                    }
                    Some(GpuMlp::ExactDown(k) | GpuMlp::QScore(k) | GpuMlp::Predicted(k)) => k.min(f) as u64,
                };
                let st = &mut stats.layers[l];
                st.add_token(f as u64, 0, f as u64 - kept, heads, heads_kept);
                let (fd, k) = (f as f64, kept as f64);
                let dense = if llama { 3.0 * fd * d } else { 2.0 * fd * d };
                let read = match *rule {
                    None => dense,
                    Some(GpuMlp::Cats(_)) if llama => fd * d + 2.0 * k * d,
                    Some(GpuMlp::Cats(_)) => fd * d + k * d,
                    Some(GpuMlp::ExactDown(_)) => 2.0 * fd * d + k * d,
                    Some(GpuMlp::QScore(_)) => 2.0 * fd * d * self.parts.score_bits / crate::model::SERVED_BITS + 3.0 * k * d,
                    // The predictor's own weights are not counted (as in the CPU reference).
                    Some(GpuMlp::Predicted(_)) if llama => 3.0 * k * d,
                    Some(GpuMlp::Predicted(_)) => 2.0 * k * d,
                };
                st.add_reads(read, dense);
            }
        }
        Ok(())
    }

    /// The kept set of chunk `c` of layer `l`.
    pub fn kept(&self, l: usize, c: usize, cap: usize) -> Kept {
        let f = self.idx.bytes / 8; // the ids are held twice (layer parity), 4 bytes each
        Kept { idx: self.idx.ptr + ((l % 2) * f * 4) as u64, cnt: self.counters.ptr + ((c * self.rules.len() + l) * 4) as u64, cap, early: false }
    }

    /// Layer `l`'s per-row flags of its kept set (f32 `[CHUNK, F]`, by layer parity as the kept ids).
    fn flags(&self, l: usize) -> CUdeviceptr {
        self.topk.as_ref().map_or(0, |[_, _, flags, _]| flags.ptr + ((l % 2) * flags.bytes / 2) as u64)
    }
}

/// What the predicted rule's predictor reads: `x`, f32 `[rows, d]` (the residual entering the MLP, or the block
/// input's copy under [`MlpAhead`]); `selected` where [`SparseMlp::fork_ahead`] already made the kept set.
#[derive(Debug, Clone, Copy)]
pub struct PredIn {
    pub x: CUdeviceptr,
    pub selected: bool,
}

/// Layer `l`'s sparse MLP over `rows` rows (see [`cats_mlp`] for the arguments; `pred` for the predicted rule), by
/// its rule.
#[allow(clippy::too_many_arguments)]
pub fn sparse_mlp(e: &Launcher, sp: &SparseMlp, l: usize, rule: GpuMlp, rows: usize, input: impl Fn(usize) -> In, x: CUdeviceptr, pred: PredIn, pre: CUdeviceptr, act: CUdeviceptr) -> GpuResult<()> {
    match rule {
        GpuMlp::Cats(t) => cats_mlp(e, sp, l, t, rows, input, x, pre, act),
        GpuMlp::ExactDown(k) | GpuMlp::QScore(k) | GpuMlp::Predicted(k) => topk_mlp(e, sp, l, rule, k, rows, input, x, pred, act),
    }
}

/// Layer `l`'s MLP under a top-k rule, in chunks of [`CHUNK`] rows: per chunk the scores (`qscore`: the int4
/// copies; `exactdown`: the dense hidden values' magnitudes; `predicted`: the predictor on `pred.x`), each
/// row's top `k`, their union as the kept set, then the kept rows of gate/up or fc1 (each row multiplied by its
/// own flags) or the kept hidden values gathered (`exactdown`), and the kept rows of the transposed down
/// accumulated into `x`. `act` 16-bit `[CHUNK, f]` scratch.
#[allow(clippy::too_many_arguments)]
fn topk_mlp(e: &Launcher, sp: &SparseMlp, l: usize, rule: GpuMlp, k: usize, rows: usize, input: impl Fn(usize) -> In, x: CUdeviceptr, pred: PredIn, act: CUdeviceptr) -> GpuResult<()> {
    let (d, f) = (e.cfg.hidden, e.cfg.ffn);
    let lw = &e.w.layers[l];
    let wt = sp.wt(e, l)?;
    let [scores, keep, _, hid] = sp.topk.as_ref().ok_or_else(|| GpuError::new("internal: no top-k scratch"))?;
    let (up_b, down_b) = (lw.up_b.as_ref().map(|b| b.ptr), lw.down_b.as_ref().map(|b| b.ptr));
    for (c, r0, nb) in chunks(rows, "the sparse MLP")? {
        let kept = sp.kept(l, c, f);
        let inp = input(r0);
        let fl = (nb > 1).then(|| sp.flags(l));
        match rule {
            GpuMlp::QScore(_) | GpuMlp::Predicted(_) => {
                if let GpuMlp::QScore(_) = rule {
                    let q = sp.parts.q[l].as_ref().ok_or_else(|| GpuError::new("internal: no score copies for a qscore layer"))?;
                    qscore(e, q, inp, scores.ptr, nb, f, d)?;
                    topk_select(e, Scores::F32(scores.ptr), nb, f, k, keep.ptr, kept, fl, None)?;
                } else if !pred.selected {
                    sp.predict(e, l, k, c, nb, pred.x + (r0 * d * 4) as u64)?;
                }
                let epi = if e.cfg.family == Family::Llama { Epi::Glu } else { Epi::Relu };
                // A set made on the side stream (joined) is complete before the gather's launch.
                gather_up(e, lw.up.ptr, up_b, f, inp, Kept { early: pred.selected, ..kept }, act, nb, d, epi, fl)?;
            }
            _ => {
                let (xh, norm) = match inp {
                    In::Half(p) => (p, None),
                    In::Norm(m) => (0, Some(m)),
                };
                e.linear_in(lw.up.ptr, up_b, xh, norm, hid.ptr, nb, f, d, Epi::Glu, scores.ptr)?;
                topk_select(e, Scores::Abs16(hid.ptr), nb, f, k, keep.ptr, kept, None, Some((hid.ptr, act)))?;
            }
        }
        // Under qscore / predicted the top-k wrote the set before the gather ran: the down projection reads it early.
        let early = matches!(rule, GpuMlp::QScore(_) | GpuMlp::Predicted(_));
        down_t(e, wt, down_b, act, f, Some(Kept { early, ..kept }), f, x + (r0 * d * 4) as u64, nb, d, false)?;
    }
    Ok(())
}

/// Layer `l`'s MLP under CATS with threshold `t`, over `rows` rows in chunks of [`CHUNK`]: the gate (fc1) of every
/// neuron, the kept neurons appended with their gate values; for SwiGLU the kept up rows times them; the kept rows
/// of the transposed down accumulated into the residual stream `x` (f32 `[rows, d]`). `input(r0)` is the MLP input of
/// the chunk starting at row `r0`; `pre` f32 `[CHUNK, f]` and `act` 16-bit `[CHUNK, f]` are scratch.
#[allow(clippy::too_many_arguments)]
pub fn cats_mlp(e: &Launcher, sp: &SparseMlp, l: usize, t: f32, rows: usize, input: impl Fn(usize) -> In, x: CUdeviceptr, pre: CUdeviceptr, act: CUdeviceptr) -> GpuResult<()> {
    let (d, f) = (e.cfg.hidden, e.cfg.ffn);
    let lw = &e.w.layers[l];
    let wt = sp.wt(e, l)?;
    let llama = e.cfg.family == Family::Llama;
    let (up_b, down_b) = (lw.up_b.as_ref().map(|b| b.ptr), lw.down_b.as_ref().map(|b| b.ptr));
    for (c, r0, nb) in chunks(rows, "the sparse MLP")? {
        let kept = sp.kept(l, c, f);
        let inp = input(r0);
        let tally = sp.tally(l, c);
        if llama {
            cats_select(e, lw.up.ptr, up_b, true, inp, t, kept, pre, nb, d, tally)?;
            let up = lw.up.ptr + (f * d * 2) as u64;
            gather_mul(e, up, up_b.map(|b| b + (f * 2) as u64), inp, pre, kept, act, nb, d)?;
        } else {
            cats_select(e, lw.up.ptr, up_b, false, inp, t, kept, act, nb, d, tally)?;
        }
        down_t(e, wt, down_b, act, f, Some(kept), f, x + (r0 * d * 4) as u64, nb, d, false)?;
    }
    Ok(())
}
