//! `collect` → `train-predictors` on the tiny fixtures: end to end, model-identity checks, kill-and-resume, and
//! bad input (empty or binary text, text shorter than N, a full disk, an unknown run directory).

mod common;

use std::path::Path;
use std::time::Duration;

use burn::tensor::{Tensor, TensorData};
use dejavu::collect::{Activations, Tap};
use dejavu::predictor::Predictors;
use dejavu::ModelFiles;

type B = burn::backend::NdArray<f32>;

/// Deterministic calibration text (written for these tests): varied lines so the tokenizer sees many merges.
fn write_text(path: &Path, lines: usize) {
    let words = ["the", "cat", "sat", "on", "mat", "dog", "ran", "to", "park", "model", "sparse", "neurons", "fast", "card"];
    let mut s = String::new();
    let mut x: u64 = 7;
    for i in 0..lines {
        s += &format!("line {i}:");
        for _ in 0..9 {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            s.push(' ');
            s += words[(x >> 33) as usize % words.len()];
        }
        s += ".\n";
    }
    std::fs::write(path, s).unwrap();
}

fn fixture(name: &str) -> String {
    common::fixture_dir(name).to_str().unwrap().to_string()
}

fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

fn collect(model: &str, text: &Path, n: usize, out: &Path, extra: &[&str], env: &[(&str, &str)]) -> common::Output {
    let n = n.to_string();
    let mut args = vec!["collect", "--model", model, "--text", p(text), "--tokens", &n, "--seq-len", "16", "--out", p(out)];
    args.extend_from_slice(extra);
    common::dejavu(&args, env)
}

use common::assert_ok;

fn assert_clean_failure(out: &common::Output, must_contain: &[&str]) {
    common::assert_one_line_exit(out, 1, must_contain);
}

fn manifest(out: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(out.join("acts/manifest.json")).unwrap()).unwrap()
}

/// Held-out neuron recall of the loaded predictor of layer `l` at its chosen k, against labels recomputed here
/// from the recorded `label_tap` (OPT: > 0; Llama: top half by magnitude, the default --neuron-density 0.5).
fn loader_recall(pred: &Predictors<B>, acts: &Activations, l: usize, cfg: &dejavu::ModelConfig, label_tap: Tap) -> f64 {
    loader_recall_from(pred, acts, (l, l), cfg, Tap::MlpInput, label_tap)
}

/// [`loader_recall`] with the predictor of layer `l.0` fed the recorded `input_tap` of layer `l.1`.
fn loader_recall_from(pred: &Predictors<B>, acts: &Activations, (l, input_layer): (usize, usize), cfg: &dejavu::ModelConfig, input_tap: Tap, label_tap: Tap) -> f64 {
    let dev = Default::default();
    let train_n = pred.manifest.train_tokens;
    let total = acts.manifest.tokens;
    let k = pred.k_neurons(l);
    let (x, _) = acts.read(input_layer, input_tap, total).unwrap();
    let (act, _) = acts.read(l, label_tap, total).unwrap();
    let rows = total - train_n;
    let d = cfg.hidden;
    let xv = Tensor::<B, 3>::from_data(TensorData::new(x[train_n * d..].to_vec(), [1, rows, d]), &dev);
    let scores = pred.neuron_scores(l, xv);
    assert_eq!(scores.dims(), [1, rows, cfg.ffn]);
    let s: Vec<f32> = scores.into_data().to_vec().unwrap();
    let mut hits = 0usize;
    let mut pos = 0usize;
    for r in 0..rows {
        let row = &s[r * cfg.ffn..(r + 1) * cfg.ffn];
        let a = &act[(train_n + r) * cfg.ffn..(train_n + r + 1) * cfg.ffn];
        let mut idx: Vec<usize> = (0..cfg.ffn).collect();
        idx.sort_unstable_by(|&i, &j| row[j].total_cmp(&row[i]));
        let labels: Vec<bool> = match cfg.family {
            dejavu::Family::Opt => a.iter().map(|&v| v > 0.0).collect(),
            dejavu::Family::Llama => {
                // Top half by magnitude (the default --neuron-density 0.5); ties are broken by index.
                let kk = (0.5 * cfg.ffn as f64).round() as usize;
                let mut o: Vec<usize> = (0..cfg.ffn).collect();
                o.sort_by(|&i, &j| a[j].total_cmp(&a[i]).then(i.cmp(&j)));
                let mut lab = vec![false; cfg.ffn];
                for &i in &o[..kk] {
                    lab[i] = true;
                }
                lab
            }
        };
        pos += labels.iter().filter(|&&b| b).count();
        hits += idx[..k].iter().filter(|&&i| labels[i]).count();
    }
    hits as f64 / pos.max(1) as f64
}

