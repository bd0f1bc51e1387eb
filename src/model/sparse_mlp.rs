//! The SwiGLU rules that skip work (exact-down, quantized score, cascade, TEAL, WINA), computed on the host by
//! gathering only the weight rows or columns each rule reads: the CPU reference of the sparse kernels, so the
//! function computed is the rule's own and the bytes it reads are counted from what it actually touched.
//!
//! Layouts (row-major, one contiguous slice per unit a rule may skip):
//! - `gate_rows`, `up_rows`: `[ffn, d]`, a neuron's weights (read when neurons are chosen before gate/up);
//! - `gate_cols`, `up_cols`: `[d, ffn]`, an input channel's weights (read when input channels are chosen);
//! - `down`: `[ffn, d]`, what a neuron writes.

use burn::tensor::{activation, backend::Backend, Tensor, TensorData};

use super::{to_host, Mlp, Model};
use crate::sparse::quant::QScoreCopies;
use crate::sparse::{select, MlpRule};

/// Bits of a served weight: the unit the read counts use.
pub const SERVED_BITS: f64 = 16.0;

/// Host copies of one SwiGLU MLP in the layouts the gathered rules read.
#[derive(Debug, Clone)]
pub struct HostMlp {
    pub d: usize,
    pub f: usize,
    gate_rows: Vec<f32>,
    up_rows: Vec<f32>,
    gate_cols: Vec<f32>,
    up_cols: Vec<f32>,
    down: Vec<f32>,
    /// `[d]`: ‖[W_gate; W_up][:, i]‖, the norm of what input channel `i` multiplies (WINA).
    pub in_norm: Vec<f32>,
    /// `[ffn]`: ‖W_down[:, j]‖, the norm of what neuron `j` writes (WINA, budgets).
    pub down_norm: Vec<f32>,
}

fn transpose(w: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut t = vec![0f32; w.len()];
    for r in 0..rows {
        for c in 0..cols {
            t[c * rows + r] = w[r * cols + c];
        }
    }
    t
}

/// `Σ a_i b_i` with eight partial sums (vectorises; the order differs from a BLAS dot, within f32 rounding).
#[inline]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (ac, bc) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = ac.remainder().iter().zip(bc.remainder()).map(|(x, y)| x * y).sum();
    for (x, y) in ac.zip(bc) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// `y += a·x`
#[inline]
fn axpy(y: &mut [f32], a: f32, x: &[f32]) {
    for (y, x) in y.iter_mut().zip(x) {
        *y += a * x;
    }
}

#[inline]
fn silu(x: f32) -> f32 {
    x / (1.0 + (-x).exp())
}

/// What one token's gathered MLP did: the neurons fed to down, and the weights it read (served-precision units).
#[derive(Debug, Clone, Default)]
pub struct TokenWork {
    pub kept: Vec<usize>,
    pub read: f64,
}

impl HostMlp {
    /// From the burn weights: `gate_t, up_t: [d, ffn]`, `down_t: [ffn, d]` (the `Linear` layouts).
    pub fn new(gate_t: Vec<f32>, up_t: Vec<f32>, down_t: Vec<f32>, d: usize, f: usize) -> Self {
        let gate_rows = transpose(&gate_t, d, f);
        let up_rows = transpose(&up_t, d, f);
        let in_norm = (0..d)
            .map(|i| {
                let (g, u) = (&gate_t[i * f..(i + 1) * f], &up_t[i * f..(i + 1) * f]);
                (dot(g, g) + dot(u, u)).sqrt()
            })
            .collect();
        let down_norm = (0..f).map(|j| dot(&down_t[j * d..(j + 1) * d], &down_t[j * d..(j + 1) * d]).sqrt()).collect();
        HostMlp { d, f, gate_rows, up_rows, gate_cols: gate_t, up_cols: up_t, down: down_t, in_norm, down_norm }
    }

    /// `[ffn, d]`: each neuron's gate weights.
    pub fn gate_rows(&self) -> &[f32] {
        &self.gate_rows
    }
    /// `[ffn, d]`: each neuron's up weights.
    pub fn up_rows(&self) -> &[f32] {
        &self.up_rows
    }

    /// Weights a dense SwiGLU MLP reads per token.
    pub fn dense_read(&self) -> f64 {
        3.0 * (self.f * self.d) as f64
    }

