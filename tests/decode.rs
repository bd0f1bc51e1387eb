//! The decoder interface on the reference forward: rollback, input checks, the selection reference as the
//! forward uses it, plan validation, and the sparse modes of `generate` / `ppl` / `eval` from the CLI.

mod common;

use burn::tensor::{Tensor, TensorData};
use dejavu::backend::CpuBackend as B;
use dejavu::decode::{DecodeError, Decoder, RefDecoder};
use dejavu::model::{to_host, topk_mask, Scorer, Sparse};
use dejavu::sparse::{self, select, Artifacts, HeadKv, HeadRule, LayerPlan, MlpRule, Mode, Plan, PlanOptions, PredictorBudget};
use dejavu::{Model, ModelFiles};

const FIXTURES: [&str; 4] = ["tiny-opt", "tiny-opt-proj", "tiny-llama", "tiny-llama-tied"];

fn load(dir: &std::path::Path) -> (ModelFiles, Model<B>) {
    let files = ModelFiles::resolve(dir.to_str().unwrap()).unwrap();
    let model = Model::load(&files.config, files.checkpoint.as_ref(), &Default::default(), |_| {}).unwrap();
    (files, model)
}

/// The four fixtures and stories260k (real weights, from ../shared).
fn models() -> Vec<std::path::PathBuf> {
    let mut dirs: Vec<std::path::PathBuf> = FIXTURES.iter().map(|n| common::fixture_dir(n)).collect();
    dirs.push(common::shared_dir().join("models/stories260k"));
    dirs
}

fn ids(n: usize, seed: u32, vocab: usize) -> Vec<u32> {
    (0..n as u32).map(|i| (i * 131 + seed * 17 + 7) % vocab as u32).collect()
}

fn bits_equal(a: &[f32], b: &[f32]) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits())
}

fn max_delta(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0f32, f32::max)
}

/// Logits of `step(next)` after `prefill(ids[..n])`, with `extra` (steps, then a chunk) appended and rolled back
/// by `truncate(n)` when `roll` is set.
fn step_after(dec: &mut dyn Decoder, ids: &[u32], n: usize, roll: bool, next: u32) -> Vec<f32> {
    dec.reset();
    dec.prefill(&[ids[..n].to_vec()], None).unwrap();
    if roll {
        dec.step(&[ids[n]]).unwrap();
        dec.step(&[ids[n + 1]]).unwrap();
        dec.prefill(&[ids[n + 2..n + 6].to_vec()], None).unwrap();
        assert_eq!(dec.len(), n + 6);
        dec.truncate(n).unwrap();
        assert_eq!(dec.len(), n);
    }
    dec.step(&[next]).unwrap();
    dec.logits().unwrap().remove(0)
}

#[test]
fn truncate_then_step_equals_a_fresh_prefill_bitwise() {
    for dir in models() {
        let (files, model) = load(&dir);
        let v = files.config.vocab_size;
        let ids = ids(32, 5, v);
        let next = ids[31];
        let oracle = Plan::uniform(files.config.layers, LayerPlan { mlp: MlpRule::OracleTopK { k: files.config.ffn / 2 }, heads: HeadRule::Dense });
        for plan in [Plan::dense(files.config.layers), oracle] {
            let mut dec = RefDecoder::new(&model, &plan, None).unwrap();
            for n in [1, 7, 20] {
                // Rolled-back tokens leave no trace: bitwise the same as never having decoded them.
                let rolled = step_after(&mut dec, &ids, n, true, next);
                let fresh = step_after(&mut dec, &ids, n, false, next);
                assert_eq!(rolled.len(), v);
                assert!(bits_equal(&rolled, &fresh), "{}: n={n} dense={}: max |delta| {}", dir.display(), plan.is_dense(), max_delta(&rolled, &fresh));
                // Truncating a longer prefill to n: the first n positions were computed in a call with more keys,
                // and burn's CPU kernels pick their reduction order by shape, so this agrees to rounding only.
                dec.reset();
                dec.prefill(&[ids[..24].to_vec()], None).unwrap();
                dec.truncate(n).unwrap();
                dec.step(&[next]).unwrap();
                let cut = dec.logits().unwrap().remove(0);
                let scale = fresh.iter().fold(0.0f32, |m, x| m.max(x.abs()));
                assert!(max_delta(&cut, &fresh) <= 1e-5 * scale.max(1.0), "{}: n={n}: {}", dir.display(), max_delta(&cut, &fresh));
            }
            assert!(matches!(dec.truncate(dec.len() + 1), Err(DecodeError::Usage(_))));
        }
    }
}

