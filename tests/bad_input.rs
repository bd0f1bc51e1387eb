//! Bad input gives a one-line error naming the file (and tensor or field), a non-zero exit, and no panic.

mod common;

use std::path::Path;

fn assert_clean_failure(out: &common::Output, must_contain: &[&str]) {
    let line = common::assert_one_line_exit(out, 1, must_contain);
    assert!(line.starts_with("error: "), "{line}");
}

fn generate(model: &Path) -> common::Output {
    common::dejavu(&["generate", "--model", model.to_str().unwrap(), "-n", "2"], &[])
}

#[test]
fn missing_model_path() {
    let out = generate(Path::new("/nonexistent/dejavu/model-dir"));
    assert_clean_failure(&out, &["/nonexistent/dejavu/model-dir", "no such file"]);
}

#[test]
fn missing_tokenizer_file() {
    let tmp = tempfile::tempdir().unwrap();
    common::copy_fixture("tiny-opt", tmp.path());
    std::fs::remove_file(tmp.path().join("tokenizer.json")).unwrap();
    assert_clean_failure(&generate(tmp.path()), &["tokenizer.json", "not found"]);
}

#[test]
fn truncated_safetensors() {
    let tmp = tempfile::tempdir().unwrap();
    common::copy_fixture("tiny-opt", tmp.path());
    let st = tmp.path().join("model.safetensors");
    let bytes = std::fs::read(&st).unwrap();
    std::fs::write(&st, &bytes[..bytes.len() / 2]).unwrap();
    assert_clean_failure(&generate(tmp.path()), &["model.safetensors", "truncated", "tensor `"]);
}

#[test]
fn safetensors_header_lies_about_offsets() {
    let tmp = tempfile::tempdir().unwrap();
    common::copy_fixture("tiny-llama", tmp.path());
    let st = tmp.path().join("model.safetensors");
    let bytes = std::fs::read(&st).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let mut header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    // Shift one tensor's start by 4 bytes: its range now overlaps its neighbour and no longer fits its shape.
    let name = "model.layers.0.mlp.up_proj.weight";
    let offs = header[name]["data_offsets"].as_array().unwrap().clone();
    let start = offs[0].as_u64().unwrap();
    header[name]["data_offsets"] = serde_json::json!([start + 4, offs[1]]);
    let mut text = serde_json::to_string(&header).unwrap();
    while text.len() < n {
        text.push(' ');
    }
    assert_eq!(text.len(), n, "header must keep its length");
    let mut out = bytes[..8].to_vec();
    out.extend(text.as_bytes());
    out.extend(&bytes[8 + n..]);
    std::fs::write(&st, out).unwrap();
    assert_clean_failure(&generate(tmp.path()), &["model.safetensors", name]);
}

#[test]
fn tensor_shape_disagrees_with_config() {
    let tmp = tempfile::tempdir().unwrap();
    common::copy_fixture("tiny-opt", tmp.path());
    let cfg_path = tmp.path().join("config.json");
    let mut cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&cfg_path).unwrap()).unwrap();
    cfg["ffn_dim"] = serde_json::json!(72);
    std::fs::write(&cfg_path, cfg.to_string()).unwrap();
    assert_clean_failure(&generate(tmp.path()), &["model.safetensors", "model.decoder.layers.0.fc1.weight", "[64, 32]", "[72, 32]"]);
}

#[test]
fn unknown_model_type() {
    let tmp = tempfile::tempdir().unwrap();
    common::copy_fixture("tiny-opt", tmp.path());
    let cfg_path = tmp.path().join("config.json");
    let mut cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&cfg_path).unwrap()).unwrap();
    cfg["model_type"] = serde_json::json!("gpt_neox");
    std::fs::write(&cfg_path, cfg.to_string()).unwrap();
    assert_clean_failure(&generate(tmp.path()), &["config.json", "model_type", "gpt_neox"]);
}

#[test]
fn config_missing_a_field() {
    let tmp = tempfile::tempdir().unwrap();
    common::copy_fixture("tiny-llama", tmp.path());
    let cfg_path = tmp.path().join("config.json");
    let mut cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&cfg_path).unwrap()).unwrap();
    cfg.as_object_mut().unwrap().remove("intermediate_size");
    std::fs::write(&cfg_path, cfg.to_string()).unwrap();
    assert_clean_failure(&generate(tmp.path()), &["config.json", "intermediate_size"]);
}

