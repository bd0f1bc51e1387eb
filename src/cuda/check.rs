//! The engine checked against f32/f64 CPU references, on the GPU box (`dejavu engine-check`):
//! - every kernel on fresh random inputs, f16 and bf16, output poisoned with NaN first (relative error < 1e-2,
//!   no NaN, every element written);
//! - whole models against the burn reference: greedy continuations, divergences only where the reference's
//!   top-2 log-prob margin is under 0.05, teacher-forced log-probs of the reference's tokens within 0.05.

use half::{bf16, f16};

use crate::decode::{generate, Decoder, RefDecoder, Sampling};
use crate::source::weights::Half;
use crate::source::ModelFiles;

use cudarc::driver::sys::CUdeviceptr;

use super::engine::{Engine, Epi, NormIn};
use super::gpu::{Args, DBuf, GpuError, GpuResult};
use super::weights::Weights;

/// One kernel check.
#[derive(Debug, Clone, serde::Serialize)]
pub struct KernelCheck {
    pub kernel: String,
    pub dtype: &'static str,
    pub rel_err: f64,
    /// Output elements still NaN (poisoned and never written, or computed NaN).
    pub nan: usize,
    pub pass: bool,
}

fn rng(seed: u64) -> crate::decode::SplitMix64 {
    crate::decode::SplitMix64(seed)
}

fn randv(n: usize, seed: u64, scale: f32) -> Vec<f32> {
    let mut r = rng(seed);
    (0..n).map(|_| ((r.next_f64() * 2.0 - 1.0) as f32) * scale).collect()
}

fn bits(v: &[f32], dt: Half) -> Vec<u16> {
    dt.encode(v)
}

fn unbits(b: &[u16], dt: Half) -> Vec<f32> {
    match dt {
        Half::F16 => b.iter().map(|&x| f16::from_bits(x).to_f32()).collect(),
        Half::Bf16 => b.iter().map(|&x| bf16::from_bits(x).to_f32()).collect(),
    }
}

/// Round through the 16-bit type (what the GPU sees).
fn rounded(v: &[f32], dt: Half) -> Vec<f32> {
    unbits(&bits(v, dt), dt)
}

fn rel_err(got: &[f32], want: &[f32]) -> f64 {
    let (mut num, mut den) = (0f64, 0f64);
    for (g, w) in got.iter().zip(want) {
        num += (*g as f64 - *w as f64).powi(2);
        den += (*w as f64).powi(2);
    }
    (num / den.max(1e-30)).sqrt()
}

fn verdict(kernel: String, dt: Half, got: &[f32], want: &[f32], tol: f64) -> KernelCheck {
    let nan = got.iter().filter(|x| !x.is_finite()).count();
    let e = rel_err(got, want);
    KernelCheck { kernel, dtype: dt.name(), rel_err: e, nan, pass: nan == 0 && e < tol && got.len() == want.len() }
}

struct Dev<'a> {
    e: &'a Engine,
}

impl Dev<'_> {
    fn halfbuf(&self, v: &[f32], dt: Half) -> GpuResult<DBuf> {
        let b = self.e.gpu.alloc(v.len() * 2)?;
        self.e.gpu.upload(&b, 0, &bits(v, dt))?;
        Ok(b)
    }
    fn f32buf(&self, v: &[f32]) -> GpuResult<DBuf> {
        let b = self.e.gpu.alloc(v.len() * 4)?;
        self.e.gpu.upload(&b, 0, v)?;
        Ok(b)
    }
    fn i32buf(&self, v: &[i32]) -> GpuResult<DBuf> {
        let b = self.e.gpu.alloc(v.len() * 4)?;
        self.e.gpu.upload(&b, 0, v)?;
        Ok(b)
    }
    fn poisoned(&self, bytes: usize) -> GpuResult<DBuf> {
        let b = self.e.gpu.alloc(bytes)?;
        self.e.gpu.memset(&b, 0xff)?;
        Ok(b)
    }
    fn read_f32(&self, b: &DBuf, n: usize) -> GpuResult<Vec<f32>> {
        let mut v = vec![0f32; n];
        self.e.gpu.download(b.ptr, &mut v)?;
        Ok(v)
    }
    fn read_half(&self, b: &DBuf, n: usize, dt: Half) -> GpuResult<Vec<f32>> {
        let mut v = vec![0u16; n];
        self.e.gpu.download(b.ptr, &mut v)?;
        Ok(unbits(&v, dt))
    }
    fn launch(&self, name: &str, grid: (u32, u32, u32), block: u32, args: Args) -> GpuResult<()> {
        let f = self.e.k.get(name)?;
        let mut a = args;
        self.e.gpu.launch(f, grid, block, 0, &mut a)
    }
}

fn silu(x: f64) -> f64 {
    x / (1.0 + (-x).exp())
}

/// Projections (GEMV at <= 16 rows, cuBLAS + epilogue above) against f64 on the same rounded inputs.
fn check_linear(e: &Engine, dt: Half, seed: u64, out: &mut Vec<KernelCheck>) -> GpuResult<()> {
    let d = Dev { e };
    for (rows, k) in [(1usize, 576usize), (3, 576), (16, 1536), (5, 172), (40, 576)] {
        for epi in [Epi::Store, Epi::Acc, Epi::Relu, Epi::Glu] {
            let n = 136usize;
            let wrows = if epi == Epi::Glu { 2 * n } else { n };
            let s = seed + (rows * 1000 + k) as u64 + epi as u64 * 7;
            let w = rounded(&randv(wrows * k, s, (3.0 / k as f32).sqrt()), dt);
            let x = rounded(&randv(rows * k, s + 1, 1.0), dt);
            let bias = rounded(&randv(wrows, s + 2, 0.5), dt);
            let init = randv(rows * n, s + 3, 1.0);
            let (wb, xb, bb) = (d.halfbuf(&w, dt)?, d.halfbuf(&x, dt)?, d.halfbuf(&bias, dt)?);
            let half_out = matches!(epi, Epi::Relu | Epi::Glu);
            let ob = if epi == Epi::Acc { d.f32buf(&init)? } else { d.poisoned(rows * n * if half_out { 2 } else { 4 })? };
            let y = d.poisoned(rows * 2 * n * 4)?;
            e.linear(wb.ptr, Some(bb.ptr), xb.ptr, ob.ptr, rows, n, k, epi, y.ptr)?;
            let got = if half_out { d.read_half(&ob, rows * n, dt)? } else { d.read_f32(&ob, rows * n)? };
            let mut want = vec![0f32; rows * n];
            for r in 0..rows {
                for j in 0..n {
                    let dot = |row: usize| -> f64 { (0..k).map(|i| w[row * k + i] as f64 * x[r * k + i] as f64).sum::<f64>() + bias[row] as f64 };
                    let v = match epi {
                        Epi::Store => dot(j),
                        Epi::Acc => init[r * n + j] as f64 + dot(j),
                        Epi::Relu => dot(j).max(0.0),
                        Epi::Glu => silu(dot(j)) * dot(n + j),
                    };
                    want[r * n + j] = v as f32;
                }
            }
            let path = if rows <= e.gemv_rows() { "gemv" } else { "cublas+epilogue" };
            out.push(verdict(format!("{path} {epi:?} rows={rows} k={k} n={n}"), dt, &got, &want, 1e-2));
        }
    }
    // The same with the input normalised inside the projection (RMSNorm for this Llama-shaped engine).
    for (rows, k) in [(1usize, 576usize), (16, 1536), (4, 172), (40, 576)] {
        for epi in [Epi::Store, Epi::Glu] {
            let n = 136usize;
            let wrows = if epi == Epi::Glu { 2 * n } else { n };
            let s = seed + 77 + (rows * 1000 + k) as u64;
            let w = rounded(&randv(wrows * k, s, (3.0 / k as f32).sqrt()), dt);
            let xr = randv(rows * k, s + 1, 3.0);
            let g = rounded(&randv(k, s + 2, 1.0), dt);
            let (wb, xb, gbuf) = (d.halfbuf(&w, dt)?, d.f32buf(&xr)?, d.halfbuf(&g, dt)?);
            let half_out = epi == Epi::Glu;
            let ob = d.poisoned(rows * n * if half_out { 2 } else { 4 })?;
            let (y, tmp) = (d.poisoned(rows * 2 * n * 4)?, d.poisoned(rows * k * 2)?);
            let norm = NormIn { x: xb.ptr, g: gbuf.ptr, gb: 0, tmp: tmp.ptr };
            e.linear_in(wb.ptr, None, 0, Some(norm), ob.ptr, rows, n, k, epi, y.ptr)?;
            let got = if half_out { d.read_half(&ob, rows * n, dt)? } else { d.read_f32(&ob, rows * n)? };
            let eps = e.cfg.norm_eps;
            let mut want = vec![0f32; rows * n];
            for r in 0..rows {
                let xrow = &xr[r * k..(r + 1) * k];
                let inv = 1.0 / (xrow.iter().map(|&v| (v as f64).powi(2)).sum::<f64>() / k as f64 + eps).sqrt();
                let xn: Vec<f64> = (0..k).map(|i| xrow[i] as f64 * inv * g[i] as f64).collect();
                for j in 0..n {
                    let dot = |row: usize| -> f64 { (0..k).map(|i| w[row * k + i] as f64 * xn[i]).sum::<f64>() };
                    want[r * n + j] = match epi {
                        Epi::Glu => silu(dot(j)) * dot(n + j),
                        _ => dot(j),
                    } as f32;
                }
            }
            let path = if rows <= e.gemv_rows() { "gemv+rmsnorm" } else { "rmsnorm+cublas" };
            out.push(verdict(format!("{path} {epi:?} rows={rows} k={k} n={n}"), dt, &got, &want, 1e-2));
        }
    }
    Ok(())
}