    fn row<'a>(&self, w: &'a [f32], j: usize) -> &'a [f32] {
        &w[j * self.d..(j + 1) * self.d]
    }

    /// Exact hidden value of neuron `j` from its gate and up rows.
    fn neuron(&self, x: &[f32], j: usize) -> f32 {
        silu(dot(self.row(&self.gate_rows, j), x)) * dot(self.row(&self.up_rows, j), x)
    }

    /// Hidden values of every neuron from the input channels `kept_in` only: `[ffn]`.
    fn hidden_of_channels(&self, x: &[f32], kept_in: &[usize]) -> Vec<f32> {
        let f = self.f;
        let (mut g, mut u) = (vec![0f32; f], vec![0f32; f]);
        for &i in kept_in {
            axpy(&mut g, x[i], &self.gate_cols[i * f..(i + 1) * f]);
            axpy(&mut u, x[i], &self.up_cols[i * f..(i + 1) * f]);
        }
        g.iter().zip(&u).map(|(&g, &u)| silu(g) * u).collect()
    }

    /// One token: `x: [d]` the normed MLP input, `score: [ffn]` the low-bit score (qscore, cascade), `act: [ffn]`
    /// the exact dense hidden value (exactdown). Adds the MLP output to `out: [d]`; writes the hidden values fed
    /// to down into `hidden` when given (zeros elsewhere).
    #[allow(clippy::too_many_arguments)]
    pub fn token(
        &self,
        rule: MlpRule,
        x: &[f32],
        score: Option<&[f32]>,
        act: Option<&[f32]>,
        score_bits: f64,
        out: &mut [f32],
        hidden: Option<&mut [f32]>,
    ) -> TokenWork {
        let (d, f) = (self.d as f64, self.f as f64);
        let score_read = 2.0 * f * d * score_bits / SERVED_BITS;
        let (kept, h, read): (Vec<usize>, Vec<f32>, f64) = match rule {
            MlpRule::ExactDownTopK { k } => {
                let act = act.unwrap_or(&[]);
                let mag: Vec<f32> = act.iter().map(|a| a.abs()).collect();
                let kept = select::top_k(&mag, k);
                let h = kept.iter().map(|&j| act[j]).collect();
                let read = 2.0 * f * d + kept.len() as f64 * d;
                (kept, h, read)
            }
            MlpRule::QScoreTopK { k } => {
                let kept = select::top_k(score.unwrap_or(&[]), k);
                let h = kept.iter().map(|&j| self.neuron(x, j)).collect();
                let read = score_read + 3.0 * kept.len() as f64 * d;
                (kept, h, read)
            }
            MlpRule::Cascade { candidates, k } => {
                let cand = select::top_k(score.unwrap_or(&[]), candidates);
                let hc: Vec<f32> = cand.iter().map(|&j| self.neuron(x, j)).collect();
                let mag: Vec<f32> = hc.iter().map(|a| a.abs()).collect();
                // Candidates are in ascending index order, so ties still break by the lower neuron index.
                let local = select::top_k(&mag, k);
                let read = score_read + 2.0 * cand.len() as f64 * d + local.len() as f64 * d;
                (local.iter().map(|&i| cand[i]).collect(), local.iter().map(|&i| hc[i]).collect(), read)
            }
            MlpRule::Teal { t_in, t_hidden } => {
                let kept_in: Vec<usize> = (0..self.d).filter(|&i| x[i].abs() >= t_in).collect();
                let all = self.hidden_of_channels(x, &kept_in);
                let kept: Vec<usize> = (0..self.f).filter(|&j| all[j].abs() >= t_hidden).collect();
                let read = 2.0 * kept_in.len() as f64 * f + kept.len() as f64 * d;
                let h = kept.iter().map(|&j| all[j]).collect();
                (kept, h, read)
            }
            MlpRule::Wina { k_in, k_hidden } => {
                let s_in: Vec<f32> = x.iter().zip(&self.in_norm).map(|(x, n)| x.abs() * n).collect();
                let kept_in = select::top_k(&s_in, k_in);
                let all = self.hidden_of_channels(x, &kept_in);
                let s_h: Vec<f32> = all.iter().zip(&self.down_norm).map(|(h, n)| h.abs() * n).collect();
                let kept = select::top_k(&s_h, k_hidden);
                let read = 2.0 * kept_in.len() as f64 * f + kept.len() as f64 * d;
                let h = kept.iter().map(|&j| all[j]).collect();
                (kept, h, read)
            }
            // `Model::forward_with` sends only gathered rules here.
            MlpRule::Dense | MlpRule::Threshold { .. } | MlpRule::OracleTopK { .. } | MlpRule::PredictedTopK { .. } => {
                (Vec::new(), Vec::new(), 0.0)
            }
        };
        for (&j, &hj) in kept.iter().zip(&h) {
            axpy(out, hj, self.row(&self.down, j));
        }
        if let Some(hid) = hidden {
            hid.fill(0.0);
            for (&j, &hj) in kept.iter().zip(&h) {
                hid[j] = hj;
            }
        }
        TokenWork { kept, read }
    }

    /// [`HostMlp::token`] over `x: [tokens, d]` on all cores: returns `out: [tokens, d]`, each token's work, and
    /// the hidden values fed to down `[tokens, ffn]` when `want_hidden`.
    pub fn run(
        &self,
        rule: MlpRule,
        x: &[f32],
        score: Option<&[f32]>,
        act: Option<&[f32]>,
        score_bits: f64,
        want_hidden: bool,
    ) -> (Vec<f32>, Vec<TokenWork>, Option<Vec<f32>>) {
        let (d, f) = (self.d, self.f);
        let t = x.len() / d.max(1);
        let mut out = vec![0f32; t * d];
        let mut hidden = if want_hidden { vec![0f32; t * f] } else { Vec::new() };
        let mut work: Vec<TokenWork> = vec![TokenWork::default(); t];
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get()).min(t.max(1));
        let per = t.div_ceil(threads.max(1)).max(1);
        std::thread::scope(|sc| {
            let mut hid_chunks: Vec<Option<&mut [f32]>> =
                if want_hidden { hidden.chunks_mut(per * f).map(Some).collect() } else { (0..t.div_ceil(per)).map(|_| None).collect() };
            for (c, (o, w)) in out.chunks_mut(per * d).zip(work.chunks_mut(per)).enumerate() {
                let hid = hid_chunks.get_mut(c).and_then(|h| h.take());
                sc.spawn(move || {
                    let mut hid = hid;
                    for (i, (o, w)) in o.chunks_mut(d).zip(w.iter_mut()).enumerate() {
                        let tok = c * per + i;
                        let h = hid.as_deref_mut().map(|h| &mut h[i * f..(i + 1) * f]);
                        *w = self.token(
                            rule,
                            &x[tok * d..(tok + 1) * d],
                            score.map(|s| &s[tok * f..(tok + 1) * f]),
                            act.map(|a| &a[tok * f..(tok + 1) * f]),
                            score_bits,
                            o,
                            h,
                        );
                    }
                });
            }
        });
        (out, work, want_hidden.then_some(hidden))
    }
}

