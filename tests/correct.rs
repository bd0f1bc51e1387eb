//! Sirius-style correction above the Decoder, on the reference path: with `--accept argmax` corrected sparse
//! decoding reproduces dense greedy decoding token for token, and the cache it leaves is a dense prefill's.

mod common;

use dejavu::backend::CpuBackend as B;
use dejavu::decode::correct::{generate_corrected, Accept};
use dejavu::decode::{generate, Decoder, RefDecoder, Sampling};
use dejavu::sparse::{HeadRule, LayerPlan, MlpRule, Plan};
use dejavu::{Model, ModelFiles};

fn load(dir: &std::path::Path) -> (ModelFiles, Model<B>) {
    let files = ModelFiles::resolve(dir.to_str().unwrap()).unwrap();
    let model = Model::load(&files.config, files.checkpoint.as_ref(), &Default::default(), |_| {}).unwrap();
    (files, model)
}

fn models() -> Vec<std::path::PathBuf> {
    let mut d: Vec<_> = ["tiny-opt", "tiny-opt-proj", "tiny-llama", "tiny-llama-tied"].iter().map(|n| common::fixture_dir(n)).collect();
    d.push(common::shared_dir().join("models/stories260k"));
    d
}

/// Half the neurons and (where there are 4+) half the heads dropped per token: a plan that changes greedy tokens.
fn sparse_plan(files: &ModelFiles) -> Plan {
    let c = &files.config;
    let heads = if c.heads >= 4 { HeadRule::OracleTopK { k: c.heads / 2 } } else { HeadRule::Dense };
    Plan::uniform(c.layers, LayerPlan { mlp: MlpRule::OracleTopK { k: c.ffn / 4 }, heads })
}

#[test]
fn argmax_correction_reproduces_dense_greedy() {
    for dir in models() {
        let (files, model) = load(&dir);
        let v = files.config.vocab_size as u32;
        let plan = sparse_plan(&files);
        let mut differs = false;
        for seed in 0..4u32 {
            let prompt: Vec<u32> = (0..6).map(|i| (i * 37 + seed * 11 + 3) % v).collect();
            let n = 24;
            let mut dense = RefDecoder::dense(&model);
            let want = generate(&mut dense, &prompt, n, Sampling::default(), &[], |_| true).unwrap().new_tokens;
            let mut sparse = RefDecoder::new(&model, &plan, None).unwrap();
            let raw = generate(&mut sparse, &prompt, n, Sampling::default(), &[], |_| true).unwrap().new_tokens;
            differs |= raw != want;
            for period in [1, 4, 16] {
                let mut dec = RefDecoder::new(&model, &plan, None).unwrap();
                let got = generate_corrected(&mut dec, &prompt, n, period, Accept::Argmax, &[]).unwrap();
                assert_eq!(got.new_tokens, want, "{} seed {seed} period {period}", dir.display());
                assert_eq!(got.accepted_runs.len(), got.dense_passes);
                assert!(got.sparse_tokens < n, "the first token is always the dense model's");
                // Each check follows at least one and at most `period` sparse steps, rejected proposals counted.
                assert!(got.sparse_steps >= got.sparse_tokens && got.sparse_steps >= got.dense_passes);
                assert!(got.sparse_steps <= got.dense_passes * period, "{} steps for {} checks of period {period}", got.sparse_steps, got.dense_passes);
                assert!(got.ms_per_check().is_some() && got.ms_per_sparse_step().is_some());

                // Every cached position was written by a dense verification forward: the cache equals a dense
                // prefill of the same tokens (f32; the two forwards group positions differently, so not bitwise).
                let len = dec.len();
                let all: Vec<u32> = prompt.iter().chain(&got.new_tokens).copied().take(len).collect();
                let mut fresh = RefDecoder::dense(&model);
                fresh.prefill(&[all], None).unwrap();
                for (l, ((k1, v1), (k2, v2))) in dec.cache().to_host().iter().zip(fresh.cache().to_host().iter()).enumerate() {
                    assert_eq!(k1.len(), k2.len());
                    let d = k1.iter().zip(k2).chain(v1.iter().zip(v2)).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
                    assert!(d < 1e-4, "{} layer {l}: max |cache - dense prefill| = {d}", dir.display());
                }
            }
        }
        assert!(differs, "{}: the sparse plan never changed a greedy token, so this test would prove nothing", dir.display());
    }
}

#[test]
fn accept_rule_parses() {
    assert_eq!("argmax".parse::<Accept>().unwrap(), Accept::Argmax);
    assert_eq!("0.1".parse::<Accept>().unwrap(), Accept::Prob(0.1));
    assert!("1.5".parse::<Accept>().is_err());
    assert!("often".parse::<Accept>().is_err());
}

