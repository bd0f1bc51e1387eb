//! How the CUDA engine (`cuda`, feature `cuda`) lays a kernel's work over the GPU: the arithmetic behind its grid
//! and block-size choices, from the shapes and the occupancy the engine reads at run time. No CUDA here, so this
//! module builds without the feature and its tests run on every machine (CI has no GPU); the engine calls it with
//! what the driver reports.

/// Dynamic shared memory a GEMV-like block may take to stage its f32 inputs (the engine raises each kernel's
/// limit to this).
pub const GEMV_SMEM: usize = 200 * 1024;

/// Rows a GEMV launch takes at once, rounded up to the batch sizes its kernels are instantiated for (1, 2, 4, 8,
/// 16).
pub fn k_of(n: usize) -> usize {
    [1, 2, 4, 8, 16].into_iter().find(|&b| b >= n).unwrap_or(16)
}

/// Warps a row the one-row GEMV may take (`gemv_grp{S}_*`, S > 1).
const GROUPS: [usize; 3] = [1, 2, 4];

/// Warps a row for `n` rows of width `k` over `warps` resident warps: at s warps a row a warp's work is
/// ceil(n s / warps) / s rows; the fewest s within 5% of the least, or 1 unless that saves at least 10% (Llama-2-7B's
/// gate/up rows, 11,008 on 2,112 warps, split in two would save 8% of a warp's rows and measured 0.2-0.4% slower a
/// token on an H100; Llama-2-13B's out- and down-projections, 5,120 rows, save 37% at four). A part must
/// hold at least one full round of a warp's loads (k / s >= 1,024: 32 lanes x 4 loads of 8 elements), since a
/// shorter row takes one round whatever its split (SmolLM2's k = 576 split four ways measured 10% slower). N = 5,120
/// on 4,224 warps: 2 rows' time at s = 1, 1.25 at s = 4; N = 4,096: 1 either way.
pub fn split_for(n: usize, k: usize, warps: usize) -> usize {
    let allowed = |s: &usize| k / s >= 1024;
    let work = |s: usize| (n * s).div_ceil(warps.max(1)) as f64 / s as f64;
    let best = GROUPS.iter().filter(|s| allowed(s)).map(|&s| work(s)).fold(f64::INFINITY, f64::min);
    let s = GROUPS.iter().copied().filter(allowed).find(|&s| work(s) <= best * 1.05).unwrap_or(1);
    if work(s) <= work(1) * 0.90 {
        s
    } else {
        1
    }
}

/// Neurons the busiest multiprocessor sums in a fused-MLP launch over `f` neurons with `warps` warps a block on a
/// grid of `grid` blocks: chunks of `warps` neurons go to the blocks in turn (chunk c to block c mod grid,
/// kernels/mlp.cu) and the blocks to the `sms` multiprocessors in waves (block b to b mod sms). Only which
/// multiprocessors get a wave's extra blocks depends on that last assumption, not the maximum.
pub fn mlpf_busiest(f: usize, warps: usize, grid: usize, sms: usize) -> usize {
    let chunks = f.div_ceil(warps.max(1));
    let grid = grid.clamp(1, chunks.max(1));
    let sms = sms.max(1);
    let mut per_sm = vec![0usize; sms.min(grid)];
    for b in 0..grid {
        per_sm[b % sms] += chunks / grid + usize::from(b < chunks % grid);
    }
    per_sm.into_iter().max().unwrap_or(0) * warps
}

/// Warps a fused-MLP block for `f` neurons on `sms` multiprocessors that hold `per_sm8` 8-warp blocks or
/// `per_sm16` 16-warp blocks at once: 16 unless the 8-warp kernel keeps at least as many warps resident and its
/// busiest multiprocessor sums fewer neurons ([`mlpf_busiest`]). Measured on an H100 (kernels/NOTES.md,
/// twenty-seventh session): at width 5,120 the 8-warp kernel holds three words of the output a thread, one block a
/// multiprocessor, and 16 warps took OPT-13B and Llama-2-13B 2-3% faster; at width 4,096 both keep 16 warps a
/// multiprocessor, and the 16-warp blocks were 1.3% faster at OPT-6.7B and 0.9% at Mistral-7B (the same busiest
/// multiprocessor) but 0.7% slower at Llama-2-7B (11,008 neurons: 96 on the busiest against 88).
pub fn mlpf_pick(f: usize, sms: usize, per_sm8: usize, per_sm16: usize) -> u32 {
    let sms = sms.max(1);
    let (c8, c16) = (f.div_ceil(8), f.div_ceil(16));
    let (g8, g16) = (c8.min(per_sm8.max(1) * sms), c16.min(per_sm16.max(1) * sms));
    if per_sm8 * 8 >= per_sm16 * 16 && mlpf_busiest(f, 8, g8, sms) < mlpf_busiest(f, 16, g16, sms) {
        8
    } else {
        16
    }
}

/// 16-byte weight loads a lane holds in `pred_hidden_*` (`PRED_PL` in kernels/predict.cu).
const PRED_LOADS: usize = 8;

/// The warps sharing one hidden row in the predictors' `pred_hidden_*` for input width `d` and `rows` rows (4 or
/// 8: the fewest whose slices fit the 8 16-byte loads a lane holds), or None where the kernel does not apply (more
/// than 4 rows, `d` not a multiple of 8, slices too long, inputs beyond the shared memory).
pub fn hidden_split(d: usize, rows: usize) -> Option<usize> {
    if rows == 0 || rows > 4 || d % 8 != 0 || rows * d * 4 > GEMV_SMEM {
        return None;
    }
    [4usize, 8].into_iter().find(|s| (d / 8).div_ceil(*s) <= 32 * PRED_LOADS)
}

