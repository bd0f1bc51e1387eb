//! The key/value cache under head sparsity (`--head-kv`): the attention with absent entries against an f64 loop,
//! and on the fixtures the cache semantics `HeadKv::Kept` documents — a key/value head is present where one of its
//! query heads is kept, a prefill equals the same tokens decoded one by one, keeping every head equals dense.

mod common;

use burn::tensor::{Tensor, TensorData};
use dejavu::backend::CpuBackend as B;
use dejavu::decode::{Decoder, RefDecoder, SplitMix64};
use dejavu::model::layers::causal_attention;
use dejavu::model::{to_host, Scorer, TapSet};
use dejavu::sparse::{select, HeadKv, HeadRule, LayerPlan, MlpRule, Plan};
use dejavu::{Model, ModelFiles};

fn load(name: &str) -> (ModelFiles, Model<B>) {
    let files = ModelFiles::resolve(common::fixture_dir(name).to_str().unwrap()).unwrap();
    let model = Model::load(&files.config, files.checkpoint.as_ref(), &Default::default(), |_| {}).unwrap();
    (files, model)
}

fn uniform(r: &mut SplitMix64, n: usize) -> Vec<f32> {
    (0..n).map(|_| (r.next_u64() % 2001) as f32 / 1000.0 - 1.0).collect()
}

#[test]
fn attention_skips_absent_entries_but_never_a_querys_own_position() {
    let (b, h, kv, s, t, d) = (2, 4, 2, 3, 6, 8);
    let past = t - s;
    let mut r = SplitMix64(7);
    let (q, k, v) = (uniform(&mut r, b * h * s * d), uniform(&mut r, b * kv * t * d), uniform(&mut r, b * kv * t * d));
    let present: Vec<f32> = (0..b * kv * t).map(|_| (r.next_u64() % 2) as f32).collect();
    let dev = Default::default();
    let tq = Tensor::<B, 4>::from_data(TensorData::new(q.clone(), [b, h, s, d]), &dev);
    let tk = Tensor::<B, 4>::from_data(TensorData::new(k.clone(), [b, kv, t, d]), &dev);
    let tv = Tensor::<B, 4>::from_data(TensorData::new(v.clone(), [b, kv, t, d]), &dev);
    let tp = Tensor::<B, 3>::from_data(TensorData::new(present.clone(), [b, kv, t]), &dev);
    let scale = 1.0 / (d as f64).sqrt();
    let got = to_host(causal_attention(tq.clone(), tk.clone(), tv.clone(), Some(tp), scale));
    let all_present = to_host(causal_attention(tq, tk, tv, None, scale));
    // The f64 reference: head hh reads key/value head hh / (h / kv); query i sits at past + i.
    let mut worst = 0.0f64;
    let mut worst_dense = 0.0f64;
    for bb in 0..b {
        for hh in 0..h {
            let g = hh / (h / kv);
            for i in 0..s {
                for (masked, worst) in [(true, &mut worst), (false, &mut worst_dense)] {
                    let seen: Vec<usize> = (0..=past + i).filter(|&j| !masked || j == past + i || present[(bb * kv + g) * t + j] == 1.0).collect();
                    let qi = &q[((bb * h + hh) * s + i) * d..][..d];
                    let logits: Vec<f64> = seen
                        .iter()
                        .map(|&j| qi.iter().zip(&k[((bb * kv + g) * t + j) * d..][..d]).map(|(&a, &c)| a as f64 * c as f64).sum::<f64>() * scale)
                        .collect();
                    let m = logits.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    let z: f64 = logits.iter().map(|l| (l - m).exp()).sum();
                    let out = if masked { &got } else { &all_present };
                    for c in 0..d {
                        let want: f64 = seen.iter().zip(&logits).map(|(&j, l)| (l - m).exp() / z * v[((bb * kv + g) * t + j) * d + c] as f64).sum();
                        *worst = worst.max((out[((bb * h + hh) * s + i) * d + c] as f64 - want).abs());
                    }
                }
            }
        }
    }
    assert!(present.contains(&0.0), "the draw must have absent entries");
    assert!(worst < 1e-5, "attention with absent entries: max |error| {worst}");
    assert!(worst_dense < 1e-5, "causal attention: max |error| {worst_dense}");
}

/// Head scores that change with every token: the first `heads` channels of the previous block's input.
struct FirstChannels(usize);
impl Scorer<B> for FirstChannels {
    fn neuron_scores(&self, _: usize, x: Tensor<B, 3>) -> Tensor<B, 3> {
        x
    }
    fn head_scores(&self, _: usize, x: Tensor<B, 3>) -> Tensor<B, 3> {
        let [b, s, _] = x.dims();
        x.slice([0..b, 0..s, 0..self.0])
    }
}