/// The sparse MLP kernels at k = 1, all and between, 1-16 rows sharing one kept set (the union), against f64 on
/// the same rounded inputs; columns past the kept count must stay untouched (still NaN). Plus two invariants: the
/// gather over every row in order equals the dense GEMV bit for bit, and the transposed down over every row equals
/// the dense down projection (within tolerance: the order of addition differs).
fn check_sparse(e: &Engine, dt: Half, seed: u64, out: &mut Vec<KernelCheck>) -> GpuResult<()> {
    use super::sparse::{down_t, gather_up, random_kept, In, Kept};
    let d = Dev { e };
    for (rows, k, f) in [(1usize, 576usize, 1536usize), (3, 576, 1536), (16, 1024, 344), (2, 172, 200)] {
        for epi in [Epi::Relu, Epi::Glu] {
            let wrows = if epi == Epi::Glu { 2 * f } else { f };
            let s = seed + (rows * 7919 + k * 31 + f) as u64 + epi as u64;
            let w = rounded(&randv(wrows * k, s, (3.0 / k as f32).sqrt()), dt);
            let x = rounded(&randv(rows * k, s + 1, 1.0), dt);
            let bias = rounded(&randv(wrows, s + 2, 0.5), dt);
            let (wb, xb, bb) = (d.halfbuf(&w, dt)?, d.halfbuf(&x, dt)?, d.halfbuf(&bias, dt)?);
            for kk in [1usize, f / 3, f] {
                let idx = random_kept(f, kk, s + kk as u64);
                let (ib, cb) = (d.i32buf(&idx)?, d.i32buf(&[kk as i32])?);
                let kept = Kept { idx: ib.ptr, cnt: cb.ptr, cap: f };
                let ob = d.poisoned(rows * f * 2)?;
                gather_up(e, wb.ptr, Some(bb.ptr), f, In::Half(xb.ptr), kept, ob.ptr, rows, k, epi, None)?;
                let all = d.read_half(&ob, rows * f, dt)?;
                let mut got = Vec::with_capacity(rows * kk);
                let mut want = Vec::with_capacity(rows * kk);
                let mut touched = 0;
                for r in 0..rows {
                    got.extend_from_slice(&all[r * f..r * f + kk]);
                    touched += all[r * f + kk..(r + 1) * f].iter().filter(|v| !v.is_nan()).count();
                    for &j in &idx {
                        let j = j as usize;
                        let dot = |row: usize| -> f64 { (0..k).map(|i| w[row * k + i] as f64 * x[r * k + i] as f64).sum::<f64>() + bias[row] as f64 };
                        want.push(match epi {
                            Epi::Glu => silu(dot(j)) * dot(f + j),
                            _ => dot(j).max(0.0),
                        } as f32);
                    }
                }
                let mut v = verdict(format!("gather {epi:?} rows={rows} k={k} f={f} kept={kk}"), dt, &got, &want, 1e-2);
                if touched > 0 {
                    v.pass = false;
                    v.kernel += &format!(" ({touched} columns past the kept count written)");
                }
                out.push(v);
                if kk == f {
                    // Every row in order against the dense projection: where that runs our GEMV (one row by
                    // default) the arithmetic is the same, so the bits must be; above, the dense path is cuBLAS
                    // and the two agree within the kernels' tolerance.
                    let dense = d.poisoned(rows * f * 2)?;
                    let y = d.poisoned(rows * 2 * f * 4)?;
                    e.linear(wb.ptr, Some(bb.ptr), xb.ptr, dense.ptr, rows, f, k, epi, y.ptr)?;
                    let dv = d.read_half(&dense, rows * f, dt)?;
                    let same = dv.iter().zip(&all).filter(|(a, b)| a.to_bits() == b.to_bits()).count();
                    let gemv = rows <= e.gemv_rows();
                    let err = rel_err(&all, &dv);
                    out.push(KernelCheck {
                        kernel: if gemv {
                            format!("gather(all, in order) == dense GEMV bitwise {epi:?} rows={rows} k={k} f={f} ({same}/{} equal)", dv.len())
                        } else {
                            format!("gather(all, in order) ~ dense cuBLAS {epi:?} rows={rows} k={k} f={f} ({same}/{} bitwise equal)", dv.len())
                        },
                        dtype: dt.name(),
                        rel_err: err,
                        nan: all.iter().filter(|v| !v.is_finite()).count(),
                        pass: if gemv { same == dv.len() } else { err < 1e-2 },
                    });
                }
            }
        }
    }
    // The transposed down projection: out (f32, initialised) += bias + sum_s act[b, s] wt[idx[s], :].
    for (rows, dd, f) in [(1usize, 576usize, 1536usize), (4, 1024, 2048), (16, 576, 344), (1, 4096, 11008)] {
        let s = seed + 5 + (rows * 104_729 + dd * 13 + f) as u64;
        let wt = rounded(&randv(f * dd, s, (3.0 / f as f32).sqrt()), dt);
        let bias = rounded(&randv(dd, s + 1, 0.5), dt);
        let init = randv(rows * dd, s + 2, 1.0);
        let (wb, bb) = (d.halfbuf(&wt, dt)?, d.halfbuf(&bias, dt)?);
        for kk in [1usize, f / 4, f] {
            let idx = random_kept(f, kk, s + kk as u64);
            let act = rounded(&randv(rows * f, s + 3 + kk as u64, 1.0), dt);
            let (ab, ib, cb) = (d.halfbuf(&act, dt)?, d.i32buf(&idx)?, d.i32buf(&[kk as i32])?);
            let ob = d.f32buf(&init)?;
            down_t(e, wb.ptr, Some(bb.ptr), ab.ptr, f, Some(Kept { idx: ib.ptr, cnt: cb.ptr, cap: f }), f, ob.ptr, rows, dd, false)?;
            let got = d.read_f32(&ob, rows * dd)?;
            let mut want = vec![0f32; rows * dd];
            for r in 0..rows {
                for c in 0..dd {
                    let acc: f64 = (0..kk).map(|s_| act[r * f + s_] as f64 * wt[idx[s_] as usize * dd + c] as f64).sum();
                    want[r * dd + c] = (init[r * dd + c] as f64 + bias[c] as f64 + acc) as f32;
                }
            }
            out.push(verdict(format!("down_t rows={rows} d={dd} f={f} kept={kk}"), dt, &got, &want, 1e-2));
            // By id: act read at the unit's own column (the head-sparse out-projection).
            let ob = d.f32buf(&init)?;
            down_t(e, wb.ptr, Some(bb.ptr), ab.ptr, f, Some(Kept { idx: ib.ptr, cnt: cb.ptr, cap: f }), f, ob.ptr, rows, dd, true)?;
            let got = d.read_f32(&ob, rows * dd)?;
            for r in 0..rows {
                for c in 0..dd {
                    let acc: f64 = idx.iter().map(|&j| act[r * f + j as usize] as f64 * wt[j as usize * dd + c] as f64).sum();
                    want[r * dd + c] = (init[r * dd + c] as f64 + bias[c] as f64 + acc) as f32;
                }
            }
            out.push(verdict(format!("down_t by id rows={rows} d={dd} f={f} kept={kk}"), dt, &got, &want, 1e-2));
        }
        if f <= 2048 {
            // Every row, no index list, against the dense down projection on the untransposed weights.
            let act = rounded(&randv(rows * f, s + 9, 1.0), dt);
            let mut w = vec![0f32; dd * f];
            for j in 0..f {
                for c in 0..dd {
                    w[c * f + j] = wt[j * dd + c];
                }
            }
            let (ab, wd) = (d.halfbuf(&act, dt)?, d.halfbuf(&w, dt)?);
            let (o1, o2) = (d.f32buf(&init)?, d.f32buf(&init)?);
            down_t(e, wb.ptr, Some(bb.ptr), ab.ptr, f, None, f, o1.ptr, rows, dd, false)?;
            let y = d.poisoned(rows * 2 * dd * 4)?;
            e.linear(wd.ptr, Some(bb.ptr), ab.ptr, o2.ptr, rows, dd, f, Epi::Acc, y.ptr)?;
            let (g1, g2) = (d.read_f32(&o1, rows * dd)?, d.read_f32(&o2, rows * dd)?);
            out.push(verdict(format!("down_t(all, no ids) == dense down rows={rows} d={dd} f={f}"), dt, &g1, &g2, 1e-4));
        }
    }
    Ok(())
}

