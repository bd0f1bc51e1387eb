//! The run directory's artifacts on the tiny fixtures: every stage refuses an artifact of another model, of
//! another format version or with no header (older dejavu), with one line naming the file; thresholds carry the
//! header; atomic writes leave no temp files and create files readable by all (0644 under the usual umask).

mod common;

use std::path::{Path, PathBuf};

use dejavu::calibrate::Thresholds;
use dejavu::collect::Activations;
use dejavu::predictor::Predictors;
use dejavu::store::{RunDir, ACTS_FORMAT, ACTS_VERSION, PREDICTORS_VERSION, THRESHOLDS_FORMAT, THRESHOLDS_VERSION};
use dejavu::ModelFiles;

type B = burn::backend::NdArray<f32>;

fn fixture(name: &str) -> String {
    common::fixture_dir(name).to_str().unwrap().to_string()
}

fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

fn identity(name: &str) -> dejavu::source::ModelIdentity {
    ModelFiles::resolve(&fixture(name)).unwrap().identity().unwrap()
}

fn write_text(path: &Path) {
    let words = ["the", "cat", "sat", "on", "mat", "dog", "ran", "to", "park"];
    let s: String = (0..80).map(|i| format!("line {i}: {} {} {}.\n", words[i % 9], words[(i * 5) % 9], words[(i * 7) % 9])).collect();
    std::fs::write(path, s).unwrap();
}

fn collect_args<'a>(model: &'a str, text: &'a Path, run: &'a Path) -> Vec<&'a str> {
    vec!["collect", "--model", model, "--text", p(text), "--tokens", "300", "--seq-len", "16", "--out", p(run)]
}

fn calibrate_args<'a>(model: &'a str, text: &'a Path, out: &'a Path) -> Vec<&'a str> {
    vec!["calibrate", "--model", model, "--text", p(text), "--sparsity", "0.5", "--tokens", "256", "--seq-len", "32", "--out", p(out)]
}

use common::assert_ok;

/// Exit 1 with exactly one non-empty line on stderr, holding each of `needles`.
fn assert_one_line_failure(out: &common::Output, needles: &[&str]) {
    common::assert_one_line_exit(out, 1, needles);
}

/// Bad usage: exit 2 with exactly one non-empty line on stderr, holding each of `needles`.
fn assert_one_line_usage(out: &common::Output, needles: &[&str]) {
    common::assert_one_line_exit(out, 2, needles);
}

/// A library error: one line holding each of `needles`.
fn assert_one_line(msg: &str, needles: &[&str]) {
    assert!(!msg.contains('\n'), "more than one line: {msg}");
    for n in needles {
        assert!(msg.contains(n), "`{n}` missing from: {msg}");
    }
}

fn read_json(path: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// Rewrite the JSON file at `path` through `edit`.
fn edit_json(path: &Path, edit: impl FnOnce(&mut serde_json::Value)) {
    let mut v = read_json(path);
    edit(&mut v);
    std::fs::write(path, serde_json::to_string_pretty(&v).unwrap()).unwrap();
}

fn set_version(path: &Path, version: u32) {
    edit_json(path, |v| v["header"]["version"] = version.into());
}

/// The process umask (0o022 where /proc does not say).
fn umask() -> u32 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find_map(|l| l.strip_prefix("Umask:").and_then(|v| u32::from_str_radix(v.trim(), 8).ok())))
        .unwrap_or(0o022)
}

/// Every file under `dir`, recursively.
fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let path = e.path();
        if path.is_dir() {
            out.extend(files_under(&path));
        } else {
            out.push(path);
        }
    }
    out
}

/// One collected and trained run of tiny-opt, plus thresholds calibrated into the run directory.
fn trained_run(tmp: &Path) -> RunDir {
    let text = tmp.join("calib.txt");
    write_text(&text);
    let run = RunDir::at(tmp.join("run"));
    let model = fixture("tiny-opt");
    assert_ok(&common::dejavu(&collect_args(&model, &text, run.root()), &[]));
    assert_ok(&common::dejavu(&["train-predictors", "--run", p(run.root()), "--epochs", "1", "--batch-size", "64"], &[]));
    assert_ok(&common::dejavu(&calibrate_args(&model, &text, &run.thresholds()), &[]));
    run
}

