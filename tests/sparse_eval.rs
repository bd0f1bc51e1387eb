//! Sparse reference forward, CATS calibration and eval scoring: invariants and independent recomputations.

mod common;

use burn::tensor::{backend::Backend, Tensor};
use dejavu::backend::CpuBackend as B;
use dejavu::calibrate::{threshold_plan, Calibrator};
use dejavu::decode::RefDecoder;
use dejavu::eval::{tasks, Evaluator};
use dejavu::model::{to_host_3d, Forward, Scorer, Sparse};
use dejavu::sparse::{HeadRule, LayerPlan, MlpRule, Plan, SparsityStats};
use dejavu::Model;

use common::{load_fixture_model as load, token_ids as ids};

fn logits(model: &Model<B>, rows: &[Vec<u32>], plan: Option<&Plan>, stats: Option<&mut SparsityStats>) -> Vec<f32> {
    scored_logits(model, rows, plan, None, stats)
}

fn scored_logits(model: &Model<B>, rows: &[Vec<u32>], plan: Option<&Plan>, scorer: Option<&dyn Scorer<B>>, stats: Option<&mut SparsityStats>) -> Vec<f32> {
    let mut cache = model.new_cache();
    let sparse = plan.map(|p| Sparse::new(p, scorer).unwrap());
    let h = model.forward_with(model.tokens(rows), &mut cache, Forward { sparse, stats, ..Default::default() });
    to_host_3d(model.logits(h)).0
}

/// Scores derived from the input in an arbitrary way: any ranking will do for keep-all invariants.
struct ArbitraryScorer {
    ffn: usize,
    heads: usize,
}
impl<Bk: Backend> Scorer<Bk> for ArbitraryScorer {
    fn neuron_scores(&self, _l: usize, x: Tensor<Bk, 3>) -> Tensor<Bk, 3> {
        let [b, s, _] = x.dims();
        x.sum_dim(2).expand([b, s, self.ffn])
    }
    fn head_scores(&self, _l: usize, x: Tensor<Bk, 3>) -> Tensor<Bk, 3> {
        let [b, s, _] = x.dims();
        x.sum_dim(2).expand([b, s, self.heads])
    }
}

const FIXTURES: [&str; 4] = ["tiny-opt", "tiny-opt-proj", "tiny-llama", "tiny-llama-tied"];

#[test]
fn keep_all_plans_equal_dense_exactly() {
    for name in FIXTURES {
        let (files, model) = load(name);
        let c = &files.config;
        let rows = vec![ids(12, 1), ids(12, 2)];
        let dense = logits(&model, &rows, None, None);
        let plans = [
            LayerPlan { mlp: MlpRule::Threshold { t: 0.0 }, heads: HeadRule::Dense },
            LayerPlan { mlp: MlpRule::OracleTopK { k: c.ffn }, heads: HeadRule::OracleTopK { k: c.heads } },
        ];
        for p in plans {
            let plan = Plan::uniform(c.layers, p);
            assert_eq!(logits(&model, &rows, Some(&plan), None), dense, "{name}: {p:?}");
        }
        // Predicted rules with k = all (the scorer's ranking is irrelevant when everything is kept).
        let scorer = ArbitraryScorer { ffn: c.ffn, heads: c.heads };
        let plan = Plan::uniform(c.layers, LayerPlan { mlp: MlpRule::PredictedTopK { k: c.ffn }, heads: HeadRule::PredictedTopK { k: c.heads, kv: Default::default() } });
        assert_eq!(scored_logits(&model, &rows, Some(&plan), Some(&scorer), None), dense, "{name}: predicted keep-all");
    }
}

