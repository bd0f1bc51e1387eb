//! Task files the tool does not know by name: kinds told by fields, delimiters from a definition or a flag, a
//! never-seen ARC-format task cross-checked against an independent computation, and generation tasks.

mod common;

use std::path::{Path, PathBuf};

use dejavu::backend::CpuBackend as B;
use dejavu::model::{to_host_3d, Forward};
use dejavu::{Model, ModelFiles};

fn load(dir: &Path) -> (ModelFiles, Model<B>) {
    let files = ModelFiles::resolve(dir.to_str().unwrap()).unwrap();
    let model = Model::load(&files.config, files.checkpoint.as_ref(), &Default::default(), |_| {}).unwrap();
    (files, model)
}

fn stories() -> PathBuf {
    common::shared_dir().join("models/stories260k")
}

/// Log-softmax of every position of one full sequence, computed by the plain forward (no cache reuse, no
/// batching) and in f64: `[positions][vocab]`.
fn log_probs(model: &Model<B>, ids: &[u32]) -> Vec<Vec<f64>> {
    let mut cache = model.new_cache();
    let h = model.forward_with(model.tokens(&[ids.to_vec()]), &mut cache, Forward::default());
    let (flat, _) = to_host_3d(model.logits(h));
    let v = flat.len() / ids.len();
    flat.chunks(v)
        .map(|row| {
            let m = row.iter().cloned().fold(f32::MIN, f32::max) as f64;
            let lse = m + row.iter().map(|&x| (x as f64 - m).exp()).sum::<f64>().ln();
            row.iter().map(|&x| x as f64 - lse).collect()
        })
        .collect()
}

fn encode(files: &ModelFiles, text: &str) -> Vec<u32> {
    files.tokenizer.encode(text, false).unwrap().get_ids().to_vec()
}

fn results(dir: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(dir.join("results.json")).unwrap()).unwrap()
}

fn eval(args: &[&str]) -> common::Output {
    common::dejavu(&[&["eval"], args].concat(), &[])
}