fn end_to_end(name: &str) {
    let tmp = tempfile::tempdir().unwrap();
    let text = tmp.path().join("calib.txt");
    write_text(&text, 300);
    let run = tmp.path().join("run");
    let n = 2000;
    assert_ok(&collect(&fixture(name), &text, n, &run, &["--shard-mb", "0.2"], &[]));
    let m = manifest(&run);
    assert_eq!(m["tokens"], n);
    assert_eq!(m["complete"], true);
    assert!(m["shards"].as_array().unwrap().len() > 1, "expected several shards");

    let out = common::dejavu(
        &["train-predictors", "--run", p(&run), "--model", &fixture(name), "--epochs", "4", "--batch-size", "128", "--lr", "1e-2"],
        &[],
    );
    assert_ok(&out);
    let dir = run.join("predictors");
    for f in ["predictors.safetensors", "manifest.json", "metrics.csv", "recall_density.svg"] {
        assert!(dir.join(f).is_file(), "{f} missing");
    }
    let files = ModelFiles::resolve(&fixture(name)).unwrap();
    let id = files.identity().unwrap();
    let dev = Default::default();
    let pred = Predictors::<B>::load(&dir, &id, &dev).unwrap();
    let cfg = &files.config;
    assert_eq!(pred.layers(), cfg.layers);

    // The loaded predictor reproduces the held-out recall measured during training.
    let acts = Activations::open(&run).unwrap();
    let d = cfg.hidden;
    for l in 0..cfg.layers {
        let k = pred.k_neurons(l);
        assert!(k >= 1 && k <= cfg.ffn);
        assert!(pred.k_heads(l) >= 1 && pred.k_heads(l) <= cfg.heads);
        let lm = &pred.manifest.layers[l];
        assert!(lm.neuron_recall >= 0.99 - 1e-9 && lm.head_recall >= 0.95 - 1e-9, "{lm:?}");
        let recall = loader_recall(&pred, &acts, l, cfg, Tap::MlpAct);
        assert!((recall - lm.neuron_recall).abs() < 5e-3, "layer {l}: loader recall {recall} vs trained {}", lm.neuron_recall);
        let h = pred.head_scores(l, Tensor::<B, 3>::zeros([2, 3, d], &dev));
        assert_eq!(h.dims(), [2, 3, cfg.heads]);
    }
    // `eval --mode dejavu` runs the sparse forward with these predictors; realised sparsity follows their k.
    let tasks = tmp.path().join("tasks");
    std::fs::create_dir_all(&tasks).unwrap();
    std::fs::write(tasks.join("copa.jsonl"), "{\"query\": \"the cat sat on\", \"choices\": [\"the mat.\", \"the dog.\"], \"gold\": 0}\n".repeat(3)).unwrap();
    let eval_out = tmp.path().join("eval");
    let out = common::dejavu(
        &["eval", "--model", &fixture(name), "--tasks-dir", p(&tasks), "--tasks", "copa", "--mode", "dejavu", "--predictors", p(&dir), "--out", p(&eval_out)],
        &[],
    );
    assert_ok(&out);
    let res: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(eval_out.join("results.json")).unwrap()).unwrap();
    let layers = res["modes"][0]["layers"].as_array().unwrap();
    for (l, row) in layers.iter().enumerate() {
        let want_heads = 1.0 - pred.k_heads(l) as f64 / cfg.heads as f64;
        assert!((row["head_sparsity"].as_f64().unwrap() - want_heads).abs() < 1e-9, "layer {l}: {row}");
        let want_mlp = 1.0 - pred.k_neurons(l) as f64 / cfg.ffn as f64;
        let got = row["mlp_sparsity"].as_f64().unwrap();
        // SiLU·up is never exactly zero, so Llama realises exactly the predictor's k; ReLU can only add zeros.
        match cfg.family {
            dejavu::Family::Llama => assert!((got - want_mlp).abs() < 1e-9, "layer {l}: {got} vs {want_mlp}"),
            dejavu::Family::Opt => assert!(got >= want_mlp - 1e-9, "layer {l}: {got} vs {want_mlp}"),
        }
    }
    // Predictors of this model are refused for another model.
    let other = if name == "tiny-opt" { fixture("tiny-opt-proj") } else { fixture("tiny-llama-tied") };
    let out = common::dejavu(
        &["eval", "--model", &other, "--tasks-dir", p(&tasks), "--tasks", "copa", "--mode", "dejavu", "--predictors", p(&dir), "--out", p(&eval_out)],
        &[],
    );
    assert_clean_failure(&out, &["manifest.json", "fingerprint"]);

    let csv = std::fs::read_to_string(dir.join("metrics.csv")).unwrap();
    assert_eq!(csv.lines().count(), cfg.layers + 1);
    assert!(std::fs::read_to_string(dir.join("recall_density.svg")).unwrap().starts_with("<svg"));
}

