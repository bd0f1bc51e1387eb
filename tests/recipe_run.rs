//! `dejavu run RECIPE`: every shipped recipe resolves through the stages' own parsers; unknown keys are refused
//! naming key and file; a run skips finished stages, re-runs what a changed setting affects, and resumes after a
//! kill with the numbers of an uninterrupted run.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn env() -> Vec<(&'static str, String)> {
    vec![("DEJAVU_SHARED", common::shared_dir().to_str().unwrap().to_string())]
}

fn run(args: &[&str], extra_env: &[(&str, &str)]) -> common::Output {
    let e = env();
    let mut all: Vec<(&str, &str)> = e.iter().map(|(k, v)| (*k, v.as_str())).collect();
    all.extend_from_slice(extra_env);
    common::dejavu(&[&["run"], args].concat(), &all)
}

fn recipe(name: &str) -> PathBuf {
    common::manifest_dir().join("recipes").join(name)
}

/// Stage lines of stderr: `(stage, ran)`.
fn stages(stderr: &str) -> Vec<(String, bool)> {
    stderr
        .lines()
        .filter_map(|l| l.strip_prefix("== "))
        .filter(|l| l.contains(": running") || l.contains(": up to date"))
        .map(|l| {
            let (stage, rest) = l.split_once(':').unwrap();
            (stage.to_string(), rest.contains("running"))
        })
        .collect()
}

fn ran(out: &common::Output) -> Vec<String> {
    stages(&out.stderr).into_iter().filter(|(_, r)| *r).map(|(s, _)| s).collect()
}

fn results(run: &Path) -> serde_json::Value {
    let mut v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(run.join("eval/results.json")).unwrap()).unwrap();
    // What depends on the clock: when, and how fast.
    v["header"]["created"] = serde_json::Value::Null;
    for m in v["modes"].as_array_mut().unwrap() {
        if m["ppl"].is_object() {
            m["ppl"]["first_window_seconds"] = serde_json::Value::Null;
        }
        for t in m["tasks"].as_array_mut().unwrap() {
            t["seconds"] = serde_json::Value::Null;
            t["examples_per_s"] = serde_json::Value::Null;
        }
    }
    v
}

#[test]
fn every_shipped_recipe_resolves() {
    let dir = common::manifest_dir().join("recipes");
    let mut n = 0;
    for e in std::fs::read_dir(&dir).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_some_and(|x| x == "toml") {
            let tmp = tempfile::tempdir().unwrap();
            let out = run(&[s(&p), "--run", s(&tmp.path().join("r")), "--dry-run"], &[]);
            common::assert_ok(&out);
            assert_eq!(out.stdout.lines().filter(|l| l.starts_with("run  dejavu ")).count(), 4, "{}: {}", p.display(), out.stdout);
            if std::fs::read_to_string(&p).unwrap().contains("\n[full]") {
                let out = run(&[s(&p), "--run", s(&tmp.path().join("r")), "--dry-run", "--full"], &[]);
                common::assert_ok(&out);
                assert_eq!(out.stdout.lines().filter(|l| l.starts_with("run  dejavu ")).count(), 4, "{} --full: {}", p.display(), out.stdout);
            }
            n += 1;
        }
    }
    assert!(n >= 3, "recipes for the tiny OPT fixture, stories260k and SmolLM2 at least");
    // A stage's own `device` replaces the recipe's for that stage only.
    let tmp = tempfile::tempdir().unwrap();
    let out = run(&[s(&recipe("llama-2-7b.toml")), "--run", s(&tmp.path().join("r")), "--dry-run"], &[]);
    common::assert_ok(&out);
    let line = |stage: &str| out.stdout.lines().find(|l| l.contains(&format!("dejavu {stage} "))).unwrap().to_string();
    assert!(line("collect").ends_with("--device cuda"), "{}", out.stdout);
    assert!(line("eval").contains("--device cpu") && !line("eval").contains("cuda"), "{}", out.stdout);
}