#[test]
fn correct_flag_usage_errors_exit_2() {
    let m = common::fixture_dir("tiny-llama");
    let m = m.to_str().unwrap();
    let out = common::dejavu(&["generate", "--model", m, "--correct", "-n", "4"], &[]);
    common::assert_one_line_exit(&out, 2, &["--correct", "sparse --mode"]);
    let out = common::dejavu(&["generate", "--model", m, "--mode", "oracle@0.5", "--correct", "--temperature", "0.7"], &[]);
    common::assert_one_line_exit(&out, 2, &["--correct", "--temperature"]);
    let out = common::dejavu(&["generate", "--model", m, "--mode", "oracle@0.5", "--correct", "--period", "0"], &[]);
    common::assert_one_line_exit(&out, 2, &["--period"]);
    let out = common::dejavu(&["generate", "--model", m, "--mode", "oracle@0.5", "--correct", "--accept", "often"], &[]);
    assert_eq!(out.code, 2, "{}", out.stderr);
    assert!(out.stderr.contains("--accept"), "{}", out.stderr);
}

/// `generate --prompts`: the dense row equals single-prompt greedy generation; with `--accept argmax` every
/// corrected row reproduces it exactly; the uncorrected rows' exactness and first divergence match a comparison
/// written here from the continuations themselves.
#[test]
fn prompt_set_judges_continuations_against_dense() {
    let m = common::shared_dir().join("models/stories260k");
    let m = m.to_str().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let prompts = ["Once upon a time", "", "The little dog saw a big ball", "Lily and Tom went to the park"];
    let pf = tmp.path().join("prompts.txt");
    std::fs::write(&pf, prompts.join("\n")).unwrap();
    let json = tmp.path().join("set.json");
    let args = ["generate", "--model", m, "--prompts", pf.to_str().unwrap(), "-n", "12", "--ignore-eos"];
    let extra = ["--compare", "oracle@0.5,oracle@0.8", "--correct", "--period", "1,4", "--accept", "argmax", "--json", json.to_str().unwrap()];
    let out = common::dejavu(&[&args[..], &extra[..]].concat(), &[]);
    common::assert_ok(&out);
    assert!(out.stdout.contains("| oracle@0.8 | K=4, argmax |"), "{}", out.stdout);
    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let settings = v["settings"].as_array().unwrap();
    assert_eq!(settings.len(), 1 + 2 * 3, "dense, then per mode: uncorrected, K=1, K=4");
    let ids = |o: &serde_json::Value| o["new_ids"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect::<Vec<_>>();
    let dense: Vec<Vec<u32>> = settings[0]["outcomes"].as_array().unwrap().iter().map(ids).collect();
    assert_eq!(dense.len(), 3, "the blank line is skipped");
    // The dense row against plain single-prompt generation.
    for (i, p) in ["Once upon a time", "The little dog saw a big ball"].iter().enumerate() {
        let one = tmp.path().join("one.json");
        let out = common::dejavu(&["generate", "--model", m, "--prompt", p, "-n", "12", "--ignore-eos", "--json", one.to_str().unwrap()], &[]);
        common::assert_ok(&out);
        let g: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&one).unwrap()).unwrap();
        assert_eq!(ids(&g), dense[i], "prompt {p}");
    }
    let mut uncorrected_diverged = 0;
    for s in &settings[1..] {
        let outcomes = s["outcomes"].as_array().unwrap();
        let mut exact = 0;
        for (o, d) in outcomes.iter().zip(&dense) {
            let got = ids(o);
            let first = got.iter().zip(d).position(|(a, b)| a != b);
            assert_eq!(o["first_divergence"].as_u64().map(|x| x as usize), first);
            assert_eq!(o["exact"].as_bool().unwrap(), first.is_none() && got.len() == d.len());
            exact += (got == *d) as usize;
        }
        assert!((s["exact_rate"].as_f64().unwrap() - exact as f64 / 3.0).abs() < 1e-12);
        if s["period"].is_null() {
            assert_eq!(s["sparse_fraction"].as_f64().unwrap(), 1.0);
            uncorrected_diverged += 3 - exact;
        } else {
            assert_eq!(exact, 3, "argmax correction reproduces dense greedy: {s}");
            assert!(s["summary"]["dense_passes"].as_u64().unwrap() > 0);
        }
    }
    assert!(uncorrected_diverged > 0, "the sparse plans change some continuation (else the test shows nothing)");
}

#[test]
fn prompt_set_usage_errors_exit_2() {
    let m = common::fixture_dir("tiny-llama");
    let m = m.to_str().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let empty = tmp.path().join("empty.txt");
    std::fs::write(&empty, "\n  \n").unwrap();
    let out = common::dejavu(&["generate", "--model", m, "--mode", "oracle@0.5", "--correct", "--period", "4,8"], &[]);
    common::assert_one_line_exit(&out, 2, &["--period", "--prompts"]);
    let out = common::dejavu(&["generate", "--model", m, "--prompts", empty.to_str().unwrap(), "--mode", "oracle@0.5"], &[]);
    common::assert_one_line_exit(&out, 2, &["empty.txt", "no prompt"]);
    let out = common::dejavu(&["generate", "--model", m, "--prompts", empty.to_str().unwrap(), "--temperature", "0.5"], &[]);
    common::assert_one_line_exit(&out, 2, &["--prompts", "--temperature"]);
    let out = common::dejavu(&["generate", "--model", m, "--limit", "3"], &[]);
    assert_eq!(out.code, 2, "{}", out.stderr);
}
