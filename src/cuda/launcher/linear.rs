//! The engine's projections and norms: our GEMV kernels (one weight pass for up to 16 rows, the norm fused into
//! the staging of their input, the epilogues of `Epi`), cuBLAS past [`super::GEMV_MAX_ROWS`] rows, the batch-1
//! out-projection that merges the attention's key splits itself, the norm launches, and the grids of the
//! row-looping kernels (from the occupancy calculator; the arithmetic of the choices is in [`crate::launch`]).

use cudarc::driver::sys::{CUdeviceptr, CUfunction};

use crate::config::Family;
use crate::launch::{k_of, split_for, GEMV_SMEM};
use crate::source::weights::Half;

use crate::cuda::gpu::{Args, DBuf, GpuError, GpuResult};
use super::{Launcher, GEMV_MAX_ROWS, GEMV_THREADS};


/// Shared memory of the cp.async GEMV's ring: per thread, ASYNC_STAGES (4) x ASYNC_U (2) 16-byte slots per matrix
/// (kernels/gemv.cu), two matrices for the GLU.
fn gemv_ring_bytes(threads: usize, epi: Epi) -> usize {
    threads * 4 * 2 * 16 * if epi.is_glu() { 2 } else { 1 }
}

/// Projection epilogues, matching `kernels/gemv.cu`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Epi {
    Store,
    Acc,
    Relu,
    Glu,
    /// `Relu` and `Glu` writing f32 (one row, our GEMV only): the dense decode step's MLP hidden, read unrounded by
    /// the down projection.
    Relu32,
    Glu32,
}

impl Epi {
    fn name(self) -> &'static str {
        match self {
            Epi::Store => "store",
            Epi::Acc => "acc",
            Epi::Relu => "relu",
            Epi::Glu => "glu",
            Epi::Relu32 => "relu32",
            Epi::Glu32 => "glu32",
        }
    }

    fn is_glu(self) -> bool {
        matches!(self, Epi::Glu | Epi::Glu32)
    }

    /// The f32 hidden epilogues (one row, our GEMV only).
    pub(crate) fn is_f32_hidden(self) -> bool {
        matches!(self, Epi::Relu32 | Epi::Glu32)
    }

    /// Bytes of one output element.
    fn out_bytes(self) -> usize {
        match self {
            Epi::Relu | Epi::Glu => 2,
            Epi::Store | Epi::Acc | Epi::Relu32 | Epi::Glu32 => 4,
        }
    }
}

/// A projection's input normalised on the fly: `x` is the f32 residual stream, `g`/`gb` the norm's weight and
/// bias (0: none). The GEMV kernels fuse it; the GEMM path runs the norm kernel into `tmp` (16-bit) first.
#[derive(Debug, Clone, Copy)]
pub struct NormIn {
    pub x: CUdeviceptr,
    pub g: CUdeviceptr,
    pub gb: CUdeviceptr,
    pub tmp: CUdeviceptr,
}

impl NormIn {
    /// A raw f32 input `[K]`, read as it is (no norm weight: `rms` 3 of the GEMV kernels).
    pub fn raw(x: CUdeviceptr) -> Self {
        NormIn { x, g: 0, gb: 0, tmp: 0 }
    }

    pub fn is_raw(self) -> bool {
        self.g == 0
    }
}


/// The norm kernel for width `d` and its block size: the register-held variant (`rmsnorm4_*` / `layernorm4_*`, NV
/// float4 groups a thread, at most 512 threads) where `d` is a multiple of 4 and at most 16,384, else the plain one.
pub(in crate::cuda) fn norm_kernel(rms: bool, dt: Half, d: usize) -> (String, u32) {
    let base = if rms { "rmsnorm" } else { "layernorm" };
    match [1usize, 2, 4, 8].into_iter().find(|nv| d.div_ceil(4 * nv) <= 512).filter(|_| d % 4 == 0) {
        Some(nv) => (format!("{base}4_{}_v{nv}", dt.name()), (d.div_ceil(4 * nv).div_ceil(32) * 32) as u32),
        None => (format!("{base}_{}", dt.name()), (d.div_ceil(32) * 32).clamp(32, 1024) as u32),
    }
}

