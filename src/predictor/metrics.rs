//! Held-out metrics of a predictor: the recall curve over k, the smallest k reaching a target recall, and the
//! per-layer row written to `metrics.csv` and the manifest.

/// Metrics of one layer's predictors on the held-out tokens.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct LayerMetrics {
    pub layer: usize,
    pub k_neurons: usize,
    pub ffn: usize,
    /// k_neurons / ffn
    pub neuron_density: f64,
    pub neuron_recall: f64,
    pub neuron_precision: f64,
    /// Mean fraction of neurons labelled active.
    pub neuron_label_density: f64,
    pub neuron_pos_weight: f64,
    pub neuron_epochs: usize,
    /// Held-out neuron recall when keeping the top half of the neurons (k = ffn/2).
    pub neuron_recall_at_half: f64,
    pub k_heads: usize,
    pub heads: usize,
    pub head_density: f64,
    pub head_recall: f64,
    pub head_precision: f64,
    pub head_label_density: f64,
    pub head_epochs: usize,
    /// Held-out head recall when keeping floor(0.7 × heads) heads.
    pub head_recall_at_70: f64,
    pub seconds: f64,
}

/// `hits[k]` = labelled units among each row's top-`k` scores, summed over rows, for `k = 0..=n`.
pub(super) fn hits_by_k(scores: &[f32], labels: &[u8], n: usize) -> Vec<u64> {
    let mut hist = vec![0u64; n + 1];
    let mut idx: Vec<usize> = Vec::with_capacity(n);
    for (row, lab) in scores.chunks_exact(n).zip(labels.chunks_exact(n)) {
        idx.clear();
        idx.extend(0..n);
        idx.sort_unstable_by(|&a, &b| row[b].total_cmp(&row[a]));
        for (rank, &i) in idx.iter().enumerate() {
            hist[rank + 1] += lab[i] as u64;
        }
    }
    for k in 1..=n {
        hist[k] += hist[k - 1];
    }
    hist
}

/// Smallest `k` whose recall reaches `target`, with its recall and precision over `rows` rows.
pub(super) fn k_at_recall(hits: &[u64], target: f64, rows: usize) -> (usize, f64, f64) {
    let n = hits.len() - 1;
    let p = hits[n];
    if p == 0 {
        return (0, 1.0, 1.0);
    }
    let need = ((target * p as f64) - 1e-9).ceil().max(0.0) as u64;
    let k = hits.iter().position(|&h| h >= need).unwrap_or(n);
    let recall = hits[k] as f64 / p as f64;
    let precision = if k == 0 { 1.0 } else { hits[k] as f64 / (k * rows) as f64 };
    (k, recall, precision)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recall_curve_and_k() {
        // Two rows of 4; labels {0,1} and {3}.
        let scores = [0.9, 0.8, 0.1, 0.0, 0.5, 0.4, 0.3, 0.2];
        let labels = [1, 1, 0, 0, 0, 0, 0, 1];
        let hits = hits_by_k(&scores, &labels, 4);
        assert_eq!(hits, vec![0, 1, 2, 2, 3]);
        assert_eq!(k_at_recall(&hits, 0.6, 2).0, 2);
        let (k, r, p) = k_at_recall(&hits, 1.0, 2);
        assert_eq!((k, r), (4, 1.0));
        assert!((p - 3.0 / 8.0).abs() < 1e-12);
    }
}