#[test]
fn end_to_end_tiny_opt() {
    end_to_end("tiny-opt");
}

#[test]
fn end_to_end_tiny_llama() {
    end_to_end("tiny-llama");
}

/// `--neuron-target gate` labels Llama neurons by |SiLU(gate)| (CATS' criterion): the recall the loaded predictors
/// reach against labels recomputed here from the recorded gate activations matches the trained one. OPT refuses it.
/// 2,000 tokens of `fixture` collected into `tmp/run` and predictors trained there (4 epochs) with `extra` options:
/// the run directory, the model and the loaded predictors.
fn collect_and_train(tmp: &Path, fixture_name: &str, extra: &[&str]) -> (std::path::PathBuf, ModelFiles, Predictors<B>) {
    let text = tmp.join("calib.txt");
    write_text(&text, 300);
    let run = tmp.join("run");
    assert_ok(&collect(&fixture(fixture_name), &text, 2000, &run, &[], &[]));
    let mut args = vec!["train-predictors", "--run", p(&run), "--epochs", "4", "--batch-size", "128", "--lr", "1e-2"];
    args.extend_from_slice(extra);
    assert_ok(&common::dejavu(&args, &[]));
    let files = ModelFiles::resolve(&fixture(fixture_name)).unwrap();
    let pred = Predictors::<B>::load(&run.join("predictors"), &files.identity().unwrap(), &Default::default()).unwrap();
    (run, files, pred)
}

#[test]
fn neuron_target_gate_labels_by_silu_gate() {
    let tmp = tempfile::tempdir().unwrap();
    let (run, files, pred) = collect_and_train(tmp.path(), "tiny-llama", &["--neuron-target", "gate"]);
    let text = tmp.path().join("calib.txt");
    assert!(pred.manifest.neuron_label.contains("|SiLU(gate)|") && !pred.manifest.neuron_label.contains("up"), "{}", pred.manifest.neuron_label);
    let acts = Activations::open(&run).unwrap();
    for l in 0..files.config.layers {
        let lm = &pred.manifest.layers[l];
        let recall = loader_recall(&pred, &acts, l, &files.config, Tap::GateAct);
        assert!((recall - lm.neuron_recall).abs() < 5e-3, "layer {l}: loader recall {recall} vs trained {}", lm.neuron_recall);
    }

    let opt_run = tmp.path().join("opt");
    assert_ok(&collect(&fixture("tiny-opt"), &text, 300, &opt_run, &[], &[]));
    let out = common::dejavu(&["train-predictors", "--run", p(&opt_run), "--neuron-target", "gate"], &[]);
    assert_clean_failure(&out, &["acts/manifest.json", "--neuron-target gate", "Llama"]);
}