/// The score pass of the `qscore` and `cascade` rules on the burn device: per layer, the score copies of gate
/// and up as `[d, ffn]` matrices of the values the low-bit codes stand for.
pub struct QScorer<B: Backend> {
    gate: Vec<Tensor<B, 2>>,
    up: Vec<Tensor<B, 2>>,
    /// Bits read per weight by the score pass (codes and group scales).
    pub bits_per_weight: f64,
    /// What the copies are, in words (for tables).
    pub label: String,
}

impl<B: Backend> QScorer<B> {
    /// From the low-bit copies `calibrate --rule qscore` stored.
    pub fn from_copies(c: &QScoreCopies, device: &B::Device) -> Self {
        let mut gate = Vec::new();
        let mut up = Vec::new();
        for (g, u) in &c.layers {
            let t = |m: &crate::sparse::quant::QMatrix| {
                Tensor::<B, 2>::from_data(TensorData::new(transpose(&m.dequantize(), m.rows, m.cols), [m.cols, m.rows]), device)
            };
            gate.push(t(g));
            up.push(t(u));
        }
        let o = c.opts;
        QScorer { gate, up, bits_per_weight: o.bits_per_weight(), label: format!("int{} {:?} g{}", o.bits, o.scheme, o.group).to_lowercase() }
    }

    /// Exact scores: the model's own gate and up weights as the "copy" (the oracle's ranking; for tests and as
    /// the bound the low-bit copies approach). Counted as reading 16-bit weights.
    pub fn exact(model: &Model<B>) -> Self {
        let mut gate = Vec::new();
        let mut up = Vec::new();
        for l in &model.layers {
            if let Mlp::SwiGlu { gate: g, up: u, .. } = &l.mlp {
                gate.push(g.w.clone());
                up.push(u.w.clone());
            }
        }
        QScorer { gate, up, bits_per_weight: SERVED_BITS, label: "exact".into() }
    }

    pub fn layers(&self) -> usize {
        self.gate.len()
    }

    /// `x: [b, s, d]` (the normed MLP input) `-> [b, s, ffn]`: |SiLU(x·Ĝ)·(x·Û)|.
    pub fn scores(&self, layer: usize, x: Tensor<B, 3>) -> Tensor<B, 3> {
        let [b, s, d] = x.dims();
        let x = x.reshape([b * s, d]);
        let g = activation::silu(x.clone().matmul(self.gate[layer].clone()));
        let u = x.matmul(self.up[layer].clone());
        let f = u.dims()[1];
        (g * u).abs().reshape([b, s, f])
    }
}

impl<B: Backend> Model<B> {
    /// Host copies of every SwiGLU MLP for the gathered rules, built on first use (empty for OPT).
    pub fn host_mlps(&self) -> &[HostMlp] {
        self.host.get_or_init(|| {
            self.layers
                .iter()
                .filter_map(|l| match &l.mlp {
                    Mlp::SwiGlu { gate, up, down } => {
                        let [d, f] = gate.w.dims();
                        Some(HostMlp::new(to_host(gate.w.clone()), to_host(up.w.clone()), to_host(down.w.clone()), d, f))
                    }
                    Mlp::Relu { .. } => None,
                })
                .collect()
        })
    }
}