/// Top-k selection (`topk_mark_*`, `topk_compact`) against the host reference (`sparse::select::top_k` per row,
/// the union ascending): exact equality of the kept ids, the rows' flags and the gathered values. Scores are drawn
/// on a coarse grid (many ties), with NaN and both zeros among them.
fn check_select(e: &Engine, dt: Half, seed: u64, out: &mut Vec<KernelCheck>) -> GpuResult<()> {
    use super::select::{topk_compact, topk_mark, Scores};
    use super::sparse::Kept;
    use crate::sparse::select::top_k;
    let d = Dev { e };
    for (rows, n, k) in [(1usize, 1536usize, 1usize), (1, 1536, 768), (3, 1536, 500), (16, 11008, 5504), (2, 200, 200), (2, 200, 0), (1, 49152, 4915), (5, 344, 343), (4, 40, 20), (1, 9, 6), (3, 32, 1), (2, 256, 255), (1, 257, 100)] {
        let s = seed + (rows * 31 + n * 7 + k) as u64;
        let mut r = rng(s);
        // Scores on a grid of 1/8 in [-4, 4): ties everywhere; a few NaN, -0 and +0.
        let mut v: Vec<f32> = (0..rows * n).map(|_| ((r.next_u64() % 64) as f32 - 32.0) / 8.0).collect();
        for i in (0..v.len()).step_by(97) {
            v[i] = match i % 3 {
                0 => f32::NAN,
                1 => -0.0,
                _ => 0.0,
            };
        }
        // As f32 scores, and as 16-bit values ranked by magnitude (exactly representable in both types).
        let want_sets = |score: &dyn Fn(f32) -> f32| -> Vec<Vec<usize>> {
            (0..rows).map(|b| top_k(&v[b * n..(b + 1) * n].iter().map(|&x| score(x)).collect::<Vec<_>>(), k)).collect()
        };
        for abs in [false, true] {
            let sets = if abs { want_sets(&|x: f32| x.abs()) } else { want_sets(&|x: f32| x) };
            let mut union: Vec<usize> = sets.iter().flatten().copied().collect();
            union.sort_unstable();
            union.dedup();
            let src = if abs { d.halfbuf(&v, dt)? } else { d.f32buf(&v)? };
            let keep = d.poisoned(rows * n)?;
            let (idx, cnt, pre, dst) = (d.poisoned(n * 4)?, d.poisoned(4)?, d.poisoned(rows * n * 4)?, d.poisoned(rows * n * 2)?);
            let scores = if abs { Scores::Abs16(src.ptr) } else { Scores::F32(src.ptr) };
            topk_mark(e, scores, rows, n, k, keep.ptr)?;
            let kept = Kept { idx: idx.ptr, cnt: cnt.ptr, cap: n };
            topk_compact(e, keep.ptr, rows, n, kept, Some(pre.ptr), abs.then_some((src.ptr, dst.ptr)))?;
            let mut c = [0i32];
            e.gpu.download(cnt.ptr, &mut c)?;
            let m = (c[0].max(0) as usize).min(n);
            let mut ids = vec![0i32; m];
            e.gpu.download(idx.ptr, &mut ids)?;
            let flags = d.read_f32(&pre, rows * n)?;
            let mut bad = usize::from(c[0] as usize != union.len());
            bad += ids.iter().zip(&union).filter(|(a, b)| **a as usize != **b).count();
            let gathered = if abs { d.read_half(&dst, rows * n, dt)? } else { Vec::new() };
            for b in 0..rows {
                for (slot, &j) in union.iter().enumerate().take(m) {
                    let kb = sets[b].binary_search(&j).is_ok();
                    bad += usize::from(flags[b * n + slot] != if kb { 1.0 } else { 0.0 });
                    if abs {
                        let want = if kb { v[b * n + j] } else { 0.0 };
                        let got = gathered[b * n + slot];
                        bad += usize::from(!(got.to_bits() == want.to_bits() || (got.is_nan() && want.is_nan())));
                    }
                }
            }
            out.push(KernelCheck {
                kernel: format!("topk {} rows={rows} n={n} k={k}: {} kept, {bad} mismatches", if abs { "|16-bit|" } else { "f32" }, union.len()),
                dtype: dt.name(),
                rel_err: bad as f64,
                nan: 0,
                pass: bad == 0,
            });
        }
    }
    Ok(())
}

/// The int4 score pass (`qscore_*`) against an f64 computation from the dequantized copies, and the top-k MLP
/// blocks (`exactdown`, `qscore`) against f64: per row its own top k (exactdown ranks the hidden values rounded to
/// the engine's type, as the engine stores them), the kept hidden values through down, added to the residual.
fn check_topk_mlp(e: &Engine, dt: Half, seed: u64, out: &mut Vec<KernelCheck>) -> GpuResult<()> {
    use super::select::{qscore, QCopy};
    use super::sparse::{sparse_mlp, GpuMlp, In, SparseMlp, SparseParts};
    use crate::sparse::quant::{QMatrix, QScheme, QuantOptions};
    use crate::sparse::select::top_k;
    let d_ = Dev { e };
    let (d, f) = (e.cfg.hidden, e.cfg.ffn);
    let opts = QuantOptions { bits: 4, group: 32, scheme: QScheme::Sym };
    // The engine's own layer-0 weights, on the host.
    let lw = &e.w.layers[0];
    let mut raw = vec![0u16; 2 * f * d];
    e.gpu.download(lw.up.ptr, &mut raw)?;
    let up = unbits(&raw, dt); // [2f, d]: gate rows, then up rows
    let mut raw = vec![0u16; d * f];
    e.gpu.download(lw.down.ptr, &mut raw)?;
    let down = unbits(&raw, dt); // [d, f]
    let (qg, qu) = (QMatrix::quantize(&up[..f * d], f, d, opts), QMatrix::quantize(&up[f * d..], f, d, opts));
    let (dg, du) = (qg.dequantize(), qu.dequantize());
    let dot = |w: &[f32], row: usize, x: &[f32]| -> f64 { (0..d).map(|i| w[row * d + i] as f64 * x[i] as f64).sum() };
    for rows in [1usize, 3, 16] {
        let s = seed + 77 + rows as u64;
        let x = rounded(&randv(rows * d, s, 1.0), dt);
        let xb = d_.halfbuf(&x, dt)?;
        // The score pass alone.
        let q = QCopy::upload(e, &qg, &qu)?;
        let sb = d_.poisoned(rows * f * 4)?;
        qscore(e, &q, In::Half(xb.ptr), sb.ptr, rows, f, d)?;
        let got = d_.read_f32(&sb, rows * f)?;
        let mut want_scores = vec![0f32; rows * f];
        for b in 0..rows {
            let xr = &x[b * d..(b + 1) * d];
            for j in 0..f {
                want_scores[b * f + j] = (silu(dot(&dg, j, xr)) * dot(&du, j, xr)).abs() as f32;
            }
        }
        out.push(verdict(format!("qscore int4 g32 rows={rows} d={d} f={f}"), dt, &got, &want_scores, 1e-2));
        for kk in [1usize, f / 3, f] {
            for rule in [GpuMlp::ExactDown(kk), GpuMlp::QScore(kk)] {
                let qv = matches!(rule, GpuMlp::QScore(_)).then(|| QCopy::upload(e, &qg, &qu)).transpose()?;
                let parts = SparseParts { q: vec![qv], score_bits: opts.bits_per_weight(), pred: Vec::new() };
                let sp = SparseMlp::new(e, vec![Some(rule)], parts)?;
                sp.zero(e, rows)?;
                let init = randv(rows * d, s + kk as u64, 1.0);
                let xo = d_.f32buf(&init)?;
                let (pre, act) = (d_.poisoned(16 * f * 4)?, d_.poisoned(16 * f * 2)?);
                sparse_mlp(e, &sp, 0, rule, rows, |r0| In::Half(xb.ptr + (r0 * d * 2) as u64), xo.ptr, pre.ptr, act.ptr)?;
                let got = d_.read_f32(&xo, rows * d)?;
                let mut want = vec![0f32; rows * d];
                for b in 0..rows {
                    let xr = &x[b * d..(b + 1) * d];
                    let h: Vec<f64> = (0..f).map(|j| silu(dot(&up, j, xr)) * dot(&up, f + j, xr)).collect();
                    let kept = match rule {
                        GpuMlp::ExactDown(k) => top_k(&h.iter().map(|&v| rounded(&[v as f32], dt)[0].abs()).collect::<Vec<_>>(), k),
                        _ => top_k(&want_scores[b * f..(b + 1) * f], kk),
                    };
                    for c in 0..d {
                        let acc: f64 = kept.iter().map(|&j| h[j] * down[c * f + j] as f64).sum();
                        want[b * d + c] = (init[b * d + c] as f64 + acc) as f32;
                    }
                }
                let name = match rule {
                    GpuMlp::ExactDown(_) => "exactdown",
                    _ => "qscore",
                };
                out.push(verdict(format!("{name} MLP block rows={rows} d={d} f={f} k={kk}"), dt, &got, &want, 1e-2));
            }
        }
    }
    Ok(())
}