#[test]
fn oracle_keeps_exactly_k_per_token_and_changes_the_output() {
    for name in ["tiny-llama", "tiny-opt"] {
        let (files, model) = load(name);
        let c = &files.config;
        let k = c.ffn / 4;
        let plan = Plan::uniform(c.layers, LayerPlan { mlp: MlpRule::OracleTopK { k }, heads: HeadRule::OracleTopK { k: c.heads / 2 } });
        let mut stats = SparsityStats::new(c.layers);
        let rows = vec![ids(16, 3)];
        let sparse = logits(&model, &rows, Some(&plan), Some(&mut stats));
        assert_ne!(sparse, logits(&model, &rows, None, None));
        for l in &stats.layers {
            assert_eq!(l.tokens, 16);
            assert!((l.head_sparsity() - 0.5).abs() < 1e-12, "{name}: heads {}", l.head_sparsity());
            let want = 1.0 - k as f64 / c.ffn as f64;
            if c.family == dejavu::Family::Llama {
                // SiLU(gate)·up is never exactly zero, so exactly ffn-k entries per token are masked.
                assert!((l.mlp_token_min - want).abs() < 1e-12 && (l.mlp_token_max - want).abs() < 1e-12, "{name}: {l:?}");
            } else {
                // ReLU may zero more than asked; never fewer.
                assert!(l.mlp_token_min >= want - 1e-12, "{name}: {l:?}");
            }
        }
    }
}

#[test]
fn cats_realises_the_calibrated_sparsity_on_the_calibration_text() {
    for name in ["tiny-llama", "tiny-opt"] {
        let (files, model) = load(name);
        let c = &files.config;
        let windows: Vec<Vec<u32>> = (0..8).map(|i| ids(64, 10 + i)).collect();
        let mut cal = Calibrator::new(c.layers);
        for w in &windows {
            cal.add_sequence(&model, w).unwrap();
        }
        for s in [0.5, 0.7] {
            // Thresholds from dense activations, then one refinement pass under the sparse forward (as
            // `calibrate --refine 1` does), so later layers are calibrated on the inputs they will really see.
            let dense_th: Vec<f32> = cal.layers.iter().map(|h| h.quantile(s)).collect();
            let mut refined = Calibrator::new(c.layers);
            for w in &windows {
                refined.add_sequence_under(&model, w, Some(&threshold_plan(&dense_th))).unwrap();
            }
            let th: Vec<f32> = refined.layers.iter().map(|h| h.quantile(s)).collect();
            let mut stats = SparsityStats::new(c.layers);
            for w in &windows {
                logits(&model, std::slice::from_ref(w), Some(&threshold_plan(&th)), Some(&mut stats));
            }
            let per_layer: Vec<f64> = stats.layers.iter().map(|l| l.mlp_sparsity()).collect();
            eprintln!("{name} @ {s}: realised per layer {per_layer:?}");
            if c.family == dejavu::Family::Opt && per_layer.iter().any(|&x| x > s + 0.01) {
                // ReLU already zeroes more than s of the neurons here: the threshold is 0 and masks nothing extra.
                assert!(th.iter().zip(&per_layer).all(|(&t, &x)| x <= s + 0.01 || t == 0.0));
                continue;
            }
            for (l, x) in per_layer.iter().enumerate() {
                assert!((x - s).abs() < 0.01, "{name} layer {l} at {s}: {x}");
            }
        }
    }
}

#[test]
fn shared_context_batched_scoring_equals_one_sequence_at_a_time() {
    // Independent recomputation: each request as one full sequence through a fresh forward, log-softmax in f64.
    for name in ["tiny-opt", "tiny-llama"] {
        let (files, model) = load(name);
        let plan = Plan::uniform(files.config.layers, LayerPlan { mlp: MlpRule::OracleTopK { k: files.config.ffn / 2 }, heads: HeadRule::Dense });
        for p in [None, Some(&plan)] {
            let ev = Evaluator { tokenizer: &files.tokenizer, max_len: 256, empty_context_token: 2 };
            let mut dec = match p {
                Some(p) => RefDecoder::new(&model, p, None).unwrap(),
                None => RefDecoder::dense(&model),
            }
            .counting(true);
            let ctx = "the cat sat on the";
            let conts = [" mat.", " dog ran to the park", " a"];
            let ex = tasks::Example {
                requests: conts.iter().map(|c| (ctx.to_string(), c.to_string())).collect(),
                gold: 0,
                choice_bytes: vec![1; 3],
            };
            let got = ev.score_example(&mut dec, &ex).unwrap();
            let stats = dejavu::decode::Decoder::take_stats(&mut dec);
            for (j, cont) in conts.iter().enumerate() {
                let (c_ids, x_ids) = ev.encode_pair(ctx, cont).unwrap();
                let whole: Vec<u32> = c_ids.iter().chain(&x_ids).cloned().collect();
                let l = logits(&model, std::slice::from_ref(&whole), p, None);
                let v = files.config.vocab_size;
                let (mut ll, mut greedy) = (0.0f64, true);
                for t in c_ids.len()..whole.len() {
                    let row = &l[(t - 1) * v..t * v];
                    let m = row.iter().cloned().fold(f32::MIN, f32::max) as f64;
                    let lse = m + row.iter().map(|&x| (x as f64 - m).exp()).sum::<f64>().ln();
                    ll += row[whole[t] as usize] as f64 - lse;
                    greedy &= dejavu::decode::argmax(row) as u32 == whole[t];
                }
                assert!((got[j].loglik - ll).abs() < 1e-3, "{name} sparse={} {cont:?}: {} vs {ll}", p.is_some(), got[j].loglik);
                assert_eq!(got[j].greedy, greedy);
            }
            // Padding rows must not be counted: tokens = context + sum of (continuation - 1).
            let n_tok: u64 = stats.layers[0].tokens;
            let (c_ids, _) = ev.encode_pair(ctx, conts[0]).unwrap();
            let expect = c_ids.len() + conts.iter().map(|c| ev.encode_pair(ctx, c).unwrap().1.len() - 1).sum::<usize>();
            assert_eq!(n_tok as usize, expect);
        }
    }
}