#[test]
fn out_of_vocab_and_too_long_are_errors() {
    let (files, model) = load(&common::fixture_dir("tiny-opt"));
    let c = &files.config;
    let mut dec = RefDecoder::dense(&model);
    let bad = c.vocab_size as u32;
    assert_eq!(dec.prefill(&[vec![1, bad]], None), Err(DecodeError::TokenOutOfVocab { id: bad, vocab: c.vocab_size }));
    assert_eq!(dec.prefill(&[vec![]], None), Err(DecodeError::Empty));
    assert!(matches!(dec.prefill(&[vec![1, 2], vec![3]], None), Err(DecodeError::RaggedRows(_))));
    // OPT's learned position table is a hard limit; the cache counts towards it.
    let max = c.position_limit().unwrap();
    dec.prefill(&[ids(max - 1, 1, c.vocab_size)], None).unwrap();
    assert_eq!(dec.step(&[1, 2]).map_err(|_| ()), Err(()), "a two-row step on a one-row cache");
    dec.step(&[1]).unwrap();
    assert_eq!(dec.step(&[1]), Err(DecodeError::TooLong { len: max + 1, max }));
    // Score targets are checked too.
    dec.reset();
    dec.prefill(&[vec![1, 2]], None).unwrap();
    assert!(matches!(dec.score(&[vec![bad, 0]]), Err(DecodeError::TokenOutOfVocab { .. })));
}

#[test]
fn the_forward_selects_exactly_what_the_host_reference_selects() {
    // Ties everywhere: a GPU top-k that breaks ties by the lower index reproduces this; "keep every tie" would not.
    let dev = Default::default();
    let scores: Vec<f32> = (0..3 * 16).map(|i| ((i * 7) % 5) as f32).collect();
    let t = Tensor::<B, 3>::from_data(TensorData::new(scores.clone(), [1, 3, 16]), &dev);
    for k in [0, 1, 3, 4, 8, 15, 16, 20] {
        let got = to_host(topk_mask(t.clone(), k));
        let want = select::top_k_rows(&scores, 16, k);
        assert_eq!(got, want, "k={k}");
        for row in got.chunks(16) {
            assert_eq!(row.iter().filter(|&&x| x == 1.0).count(), k.min(16));
        }
    }
    // The threshold rule runs on the device as `>=`: it must agree with the host reference at exact values.
    let vals = [0.5f32, 0.49999997, 0.50000006, 0.0, -0.5, 1.0];
    let dt = Tensor::<B, 1>::from_data(TensorData::new(vals.to_vec(), [6]), &dev);
    for th in [0.5f32, 0.0, 1.0, -0.5] {
        let got = to_host(dt.clone().greater_equal_elem(th).float());
        let mut want = [false; 6];
        select::threshold_mask(&vals, th, &mut want);
        assert_eq!(got, want.iter().map(|&b| b as u8 as f32).collect::<Vec<_>>(), "t={th}");
    }
}

struct Zero;
impl Scorer<B> for Zero {
    fn neuron_scores(&self, _: usize, x: Tensor<B, 3>) -> Tensor<B, 3> {
        x
    }
    fn head_scores(&self, _: usize, x: Tensor<B, 3>) -> Tensor<B, 3> {
        x
    }
}

