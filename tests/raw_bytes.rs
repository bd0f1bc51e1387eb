//! `Checkpoint::raw`: bytes straight from the file (borrowed, no copy) where the layout allows, `get` equal to
//! their f32 conversion, GGUF quant blocks decoded to f16 within f16 rounding of the exact f32 dequantization;
//! and the names table agreeing with what the fixture writer and the loaders see.

mod common;

use std::collections::BTreeSet;

use dejavu::fixture::{self, FixtureDtype};
use dejavu::source::checkpoint::{Checkpoint, GgufCheckpoint, SafetensorsCheckpoint};
use dejavu::source::weights::DType;
use dejavu::ModelConfig;

/// (name, dtype string, bytes) of every tensor, read by parsing the safetensors header by hand.
fn tensors_in_file(path: &std::path::Path) -> Vec<(String, String, Vec<u8>)> {
    let bytes = std::fs::read(path).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    let data = &bytes[8 + n..];
    header
        .into_iter()
        .filter(|(k, _)| k != "__metadata__")
        .map(|(k, v)| {
            let off = v["data_offsets"].as_array().unwrap();
            let (a, b) = (off[0].as_u64().unwrap() as usize, off[1].as_u64().unwrap() as usize);
            (k, v["dtype"].as_str().unwrap().to_string(), data[a..b].to_vec())
        })
        .collect()
}

#[test]
fn safetensors_raw_is_the_file_bytes_and_get_is_their_conversion() {
    let tmp = tempfile::tempdir().unwrap();
    for (dtype, want) in [(FixtureDtype::F16, DType::F16), (FixtureDtype::BF16, DType::BF16), (FixtureDtype::F32, DType::F32)] {
        let dir = tmp.path().join(format!("{dtype:?}"));
        fixture::write(&fixture::tiny_opt_proj(), &dir, dtype).unwrap();
        let file = dir.join("model.safetensors");
        let ck = SafetensorsCheckpoint::open_file(&file).unwrap();
        let in_file = tensors_in_file(&file);
        assert_eq!(in_file.len(), ck.names().len());
        for (name, st_dtype, bytes) in in_file {
            let raw = ck.raw(&name).unwrap();
            assert_eq!(raw.dtype, want, "{name}");
            assert_eq!(raw.dtype.name(), st_dtype, "{name}");
            assert!(raw.is_borrowed(), "{name}: safetensors raw must borrow the mmap");
            assert!(raw.bytes.as_ref() == bytes.as_slice(), "{name}: raw bytes differ from the file's");
            let host = ck.get(&name).unwrap();
            assert_eq!(host.shape, raw.shape, "{name}");
            assert_eq!(host.data, raw.to_f32(), "{name}");
            let meta = ck.meta(&name).unwrap();
            assert_eq!((meta.dtype, meta.shape, meta.bytes), (want, raw.shape.clone(), bytes.len()), "{name}");
        }
        let e = ck.raw("model.decoder.nope.weight").unwrap_err().to_string();
        assert!(e.contains("model.safetensors") && e.contains("model.decoder.nope.weight"), "{e}");
    }
}

#[test]
fn names_table_is_what_the_fixtures_hold() {
    for spec in fixture::all() {
        let cfg = ModelConfig::from_json(&spec.config, std::path::Path::new("config.json")).unwrap();
        let table: BTreeSet<String> = fixture::tensor_layout(&cfg).into_iter().map(|(n, _)| n).collect();
        let ck = SafetensorsCheckpoint::open_file(&common::fixture_dir(spec.name).join("model.safetensors")).unwrap();
        let held: BTreeSet<String> = ck.names().into_iter().collect();
        assert_eq!(table, held, "{}", spec.name);
        for (name, shape) in fixture::tensor_layout(&cfg) {
            assert_eq!(ck.meta(&name).unwrap().shape, shape, "{}: {name}", spec.name);
        }
    }
}

fn f16_bytes(vals: &[f32]) -> Vec<u8> {
    vals.iter().flat_map(|&x| half::f16::from_f32(x).to_le_bytes()).collect()
}

/// Q8_0 blocks: f16 scale, then 32 signed codes.
fn q8_0(n_blocks: usize) -> Vec<u8> {
    (0..n_blocks)
        .flat_map(|b| {
            let mut blk = half::f16::from_f32(0.013 * (b + 1) as f32).to_le_bytes().to_vec();
            blk.extend((0..32).map(|i| ((i * 37 + b * 11) % 255) as u8));
            blk
        })
        .collect()
}

/// Q4_0 blocks: f16 scale, then 16 bytes of two 4-bit codes.
fn q4_0(n_blocks: usize) -> Vec<u8> {
    (0..n_blocks)
        .flat_map(|b| {
            let mut blk = half::f16::from_f32(0.37 / (b + 1) as f32).to_le_bytes().to_vec();
            blk.extend((0..16).map(|i| ((i * 29 + b * 7) % 256) as u8));
            blk
        })
        .collect()
}

