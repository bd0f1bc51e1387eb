//! The dense one-row MLP in one launch (`mlp_fused_*`, kernels/mlp.cu): each block streams its neurons' gate /
//! up rows and then their down rows from a transposed copy made at start, so no launch boundary sits between the
//! two products. Which shapes take it, the copies, and the block size picked per shape ([`crate::launch::mlpf_pick`]).

use cudarc::driver::sys::{CUdeviceptr, CUfunction};

use crate::config::ModelConfig;
use crate::launch::mlpf_pick;

use crate::cuda::gpu::{Args, GpuError, GpuResult};
use super::Launcher;

/// Threads of a fused-MLP block (W = 8 warps in kernels/mlp.cu; the `_x16` kernels take twice as many).
const MLPF_THREADS: u32 = 256;

/// Widths the fused MLP takes: input `k` and output `d` multiples of 8, `d` within 4 16-byte words a thread, the
/// staged input within the default 48 KB of shared memory.
pub fn mlp_fused_fits(k: usize, d: usize) -> bool {
    k % 8 == 0 && d % 8 == 0 && k > 0 && d > 0 && d / 8 <= 4 * MLPF_THREADS as usize && k * 4 <= 48 * 1024
}

/// Whether an engine for `cfg` runs the one-launch MLP: `DEJAVU_MLP_FUSE=0` no, `=1` wherever
/// [`mlp_fused_fits`], unset at widths 2,049-5,120, where it was measured to win. Side by side on an H100
/// (`bench --prompt 128 --tokens 128`, kernels/NOTES.md) it took Llama-2-7B f16 from 5.11 to 5.06 ms and OPT-6.7B
/// from 5.14 to 5.04 (bf16 alike), and with 16-warp blocks OPT-13B from 9.41 to 9.13 and Llama-2-13B from 9.31 to
/// 9.11. It is not used below width 2,048 (the norm is fused into the GEMV there), nor by default above 5,120:
/// OPT-30B gained 2% forced, but its copies (20 GB at f16) would no longer leave it room on an 80 GB card.
pub fn mlp_fuse_default(cfg: &ModelConfig) -> bool {
    let fits = mlp_fused_fits(cfg.hidden, cfg.hidden);
    match std::env::var("DEJAVU_MLP_FUSE") {
        Ok(v) => v != "0" && fits,
        Err(_) => fits && cfg.hidden > 2048 && cfg.hidden <= 5120,
    }
}

impl Launcher {
    /// Device bytes an engine for `cfg` holds beyond the checkpoint's weights at start: the fused MLP's
    /// transposed down copies when the fused MLP is on ([`mlp_fuse_default`]; for `bench`'s fit check).
    pub fn extra_weight_bytes(cfg: &ModelConfig) -> usize {
        if mlp_fuse_default(cfg) {
            cfg.layers * cfg.ffn * cfg.hidden * 2
        } else {
            0
        }
    }

    /// Make [`Launcher::down_t`], the transposed down copies of every layer (the fused MLP's widths only, see
    /// [`mlp_fused_fits`]).
    pub(in crate::cuda) fn transpose_downs(&mut self) -> GpuResult<()> {
        if mlp_fused_fits(self.cfg.hidden, self.cfg.hidden) {
            let (d, f) = (self.cfg.hidden, self.cfg.ffn);
            for l in 0..self.cfg.layers {
                let b = self.gpu.alloc(f * d * 2)?;
                crate::cuda::gather::transpose(self, self.w.layers[l].down.ptr, b.ptr, d, f)?;
                self.down_t.push(b);
            }
            self.gpu.sync()?;
        }
        Ok(())
    }

    /// `out[:] += down_b + down^T act(up . x)` for one 16-bit input row `x` in one launch (`mlp_fused_*`): `up`
    /// `[2F, k]` (gate rows, then up rows) with `glu`, else fc1 `[F, k]`; `wt` the transposed down `[F, d]`; `out`
    /// the f32 residual stream `[d]`; `warps` a block, 8 or 16. Shapes [`mlp_fused_fits`] refuses are an error.
    #[allow(clippy::too_many_arguments)]
    pub fn mlp_fused(&self, up: CUdeviceptr, up_b: Option<CUdeviceptr>, wt: CUdeviceptr, down_b: Option<CUdeviceptr>, x: CUdeviceptr, out: CUdeviceptr, f: usize, k: usize, d: usize, glu: bool, warps: u32) -> GpuResult<()> {
        if !mlp_fused_fits(k, d) || ![8, 16].contains(&warps) {
            return Err(GpuError(format!("internal: the fused MLP takes widths that are multiples of 8 up to 8192 and 8 or 16 warps (k {k}, d {d}, {warps} warps)")));
        }
        let (func, threads) = self.mlpf_kernel(d, glu, warps)?;
        let (w2, b2) = if glu { (up + (f * k * 2) as u64, up_b.map_or(0, |b| b + (f * 2) as u64)) } else { (0, 0) };
        let smem = k * 4;
        let grid = self.block_grid(func, f.div_ceil(warps as usize), threads, smem)?;
        let mut args = Args::new()
            .ptr(up)
            .ptr(w2)
            .ptr(up_b.unwrap_or(0))
            .ptr(b2)
            .ptr(wt)
            .ptr(down_b.unwrap_or(0))
            .ptr(x)
            .ptr(out)
            .i32(f as i32)
            .i32(k as i32)
            .i32(d as i32);
        self.gpu.launch(func, (grid, 1, 1), threads, smem as u32, &mut args)
    }

    /// The fused-MLP kernel for output width `d` with `warps` warps a block, and its threads a block.
    fn mlpf_kernel(&self, d: usize, glu: bool, warps: u32) -> GpuResult<(CUfunction, u32)> {
        let threads = 32 * warps;
        let mw = (d / 8).div_ceil(threads as usize);
        let x16 = if warps == 16 { "_x16" } else { "" };
        let name = format!("mlp_fused_{}_{}_w{mw}{x16}", self.dt().name(), if glu { "glu" } else { "relu" });
        Ok((self.k.get(&name)?, threads))
    }

    /// Warps a fused-MLP block for `f` neurons of input width `k` and output width `d` by [`mlpf_pick`] from the
    /// occupancy of both kernels.
    pub(in crate::cuda) fn mlpf_warps_for(&self, f: usize, k: usize, d: usize, glu: bool) -> GpuResult<u32> {
        let per_sm = |warps: u32| -> GpuResult<usize> {
            let (func, threads) = self.mlpf_kernel(d, glu, warps)?;
            Ok(self.blocks_per_sm(func, threads, k * 4)? as usize)
        };
        Ok(mlpf_pick(f, self.gpu.sms as usize, per_sm(8)?, per_sm(16)?))
    }
}