impl Launcher {
    /// Blocks of `threads` for a kernel whose warps loop over `rows` rows (kernels/gemv.cu, qscore.cu): one warp a
    /// row when they fit on the multiprocessors at once, else as many blocks as fit, with the rows spread evenly
    /// (every warp gets the same number, give or take one, and each block stages its input once for all of them).
    pub(in crate::cuda) fn row_grid(&self, f: CUfunction, rows: usize, threads: u32, smem: usize) -> GpuResult<u32> {
        let wpb = (threads as usize / 32).max(1);
        let one_each = rows.div_ceil(wpb).max(1);
        if let Some(c) = self.grid_cap {
            return Ok((one_each as u32).min(c.max(1)));
        }
        if !self.persist {
            return Ok(one_each as u32);
        }
        let per_sm = self.blocks_per_sm(f, threads, smem)?;
        let cap_warps = per_sm as usize * self.gpu.sms.max(1) as usize * wpb;
        let per_warp = rows.div_ceil(cap_warps).max(1);
        Ok(rows.div_ceil(per_warp).div_ceil(wpb).clamp(1, one_each) as u32)
    }

    /// Blocks of `f` one multiprocessor holds at once (the occupancy calculator, cached per kernel and shape).
    pub(in crate::cuda) fn blocks_per_sm(&self, f: CUfunction, threads: u32, smem: usize) -> GpuResult<u32> {
        let key = (f as usize, threads, smem);
        if let Some(n) = self.occupancy.borrow().get(&key).copied() {
            return Ok(n);
        }
        let n = self.gpu.occupancy(f, threads, smem)?.max(1);
        self.occupancy.borrow_mut().insert(key, n);
        Ok(n)
    }

    /// Blocks for a kernel whose blocks loop over `items` work items: what the multiprocessors hold at once, at
    /// most one block an item (and at most the checks' cap).
    pub(in crate::cuda) fn block_grid(&self, f: CUfunction, items: usize, threads: u32, smem: usize) -> GpuResult<u32> {
        let items = items.max(1);
        if let Some(c) = self.grid_cap {
            return Ok((items as u32).min(c.max(1)));
        }
        let per_sm = self.blocks_per_sm(f, threads, smem)?;
        Ok(items.min(per_sm as usize * self.gpu.sms.max(1) as usize) as u32)
    }

    /// `bench --launch-cost`'s persistent chain (`gemv_chain_*`): `chain` consecutive `n`-row slices of `w`
    /// (`[chain n, k]`) times the 16-bit `x` (`[k]`) added into `out` (`[chain, n]` f32) in one launch, the slices
    /// separated by a grid barrier (`bar`: 8 zeroed bytes) instead of launch boundaries; the grid as the one-row
    /// GEMV's, capped at what the multiprocessors hold at once (the barrier needs every block resident).
    #[allow(clippy::too_many_arguments)]
    pub fn gemv_chain(&self, w: CUdeviceptr, x: CUdeviceptr, out: CUdeviceptr, n: usize, k: usize, chain: usize, bar: CUdeviceptr) -> GpuResult<()> {
        let name = format!("gemv_chain_{}_acc_b1", self.dt().name());
        let stage = self.stage && k % 4 == 0 && k * 4 <= GEMV_SMEM;
        let smem = if stage { k * 4 } else { 0 };
        let f = self.gemv_fn(&name, smem)?;
        let threads = self.gemv_threads;
        let resident = self.blocks_per_sm(f, threads, smem)? * self.gpu.sms.max(1) as u32;
        let grid = self.row_grid(f, n, threads, smem)?.min(resident);
        let mut args = Args::new().ptr(w).ptr(x).ptr(out).i32(n as i32).i32(k as i32).i32(chain as i32).i32(i32::from(stage)).ptr(bar);
        self.gpu.launch(f, (grid, 1, 1), threads, smem as u32, &mut args)
    }

    /// One-row products over groups of warps (0 off, 1 where it balances the rows better, 2 or 4 always), for the
    /// kernel checks.
    pub fn set_gemv_group(&mut self, s: usize) {
        self.gemv_group = if [0, 1, 2, 4].contains(&s) { s } else { 0 };
    }

    /// The one-row group setting (see [`Launcher::set_gemv_group`]).
    pub fn gemv_group(&self) -> usize {
        self.gemv_group
    }

    /// Cap the grids of the row-looping kernels at `blocks` (None: sized by occupancy), for the kernel checks.
    pub fn set_grid_cap(&mut self, blocks: Option<u32>) {
        self.grid_cap = blocks;
    }

