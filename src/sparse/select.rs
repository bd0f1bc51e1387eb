//! The host reference for choosing units: which neurons or heads a score vector keeps. Every engine (the burn
//! reference, the CUDA kernels) must keep exactly these sets, so the rules are chosen to be reproducible on a GPU:
//! a threshold keeps scores `>= t`; a top-k keeps the `k` largest and breaks ties by the lower index.
//! NaN scores rank below every number (a NaN is never kept by a threshold, and last in a top-k).

use std::cmp::Ordering;

/// Ranking of two `(index, score)` pairs for top-k: larger score first, then lower index; NaN last.
fn rank(a: (usize, f32), b: (usize, f32)) -> Ordering {
    let key = |x: f32| if x.is_nan() { f32::NEG_INFINITY } else { x };
    match key(b.1).partial_cmp(&key(a.1)).unwrap_or(Ordering::Equal) {
        Ordering::Equal => match (a.1.is_nan(), b.1.is_nan()) {
            (false, true) => Ordering::Less,
            (true, false) => Ordering::Greater,
            _ => a.0.cmp(&b.0),
        },
        o => o,
    }
}

/// Indices of the `k` largest `scores` (ties broken by the lower index), in ascending index order.
/// `k >= scores.len()` keeps everything; `k = 0` keeps nothing.
pub fn top_k(scores: &[f32], k: usize) -> Vec<usize> {
    let n = scores.len();
    if k >= n {
        return (0..n).collect();
    }
    if k == 0 {
        return Vec::new();
    }
    let mut idx: Vec<usize> = (0..n).collect();
    idx.select_nth_unstable_by(k - 1, |&a, &b| rank((a, scores[a]), (b, scores[b])));
    let mut kept = idx[..k].to_vec();
    kept.sort_unstable();
    kept
}

/// `keep[i]` = whether unit `i` is among the top `k` of `scores` (see [`top_k`]).
pub fn top_k_mask(scores: &[f32], k: usize, keep: &mut [bool]) {
    debug_assert_eq!(scores.len(), keep.len());
    keep.fill(false);
    for i in top_k(scores, k) {
        keep[i] = true;
    }
}

/// `keep[i]` = `scores[i] >= t` (NaN is never kept).
pub fn threshold_mask(scores: &[f32], t: f32, keep: &mut [bool]) {
    debug_assert_eq!(scores.len(), keep.len());
    for (k, &s) in keep.iter_mut().zip(scores) {
        *k = s >= t;
    }
}

/// Row-wise top-k over `rows` rows of `n` scores each: a 0/1 mask of the same layout (what the reference forward
/// multiplies by).
pub fn top_k_rows(scores: &[f32], n: usize, k: usize) -> Vec<f32> {
    let mut out = vec![0.0f32; scores.len()];
    if n == 0 {
        return out;
    }
    for (row, dst) in scores.chunks_exact(n).zip(out.chunks_exact_mut(n)) {
        for i in top_k(row, k) {
            dst[i] = 1.0;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mask(scores: &[f32], k: usize) -> Vec<bool> {
        let mut m = vec![false; scores.len()];
        top_k_mask(scores, k, &mut m);
        m
    }

    #[test]
    fn ties_break_by_lower_index() {
        // Four-way tie at 2.0 for the last two places: indices 1 and 2 win over 4 and 5.
        let s = [1.0, 2.0, 2.0, 3.0, 2.0, 2.0];
        assert_eq!(top_k(&s, 3), vec![1, 2, 3]);
        assert_eq!(top_k(&s, 4), vec![1, 2, 3, 4]);
        assert_eq!(top_k(&[5.0; 8], 3), vec![0, 1, 2]);
    }

    #[test]
    fn k_zero_and_k_all() {
        let s = [0.5, -1.0, 7.0];
        assert!(top_k(&s, 0).is_empty());
        assert_eq!(mask(&s, 0), vec![false; 3]);
        assert_eq!(top_k(&s, 3), vec![0, 1, 2]);
        assert_eq!(top_k(&s, 10), vec![0, 1, 2]);
        assert!(top_k(&[], 2).is_empty());
    }

    #[test]
    fn nan_ranks_last_and_is_never_thresholded_in() {
        let s = [f32::NAN, 1.0, f32::NEG_INFINITY, 0.0];
        assert_eq!(top_k(&s, 2), vec![1, 3]);
        assert_eq!(top_k(&s, 3), vec![1, 2, 3]);
        let mut m = [true; 4];
        threshold_mask(&s, f32::NEG_INFINITY, &mut m);
        assert_eq!(m, [false, true, true, true]);
    }

    #[test]
    fn threshold_keeps_exact_values() {
        let s = [0.25f32, 0.5, 0.5000001, 0.4999999, -0.5];
        let mut m = [false; 5];
        threshold_mask(&s, 0.5, &mut m);
        assert_eq!(m, [false, true, true, false, false]);
        threshold_mask(&s, 0.0, &mut m);
        assert_eq!(m, [true, true, true, true, false]);
    }

    #[test]
    fn top_k_agrees_with_a_full_sort() {
        // Independent check: a stable sort by descending score keeps lower indices first among ties.
        let mut x = 12345u64;
        for n in [1usize, 2, 7, 64, 300] {
            let s: Vec<f32> = (0..n)
                .map(|_| {
                    x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                    ((x >> 40) % 17) as f32 // many ties
                })
                .collect();
            for k in [0, 1, n / 2, n.saturating_sub(1), n] {
                let mut order: Vec<usize> = (0..n).collect();
                order.sort_by(|&a, &b| s[b].partial_cmp(&s[a]).unwrap());
                let mut want = order[..k.min(n)].to_vec();
                want.sort_unstable();
                assert_eq!(top_k(&s, k), want, "n={n} k={k}");
            }
        }
    }

    #[test]
    fn rows_are_independent() {
        let s = [3.0, 1.0, 2.0, 0.0, 0.0, 9.0];
        assert_eq!(top_k_rows(&s, 3, 1), vec![1.0, 0.0, 0.0, 0.0, 0.0, 1.0]);
        assert_eq!(top_k_rows(&s, 3, 2), vec![1.0, 0.0, 1.0, 1.0, 0.0, 1.0]);
    }
}