/// `--neuron-input block` trains each layer's neuron predictor on the layer's block input (the look-ahead), and
/// `prev` on the previous layer's (layer 0: its own): the manifest says so, the loaded predictors report it, and
/// their recall on the recorded block inputs of that layer matches the trained one. A manifest without the field
/// (older dejavus) loads as the MLP input.
#[test]
fn neuron_input_block_trains_on_the_block_input() {
    use dejavu::predictor::NeuronInput;
    let tmp = tempfile::tempdir().unwrap();
    let prev_dir = tmp.path().join("prev");
    std::fs::create_dir_all(&prev_dir).unwrap();
    let (prun, pfiles, ppred) = collect_and_train(&prev_dir, "tiny-opt", &["--neuron-input", "prev"]);
    assert_eq!(ppred.neuron_input(), NeuronInput::Prev);
    assert!(ppred.manifest.neuron_input.contains("i-1"), "{}", ppred.manifest.neuron_input);
    let pacts = Activations::open(&prun).unwrap();
    assert!(pfiles.config.layers >= 2);
    for l in 0..pfiles.config.layers {
        let lm = &ppred.manifest.layers[l];
        let recall = loader_recall_from(&ppred, &pacts, (l, l.saturating_sub(1)), &pfiles.config, Tap::BlockInput, Tap::MlpAct);
        assert!((recall - lm.neuron_recall).abs() < 5e-3, "layer {l}: loader recall on the previous block input {recall} vs trained {}", lm.neuron_recall);
    }
    let (run, files, pred) = collect_and_train(tmp.path(), "tiny-opt", &["--neuron-input", "block"]);
    let dir = run.join("predictors");
    assert_eq!(pred.neuron_input(), NeuronInput::Block);
    assert!(pred.manifest.neuron_input.contains("block_input"), "{}", pred.manifest.neuron_input);
    let acts = Activations::open(&run).unwrap();
    for l in 0..files.config.layers {
        let lm = &pred.manifest.layers[l];
        let recall = loader_recall_from(&pred, &acts, (l, l), &files.config, Tap::BlockInput, Tap::MlpAct);
        assert!((recall - lm.neuron_recall).abs() < 5e-3, "layer {l}: loader recall on the block input {recall} vs trained {}", lm.neuron_recall);
    }
    // The same file without `neuron_tap`, as older dejavus wrote it.
    let mpath = dir.join("manifest.json");
    let mut m: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&mpath).unwrap()).unwrap();
    assert!(m.as_object_mut().unwrap().remove("neuron_tap").is_some());
    std::fs::write(&mpath, serde_json::to_string(&m).unwrap()).unwrap();
    let old = Predictors::<B>::load(&dir, &files.identity().unwrap(), &Default::default()).unwrap();
    assert_eq!(old.neuron_input(), dejavu::predictor::NeuronInput::Mlp);
}

#[test]
fn refuses_artifacts_of_another_model() {
    let tmp = tempfile::tempdir().unwrap();
    let text = tmp.path().join("calib.txt");
    write_text(&text, 60);
    let run = tmp.path().join("run");
    assert_ok(&collect(&fixture("tiny-opt"), &text, 300, &run, &[], &[]));
    // train-predictors told the model is another one.
    let out = common::dejavu(&["train-predictors", "--run", p(&run), "--model", &fixture("tiny-opt-proj"), "--epochs", "1"], &[]);
    assert_clean_failure(&out, &["acts/manifest.json", "made for model", "tiny-opt-proj"]);
    // collect resuming into a run of another model.
    let out = collect(&fixture("tiny-llama"), &text, 300, &run, &[], &[]);
    assert_clean_failure(&out, &["acts/manifest.json", "made for model"]);
    // Predictors of tiny-opt loaded for tiny-llama.
    assert_ok(&common::dejavu(&["train-predictors", "--run", p(&run), "--epochs", "1"], &[]));
    let other = ModelFiles::resolve(&fixture("tiny-llama")).unwrap().identity().unwrap();
    let err = Predictors::<B>::load(&run.join("predictors"), &other, &Default::default()).err().expect("must refuse");
    let msg = err.to_string();
    assert!(msg.contains("predictors/manifest.json") && msg.contains("made for model") && !msg.contains('\n'), "{msg}");
}

/// Every recorded tensor of a run, concatenated over shards.
fn all_taps(run: &Path) -> Vec<Vec<f32>> {
    let acts = Activations::open(run).unwrap();
    let mut out = vec![acts.tokens(usize::MAX).unwrap().into_iter().map(|t| t as f32).collect()];
    for l in 0..acts.manifest.layers {
        for tap in acts.manifest.tap_list() {
            out.push(acts.read(l, tap, usize::MAX).unwrap().0);
        }
    }
    out
}

