//! `bench`'s data: named real model shapes (for latency with random weights), and the result rows printed as a
//! table or written as JSON / CSV. The timing itself runs on the CUDA engine (`cuda::bench`).

use serde::Serialize;

use crate::config::{Family, ModelConfig};

/// A real model's shape, by name.
#[derive(Debug, Clone, Copy)]
pub struct Shape {
    pub name: &'static str,
    pub family: Family,
    pub hidden: usize,
    pub ffn: usize,
    pub layers: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub vocab: usize,
    pub tied: bool,
    pub max_positions: usize,
    pub rope_theta: f64,
}

const fn opt(name: &'static str, hidden: usize, layers: usize, heads: usize) -> Shape {
    Shape { name, family: Family::Opt, hidden, ffn: 4 * hidden, layers, heads, kv_heads: heads, vocab: 50272, tied: true, max_positions: 2048, rope_theta: 0.0 }
}

#[allow(clippy::too_many_arguments)]
const fn llama(name: &'static str, hidden: usize, ffn: usize, layers: usize, heads: usize, kv_heads: usize, vocab: usize, tied: bool, max_positions: usize, rope_theta: f64) -> Shape {
    Shape { name, family: Family::Llama, hidden, ffn, layers, heads, kv_heads, vocab, tied, max_positions, rope_theta }
}

/// Every shape `bench --shape` knows (ARCHITECTURE.md's table, plus OPT-2.7B and Llama-2-70B).
pub const SHAPES: &[Shape] = &[
    opt("opt-125m", 768, 12, 12),
    opt("opt-1.3b", 2048, 24, 32),
    opt("opt-2.7b", 2560, 32, 32),
    opt("opt-6.7b", 4096, 32, 32),
    opt("opt-13b", 5120, 40, 40),
    opt("opt-30b", 7168, 48, 56),
    opt("opt-66b", 9216, 64, 72),
    opt("opt-175b", 12288, 96, 96),
    llama("llama2-7b", 4096, 11008, 32, 32, 32, 32000, false, 4096, 10000.0),
    llama("llama2-13b", 5120, 13824, 40, 40, 40, 32000, false, 4096, 10000.0),
    llama("llama2-70b", 8192, 28672, 80, 64, 8, 32000, false, 4096, 10000.0),
    llama("mistral-7b", 4096, 14336, 32, 32, 8, 32000, false, 32768, 1_000_000.0),
    llama("smollm2-135m", 576, 1536, 30, 9, 3, 49152, true, 8192, 100_000.0),
];

pub fn shape_names() -> Vec<&'static str> {
    SHAPES.iter().map(|s| s.name).collect()
}

impl Shape {
    pub fn find(name: &str) -> Option<Shape> {
        SHAPES.iter().find(|s| s.name.eq_ignore_ascii_case(name)).copied()
    }

    /// The runtime config of this shape.
    pub fn config(&self) -> ModelConfig {
        let opt = self.family == Family::Opt;
        ModelConfig {
            family: self.family,
            vocab_size: self.vocab,
            hidden: self.hidden,
            ffn: self.ffn,
            layers: self.layers,
            heads: self.heads,
            kv_heads: self.kv_heads,
            head_dim: self.hidden / self.heads,
            max_positions: self.max_positions,
            norm_eps: 1e-5,
            rope_theta: self.rope_theta,
            embed_dim: self.hidden,
            norm_before: true,
            final_norm: opt,
            attn_bias: opt,
            mlp_bias: opt,
            tie_embeddings: self.tied,
            bos_token_id: Some(1),
            eos_token_ids: vec![2],
        }
    }
}

/// One measured configuration.
#[derive(Debug, Clone, Serialize)]
pub struct BenchResult {
    pub engine: String,
    /// A shape name or the model's identity.
    pub model: String,
    pub weights: String,
    pub device: String,
    pub dtype: String,
    pub batch: usize,
    pub prompt: usize,
    pub tokens: usize,
    pub prefill_ms: f64,
    pub prefill_tokens_per_s: f64,
    /// 2 * params * prompt tokens / prefill time, in TFLOP/s (matrix work of the projections only).
    pub prefill_tflops: f64,
    pub median_ms: f64,
    pub p90_ms: f64,
    pub tokens_per_s: f64,
    /// Weight bytes one decode step reads (all layers, the head, one embedding row).
    pub step_bytes: usize,
    pub achieved_gbps: f64,
    /// Device-to-device copy bandwidth measured in the same process (bytes read + written per second).
    pub copy_gbps: f64,
    pub floor_ms: f64,
    pub ratio_to_floor: f64,
    /// (kernel class, ms per step) from an un-captured step with events between classes; empty unless asked.
    pub breakdown: Vec<(String, f64)>,
}

