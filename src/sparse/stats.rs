//! Realised sparsity, counted per layer over real (non-padding) tokens from what a forward actually computed.
//! Units the plan dropped are counted apart from natural zeros (OPT's ReLU zeroes most neurons with no plan).

/// Counts of one layer, summed over tokens.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct LayerStats {
    pub tokens: u64,
    /// MLP hidden units per token times tokens.
    pub mlp_total: u64,
    /// Units the plan dropped whose dense value was not already zero.
    pub mlp_dropped: u64,
    /// Units whose dense value was exactly zero (ReLU), whether or not the plan kept them.
    pub mlp_natural_zero: u64,
    /// Smallest and largest per-token fraction of zeros fed to the down projection.
    pub mlp_token_min: f64,
    pub mlp_token_max: f64,
    pub heads_off: u64,
    pub heads_total: u64,
    /// MLP weights read, summed over tokens, in weights at the served precision (16-bit): score passes over
    /// low-bit copies count `bits/16` per weight they read. Predictor weights are not counted.
    #[serde(default)]
    pub mlp_read: f64,
    /// What a dense MLP reads for the same tokens, in the same unit.
    #[serde(default)]
    pub mlp_dense_read: f64,
}

impl Default for LayerStats {
    fn default() -> Self {
        LayerStats {
            tokens: 0,
            mlp_total: 0,
            mlp_dropped: 0,
            mlp_natural_zero: 0,
            mlp_token_min: f64::INFINITY,
            mlp_token_max: 0.0,
            heads_off: 0,
            heads_total: 0,
            mlp_read: 0.0,
            mlp_dense_read: 0.0,
        }
    }
}

fn ratio(a: u64, b: u64) -> f64 {
    if b == 0 { 0.0 } else { a as f64 / b as f64 }
}

impl LayerStats {
    /// Fraction of MLP hidden values that reach the down projection as zero (plan-dropped or natural).
    pub fn mlp_sparsity(&self) -> f64 {
        ratio(self.mlp_dropped + self.mlp_natural_zero, self.mlp_total)
    }
    /// Fraction the plan dropped beyond natural zeros.
    pub fn mlp_plan_sparsity(&self) -> f64 {
        ratio(self.mlp_dropped, self.mlp_total)
    }
    pub fn mlp_natural_sparsity(&self) -> f64 {
        ratio(self.mlp_natural_zero, self.mlp_total)
    }
    pub fn head_sparsity(&self) -> f64 {
        ratio(self.heads_off, self.heads_total)
    }
    /// MLP weights read as a fraction of a dense MLP's (0 when nothing was counted).
    pub fn mlp_read_fraction(&self) -> f64 {
        if self.mlp_dense_read == 0.0 { 0.0 } else { self.mlp_read / self.mlp_dense_read }
    }
    /// One token read `read` MLP weights where a dense MLP reads `dense`.
    pub fn add_reads(&mut self, read: f64, dense: f64) {
        self.mlp_read += read;
        self.mlp_dense_read += dense;
    }
    /// `mlp_token_min` with no tokens reads as 0 rather than infinity.
    pub fn token_min(&self) -> f64 {
        if self.tokens == 0 { 0.0 } else { self.mlp_token_min }
    }

    /// One token: of `width` MLP units, `natural_zero` were zero in the dense value and the plan dropped
    /// `dropped` others; `heads_kept` of `heads` heads ran.
    pub fn add_token(&mut self, width: u64, natural_zero: u64, dropped: u64, heads: u64, heads_kept: u64) {
        self.tokens += 1;
        self.mlp_total += width;
        self.mlp_dropped += dropped;
        self.mlp_natural_zero += natural_zero;
        let frac = ratio(dropped + natural_zero, width);
        self.mlp_token_min = self.mlp_token_min.min(frac);
        self.mlp_token_max = self.mlp_token_max.max(frac);
        self.heads_total += heads;
        self.heads_off += heads - heads_kept.min(heads);
    }

    fn merge(&mut self, b: &LayerStats) {
        self.tokens += b.tokens;
        self.mlp_total += b.mlp_total;
        self.mlp_dropped += b.mlp_dropped;
        self.mlp_natural_zero += b.mlp_natural_zero;
        self.heads_off += b.heads_off;
        self.heads_total += b.heads_total;
        self.mlp_token_min = self.mlp_token_min.min(b.mlp_token_min);
        self.mlp_token_max = self.mlp_token_max.max(b.mlp_token_max);
        self.mlp_read += b.mlp_read;
        self.mlp_dense_read += b.mlp_dense_read;
    }
}

/// Per-layer counts, accumulated over forwards.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct SparsityStats {
    pub layers: Vec<LayerStats>,
}

impl SparsityStats {
    pub fn new(layers: usize) -> Self {
        SparsityStats { layers: vec![LayerStats::default(); layers] }
    }
    /// Mean over layers of the per-layer MLP sparsity (zeros fed to the down projection).
    pub fn mlp_sparsity(&self) -> f64 {
        mean(self.layers.iter().map(LayerStats::mlp_sparsity))
    }
    /// Mean over layers of what the plan dropped beyond natural zeros.
    pub fn mlp_plan_sparsity(&self) -> f64 {
        mean(self.layers.iter().map(LayerStats::mlp_plan_sparsity))
    }
    pub fn head_sparsity(&self) -> f64 {
        mean(self.layers.iter().map(LayerStats::head_sparsity))
    }
    /// MLP weights read per token over all layers, as a fraction of what the dense MLPs read.
    pub fn mlp_read_fraction(&self) -> f64 {
        let (r, d) = self.layers.iter().fold((0.0, 0.0), |(r, d), l| (r + l.mlp_read, d + l.mlp_dense_read));
        if d == 0.0 { 0.0 } else { r / d }
    }
    pub fn merge(&mut self, other: &SparsityStats) {
        if self.layers.len() < other.layers.len() {
            self.layers.resize(other.layers.len(), LayerStats::default());
        }
        for (a, b) in self.layers.iter_mut().zip(&other.layers) {
            a.merge(b);
        }
    }
}

fn mean(it: impl Iterator<Item = f64>) -> f64 {
    let v: Vec<f64> = it.collect();
    if v.is_empty() { 0.0 } else { v.iter().sum::<f64>() / v.len() as f64 }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn natural_zeros_are_counted_apart_from_plan_drops() {
        let mut s = SparsityStats::new(1);
        s.layers[0].add_token(10, 6, 2, 4, 3);
        s.layers[0].add_token(10, 0, 5, 4, 4);
        let l = &s.layers[0];
        assert_eq!((l.tokens, l.mlp_total, l.mlp_dropped, l.mlp_natural_zero), (2, 20, 7, 6));
        assert!((l.mlp_sparsity() - 13.0 / 20.0).abs() < 1e-12);
        assert!((l.mlp_plan_sparsity() - 7.0 / 20.0).abs() < 1e-12);
        assert!((l.mlp_token_min - 0.5).abs() < 1e-12 && (l.mlp_token_max - 0.8).abs() < 1e-12);
        assert!((l.head_sparsity() - 1.0 / 8.0).abs() < 1e-12);
        let mut t = SparsityStats::new(1);
        t.merge(&s);
        t.merge(&s);
        assert_eq!(t.layers[0].mlp_dropped, 14);
        assert_eq!(t.layers[0].mlp_token_min, 0.5);
    }
}