#[test]
fn gguf_with_unsupported_quant_type() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("q4k.gguf");
    // type 12 is Q4_K: 256-element super-blocks of 144 bytes. A tokenizer.json beside the file lets loading
    // reach the weights.
    std::fs::copy(common::fixture_dir("tiny-llama").join("tokenizer.json"), tmp.path().join("tokenizer.json")).unwrap();
    common::write_gguf(&path, &[("token_embd.weight", vec![8, 32], 12, vec![7u8; 144])], None);
    assert_clean_failure(&generate(&path), &["q4k.gguf", "token_embd.weight", "Q4_K"]);
}

#[test]
fn gguf_with_offset_past_end_of_file() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("badoff.gguf");
    std::fs::copy(common::fixture_dir("tiny-llama").join("tokenizer.json"), tmp.path().join("tokenizer.json")).unwrap();
    let data: Vec<u8> = (0..8 * 4).map(|i| i as u8).collect();
    common::write_gguf(
        &path,
        &[("output_norm.weight", vec![8], 0, data.clone()), ("blk.0.attn_norm.weight", vec![8], 0, data)],
        Some((1, 1 << 20)),
    );
    assert_clean_failure(&generate(&path), &["badoff.gguf", "blk.0.attn_norm.weight"]);
}

#[test]
fn uncached_hub_id_offline() {
    let home = tempfile::tempdir().unwrap();
    let out = common::dejavu(
        &["generate", "--model", "facebook/opt-125m", "-n", "2"],
        &[("HF_HOME", home.path().to_str().unwrap()), ("HF_HUB_OFFLINE", "1")],
    );
    assert_clean_failure(&out, &["facebook/opt-125m", "config.json", "HF_HUB_OFFLINE=1"]);
}

#[test]
fn bad_usage_exits_2() {
    let out = common::dejavu(&["generate", "--no-such-flag"], &[]);
    assert_eq!(out.code, 2, "{}", out.stderr);
    let out = common::dejavu(&["generate", "--model", "x", "--device", "tpu"], &[]);
    assert_eq!(out.code, 2, "{}", out.stderr);
    // A compute capability out of range is refused before anything is compiled, with or without the feature.
    let out = common::dejavu(&["engine-check", "--compile-only", "5"], &[]);
    assert_eq!(out.code, 2, "{}", out.stderr);
    assert!(out.stderr.contains("--compile-only") && !out.stderr.contains("panicked"), "{}", out.stderr);
}

#[test]
fn calibrate_seq_len_over_the_position_table_is_bad_usage() {
    // tiny-opt has max_position_embeddings 64; calibrate's default --seq-len is 512.
    let tmp = tempfile::tempdir().unwrap();
    let text = tmp.path().join("calib.txt");
    std::fs::write(&text, "the quick brown fox jumps over the lazy dog. ".repeat(40)).unwrap();
    let opt = common::fixture_dir("tiny-opt");
    let out_file = tmp.path().join("th.json");
    let (m, t, o) = (opt.to_str().unwrap(), text.to_str().unwrap(), out_file.to_str().unwrap());
    let out = common::dejavu(&["calibrate", "--model", m, "--text", t, "--sparsity", "0.5", "--tokens", "600", "--out", o], &[]);
    assert_eq!(out.code, 2, "{}", out.stderr);
    assert!(!out.stderr.contains("panicked"), "{}", out.stderr);
    assert!(out.stderr.contains("--seq-len") && out.stderr.contains("64"), "{}", out.stderr);
    assert!(!out_file.exists());
    // collect refuses the same.
    let run = tmp.path().join("run");
    let r = run.to_str().unwrap();
    let out = common::dejavu(&["collect", "--model", m, "--text", t, "--tokens", "100", "--seq-len", "512", "--out", r], &[]);
    assert_eq!(out.code, 2, "{}", out.stderr);
    assert!(!out.stderr.contains("panicked"), "{}", out.stderr);
    assert!(out.stderr.contains("--seq-len") && out.stderr.contains("64"), "{}", out.stderr);
}

