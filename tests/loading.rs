//! Model sources: local directory (single and sharded safetensors), Hub cache layout, and the CLI on fixtures.

mod common;

use std::path::Path;

use dejavu::backend::CpuBackend as B;
use dejavu::model::to_host_3d;
use dejavu::{Model, ModelFiles};
use safetensors::SafeTensors;

fn logits_of(dir: &Path, ids: &[Vec<u32>]) -> Vec<f32> {
    let files = ModelFiles::resolve(dir.to_str().unwrap()).unwrap();
    let model: Model<B> = Model::load(&files.config, files.checkpoint.as_ref(), &Default::default(), |_| {}).unwrap();
    let mut cache = model.new_cache();
    to_host_3d(model.logits(model.forward(model.tokens(ids), &mut cache, None))).0
}

/// Split a fixture's model.safetensors into two shards with an index, as large checkpoints ship.
fn shard(src: &Path, dst: &Path) {
    std::fs::create_dir_all(dst).unwrap();
    for f in ["config.json", "tokenizer.json"] {
        std::fs::copy(src.join(f), dst.join(f)).unwrap();
    }
    let bytes = std::fs::read(src.join("model.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let mut names: Vec<String> = st.names().into_iter().map(|s| s.to_string()).collect();
    names.sort();
    let half = names.len() / 2;
    let mut map = serde_json::Map::new();
    for (i, part) in [&names[..half], &names[half..]].iter().enumerate() {
        let file = format!("model-{:05}-of-00002.safetensors", i + 1);
        let views: Vec<(String, safetensors::tensor::TensorView)> =
            part.iter().map(|n| (n.clone(), st.tensor(n).unwrap())).collect();
        safetensors::serialize_to_file(views, None, &dst.join(&file)).unwrap();
        for n in part.iter() {
            map.insert(n.clone(), serde_json::Value::String(file.clone()));
        }
    }
    let index = serde_json::json!({"metadata": {}, "weight_map": map});
    std::fs::write(dst.join("model.safetensors.index.json"), index.to_string()).unwrap();
}

#[test]
fn sharded_checkpoint_equals_single_file() {
    let tmp = tempfile::tempdir().unwrap();
    let ids = vec![vec![5u32, 17, 200, 3, 99, 42]];
    for name in ["tiny-opt", "tiny-llama"] {
        let dst = tmp.path().join(name);
        shard(&common::fixture_dir(name), &dst);
        assert!(!dst.join("model.safetensors").exists());
        assert_eq!(logits_of(&dst, &ids), logits_of(&common::fixture_dir(name), &ids), "{name}");
    }
}

/// Lay a fixture out as hf-hub's cache does: $HF_HOME/hub/models--o--n/{refs/main, snapshots/<rev>/...}.
fn fake_hub_cache(home: &Path, id: &str, fixture: &str) {
    let repo = home.join("hub").join(format!("models--{}", id.replace('/', "--")));
    let rev = "0123456789abcdef0123456789abcdef01234567";
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), rev).unwrap();
    common::copy_fixture(fixture, &repo.join("snapshots").join(rev));
}

#[test]
fn hub_id_is_read_from_the_cache_offline() {
    let home = tempfile::tempdir().unwrap();
    fake_hub_cache(home.path(), "dejavu-test/tiny-opt", "tiny-opt");
    let hf_home = home.path().to_str().unwrap();
    let out = common::dejavu(
        &["generate", "--model", "dejavu-test/tiny-opt", "--prompt", "the cat", "-n", "4"],
        &[("HF_HOME", hf_home), ("HF_HUB_OFFLINE", "1")],
    );
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert!(out.stdout.starts_with("the cat"), "{}", out.stdout);
}

#[test]
fn cli_generate_and_ppl_run_on_fixtures() {
    let opt = common::fixture_dir("tiny-opt");
    let out = common::dejavu(&["generate", "--model", opt.to_str().unwrap(), "-p", "once upon", "-n", "6", "--timings"], &[]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert!(out.stdout.starts_with("once upon"));
    assert!(out.stderr.contains("decode"), "{}", out.stderr);

    let tmp = tempfile::tempdir().unwrap();
    let text = tmp.path().join("t.txt");
    std::fs::write(&text, "the cat sat on the mat. the dog ran to the park. ".repeat(20)).unwrap();
    let json = tmp.path().join("ppl.json");
    let llama = common::fixture_dir("tiny-llama");
    let out = common::dejavu(
        &["ppl", "--model", llama.to_str().unwrap(), "--text", text.to_str().unwrap(), "--ctx", "32", "--stride", "16",
          "--json", json.to_str().unwrap()],
        &[],
    );
    assert_eq!(out.code, 0, "{}", out.stderr);
    let rec: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let ppl = rec["result"]["ppl"].as_f64().unwrap();
    let tokens = rec["result"]["tokens"].as_u64().unwrap();
    assert_eq!(rec["result"]["scored"].as_u64().unwrap(), tokens - 1, "every token but the first is scored once");
    // A random model is no better than uniform by much, and perplexity is at least 1.
    assert!(ppl > 1.0 && ppl.is_finite(), "{ppl}");
}

#[test]
fn ppl_equals_exp_of_mean_nll_from_full_forward() {
    // Independent recomputation: with ctx >= text length there is one window; ppl must equal exp(mean NLL)
    // computed here from the raw logits with a log-sum-exp in f64.
    let dir = common::fixture_dir("tiny-llama");
    let files = ModelFiles::resolve(dir.to_str().unwrap()).unwrap();
    let model: Model<B> = Model::load(&files.config, files.checkpoint.as_ref(), &Default::default(), |_| {}).unwrap();
    let ids: Vec<u32> = (0..40u32).map(|i| (i * 37 + 11) % 320).collect();
    let r = dejavu::ppl::perplexity(&mut dejavu::decode::RefDecoder::dense(&model), &ids, 64, 64, |_| {}).unwrap();
    let mut cache = model.new_cache();
    let (logits, [_, s, v]) = to_host_3d(model.logits(model.forward(model.tokens(std::slice::from_ref(&ids)), &mut cache, None)));
    let mut nll = 0.0f64;
    for i in 0..s - 1 {
        let row = &logits[i * v..(i + 1) * v];
        let m = row.iter().cloned().fold(f32::MIN, f32::max) as f64;
        let lse = m + row.iter().map(|&x| (x as f64 - m).exp()).sum::<f64>().ln();
        nll += lse - row[ids[i + 1] as usize] as f64;
    }
    let expect = (nll / (s - 1) as f64).exp();
    assert_eq!(r.scored, s - 1);
    assert!((r.ppl - expect).abs() / expect < 1e-5, "{} vs {}", r.ppl, expect);
}
