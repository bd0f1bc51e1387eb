//! The reference forward against Hugging Face transformers on the committed fixture models.
//! `tests/fixtures/*/reference.safetensors` was computed by `scripts/hf_reference.py` (transformers, f32, eager
//! attention) from the very weights committed beside it.

mod common;

use burn::tensor::Tensor;
use dejavu::backend::CpuBackend as B;
use dejavu::model::{to_host_3d, LayerTaps, TapSet};
use dejavu::{Model, ModelFiles};
use safetensors::SafeTensors;

const FIXTURES: [&str; 4] = ["tiny-opt", "tiny-opt-proj", "tiny-llama", "tiny-llama-tied"];

struct Reference {
    ids: Vec<Vec<u32>>,
    logits: Vec<f32>,
    shape: Vec<usize>,
}

fn reference(name: &str) -> Reference {
    let bytes = std::fs::read(common::fixture_dir(name).join("reference.safetensors")).expect("reference file");
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let ids = st.tensor("input_ids").unwrap();
    let [b, s] = [ids.shape()[0], ids.shape()[1]];
    let flat: Vec<i64> = ids.data().chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().unwrap())).collect();
    let logits = st.tensor("logits").unwrap();
    Reference {
        ids: (0..b).map(|i| flat[i * s..(i + 1) * s].iter().map(|&x| x as u32).collect()).collect(),
        logits: logits.data().chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect(),
        shape: logits.shape().to_vec(),
    }
}

fn load(name: &str) -> Model<B> {
    let files = ModelFiles::resolve(common::fixture_dir(name).to_str().unwrap()).unwrap();
    Model::load(&files.config, files.checkpoint.as_ref(), &Default::default(), |_| {}).unwrap()
}

fn max_abs(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

#[test]
fn full_sequence_logits_match_transformers() {
    for name in FIXTURES {
        let r = reference(name);
        let model = load(name);
        let mut cache = model.new_cache();
        let h = model.forward(model.tokens(&r.ids), &mut cache, None);
        let (got, dims) = to_host_3d(model.logits(h));
        assert_eq!(dims.to_vec(), r.shape, "{name}");
        let err = max_abs(&got, &r.logits);
        eprintln!("{name}: max |ours - transformers| = {err:.2e} over {} logits", got.len());
        assert!(err < 1e-4, "{name}: max abs error {err}");
    }
}

#[test]
fn cached_decoding_matches_transformers() {
    // Prefill 5 tokens, then feed the rest one at a time through the KV cache.
    for name in FIXTURES {
        let r = reference(name);
        let model = load(name);
        let (b, s, v) = (r.shape[0], r.shape[1], r.shape[2]);
        let mut cache = model.new_cache();
        let mut steps: Vec<Tensor<B, 3>> = Vec::new();
        let pre: Vec<Vec<u32>> = r.ids.iter().map(|row| row[..5].to_vec()).collect();
        steps.push(model.logits(model.forward(model.tokens(&pre), &mut cache, None)));
        for t in 5..s {
            let col: Vec<Vec<u32>> = r.ids.iter().map(|row| vec![row[t]]).collect();
            steps.push(model.logits(model.forward(model.tokens(&col), &mut cache, None)));
        }
        assert_eq!(cache.len(), s);
        let (got, dims) = to_host_3d(Tensor::cat(steps, 1));
        assert_eq!(dims, [b, s, v]);
        let err = max_abs(&got, &r.logits);
        eprintln!("{name}: cached decode max |ours - transformers| = {err:.2e}");
        assert!(err < 1e-4, "{name}: max abs error {err}");
    }
}

#[test]
fn taps_have_documented_shapes_and_do_not_change_the_output() {
    for name in FIXTURES {
        let r = reference(name);
        let model = load(name);
        let c = model.cfg.clone();
        let (b, s) = (r.shape[0], r.shape[1]);
        let mut taps: Vec<LayerTaps<B>> = Vec::new();
        let mut cache = model.new_cache();
        let h = model.forward(model.tokens(&r.ids), &mut cache, Some((&TapSet::all(), &mut taps)));
        let (got, _) = to_host_3d(model.logits(h));
        assert!(max_abs(&got, &r.logits) < 1e-4, "{name}: taps changed the result");
        assert_eq!(taps.len(), c.layers);
        for t in &taps {
            assert_eq!(t.block_input.as_ref().unwrap().dims(), [b, s, c.hidden]);
            assert_eq!(t.mlp_input.as_ref().unwrap().dims(), [b, s, c.hidden]);
            assert_eq!(t.head_norm.as_ref().unwrap().dims(), [b, s, c.heads]);
            let (act, dims) = to_host_3d(t.mlp_act.clone().unwrap());
            assert_eq!(dims, [b, s, c.ffn]);
            match c.family {
                dejavu::Family::Opt => {
                    assert!(act.iter().all(|&x| x >= 0.0), "post-ReLU activations are non-negative");
                    assert!(t.gate_act.is_none());
                }
                dejavu::Family::Llama => assert_eq!(t.gate_act.as_ref().unwrap().dims(), [b, s, c.ffn]),
            }
            let (norms, _) = to_host_3d(t.head_norm.clone().unwrap());
            assert!(norms.iter().all(|&x| x >= 0.0 && x.is_finite()));
        }
        // Layer l+1's block input is layer l's output: check it differs from layer l's input (taps are per layer).
        let (a0, _) = to_host_3d(taps[0].block_input.clone().unwrap());
        let (a1, _) = to_host_3d(taps[1].block_input.clone().unwrap());
        assert!(max_abs(&a0, &a1) > 1e-3);
    }
}

#[test]
fn committed_fixtures_are_what_the_fixture_writer_produces() {
    let tmp = tempfile::tempdir().unwrap();
    for spec in dejavu::fixture::all() {
        let dir = tmp.path().join(spec.name);
        dejavu::fixture::write(&spec, &dir, dejavu::fixture::FixtureDtype::F32).unwrap();
        for f in ["config.json", "model.safetensors", "tokenizer.json"] {
            let fresh = std::fs::read(dir.join(f)).unwrap();
            let committed = std::fs::read(common::fixture_dir(spec.name).join(f)).unwrap();
            assert!(fresh == committed, "{}/{f} differs from what the fixture writer produces", spec.name);
        }
    }
}

#[test]
fn half_precision_checkpoints_load_and_agree_with_f32() {
    // The same seeded weights written as f16 and bf16 must give logits close to the f32 model's.
    let tmp = tempfile::tempdir().unwrap();
    let spec = dejavu::fixture::tiny_llama();
    let r = reference(spec.name);
    for (dtype, tol) in [(dejavu::fixture::FixtureDtype::F16, 0.05), (dejavu::fixture::FixtureDtype::BF16, 0.3)] {
        let dir = tmp.path().join(format!("{dtype:?}"));
        dejavu::fixture::write(&spec, &dir, dtype).unwrap();
        let files = ModelFiles::resolve(dir.to_str().unwrap()).unwrap();
        let model: Model<B> = Model::load(&files.config, files.checkpoint.as_ref(), &Default::default(), |_| {}).unwrap();
        let mut cache = model.new_cache();
        let (got, _) = to_host_3d(model.logits(model.forward(model.tokens(&r.ids), &mut cache, None)));
        let err = max_abs(&got, &r.logits);
        eprintln!("{dtype:?}: max |logit - f32 reference| = {err:.3e}");
        assert!(err < tol, "{dtype:?}: {err}");
        assert!(err > 0.0, "{dtype:?} weights should round");
    }
}