#[test]
fn ppl_on_missing_and_binary_text() {
    let llama = common::fixture_dir("tiny-llama");
    let out = common::dejavu(&["ppl", "--model", llama.to_str().unwrap(), "--text", "/nonexistent/t.txt"], &[]);
    assert_clean_failure(&out, &["/nonexistent/t.txt"]);
    let tmp = tempfile::tempdir().unwrap();
    let bin = tmp.path().join("bin.dat");
    std::fs::write(&bin, [0xffu8, 0xfe, 0x00, 0x80, 0x81]).unwrap();
    let out = common::dejavu(&["ppl", "--model", llama.to_str().unwrap(), "--text", bin.to_str().unwrap()], &[]);
    assert_clean_failure(&out, &["bin.dat", "UTF-8"]);
}

#[test]
fn cuda_device_without_the_feature_or_driver_is_a_clear_error() {
    let opt = common::fixture_dir("tiny-opt");
    let out = common::dejavu(&["generate", "--model", opt.to_str().unwrap(), "--device", "cuda", "-n", "1"], &[]);
    if out.code == 0 {
        return; // a machine with CUDA and a cuda build: nothing to check here
    }
    assert_clean_failure(&out, &["--device cuda"]);
}

// The CUDA engine on a machine without a GPU (CI, the dev box): one line saying what is missing, exit 1, no
// panic. In a build without the feature the line names the feature; with it, the missing driver library.
fn engine_missing_needles() -> &'static [&'static str] {
    if cfg!(feature = "cuda") { &["libcuda"] } else { &["`cuda` feature"] }
}

#[test]
fn cuda_devices_without_a_gpu() {
    // The engine (`cuda`) and the reference forward on burn CUDA (`burn-cuda`): the same one-line refusal, naming
    // the device.
    let m = common::fixture_dir("tiny-opt");
    let m = m.to_str().unwrap();
    for (device, args) in [("cuda", &["generate", "-n", "2"][..]), ("burn-cuda", &["ppl", "--text", "x"][..])] {
        let mut argv = vec![args[0], "--model", m, "--device", device];
        argv.extend_from_slice(&args[1..]);
        let out = common::dejavu(&argv, &[]);
        let line = common::assert_one_line_exit(&out, 1, engine_missing_needles());
        assert!(line.contains(&format!("--device {device}")), "{line}");
    }
}

#[test]
fn bench_without_a_gpu() {
    let out = common::dejavu(&["bench", "--shape", "llama2-7b"], &[]);
    common::assert_one_line_exit(&out, 1, engine_missing_needles());
}

