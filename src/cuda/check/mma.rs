//! The tensor-core gathers (`gemv_mma_*`, kernels/mma.cu) against f64 on the same rounded inputs, every epilogue,
//! 3-16 rows, kept sets of 1, a third and all of the rows, the row flags / factors the batched sparse MLP passes;
//! output columns the kernel must not write stay poisoned.

use super::{randv, rounded, silu, verdict, Dev, KernelCheck};
use crate::cuda::launcher::{Epi, Launcher};
use crate::cuda::gpu::GpuResult;
use crate::cuda::gather::{gather_mul, gather_store, gather_up, random_kept, In, Kept};
use crate::source::weights::Half;

#[derive(Debug, Clone, Copy, PartialEq)]
enum Kind {
    Relu,
    Glu,
    Store,
    Mul,
}

pub(super) fn check_mma(e: &Launcher, dt: Half, seed: u64, out: &mut Vec<KernelCheck>) -> GpuResult<()> {
    let d = Dev { e };
    // (rows, k, f): both tile widths (n1: up to 8 rows, n2: 9-16), partial tiles of 16 kept rows, K slices shorter
    // than one unrolled step (k = 576: 18 chunks over 8 warps) and long ones (5,120).
    for (rows, k, f) in [(3usize, 576usize, 1536usize), (8, 1024, 344), (9, 2048, 100), (16, 5120, 700), (5, 4096, 33)] {
        for kind in [Kind::Relu, Kind::Glu, Kind::Store, Kind::Mul] {
            let wrows = if kind == Kind::Glu { 2 * f } else { f };
            let s = seed + (rows * 7919 + k * 31 + f) as u64 + kind as u64 * 101;
            let w = rounded(&randv(wrows * k, s, (3.0 / k as f32).sqrt()), dt);
            let x = rounded(&randv(rows * k, s + 1, 1.0), dt);
            let bias = rounded(&randv(wrows, s + 2, 0.5), dt);
            // Row flags (ReLU / GLU: 0 or 1 per row and slot) or factors (MUL).
            let pre: Vec<f32> = match kind {
                Kind::Mul => randv(rows * f, s + 3, 2.0),
                _ => randv(rows * f, s + 3, 1.0).iter().map(|&v| if v > -0.4 { 1.0 } else { 0.0 }).collect(),
            };
            let (wb, xb, bb, pb) = (d.halfbuf(&w, dt)?, d.halfbuf(&x, dt)?, d.halfbuf(&bias, dt)?, d.f32buf(&pre)?);
            for kk in [1usize, f.div_ceil(3), f] {
                let idx = random_kept(f, kk, s + kk as u64);
                let (ib, cb) = (d.i32buf(&idx)?, d.i32buf(&[kk as i32])?);
                let kept = Kept { idx: ib.ptr, cnt: cb.ptr, cap: f, early: kk % 2 == 1 };
                let dot = |row: usize, r: usize| -> f64 { (0..k).map(|i| w[row * k + i] as f64 * x[r * k + i] as f64).sum::<f64>() + bias[row] as f64 };
                let (got, want, untouched) = if kind == Kind::Store {
                    let ob = d.poisoned(rows * f * 4)?;
                    gather_store(e, wb.ptr, Some(bb.ptr), In::Half(xb.ptr), kept, ob.ptr, rows, k)?;
                    let all = d.read_f32(&ob, rows * f)?;
                    let mut got = Vec::new();
                    let mut want = Vec::new();
                    let mut keep = vec![false; f];
                    for &j in &idx {
                        keep[j as usize] = true;
                    }
                    let mut touched = 0;
                    for r in 0..rows {
                        for j in 0..f {
                            if keep[j] {
                                got.push(all[r * f + j]);
                                want.push(dot(j, r) as f32);
                            } else if !all[r * f + j].is_nan() {
                                touched += 1;
                            }
                        }
                    }
                    (got, want, touched)
                } else {
                    let ob = d.poisoned(rows * f * 2)?;
                    match kind {
                        Kind::Relu => gather_up(e, wb.ptr, Some(bb.ptr), f, In::Half(xb.ptr), kept, ob.ptr, rows, k, Epi::Relu, Some(pb.ptr))?,
                        Kind::Glu => gather_up(e, wb.ptr, Some(bb.ptr), f, In::Half(xb.ptr), kept, ob.ptr, rows, k, Epi::Glu, Some(pb.ptr))?,
                        _ => gather_mul(e, wb.ptr, Some(bb.ptr), In::Half(xb.ptr), pb.ptr, kept, ob.ptr, rows, k)?,
                    }
                    let all = d.read_half(&ob, rows * f, dt)?;
                    let mut got = Vec::new();
                    let mut want = Vec::new();
                    let mut touched = 0;
                    for r in 0..rows {
                        got.extend_from_slice(&all[r * f..r * f + kk]);
                        touched += all[r * f + kk..(r + 1) * f].iter().filter(|v| !v.is_nan()).count();
                        for (sl, &j) in idx.iter().enumerate() {
                            let j = j as usize;
                            let p = pre[r * f + sl] as f64;
                            let v = match kind {
                                Kind::Glu => silu(dot(j, r)) * dot(f + j, r) * p,
                                Kind::Relu => dot(j, r).max(0.0) * p,
                                _ => dot(j, r) * p,
                            };
                            want.push(v as f32);
                        }
                    }
                    (got, want, touched)
                };
                let mut v = verdict(format!("mma gather {kind:?} rows={rows} k={k} f={f} kept={kk}"), dt, &got, &want, 1e-2);
                if untouched > 0 {
                    v.pass = false;
                    v.kernel += &format!(" ({untouched} columns it must not write were written)");
                }
                out.push(v);
            }
        }
    }
    Ok(())
}