/// The human table of `results`.
pub fn table(results: &[BenchResult]) -> String {
    let mut s = String::from(
        "| engine | model | dtype | batch | prompt | tokens | prefill tok/s | median ms/tok | p90 ms/tok | tok/s | GB/s | floor ms | x floor |\n\
         |---|---|---|---|---|---|---|---|---|---|---|---|---|\n",
    );
    for r in results {
        s += &format!(
            "| {} | {} | {} | {} | {} | {} | {:.0} | {:.3} | {:.3} | {:.1} | {:.0} | {:.3} | {:.2} |\n",
            r.engine, r.model, r.dtype, r.batch, r.prompt, r.tokens, r.prefill_tokens_per_s, r.median_ms, r.p90_ms, r.tokens_per_s, r.achieved_gbps, r.floor_ms, r.ratio_to_floor
        );
    }
    for r in results.iter().filter(|r| !r.breakdown.is_empty()) {
        let total: f64 = r.breakdown.iter().map(|b| b.1).sum();
        s += &format!("\nper-kernel-class time of one un-captured step, {} {} batch {} (total {:.3} ms; graph replay {:.3} ms):\n", r.model, r.dtype, r.batch, total, r.median_ms);
        for (c, ms) in &r.breakdown {
            s += &format!("  {c:<10} {ms:>8.3} ms  {:>5.1}%\n", 100.0 * ms / total.max(1e-12));
        }
    }
    s
}

/// CSV of `results` (the breakdown is left to the JSON).
pub fn csv(results: &[BenchResult]) -> crate::error::Result<Vec<u8>> {
    let mut w = csv::Writer::from_writer(Vec::new());
    w.write_record([
        "engine", "model", "weights", "device", "dtype", "batch", "prompt", "tokens", "prefill_ms", "prefill_tokens_per_s", "prefill_tflops",
        "median_ms", "p90_ms", "tokens_per_s", "step_bytes", "achieved_gbps", "copy_gbps", "floor_ms", "ratio_to_floor",
    ])
    .map_err(|e| crate::error::Error::Internal(format!("csv: {e}")))?;
    for r in results {
        let row = [
            r.engine.clone(),
            r.model.clone(),
            r.weights.clone(),
            r.device.clone(),
            r.dtype.clone(),
            r.batch.to_string(),
            r.prompt.to_string(),
            r.tokens.to_string(),
            format!("{:.4}", r.prefill_ms),
            format!("{:.1}", r.prefill_tokens_per_s),
            format!("{:.2}", r.prefill_tflops),
            format!("{:.5}", r.median_ms),
            format!("{:.5}", r.p90_ms),
            format!("{:.2}", r.tokens_per_s),
            r.step_bytes.to_string(),
            format!("{:.1}", r.achieved_gbps),
            format!("{:.1}", r.copy_gbps),
            format!("{:.5}", r.floor_ms),
            format!("{:.4}", r.ratio_to_floor),
        ];
        w.write_record(&row).map_err(|e| crate::error::Error::Internal(format!("csv: {e}")))?;
    }
    w.into_inner().map_err(|e| crate::error::Error::Internal(format!("csv: {e}")))
}

/// What `bench --mlp-block` times besides the dense block.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum, Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BlockRule {
    /// The kept ids given (no selection): the gather and the transposed down alone.
    #[default]
    Gather,
    /// `exactdown`: dense gate/up, the top k hidden values chosen on the GPU, the transposed down (SwiGLU).
    Exactdown,
    /// `qscore`: the int4 score pass, top-k on the GPU, the kept gate/up rows, the transposed down (SwiGLU).
    Qscore,
    /// `dejavu`: a low-rank predictor (random, the rank `train-predictors` picks), top-k on the GPU, the kept rows
    /// of fc1 or gate/up, the transposed down (OPT and SwiGLU).
    Dejavu,
}