#[test]
fn plans_are_validated_and_missing_artifacts_are_errors() {
    let (files, model) = load(&common::fixture_dir("tiny-llama"));
    let c = &files.config;
    let none = Artifacts::default();
    let opts = PlanOptions::default();
    let err = |m: &str, o: &PlanOptions, a: &Artifacts| sparse::resolve(m.parse::<Mode>().unwrap(), o, c, a).unwrap_err();
    let e = err("cats@0.5", &opts, &none);
    assert_eq!(e.field, "thresholds");
    assert!(e.msg.contains("calibrate"), "{e}");
    let e = err("dejavu", &opts, &none);
    assert_eq!(e.field, "predictors");
    let heads = PlanOptions { head_sparsity: Some(0.5), ..Default::default() };
    assert_eq!(err("dense", &heads, &none).field, "head_sparsity");
    assert_eq!(err("oracle@0.5", &PlanOptions { head_sparsity: Some(1.0), ..Default::default() }, &none).field, "head_sparsity");
    // Predictors for another layer count.
    let dir = std::path::Path::new("run/predictors");
    let short = Artifacts { predictors: Some(PredictorBudget { dir, k_neurons: vec![1], k_heads: vec![1] }), ..Default::default() };
    assert!(err("dejavu", &opts, &short).msg.contains("run/predictors"));
    // Resolved plans: the oracle keeps round((1-S)·ffn); dejavu@S overrides the predictors' k, heads follow them.
    let p = sparse::resolve(Mode::Oracle(0.5), &heads, c, &none).unwrap();
    assert_eq!(p.layer(0), LayerPlan { mlp: MlpRule::OracleTopK { k: c.ffn / 2 }, heads: HeadRule::OracleTopK { k: sparse::keep_count(0.5, c.heads) } });
    let budget = PredictorBudget { dir, k_neurons: vec![3; c.layers], k_heads: vec![2; c.layers] };
    let art = Artifacts { predictors: Some(budget), ..Default::default() };
    let p = sparse::resolve(Mode::Dejavu(None), &opts, c, &art).unwrap();
    assert_eq!(p.layer(1), LayerPlan { mlp: MlpRule::PredictedTopK { k: 3 }, heads: HeadRule::PredictedTopK { k: 2, kv: HeadKv::All } });
    // Skipping the key/value heads of dropped heads needs predicted heads; the plan carries the choice.
    let kept = PlanOptions { head_kv: HeadKv::Kept, ..Default::default() };
    assert_eq!(sparse::resolve(Mode::Dejavu(None), &kept, c, &art).unwrap().layer(0).heads, HeadRule::PredictedTopK { k: 2, kv: HeadKv::Kept });
    let oracle_kept = PlanOptions { head_sparsity: Some(0.5), head_kv: HeadKv::Kept };
    assert_eq!(err("oracle@0.5", &oracle_kept, &none).field, "head_kv");
    assert_eq!(err("exactdown@0.5", &kept, &none).field, "head_kv");
    let p = sparse::resolve(Mode::Dejavu(Some(0.75)), &opts, c, &art).unwrap();
    assert_eq!(p.layer(1).mlp, MlpRule::PredictedTopK { k: sparse::keep_count(0.75, c.ffn) });
    // Hand-made plans: wrong layer count, k beyond the width, NaN thresholds.
    assert_eq!(Plan::dense(c.layers + 1).validate(c).unwrap_err().field, "plan");
    assert!(Plan::uniform(c.layers, LayerPlan { mlp: MlpRule::OracleTopK { k: c.ffn + 1 }, heads: HeadRule::Dense }).validate(c).is_err());
    assert!(Plan::uniform(c.layers, LayerPlan { mlp: MlpRule::Dense, heads: HeadRule::OracleTopK { k: c.heads + 1 } }).validate(c).is_err());
    assert!(Plan::uniform(c.layers, LayerPlan { mlp: MlpRule::Threshold { t: f32::NAN }, heads: HeadRule::Dense }).validate(c).is_err());
    // A predicted rule without a scorer cannot run (it used to run dense silently).
    let predicted = Plan::uniform(c.layers, LayerPlan { mlp: MlpRule::PredictedTopK { k: 4 }, heads: HeadRule::Dense });
    assert_eq!(RefDecoder::new(&model, &predicted, None).err().map(|e| e.field), Some("predictors"));
    assert!(Sparse::<B>::unscored(&predicted).is_err());
    assert!(RefDecoder::new(&model, &predicted, Some(&Zero)).is_ok());
}

fn ppl_of(stdout: &str) -> f64 {
    // The `ppl` table's row, or eval's `ppl (N tokens)` row: the value after the scored-token count.
    let row = stdout.lines().find(|l| l.starts_with("| ") && !l.starts_with("| model") && !l.starts_with("| mode") && l.contains("ppl") || l.contains(".txt |")).unwrap();
    let cells: Vec<&str> = row.split('|').map(str::trim).collect();
    if row.contains("ppl (") { cells[4].parse().unwrap() } else { cells[8].parse().unwrap() }
}

#[test]
fn ppl_in_a_mode_equals_eval_ppl_in_that_mode() {
    let tmp = tempfile::tempdir().unwrap();
    let text = common::shared_dir().join("data/text/tinystories-sample.txt");
    let text = text.to_str().unwrap();
    for (fixture, mode) in [("tiny-llama", "oracle@0.5"), ("tiny-opt", "oracle@0.7"), ("tiny-llama", "dense")] {
        let m = common::fixture_dir(fixture);
        let m = m.to_str().unwrap();
        let ppl = common::dejavu(&["ppl", "--model", m, "--text", text, "--ctx", "64", "--max-tokens", "300", "--mode", mode], &[]);
        assert_eq!(ppl.code, 0, "{}", ppl.stderr);
        let tasks = tmp.path().join("tasks");
        std::fs::create_dir_all(&tasks).unwrap();
        std::fs::write(tasks.join("copa.jsonl"), "{\"query\": \"the cat sat on\", \"choices\": [\"the mat.\", \"the dog.\"], \"gold\": 0}\n").unwrap();
        let out = tmp.path().join(format!("eval-{fixture}-{mode}"));
        let ev = common::dejavu(
            &["eval", "--model", m, "--tasks-dir", tasks.to_str().unwrap(), "--tasks", "copa", "--mode", mode, "--ppl", text,
              "--ppl-tokens", "300", "--ctx", "64", "--out", out.to_str().unwrap()],
            &[],
        );
        assert_eq!(ev.code, 0, "{}", ev.stderr);
        let (a, b) = (ppl_of(&ppl.stdout), ppl_of(&ev.stdout));
        eprintln!("{fixture} {mode}: ppl {a} eval --ppl {b}");
        assert!((a - b).abs() <= 1e-4 * a, "{fixture} {mode}: ppl {a} vs eval --ppl {b}");
    }
}