#[test]
fn eval_cli_bad_inputs() {
    let tmp = tempfile::tempdir().unwrap();
    let model = common::fixture_dir("tiny-llama");
    let m = model.to_str().unwrap();
    let out_dir = tmp.path().join("out");
    let run = |args: &[&str]| {
        common::dejavu(&[&["eval", "--model", m, "--tasks-dir", tmp.path().to_str().unwrap(), "--out", out_dir.to_str().unwrap()], args].concat(), &[])
    };
    // Bad files exit 1; bad flag values (an unknown task, a sparsity the thresholds file lacks) exit 2.
    let check_code = |code: i32, out: common::Output, needles: &[&str]| {
        assert_eq!(out.code, code, "{}", out.stderr);
        assert!(!out.stderr.contains("panicked"));
        let line = out.stderr.lines().find(|l| l.starts_with("error:")).unwrap_or_default().to_string();
        for n in needles {
            assert!(line.contains(n), "`{n}` missing from {line}");
        }
    };
    let check = |out: common::Output, needles: &[&str]| check_code(1, out, needles);
    std::fs::write(tmp.path().join("copa.jsonl"), "{\"query\": \"a\", \"choices\": [\"b\", \"c\"], \"gold\": 0}\n{not json\n").unwrap();
    check(run(&["--tasks", "copa"]), &["copa.jsonl:2", "invalid JSON"]);
    std::fs::write(tmp.path().join("piqa.jsonl"), "{\"query\": \"a\", \"choices\": [\"b\", \"c\"], \"gold\": 2}\n").unwrap();
    check(run(&["--tasks", "piqa"]), &["piqa.jsonl:1", "gold", "out of range"]);
    check_code(2, run(&["--tasks", "nosuchtask"]), &["--tasks", "unknown task `nosuchtask`", "piqa"]);
    // Thresholds calibrated on another model are refused.
    std::fs::write(tmp.path().join("copa.jsonl"), "{\"query\": \"a\", \"choices\": [\"b\", \"c\"], \"gold\": 0}\n").unwrap();
    let thr = tmp.path().join("thr.json");
    let text = tmp.path().join("t.txt");
    std::fs::write(&text, "the cat sat on the mat. ".repeat(50)).unwrap();
    let other = common::fixture_dir("tiny-llama-tied");
    let out = common::dejavu(
        &["calibrate", "--model", other.to_str().unwrap(), "--text", text.to_str().unwrap(), "--sparsity", "0.5", "--tokens", "256", "--out", thr.to_str().unwrap()],
        &[],
    );
    assert_eq!(out.code, 0, "{}", out.stderr);
    check(run(&["--tasks", "copa", "--mode", "cats@0.5", "--thresholds", thr.to_str().unwrap()]), &["thr.json", "tiny-llama-tied", "fingerprint"]);
    check(run(&["--tasks", "copa", "--mode", "cats@0.3", "--thresholds", thr.to_str().unwrap()]), &["thr.json"]);
}