#[test]
fn killed_run_resumes_without_loss_or_duplication() {
    let tmp = tempfile::tempdir().unwrap();
    let text = tmp.path().join("calib.txt");
    write_text(&text, 200);
    let n = 500; // not a multiple of the 15 text tokens per sequence: the last one is short
    let model = fixture("tiny-llama");
    let reference = tmp.path().join("ref");
    assert_ok(&collect(&model, &text, n, &reference, &["--shard-mb", "0.03"], &[]));

    let run = tmp.path().join("run");
    let n_s = n.to_string();
    let args = ["collect", "--model", &model, "--text", p(&text), "--tokens", &n_s, "--seq-len", "16", "--out", p(&run), "--shard-mb", "0.03"];
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_dejavu"))
        .args(args)
        .env(dejavu::collect::SLOW_ENV, "40")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    common::wait_for_first_shard(&mut child, &run, Duration::from_secs(60));
    // Let it get into the middle of the next shard, then kill it.
    std::thread::sleep(Duration::from_millis(60));
    child.kill().unwrap();
    child.wait().unwrap();
    let partial = manifest(&run);
    assert_eq!(partial["complete"], false, "killed too late to test resumption");
    let partial_tokens = partial["tokens"].as_u64().unwrap();
    assert!(partial_tokens > 0 && partial_tokens < n as u64);

    let out = common::dejavu(&args, &[]);
    assert_ok(&out);
    assert!(out.stderr.contains("resuming"), "{}", out.stderr);
    let m = manifest(&run);
    assert_eq!(m["tokens"], n);
    let sum: u64 = m["shards"].as_array().unwrap().iter().map(|s| s["tokens"].as_u64().unwrap()).sum();
    assert_eq!(sum, n as u64);
    let a = all_taps(&reference);
    let b = all_taps(&run);
    assert_eq!(a.len(), b.len());
    for (i, (x, y)) in a.iter().zip(&b).enumerate() {
        assert_eq!(x.len(), y.len(), "tensor {i}: length");
        assert!(x == y, "tensor {i}: resumed activations differ from an uninterrupted run");
    }
    // A third run with the same arguments has nothing left to do.
    let out = common::dejavu(&args, &[]);
    assert_ok(&out);
    assert!(out.stderr.contains("already complete"), "{}", out.stderr);
}

#[test]
fn empty_text_file() {
    let tmp = tempfile::tempdir().unwrap();
    let text = tmp.path().join("empty.txt");
    std::fs::write(&text, "").unwrap();
    let out = collect(&fixture("tiny-opt"), &text, 100, &tmp.path().join("run"), &[], &[]);
    assert_clean_failure(&out, &["empty.txt", "empty text file"]);
}

#[test]
fn binary_text_file() {
    let tmp = tempfile::tempdir().unwrap();
    let text = tmp.path().join("model.bin");
    std::fs::write(&text, [0x7fu8, b'E', b'L', b'F', 2, 1, 1, 0, 0, 0, 0xff, 0xfe]).unwrap();
    let out = collect(&fixture("tiny-opt"), &text, 100, &tmp.path().join("run"), &[], &[]);
    assert_clean_failure(&out, &["model.bin", "binary file", "offset 7"]);
    let bad_utf8 = tmp.path().join("latin1.txt");
    std::fs::write(&bad_utf8, b"caf\xe9 au lait\n").unwrap();
    let out = collect(&fixture("tiny-opt"), &bad_utf8, 100, &tmp.path().join("run2"), &[], &[]);
    assert_clean_failure(&out, &["latin1.txt", "not UTF-8", "offset 3"]);
}

#[test]
fn text_shorter_than_n_stops_with_what_it_has() {
    let tmp = tempfile::tempdir().unwrap();
    let text = tmp.path().join("short.txt");
    write_text(&text, 5);
    let run = tmp.path().join("run");
    let out = collect(&fixture("tiny-opt"), &text, 100_000, &run, &[], &[]);
    assert_ok(&out);
    assert!(out.stderr.contains("ran out"), "{}", out.stderr);
    let m = manifest(&run);
    let got = m["tokens"].as_u64().unwrap();
    assert!(got > 0 && got < 100_000);
    assert_eq!(m["text_exhausted"], true);
    assert_eq!(m["complete"], true);
    let acts = Activations::open(&run).unwrap();
    assert_eq!(acts.tokens(usize::MAX).unwrap().len() as u64, got);
}

#[test]
fn disk_too_small() {
    let tmp = tempfile::tempdir().unwrap();
    let text = tmp.path().join("calib.txt");
    write_text(&text, 20);
    let run = tmp.path().join("run");
    let out = collect(&fixture("tiny-opt"), &text, 100_000, &run, &[], &[(dejavu::store::FREE_BYTES_ENV, "1000000")]);
    assert_clean_failure(&out, &["run", "not enough disk", "100000 tokens", "only 1.0 MB is free"]);
    assert!(!run.join("acts/manifest.json").exists());
}