fn check_norms(e: &Engine, dt: Half, seed: u64, out: &mut Vec<KernelCheck>) -> GpuResult<()> {
    let d = Dev { e };
    for (rms, dim) in [(true, 576usize), (false, 768), (true, 100), (false, 32)] {
        let rows = 5;
        let x = randv(rows * dim, seed + dim as u64, 2.0);
        let w = rounded(&randv(dim, seed + 1, 1.0), dt);
        let b = rounded(&randv(dim, seed + 2, 0.5), dt);
        let (xb, wb, bb) = (d.f32buf(&x)?, d.halfbuf(&w, dt)?, d.halfbuf(&b, dt)?);
        let (ob, xo) = (d.poisoned(rows * dim * 2)?, d.poisoned(rows * dim * 4)?);
        let name = format!("{}_{}", if rms { "rmsnorm" } else { "layernorm" }, dt.name());
        let threads = (dim.div_ceil(32) * 32).clamp(32, 1024) as u32;
        let bias = if rms { 0 } else { bb.ptr };
        d.launch(&name, (rows as u32, 1, 1), threads, Args::new().ptr(xb.ptr).ptr(wb.ptr).ptr(bias).ptr(ob.ptr).ptr(xo.ptr).i32(dim as i32).f32(1e-5))?;
        let mut want = vec![0f32; rows * dim];
        for r in 0..rows {
            let xr = &x[r * dim..(r + 1) * dim];
            let mean = if rms { 0.0 } else { xr.iter().map(|&v| v as f64).sum::<f64>() / dim as f64 };
            let var = xr.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / dim as f64;
            let inv = 1.0 / (var + 1e-5).sqrt();
            for i in 0..dim {
                let mut y = (xr[i] as f64 - mean) * inv * w[i] as f64;
                if !rms {
                    y += b[i] as f64;
                }
                want[r * dim + i] = y as f32;
            }
        }
        out.push(verdict(format!("{name} d={dim} (16-bit out)"), dt, &d.read_half(&ob, rows * dim, dt)?, &want, 1e-2));
        out.push(verdict(format!("{name} d={dim} (f32 out)"), dt, &d.read_f32(&xo, rows * dim)?, &want, 1e-2));
    }
    Ok(())
}

fn check_embed(e: &Engine, dt: Half, seed: u64, out: &mut Vec<KernelCheck>) -> GpuResult<()> {
    let d = Dev { e };
    let (vocab, dim, seq, past) = (50usize, 96usize, 3usize, 7usize);
    let emb = rounded(&randv(vocab * dim, seed, 1.0), dt);
    let pos = rounded(&randv(40 * dim, seed + 1, 1.0), dt);
    let toks: Vec<i32> = vec![3, 49, 0, 17, 17, 8];
    let (eb, pb, tb, st) = (d.halfbuf(&emb, dt)?, d.halfbuf(&pos, dt)?, d.i32buf(&toks)?, d.i32buf(&[past as i32])?);
    let xf = d.poisoned(toks.len() * dim * 4)?;
    d.launch(&format!("embed_{}", dt.name()), (toks.len() as u32, 1, 1), 128, Args::new().ptr(tb.ptr).ptr(eb.ptr).ptr(pb.ptr).ptr(xf.ptr).ptr(0).ptr(st.ptr).i32(seq as i32).i32(dim as i32).i32(2))?;
    let mut want = vec![0f32; toks.len() * dim];
    for (n, &t) in toks.iter().enumerate() {
        let p = past + n % seq + 2;
        for i in 0..dim {
            want[n * dim + i] = emb[t as usize * dim + i] + pos[p * dim + i];
        }
    }
    out.push(verdict("embed + positions".into(), dt, &d.read_f32(&xf, toks.len() * dim)?, &want, 1e-6));
    Ok(())
}