    /// `out = x W^T` over `rows` rows with the epilogue `epi`. `x` is 16-bit `[rows, k]`; `w` is `[n, k]` (for
    /// `Glu`, `[2n, k]` with gate rows first); `out` is f32 `[rows, n]` (Store/Acc) or 16-bit (Relu/Glu).
    #[allow(clippy::too_many_arguments)]
    pub fn linear(&self, w: CUdeviceptr, bias: Option<CUdeviceptr>, x: CUdeviceptr, out: CUdeviceptr, rows: usize, n: usize, k: usize, epi: Epi, y: CUdeviceptr) -> GpuResult<()> {
        self.linear_in(w, bias, x, None, out, rows, n, k, epi, y)
    }

    /// Our GEMV kernels over `rows` rows, 16 at a time: `x` 16-bit rows, or `norm` (RMSNorm when `rms`, else
    /// LayerNorm, with `eps`) of an f32 residual; the epilogue `epi`.
    #[allow(clippy::too_many_arguments)]
    pub fn gemv(&self, w: CUdeviceptr, bias: Option<CUdeviceptr>, x: CUdeviceptr, norm: Option<NormIn>, out: CUdeviceptr, rows: usize, n: usize, k: usize, epi: Epi, rms: bool, eps: f32) -> GpuResult<()> {
        let b0 = bias.unwrap_or(0);
        let (xf, g, gb) = norm.map_or((0, 0, 0), |m| (m.x, m.g, m.gb));
        // A norm input without a weight is the raw f32 input itself (`rms` 3 of the kernels).
        let raw = norm.is_some_and(NormIn::is_raw);
        let (w2, bias2) = if epi.is_glu() { (w + (n * k * 2) as u64, bias.map_or(0, |b| b + (n * 2) as u64)) } else { (0, 0) };
        let mut r0 = 0;
        while r0 < rows {
            let nb = (rows - r0).min(GEMV_MAX_ROWS);
            let name = format!("gemv_{}_{}_b{}", self.dt().name(), epi.name(), k_of(nb));
            let out_elem = epi.out_bytes();
            let args = Args::new()
                .ptr(w)
                .ptr(w2)
                .ptr(b0)
                .ptr(bias2)
                .ptr(x + (r0 * k * 2) as u64)
                .ptr(out + (r0 * n * out_elem) as u64)
                .i32(n as i32)
                .i32(k as i32)
                .i32(nb as i32)
                .ptr(if xf == 0 { 0 } else { xf + (r0 * k * 4) as u64 })
                .ptr(g)
                .ptr(gb)
                .f32(eps);
            let threads = self.gemv_threads;
            // The cp.async variant needs its ring of in-flight weights in shared memory beside the inputs.
            // (not instantiated for the f32 hidden epilogues or a raw f32 input)
            let ring = if self.gemv_async && k % 8 == 0 && !epi.is_f32_hidden() && !raw {
                gemv_ring_bytes(threads as usize, epi)
            } else {
                0
            };
            let staged = nb * k * 4;
            let stage = self.stage && k % 4 == 0 && staged + ring <= GEMV_SMEM;
            let smem = if stage { staged } else { 0 } + ring;
            let rms_arg = if raw { 3 } else { self.rms_arg(rms, stage && ring == 0 && xf != 0) };
            let mut args = args.i32(rms_arg).i32(i32::from(stage));
            // One row of a width of whole 16-byte words: a row split over a group of warps where that balances the
            // rows better, else the prefetching kernel (its batch count one more argument).
            let one_row = nb == 1 && ring == 0 && k % 8 == 0;
            let split = if one_row { self.group_split(n, k, epi, threads, smem)? } else { 1 };
            let (dt, en) = (self.dt().name(), epi.name());
            let name = if ring > 0 {
                name.replacen("gemv_", "gemv_async_", 1)
            } else if split > 1 {
                format!("gemv_grp{split}_{dt}_{en}_b1")
            } else if one_row && self.gemv_pf > 0 {
                args = args.i32(self.gemv_pf as i32);
                format!("gemv_pf_{dt}_{en}_b1")
            } else {
                name
            };
            let f = self.gemv_fn(&name, smem)?;
            // The cp.async variant computes one row per warp.
            let grid = if ring > 0 { (n as u32).div_ceil(threads / 32) } else { self.row_grid(f, n * split, threads, smem)? };
            self.gpu.launch(f, (grid, 1, 1), threads, smem as u32, &mut args)?;
            r0 += nb;
        }
        Ok(())
    }

