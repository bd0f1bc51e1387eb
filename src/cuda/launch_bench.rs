//! `bench --launch-cost`: what one launch boundary costs our one-row GEMV apart from its bytes. The same weight
//! bytes are read by one launch over C x N rows and by a chain of C launches of N rows each (consecutive slices of
//! the same matrix, each into its own outputs), one CUDA graph each, the L2 flushed before every replay, the chain's
//! kernels joined by programmatic dependent launch as in a decode step. The difference over the C - 1 boundaries
//! is the fixed cost of a boundary; if it is near zero, the GEMVs' distance from the floor is their streaming
//! rate, not their launches. A third graph runs the same C slices in one persistent launch (`gemv_chain_*`), the
//! slices separated by a grid barrier, a warp's first loads of its next slice issued before it: what a decode step
//! kept in one kernel a layer would pay a phase instead of a launch.

use crate::bench::Shape;
use crate::source::weights::Half;

use super::launcher::Epi;
use super::gpu::GpuResult;
use super::mlp_bench::{one_layer, time_graph, FLUSH_BYTES};
use super::weights::Weights;

/// One matrix shape's pair of timings.
#[derive(Debug, Clone, serde::Serialize)]
pub struct LaunchCost {
    pub shape: String,
    /// Which decode matrix the N x K slice stands for.
    pub matrix: &'static str,
    pub n: usize,
    pub k: usize,
    /// Launches in the chain (C).
    pub chain: usize,
    /// Median of the one launch over C x N rows, µs.
    pub one_us: f64,
    /// Median of the chain of C launches, µs.
    pub chain_us: f64,
    /// (chain - one) / (C - 1), µs.
    pub per_boundary_us: f64,
    /// Median of the C slices in one persistent launch separated by grid barriers, µs.
    pub barrier_us: f64,
    /// (barrier - one) / (C - 1), µs.
    pub per_barrier_us: f64,
    /// The one launch's read rate, GB/s.
    pub one_gbps: f64,
    /// The device-to-device copy rate measured in the same process, GB/s.
    pub copy_gbps: f64,
}

/// Bytes the measurement needs on the GPU for `chain` launches at `sh`: the larger matrix set (N = d, K = ffn),
/// outputs, the flush buffer, the engine's one-layer weights at a 256-token vocabulary and headroom.
pub fn needed_bytes(sh: &Shape, chain: usize) -> usize {
    let (d, f) = (sh.hidden, sh.ffn);
    chain * d * f.max(d) * 2 + chain * d * 4 + FLUSH_BYTES + (4 * d * d + 3 * d * f) * 2 + (256 << 20)
}

/// Time one launch against a chain of `chain` launches at the shape's out-projection (N = K = d, `Acc`) and its
/// down-projection (N = d, K = ffn, `Acc`), `reps` replays each.
pub fn run(sh: &Shape, dt: Half, chain: usize, reps: usize) -> GpuResult<Vec<LaunchCost>> {
    let e = one_layer(sh, dt)?;
    let copy_bw = e.copy_bandwidth(1 << 30, 10)?;
    let flush = e.gpu.alloc(FLUSH_BYTES)?;
    let (d, f) = (e.cfg.hidden, e.cfg.ffn);
    let mut rows = Vec::new();
    for (matrix, n, kk) in [("out", d, d), ("down", d, f)] {
        let big = Weights::random_half(&e.gpu, &e.k, dt, chain * n * kk, 0x1a0c + kk as u64, (3.0 / kk as f64).sqrt() as f32)?;
        let x = Weights::random_half(&e.gpu, &e.k, dt, kk, 0x5eed, 1.0)?;
        let out = e.gpu.alloc(chain * n * 4)?;
        e.gpu.memset(&out, 0)?;
        let y = e.gpu.alloc(chain * n * 8)?;
        e.gpu.begin_capture()?;
        e.linear(big.ptr, None, x.ptr, out.ptr, 1, chain * n, kk, Epi::Acc, y.ptr)?;
        let one = e.gpu.end_capture()?;
        e.gpu.begin_capture()?;
        for c in 0..chain {
            e.linear(big.ptr + (c * n * kk * 2) as u64, None, x.ptr, out.ptr + (c * n * 4) as u64, 1, n, kk, Epi::Acc, y.ptr)?;
        }
        let chained = e.gpu.end_capture()?;
        let bar = e.gpu.alloc(8)?;
        e.gpu.memset(&bar, 0)?;
        e.gpu.begin_capture()?;
        e.gemv_chain(big.ptr, x.ptr, out.ptr, n, kk, chain, bar.ptr)?;
        let barred = e.gpu.end_capture()?;
        let (one_us, _) = time_graph(&e, &one, &flush, reps)?;
        let (chain_us, _) = time_graph(&e, &chained, &flush, reps)?;
        let (barrier_us, _) = time_graph(&e, &barred, &flush, reps)?;
        let bytes = (chain * n * kk * 2) as f64;
        rows.push(LaunchCost {
            shape: sh.name.to_string(),
            matrix,
            n,
            k: kk,
            chain,
            one_us,
            chain_us,
            per_boundary_us: (chain_us - one_us) / (chain.max(2) - 1) as f64,
            barrier_us,
            per_barrier_us: (barrier_us - one_us) / (chain.max(2) - 1) as f64,
            one_gbps: bytes / (one_us * 1e-6) / 1e9,
            copy_gbps: copy_bw / 1e9,
        });
    }
    Ok(rows)
}

/// The rows as markdown, with each one-launch time's ratio to its bytes at the copy rate.
pub fn table(rows: &[LaunchCost]) -> String {
    let mut s = String::from("| shape | matrix | slice N x K | launches | one launch us (GB/s, x copy floor) | chain us | us a boundary | barriers us | us a barrier |\n|---|---|---|---|---|---|---|---|---|\n");
    for r in rows {
        let floor_us = (r.chain * r.n * r.k * 2) as f64 / (r.copy_gbps * 1e9) * 1e6;
        s += &format!(
            "| {} | {} | {} x {} | {} | {:.1} ({:.0}, {:.3}x) | {:.1} | {:.2} | {:.1} | {:.2} |\n",
            r.shape,
            r.matrix,
            r.n,
            r.k,
            r.chain,
            r.one_us,
            r.one_gbps,
            r.one_us / floor_us,
            r.chain_us,
            r.per_boundary_us,
            r.barrier_us,
            r.per_barrier_us
        );
    }
    s
}