#[test]
fn every_stage_refuses_other_versions_and_models() {
    let tmp = tempfile::tempdir().unwrap();
    let run = trained_run(tmp.path());
    let text = tmp.path().join("calib.txt");
    let (opt, llama) = (identity("tiny-opt"), identity("tiny-llama"));
    let dev = Default::default();

    // Another model: the predictors loader and the thresholds loader (collect resume and train-predictors
    // --model are covered in collect_train.rs).
    let e = Predictors::<B>::load(&run.predictors(), &llama, &dev).err().expect("predictors of another model");
    assert_one_line(&e.to_string(), &["predictors/manifest.json", "made for model", "fingerprint"]);
    let e = Thresholds::load(&run.thresholds(), &llama).expect_err("thresholds of another model");
    assert_one_line(&e.to_string(), &["thresholds.json", "made for model", "fingerprint"]);

    // Another format version, older and newer, for each stage's reader.
    let acts = run.acts_manifest();
    for (version, words) in [(ACTS_VERSION - 1, "older dejavu"), (ACTS_VERSION + 1, "newer dejavu")] {
        set_version(&acts, version);
        // collect resuming into the run.
        let out = common::dejavu(&collect_args(&fixture("tiny-opt"), &text, run.root()), &[]);
        assert_one_line_failure(&out, &["acts/manifest.json", "dejavu.acts", &format!("version {version}"), words]);
        // train-predictors reading the activations.
        let out = common::dejavu(&["train-predictors", "--run", p(run.root()), "--epochs", "1"], &[]);
        assert_one_line_failure(&out, &["acts/manifest.json", &format!("version {version}"), words]);
        let e = Activations::open(run.root()).err().expect("activations of another version");
        assert_one_line(&e.to_string(), &["acts/manifest.json", &format!("version {version}")]);
    }
    set_version(&acts, ACTS_VERSION);
    assert!(Activations::open(run.root()).is_ok());

    let pm = run.predictors_manifest();
    set_version(&pm, PREDICTORS_VERSION - 1);
    let e = Predictors::<B>::load(&run.predictors(), &opt, &dev).err().expect("predictors of an older version");
    assert_one_line(&e.to_string(), &["predictors/manifest.json", "older dejavu", "re-run `dejavu train-predictors`"]);
    set_version(&pm, PREDICTORS_VERSION);
    assert!(Predictors::<B>::load(&run.predictors(), &opt, &dev).is_ok());

    let thr = run.thresholds();
    set_version(&thr, THRESHOLDS_VERSION + 1);
    let e = Thresholds::load(&thr, &opt).expect_err("thresholds of a newer version");
    assert_one_line(&e.to_string(), &["thresholds.json", "newer dejavu"]);
    set_version(&thr, THRESHOLDS_VERSION);
    assert!(Thresholds::load(&thr, &opt).is_ok());

    // Another format in the right place.
    edit_json(&thr, |v| v["header"]["format"] = "dejavu.acts".into());
    let e = Thresholds::load(&thr, &opt).expect_err("an activations header in a thresholds file");
    assert_one_line(&e.to_string(), &["thresholds.json", "expected `dejavu.thresholds`", "found `dejavu.acts`"]);

    // Files of the first dejavu, with no header: a thresholds file and an activations manifest.
    edit_json(&thr, |v| {
        let o = v.as_object_mut().unwrap();
        let h = o.remove("header").unwrap();
        o.insert("model".into(), h["model"].clone());
        o.insert("dejavu_version".into(), "0.1.0".into());
    });
    let e = Thresholds::load(&thr, &opt).expect_err("a thresholds file with no header");
    assert_one_line(&e.to_string(), &["thresholds.json", "older dejavu", "re-run `dejavu calibrate`"]);
    edit_json(&acts, |v| {
        let o = v.as_object_mut().unwrap();
        o.remove("header");
        o.insert("format".into(), "dejavu-acts/1".into());
    });
    let out = common::dejavu(&["train-predictors", "--run", p(run.root()), "--epochs", "1"], &[]);
    assert_one_line_failure(&out, &["acts/manifest.json", "dejavu-acts/1", "older dejavu", "re-run `dejavu collect`"]);
}