#[test]
fn gguf_raw_borrows_plain_tensors_and_decodes_quant_blocks_to_f16() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("mixed.gguf");
    // The 1-layer llama of tests/common: hidden 8, 2 heads (head_dim 4), 2 kv heads.
    let up: Vec<f32> = (0..8 * 16).map(|i| (i as f32 - 60.0) * 0.031).collect();
    let q: Vec<f32> = (0..8 * 8).map(|i| (i as f32) * 0.5).collect();
    common::write_gguf(
        &path,
        &[
            ("token_embd.weight", vec![32, 8], 8, q8_0(8)),         // Q8_0 [8, 32]
            ("blk.0.attn_k.weight", vec![32, 8], 2, q4_0(8)),       // Q4_0, permuted rows
            ("blk.0.attn_q.weight", vec![8, 8], 1, f16_bytes(&q)),  // F16, permuted rows
            ("blk.0.ffn_up.weight", vec![8, 16], 1, f16_bytes(&up)), // F16 [16, 8], as stored
        ],
        None,
    );
    let ck = GgufCheckpoint::open(&path).unwrap();
    assert_eq!(
        ck.names(),
        ["model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.k_proj.weight", "model.layers.0.mlp.up_proj.weight"]
    );

    let up_raw = ck.raw("model.layers.0.mlp.up_proj.weight").unwrap();
    assert!(up_raw.is_borrowed());
    assert_eq!((up_raw.dtype, up_raw.shape.clone()), (DType::F16, vec![16, 8]));
    assert!(up_raw.bytes.as_ref() == f16_bytes(&up).as_slice());

    let q_raw = ck.raw("model.layers.0.self_attn.q_proj.weight").unwrap();
    assert!(!q_raw.is_borrowed(), "q rows are un-permuted, so owned");
    assert_eq!(q_raw.to_f32(), ck.get("model.layers.0.self_attn.q_proj.weight").unwrap().data);

    for name in ["model.embed_tokens.weight", "model.layers.0.self_attn.k_proj.weight"] {
        let raw = ck.raw(name).unwrap();
        let exact = ck.get(name).unwrap();
        assert_eq!((raw.dtype, &raw.shape), (DType::F16, &exact.shape), "{name}");
        assert!(!raw.is_borrowed(), "{name}");
        let mut worst = 0.0f32;
        for (a, b) in raw.to_f32().iter().zip(&exact.data) {
            // f16 keeps 11 significant bits: round-to-nearest is within 2^-11 relative (plus subnormal spacing).
            let err = (a - b).abs();
            assert!(err <= b.abs() * 2f32.powi(-11) + 6e-8, "{name}: {a} vs {b}");
            worst = worst.max(err);
        }
        assert!(exact.data.iter().any(|&x| x != 0.0), "{name}: test data should not be all zero");
        eprintln!("{name}: max |f16 raw - f32 dequant| = {worst:.2e}");
        let meta = ck.meta(name).unwrap();
        assert_eq!(meta.dtype, DType::F16);
        assert!(meta.stored == "Q8_0" || meta.stored == "Q4_0", "{}", meta.stored);
    }
}

#[test]
fn inspect_cli_lists_and_reads_every_tensor() {
    let tmp = tempfile::tempdir().unwrap();
    let json = tmp.path().join("inspect.json");
    let dir = common::fixture_dir("tiny-llama");
    let out = common::dejavu(&["inspect", "--model", dir.to_str().unwrap(), "--read", "--json", json.to_str().unwrap()], &[]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert!(out.stdout.contains("model.layers.1.mlp.gate_proj.weight"), "{}", out.stdout);
    assert!(out.stdout.contains("GB/s"), "{}", out.stdout);
    let r: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let tensors = r["tensors"].as_array().unwrap();
    assert_eq!(tensors.len(), 21);
    let bytes: u64 = tensors.iter().map(|t| t["bytes"].as_u64().unwrap()).sum();
    assert_eq!(r["read"]["bytes"].as_u64(), Some(bytes));
    assert_eq!(r["read"]["borrowed_bytes"].as_u64(), Some(bytes));
    assert_eq!(r["family"], "llama");

    let bad = tmp.path().join("bad");
    common::copy_fixture("tiny-llama", &bad);
    std::fs::write(bad.join("model.safetensors"), b"not safetensors").unwrap();
    let out = common::dejavu(&["inspect", "--model", bad.to_str().unwrap()], &[]);
    assert_eq!(out.code, 1);
    assert!(out.stderr.contains("model.safetensors"), "{}", out.stderr);
}