    /// A GEMV kernel by name, with `smem` bytes of dynamic shared memory allowed when it takes any.
    fn gemv_fn(&self, name: &str, smem: usize) -> GpuResult<CUfunction> {
        if smem > 0 {
            self.k.get_smem(name, GEMV_SMEM)
        } else {
            self.k.get(name)
        }
    }

    /// Warps a row for a one-row product of `n` rows of width `k` (a multiple of 8): the `gemv_group` setting, or
    /// with `1` [`split_for`] over the warps the grouped kernel keeps resident.
    fn group_split(&self, n: usize, k: usize, epi: Epi, threads: u32, smem: usize) -> GpuResult<usize> {
        if self.gemv_group != 1 {
            return Ok(self.gemv_group.max(1));
        }
        let f = self.gemv_fn(&format!("gemv_grp2_{}_{}_b1", self.dt().name(), epi.name()), smem)?;
        let warps = self.blocks_per_sm(f, threads, smem)? as usize * self.gpu.sms.max(1) as usize * (threads as usize / 32);
        Ok(split_for(n, k, warps))
    }

    /// The GEMV kernels' `rms` argument: 0 LayerNorm, 1 RMSNorm normalising the staged input in place, 2 RMSNorm
    /// staging x * g and scaling the sums by 1 / rms (only for a staged, normalised input: `staged_norm`).
    pub(in crate::cuda) fn rms_arg(&self, rms: bool, staged_norm: bool) -> i32 {
        if rms && self.norm_epi && staged_norm {
            2
        } else {
            i32::from(rms)
        }
    }

    /// The batch-1 decode out-projection from the attention's key-split partials: `out[n] += W x + bias`, `x` the
    /// merged attention output of `k / hd` heads over `splits` partials (`part`, `[heads * splits, hd + 2]` f32).
    /// `r16`: the merged input rounded to the 16-bit type first, as attn_combine's 16-bit output (else as its f32
    /// output).
    #[allow(clippy::too_many_arguments)]
    pub fn gemv_comb(&self, w: CUdeviceptr, bias: Option<CUdeviceptr>, part: CUdeviceptr, out: CUdeviceptr, n: usize, k: usize, splits: usize, hd: usize, r16: bool) -> GpuResult<()> {
        let name = format!("gemv_comb_{}_acc_b1", self.dt().name());
        let smem = k * 4;
        let f = self.k.get_smem(&name, GEMV_SMEM)?;
        let threads = GEMV_THREADS;
        let grid = self.row_grid(f, n, threads, smem)?;
        let mut args = Args::new().ptr(w).ptr(bias.unwrap_or(0)).ptr(part).ptr(out).i32(n as i32).i32(k as i32).i32(splits as i32).i32(hd as i32).i32(i32::from(r16));
        self.gpu.launch(f, (grid, 1, 1), threads, smem as u32, &mut args)
    }