#[test]
fn bad_recipes_name_the_key_and_the_file() {
    let tmp = tempfile::tempdir().unwrap();
    let bad = |text: &str, needles: &[&str]| {
        let p = tmp.path().join("bad.toml");
        std::fs::write(&p, text).unwrap();
        let out = run(&[s(&p), "--run", s(&tmp.path().join("r"))], &[]);
        assert_ne!(out.code, 0);
        let line = common::assert_one_line_exit(&out, out.code, &["bad.toml"]);
        for n in needles {
            assert!(line.contains(n), "`{n}` missing from {line}");
        }
        assert!(!tmp.path().join("r/run.json").exists(), "nothing is started for a bad recipe");
    };
    bad("model = \"m\"\nstages = [\"calibrate\"]\n[calibrate]\ntext = [\"t\"]\nsparsity = [0.5]\ntokenz = 5\n", &["[calibrate]", "unknown key `tokenz`"]);
    bad("model = \"m\"\nmodle = \"x\"\n", &["modle", "unknown key"]);
    bad("model = \"m\"\nstages = [\"eval\"]\n[eval]\nlimit = \"many\"\n", &["[eval]", "many"]);
    bad("model = \"m\"\n[collect]\nout = \"x\"\n", &["collect.out"]);
    bad("model = \"m\"\n[eval\n", &["bad.toml:2"]);
    bad("[eval]\nlimit = 3\n", &["model", "missing"]);
    bad("model = \"m\"\nfull = 3\n", &["full", "table"]);
}

/// `--data D` is `${DEJAVU_DATA}` in the recipe and eval's task directory; without it both come from the shared
/// directory; a missing `--data` directory is a usage error.
#[test]
fn data_flag_sets_the_data_directory() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path().join("mydata");
    std::fs::create_dir(&d).unwrap();
    let out = run(&[s(&recipe("smollm2-135m.toml")), "--dry-run", "--data", s(&d)], &[]);
    common::assert_ok(&out);
    let line = |o: &common::Output, stage: &str| o.stdout.lines().find(|l| l.contains(&format!("dejavu {stage} "))).unwrap().to_string();
    assert!(line(&out, "collect").contains(&format!("--text {}/text/wikitext2-valid.tokenized.txt", d.display())), "{}", out.stdout);
    assert!(line(&out, "eval").contains(&format!("--tasks-dir {}/tasks", d.display())), "{}", out.stdout);
    let out = run(&[s(&recipe("smollm2-135m.toml")), "--dry-run"], &[]);
    common::assert_ok(&out);
    let shared = common::shared_dir();
    assert!(line(&out, "collect").contains(&format!("--text {}/data/text/", shared.display())), "{}", out.stdout);
    assert!(!line(&out, "eval").contains("--tasks-dir"), "eval keeps its own default: {}", out.stdout);
    let out = run(&[s(&recipe("smollm2-135m.toml")), "--dry-run", "--data", s(&tmp.path().join("nope"))], &[]);
    common::assert_one_line_exit(&out, 2, &["--data", "nope", "not a directory"]);
}

/// `--full` applies the recipe's `[full]` overrides, `--set` still wins over them, and a recipe without `[full]`
/// refuses `--full` naming the file and the table.
#[test]
fn full_applies_the_recipes_full_table() {
    let tmp = tempfile::tempdir().unwrap();
    let p = tmp.path().join("r.toml");
    std::fs::write(
        &p,
        "model = \"m\"\nstages = [\"eval\"]\n[eval]\nlimit = 2\ntasks = [\"copa\"]\n[full]\n\"eval.limit\" = 500\nrun = \"elsewhere\"\n",
    )
    .unwrap();
    let eval_line = |extra: &[&str]| {
        let mut a = vec![s(&p), "--dry-run"];
        a.extend_from_slice(extra);
        let out = run(&a, &[]);
        common::assert_ok(&out);
        out.stdout.lines().find(|l| l.contains("dejavu eval ")).unwrap().to_string()
    };
    let quick = eval_line(&[]);
    assert!(quick.contains("--limit 2 ") && quick.contains("--run runs/r "), "{quick}");
    let full = eval_line(&["--full"]);
    assert!(full.contains("--limit 500 ") && full.contains("--run elsewhere "), "{full}");
    let set = eval_line(&["--full", "--set", "eval.limit=7"]);
    assert!(set.contains("--limit 7 "), "{set}");
    let q = tmp.path().join("q.toml");
    std::fs::write(&q, "model = \"m\"\n[eval]\nlimit = 2\n").unwrap();
    let out = run(&[s(&q), "--dry-run", "--full"], &[]);
    assert_ne!(out.code, 0);
    common::assert_one_line_exit(&out, out.code, &["q.toml", "full", "no [full] table"]);
    // A [full] key is checked like any other, when --full applies it.
    std::fs::write(&q, "model = \"m\"\nstages = [\"eval\"]\n[eval]\nlimit = 2\n[full]\n\"eval.limt\" = 3\n").unwrap();
    common::assert_ok(&run(&[s(&q), "--dry-run"], &[]));
    let out = run(&[s(&q), "--dry-run", "--full"], &[]);
    assert_ne!(out.code, 0);
    common::assert_one_line_exit(&out, out.code, &["q.toml", "[eval]", "unknown key `limt`"]);
}