/// RoPE + cache write + split attention + combine, against f64 on the same rounded cache.
fn check_attention(e: &Engine, dt: Half, seed: u64, out: &mut Vec<KernelCheck>) -> GpuResult<()> {
    let d = Dev { e };
    // splits = 1 writes the output directly (no combine pass); more splits go through attn_combine.
    for (hd, heads, kvh, splits) in [(64usize, 8usize, 2usize, 1usize), (64, 8, 2, 5), (128, 4, 4, 3), (128, 4, 4, 1), (8, 8, 4, 1), (256, 2, 1, 2)] {
        let (rows_b, seq, past, cap) = (2usize, 5usize, 150usize, 300usize);
        let theta = 10000.0f64;
        let n = rows_b * seq;
        let width = (heads + 2 * kvh) * hd;
        let s = seed + (hd * 100 + splits) as u64;
        let qkv = randv(n * width, s, 1.0);
        // The cache holds `past` random positions already.
        let kc0 = rounded(&randv(rows_b * kvh * cap * hd, s + 1, 1.0), dt);
        let vc0 = rounded(&randv(rows_b * kvh * cap * hd, s + 2, 1.0), dt);
        let (qb, kb, vb) = (d.f32buf(&qkv)?, d.halfbuf(&kc0, dt)?, d.halfbuf(&vc0, dt)?);
        let st = d.i32buf(&[past as i32])?;
        let part = d.poisoned(n * heads * splits * (hd + 2) * 4)?;
        let att = d.poisoned(n * heads * hd * 2)?;
        let t = dt.name();
        let rope_threads = ((hd / 2).div_ceil(32) * 32).clamp(32, 128) as u32;
        d.launch(&format!("rope_kv_{t}"), (n as u32, (heads + kvh) as u32, 1), rope_threads, Args::new().ptr(qb.ptr).ptr(kb.ptr).ptr(vb.ptr).ptr(st.ptr).i32(seq as i32).i32(heads as i32).i32(kvh as i32).i32(hd as i32).i32(cap as i32).f32(theta as f32).i32(1).ptr(0).ptr(0))?;
        let scale = 1.0 / (hd as f32).sqrt();
        let attend_p = |hkeep: u64, pres: u64, att: &DBuf| -> GpuResult<()> {
            let direct = if splits == 1 { att.ptr } else { 0 };
            d.launch(&format!("attn_split_{t}_h{hd}"), ((n * heads) as u32, splits as u32, 1), 128, Args::new().ptr(qb.ptr).ptr(kb.ptr).ptr(vb.ptr).ptr(part.ptr).ptr(st.ptr).i32(seq as i32).i32(heads as i32).i32(kvh as i32).i32(hd as i32).i32(cap as i32).i32(splits as i32).f32(scale).ptr(direct).ptr(hkeep).ptr(pres))?;
            if splits > 1 {
                d.launch(&format!("attn_combine_{t}"), ((n * heads) as u32, 1, 1), hd as u32, Args::new().ptr(part.ptr).ptr(att.ptr).i32(hd as i32).i32(splits as i32))?;
            }
            Ok(())
        };
        let attend = |hkeep: u64, att: &DBuf| attend_p(hkeep, 0, att);
        attend(0, &att)?;
        // Head-sparse: with keep flags, a dropped head's output is 0 and a kept head's is bit for bit the dense one.
        let flags: Vec<u8> = (0..n * heads).map(|i| u8::from((i * 7 + hd) % 3 != 0)).collect();
        let fb = e.gpu.alloc(flags.len())?;
        e.gpu.upload(&fb, 0, &flags)?;
        let att2 = d.poisoned(n * heads * hd * 2)?;
        attend(fb.ptr, &att2)?;
        let (full, sparse) = (d.read_half(&att, n * heads * hd, dt)?, d.read_half(&att2, n * heads * hd, dt)?);
        let bad = (0..n * heads * hd)
            .filter(|&i| if flags[i / hd] == 1 { full[i].to_bits() != sparse[i].to_bits() } else { sparse[i] != 0.0 })
            .count();
        out.push(KernelCheck {
            kernel: format!("attn_split with head flags (dropped = 0, kept == dense bitwise) hd={hd} splits={splits}: {bad} mismatches"),
            dtype: dt.name(),
            rel_err: bad as f64,
            nan: 0,
            pass: bad == 0,
        });
        // Reference.
        let rope = |v: &mut [f64], p: usize| {
            let half = hd / 2;
            for i in 0..half {
                let inv = theta.powf(-2.0 * i as f64 / hd as f64);
                let (sn, cs) = (p as f64 * inv).sin_cos();
                let (x1, x2) = (v[i], v[i + half]);
                v[i] = x1 * cs - x2 * sn;
                v[i + half] = x2 * cs + x1 * sn;
            }
        };
        let mut kc = kc0.clone();
        let mut vc = vc0.clone();
        let mut qs = vec![0f64; n * heads * hd];
        for r in 0..n {
            let (b, tt) = (r / seq, r % seq);
            let p = past + tt;
            let row = &qkv[r * width..(r + 1) * width];
            for h in 0..heads {
                let mut q: Vec<f64> = row[h * hd..(h + 1) * hd].iter().map(|&v| v as f64).collect();
                rope(&mut q, p);
                qs[(r * heads + h) * hd..(r * heads + h + 1) * hd].copy_from_slice(&q);
            }
            for j in 0..kvh {
                let mut k: Vec<f64> = row[(heads + j) * hd..(heads + j + 1) * hd].iter().map(|&v| v as f64).collect();
                rope(&mut k, p);
                let at = ((b * kvh + j) * cap + p) * hd;
                let kr: Vec<f32> = k.iter().map(|&v| v as f32).collect();
                kc[at..at + hd].copy_from_slice(&rounded(&kr, dt));
                let vr = &row[(heads + kvh + j) * hd..(heads + kvh + j + 1) * hd];
                vc[at..at + hd].copy_from_slice(&rounded(vr, dt));
            }
        }
        // The f64 reference; with `pres` (1 present, 0 absent per (row, kv head, position)) a query skips the earlier
        // absent positions and always sees its own.
        let reference = |pres: Option<&[u8]>| -> Vec<f32> {
            let mut want = vec![0f32; n * heads * hd];
            for r in 0..n {
                let (b, tt) = (r / seq, r % seq);
                let len = past + tt + 1;
                for h in 0..heads {
                    let j = h / (heads / kvh);
                    let q = &qs[(r * heads + h) * hd..(r * heads + h + 1) * hd];
                    let base = (b * kvh + j) * cap * hd;
                    let seen: Vec<usize> = (0..len).filter(|&p| p == len - 1 || pres.is_none_or(|f| f[(b * kvh + j) * cap + p] == 1)).collect();
                    let sc: Vec<f64> = seen.iter().map(|&p| (0..hd).map(|i| q[i] * kc[base + p * hd + i] as f64).sum::<f64>() * scale as f64).collect();
                    let m = sc.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    let ex: Vec<f64> = sc.iter().map(|&v| (v - m).exp()).collect();
                    let z: f64 = ex.iter().sum();
                    for i in 0..hd {
                        let o: f64 = seen.iter().zip(&ex).map(|(&p, w)| w * vc[base + p * hd + i] as f64).sum::<f64>() / z;
                        want[(r * heads + h) * hd + i] = o as f32;
                    }
                }
            }
            want
        };
        let want = reference(None);
        let tag = format!("hd={hd} heads={heads}/{kvh} splits={splits} past={past} seq={seq}");
        out.push(verdict(format!("rope_kv+attn_split+attn_combine {tag}"), dt, &d.read_half(&att, n * heads * hd, dt)?, &want, 1e-2));
        let got_k = d.read_half(&kb, kc.len(), dt)?;
        out.push(verdict(format!("rope_kv cache keys {tag}"), dt, &got_k, &kc, 1e-2));
        // Absent entries (`--head-kv kept`): a query skips the earlier positions flagged 0 and sees its own.
        let mut r = rng(s + 7);
        let pres: Vec<u8> = (0..rows_b * kvh * cap).map(|_| u8::from(r.next_u64() % 3 != 0)).collect();
        let pb = e.gpu.alloc(pres.len())?;
        e.gpu.upload(&pb, 0, &pres)?;
        let att3 = d.poisoned(n * heads * hd * 2)?;
        attend_p(0, pb.ptr, &att3)?;
        let want3 = reference(Some(&pres));
        out.push(verdict(format!("attn_split with absent keys {tag}"), dt, &d.read_half(&att3, n * heads * hd, dt)?, &want3, 1e-2));
    }
    Ok(())
}

fn check_rows(e: &Engine, seed: u64, out: &mut Vec<KernelCheck>) -> GpuResult<()> {
    let d = Dev { e };
    for v in [1000usize, 49152] {
        let rows = 4;
        let mut l = randv(rows * v, seed + v as u64, 8.0);
        l[2 * v + 17] = 50.0; // a clear winner in row 2
        l[3 * v + 5] = 40.0; // a tie in row 3: the first index wins
        l[3 * v + 900] = 40.0;
        let tg: Vec<i32> = vec![0, 999, 17, 5];
        let (lb, tb) = (d.f32buf(&l)?, d.i32buf(&tg)?);
        let (lp, am) = (d.poisoned(rows * 4)?, d.poisoned(rows * 4)?);
        d.launch("row_argmax_logprob", (rows as u32, 1, 1), 1024, Args::new().ptr(lb.ptr).i32(v as i32).ptr(tb.ptr).ptr(lp.ptr).ptr(am.ptr))?;
        let got = d.read_f32(&lp, rows)?;
        let mut amv = vec![0i32; rows];
        e.gpu.download(am.ptr, &mut amv)?;
        let mut want = vec![0f32; rows];
        let mut am_ok = true;
        for r in 0..rows {
            let row = &l[r * v..(r + 1) * v];
            let h = crate::decode::host_score(row, tg[r] as u32);
            want[r] = h.logprob;
            am_ok &= amv[r] as usize == crate::decode::argmax(row);
        }
        let mut c = verdict(format!("row_argmax_logprob V={v} (log-probs; argmax exact: {am_ok})"), Half::F16, &got, &want, 1e-4);
        c.dtype = "f32";
        c.pass &= am_ok;
        out.push(c);
    }
    Ok(())
}

/// Every kernel check, f16 and bf16.
pub fn kernels(seed: u64) -> Result<Vec<KernelCheck>, GpuError> {
    let mut out = Vec::new();
    for dt in [Half::F16, Half::Bf16] {
        let gpu = super::gpu::Gpu::new(0)?;
        let k = super::kernels::Kernels::load(gpu.arch)?;
        let mut cfg = crate::bench::Shape::find("smollm2-135m").map(|s| s.config()).ok_or_else(|| GpuError::new("shape table"))?;
        cfg.layers = 1;
        let w = Weights::random(&gpu, &k, &cfg, dt, 3)?;
        let e = Engine::new(gpu, k, w, cfg)?;
        if !e.has_blas() {
            return Err(GpuError::new("cuBLAS is not available: the prefill path cannot be checked"));
        }
        check_linear(&e, dt, seed, &mut out)?;
        check_norms(&e, dt, seed, &mut out)?;
        check_embed(&e, dt, seed, &mut out)?;
        check_attention(&e, dt, seed, &mut out)?;
        check_sparse(&e, dt, seed, &mut out)?;
        check_select(&e, dt, seed, &mut out)?;
        check_topk_mlp(&e, dt, seed, &mut out)?;
        if dt == Half::F16 {
            check_rows(&e, seed, &mut out)?;
        }
    }
    Ok(out)
}