fn head_plan(layers: usize, k: usize, kv: HeadKv) -> Plan {
    Plan::uniform(layers, LayerPlan { mlp: MlpRule::Dense, heads: HeadRule::PredictedTopK { k, kv } })
}

/// Logits of every position of `ids`: one prefill, or one token at a time.
fn logits(dec: &mut RefDecoder<'_, B>, ids: &[u32], one_by_one: bool) -> Vec<Vec<f32>> {
    dec.reset();
    if one_by_one {
        ids.iter()
            .map(|&t| {
                dec.prefill(&[vec![t]], None).unwrap();
                dec.logits().unwrap().swap_remove(0)
            })
            .collect()
    } else {
        dec.prefill(&[ids.to_vec()], None).unwrap();
        dec.position_logits().unwrap()
    }
}

fn max_delta(a: &[Vec<f32>], b: &[Vec<f32>]) -> f32 {
    a.iter().flatten().zip(b.iter().flatten()).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

#[test]
fn skipped_key_value_heads_are_absent_and_prefill_equals_decoding() {
    for name in ["tiny-llama", "tiny-opt"] {
        let (files, model) = load(name);
        let c = &files.config;
        let (h, kv) = (c.heads, c.kv_heads);
        let scorer = FirstChannels(h);
        let ids: Vec<u32> = (0..12u32).map(|i| (i * 37 + 5) % c.vocab_size as u32).collect();
        let dense_plan = Plan::dense(c.layers);
        let mut dense = RefDecoder::new(&model, &dense_plan, None).unwrap();
        let want_dense = logits(&mut dense, &ids, false);

        // Keeping every head: both cache semantics are the dense model, and nothing is absent.
        for kvr in [HeadKv::All, HeadKv::Kept] {
            let plan = head_plan(c.layers, h, kvr);
            let mut dec = RefDecoder::new(&model, &plan, Some(&scorer)).unwrap();
            let got = logits(&mut dec, &ids, false);
            assert!(max_delta(&got, &want_dense) < 1e-5, "{name} {kvr:?} keeping every head: {}", max_delta(&got, &want_dense));
            assert!(dec.cache().present(0).is_none_or(|p| p.iter().all(|&x| x == 1.0)), "{name}: an entry absent with every head kept");
        }

        // One head kept per token: a key/value head is present exactly where its query heads include the kept one.
        let plan = head_plan(c.layers, 1, HeadKv::Kept);
        let mut dec = RefDecoder::new(&model, &plan, Some(&scorer)).unwrap();
        let prefilled = logits(&mut dec, &ids, false);
        // Layer 0's head scores come from its own block input (the embeddings); check that layer's flags.
        let want = TapSet { block_input: true, ..Default::default() };
        let mut taps = Vec::new();
        let _ = model.forward(model.tokens(std::slice::from_ref(&ids)), &mut model.new_cache(), Some((&want, &mut taps)));
        let block0 = to_host(taps[0].block_input.clone().unwrap());
        let first: Vec<f32> = block0.chunks(c.hidden).flat_map(|row| row[..h].to_vec()).collect();
        let keep = select::top_k_rows(&first, h, 1);
        let flags = dec.cache().present(0).expect("with one head of several kept, some key/value head is skipped");
        let group = h / kv;
        for p in 0..ids.len() {
            for g in 0..kv {
                let want = (0..group).any(|m| keep[p * h + g * group + m] == 1.0);
                assert_eq!(flags[g * ids.len() + p] == 1.0, want, "{name}: layer 0, position {p}, key/value head {g}");
            }
        }
        assert!(flags.contains(&0.0));
        // The same tokens one at a time give the same logits: the cache holds what a prefill would.
        let stepped = logits(&mut dec, &ids, true);
        assert!(max_delta(&prefilled, &stepped) < 1e-4, "{name}: prefill vs one by one {}", max_delta(&prefilled, &stepped));
        // Absent entries change later tokens: the cache semantics are not the `all` ones.
        let all_plan = head_plan(c.layers, 1, HeadKv::All);
        let mut all = RefDecoder::new(&model, &all_plan, Some(&scorer)).unwrap();
        let with_all = logits(&mut all, &ids, false);
        assert!(all.cache().present(0).is_none(), "{name}: `all` marks nothing absent");
        assert!(max_delta(&prefilled, &with_all) > 1e-3, "{name}: skipping key/value heads changed nothing");
        // A rollback keeps the flags of the positions it keeps.
        dec.truncate(5).unwrap();
        assert_eq!(dec.cache().present(0).unwrap(), (0..kv).flat_map(|g| flags[g * ids.len()..][..5].to_vec()).collect::<Vec<_>>());
    }
}