/// The ARC-format file in tests/tasks (written for this test; no tool knows the name `arc_mini`) scored by the
/// CLI, against acc and acc_norm computed here from the harness's definition: the log-likelihood of
/// `"\nAnswer: " + choice` after the query, summed over the continuation's tokens of one full forward; acc picks
/// the largest sum, acc_norm the largest sum per byte of the choice.
#[test]
fn never_seen_arc_task_matches_an_independent_computation() {
    let tasks_dir = common::manifest_dir().join("tests/tasks");
    let lines: Vec<serde_json::Value> = std::fs::read_to_string(tasks_dir.join("arc_mini.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    // tiny-llama rather than tiny-opt: OPT's 64-position table would cut these contexts, which this plain
    // recomputation does not do.
    for model_dir in [stories(), common::fixture_dir("tiny-llama")] {
        let tmp = tempfile::tempdir().unwrap();
        let dump = tmp.path().join("dump.jsonl");
        let out = eval(&[
            "--model", model_dir.to_str().unwrap(), "--tasks-dir", tasks_dir.to_str().unwrap(), "--tasks", "arc_mini",
            "--out", tmp.path().to_str().unwrap(), "--dump", dump.to_str().unwrap(),
        ]);
        common::assert_ok(&out);
        let res = results(tmp.path());
        let t = &res["modes"][0]["tasks"][0];
        assert_eq!(t["task"], "arc_mini");
        assert_eq!(t["kind"], "multiple_choice");
        assert_eq!(t["delimiter"], "\nAnswer: ");
        assert_eq!(t["n"], lines.len());

        let (files, model) = load(&model_dir);
        let dumped: Vec<serde_json::Value> =
            std::fs::read_to_string(&dump).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
        let (mut hits, mut hits_norm) = (0usize, 0usize);
        for (i, ex) in lines.iter().enumerate() {
            let query = ex["query"].as_str().unwrap();
            let gold = ex["gold"].as_u64().unwrap() as usize;
            let mut sums = Vec::new();
            let mut norms = Vec::new();
            for (j, c) in ex["choices"].as_array().unwrap().iter().enumerate() {
                let c = c.as_str().unwrap();
                let ctx = encode(&files, query);
                let whole = encode(&files, &format!("{query}\nAnswer: {c}"));
                let lp = log_probs(&model, &whole);
                let ll: f64 = (ctx.len()..whole.len()).map(|p| lp[p - 1][whole[p] as usize]).sum();
                let got = dumped[i]["requests"][j]["loglik"].as_f64().unwrap();
                assert!((got - ll).abs() < 1e-3, "{} example {i} choice {j}: eval {got} vs {ll}", model_dir.display());
                sums.push(ll);
                norms.push(ll / c.len() as f64);
            }
            // First index on ties, as the harness's argmax.
            let best = |v: &[f64]| (0..v.len()).fold(0, |b, k| if v[k] > v[b] { k } else { b });
            hits += (best(&sums) == gold) as usize;
            hits_norm += (best(&norms) == gold) as usize;
        }
        let n = lines.len() as f64;
        assert_eq!(t["acc"].as_f64().unwrap(), hits as f64 / n, "{}", model_dir.display());
        assert_eq!(t["acc_norm"].as_f64().unwrap(), hits_norm as f64 / n, "{}", model_dir.display());
        eprintln!("{}: arc_mini acc {} acc_norm {}", model_dir.display(), hits as f64 / n, hits_norm as f64 / n);
    }
}

/// Without its definition the same file is told multiple choice by its fields; the delimiter then comes from
/// `--delimiter` (the same numbers as the definition) or is a space (other numbers, recorded in the results).
#[test]
fn delimiter_from_flag_or_default_and_path_names() {
    let tmp = tempfile::tempdir().unwrap();
    let src = common::manifest_dir().join("tests/tasks/arc_mini.jsonl");
    let dir = tmp.path().join("tasks");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(&src, dir.join("quiz.jsonl")).unwrap();
    let m = common::fixture_dir("tiny-llama");
    let run = |name: &str, extra: &[&str], out: &str| {
        let o = tmp.path().join(out);
        let r = eval(&[&["--model", m.to_str().unwrap(), "--tasks-dir", dir.to_str().unwrap(), "--tasks", name, "--out", o.to_str().unwrap()], extra].concat());
        common::assert_ok(&r);
        results(&o)["modes"][0]["tasks"][0].clone()
    };
    let with_def = run(common::manifest_dir().join("tests/tasks/arc_mini.toml").to_str().unwrap(), &[], "def");
    let with_flag = run("quiz", &["--delimiter", "\nAnswer: "], "flag");
    let by_path = run(dir.join("quiz.jsonl").to_str().unwrap(), &["--delimiter", "\nAnswer: "], "path");
    let plain = run("quiz", &[], "plain");
    for t in [&with_def, &with_flag, &by_path, &plain] {
        assert_eq!(t["kind"], "multiple_choice");
    }
    assert_eq!(with_def["task"], "arc_mini");
    assert_eq!(with_flag["task"], "quiz");
    for k in ["acc", "acc_norm", "n"] {
        assert_eq!(with_def[k], with_flag[k], "{k}");
        assert_eq!(with_def[k], by_path[k], "{k}");
    }
    assert_eq!(with_flag["delimiter"], "\nAnswer: ");
    assert_eq!(plain["delimiter"], " ");
}

/// Copies of built-in task files under names the tool does not know are scored exactly as the built-in tasks
/// (kind from the fields; the built-ins' delimiter is a space for these three).
#[test]
fn unknown_names_score_as_the_builtin_of_the_same_kind() {
    let tmp = tempfile::tempdir().unwrap();
    let shared = common::shared_dir().join("data/tasks");
    let dir = tmp.path().join("tasks");
    std::fs::create_dir_all(&dir).unwrap();
    for (from, to) in [("copa", "my_mc"), ("winogrande", "my_schema"), ("lambada_openai", "my_lm")] {
        let text = std::fs::read_to_string(shared.join(format!("{from}.jsonl"))).unwrap();
        let head: String = text.lines().take(6).map(|l| format!("{l}\n")).collect();
        std::fs::write(dir.join(format!("{from}.jsonl")), &head).unwrap();
        std::fs::write(dir.join(format!("{to}.jsonl")), &head).unwrap();
    }
    let o = tmp.path().join("out");
    let out = eval(&[
        "--model", common::fixture_dir("tiny-opt").to_str().unwrap(), "--tasks-dir", dir.to_str().unwrap(),
        "--tasks", "copa,my_mc,winogrande,my_schema,lambada,my_lm", "--out", o.to_str().unwrap(), "--dump", tmp.path().join("d.jsonl").to_str().unwrap(),
    ]);
    common::assert_ok(&out);
    let r = results(&o);
    let t = r["modes"][0]["tasks"].as_array().unwrap();
    for (b, u, kind) in [(0, 1, "multiple_choice"), (2, 3, "schema"), (4, 5, "language_model")] {
        assert_eq!(t[u]["kind"], kind);
        for k in ["kind", "n", "acc", "acc_norm", "delimiter"] {
            assert_eq!(t[b][k], t[u][k], "{} vs {}: {k}", t[b]["task"], t[u]["task"]);
        }
    }
    // And request by request, the same log-likelihoods.
    let d: Vec<serde_json::Value> =
        std::fs::read_to_string(tmp.path().join("d.jsonl")).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let of = |task: &str| d.iter().filter(|x| x["task"] == task).map(|x| x["requests"].clone()).collect::<Vec<_>>();
    assert_eq!(of("copa"), of("my_mc"));
    assert_eq!(of("winogrande"), of("my_schema"));
    assert_eq!(of("lambada_openai"), of("my_lm"));
}

#[test]
fn bad_task_files_and_definitions() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let m = common::fixture_dir("tiny-llama");
    let run = |args: &[&str]| {
        eval(&[&["--model", m.to_str().unwrap(), "--tasks-dir", dir.to_str().unwrap(), "--out", dir.join("o").to_str().unwrap()], args].concat())
    };
    std::fs::write(dir.join("qa.jsonl"), "{\"question\": \"a\", \"answer\": \"b\"}\n").unwrap();
    common::assert_one_line_exit(&run(&["--tasks", "qa"]), 1, &["qa.jsonl:1", "cannot tell the task kind", "question", "qa.toml"]);
    std::fs::write(dir.join("qa.toml"), "kind = \"multiple_choice\"\ndelimeter = \" \"\n").unwrap();
    common::assert_one_line_exit(&run(&["--tasks", "qa"]), 1, &["qa.toml:2", "delimeter"]);
    std::fs::write(dir.join("qa.toml"), "kind = \"multiple_choice\"\n").unwrap();
    common::assert_one_line_exit(&run(&["--tasks", "qa"]), 1, &["qa.jsonl:1", "query"]);
    std::fs::write(dir.join("gen.jsonl"), "{\"context\": \"a\", \"continuation\": \"  \"}\n").unwrap();
    std::fs::write(dir.join("gen.toml"), "kind = \"generation\"\n").unwrap();
    common::assert_one_line_exit(&run(&["--tasks", "gen"]), 1, &["gen.jsonl:1", "continuation", "empty"]);
    std::fs::write(dir.join("arr.jsonl"), "[1, 2]\n").unwrap();
    common::assert_one_line_exit(&run(&["--tasks", "arr"]), 1, &["arr.jsonl:1", "JSON object"]);
    // A task with no file and no definition, and a --delimiter no task would use: bad usage, exit 2.
    common::assert_one_line_exit(&run(&["--tasks", "nothere"]), 2, &["--tasks", "unknown task `nothere`", "nothere.jsonl"]);
    common::assert_one_line_exit(&run(&["--tasks", "copa", "--delimiter", ";"]), 2, &["--delimiter", "copa"]);
    common::assert_one_line_exit(&run(&["--tasks", "missing.toml"]), 1, &["missing.toml"]);
}

#[test]
fn generation_match_rule() {
    use dejavu::eval::generation_matches as m;
    assert!(m(" signs", "signs"));
    assert!(m(" signs.", "signs"));
    assert!(m("signs and more", " signs "));
    assert!(!m(" signals", "signs"));
    assert!(!m(" sign", "signs"));
    assert!(!m("", "signs"));
    assert!(!m(" anything", "  "));
}

/// Greedy generation tasks: targets made here from the model's own greedy continuation (argmax of full forwards
/// over the growing sequence, no KV cache) are all matched; changed targets are not. On LAMBADA, every example
/// the teacher-forced greedy check passes, generation passes too (greedy decoding then emits those tokens).
#[test]
fn generation_tasks_match_greedy_continuations() {
    let model_dir = stories();
    let (files, model) = load(&model_dir);
    let prompts = ["Once upon a time, there was a little", "Lily and Ben went to the park. They saw a big", "The cat was very", "One day, Tom found a"];
    let mut good = String::new();
    let mut bad = String::new();
    for p in prompts {
        let mut ids = encode(&files, p);
        let n0 = ids.len();
        for _ in 0..8 {
            let lp = log_probs(&model, &ids);
            let last = lp.last().unwrap();
            let next = (0..last.len()).fold(0, |b, k| if last[k] > last[b] { k } else { b });
            ids.push(next as u32);
        }
        let text = files.tokenizer.decode(&ids[n0..], false).unwrap();
        // The continuation up to the end of its first whole word (followed by a space or punctuation).
        let t = text.trim_start();
        let start = t.find(char::is_alphanumeric).expect("a word within 8 tokens");
        let end = start + t[start..].find(|c: char| !c.is_alphanumeric()).expect("a word boundary within 8 tokens");
        let word = &t[..end];
        assert!(!word.is_empty(), "{p:?} -> {text:?}");
        good.push_str(&serde_json::json!({"context": p, "continuation": word}).to_string());
        good.push('\n');
        bad.push_str(&serde_json::json!({"context": p, "continuation": format!("{word}x")}).to_string());
        bad.push('\n');
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    std::fs::write(dir.join("good.jsonl"), &good).unwrap();
    std::fs::write(dir.join("bad.jsonl"), &bad).unwrap();
    for n in ["good", "bad"] {
        std::fs::write(dir.join(format!("{n}.toml")), "kind = \"generation\"\n").unwrap();
    }
    let o = dir.join("out");
    let out = eval(&["--model", model_dir.to_str().unwrap(), "--tasks-dir", dir.to_str().unwrap(), "--tasks", "good,bad", "--out", o.to_str().unwrap()]);
    common::assert_ok(&out);
    let r = results(&o);
    let t = &r["modes"][0]["tasks"];
    assert_eq!(t[0]["kind"], "generation");
    assert_eq!(t[0]["acc"], 1.0, "{good}");
    assert_eq!(t[1]["acc"], 0.0, "{bad}");

    // LAMBADA both ways on the first examples: teacher-forced greedy hits imply generation hits.
    let d = dir.join("d.jsonl");
    let out = eval(&[
        "--model", model_dir.to_str().unwrap(), "--tasks-dir", common::shared_dir().join("data/tasks").to_str().unwrap(),
        "--tasks", "lambada_openai,lambada_openai_gen", "--limit", "20", "--out", o.to_str().unwrap(), "--dump", d.to_str().unwrap(),
    ]);
    common::assert_ok(&out);
    let dumped: Vec<serde_json::Value> = std::fs::read_to_string(&d).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let hits = |task: &str| dumped.iter().filter(|x| x["task"] == task).map(|x| x["requests"][0]["greedy"].as_bool().unwrap()).collect::<Vec<_>>();
    let (lm, gen) = (hits("lambada_openai"), hits("lambada_openai_gen"));
    assert_eq!((lm.len(), gen.len()), (20, 20));
    for (i, (a, b)) in lm.iter().zip(&gen).enumerate() {
        assert!(!a || *b, "example {i}: teacher-forced greedy match but no generation match");
    }
    assert!(dumped.iter().filter(|x| x["task"] == "lambada_openai_gen").all(|x| x["requests"][0]["generated"].is_string()));
}

/// `eval --correct --accept argmax` on a generation task: the corrected sparse mode generates, example by
/// example, the text dense greedy decoding generates (the dense model keeps only its own argmax), so its accuracy
/// is dense's; bad combinations are usage errors.
#[test]
fn corrected_generation_with_argmax_reproduces_dense() {
    let tmp = tempfile::tempdir().unwrap();
    let model = stories();
    let tasks = common::shared_dir().join("data/tasks");
    let d = tmp.path().join("d.jsonl");
    let o = tmp.path().join("o");
    let base = ["eval", "--model", model.to_str().unwrap(), "--tasks-dir", tasks.to_str().unwrap(), "--limit", "12", "--out", o.to_str().unwrap()];
    let out = common::dejavu(
        &[&base[..], &["--tasks", "lambada_openai_gen", "--compare", "dense,oracle@0.7", "--correct", "--accept", "argmax", "--period", "2", "--dump", d.to_str().unwrap()]].concat(),
        &[],
    );
    common::assert_ok(&out);
    assert!(out.stdout.contains("| oracle@0.7+correct | lambada_openai_gen |"), "{}", out.stdout);
    let dumped: Vec<serde_json::Value> = std::fs::read_to_string(&d).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let texts = |mode: &str| {
        dumped.iter().filter(|x| x["mode"] == mode).map(|x| x["requests"][0]["generated"].as_str().unwrap().to_string()).collect::<Vec<_>>()
    };
    let (dense, corrected) = (texts("dense"), texts("oracle@0.7"));
    assert_eq!(dense.len(), 12);
    assert_eq!(dense, corrected);
    let r = results(&o);
    assert_eq!(r["modes"][0]["tasks"][0]["acc"], r["modes"][1]["tasks"][0]["acc"]);
    assert_eq!(r["modes"][1]["continuation"]["corrected"]["period"], 2);

    for (extra, needle) in [
        (vec!["--tasks", "copa", "--compare", "dense,oracle@0.5", "--correct"], "generation task"),
        (vec!["--tasks", "lambada_openai_gen", "--correct"], "sparse mode"),
        (vec!["--tasks", "lambada_openai_gen", "--mode", "oracle@0.5", "--correct", "--period", "0"], "--period"),
        (vec!["--tasks", "lambada_openai_gen", "--mode", "oracle@0.5", "--period", "4"], "--correct"),
    ] {
        let out = common::dejavu(&[&base[..], &extra[..]].concat(), &[]);
        assert_eq!(out.code, 2, "{extra:?}: {}", out.stderr);
        assert!(out.stderr.contains(needle), "{extra:?}: {}", out.stderr);
    }
}