#[test]
fn eval_cli_runs_and_writes_results() {
    let tmp = tempfile::tempdir().unwrap();
    let model = common::fixture_dir("tiny-opt");
    let out_dir = tmp.path().join("out");
    let shared = common::shared_dir();
    let tasks_dir = shared.join("data/tasks");
    let out = common::dejavu(
        &["eval", "--model", model.to_str().unwrap(), "--tasks-dir", tasks_dir.to_str().unwrap(), "--tasks", "copa,winogrande,lambada,hellaswag",
          "--limit", "5", "--compare", "dense,oracle@0.5", "--out", out_dir.to_str().unwrap()],
        &[],
    );
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert!(out.stdout.contains("| dense | copa | 5 |"), "{}", out.stdout);
    assert!(out.stdout.contains("Δ acc vs dense"), "{}", out.stdout);
    let rows = std::fs::read_to_string(out_dir.join("results.csv")).unwrap();
    assert_eq!(rows.lines().count(), 1 + 2 * 4);
    let res: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out_dir.join("results.json")).unwrap()).unwrap();
    let sp = res["modes"][1]["tasks"][0]["mlp_sparsity"].as_f64().unwrap();
    // The artifact header: format, tool version, the model's fingerprint, the resolved options.
    assert_eq!(res["header"]["format"], "dejavu.eval");
    assert!(res["header"]["model"]["fingerprint"].as_str().is_some_and(|f| f.len() == 16), "{}", res["header"]);
    assert_eq!(res["header"]["options"]["compare"][1], "oracle@0.5");
    assert!(rows.lines().next().unwrap().contains(",ppl,"), "{rows}");
    assert!(sp >= 0.5 - 1e-9, "oracle@0.5 realised {sp}");
}

#[test]
fn eval_run_dir_supplies_thresholds_and_receives_results() {
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("run");
    let model = common::fixture_dir("tiny-llama");
    let m = model.to_str().unwrap();
    let text = tmp.path().join("t.txt");
    std::fs::write(&text, "the cat sat on the mat. ".repeat(50)).unwrap();
    let thr = run.join("thresholds.json");
    let out = common::dejavu(&["calibrate", "--model", m, "--text", text.to_str().unwrap(), "--sparsity", "0.5", "--tokens", "256", "--seq-len", "32", "--out", thr.to_str().unwrap()], &[]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    let tasks = tmp.path().join("tasks");
    std::fs::create_dir_all(&tasks).unwrap();
    std::fs::write(tasks.join("copa.jsonl"), "{\"query\": \"the cat sat on\", \"choices\": [\"the mat.\", \"the dog.\"], \"gold\": 0}\n").unwrap();
    let out = common::dejavu(&["eval", "--model", m, "--tasks-dir", tasks.to_str().unwrap(), "--tasks", "copa", "--mode", "cats@0.5", "--run", run.to_str().unwrap()], &[]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    let res: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(run.join("eval/results.json")).unwrap()).unwrap();
    assert_eq!(res["modes"][0]["mode"], "cats@0.5");
    assert_eq!(res["header"]["options"]["thresholds"], thr.to_str().unwrap());
    // Without --tasks-dir, tasks come from $DEJAVU_SHARED/data/tasks.
    let shared = tmp.path().join("shared");
    std::fs::create_dir_all(shared.join("data")).unwrap();
    std::fs::rename(&tasks, shared.join("data/tasks")).unwrap();
    let out = common::dejavu(
        &["eval", "--model", m, "--tasks", "copa", "--out", tmp.path().join("o").to_str().unwrap()],
        &[("DEJAVU_SHARED", shared.to_str().unwrap())],
    );
    assert_eq!(out.code, 0, "{}", out.stderr);
    let tasks = shared.join("data/tasks");
    // Neither --out nor --run: a usage error naming both, before any model work.
    let out = common::dejavu(&["eval", "--model", m, "--tasks-dir", tasks.to_str().unwrap(), "--tasks", "copa"], &[]);
    assert_eq!(out.code, 2, "{}", out.stderr);
    assert!(out.stderr.contains("--out") && out.stderr.contains("--run"), "{}", out.stderr);
}
