//! What a new user found when following the README, each checked through the binary: the build stamp in
//! `--version`, plain progress lines off a terminal, calibrate's one bar over every pass, outputs checked before
//! any model work, `collect --json FILE`, and Δ accuracy with its ±.

mod common;

use std::path::Path;

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn version_names_the_commit_and_the_features() {
    let out = common::dejavu(&["--version"], &[]);
    common::assert_ok(&out);
    let v = out.stdout.trim();
    assert!(v.starts_with(&format!("dejavu {}", env!("CARGO_PKG_VERSION"))), "{v}");
    assert!(v.contains("features: "), "{v}");
    // The commit as git itself reports it for this checkout (when git and a checkout are here).
    let git = std::process::Command::new("git").args(["rev-parse", "--short=12", "HEAD"]).current_dir(common::manifest_dir()).output();
    match git {
        Ok(o) if o.status.success() => {
            let head = String::from_utf8_lossy(&o.stdout).trim().to_string();
            assert!(v.contains(&format!("commit {head}")), "{v} (HEAD is {head})");
        }
        _ => assert!(v.contains("commit unknown"), "{v}"),
    }
}

#[test]
fn progress_lines_off_a_terminal_and_calibrate_bar_over_all_passes() {
    let tmp = tempfile::tempdir().unwrap();
    let text = tmp.path().join("t.txt");
    std::fs::write(&text, "the quick brown fox jumps over the lazy dog. ".repeat(80)).unwrap();
    let m = common::fixture_dir("tiny-llama");
    let thr = tmp.path().join("thr.json");
    // stderr is a pipe here: the bars must come out as plain lines (every update with DEJAVU_PROGRESS_SECS=0).
    let env = [("DEJAVU_PROGRESS_SECS", "0")];
    let out = common::dejavu(
        &["calibrate", "--model", s(&m), "--text", s(&text), "--sparsity", "0.5,0.7", "--tokens", "256", "--seq-len", "32", "--refine", "1", "--out", s(&thr)],
        &env,
    );
    common::assert_ok(&out);
    // One bar over the first pass and one refinement pass per level: 3 × 256 tokens.
    let lines: Vec<&str> = out.stderr.lines().filter(|l| l.starts_with("calibrate pass")).collect();
    assert!(!lines.is_empty(), "no plain progress lines: {}", out.stderr);
    assert!(lines.iter().all(|l| l.contains("/768 tokens")), "{lines:?}");
    assert!(lines.iter().any(|l| l.contains("pass 3/3")), "{lines:?}");

    let tasks = tmp.path().join("tasks");
    std::fs::create_dir_all(&tasks).unwrap();
    std::fs::write(tasks.join("copa.jsonl"), "{\"query\": \"the cat sat on\", \"choices\": [\"the mat.\", \"the dog.\"], \"gold\": 0}\n".repeat(3)).unwrap();
    let out = common::dejavu(
        &["eval", "--model", s(&m), "--tasks-dir", s(&tasks), "--tasks", "copa", "--out", s(&tmp.path().join("o")), "--ppl", s(&text), "--ppl-tokens", "64", "--ctx", "32"],
        &env,
    );
    common::assert_ok(&out);
    assert!(out.stderr.lines().any(|l| l.starts_with("dense copa [") && l.contains("/3 examples")), "{}", out.stderr);
    assert!(out.stderr.lines().any(|l| l.starts_with("dense ppl [") && l.contains("/64 tokens")), "{}", out.stderr);
}

#[test]
fn outputs_are_checked_before_any_model_work() {
    let tmp = tempfile::tempdir().unwrap();
    let text = tmp.path().join("t.txt");
    std::fs::write(&text, "the quick brown fox jumps over the lazy dog. ".repeat(20)).unwrap();
    let blocker = tmp.path().join("a_file");
    std::fs::write(&blocker, "").unwrap();
    let under = blocker.join("x.json");
    let m = common::fixture_dir("tiny-llama");
    let tasks = tmp.path().join("tasks");
    std::fs::create_dir_all(&tasks).unwrap();
    std::fs::write(tasks.join("copa.jsonl"), "{\"query\": \"a\", \"choices\": [\"b\", \"c\"], \"gold\": 0}\n").unwrap();
    let (o, run) = (tmp.path().join("o"), tmp.path().join("run"));
    let runs: Vec<Vec<&str>> = vec![
        vec!["calibrate", "--model", s(&m), "--text", s(&text), "--sparsity", "0.5", "--tokens", "64", "--seq-len", "32", "--out", s(&under)],
        vec!["eval", "--model", s(&m), "--tasks-dir", s(&tasks), "--tasks", "copa", "--out", s(&under)],
        vec!["eval", "--model", s(&m), "--tasks-dir", s(&tasks), "--tasks", "copa", "--out", s(&o), "--dump", s(&under)],
        vec!["ppl", "--model", s(&m), "--text", s(&text), "--ctx", "32", "--json", s(&under)],
        vec!["generate", "--model", s(&m), "--prompt", "the", "-n", "2", "--json", s(&under)],
        vec!["collect", "--model", s(&m), "--text", s(&text), "--tokens", "32", "--seq-len", "16", "--out", s(&run), "--json", s(&under)],
    ];
    for args in runs {
        let out = common::dejavu(&args, &[]);
        let line = common::assert_one_line_exit(&out, 1, &["a_file"]);
        assert!(!out.stderr.contains("loaded"), "{}: model work before the check: {line}", args[0]);
    }
    // A --ppl file that is not there fails before the model too.
    let out = common::dejavu(&["eval", "--model", s(&m), "--tasks-dir", s(&tasks), "--tasks", "copa", "--out", s(&tmp.path().join("o")), "--ppl", s(&tmp.path().join("nope.txt"))], &[]);
    common::assert_one_line_exit(&out, 1, &["nope.txt", "--ppl"]);
}