#[test]
fn sparse_modes_on_the_cli_and_usage_errors_exit_2() {
    let m = common::fixture_dir("tiny-llama");
    let m = m.to_str().unwrap();
    let g = common::dejavu(&["generate", "--model", m, "--prompt", "the cat", "-n", "6", "--mode", "oracle@0.5"], &[]);
    assert_eq!(g.code, 0, "{}", g.stderr);
    assert!(g.stderr.contains("realised MLP sparsity 0.500"), "{}", g.stderr);
    for (args, needle) in [
        (vec!["generate", "--model", m, "--mode", "sparse"], "--mode"),
        (vec!["generate", "--model", m, "--mode", "oracle@1.5"], "not in [0, 1)"),
        (vec!["generate", "--model", m, "--mode", "dejavu"], "--predictors"),
        (vec!["ppl", "--model", m, "--text", "x.txt", "--mode", "cats@0.5"], "--thresholds"),
        (vec!["generate", "--model", m, "--mode", "dense", "--head-sparsity", "0.5"], "--head-sparsity"),
        (vec!["generate", "--model", m, "--temperature=-1"], "--temperature"),
        (vec!["eval", "--model", m, "--tasks", "all", "--out", "/tmp/x"], "unknown task `all`"),
        (vec!["eval", "--model", m, "--mode", "dense", "--compare", "dense,oracle@0.5", "--out", "/tmp/x"], "--compare"),
        (vec!["ppl", "--model", m, "--text", "x.txt", "--ctx", "16", "--stride", "32"], "--stride"),
    ] {
        let out = common::dejavu(&args, &[]);
        assert_eq!(out.code, 2, "{args:?}: {}", out.stderr);
        assert!(!out.stderr.contains("panicked"), "{}", out.stderr);
        assert!(out.stderr.contains(needle), "{args:?}: `{needle}` not in {}", out.stderr);
    }
}

#[test]
fn generate_into_a_closed_pipe_stops_quietly() {
    use std::process::{Command, Stdio};
    let m = common::fixture_dir("tiny-llama");
    let mut child = Command::new(env!("CARGO_BIN_EXE_dejavu"))
        .args(["generate", "--model", m.to_str().unwrap(), "--prompt", "the cat", "-n", "200", "--ignore-eos"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take()); // the reader goes away, as `| head -c 0` would
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!err.contains("panicked"), "{err}");
    assert_eq!(out.status.code(), Some(0), "{err}");
}

/// `score` against the same forward's logits read back (`position_logits`) and judged on the host in f64: each
/// position's log-prob of its target, whether the target is the argmax, and the argmax token itself (first on
/// ties), which Sirius' check reads (`decode::correct`).
#[test]
fn score_agrees_with_the_host_on_the_position_logits() {
    for dir in models() {
        let (files, model) = load(&dir);
        let v = files.config.vocab_size;
        let mut dec = RefDecoder::dense(&model);
        let seq = ids(9, 3, v);
        dec.prefill(std::slice::from_ref(&seq), None).unwrap();
        let rows = dec.position_logits().unwrap();
        // Targets: the next token where there is one; at two positions the position's own argmax, so both answers
        // of the argmax flag occur.
        let mut targets: Vec<u32> = seq[1..].to_vec();
        targets.push(0);
        for p in [2, 5] {
            targets[p] = dejavu::decode::argmax(&rows[p]) as u32;
        }
        let scores = dec.score(std::slice::from_ref(&targets)).unwrap().remove(0);
        assert_eq!(scores.len(), seq.len());
        let mut flags = [0usize; 2];
        for (p, (s, row)) in scores.iter().zip(&rows).enumerate() {
            let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
            let lse = row.iter().map(|&x| (x as f64 - max).exp()).sum::<f64>().ln() + max;
            let want = row[targets[p] as usize] as f64 - lse;
            let top = row.iter().enumerate().fold(0, |b, (i, &x)| if x > row[b] { i } else { b });
            assert!((s.logprob as f64 - want).abs() < 1e-4, "{} position {p}: log-prob {} against {want}", dir.display(), s.logprob);
            assert_eq!(s.top as usize, top, "{} position {p}", dir.display());
            assert_eq!(s.argmax, top == targets[p] as usize, "{} position {p}", dir.display());
            flags[usize::from(s.argmax)] += 1;
        }
        assert!(flags[0] > 0 && flags[1] >= 2, "{}: argmax flags {flags:?}", dir.display());
    }
}