/// The tiny-opt recipe end to end; a rerun skips every stage; a changed eval setting re-runs eval alone, a changed
/// calibration setting calibrate and eval; flags override the recipe; run.json holds the resolved recipe and
/// the tool version.
#[test]
fn run_skips_finished_stages_and_reruns_what_a_change_affects() {
    let tmp = tempfile::tempdir().unwrap();
    let r = tmp.path().join("run");
    let rec = recipe("tiny-opt.toml");
    let out = run(&[s(&rec), "--run", s(&r)], &[]);
    common::assert_ok(&out);
    assert_eq!(ran(&out), ["collect", "train-predictors", "calibrate", "eval"], "{}", out.stderr);
    assert!(out.stdout.contains("| dejavu@0.5 |"), "{}", out.stdout);
    let first = results(&r);
    let record: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(r.join("run.json")).unwrap()).unwrap();
    assert_eq!(record["tool_version"], env!("CARGO_PKG_VERSION"));
    assert!(record["build"].as_str().unwrap().contains("commit"));
    assert_eq!(record["resolved"]["tables"]["eval"]["limit"], 8);
    assert!(record["stages"]["eval"]["finished"].is_string());

    let out = run(&[s(&rec), "--run", s(&r)], &[]);
    common::assert_ok(&out);
    assert!(ran(&out).is_empty(), "{}", out.stderr);
    assert_eq!(stages(&out.stderr).len(), 4);
    assert_eq!(results(&r), first);

    let out = run(&[s(&rec), "--run", s(&r), "--set", "eval.limit=4"], &[]);
    common::assert_ok(&out);
    assert_eq!(ran(&out), ["eval"], "{}", out.stderr);
    assert_eq!(results(&r)["modes"][0]["tasks"][0]["n"], 4);

    let out = run(&[s(&rec), "--run", s(&r), "--set", "eval.limit=4", "--set", "calibrate.tokens=512"], &[]);
    common::assert_ok(&out);
    assert_eq!(ran(&out), ["calibrate", "eval"], "{}", out.stderr);
    let thr: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(r.join("thresholds.json")).unwrap()).unwrap();
    assert_eq!(thr["header"]["options"]["tokens"], 512);
}

/// Killed in the middle of collection, the same command resumes and ends with the numbers of an uninterrupted
/// run.
#[test]
fn killed_run_resumes_to_the_same_numbers() {
    let tmp = tempfile::tempdir().unwrap();
    let rec = recipe("tiny-opt.toml");
    let reference = tmp.path().join("ref");
    common::assert_ok(&run(&[s(&rec), "--run", s(&reference), "--set", "collect.shard_mb=0.03"], &[]));

    let r = tmp.path().join("run");
    let e = env();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_dejavu"))
        .args(["run", s(&rec), "--run", s(&r), "--set", "collect.shard_mb=0.03"])
        .envs(e.iter().map(|(k, v)| (*k, v.as_str())))
        .env(dejavu::collect::SLOW_ENV, "40")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    common::wait_for_first_shard(&mut child, &r, Duration::from_secs(120));
    child.kill().unwrap();
    child.wait().unwrap();
    let m: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(r.join("acts/manifest.json")).unwrap()).unwrap();
    assert_eq!(m["complete"], false, "killed too late to test resumption");
    let record: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(r.join("run.json")).unwrap()).unwrap();
    assert!(record["stages"]["collect"]["finished"].is_null());

    let out = run(&[s(&rec), "--run", s(&r), "--set", "collect.shard_mb=0.03"], &[]);
    common::assert_ok(&out);
    assert!(out.stderr.contains("did not finish last time"), "{}", out.stderr);
    assert!(out.stderr.contains("resuming"), "{}", out.stderr);
    let (mut a, mut b) = (results(&reference), results(&r));
    // The run directory is part of the recorded options.
    for v in [&mut a, &mut b] {
        v["header"]["options"] = serde_json::Value::Null;
    }
    assert_eq!(a, b);
}