    /// [`Launcher::linear`] whose input is `norm(x)` when `norm` is given (then `x` is ignored).
    #[allow(clippy::too_many_arguments)]
    pub fn linear_in(&self, w: CUdeviceptr, bias: Option<CUdeviceptr>, x: CUdeviceptr, norm: Option<NormIn>, out: CUdeviceptr, rows: usize, n: usize, k: usize, epi: Epi, y: CUdeviceptr) -> GpuResult<()> {
        let b0 = bias.unwrap_or(0);
        let rms = i32::from(self.cfg.family == Family::Llama);
        let eps = self.cfg.norm_eps as f32;
        if (epi.is_f32_hidden() || norm.is_some_and(NormIn::is_raw)) && rows != 1 {
            return Err(GpuError::new("internal: the f32 hidden epilogues and raw f32 inputs take one row"));
        }
        if rows <= self.gemv_rows || (self.one_seq && rows <= self.prefill_gemv) || self.blas.is_none() {
            return self.gemv(w, bias, x, norm, out, rows, n, k, epi, rms == 1, eps);
        }
        let x = match norm {
            Some(m) => {
                let name = if rms == 1 { self.kname("rmsnorm") } else { self.kname("layernorm") };
                let threads = (k.div_ceil(32) * 32).clamp(32, 1024) as u32;
                let args = Args::new().ptr(m.x).ptr(m.g).ptr(m.gb).ptr(m.tmp).ptr(0).ptr(0).i32(k as i32).f32(eps);
                self.launch(&name, (rows as u32, 1, 1), threads, args)?;
                m.tmp
            }
            None => x,
        };
        let blas = self.blas.as_ref().ok_or_else(|| GpuError::new("internal: no cuBLAS"))?;
        let dt = self.dt();
        let ep = self.kname("epilogue");
        let ep_args = |yb: CUdeviceptr, m: usize, mode: i32, o: CUdeviceptr| {
            Args::new().ptr(yb).ptr(b0).ptr(o).i64(rows as i64).i32(m as i32).i32(mode)
        };
        let grid = |elems: usize| ((elems.div_ceil(256)).clamp(1, 65_535) as u32, 1, 1);
        match epi {
            Epi::Store => {
                blas.gemm(dt, w, x, out, rows, n, k, false)?;
                if bias.is_some() {
                    self.launch(&ep, grid(rows * n), 256, ep_args(out, n, 0, 0))?;
                }
            }
            Epi::Acc => {
                blas.gemm(dt, w, x, out, rows, n, k, true)?;
                if bias.is_some() {
                    self.launch(&ep, grid(rows * n), 256, ep_args(out, n, 0, 0))?;
                }
            }
            Epi::Relu => {
                blas.gemm(dt, w, x, y, rows, n, k, false)?;
                self.launch(&ep, grid(rows * n), 256, ep_args(y, n, 1, out))?;
            }
            Epi::Glu => {
                blas.gemm(dt, w, x, y, rows, 2 * n, k, false)?;
                self.launch(&ep, grid(rows * n), 256, ep_args(y, 2 * n, 2, out))?;
            }
            Epi::Relu32 | Epi::Glu32 => return Err(GpuError::new("internal: the f32 hidden epilogues take one row (the GEMV)")),
        }
        Ok(())
    }

    pub(in crate::cuda) fn norm(&self, w: &DBuf, b: Option<&DBuf>, x: CUdeviceptr, out: CUdeviceptr, xout: CUdeviceptr, rows: usize) -> GpuResult<()> {
        self.norm_copy(w, b, x, out, xout, 0, rows)
    }

    /// [`Launcher::norm`], also copying `x` itself to `xraw` (f32 `[rows, d]`) where it is not 0.
    #[allow(clippy::too_many_arguments)]
    pub(in crate::cuda) fn norm_copy(&self, w: &DBuf, b: Option<&DBuf>, x: CUdeviceptr, out: CUdeviceptr, xout: CUdeviceptr, xraw: CUdeviceptr, rows: usize) -> GpuResult<()> {
        let rms = self.cfg.family == Family::Llama;
        self.norm_launch(rms, w.ptr, b.map_or(0, |b| b.ptr), x, out, xout, xraw, rows, self.cfg.hidden, self.cfg.norm_eps as f32)
    }

    /// The engine's norm kernel at width `d` (`norm_kernel`; kernels/norm.cu says what each pointer is, 0: none).
    #[allow(clippy::too_many_arguments)]
    pub(in crate::cuda) fn norm_launch(&self, rms: bool, w: CUdeviceptr, b: CUdeviceptr, x: CUdeviceptr, out: CUdeviceptr, xout: CUdeviceptr, xraw: CUdeviceptr, rows: usize, d: usize, eps: f32) -> GpuResult<()> {
        let (name, threads) = norm_kernel(rms, self.dt(), d);
        let args = Args::new().ptr(x).ptr(w).ptr(b).ptr(out).ptr(xout).ptr(xraw).i32(d as i32).f32(eps);
        self.launch(&name, (rows as u32, 1, 1), threads, args)
    }

    /// `out` 16-bit `[rows, d]` = RMSNorm of `x` f32 `[rows, d]` with weight `g` and `eps` (the engine's norm kernel).
    pub fn rms_half(&self, x: CUdeviceptr, g: CUdeviceptr, out: CUdeviceptr, rows: usize, d: usize, eps: f32) -> GpuResult<()> {
        self.norm_launch(true, g, 0, x, out, 0, 0, rows, d, eps)
    }

    /// `out` 16-bit `[n]` = `x` f32 `[n]` rounded.
    pub fn to_half(&self, x: CUdeviceptr, out: CUdeviceptr, n: usize) -> GpuResult<()> {
        let args = Args::new().ptr(x).ptr(out).i64(n as i64);
        self.launch(&self.kname("to_half"), ((n.div_ceil(256)).clamp(1, 65_535) as u32, 1, 1), 256, args)
    }
}