/// The engine against the burn reference on one model.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ModelCheck {
    pub model: String,
    pub dtype: &'static str,
    pub prompts: usize,
    pub steps: usize,
    pub identical: usize,
    /// Prompts whose first divergence sits where the reference's top-2 log-prob margin is under 0.05.
    pub divergences_at_near_ties: usize,
    /// The largest reference margin at a divergence.
    pub worst_margin: f64,
    /// max |log p_gpu - log p_cpu| of the reference's tokens, teacher-forced.
    pub max_dlogprob: f64,
    pub pass: bool,
}

fn top2_margin(logits: &[f32]) -> f64 {
    let mut a = f64::NEG_INFINITY;
    let mut b = f64::NEG_INFINITY;
    for &x in logits {
        let x = x as f64;
        if x > a {
            b = a;
            a = x;
        } else if x > b {
            b = x;
        }
    }
    a - b // a difference of logits is a difference of log-probs
}

/// Greedy `steps` tokens after each prompt on both decoders, then teacher-forced scores of the reference's
/// tokens on both.
pub fn compare(name: &str, cpu: &mut dyn Decoder, gpu: &mut dyn Decoder, dt: Half, prompts: &[Vec<u32>], steps: usize) -> Result<ModelCheck, String> {
    let mut identical = 0;
    let mut near = 0;
    let mut worst = 0f64;
    let mut max_d = 0f64;
    let greedy = Sampling::default();
    for p in prompts {
        let steps = match cpu.config().position_limit() {
            Some(l) => steps.min(l.saturating_sub(p.len())),
            None => steps,
        };
        if steps == 0 {
            continue;
        }
        let r = generate(cpu, p, steps, greedy, &[], |_| true).map_err(|e| format!("cpu: {e}"))?.new_tokens;
        let g = generate(gpu, p, steps, greedy, &[], |_| true).map_err(|e| format!("gpu: {e}"))?.new_tokens;
        match r.iter().zip(&g).position(|(a, b)| a != b) {
            None => identical += 1,
            Some(i) => {
                let mut ctx = p.clone();
                ctx.extend_from_slice(&r[..i]);
                cpu.reset();
                cpu.prefill(&[ctx], None).map_err(|e| format!("cpu: {e}"))?;
                let l = cpu.logits().map_err(|e| format!("cpu: {e}"))?;
                let m = top2_margin(&l[0]);
                worst = worst.max(m);
                if m < 0.05 {
                    near += 1;
                }
            }
        }
        // Teacher-forced: the sequence prompt + reference continuation, scored for the continuation.
        let mut seq = p.clone();
        seq.extend_from_slice(&r[..r.len() - 1]);
        let mut tg: Vec<u32> = p[1..].to_vec();
        tg.extend_from_slice(&r);
        let forced = |dec: &mut dyn Decoder| -> Result<Vec<f64>, String> {
            dec.reset();
            dec.prefill(std::slice::from_ref(&seq), None).map_err(|e| format!("score: {e}"))?;
            let s = dec.score(std::slice::from_ref(&tg)).map_err(|e| format!("score: {e}"))?;
            Ok(s[0].iter().skip(p.len() - 1).map(|t| t.logprob as f64).collect())
        };
        let lps = [forced(&mut *cpu)?, forced(&mut *gpu)?];
        for (a, b) in lps[0].iter().zip(&lps[1]) {
            max_d = max_d.max((a - b).abs());
        }
    }
    let n = prompts.len();
    let ok = identical * 10 >= n * 9 && identical + near == n && max_d < 0.05;
    Ok(ModelCheck {
        model: name.to_string(),
        dtype: dt.name(),
        prompts: n,
        steps,
        identical,
        divergences_at_near_ties: near,
        worst_margin: worst,
        max_dlogprob: max_d,
        pass: ok,
    })
}

/// Load `files` on both engines and [`compare`], both running `plan` (None: dense; `label` names it in the table),
/// with the score copies `copies` where the plan has `qscore` layers.
pub fn model(
    files: &ModelFiles,
    dt: Option<Half>,
    prompts: &[Vec<u32>],
    steps: usize,
    plan: Option<(&crate::sparse::Plan, &str)>,
    copies: Option<&crate::sparse::quant::QScoreCopies>,
    predictors: Option<&crate::predictor::Predictors<crate::backend::CpuBackend>>,
) -> Result<ModelCheck, String> {
    type Cpu = crate::backend::CpuBackend;
    let dev = Default::default();
    let m = crate::model::Model::<Cpu>::load(&files.config, files.checkpoint.as_ref(), &dev, |_| {}).map_err(|e| e.to_string())?;
    let qs = copies.map(|c| crate::model::QScorer::<Cpu>::from_copies(c, &dev));
    let scorer = predictors.map(|p| p as &dyn crate::model::Scorer<Cpu>);
    let mut cpu = match plan {
        Some((p, _)) => RefDecoder::with_qscore(&m, p, scorer, qs.as_ref()).map_err(|e| e.to_string())?,
        None => RefDecoder::dense(&m),
    };
    let (mut gpu, _) = super::CudaDecoder::load(files, dt, 0, |_| {}).map_err(|e| e.0)?;
    if let Some((p, _)) = plan {
        let fold = |heads: bool| -> Option<Vec<crate::predictor::FoldedPredictor>> { predictors.map(|ps| (0..ps.layers()).map(|l| ps.host(l, heads).fold()).collect()) };
        let (fm, fh) = (fold(false), fold(true));
        let art = super::engine::GpuArtifacts { qscore: copies, mlp_predictors: fm.as_deref(), head_predictors: fh.as_deref() };
        gpu.set_plan(p, &art).map_err(|e| e.0)?;
    }
    let dt = gpu.engine.w.dt;
    let name = match plan {
        Some((_, label)) => format!("{} ({label})", files.identity),
        None => files.identity.clone(),
    };
    compare(&name, &mut cpu, &mut gpu, dt, prompts, steps)
}

