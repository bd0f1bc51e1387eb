//! Sparse (or corrected sparse) continuations judged against dense greedy ones on a set of prompts: the
//! exact-continuation rate, where the first divergence falls, and what the correction cost. Pure bookkeeping over
//! token ids, written once for every decoder.

use std::time::Duration;

use serde::Serialize;

/// Index of the first position where `a` and `b` differ, or `None` when one is a prefix of the other (so, over
/// their common length, they agree).
pub fn first_divergence(a: &[u32], b: &[u32]) -> Option<usize> {
    a.iter().zip(b).position(|(x, y)| x != y)
}

/// One prompt's continuation in one setting, against the dense greedy continuation of the same prompt.
#[derive(Debug, Clone, Serialize)]
pub struct Outcome {
    pub new_ids: Vec<u32>,
    /// Equal to the dense greedy continuation, token for token and in length.
    pub exact: bool,
    /// First differing position (`None`: no difference over the common length).
    pub first_divergence: Option<usize>,
    /// Tokens produced by the sparse model (all of them uncorrected; those the dense model kept when corrected).
    pub sparse_tokens: usize,
    pub dense_passes: usize,
    pub accepted_runs: Vec<usize>,
    pub seconds: f64,
    /// Sparse steps run (rejected proposals included) and their wall time; wall time of the dense checks.
    pub sparse_steps: usize,
    pub sparse_seconds: f64,
    pub check_seconds: f64,
}

impl Outcome {
    /// `new_ids` judged against `dense`.
    pub fn judge(new_ids: Vec<u32>, dense: &[u32], sparse_tokens: usize, dense_passes: usize, accepted_runs: Vec<usize>, elapsed: Duration) -> Outcome {
        let first = first_divergence(&new_ids, dense);
        let exact = first.is_none() && new_ids.len() == dense.len();
        Outcome {
            new_ids,
            exact,
            first_divergence: first,
            sparse_tokens,
            dense_passes,
            accepted_runs,
            seconds: elapsed.as_secs_f64(),
            sparse_steps: 0,
            sparse_seconds: 0.0,
            check_seconds: 0.0,
        }
    }

    /// With what a corrected decode spent where (sparse steps, dense checks).
    pub fn with_costs(mut self, sparse_steps: usize, sparse: Duration, checks: Duration) -> Outcome {
        self.sparse_steps = sparse_steps;
        self.sparse_seconds = sparse.as_secs_f64();
        self.check_seconds = checks.as_secs_f64();
        self
    }
}

/// The totals of one setting over a prompt set.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Summary {
    pub prompts: usize,
    pub tokens: usize,
    /// Prompts whose continuation equals dense greedy's.
    pub exact: usize,
    /// Mean first-divergence position, a prompt without divergence counting as its continuation's length.
    pub mean_first_divergence: f64,
    /// The same over the prompts that diverge only (`None` when none does).
    pub mean_first_divergence_diverged: Option<f64>,
    pub sparse_tokens: usize,
    pub dense_passes: usize,
    pub accepted_runs: usize,
    pub accepted_tokens: usize,
    pub seconds: f64,
    pub sparse_steps: usize,
    pub sparse_seconds: f64,
    pub check_seconds: f64,
}

