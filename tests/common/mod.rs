//! Shared test helpers: paths, the CLI runner, and a minimal GGUF writer for bad-input cases.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

pub fn manifest_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

pub fn fixture_dir(name: &str) -> PathBuf {
    manifest_dir().join("tests/fixtures").join(name)
}

/// `../shared` beside the checkout (or `DEJAVU_SHARED`). Tests that need it fail, not skip, when it is missing:
/// a green run must mean the real-data checks ran.
pub fn shared_dir() -> PathBuf {
    let p = std::env::var_os("DEJAVU_SHARED").map(PathBuf::from).unwrap_or_else(|| manifest_dir().join("../shared"));
    assert!(p.is_dir(), "{} not found: these tests read real data from ../shared (or set DEJAVU_SHARED)", p.display());
    p
}

pub struct Output {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

/// Run the `dejavu` binary with `args` and extra environment.
pub fn dejavu(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_dejavu"));
    cmd.args(args);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().expect("running the dejavu binary");
    Output {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// Copy a fixture directory into `dst` so a test can damage the copy.
pub fn copy_fixture(name: &str, dst: &Path) {
    std::fs::create_dir_all(dst).unwrap();
    for f in ["config.json", "model.safetensors", "tokenizer.json"] {
        std::fs::copy(fixture_dir(name).join(f), dst.join(f)).unwrap();
    }
}

/// A GGUF v3 file: llama metadata for a 1-layer model and the given tensors `(name, dims (ggml order), type, data)`.
/// `data_offset_override` replaces the offset of the tensor with that index (to point past the end of file).
pub fn write_gguf(path: &Path, tensors: &[(&str, Vec<u64>, u32, Vec<u8>)], offset_override: Option<(usize, u64)>) {
    fn s(out: &mut Vec<u8>, v: &str) {
        out.extend((v.len() as u64).to_le_bytes());
        out.extend(v.as_bytes());
    }
    let mut out = Vec::new();
    out.extend(b"GGUF");
    out.extend(3u32.to_le_bytes());
    out.extend((tensors.len() as u64).to_le_bytes());
    let kv_u32: &[(&str, u32)] = &[
        ("llama.embedding_length", 8),
        ("llama.feed_forward_length", 16),
        ("llama.block_count", 1),
        ("llama.attention.head_count", 2),
        ("llama.attention.head_count_kv", 2),
        ("llama.context_length", 64),
    ];
    out.extend((kv_u32.len() as u64 + 2).to_le_bytes());
    s(&mut out, "general.architecture");
    out.extend(8u32.to_le_bytes()); // string
    s(&mut out, "llama");
    for (k, v) in kv_u32 {
        s(&mut out, k);
        out.extend(4u32.to_le_bytes()); // uint32
        out.extend(v.to_le_bytes());
    }
    s(&mut out, "llama.attention.layer_norm_rms_epsilon");
    out.extend(6u32.to_le_bytes()); // float32
    out.extend(1e-5f32.to_le_bytes());
    let mut offset = 0u64;
    for (i, (name, dims, ty, data)) in tensors.iter().enumerate() {
        s(&mut out, name);
        out.extend((dims.len() as u32).to_le_bytes());
        for d in dims {
            out.extend(d.to_le_bytes());
        }
        out.extend(ty.to_le_bytes());
        let off = match offset_override {
            Some((j, o)) if j == i => o,
            _ => offset,
        };
        out.extend(off.to_le_bytes());
        offset += (data.len() as u64).div_ceil(32) * 32;
    }
    while out.len() % 32 != 0 {
        out.push(0);
    }
    // Tensors follow one another, each padded to the 32-byte alignment, at the offsets written above.
    for (_, _, _, data) in tensors {
        out.extend(data);
        while out.len() % 32 != 0 {
            out.push(0);
        }
    }
    std::fs::write(path, out).unwrap();
}

pub fn assert_ok(out: &Output) {
    assert_eq!(out.code, 0, "stdout: {}\nstderr: {}", out.stdout, out.stderr);
}

/// Exit `code` with no panic and exactly one non-empty line on stderr, holding each of `needles`; returns the line.
pub fn assert_one_line_exit<'a>(out: &'a Output, code: i32, needles: &[&str]) -> &'a str {
    assert_eq!(out.code, code, "exit code; stderr: {}", out.stderr);
    assert!(!out.stderr.contains("panicked"), "panic: {}", out.stderr);
    let lines: Vec<&str> = out.stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "one line expected, got: {}", out.stderr);
    for n in needles {
        assert!(lines[0].contains(n), "`{n}` missing from: {}", lines[0]);
    }
    lines[0]
}

/// A fixture model loaded onto the CPU reference backend, with its files.
pub fn load_fixture_model(name: &str) -> (dejavu::ModelFiles, dejavu::Model<dejavu::backend::CpuBackend>) {
    let files = dejavu::ModelFiles::resolve(fixture_dir(name).to_str().unwrap()).unwrap();
    let model = dejavu::Model::load(&files.config, files.checkpoint.as_ref(), &Default::default(), |_| {}).unwrap();
    (files, model)
}

/// `n` deterministic token ids below 320 (every fixture's vocabulary), varied by `seed`.
pub fn token_ids(n: usize, seed: u32) -> Vec<u32> {
    (0..n as u32).map(|i| (i * 131 + seed * 17 + 7) % 320).collect()
}

/// Wait until the collect run writing into `run` has finished its first activation shard, while `child` (that run)
/// is still alive; panics if it ends first or nothing appears within `limit`.
pub fn wait_for_first_shard(child: &mut std::process::Child, run: &Path, limit: std::time::Duration) {
    let t0 = std::time::Instant::now();
    let mpath = run.join("acts/manifest.json");
    loop {
        let shards = std::fs::read_to_string(&mpath)
            .ok()
            .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
            .map(|m| m["shards"].as_array().map(|a| a.len()).unwrap_or(0))
            .unwrap_or(0);
        if shards >= 1 {
            break;
        }
        assert!(child.try_wait().unwrap().is_none(), "the run ended before it could be killed");
        assert!(t0.elapsed() < limit, "no shard appeared");
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
}