#[test]
fn artifacts_carry_the_header_and_leave_no_temp_files() {
    let tmp = tempfile::tempdir().unwrap();
    let run = trained_run(tmp.path());
    let id = identity("tiny-opt");

    let thr = read_json(&run.thresholds());
    let h = &thr["header"];
    assert_eq!(h["format"], THRESHOLDS_FORMAT);
    assert_eq!(h["version"], THRESHOLDS_VERSION);
    assert_eq!(h["tool_version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(h["model"]["fingerprint"], id.fingerprint.as_str());
    assert_eq!(h["options"]["sparsity"], serde_json::json!([0.5]));
    assert_eq!(h["options"]["tokens"], 256);
    let created = h["created"].as_str().unwrap();
    assert!(created.len() == 20 && created.ends_with('Z') && created.as_bytes()[10] == b'T', "created: {created}");
    let t = Thresholds::load(&run.thresholds(), &id).unwrap();
    assert_eq!(t.levels.len(), 1);

    let acts = read_json(&run.acts_manifest());
    assert_eq!(acts["header"]["format"], ACTS_FORMAT);
    assert_eq!(acts["header"]["options"]["tokens"], 300);
    let pm = read_json(&run.predictors_manifest());
    assert_eq!(pm["header"]["format"], "dejavu.predictors");
    assert_eq!(pm["header"]["options"]["epochs"], 1);

    let files = files_under(run.root());
    assert!(files.iter().any(|f| f.extension().is_some_and(|e| e == "safetensors")));
    for f in &files {
        let name = f.file_name().unwrap().to_string_lossy();
        assert!(!name.ends_with(".tmp") && !name.starts_with(".tmp"), "temp file left behind: {}", f.display());
        #[cfg(unix)]
        {
            // 0644 less the umask, as File::create makes it; safetensors' own tempfile would leave 0600.
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(f).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o644 & !umask(), "{}: mode {mode:o}", f.display());
        }
    }
}

#[test]
fn eval_results_are_written_with_the_header() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = RunDir::at(tmp.path()).eval();
    let header = dejavu::store::ArtifactHeader::new(dejavu::store::EVAL_FORMAT, dejavu::store::EVAL_VERSION, identity("tiny-opt"), &serde_json::json!({"tasks": ["copa"]}));
    let results = serde_json::json!({"modes": [{"mode": "dense"}]});
    dejavu::store::write_eval_results(&dir, &header, &results, &[("results.csv", b"mode\ndense\n".as_slice())]).unwrap();
    let v = read_json(&dir.join("results.json"));
    assert_eq!(v["header"]["format"], "dejavu.eval");
    assert_eq!(v["modes"][0]["mode"], "dense");
    assert_eq!(std::fs::read_to_string(dir.join("results.csv")).unwrap(), "mode\ndense\n");
    assert_eq!(files_under(&dir).len(), 2, "temp files left behind");
}

#[test]
fn run_dir_open_and_create_name_the_path() {
    let tmp = tempfile::tempdir().unwrap();
    let missing = tmp.path().join("nope");
    let e = RunDir::open(&missing).unwrap_err().to_string();
    assert_one_line(&e, &[p(&missing), "no such run directory"]);
    let file = tmp.path().join("file");
    std::fs::write(&file, "x").unwrap();
    let e = RunDir::create(&file).unwrap_err().to_string();
    assert_one_line(&e, &[p(&file), "not a directory"]);
    let made = RunDir::create(&tmp.path().join("a/b")).unwrap();
    assert!(made.root().is_dir());
    assert_eq!(RunDir::open(made.root()).unwrap(), made);
}

#[test]
fn library_errors_name_the_option_and_the_cli_the_flag() {
    let tmp = tempfile::tempdir().unwrap();
    let text = tmp.path().join("calib.txt");
    write_text(&text);
    let run = tmp.path().join("run");
    let model = fixture("tiny-opt");
    let mut args = collect_args(&model, &text, &run);
    args[6] = "0"; // --tokens 0
    // The library reports `Error::Option` naming the field `tokens`; the CLI names the flag and exits 2 (bad usage).
    assert_one_line_usage(&common::dejavu(&args, &[]), &["error: --tokens: ", "must be at least 1"]);
    assert_ok(&common::dejavu(&collect_args(&model, &text, &run), &[]));
    // train-predictors prints what it is about to train before the options are checked; the error is one line.
    let out = common::dejavu(&["train-predictors", "--run", p(&run), "--holdout", "1.5"], &[]);
    assert_eq!(out.code, 2, "{}", out.stderr);
    let errors: Vec<&str> = out.stderr.lines().filter(|l| l.starts_with("error:")).collect();
    assert_eq!(errors.len(), 1, "{}", out.stderr);
    assert_one_line(errors[0], &["error: --holdout: ", "(0, 1)"]);
}