#[test]
fn bench_usage_errors() {
    let out = common::dejavu(&["bench", "--shape", "llama-9000"], &[]);
    common::assert_one_line_exit(&out, 2, &["--shape llama-9000", "unknown shape", "llama2-7b"]);
    let out = common::dejavu(&["bench", "--shape", "llama2-7b", "--batch", "0"], &[]);
    common::assert_one_line_exit(&out, 2, &["--batch"]);
    let out = common::dejavu(&["generate", "--model", "x", "--device", "cuda", "--mode", "oracle@0.5"], &[]);
    common::assert_one_line_exit(&out, 2, &["--mode oracle@0.5", "dense", "cats@S", "qscore@S"]);
    let out = common::dejavu(&["generate", "--model", "x", "--device", "cuda", "--mode", "cascade@0.5"], &[]);
    common::assert_one_line_exit(&out, 2, &["--mode cascade@0.5", "--device cpu", "--device burn-cuda"]);
    let out = common::dejavu(&["bench", "--mlp-block", "--shape", "llama2-7b", "--keep", "0"], &[]);
    common::assert_one_line_exit(&out, 2, &["--keep 0", "(0, 1]"]);
    let out = common::dejavu(&["bench", "--shape", "opt-13b", "--mode", "dejavu@0.9", "--rank", "0"], &[]);
    common::assert_one_line_exit(&out, 2, &["--rank must be at least 1"]);
    let out = common::dejavu(&["bench", "--shape", "opt-13b", "--mode", "qscore@0.5"], &[]);
    common::assert_one_line_exit(&out, 2, &["--mode qscore@0.5", "opt-13b"]);
    let out = common::dejavu(&["bench", "--mlp-block", "--shape", "llama2-7b", "--reps", "0"], &[]);
    common::assert_one_line_exit(&out, 2, &["--reps"]);
    let out = common::dejavu(&["bench", "--mlp-block", "--shape", "opt-13b", "--rule", "qscore"], &[]);
    common::assert_one_line_exit(&out, 2, &["--rule qscore", "opt-13b"]);
    let out = common::dejavu(&["bench", "--shape", "opt-13b", "--mode", "qscore@0.5"], &[]);
    common::assert_one_line_exit(&out, 2, &["--mode qscore@0.5", "opt-13b"]);
    let out = common::dejavu(&["bench", "--shape", "opt-13b", "--mode", "dejavu"], &[]);
    common::assert_one_line_exit(&out, 2, &["--mode dejavu", "dejavu@S"]);
    let out = common::dejavu(&["bench", "--shape", "llama2-7b", "--mode", "cats@0.5"], &[]);
    common::assert_one_line_exit(&out, 2, &["--mode cats@0.5", "--model"]);
    let out = common::dejavu(&["bench", "--shape", "llama2-7b", "--mode", "qscore@0.5", "--head-sparsity", "1.5"], &[]);
    common::assert_one_line_exit(&out, 2, &["--head-sparsity 1.5"]);
    let out = common::dejavu(&["bench", "--shape", "opt-13b", "--kernels", "--mlp-block"], &[]);
    common::assert_one_line_exit(&out, 2, &["--kernels", "--mlp-block"]);
    let out = common::dejavu(&["bench", "--shape", "opt-13b", "--kernels", "--kernel-layers", "0"], &[]);
    common::assert_one_line_exit(&out, 2, &["--kernel-layers"]);
    let out = common::dejavu(&["bench", "--shape", "llama2-7b", "--launch-cost", "--chain", "1"], &[]);
    common::assert_one_line_exit(&out, 2, &["--launch-cost", "--chain"]);
    let out = common::dejavu(&["bench", "--shape", "llama2-7b", "--launch-cost", "--kernels"], &[]);
    common::assert_one_line_exit(&out, 2, &["--launch-cost", "--kernels"]);
    let out = common::dejavu(&["bench", "--shape", "llama2-7b", "--launch-cost", "--csv", "x.csv"], &[]);
    common::assert_one_line_exit(&out, 2, &["--launch-cost", "--csv"]);
}

#[test]
fn reference_round_knob_is_checked() {
    let m = common::fixture_dir("tiny-opt");
    let out = common::dejavu(&["generate", "--model", m.to_str().unwrap(), "-n", "1"], &[("DEJAVU_REFERENCE_ROUND", "f8")]);
    assert_ne!(out.code, 0, "{}", out.stderr);
    assert!(out.stderr.contains("DEJAVU_REFERENCE_ROUND") && out.stderr.contains("f8"), "{}", out.stderr);
}

#[test]
fn bench_lists_its_shapes() {
    let out = common::dejavu(&["bench", "--list-shapes"], &[]);
    common::assert_ok(&out);
    let text = &out.stdout;
    for name in ["opt-125m", "opt-175b", "llama2-70b", "mistral-7b", "smollm2-135m"] {
        assert!(text.contains(name), "{name} missing from:\n{text}");
    }
}

#[test]
fn skipping_key_value_heads_needs_predicted_heads() {
    let m = common::fixture_dir("tiny-llama");
    let m = m.to_str().unwrap();
    let out = common::dejavu(&["generate", "--model", m, "-n", "1", "--mode", "oracle@0.5", "--head-sparsity", "0.5", "--head-kv", "kept"], &[]);
    common::assert_one_line_exit(&out, 2, &["--head-kv", "predicted heads"]);
    let out = common::dejavu(&["generate", "--model", m, "-n", "1", "--head-kv", "some"], &[]);
    assert_eq!(out.code, 2, "{}", out.stderr);
    assert!(out.stderr.contains("--head-kv") && out.stderr.contains("kept"), "{}", out.stderr);
}