#[test]
fn collect_json_takes_a_file_like_ppl() {
    let tmp = tempfile::tempdir().unwrap();
    let text = tmp.path().join("t.txt");
    std::fs::write(&text, "the quick brown fox jumps over the lazy dog. ".repeat(20)).unwrap();
    let m = common::fixture_dir("tiny-opt");
    let j = tmp.path().join("collect.json");
    let out = common::dejavu(
        &["collect", "--model", s(&m), "--text", s(&text), "--tokens", "32", "--seq-len", "16", "--out", s(&tmp.path().join("run")), "--json", s(&j)],
        &[],
    );
    common::assert_ok(&out);
    assert!(out.stdout.contains("| model | tokens |"), "{}", out.stdout);
    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&j).unwrap()).unwrap();
    assert_eq!(v["tokens"], 32);
    assert!(v["steady_tokens_per_s"].is_number(), "{v}");
}

/// The Δ accuracy of the comparison table carries its standard error, computed here from the per-task
/// accuracies and standard errors in results.json: the mean's error is the root sum of squares over the number of
/// tasks, and the difference's combines both means' as independent.
#[test]
fn delta_accuracy_is_printed_with_its_error() {
    let tmp = tempfile::tempdir().unwrap();
    let o = tmp.path().join("o");
    let tasks = common::shared_dir().join("data/tasks");
    let out = common::dejavu(
        &["eval", "--model", s(&common::fixture_dir("tiny-opt")), "--tasks-dir", s(&tasks), "--tasks", "copa,piqa", "--limit", "8",
          "--compare", "dense,oracle@0.5", "--out", s(&o)],
        &[],
    );
    common::assert_ok(&out);
    let r: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(o.join("results.json")).unwrap()).unwrap();
    let stats = |m: usize| {
        let t = r["modes"][m]["tasks"].as_array().unwrap();
        let n = t.len() as f64;
        let mean = t.iter().map(|x| x["acc"].as_f64().unwrap()).sum::<f64>() / n;
        let se = t.iter().map(|x| x["acc_stderr"].as_f64().unwrap().powi(2)).sum::<f64>().sqrt() / n;
        (mean, se)
    };
    let ((a, a_se), (b, b_se)) = (stats(0), stats(1));
    // The comparison row: mode, MLP bytes read (as results.json has it), mean acc ± se, Δ ± se.
    let bytes = r["modes"][1]["mlp_read_fraction"].as_f64().unwrap();
    let want = format!(
        "| oracle@0.5 | {:.3} | {:.4} ± {:.4} | {:+.2} ± {:.2} |",
        bytes,
        b,
        b_se,
        100.0 * (b - a),
        100.0 * (a_se * a_se + b_se * b_se).sqrt()
    );
    assert!(out.stdout.contains(&want), "`{want}` not in\n{}", out.stdout);
    assert!((r["comparison"][1]["delta_acc"].as_f64().unwrap() - (b - a)).abs() < 1e-12);
    // results.json names the build and the time beside the model's fingerprint.
    let h = &r["header"];
    assert!(h["build"].as_str().is_some_and(|b| b.contains("commit ")), "{h}");
    assert!(h["created"].as_str().is_some_and(|c| c.ends_with('Z')), "{h}");
    assert!(h["model"]["fingerprint"].as_str().is_some_and(|f| f.len() == 16), "{h}");
}

/// A thresholds level the file lacks, asked for after modes that would run fine, fails before any model work and
/// writes nothing; `--mode` beside `--compare` is refused rather than ignored.
#[test]
fn every_mode_is_checked_before_the_first_runs() {
    let tmp = tempfile::tempdir().unwrap();
    let text = tmp.path().join("t.txt");
    std::fs::write(&text, "the quick brown fox jumps over the lazy dog. ".repeat(20)).unwrap();
    let m = common::fixture_dir("tiny-llama");
    let thr = tmp.path().join("thr.json");
    let out = common::dejavu(&["calibrate", "--model", s(&m), "--text", s(&text), "--sparsity", "0.5", "--tokens", "64", "--seq-len", "32", "--out", s(&thr)], &[]);
    common::assert_ok(&out);
    let tasks = tmp.path().join("tasks");
    std::fs::create_dir_all(&tasks).unwrap();
    std::fs::write(tasks.join("copa.jsonl"), "{\"query\": \"a\", \"choices\": [\"b\", \"c\"], \"gold\": 0}\n").unwrap();
    let o = tmp.path().join("o");
    let base = ["eval", "--model", s(&m), "--tasks-dir", s(&tasks), "--tasks", "copa", "--out", s(&o), "--thresholds", s(&thr)];
    let out = common::dejavu(&[&base[..], &["--compare", "dense,oracle@0.5,cats@0.3"]].concat(), &[]);
    assert_eq!(out.code, 2, "{}", out.stderr);
    assert!(out.stderr.contains("0.3") && !out.stderr.contains("loaded"), "{}", out.stderr);
    assert!(!o.join("results.json").exists());
    let out = common::dejavu(&[&base[..], &["--compare", "dense,cats@0.5", "--mode", "oracle@0.5"]].concat(), &[]);
    assert_eq!(out.code, 2, "{}", out.stderr);
    assert!(out.stderr.contains("--mode") && out.stderr.contains("--compare"), "{}", out.stderr);
}
