//! `bench --kernels`: where a captured decode step's time goes, kernel by kernel, on the path that runs. The step
//! is captured again with only its first n launches for every n (later ones skipped), and each of those graphs is
//! replayed with the L2 flushed first (as `--mlp-block` times); a kernel's time is how much the median grows when
//! it is added. Work that programmatic dependent launch or the side stream overlaps with earlier kernels adds
//! little, so the column names what lies on the step's critical path, and it sums to the whole step.

use super::engine::Engine;
use super::gpu::GpuResult;
use super::mlp_bench::{time_graph, FLUSH_BYTES};

/// One launch of the step.
#[derive(Debug, Clone)]
pub struct KernelTime {
    /// Position in the step's issue order.
    pub index: usize,
    pub name: String,
    /// Issued on the side stream (the look-ahead head selection).
    pub side: bool,
    /// Median of the graph of the first `index + 1` launches, µs.
    pub cum_us: f64,
    /// Its growth over the graph of the first `index` launches, µs.
    pub us: f64,
}

/// Prefill `prompt` random tokens in `batch` rows, take one step, then time every prefix of the next step's
/// launches (`reps` replays each; the median).
pub fn profile(e: &mut Engine, batch: usize, prompt: usize, reps: usize, mut progress: impl FnMut(usize, usize)) -> GpuResult<(f64, Vec<KernelTime>)> {
    let vocab = e.ctx.cfg.vocab_size as u64;
    let mut r = crate::decode::SplitMix64(17);
    let ids: Vec<i32> = (0..batch * prompt).map(|_| (r.next_u64() % vocab) as i32).collect();
    e.reset();
    e.prefill(&ids, batch, prompt, vec![prompt; batch])?;
    let first: Vec<i32> = e.argmax()?.into_iter().map(|v| v as i32).collect();
    // One real step, so the token buffer holds valid ids for the captured ones.
    e.step(Some(&first), batch)?;
    let flush = e.ctx.gpu.alloc(FLUSH_BYTES)?;
    e.ctx.gpu.trace(None);
    let counted = e.capture_step(batch);
    let launches = e.ctx.gpu.trace_take();
    drop(counted?);
    let mut cum = Vec::with_capacity(launches.len() + 1);
    for n in 0..=launches.len() {
        progress(n, launches.len());
        e.ctx.gpu.trace(Some(n));
        let g = e.capture_step(batch);
        e.ctx.gpu.trace_take();
        cum.push(time_graph(&e.ctx, &g?, &flush, reps)?.0);
    }
    let rows = launches
        .iter()
        .enumerate()
        .map(|(i, &(f, side))| KernelTime { index: i, name: e.ctx.k.name_of(f).unwrap_or_else(|| "?".into()), side, cum_us: cum[i + 1], us: cum[i + 1] - cum[i] })
        .collect();
    Ok((cum[launches.len()], rows))
}

/// The launches in order, then the kernels grouped by name (largest total first), as markdown.
pub fn tables(label: &str, total_us: f64, rows: &[KernelTime]) -> String {
    let mut s = format!("\n{label}: one captured step {total_us:.1} us (L2 flushed first); each kernel's growth of the prefix graph's median\n\n");
    s += "| # | kernel | stream | us | cumulative us |\n|---|---|---|---|---|\n";
    for r in rows {
        s += &format!("| {} | {} | {} | {:.1} | {:.1} |\n", r.index, r.name, if r.side { "side" } else { "main" }, r.us, r.cum_us);
    }
    let mut by: Vec<(String, usize, f64)> = Vec::new();
    for r in rows {
        match by.iter_mut().find(|(n, _, _)| *n == r.name) {
            Some(x) => {
                x.1 += 1;
                x.2 += r.us;
            }
            None => by.push((r.name.clone(), 1, r.us)),
        }
    }
    by.sort_by(|a, b| b.2.total_cmp(&a.2));
    s += "\n| kernel | launches | us total | us a launch | share |\n|---|---|---|---|---|\n";
    for (n, c, t) in by {
        s += &format!("| {n} | {c} | {t:.1} | {:.2} | {:.1}% |\n", t / c as f64, 100.0 * t / total_us.max(1e-9));
    }
    s
}