impl Summary {
    pub fn of(outcomes: &[Outcome]) -> Summary {
        let mut s = Summary { prompts: outcomes.len(), ..Summary::default() };
        let (mut div_sum, mut div_all, mut diverged) = (0usize, 0usize, 0usize);
        for o in outcomes {
            s.tokens += o.new_ids.len();
            s.exact += o.exact as usize;
            match o.first_divergence {
                Some(p) => {
                    div_sum += p;
                    div_all += p;
                    diverged += 1;
                }
                None => div_all += o.new_ids.len(),
            }
            s.sparse_tokens += o.sparse_tokens;
            s.dense_passes += o.dense_passes;
            s.accepted_runs += o.accepted_runs.len();
            s.accepted_tokens += o.accepted_runs.iter().sum::<usize>();
            s.seconds += o.seconds;
            s.sparse_steps += o.sparse_steps;
            s.sparse_seconds += o.sparse_seconds;
            s.check_seconds += o.check_seconds;
        }
        s.mean_first_divergence = div_all as f64 / s.prompts.max(1) as f64;
        s.mean_first_divergence_diverged = (diverged > 0).then(|| div_sum as f64 / diverged as f64);
        s
    }
    pub fn exact_rate(&self) -> f64 {
        self.exact as f64 / self.prompts.max(1) as f64
    }
    pub fn sparse_fraction(&self) -> f64 {
        self.sparse_tokens as f64 / self.tokens.max(1) as f64
    }
    pub fn dense_passes_per_100(&self) -> f64 {
        100.0 * self.dense_passes as f64 / self.tokens.max(1) as f64
    }
    /// Mean accepted run per check (`None` without checks).
    pub fn mean_accepted_run(&self) -> Option<f64> {
        (self.accepted_runs > 0).then(|| self.accepted_tokens as f64 / self.accepted_runs as f64)
    }
    pub fn ms_per_token(&self) -> f64 {
        1e3 * self.seconds / self.tokens.max(1) as f64
    }
    /// Mean wall time of a corrected decode's sparse step, ms (`None` when no step was timed).
    pub fn ms_per_sparse_step(&self) -> Option<f64> {
        super::mean_ms(self.sparse_seconds, self.sparse_steps)
    }
    /// Mean wall time of one dense check, ms (`None` without checks).
    pub fn ms_per_check(&self) -> Option<f64> {
        super::mean_ms(self.check_seconds, self.dense_passes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn divergence_and_exactness() {
        assert_eq!(first_divergence(&[1, 2, 3], &[1, 2, 3]), None);
        assert_eq!(first_divergence(&[1, 2, 3], &[1, 9, 3]), Some(1));
        assert_eq!(first_divergence(&[5], &[6, 7]), Some(0));
        // A continuation that stopped early (EOS) agrees over the common length but is not exact.
        assert_eq!(first_divergence(&[1, 2], &[1, 2, 3]), None);
        let d = Duration::ZERO;
        assert!(Outcome::judge(vec![1, 2, 3], &[1, 2, 3], 3, 0, vec![], d).exact);
        assert!(!Outcome::judge(vec![1, 2], &[1, 2, 3], 2, 0, vec![], d).exact);
    }

    #[test]
    fn summary_by_hand() {
        let d = Duration::from_millis(100);
        let dense = [1u32, 2, 3, 4];
        let outs = vec![
            Outcome::judge(vec![1, 2, 3, 4], &dense, 3, 1, vec![3], d),    // exact
            Outcome::judge(vec![1, 2, 9, 9], &dense, 4, 2, vec![2, 2], d), // diverges at 2
            Outcome::judge(vec![7, 2, 3, 4], &dense, 1, 1, vec![1], d),    // diverges at 0
        ];
        let s = Summary::of(&outs);
        assert_eq!((s.prompts, s.tokens, s.exact), (3, 12, 1));
        assert!((s.exact_rate() - 1.0 / 3.0).abs() < 1e-12);
        // (4 + 2 + 0) / 3 and (2 + 0) / 2.
        assert!((s.mean_first_divergence - 2.0).abs() < 1e-12);
        assert_eq!(s.mean_first_divergence_diverged, Some(1.0));
        assert!((s.sparse_fraction() - 8.0 / 12.0).abs() < 1e-12);
        assert!((s.dense_passes_per_100() - 100.0 * 4.0 / 12.0).abs() < 1e-12);
        assert_eq!(s.mean_accepted_run(), Some(2.0));
        assert!((s.ms_per_token() - 300.0 / 12.0).abs() < 1e-9);
        assert_eq!(Summary::of(&[]).mean_accepted_run(), None);
    }
}
