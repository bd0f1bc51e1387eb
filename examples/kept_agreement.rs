//! How close the SwiGLU rules' kept sets are to the oracle's on a real model (one window of text):
//! 1. recall of the low-bit score's top-k against the exact top-k, both on the dense model's MLP inputs (so only
//!    the selection differs), per layer;
//! 2. the fraction of (token, layer) kept sets that `exactdown@S` (gathered host down) and `oracle@S` (masked
//!    dense down) share when each runs its own sparse forward: the same rule, two summation orders.
//!
//! `cargo run --release --example kept_agreement -- MODEL QSCORE.safetensors TEXT SPARSITY TOKENS`

use dejavu::backend::CpuBackend as B;
use dejavu::model::{to_host, Forward, LayerTaps, QScorer, Sparse, TapSet};
use dejavu::sparse::quant::QScoreCopies;
use dejavu::sparse::{keep_count, select, HeadRule, LayerPlan, MlpRule, Plan};
use dejavu::{Model, ModelFiles};

fn main() -> anyhow::Result<()> {
    let a: Vec<String> = std::env::args().collect();
    if a.len() != 6 {
        anyhow::bail!("usage: kept_agreement MODEL QSCORE TEXT SPARSITY TOKENS");
    }
    let files = ModelFiles::resolve(&a[1])?;
    let id = files.identity()?;
    let dev = Default::default();
    let model = Model::<B>::load(&files.config, files.checkpoint.as_ref(), &dev, |_| {})?;
    let q = QScorer::<B>::from_copies(&QScoreCopies::load(std::path::Path::new(&a[2]), &id)?, &dev);
    let text = std::fs::read_to_string(&a[3])?;
    let s: f64 = a[4].parse()?;
    let n: usize = a[5].parse()?;
    let ids: Vec<u32> = files.tokenizer.encode(text.as_str(), true).map_err(|e| anyhow::anyhow!("{e}"))?.get_ids()[..n].to_vec();
    let c = &files.config;
    let (f, k) = (c.ffn, keep_count(s, c.ffn));
    let run = |plan: Option<&Plan>, want: TapSet| {
        let mut taps: Vec<LayerTaps<B>> = Vec::new();
        let mut cache = model.new_cache();
        let sparse = plan.map(|p| Sparse::with_qscore(p, None, Some(&q)).expect("plan"));
        let _ = model.forward_with(model.tokens(std::slice::from_ref(&ids)), &mut cache, Forward { sparse, taps: Some((&want, &mut taps)), ..Default::default() });
        taps
    };
    let dense = run(None, TapSet { mlp_act: true, mlp_normed: true, ..Default::default() });
    println!("| layer | recall of the int score's top-{k} (dense inputs) |");
    println!("|---|---|");
    let mut all = 0.0;
    for (l, t) in dense.iter().enumerate() {
        let act: Vec<f32> = to_host(t.mlp_act.clone().expect("tap")).iter().map(|v| v.abs()).collect();
        let sc = to_host(q.scores(l, t.mlp_normed.clone().expect("tap")));
        let mut hit = 0usize;
        for (a, b) in act.chunks(f).zip(sc.chunks(f)) {
            let want = select::top_k(a, k);
            let got = select::top_k(b, k);
            hit += got.iter().filter(|j| want.binary_search(j).is_ok()).count();
        }
        let r = hit as f64 / (n * k) as f64;
        all += r;
        println!("| {l} | {r:.4} |");
    }
    println!("| mean | {:.4} |", all / c.layers as f64);
    let keep = TapSet { mlp_keep: true, ..Default::default() };
    let plan = |mlp| Plan::uniform(c.layers, LayerPlan { mlp, heads: HeadRule::Dense });
    let o = run(Some(&plan(MlpRule::OracleTopK { k })), keep);
    let e = run(Some(&plan(MlpRule::ExactDownTopK { k })), keep);
    let (mut same, mut total, mut overlap) = (0usize, 0usize, 0.0f64);
    let mut per_layer = Vec::new();
    for (to, te) in o.iter().zip(&e) {
        let (mo, me) = (to_host(to.mlp_keep.clone().expect("tap")), to_host(te.mlp_keep.clone().expect("tap")));
        let mut layer_same = 0usize;
        for (ro, re) in mo.chunks(f).zip(me.chunks(f)) {
            let both = ro.iter().zip(re).filter(|(x, y)| **x == 1.0 && **y == 1.0).count();
            same += (both == k) as usize;
            layer_same += (both == k) as usize;
            overlap += both as f64 / k as f64;
            total += 1;
        }
        per_layer.push(format!("{:.3}", layer_same as f64 / n as f64));
    }
    println!("identical kept sets per layer: {}", per_layer.join(" "));
    println!("\noracle@{s} vs exactdown@{s}, each in its own sparse forward over {n} tokens: identical kept sets in {same}/{total} (token, layer) pairs, mean overlap {:.5}", overlap / total as f64);
    Ok(())
}