/// Kept sets on the GPU against the CPU reference's, given the same inputs: the reference's normed MLP inputs of
/// every prompt token (dense forward), rounded to the engine's 16-bit type, go through the GPU's selection, 16
/// tokens at a time sharing one kept set, each token's own set read from its flags. The reference's sets:
/// - CATS (`gemv_cats_*`): neuron j kept when its |SiLU(gate_j)| (OPT: ReLU(fc1_j)) is >= the layer's threshold;
/// - exactdown (dense gate/up GEMV, `topk_mark_abs*`, `topk_compact`): the top k of |SiLU(gate)·up|;
/// - qscore (`qscore_*`, `topk_mark_f32`, `topk_compact`): the top k of the score copies' |SiLU(ĝ)·û| as the
///   reference computes them ([`crate::model::QScorer`]).
/// - dejavu (the folded predictor's two GEMVs on the residual, `topk_mark_f32`, `topk_compact`): the top k of the
///   trained predictor's scores of the MLP's input residual as the reference computes them.
pub enum KeptRule<'a> {
    Cats(&'a [f32]),
    ExactDown(usize),
    QScore(usize, &'a crate::sparse::quant::QScoreCopies),
    Predicted(usize, &'a crate::predictor::Predictors<crate::backend::CpuBackend>),
    /// Heads: the top k of the look-ahead head predictor's scores of the previous layer's block input (layer 0:
    /// its own), against the GPU's predictor and top-k on the same f32 input.
    Heads(usize, &'a crate::predictor::Predictors<crate::backend::CpuBackend>),
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct KeptCheck {
    pub model: String,
    pub dtype: &'static str,
    pub tokens: usize,
    pub layers: usize,
    /// (token, layer) pairs whose two sets are equal, of all.
    pub equal: usize,
    pub total: usize,
    /// Mean size of the symmetric difference per (token, layer), and mean kept count (reference).
    pub mean_symdiff: f64,
    pub mean_kept: f64,
    /// Against the engine's selection function computed on the host in f64 from the same inputs and the engine's
    /// 16-bit weights (see [`EngineSel`]): pairs equal, and the mean symmetric difference.
    pub engine_equal: usize,
    pub engine_mean_symdiff: f64,
    /// At least 99% of the pairs equal to the engine function's sets (the test of the GPU's kernels; the burn
    /// reference's agreement above is reported beside it).
    pub pass: bool,
}

/// The engine's selection function, computed on the host in f64 from the inputs the GPU got and the 16-bit
/// weights it holds (downloaded from it), with the engine's rounding points: `exactdown` ranks the hidden values
/// rounded to the 16-bit type (the engine stores them so before the top-k); `qscore` ranks the int4 copies'
/// scores of the 16-bit input; the predictors' hidden layer is rounded to the 16-bit type between their two
/// GEMVs; CATS compares |SiLU(gate)| (OPT: ReLU(fc1 + b)) with the threshold. Ties as the host reference's.
enum EngineSel {
    /// Per layer: `[2f, d]` gate then up rows (llama) or `[f, d]` fc1 rows, and the fc1 bias.
    Glu(Vec<(Vec<f32>, Option<Vec<f32>>)>),
    /// Per layer: the dequantized gate and up copies `[f, d]`.
    Q(Vec<(Vec<f32>, Vec<f32>)>),
    /// Per layer: a folded predictor's weights rounded to the 16-bit type.
    Pred(Vec<crate::predictor::FoldedPredictor>),
}

fn dot64(w: &[f32], x: &[f64]) -> f64 {
    w.iter().zip(x).map(|(&a, &b)| a as f64 * b).sum()
}

fn silu64(v: f64) -> f64 {
    v / (1.0 + (-v).exp())
}

impl EngineSel {
    /// The kept set of one token at layer `l`: `xn` its normed MLP input (as given to the GPU, before rounding),
    /// `xr` its residual (predictors).
    #[allow(clippy::too_many_arguments)]
    fn kept(&self, th: Option<&[f32]>, k: usize, l: usize, xn: &[f32], xr: &[f32], dt: Half, llama: bool, f: usize) -> Vec<usize> {
        let x16: Vec<f64> = rounded(xn, dt).into_iter().map(f64::from).collect();
        match (self, th) {
            (EngineSel::Glu(ws), Some(th)) => {
                let (w, b) = &ws[l];
                let d = x16.len();
                (0..f)
                    .filter(|&j| {
                        let g = dot64(&w[j * d..(j + 1) * d], &x16) + b.as_ref().map_or(0.0, |b| b[j] as f64);
                        let a = if llama { silu64(g).abs() } else { g.max(0.0) };
                        a >= th[l] as f64
                    })
                    .collect()
            }
            (EngineSel::Glu(ws), None) => {
                let (w, _) = &ws[l];
                let d = x16.len();
                let h: Vec<f32> = (0..f).map(|j| (silu64(dot64(&w[j * d..(j + 1) * d], &x16)) * dot64(&w[(f + j) * d..(f + j + 1) * d], &x16)) as f32).collect();
                let a: Vec<f32> = rounded(&h, dt).into_iter().map(f32::abs).collect();
                crate::sparse::select::top_k(&a, k)
            }
            (EngineSel::Q(qs), _) => {
                let (gq, uq) = &qs[l];
                let d = x16.len();
                let a: Vec<f32> = (0..f).map(|j| (silu64(dot64(&gq[j * d..(j + 1) * d], &x16)) * dot64(&uq[j * d..(j + 1) * d], &x16)).abs() as f32).collect();
                crate::sparse::select::top_k(&a, k)
            }
            (EngineSel::Pred(ps), _) => {
                let p = &ps[l];
                let ms = xr.iter().map(|&v| v as f64 * v as f64).sum::<f64>() / xr.len() as f64;
                let rstd = 1.0 / (ms + crate::predictor::RMS_EPS).sqrt();
                let z: Vec<f64> = xr.iter().map(|&v| v as f64 * rstd).collect();
                let t: Vec<f32> = (0..p.r).map(|j| (dot64(&p.w1t[j * p.d..(j + 1) * p.d], &z) + p.b1[j] as f64) as f32).collect();
                let t16: Vec<f64> = rounded(&t, dt).into_iter().map(f64::from).collect();
                let sc: Vec<f32> = (0..p.n).map(|c| (dot64(&p.w2t[c * p.r..(c + 1) * p.r], &t16) + p.b2[c] as f64) as f32).collect();
                crate::sparse::select::top_k(&sc, k)
            }
        }
    }
}

pub fn kept_sets(files: &ModelFiles, dt: Option<Half>, rule: KeptRule<'_>, prompts: &[Vec<u32>]) -> Result<KeptCheck, String> {
    use super::predict::GpuPredictor;
    use super::select::{qscore, topk_compact, topk_mark, QCopy, Scores};
    use super::sparse::{cats_select, In, Kept};
    use crate::model::{to_host_3d, Forward, TapSet};
    use burn::tensor::{Tensor, TensorData};
    type Cpu = crate::backend::CpuBackend;
    let dev = Default::default();
    let m = crate::model::Model::<Cpu>::load(&files.config, files.checkpoint.as_ref(), &dev, |_| {}).map_err(|e| e.to_string())?;
    let (gpu, _) = super::CudaDecoder::load(files, dt, 0, |_| {}).map_err(|e| e.0)?;
    let e = &gpu.engine;
    let g = |r: GpuResult<()>| r.map_err(|x| x.0);
    let cfg = &files.config;
    let (d, f, nl) = (cfg.hidden, cfg.ffn, cfg.layers);
    let llama = cfg.family == crate::config::Family::Llama;
    match rule {
        KeptRule::Cats(th) if th.len() != nl => return Err(format!("{} thresholds for {nl} layers", th.len())),
        KeptRule::ExactDown(_) | KeptRule::QScore(..) if !llama => return Err("the top-k rules apply to SwiGLU models".into()),
        _ => {}
    }
    let (qs, qgpu) = match rule {
        KeptRule::QScore(_, c) => (Some(crate::model::QScorer::<Cpu>::from_copies(c, &dev)), Some(QCopy::upload_all(e, c).map_err(|x| x.0)?)),
        _ => (None, None),
    };
    let pgpu: Vec<GpuPredictor> = match rule {
        KeptRule::Predicted(_, p) => (0..nl).map(|l| GpuPredictor::upload(e, &p.host(l, false).fold())).collect::<GpuResult<_>>().map_err(|x| x.0)?,
        KeptRule::Heads(_, p) => (0..nl).map(|l| GpuPredictor::upload(e, &p.host(l, true).fold())).collect::<GpuResult<_>>().map_err(|x| x.0)?,
        _ => Vec::new(),
    };
    let dt = e.w.dt;
    let round_pred = |p: crate::predictor::FoldedPredictor| crate::predictor::FoldedPredictor { w1t: rounded(&p.w1t, dt), b1: rounded(&p.b1, dt), w2t: rounded(&p.w2t, dt), b2: rounded(&p.b2, dt), ..p };
    let down16 = |ptr: CUdeviceptr, n: usize| -> Result<Vec<f32>, String> {
        let mut v = vec![0u16; n];
        e.gpu.download(ptr, &mut v).map_err(|x| x.0)?;
        Ok(unbits(&v, dt))
    };
    let esel = match rule {
        KeptRule::Cats(_) | KeptRule::ExactDown(_) => {
            let rows = if llama { 2 * f } else { f };
            EngineSel::Glu((0..nl).map(|l| {
                let lw = &e.w.layers[l];
                Ok((down16(lw.up.ptr, rows * d)?, lw.up_b.as_ref().map(|b| down16(b.ptr, f)).transpose()?))
            }).collect::<Result<_, String>>()?)
        }
        KeptRule::QScore(_, c) => EngineSel::Q(c.layers.iter().map(|(g, u)| (g.dequantize(), u.dequantize())).collect()),
        KeptRule::Predicted(_, p) => EngineSel::Pred((0..nl).map(|l| round_pred(p.host(l, false).fold())).collect()),
        KeptRule::Heads(_, p) => EngineSel::Pred((0..nl).map(|l| round_pred(p.host(l, true).fold())).collect()),
    };
    let (sel_th, sel_k) = match rule {
        KeptRule::Cats(th) => (Some(th), 0),
        KeptRule::ExactDown(k) | KeptRule::QScore(k, _) | KeptRule::Predicted(k, _) | KeptRule::Heads(k, _) => (None, k),
    };
    // The units a rule ranks: neurons, or heads.
    let f = if matches!(rule, KeptRule::Heads(..)) { cfg.heads } else { f };
    let alloc = |n: usize| e.gpu.alloc(n).map_err(|x| x.0);
    let (idx, cnt, out, tally, xin) = (alloc(f * 4)?, alloc(4)?, alloc(16 * 2 * f * 4)?, alloc(16 * 8 * 4)?, alloc(16 * d * 2)?);
    let (keep, flags, hid) = (alloc(16 * f)?, alloc(16 * f * 4)?, alloc(16 * f * 2)?);
    let (resid, ptmp) = (alloc(16 * d * 4)?, alloc(pgpu.iter().map(|p| p.scratch_bytes(16)).max().unwrap_or(4))?);
    let taps_want = TapSet { mlp_normed: true, mlp_act: true, mlp_input: true, block_input: true, ..Default::default() };
    let (mut equal, mut total, mut symdiff, mut kept_sum) = (0usize, 0usize, 0usize, 0usize);
    let (mut e_equal, mut e_symdiff) = (0usize, 0usize);
    let symd = |a: &[usize], b: &[usize]| a.len() + b.len() - 2 * a.iter().filter(|j| b.binary_search(j).is_ok()).count();
    let mut tokens = 0;
    for p in prompts {
        let mut cache = m.new_cache();
        let mut taps = Vec::new();
        let _ = m.forward_with(m.tokens(std::slice::from_ref(p)), &mut cache, Forward { taps: Some((&taps_want, &mut taps)), ..Default::default() });
        tokens += p.len();
        let blocks: Vec<Vec<f32>> = taps.iter().map(|lt| lt.block_input.clone().map(|t| to_host_3d(t).0).unwrap_or_default()).collect();
        for (l, lt) in taps.into_iter().enumerate() {
            let (xn, [_, s, _]) = to_host_3d(lt.mlp_normed.ok_or("no normed taps")?);
            // Neuron predictors read the MLP's input residual; head predictors the previous block's input.
            let xr = match rule {
                KeptRule::Heads(..) => blocks[l.saturating_sub(1)].clone(),
                _ => to_host_3d(lt.mlp_input.ok_or("no residual taps")?).0,
            };
            // The reference's ranking per token: CATS's magnitudes, the exact hidden values, the copies' scores, or
            // the predictor's scores of the residual.
            let mag = match rule {
                KeptRule::Cats(_) if llama => lt.gate_act,
                KeptRule::QScore(..) => {
                    let x = Tensor::<Cpu, 3>::from_data(TensorData::new(xn.clone(), [1, s, d]), &dev);
                    qs.as_ref().map(|q| q.scores(l, x))
                }
                KeptRule::Predicted(_, p) => Some(p.neuron_scores(l, Tensor::<Cpu, 3>::from_data(TensorData::new(xr.clone(), [1, s, d]), &dev))),
                KeptRule::Heads(_, p) => Some(p.head_scores(l, Tensor::<Cpu, 3>::from_data(TensorData::new(xr.clone(), [1, s, d]), &dev))),
                _ => lt.mlp_act,
            };
            let (mag, _) = to_host_3d(mag.ok_or("no activation taps")?);
            for c0 in (0..s).step_by(16) {
                let nb = (s - c0).min(16);
                g(e.gpu.upload(&xin, 0, &bits(&xn[c0 * d..(c0 + nb) * d], dt)))?;
                g(e.gpu.memset(&cnt, 0))?;
                g(e.gpu.memset(&tally, 0))?;
                let kept = Kept { idx: idx.ptr, cnt: cnt.ptr, cap: f };
                let lw = &e.w.layers[l];
                let up_b = lw.up_b.as_ref().map(|b| b.ptr);
                match rule {
                    KeptRule::Cats(th) => g(cats_select(e, lw.up.ptr, up_b, llama, In::Half(xin.ptr), th[l], kept, out.ptr, nb, d, tally.ptr))?,
                    KeptRule::ExactDown(k) => {
                        g(e.linear(lw.up.ptr, up_b, xin.ptr, hid.ptr, nb, f, d, Epi::Glu, out.ptr))?;
                        g(topk_mark(e, Scores::Abs16(hid.ptr), nb, f, k, keep.ptr))?;
                        g(topk_compact(e, keep.ptr, nb, f, kept, Some(flags.ptr), None))?;
                    }
                    KeptRule::QScore(k, _) => {
                        let q = &qgpu.as_ref().ok_or("no score copies")?[l];
                        g(qscore(e, q, In::Half(xin.ptr), out.ptr, nb, f, d))?;
                        g(topk_mark(e, Scores::F32(out.ptr), nb, f, k, keep.ptr))?;
                        g(topk_compact(e, keep.ptr, nb, f, kept, Some(flags.ptr), None))?;
                    }
                    KeptRule::Predicted(k, _) | KeptRule::Heads(k, _) => {
                        // The predictor reads the f32 residual as it is (not rounded).
                        g(e.gpu.upload(&resid, 0, &xr[c0 * d..(c0 + nb) * d]))?;
                        g(pgpu[l].scores(e, resid.ptr, nb, ptmp.ptr, out.ptr))?;
                        g(topk_mark(e, Scores::F32(out.ptr), nb, f, k, keep.ptr))?;
                        g(topk_compact(e, keep.ptr, nb, f, kept, Some(flags.ptr), None))?;
                    }
                }
                let mut n = [0i32];
                g(e.gpu.download(cnt.ptr, &mut n))?;
                let n = n[0].max(0) as usize;
                let mut ids = vec![0i32; n];
                g(e.gpu.download(idx.ptr, &mut ids))?;
                // Per row and kept slot: nonzero where the row keeps it (CATS: its value; top-k: its flag).
                let vals: Vec<f32> = match rule {
                    KeptRule::Cats(_) if !llama => {
                        let mut v = vec![0u16; nb * f];
                        g(e.gpu.download(out.ptr, &mut v))?;
                        unbits(&v, dt)
                    }
                    KeptRule::Cats(_) => {
                        let mut v = vec![0f32; nb * f];
                        g(e.gpu.download(out.ptr, &mut v))?;
                        v
                    }
                    _ => {
                        let mut v = vec![0f32; nb * f];
                        g(e.gpu.download(flags.ptr, &mut v))?;
                        v
                    }
                };
                // The engine function's sets of the chunk's tokens, one thread per token.
                let eng: Vec<Vec<usize>> = std::thread::scope(|sc| {
                    let hs: Vec<_> = (0..nb)
                        .map(|b| {
                            let (xn, xr, esel) = (&xn[(c0 + b) * d..(c0 + b + 1) * d], &xr[(c0 + b) * d..(c0 + b + 1) * d], &esel);
                            sc.spawn(move || esel.kept(sel_th, sel_k, l, xn, xr, dt, llama, f))
                        })
                        .collect();
                    hs.into_iter().map(|h| h.join().unwrap_or_default()).collect()
                });
                for b in 0..nb {
                    let mut gpu_set: Vec<usize> = (0..n).filter(|&s_| vals[b * f + s_] != 0.0).map(|s_| ids[s_] as usize).collect();
                    gpu_set.sort_unstable();
                    let ed = symd(&eng[b], &gpu_set);
                    e_equal += usize::from(ed == 0);
                    e_symdiff += ed;
                    let row = &mag[(c0 + b) * f..(c0 + b + 1) * f];
                    let cpu_set: Vec<usize> = match rule {
                        KeptRule::Cats(th) => (0..f).filter(|&j| row[j].abs() >= th[l]).collect(),
                        // The predictor's logits rank as they are (a GPU top-k of f32 scores).
                        KeptRule::Predicted(k, _) | KeptRule::Heads(k, _) => crate::sparse::select::top_k(row, k),
                        KeptRule::ExactDown(k) | KeptRule::QScore(k, _) => {
                            let a: Vec<f32> = row.iter().map(|v| v.abs()).collect();
                            crate::sparse::select::top_k(&a, k)
                        }
                    };
                    let common = cpu_set.iter().filter(|j| gpu_set.binary_search(j).is_ok()).count();
                    let diff = cpu_set.len() + gpu_set.len() - 2 * common;
                    equal += usize::from(diff == 0);
                    total += 1;
                    symdiff += diff;
                    kept_sum += cpu_set.len();
                }
            }
        }
    }
    Ok(KeptCheck {
        model: files.identity.clone(),
        dtype: dt.name(),
        tokens,
        layers: nl,
        equal,
        total,
        mean_symdiff: symdiff as f64 / total.max(1) as f64,
        mean_kept: kept_sum as f64 / total.max(1) as f64,
        engine_equal: e_equal,
        engine_mean_symdiff: e_symdiff as f64 / total.max(1) as f64,
        pass: total > 0 && e_equal * 100 >= total * 99,
    })
}