impl BlockRule {
    pub fn name(self) -> &'static str {
        match self {
            BlockRule::Gather => "gather",
            BlockRule::Exactdown => "exactdown",
            BlockRule::Qscore => "qscore",
            BlockRule::Dejavu => "dejavu",
        }
    }
}

/// One MLP block (`bench --mlp-block`): the kept neurons' weights only, one CUDA-graph replay per timing with the
/// L2 flushed before it (as `../shared/docs/PERF.md` times the peers).
#[derive(Debug, Clone, Serialize)]
pub struct MlpBlockResult {
    pub shape: String,
    pub device: String,
    pub dtype: String,
    pub batch: usize,
    /// Kept neurons (of `ffn`) and their fraction.
    pub kept: usize,
    pub ffn: usize,
    pub kept_frac: f64,
    /// The kernels timed: `gather_up + down_t` (the index list given; no predictor or score inside).
    pub kernels: String,
    pub median_us: f64,
    pub p90_us: f64,
    /// Weight bytes the kept neurons occupy (fc1 + fc2, or gate + up + down, plus their biases).
    pub bytes: usize,
    pub copy_gbps: f64,
    pub floor_us: f64,
    pub ratio_to_floor: f64,
    /// The acceptance bound: 1.2 x floor + 4 us.
    pub bound_us: f64,
    /// Our dense block (GEMV up + GEMV down on the untransposed weights), same call, same timing.
    pub dense_us: f64,
}

/// The human table of MLP-block results.
pub fn mlp_table(results: &[MlpBlockResult]) -> String {
    let mut s = String::from(
        "| shape | dtype | batch | kept | median us | p90 us | floor us | x floor | bound us (1.2 floor + 4) | within | dense us | speed-up vs dense |\n\
         |---|---|---|---|---|---|---|---|---|---|---|---|\n",
    );
    for r in results {
        s += &format!(
            "| {} | {} | {} | {:.0}% ({}) | {:.1} | {:.1} | {:.1} | {:.2} | {:.1} | {} | {:.1} | {:.2}x |\n",
            r.shape,
            r.dtype,
            r.batch,
            100.0 * r.kept_frac,
            r.kept,
            r.median_us,
            r.p90_us,
            r.floor_us,
            r.ratio_to_floor,
            r.bound_us,
            if r.median_us <= r.bound_us { "yes" } else { "no" },
            r.dense_us,
            r.dense_us / r.median_us
        );
    }
    s
}

/// CSV of MLP-block results.
pub fn mlp_csv(results: &[MlpBlockResult]) -> crate::error::Result<Vec<u8>> {
    let mut w = csv::Writer::from_writer(Vec::new());
    for r in results {
        w.serialize(r).map_err(|e| crate::error::Error::Internal(format!("csv: {e}")))?;
    }
    w.into_inner().map_err(|e| crate::error::Error::Internal(format!("csv: {e}")))
}

/// Median and 90th percentile of `v` (sorted in place).
pub fn median_p90(v: &mut [f64]) -> (f64, f64) {
    if v.is_empty() {
        return (f64::NAN, f64::NAN);
    }
    v.sort_by(f64::total_cmp);
    let at = |q: f64| v[((v.len() - 1) as f64 * q).round() as usize];
    (at(0.5), at(0.9))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::names::Table;

    #[test]
    fn shapes_have_the_published_parameter_counts() {
        // Parameter counts from the model cards (billions), within 3%.
        for (name, params) in [("opt-6.7b", 6.66), ("opt-13b", 12.85), ("llama2-7b", 6.74), ("llama2-13b", 13.02), ("llama2-70b", 68.98), ("mistral-7b", 7.24), ("smollm2-135m", 0.1349)] {
            let cfg = Shape::find(name).unwrap().config();
            let p = Table::standard(&cfg).params() as f64 / 1e9;
            assert!((p / params - 1.0).abs() < 0.03, "{name}: {p:.3}B vs {params}B");
        }
    }

    #[test]
    fn median_and_p90() {
        let mut v: Vec<f64> = (1..=10).rev().map(f64::from).collect();
        assert_eq!(median_p90(&mut v), (6.0, 9.0));
    }
}