#[test]
fn unknown_run_directory() {
    let out = common::dejavu(&["train-predictors", "--run", "/nonexistent/dejavu/run"], &[]);
    assert_clean_failure(&out, &["/nonexistent/dejavu/run", "no such run directory"]);
    let tmp = tempfile::tempdir().unwrap();
    let out = common::dejavu(&["train-predictors", "--run", p(tmp.path())], &[]);
    assert_clean_failure(&out, &["acts/manifest.json", "not found"]);
}

/// What collect stores equals the model's own per-sequence forward taps (rounded to f16), whatever the batch size
/// (full and short rows) and however the taps come back from the backend.
#[test]
fn recorded_taps_equal_the_forward() {
    use dejavu::model::{to_host_3d, TapSet};
    let dir = tempfile::tempdir().unwrap();
    let text = dir.path().join("t.txt");
    write_text(&text, 40);
    let name = "tiny-llama";
    let files = ModelFiles::resolve(&fixture(name)).unwrap();
    let cfg = files.config.clone();
    let model = dejavu::Model::<B>::load(&cfg, files.checkpoint.as_ref(), &Default::default(), |_| {}).unwrap();
    let n = 100; // 6 full sequences of 15 tokens (seq-len 16 with BOS) and a short one of 10
    let mut runs = Vec::new();
    for (tag, extra) in [
        ("b1", vec!["--batch", "1"]),
        ("b4-packed", vec!["--batch", "4", "--readback", "packed"]),
        ("b4-per-tap", vec!["--batch", "4", "--readback", "per-tap"]),
    ] {
        let run = dir.path().join(tag);
        assert_ok(&collect(&fixture(name), &text, n, &run, &extra, &[]));
        runs.push((tag, run));
    }
    let acts = Activations::open(&runs[0].1).unwrap();
    let toks = acts.tokens(usize::MAX).unwrap();
    assert_eq!(toks.len(), n);
    let bos = acts.manifest.bos_token_id;
    let first = bos.is_some() as usize;
    let taps = acts.manifest.tap_list();
    let mut reference: Vec<Vec<f32>> = vec![Vec::new(); cfg.layers * taps.len()];
    for chunk in toks.chunks(16 - first) {
        let mut ids: Vec<u32> = bos.into_iter().collect();
        ids.extend_from_slice(chunk);
        let mut cache = model.new_cache();
        let mut out = Vec::new();
        let _ = model.forward(model.tokens(&[ids]), &mut cache, Some((&TapSet::all(), &mut out)));
        for (l, lt) in out.into_iter().enumerate() {
            for (j, tap) in taps.iter().enumerate() {
                let t = match tap {
                    Tap::BlockInput => lt.block_input.clone(),
                    Tap::MlpInput => lt.mlp_input.clone(),
                    Tap::MlpAct => lt.mlp_act.clone(),
                    Tap::GateAct => lt.gate_act.clone(),
                    Tap::HeadNorm => lt.head_norm.clone(),
                }
                .unwrap();
                let (v, [_, _, w]) = to_host_3d(t);
                let abs = matches!(tap, Tap::MlpAct | Tap::GateAct);
                reference[l * taps.len() + j].extend(v[first * w..].iter().map(|&x| if abs { x.abs() } else { x }));
            }
        }
    }
    for (tag, run) in &runs {
        let a = Activations::open(run).unwrap();
        assert_eq!(a.tokens(usize::MAX).unwrap(), toks, "{tag}: tokens");
        for l in 0..cfg.layers {
            for (j, &tap) in taps.iter().enumerate() {
                let (got, _) = a.read(l, tap, usize::MAX).unwrap();
                let want = &reference[l * taps.len() + j];
                assert_eq!(got.len(), want.len(), "{tag}: layer {l} {}", tap.name());
                // f16's step is at most 2^-10 ≈ 9.8e-4 of the value; allow about two steps, since slightly
                // different f32 sums (batched vs one sequence, Flex vs NdArray) can round to neighbouring f16
                // values. A misplaced token or tap would be off by O(1).
                let worst = got.iter().zip(want).map(|(g, w)| (g - w).abs() / (1e-4 + w.abs())).fold(0.0f32, f32::max);
                assert!(worst < 2.5e-3, "{tag}: layer {l} {}: worst relative error {worst}", tap.name());
            }
        }
    }
}