#[cfg(test)]
mod tests {
    use super::{hidden_split, k_of, mlpf_busiest, mlpf_pick, split_for};

    #[test]
    fn fused_mlp_warps_follow_the_busiest_multiprocessor() {
        // Worked by hand, 132 multiprocessors. Llama-2-7B, 11,008 neurons: 8 warps, 2 blocks a multiprocessor,
        // 1,376 chunks on 264 blocks = 5 each and 56 with 6, so at most 6 + 5 chunks of 8 = 88 neurons; 16 warps,
        // 1 block, 688 chunks on 132 = 5 each and 28 with 6: 96.
        assert_eq!(mlpf_busiest(11008, 8, 264, 132), 88);
        assert_eq!(mlpf_busiest(11008, 16, 132, 132), 96);
        assert_eq!(mlpf_pick(11008, 132, 2, 1), 8);
        // Mistral-7B, 14,336: 1,792 chunks on 264 = 6 each and 208 with 7, so 76 multiprocessors hold 7 + 7 = 14
        // chunks, 112 neurons; 896 on 132 = 6 and 104 with 7: 112. A tie takes 16.
        assert_eq!(mlpf_busiest(14336, 8, 264, 132), 112);
        assert_eq!(mlpf_busiest(14336, 16, 132, 132), 112);
        assert_eq!(mlpf_pick(14336, 132, 2, 1), 16);
        // OPT-6.7B, 16,384: 2,048 chunks on 264 = 7 each and 200 with 8, so 68 multiprocessors hold 8 + 8 = 16
        // chunks, 128 neurons; 1,024 on 132 = 7 and 100 with 8: 128. 16.
        assert_eq!(mlpf_busiest(16384, 8, 264, 132), 128);
        assert_eq!(mlpf_busiest(16384, 16, 132, 132), 128);
        assert_eq!(mlpf_pick(16384, 132, 2, 1), 16);
        // Llama-2-13B, 13,824, and OPT-13B, 20,480: the 8-warp kernel holds 1 block (8 warps) a multiprocessor,
        // fewer than 16, so 16 even where 8 would put fewer neurons on the busiest one.
        assert_eq!(mlpf_pick(13824, 132, 1, 1), 16);
        assert_eq!(mlpf_pick(20480, 132, 1, 1), 16);
        assert_eq!(mlpf_pick(11008, 132, 1, 1), 16);
        // Fewer chunks than blocks: 100 neurons, 13 chunks of 8 on 13 blocks, one a multiprocessor: 8.
        assert_eq!(mlpf_busiest(100, 8, 264, 132), 8);
    }

    #[test]
    fn split_balances_rows_just_above_a_multiple_of_the_warps() {
        // Worked by hand: 5,120 rows on 4,224 warps take 2 rows' time at 1 warp a row, 3/2 at 2, 5/4 at 4.
        assert_eq!(split_for(5120, 5120, 4224), 4);
        // 4,096 rows: one round at 1 warp a row; 12,288: 3 rows' time at every split; no split.
        assert_eq!(split_for(4096, 4096, 4224), 1);
        assert_eq!(split_for(12288, 4096, 4224), 1);
        // 15,360 rows (13B q/k/v): 4 at 1, 8/2 = 4 at 2, 15/4 = 3.75 at 4 (6% less): under 10%.
        assert_eq!(split_for(15360, 5120, 4224), 1);
        // 11,008 GLU rows on 2,112 warps: 6 at 1, 11/2 = 5.5 at 2 (8% less), 21/4 = 5.25 at 4: under 10%.
        assert_eq!(split_for(11008, 4096, 2112), 1);
        // 7,000 rows on 4,224 warps: 2 at 1, 4/2 = 2 at 2, 7/4 = 1.75 at 4 (12.5% less).
        assert_eq!(split_for(7000, 4096, 4224), 4);
        // 13,824 on 2,112: 7 at 1, 7 at 2, 27/4 = 6.75 at 4 (3.6% less): not worth splitting.
        assert_eq!(split_for(13824, 5120, 2112), 1);
        // Fewer rows than warps but short rows (SmolLM2's 576 x 576): a part would be under one round of loads.
        assert_eq!(split_for(576, 576, 4224), 1);
        // The same rows at width 2,048 may split in two, not four (1,024 a part at least).
        assert_eq!(split_for(576, 2048, 4224), 2);
    }

    #[test]
    fn hidden_split_fits_the_lanes_registers() {
        // Llama-2-7B, OPT-13B, Llama-2-70B widths take 4 warps a row; OPT-175B's 12288 needs 8 (384 loads a slice
        // at 4 would exceed 256); past 4 rows or at widths not a multiple of 8 the GEMV path stays.
        assert_eq!(hidden_split(4096, 1), Some(4));
        assert_eq!(hidden_split(5120, 4), Some(4));
        assert_eq!(hidden_split(8192, 1), Some(4));
        assert_eq!(hidden_split(12288, 1), Some(8));
        assert_eq!(hidden_split(4096, 5), None);
        assert_eq!(hidden_split(100, 1), None);
        assert_eq!(hidden_split(32768, 1), None);
    }

    #[test]
    fn row_counts_round_up_to_an_instantiated_batch() {
        let got: Vec<usize> = [1, 2, 3, 5, 8, 9, 16, 17].into_iter().map(k_of).collect();
        assert_eq!(got, [1, 2, 4, 8, 8, 16, 16, 16]);
    }
}
